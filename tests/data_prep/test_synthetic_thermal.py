"""Tests for the synthetic_thermal builder, its shape model and renderer.

Only tiny configs are built here; the default 3,008-frame config is never
built in tests (its plan is inspected without rendering).
"""
from __future__ import annotations

import dataclasses
import re
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_prep import thermal_common as tc
from data_prep.synthetic_thermal import SyntheticThermal
from data_prep.synthetic_thermal import SyntheticThermalConfig
from data_prep.synthetic_thermal import baseline
from data_prep.synthetic_thermal import render
from data_prep.synthetic_thermal import scene
from data_prep.synthetic_thermal import shape_model
from data_prep.synthetic_thermal import synthetic_thermal_dataset_builder as stb

NAME_RE = re.compile(r"^irface_sub\d{3}_seq\d{2}_frm\d{5}\.jpg_lfb\.png$")


def _tiny(seed=0, **kw):
  fields = dict(name=f"tiny_s{seed}", crop_size=32, num_subjects=3,
                frontal_per_subject=3, posed_per_subject=1, frame_width=256,
                frame_height=192, seed=seed)
  fields.update(kw)
  return SyntheticThermalConfig(**fields)


def _build(config, data_dir):
  builder = SyntheticThermal(config=config, data_dir=str(data_dir),
                             file_format="array_record")
  builder.download_and_prepare()
  return builder


def _records(source):
  recs = [source[i] for i in range(len(source))]
  return sorted(recs, key=lambda r: r["file_name"])


@pytest.fixture(scope="module")
def small(tmp_path_factory):
  data_dir = tmp_path_factory.mktemp("tfds_small")
  builder = _build("small", data_dir)
  source = tfds.data_source("synthetic_thermal/small", split="train",
                            data_dir=str(data_dir))
  return builder, _records(source)


def test_small_builds_and_reads_back_without_tensorflow(small):
  builder, recs = small
  assert "tensorflow" not in sys.modules
  assert len(recs) == 96
  r = recs[0]
  assert r["image"].shape == (64, 64, 1) and r["image"].dtype == np.uint16
  assert r["landmarks"].shape == (68, 2) and r["landmarks"].dtype == np.float32
  assert r["crop_box"].shape == (4,) and r["crop_box"].dtype == np.float32
  for r in recs:
    assert NAME_RE.match(r["file_name"].decode())
    assert bool(r["frontal"]) == (int(r["pose"]) == 0)
    assert 0 <= r["emotion"] < 8 and 0 <= r["pose"] <= 8
  frontal = sum(bool(r["frontal"]) for r in recs)
  assert frontal == 72 == builder.info.metadata["num_frontal"]
  assert f"{frontal} frontal" in builder.info.description
  # Crops hold faces: grey levels span the 20-40 C window sensibly.
  img = np.stack([r["image"] for r in recs]).astype(np.float64) / 65535
  assert 0.0 < img.min() and img.max() < 0.9 and img.std() > 0.1
  # Face-box crops by default; nearly all hold every landmark (the box is
  # calibrated on frontal faces; off-frontal poses miss more often).
  meta = builder.info.metadata
  assert (meta["crop_mode"], meta["variation"]) == ("facebox", "wide")
  out = [bool(tc.points_outside(r["landmarks"], 64)) for r in recs]
  assert meta["frames_with_points_outside_crop"] == sum(out) <= len(recs) // 10
  assert sum(o for o, r in zip(out, recs) if r["frontal"]) <= frontal // 20
  for r in recs:
    x0, y0, x1, y1 = r["crop_box"]
    assert x1 - x0 == pytest.approx(y1 - y0, rel=1e-5)


