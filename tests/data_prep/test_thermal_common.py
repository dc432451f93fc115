"""Tests for data_prep.thermal_common: grey levels, crop geometry, schema."""
from __future__ import annotations

import numpy as np
import pytest

from data_prep import thermal_common as tc
from tml import landmarks as lm_lib


def test_emotion_names_follow_kopaczka_order():
  assert tc.THERMAL_EMOTIONS == ("angry", "contempt", "disgust", "fear",
                                 "happy", "sad", "surprise", "neutral")


# ----------------------------------------------------------------------------
# Grey levels.
# ----------------------------------------------------------------------------

def test_to_unit_grey_8_and_16_bit():
  a8 = np.array([[0, 128, 255]], dtype=np.uint8)
  np.testing.assert_allclose(tc.to_unit_grey(a8), [[0, 128 / 255, 1]])
  a16 = np.array([[0, 1000, 65535]], dtype=np.uint16)
  np.testing.assert_allclose(tc.to_unit_grey(a16[..., None]),
                             [[0, 1000 / 65535, 1]], rtol=1e-6)


def test_to_unit_grey_temperature_window_and_clip():
  t = np.array([[15.0, 20.0, 30.0, 40.0, 45.0]])
  np.testing.assert_allclose(tc.to_unit_grey(t), [[0, 0, 0.5, 1, 1]])
  np.testing.assert_allclose(tc.to_unit_grey(t, 10.0, 50.0),
                             [[0.125, 0.25, 0.5, 0.75, 0.875]])


@pytest.mark.parametrize("bad, what", [
    (np.zeros((4, 4), np.int32), "int32"),
    (np.zeros((4, 4, 3), np.uint8), "shape"),
    (np.array([[30.0, np.nan]]), "non-finite"),
])
def test_to_unit_grey_errors_name_source_and_field(bad, what):
  with pytest.raises(tc.ThermalFormatError,
                     match=rf"frame\.npy: field 'image': expected .*{what}"):
    tc.to_unit_grey(bad, source="frame.npy")


def test_uint16_storage_round_trip():
  g = np.array([-0.1, 0.0, 0.25, 0.5, 1.0, 1.2])
  stored = tc.unit_to_uint16(g)
  assert stored.dtype == np.uint16
  np.testing.assert_array_equal(stored, [0, 0, 16384, 32768, 65535, 65535])
  np.testing.assert_allclose(tc.uint16_to_unit(stored), np.clip(g, 0, 1),
                             atol=1 / 65535)


# ----------------------------------------------------------------------------
# Crop geometry.
# ----------------------------------------------------------------------------

def _face_points(rng, centre=(300.0, 250.0), size=200.0):
  return np.asarray(centre) + rng.uniform(-size / 2, size / 2, (68, 2))


def test_crop_box_is_square_and_centred_on_extent_in_edge_coordinates():
  rng = np.random.default_rng(0)
  pts = _face_points(rng)
  pts[:, 1] *= 0.7  # wider than tall
  x0, y0, x1, y1 = tc.crop_box(pts, 0.25)
  ex0, ey0, ex1, ey1 = lm_lib.landmark_extent(pts)
  assert x1 - x0 == pytest.approx(y1 - y0)
  assert x1 - x0 == pytest.approx(1.5 * max(ex1 - ex0, ey1 - ey0))
  # Edge coordinates: pixel-centre extent centre + 0.5.
  assert (x0 + x1) / 2 == pytest.approx((ex0 + ex1) / 2 + 0.5)
  assert (y0 + y1) / 2 == pytest.approx((ey0 + ey1) / 2 + 0.5)


def test_crop_mapping_matches_documented_formula_and_round_trips():
  box, s = (100.25, 40.5, 420.25, 360.5), 128
  pts = np.array([[0.0, 0.0], [127.0, 127.0], [63.5, 10.25]])
  scale = (box[2] - box[0]) / s
  expected = np.stack([box[0] + (pts[:, 0] + 0.5) * scale - 0.5,
                       box[1] + (pts[:, 1] + 0.5) * scale - 0.5], axis=1)
  np.testing.assert_allclose(tc.crop_to_frame(pts, box, s), expected)
  np.testing.assert_allclose(tc.frame_to_crop(expected, box, s), pts,
                             atol=1e-9)
  rng = np.random.default_rng(1)
  frame_pts = rng.uniform(-50, 500, (68, 2))
  back = tc.crop_to_frame(tc.frame_to_crop(frame_pts, box, s), box, s)
  np.testing.assert_allclose(back, frame_pts, atol=1e-9)


