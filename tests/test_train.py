"""The training loop end to end on tiny data: results, NaN guard, kill and resume."""
from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tml import config as config_lib
from tml import input_pipeline
from tml import protocol
from tml import train

REPO = pathlib.Path(__file__).resolve().parents[1]
N = 16


def _fake_thermal(n=64, seed=0, nan_index=None):
  """A tiny thermal-like dataset: a bright blob at the mean of landmarks."""
  rs = np.random.RandomState(seed)
  base = rs.uniform(4, 12, size=(68, 2)).astype(np.float32)
  lms = base[None] + rs.normal(0, 0.5, size=(n, 68, 2)).astype(np.float32)
  yy, xx = np.mgrid[:N, :N]
  centre = lms.mean(axis=1)
  img = np.exp(-((xx[None] - centre[:, None, None, 0]) ** 2 +
                 (yy[None] - centre[:, None, None, 1]) ** 2) / 8.0)
  img = img[..., None].astype(np.float32)
  if nan_index is not None:
    img[nan_index] = np.nan
  arrays = {"image": img, "landmarks": lms,
            "emotion": (np.arange(n) % 8).astype(np.int32),
            "frontal": np.ones(n, bool), "has_landmarks": np.ones(n, bool)}
  return protocol.Dataset("synthetic_thermal", "thermal",
                          input_pipeline.THERMAL_EMOTIONS, {"train": arrays})


def _cfg(tmp_path, **kw):
  base = dict(image_size=N, unet_depth=2, unet_width=4, fc_width=16,
              splits=(0,), batch_size=8, eval_batch_size=8, stage1_epochs=1,
              stage2_epochs=2, learning_rate=1e-3, log_every_steps=1,
              checkpoint_every_steps=3, early_stopping_k=3,
              early_stopping_epsilon=2.5, num_plot_images=4,
              workdir=str(tmp_path / "run"))
  base.update(kw)
  return config_lib.validate(config_lib.Config(**base))


def test_loop_writes_results_tables_and_plots(tmp_path, monkeypatch):
  monkeypatch.setattr(protocol, "load", lambda cfg: _fake_thermal())
  cfg = _cfg(tmp_path)
  results = train.train_and_evaluate(cfg)
  wd = pathlib.Path(cfg.workdir)
  on_disk = json.loads((wd / "results.json").read_text())
  for key in ("dataset", "model", "nme_inter_pupil", "nme_inter_ocular",
              "mean_shape_nme_inter_pupil", "failure_rate_0.10", "auc_0.10",
              "emotion_accuracy", "per_split"):
    assert key in on_disk, key
  assert on_disk["nme_inter_pupil"] == pytest.approx(results["nme_inter_pupil"])
  assert len(on_disk["per_split"]) == 1
  for name in ("results.md", "config.json", "run_info.json", "loss_curves.png",
               "ced.png", "test_landmarks.png", "split_0/metrics.jsonl"):
    assert (wd / name).is_file(), name
  lines = [json.loads(l) for l in (wd / "split_0/metrics.jsonl").read_text().splitlines()]
  keys = set().union(*lines)
  assert "stage1/loss/unet" in keys and "stage2/loss/landmark" in keys
  assert "stage2/early_stop/criterion" in keys
  # Stage-2 steps continue after stage 1's in the one metrics file.
  s1 = [l["step"] for l in lines if "stage1/loss/unet" in l]
  s2 = [l["step"] for l in lines if "stage2/loss/landmark" in l]
  assert max(s1) < min(s2)
  # A finished split is not trained again on a rerun.
  again = train.train_and_evaluate(cfg)
  assert again["nme_inter_pupil"] == pytest.approx(results["nme_inter_pupil"])


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
  monkeypatch.setattr(protocol, "load", lambda cfg: _fake_thermal(nan_index=5))
  cfg = _cfg(tmp_path, stage1_epochs=0, stage2_epochs=3, checkpoint_every_steps=1)
  with pytest.raises(train.TrainingDiverged, match=r"non-finite .*loss/landmark.* at step \d+"):
    train.train_and_evaluate(cfg)
  ckpt_dir = pathlib.Path(cfg.workdir) / "split_0" / "stage2" / "checkpoints"
  steps = sorted(int(p.name) for p in ckpt_dir.iterdir() if p.name.isdigit())
  from tml import checkpoint
  import jax
  c = checkpoint.Checkpointer(ckpt_dir, read_only=True)
  # Every kept checkpoint holds finite parameters.
  for s in steps:
    meta_state = c.restore(s, _template(cfg))[0]
    assert all(np.all(np.isfinite(np.asarray(x)))
               for x in jax.tree.leaves(meta_state.params)), s
  c.close()


