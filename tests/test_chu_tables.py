"""The Chu table rows compare like with like: resolved configs, no training."""
from __future__ import annotations

import dataclasses
import json
import pathlib

import pytest
from absl import app

from experiments import chu_tables as ct
from experiments import run as run_lib
from tml import config as config_lib

ROOT = pathlib.Path("/tmp/rows")
ROW = {r.stem: r for r in ct.ROWS}
PROFILES = tuple(ct.PROFILES)


def _cfg(stem, profile="paper", **kw):
  return ct.resolve_config(ct.row_argv(ROW[stem], ROOT, profile, **kw))


def _diff(a: config_lib.Config, b: config_lib.Config) -> set[str]:
  return {f.name for f in dataclasses.fields(config_lib.Config)
          if getattr(a, f.name) != getattr(b, f.name)}


def _total(c):
  return c.stage1_epochs + c.stage2_epochs


@pytest.mark.parametrize("profile", PROFILES)
def test_every_row_resolves_and_validates(profile):
  from tml import models
  for row in ct.ROWS:
    cfg = config_lib.validate(_cfg(row.stem, profile), known_models=models.model_names())
    assert cfg.workdir == str(ROOT / row.stem)


@pytest.mark.parametrize("profile", PROFILES)
def test_rows_differ_only_in_the_intended_fields(profile):
  c = {stem: _cfg(stem, profile) for stem in ROW}
  s1, s2 = ct.PROFILES[profile].budget
  # Early stopping on / off: only the early-stopping fields.
  d = _diff(c["chu_multitask"], c["chu"])
  assert "early_stopping_k" in d and d <= {"workdir"} | {
      f.name for f in dataclasses.fields(config_lib.Config)
      if f.name.startswith("early_stopping_")}
  assert c["chu"].early_stopping_k > 0 and c["chu_multitask"].early_stopping_k == 0
  # Single vs multi-task: only the emotion head.
  assert _diff(c["chu_unet_single"], c["chu_multitask"]) == {"emotion_head", "workdir"}
  # One stage vs two stages (single task and multi-task): only the stage
  # epochs, with equal totals.
  for one, two in (("chu_unet_single_one_stage", "chu_unet_single"),
                   ("chu_multitask_one_stage", "chu_multitask")):
    assert _diff(c[one], c[two]) == {"stage1_epochs", "stage2_epochs", "workdir"}
    assert c[one].stage1_epochs == 0 and c[two].stage1_epochs == s1
    assert _total(c[one]) == _total(c[two]) == s1 + s2
  # Emotion only vs multi-task: no landmark head and no landmark-heatmap
  # stage 1, for the same total budget.
  assert _diff(c["chu_emotion_single"], c["chu_multitask"]) == {
      "landmark_head", "stage1_epochs", "stage2_epochs", "workdir"}
  assert not c["chu_emotion_single"].landmark_head
  assert c["chu_emotion_single"].stage1_epochs == 0
  assert _total(c["chu_emotion_single"]) == s1 + s2
  # Basic CNN: another model, trained like stage 1 (paper Sec. IV).
  assert _diff(c["chu_basic_cnn"], c["chu_unet_single"]) == {
      "model", "stage1_epochs", "stage2_epochs", "workdir"}
  assert c["chu_basic_cnn"].model == "basic_cnn"
  assert (c["chu_basic_cnn"].stage1_epochs, c["chu_basic_cnn"].stage2_epochs) == (0, s1)


def test_paper_profile_is_what_each_flag_file_runs_alone():
  """The table row = ``python -m experiments.run --flagfile=<row>``."""
  for row in ct.ROWS:
    alone = ct.resolve_config([f"--flagfile={row.flagfile}"])
    assert _diff(alone, _cfg(row.stem)) == {"workdir"}, row.stem
  paper = ct.resolve_config(["--flagfile=chu.flags"])
  assert (paper.stage1_epochs, paper.stage2_epochs) == ct.PROFILES["paper"].budget


