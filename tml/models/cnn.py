"""Chu & Liu's "basic CNN" baseline for landmark regression.

The paper: six 3x3 conv + ReLU, 2x2 max pooling after conv 1, 3, 4 and 6, then
FC 1024 and FC 136, trained with the coordinate MSE. It gives no widths; we
use (32, 32, 64, 64, 128, 128), doubling at each second pooling like a small
VGG, which keeps the baseline cheap next to the U-Net while the first dense
layer (8*8*128 = 8192 inputs at N=128) stays comparable in size to the
U-Net's head. Convs are stride 1 'SAME'; initialisation is the same truncated
normal as the U-Net (the paper trains the baseline "as the first stage").

Parameter tree: ``{'features': {conv_0 .. conv_5}, 'head': {fc_hidden,
fc_landmarks[, fc_emotion]}}``.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from tml.models import layers

DEFAULT_WIDTHS = (32, 32, 64, 64, 128, 128)
# 0-based indices of the convs followed by a 2x2 max pool (paper: 1, 3, 4, 6).
POOL_AFTER = (0, 2, 3, 5)


class BasicCNNFeatures(nn.Module):
  """The six-conv trunk: ``(B, N, N, C)`` -> ``(B, N/16, N/16, widths[-1])``."""
  widths: Sequence[int] = DEFAULT_WIDTHS
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = images.astype(self.dtype)
    for i, width in enumerate(self.widths):
      x = nn.Conv(width, (3, 3), padding="SAME", dtype=self.dtype,
                  kernel_init=layers.he_truncated_normal,
                  conv_general_dilated=layers.conv_general_dilated,
                  name=f"conv_{i}")(x)
      x = nn.relu(x)
      if i in POOL_AFTER:
        x = layers.max_pool_2x2(x)
    return x


class BasicCNN(nn.Module):
  """Chu & Liu's basic-CNN baseline.

  Attributes:
    input_size: N; images are N x N, N divisible by 16 (four poolings).
    fc_width: hidden dense width (paper: 1024).
    num_landmarks: K; the landmark layer has 2K sigmoid units.
    num_emotions: 0 (the paper's baseline) or a number of emotion classes for
      an extra emotion branch.
    widths: the six conv widths (not given by the paper; see module doc).
    dtype: computation dtype (params and outputs float32).

  Call: ``model.apply(variables, images, train=False)``, images
  ``(B, N, N, C)``. Returns ``{'landmarks': (B, K, 2)}`` in [0, 1] (x/W, y/H),
  plus ``'emotion_logits'`` ``(B, num_emotions)`` if ``num_emotions > 0``.
  ``train`` is ignored (no dropout).
  """
  input_size: int = 128
  fc_width: int = 1024
  num_landmarks: int = 68
  num_emotions: int = 0
  widths: Sequence[int] = DEFAULT_WIDTHS
  dtype: layers.Dtype = jnp.float32

  def __post_init__(self):
    if len(self.widths) != 6:
      raise ValueError(f"BasicCNN has six convs; got widths={self.widths}")
    if self.input_size % 16:
      raise ValueError(
          f"BasicCNN: input_size={self.input_size} must be divisible by 16 "
          "(four 2x2 poolings)")
    super().__post_init__()

  @nn.compact
  def __call__(self, images: jax.Array, *,
               train: bool = False) -> dict[str, jax.Array]:
    del train  # No dropout or batch statistics in this net.
    layers.check_images(images, self.input_size, "BasicCNN")
    x = BasicCNNFeatures(tuple(self.widths), self.dtype,
                         name="features")(images)
    # Row-major (h, w, c) flatten; the torch twin flattens in the same order.
    features = x.reshape(x.shape[0], -1)
    return layers.LandmarkEmotionHead(
        fc_width=self.fc_width, num_landmarks=self.num_landmarks,
        landmark_head=True, num_emotions=self.num_emotions, dtype=self.dtype,
        name="head")(features)
