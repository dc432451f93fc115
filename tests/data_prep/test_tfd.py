"""TFD reader and TFDS builder (``tfd_tml``) on a generated MATLAB v5 file."""
from __future__ import annotations

import collections
import sys

import numpy as np
import pytest
import scipy.io
import tensorflow_datasets as tfds

from data_prep import expression_common as common
from data_prep.label68 import io as label_io
from data_prep.tfd import reader
import data_prep.tfd  # noqa: F401  registers tfd_tml

NUM_LABELLED, NUM_UNLABELLED = 35, 9


def _upright_face(i: int) -> np.ndarray:
  """A face-sized image that is wrong under any flip or transpose.

  Bright bar across the top rows, left part only (a transpose would make it
  a tall bar; a vertical flip puts it at the bottom; a mirror on the right);
  the image index in the bottom-right pixel.
  """
  image = np.full((48, 48), 20, np.uint8)
  image[2:8, 4:30] = 250
  image[47, 47] = i
  return image


def _fixture_arrays(seed=0):
  rng = np.random.default_rng(seed)
  n = NUM_LABELLED + NUM_UNLABELLED
  images = np.stack([_upright_face(i) for i in range(n)])
  labs_ex = np.concatenate([np.arange(NUM_LABELLED) % 7 + 1,
                            -np.ones(NUM_UNLABELLED, int)])
  labs_id = np.concatenate([np.arange(NUM_LABELLED) // 3 + 100,
                            -np.ones(NUM_UNLABELLED, int)])
  folds = np.zeros((n, 5), int)
  folds[:NUM_LABELLED] = rng.choice([0, 1, 1, 1, 2, 3, 3], (NUM_LABELLED, 5))
  # MATLAB keeps labels as double N x 1 columns.
  return dict(images=images, labs_ex=labs_ex[:, None].astype(float),
              labs_id=labs_id[:, None].astype(float),
              folds=folds.astype(float))


def _save(path, arrays):
  # savemat writes column-major data with MATLAB's indexing, i.e. MATLAB
  # would see images(n, row, col) == arrays["images"][n - 1, row - 1, col - 1].
  scipy.io.savemat(str(path), arrays, format="5")
  return path


@pytest.fixture
def mat_file(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  return _save(manual / "TFD_48x48.mat", _fixture_arrays())


def _build(tmp_path, manual_dir, name="tfd_tml", **kwargs):
  builder = tfds.builder(name, data_dir=str(tmp_path / "data"),
                         file_format="array_record", **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir=str(manual_dir)))
  return builder


def _examples(builder, split):
  source = builder.as_data_source(split)
  return {int(ex["id"].decode().split("_")[1]): ex
          for ex in (source[i] for i in range(len(source)))}


def test_fixture_is_matlab_column_major(mat_file):
  raw = scipy.io.loadmat(str(mat_file))
  assert raw["images"].shape == (NUM_LABELLED + NUM_UNLABELLED, 48, 48)
  assert raw["images"].flags.f_contiguous  # MATLAB's memory order on disk


def test_build_counts_labels_folds_and_orientation(tmp_path, mat_file):
  arrays = _fixture_arrays()
  builder = _build(tmp_path, mat_file.parent)
  assert builder.info.features["emotion"].names == [
      "anger", "disgust", "fear", "happy", "sad", "surprise", "neutral"]
  labelled = _examples(builder, "labelled")
  unlabelled = _examples(builder, "unlabelled")
  assert len(labelled) == NUM_LABELLED and len(unlabelled) == NUM_UNLABELLED
  # Per fold: the train/valid/test sets the pipeline will select.
  for k in range(5):
    got = collections.Counter(int(ex["folds"][k]) for ex in labelled.values())
    want = collections.Counter(arrays["folds"][:NUM_LABELLED, k].astype(int))
    assert got == want, k
  for i, ex in labelled.items():
    assert ex["emotion"] == arrays["labs_ex"][i, 0] - 1  # labs_ex 1..7 -> 0..6
    assert ex["identity"] == arrays["labs_id"][i, 0]
    assert ex["folds"].dtype == np.int8
    np.testing.assert_array_equal(ex["folds"], arrays["folds"][i])
  assert {ex["emotion"] for ex in unlabelled.values()} == {-1}
  # Upright: the bar is across the top-left, exactly as generated.
  for i, ex in {**labelled, **unlabelled}.items():
    assert ex["image"].shape == (48, 48, 1)
    np.testing.assert_array_equal(ex["image"][..., 0], _upright_face(i))
  assert not any(ex["has_landmarks"] for ex in labelled.values())
  assert "tensorflow" not in sys.modules