def test_face_box_crops_sit_like_landmark_crops_on_average(small, tmp_path):
  _, recs = small
  lm_recs = _records(_build("small_landmark_crops", tmp_path)
                     .as_data_source("train"))
  assert [r["file_name"] for r in recs] == [r["file_name"] for r in lm_recs]
  side = lambda r: r["crop_box"][2] - r["crop_box"][0]
  centre = lambda r: (r["crop_box"][:2] + r["crop_box"][2:]) / 2
  ratio = np.array([side(a) / side(b) for a, b in zip(recs, lm_recs)])
  shift = np.array([np.linalg.norm(centre(a) - centre(b)) / side(b)
                    for a, b in zip(recs, lm_recs)])
  assert abs(np.median(ratio) - 1) < 0.1 and np.median(shift) < 0.06
  # ... but they vary: the box is not the landmark extent in disguise.
  assert np.std(ratio) > 0.02
  for a, b in zip(recs, lm_recs):
    # The same frame: its labels map to the same frame positions.
    np.testing.assert_allclose(
        tc.crop_to_frame(a["landmarks"], a["crop_box"], 64),
        tc.crop_to_frame(b["landmarks"], b["crop_box"], 64), atol=2e-3)


def test_wide_variation_keeps_identities_and_widens_the_draws():
  narrow = [scene.subject_traits(0, s, 0.15, "narrow") for s in range(1, 65)]
  wide = [scene.subject_traits(0, s, 0.15, "wide") for s in range(1, 65)]
  for a, b in zip(narrow, wide):
    np.testing.assert_array_equal(shape_model.apply_identity(a.identity),
                                  shape_model.apply_identity(b.identity))
    assert a.scale_frac == b.scale_frac
  beards = [t.thermal.beard for t in wide]
  assert 8 <= sum(bool(b) for b in beards) <= 26
  assert {"moustache", "goatee", "full"} <= set(beards)
  assert not any(t.thermal.beard for t in narrow)
  noses = np.array([t.thermal.nose_tip for t in wide])
  assert noses.min() < 30.8 and noses.max() > 32.8  # wider than 1.0.0
  cfg = SyntheticThermal.builder_configs["default"]
  specs = [s for s in stb.frame_specs(cfg) if s.pose == 0][::9]
  yaw = {}
  for name, traits in (("narrow", narrow), ("wide", wide)):
    yaw[name] = np.std([scene.frame_scene(0, s, traits[s.subject - 1],
                                          (1024, 768))[0].pose.yaw
                        for s in specs])
  assert yaw["narrow"] < 2.5 < 4.5 < yaw["wide"] < 9.0


def test_stored_landmarks_map_back_to_the_rendered_scene(small):
  builder, recs = small
  cfg = builder.builder_config
  specs = {s.file_name: s for s in stb.frame_specs(cfg)}
  for r in recs[::7]:
    spec = specs[r["file_name"].decode()]
    traits = scene.subject_traits(cfg.seed, spec.subject,
                                  cfg.glasses_fraction, cfg.variation)
    face, _, _ = scene.frame_scene(cfg.seed, spec, traits,
                                   (cfg.frame_width, cfg.frame_height))
    labelled = face.landmarks + scene.annotation_offsets(
        cfg.seed, spec, face.landmarks, face.pose.scale)
    back = tc.crop_to_frame(r["landmarks"], r["crop_box"], cfg.crop_size)
    np.testing.assert_allclose(back, labelled, atol=2e-3)
    # Annotation noise is small next to the face (width = pose.scale).
    err = np.linalg.norm(back - face.landmarks, axis=-1) / face.pose.scale
    assert 0 < err.mean() < 0.02 and err.max() < 0.06
    assert r["emotion"] == tc.THERMAL_EMOTIONS.index(spec.emotion)
    assert (r["subject"], r["sequence"], r["frame"], r["pose"]) == (
        spec.subject, spec.sequence, spec.frame, spec.pose)


def test_same_seed_same_records_other_seed_differs(tmp_path):
  a = _records(_build(_tiny(0), tmp_path / "a").as_data_source("train"))
  b = _records(_build(_tiny(0), tmp_path / "b").as_data_source("train"))
  c = _records(_build(_tiny(1), tmp_path / "c").as_data_source("train"))
  assert len(a) == len(b) == 12
  for ra, rb in zip(a, b):
    assert ra.keys() == rb.keys()
    for k in ra:
      np.testing.assert_array_equal(ra[k], rb[k])
  assert [r["file_name"] for r in a] != [r["file_name"] for r in c] or any(
      not np.array_equal(ra["image"], rc["image"]) for ra, rc in zip(a, c))
  assert not np.allclose(np.stack([r["landmarks"] for r in a[:4]]),
                         np.stack([r["landmarks"] for r in c[:4]]))


