"""Tests for tml/targets.py against explicit per-pixel NumPy loops."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tml import landmarks as lm
from tml import targets


# ------------------------------------------------------------- references


def _ref_chu(points, height, width):
  """Eq. 1 by three nested loops, float64; skips non-finite points."""
  out = np.zeros((height, width), np.float64)
  for x, y in np.asarray(points, np.float64):
    if not (math.isfinite(x) and math.isfinite(y)):
      continue
    for k in range(height):
      for j in range(width):
        out[k, j] += 0.5 ** max(abs(x - j), abs(y - k))
  return out


def _dist_to_segment(p, a, b):
  """Euclidean distance, float64, via the closest point found by projection."""
  p, a, b = (np.asarray(v, np.float64) for v in (p, a, b))
  ab = b - a
  denom = float(ab @ ab)
  if denom == 0.0:
    return float(np.hypot(*(p - a)))
  t = min(1.0, max(0.0, float((p - a) @ ab) / denom))
  return float(np.hypot(*(p - (a + t * ab))))


def _inside_winding(p, poly):
  """Point in polygon by the winding number (a different rule from even-odd;
  they agree for the simple polygons used here)."""
  wn = 0
  x, y = p
  n = len(poly)
  for e in range(n):
    (x0, y0), (x1, y1) = poly[e], poly[(e + 1) % n]
    cross = (x1 - x0) * (y - y0) - (x - x0) * (y1 - y0)
    if y0 <= y < y1 and cross > 0:
      wn += 1
    elif y1 <= y < y0 and cross < 0:
      wn -= 1
  return wn != 0


def _ref_label_maps(points, height, width, brow_width):
  """Returns (maps, min |distance - w/2| per pixel per map) for tie masking."""
  pts = np.asarray(points, np.float64)
  half = brow_width / 2
  maps = np.zeros((height, width, 3), np.float32)
  margin = np.full((height, width, 3), np.inf)
  chains = [(list(range(17, 22)), False), (list(range(22, 27)), False),
            (list(range(48, 60)), True)]
  for c, (idx, closed) in enumerate(chains):
    segs = list(zip(idx[:-1], idx[1:]))
    if closed:
      segs.append((idx[-1], idx[0]))
    poly = [tuple(pts[i]) for i in idx]
    for i in range(height):
      for j in range(width):
        d = min(_dist_to_segment((j, i), pts[a], pts[b]) for a, b in segs)
        on = d <= half
        if closed and not on:
          on = _inside_winding((j, i), poly)
        maps[i, j, c] = float(on)
        margin[i, j, c] = abs(d - half)
  return maps, margin


# ------------------------------------------------------------ chu_heatmap


def test_chu_heatmap_hand_case_single_point():
  # K = 1 point at (x=1, y=2) on a 4-row, 5-column map.
  b = np.asarray(targets.chu_heatmap(jnp.array([[1.0, 2.0]]), 4, 5))
  assert b.shape == (4, 5) and b.dtype == np.float32
  assert b[2, 1] == 1.0                 # row y = 2, column x = 1
  assert b[2, 2] == 0.5 and b[3, 2] == 0.5 and b[1, 0] == 0.5
  assert b[0, 1] == 0.25 and b[0, 4] == 0.125   # max(3, 2) = 3
  # Sub-pixel: half way between columns -> 0.5 ** 0.5 on both.
  b = np.asarray(targets.chu_heatmap(jnp.array([[1.5, 0.0]]), 1, 4))
  np.testing.assert_allclose(b[0], [2 ** -1.5, 2 ** -0.5, 2 ** -0.5, 2 ** -1.5],
                             rtol=1e-6)


def test_chu_heatmap_is_an_unclipped_sum():
  pts = jnp.array([[2.0, 1.0], [2.0, 1.0], [0.0, 0.0]])
  b = np.asarray(targets.chu_heatmap(pts, 3, 4))
  assert b[1, 2] == pytest.approx(2.0 + 0.25)
  assert b.max() > 1.0


@pytest.mark.parametrize("height,width", [(9, 13), (12, 7)])
def test_chu_heatmap_matches_loop_reference_68_points(height, width):
  rng = np.random.default_rng(height)
  pts = rng.uniform([-3, -3], [width + 3, height + 3], size=(2, 68, 2))
  # On the border, exactly on pixel centres, and far outside.
  pts[0, 0] = (0.0, 0.0)
  pts[0, 1] = (width - 1, height - 1)
  pts[0, 2] = (width - 1, 0.5)
  pts[1, 3] = (-20.0, height + 40.0)
  pts[1, 4] = (3.0, 2.0)
  got = np.asarray(targets.chu_heatmap(jnp.asarray(pts, jnp.float32),
                                       height, width))
  assert got.shape == (2, height, width) and got.dtype == np.float32
  for n in range(2):
    np.testing.assert_allclose(got[n], _ref_chu(pts[n].astype(np.float32),
                                                height, width),
                               rtol=2e-5, atol=1e-6)


def test_chu_heatmap_batch_axes_and_missing_points():
  rng = np.random.default_rng(5)
  pts = rng.uniform(0, 6, size=(2, 3, 68, 2)).astype(np.float32)
  pts[1, 2, 10] = np.nan
  pts[0, 1, 11, 0] = np.inf
  pts[0, 1, 12, 1] = np.nan     # one coordinate missing, the other finite
  pts[0, 1, 13, 0] = np.nan
  got = np.asarray(targets.chu_heatmap(pts, 6, 6))
  assert got.shape == (2, 3, 6, 6)
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got[1, 2], _ref_chu(pts[1, 2], 6, 6), rtol=2e-5)
  np.testing.assert_allclose(got[0, 1], _ref_chu(pts[0, 1], 6, 6), rtol=2e-5)


def test_chu_heatmap_flip_consistency():
  # Flipping the landmarks (pixel-centre convention) flips the map.
  rng = np.random.default_rng(6)
  pts = rng.uniform(0, 10, size=(68, 2)).astype(np.float32)
  b = np.asarray(targets.chu_heatmap(pts, 8, 11))
  bf = np.asarray(targets.chu_heatmap(lm.flip_horizontal(pts, 11), 8, 11))
  np.testing.assert_allclose(bf, b[:, ::-1], rtol=1e-5, atol=1e-6)


_HEATMAP_TEMP_BYTES = """
import jax, jax.numpy as jnp
from tml import targets
x = jnp.zeros((8, 68, 2), jnp.float32)
stats = jax.jit(targets.chu_heatmap, static_argnums=(1, 2)).lower(
    x, 64, 64).compile().memory_analysis()
