"""Issue 11, item 3: a changed config in an existing workdir is refused."""
from __future__ import annotations

import json
import logging

import pytest

from tml import run_config_guard as guard
from tml import writers
from tml.config import Config


def _workdir(tmp_path, cfg, *, results=True):
  workdir = tmp_path / "run"
  writers.write_run_info(workdir, cfg.to_dict(), enabled=True)
  if results:
    (workdir / "split_0").mkdir()
    (workdir / "split_0" / "metrics.jsonl").write_text("{}\n")
  return workdir


def test_same_config_and_fresh_workdir_pass(tmp_path):
  cfg = Config(workdir=str(tmp_path / "run"))
  guard.check_workdir(cfg, tmp_path / "run")  # no workdir yet
  workdir = _workdir(tmp_path, cfg)
  guard.check_workdir(cfg, workdir)


def test_changed_fields_are_refused_listing_old_and_new(tmp_path):
  cfg = Config(learning_rate=1.0)
  workdir = _workdir(tmp_path, cfg)
  new = cfg.replace(learning_rate=1e-3, unet_width=8)
  with pytest.raises(guard.ConfigMismatch) as e:
    guard.check_workdir(new, workdir)
  msg = str(e.value)
  assert "--learning_rate: 1.0 -> 0.001" in msg
  assert "--unet_width: 64 -> 8" in msg
  assert "new --workdir" in msg
  # Nothing was rewritten.
  assert json.loads((workdir / "config.json").read_text())["learning_rate"] == 1.0


def test_finished_run_with_more_epochs_is_refused(tmp_path):
  cfg = Config()
  workdir = _workdir(tmp_path, cfg)
  (workdir / "split_0" / "results.json").write_text("{}")
  with pytest.raises(guard.ConfigMismatch, match=r"--stage2_epochs: 60 -> 90"):
    guard.check_workdir(cfg.replace(stage2_epochs=90), workdir)


def test_allowed_fields_pass_with_a_note(tmp_path, caplog):
  cfg = Config()
  workdir = _workdir(tmp_path, cfg)
  new = cfg.replace(log_every_steps=5, checkpoint_every_steps=7,
                    keep_checkpoints=1, num_plot_images=2, eval_batch_size=8,
                    data_dir="/elsewhere", workdir="/moved")
  with caplog.at_level(logging.INFO, logger="tml"):
    guard.check_workdir(new, workdir)
  for field in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints",
                "num_plot_images", "eval_batch_size", "data_dir", "workdir"):
    assert f"{field}: " in caplog.text


def test_splits_may_grow_but_not_shrink(tmp_path, caplog):
  cfg = Config(splits=(0, 1))
  workdir = _workdir(tmp_path, cfg)
  with caplog.at_level(logging.INFO, logger="tml"):
    guard.check_workdir(cfg.replace(splits=(0, 1, 2, 3)), workdir)
  assert "[2, 3] will run" in caplog.text
  with pytest.raises(guard.ConfigMismatch, match=r"--splits: \[0, 1\] -> \[0\]"):
    guard.check_workdir(cfg.replace(splits=(0,)), workdir)
  with pytest.raises(guard.ConfigMismatch, match=r"--splits"):
    guard.check_workdir(cfg.replace(splits=(1, 2)), workdir)


def test_workdir_without_results_takes_the_new_config(tmp_path):
  """A run that died before writing anything (a bad flag) can be fixed."""
  cfg = Config(batch_size=4096)
  workdir = _workdir(tmp_path, cfg, results=False)
  guard.check_workdir(cfg.replace(batch_size=32), workdir)


