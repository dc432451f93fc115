"""experiments.time_to_accuracy's arithmetic and experiments.bare_step's step."""
from __future__ import annotations

import pytest

from experiments import bare_step
from experiments import time_to_accuracy as tta
from tml import protocol
from tests import test_train as tt


def _records():
  def rec(stage, step, nme, secs, bare):
    return {"step": step, f"{stage}/monitor/nme_inter_pupil": nme,
            f"{stage}/monitor/loop_seconds": secs,
            f"{stage}/monitor/bare_images_per_second": bare}
  return [
      {"step": 10, "stage1/loss/unet": 1.0},
      rec("stage1", 10, 30.0, 5.0, 50.0),
      rec("stage1", 20, 25.0, 7.0, 25.0),      # 40 images in 2 s: 20 img/s
      rec("stage2", 30, 9.0, 4.0, 99.0),       # first of stage 2: compile
      rec("stage2", 40, 5.5, 6.0, 25.0),       # 40 in 2 s: 20 img/s; 20/25
      rec("stage2", 50, 5.0, 10.0, 20.0),      # 40 in 4 s: 10 img/s; 10/20
  ]


def test_paired_ratios_per_interval_after_the_first_record():
  got = tta.paired_ratios(_records(), "stage2", 4)
  assert [(p["step"], p["loop"], p["bare"]) for p in got] == [(40, 20.0, 25.0),
                                                             (50, 10.0, 20.0)]
  assert [p["ratio"] for p in got] == pytest.approx([0.8, 0.5])
  assert tta.paired_ratios(_records()[:4], "stage2", 4) == []    # one record


def test_summarise_hand_computed_case():
  setting = tta.SETTINGS["chu_demo"]
  results = {"config": {"batch_size": 4}, "per_split": [{"train_timing": {
      "stage1": {"seconds": 7.5, "steps": 20, "images_per_second": 80 / 7.5},
      "stage2": {"seconds": 10.0, "steps": 30, "images_per_second": 12.0}}}]}
  s = tta.summarise(setting, results, _records())
  # NME 6 % first reached at step 40: stage 1's last 7 s + stage 2's 6 s.
  assert s["reached"] == {"step": 40, "value": 5.5, "loop_seconds": 13.0}
  assert s["seconds_to_target"] == 13.0
  assert s["final_monitor_value"] == 5.0
  assert s["total_loop_seconds"] == 17.5
  st = s["stages"]["stage2"]
  assert st["paired_ratio"] == {"median": 0.65, "min": 0.5, "max": 0.8, "n": 2}
  assert st["bare_images_per_second"]["median"] == 22.5
  assert st["whole_stage_ratio"] == pytest.approx(12.0 / 22.5, abs=1e-3)
  assert s["stages"]["stage1"]["paired_ratio"]["median"] == pytest.approx(0.8)
  table = tta.markdown([{"setting": "chu_demo", "framework": "jax", "summary": s}])
  assert "13.0 (step 40)" in table and "| 65 (50-80) % | 53 % |" in table
  missed = tta.summarise(dict(setting, target=1.0), results, _records())
  assert missed["reached"] is None and "not reached" in tta.markdown(
      [{"setting": "chu_demo", "framework": "jax", "summary": missed}])


def test_bare_step_times_every_stage_of_the_config(tmp_path, monkeypatch):
  monkeypatch.setattr(protocol, "load", lambda cfg: tt._fake_thermal())
  cfg = tt._cfg(tmp_path)
  out = bare_step.measure(cfg, steps=2, warmup=2, repeats=2)
  assert set(out["stages"]) == {"stage1", "stage2"}
  for st in out["stages"].values():
    lo, hi = st["images_per_second_range"]
    assert 0 < lo <= st["images_per_second"] <= hi
    assert st["first_step_seconds"] > 0 and st["batch_size"] == cfg.batch_size
  assert out["engine"]["framework"] == "jax" and out["split"] == "split_0"
