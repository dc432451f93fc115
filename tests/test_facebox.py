"""Tests for tml.facebox: a face box from the thermal image alone."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

from data_prep import thermal_common as tc
from data_prep.synthetic_thermal import render
from data_prep.synthetic_thermal import scene
from data_prep.synthetic_thermal import shape_model
from data_prep.synthetic_thermal import synthetic_thermal_dataset_builder as stb
from tml import facebox

FRAME = (1024, 768)
STEP = FRAME[0] / facebox.WORK_SIZE


def _frames(variation, count, stride=11, glasses_fraction=0.15):
  """(temps on the face box's working grid, frame landmarks, thermal)."""
  cfg = stb.SyntheticThermal.builder_configs["default"]
  specs = [s for s in stb.frame_specs(cfg) if s.pose == 0][::stride][:count]
  out = []
  for spec in specs:
    traits = scene.subject_traits(0, spec.subject, glasses_fraction,
                                  variation)
    face, thermal, rng = scene.frame_scene(0, spec, traits, FRAME)
    temps = render.render(face, thermal,
                          render.Grid.full_frame(*FRAME, step=STEP), FRAME,
                          rng)
    out.append((temps, face.landmarks, thermal))
  return out


def _in_box(box, step=1.0):
  return tuple(v * step for v in box)


@pytest.mark.parametrize("variation", ["narrow", "wide"])
def test_box_holds_the_landmarks_of_rendered_frames(variation):
  frames = _frames(variation, 40)
  inside, margins, scale, shift = [], [], [], []
  for temps, lm, _ in frames:
    x0, y0, x1, y1 = _in_box(facebox.find_face_box(temps), STEP)
    assert x1 - x0 == pytest.approx(y1 - y0)
    side = x1 - x0
    # Landmarks are pixel centres; the box is in edge coordinates.
    px, py = lm[:, 0] + 0.5, lm[:, 1] + 0.5
    inside.append(np.all((px > x0) & (px < x1) & (py > y0) & (py < y1)))
    margins.append(min(px.min() - x0, x1 - px.max(), py.min() - y0,
                       y1 - py.max()) / side)
    gt = tc.crop_box(lm, tc.DEFAULT_MARGIN)
    scale.append(side / (gt[2] - gt[0]))
    shift.append(np.hypot((x0 + x1 - gt[0] - gt[2]) / 2,
                          (y0 + y1 - gt[1] - gt[3]) / 2) / side)
  assert np.mean(inside) >= 0.95
  assert np.median(margins) > 0.1  # the landmark extent plus ~25 %
  # Calibrated to the old landmark-extent crops on average, with the
  # spread of a real detector.
  assert abs(np.median(scale) - 1.0) < 0.08
  assert np.median(shift) < 0.06
  if variation == "narrow":
    assert np.std(scale) < 0.08


def test_box_is_a_function_of_the_image_alone():
  # The signature admits nothing but the image ...
  assert list(inspect.signature(facebox.find_face_box).parameters) == ["image"]
  temps, lm, _ = _frames("wide", 1)[0]
  box = facebox.find_face_box(temps)
  # ... and the box moves with the image content, not with any labels.
  shifted = np.pad(temps, ((6, 0), (10, 0)), mode="edge")[:temps.shape[0],
                                                          :temps.shape[1]]
  moved = facebox.find_face_box(shifted)
  np.testing.assert_allclose(np.subtract(moved, box), [10, 6, 10, 6],
                             atol=1.01)
  del lm


def test_any_monotone_grey_scale_gives_the_same_box():
  temps, _, _ = _frames("wide", 1, stride=17)[0]
  box = facebox.find_face_box(temps)
  grey = tc.to_unit_grey(temps)
  np.testing.assert_allclose(facebox.find_face_box(grey), box, atol=1.01)
  eight_bit = np.round(grey * 255).astype(np.uint8).astype(np.float64)
  np.testing.assert_allclose(facebox.find_face_box(eight_bit), box, atol=2.01)


def test_full_resolution_frames_are_reduced_to_the_working_size():
  # A real 1024 x 768 frame and the builder's 128 x 96 working render give
  # the same box (in frame pixels), within a working pixel.
  cfg = stb.SyntheticThermal.builder_configs["default"]
  spec = [s for s in stb.frame_specs(cfg) if s.pose == 0][5]
  traits = scene.subject_traits(0, spec.subject, 0.15, "wide")
  face, thermal, rng = scene.frame_scene(0, spec, traits, FRAME)
  full = render.render_frame(face, thermal, FRAME, rng, step=4.0)
  small = render.render(face, thermal, render.Grid.full_frame(*FRAME, STEP),
                        FRAME, np.random.default_rng(0))
  np.testing.assert_allclose(facebox.find_face_box(full),
                             _in_box(facebox.find_face_box(small), STEP),
                             atol=2 * STEP)


def test_glasses_do_not_cut_the_face():
  frames = _frames("narrow", 6, stride=29, glasses_fraction=1.0)
  assert all(th.glasses for _, _, th in frames)
  for temps, lm, _ in frames:
    mask, step = facebox.warm_mask(temps)
    eyes = (lm[36:48] + 0.5) / (STEP * step)
    assert mask[eyes[:, 1].astype(int), eyes[:, 0].astype(int)].all()
    x0, y0, x1, y1 = _in_box(facebox.find_face_box(temps), STEP)
    assert x0 < lm[:, 0].min() and lm[:, 0].max() < x1


def test_beards_and_thick_necks_still_give_a_box():
  th = render.Thermal(netd=0.0, beard="full", beard_temp=30.0)
  shape = shape_model.apply_identity(shape_model.Identity())
  for neck in (0.2, 0.34, 0.45):
    face = render.Face(shape, shape_model.Pose(scale=330.0, tx=512.0,
                                                     ty=330.0),
                       neck_width=neck)
    temps = render.render(face, th, render.Grid.full_frame(*FRAME, STEP),
                          FRAME, np.random.default_rng(0))
    x0, y0, x1, y1 = _in_box(facebox.find_face_box(temps), STEP)
    lm = face.landmarks
    assert x0 < lm[:, 0].min() and lm[:, 0].max() < x1
    assert y0 < lm[:, 1].min() and lm[:, 1].max() < y1 + 0.05 * (y1 - y0)


@pytest.mark.parametrize("image, match", [
    (np.full((96, 128), 22.0), "no warm region"),
    (np.random.default_rng(0).normal(22.0, 0.1, (96, 128)), "no warm region"),
    (np.pad(np.full((5, 5), 35.0), ((40, 51), (60, 63)),
            constant_values=22.0), "no face"),
    (np.full((4, 4), 22.0), "at least 8x8"),
    (np.array([[np.nan] * 16] * 16), "non-finite"),
])
def test_no_face_is_a_clear_error(image, match):
  with pytest.raises(facebox.FaceBoxError, match=match):
    facebox.find_face_box(image)


def test_thermal_common_face_box_names_the_file():
  with pytest.raises(tc.ThermalFormatError,
                     match=r"x\.png: field 'image': .*no warm region") as e:
    tc.face_box(np.zeros((64, 64)), source="x.png")
  assert e.value.reason == "face_box"


def test_centre_box_fallback_is_square_and_centred():
  x0, y0, x1, y1 = facebox.centre_box(768, 1024, 0.5)
  assert (x1 - x0, y1 - y0) == (384, 384)
  assert ((x0 + x1) / 2, (y0 + y1) / 2) == (512, 384)