def test_weights_of_heads_that_are_off_pass_with_a_note(tmp_path, caplog):
  """Seen here: chu.flags changed the emotion weight; the single-task row
  (no emotion head) includes it and could no longer add splits."""
  cfg = Config(emotion_head=False, emotion_weight=1.0, early_stopping_k=5)
  workdir = _workdir(tmp_path, cfg)
  with caplog.at_level(logging.INFO, logger="tml"):
    guard.check_workdir(cfg.replace(emotion_weight=0.1, early_stopping_epsilon=3.0,
                                    map_weight=2.0), workdir)
  assert "emotion_weight: 1.0 -> 0.1 (allowed: no effect, the run has no emotion head)" \
      in caplog.text
  assert "map_weight: 1.0 -> 2.0 (allowed: no effect" in caplog.text
  # The same change with the head on (in either config) changes results.
  with pytest.raises(guard.ConfigMismatch, match="--emotion_weight: 1.0 -> 0.1"):
    guard.check_workdir(cfg.replace(emotion_head=True, emotion_weight=0.1), workdir)
  on = _workdir(tmp_path / "on", Config(emotion_weight=1.0))
  with pytest.raises(guard.ConfigMismatch, match="--emotion_weight"):
    guard.check_workdir(Config(emotion_weight=0.1), on)
  with pytest.raises(guard.ConfigMismatch, match="--unet_weight"):
    guard.check_workdir(Config(unet_weight=2.0), on)


def test_checkpoints_without_a_config_are_refused(tmp_path):
  """Seen here: a killed run saved its SIGTERM checkpoint after its workdir
  was deleted; the next run found split_0/stage2 checkpoints and no
  config.json, and would have resumed another config's training."""
  cfg = Config()
  ckpt = tmp_path / "run" / "init_0" / "stage2" / "checkpoints" / "170"
  ckpt.mkdir(parents=True)
  (ckpt / "state").write_text("x")
  with pytest.raises(guard.ConfigMismatch, match=r"1 file\(s\) of a run .* no config.json"):
    guard.check_workdir(cfg, tmp_path / "run")
  empty = tmp_path / "empty"
  (empty / "split_0").mkdir(parents=True)   # folders alone hold nothing
  guard.check_workdir(cfg, empty)


def test_fields_missing_from_stored_config_count_as_defaults(tmp_path):
  cfg = Config()
  workdir = _workdir(tmp_path, cfg)
  stored = json.loads((workdir / "config.json").read_text())
  del stored["nesterov"]           # a field added after that run
  stored["old_field"] = 3          # a field removed since
  (workdir / "config.json").write_text(json.dumps(stored))
  guard.check_workdir(cfg, workdir)
  with pytest.raises(guard.ConfigMismatch, match=r"--nesterov: False -> True"):
    guard.check_workdir(cfg.replace(nesterov=True), workdir)


def test_unreadable_stored_config_is_refused(tmp_path):
  cfg = Config()
  workdir = _workdir(tmp_path, cfg)
  (workdir / "config.json").write_text("{not json")
  with pytest.raises(guard.ConfigMismatch, match="unreadable"):
    guard.check_workdir(cfg, workdir)


def test_check_start_with_rebuild_removes_the_build(tmp_path, monkeypatch):
  import dataclasses
  from tml import input_pipeline

  @dataclasses.dataclass(frozen=True)
  class WithRebuild(Config):
    rebuild: bool = False

  calls = []
  monkeypatch.setattr(input_pipeline, "remove_build",
                      lambda name, **kw: calls.append((name, kw)))
  cfg = WithRebuild(dataset="fer2013", data_dir=str(tmp_path / "d"))
  workdir = _workdir(tmp_path, cfg)
  guard.check_start(cfg, workdir)
  assert not calls
  guard.check_start(cfg.replace(rebuild=True), workdir)  # allowed field
  assert calls == [("fer2013", dict(data_dir=str(tmp_path / "d"),
                                    config=None, builder_kwargs=None))]


def test_train_and_evaluate_refuses_before_writing(tmp_path):
  """The guard runs before config.json is rewritten or any data is loaded."""
  from tml import train
  workdir = tmp_path / "run"
  cfg = Config(workdir=str(workdir), learning_rate=1.0,
               data_dir=str(tmp_path / "no_data"))
  _workdir(tmp_path, cfg)
  before = (workdir / "config.json").read_text()
  with pytest.raises(guard.ConfigMismatch, match=r"--learning_rate: 1.0 -> 0.001"):
    train.train_and_evaluate(cfg.replace(learning_rate=1e-3))
  assert (workdir / "config.json").read_text() == before
  assert not (tmp_path / "no_data").exists()
