"""Building blocks shared by the tml networks: initialisers, pooling, heads.

Conventions (every model in ``tml.models``):
  * images are ``(B, H, W, C)`` float NHWC; the computation dtype is a module
    attribute, parameters always stay float32 and outputs are cast back to
    float32 so that losses and metrics never see bf16;
  * convolutions are ``nn.Conv`` layers computed by :func:`conv_general_dilated`
    (``lax.conv_general_dilated`` with a faster CPU forward pass for one
    input channel); the U-Net's 2x2 stride-2
    up-convolution is :class:`UpConv2x2`, a drop-in for ``nn.ConvTranspose``
    (same parameters, same numbers) computed as one matrix product;
  * 2x2 max pooling uses 'VALID' windows, i.e. floor division of odd sizes
    (21 -> 10), the behaviour of TF, Theano and ``torch.nn.MaxPool2d``; its
    gradient goes to the first maximum of each window (row-major), as with
    XLA's select-and-scatter and torch.

Why the hand-written layers (``experiments/bench.py``, BENCHMARKS.md): on
XLA:CPU, ``nn.max_pool``'s gradient is a select-and-scatter that runs ~10x
slower than the elementwise form below (it was ~40 % of the DeVries train
step), ``nn.ConvTranspose`` is a convolution over a zero-dilated input that
Eigen computes very slowly (about half of the U-Net's train step), and a
convolution of a one-channel image is a GEMM with K = kh * kw that Eigen runs
at ~10 % of its speed on wider layers. The replacements are reshapes,
elementwise ops and matrix products, which XLA compiles well on every
backend; the one-channel path is taken on CPU only.
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

Dtype = Any

# Chu & Liu initialise "by a truncated normal distribution" without a scale.
# A fixed stddev (say TF's customary 0.1) makes a 19-layer U-Net explode or
# vanish depending on the width, so the scale follows fan-in: He scaling for
# layers that feed a ReLU, LeCun scaling for output layers (A, the landmark and
# emotion logits). jax's 'truncated_normal' variance scaling corrects the
# stddev for the truncation at +-2 sigma, so the variance is as named.
he_truncated_normal = nn.initializers.variance_scaling(
    2.0, "fan_in", "truncated_normal")
lecun_truncated_normal = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal")


def _pool_windows(x):
  """``(B, H, W, C)`` -> the four taps ``(B, H//2, W//2, C)`` of each window.

  Row-major window order: (0, 0), (0, 1), (1, 0), (1, 1). An odd last row or
  column is dropped ('VALID').
  """
  b, h, w, c = x.shape
  h2, w2 = h // 2, w // 2
  x = x[:, :2 * h2, :2 * w2, :].reshape(b, h2, 2, w2, 2, c)
  return (x[:, :, 0, :, 0], x[:, :, 0, :, 1], x[:, :, 1, :, 0],
          x[:, :, 1, :, 1])


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2 on ``(B, H, W, C)``; odd sizes floor.

  Equal to ``nn.max_pool(x, (2, 2), strides=(2, 2), padding='VALID')``, and
  so is its gradient: each window's cotangent goes to its FIRST maximum in
  row-major order (XLA's select-and-scatter with ``ge``, torch's max-pool
  index), nothing to the other taps or to a dropped odd row/column.
  """
  t00, t01, t10, t11 = _pool_windows(x)
  return jnp.maximum(jnp.maximum(t00, t01), jnp.maximum(t10, t11))


def _max_pool_fwd(x):
  return max_pool_2x2(x), x


def _max_pool_bwd(x, g):
  taps = _pool_windows(x)
  m = jnp.maximum(jnp.maximum(taps[0], taps[1]), jnp.maximum(taps[2], taps[3]))
  # First maximum wins. A window holding a NaN has a NaN maximum that no tap
  # equals; like select-and-scatter (whose `ge` is false for NaN) the
  # cotangent then goes to the last tap.
  taken = jnp.zeros(m.shape, bool)
  parts = []
  for i, t in enumerate(taps):
    pick = ~taken if i == 3 else (t == m) & ~taken
    parts.append(jnp.where(pick, g, jnp.zeros_like(g)))
    taken = taken | pick
  b, h, w, c = x.shape
  h2, w2 = h // 2, w // 2
  top = jnp.stack(parts[:2], axis=3)          # (B, h2, w2, 2, C): row 0
  bottom = jnp.stack(parts[2:], axis=3)       # row 1
  dx = jnp.stack([top, bottom], axis=2)       # (B, h2, 2, w2, 2, C)
  dx = dx.reshape(b, 2 * h2, 2 * w2, c)
  if (h, w) != (2 * h2, 2 * w2):
    dx = jnp.pad(dx, ((0, 0), (0, h - 2 * h2), (0, w - 2 * w2), (0, 0)))
  return (dx,)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


class UpConv2x2(nn.Module):
  """Drop-in for ``nn.ConvTranspose(features, (2, 2), strides=(2, 2),
  padding='VALID')`` (Flax's default ``transpose_kernel=False``).

  Same parameters (``kernel`` ``(2, 2, in, features)`` with ``kernel_init``,
  ``bias`` ``(features,)`` zeros) and the same output: with a 2x2 kernel and
  stride 2 the windows do not overlap, so output pixel ``(2i + a, 2j + b)``
  is ``x[i, j] @ kernel[1 - a, 1 - b] + bias`` (Flax's transposed conv pads
  the dilated input by one on each side and does not flip the kernel, hence
  the ``1 - a``). Computed as ONE ``(B*h*w, in) @ (in, 4*features)`` matrix
  product and a reshape, instead of a convolution over a 3/4-zero dilated
  input.
  """
  features: int
  kernel_init: Any = nn.initializers.lecun_normal()
  dtype: Dtype = None
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cin = x.shape[-1]
    kernel = self.param("kernel", self.kernel_init,
                        (2, 2, cin, self.features), self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,),
                      self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias,
                                              dtype=self.dtype)
    b, h, w, _ = x.shape
    k = kernel[::-1, ::-1]                    # k[a, b] = kernel[1 - a, 1 - b]
    y = jnp.einsum("bhwc,xyco->bhxwyo", x, k, precision=self.precision)
    y = y.reshape(b, 2 * h, 2 * w, self.features)
    return y + bias


