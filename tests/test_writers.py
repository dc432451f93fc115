"""Tests for tml.writers: JSONL, TensorBoard events, progress line, run info."""
from __future__ import annotations

import io
import json
import math
import os
import pathlib
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from tml import writers

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


def _read_events(path: pathlib.Path):
  """Parses a TFRecord event file by hand (no tensorboard/tensorflow)."""
  # Through tml.writers first, so that tensorboardX does not import torch.
  writers._import_tensorboardx()  # pylint: disable=protected-access
  # pylint: disable=g-import-not-at-top
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c
  # pylint: enable=g-import-not-at-top
  data = path.read_bytes()
  events, pos = [], 0
  while pos < len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("Q", header)
    (header_crc,) = struct.unpack("I", data[pos + 8:pos + 12])
    assert header_crc == masked_crc32c(header)
    payload = data[pos + 12:pos + 12 + length]
    end = pos + 12 + length
    (payload_crc,) = struct.unpack("I", data[end:end + 4])
    assert payload_crc == masked_crc32c(payload)
    events.append(event_pb2.Event.FromString(payload))
    pos = end + 4
  return events


def _scalars(events):
  out = {}
  for event in events:
    for value in event.summary.value:
      out.setdefault(value.tag, []).append((event.step, value.simple_value))
  return out


def test_jsonl_and_tensorboard(tmp_path):
  with writers.MetricWriter(tmp_path) as writer:
    writer.write_scalars(1, {"loss": 0.5, "lr": np.float32(1e-4),
                             "count": np.int64(7)}, prefix="train")
    writer.write_scalars(2, {"loss": float("nan"), "nme": float("inf"),
                             "gap": -math.inf}, prefix="train/")
    writer.write_scalars(2, {"nme": 4.25}, prefix="eval")
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 3
  records = [json.loads(line) for line in lines]  # strict JSON, every line
  for line in lines:
    assert "NaN" not in line and "Infinity" not in line
  assert records[0]["step"] == 1 and isinstance(records[0]["time"], float)
  assert records[0]["train/loss"] == 0.5
  assert records[0]["train/lr"] == pytest.approx(1e-4)
  assert records[0]["train/count"] == 7
  assert records[1]["train/loss"] == "nan"
  assert records[1]["train/nme"] == "inf"
  assert records[1]["train/gap"] == "-inf"
  assert records[2] == {"step": 2, "time": records[2]["time"], "eval/nme": 4.25}
  back = writers.read_metrics(tmp_path / "metrics.jsonl")
  assert math.isnan(back[1]["train/loss"]) and back[1]["train/nme"] == math.inf

  (event_file,) = (tmp_path / "tb").glob("events.out.tfevents.*")
  scalars = _scalars(_read_events(event_file))
  assert scalars["train/loss"][0] == (1, 0.5)
  assert scalars["train/loss"][1][0] == 2
  assert math.isnan(scalars["train/loss"][1][1])
  assert scalars["eval/nme"] == [(2, 4.25)]
  assert scalars["train/lr"][0][1] == pytest.approx(1e-4)


def test_reserved_names_rejected(tmp_path):
  with writers.MetricWriter(tmp_path) as writer:
    with pytest.raises(ValueError):
      writer.write_scalars(1, {"step": 3})


def test_disabled_writer_writes_nothing(tmp_path):
  writer = writers.MetricWriter(tmp_path / "run", enabled=False)
  writer.write_scalars(1, {"loss": 1.0})
  writer.write_text(1, {"config": "x"})
  writer.write_images(1, {"img": np.zeros((4, 4))})
  writer.flush()
  writer.close()
  assert not (tmp_path / "run").exists()


