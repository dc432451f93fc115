"""PyTorch twins of the tml networks and loss terms (``tml.torch.twins``).

Part of the optional ``torch`` extra: this module imports torch, and nothing in
the core imports this module. It exists for parity tests and side-by-side
benchmarks, so each twin computes exactly what its Flax model computes:

  * Same constructor arguments as the Flax model (plus ``in_channels``, which
    Flax infers lazily), same output dict: NHWC images in, ``'heatmap'``
    ``(B, N, N)``, ``'landmarks'`` ``(B, K, 2)``, ``'emotion_logits'``
    ``(B, C)``, ``'maps'`` ``(B, h, w, 3)``.
  * Mixed precision as in Flax: ``dtype`` None / float32 computes in float32;
    bfloat16 (``jnp.bfloat16``, ``torch.bfloat16`` or ``'bfloat16'``) runs
    the forward pass under ``torch.autocast(device_type, torch.bfloat16)``
    on CPU and CUDA (convs, transposed convs and linears in bf16), parameters
    stay float32, and every output is cast to float32 inside the twin, the
    landmark sigmoid after the cast, exactly where the Flax model casts.
  * Same module names: torch state_dict key ``'unet.enc_0_conv1.weight'`` is
    Flax param ``params['unet']['enc_0_conv1']['kernel']``, so conversion is a
    per-layer layout change and nothing else.
  * Internally NCHW. Feature maps are permuted back to NHWC before every
    flatten, so the dense weights map across with a plain transpose.
  * 'SAME' padding as XLA does it: total k - 1, ``(k - 1) // 2`` before and the
    rest after, i.e. 1 before / 2 after for the 4x4 conv, written out with
    ``F.pad``. (torch 2.13's ``padding='same'`` happens to split the same way
    -- the parity tests check both -- but it warns and copies for even
    kernels, and the explicit pad keeps the convention visible.)
  * 2x2 max pooling floors odd sizes (21 -> 10) in both frameworks.
  * Transposed conv: Flax's ``nn.ConvTranspose`` (``transpose_kernel=False``)
    applies its kernel ``(kh, kw, in, out)`` to the dilated input WITHOUT the
    spatial flip that ``torch.nn.ConvTranspose2d`` (a true gradient of conv)
    implies, so ``torch_weight = flip(kernel, (0, 1)).permute(2, 3, 0, 1)``.
    Verified numerically by the parity tests.

The weight converters (Flax <-> torch layouts) are in ``tml.torch.convert``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any

import jax.numpy as jnp
import torch
from torch import nn
import torch.nn.functional as F

from tml.models import cnn as cnn_lib
from tml.models import devries as devries_lib

# jax's truncated-normal variance scaling divides by this so that the
# truncated (at +-2 sigma) distribution has the nominal variance.
_TRUNC_STD_CORRECTION = 0.87962566103423978
# Transposed-conv layers are named with this prefix in both frameworks; it
# is how a bare state_dict (e.g. of gradients) tells them from plain convs
# (tml.torch.convert).
TRANSPOSED_PREFIX = "upconv"


# ----------------------------------------------------------------------------
# Mixed precision.
# ----------------------------------------------------------------------------
def autocast_dtype(dtype: Any) -> torch.dtype | None:
  """A twin's ``dtype`` argument -> ``torch.bfloat16``, or None for float32.

  Accepts None, the names ``'float32'`` / ``'bfloat16'`` (``Config.
  compute_dtype``), and the jnp, numpy and torch dtypes of those two.
  """
  if dtype is None:
    return None
  if isinstance(dtype, torch.dtype):
    name = {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(dtype)
  else:
    try:
      name = jnp.dtype(dtype).name
    except TypeError:
      name = None
  if name == "float32":
    return None
  if name == "bfloat16":
    return torch.bfloat16
  raise ValueError(f"dtype {dtype!r}: the twins compute in float32 or "
                   "bfloat16")


def autocast(device_type: str, dtype: Any):
  """``torch.autocast(device_type, dtype=torch.bfloat16)`` for a bfloat16
  ``dtype`` (any spelling :func:`autocast_dtype` takes), else a no-op context.

  ``device_type``: ``'cpu'`` or ``'cuda'`` (a tensor's ``.device.type``).
  """
  low = autocast_dtype(dtype)
  if low is None:
    return contextlib.nullcontext()
  return torch.autocast(device_type=device_type, dtype=low)


class _MixedPrecision:
  """``self.autocast(device_type)``: the twin's compute-dtype context."""
  compute_dtype: torch.dtype | None = None

  def autocast(self, device_type: str):
    return autocast(device_type, self.compute_dtype)


# ----------------------------------------------------------------------------
# Layers.
# ----------------------------------------------------------------------------
@torch.no_grad()
def _trunc_normal_init(weight: torch.Tensor, fan_in: int, scale: float):
  """Like ``layers.he/lecun_truncated_normal``: N(0, std) cut at +-2 std.

  Rejection sampling: the ~4.6 % of draws beyond 2 std are redrawn in a small
  side vector until all fit. ``nn.init.trunc_normal_`` (inverse-erf over the
  whole tensor) takes seconds for the 16M-weight DeVries map layer on CPU.
  """
  std = math.sqrt(scale / fan_in) / _TRUNC_STD_CORRECTION
  weight.normal_(0.0, std)
  bad = weight.abs() > 2.0 * std
  redraw = torch.empty(int(bad.sum()), dtype=weight.dtype)
  todo = torch.ones_like(redraw, dtype=torch.bool)
  while todo.any():  # only the small redrawn vector is touched per round
    redraw[todo] = torch.randn(int(todo.sum()), dtype=weight.dtype) * std
    todo = redraw.abs() > 2.0 * std
  weight[bad] = redraw


class SameConv2d(nn.Conv2d):
  """Stride-1 conv with XLA's 'SAME' padding (extra pad after for even k)."""

  def __init__(self, in_channels: int, out_channels: int, kernel_size: int,
               init_scale: float = 2.0):
    k = kernel_size
    super().__init__(in_channels, out_channels, k,
                     padding=k // 2 if k % 2 else 0)
    before = (k - 1) // 2
    self._pad = None if k % 2 else (before, k - 1 - before) * 2
    _trunc_normal_init(self.weight, in_channels * k * k, init_scale)
    nn.init.zeros_(self.bias)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self._pad is not None:
      x = F.pad(x, self._pad)  # (left, right, top, bottom)
    return super().forward(x)


def _linear(in_features: int, out_features: int, init_scale: float):
  layer = nn.Linear(in_features, out_features)
  _trunc_normal_init(layer.weight, in_features, init_scale)
  nn.init.zeros_(layer.bias)
  return layer


def _nhwc_flatten(x: torch.Tensor) -> torch.Tensor:
  """(B, C, H, W) -> (B, H*W*C) in Flax's row-major NHWC order."""
  return x.permute(0, 2, 3, 1).reshape(x.shape[0], -1)


def _use_dropout(module: nn.Module, train: bool | None) -> bool:
  return module.training if train is None else train


class _LandmarkEmotionHeadTorch(nn.Module):
  """Twin of ``tml.models.layers.LandmarkEmotionHead``."""

  def __init__(self, in_features, fc_width, num_landmarks, landmark_head,
               num_emotions):
    super().__init__()
    self.num_landmarks = num_landmarks
    self.fc_hidden = _linear(in_features, fc_width, 2.0)
    if landmark_head:
      self.fc_landmarks = _linear(fc_width, 2 * num_landmarks, 1.0)
    if num_emotions > 0:
      self.fc_emotion = _linear(fc_width, num_emotions, 1.0)

  def forward(self, features):
    h = F.relu(self.fc_hidden(features))
    out = {}
    if hasattr(self, "fc_landmarks"):
      # Sigmoid in float32, as in Flax (in bf16 it saturates early).
      z = torch.sigmoid(self.fc_landmarks(h).float())
      out["landmarks"] = z.reshape(z.shape[0], self.num_landmarks, 2)
    if hasattr(self, "fc_emotion"):
      out["emotion_logits"] = self.fc_emotion(h).float()
    return out


# ----------------------------------------------------------------------------
# Networks.
# ----------------------------------------------------------------------------
class _UNetBodyTorch(nn.Module):
  """Twin of ``tml.models.unet.UNetBody``: NCHW in, (B, N, N) map A out."""

  def __init__(self, in_channels: int, depth: int, base_width: int):
    super().__init__()
    self.depth = depth
    c = in_channels
    for level in range(depth):
      w = base_width * 2**level
      self.add_module(f"enc_{level}_conv1", SameConv2d(c, w, 3))
      self.add_module(f"enc_{level}_conv2", SameConv2d(w, w, 3))
      c = w
    w = base_width * 2**depth
    self.bottleneck_conv1 = SameConv2d(c, w, 3)
    self.bottleneck_conv2 = SameConv2d(w, w, 3)
    for level in reversed(range(depth)):
      c, w = w, base_width * 2**level
      up = nn.ConvTranspose2d(c, w, 2, stride=2)
      _trunc_normal_init(up.weight, c * 4, 2.0)
      nn.init.zeros_(up.bias)
      self.add_module(f"{TRANSPOSED_PREFIX}_{level}", up)
      self.add_module(f"dec_{level}_conv1", SameConv2d(2 * w, w, 3))
      self.add_module(f"dec_{level}_conv2", SameConv2d(w, w, 3))
    self.out_conv = SameConv2d(w, 1, 1, init_scale=1.0)

  def forward(self, x):
    skips = []
    for level in range(self.depth):
      x = F.relu(getattr(self, f"enc_{level}_conv1")(x))
      x = F.relu(getattr(self, f"enc_{level}_conv2")(x))
      skips.append(x)
      x = F.max_pool2d(x, 2)
    x = F.relu(self.bottleneck_conv1(x))
    x = F.relu(self.bottleneck_conv2(x))
    for level in reversed(range(self.depth)):
      x = getattr(self, f"{TRANSPOSED_PREFIX}_{level}")(x)
      x = torch.cat([skips[level], x], dim=1)  # skip first, as in Flax
      x = F.relu(getattr(self, f"dec_{level}_conv1")(x))
      x = F.relu(getattr(self, f"dec_{level}_conv2")(x))
    return self.out_conv(x)[:, 0]


class ChuUNetTorch(_MixedPrecision, nn.Module):
  """Twin of ``tml.models.ChuUNet`` (same arguments, same outputs).

  ``self.unet`` alone (the stage-1 network) does not enter the autocast
  context; wrap it in ``with model.autocast(device_type):``.
  """

  def __init__(self, input_size=128, depth=4, base_width=64, fc_width=1024,
               num_landmarks=68, num_emotions=8, landmark_head=True,
               map_reduction=1, dtype=None, in_channels=1):
    super().__init__()
    self.compute_dtype = autocast_dtype(dtype)
    if depth < 0 or input_size % (2**depth):
      raise ValueError(f"input_size={input_size} must be divisible by "
                       f"2**depth={2**depth}")
    if map_reduction < 1 or input_size % map_reduction:
      raise ValueError(f"map_reduction={map_reduction} must be a positive "
                       f"divisor of input_size={input_size}")
    self.input_size = input_size
    self.map_reduction = map_reduction
    self.unet = _UNetBodyTorch(in_channels, depth, base_width)
    if landmark_head or num_emotions > 0:
      self.head = _LandmarkEmotionHeadTorch(
          (input_size // map_reduction)**2, fc_width, num_landmarks,
          landmark_head, num_emotions)

  def forward(self, images, *, train=None):
    del train
    _check_images(images, self.input_size)
    with self.autocast(images.device.type):
      a = self.unet(images.permute(0, 3, 1, 2))
      out = {"heatmap": a.float()}
      if hasattr(self, "head"):
        pooled = a[:, None]
        if self.map_reduction > 1:
          pooled = F.avg_pool2d(pooled, self.map_reduction)
        out.update(self.head(pooled.reshape(a.shape[0], -1)))
    return out


class BasicCNNTorch(_MixedPrecision, nn.Module):
  """Twin of ``tml.models.BasicCNN``."""

  def __init__(self, input_size=128, fc_width=1024, num_landmarks=68,
               num_emotions=0, widths=cnn_lib.DEFAULT_WIDTHS, dtype=None,
               in_channels=1):
    super().__init__()
    self.compute_dtype = autocast_dtype(dtype)
    if len(widths) != 6 or input_size % 16:
      raise ValueError("BasicCNN needs six widths and input_size % 16 == 0")
    self.input_size = input_size
    self.features = nn.Module()
    c = in_channels
    for i, w in enumerate(widths):
      self.features.add_module(f"conv_{i}", SameConv2d(c, w, 3))
      c = w
    side = input_size // 16
    self.head = _LandmarkEmotionHeadTorch(side * side * c, fc_width,
                                          num_landmarks, True, num_emotions)

  def forward(self, images, *, train=None):
    del train
    _check_images(images, self.input_size)
    with self.autocast(images.device.type):
      x = images.permute(0, 3, 1, 2)
      for i in range(6):
        x = F.relu(getattr(self.features, f"conv_{i}")(x))
        if i in cnn_lib.POOL_AFTER:
          x = F.max_pool2d(x, 2)
      return self.head(_nhwc_flatten(x))


class DeVriesNetTorch(_MixedPrecision, nn.Module):
  """Twin of ``tml.models.DeVriesNet``. Dropout follows ``train`` when given,
  else ``self.training``; ``dropout_keep`` (bool, the hidden layer's shape)
  gives the mask instead of a torch draw, applied as Flax does
  (``where(keep, h / (1 - rate), 0)``), so a JAX step's mask
  (``tml.models.dropout_keep_masks``) gives the same outputs."""

  def __init__(self, num_classes=7, map_head=True, map_size=42, fc_width=3072,
               dropout_rate=0.5, dtype=None, in_channels=1):
    super().__init__()
    self.compute_dtype = autocast_dtype(dtype)
    self.map_size = map_size
    self.dropout_rate = dropout_rate
    self.features = nn.Module()
    c, side = in_channels, map_size
    for i, (w, k) in enumerate(devries_lib.CONV_SPECS):
      self.features.add_module(f"conv_{i}", SameConv2d(c, w, k))
      c, side = w, side // 2
    self.head = nn.Module()
    self.head.fc_hidden = _linear(side * side * c, fc_width, 2.0)
    if num_classes > 0:
      self.head.fc_emotion = _linear(fc_width, num_classes, 1.0)
    if map_head:
      self.head.fc_maps = _linear(
          fc_width, map_size * map_size * devries_lib.NUM_MAPS, 1.0)

  def forward(self, images, *, train=None, dropout_keep=None):
    _check_images(images, self.map_size)
    with self.autocast(images.device.type):
      x = images.permute(0, 3, 1, 2)
      for i in range(len(devries_lib.CONV_SPECS)):
        x = F.max_pool2d(F.relu(getattr(self.features, f"conv_{i}")(x)), 2)
      h = F.relu(self.head.fc_hidden(_nhwc_flatten(x)))
      if dropout_keep is None or not _use_dropout(self, train):
        h = F.dropout(h, self.dropout_rate, training=_use_dropout(self, train))
      elif self.dropout_rate > 0:
        if tuple(dropout_keep.shape) != tuple(h.shape):
          raise ValueError(f"dropout_keep: expected the hidden layer's shape "
                           f"{tuple(h.shape)}; got {tuple(dropout_keep.shape)}")
        h = torch.where(dropout_keep, h / (1.0 - self.dropout_rate),
                        torch.zeros_like(h))
      out = {}
      if hasattr(self.head, "fc_emotion"):
        out["emotion_logits"] = self.head.fc_emotion(h).float()
      if hasattr(self.head, "fc_maps"):
        out["maps"] = self.head.fc_maps(h).float().reshape(
            h.shape[0], self.map_size, self.map_size, devries_lib.NUM_MAPS)
    return out


def _check_images(images: torch.Tensor, size: int):
  if images.ndim != 4 or images.shape[1] != size or images.shape[2] != size:
    raise ValueError(f"expected NHWC images (B, {size}, {size}, C); got "
                     f"{tuple(images.shape)}")


TORCH_MODELS: dict[str, type[nn.Module]] = {
    "chu_unet": ChuUNetTorch,
    "basic_cnn": BasicCNNTorch,
    "devries": DeVriesNetTorch,
}


def build_torch_model(name: str, **kwargs: Any) -> nn.Module:
  """Instantiates the torch twin of registered model ``name``."""
  if name not in TORCH_MODELS:
    raise KeyError(f"unknown model {name!r}; known models: "
                   f"{', '.join(sorted(TORCH_MODELS))}")
  return TORCH_MODELS[name](**kwargs)


# ----------------------------------------------------------------------------
# Loss twins (same signatures and semantics as tml.losses; per example (B,)).
# ----------------------------------------------------------------------------
def _onehot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
  # Out-of-range ids give an all-zero row, like jax.nn.one_hot (F.one_hot
  # would raise).
  classes = torch.arange(num_classes, device=labels.device)
  return (labels.long()[:, None] == classes).float()


def unet_loss_torch(map_logits, target):
  """``-sum B * log_softmax(A)`` over all H*W positions: ``(B,H,W) -> (B,)``."""
  b = map_logits.shape[0]
  log_p = F.log_softmax(map_logits.float().reshape(b, -1), dim=-1)
  return -(target.float().reshape(b, -1) * log_p).sum(-1)


def landmark_mse_torch(pred, target):
  """``(1/K) sum_i (dx^2 + dy^2)``: ``(B, K, 2) -> (B,)``."""
  diff = pred.float() - target.float()
  return (diff * diff).sum(-1).mean(-1)


def emotion_mse_torch(logits, labels):
  """Mean over classes of ``(softmax - onehot)^2``: ``(B, C) -> (B,)``."""
  probs = F.softmax(logits.float(), dim=-1)
  return ((probs - _onehot(labels, logits.shape[-1]))**2).mean(-1)


def emotion_xent_torch(logits, labels):
  """``-log_softmax(logits)[label]`` (0 for an out-of-range id): ``(B,)``."""
  log_p = F.log_softmax(logits.float(), dim=-1)
  return -(_onehot(labels, logits.shape[-1]) * log_p).sum(-1)


def pixel_bce_torch(logits, targets, valid):
  """Mean BCE-with-logits over pixels and maps, times ``valid``: ``(B,)``.

  Exactly 0 with zero gradient where ``valid == 0``, even for NaN targets.
  """
  logits, targets, valid = logits.float(), targets.float(), valid.float()
  keep = valid > 0
  keep_px = keep.reshape((-1,) + (1,) * (targets.ndim - 1))
  targets = torch.where(keep_px, targets, torch.zeros_like(targets))
  per_unit = (torch.clamp(logits, min=0) - logits * targets
              + torch.log1p(torch.exp(-logits.abs())))
  per_example = per_unit.reshape(per_unit.shape[0], -1).mean(-1)
  return torch.where(keep, per_example * valid, torch.zeros_like(per_example))


def weighted_mean_torch(values, weights):
  """``sum(w * v) / sum(w)``, exactly 0 when ``sum(w) == 0``: ``()``."""
  values, weights = values.float(), weights.float()
  total = weights.sum()
  num = torch.where(weights != 0, weights * values,
                    torch.zeros_like(values)).sum()
  safe = torch.where(total > 0, total, torch.ones_like(total))
  return torch.where(total > 0, num / safe, torch.zeros_like(num))

