"""Issue 11: one clear line for bad config and faults; the NaN stop's message."""
from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

from tml import config as config_lib
from tml import input_pipeline
from tml import protocol
from tml import train

from tests.test_train import N, _fake_thermal as _train_fake_thermal


def _fake_thermal(n=64, seed=0, nan=()):
  """tests/test_train.py's tiny thermal dataset, with NaN images at ``nan``."""
  return _train_fake_thermal(n, seed, nan_index=list(nan) or None)


def _cfg(tmp_path, **kw):
  base = dict(image_size=N, unet_depth=2, unet_width=4, fc_width=16,
              splits=(0,), batch_size=8, eval_batch_size=8, stage1_epochs=0,
              stage2_epochs=3, learning_rate=1e-3, log_every_steps=1,
              checkpoint_every_steps=1, num_plot_images=4,
              workdir=str(tmp_path / "run"))
  base.update(kw)
  return config_lib.validate(config_lib.Config(**base))


# -----------------------------------------------------------------------------
# Item 13: the NaN stop names the checkpoint it keeps, or that there is none.
# -----------------------------------------------------------------------------

def test_nan_stop_names_the_kept_checkpoint_step(tmp_path, monkeypatch):
  monkeypatch.setattr(protocol, "load", lambda cfg: _fake_thermal(nan=[5]))
  cfg = _cfg(tmp_path)
  with pytest.raises(train.TrainingDiverged) as err:
    train.train_and_evaluate(cfg)
  msg = str(err.value)
  bad = int(re.search(r"non-finite .* at step (\d+)", msg).group(1))
  assert bad > 1, msg   # the fixture's NaN image is not in the first batch
  ckpt_dir = pathlib.Path(cfg.workdir) / "split_0" / "stage2" / "checkpoints"
  steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
  assert steps and steps[-1] == bad - 1
  assert f"kept: the last good checkpoint, step {bad - 1}, in {ckpt_dir}" in msg
  assert "last good checkpoint is kept" not in msg
  assert "\n" not in msg


def test_nan_stop_says_when_no_checkpoint_exists(tmp_path, monkeypatch):
  monkeypatch.setattr(protocol, "load",
                      lambda cfg: _fake_thermal(nan=range(64)))
  cfg = _cfg(tmp_path, checkpoint_every_steps=100)
  with pytest.raises(train.TrainingDiverged,
                     match=r"at step 1; .*no checkpoint of this stage was "
                           r"written yet") as err:
    train.train_and_evaluate(cfg)
  assert "kept:" not in str(err.value)


# -----------------------------------------------------------------------------
# Item 12: a run killed while its report is drawn redraws it on the rerun.
# -----------------------------------------------------------------------------

class _Killed(BaseException):
  """Stands in for SIGKILL: nothing after it runs, no handler catches it."""


def test_killed_while_plotting_the_rerun_redraws_the_report(tmp_path,
                                                            monkeypatch):
  from tml import report
  monkeypatch.setattr(protocol, "load", lambda cfg: _fake_thermal())
  seen = {}
  real_ced, real_grid = report.plot_ced, report.plot_landmark_grid

  def ced(curves, path, **kw):
    seen.setdefault(pathlib.Path(path).parent.name, []).append(
        {k: np.asarray(v).copy() for k, v in curves.items()})
    return real_ced(curves, path, **kw)

  monkeypatch.setattr(report, "plot_ced", ced)
  ref = _cfg(tmp_path, workdir=str(tmp_path / "ref"), stage2_epochs=1,
             checkpoint_every_steps=100)
  train.train_and_evaluate(ref)

  cfg = ref.replace(workdir=str(tmp_path / "run"))
  wd = pathlib.Path(cfg.workdir)

  def killed(*a, **kw):
    raise _Killed()

  monkeypatch.setattr(report, "plot_landmark_grid", killed)
  with pytest.raises(_Killed):
    train.train_and_evaluate(cfg)
  assert (wd / "split_0" / "results.json").is_file()   # the split is done
  assert not (wd / "test_landmarks.png").exists()
  assert not (wd / "results.json").exists()   # the run is not

  monkeypatch.setattr(report, "plot_landmark_grid", real_grid)
  (wd / "ced.png").unlink()
  train.train_and_evaluate(cfg)   # "already done" for the split
  for name in ("ced.png", "test_landmarks.png", "results.json", "results.md"):
    assert (wd / name).is_file(), name
  # The redrawn CED holds the same curves as the uninterrupted run's.
  want, got = seen["ref"][0], seen["run"][-1]
  assert sorted(want) == sorted(got)
  for k in want:
    np.testing.assert_array_equal(want[k], got[k])