@pytest.mark.parametrize("crop_mode", ["facebox", "landmarks"])
def test_annotation_noise_can_be_switched_off(crop_mode):
  cfg = _tiny(0, annotation_noise=0.0, crop_mode=crop_mode)
  spec = stb.frame_specs(cfg)[0]
  _, ex = stb.render_example(cfg, spec)
  face, _, _ = scene.frame_scene(
      0, spec, scene.subject_traits(0, spec.subject, 0.15, cfg.variation),
      (cfg.frame_width, cfg.frame_height))
  np.testing.assert_allclose(
      tc.crop_to_frame(ex["landmarks"], ex["crop_box"], cfg.crop_size),
      face.landmarks, atol=2e-3)


def test_face_box_crops_do_not_depend_on_the_labels():
  # The labels (annotation noise 0 or 3x) never reach the face box: same
  # box and pixels, different stored landmarks. Landmark-extent crops move.
  specs = stb.frame_specs(_tiny(0))[:4]
  for spec in specs:
    ex = {}
    for mode in ("facebox", "landmarks"):
      for noise in (0.0, 3.0):
        cfg = _tiny(0, annotation_noise=noise, crop_mode=mode)
        ex[mode, noise] = stb.render_example(cfg, spec)[1]
    a, b = ex["facebox", 0.0], ex["facebox", 3.0]
    np.testing.assert_array_equal(a["crop_box"], b["crop_box"])
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.allclose(a["landmarks"], b["landmarks"])
    assert not np.array_equal(ex["landmarks", 0.0]["crop_box"],
                              ex["landmarks", 3.0]["crop_box"])


def test_bad_crop_mode_or_variation_is_refused(tmp_path):
  with pytest.raises(tc.ThermalFormatError, match="field 'crop_mode'"):
    SyntheticThermal(config=_tiny(0, crop_mode="gt"), data_dir=str(tmp_path))
  with pytest.raises(ValueError, match="variation: expected one of"):
    SyntheticThermal(config=_tiny(0, variation="huge"),
                     data_dir=str(tmp_path))


def test_narrow_landmark_crops_reproduce_version_1():
  # Values rendered by builder 1.0.0 (config "small").
  cfg = SyntheticThermal.builder_configs["small_landmark_crops"]
  cfg = dataclasses.replace(cfg, variation="narrow")
  specs = stb.frame_specs(cfg)
  golden = {
      0: ([[12.2327, 10.1667], [40.0247, 31.0966], [34.9636, 42.3052]],
          [81.3025, 60.5322, 195.0297, 174.2595], 0.429787, 0.263191),
      40: ([[12.2916, 19.1056], [29.0807, 28.2436], [30.214, 44.1209]],
           [32.2652, 32.0011, 164.5234, 164.2594], 0.401132, 0.311494),
      95: ([[10.1667, 20.2189], [32.3287, 29.2891], [32.5503, 44.0691]],
           [71.4038, 43.8244, 205.4314, 177.852], 0.430347, 0.323907),
  }
  for i, (points, box, mean, std) in golden.items():
    _, ex = stb.render_example(cfg, specs[i])
    np.testing.assert_allclose(ex["landmarks"][[0, 30, 57]], points,
                               atol=2e-4)
    np.testing.assert_allclose(ex["crop_box"], box, atol=2e-4)
    img = ex["image"].astype(np.float64) / 65535
    assert img.mean() == pytest.approx(mean, abs=2e-5)
    assert img.std() == pytest.approx(std, abs=2e-5)
  names = {c.name: c for c in SyntheticThermal.BUILDER_CONFIGS}
  old = names["narrow_landmark_crops"]
  assert (old.variation, old.crop_mode, old.num_subjects, old.crop_size) == (
      "narrow", "landmarks", 64, 128)


def test_worker_processes_give_the_same_records(tmp_path):
  cfg = _tiny(0, num_subjects=2)
  one = SyntheticThermal(config=cfg, data_dir=str(tmp_path / "one"),
                         file_format="array_record", num_workers=1)
  two = SyntheticThermal(config=cfg, data_dir=str(tmp_path / "two"),
                         file_format="array_record", num_workers=2)
  one.download_and_prepare()
  two.download_and_prepare()
  a, b = (_records(x.as_data_source("train")) for x in (one, two))
  assert len(a) == len(b) == 8
  for ra, rb in zip(a, b):
    np.testing.assert_array_equal(ra["image"], rb["image"])
    np.testing.assert_array_equal(ra["landmarks"], rb["landmarks"])


