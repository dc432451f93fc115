"""FER2013 reader and TFDS builder (``fer2013_tml``), read back without TF."""
from __future__ import annotations

import collections
import csv
import gzip
import io
import pathlib
import sys
import time
import zipfile

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

from data_prep import expression_common as common
from data_prep.fer2013 import reader
from data_prep.label68 import io as label_io
import data_prep.fer2013  # noqa: F401  registers fer2013_tml

# The official FER2013 per-class counts (emotion 0..6) per Usage; the README
# gives only the split totals, so the full-build test also recounts them
# from the zip's member names.
OFFICIAL_COUNTS = {
    "train": [3995, 436, 4097, 7215, 4830, 3171, 4965],
    "public_test": [467, 56, 496, 895, 653, 415, 607],
    "private_test": [491, 55, 528, 879, 594, 416, 626],
}
FOLDER_OF = dict(enumerate(reader.EMOTION_NAMES))


def _pixels(seed: int) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (48, 48), np.uint8)


def _write_csv(path, rows, header=("emotion", "pixels", "Usage")):
  """rows: (emotion, pixels (48, 48) array or raw string, usage)."""
  out = io.StringIO()
  writer = csv.writer(out, lineterminator="\n")
  writer.writerow(header)
  for emotion, pixels, usage in rows:
    if not isinstance(pixels, str):
      pixels = " ".join(str(v) for v in np.asarray(pixels).ravel())
    row = {"emotion": emotion, "pixels": pixels, "Usage": usage}
    writer.writerow([row[h] for h in header])
  data = out.getvalue().encode("ascii")
  if str(path).endswith(".gz"):
    data = gzip.compress(data)
  pathlib.Path(path).write_bytes(data)
  return path


def _jpeg(image) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="JPEG", quality=95)
  return buf.getvalue()


def _write_zip(path, members):
  """members: {name: bytes}; directory entries added like the real zip."""
  with zipfile.ZipFile(path, "w") as z:
    for name in sorted({n.rsplit("/", 1)[0] + "/" for n in members}):
      z.writestr(name, b"")
    for name, data in members.items():
      z.writestr(name, data)
  return path


def _small_tree():
  """Nine images across the three splits; ids unique."""
  members = {}
  for i, (usage, top) in enumerate([("Training", "train")] * 5 +
                                   [("PublicTest", "test")] * 2 +
                                   [("PrivateTest", "test")] * 2):
    members[f"{top}/{FOLDER_OF[i % 7]}/{usage}_{1000 + i}.jpg"] = _jpeg(
        _pixels(i))
  return members


def _build(tmp_path, name="fer2013_tml", **kwargs):
  builder = tfds.builder(name, data_dir=str(tmp_path / "data"),
                         file_format="array_record", **kwargs)
  builder.download_and_prepare()
  return builder


def _read_all(builder, split):
  source = builder.as_data_source(split)
  return {ex["id"].decode(): ex for ex in (source[i]
                                           for i in range(len(source)))}


# ------------------------------------------------------------------ csv --

def test_csv_head_shapes_labels_usage(shared_data):
  path = shared_data / "fer2013" / "fer2013_first1166rows.csv.gz"
  with gzip.open(path, "rt") as f:
    rows = list(csv.DictReader(f))
  records = list(reader.read(path))
  assert len(records) == len(rows) == 1166
  assert collections.Counter(r.split for r in records) == collections.Counter(
      reader.USAGE_TO_SPLIT[row["Usage"]] for row in rows)
  assert [r.emotion for r in records] == [int(row["emotion"]) for row in rows]
  assert [r.id for r in records[:2]] == ["row_0", "row_1"]
  first = np.array(rows[0]["pixels"].split(), dtype=np.uint8).reshape(48, 48)
  np.testing.assert_array_equal(records[0].image, first)
  stack = np.stack([r.image for r in records])
  assert stack.shape == (1166, 48, 48) and stack.dtype == np.uint8
  assert stack.min() == 0 and stack.max() == 255


def test_csv_rows_match_zip_jpegs(shared_data):
  """The csv's disgust rows are the zip's disgust JPEGs (to JPEG error)."""
  csv_rows = [r for r in reader.read(
      shared_data / "fer2013" / "fer2013_first1166rows.csv.gz")
              if r.emotion == 1]
  zip_path = shared_data / "fer2013" / "fer2013_images.zip"
  with zipfile.ZipFile(zip_path) as z:
    jpegs = np.stack([
        np.asarray(Image.open(io.BytesIO(z.read(n))).convert("L"),
                   dtype=np.float32)
        for n in z.namelist() if n.startswith("train/disgust/") and
        n.endswith(".jpg")])
  assert len(csv_rows) == 14 and len(jpegs) == 436
  for row in csv_rows:
    diff = np.abs(jpegs - row.image.astype(np.float32)).mean(axis=(1, 2))
    assert diff.min() < 2.5, (row.id, diff.min())


