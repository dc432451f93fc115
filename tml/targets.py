"""Dense training targets rasterised from landmarks, on device.

Two kinds of target, one per paper:

* :func:`chu_heatmap` -- Chu & Liu 2019, Eq. 1: a sum over landmarks of
  ``0.5 ** chebyshev_distance`` maps, the target of the U-Net's softmax map.
* :func:`devries_label_maps` -- DeVries et al. 2014, Sec. III-B: three binary
  masks (image-left brow, image-right brow, mouth) for the per-pixel logistic
  head.

Conventions (DESIGN.md): landmarks are ``(..., K, 2)`` float arrays in
**(x, y) pixel order**, x = column, y = row, 0-based, in the frame of the map
being drawn. Pixel ``(row i, col j)`` has its centre at ``(x, y) = (j, i)``;
this is the same convention as ``landmarks.flip_horizontal``
(``x -> W - 1 - x``), so a flipped map equals the map of flipped landmarks.

Both functions are pure ``jnp``, jit-able with ``height``/``width`` static,
batch-polymorphic over any leading ``...`` axes, and return float32.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from tml import landmarks as lm

# Segments of each label map, as (start index, end index) pairs into the 68
# points. Brows are open polylines; the outer lip is closed (59 -> 48).
_IMAGE_LEFT_BROW = lm.RIGHT_BROW   # 17-21: the subject's right, image-left
_IMAGE_RIGHT_BROW = lm.LEFT_BROW   # 22-26
_MOUTH_POLYGON = lm.OUTER_MOUTH    # 48-59

LABEL_MAP_NAMES = ("image_left_brow", "image_right_brow", "mouth")


def _open_segments(indices):
  return tuple(zip(indices[:-1], indices[1:]))


def _closed_segments(indices):
  return tuple(zip(indices, indices[1:] + indices[:1]))


@functools.partial(jax.jit, static_argnames=("height", "width"))
def chu_heatmap(landmarks: jax.Array, height: int, width: int) -> jax.Array:
  """Chu Eq. 1 target map ``B = sum_i B_i``.

  ``B[..., k, j] = sum_i 0.5 ** max(|x_i - j|, |y_i - k|)`` for row ``k`` and
  column ``j``: a Chebyshev-distance pyramid per landmark, peak 1 at the
  landmark's pixel, summed over landmarks and NOT clipped (two landmarks on
  one pixel give 2 there). Sub-pixel landmarks give fractional exponents;
  landmarks outside the image still contribute their tails.

  A landmark with a non-finite coordinate (a missing point, NaN) contributes
  nothing, so one missing point does not turn the whole target into NaN.

  Memory: ``0.5 ** max(a, b) == min(0.5 ** a, 0.5 ** b)``, so the map is built
  from the separable factors ``px (..., K, W)`` and ``py (..., K, H)``: only
  ``exp2`` of ``K * (H + W)`` values is evaluated, and a ``lax.scan`` over the
  K landmarks adds ``min(py_k[..., :, None], px_k[..., None, :])`` into one
  ``(..., H, W)`` accumulator, so the ``(..., K, H, W)`` product (285 MB for
  N=128, batch 64) is never materialised. The scan, not a broadcast-and-sum:
  XLA:CPU fuses the latter into the K-reduction only under its default
  flags; under ``--xla_cpu_experimental_ynn_fusion_type=individual_dot``
  (experiments.run's CPU default) it materialised the product, 298 MB and
  117 ms at N=128, batch 64, against 4 ms for the scan under either flag.

  Args:
    landmarks: ``(..., K, 2)`` (x, y) pixel coordinates in the map's frame
      (K = 68 for the iBUG scheme; any K works).
    height: H, number of rows (static).
    width: W, number of columns (static).

  Returns:
    ``(..., H, W)`` float32 target map.
  """
  landmarks = jnp.asarray(landmarks, jnp.float32)
  xs, ys = landmarks[..., 0], landmarks[..., 1]                 # (..., K)
  finite = jnp.isfinite(xs) & jnp.isfinite(ys)
  # Sanitise first: whether `minimum` propagates a NaN inside a fused
  # reduction differs between backends and vector widths.
  xs = jnp.where(finite, xs, 0.0)
  ys = jnp.where(finite, ys, 0.0)
  cols = jnp.arange(width, dtype=jnp.float32)
  rows = jnp.arange(height, dtype=jnp.float32)
  px = jnp.exp2(-jnp.abs(xs[..., None] - cols))                 # (..., K, W)
  py = jnp.exp2(-jnp.abs(ys[..., None] - rows))                 # (..., K, H)
  # A zero x-factor zeroes the missing point's whole B_i through the min.
  px = jnp.where(finite[..., None], px, 0.0)

  def add_landmark(acc, factors):
    px_k, py_k = factors                                      # (..., W), (..., H)
    return acc + jnp.minimum(py_k[..., :, None], px_k[..., None, :]), None

  # From the inputs (not jnp.zeros), so that inside shard_map the carry is
  # device-varying like the body's output.
  acc = jnp.broadcast_to(jnp.zeros_like(jnp.sum(xs, -1))[..., None, None],
                         landmarks.shape[:-2] + (height, width))
  out, _ = lax.scan(add_landmark, acc,
                    (jnp.moveaxis(px, -2, 0), jnp.moveaxis(py, -2, 0)))
  return out


def _segment_sq_distance(px, py, a, b):
  """Squared distance from points ``(px, py)`` to the segments ``a -> b``.

  Args:
    px, py: ``(H, W)`` pixel-centre coordinates (broadcastable).
    a, b: ``(..., S, 2)`` segment end points.

  Returns:
    ``(..., S, H, W)`` squared distances. A degenerate segment (``a == b``)
    is the point ``a``.
  """
  ax, ay = a[..., 0, None, None], a[..., 1, None, None]
  dx = (b[..., 0] - a[..., 0])[..., None, None]
  dy = (b[..., 1] - a[..., 1])[..., None, None]
  len2 = dx * dx + dy * dy
  # Safe divisor: with len2 == 0 both branches are evaluated under jit.
  t = ((px - ax) * dx + (py - ay) * dy) / jnp.where(len2 > 0, len2, 1.0)
  t = jnp.clip(jnp.where(len2 > 0, t, 0.0), 0.0, 1.0)
  ex = px - (ax + t * dx)
  ey = py - (ay + t * dy)
  return ex * ex + ey * ey


def _near_polyline(points, segments, px, py, half_width):
  """``(..., H, W)`` bool: pixel centre within ``half_width`` of any segment."""
  starts = jnp.stack([points[..., i, :] for i, _ in segments], axis=-2)
  ends = jnp.stack([points[..., j, :] for _, j in segments], axis=-2)
  d2 = _segment_sq_distance(px, py, starts, ends)            # (..., S, H, W)
  return jnp.any(d2 <= half_width * half_width, axis=-3)


def _inside_polygon(points, segments, px, py):
  """Even-odd (crossing-number) rule, ``(..., H, W)`` bool.

  A horizontal ray from the pixel centre towards +x crosses edge ``a -> b``
  when ``(a_y > p_y) != (b_y > p_y)`` (half-open in y, so a vertex on the ray
  is counted once) and the crossing's x is to the right of ``p_x``. Points
  exactly on an edge may go either way; callers OR in a boundary band.
  """
  starts = jnp.stack([points[..., i, :] for i, _ in segments], axis=-2)
  ends = jnp.stack([points[..., j, :] for _, j in segments], axis=-2)
  ax, ay = starts[..., 0, None, None], starts[..., 1, None, None]
  bx, by = ends[..., 0, None, None], ends[..., 1, None, None]
  straddles = (ay > py) != (by > py)
  dy = by - ay
  # dy != 0 wherever straddles holds; the safe divisor keeps the other
  # (discarded) branch finite.
  x_cross = ax + (py - ay) * (bx - ax) / jnp.where(straddles, dy, 1.0)
  crossings = jnp.sum(straddles & (px < x_cross), axis=-3)
  return (crossings % 2) == 1


@functools.partial(jax.jit, static_argnames=("height", "width"))
def devries_label_maps(landmarks: jax.Array, height: int, width: int,
                       brow_width: float = 1.0) -> jax.Array:
  """DeVries label maps: image-left brow, image-right brow, filled mouth.

  Rasterisation rule (pixel ``(row i, col j)`` is sampled at its centre
  ``(x, y) = (j, i)``):

  * channel 0, image-left brow = points 17-21 (the subject's right brow);
    channel 1, image-right brow = points 22-26. A pixel is 1 iff the
    Euclidean distance from its centre to the polyline through the five
    points (four segments, not closed) is ``<= brow_width / 2`` (closed
    inequality: a brow exactly between two rows lights both when
    ``brow_width = 1``).
  * channel 2, mouth = outer lip polygon 48-59 (closed, 59 -> 48). A pixel
    is 1 iff its centre is inside the polygon by the even-odd rule OR within
    ``brow_width / 2`` of the polygon's boundary. The boundary band makes a
    closed mouth (a degenerate, zero-area polygon) a thin line rather than
    nothing, and makes pixels exactly on an edge count as inside.

  Which brow is "left" follows the image, not the subject, so that the map
  channels do not depend on iBUG's subject-side naming. A horizontal flip of
  the image therefore swaps channels 0 and 1 (and ``flip_horizontal`` swaps
  the point groups), keeping maps and landmarks consistent.

  Non-finite landmark coordinates are replaced by 0 before rasterising, so an
  example without landmarks gives a finite (meaningless) map; mask it with
  ``v_n = 0`` in the loss.

  Args:
    landmarks: ``(..., 68, 2)`` (x, y) pixel coordinates in the map's frame.
    height: H, rows (static).
    width: W, columns (static).
    brow_width: line width in pixels (may be traced).

  Returns:
    ``(..., H, W, 3)`` float32 in {0, 1}.
  """
  landmarks = jnp.asarray(landmarks, jnp.float32)
  landmarks = jnp.where(jnp.isfinite(landmarks), landmarks, 0.0)
  half = jnp.asarray(brow_width, jnp.float32) / 2
  py, px = jnp.meshgrid(jnp.arange(height, dtype=jnp.float32),
                        jnp.arange(width, dtype=jnp.float32), indexing="ij")
  left = _near_polyline(landmarks, _open_segments(_IMAGE_LEFT_BROW), px, py,
                        half)
  right = _near_polyline(landmarks, _open_segments(_IMAGE_RIGHT_BROW), px, py,
                         half)
  mouth_edges = _closed_segments(_MOUTH_POLYGON)
  mouth = (_inside_polygon(landmarks, mouth_edges, px, py)
           | _near_polyline(landmarks, mouth_edges, px, py, half))
  return jnp.stack([left, right, mouth], axis=-1).astype(jnp.float32)