# -----------------------------------------------------------------------------
# Item 9: late config errors move into validation; one line per input error.
# -----------------------------------------------------------------------------

KINDS = {"synthetic_thermal": "thermal", "kopaczka_thermal": "thermal",
         "fer2013": "expression", "tfd": "expression"}


@pytest.mark.parametrize("model,dataset,stage1", [
    ("devries", "synthetic_thermal", 0), ("devries", "kopaczka_thermal", 0),
    ("chu_unet", "fer2013", 40), ("basic_cnn", "tfd", 0)])
def test_a_model_on_the_wrong_dataset_kind_is_a_config_error(model, dataset,
                                                             stage1):
  cfg = config_lib.Config(model=model, dataset=dataset, stage1_epochs=stage1)
  with pytest.raises(config_lib.ConfigError,
                     match=rf"--model='{model}': is built for .* datasets.*"
                           rf"--dataset={dataset} is a .* dataset; use "
                           r"--model="):
    config_lib.validate(cfg, dataset_kinds=KINDS)


def test_the_registry_kinds_match_the_models_table():
  for name in input_pipeline.dataset_names():
    assert input_pipeline.dataset_info(name).kind in (
        set(config_lib.MODEL_DATA_KINDS.values()))
  from tml import models
  assert set(config_lib.MODEL_DATA_KINDS) == set(models.model_names())


def test_matching_kinds_pass():
  config_lib.validate(config_lib.Config(), dataset_kinds=KINDS)
  config_lib.validate(config_lib.Config(model="devries", dataset="fer2013",
                                        stage1_epochs=0), dataset_kinds=KINDS)


def test_batch_not_divisible_by_the_devices_is_a_config_error():
  with pytest.raises(config_lib.ConfigError,
                     match=r"--batch_size=6: .*divisible by the number of "
                           r"devices \(4\)"):
    config_lib.validate(config_lib.Config(batch_size=6, eval_batch_size=8),
                        num_devices=4)
  with pytest.raises(config_lib.ConfigError, match=r"--eval_batch_size=6"):
    config_lib.validate(config_lib.Config(batch_size=8, eval_batch_size=6),
                        num_devices=4)
  config_lib.validate(config_lib.Config(batch_size=8, eval_batch_size=8),
                      num_devices=4)


def test_batch_larger_than_the_training_set_is_refused_before_training(
    tmp_path, monkeypatch):
  from tml import run_config_guard
  monkeypatch.setattr(protocol, "load", lambda cfg: _fake_thermal())
  cfg = _cfg(tmp_path, batch_size=4096, stage2_epochs=1,
             checkpoint_every_steps=100)
  with pytest.raises(config_lib.ConfigError,
                     match=r"--batch_size=4096: larger than the \d+ training "
                           r"images of split_0"):
    train.train_and_evaluate(cfg)
  wd = pathlib.Path(cfg.workdir)
  # The guard runs before the data is read, so only the run info is there:
  # nothing the config guard counts as results, no split, no checkpoint.
  written = {p.name for p in wd.rglob("*")}
  assert written <= run_config_guard._RUN_INFO_FILES, written
  # The fixed command then starts on the same workdir.
  train.train_and_evaluate(cfg.replace(batch_size=8))
  assert (wd / "results.json").is_file()