def test_csv_build_reads_back_without_tensorflow(tmp_path, shared_data):
  builder = _build(tmp_path, source=str(
      shared_data / "fer2013" / "fer2013_first1166rows.csv.gz"))
  assert list(builder.info.splits) == ["train"]  # the head has no test rows
  source = tfds.data_source("fer2013_tml", data_dir=str(tmp_path / "data"),
                            split="train", download=False)
  assert len(source) == 1166
  ex = source[0]
  assert ex["image"].shape == (48, 48, 1) and ex["image"].dtype == np.uint8
  assert ex["landmarks"].shape == (68, 2) and not ex["has_landmarks"]
  assert ex["id"].decode().startswith("row_")
  assert builder.info.features["emotion"].names == list(reader.EMOTION_NAMES)
  assert "tensorflow" not in sys.modules


GOOD = (3, _pixels(0), "Training")


@pytest.mark.parametrize("row,header,expect", [
    ((3, "1 2 3", "Training"), None, ["pixels", "expected 2304", "got 3"]),
    ((3, " ".join(["7"] * 2303 + ["1.5"]), "Training"), None,
     ["pixels", "expected integers 0..255", "'1.5'"]),
    ((3, " ".join(["7"] * 2303 + ["256"]), "Training"), None,
     ["pixels", "0..255", "256"]),
    ((7, _pixels(1), "Training"), None, ["emotion", "0..6", "'7'"]),
    ((3, _pixels(1), "Validation"), None, ["Usage", "'Validation'",
                                           "PublicTest"]),
])
def test_bad_csv_rows_raise_naming_file_row_and_expectation(
    tmp_path, row, header, expect):
  path = _write_csv(tmp_path / "fer2013.csv", [GOOD, GOOD, row])
  with pytest.raises(common.ExpressionDataError) as err:
    list(reader.read(path))
  message = str(err.value)
  for text in [str(path), "data row 2", "line 4"] + expect:
    assert text in message, (text, message)


def test_missing_pixels_column(tmp_path):
  path = _write_csv(tmp_path / "fer2013.csv", [GOOD],
                    header=("emotion", "Usage"))
  with pytest.raises(common.ExpressionDataError,
                     match=r"fer2013.csv.*missing column.*pixels"):
    list(reader.read(path))


def test_skip_bad_counts_and_summarises(tmp_path, caplog):
  rows = [GOOD, (3, "1 2", "Training"), GOOD, (9, _pixels(2), "Training"),
          (1, _pixels(3), "PublicTest")]
  path = _write_csv(tmp_path / "fer2013.csv.gz", rows)
  policy = common.BadInputPolicy(skip_bad=True, what="test")
  records = list(reader.read(path, policy=policy))
  assert [r.id for r in records] == ["row_0", "row_2", "row_4"]
  assert policy.num_skipped == 2
  assert dict(policy.reasons) == {"pixels": 1, "emotion": 1}
  with caplog.at_level("WARNING"):
    policy.log_summary()
  assert "skipped 2 bad record(s)" in caplog.text
  assert "data row 3" in caplog.text


# ---------------------------------------------------------- image layout --

@pytest.mark.parametrize("name,data,expect", [
    ("train/angry/Training_9.jpg", b"not a jpeg", "not a readable image"),
    ("train/contempt/Training_9.jpg", None, "unknown class folder 'contempt'"),
    ("train/angry/Validation_9.jpg", None, "unknown file name"),
    ("test/angry/Training_9.jpg", None, "expected it under 'train'/"),
    ("train/angry/Training_9.jpg", "big", "image size 64x64"),
])
def test_bad_zip_members_raise_naming_member(tmp_path, name, data, expect):
  if data is None:
    data = _jpeg(_pixels(9))
  elif data == "big":
    data = _jpeg(np.zeros((64, 64), np.uint8))
  members = _small_tree()
  members[name] = data
  path = _write_zip(tmp_path / "fer2013_images.zip", members)
  with pytest.raises(common.ExpressionDataError) as err:
    list(reader.read(path))
  assert str(path) in str(err.value) and repr(name) in str(err.value)
  assert expect in str(err.value)
  policy = common.BadInputPolicy(skip_bad=True)
  assert len(list(reader.read(path, policy=policy))) == 9
  assert policy.num_skipped == 1


def test_zip_and_folder_give_the_same_examples(tmp_path):
  members = _small_tree()
  members["__MACOSX/train/._x.jpg"] = b"junk"  # ignored, as are dot-files
  zip_path = _write_zip(tmp_path / "fer2013_images.zip", members)
  folder = tmp_path / "folder"
  for name, data in members.items():
    (folder / name).parent.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)
  from_zip = {r.id: r for r in reader.read(zip_path)}
  from_dir = {r.id: r for r in reader.read(folder)}
  assert sorted(from_zip) == sorted(from_dir) and len(from_zip) == 9
  for key, rec in from_zip.items():
    np.testing.assert_array_equal(rec.image, from_dir[key].image)
    assert (rec.split, rec.emotion) == (from_dir[key].split,
                                        from_dir[key].emotion)
  assert from_zip["Training_1002"].emotion == 2  # train/fear/
  assert from_zip["PublicTest_1005"].split == "public_test"


