"""Default host input-pipeline settings (grain, buckets, Real-ESRGAN degradations, eval presets).

Kept free of heavy imports (only ``ml_collections``) so that every experiment config can include it
as ``config.data``. Every number of the data pipeline lives here and nowhere else.

Pixel range: the training iterator emits float32 NHWC batches in [-1, 1] (``output="float"``) or
raw uint8 in [0, 255] (``output="uint8"``: 4x less host memory and host→device traffic; convert on
the device).
"""

import ml_collections

# The dit stage's buckets (§3.2: "we mix crop patches ranging from 512² to 4096²"; §4: "we mix
# resolutions and aspect ratios ... similar to [SDXL], using a batch size of 128"). The sizes and the
# batch sizes of buckets larger than 1024² are ours: they keep the latent tokens per batch near
# 128 x 1024² ≈ 131K.
DIT_BUCKETS = (
  (512, 512, 128),
  (1024, 1024, 128),
  (768, 1344, 128),
  (1344, 768, 128),
  (2048, 2048, 32),
  (1536, 2688, 32),
  (2688, 1536, 32),
  (4096, 4096, 8),
)


def get_degradation_config() -> ml_collections.ConfigDict:
  """Real-ESRGAN second-order degradation (Wang et al. 2021, ``train_realesrgan_x4plus.yml``).

  ZipIR trains on pairs "degraded using methods similar to [Real-ESRGAN]" (§3.2); the values below
  are Real-ESRGAN's x4plus settings, except ``scale_range``: the paper restores 8x-16x (Table 1).
  """
  d = ml_collections.ConfigDict()
  # Overall down-scaling factor s: LQ is round(H/s) x round(W/s); s ~ U(scale_range) per example.
  d.scale_range = (8.0, 16.0)
  # Unsharp-masked HQ (Real-ESRGAN's `gt_usm`): when True the target *and* the degradation input are
  # sharpened, as with x4plus's l1_gt_usm/percep_gt_usm. Off by default: the LP-VAE reconstructs
  # natural images.
  d.usm_sharpen = False
  d.usm_weight = 0.5  # basicsr USMSharp defaults.
  d.usm_radius = 50
  d.usm_threshold = 10

  kernel_list = (
    "iso",
    "aniso",
    "generalized_iso",
    "generalized_aniso",
    "plateau_iso",
    "plateau_aniso",
  )
  kernel_prob = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
  # Blur kernel sizes are odd, uniform in [kernel_size_range] (Real-ESRGAN: 7..21).
  d.kernel_size_range = (7, 21)
  # Sinc cut-off ω_c ~ U(π/3, π) for kernels < 13 px, U(π/5, π) otherwise (realesrgan_dataset.py).
  d.sinc_small_kernel_below = 13
  d.sinc_omega_small = (1.0 / 3.0, 1.0)  # in units of π.
  d.sinc_omega_large = (1.0 / 5.0, 1.0)

  # ---- First degradation stage.
  d.kernel_list = kernel_list
  d.kernel_prob = kernel_prob
  d.sinc_prob = 0.1
  d.blur_sigma = (0.2, 3.0)
  d.betag_range = (0.5, 4.0)  # generalized Gaussian shape β.
  d.betap_range = (1.0, 2.0)  # plateau shape β.
  d.resize_prob = (0.2, 0.7, 0.1)  # up, down, keep.
  d.resize_range = (0.15, 1.5)
  d.resize_modes = ("area", "bilinear", "bicubic")  # chosen uniformly.
  d.gaussian_noise_prob = 0.5  # otherwise Poisson noise.
  d.noise_range = (1.0, 30.0)  # Gaussian σ in 8-bit levels.
  d.poisson_scale_range = (0.05, 3.0)
  d.gray_noise_prob = 0.4
  d.jpeg_range = (30.0, 95.0)

  # ---- Second degradation stage (runs at ~HQ/s resolution).
  d.second_blur_prob = 0.8
  d.kernel_list2 = kernel_list
  d.kernel_prob2 = kernel_prob
  d.sinc_prob2 = 0.1
  d.blur_sigma2 = (0.2, 1.5)
  d.betag_range2 = (0.5, 4.0)
  d.betap_range2 = (1.0, 2.0)
  d.resize_prob2 = (0.3, 0.4, 0.3)
  d.resize_range2 = (0.3, 1.2)
  d.gaussian_noise_prob2 = 0.5
  d.noise_range2 = (1.0, 25.0)
  d.poisson_scale_range2 = (0.05, 2.5)
  d.gray_noise_prob2 = 0.4
  d.jpeg_range2 = (30.0, 95.0)

  # ---- Final resize to HQ/s + sinc filter, and JPEG, in random order (p=0.5 each order).
  d.final_sinc_prob = 0.8
  d.final_sinc_omega = (1.0 / 3.0, 1.0)  # in units of π.
  # LQ↑: LQ resized back to the HQ size, as the paper feeds the model (§3.2).
  d.upsample_mode = "bicubic"
  return d


