"""The named loss terms of both papers, per example, from logits.

Every loss returns PER-EXAMPLE values ``(B,)`` float32; the train step reduces
them over the batch with :func:`weighted_mean` and the padding weights (1 for
a real example, 0 for a padding row of the last global batch), so a padded
batch gives exactly the loss of its real examples.

All losses take pre-activation outputs (logits) and use ``log_softmax`` /
log-sigmoid forms, so no ``exp`` of a large logit is ever taken and no
``log`` of a rounded-to-zero probability is ever taken.

The functions are wrapped in ``jax.jit`` so eager calls (evaluation, tests)
compile once; inside a jitted train step the wrapper is inlined.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


@jax.jit
def unet_loss(map_logits: jax.Array, target: jax.Array) -> jax.Array:
  """Chu Eq. 2, ``L_u = -sum_{k,j} B[k, j] * log softmax(A)[k, j]``.

  The softmax runs over all ``H * W`` positions of the single map channel of
  each image (one distribution per image), not per row or per pixel.

  Args:
    map_logits: ``(B, H, W)`` the U-Net's map A (pre-softmax).
    target: ``(B, H, W)`` the Eq. 1 map B (``targets.chu_heatmap``),
      unnormalised: its total mass (about K = 68 times the mass of one
      pyramid) scales the loss, as in the paper.

  Returns:
    ``(B,)`` float32.
  """
  logits = jnp.asarray(map_logits, jnp.float32)
  target = jnp.asarray(target, jnp.float32)
  b = logits.shape[0]
  log_p = jax.nn.log_softmax(logits.reshape(b, -1), axis=-1)
  return -jnp.sum(target.reshape(b, -1) * log_p, axis=-1)


@jax.jit
def landmark_mse(pred: jax.Array, target: jax.Array) -> jax.Array:
  """Chu Eq. 3, ``(1/K) sum_i ((x_i - x^_i)^2 + (y_i - y^_i)^2)``.

  Mean over landmarks, SUM over the two coordinates (so it is twice the mean
  over all 2K numbers).

  Args:
    pred: ``(B, K, 2)`` predicted (x / W, y / H), normalised by the caller.
    target: ``(B, K, 2)`` ground truth in the same normalisation.

  Returns:
    ``(B,)`` float32.
  """
  diff = jnp.asarray(pred, jnp.float32) - jnp.asarray(target, jnp.float32)
  return jnp.mean(jnp.sum(diff * diff, axis=-1), axis=-1)


@jax.jit
def emotion_mse(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Chu's emotion loss: MSE between ``softmax(logits)`` and the one-hot label.

  ``mean_c (softmax(logits)_c - onehot(label)_c) ** 2`` -- the MEAN over the
  C classes (the paper says "mean square error" without a normaliser; the
  mean keeps the value in [0, 2 / C] whatever C is).

  Args:
    logits: ``(B, C)`` pre-softmax class scores.
    labels: ``(B,)`` int class ids in ``[0, C)``. An id outside that range
      one-hot encodes to all zeros (``jax.nn.one_hot``); mask such examples
      with the weights of :func:`weighted_mean`.

  Returns:
    ``(B,)`` float32.
  """
  logits = jnp.asarray(logits, jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  return jnp.mean((probs - onehot) ** 2, axis=-1)


@jax.jit
def emotion_xent(logits: jax.Array, labels: jax.Array) -> jax.Array:
  """Softmax cross-entropy ``-log softmax(logits)[label]`` (DeVries Eq. 1).

  Args:
    logits: ``(B, C)`` pre-softmax class scores.
    labels: ``(B,)`` int class ids in ``[0, C)``; an id outside the range
      gives 0 (all-zero one-hot): mask such examples with weights.

  Returns:
    ``(B,)`` float32.
  """
  logits = jnp.asarray(logits, jnp.float32)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32)
  return -jnp.sum(onehot * log_p, axis=-1)


@jax.jit
def pixel_bce(logits: jax.Array, targets: jax.Array,
              valid: jax.Array) -> jax.Array:
  """DeVries Eq. 2 landmark-map term for each example, times ``v_n``.

  Per pixel and map, ``-(t log sigmoid(z) + (1 - t) log(1 - sigmoid(z)))``
  computed as ``max(z, 0) - z t + log1p(exp(-|z|))``, which never overflows.
  It is averaged over the ``H * W * M`` units (the paper's ``1/K`` with
  K = number of maps x image size) and multiplied by ``v_n``.

  Batch reduction: Eq. 2 is ``(1/|D|) sum_n [...] * v_n`` -- it divides by
  the number of examples N, NOT by ``sum_n v_n``; the paper argues that with
  landmark-less images spread uniformly the per-batch cost stays comparable.
  So reduce this function's output with ``weighted_mean(values,
  padding_weights)``, which divides by the number of real examples.

  An example with ``valid == 0`` contributes exactly 0 with a zero gradient,
  even when its targets are NaN (no landmarks, so no map): its targets are
  replaced before the arithmetic, because ``where`` alone would still let
  ``0 * NaN`` into the backward pass.

  Args:
    logits: ``(B, H, W, M)`` pre-sigmoid output maps.
    targets: ``(B, H, W, M)`` label maps in [0, 1]
      (``targets.devries_label_maps``).
    valid: ``(B,)`` ``v_n``, 1 where the example has landmarks, else 0.

  Returns:
    ``(B,)`` float32.
  """
  logits = jnp.asarray(logits, jnp.float32)
  targets = jnp.asarray(targets, jnp.float32)
  valid = jnp.asarray(valid, jnp.float32)
  keep = valid > 0
  keep_px = keep.reshape((-1,) + (1,) * (targets.ndim - 1))
  targets = jnp.where(keep_px, targets, 0.0)
  per_unit = (jnp.maximum(logits, 0.0) - logits * targets
              + jnp.log1p(jnp.exp(-jnp.abs(logits))))
  per_example = jnp.mean(per_unit.reshape(per_unit.shape[0], -1), axis=-1)
  return jnp.where(keep, per_example * valid, 0.0)


@jax.jit
def weighted_mean(values: jax.Array, weights: jax.Array) -> jax.Array:
  """``sum(w * v) / sum(w)``, and exactly 0 (not NaN) when ``sum(w) == 0``.

  Rows with ``w == 0`` are dropped with ``where``, so a NaN in a padding row
  does not reach the result. (A NaN produced *upstream* of ``values`` in a
  padding row can still reach gradients through ``0 * NaN``; keep padding
  rows finite, e.g. zeros.)

  Args:
    values: ``(B,)`` per-example values.
    weights: ``(B,)`` non-negative weights (padding mask, or masks).

  Returns:
    ``()`` float32.
  """
  values = jnp.asarray(values, jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  total = jnp.sum(weights)
  num = jnp.sum(jnp.where(weights != 0, weights * values, 0.0))
  return jnp.where(total > 0, num / jnp.where(total > 0, total, 1.0), 0.0)