def test_crop_of_a_linear_ramp_samples_it_at_the_mapped_centres():
  # Bilinear (triangle) resampling reproduces a linear function exactly,
  # so each crop pixel must hold the ramp's value at crop_to_frame(pixel).
  h, w, s = 300, 400, 32
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
  frame = (0.01 * xs + 0.02 * ys + 1.0).astype(np.float32)
  box = (101.3, 55.7, 261.3, 215.7)
  crop = tc.crop_and_resize(frame, box, s)
  u, v = np.meshgrid(np.arange(s), np.arange(s))
  centres = tc.crop_to_frame(np.stack([u, v], -1).reshape(-1, 2), box, s)
  expected = 0.01 * centres[:, 0] + 0.02 * centres[:, 1] + 1.0
  np.testing.assert_allclose(crop.ravel(), expected, atol=2e-4)


def test_crop_puts_a_hot_spot_where_the_mapped_landmark_is():
  h, w, s = 240, 320, 48
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
  spot = np.array([181.3, 97.8])
  frame = np.exp(-((xs - spot[0]) ** 2 + (ys - spot[1]) ** 2) / (2 * 6.0 ** 2))
  box = (120.0, 40.0, 240.0, 160.0)
  crop = tc.crop_and_resize(frame.astype(np.float32), box, s).astype(np.float64)
  v, u = np.mgrid[0:s, 0:s]
  centroid = np.array([(crop * u).sum(), (crop * v).sum()]) / crop.sum()
  np.testing.assert_allclose(centroid, tc.frame_to_crop(spot, box, s),
                             atol=0.05)


def test_crop_outside_the_frame_replicates_the_border():
  frame = np.tile(np.linspace(0.2, 0.8, 50, dtype=np.float32), (40, 1))
  frame[:, :] += np.linspace(0, 0.1, 40, dtype=np.float32)[:, None]
  # Box hanging off the top-left corner by 30 pixels.
  crop = tc.crop_and_resize(frame, (-30.0, -30.0, 30.0, 30.0), 30)
  # Crop pixels 0-13 map to x_orig < 0: the frame's column 0 value; crop
  # column 20 maps to x_orig = 10.5 (rows still above the frame: row 0).
  np.testing.assert_allclose(crop[:10, :10], frame[0, 0], atol=1e-6)
  np.testing.assert_allclose(crop[:10, 20], frame[0, 10:12].mean(), atol=1e-5)
  # Entirely outside: the nearest corner pixel.
  far = tc.crop_and_resize(frame, (100.0, 100.0, 120.0, 120.0), 8)
  np.testing.assert_allclose(far, frame[-1, -1], atol=1e-6)


def test_make_example_matches_schema_and_encodes():
  rng = np.random.default_rng(2)
  pts = _face_points(rng, (160.0, 120.0), 120.0)
  grey = rng.uniform(0, 1, (240, 320)).astype(np.float32)
  ex = tc.make_example(grey, pts, crop_size=32, margin=0.25, emotion="fear",
                       subject=7, sequence=2, frame=155, pose=3, glasses=True,
                       file_name="irface_sub007_seq02_frm00155.jpg_lfb.png")
  assert ex["image"].shape == (32, 32, 1) and ex["image"].dtype == np.uint16
  assert ex["landmarks"].dtype == np.float32
  assert ex["emotion"] == tc.THERMAL_EMOTIONS.index("fear")
  assert ex["frontal"] is False and ex["glasses"] is True
  np.testing.assert_allclose(
      tc.crop_to_frame(ex["landmarks"], ex["crop_box"], 32), pts, atol=1e-3)
  features = tc.features_dict(32)
  assert set(features.keys()) == set(ex)
  features.encode_example(ex)  # raises on any shape / dtype mismatch
  assert tc.make_example(grey, pts, crop_size=32, margin=0.25, emotion=7,
                         subject=1, sequence=1, frame=1, pose=0,
                         glasses=False, file_name="x")["frontal"] is True


def test_kopaczka_file_name_style():
  assert (tc.kopaczka_file_name(4, 6, 497, "png")
          == "irface_sub004_seq06_frm00497.png_lfb")


# ----------------------------------------------------------------------------
# Crop modes.
# ----------------------------------------------------------------------------