def _template(cfg):
  import jax
  import jax.numpy as jnp
  from tml import models, train_step as ts
  data = _fake_thermal()
  model = train.build_model(cfg, data)
  params = models.init_params(model, (1, N, N, 1), seed=0)
  # The loop always hands the optimiser a schedule (its state has a count).
  tx = ts.make_optimizer("adam", ts.make_schedule(1e-3))
  return ts.init_state(params, tx, jax.random.key(0), cfg.early_stopping_k)


def _run_cmd(workdir, data_dir):
  return [sys.executable, "-m", "experiments.run",
          "--flagfile=demo.flags", f"--workdir={workdir}",
          f"--data_dir={data_dir}", "--dataset_config=small",
          "--image_size=16", "--unet_depth=2", "--unet_width=4", "--fc_width=16",
          "--batch_size=8", "--eval_batch_size=8", "--stage1_epochs=1",
          "--stage2_epochs=2", "--checkpoint_every_steps=2", "--log_every_steps=1",
          "--early_stopping_k=3", "--early_stopping_epsilon=2.5"]


def _env(devices, cache_dir):
  # A persistent compilation cache shared by the subprocess runs: the second
  # and later runs of the same program load it instead of recompiling.
  return dict(os.environ, PYTHONUNBUFFERED="1",
              XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_COMPILATION_CACHE_DIR=str(cache_dir),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


@pytest.fixture(scope="module")
def small_thermal(tmp_path_factory):
  """The synthetic builder's small config, built once for the module."""
  data_dir = tmp_path_factory.mktemp("tfds")
  input_pipeline.open_source("synthetic_thermal", data_dir=str(data_dir),
                             split="train", config="small")
  return data_dir


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, small_thermal, jax_cache):
  """One uninterrupted single-process run on 4 devices, shared by the tests."""
  workdir = tmp_path_factory.mktemp("ref") / "run"
  subprocess.run(_run_cmd(workdir, small_thermal), cwd=REPO, env=_env(4, jax_cache),
                 check=True, capture_output=True, timeout=600)
  return workdir


def _final_params(workdir):
  import orbax.checkpoint as ocp
  from tml import checkpoint
  d = pathlib.Path(workdir) / "split_0" / "stage2" / "checkpoints"
  c = checkpoint.Checkpointer(d, read_only=True)
  step = c.latest_step()
  c.close()
  # Raw arrays without a template: compared leaf by leaf.
  return step, ocp.StandardCheckpointer().restore(d / str(step) / "state")


