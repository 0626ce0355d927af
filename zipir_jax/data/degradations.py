"""Real-ESRGAN second-order degradation model, on the host (NumPy/OpenCV, no JAX).

ZipIR trains on synthetic pairs "degraded using methods similar to [Real-ESRGAN]", with the LQ
image "resized to match the high-quality images" (§3.2). This module follows Real-ESRGAN (Wang et
al. 2021) — ``basicsr/data/degradations.py``, ``realesrgan/data/realesrgan_dataset.py`` and
``RealESRGANModel.feed_data`` — operation by operation, with the overall scale configurable (the
paper restores 8x-16x). All randomness comes from the ``np.random.Generator`` passed in, so an
example is a pure function of (image, rng state).

Images inside this module are float32 HWC RGB in [0, 1]; the public entry point :func:`degrade`
takes and returns uint8.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Mapping, Sequence
from typing import Any

import cv2
import numpy as np
from scipy import special

# Real-ESRGAN's filter2D pads with torch 'reflect' (no edge repeat) = OpenCV BORDER_REFLECT_101.
_BORDER = cv2.BORDER_REFLECT_101
_CV2_INTERPOLATION = {
  "area": cv2.INTER_AREA,
  "bilinear": cv2.INTER_LINEAR,
  "bicubic": cv2.INTER_CUBIC,
  "nearest": cv2.INTER_NEAREST,
}
KERNEL_TYPES = (
  "iso",
  "aniso",
  "generalized_iso",
  "generalized_aniso",
  "plateau_iso",
  "plateau_aniso",
)
# ITU-R BT.601 luma, as torchvision's rgb_to_grayscale used by Real-ESRGAN's gray noise.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


# ------------------------------------------------------------------------------------------------
# Parameters.


@dataclasses.dataclass(frozen=True)
class StageParams:
  """One degradation stage of Real-ESRGAN (blur, random resize, noise, JPEG)."""

  blur_prob: float
  kernel_list: tuple[str, ...]
  kernel_prob: tuple[float, ...]
  sinc_prob: float
  blur_sigma: tuple[float, float]
  betag_range: tuple[float, float]
  betap_range: tuple[float, float]
  resize_prob: tuple[float, float, float]
  resize_range: tuple[float, float]
  gaussian_noise_prob: float
  noise_range: tuple[float, float]
  poisson_scale_range: tuple[float, float]
  gray_noise_prob: float
  jpeg_range: tuple[float, float]


@dataclasses.dataclass(frozen=True)
class DegradationParams:
  """All numbers of the second-order model; built from ``config.data.degradation``."""

  scale_range: tuple[float, float]
  stage1: StageParams
  stage2: StageParams
  kernel_size_range: tuple[int, int]
  resize_modes: tuple[str, ...]
  sinc_small_kernel_below: int
  sinc_omega_small: tuple[float, float]
  sinc_omega_large: tuple[float, float]
  final_sinc_prob: float
  final_sinc_omega: tuple[float, float]
  usm_sharpen: bool
  usm_weight: float
  usm_radius: int
  usm_threshold: float
  upsample_mode: str

  @classmethod
  def from_config(cls, c: Mapping[str, Any]) -> DegradationParams:
    """Builds the parameters from a ``config.data.degradation`` ConfigDict (or dict)."""

    def stage(suffix: str, blur_prob: float) -> StageParams:
      return StageParams(
        blur_prob=blur_prob,
        kernel_list=tuple(c["kernel_list" + suffix]),
        kernel_prob=tuple(float(p) for p in c["kernel_prob" + suffix]),
        sinc_prob=float(c["sinc_prob" + suffix]),
        blur_sigma=_pair(c["blur_sigma" + suffix]),
        betag_range=_pair(c["betag_range" + suffix]),
        betap_range=_pair(c["betap_range" + suffix]),
        resize_prob=tuple(float(p) for p in c["resize_prob" + suffix]),
        resize_range=_pair(c["resize_range" + suffix]),
        gaussian_noise_prob=float(c["gaussian_noise_prob" + suffix]),
        noise_range=_pair(c["noise_range" + suffix]),
        poisson_scale_range=_pair(c["poisson_scale_range" + suffix]),
        gray_noise_prob=float(c["gray_noise_prob" + suffix]),
        jpeg_range=_pair(c["jpeg_range" + suffix]),
      )

    params = cls(
      scale_range=_pair(c["scale_range"]),
      stage1=stage("", 1.0),
      stage2=stage("2", float(c["second_blur_prob"])),
      kernel_size_range=(int(c["kernel_size_range"][0]), int(c["kernel_size_range"][1])),
      resize_modes=tuple(c["resize_modes"]),
      sinc_small_kernel_below=int(c["sinc_small_kernel_below"]),
      sinc_omega_small=_pair(c["sinc_omega_small"]),
      sinc_omega_large=_pair(c["sinc_omega_large"]),
      final_sinc_prob=float(c["final_sinc_prob"]),
      final_sinc_omega=_pair(c["final_sinc_omega"]),
      usm_sharpen=bool(c["usm_sharpen"]),
      usm_weight=float(c["usm_weight"]),
      usm_radius=int(c["usm_radius"]),
      usm_threshold=float(c["usm_threshold"]),
      upsample_mode=str(c["upsample_mode"]),
    )
    params.validate()
    return params

  def validate(self) -> None:
    """Raises ValueError naming the config field that is inconsistent."""
    where = "config.data.degradation"
    lo, hi = self.scale_range
    if not 1.0 <= lo <= hi:
      raise ValueError(f"{where}.scale_range must satisfy 1 <= lo <= hi, got {self.scale_range}")
    klo, khi = self.kernel_size_range
    if klo % 2 == 0 or khi % 2 == 0 or not 1 <= klo <= khi:
      raise ValueError(
        f"{where}.kernel_size_range must be odd (lo, hi), got {self.kernel_size_range}"
      )
    for mode in self.resize_modes + (self.upsample_mode,):
      if mode not in _CV2_INTERPOLATION:
        raise ValueError(
          f"{where}: unknown resize mode {mode!r}; expected one of {sorted(_CV2_INTERPOLATION)}"
        )
    for name, s in (("", self.stage1), ("2", self.stage2)):
      unknown = set(s.kernel_list) - set(KERNEL_TYPES)
      if unknown:
        raise ValueError(
          f"{where}.kernel_list{name}: unknown kernel types {sorted(unknown)}; "
          f"expected a subset of {KERNEL_TYPES}"
        )
      if len(s.kernel_list) != len(s.kernel_prob):
        raise ValueError(
          f"{where}.kernel_prob{name} has {len(s.kernel_prob)} entries for "
          f"{len(s.kernel_list)} kernel types"
        )
      if len(s.resize_prob) != 3:
        raise ValueError(f"{where}.resize_prob{name} must be (up, down, keep), got {s.resize_prob}")


def _pair(v: Sequence[float]) -> tuple[float, float]:
  return float(v[0]), float(v[1])


# ------------------------------------------------------------------------------------------------
# Blur kernels (basicsr/data/degradations.py).


def sigma_matrix(sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
  """Covariance U diag(σx², σy²) Uᵀ of a Gaussian rotated by θ."""
  d = np.diag([sigma_x**2, sigma_y**2])
  u = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
  return u @ d @ u.T


def mesh_grid(kernel_size: int) -> np.ndarray:
  """(size, size, 2) array of (x, y) offsets from the kernel centre."""
  ax = np.arange(-(kernel_size // 2), kernel_size // 2 + 1, dtype=np.float64)
  xx, yy = np.meshgrid(ax, ax)
  return np.stack([xx, yy], axis=-1)


def _mahalanobis_sq(kernel_size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
  grid = mesh_grid(kernel_size)
  inverse = np.linalg.inv(sigma_matrix(sigma_x, sigma_y, theta))
  return np.sum((grid @ inverse) * grid, axis=-1)


def _normalised(kernel: np.ndarray) -> np.ndarray:
  return (kernel / np.sum(kernel)).astype(np.float32)


def bivariate_gaussian_kernel(
  kernel_size: int, sigma_x: float, sigma_y: float, theta: float
) -> np.ndarray:
  """exp(-½ xᵀΣ⁻¹x), normalised to sum 1."""
  return _normalised(np.exp(-0.5 * _mahalanobis_sq(kernel_size, sigma_x, sigma_y, theta)))


def bivariate_generalized_gaussian_kernel(
  kernel_size: int, sigma_x: float, sigma_y: float, theta: float, beta: float
) -> np.ndarray:
  """exp(-½ (xᵀΣ⁻¹x)^β): β<1 heavier tails, β>1 flatter top (Real-ESRGAN §3.1)."""
  return _normalised(
    np.exp(-0.5 * np.power(_mahalanobis_sq(kernel_size, sigma_x, sigma_y, theta), beta))
  )


def bivariate_plateau_kernel(
  kernel_size: int, sigma_x: float, sigma_y: float, theta: float, beta: float
) -> np.ndarray:
  """1 / (1 + (xᵀΣ⁻¹x)^β): a plateau-shaped kernel (Real-ESRGAN §3.1)."""
  return _normalised(
    1.0 / (np.power(_mahalanobis_sq(kernel_size, sigma_x, sigma_y, theta), beta) + 1.0)
  )


def circular_lowpass_kernel(omega_c: float, kernel_size: int, pad_to: int = 0) -> np.ndarray:
  """2-D sinc (ideal circular low-pass with cut-off ω_c rad/px), normalised to sum 1.

  Real-ESRGAN uses it to synthesise ringing and overshoot artifacts.
  """
  if kernel_size % 2 != 1:
    raise ValueError(f"circular_lowpass_kernel: kernel_size must be odd, got {kernel_size}")
  centre = (kernel_size - 1) / 2
  y, x = np.mgrid[0:kernel_size, 0:kernel_size].astype(np.float64)
  r = np.sqrt((x - centre) ** 2 + (y - centre) ** 2)
  with np.errstate(divide="ignore", invalid="ignore"):
    kernel = omega_c * special.j1(omega_c * r) / (2 * np.pi * r)
  kernel[int(centre), int(centre)] = omega_c**2 / (4 * np.pi)
  kernel = kernel / np.sum(kernel)
  if pad_to > kernel_size:
    pad = (pad_to - kernel_size) // 2
    kernel = np.pad(kernel, ((pad, pad), (pad, pad)))
  return kernel.astype(np.float32)


def _uniform(rng: np.random.Generator, lo_hi: tuple[float, float]) -> float:
  return float(rng.uniform(lo_hi[0], lo_hi[1]))


def _random_beta(rng: np.random.Generator, beta_range: tuple[float, float]) -> float:
  """β below or above 1 with equal probability, as basicsr's random_bivariate_* functions."""
  if rng.uniform() < 0.5:
    return _uniform(rng, (beta_range[0], min(1.0, beta_range[1])))
  return _uniform(rng, (max(1.0, beta_range[0]), beta_range[1]))


