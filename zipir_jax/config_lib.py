"""What every experiment config shares: the defaults and config loading.

Each file in ``configs/`` is one experiment (big_vision style): ``get_config(stage)`` starts from
:func:`base_config` — the paper's sizes, with the active stage's recipe (steps, data phases, loss
weights; ``training/stages.py``) filled in — changes the few numbers that make it that experiment,
and returns a *locked* ``ConfigDict`` so a misspelt key fails loudly (ml_collections names the
fields that exist) instead of silently adding a new field.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Sequence

import ml_collections

from zipir_jax import axis_rules
from zipir_jax.data import defaults as data_defaults
from zipir_jax.training import stages as stages_lib


def base_config(
  arg: str | None, kind: str = "lpvae", where: str = "configs/<model>.py"
) -> ml_collections.ConfigDict:
  """Paper-size defaults shared by all experiments (supp. A) for the stage named by ``arg`` (the
  part after ':' in --config=file.py:stage; default the last, dit) of the ``kind`` autoencoder's
  experiment, with that stage's recipe applied; experiment files change a few fields."""
  stage = stages_lib.parse_stage(arg, kind, where)
  config = ml_collections.ConfigDict()
  config.name = "zipir"
  config.stage = stage
  config.seed = 0

  # --- Latent Pyramid VAE (§3.1, supp. A): pure convolutional, 128 base channels, 2 res-blocks/scale.
  vae = config.vae = ml_collections.ConfigDict()
  vae.kind = kind  # "lpvae" | "sdvae" (the Table 4 baseline; see sdvae())
  vae.ch = 128
  vae.num_res_blocks = 2
  vae.num_groups = 32  # GroupNorm groups, as in the LDM autoencoder.
  vae.coarse_ch_mult = (1, 2, 4, 4)  # E_c / D_c: f8 on I↓4 -> H/32.
  vae.fine_ch_mult = (1, 2, 4, 4, 4, 4)  # E_f / D_f: f32 on I.
  vae.coarse_channels = 9
  vae.fine_channels = 52
  # SD-VAE baseline only (Table 4): one LDM encoder with z_channels=64 and mult [1,2,4,4,4,4].
  vae.ch_mult = (1, 2, 4, 4, 4, 4)
  vae.z_channels = 64
  vae.mid_attention = False  # the LP-VAE has none (§3.1); the LDM baseline keeps its mid attention.
  # Initial bias of the encoders' log-variance outputs (LDM: 0, a unit-variance posterior as large as
  # the means). The 1e-6 KL weight barely shrinks it in a few hundred steps, so z_fine carried next
  # to nothing in short runs; std e^-3 lets even those use the latent (docs/DESIGN.md).
  vae.init_logvar = -6.0
  vae.dtype = "float32"  # compute dtype; params are always float32.
  # Compute dtype of E_c/E_f where a later stage runs them frozen (pixel_decoder, dit): bf16 halves
  # the dit step's encoder time (half its FLOPs); restore with --dtype=bfloat16 to match.
  vae.frozen_dtype = "bfloat16"

  # --- Pixel-aware decoder D_f* (§3.1, supp. A / Fig. 8).
  pd = config.pixel_decoder = ml_collections.ConfigDict()
  # Decoder levels (0 = full resolution, len(mult) - 1 = H/32) that receive extractor features.
  pd.fusion_levels = (0, 1, 2, 3, 4, 5)

  # --- Patch discriminator (LDM autoencoder / pix2pix NLayerDiscriminator).
  disc = config.discriminator = ml_collections.ConfigDict()
  disc.ch = 64
  disc.num_layers = 3

  # --- Autoencoder losses: L1 + LPIPS + hinge GAN with adaptive weight + small KL (§3.1, [13]).
  # The weights are the active stage's recipe (training/stages.py); see losses.py for the formula.
  loss = config.loss = ml_collections.ConfigDict()
  loss.l1_weight = 1.0
  loss.lpips_weight = 1.0  # > 0 needs loss.lpips_vgg16: a stage refuses to start without it.
  # Unit: weight of the per-example KL sum (over latent elements) against the per-example sum of
  # the reconstruction loss over the target's pixels and channels, as in LDM. The step divides both
  # by that pixel count, so the balance does not depend on the crop size.
  loss.kl_weight = 1e-6
  loss.disc_weight = 0.5  # multiplies LDM's adaptive generator weight; 0 = no GAN in this stage.
  loss.disc_factor = 1.0
  loss.disc_start_fraction = 0.5  # the discriminator starts after this share of the stage's steps.
  loss.lpips_vgg16 = ""  # torchvision's vgg16 state dict (.pth or .safetensors); see README.
  loss.lpips_heads = ""  # path to lpips' vgg.pth; "" -> the file shipped in the lpips wheel.

  # --- ZipDiT (§3.2, supp. A): 24 layers, hidden 2048, 16 heads, adaLN. Choices the paper leaves
  # open are the modern well-known ones (models/dit.py explains each).
  dit = config.dit = ml_collections.ConfigDict()
  dit.depth = 24
  dit.hidden_size = 2048
  dit.num_heads = 16
  # The paper fixes depth, width and heads (24 x 2048, 16) and the size (3.1 B, Table 3), not the
  # MLP: its hidden size is the free dimension, 6.75 x 2048 = 13,824 (a multiple of 256) for
  # 3,097,559,104 parameters (-0.1 %). configs/zipir_2p5b.py keeps DiT-XL's ratio 4 (2.54 B).
  dit.mlp_ratio = 6.75
  dit.patch_size = 1
  dit.lq_fusion = "sum"  # "sum" | "concat"
  dit.text_dim = 4096  # T5-XXL encoder width.
  dit.text_projection = True  # PixArt-α caption projection T5 -> hidden (once, before the blocks).
  dit.cross_attn_modulation = True  # adaLN-Zero gates cross-attention too: 9 vectors (else 6).
  dit.qk_norm = True  # RMSNorm on queries and keys.
  dit.rope_theta = 10000.0  # 2D RoPE over (row, col): resolution-agnostic positions.
  dit.attention_impl = "auto"  # "auto" (cuDNN on GPU, XLA elsewhere) | "xla" | "cudnn"
  dit.scan_layers = True  # nn.scan over the blocks: one compiled layer, params stacked on 'layers'.
  # "nothing_saveable" | "dots_saveable" | "dots_with_no_batch_dims_saveable" | "none" (no remat).
  # Saving the dense layers' outputs skips recomputing the matmuls in the backward pass (the
  # BENCHMARKS.md training rows); memory: 72 GiB for zipir_3b at 1024² x 8 on one device, 104 GiB at
  # 2048² x 2 — shard with fsdp, or take "nothing_saveable" on an 80 GB card without it.
  dit.remat_policy = "dots_with_no_batch_dims_saveable"
  dit.dtype = "bfloat16"  # compute dtype; params are always float32.
  dit.text_dropout = 0.05  # §3.2: caption replaced by the empty prompt's embedding, for CFG.
  # §3.2 "we annotated low-quality images with negative prompts": this share of dit examples is an
  # LQ target (its own LQ↑, encoded) captioned with one of negative_prompts (the recipe sets it).
  dit.negative_rate = 0.0
  dit.negative_prompts = stages_lib.NEGATIVE_PROMPTS

  # --- Diffusion (supp. A, §4): DDPM ε-prediction, β 0.00085 -> 0.012, logit-normal t; DDIM + CFG.
  diff = config.diffusion = ml_collections.ConfigDict()
  diff.num_train_steps = 1000
  diff.beta_start = 0.00085
  diff.beta_end = 0.012
  # The paper says "linear" with LDM/SD's numbers; in LDM that schedule is linear in sqrt(β).
  diff.beta_schedule = "scaled_linear"  # "scaled_linear" (LDM's) | "linear" (linear in β)
  diff.timestep_sampling = "logit_normal"  # | "uniform"
  diff.logit_mean = 0.0  # t/T = sigmoid(N(logit_mean, logit_std²)) (SD3's default m=0, s=1).
  diff.logit_std = 1.0
  # This share of timesteps is drawn uniformly instead: logit-normal(0, 1) alone gives the first
  # trailing DDIM step (t = 999) and the last (t = 39) ~0.07 % of samples each; with 0.3 every one of
  # the 25 sampler intervals gets >= 1.25 % (tests/test_diffusion.py checks the histogram).
  diff.uniform_fraction = 0.3
  diff.sample_steps = 25  # §4: DDIM with 25 denoising steps.
  diff.eta = 0.0  # DDIM η: 0 deterministic, 1 ancestral (DDPM-like).
  diff.cfg_scale = 3.5
  # The unconditional branch's prompt: the first negative prompt the dit stage trains with (§3.2).
  diff.negative_prompt = stages_lib.NEGATIVE_PROMPTS[0]
  diff.strength = 1.0  # start from the LQ latent noised to strength·T; 1 = pure noise.
  diff.clip_x0 = 0.0  # clip predicted x0 to [-c, c]; 0 = off (latents are not bounded).

  # --- Text guidance (§3.2): a T5 encoder, loaded from a local Hugging Face folder; "" uses the
  # encoder stored in the checkpoint bundle (the tiny random ByT5-style one for tests and the demo).
  text = config.text = ml_collections.ConfigDict()
  text.encoder_path = ""
  text.max_length = 128  # prompts are padded/cut to this many tokens (one compile per shape).
  text.dtype = "bfloat16"
  text.embedding_cache = ""  # dit: folder of `python -m zipir_jax.training.text_cache`; "" = T5.

  # --- Restoration (sample.py, restore.py).
  restore = config.restore = ml_collections.ConfigDict()
  restore.color_fix = "none"  # "none" | "wavelet" | "adain"
  # D_f*'s LQ-feature injection strength. 0 drops the LQ features; the decoder is still the one
  # stage pixel_decoder fine-tuned, which equals D_f only before that stage has trained it.
  restore.fusion_weight = 1.0
  restore.min_lq_size = 8  # LQ images with a side below this are refused as too small.
  # From this many output pixels on, encoder and decoder run eagerly with convolutions in row strips
  # and whole-image GroupNorm statistics (models/tiling.py): one XLA program for a 4096² decoder
  # compiles for minutes and holds many full-resolution buffers.
  restore.tile_min_pixels = 4096 * 4096
  restore.tile_strip_rows = 256

  # --- Host input pipeline (grain).
  config.data = data_defaults.get_data_config()

  # --- Optimisation (supp. A): AdamW 5e-5 -> 5e-6, wd 0.05, betas (0.9, 0.95).
  opt = config.optim = ml_collections.ConfigDict()
  opt.lr = 5e-5
  opt.end_lr = 5e-6
  opt.weight_decay = 0.05
  opt.b1 = 0.9
  opt.b2 = 0.95
  opt.warmup_steps = 1000
  opt.num_steps = 250_000  # the recipe's; global batch sizes are in config.data.buckets
  opt.grad_clip = 1.0  # global-norm clipping of the trainable parameters' gradient.
  opt.ema_decay = 0.9999  # EMA of the weights, used for evaluation and export.
  opt.grad_accum = 1  # micro-batches per update (the batch is split inside the step).
  opt.disc_lr = 5e-5  # discriminator of the VAE stages (AdamW, same schedule shape).

  # --- Training loop (train.py, zipir_jax/training/): everything that does not depend on --workdir.
  # Stage prerequisites: by default stage S reads WORKDIR/<the stage before S>/export; a non-empty
  # entry here names that export folder instead.
  tr = config.train = ml_collections.ConfigDict()
  prerequisites = [s.prerequisite for s in stages_lib.experiment(kind).stages if s.prerequisite]
  tr.init_from = ml_collections.ConfigDict(dict.fromkeys(prerequisites, ""))
  # Mesh axes (data, fsdp, tensor): `mesh` within a TPU slice or GPU node (fast ICI/NVLink; -1 = the
  # remaining devices of each), `dcn_mesh` across slices/nodes (slow DCN; its product = their
  # number, -1 = all of them). Each axis is the product, e.g. mesh (1,8,1) x dcn_mesh (4,1,1): FSDP
  # within nodes, data parallel across 4 nodes.
  tr.mesh = (-1, 1, 1)
  tr.dcn_mesh = (1, 1, 1)
  # (logical axis name, mesh axes) pairs placing every parameter and activation (zipir_jax.parallel).
  tr.logical_axis_rules = axis_rules.LOGICAL_AXIS_RULES
  tr.log_every = 50
  tr.image_every = 1000  # image grids HQ | LQ↑ | output; 0 = never.
  tr.preview_steps = (
    0  # DDIM steps of the dit stage's image grid; 0 = min(8, diffusion.sample_steps).
  )
  tr.checkpoint_every = 1000
  tr.keep_checkpoints = 3
  tr.async_checkpointing = True
  tr.max_nonfinite = 10  # this many non-finite updates in a row stop the run.
  tr.latent_stats_batches = 64  # batches measured after vae_fine for per-channel latent mean/std.
  # Batches measured before vae_coarse for z_macro's RGB mean/std (§3.1: "calculated from the
  # entire training dataset"; a sample of it here).
  tr.macro_stats_batches = 64
  tr.peak_tflops = 0.0  # per-device peak (bf16) for the MFU estimate; 0 = guess from device kind.
  # Memory one device may use: the train step is checked against it before step 1 (and refused,
  # naming the remedies, when it cannot fit); 0 = the device's own allocator limit (none on CPU).
  tr.device_memory_gib = 0.0
  # (first step, number of steps) to trace with jax.profiler into WORKDIR/<stage>/profile (open with
  # TensorBoard's profile plugin); () = no trace.
  tr.profile_steps = ()

  # --- Fault injection for the tests of the training loop; never set in an experiment.
  debug = config.debug = ml_collections.ConfigDict()
  debug.nan_steps = ()  # steps whose batch is replaced by NaNs.
  debug.kill_after_step = 0  # SIGKILL the process once this step's checkpoint is on disk.

  stages_lib.apply_recipe(config, stages_lib.experiment(kind).stage(stage))
  return config