def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path, small_thermal,
                                                      jax_cache, reference_run):
  env = _env(4, jax_cache)
  killed_dir = tmp_path / "killed"
  proc = subprocess.Popen(_run_cmd(killed_dir, small_thermal), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  # Kill it hard once stage 2 has written a checkpoint (mid-stage).
  ckpts = killed_dir / "split_0" / "stage2" / "checkpoints"
  deadline = time.time() + 600
  while time.time() < deadline and proc.poll() is None:
    if ckpts.is_dir() and any(p.name.isdigit() for p in ckpts.iterdir()):
      break
    time.sleep(0.02)
  assert proc.poll() is None, "run finished before it could be killed"
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert not (killed_dir / "results.json").exists()

  subprocess.run(_run_cmd(killed_dir, small_thermal), cwd=REPO, env=env, check=True,
                 capture_output=True, timeout=600)
  ref = json.loads((reference_run / "results.json").read_text())
  res = json.loads((killed_dir / "results.json").read_text())
  for k in ("nme_inter_pupil", "nme_inter_ocular", "emotion_accuracy"):
    assert res[k] == ref[k], k
  import jax
  s_ref, p_ref = _final_params(reference_run)
  s_res, p_res = _final_params(killed_dir)
  assert s_ref == s_res
  for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_res)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_bad_flag_gives_one_line_error():
  out = subprocess.run([sys.executable, "-m", "experiments.run", "--flagfile=demo.flags",
                        "--image_size=30"], cwd=REPO, capture_output=True, text=True,
                       timeout=120)
  assert out.returncode != 0
  assert "--image_size=30" in out.stderr and "divisible" in out.stderr
  out = subprocess.run([sys.executable, "-m", "experiments.run", "--flagfile=nope.flags"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
  assert out.returncode != 0 and "--flagfile=nope.flags" in out.stderr


def test_two_process_run_matches_single_process(tmp_path, small_thermal, jax_cache,
                                                reference_run):
  """The README's multi-host recipe, on 2 CPU processes x 2 devices (gloo).

  Same global batches as one process with 4 devices: the same results, and
  only process 0 writes logs and reports.
  """
  import re
  import socket
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  base = _run_cmd(tmp_path / "mh", small_thermal)
  procs = [subprocess.Popen(base + ["--multihost", f"--coordinator_address=localhost:{port}",
                                    "--num_processes=2", f"--process_id={i}"],
                            cwd=REPO, env=_env(2, jax_cache), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for i in range(2)]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), outs[0][-3000:] + outs[1][-3000:]
  mh = json.loads((tmp_path / "mh" / "results.json").read_text())
  single = json.loads((reference_run / "results.json").read_text())
  assert mh["num_devices"] == single["num_devices"] == 4
  for k in ("nme_inter_pupil", "nme_inter_ocular", "emotion_accuracy"):
    assert mh[k] == pytest.approx(single[k], rel=1e-3, abs=1e-3), k
  # Process 0 alone prints progress lines.
  progress = re.compile(r"step \d+/\d+ \(")
  assert progress.search(outs[0]) and not progress.search(outs[1])


def _fake_expression(n=48, seed=0):
  """FER-like splits: 48x48 faces whose class sets a bright quadrant."""
  rs = np.random.RandomState(seed)

  def split(m, offset):
    y = (np.arange(m) + offset) % 7
    img = rs.uniform(0, 0.2, size=(m, 48, 48, 1)).astype(np.float32)
    for i, c in enumerate(y):
      img[i, (c % 2) * 24:(c % 2) * 24 + 24, (c // 4) * 24:(c // 4) * 24 + 24] += 0.8
    lms = np.tile(rs.uniform(10, 38, size=(1, 68, 2)), (m, 1, 1)).astype(np.float32)
    has = np.arange(m) % 3 != 0   # a third without landmarks (v_n = 0)
    return {"image": img, "landmarks": lms, "emotion": y.astype(np.int32),
            "has_landmarks": has, "id": np.array([f"x{offset}_{i}" for i in range(m)])}
  return protocol.Dataset("fer2013", "expression", input_pipeline.EXPRESSION_EMOTIONS,
                          {"train": split(n, 0), "public_test": split(16, 1),
                           "private_test": split(16, 2)})


def test_expression_loop_selects_on_public_test_and_reports_private(tmp_path, monkeypatch):
  monkeypatch.setattr(protocol, "load", lambda cfg: _fake_expression())
  cfg = config_lib.validate(config_lib.Config(
      dataset="fer2013", model="devries", optimizer="sgd", learning_rate=0.01,
      emotion_loss="xent", fc_width=32, splits=(0,), batch_size=16,
      eval_batch_size=8, stage1_epochs=0, stage2_epochs=2, eval_every_epochs=1,
      augment=True, ten_crop=True, log_every_steps=1,
      checkpoint_every_steps=100, workdir=str(tmp_path / "run")))
  results = train.train_and_evaluate(cfg)
  split = results["per_split"][0]
  assert split["test_set"] == "private_test"
  # The selected parameters on PrivateTest, and the last ones (which never
  # saw PublicTest) on it too; never the selected ones on PublicTest.
  assert set(split["evaluations"]) == {"selected/private_test", "last/private_test",
                                       "last/public_private"}
  assert split["evaluations"]["last/public_private"]["num_test_images"] == 32
  assert (split["evaluations"]["selected/private_test"]["emotion_accuracy"]
          == split["emotion_accuracy"])
  assert split["selected_by"] == "public_test"
  assert split["best_selection"]["step"] in (3, 6)        # an epoch end
  assert split["nme_inter_pupil"] is None                 # no landmark points
  assert 0.0 <= results["emotion_accuracy"] <= 100.0
  assert split["num_test_images"] == 16
  assert split["split"] == "init_0"      # FER splits are random initialisations
  lines = (pathlib.Path(cfg.workdir) / "init_0" / "metrics.jsonl").read_text()
  assert "stage2/loss/maps" in lines and "stage2/loss/emotion" in lines
  best = pathlib.Path(cfg.workdir) / "init_0" / "stage2" / "best"
  assert any(p.name.isdigit() for p in best.iterdir())


def test_map_head_without_any_landmarks_is_refused(tmp_path, monkeypatch):
  """Issue 11 item 5: FER2013's default config has no landmarks; a map head
  there would train the baseline with loss/maps = 0 and call it multi-task."""
  data = _fake_expression()
  for a in data.arrays.values():
    a["has_landmarks"] = np.zeros_like(a["has_landmarks"])
  monkeypatch.setattr(protocol, "load", lambda cfg: data)
  cfg = config_lib.validate(config_lib.Config(
      dataset="fer2013", model="devries", optimizer="sgd", emotion_loss="xent",
      fc_width=32, splits=(0,), batch_size=16, eval_batch_size=8,
      stage1_epochs=0, stage2_epochs=1, workdir=str(tmp_path / "run")))
  with pytest.raises(config_lib.ConfigError, match="--map_head=true: none of the 48"):
    train.train_and_evaluate(cfg)
  assert not (tmp_path / "run" / "init_0").exists()   # nothing trained
  train.train_and_evaluate(cfg.replace(map_head=False, max_steps_per_stage=1,
                                       log_every_steps=1))


def test_expression_holdout_selection_reports_the_paper_test_set(tmp_path, monkeypatch):
  monkeypatch.setattr(protocol, "load", lambda cfg: _fake_expression())
  cfg = config_lib.validate(config_lib.Config(
      dataset="fer2013", model="devries", optimizer="sgd", learning_rate=0.01,
      lr_schedule="cosine", warmup_epochs=0.5,
      emotion_loss="xent", fc_width=32, splits=(0,), batch_size=16, map_head=False,
      eval_batch_size=8, stage1_epochs=0, stage2_epochs=2, eval_every_epochs=1,
      selection="holdout", holdout_fraction=0.25, log_every_steps=1,
      checkpoint_every_steps=100, workdir=str(tmp_path / "run")))
  results = train.train_and_evaluate(cfg)
  split = results["per_split"][0]
  assert split["selected_by"] == "holdout"
  ev = split["evaluations"]
  assert set(ev) == {f"{w}/{t}" for w in ("selected", "last")
                     for t in ("private_test", "public_private")}
  assert ev["selected/public_private"]["num_test_images"] == 32   # 16 + 16
  assert ev["selected/private_test"]["num_test_images"] == 16
  # 48 training images, a quarter per class held out -> 36 train, 2 steps/epoch
  lines = [json.loads(l) for l in (pathlib.Path(cfg.workdir) / "init_0" /
                                   "metrics.jsonl").read_text().splitlines()]
  steps = sorted({l["step"] for l in lines if "stage2/loss/total" in l})
  assert steps[-1] == 4
  lrs = [l["stage2/learning_rate"] for l in lines if "stage2/learning_rate" in l]
  assert all(np.isfinite(lrs)) and lrs[0] == pytest.approx(0.01)   # warm-up 1 step
  assert lrs[-1] < lrs[0]                                          # cosine decays
  assert any("stage2/select/accuracy" in l for l in lines)