def random_mixed_kernel(
  rng: np.random.Generator, kernel_size: int, stage: StageParams
) -> np.ndarray:
  """One kernel of a type drawn from ``stage.kernel_list`` (basicsr's random_mixed_kernels)."""
  probs = np.asarray(stage.kernel_prob, np.float64)
  kind = stage.kernel_list[rng.choice(len(stage.kernel_list), p=probs / probs.sum())]
  isotropic = kind.endswith("iso") and not kind.endswith("aniso")
  sigma_x = _uniform(rng, stage.blur_sigma)
  if isotropic:
    sigma_y, theta = sigma_x, 0.0
  else:
    sigma_y = _uniform(rng, stage.blur_sigma)
    theta = _uniform(rng, (-math.pi, math.pi))
  if kind in ("iso", "aniso"):
    return bivariate_gaussian_kernel(kernel_size, sigma_x, sigma_y, theta)
  if kind.startswith("generalized"):
    beta = _random_beta(rng, stage.betag_range)
    return bivariate_generalized_gaussian_kernel(kernel_size, sigma_x, sigma_y, theta, beta)
  beta = _random_beta(rng, stage.betap_range)
  return bivariate_plateau_kernel(kernel_size, sigma_x, sigma_y, theta, beta)


def _random_kernel_size(rng: np.random.Generator, kernel_size_range: tuple[int, int]) -> int:
  lo, hi = kernel_size_range
  return int(rng.choice(np.arange(lo, hi + 1, 2)))