def test_a_subset_of_subjects_renders_identical_frames():
  big, few = _tiny(0, num_subjects=3), _tiny(0, num_subjects=1)
  specs = stb.frame_specs(few)
  assert specs == stb.frame_specs(big)[:len(specs)]
  for spec in specs[:2]:
    ka, ea = stb.render_example(big, spec)
    kb, eb = stb.render_example(few, spec)
    assert ka == kb
    np.testing.assert_array_equal(ea["image"], eb["image"])


def test_default_plan_matches_the_paper_without_rendering():
  cfg = SyntheticThermal.builder_configs["default"]
  specs = stb.frame_specs(cfg)
  summary = stb._summary(specs)
  assert summary["num_frames"] == 3008 and summary["num_subjects"] == 64
  assert summary["num_frontal"] == 2240
  share = np.array(list(summary["frontal_per_emotion"].values())) / 2240
  np.testing.assert_allclose(share, scene.TABLE_I, atol=0.01)
  assert (cfg.frame_width, cfg.frame_height, cfg.crop_size) == (1024, 768, 128)
  names = [s.file_name for s in specs]
  assert len(set(names)) == len(names)
  for s in specs:
    assert (s.pose == 0) == (s.sequence != 1)


@pytest.mark.parametrize("variation", ["narrow", "wide"])
def test_direct_crop_render_equals_cropping_a_full_frame(variation):
  # The builder paints only the crop grid; that must match painting the
  # whole 1024 x 768 frame and cropping it like a real frame.
  cfg = SyntheticThermal.builder_configs["default"]
  spec = stb.frame_specs(_tiny(0))[0]
  traits = scene.subject_traits(0, spec.subject, 0.15, variation)
  size = (cfg.frame_width, cfg.frame_height)
  face, thermal, _ = scene.frame_scene(0, spec, traits, size)
  quiet = dataclasses.replace(thermal, netd=0.0)
  full = render.render(face, quiet, render.Grid.full_frame(*size), size,
                       np.random.default_rng(0))
  box = tc.crop_box(face.landmarks, 0.25)
  direct = render.render(face, quiet, render.Grid.for_crop(box, 128), size,
                         np.random.default_rng(0))
  diff = np.abs(direct - tc.crop_and_resize(full, box, 128))
  assert diff.mean() < 0.03 and np.percentile(diff, 99) < 0.5


def _temperature_at(temps, box, size, points):
  """Bilinear temperature at frame points from a crop rendering."""
  from scipy import ndimage
  xy = tc.frame_to_crop(np.atleast_2d(points), box, size)
  return ndimage.map_coordinates(temps, [xy[:, 1], xy[:, 0]], order=1)


@pytest.mark.parametrize("variation", ["narrow", "wide"])
def test_thermal_facts_at_landmarks(variation):
  cfg = SyntheticThermal.builder_configs["default"]
  size = (cfg.frame_width, cfg.frame_height)
  checked = 0
  for subject in range(1, 9):
    traits = scene.subject_traits(cfg.seed, subject, 0.15, variation)
    if traits.thermal.glasses:
      continue
    for spec in scene.subject_plan(cfg.seed, subject, 35, 12)[:40:8]:
      if spec.pose:
        continue
      face, thermal, rng = scene.frame_scene(cfg.seed, spec, traits, size)
      lm = face.landmarks
      box = tc.crop_box(lm, 0.25)
      temps = render.render(face, thermal, render.Grid.for_crop(box, 128),
                            size, rng)
      at = lambda *p: _temperature_at(temps, box, 128, np.array(p))
      canthi = at(lm[39], lm[42])
      nose = at(lm[30])[0]
      lips = at((lm[51] + lm[62]) / 2, (lm[57] + lm[66]) / 2)
      eyeballs = at(lm[36:42].mean(0), lm[42:48].mean(0))
      # Brows read cooler than the skin just above and below them.
      up = [0, -0.06 * face.pose.scale]
      brows = at(lm[19], lm[24])
      around = (at(lm[19] + up, lm[24] + up) + at(lm[19] - up, lm[24] - up)) / 2
      # (Wide: some frames are out of focus, which lowers the small hot
      # spot's apparent peak.)
      hot = 35.2 if variation == "narrow" else 35.0
      assert canthi.min() > hot and canthi.min() > nose + 2.0
      assert 30.0 - 0.5 < nose < 33.0 + 0.5
      assert lips.min() > nose
      assert np.all(eyeballs < canthi)
      assert np.all(brows < around)
      # The hottest spot of the upper face sits at an inner eye corner.
      upper = int(tc.frame_to_crop(lm[30], box, 128)[1])
      v, u = np.unravel_index(np.argmax(temps[:upper]), temps[:upper].shape)
      corners = tc.frame_to_crop(lm[[39, 42]], box, 128)
      assert np.min(np.hypot(*(corners - [u, v]).T)) < 3.0
      checked += 1
  assert checked >= 4
  # Background: a frame corner is at the subject's ambient temperature.
  full = render.render_frame(face, thermal, size, np.random.default_rng(0),
                             step=8)
  assert abs(full[:20, :20].mean() - thermal.ambient) < 1.0
  assert 20.0 <= thermal.ambient <= 25.0