def get_eval_presets() -> ml_collections.ConfigDict:
  """Fixed evaluation degradations of the paper (Table 1, Fig. 4): deterministic given a seed.

  Order: bicubic (anti-aliased) down-sampling by ``scale``, then Gaussian blur σ (at LQ size), then
  Gaussian noise σ (8-bit levels), then JPEG at quality q, the order in which the paper lists them.
  0 disables a step.
  """

  # blur_radius_sigmas: Gaussian kernel size 2*ceil(r*σ)+1.
  def preset(scale, blur_sigma=0.0, noise_sigma=0.0, jpeg_quality=0):
    return dict(
      scale=scale,
      blur_sigma=blur_sigma,
      noise_sigma=noise_sigma,
      jpeg_quality=jpeg_quality,
      blur_radius_sigmas=3.0,
    )

  presets = ml_collections.ConfigDict()
  presets.sr16 = preset(16)
  presets.sr8 = preset(8)
  presets.mix = preset(8, blur_sigma=2.0, noise_sigma=40.0, jpeg_quality=50)  # Table 1.
  presets.fig4 = preset(8, blur_sigma=1.0, noise_sigma=15.0, jpeg_quality=65)  # Fig. 4.
  return presets


def get_data_config() -> ml_collections.ConfigDict:
  """Returns the data section of the experiment config."""
  data = ml_collections.ConfigDict()

  # ---- Source.
  data.source = "folder"  # "folder" | "tfds" | "array_record"
  # folder: root directory (recursive). array_record: a directory of *.array_record shards
  # written by `python -m zipir_jax.data.prepare`, a single file, or a glob.
  data.path = ""
  # tfds: a dataset built beforehand, never downloaded here:
  # `tfds build NAME --data_dir=DIR --file_format=array_record` (random access needs ArrayRecord).
  data.tfds_name = ""  # e.g. "my_dataset:1.0.0"
  data.tfds_split = "train"
  data.tfds_data_dir = ""  # "" -> TFDS default.
  data.image_key = "image"  # TFDS image feature; read undecoded, decoded by data/decode.py.
  data.caption_key = ""  # TFDS feature holding the caption; "" -> empty captions.
  data.extensions = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")

  # ---- Multi-resolution buckets: (height, width, global batch size); each process gets
  # batch // process_count. Sides are multiples of 32 (the LP-VAE latent is H/32 x W/32). Each
  # training stage sets its own (training/stages.py: the paper's recipe per stage).
  data.buckets = DIT_BUCKETS
  # Later data phases of a stage: ((first step, buckets), ...), e.g. vae_fine's 1K-patch adaptation
  # (§4). Each phase has its own iterator (checkpointed with the train state, so a run resumes
  # mid-phase); () = one phase.
  data.phases = ()
  # Relative frequency of each bucket's *batches*; () -> all equal. The schedule is a fixed
  # deterministic interleaving (grain's mix), identical on every process so shapes agree.
  data.bucket_weights = ()
  # "downscale": an image may land in any bucket it covers; it is first down-scaled by a factor
  # drawn log-uniformly between "just covers the bucket" and 1 (a 4000 px photo can become a
  # whole-view 512² crop or a native-resolution one). "crop": native-resolution crops only.
  # Never up-samples: a bucket larger than the image (after EXIF rotation) is never chosen.
  data.bucket_policy = "downscale"
  data.random_flip = True  # horizontal flip with p=0.5.
  data.alpha_background = 255  # alpha images are composited on white (8-bit level).
  # Start-up probe: image sizes of this many records (in shuffled order) are read to check that
  # every bucket can be filled; a bucket no probed image covers is an error.
  data.size_probe_records = 256
  data.degradation = get_degradation_config()

  # ---- Evaluation (create_eval_dataset): the image is shrunk until it just covers eval_size
  # (never enlarged), centre-cropped, then degraded by a preset. The paper evaluates at 2048²
  # (Table 1; 1024² for the Table 4 ablation).
  data.eval_presets = get_eval_presets()
  data.eval_preset = "sr16"
  data.eval_size = (2048, 2048)
  data.eval_batch_size = 1

  # ---- Output.
  data.output = "float"  # "float": float32 in [-1, 1]; "uint8": raw [0, 255].
  data.emit_lq = False  # also emit the small LQ (needs a fixed degradation.scale_range lo == hi).

  # ---- grain execution.
  # False walks the source in order (debugging only: with several workers or processes a bucket
  # that few images cover may then never see one in some slices).
  data.shuffle = True
  data.num_workers = 8  # grain worker processes per host (mp_prefetch); 0 = in-process.
  data.worker_buffer_size = 2  # batches buffered per worker.
  # Threads per worker *and bucket* running decode+degrade ahead of time. 0 = synchronous inside
  # the worker: the work is CPU-bound, so parallelism comes from num_workers (≈ host cores) and
  # lookahead from worker_buffer_size; raise these for slow (remote) storage.
  data.read_threads = 0
  data.read_buffer_size = 0
  data.cv2_threads = 1  # OpenCV threads inside each worker (avoid oversubscription).
  # Each skipped file is logged once per process; with a directory, also appended to
  # <dir>/skipped-<host>-<pid>.tsv so `summarize_skips(dir)` counts skips across workers and hosts.
  data.skip_log_dir = ""
  return data
