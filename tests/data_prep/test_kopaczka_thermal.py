"""Tests for the kopaczka_thermal builder on fixtures in the real disk format.

Fixture frames are rendered by the synthetic renderer and written exactly as
the database stores them (flat <base>.png|.npy + <base>.ljson, LJSON v2 with
[y, x] points), under real file names from kopaczka_filenames_3points.csv
with the face posed so that landmarks 39, 42 and 30 land where the real
frame has them.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from data_prep import thermal_common as tc
from data_prep.kopaczka_thermal import KopaczkaThermal
from data_prep.kopaczka_thermal import KopaczkaThermalConfig
from data_prep.kopaczka_thermal import fake_data
from data_prep.kopaczka_thermal import reader
from tml import landmarks as lm_lib

S = 32
# Real-style names for when ../shared/data is absent (points approximate).
_FALLBACK = {
    "irface_sub001_seq02_frm00006.jpg_lfb.png":
        {39: (633.5, 257.5), 42: (672.5, 270.5), 30: (708.5, 300.5)},
    "irface_sub004_seq06_frm00497.png_lfb.png":
        {39: (480.5, 300.5), 42: (540.5, 301.5), 30: (512.5, 350.5)},
    "irface_sub012_seq07_frm00150.jpg_lfb.png":
        {39: (500.5, 280.5), 42: (555.5, 282.5), 30: (530.5, 330.5)},
    "irface_sub020_seq03_frm00020.jpg_lfb.png":
        {39: (455.5, 260.5), 42: (520.5, 262.5), 30: (490.5, 318.5)},
    "irface_sub033_seq07_frm01020.jpg_lfb.png":
        {39: (530.5, 300.5), 42: (590.5, 299.5), 30: (560.5, 352.5)},
    "irface_sub047_seq06_frm00333.jpg_lfb.png":
        {39: (470.5, 240.5), 42: (525.5, 241.5), 30: (498.5, 290.5)},
}
EMOTIONS = ["happy", "surprise", "neutral", "angry", "fear", "sad"]
POSES = [0, 0, 3, 0, 0, 1]
FORMATS = ["png8", "png8", "png8", "png8", "png16", "npy"]


def _anchored_names(request):
  """Six real names with their three points; the real list when present."""
  try:
    shared = request.getfixturevalue("shared_data")
  except pytest.skip.Exception:
    return _FALLBACK
  points = fake_data.read_three_points(os.path.join(
      shared, "formats", "kopaczka_names", "kopaczka_filenames_3points.csv"))
  names = sorted(points)
  picked = names[::len(names) // 6][:6]
  assert any(".png_lfb" in n for n in names)  # the odd ones exist
  return {n: points[n] for n in picked}


@pytest.fixture(scope="module")
def database(request, tmp_path_factory):
  """A manual_dir with six frames (8-bit, 16-bit and .npy) and labels.csv."""
  out = str(tmp_path_factory.mktemp("kopaczka_manual"))
  anchored = _anchored_names(request)
  names = list(anchored)
  written = []
  for fmt in ("png8", "png16", "npy"):
    idx = [i for i, f in enumerate(FORMATS) if f == fmt]
    written += fake_data.write_database(
        out, [names[i] for i in idx], [anchored[names[i]] for i in idx],
        image_format=fmt, emotions=[EMOTIONS[i] for i in idx],
        poses=[POSES[i] for i in idx], glasses=[i == 3 for i in idx],
        labels_csv=False)
  fake_data.write_labels(os.path.join(out, "labels.csv"), written)
  return out, {f.base: f for f in written}, anchored


def _build(manual_dir, data_dir, **cfg):
  config = KopaczkaThermalConfig(name="test", crop_size=S, **cfg)
  builder = KopaczkaThermal(config=config, data_dir=str(data_dir),
                            file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def _assert_nothing_prepared(data_dir):
  infos = [os.path.join(r, f) for r, _, fs in os.walk(data_dir) for f in fs
           if f == "dataset_info.json"]
  assert not infos, infos
  with pytest.raises(Exception):
    tfds.data_source("kopaczka_thermal/test", split="train",
                     data_dir=str(data_dir), download=False)


def test_fixture_faces_sit_where_the_real_frames_have_them(database):
  _, frames, anchored = database
  for f in frames.values():
    target = anchored[f.base + ".png"]
    for i in (39, 42, 30):
      assert np.hypot(*(f.landmarks[i] - target[i])) < 15.0


def test_builds_and_reads_back_without_tensorflow(database, tmp_path):
  manual, frames, _ = database
  builder = _build(manual, tmp_path)
  source = tfds.data_source("kopaczka_thermal/test", split="train",
                            data_dir=str(tmp_path))
  assert "tensorflow" not in sys.modules
  assert len(source) == 6
  meta = builder.info.metadata
  assert meta["num_frames"] == 6 and meta["num_skipped"] == 0
  assert meta["num_frontal"] == POSES.count(0)
  for i in range(len(source)):
    r = source[i]
    name = r["file_name"].decode()
    base = reader.base_name(name)
    f = frames[base]
    assert name == f.image_name
    sub, seq, frm = reader.parse_base(base, name)
    assert (r["subject"], r["sequence"], r["frame"]) == (sub, seq, frm)
    assert tc.THERMAL_EMOTIONS[r["emotion"]] == f.emotion
    assert r["pose"] == f.pose and bool(r["frontal"]) == (f.pose == 0)
    assert bool(r["glasses"]) == f.glasses
    assert r["image"].shape == (S, S, 1) and r["image"].dtype == np.uint16
    # Independent path: the LJSON's [y, x] read with json, swapped.
    with open(os.path.join(manual, base + ".ljson")) as fh:
      yx = np.array(json.load(fh)["landmarks"]["points"], dtype=np.float64)
    back = tc.crop_to_frame(r["landmarks"], r["crop_box"], S)
    np.testing.assert_allclose(back, yx[:, ::-1], atol=2e-3)
    x0, y0, x1, y1 = r["crop_box"]
    assert x1 - x0 == pytest.approx(y1 - y0)
    # Image and landmarks agree: the nose tip is colder than the canthi.
    img = r["image"][..., 0].astype(np.float64)
    at = lambda k: img[tuple(np.round(r["landmarks"][k, ::-1]).astype(int))]
    if not f.glasses:
      assert min(at(39), at(42)) > at(30)


def test_npy_and_16_bit_frames_go_through_the_window(database, tmp_path):
  manual, frames, _ = database
  builder = _build(manual, tmp_path, t_min=25.0, t_max=37.0)
  source = builder.as_data_source("train")
  for i in range(len(source)):
    r = source[i]
    name = r["file_name"].decode()
    path = os.path.join(manual, name)
    if name.endswith(".npy"):
      grey = np.clip((np.load(path) - 25.0) / 12.0, 0, 1)
    else:
      grey = tc.to_unit_grey(reader.load_image(path))
    expected = tc.unit_to_uint16(tc.crop_and_resize(grey, r["crop_box"], S))
    assert np.abs(expected.astype(int) - r["image"][..., 0]).max() <= 2


def test_labels_csv_variants(tmp_path):
  path = tmp_path / "labels.csv"
  path.write_text(
      "File_Name,emotion,pose\n"
      "dir/irface_sub001_seq02_frm00006.jpg_lfb.png, Happy ,0\n"
      "irface_sub001_seq02_frm00007.jpg_lfb,6,4\n"
      "irface_sub001_seq02_frm00008.jpg_lfb.ljson,NEUTRAL,8\n\n")
  labels, errors = reader.read_labels(str(path))
  assert not errors
  assert labels["irface_sub001_seq02_frm00006.jpg_lfb"] == reader.Label(
      "happy", 0, False)
  assert labels["irface_sub001_seq02_frm00007.jpg_lfb"].emotion == "surprise"
  assert labels["irface_sub001_seq02_frm00008.jpg_lfb"].pose == 8


# ----------------------------------------------------------------------------
# Failure modes: each names the file and the field, and leaves no dataset.
# ----------------------------------------------------------------------------

def _first(manual, ext, k=0):
  return sorted(n for n in os.listdir(manual) if n.endswith(ext))[k]


def _corrupt_image(m):
  name = _first(m, ".png")
  with open(os.path.join(m, name), "r+b") as f:
    f.seek(100)
    f.write(b"\x00" * 400)
  return rf"{name}: field 'image': expected a readable"


def _malformed_ljson(m):
  name = _first(m, ".ljson")
  with open(os.path.join(m, name), "w") as f:
    f.write('{"landmarks": {"points": [[1, 2],')
  return rf"{name}: not valid JSON"


def _wrong_point_count(m):
  name = _first(m, ".ljson")
  path = os.path.join(m, name)
  with open(path) as f:
    doc = json.load(f)
  doc["landmarks"]["points"] = doc["landmarks"]["points"][:67]
  with open(path, "w") as f:
    json.dump(doc, f)
  return rf"{name}: field 'landmarks.points': expected 68 .*got 67"


def _null_point(m):
  name = _first(m, ".ljson")
  path = os.path.join(m, name)
  with open(path) as f:
    doc = json.load(f)
  doc["landmarks"]["points"][33] = None
  with open(path, "w") as f:
    json.dump(doc, f)
  return rf"{name}: field 'landmarks.points\[33\]'.*skip_missing_points"


def _missing_label_row(m):
  path = os.path.join(m, "labels.csv")
  with open(path) as f:
    lines = f.readlines()
  dropped = lines.pop(2).split(",")[0]
  with open(path, "w") as f:
    f.writelines(lines)
  return (rf"labels.csv: field 'file_name': expected a row for frame "
          rf"{reader.base_name(dropped)}")


def _unknown_emotion(m):
  path = os.path.join(m, "labels.csv")
  with open(path) as f:
    text = f.read()
  with open(path, "w") as f:
    f.write(text.replace(",happy,", ",joyful,"))
  return r"labels.csv line 2: field 'emotion': expected one of angry.*'joyful'"


def _bad_pose(m):
  path = os.path.join(m, "labels.csv")
  with open(path) as f:
    lines = f.readlines()
  cells = lines[3].split(",")
  cells[2] = "9"
  lines[3] = ",".join(cells)
  with open(path, "w") as f:
    f.writelines(lines)
  return r"labels.csv line 4: field 'pose': expected an integer 0-8"


def _png_without_ljson(m):
  name = _first(m, ".png")
  os.remove(os.path.join(m, name[:-4] + ".ljson"))
  return rf"{name}: field 'ljson': expected a companion file"


def _ljson_without_image(m):
  name = _first(m, ".png")
  os.remove(os.path.join(m, name))
  return rf"{name[:-4]}.ljson: field 'image': expected a companion image"


def _bad_file_name(m):
  name = _first(m, ".png")
  base = name[:-4]
  for ext in (".png", ".ljson"):
    os.rename(os.path.join(m, base + ext), os.path.join(m, "face_01" + ext))
  return r"face_01\.(png|ljson): field 'file_name': expected irface_subSSS"


def _colour_png(m):
  from PIL import Image
  name = _first(m, ".png")
  rgb = np.zeros((48, 64, 3), np.uint8)
  rgb[..., 0] = 255
  Image.fromarray(rgb).save(os.path.join(m, name))
  return rf"{name}: field 'image': expected a greyscale PNG .*mode RGB"


def _no_labels_file(m):
  os.remove(os.path.join(m, "labels.csv"))
  return r"labels.csv: field 'labels': expected a CSV file"


FAILURES = [_corrupt_image, _malformed_ljson, _wrong_point_count, _null_point,
            _missing_label_row, _unknown_emotion, _bad_pose,
            _png_without_ljson, _ljson_without_image, _bad_file_name,
            _colour_png, _no_labels_file]


@pytest.mark.parametrize("mutate", FAILURES, ids=lambda f: f.__name__[1:])
def test_bad_input_names_file_and_field_and_leaves_no_dataset(
    mutate, database, tmp_path):
  manual = str(tmp_path / "manual")
  shutil.copytree(database[0], manual)
  pattern = mutate(manual)
  with pytest.raises(ValueError, match=pattern):
    _build(manual, tmp_path / "tfds")
  _assert_nothing_prepared(tmp_path / "tfds")


def test_failure_mid_generation_leaves_nothing_readable(
    database, tmp_path, monkeypatch):
  manual = str(tmp_path / "manual")
  shutil.copytree(database[0], manual)
  last = sorted(n for n in os.listdir(manual) if n.endswith(".png"))[-1]
  with open(os.path.join(manual, last), "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
  loaded = []
  original = reader.load_image
  monkeypatch.setattr(reader, "load_image",
                      lambda p: loaded.append(p) or original(p))
  with pytest.raises(ValueError, match=rf"{last}: field 'image'"):
    _build(manual, tmp_path / "tfds")
  assert len(loaded) >= 4  # earlier frames were already written
  _assert_nothing_prepared(tmp_path / "tfds")
  leftovers = [d for _, ds, _ in os.walk(tmp_path / "tfds") for d in ds
               if "incomplete" in d]
  assert not leftovers
  builder = KopaczkaThermal(config=KopaczkaThermalConfig(name="test",
                                                         crop_size=S),
                            data_dir=str(tmp_path / "tfds"))
  assert not builder.is_prepared()


def test_skip_bad_skips_counts_and_logs(database, tmp_path, caplog):
  manual = str(tmp_path / "manual")
  shutil.copytree(database[0], manual)
  names = sorted(n for n in os.listdir(manual) if n.endswith(".ljson"))
  # Three bad frames: malformed LJSON, a null point, no labels row.
  with open(os.path.join(manual, names[0]), "w") as f:
    f.write("not json")
  doc = fake_data.ljson_document(np.full((68, 2), 5.0))
  doc["landmarks"]["points"][3] = None
  with open(os.path.join(manual, names[1]), "w") as f:
    json.dump(doc, f)
  path = os.path.join(manual, "labels.csv")
  with open(path) as f:
    lines = [ln for ln in f if not ln.startswith(names[2][:-6])]
  with open(path, "w") as f:
    f.writelines(lines)
  with pytest.raises(ValueError):  # strict by default
    _build(manual, tmp_path / "strict")
  with caplog.at_level(logging.INFO):
    builder = _build(manual, tmp_path / "tfds", skip_bad=True)
  assert len(builder.as_data_source("train")) == 3
  meta = builder.info.metadata
  assert meta["num_frames"] == 3 and meta["num_skipped"] == 3
  assert meta["skipped_by_reason"] == {"labels": 1, "ljson": 1,
                                       "missing_points": 1}
  assert "skipped 3" in caplog.text
  # Reading the prepared dataset back restores the counts.
  again = tfds.builder("kopaczka_thermal/test", data_dir=str(tmp_path / "tfds"))
  assert again.info.metadata["num_skipped"] == 3


def test_skip_missing_points_skips_only_those(database, tmp_path):
  manual = str(tmp_path / "manual")
  shutil.copytree(database[0], manual)
  _null_point(manual)
  builder = _build(manual, tmp_path / "tfds", skip_missing_points=True)
  assert len(builder.as_data_source("train")) == 5
  assert builder.info.metadata["skipped_by_reason"] == {"missing_points": 1}
  _unknown_emotion(manual)  # other errors still stop the build
  with pytest.raises(ValueError, match="field 'emotion'"):
    _build(manual, tmp_path / "tfds2", skip_missing_points=True)


def test_ljson_groups_cover_the_68_points_once():
  masks = [i for v in fake_data.LJSON_GROUPS.values() for i in v]
  assert sorted(masks) == list(range(lm_lib.NUM_LANDMARKS))


# ----------------------------------------------------------------------------
# Crop modes: face box (default) and the landmark extent.
# ----------------------------------------------------------------------------

def _by_base(source):
  return {reader.base_name(source[i]["file_name"].decode()): source[i]
          for i in range(len(source))}


def test_face_box_crops_hold_the_landmarks(database, tmp_path):
  manual, frames, _ = database
  builder = _build(manual, tmp_path)
  meta = builder.info.metadata
  assert meta["crop_mode"] == "facebox"
  recs = _by_base(builder.as_data_source("train"))
  outside = 0
  for base, r in recs.items():
    f = frames[base]
    n = tc.points_outside(r["landmarks"], S)
    outside += bool(n)
    if f.pose == 0:
      assert n == 0, base
    # The face box is where the face is: near the landmark-extent box.
    # (Loosely: a pose fitted to three real points can turn a "frontal"
    # fixture by 30 degrees or more, and the box is calibrated on frontal
    # faces.)
    gt = np.array(tc.crop_box(f.landmarks, 0.25))
    box = np.asarray(r["crop_box"], np.float64)
    side = gt[2] - gt[0]
    assert abs((box[2] - box[0]) / side - 1) < 0.35
    shift = np.hypot(*((box[:2] + box[2:]) - (gt[:2] + gt[2:])) / 2)
    assert shift < 0.3 * side
  assert meta["frames_with_points_outside_crop"] == outside


def test_face_box_never_reads_the_ljson(database, tmp_path):
  # Moving every LJSON point moves the stored landmarks, not the crop.
  manual = str(tmp_path / "manual")
  shutil.copytree(database[0], manual)
  a = _by_base(_build(manual, tmp_path / "a").as_data_source("train"))
  for name in os.listdir(manual):
    if name.endswith(".ljson"):
      path = os.path.join(manual, name)
      pts = lm_lib.read_ljson(path)
      fake_data.write_ljson(path, pts + [25.0, -15.0])
  b = _by_base(_build(manual, tmp_path / "b").as_data_source("train"))
  for base in a:
    np.testing.assert_array_equal(a[base]["crop_box"], b[base]["crop_box"])
    np.testing.assert_array_equal(a[base]["image"], b[base]["image"])
    moved = (tc.crop_to_frame(b[base]["landmarks"], b[base]["crop_box"], S)
             - tc.crop_to_frame(a[base]["landmarks"], a[base]["crop_box"], S))
    np.testing.assert_allclose(moved, np.tile([25.0, -15.0], (68, 1)),
                               atol=2e-3)


def test_landmark_crop_mode_keeps_the_version_1_boxes(database, tmp_path):
  manual, frames, _ = database
  builder = _build(manual, tmp_path, crop_mode="landmarks")
  assert builder.info.metadata["crop_mode"] == "landmarks"
  assert builder.info.metadata["frames_with_points_outside_crop"] == 0
  for base, r in _by_base(builder.as_data_source("train")).items():
    with open(os.path.join(manual, base + ".ljson")) as fh:
      yx = np.array(json.load(fh)["landmarks"]["points"], dtype=np.float64)
    np.testing.assert_allclose(r["crop_box"], tc.crop_box(yx[:, ::-1], 0.25),
                               atol=1e-3)
  with pytest.raises(ValueError, match="field 'crop_mode'"):
    _build(manual, tmp_path / "bad", crop_mode="gt")


def test_a_frame_without_a_warm_face_fails_or_is_skipped(database, tmp_path):
  from PIL import Image
  manual = str(tmp_path / "manual")
  shutil.copytree(database[0], manual)
  name = _first(manual, ".png")
  Image.fromarray(np.full((768, 1024), 60, np.uint8)).save(
      os.path.join(manual, name))
  with pytest.raises(ValueError, match=rf"{name}: field 'image': .*face"):
    _build(manual, tmp_path / "strict")
  _assert_nothing_prepared(tmp_path / "strict")
  builder = _build(manual, tmp_path / "skip", skip_bad=True)
  assert builder.info.metadata["skipped_by_reason"] == {"face_box": 1}
  # The landmark-extent mode needs no face box.
  assert len(_build(manual, tmp_path / "lm", crop_mode="landmarks")
             .as_data_source("train")) == 6


# ----------------------------------------------------------------------------
# Landmarks that cannot be a face (issue 11, item 6).
# ----------------------------------------------------------------------------

def _rewrite_points(m, change):
  name = _first(m, ".ljson")
  path = os.path.join(m, name)
  with open(path) as f:
    doc = json.load(f)
  doc["landmarks"]["points"] = change(np.asarray(doc["landmarks"]["points"],
                                                 dtype=np.float64)).tolist()
  with open(path, "w") as f:
    json.dump(doc, f)
  return name


@pytest.mark.parametrize("crop_mode", ["facebox", "landmarks"])
def test_identical_points_name_the_file(database, tmp_path, crop_mode):
  manual = str(tmp_path / "manual")
  shutil.copytree(database[0], manual)
  name = _rewrite_points(manual, lambda p: np.full_like(p, 100.0))
  with pytest.raises(ValueError, match=rf"{name}: field 'landmarks.points': "
                     r"expected 68 distinct points.*all 68 points at"):
    _build(manual, tmp_path / "tfds", crop_mode=crop_mode)
  _assert_nothing_prepared(tmp_path / "tfds")


def test_points_far_off_the_frame_name_the_file(database, tmp_path):
  manual = str(tmp_path / "manual")
  shutil.copytree(database[0], manual)
  name = _rewrite_points(manual, lambda p: p + 1e6)
  with pytest.raises(ValueError, match=rf"{name}: field 'landmarks.points\[0\]'"
                     r": expected points within the .*68 point\(s\) far off"):
    _build(manual, tmp_path / "tfds")
  _assert_nothing_prepared(tmp_path / "tfds")


def test_impossible_points_are_skipped_and_counted_under_skip_bad(
    database, tmp_path):
  manual = str(tmp_path / "manual")
  shutil.copytree(database[0], manual)
  names = sorted(n for n in os.listdir(manual) if n.endswith(".ljson"))
  for name, change in ((names[0], lambda p: np.full_like(p, 7.0)),
                       (names[1], lambda p: p + 1e6)):
    path = os.path.join(manual, name)
    with open(path) as f:
      doc = json.load(f)
    doc["landmarks"]["points"] = change(
        np.asarray(doc["landmarks"]["points"], dtype=np.float64)).tolist()
    with open(path, "w") as f:
      json.dump(doc, f)
  builder = _build(manual, tmp_path / "tfds", skip_bad=True)
  assert len(builder.as_data_source("train")) == 4
  assert builder.info.metadata["skipped_by_reason"] == {"landmarks": 2}


def test_mask_missing_points_keeps_the_frame_for_the_emotion_task(database, tmp_path):
  """--missing_points=mask: the frame is kept with NaN points; load_examples
  marks it has_landmarks False (landmark losses and metrics leave it out)."""
  from tml import input_pipeline as ip
  manual = str(tmp_path / "manual")
  shutil.copytree(database[0], manual)
  name = _first(manual, ".ljson")
  _null_point(manual)
  with open(os.path.join(manual, _first(manual, ".ljson", 1)), encoding="utf-8") as f:
    doc = json.load(f)
  doc["landmarks"]["points"][3] = None
  doc["landmarks"]["points"][40] = None
  with open(os.path.join(manual, _first(manual, ".ljson", 1)), "w") as f:
    json.dump(doc, f)
  # As a constructor keyword (what experiments.run passes), over the config.
  config = KopaczkaThermalConfig(name="test", crop_size=S)
  builder = KopaczkaThermal(config=config, data_dir=str(tmp_path / "tfds"),
                            file_format="array_record", mask_missing_points=True)
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual))
  meta = builder.info.metadata
  assert meta["num_frames"] == 6 and meta["num_skipped"] == 0
  assert (meta["masked_frames"], meta["masked_points"]) == (2, 3)
  arrays = ip.load_examples(builder.as_data_source("train"), sort_by="file_name")
  assert arrays["has_landmarks"].sum() == 4
  masked = ~arrays["has_landmarks"]
  assert sorted(n.split(".")[0] for n in arrays["file_name"][masked]) == sorted(
      n.split(".")[0] for n in (name, _first(manual, ".ljson", 1)))
  nan_points = np.isnan(arrays["landmarks"][masked]).any(axis=-1).sum()
  assert nan_points == 3
  assert np.isfinite(arrays["landmarks"][~masked]).all()
  with pytest.raises(ValueError, match="exclude each other"):
    KopaczkaThermal(config=config, data_dir=str(tmp_path / "x"),
                    mask_missing_points=True, skip_missing_points=True)


def test_run_flags_reach_the_builder_and_a_build_under_other_options_is_refused(
    database, tmp_path):
  from tml import config as config_lib
  from tml import input_pipeline as ip
  from tml import protocol
  from tml import provenance
  manual = str(tmp_path / "manual")
  shutil.copytree(database[0], manual)
  _null_point(manual)
  cfg = config_lib.Config(dataset="kopaczka_thermal", manual_dir=manual,
                          data_dir=str(tmp_path / "tfds"), missing_points="skip")
  kw = protocol.builder_kwargs(cfg)
  assert kw == {"skip_bad": False, "skip_missing_points": True,
                "mask_missing_points": False}
  source = ip.open_source("kopaczka_thermal", data_dir=cfg.data_dir, split="train",
                          manual_dir=manual, builder_kwargs=kw)
  assert len(source) == 5
  mask = protocol.builder_kwargs(cfg.replace(missing_points="mask"))
  with pytest.raises(provenance.DatasetChanged,
                     match="build option mask_missing_points: False -> True"):
    ip.open_source("kopaczka_thermal", data_dir=cfg.data_dir, split="train",
                   manual_dir=manual, builder_kwargs=mask)
  source = ip.open_source("kopaczka_thermal", data_dir=cfg.data_dir, split="train",
                          manual_dir=manual, builder_kwargs=mask, rebuild=True)
  assert len(source) == 6
  with pytest.raises(ValueError, match="only kopaczka_thermal has null points"):
    protocol.builder_kwargs(config_lib.Config(dataset="fer2013", missing_points="mask"))
  with pytest.raises(ValueError, match="generated"):
    protocol.builder_kwargs(config_lib.Config(skip_bad=True))
  with pytest.raises(config_lib.ConfigError, match="--missing_points"):
    config_lib.validate(cfg.replace(missing_points="drop"))
