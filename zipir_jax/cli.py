"""What the restoration command lines do alike: quiet library logs, and errors in one line.

Light (no JAX): a program calls these before its heavy imports.
"""

from __future__ import annotations

import logging
import os
import sys

from zipir_jax.errors import ZipIRError

# Loggers whose INFO lines bury a progress bar: Orbax writes a dozen per checkpoint read, through
# absl logging and Python logging both.
LIBRARY_LOGGERS = ("absl", "orbax", "jax", "etils", "tensorstore")


def quiet_library_logs(verbosity: int | None = None) -> None:
  """Library INFO lines off, unless ``verbosity`` >= 1 (or absl's ``--verbosity`` was given).

  ``None`` reads absl's ``--verbosity`` flag when the program parsed absl flags: given there, its
  level stands as absl set it.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging as absl_logging  # pylint: disable=g-import-not-at-top

  if verbosity is None and flags.FLAGS.is_parsed() and flags.FLAGS["verbosity"].present:
    return
  if verbosity is not None and verbosity >= 1:
    absl_logging.set_verbosity(absl_logging.INFO)
    logging.getLogger().setLevel(logging.INFO)
    return
  absl_logging.set_verbosity(absl_logging.WARNING)
  logging.getLogger().setLevel(logging.WARNING)
  for name in LIBRARY_LOGGERS:
    logging.getLogger(name).setLevel(logging.WARNING)
  # transformers logs through its own handler, read once at import: "PyTorch was not found" is
  # by design here (the T5 encoder runs in JAX).
  os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def fail(error: str | BaseException, status: int = 2) -> int:
  """Prints ``error: <message>`` as one line on stderr (no traceback); returns ``status``."""
  message = " ".join(str(error).split()) or type(error).__name__
  print(f"error: {message}", file=sys.stderr)
  return status


USER_ERRORS = (ZipIRError, OSError)  # what a command line reports in one line: user mistakes
