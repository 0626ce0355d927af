"""The mesh axes and the default logical-axis rules, with no jax import (configs include them).

Models name their parameter and activation axes ('embed', 'mlp', 'heads', 'conv_out', 'batch', …);
``config.train.logical_axis_rules`` maps those names onto the mesh in one place (maxtext style), and
:data:`LOGICAL_AXIS_RULES` is its default:

* ``batch`` is split over ``data`` and ``fsdp`` (every device sees its own examples);
* parameters and optimizer state are split over ``fsdp`` on their model dimension (``embed`` for the
  DiT, ``conv_out`` for convolutions, ``vocab`` / ``embed`` for T5) — ZeRO-3 style FSDP;
* ``mlp`` and ``heads`` go over ``tensor`` (Megatron-style tensor parallelism).

Each rule is ``(logical name, mesh axes)``: the axes are None (replicated), one mesh axis or a
tuple of them. :mod:`zipir_jax.parallel` builds the mesh and applies the rules.
"""

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_AXIS_RULES = (
  # activations
  ("batch", BATCH_AXES),
  ("length", None),
  ("text_length", None),
  ("height", None),
  ("width", None),
  ("channels", None),
  ("activation_embed", None),
  ("activation_mlp", "tensor"),
  # DiT / T5 parameters
  ("embed", "fsdp"),
  ("text_embed", "fsdp"),
  ("mlp", "tensor"),
  ("heads", "tensor"),
  ("kv", None),
  ("layers", None),
  ("vocab", "tensor"),
  ("relpos_buckets", None),
  # convolutions (VAE, pixel decoder, discriminator)
  ("conv_out", "fsdp"),
  ("conv_in", None),
  ("kernel_h", None),
  ("kernel_w", None),
  ("norm", None),
)