def test_glasses_are_near_ambient():
  face = render.Face(shape_model.apply_identity(shape_model.Identity()),
                     shape_model.Pose(scale=300.0, tx=512.0, ty=330.0))
  thermal = render.Thermal(glasses=True, lens=23.5, netd=0.0)
  lm = face.landmarks
  box = tc.crop_box(lm, 0.25)
  temps = render.render(face, thermal, render.Grid.for_crop(box, 96),
                        (1024, 768), np.random.default_rng(0))
  eyes = _temperature_at(temps, box, 96, lm[[37, 44]])
  assert np.all(eyes < 25.0)


def _mouth(shape):
  opening = np.linalg.norm(shape[66, :2] - shape[62, :2])
  width = np.linalg.norm(shape[54, :2] - shape[48, :2])
  corners_y = shape[[48, 54], 1].mean() - shape[[51, 57], 1].mean()
  return opening, width, corners_y


@pytest.mark.parametrize("subject", [1, 2, 3])
def test_emotion_deformations_do_what_they_say(subject):
  idn = shape_model.Identity.sample(np.random.default_rng(subject))
  neutral = shape_model.apply_identity(idn)
  e = {name: shape_model.apply_expression(neutral, name, 1.0)
       for name in tc.THERMAL_EMOTIONS}
  op_n, w_n, c_n = _mouth(neutral)
  brows = lambda s: s[17:27, 1].mean()
  inner_brows = lambda s: s[[21, 22], 1].mean()
  assert _mouth(e["surprise"])[0] > op_n + 0.05
  assert brows(e["surprise"]) < brows(neutral) - 0.03
  assert _mouth(e["happy"])[1] > w_n + 0.05
  assert _mouth(e["happy"])[2] < c_n - 0.02        # corners lifted
  assert _mouth(e["sad"])[2] > c_n + 0.02          # corners lowered
  assert inner_brows(e["sad"]) < inner_brows(neutral)
  assert inner_brows(e["angry"]) > inner_brows(neutral) + 0.02
  assert (e["angry"][22, 0] - e["angry"][21, 0]
          < neutral[22, 0] - neutral[21, 0] - 0.02)  # drawn together
  assert e["disgust"][51, 1] < neutral[51, 1] - 0.03  # upper lip raised
  assert brows(e["fear"]) < brows(neutral) - 0.02
  assert _mouth(e["fear"])[1] > w_n + 0.05
  lift = neutral[[48, 54], 1] - e["contempt"][[48, 54], 1]
  assert lift[1] > 0.03 and abs(lift[0]) < 0.01     # one-sided
  np.testing.assert_array_equal(e["neutral"], neutral)


