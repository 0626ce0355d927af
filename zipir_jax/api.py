r"""Images in, restorations out, in one call (the style of diffusers pipelines).

  from zipir_jax import ZipIRPipeline
  pipe = ZipIRPipeline.from_pretrained("bundle/", dtype="bfloat16")
  restored = pipe("photo.jpg", scale=8, prompt="a photo of a cat")   # a PIL image
  restored = pipe([a, b, c], size=(2048, 2048), output_type="np")    # float [0, 1] HWC arrays

Inputs are paths, PIL images or arrays (uint8, uint16 or float [0, 1] HWC RGB), in any mix of
sizes; images that share an input and output size are restored together, ``batch_size`` at a time.
This is the one restore path: ``sample.py``, ``zipir_jax.evaluate``, the web page
(``zipir_jax.app``) and the notebook call it, and it runs :class:`~zipir_jax.restore.Restorer`,
which reads as the method (resize → pad → encode → sample → decode → crop → colour fix).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
from PIL import Image

from zipir_jax import bundle as bundle_lib
from zipir_jax import diffusion, image_io, restore
from zipir_jax.data.decode import decode_image
from zipir_jax.errors import BadImageError, OptionError

ImageInput = str | os.PathLike | np.ndarray | Image.Image
StepCallback = diffusion.StepCallback
OUTPUT_TYPES = ("pil", "np")
PROGRESS_DELAY_S = 1.0  # a batch shows its DDIM-step bar once it has run this long
DTYPES = ("float32", "bfloat16")


def restore_options(
  *,
  steps: int | None = None,
  cfg: float | None = None,
  negative_prompt: str | None = None,
  strength: float | None = None,
  eta: float | None = None,
  seed: int = 0,
  color_fix: str | None = None,
  fusion_weight: float | None = None,
) -> restore.RestoreOptions:
  """The sampling controls of a pipeline call, checked (``None``: the bundle config's default)."""
  return restore.RestoreOptions(
    steps=steps,
    cfg_scale=cfg,
    negative_prompt=negative_prompt,
    eta=eta,
    strength=strength,
    color_fix=color_fix,
    fusion_weight=fusion_weight,
    seed=seed,
  )


def load_image(image: ImageInput, name: str) -> np.ndarray:
  """A path, PIL image or array as an HxWx3 RGB array (uint8, or float32 [0, 1] for float and
  uint16 input); a BadImageError names ``name`` and the problem."""
  if isinstance(image, (str, os.PathLike)):
    return image_io.read_image(os.fspath(image))
  try:
    if isinstance(image, np.ndarray) and (
      np.issubdtype(image.dtype, np.floating) or (image.dtype == np.uint16 and image.ndim == 3)
    ):
      return restore.to_unit_float(image, name)  # full precision, no 8-bit rounding
    if isinstance(image, (np.ndarray, Image.Image)):  # uint8 RGB, gray or alpha; PIL images
      return decode_image(image)
  except BadImageError as e:
    raise BadImageError(e.kind, f"{name}: {e}") from e
  raise BadImageError(
    "bad_input", f"{name}: a {type(image).__name__}; expected a path, a PIL image or an array"
  )


class ZipIRPipeline:
  """A loaded ZipIR bundle that restores images of any size in one call."""

  def __init__(self, bundle: bundle_lib.Bundle, dtype: str | None = None):
    """``dtype`` (float32 | bfloat16) overrides the compute dtype of every network."""
    if dtype is not None:
      if dtype not in DTYPES:
        raise OptionError(f"dtype={dtype!r}; valid: {', '.join(DTYPES)}")
      config = copy.deepcopy(bundle.config)
      with config.unlocked():
        config.vae.dtype = config.dit.dtype = dtype
      bundle = dataclasses.replace(bundle, config=config)
    self.restorer = restore.Restorer(bundle)

  @classmethod
  def from_pretrained(
    cls, path: str | os.PathLike, *, dtype: str | None = None, plain_decoder: str | None = None
  ) -> ZipIRPipeline:
    """Loads a bundle folder (Orbax or safetensors layout; see ``zipir_jax.bundle``).

    ``plain_decoder``: decode with D_f from that training export instead of the bundle's D_f*
    (the paper's "w/o pixel-aware decoder", :func:`~zipir_jax.bundle.with_plain_decoder`).
    """
    bundle = bundle_lib.load_bundle(os.fspath(path))
    if plain_decoder:
      bundle = bundle_lib.with_plain_decoder(bundle, plain_decoder)
    return cls(bundle, dtype=dtype)

  @property
  def config(self):
    return self.restorer.config

  def prepare(self, image: ImageInput, name: str | None = None) -> np.ndarray:
    """``image`` read and checked (decodable, RGB, large enough), as :func:`load_image` returns
    it; a BadImageError names the image and the problem."""
    if name is None:
      name = os.fspath(image) if isinstance(image, (str, os.PathLike)) else "image"
    array = load_image(image, name)
    restore.check_lq_size(array.shape[:2], self.config.restore.min_lq_size, name)
    return array

  def __call__(
    self,
    images: ImageInput | Sequence[ImageInput],
    *,
    scale: float | None = None,
    size: tuple[int, int] | None = None,
    prompt: str | Sequence[str] = "",
    output_type: str = "pil",
    batch_size: int = 1,
    progress: bool = True,
    callback: StepCallback | None = None,
    **options: Any,
  ) -> Any:
    """Restores one image or a list; returns the same: PIL images or float32 [0, 1] HWC arrays.

    ``scale`` (a factor of each input) or ``size`` (H, W for all) sets the output size. ``prompt``
    is one caption or one per image. ``options``: ``negative_prompt``, ``steps``, ``cfg``,
    ``strength`` (1 = from noise, < 1 from the noised LQ latent), ``eta``, ``seed``, ``color_fix``
    (none | wavelet | adain), ``fusion_weight``; each defaults to the bundle's config.
    ``progress``: a bar over the DDIM steps (tqdm; shown once a batch runs past a second).
    ``callback(step, t, latents)`` runs after each DDIM step with the DiT's normalised latents as
    a numpy array (``zipir_jax.latents.decode`` maps them to pixels). Both run on the host from
    inside the one compiled sampling program (:func:`~zipir_jax.diffusion.make_ddim_sampler`).
    """
    if output_type not in OUTPUT_TYPES:
      raise OptionError(f"output_type={output_type!r}; valid: {', '.join(OUTPUT_TYPES)}")
    single = not isinstance(images, (list, tuple))
    items = [images] if single else list(images)
    results: list[Any] = [None] * len(items)
    for index, image in self.iter_restore(
      items,
      scale=scale,
      size=size,
      prompt=prompt,
      batch_size=batch_size,
      progress=progress,
      callback=callback,
      **options,
    ):
      if output_type == "pil":
        image = Image.fromarray(image_io.to_uint8(image))
      results[index] = image
    return results[0] if single else results

  def iter_restore(
    self,
    images: Sequence[ImageInput],
    *,
    scale: float | None = None,
    size: tuple[int, int] | None = None,
    prompt: str | Sequence[str] = "",
    batch_size: int = 1,
    progress: bool = True,
    callback: StepCallback | None = None,
    **options: Any,
  ) -> Iterator[tuple[int, np.ndarray]]:
    """``(index, float32 [0, 1] HWC restoration)`` as each batch finishes (arguments as for
    ``__call__``): a caller writes results while later batches still run. Every input is read and
    checked before the first batch starts."""
    sampling = restore_options(**options)
    if (scale is None) == (size is None):
      raise OptionError("give exactly one of scale (e.g. 8) or size (H, W)")
    if batch_size < 1:
      raise OptionError(f"batch_size={batch_size}: must be at least 1")
    prompts = [prompt] * len(images) if isinstance(prompt, str) else list(prompt)
    if len(prompts) != len(images):
      raise OptionError(f"{len(prompts)} prompts for {len(images)} images")
    names = [
      os.fspath(x) if isinstance(x, (str, os.PathLike)) else f"image {i}"
      for i, x in enumerate(images)
    ]
    arrays = [self.prepare(x, name) for x, name in zip(images, names)]
    groups = collections.defaultdict(list)  # (LQ shape, output size) -> input indices
    for i, array in enumerate(arrays):
      try:
        out_size = restore.target_size(array.shape[:2], scale, size)
      except ValueError as e:
        raise OptionError(str(e)) from None
      groups[(array.shape, out_size)].append(i)
    steps = sampling.steps or self.config.diffusion.sample_steps
    for (_, out_size), indices in groups.items():
      for start in range(0, len(indices), batch_size):
        batch = indices[start : start + batch_size]
        with _step_bar(progress, steps, out_size, len(batch)) as bar:
          restored = self.restorer.restore(
            [arrays[i] for i in batch],
            out_size,
            [prompts[i] for i in batch],
            sampling,
            _on_step(bar, callback),
          )
        yield from zip(batch, restored)


def _step_bar(progress: bool, steps: int, out_size: tuple[int, int], batch: int):
  """A tqdm bar over one batch's DDIM steps, drawn only once the batch has run for a second."""
  if not progress:
    return contextlib.nullcontext()
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top

  label = f"{out_size[0]}x{out_size[1]}" + (f" x{batch}" if batch > 1 else "")
  return tqdm(
    total=steps, desc=label, unit="step", delay=PROGRESS_DELAY_S, mininterval=0, leave=False
  )


def _on_step(bar: Any, callback: StepCallback | None) -> StepCallback | None:
  """The sampler's per-step hook: the bar, then the user's callback."""
  if bar is None and callback is None:
    return None

  def on_step(step: int, t: int, latents: np.ndarray) -> None:
    if bar is not None:
      bar.update(1)
    if callback is not None:
      callback(step, t, latents)

  return on_step