def random_blur_kernel(
  rng: np.random.Generator, stage: StageParams, params: DegradationParams
) -> np.ndarray:
  """A stage's blur kernel: sinc with ``sinc_prob``, otherwise a mixed Gaussian-family kernel.

  Sizes are odd in [7, 21] by default. Real-ESRGAN zero-pads every kernel to 21x21 to batch them on
  the GPU; the padding changes nothing, so kernels stay at their own size here (faster filtering).
  """
  size = _random_kernel_size(rng, params.kernel_size_range)
  if rng.uniform() < stage.sinc_prob:
    omega = (
      params.sinc_omega_small if size < params.sinc_small_kernel_below else params.sinc_omega_large
    )
    return circular_lowpass_kernel(_uniform(rng, omega) * math.pi, size)
  return random_mixed_kernel(rng, size, stage)


def random_final_sinc_kernel(
  rng: np.random.Generator, params: DegradationParams
) -> np.ndarray | None:
  """The final sinc filter with ``final_sinc_prob``; None means Real-ESRGAN's identity pulse."""
  if rng.uniform() < params.final_sinc_prob:
    size = _random_kernel_size(rng, params.kernel_size_range)
    return circular_lowpass_kernel(_uniform(rng, params.final_sinc_omega) * math.pi, size)
  return None