def test_pose_turns_the_nose_and_fit_pose_recovers_it():
  shape = shape_model.apply_identity(shape_model.Identity())
  for pose_id, (yaw, pitch) in shape_model.POSES.items():
    lm = shape_model.project(shape, shape_model.Pose(yaw, pitch, 0, 300, 0, 0))
    eyes = lm[36:48].mean(0)
    assert np.sign(round(lm[30, 0] - eyes[0], 3)) == np.sign(yaw)
    truth = shape_model.Pose(yaw * 0.9, pitch * 0.8, 5.0, 250.0, 400.0, 300.0)
    target = shape_model.project(shape, truth)
    fit = shape_model.fit_pose(shape, {i: target[i] for i in (39, 42, 30, 8)})
    np.testing.assert_allclose(shape_model.project(shape, fit)[[39, 42, 30]],
                               target[[39, 42, 30]], atol=1.0)
    del pose_id


def test_baseline_helpers_and_difficulty_of_small(small):
  truth = np.zeros((2, 68, 2))
  truth[:, 36:42, 0], truth[:, 42:48, 0] = -5.0, 5.0  # pupils 10 apart
  np.testing.assert_allclose(
      baseline.inter_pupil_nme(truth, truth + [0.0, 1.0]), [10, 10])
  subjects = np.repeat(np.arange(1, 17), 5)
  train, test = baseline.subject_split(subjects, 0, 0)
  assert len(np.unique(subjects[test])) == 2
  assert not set(subjects[train]) & set(subjects[test])
  _, recs = small
  frontal = [r for r in recs if r["frontal"]]
  arrays = {
      "image": np.stack([r["image"] for r in frontal]) / 65535.0,
      "landmarks": np.stack([r["landmarks"] for r in frontal]),
      "emotion": np.array([r["emotion"] for r in frontal]),
      "subject": np.array([r["subject"] for r in frontal]),
      "file_name": np.array([r["file_name"].decode() for r in frontal]),
  }
  d = baseline.difficulty(arrays, repeats=2)
  assert len(d["ridge"]) == len(d["mean_shape"]) == 2
  # Even on 63 training images the pixels say more than the mean shape.
  assert np.mean(d["ridge"]) < np.mean(d["mean_shape"])
  assert 0 <= d["frames_outside"] <= len(frontal) // 10


def test_speech_and_blinks_move_what_they_say():
  neutral = shape_model.apply_identity(shape_model.Identity())
  talk = shape_model.apply_movement(neutral, "talk", 1.0)
  assert _mouth(talk)[0] > _mouth(neutral)[0] + 0.05   # mouth open
  assert talk[8, 1] > neutral[8, 1] + 0.05              # jaw dropped
  np.testing.assert_array_equal(talk[17:48], neutral[17:48])
  shut = shape_model.apply_movement(neutral, "blink", 1.0)
  for upper, lower in ((37, 41), (38, 40), (43, 47), (44, 46)):
    assert abs(shut[upper, 1] - shut[lower, 1]) < 1e-9
  half = shape_model.apply_movement(neutral, "blink", 0.5)
  gap = lambda s: s[41, 1] - s[37, 1]
  assert 0 < gap(half) < gap(neutral)
  np.testing.assert_array_equal(shut[48:], neutral[48:])


def test_beard_and_shading_render_where_they_should():
  face = render.Face(shape_model.apply_identity(shape_model.Identity()),
                     shape_model.Pose(scale=300.0, tx=512.0, ty=330.0))
  lm = face.landmarks
  box = tc.crop_box(lm, 0.25)
  grid = render.Grid.for_crop(box, 96)
  plain = render.Thermal(netd=0.0)
  temps = lambda th: render.render(face, th, grid, (1024, 768),
                                   np.random.default_rng(0))
  base = temps(plain)
  beard = temps(dataclasses.replace(plain, beard="full", beard_temp=30.0,
                                    beard_density=1.0))
  chin = (lm[8] + lm[57]) / 2
  cheek = (lm[4] + lm[48]) / 2
  forehead = lm[27] + [0.0, -0.2 * 300]
  at = lambda t, p: _temperature_at(t, box, 96, p)[0]
  assert at(beard, chin) < at(base, chin) - 2.0
  assert at(beard, cheek) < at(base, cheek) - 2.0
  assert abs(at(beard, forehead) - at(base, forehead)) < 0.05
  shaded = temps(dataclasses.replace(
      plain, shading=np.array([[0.5, 0.0, 0.0, 0.0]])))  # a constant +0.5
  np.testing.assert_allclose(shaded - base, 0.5, atol=0.02)
