"""DeVries / Tang (2013) intensity normalisation.

DeVries et al. 2014, Sec. III: "First we subtracted each image's mean value
and then set the image norm to be 150. The pixels were then standardized by
subtracting the mean and dividing by the standard deviation of that pixel,
across the entire dataset. Each minibatch was also normalized by subtracting
from each image the batch mean and then dividing by the batch's standard
deviation."

Three stages, in this order:

1. `per_image_normalise` -- host or device, once per image (48x48, before
   augmentation).
2. `fit_pixel_stats` on the TRAINING images after stage 1, then
   `apply_pixel_stats` to every split with those training statistics.
   Stages 1-2 are deterministic per image, so the input pipeline can apply
   them once to the stored arrays.
3. `batch_standardise` -- on device, per step, after augmentation.

The functions accept numpy or jax arrays and return the same kind (numpy on
the host keeps jax out of the data loader; jnp inside a jitted step).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

# Floor of the centred L2 norm; only matters for near-constant images (exactly
# constant ones are caught by an equality test and map to zeros).
_NORM_EPS = 1e-6


def _xp(x):
  """numpy for numpy inputs, jax.numpy otherwise (e.g. tracers)."""
  if isinstance(x, np.ndarray):
    return np
  import jax.numpy as jnp  # local: host-only callers need not import jax
  return jnp


def per_image_normalise(images, norm: float = 150.0, eps: float = _NORM_EPS):
  """Subtracts each image's mean and scales its pixel vector to L2 norm ``norm``.

  Args:
    images: ``(B, H, W, C)`` float; the mean and norm are taken over all
      H*W*C values of each image.
    norm: target L2 norm (Tang / DeVries: 150).
    eps: floor of the centred norm in ``norm / max(||x - mean||, eps)``. A
      constant image (max == min, tested exactly) becomes all zeros instead
      of NaN or amplified rounding noise.

  Returns:
    ``(B, H, W, C)`` float32 with zero mean and L2 norm ``norm`` per image
    (0 for constant images).
  """
  xp = _xp(images)
  x = images.astype(xp.float32)
  axes = tuple(range(1, x.ndim))
  # Exact constancy test first: the float32 mean of a constant image need not
  # equal the constant, and the residue (~1e-8 per pixel) would otherwise be
  # blown up to norm 150.
  constant = x.max(axis=axes, keepdims=True) == x.min(axis=axes, keepdims=True)
  x = x - x.mean(axis=axes, keepdims=True)
  length = xp.sqrt((x * x).sum(axis=axes, keepdims=True))
  scale = xp.where(constant, 0.0, norm / xp.maximum(length, eps))
  return (x * scale).astype(xp.float32)


class PixelStats(NamedTuple):
  """Per-pixel training-set statistics (after `per_image_normalise`).

  Attributes:
    mean: ``(H, W, C)`` float32.
    std: ``(H, W, C)`` float32, already floored at ``min_std``.
  """
  mean: np.ndarray
  std: np.ndarray


def fit_pixel_stats(images, *, min_std: float = 1e-6,
                    chunk_size: int = 4096) -> PixelStats:
  """Per-pixel mean and standard deviation over a training set.

  Args:
    images: ``(N, H, W, C)`` training images, ALREADY per-image normalised.
    min_std: floor for the std so a pixel constant over the set (a
      synthetic background) standardises to 0 instead of NaN.
    chunk_size: images per chunk; two passes in float64 (mean, then mean
      squared deviation) keep memory at one chunk and avoid the cancellation
      of the one-pass E[x^2] - E[x]^2.

  Returns:
    PixelStats of numpy float32 ``(H, W, C)`` arrays (population std, ddof 0).
  """
  images = np.asarray(images)
  n = images.shape[0]
  if n == 0:
    raise ValueError("fit_pixel_stats needs at least one image")
  total = np.zeros(images.shape[1:], np.float64)
  for start in range(0, n, chunk_size):
    total += images[start:start + chunk_size].sum(axis=0, dtype=np.float64)
  mean = total / n
  sq = np.zeros_like(mean)
  for start in range(0, n, chunk_size):
    d = images[start:start + chunk_size].astype(np.float64) - mean
    sq += (d * d).sum(axis=0)
  std = np.maximum(np.sqrt(sq / n), min_std)
  return PixelStats(mean.astype(np.float32), std.astype(np.float32))


def apply_pixel_stats(images, stats: PixelStats):
  """``(images - mean) / std`` per pixel; ``(B, H, W, C)`` -> float32."""
  xp = _xp(images)
  mean = xp.asarray(stats.mean, dtype=xp.float32)
  std = xp.asarray(stats.std, dtype=xp.float32)
  return (images.astype(xp.float32) - mean) / std


def batch_standardise(images, *, weights=None, axis_name=None,
                      eps: float = 1e-6):
  """Subtracts the batch mean and divides by the batch std (global scalars).

  We read DeVries' "subtracting from each image the batch mean and then
  dividing by the batch's standard deviation" as ONE scalar mean and ONE
  scalar std over every pixel of every image in the batch: the per-pixel
  part was already done with the training-set statistics, and a per-pixel
  batch std over 128 images would be a noisy repeat of it.

  Args:
    images: ``(B, H, W, C)`` (jnp inside a step, or numpy).
    weights: optional ``(B,)`` example weights; padding examples (weight 0,
      see `tml.input_pipeline`) then do not move the statistics.
    axis_name: inside ``shard_map``/``pmap``, the data-parallel axis name:
      the statistics are then those of the GLOBAL batch (psum of per-device
      sums and counts), so the result is the same on 1 or N devices. None =
      this array's batch only.
    eps: std floor (a constant batch maps to 0, not NaN).

  Returns:
    ``(B, H, W, C)`` float32.
  """
  xp = _xp(images)
  x = images.astype(xp.float32)
  per_example = x[0].size
  if weights is None:
    weights = xp.ones(x.shape[:1], xp.float32)
  w = xp.asarray(weights, dtype=xp.float32).reshape(
      (-1,) + (1,) * (x.ndim - 1))
  count = w.sum() * per_example
  total = (w * x).sum()
  if axis_name is not None:
    from jax import lax  # local: numpy callers never pass an axis name
    count, total = lax.psum((count, total), axis_name)
  mean = total / xp.maximum(count, 1.0)
  d = x - mean
  sq = (w * d * d).sum()
  if axis_name is not None:
    sq = lax.psum(sq, axis_name)
  std = xp.sqrt(sq / xp.maximum(count, 1.0))
  return d / xp.maximum(std, eps)
