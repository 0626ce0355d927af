"""Restoration, read top to bottom as the method (§3, Fig. 2b):

  resize LQ to the target size → pad to a multiple of 32 → encode LQ↑ with the LP-VAE → normalise →
  DDIM with CFG on ZipDiT (text: the prompt; unconditional branch: the negative prompt) →
  un-normalise → decode with the pixel-aware decoder D_f*(z, LQ↑) → crop → optional colour fix.

Images of the same size are restored as one batch; every jitted program is compiled once per
(batch, shape). From ``config.restore.tile_min_pixels`` (4096² by default) the VAE networks run
tiled with whole-image GroupNorm statistics (models/tiling.py): same result, small programs. Host-side images are uint8 or float in [0, 1] HWC RGB; inside, [-1, 1] NHWC.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from zipir_jax import diffusion, latents, text
from zipir_jax.bundle import Bundle
from zipir_jax.data import degradations
from zipir_jax.errors import BadImageError, OptionError
from zipir_jax.models import autoencoder, t5, tiling
from zipir_jax.models import dit as dit_lib

Array = jax.Array
COLOR_FIXES = ("none", "wavelet", "adain")
TEXT_CACHE_SIZE = 64  # prompt embeddings a Restorer keeps (2 MB each at T5-XXL width)


def enable_compilation_cache(path: str | None = None) -> str | None:
  """Persists compiled programs on disk, so a repeated run at the same shapes skips compilation.

  ``path`` None: ``$JAX_COMPILATION_CACHE_DIR`` if set, else ``~/.cache/zipir_jax/xla``; "" disables.
  """
  if path is None:
    path = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "zipir_jax", "xla"
    )
  if not path:
    return None
  os.makedirs(path, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  return path


@dataclasses.dataclass(frozen=True)
class RestoreOptions:
  """Sampling controls; ``None`` takes the config's default (``config.diffusion``/``restore``).

  Checked when made, so a wrong value fails before any weights load or image decodes.
  """

  steps: int | None = None
  cfg_scale: float | None = None
  negative_prompt: str | None = None
  eta: float | None = None
  strength: float | None = None
  color_fix: str | None = None
  fusion_weight: float | None = None
  seed: int = 0

  def __post_init__(self):
    if self.color_fix is not None:
      check_color_fix(self.color_fix)
    if self.steps is not None and self.steps < 1:
      raise OptionError(f"steps={self.steps}: DDIM needs at least 1 step")
    if self.strength is not None and not 0.0 < self.strength <= 1.0:
      raise OptionError(f"strength={self.strength}: must be in (0, 1] (1 starts from pure noise)")
    if self.eta is not None and self.eta < 0:
      raise OptionError(f"eta={self.eta}: must be >= 0 (0 is deterministic DDIM)")


def check_color_fix(method: str) -> str:
  """``method`` if it is a known colour fix, else an OptionError naming the valid ones."""
  if method not in COLOR_FIXES:
    raise OptionError(f"unknown colour fix {method!r}; valid: {', '.join(COLOR_FIXES)}")
  return method


def check_lq_size(hw: tuple[int, int], min_size: int, name: str = "image") -> None:
  """Refuses an LQ image with a side below ``config.restore.min_lq_size`` (too little to restore)."""
  if min(hw) < min_size:
    raise BadImageError(
      "too_small", f"{name}: {hw[0]}x{hw[1]} is too small (sides of at least {min_size} px)"
    )


def target_size(
  lq_hw: tuple[int, int], scale: float | None = None, size: tuple[int, int] | None = None
) -> tuple[int, int]:
  """Output (H, W): ``size`` if given, else the LQ size times ``scale`` (rounded)."""
  if (scale is None) == (size is None):
    raise ValueError("give exactly one of scale (e.g. 8) or size (H, W)")
  if size is not None:
    if min(size) < 1:
      raise ValueError(f"output size must be positive, got {size}")
    return int(size[0]), int(size[1])
  if scale <= 0:
    raise ValueError(f"scale must be positive, got {scale}")
  return max(1, round(lq_hw[0] * scale)), max(1, round(lq_hw[1] * scale))


def pad_to_multiple(images: np.ndarray, multiple: int) -> np.ndarray:
  """Reflect-pads NHWC images at the bottom/right to multiples of ``multiple`` (cropped back later)."""
  h, w = images.shape[1:3]
  ph, pw = -h % multiple, -w % multiple
  mode = "reflect" if ph < h and pw < w else "symmetric"  # reflect needs pad < size
  return np.pad(images, ((0, 0), (0, ph), (0, pw), (0, 0)), mode=mode)


def adain_color_fix(image: Array, reference: Array, eps: float = 1e-5) -> Array:
  """Matches each channel's mean and standard deviation to the reference (StableSR's AdaIN fix)."""
  axes = (1, 2)
  mu, sd = image.mean(axes, keepdims=True), image.std(axes, keepdims=True)
  ref_mu, ref_sd = reference.mean(axes, keepdims=True), reference.std(axes, keepdims=True)
  return (image - mu) / (sd + eps) * ref_sd + ref_mu


def _wavelet_blur(x: Array, radius: int) -> Array:
  """À-trous 3x3 binomial blur with dilation ``radius`` and replicate padding."""
  kernel = jnp.array([[1, 2, 1], [2, 4, 2], [1, 2, 1]], x.dtype) / 16
  c = x.shape[-1]
  padded = jnp.pad(x, ((0, 0), (radius, radius), (radius, radius), (0, 0)), mode="edge")
  return jax.lax.conv_general_dilated(
    padded,
    jnp.tile(kernel[:, :, None, None], (1, 1, 1, c)),
    (1, 1),
    "VALID",
    rhs_dilation=(radius, radius),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
    feature_group_count=c,
  )


def wavelet_bands(x: Array, levels: int = 5) -> list[Array]:
  """À-trous bands, finest first, then the low frequency: ``x == sum(bands)``.

  Band ``i`` holds detail 2^i to 2^(i+1) pixels wide (stripes of period 2^(i+1) to 2^(i+2)); the
  last holds what is coarser (StableSR's wavelet colour fix takes it from LQ↑).
  """
  bands = []
  for i in range(levels):
    low = _wavelet_blur(x, 2**i)
    bands.append(x - low)
    x = low
  return bands + [x]


def wavelet_decomposition(x: Array, levels: int = 5) -> tuple[Array, Array]:
  """(high frequencies, low frequency) with ``x == high + low`` (StableSR's wavelet colour fix)."""
  *highs, low = wavelet_bands(x, levels)
  return sum(highs, jnp.zeros_like(x)), low


def wavelet_color_fix(image: Array, reference: Array) -> Array:
  """The restored image's high frequencies on the reference's (LQ↑'s) low frequency."""
  return wavelet_decomposition(image)[0] + wavelet_decomposition(reference)[1]


def color_fix(image: Array, reference: Array, method: str) -> Array:
  """``image`` with the colour of ``reference`` (LQ↑) by ``method`` (one of COLOR_FIXES)."""
  check_color_fix(method)
  if method == "adain":
    return adain_color_fix(image, reference)
  if method == "wavelet":
    return wavelet_color_fix(image, reference)
  return image


def to_unit_float(image: np.ndarray, name: str = "image") -> np.ndarray:
  """uint8 / uint16 / float [0, 1] HWC RGB -> float32 [0, 1]."""
  if image.ndim != 3 or image.shape[-1] != 3:
    raise BadImageError(
      "bad_array", f"{name}: expected an HxWx3 RGB image, got an array of shape {image.shape}"
    )
  if image.dtype == np.uint8:
    return image.astype(np.float32) / 255.0
  if image.dtype == np.uint16:
    return image.astype(np.float32) / 65535.0
  if np.issubdtype(image.dtype, np.floating):
    return np.clip(image.astype(np.float32), 0.0, 1.0)
  raise BadImageError("bad_array", f"{name}: unsupported pixel type {image.dtype}")


class Restorer:
  """Restores batches of same-size LQ images with a loaded :class:`~zipir_jax.bundle.Bundle`.

  Its jitted programs are closures over the networks (no weights inside) built here, so dropping
  the Restorer frees its device copy of the weights: nothing global keeps it alive.
  """

  def __init__(self, bundle: Bundle):
    self.config = config = bundle.config
    self.vae = vae = autoencoder.build_autoencoder(config)
    self.pixel_decoder = pixel_decoder = autoencoder.build_pixel_decoder(config)
    self.dit = dit_lib.build_dit(config)
    self.text_model = t5.T5Encoder(bundle.text_config)
    self._samplers: dict[int, Any] = {}
    # Weights go to the device once (a loaded bundle holds host arrays, which every jitted call
    # would otherwise copy again), the DiT's kernels already in the compute dtype. The Restorer
    # keeps no reference to the bundle's float32 DiT (9.5 GiB for the paper's): drop the bundle to
    # free it.
    params = dict(bundle.params)
    params["dit"] = dit_lib.inference_params(
      params["dit"], autoencoder.compute_dtype(config.dit.dtype)
    )
    self.bundle = dataclasses.replace(bundle, params=jax.device_put(params))
    self._text_cache: collections.OrderedDict[str, tuple[Array, Array]] = collections.OrderedDict()

    def encode(params: Any, lq_up: Array) -> Array:
      """LQ↑ -> normalised latent (the DiT's condition); the posterior mode, no sampling."""
      return latents.encode(vae, params["vae"], lq_up, params["latent_stats"])

    def decode(params: Any, z: Array, lq_up: Array, fusion_weight: Array) -> Array:
      return latents.decode(
        pixel_decoder, params["pixel_decoder"], z, lq_up, params["latent_stats"], fusion_weight
      )

    self._encode_fn, self._decode_fn = encode, decode
    self._encode_jit, self._decode_jit = jax.jit(encode), jax.jit(decode)

  @property
  def params(self) -> dict[str, Any]:
    return self.bundle.params

  @property
  def dit_params(self) -> Any:
    return self.bundle.params["dit"]

  @property
  def factor(self) -> int:
    return self.vae.factor

  def encode_text(self, prompts: Sequence[str]) -> tuple[Array, Array]:
    """T5 embeddings and masks of ``prompts``, each distinct prompt encoded once.

    A folder restored under one prompt (and the fixed negative prompt) runs the text encoder once,
    so its weights (9.5 GB for T5-XXL) can stay where the bundle holds them (the host, when
    loaded) instead of occupying the device next to the 8K decoder. The last
    ``TEXT_CACHE_SIZE`` prompts are kept; new ones are encoded together, padded to the batch size
    (one compiled encoder per batch size).
    """
    missing = list(dict.fromkeys(p for p in prompts if p not in self._text_cache))
    if missing:
      padded = missing + [""] * (len(prompts) - len(missing))
      emb, mask = text.encode_prompts(
        padded,
        self.bundle.tokenizer,
        self.text_model,
        self.bundle.text_params,
        self.config.text.max_length,
      )
      for i, prompt in enumerate(missing):
        self._text_cache[prompt] = (emb[i], mask[i])
    for prompt in prompts:
      self._text_cache.move_to_end(prompt)
    rows = [self._text_cache[p] for p in prompts]
    while len(self._text_cache) > max(TEXT_CACHE_SIZE, len(prompts)):
      self._text_cache.popitem(last=False)
    return jnp.stack([e for e, _ in rows]), jnp.stack([m for _, m in rows])

  def tiled(self, height: int, width: int) -> bool:
    """Whether images of this (padded) size run the VAE networks tiled (see models/tiling.py)."""
    return height * width >= self.config.restore.tile_min_pixels

  def encode(self, params: Any, lq_up: Array) -> Array:
    if self.tiled(*lq_up.shape[1:3]):
      with tiling.tiled_convolutions(self.config.restore.tile_strip_rows):
        return self._encode_fn(params, lq_up)
    return self._encode_jit(params, lq_up)

  def decode(self, params: Any, z: Array, lq_up: Array, fusion_weight: Array) -> Array:
    if self.tiled(*lq_up.shape[1:3]):
      with tiling.tiled_convolutions(self.config.restore.tile_strip_rows):
        return self._decode_fn(params, z, lq_up, fusion_weight)
    return self._decode_jit(params, z, lq_up, fusion_weight)

  def upsample_lq(self, images: Sequence[np.ndarray], out_size: tuple[int, int]) -> np.ndarray:
    """[0, 1] HWC LQ images -> LQ↑ at ``out_size`` in [-1, 1], NHWC, resized as training made it."""
    mode = self.config.data.degradation.upsample_mode
    lq_up = np.stack([degradations.upsample(im, tuple(out_size), mode) for im in images])
    return np.clip(lq_up, 0.0, 1.0) * 2.0 - 1.0

  def _sampler(self, steps: int):
    if steps not in self._samplers:
      self._samplers[steps] = diffusion.make_ddim_sampler(
        dit_lib.as_denoise_fn(self.dit),
        diffusion.schedule_from_config(self.config.diffusion),
        steps,
        self.config.diffusion.clip_x0 or None,
      )
    return self._samplers[steps]

  def restore(
    self,
    images: Sequence[np.ndarray],
    out_size: tuple[int, int],
    prompts: Sequence[str] | None = None,
    options: RestoreOptions = RestoreOptions(),
    callback: diffusion.StepCallback | None = None,
  ) -> np.ndarray:
    """Restores same-size LQ images (HWC RGB) to ``out_size``; returns float32 [0, 1] NHWC.

    ``callback(step, t, latents)``, if given, runs after every DDIM step (see
    :func:`~zipir_jax.diffusion.make_ddim_sampler`); without it the sampler is one program.
    """
    cfg, diff = self.config, self.config.diffusion
    steps = options.steps or diff.sample_steps
    method = check_color_fix(options.color_fix or cfg.restore.color_fix)
    lq = [to_unit_float(np.asarray(im), f"image {i}") for i, im in enumerate(images)]
    if len({im.shape for im in lq}) != 1:
      raise ValueError(
        f"a batch must hold images of one size, got {sorted({im.shape for im in lq})}"
      )
    check_lq_size(lq[0].shape[:2], cfg.restore.min_lq_size, "LQ image")
    prompts = list(prompts) if prompts is not None else [""] * len(lq)
    if len(prompts) != len(lq):
      raise ValueError(f"{len(prompts)} prompts for {len(lq)} images")
    h, w = out_size

    # 1. Resize LQ to the target size (as training made LQ↑), 2. pad to a multiple of 32.
    lq_up = self.upsample_lq(lq, out_size)
    lq_up_padded = jnp.asarray(pad_to_multiple(lq_up, self.factor))
    params = self.params

    # 3. Encode LQ↑ (the condition), 4. sample the restored latent with DDIM + CFG.
    lq_latent = self.encode(params, lq_up_padded)
    text_emb, text_mask = self.encode_text(prompts)
    negative = diff.negative_prompt if options.negative_prompt is None else options.negative_prompt
    neg_emb, neg_mask = self.encode_text([negative])
    z = self._sampler(steps)(
      self.dit_params,
      lq_latent,
      text_emb,
      text_mask,
      neg_emb,
      neg_mask,
      jax.random.key(options.seed),
      cfg_scale=diff.cfg_scale if options.cfg_scale is None else options.cfg_scale,
      eta=diff.eta if options.eta is None else options.eta,
      strength=diff.strength if options.strength is None else options.strength,
      callback=callback,
    )

    # 5. Decode with D_f* (LQ↑ supplies pixel detail), 6. crop, 7. colour fix.
    fusion = cfg.restore.fusion_weight if options.fusion_weight is None else options.fusion_weight
    restored = self.decode(params, z, lq_up_padded, jnp.float32(fusion))[:, :h, :w]
    restored = color_fix(restored, jnp.asarray(lq_up), method)
    return np.asarray(jnp.clip((restored + 1.0) / 2.0, 0.0, 1.0))
