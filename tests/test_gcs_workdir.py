"""A ``gs://`` workdir is written through the URL, never into a local ``gs:``.

Issue 11, item 15: ``pathlib.Path("gs://b/r")`` is the local folder
``gs:/b/r``. Here an in-memory fsspec file system stands in for GCS under the
``gs`` protocol (what epath's fsspec backend asks for; gcsfs in real use).
Like GCS it cannot append: opening an object in mode "a" fails (gcsfs would
silently overwrite it).

Orbax writes checkpoint arrays through tensorstore, which has its own gs://
driver and cannot see an fsspec file system, so the checkpoints are not
written to the fake bucket: the test checks that the checkpointer is handed
the exact ``gs://...`` URL and keeps the checkpoints in a local mirror.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import os
import pathlib
import tempfile

import numpy as np
import pytest

from tml import checkpoint as checkpoint_lib
from tml import paths
from tml import predict as predict_lib
from tml import protocol
from tml import run_config_guard
from tml import train
from tml import writers
from tests.test_train import _cfg, _fake_thermal

# fsspec comes with gcsfs (what a gs:// user installs) and, here, with torch.
MemoryFileSystem = pytest.importorskip(
    "fsspec.implementations.memory").MemoryFileSystem

REPO = pathlib.Path(__file__).resolve().parents[1]


class _FakeGCS(MemoryFileSystem):
  """gs:// in memory; no append, like GCS. Records every object written."""

  protocol = ("gs", "gcs")
  store: dict = {}
  pseudo_dirs: list = [""]
  written: list = []

  @classmethod
  def _strip_protocol(cls, path):
    path = path[0] if isinstance(path, list) else path
    for prefix in ("gs://", "gcs://"):
      if path.startswith(prefix):
        path = path[len(prefix):]
    return path.rstrip("/")

  def _open(self, path, mode="rb", **kwargs):
    if "a" in mode:
      raise NotImplementedError(f"GCS objects cannot be appended ({path})")
    if "w" in mode:
      _FakeGCS.written.append(self._strip_protocol(path))
    return super()._open(path, mode, **kwargs)


@pytest.fixture
def fake_gcs(monkeypatch):
  """Registers `_FakeGCS` for gs:// (and gcs://) for the test only."""
  from etils.epath import backend as epath_backend
  from etils.epath import gpath
  registry = importlib.import_module("fsspec.registry")
  monkeypatch.setitem(registry._registry, "gs", _FakeGCS)
  monkeypatch.setitem(registry._registry, "gcs", _FakeGCS)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)
  monkeypatch.setattr(_FakeGCS, "store", {})
  monkeypatch.setattr(_FakeGCS, "pseudo_dirs", [""])
  monkeypatch.setattr(_FakeGCS, "written", [])
  epath_backend.fsspec_backend._get_filesystem.cache_clear()
  yield _FakeGCS
  epath_backend.fsspec_backend._get_filesystem.cache_clear()


def _local_gs_folders(*roots) -> list[str]:
  found = []
  for root in roots:
    for folder, dirs, files in os.walk(root):
      found += [os.path.join(folder, n) for n in dirs + files
                if n in ("gs:", "gs")]
  return found


def _triples_jsonl(path):
  return [(r["step"], k, v) for r in writers.read_metrics(path)
          for k, v in r.items() if k not in ("step", "time")]


def test_train_writes_every_file_through_the_url(tmp_path, monkeypatch,
                                                 fake_gcs):
  run_dir = tmp_path / "cwd"
  run_dir.mkdir()
  monkeypatch.chdir(run_dir)
  tmp_gs = os.path.join(tempfile.gettempdir(), "gs:")
  repo_gs = REPO / "gs:"
  before = (os.path.exists(tmp_gs), repo_gs.exists())
  monkeypatch.setattr(protocol, "load", lambda cfg: _fake_thermal())
  # The checkpointer gets the URL; its files go to a local mirror (orbax's
  # tensorstore cannot reach the fake bucket).
  mirror = tmp_path / "mirror"
  handed = []
  real_checkpointer = checkpoint_lib.Checkpointer

  def checkpointer(directory, **kw):
    handed.append(directory)
    text = os.fspath(directory)
    assert text.startswith("gs://bucket/run/"), text
    return real_checkpointer(mirror / text[len("gs://"):], **kw)
  monkeypatch.setattr(checkpoint_lib, "Checkpointer", checkpointer)

  cfg = _cfg(tmp_path, workdir="gs://bucket/run")
  results = train.train_and_evaluate(cfg)

  store = set(fake_gcs.store)
  for name in ("config.json", "run_info.json", "results.json", "results.md",
               "loss_curves.png", "ced.png", "test_landmarks.png",
               "split_0/metrics.jsonl", "split_0/results.json",
               "split_0/report_data.npz"):
    assert f"bucket/run/{name}" in store, (name, sorted(store))
  events = [k for k in store if k.startswith("bucket/run/split_0/tb/events.")]
  assert len(events) == 2, sorted(store)   # one event file per stage
  assert not [k for k in store if ".tmp" in k], sorted(store)   # no renames
  # The checkpointer saw exactly the URLs (no collapsed gs:/ path).
  assert sorted({os.fspath(d) for d in handed}) == [
      "gs://bucket/run/split_0/stage1/checkpoints",
      "gs://bucket/run/split_0/stage2/checkpoints"]
  assert (mirror / "bucket/run/split_0/stage2/checkpoints").is_dir()
  assert not _local_gs_folders(tmp_path), _local_gs_folders(tmp_path)
  assert (os.path.exists(tmp_gs), repo_gs.exists()) == before

  stored = json.loads(fake_gcs.store["bucket/run/results.json"].getvalue())
  assert stored["nme_inter_pupil"] == pytest.approx(results["nme_inter_pupil"])
  assert json.loads(fake_gcs.store["bucket/run/config.json"].getvalue()) \
      == writers.config_to_dict(cfg.to_dict())
  png = fake_gcs.store["bucket/run/ced.png"].getvalue()
  assert png.startswith(b"\x89PNG")
  # Both logs, read back through the URL, hold the same triples.
  url = "gs://bucket/run/split_0"
  jsonl = _triples_jsonl(f"{url}/metrics.jsonl")
  tb = writers.read_tensorboard_scalars(f"{url}/tb")
  jsonl, tb = sorted(jsonl), sorted(tb)
  assert jsonl and [t[:2] for t in jsonl] == [t[:2] for t in tb]
  np.testing.assert_allclose([t[2] for t in jsonl], [t[2] for t in tb],
                             rtol=1e-6)
  steps = [r["step"] for r in writers.read_metrics(f"{url}/metrics.jsonl")]
  assert steps == sorted(steps) and len(set(steps)) == len(steps)

  # A rerun reads the finished split back from the URL ("already done").
  fake_gcs.written.clear()
  again = train.train_and_evaluate(cfg)
  assert again["nme_inter_pupil"] == pytest.approx(results["nme_inter_pupil"])
  assert "bucket/run/results.json" in fake_gcs.written
  # The config guard reads the URL workdir too: a changed config is refused.
  with pytest.raises(run_config_guard.ConfigMismatch, match="learning_rate"):
    run_config_guard.check_workdir(
        dataclasses.replace(cfg, learning_rate=1.0), "gs://bucket/run")
  assert not _local_gs_folders(tmp_path)