def test_reused_stems_get_their_class(tmp_path):
  members = _small_tree()
  members["train/sad/Training_1000.jpg"] = _jpeg(_pixels(50))  # stem reused
  ids = [e.id for e in reader.list_tree(_write_zip(tmp_path / "f.zip",
                                                   members))]
  assert "Training_1000_angry" in ids and "Training_1000_sad" in ids
  assert "Training_1000" not in ids and len(set(ids)) == len(ids) == 10


def test_manual_dir_lookup_and_landmark_join(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  _write_zip(manual / "fer2013_images.zip", _small_tree())
  assert reader.find_source(manual) == manual / "fer2013_images.zip"
  ids = ["Training_1000", "Training_1001", "PublicTest_1005",
         "PrivateTest_1007"]
  points = np.random.default_rng(0).uniform(0, 47, (4, 68, 2))
  found = np.array([True, False, True, True])
  label_io.save_landmarks(manual / "fer2013_landmarks.npz", dict(
      ids=np.array(ids), landmarks=points * found[:, None, None],
      found=found), {"test": True})
  builder = tfds.builder("fer2013_tml/dlib68", data_dir=str(tmp_path / "d"),
                         file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual)))
  examples = {}
  for split in reader.SPLITS:
    examples.update(_read_all(builder, split))
  assert len(examples) == 9
  for i, key in enumerate(ids):
    assert examples[key]["has_landmarks"] == found[i]
    expected = points[i] if found[i] else np.zeros((68, 2))
    np.testing.assert_allclose(examples[key]["landmarks"], expected,
                               rtol=1e-6)
  # Ids absent from the file: no landmarks.
  assert not examples["Training_1002"]["has_landmarks"]
  assert not examples["Training_1002"]["landmarks"].any()
  assert builder.info.metadata["landmarks_file"].endswith(
      "fer2013_landmarks.npz")


def test_landmark_file_of_another_dataset_is_refused(tmp_path):
  zip_path = _write_zip(tmp_path / "f.zip", _small_tree())
  npz = tmp_path / "other.npz"
  label_io.save_landmarks(npz, dict(ids=np.array(["row_0"]),
                                    landmarks=np.zeros((1, 68, 2)),
                                    found=np.array([False])), {})
  with pytest.raises(Exception, match="none of the .* ids"):
    _build(tmp_path, name="fer2013_tml/dlib68", source=str(zip_path),
           landmarks_file=str(npz))
  with pytest.raises(ValueError, match="use config 'dlib68'"):
    _build(tmp_path, source=str(zip_path), landmarks_file=str(npz))


def test_failed_build_leaves_nothing_loadable(tmp_path):
  rows = [GOOD] * 300 + [(3, "1 2 3", "Training")]
  path = _write_csv(tmp_path / "fer2013.csv", rows)
  data_dir = tmp_path / "data"
  with pytest.raises(Exception, match="data row 300"):
    _build(tmp_path, source=str(path))
  assert not tfds.builder("fer2013_tml", data_dir=str(data_dir)).is_prepared()
  with pytest.raises(Exception):
    tfds.data_source("fer2013_tml", data_dir=str(data_dir), split="train",
                     download=False)
  # Nothing that reads as finished: no dataset_info.json outside the
  # (removed) incomplete.* staging folders.
  infos = [p for p in data_dir.rglob("dataset_info.json")
           if not any(part.startswith("incomplete") for part in p.parts)]
  assert not infos
  # The same file with skip_bad builds, minus the bad row.
  builder = _build(tmp_path, source=str(path), skip_bad=True)
  assert builder.info.splits["train"].num_examples == 300
  assert builder.info.metadata["skipped_bad_records"] == {"train": 1}


# ---------------------------------------------------------- all of it --

def test_full_fer2013_from_zip(tmp_path, shared_data):
  """All 35,887 images: split sizes and class counts (~40-60 s on 2 cores)."""
  zip_path = shared_data / "fer2013" / "fer2013_images.zip"
  # Independent count: member names only.
  expected = collections.defaultdict(lambda: [0] * 7)
  with zipfile.ZipFile(zip_path) as z:
    for name in z.namelist():
      if name.endswith(".jpg"):
        _, folder, file_name = name.split("/")
        split = reader.USAGE_TO_SPLIT[file_name.split("_")[0]]
        expected[split][reader.EMOTION_NAMES.index(folder)] += 1
  assert dict(expected) == OFFICIAL_COUNTS
  start = time.perf_counter()
  _build(tmp_path, source=str(zip_path))
  seconds = time.perf_counter() - start
  sources = tfds.data_source("fer2013_tml", data_dir=str(tmp_path / "data"),
                             download=False)
  sizes = {split: len(s) for split, s in sources.items()}
  assert sizes == {"train": 28709, "public_test": 3589, "private_test": 3589}
  for split, source in sources.items():
    counts = np.bincount([source[i]["emotion"] for i in range(len(source))],
                         minlength=7)
    assert counts.tolist() == OFFICIAL_COUNTS[split], split
  assert "tensorflow" not in sys.modules
  print(f"full FER2013 build: {seconds:.1f} s")