print(-1 if stats is None else stats.temp_size_in_bytes)
"""


@pytest.mark.parametrize("flags", ["test", "experiments.run"])
def test_chu_heatmap_does_not_materialise_k_h_w(flags):
  # In a fresh process under the XLA flags given: the tests' own, and those
  # experiments.run adds on CPU (under which a broadcast-and-sum form once
  # materialised the product: 9.3 MB here, 298 MB at N=128, batch 64).
  import os
  import subprocess
  import sys
  from experiments import run as run_lib
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if flags == "experiments.run":
    env["XLA_FLAGS"] = " ".join(run_lib.CPU_XLA_FLAGS)
  out = subprocess.run([sys.executable, "-c", _HEATMAP_TEMP_BYTES], env=env,
                       capture_output=True, text=True, check=True)
  temp = int(out.stdout.split()[-1])
  if temp < 0:
    pytest.skip("backend reports no memory analysis")
  naive = 8 * 68 * 64 * 64 * 4
  assert temp < naive / 4


# ------------------------------------------------------ devries_label_maps


def _face_for_maps(rng, height, width):
  pts = np.zeros((68, 2), np.float32)
  pts[:] = rng.uniform([0, 0], [width, height], size=(68, 2))
  # Brows as gentle arcs, mouth as a convex-ish ellipse of 12 points.
  xs = np.linspace(0.15, 0.45, 5) * width + rng.uniform(-0.4, 0.4, 5)
  arc = 2 * np.sin(np.linspace(0, np.pi, 5))
  pts[17:22] = np.stack([xs, 0.25 * height - arc + rng.uniform(-0.4, 0.4, 5)],
                        -1)
  pts[22:27] = np.stack([xs + 0.4 * width, pts[17:22, 1][::-1]], -1)
  ang = np.linspace(np.pi, -np.pi, 12, endpoint=False)
  pts[48:60] = np.stack([0.5 * width + 0.25 * width * np.cos(ang),
                         0.7 * height + 0.1 * height * np.sin(ang)], -1)
  pts[48:60] += rng.uniform(-0.3, 0.3, (12, 2))
  return pts


@pytest.mark.parametrize("height,width,brow_width", [(20, 26, 1.0),
                                                     (24, 17, 2.5)])
def test_label_maps_match_loop_reference(height, width, brow_width):
  rng = np.random.default_rng(int(10 * brow_width))
  pts = np.stack([_face_for_maps(rng, height, width) for _ in range(2)])
  pts[1, 17] = (-2.0, 1.0)           # a brow running off the image
  got = np.asarray(targets.devries_label_maps(pts, height, width,
                                              brow_width=brow_width))
  assert got.shape == (2, height, width, 3) and got.dtype == np.float32
  assert set(np.unique(got)) <= {0.0, 1.0}
  for n in range(2):
    want, margin = _ref_label_maps(pts[n], height, width, brow_width)
    # Pixels whose distance is within float32 rounding of w / 2 may go
    # either way; everything else must agree exactly.
    decided = margin > 1e-4
    assert decided.mean() > 0.99
    np.testing.assert_array_equal(got[n][decided], want[decided])
    assert want[..., 0].sum() > 0 and want[..., 2].sum() > 10


def test_label_maps_hand_brow_and_rectangle_mouth():
  pts = np.full((68, 2), 50.0, np.float32)    # unused points off the map
  pts[17:22] = [(2, 3), (3.5, 3), (5, 3), (6.5, 3), (8, 3)]   # row 3, cols 2-8
  pts[22:27] = [(1, 1)] * 5                                    # a single dot
  # Outer lip as a rectangle x in [2, 7], y in [6, 9], 12 points clockwise.
  pts[48:60] = [(2, 6), (4, 6), (5, 6), (7, 6), (7, 7), (7, 8), (7, 9),
                (5, 9), (4, 9), (2, 9), (2, 8), (2, 7)]
  maps = np.asarray(targets.devries_label_maps(pts, 11, 10))
  want_brow = np.zeros((11, 10))
  want_brow[3, 2:9] = 1
  np.testing.assert_array_equal(maps[..., 0], want_brow)
  want_dot = np.zeros((11, 10))
  want_dot[1, 1] = 1
  np.testing.assert_array_equal(maps[..., 1], want_dot)
  want_mouth = np.zeros((11, 10))
  want_mouth[6:10, 2:8] = 1
  np.testing.assert_array_equal(maps[..., 2], want_mouth)


def test_label_maps_brow_between_rows_lights_both():
  pts = np.full((68, 2), -50.0, np.float32)
  pts[17:22] = [(1, 2.5), (2, 2.5), (3, 2.5), (4, 2.5), (5, 2.5)]
  maps = np.asarray(targets.devries_label_maps(pts, 6, 7, brow_width=1.0))
  want = np.zeros((6, 7))
  want[2:4, 1:6] = 1        # distance exactly 0.5 = w / 2: on (closed rule)
  np.testing.assert_array_equal(maps[..., 0], want)


def test_label_maps_closed_mouth_is_a_thin_line():
  pts = np.full((68, 2), -50.0, np.float32)
  top = np.linspace(3, 9, 7)
  pts[48:55] = np.stack([top, np.full(7, 5.0)], -1)     # 48..54 left->right
  pts[55:60] = np.stack([top[1:6][::-1], np.full(5, 5.0)], -1)
  maps = np.asarray(targets.devries_label_maps(pts, 10, 12))
  want = np.zeros((10, 12))
  want[5, 3:10] = 1
  np.testing.assert_array_equal(maps[..., 2], want)


def test_label_maps_flip_swaps_brow_channels():
  rng = np.random.default_rng(7)
  pts = _face_for_maps(rng, 16, 21)
  maps = np.asarray(targets.devries_label_maps(pts, 16, 21, brow_width=1.5))
  flipped = np.asarray(targets.devries_label_maps(
      lm.flip_horizontal(pts, 21), 16, 21, brow_width=1.5))
  np.testing.assert_array_equal(flipped[..., 0], maps[:, ::-1, 1])
  np.testing.assert_array_equal(flipped[..., 1], maps[:, ::-1, 0])


def test_label_maps_non_finite_landmarks_give_finite_maps_under_jit():
  pts = np.full((3, 68, 2), np.nan, np.float32)
  pts[1] = _face_for_maps(np.random.default_rng(8), 12, 12)
  pts[2] = pts[1]
  pts[2, 50] = (np.inf, -np.inf)
  fn = jax.jit(lambda p, w: targets.devries_label_maps(p, 12, 12, w))
  maps = np.asarray(fn(pts, 1.0))
  assert np.isfinite(maps).all()
  np.testing.assert_array_equal(maps[1], np.asarray(
      targets.devries_label_maps(pts[1], 12, 12)))