def test_metric_writer_on_a_url_rewrites_and_resumes_exactly(
    tmp_path, monkeypatch, fake_gcs):
  """No append on GCS: whole-object rewrites on flush; a run killed after
  its checkpoint at step 4 (records 5-6 flushed, or not) resumes to the
  triples of an uninterrupted run."""
  monkeypatch.chdir(tmp_path)
  url = "gs://bucket/w"
  log = lambda w, steps, scale: [
      w.write_scalars(s, {"loss": s * scale}, prefix="train") for s in steps]
  want = [(s, "train/loss", float(s)) for s in range(1, 9)]

  dead = writers.MetricWriter(url, resume_step=0, flush_secs=1e9)
  log(dead, range(1, 5), 1.0)
  assert "bucket/w/metrics.jsonl" not in fake_gcs.store   # not flushed yet
  dead.flush()   # what the loop does before the checkpoint of step 4
  log(dead, [5, 6], -1.0)
  dead.flush()   # a time-due flush after the checkpoint; then SIGKILL
  log(dead, [7], -1.0)   # never flushed: lost with the process
  del dead

  with writers.MetricWriter(url, resume_step=4, flush_secs=1e9) as writer:
    log(writer, range(5, 9), 1.0)
  assert _triples_jsonl(f"{url}/metrics.jsonl") == want
  assert writers.read_tensorboard_scalars(f"{url}/tb") == want
  assert len([k for k in fake_gcs.store if "/tb/events." in k]) == 2

  # flush_secs=0: every call is on the URL when it returns.
  with writers.MetricWriter("gs://bucket/x", flush_secs=0) as writer:
    log(writer, [1], 1.0)
    assert _triples_jsonl("gs://bucket/x/metrics.jsonl") == want[:1]
  assert not _local_gs_folders(tmp_path)


def test_run_info_and_pixel_stats_through_the_url(tmp_path, monkeypatch,
                                                  fake_gcs):
  from tml import preprocess
  monkeypatch.chdir(tmp_path)
  writers.write_run_info("gs://bucket/r", {"lr": 1.0}, enabled=True)
  assert json.loads(fake_gcs.store["bucket/r/config.json"].getvalue()) == {
      "lr": 1.0}
  assert "bucket/r/run_info.json" in fake_gcs.store
  stats = preprocess.PixelStats(np.full((2, 2, 1), 3.0, np.float32),
                                np.ones((2, 2, 1), np.float32))
  predict_lib.save_pixel_stats("gs://bucket/r/split_0", stats)
  back = predict_lib.load_pixel_stats("gs://bucket/r/split_0")
  np.testing.assert_array_equal(back.mean, stats.mean)
  assert not [k for k in fake_gcs.store if ".tmp" in k]
  assert not _local_gs_folders(tmp_path)


def test_a_collapsed_url_is_refused(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  collapsed = pathlib.Path("gs://bucket/run/checkpoints")   # gs:/bucket/...
  with pytest.raises(ValueError, match="lost its '//'"):
    checkpoint_lib.Checkpointer(collapsed)
  with pytest.raises(ValueError, match="was lost"):
    paths.as_path(pathlib.Path("gs://bucket/run"))
  assert not (tmp_path / "gs:").exists()
  assert paths.as_path("gs://bucket/run").as_uri() == "gs://bucket/run"
  assert os.fspath(paths.as_path("gs://bucket/run") / "split_0") == \
      "gs://bucket/run/split_0"