def test_transpose_option(tmp_path):
  arrays = _fixture_arrays()
  arrays["images"] = arrays["images"].transpose(0, 2, 1)  # a (n, col, row) copy
  path = _save(tmp_path / "TFD_48x48.mat", arrays)
  data = reader.load_mat(path, transpose_images=True)
  np.testing.assert_array_equal(data.images[3], _upright_face(3))


@pytest.mark.parametrize("change,expect", [
    (lambda a: a.pop("folds"), r"missing variable\(s\) \['folds'\]"),
    (lambda a: a.update(images=a["images"].transpose(1, 2, 0)),
     "stacked along the last axis"),
    (lambda a: a.update(labs_ex=a["labs_ex"][:-1]), r"'labs_ex': expected 44"),
    (lambda a: a["labs_ex"].__setitem__((0, 0), 1.5), "expected integers"),
])
def test_bad_files_raise(tmp_path, change, expect):
  arrays = _fixture_arrays()
  change(arrays)
  path = _save(tmp_path / "TFD_48x48.mat", arrays)
  with pytest.raises(common.ExpressionDataError, match=expect) as err:
    reader.load_mat(path)
  assert str(path) in str(err.value)


def test_bad_rows_raise_or_are_skipped(tmp_path):
  arrays = _fixture_arrays()
  arrays["labs_ex"][4, 0] = 9
  arrays["folds"][6, 2] = 5
  path = _save(tmp_path / "TFD_48x48.mat", arrays)
  data = reader.load_mat(path)
  with pytest.raises(common.ExpressionDataError,
                     match=r"row 4 \(MATLAB index 5\): labs_ex: expected 1..7"):
    list(reader.records(data))
  policy = common.BadInputPolicy(skip_bad=True)
  kept = list(reader.records(data, policy=policy))
  assert len(kept) == NUM_LABELLED + NUM_UNLABELLED - 2
  assert dict(policy.reasons) == {"labs_ex": 1, "folds": 1}


def test_landmark_join(tmp_path, mat_file):
  ids = [f"tfd_{i}" for i in range(NUM_LABELLED + NUM_UNLABELLED)]
  found = np.arange(len(ids)) % 3 != 0
  points = np.where(found[:, None, None], 24.5, 0.0) * np.ones((1, 68, 2))
  npz = tmp_path / "tfd_landmarks.npz"
  label_io.save_landmarks(npz, dict(ids=np.array(ids), landmarks=points,
                                    found=found), {})
  builder = _build(tmp_path, mat_file.parent, name="tfd_tml/dlib68",
                   landmarks_file=str(npz))
  for split in reader.SPLITS:
    for i, ex in _examples(builder, split).items():
      assert ex["has_landmarks"] == found[i]
      assert ex["landmarks"][0, 0] == (24.5 if found[i] else 0.0)


@pytest.mark.parametrize("content", [
    b"", b"\0" * 200, b"hello world, not a mat file",
    b"\x89PNG\r\n\x1a\n" + b"\x01" * 300,
    b"MATLAB 5.0 MAT-file" + b"\x07" * 200,
], ids=["empty", "zeros", "text", "png", "bad_header"])
def test_a_file_that_is_not_a_mat_names_the_file(tmp_path, content):
  """Issue 11, item 8: scipy's MatReadError (and kin) name no file."""
  path = tmp_path / "TFD_48x48.mat"
  path.write_bytes(content)
  with pytest.raises(common.ExpressionDataError,
                     match="not a readable MATLAB v5 file") as err:
    reader.load_mat(path)
  assert str(path) in str(err.value)
  assert "\n" not in str(err.value)


def test_a_missing_mat_names_the_file(tmp_path):
  path = tmp_path / "TFD_48x48.mat"
  with pytest.raises(common.ExpressionDataError, match="no such file") as err:
    reader.load_mat(path)
  assert str(path) in str(err.value)