def test_quick_profile_changes_only_size_and_epochs():
  quick_file = run_lib.expand_flagfiles(["--flagfile=chu_quick_size.flags"])
  set_by_file = {ct._flag_name(a) for a in quick_file}
  assert set_by_file and set_by_file <= ct.SIZE_FIELDS
  assert not any(ct.is_row_field(n) for n in ct.SIZE_FIELDS)
  quick_sizes = ct.resolve_config(quick_file)
  for row in ct.ROWS:
    paper, quick = _cfg(row.stem, "paper"), _cfg(row.stem, "quick")
    d = _diff(paper, quick)
    assert d <= ct.SIZE_FIELDS | {"stage1_epochs", "stage2_epochs"}, (row.stem, d)
    for name in set_by_file:
      assert getattr(quick, name) == getattr(quick_sizes, name), (row.stem, name)
    assert (quick.stage1_epochs, quick.stage2_epochs) == ct.row_epochs(
        row, ct.PROFILES["quick"].budget)
  # An explicit budget goes through the same kinds.
  c = _cfg("chu_unet_single_one_stage", "quick", budget=(3, 9))
  assert (c.stage1_epochs, c.stage2_epochs) == (0, 12)


def test_early_stopping_has_room_in_every_profile():
  for profile in PROFILES:
    c = _cfg("chu", profile)
    assert c.early_stopping_unit == "epoch"
    assert c.early_stopping_k + 1 < c.stage2_epochs


@pytest.mark.parametrize("extra", [
    ["--flagfile=demo.flags"],            # includes chu.flags: model, heads, ES
    ["--model=basic_cnn"], ["--noemotion_head"], ["--landmark_head=false"],
    ["--early_stopping_k=3"], ["--early_stopping_epsilon", "2"],
    ["--emotion_weight=0.1"], ["--stage1_epochs=2"], ["--stage2_epochs=5"],
    ["--workdir=/tmp/x"], ["--max_steps_per_stage=3"],
])
def test_row_defining_extra_flags_are_refused(extra):
  with pytest.raises(app.UsageError):
    ct.check_extra(extra)


def test_harmless_extra_flags_pass_to_every_row():
  extra = ["--splits=0", "--data_dir=/tmp/tfds", "--image_size=32", "--seed=3"]
  assert ct.check_extra(extra) == extra
  c = _cfg("chu", "quick", extra=extra)
  assert c.splits == (0,) and c.image_size == 32 and c.seed == 3
  assert c.model == "chu_unet" and c.early_stopping_k == 5


def test_tables_show_budgets_baselines_and_early_stopping(tmp_path):
  def write(stem, **res):
    d = tmp_path / stem
    d.mkdir()
    (d / "results.json").write_text(json.dumps(res))
  split = lambda e: {"emotion_stopped_epoch": e, "emotion_stopped_step": None}
  write("chu", nme_inter_pupil=4.0, nme_inter_pupil_std=0.2, n_splits=2,
        emotion_accuracy=65.0, mean_shape_nme_inter_pupil=8.3,
        per_split=[split(7), split(None)])
  write("chu_multitask", nme_inter_pupil=4.3, emotion_accuracy=69.0, n_splits=1,
        mean_shape_nme_inter_pupil=8.3, ridge_nme_inter_pupil=2.69,
        per_split=[split(None)])
  text = ct.tables(tmp_path, "paper")
  lines = text.splitlines()
  es_row = next(l for l in lines if l.startswith("| U-Net, multi-task + early stopping"))
  assert "| 40 + 60 |" in es_row and "4.00 ± 0.20" in es_row and "7, never" in es_row
  mt_row = next(l for l in lines if l.startswith("| U-Net, multi-task |"))
  assert "| off |" in mt_row
  assert any(l.startswith("| basic CNN | 40 (one stage) | not run") for l in lines)
  assert any(l.startswith("| U-Net, single-task emotion | 100 (one stage)") for l in lines)
  ms = [l for l in lines if l.startswith("| mean shape")]
  assert len(ms) == 3 and "8.30" in ms[0]
  ridge = [l for l in lines if l.startswith("| pixel ridge regression")]
  assert "2.69" in ridge[0] and "n/a" in ridge[0]
  for header in ("NME inter-ocular", "FR@10%", "AUC@10%", "emotion acc.",
                 "emotion stopped", "budget"):
    assert header in text
  # Every column of every row is there (a Markdown table needs equal cells).
  for table in text.split("### ")[1:]:
    rows = [l for l in table.splitlines() if l.startswith("|")]
    assert len({l.count("|") for l in rows}) == 1, table