_NHWC = ("NHWC", "HWIO", "NHWC")


def _one_channel_shift_add(lhs, rhs, pads):
  """``sum_{i,j} pad(x)[:, i:i+H, j:j+W, :] * w[i, j, 0, :]`` (one input channel).

  A single fused elementwise loop (kh * kw multiply-adds per output, along
  the contiguous output channels), accumulated in float32.
  """
  kh, kw = rhs.shape[:2]
  h = lhs.shape[1] + pads[0][0] + pads[0][1] - kh + 1
  w = lhs.shape[2] + pads[1][0] + pads[1][1] - kw + 1
  x = jnp.pad(lhs.astype(jnp.float32), ((0, 0), pads[0], pads[1], (0, 0)))
  k = rhs.astype(jnp.float32)
  acc = None
  for i in range(kh):
    for j in range(kw):
      term = x[:, i:i + h, j:j + w, :] * k[i, j, 0]
      acc = term if acc is None else acc + term
  return acc.astype(jnp.result_type(lhs, rhs))


def _lax_conv(lhs, rhs, pads, precision):
  return lax.conv_general_dilated(lhs, rhs, (1, 1), pads,
                                  dimension_numbers=_NHWC, precision=precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _one_channel_conv(lhs, rhs, pads, precision):
  return lax.platform_dependent(
      lhs, rhs, cpu=lambda l, r: _one_channel_shift_add(l, r, pads),
      default=lambda l, r: _lax_conv(l, r, pads, precision))


def _one_channel_conv_fwd(lhs, rhs, pads, precision):
  return _one_channel_conv(lhs, rhs, pads, precision), (lhs, rhs)


def _one_channel_conv_bwd(pads, precision, res, g):
  # The gradients of the plain convolution (Eigen's filter gradient is fast
  # here; the input gradient is dead code for a first layer and dropped).
  lhs, rhs = res
  _, vjp = jax.vjp(lambda l, r: _lax_conv(l, r, pads, precision), lhs, rhs)
  return vjp(g)


_one_channel_conv.defvjp(_one_channel_conv_fwd, _one_channel_conv_bwd)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None,
                         feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated`` (the ``nn.Conv(conv_general_dilated=...)``
  hook), with a faster CPU forward pass for ONE input channel.

  The one-channel case (a network's first layer on grey images: NHWC/HWIO,
  stride 1, no dilation, no groups) is computed on CPU as kh * kw shifted
  multiply-adds (same value up to float rounding; gradients are the plain
  convolution's); every other case, and every other backend, is
  ``lax.conv_general_dilated`` unchanged.
  """
  ones = lambda v: v is None or all(int(d) == 1 for d in v)
  nhwc = (dimension_numbers is not None and lhs.ndim == 4 and
          lax.conv_dimension_numbers(lhs.shape, rhs.shape, _NHWC)
          == lax.conv_dimension_numbers(lhs.shape, rhs.shape,
                                        dimension_numbers))
  if (nhwc and rhs.shape[2] == 1 and ones(window_strides) and
      ones(lhs_dilation) and ones(rhs_dilation) and feature_group_count == 1
      and batch_group_count == 1 and preferred_element_type is None):
    if isinstance(padding, str):
      pads = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], (1, 1),
                                 padding)
    else:
      pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    return _one_channel_conv(lhs, rhs, pads, precision)
  return lax.conv_general_dilated(
      lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
      rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
      feature_group_count=feature_group_count,
      batch_group_count=batch_group_count, precision=precision,
      preferred_element_type=preferred_element_type)


def check_images(images: jax.Array, size: int, model: str) -> None:
  """Raises ValueError unless ``images`` is ``(B, size, size, C)``.

  The first dense layer's input width depends on the image size, so a wrong
  size would otherwise surface as an opaque shape error deep inside Flax.
  """
  if images.ndim != 4:
    raise ValueError(
        f"{model} expects NHWC images (B, H, W, C); got shape {images.shape}")
  if images.shape[1] != size or images.shape[2] != size:
    raise ValueError(
        f"{model} was built for {size}x{size} inputs; got images of shape "
        f"{images.shape} (B, H, W, C)")


class LandmarkEmotionHead(nn.Module):
  """Chu & Liu's fully-connected head: FC hidden ReLU, then two branches.

  Input ``(B, D)`` features; output dict with ``'landmarks'`` ``(B, K, 2)``
  (sigmoid, normalised (x/W, y/H); unit 2i of the 2K-wide layer is x_i and
  2i+1 is y_i, the paper's order) when ``landmark_head``, and
  ``'emotion_logits'`` ``(B, num_emotions)`` when ``num_emotions > 0``.

  The paper's text can be read as sigmoid on the hidden layer too ("two fully
  connected layers ... with the sigmoid function as the activation"); we read
  the hidden layer as ReLU like every other layer of the net, and the sigmoid
  as what maps the output into [0, 1] coordinates.
  """
  fc_width: int = 1024
  num_landmarks: int = 68
  landmark_head: bool = True
  num_emotions: int = 0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> dict[str, jax.Array]:
    h = nn.Dense(self.fc_width, dtype=self.dtype,
                 kernel_init=he_truncated_normal, name="fc_hidden")(features)
    h = nn.relu(h)
    out = {}
    if self.landmark_head:
      z = nn.Dense(2 * self.num_landmarks, dtype=self.dtype,
                   kernel_init=lecun_truncated_normal, name="fc_landmarks")(h)
      # Sigmoid in float32: in bf16 it saturates to exactly 0/1 early.
      z = nn.sigmoid(z.astype(jnp.float32))
      out["landmarks"] = z.reshape(z.shape[0], self.num_landmarks, 2)
    if self.num_emotions > 0:
      e = nn.Dense(self.num_emotions, dtype=self.dtype,
                   kernel_init=lecun_truncated_normal, name="fc_emotion")(h)
      out["emotion_logits"] = e.astype(jnp.float32)
    return out
