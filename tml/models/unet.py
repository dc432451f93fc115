"""Chu & Liu 2019: the U-Net that produces the landmark map A, plus FC heads.

How we read the paper (DESIGN.md, "Chu & Liu 2019"): the text's "3x3 conv with
stride 2" cannot coexist with 2x2 max pooling and an N x N output map, so every
3x3 conv is stride 1, 'SAME' padded, followed by ReLU, twice per level, as in
Ronneberger et al.'s U-Net. Going down, 2x2 max pooling and channels doubled;
going up, a 2x2 stride-2 transposed conv that halves the channels, concat with
the skip, two 3x3 convs. A final 1x1 conv gives ONE channel: the N x N map A
(logits; the unet loss applies a softmax over all N*N positions).

Heads: A (optionally average-pooled by ``map_reduction`` to keep the first FC
affordable at large N) is flattened row-major -> FC ``fc_width`` ReLU -> FC 136
sigmoid (landmarks) and/or FC ``num_emotions`` (emotion logits).

Parameter tree (the two-stage training selects by these names):
  ``{'unet': {...everything up to A...}, 'head': {...all dense layers...}}``
  with, inside ``unet``, ``enc_{l}_conv{1,2}`` for levels l = 0..depth-1,
  ``bottleneck_conv{1,2}``, ``upconv_{l}`` (transposed conv into level l),
  ``dec_{l}_conv{1,2}`` and ``out_conv`` (the 1x1 conv to A); inside
  ``head``, ``fc_hidden``, ``fc_landmarks``, ``fc_emotion``.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tml.models import layers


class UNetBody(nn.Module):
  """The U-Net proper: ``(B, N, N, C)`` images -> ``(B, N, N)`` map A.

  Attributes:
    depth: number of 2x2 poolings (levels below the input resolution).
    base_width: channels at the first level; level l has base_width * 2**l,
      the bottleneck base_width * 2**depth.
    dtype: computation dtype.
  """
  depth: int = 4
  base_width: int = 64
  dtype: layers.Dtype = jnp.float32

  def _conv3x3(self, features: int, name: str) -> nn.Conv:
    return nn.Conv(features, (3, 3), padding="SAME", dtype=self.dtype,
                   kernel_init=layers.he_truncated_normal,
                   conv_general_dilated=layers.conv_general_dilated, name=name)

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = images.astype(self.dtype)
    skips = []
    for level in range(self.depth):
      width = self.base_width * 2**level
      x = nn.relu(self._conv3x3(width, f"enc_{level}_conv1")(x))
      x = nn.relu(self._conv3x3(width, f"enc_{level}_conv2")(x))
      skips.append(x)
      x = layers.max_pool_2x2(x)
    width = self.base_width * 2**self.depth
    x = nn.relu(self._conv3x3(width, "bottleneck_conv1")(x))
    x = nn.relu(self._conv3x3(width, "bottleneck_conv2")(x))
    for level in reversed(range(self.depth)):
      width = self.base_width * 2**level
      # nn.ConvTranspose(width, (2, 2), strides=(2, 2), padding="VALID")
      # as a matrix product (layers.UpConv2x2: same params, same output).
      # Flax's default transpose_kernel=False: the kernel is applied to the
      # dilated input without the spatial flip of a true conv gradient
      # (torch.nn.ConvTranspose2d). tml.torch.convert flips it on conversion.
      x = layers.UpConv2x2(width, dtype=self.dtype,
                           kernel_init=layers.he_truncated_normal,
                           name=f"upconv_{level}")(x)
      # No ReLU after the up-conv: Ronneberger's U-Net has none; the two
      # convolutions that follow carry the nonlinearity.
      x = jnp.concatenate([skips[level], x], axis=-1)
      x = nn.relu(self._conv3x3(width, f"dec_{level}_conv1")(x))
      x = nn.relu(self._conv3x3(width, f"dec_{level}_conv2")(x))
    a = nn.Conv(1, (1, 1), dtype=self.dtype,
                kernel_init=layers.lecun_truncated_normal, name="out_conv")(x)
    return a[..., 0]


class ChuUNet(nn.Module):
  """Chu & Liu's U-Net with landmark and (optional) emotion heads.

  Attributes:
    input_size: N; images are N x N and N must be divisible by 2**depth.
    depth: number of poolings (4 as in the classic U-Net).
    base_width: channels at the first level (64 as in the classic U-Net).
    fc_width: width of the hidden dense layer (paper: 1024).
    num_landmarks: K; the landmark layer has 2K sigmoid units.
    num_emotions: emotion classes (Kopaczka: 8); 0 drops the emotion branch.
    landmark_head: whether to build the landmark branch.
    map_reduction: r; A is average-pooled r x r before flattening, so the first
      dense layer sees (N/r)**2 inputs. N must be divisible by r. 1 = none.
    dtype: computation dtype (params stay float32; outputs are float32).

  Call: ``model.apply(variables, images, train=False)`` with images
  ``(B, N, N, C)`` float. Returns a dict with ``'heatmap'`` ``(B, N, N)`` (A,
  logits), ``'landmarks'`` ``(B, K, 2)`` in [0, 1] (x/W, y/H) if
  ``landmark_head`` and ``'emotion_logits'`` ``(B, num_emotions)`` if
  ``num_emotions > 0``. The net has no dropout; ``train`` is accepted for the
  shared train step and ignored. All outputs are always computed (in stage 1
  the head's gradients are simply not applied).
  """
  input_size: int = 128
  depth: int = 4
  base_width: int = 64
  fc_width: int = 1024
  num_landmarks: int = 68
  num_emotions: int = 8
  landmark_head: bool = True
  map_reduction: int = 1
  dtype: layers.Dtype = jnp.float32

  def __post_init__(self):
    if self.depth < 0 or self.input_size % (2**self.depth):
      raise ValueError(
          f"ChuUNet: input_size={self.input_size} must be divisible by "
          f"2**depth={2**self.depth} (depth={self.depth}) so that every "
          "pooling halves exactly and the skips line up")
    if self.map_reduction < 1 or self.input_size % self.map_reduction:
      raise ValueError(
          f"ChuUNet: map_reduction={self.map_reduction} must be a positive "
          f"divisor of input_size={self.input_size}")
    super().__post_init__()

  @property
  def has_head(self) -> bool:
    return self.landmark_head or self.num_emotions > 0

  @nn.compact
  def __call__(self, images: jax.Array, *,
               train: bool = False) -> dict[str, jax.Array]:
    del train  # No dropout or batch statistics in this net.
    layers.check_images(images, self.input_size, "ChuUNet")
    a = UNetBody(self.depth, self.base_width, self.dtype, name="unet")(images)
    out = {"heatmap": a.astype(jnp.float32)}
    if not self.has_head:
      return out
    r = self.map_reduction
    pooled = a[..., None]
    if r > 1:
      pooled = nn.avg_pool(pooled, (r, r), strides=(r, r), padding="VALID")
    features = pooled.reshape(pooled.shape[0], -1)
    out.update(layers.LandmarkEmotionHead(
        fc_width=self.fc_width, num_landmarks=self.num_landmarks,
        landmark_head=self.landmark_head, num_emotions=self.num_emotions,
        dtype=self.dtype, name="head")(features))
    return out