def test_resume_purges_later_records_and_torn_line(tmp_path):
  with writers.MetricWriter(tmp_path) as writer:
    for step in (10, 20, 30):
      writer.write_scalars(step, {"loss": step / 10})
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 40, "lo')  # killed mid-write
  with writers.MetricWriter(tmp_path, purge_step=20) as writer:
    writer.write_scalars(20, {"loss": 9.0})
  steps = [(r["step"], r["loss"])
           for r in writers.read_metrics(tmp_path / "metrics.jsonl")]
  assert steps == [(10, 1.0), (20, 9.0)]


def test_images_and_text(tmp_path):
  with writers.MetricWriter(tmp_path) as writer:
    writer.write_images(3, {"grid": np.random.rand(8, 10, 3),
                            "grey": np.random.rand(8, 10),
                            "batch": np.random.rand(2, 8, 10, 1)})
    writer.write_text(3, {"config": "lr: 1e-4"})
  (event_file,) = (tmp_path / "tb").glob("events.out.tfevents.*")
  tags = {v.tag for e in _read_events(event_file) for v in e.summary.value}
  assert {"grid", "grey", "config/text_summary"} <= tags
  assert any(t.startswith("batch") for t in tags)


class FakeClock:

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_progress_rate_eta_and_throttling():
  clock, out = FakeClock(), io.StringIO()
  progress = writers.Progress(1000, every_seconds=10, stream=out,
                              batch_size=32, clock=clock, window_seconds=30)
  clock.now += 25.0  # first step: compilation
  assert progress.update(1, loss=0.5) is not None  # >= 10 s since start
  assert progress.rate() is None
  lines = []
  for step in range(2, 201):  # then 8 steps/s (binary-exact clock ticks)
    clock.now += 0.125
    line = progress.update(step, loss=1.0 / step, stage="s1")
    if line:
      lines.append((step, line))
  # At most one line per 10 s of clock: 24.875 s of steps -> two lines.
  assert [s for s, _ in lines] == [81, 161]
  step, line = lines[0]
  # The 25 s compile step is out of the rate: exactly 8 steps/s.
  assert progress.rate() == pytest.approx(8.0)
  assert line.startswith("step 81/1000 (8.1%) | 8 steps/s 256 img/s")
  assert "elapsed 0:00:35" in line
  assert "ETA 0:01:55" in line  # 919 steps at 8 steps/s
  assert line.endswith("| loss 0.01235 stage s1")
  assert out.getvalue().splitlines()[1] == line


def test_progress_final_step_always_prints_and_window_slides():
  clock, out = FakeClock(), io.StringIO()
  progress = writers.Progress(50, every_seconds=1000, stream=out, clock=clock,
                              window_seconds=5, initial_step=10)
  for step in range(11, 31):   # 1 step/s
    clock.now += 1.0
    progress.update(step)
  for step in range(31, 50):   # then 4 steps/s
    clock.now += 0.25
    assert progress.update(step) is None
  assert progress.rate() == pytest.approx(4.0)
  clock.now += 0.25
  line = progress.update(50)
  assert line.startswith("step 50/50 (100.0%) | 4 steps/s |")
  assert "ETA 0:00:00" in line


def test_format_duration():
  assert writers.format_duration(0) == "0:00:00"
  assert writers.format_duration(3725.4) == "1:02:05"
  assert writers.format_duration(100 * 3600) == "100:00:00"
  assert writers.format_duration(float("inf")) == "--:--:--"
  assert writers.format_duration(None) == "--:--:--"


def test_disabled_progress_prints_nothing():
  out = io.StringIO()
  progress = writers.Progress(10, every_seconds=0, stream=out, enabled=False)
  assert progress.update(10) is None
  assert out.getvalue() == ""


_CHILD = textwrap.dedent("""
    import json, sys
    from tml import writers
    path = writers.write_run_info(sys.argv[1], {"lr": 1e-4, "model": "unet",
                                                "sizes": (1, 2)})
    w = writers.MetricWriter(sys.argv[1])
    w.write_scalars(1, {"loss": 1.0})
    w.close()
    heavy = ("torch", "tensorflow", "tensorboard")
    print(json.dumps({"path": str(path),
                      "modules": [m for m in heavy if m in sys.modules]}))
""")