# ------------------------------------------------------------------------------------------------
# Image operations (float32 HWC in [0, 1]).


def filter2d(img: np.ndarray, kernel: np.ndarray) -> np.ndarray:
  """Correlates every channel with ``kernel`` (reflect padding), as Real-ESRGAN's filter2D.

  Rank-1 kernels (isotropic Gaussians) run as two 1-D passes: same result, several times faster.
  """
  kernel = np.asarray(kernel, np.float32)
  u, s, vt = np.linalg.svd(kernel.astype(np.float64))
  if s[0] > 0 and s[1] <= 1e-7 * s[0]:
    column = (u[:, 0] * math.sqrt(s[0])).astype(np.float32)
    row = (vt[0] * math.sqrt(s[0])).astype(np.float32)
    return cv2.sepFilter2D(img, -1, row, column, borderType=_BORDER)
  return cv2.filter2D(img, -1, kernel, borderType=_BORDER)


def resize(img: np.ndarray, size_hw: tuple[int, int], mode: str) -> np.ndarray:
  """Resizes to exactly ``size_hw`` (OpenCV; like torch F.interpolate, no anti-aliasing)."""
  h, w = int(size_hw[0]), int(size_hw[1])
  if h < 1 or w < 1:
    raise ValueError(f"resize: target size must be positive, got {size_hw}")
  if img.shape[:2] == (h, w):
    return img
  out = cv2.resize(img, (w, h), interpolation=_CV2_INTERPOLATION[mode])
  return out if out.ndim == img.ndim else out[..., None]


def _gray(img: np.ndarray) -> np.ndarray:
  return img @ _LUMA


def add_gaussian_noise(
  img: np.ndarray, rng: np.random.Generator, sigma: float, gray: bool = False
) -> np.ndarray:
  """Adds N(0, (σ/255)²) noise (one field for all channels when ``gray``) and clips to [0, 1]."""
  if gray:
    noise = rng.standard_normal(img.shape[:2], dtype=np.float32)[..., None]
  else:
    noise = rng.standard_normal(img.shape, dtype=np.float32)
  noise *= np.float32(sigma / 255.0)
  out = img + noise
  return np.clip(out, 0.0, 1.0, out=out)