def sdvae(config: ml_collections.ConfigDict) -> None:
  """The f32c64 SD-VAE of the ablation (Table 4) in place of the LP-VAE, set in place.

  LDM's autoencoder with ``z_channels`` 64 and mult [1,2,4,4,4,4], its middle attention kept. No
  pixel-aware decoder: the DiT's latents decode with the SD-VAE's own decoder.
  """
  config.vae.mid_attention = True
  config.pixel_decoder.fusion_levels = ()


def ablation_dit(config: ml_collections.ConfigDict) -> None:
  """The 0.68 B DiT of the ablations (Table 4; ``zipir_0p7b``, ``sdvae_f32c64``), set in place.

  The paper gives only the parameter count. We keep DiT-XL's width (hidden 1152) and pick the depth
  so that our block (self-attention, cross-attention, MLP, 9-vector adaLN) totals 0.68 B: 20 layers
  (DiT-XL's own 28 would give 0.94 B with cross-attention). The 1152 are split into 18 heads of 64,
  not DiT-XL's 16 of 72: fused attention kernels tile the head dimension for 64 and 128 (the
  FlashAttention kernels run 72 in their 96-wide instance), so 72 pays for padding that 64 does not.
  That is the expectation; the side-by-side measurement is queued in bench/device_suite.sh. The
  count is the same but for the QK-norm scales (8 per norm and layer fewer). 18 heads do not split
  over a 'tensor' axis of 4 or 8 (they stay replicated); FSDP is the way to shard a model this size.
  """
  config.dit.depth = 20
  config.dit.hidden_size = 1152
  config.dit.num_heads = 18
  config.dit.mlp_ratio = 4.0