def test_run_info_and_no_torch_import(tmp_path):
  # A fresh interpreter: other tests may import torch in this one.
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
  out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=120,
                       cwd=tmp_path)
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["modules"] == []
  assert json.loads((tmp_path / "config.json").read_text()) == {
      "lr": 1e-4, "model": "unet", "sizes": [1, 2]}
  info = json.loads((tmp_path / "run_info.json").read_text())
  assert result["path"] == str(tmp_path / "run_info.json")
  for key in ("timestamp", "versions", "devices", "process_count",
              "process_index", "hostname", "argv", "git", "backend",
              "config_sha256", "cpu_model", "env"):
    assert key in info, key
  # The XLA flags in force (experiments.run's CPU defaults, the user's own)
  # are recorded beside the results.
  assert info["env"].get("XLA_FLAGS") == env.get("XLA_FLAGS"), info["env"]
  for package in ("python", "jax", "jaxlib", "flax", "optax",
                  "orbax-checkpoint", "numpy", "tensorflow-datasets", "grain",
                  "chex", "torch"):
    assert package in info["versions"], package
  assert info["versions"]["jax"] == __import__("jax").__version__
  assert info["process_count"] == 1
  assert len(info["devices"]) == 4  # the conftest's fake devices
  assert set(info["devices"][0]) == {"id", "platform", "device_kind",
                                     "process_index"}
  assert info["devices"][0]["platform"] == "cpu"
  # The tml checkout is a git repo: a 40-hex commit and a dirty flag.
  assert len(info["git"]["commit"]) == 40
  assert isinstance(info["git"]["dirty"], bool)


def test_git_info_outside_a_repo(tmp_path):
  assert writers.git_info(tmp_path) is None


def test_write_run_info_disabled(tmp_path):
  assert writers.write_run_info(tmp_path / "x", {}, enabled=False) is None
  assert not (tmp_path / "x").exists()


def test_config_to_dict_dataclass():
  import dataclasses  # pylint: disable=g-import-not-at-top

  @dataclasses.dataclass(frozen=True)
  class Cfg:
    name: str = "chu"
    lr: float = 1e-4
    path: pathlib.Path = pathlib.Path("/data")
    sizes: tuple[int, ...] = (64, 128)

  assert writers.config_to_dict(Cfg()) == {
      "name": "chu", "lr": 1e-4, "path": "/data", "sizes": [64, 128]}


# ----------------------------------------------------------------------------
# Issue 11, items 10 and 11: exact logs after kills; a full disk names the file.
# ----------------------------------------------------------------------------


def _jsonl_triples(path):
  return [(r["step"], k, v) for r in writers.read_metrics(path)
          for k, v in r.items() if k not in ("step", "time")]


def _log(writer, steps, scale=1.0):
  for step in steps:
    writer.write_scalars(step, {"loss": step * scale, "lr": 0.5},
                         prefix="train")


def _want(steps, scale=1.0):
  return [t for s in steps for t in ((s, "train/loss", s * scale),
                                     (s, "train/lr", 0.5))]


def test_every_call_is_on_disk_when_it_returns(tmp_path):
  """A SIGKILL right after a log call loses nothing, TensorBoard included
  (tensorboardX's SummaryWriter queues events for up to flush_secs)."""
  writer = writers.MetricWriter(tmp_path)
  _log(writer, [1, 2, 3])
  # Not closed, not flushed: read as a killed process leaves it.
  assert _jsonl_triples(tmp_path / "metrics.jsonl") == _want([1, 2, 3])
  assert writers.read_tensorboard_scalars(tmp_path / "tb") == _want([1, 2, 3])
  writer.close()


