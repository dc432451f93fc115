"""The DeVries flag files end to end: Table I settings, TFD's 5 folds, selection."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest

from data_prep.label68 import io as label_io
from tests.data_prep.test_tfd import NUM_LABELLED, NUM_UNLABELLED, _fixture_arrays, _save
from tests.test_devries_learns import _resolve
from tml import config as config_lib
from tml import train

TABLE_I = {  # flag file -> (map head, transformations)
    "devries_fer2013.flags": (True, True),
    "devries_fer2013_baseline.flags": (False, True),
    "devries_fer2013_notrans.flags": (True, False),
    "devries_fer2013_baseline_notrans.flags": (False, False),
}


@pytest.mark.parametrize("flagfile", sorted(TABLE_I))
def test_table_i_settings_differ_only_in_head_and_transformations(flagfile):
  map_head, trans = TABLE_I[flagfile]
  cfg = _resolve(flagfile)
  ref = _resolve("devries_fer2013.flags")
  assert cfg.map_head == map_head and cfg.augment == trans and cfg.ten_crop == trans
  diff = {k for k, v in cfg.to_dict().items() if v != ref.to_dict()[k]}
  allowed = {"map_head", "augment", "ten_crop", "workdir", "dataset_config",
             "landmarks_file"}
  assert diff <= allowed, diff - allowed
  # The standard protocol: select on PublicTest, report PrivateTest (and the
  # last parameters on all 7,178 test images, see train.py).
  assert cfg.selection == "public_test" and cfg.test_sets == "private_test"
  assert cfg.optimizer == "sgd" and cfg.momentum > 0     # the paper's optimiser
  config_lib.validate(cfg)


def test_selection_may_not_overlap_a_reported_set():
  cfg = _resolve("devries_fer2013.flags", test_sets="private_test,public_private")
  with pytest.raises(config_lib.ConfigError, match="overlaps the selection set"):
    config_lib.validate(cfg)


def test_tfd_multitask_five_folds_end_to_end(tmp_path):
  manual = tmp_path / "manual"
  manual.mkdir()
  arrays = _fixture_arrays()
  # Every fold needs a few training images per batch of 8 on 4 devices.
  arrays["folds"][:NUM_LABELLED] = np.tile([1, 1, 1, 1, 2, 3, 3], 5)[:NUM_LABELLED, None]
  _save(manual / "TFD_48x48.mat", arrays)
  ids = [f"tfd_{i}" for i in range(NUM_LABELLED + NUM_UNLABELLED)]
  found = np.arange(len(ids)) % 3 != 0
  rng = np.random.default_rng(0)
  points = rng.uniform(10, 38, (len(ids), 68, 2)) * found[:, None, None]
  npz = tmp_path / "tfd_landmarks.npz"
  label_io.save_landmarks(npz, dict(ids=np.array(ids), landmarks=points, found=found), {})
  cfg = _resolve("devries_tfd.flags", manual_dir=str(manual), landmarks_file=str(npz),
                 data_dir=str(tmp_path / "tfds"), stage2_epochs=1, eval_every_epochs=1,
                 max_steps_per_stage=2, batch_size=8, eval_batch_size=8, fc_width=32,
                 log_every_steps=1, checkpoint_every_steps=100,
                 workdir=str(tmp_path / "run"))
  assert cfg.dataset_config == "dlib68" and cfg.map_head     # multi-task needs labels
  results = train.train_and_evaluate(config_lib.validate(cfg))
  assert results["n_splits"] == 5
  names = [s["split"] for s in results["per_split"]]
  assert names == [f"fold_{r}" for r in range(5)]
  for s in results["per_split"]:
    assert s["selected_by"] == "valid" and s["test_set"] == "test"
    assert s["num_test_images"] == 10          # 2 of every 7 labelled images
  lines = (pathlib.Path(cfg.workdir) / "fold_0" / "metrics.jsonl").read_text()
  rec = [json.loads(l) for l in lines.splitlines()]
  # The map term trains (dlib68 labels present), and the rate is logged.
  assert any(r.get("stage2/loss/maps", 0) > 0 for r in rec)
  assert all(np.isfinite(r["stage2/learning_rate"]) for r in rec
             if "stage2/learning_rate" in r)


def test_schedules_against_hand_computed_values():
  from tml import train_step
  f = train_step.make_schedule(0.1, kind="cosine", steps_per_epoch=10, total_steps=110,
                               warmup_epochs=1.0, final_fraction=0.0)
  assert float(f(0)) == pytest.approx(0.01)     # (0 + 1) / 10 of the peak
  assert float(f(9)) == pytest.approx(0.1)
  assert float(f(10)) == pytest.approx(0.1)     # cosine starts at the peak
  assert float(f(60)) == pytest.approx(0.05, rel=1e-5)    # half way: (1 + cos(pi/2)) / 2
  assert float(f(110)) == pytest.approx(0.0, abs=1e-7)
  s = train_step.make_schedule(0.1, kind="step", steps_per_epoch=10, total_steps=100,
                               step_epochs=3, step_factor=0.5)
  assert [round(float(s(i)), 6) for i in (0, 29, 30, 59, 60, 95)] == [
      0.1, 0.1, 0.05, 0.05, 0.025, 0.0125]
  c = train_step.make_schedule(0.02, kind="constant", steps_per_epoch=10, total_steps=50)
  assert float(c(0)) == float(c(49)) == pytest.approx(0.02)


def test_last_params_on_the_paper_test_set_and_its_backfill(tmp_path, monkeypatch):
  """With PublicTest selection the last parameters are also scored on all
  test images; backfill_last recomputes that from the final checkpoint."""
  from experiments import devries_tables
  from tests.test_train import _fake_expression
  from tml import protocol
  monkeypatch.setattr(protocol, "load", lambda cfg: _fake_expression())
  cfg = config_lib.validate(config_lib.Config(
      dataset="fer2013", model="devries", optimizer="sgd", learning_rate=0.01,
      emotion_loss="xent", fc_width=32, splits=(0, 1), batch_size=16, map_head=False,
      eval_batch_size=8, stage1_epochs=0, stage2_epochs=2, eval_every_epochs=1,
      log_every_steps=1, checkpoint_every_steps=100, workdir=str(tmp_path / "run")))
  results = train.train_and_evaluate(cfg)
  want = [s["evaluations"]["last/public_private"]["emotion_accuracy"]
          for s in results["per_split"]]
  # Strip it, as in runs made before it existed, and backfill.
  work = pathlib.Path(cfg.workdir)
  for name in ("init_0", "init_1"):
    f = work / name / "results.json"
    one = json.loads(f.read_text())
    del one["evaluations"]["last/public_private"]
    f.write_text(json.dumps(one))
  agg = json.loads((work / "results.json").read_text())
  for s in agg["per_split"]:
    del s["evaluations"]["last/public_private"]
  (work / "results.json").write_text(json.dumps(agg))
  assert devries_tables.backfill_last(work) == 2
  again = json.loads((work / "results.json").read_text())
  got = [s["evaluations"]["last/public_private"]["emotion_accuracy"]
         for s in again["per_split"]]
  assert got == pytest.approx(want, abs=1e-6)
  assert again["evaluations"]["last/public_private"]["emotion_accuracy"] == pytest.approx(
      np.mean(want))
  assert devries_tables.backfill_last(work) == 0
