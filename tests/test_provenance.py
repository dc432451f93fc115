"""Issue 11, items 1 and 2: no build that reads as complete when it is not,
and no build reused for inputs other than those it was built from."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import shutil

import pytest

from data_prep import expression_common as common
from tml import input_pipeline as ip
from tml import provenance
from tests.data_prep.test_fer2013 import _pixels, _write_csv

FULL = ([(3, _pixels(i), "Training") for i in range(5)]
        + [(4, _pixels(10 + i), "PublicTest") for i in range(2)]
        + [(5, _pixels(20 + i), "PrivateTest") for i in range(2)])


def _infos(data_dir):
  return [os.path.join(r, f) for r, _, fs in os.walk(data_dir) for f in fs
          if f == "dataset_info.json"]


def _open(data_dir, manual, split="train", **kw):
  return ip.open_source("fer2013", data_dir=data_dir, split=split,
                        manual_dir=manual, **kw)


@pytest.mark.parametrize("text,expect", [
    ("", r"fer2013.csv: empty file"),
    ("emotion,pixels,Usage\n", r"fer2013.csv: no data rows \(header only\)"),
])
def test_empty_or_header_only_csv_fails_naming_the_file(tmp_path, text, expect):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "fer2013.csv").write_text(text)
  data_dir = tmp_path / "data"
  with pytest.raises(common.ExpressionDataError, match=expect):
    _open(data_dir, manual)
  assert not _infos(data_dir)  # nothing that reads as prepared
  _write_csv(manual / "fer2013.csv", FULL)  # fixed: builds, no manual clean-up
  assert len(_open(data_dir, manual)) == 5


def test_training_only_csv_fails_naming_missing_splits_and_is_not_kept(
    tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  _write_csv(manual / "fer2013.csv", FULL[:5])  # Training rows only
  data_dir = tmp_path / "data"
  with pytest.raises(ip.DatasetIncomplete,
                     match=r"no records for split\(s\) public_test, "
                           r"private_test"):
    _open(data_dir, manual)
  assert not _infos(data_dir)
  _write_csv(manual / "fer2013.csv", FULL)  # the full csv replaces it
  sizes = {s: len(_open(data_dir, manual, s))
           for s in ("train", "public_test", "private_test")}
  assert sizes == {"train": 5, "public_test": 2, "private_test": 2}


def test_prepared_partial_build_is_refused(tmp_path):
  """A partial build left by an older tml is not served."""
  import tensorflow_datasets as tfds
  import data_prep.fer2013  # noqa: F401
  csv = _write_csv(tmp_path / "fer2013.csv", FULL[:5])
  builder = tfds.builder("fer2013_tml", data_dir=str(tmp_path / "data"),
                         file_format="array_record", source=str(csv))
  builder.download_and_prepare()
  with pytest.raises(ip.DatasetIncomplete, match=r"no split\(s\) public_test, "
                     r"private_test.*--rebuild"):
    ip.open_source("fer2013", data_dir=tmp_path / "data", split="train")


def test_changed_manual_dir_is_refused_naming_the_difference(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  _write_csv(manual / "fer2013.csv", FULL)
  data_dir = tmp_path / "data"
  assert len(_open(data_dir, manual)) == 5
  assert len(_open(data_dir, manual)) == 5  # unchanged: reused
  # Another folder with other content: refused, naming the file.
  other = tmp_path / "other"
  other.mkdir()
  _write_csv(other / "fer2013.csv", FULL + [(6, _pixels(99), "Training")])
  with pytest.raises(provenance.DatasetChanged) as e:
    _open(data_dir, other)
  msg = str(e.value)
  assert "changed: fer2013.csv (size" in msg and "--rebuild" in msg
  assert f"manual_dir: {manual} -> {other}" in msg
  # A file added to the build's own folder.
  (manual / "notes.txt").write_text("x")
  with pytest.raises(provenance.DatasetChanged,
                     match=r"1 file\(s\) added: notes.txt"):
    _open(data_dir, manual)
  (manual / "notes.txt").unlink()
  # The same files under a new path (a moved folder) are not a change.
  moved = tmp_path / "moved"
  shutil.copytree(manual, moved)  # copy2: sizes and times kept
  assert len(_open(data_dir, moved)) == 5
  # Opening without a manual_dir reads the prepared build.
  assert len(ip.open_source("fer2013", data_dir=data_dir, split="train")) == 5
  # rebuild=True deletes the old build and builds from the current files.
  assert len(_open(data_dir, other, rebuild=True)) == 6
  assert len(_open(data_dir, other)) == 6


def test_replaced_file_with_same_size_is_a_change(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  path = _write_csv(manual / "fer2013.csv", FULL)
  data_dir = tmp_path / "data"
  _open(data_dir, manual)
  st = os.stat(path)
  rows = [(0, r[1], r[2]) for r in FULL]  # same length, other labels
  _write_csv(path, rows)
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  with pytest.raises(provenance.DatasetChanged,
                     match=r"fer2013.csv \(same size, other content"):
    _open(data_dir, manual)


def test_recopied_file_with_new_time_same_content_is_not_a_change(tmp_path, caplog):
  # A fresh machine copies the data without its times (cp without -p): the
  # SHA-256 stored at build time shows nothing changed; the record is then
  # refreshed, so the next open needs no hashing.
  manual = tmp_path / "manual"
  manual.mkdir()
  path = _write_csv(manual / "fer2013.csv", FULL)
  data_dir = tmp_path / "data"
  _open(data_dir, manual)
  st = os.stat(path)
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  with caplog.at_level("INFO", logger="tml"):
    assert len(_open(data_dir, manual)) == 5
  assert "same content (SHA-256); record refreshed" in caplog.text
  records = [os.path.join(r, f) for r, _, fs in os.walk(data_dir) for f in fs
             if f == provenance.RECORD_NAME]
  stored = json.loads(pathlib.Path(records[0]).read_text())
  size, mtime, digest = stored["files"]["fer2013.csv"]
  assert (size, mtime) == (st.st_size, st.st_mtime_ns + 10**9)
  assert digest == hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def test_build_without_record_is_adopted(tmp_path, caplog):
  manual = tmp_path / "manual"
  manual.mkdir()
  _write_csv(manual / "fer2013.csv", FULL)
  data_dir = tmp_path / "data"
  source = _open(data_dir, manual)
  del source
  records = [os.path.join(r, f) for r, _, fs in os.walk(data_dir) for f in fs
             if f == provenance.RECORD_NAME]
  assert len(records) == 1
  os.remove(records[0])
  with caplog.at_level("WARNING"):
    assert len(_open(data_dir, manual)) == 5
  assert "no record of what it was built from" in caplog.text
  assert os.path.exists(records[0])
  (manual / "extra.csv").write_text("x")
  with pytest.raises(provenance.DatasetChanged, match="added: extra.csv"):
    _open(data_dir, manual)


def test_kopaczka_other_manual_dir_is_refused_and_rebuild_rebuilds(tmp_path):
  """The issue's case: built from one frame folder, then pointed at a
  smaller one."""
  from data_prep.kopaczka_thermal import fake_data
  from tests.data_prep.test_kopaczka_thermal import _FALLBACK
  names = sorted(_FALLBACK)
  big, small = tmp_path / "big", tmp_path / "small"
  for out, n in ((big, 4), (small, 2)):
    out.mkdir()
    written = fake_data.write_database(
        str(out), names[:n], [_FALLBACK[k] for k in names[:n]],
        image_format="png8", emotions=["happy"] * n, poses=[0] * n,
        glasses=[False] * n, labels_csv=False)
    fake_data.write_labels(os.path.join(out, "labels.csv"), written)
  data_dir = tmp_path / "data"
  kw = dict(data_dir=data_dir, split="train", config="crop64")
  assert len(ip.open_source("kopaczka_thermal", manual_dir=big, **kw)) == 4
  with pytest.raises(provenance.DatasetChanged) as e:
    ip.open_source("kopaczka_thermal", manual_dir=small, **kw)
  assert "removed" in str(e.value) and "--rebuild" in str(e.value)
  assert len(ip.open_source("kopaczka_thermal", manual_dir=small,
                            rebuild=True, **kw)) == 2


def test_differences_lists_added_removed_changed():
  old = {"manual_dir": "/a", "files": {"x": [1, 1], "y": [2, 2]}, "inputs": {}}
  new = {"manual_dir": "/a", "files": {"x": [3, 1], "z": [1, 1]}, "inputs": {}}
  lines = provenance.differences(old, new)
  assert lines == [
      "manual_dir /a: 1 file(s) added: z",
      "manual_dir /a: 1 file(s) removed: y",
      "manual_dir /a: 1 file(s) changed: x (size 1 -> 3 bytes)"]
  assert provenance.differences(old, old) == []
  assert provenance.differences(old, {"manual_dir": None, "files": {},
                                      "inputs": {}}) == []


def test_rebuild_never_reads_the_old_array_cache(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  _write_csv(manual / "fer2013.csv", FULL)
  data_dir, cache = tmp_path / "data", tmp_path / "cache"
  kw = dict(data_dir=data_dir, split="train", cache_dir=cache,
            manual_dir=manual)
  assert len(ip.load_split("fer2013", **kw)["id"]) == 5
  _write_csv(manual / "fer2013.csv", FULL + [(6, _pixels(99), "Training")])
  _open(data_dir, manual, rebuild=True)
  assert len(ip.load_split("fer2013", **kw)["id"]) == 6
  assert len(list(cache.glob("*.npz"))) == 2


def test_default_manual_dir_is_checked_too(tmp_path):
  """TFDS's <data_dir>/downloads/manual, used when no manual_dir is given."""
  data_dir = tmp_path / "data"
  manual = data_dir / "downloads" / "manual"
  manual.mkdir(parents=True)
  _write_csv(manual / "fer2013.csv", FULL)
  assert len(_open(data_dir, None)) == 5
  _write_csv(manual / "fer2013.csv", FULL + [(6, _pixels(99), "Training")])
  with pytest.raises(provenance.DatasetChanged, match="fer2013.csv"):
    _open(data_dir, None)