def poisson_noise(
  img: np.ndarray, rng: np.random.Generator, scale: float, gray: bool = False
) -> np.ndarray:
  """Real-ESRGAN's Poisson (shot) noise field: (Poisson(x·v)/v − x)·scale.

  x is the image quantised to 8 bits, v = 2^ceil(log2(#distinct levels)) (basicsr
  generate_poisson_noise); the distinct-level count uses a histogram instead of np.unique (same
  value, ~20x faster).
  """
  x = _gray(img)[..., None] if gray else img
  levels = np.clip(np.rint(x * 255.0), 0, 255).astype(np.uint8)
  distinct = int(np.count_nonzero(np.bincount(levels.ravel(), minlength=256)))
  vals = 2 ** math.ceil(math.log2(max(distinct, 1)))
  counts = sample_poisson_of_levels(levels, vals, rng)
  x = levels.astype(np.float32) / np.float32(255.0)
  return (counts / np.float32(vals) - x) * np.float32(scale)


# Guide-table cells per level for sample_poisson_of_levels: ~3% of draws need a refinement step.
_POISSON_GUIDE_CELLS = 4096


@functools.lru_cache(maxsize=16)
def _poisson_tables(vals: int) -> tuple[np.ndarray, np.ndarray]:
  """CDF of Poisson(l/255·v) for every 8-bit level l, and its guide table (Chen & Asau 1974).

  cdf[l, k] = P(X <= k), with the last entry +inf (tail mass < 1e-25 beyond λ + 12√λ + 24);
  guide[l, m] = min{k : cdf[l, k] > m/M}. A memoised pure function: v takes at most 9 values.
  """
  lam = np.arange(256, dtype=np.float64) / 255.0 * vals
  kmax = int(vals + 12 * math.sqrt(vals) + 24)
  k = np.arange(kmax + 1, dtype=np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    log_pmf = k[None] * np.log(lam[:, None]) - lam[:, None] - special.gammaln(k + 1)[None]
  pmf = np.exp(log_pmf)
  pmf[0] = 0.0
  pmf[0, 0] = 1.0  # λ = 0: X = 0.
  cdf = np.cumsum(pmf, axis=1)
  cdf[:, -1] = np.inf
  grid = np.arange(_POISSON_GUIDE_CELLS + 1, dtype=np.float64) / _POISSON_GUIDE_CELLS
  guide = np.stack([np.searchsorted(row, grid, side="right") for row in cdf])
  return cdf, np.minimum(guide, kmax).astype(np.int16)


def sample_poisson_of_levels(levels: np.ndarray, vals: int, rng: np.random.Generator) -> np.ndarray:
  """Exact Poisson(levels/255·v) draws (float32) by table inversion of one uniform per draw.

  Same distribution as ``rng.poisson`` (up to float64 rounding of the CDF), ~3x faster: λ takes
  only 256 values here, so a guide table starts each inversion at the right count and only draws
  falling in a cell that straddles a CDF step need a short search.
  """
  cdf, guide = _poisson_tables(int(vals))
  cells = _POISSON_GUIDE_CELLS
  flat_levels = levels.reshape(-1).astype(np.int32)
  u = rng.random(flat_levels.shape[0])
  index = flat_levels * (cells + 1) + (u * cells).astype(np.int32)
  guide_flat = guide.reshape(-1)
  counts = guide_flat[index]
  ambiguous = np.flatnonzero(counts != guide_flat[index + 1])
  if ambiguous.size:
    cdf_flat = cdf.reshape(-1)
    row = flat_levels[ambiguous] * cdf.shape[1]
    k = counts[ambiguous].astype(np.int32)
    u_ambiguous = u[ambiguous]
    active = np.arange(ambiguous.size)
    while active.size:  # X = min{k : u < cdf[k]}
      active = active[cdf_flat[row[active] + k[active]] <= u_ambiguous[active]]
      k[active] += 1
    counts[ambiguous] = k
  return counts.astype(np.float32).reshape(levels.shape)


def add_poisson_noise(
  img: np.ndarray, rng: np.random.Generator, scale: float, gray: bool = False
) -> np.ndarray:
  """Adds :func:`poisson_noise` and clips to [0, 1]."""
  return np.clip(img + poisson_noise(img, rng, scale, gray), 0.0, 1.0)


def to_uint8(img: np.ndarray) -> np.ndarray:
  """[0, 1] float → uint8 with rounding (Real-ESRGAN's final clamp((x*255).round()))."""
  return np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)


