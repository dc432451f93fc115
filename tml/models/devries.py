"""DeVries, Biswaranjan & Taylor 2014: expression convnet + landmark-map head.

The paper (Sec. IV): conv 32@5x5, conv 64@4x4, conv 64@5x5, each ReLU and 2x2
max pooling, so a 42x42 crop gives 32@21x21, 64@10x10, 64@5x5 (the 21 -> 10
step is floor pooling); flattened (1600) into a ReLU hidden layer of 3072
units (with dropout, after Tang 2013), then two parallel output layers: a
softmax over the expressions and 42*42*3 logistic units, three per-pixel maps
(left brow, right brow, mouth).

Choices the paper leaves open (documented so the torch twin matches):
  * convs are stride 1 with 'SAME' padding (the only reading that gives
    42 -> 21 -> 10 -> 5); for the even 4x4 kernel XLA pads 1 before and 2
    after, which the torch twin reproduces explicitly;
  * dropout (rate ``dropout_rate``) on the hidden layer only;
  * initialisation (not given): fan-in scaled truncated normal, He scaling for
    the layers feeding a ReLU and LeCun scaling for the two output layers,
    zero biases (the map logits therefore start at probability 0.5);
  * the net is applied to ``map_size`` x ``map_size`` crops only (the training
    crops and the 10 test-time crops); the map head's size is tied to it.

Parameter tree: ``{'features': {conv_0, conv_1, conv_2}, 'head': {fc_hidden,
fc_emotion[, fc_maps]}}``.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from tml.models import layers

CONV_SPECS = ((32, 5), (64, 4), (64, 5))  # (features, kernel size)
NUM_MAPS = 3  # image-left brow, image-right brow, mouth (tml.targets order)


class DeVriesFeatures(nn.Module):
  """Three conv + ReLU + 2x2 max pool stages.

  ``(B, 42, 42, C) -> (B, 5, 5, 64)`` at the paper's crop size.
  """
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = images.astype(self.dtype)
    for i, (features, k) in enumerate(CONV_SPECS):
      x = nn.Conv(features, (k, k), padding="SAME", dtype=self.dtype,
                  kernel_init=layers.he_truncated_normal,
                  conv_general_dilated=layers.conv_general_dilated,
                  name=f"conv_{i}")(x)
      x = layers.max_pool_2x2(nn.relu(x))
    return x


class DeVriesHead(nn.Module):
  """FC hidden ReLU + dropout, then the expression and map output layers."""
  num_classes: int = 7
  map_head: bool = True
  map_size: int = 42
  fc_width: int = 3072
  dropout_rate: float = 0.5
  dtype: layers.Dtype = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array, *,
               train: bool) -> dict[str, jax.Array]:
    h = nn.Dense(self.fc_width, dtype=self.dtype,
                 kernel_init=layers.he_truncated_normal,
                 name="fc_hidden")(features)
    h = nn.relu(h)
    # Draws from the 'dropout' rng only when train=True and the rate is > 0.
    h = nn.Dropout(self.dropout_rate, deterministic=not train,
                   rng_collection="dropout")(h)
    out = {}
    if self.num_classes > 0:
      e = nn.Dense(self.num_classes, dtype=self.dtype,
                   kernel_init=layers.lecun_truncated_normal,
                   name="fc_emotion")(h)
      out["emotion_logits"] = e.astype(jnp.float32)
    if self.map_head:
      m = nn.Dense(self.map_size * self.map_size * NUM_MAPS, dtype=self.dtype,
                   kernel_init=layers.lecun_truncated_normal,
                   name="fc_maps")(h)
      # Unit index (i * map_size + j) * 3 + c is pixel (row i, col j), map c.
      out["maps"] = m.astype(jnp.float32).reshape(
          m.shape[0], self.map_size, self.map_size, NUM_MAPS)
    return out


class DeVriesNet(nn.Module):
  """DeVries et al.'s multi-task expression net.

  Attributes:
    num_classes: expression classes (FER2013, TFD: 7); 0 drops the branch.
    map_head: whether to build the landmark-map branch (False = the paper's
      baseline convnet).
    map_size: side of the input crops and of the output maps (paper: 42).
    fc_width: hidden dense width (paper: 3072).
    dropout_rate: dropout on the hidden layer, active only with train=True.
    dtype: computation dtype (params and outputs float32).

  Call: ``model.apply(variables, images, train=False, rngs=...)`` with images
  ``(B, map_size, map_size, C)`` float; with ``train=True`` and a positive
  ``dropout_rate`` pass ``rngs={'dropout': key}``. Returns
  ``'emotion_logits'`` ``(B, num_classes)`` and, if ``map_head``, ``'maps'``
  ``(B, map_size, map_size, 3)`` per-pixel logits, channels in the order of
  ``tml.targets.LABEL_MAP_NAMES`` (image-left brow, image-right brow, mouth).
  """
  num_classes: int = 7
  map_head: bool = True
  map_size: int = 42
  fc_width: int = 3072
  dropout_rate: float = 0.5
  dtype: layers.Dtype = jnp.float32

  def __post_init__(self):
    if not 0.0 <= self.dropout_rate < 1.0:
      raise ValueError(
          f"dropout_rate must be in [0, 1); got {self.dropout_rate}")
    if self.num_classes <= 0 and not self.map_head:
      raise ValueError("DeVriesNet needs num_classes > 0 or map_head=True")
    if self.map_size < 8:
      raise ValueError(
          f"DeVriesNet: map_size={self.map_size} is too small for three 2x2 "
          "poolings")
    super().__post_init__()

  @nn.compact
  def __call__(self, images: jax.Array, *,
               train: bool = False) -> dict[str, jax.Array]:
    layers.check_images(images, self.map_size, "DeVriesNet")
    x = DeVriesFeatures(self.dtype, name="features")(images)
    # Row-major (h, w, c) flatten; the torch twin flattens in the same order.
    x = x.reshape(x.shape[0], -1)
    return DeVriesHead(
        num_classes=self.num_classes, map_head=self.map_head,
        map_size=self.map_size, fc_width=self.fc_width,
        dropout_rate=self.dropout_rate, dtype=self.dtype,
        name="head")(x, train=train)
