"""tml.monitor: the time-to-accuracy monitor, alone and in the training loop."""
from __future__ import annotations

import json
import pathlib
import types

import numpy as np
import pytest

from tml import config as config_lib
from tml import monitor as monitor_lib
from tml import protocol
from tml import train
from tests import test_train as tt


class _Clock:
  def __init__(self):
    self.t = 0.0

  def __call__(self):
    return self.t


def test_monitor_schedule_keys_and_excluded_time():
  clock = _Clock()

  def evaluate_fn(params):
    clock.t += 2.5                  # the evaluation takes 2.5 s
    return {"emotion_accuracy": params * 10.0, "nme_inter_pupil": None}
  m = monitor_lib.Monitor(3, evaluate_fn, "public_test", clock=clock)
  assert [s for s in range(1, 10) if m.due(s, done=False)] == [3, 6, 9]
  assert m.due(7, done=True)
  m.start_segment()
  out = m(types.SimpleNamespace(params=4.0), loop_seconds=11.0)
  assert out == {"monitor/emotion_accuracy": 40.0, "monitor/loop_seconds": 11.0}
  m(types.SimpleNamespace(params=1.0), loop_seconds=12.0)
  assert m.excluded_seconds == pytest.approx(5.0)
  m.start_segment()
  assert m.excluded_seconds == 0.0
  with pytest.raises(FloatingPointError, match="public_test: monitor/emotion_accuracy"):
    m(types.SimpleNamespace(params=float("nan")), loop_seconds=1.0)
  with pytest.raises(ValueError, match="every_steps=0"):
    monitor_lib.Monitor(0, evaluate_fn, "x")


def test_first_reaching_adds_the_earlier_stages_loop_time():
  records = [
      {"step": 2, "stage1/monitor/nme_inter_pupil": 30.0, "stage1/monitor/loop_seconds": 4.0},
      {"step": 4, "stage1/monitor/nme_inter_pupil": 20.0, "stage1/monitor/loop_seconds": 9.0},
      {"step": 4, "stage1/loss/unet": 1.0},
      {"step": 6, "stage2/monitor/nme_inter_pupil": 12.0, "stage2/monitor/loop_seconds": 3.0},
      {"step": 8, "stage2/monitor/nme_inter_pupil": 7.0, "stage2/monitor/loop_seconds": 6.5},
      {"step": 10, "stage2/monitor/nme_inter_pupil": 5.0, "stage2/monitor/loop_seconds": 9.0},
  ]
  got = monitor_lib.first_reaching(records, "stage2/monitor/nme_inter_pupil", 8.0,
                                   higher_is_better=False)
  assert got == {"step": 8, "value": 7.0, "loop_seconds": 9.0 + 6.5}
  got = monitor_lib.first_reaching(records, "stage1/monitor/nme_inter_pupil", 25.0,
                                   higher_is_better=False)
  assert got == {"step": 4, "value": 20.0, "loop_seconds": 9.0}
  assert monitor_lib.first_reaching(records, "stage2/monitor/nme_inter_pupil", 1.0,
                                    higher_is_better=False) is None
  acc = [{"step": 5, "stage2/monitor/emotion_accuracy": 39.9,
          "stage2/monitor/loop_seconds": 1.0},
         {"step": 9, "stage2/monitor/emotion_accuracy": 40.0,
          "stage2/monitor/loop_seconds": 2.0}]
  assert monitor_lib.first_reaching(acc, "stage2/monitor/emotion_accuracy", 40.0,
                                    higher_is_better=True)["step"] == 9


def _records(workdir, split="split_0"):
  path = pathlib.Path(workdir) / split / "metrics.jsonl"
  return [json.loads(l) for l in path.read_text().splitlines()]


def _final_params(workdir, split="split_0"):
  import orbax.checkpoint as ocp
  from tml import checkpoint
  d = pathlib.Path(workdir) / split / "stage2" / "checkpoints"
  c = checkpoint.Checkpointer(d, read_only=True)
  step = c.latest_step()
  c.close()
  return ocp.StandardCheckpointer().restore(d / str(step) / "state")["params"]