def to_float(img: np.ndarray) -> np.ndarray:
  """uint8 → float32 in [0, 1]."""
  return img.astype(np.float32) * np.float32(1.0 / 255.0)


def jpeg_compress_uint8(img: np.ndarray, quality: int) -> np.ndarray:
  """JPEG round trip (OpenCV/libjpeg, 4:2:0) of a uint8 RGB image at integer ``quality``."""
  quality = int(np.clip(round(quality), 1, 100))
  ok, buffer = cv2.imencode(".jpg", img[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
  if not ok:
    raise RuntimeError(f"jpeg_compress: OpenCV failed to encode an image of shape {img.shape}")
  return cv2.imdecode(buffer, cv2.IMREAD_COLOR)[..., ::-1]


def jpeg_compress(img: np.ndarray, quality: float) -> np.ndarray:
  """JPEG round trip of a [0, 1] float image (clamped first, as Real-ESRGAN does)."""
  return to_float(jpeg_compress_uint8(to_uint8(img), int(round(quality))))


def usm_sharpen(
  img: np.ndarray, weight: float = 0.5, radius: int = 50, threshold: float = 10
) -> np.ndarray:
  """Unsharp masking with a soft edge mask (basicsr ``usm_sharp``), float in [0, 1]."""
  if radius % 2 == 0:
    radius += 1
  blur = cv2.GaussianBlur(img, (radius, radius), 0)
  residual = img - blur
  mask = (np.abs(residual) * 255 > threshold).astype(np.float32)
  soft_mask = cv2.GaussianBlur(mask, (radius, radius), 0)
  if soft_mask.ndim == 2:
    soft_mask = soft_mask[..., None]
  sharp = np.clip(img + weight * residual, 0, 1)
  return soft_mask * sharp + (1 - soft_mask) * img


# ------------------------------------------------------------------------------------------------
# The second-order model.


@dataclasses.dataclass(frozen=True)
class DegradedPair:
  """A training pair. All uint8 HWC RGB; ``lq_up`` has the shape of ``hq``."""

  hq: np.ndarray
  lq: np.ndarray
  lq_up: np.ndarray
  scale: float


def sample_scale(rng: np.random.Generator, scale_range: tuple[float, float]) -> float:
  """Overall down-scaling factor s ~ U(scale_range) (fixed when lo == hi)."""
  lo, hi = scale_range
  return lo if lo == hi else float(rng.uniform(lo, hi))


def lq_size(hq_hw: tuple[int, int], scale: float) -> tuple[int, int]:
  """LQ size for an H x W target at scale s: (round(H/s), round(W/s)), at least 1 px."""
  return max(1, int(round(hq_hw[0] / scale))), max(1, int(round(hq_hw[1] / scale)))


def _random_resize(
  img: np.ndarray,
  rng: np.random.Generator,
  stage: StageParams,
  params: DegradationParams,
  base_hw: tuple[float, float],
) -> np.ndarray:
  """Random up/down/keep resize of ``base_hw`` with a random interpolation (Real-ESRGAN)."""
  kind = rng.choice(3, p=np.asarray(stage.resize_prob) / sum(stage.resize_prob))
  if kind == 0:
    factor = _uniform(rng, (1.0, stage.resize_range[1]))
  elif kind == 1:
    factor = _uniform(rng, (stage.resize_range[0], 1.0))
  else:
    factor = 1.0
  mode = params.resize_modes[rng.integers(len(params.resize_modes))]
  size = (max(1, int(base_hw[0] * factor)), max(1, int(base_hw[1] * factor)))
  return resize(img, size, mode)


def _random_noise(img: np.ndarray, rng: np.random.Generator, stage: StageParams) -> np.ndarray:
  if rng.uniform() < stage.gaussian_noise_prob:
    sigma = _uniform(rng, stage.noise_range)
    gray = rng.uniform() < stage.gray_noise_prob
    return add_gaussian_noise(img, rng, sigma, gray)
  scale = _uniform(rng, stage.poisson_scale_range)
  gray = rng.uniform() < stage.gray_noise_prob
  return add_poisson_noise(img, rng, scale, gray)


def degrade(
  hq: np.ndarray, rng: np.random.Generator, params: DegradationParams, scale: float | None = None
) -> DegradedPair:
  """Real-ESRGAN second-order degradation of a uint8 HWC RGB crop.

  Stage 1 (at HQ size): blur → random resize → Gaussian/Poisson noise → JPEG. Stage 2: blur with
  ``second_blur_prob`` → random resize around HQ/s → noise → then, in random order, [resize to HQ/s
  + final sinc] and JPEG. LQ is rounded to uint8 (as Real-ESRGAN) and LQ↑ is LQ resized back to HQ
  size with ``upsample_mode`` (§3.2). ``scale`` overrides the sampled overall factor.
  """
  if hq.dtype != np.uint8 or hq.ndim != 3 or hq.shape[2] != 3:
    raise ValueError(f"degrade: expected uint8 HxWx3 RGB, got {hq.dtype} {hq.shape}")
  h, w = hq.shape[:2]
  # Kernels and the scale first, as Real-ESRGAN draws them in the dataset before feed_data.
  s = sample_scale(rng, params.scale_range) if scale is None else float(scale)
  kernel1 = random_blur_kernel(rng, params.stage1, params)
  kernel2 = random_blur_kernel(rng, params.stage2, params)
  sinc_kernel = random_final_sinc_kernel(rng, params)

  x = to_float(hq)
  if params.usm_sharpen:
    x = usm_sharpen(x, params.usm_weight, params.usm_radius, params.usm_threshold)
    hq = to_uint8(x)

  # ---- Stage 1.
  out = filter2d(x, kernel1)
  out = _random_resize(out, rng, params.stage1, params, (h, w))
  out = _random_noise(out, rng, params.stage1)
  out = jpeg_compress(out, _uniform(rng, params.stage1.jpeg_range))

  # ---- Stage 2.
  if rng.uniform() < params.stage2.blur_prob:
    out = filter2d(out, kernel2)
  out = _random_resize(out, rng, params.stage2, params, (h / s, w / s))
  out = _random_noise(out, rng, params.stage2)

  # ---- Final: [resize to HQ/s + sinc] and JPEG in random order (other orders give twisted lines,
  # Real-ESRGAN feed_data).
  target = lq_size((h, w), s)
  resize_first = rng.uniform() < 0.5
  mode = params.resize_modes[rng.integers(len(params.resize_modes))]
  quality = _uniform(rng, params.stage2.jpeg_range)
  if resize_first:
    out = resize(out, target, mode)
    if sinc_kernel is not None:
      out = filter2d(out, sinc_kernel)
    lq = jpeg_compress_uint8(to_uint8(out), int(round(quality)))
  else:
    out = jpeg_compress(out, quality)
    out = resize(out, target, mode)
    if sinc_kernel is not None:
      out = filter2d(out, sinc_kernel)
    lq = to_uint8(out)
  lq_up = upsample(lq, (h, w), params.upsample_mode)
  return DegradedPair(hq=hq, lq=lq, lq_up=lq_up, scale=s)


def upsample(lq: np.ndarray, size_hw: tuple[int, int], mode: str = "bicubic") -> np.ndarray:
  """LQ↑: uint8 LQ resized back to the HQ size (OpenCV rounds and saturates to uint8)."""
  return resize(lq, size_hw, mode)