def _warm_head(h=240, w=320):
  """A smooth warm head and narrower neck on an ambient background."""
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
  head = ((xs - 160) / 45) ** 2 + ((ys - 100) / 58) ** 2 < 1
  neck = (np.abs(xs - 160) < 25) & (ys > 140)
  return np.where(head | neck, 34.0, 22.0).astype(np.float32)


def test_choose_box_by_crop_mode():
  rng = np.random.default_rng(3)
  frame = _warm_head()
  pts = _face_points(rng, (160.0, 110.0), 70.0)
  np.testing.assert_allclose(tc.choose_box(frame, pts, "landmarks", 0.25),
                             tc.crop_box(pts, 0.25))
  box = tc.choose_box(frame, pts, "facebox")
  # From the image only: other landmarks, the same box.
  assert box == tc.choose_box(frame, pts + 40.0, "facebox")
  x0, y0, x1, y1 = box
  assert x1 - x0 == pytest.approx(y1 - y0)
  assert x0 < 115 and x1 > 205 and y0 < 60  # holds the head's width and top
  with pytest.raises(tc.ThermalFormatError, match="field 'crop_mode'"):
    tc.choose_box(frame, pts, "ground_truth")
  with pytest.raises(tc.ThermalFormatError, match="face_box|warm") as err:
    tc.choose_box(np.full((240, 320), 22.0), pts, "facebox", source="f.png")
  assert err.value.reason == "face_box"


def test_make_example_with_a_given_box_and_points_outside():
  rng = np.random.default_rng(4)
  pts = _face_points(rng, (160.0, 120.0), 100.0)
  grey = rng.uniform(0, 1, (240, 320)).astype(np.float32)
  box = (100.0, 60.0, 200.0, 160.0)  # cuts part of the points off
  ex = tc.make_example(grey, pts, crop_size=32, margin=0.25, emotion=1,
                       subject=1, sequence=1, frame=1, pose=0, glasses=False,
                       file_name="x", box=box)
  np.testing.assert_allclose(ex["crop_box"], box)
  np.testing.assert_allclose(tc.crop_to_frame(ex["landmarks"], box, 32), pts,
                             atol=1e-3)
  lo, hi = np.array([99.5, 59.5]), np.array([199.5, 159.5])  # centres
  inside = np.all((pts > lo) & (pts < hi), axis=1)
  assert tc.points_outside(ex["landmarks"], 32) == int(np.sum(~inside)) > 0
  assert tc.points_outside(np.full((68, 2), 16.0), 32) == 0


# ----------------------------------------------------------------------------
# Landmarks that cannot be a face (issue 11, item 6).
# ----------------------------------------------------------------------------

def _a_face():
  rng = np.random.default_rng(0)
  return rng.uniform(40, 80, size=(68, 2))


def test_check_points_accepts_a_face_and_points_just_outside():
  p = _a_face()
  assert tc.check_points(p, (120, 160), source="f.ljson") is p
  p[0] = (-30.0, 10.0)   # a jaw point past the border: a real annotation
  p[1] = (np.nan, np.nan)  # missing points are the caller's business
  tc.check_points(p, (120, 160), source="f.ljson")


def test_check_points_refuses_identical_points_naming_the_file():
  with pytest.raises(tc.ThermalFormatError, match=r"f\.ljson: field "
                     r"'landmarks.points': expected 68 distinct") as e:
    tc.check_points(np.full((68, 2), 50.0), (120, 160), source="f.ljson")
  assert e.value.reason == "landmarks"


def test_check_points_refuses_points_far_off_the_frame():
  with pytest.raises(tc.ThermalFormatError, match=r"f\.ljson: field "
                     r"'landmarks.points\[0\]'.*68 point\(s\) far off") as e:
    tc.check_points(_a_face() + 1e6, (120, 160), source="f.ljson")
  assert e.value.reason == "landmarks"


def test_make_example_refuses_identical_points_not_zero_division():
  grey = np.zeros((120, 160), np.float32)
  with pytest.raises(tc.ThermalFormatError, match=r"irface_x\.png: field "
                     r"'landmarks.points'"):
    tc.make_example(grey, np.full((68, 2), 50.0), crop_size=16, margin=0.25,
                    emotion=0, subject=1, sequence=1, frame=1, pose=0,
                    glasses=False, file_name="irface_x.png")


def test_frame_to_crop_refuses_a_box_without_area():
  with pytest.raises(ValueError, match="has no area"):
    tc.frame_to_crop(np.zeros((68, 2)), (5.0, 5.0, 5.0, 5.0), 16)