def test_monitor_watches_without_changing_the_run(tmp_path, monkeypatch):
  """Thermal data (no selection set): the monitor evaluates the test set.

  Its last stage-2 value is the reported NME of the last parameters, and the
  run with it on trains the same parameters as the run with it off.
  """
  import jax
  monkeypatch.setattr(protocol, "load", lambda cfg: tt._fake_thermal())
  off = train.train_and_evaluate(tt._cfg(tmp_path / "off"))
  cfg = tt._cfg(tmp_path / "on", monitor_every_steps=2, monitor_bare_steps=2)
  on = train.train_and_evaluate(cfg)
  for a, b in zip(jax.tree.leaves(_final_params(tmp_path / "off" / "run")),
                  jax.tree.leaves(_final_params(cfg.workdir))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert on["nme_inter_pupil"] == off["nme_inter_pupil"]

  recs = _records(cfg.workdir)
  s1 = [r["step"] for r in recs if "stage1/loss/unet" in r]
  s2 = [r["step"] for r in recs if "stage2/loss/landmark" in r]
  mon1 = [r for r in recs if "stage1/monitor/loop_seconds" in r]
  mon2 = [r for r in recs if "stage2/monitor/loop_seconds" in r]
  # Every 2 steps of each stage and at its last step (offsets continue).
  n1, n2 = max(s1), max(s2) - max(s1)
  assert [r["step"] for r in mon1] == sorted(set(range(2, n1 + 1, 2)) | {n1})
  assert [r["step"] - n1 for r in mon2] == sorted(set(range(2, n2 + 1, 2)) | {n2})
  secs = [r["stage2/monitor/loop_seconds"] for r in mon2]
  assert all(b > a for a, b in zip(secs, secs[1:])) and secs[0] > 0
  assert mon2[-1]["stage2/monitor/nme_inter_pupil"] == pytest.approx(
      on["per_split"][0]["nme_inter_pupil"], rel=1e-6)
  assert mon2[-1]["stage2/monitor/emotion_accuracy"] == pytest.approx(
      on["per_split"][0]["emotion_accuracy"])
  assert all(r["stage2/monitor/bare_images_per_second"] > 0 for r in mon2)
  # The loop time the report states leaves the monitor's evaluations out.
  timing = on["per_split"][0]["train_timing"]["stage2"]
  assert secs[-1] == pytest.approx(timing["seconds"], abs=0.05)


def test_torch_run_is_unchanged_by_the_monitor_and_its_bare_steps(tmp_path, monkeypatch):
  """The torch engine's state copy: stepping it leaves the run's own state."""
  pytest.importorskip("torch")
  monkeypatch.setattr(protocol, "load", lambda cfg: tt._fake_thermal())
  kw = dict(framework="torch", stage1_epochs=0, stage2_epochs=1)
  off = train.train_and_evaluate(tt._cfg(tmp_path / "off", **kw))
  cfg = tt._cfg(tmp_path / "on", monitor_every_steps=3, monitor_bare_steps=2, **kw)
  on = train.train_and_evaluate(cfg)
  for k in ("nme_inter_pupil", "emotion_accuracy"):
    assert on[k] == off[k], k
  mon = [r for r in _records(cfg.workdir) if "stage2/monitor/bare_images_per_second" in r]
  assert mon and all(r["stage2/monitor/bare_images_per_second"] > 0 for r in mon)


def test_monitor_on_the_selection_set_agrees_with_selection(tmp_path, monkeypatch):
  """FER-like data: the monitor reads PublicTest, as model selection does."""
  monkeypatch.setattr(protocol, "load", lambda cfg: tt._fake_expression())
  cfg = config_lib.validate(config_lib.Config(
      dataset="fer2013", model="devries", optimizer="sgd", learning_rate=0.01,
      emotion_loss="xent", fc_width=32, splits=(0,), batch_size=16,
      eval_batch_size=8, stage1_epochs=0, stage2_epochs=2, eval_every_epochs=1,
      log_every_steps=1, checkpoint_every_steps=100, monitor_every_steps=3,
      workdir=str(tmp_path / "run")))
  train.train_and_evaluate(cfg)
  recs = _records(cfg.workdir, "init_0")
  select = {r["step"]: r["stage2/select/accuracy"] for r in recs
            if "stage2/select/accuracy" in r}
  mon = {r["step"]: r["stage2/monitor/emotion_accuracy"] for r in recs
         if "stage2/monitor/emotion_accuracy" in r}
  assert sorted(select) == sorted(mon) == [3, 6]      # epoch ends, 3 steps each
  for step in select:
    assert mon[step] == pytest.approx(select[step]), step
  assert not any("monitor/nme_inter_pupil" in k for r in recs for k in r)


def test_monitor_flag_is_validated(tmp_path):
  with pytest.raises(config_lib.ConfigError, match="--monitor_every_steps=-1"):
    tt._cfg(tmp_path, monitor_every_steps=-1)
