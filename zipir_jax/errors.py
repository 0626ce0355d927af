"""The user errors of zipir-jax: mistakes in a config, a file or an input, not bugs.

Every class derives from :class:`ZipIRError`, so a command-line program catches that one class and
prints its message in one line, without a traceback. Each also derives from the built-in error a
caller would expect (``ValueError``, ``FileNotFoundError``, …). A leaf module: it imports nothing
from the package, so every layer (models, data, training, CLIs) can raise these.
"""

from __future__ import annotations


class ZipIRError(Exception):
  """Base of every user error; its message names the file, key or value at fault."""


class ConfigError(ZipIRError, ValueError):
  """A config value that cannot work (an unknown name, a mesh the devices cannot form)."""


class MissingPrerequisiteError(ZipIRError, FileNotFoundError):
  """An earlier stage's export is not where this stage looks for it."""


class CaptionCacheError(ZipIRError, ValueError):
  """A caption cache is missing, incomplete, or does not belong to this run's text encoder."""


class MissingCaptionError(CaptionCacheError, KeyError):
  """A caption of the training data is not in the cache (it was built from other data)."""

  def __str__(self) -> str:  # KeyError would repr() the message.
    return str(self.args[0])


class BundleError(ZipIRError, ValueError):
  """A bundle folder is missing a part or does not match its config."""


class BundleNotFoundError(ZipIRError, FileNotFoundError):
  """No bundle folder where one was named."""


class NonFiniteError(ZipIRError, RuntimeError):
  """Too many non-finite updates in a row; the last good checkpoint is on disk."""


class DataError(ZipIRError, ValueError):
  """Training or evaluation data that cannot be used: a folder without one usable image, an
  image of the wrong size."""


class MissingInputError(ZipIRError, FileNotFoundError):
  """A file or folder named on the command line is not there."""


class BadImageError(ZipIRError, ValueError):
  """An image that cannot be used; ``kind`` is a short machine-readable reason."""

  def __init__(self, kind: str, message: str):
    super().__init__(message)
    self.kind = kind


class OptionError(ZipIRError, ValueError):
  """A restoration option outside what it can be (an unknown colour fix, strength above 1)."""


class OutputNameError(ZipIRError, ValueError):
  """Two inputs of one run would be written to the same output file."""


class CheckpointError(ZipIRError, ValueError):
  """A weight file is corrupt, truncated or not in a supported format."""


class UnsafeCheckpointError(CheckpointError):
  """A pickle references a global outside the state-dict allowlist (it could run code)."""


class T5CheckpointError(ZipIRError, ValueError):
  """A T5 checkpoint folder, config or state dict does not match what the encoder expects."""


class NcnnFormatError(ZipIRError, ValueError):
  """An ncnn .param/.bin pair is malformed, truncated, or not an RRDBNet."""