def test_resume_keeps_the_checkpoint_step_and_relogs_the_rest(tmp_path):
  """Checkpoint at step 4, killed after logging step 6: steps 1-4 stay
  (step 4 was logged before its checkpoint), 5-6 are logged again."""
  dead = writers.MetricWriter(tmp_path)
  _log(dead, range(1, 7), scale=-1.0)   # the dead run's values
  with writers.MetricWriter(tmp_path, resume_step=4) as writer:
    _log(writer, [5, 6])
  want = _want(range(1, 5), scale=-1.0) + _want([5, 6])
  assert _jsonl_triples(tmp_path / "metrics.jsonl") == want
  assert writers.read_tensorboard_scalars(tmp_path / "tb") == want
  dead.close()


def test_a_run_killed_before_its_first_checkpoint_leaves_no_lines(tmp_path):
  with writers.MetricWriter(tmp_path) as first:   # stage 1, steps 1-3: done
    _log(first, [1, 2, 3])
  with writers.MetricWriter(tmp_path, resume_step=3) as dead:  # stage 2 dies
    _log(dead, [4, 5], scale=-1.0)
  with writers.MetricWriter(tmp_path, resume_step=3) as rerun:  # afresh
    _log(rerun, [4, 5, 6])
  want = _want(range(1, 7))
  assert _jsonl_triples(tmp_path / "metrics.jsonl") == want
  assert writers.read_tensorboard_scalars(tmp_path / "tb") == want
  # Each run wrote its own event file, in the order TensorBoard sorts them.
  files = sorted((tmp_path / "tb").glob("events.out.tfevents.*"))
  assert len(files) == 3


def test_purge_step_keeps_tensorboardx_meaning(tmp_path):
  with writers.MetricWriter(tmp_path) as writer:
    _log(writer, [1, 2, 3])
  with writers.MetricWriter(tmp_path, purge_step=3):
    pass
  assert [s for s, _, _ in _jsonl_triples(tmp_path / "metrics.jsonl")] == [
      1, 1, 2, 2]
  with pytest.raises(ValueError):
    writers.MetricWriter(tmp_path, purge_step=3, resume_step=2)


def test_torn_event_record_is_dropped(tmp_path):
  with writers.MetricWriter(tmp_path) as writer:
    _log(writer, [1, 2])
    path = writer.event_file
  data = path.read_bytes()
  path.write_bytes(data[:-7])   # killed mid-record
  assert writers.read_tensorboard_scalars(tmp_path / "tb") == _want([1])


class _FullDisk:
  """Stands in for a file on a full disk."""

  def write(self, data):
    import errno
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  def close(self):
    pass


def test_a_full_disk_raises_naming_the_file(tmp_path):
  import errno
  with writers.MetricWriter(tmp_path) as writer:
    _log(writer, [1])
    writer._jsonl.close()
    writer._jsonl = _FullDisk()
    with pytest.raises(OSError) as err:
      _log(writer, [2])
    assert err.value.errno == errno.ENOSPC
    assert err.value.filename == str(tmp_path / "metrics.jsonl")
  with writers.MetricWriter(tmp_path, resume_step=1) as writer:
    writer._tb._file.close()
    writer._tb._file = _FullDisk()
    with pytest.raises(OSError) as err:
      _log(writer, [2])
    assert err.value.errno == errno.ENOSPC
    assert err.value.filename == str(writer.event_file)


def test_run_info_on_a_full_disk_keeps_the_old_file(tmp_path, monkeypatch):
  import errno
  writers.write_run_info(tmp_path, {"lr": 1.0}, enabled=True)
  real = pathlib.Path.write_text

  def write_text(self, *a, **kw):
    if self.name.endswith(".tmp"):
      real(self, "{partial")   # what a full disk leaves
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real(self, *a, **kw)
  monkeypatch.setattr(pathlib.Path, "write_text", write_text)
  with pytest.raises(OSError) as err:
    writers.write_run_info(tmp_path, {"lr": 2.0}, enabled=True)
  assert err.value.errno == errno.ENOSPC
  assert err.value.filename == str(tmp_path / "config.json")
  assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 1.0}
  assert not list(tmp_path.glob("*.tmp"))