def test_user_error_finds_input_errors_and_their_causes():
  from data_prep import thermal_common as tc
  from experiments import run
  err = tc.format_error("a.ljson", "landmarks", "68 points", 3)
  assert run.user_error(err) is err
  assert run.error_line(err) == ("error: a.ljson: field 'landmarks': "
                                 "expected 68 points, got 3")
  try:
    try:
      raise err
    except ValueError as e:
      raise RuntimeError("wrapped") from e
  except RuntimeError as wrapped:
    assert run.user_error(wrapped) is err
  full = OSError(28, "No space left on device")
  full.filename = "/runs/x/ckpt"
  assert run.error_line(run.user_error(full)).startswith(
      "error: no space left on /runs/x/ckpt")
  flag = ValueError("--splits: TFD has folds 0..4, got 7")
  assert run.user_error(flag) is flag
  assert run.user_error(ValueError("shapes (3,) and (4,) differ")) is None
  assert run.user_error(RuntimeError("a bug")) is None


def _run(args, tmp_path, devices=1):
  import os
  import subprocess
  import sys
  repo = pathlib.Path(__file__).resolve().parents[1]
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count="
             f"{devices}", JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "experiments.run", "--flagfile=demo.flags",
       f"--workdir={tmp_path / 'run'}", f"--data_dir={tmp_path / 'tfds'}"]
      + args, cwd=repo, env=env, capture_output=True, text=True, timeout=300)


def _assert_one_line(out, *needles):
  assert out.returncode == 1, out.stderr[-3000:]
  lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
  assert "Traceback" not in out.stderr, out.stderr[-3000:]
  assert lines[-1].startswith("error: "), out.stderr[-3000:]
  for needle in needles:
    assert needle in lines[-1], lines[-1]
  # Nothing before it names an exception (library warnings may remain).
  earlier = [ln for ln in lines[:-1]
             if ln.startswith("error") or re.search(r"\b[A-Z]\w*Error\b", ln)]
  assert not earlier, out.stderr[-3000:]


def test_cli_data_error_is_one_line_and_traceback_flag_shows_all(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "TFD_48x48.mat").write_bytes(b"not a MATLAB file at all")
  args = ["--dataset=tfd", "--model=devries", "--stage1_epochs=0",
          f"--manual_dir={manual}"]
  out = _run(args, tmp_path)
  _assert_one_line(out, str(manual / "TFD_48x48.mat"),
                   "not a readable MATLAB v5 file")
  out = _run(args + ["--traceback"], tmp_path)
  assert out.returncode != 0 and "Traceback" in out.stderr
  assert "not a readable MATLAB v5 file" in out.stderr


def test_cli_late_config_errors_come_before_anything_is_written(tmp_path):
  out = _run(["--batch_size=6", "--eval_batch_size=8"], tmp_path, devices=4)
  _assert_one_line(out, "--batch_size=6", "divisible by the number of "
                   "devices (4)")
  out = _run(["--model=devries", "--stage1_epochs=0"], tmp_path)
  _assert_one_line(out, "--model='devries'", "synthetic_thermal")
  assert not (tmp_path / "run").exists()


# -----------------------------------------------------------------------------
# Items 10 and 11: a full disk is one line and loses nothing; metrics.jsonl and
# the TensorBoard events of a run interrupted any number of times hold exactly
# the (step, tag, value) triples of an uninterrupted run.
# -----------------------------------------------------------------------------

def _interrupted_cfg(tmp_path, name):
  # 56 training images, batch 8: 7 steps per stage; stage 2 is steps 8-14.
  return _cfg(tmp_path, workdir=str(tmp_path / name), stage1_epochs=1,
              stage2_epochs=1, checkpoint_every_steps=2)


def _jsonl_triples(workdir):
  from tml import writers
  out = []
  for record in writers.read_metrics(pathlib.Path(workdir) / "split_0" /
                                     "metrics.jsonl"):
    out += [(record["step"], k, v) for k, v in record.items()
            if k not in ("step", "time")]
  return out