def tiny(config: ml_collections.ConfigDict) -> None:
  """Toy widths, depths and batches for the CPU (tests, demo, notebook), set in place.

  Compression (32x), latent channels and every stage stay as in the paper; the CPU has no fast
  bf16, so everything computes in float32. LPIPS is off: no package ships the VGG16 weights it
  needs (README, "Bringing real weights"), and a stage with the term on refuses to start without
  them.
  """
  config.vae.ch = 16
  config.vae.num_res_blocks = 1
  config.vae.num_groups = 4  # 4 channels per group at the top level, as the paper's 128 / 32
  config.discriminator.ch = 16
  config.discriminator.num_layers = 2
  config.dit.depth = 2
  config.dit.hidden_size = 64
  config.dit.num_heads = 4
  config.dit.mlp_ratio = 4.0
  config.dit.text_dim = 64
  config.dit.dtype = "float32"
  config.vae.frozen_dtype = "float32"  # CPU: XLA emulates bf16 convolutions (slower, not faster).
  config.diffusion.sample_steps = 4
  config.text.max_length = 32
  config.text.dtype = "float32"
  config.data.buckets = ((64, 64, 4), (64, 96, 4))  # (height, width, global batch size)
  config.data.phases = ()
  config.loss.lpips_weight = 0.0
  config.data.num_workers = 0
  config.data.size_probe_records = 16
  config.data.eval_size = (64, 64)
  config.data.eval_preset = "sr8"
  config.data.eval_batch_size = 2
  config.optim.lr = 1e-3
  config.optim.end_lr = 1e-4
  config.optim.warmup_steps = 10
  config.optim.num_steps = 100
  config.train.macro_stats_batches = 4


