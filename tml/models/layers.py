"""Building blocks shared by the tml networks: initialisers, pooling, heads.

Conventions (every model in ``tml.models``):
  * images are ``(B, H, W, C)`` float NHWC; the computation dtype is a module
    attribute, parameters always stay float32 and outputs are cast back to
    float32 so that losses and metrics never see bf16;
  * convolutions are plain ``nn.Conv`` / ``nn.ConvTranspose`` layers (so a
    benchmark can swap one implementation for another without touching the
    parameter tree);
  * 2x2 max pooling uses 'VALID' windows, i.e. floor division of odd sizes
    (21 -> 10), the behaviour of TF, Theano and ``torch.nn.MaxPool2d``.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

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


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max pooling with stride 2 on ``(B, H, W, C)``; odd sizes floor."""
  return nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


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