def _tb_triples(workdir):
  from tml import writers
  return writers.read_tensorboard_scalars(pathlib.Path(workdir) / "split_0" /
                                          "tb")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  mp = pytest.MonkeyPatch()
  mp.setattr(protocol, "load", lambda cfg: _fake_thermal())
  try:
    cfg = _interrupted_cfg(tmp_path_factory.mktemp("ref"), "ref")
    train.train_and_evaluate(cfg)
  finally:
    mp.undo()
  wd = pathlib.Path(cfg.workdir)
  return {"jsonl": _jsonl_triples(wd), "tb": _tb_triples(wd),
          "results": __import__("json").loads((wd / "results.json").read_text())}


def _after_log(monkeypatch, stage, step, action):
  """Runs ``action`` right after ``stage``'s record at its step ``step``."""
  from tml import writers
  real = writers.Progress.update

  def update(self, s, **fields):
    line = real(self, s, **fields)
    if fields.get("stage") == stage and s == step:
      action()
    return line
  monkeypatch.setattr(writers.Progress, "update", update)


def _sigterm():
  import os
  import signal
  os.kill(os.getpid(), signal.SIGTERM)


def _sigkill():
  raise _Killed()


def _assert_same_as_uninterrupted(wd, ref):
  got = _jsonl_triples(wd)
  steps = [s for s, k, _ in got if k == "stage2/loss/total"]
  assert steps == list(range(8, 15)), steps   # no gap, no duplicate
  assert got == ref["jsonl"]
  assert _tb_triples(wd) == ref["tb"]
  res = __import__("json").loads((pathlib.Path(wd) / "results.json").read_text())
  assert res["nme_inter_pupil"] == ref["results"]["nme_inter_pupil"]


def test_metrics_after_kills_and_reruns_equal_an_uninterrupted_run(
    tmp_path, monkeypatch, uninterrupted):
  monkeypatch.setattr(protocol, "load", lambda cfg: _fake_thermal())
  cfg = _interrupted_cfg(tmp_path, "run")
  wd = pathlib.Path(cfg.workdir)
  # SIGTERM in stage 1: its step's record and checkpoint are kept.
  with monkeypatch.context() as m:
    _after_log(m, "stage1", 3, _sigterm)
    with pytest.raises(train.Preempted, match="SIGTERM at step 3"):
      train.train_and_evaluate(cfg)
  # Killed in stage 2 before its first checkpoint: that record must go.
  with monkeypatch.context() as m:
    _after_log(m, "stage2", 1, _sigkill)
    with pytest.raises(_Killed):
      train.train_and_evaluate(cfg)
  assert not list((wd / "split_0" / "stage2" / "checkpoints").glob("[0-9]*"))
  # A NaN stop at stage-2 step 4 (checkpoint 2 kept, records 1-3 logged).
  real_guard = train._guard

  def guard(state, split, stage):
    if stage.name == "stage2" and int(state.step) == 4:
      raise train.TrainingDiverged("split_0/stage2: non-finite loss/landmark "
                                   "at step 4")
    return real_guard(state, split, stage)
  with monkeypatch.context() as m:
    m.setattr(train, "_guard", guard)
    with pytest.raises(train.TrainingDiverged, match="step 2"):
      train.train_and_evaluate(cfg)
  # SIGTERM in stage 2, then the run that finishes.
  with monkeypatch.context() as m:
    _after_log(m, "stage2", 5, _sigterm)
    with pytest.raises(train.Preempted, match="SIGTERM at step 5"):
      train.train_and_evaluate(cfg)
  train.train_and_evaluate(cfg)
  _assert_same_as_uninterrupted(wd, uninterrupted)


class _FullDisk:
  """A file whose every write fails as on a full disk."""

  def write(self, data):
    import errno
    import os
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  def close(self):
    pass