def learning(config: ml_collections.ConfigDict) -> None:
  """bench/learning.py's settings on top of :func:`tiny`, set in place (configs/learning*.py).

  The tiny widths (a wider VAE costs 4x per step: the CPU budget could not train it), 128² crops
  (at 8x a 64² crop leaves the pixel decoder an LQ image 8 pixels wide) and the fig4 scale.
  """
  config.dit.depth = 4  # the DiT sees 4x4 tokens at 128²: depth and width cost little here
  config.dit.hidden_size = 128
  config.dit.num_heads = 4
  config.data.buckets = ((128, 128, 4),)
  config.data.degradation.scale_range = (8.0, 8.0)
  config.optim.lr = 3e-4  # measured best of 1e-4 / 3e-4 / 1e-3 for D_f* at this size
  config.optim.end_lr = 3e-5
  config.optim.warmup_steps = 20
  config.loss.disc_weight = 0.0
  config.train.latent_stats_batches = 16


def load_config(spec: str) -> ml_collections.ConfigDict:
  """Loads ``path/to/config.py[:stage]`` the way ``--config=`` does (for tests and notebooks)."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location(
    f"_zipir_config_{os.path.basename(path)[:-3]}", path
  )
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise AttributeError(f"config file {path!r} defines no get_config(stage)")
  return module.get_config(arg or None)


def _parent(
  config: ml_collections.ConfigDict, dotted: str
) -> tuple[ml_collections.ConfigDict, str]:
  """(the ConfigDict that holds key ``dotted``, its last part); a KeyError names the valid keys."""
  *parents, leaf = dotted.split(".")
  node = config
  for i, key in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or key not in node:
      raise KeyError(
        f"config key {'.'.join(parents[: i + 1])!r} does not exist; valid keys at "
        f"that level: {', '.join(sorted(node.keys()))}"
      )
    node = node[key]
  if not isinstance(node, ml_collections.ConfigDict):
    raise KeyError(
      f"config key {dotted!r} does not exist: {'.'.join(parents)!r} is a value, not a group of keys"
    )
  if leaf not in node:
    raise KeyError(
      f"config key {dotted!r} does not exist; valid keys at that level: "
      f"{', '.join(sorted(node.keys()))}"
    )
  return node, leaf


def apply_overrides(
  config: ml_collections.ConfigDict, overrides: dict[str, object]
) -> ml_collections.ConfigDict:
  """Sets dotted keys (``{"vae.ch": 64}``); a wrong key raises a KeyError naming the valid ones."""
  for dotted, value in overrides.items():
    node, leaf = _parent(config, dotted)
    node[leaf] = value  # a locked ConfigDict still accepts existing keys (type-checked).
  return config


def _argv_config(argv: Sequence[str]) -> tuple[str | None, list[str]]:
  """(the --config spec, the dotted keys of the --config.KEY overrides) as written in ``argv``."""
  spec, keys = None, []
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      spec = arg.partition("=")[2]
    elif arg == "--config" and i + 1 < len(argv):
      spec = argv[i + 1]
    elif arg.startswith("--config."):
      keys.append(arg[len("--config.") :].partition("=")[0])
  return spec, keys


def flags_parser(argv: list[str]) -> list[str]:
  """absl ``flags_parser`` for the programs with a ``--config`` flag (``app.run(main,
  flags_parser=config_lib.flags_parser)``): an override of a key the config lacks ends the program
  with one line naming the key and the valid ones, where ml_collections raises a bare
  AttributeError from inside flag parsing. (A config flag with a default is parsed, overrides
  included, when it is defined: such programs give it no default.)"""
  from absl import app  # pylint: disable=g-import-not-at-top

  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    spec, keys = _argv_config(argv[1:])
    message = f"cannot apply the overrides {', '.join('--config.' + k for k in keys)}: {e}"
    if spec:
      config = load_config(spec)
      for key in keys:
        try:
          _parent(config, key)
        except KeyError as missing:
          message = f"--config.{key}: {missing.args[0]} (config {spec})"
          break
    print(f"{os.path.basename(argv[0])}: {message}", file=sys.stderr)
    sys.exit(1)