def test_a_full_disk_is_one_line_and_the_rerun_resumes_exactly(
    tmp_path, monkeypatch, uninterrupted):
  from experiments import run
  from tml import checkpoint as checkpoint_lib
  from tml import writers
  monkeypatch.setattr(protocol, "load", lambda cfg: _fake_thermal())
  cfg = _interrupted_cfg(tmp_path, "run")
  wd = pathlib.Path(cfg.workdir)
  ckpts = wd / "split_0" / "stage2" / "checkpoints"
  # metrics.jsonl cannot be appended at step 10 (stage 2, step 3).
  real_write = writers.MetricWriter.write_scalars

  def write_scalars(self, step, scalars, **kw):
    if step == 10:
      self._jsonl.close()
      self._jsonl = _FullDisk()
    return real_write(self, step, scalars, **kw)
  with monkeypatch.context() as m:
    m.setattr(writers.MetricWriter, "write_scalars", write_scalars)
    with pytest.raises(OSError) as err:
      train.train_and_evaluate(cfg)
  cause = run.user_error(err.value)
  assert cause is not None
  line = run.error_line(cause)
  assert line.startswith(
      f"error: no space left on {wd / 'split_0' / 'metrics.jsonl'}"), line
  assert "rerun the same command" in line and "\n" not in line
  assert sorted(int(p.name) for p in ckpts.glob("[0-9]*")) == [2]
  assert not (wd / wl_name()).exists()   # the lock went with the run

  # orbax's array writer (tensorstore) fails writing checkpoint 4.
  real_save = checkpoint_lib.Checkpointer.save

  def save(self, step, state, meta, **kw):
    if "stage2" in str(self.directory) and step == 4:
      raise ValueError(
          'RESOURCE_EXHAUSTED: Error writing "params/w/0.0" in OCDBT database '
          f'at local file "{self.directory}/4.orbax-checkpoint-tmp/state/'
          'ocdbt.process_0/": Failed writing: "..." Failed to write 20152 '
          "bytes to file 4: No space left on device [os_error_code='28']")
    return real_save(self, step, state, meta, **kw)
  with monkeypatch.context() as m:
    m.setattr(checkpoint_lib.Checkpointer, "save", save)
    with pytest.raises(ValueError) as err:
      train.train_and_evaluate(cfg)
  line = run.error_line(run.user_error(err.value))
  assert line.startswith(f"error: no space left on {ckpts} (writing "
                         "checkpoint 4)"), line
  assert sorted(int(p.name) for p in ckpts.glob("[0-9]*")) == [2]

  train.train_and_evaluate(cfg)   # space freed: resumes from checkpoint 2
  _assert_same_as_uninterrupted(wd, uninterrupted)


def wl_name():
  from tml import workdir_lock
  return workdir_lock.LOCK_NAME


def test_resource_exhausted_is_disk_full_only_with_enospc():
  from experiments import run
  full = ValueError(
      'RESOURCE_EXHAUSTED: Error writing "w/0.0" in OCDBT database at local '
      'file "/runs/x/split_0/stage2/checkpoints/12.orbax-checkpoint-tmp/state.'
      'orbax-checkpoint-tmp/ocdbt.process_0/": Failed writing: "/runs/x/'
      'split_0/stage2/checkpoints/12.orbax-checkpoint-tmp/state.orbax-'
      'checkpoint-tmp/ocdbt.process_0/d/e3c8": Failed to write 201525 bytes '
      "to file 4: No space left on device [os_error_code='28']")
  assert run.user_error(full) is full
  line = run.error_line(full)
  assert line.startswith("error: no space left on /runs/x/split_0/stage2/"
                         "checkpoints (writing checkpoint 12)"), line
  # Wrapped, or replaced by the errors of the cleanup it caused.
  try:
    try:
      raise full
    finally:
      raise RuntimeError("cannot schedule new futures after shutdown")
  except RuntimeError as later:
    assert run.user_error(later) is full
  # Out of device memory is not a full disk (and not a user error).
  oom = ValueError("RESOURCE_EXHAUSTED: Out of memory while trying to "
                   "allocate 68719476736 bytes.")
  assert run.user_error(oom) is None
  bare = OSError(28, "No space left on device")   # a failed write() has no path
  assert run.error_line(bare).startswith("error: no space left on device")
