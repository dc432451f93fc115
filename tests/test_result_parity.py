"""experiments.result_parity: TOST against scipy's t-tests, commands, summary."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from scipy import stats

from experiments import result_parity as rp


@pytest.mark.parametrize("d", [[0.1, -0.2, 0.3], [0.9, 1.4, 0.7, 1.1], [-0.5, 0.6]])
def test_paired_tost_is_two_one_sided_one_sample_tests(d):
  m = 1.0
  want = max(stats.ttest_1samp(d, -m, alternative="greater").pvalue,
             stats.ttest_1samp(d, m, alternative="less").pvalue)
  got = rp.tost(np.array(d), None, m)
  assert got["p"] == pytest.approx(want, rel=1e-9)
  assert got["equivalent"] == (want < 0.05)
  # The 90 % interval lies inside +-m exactly when TOST says equivalent.
  inside = -m < got["ci90"][0] and got["ci90"][1] < m
  assert inside == got["equivalent"]


def test_welch_tost_matches_scipy_welch_tests():
  x, y, m = np.array([47.1, 46.2, 48.0]), np.array([46.5, 47.9, 47.0, 46.1]), 1.0
  want = max(stats.ttest_ind(x + m, y, equal_var=False, alternative="greater").pvalue,
             stats.ttest_ind(x - m, y, equal_var=False, alternative="less").pvalue)
  assert rp.tost(x, y, m)["p"] == pytest.approx(want, rel=1e-9)


def test_both_frameworks_get_the_same_command_but_the_framework():
  s = rp.SETTINGS["devries"]
  j = rp.command(s, "jax", [0, 1], pathlib.Path("r"), ["--batch_size=64"])
  t = rp.command(s, "torch", [0, 1], pathlib.Path("r"), ["--batch_size=64"])
  diff = [(a, b) for a, b in zip(j, t) if a != b]
  assert diff == [("--framework=jax", "--framework=torch"),
                  ("--workdir=r/devries/jax", "--workdir=r/devries/torch")]
  assert "--splits=0,1" in j and j[-1] == "--batch_size=64"


def test_summary_and_report_from_results_files(tmp_path):
  s = rp.SETTINGS["chu"]
  vals = {"jax": [6.0, 6.4, 5.8], "torch": [6.1, 6.3, 5.9]}
  for fw, v in vals.items():
    wd = tmp_path / "chu" / fw
    wd.mkdir(parents=True)
    per = [{"nme_inter_pupil": x, "train_timing": {
        "stage1": {"seconds": 10.0, "steps": 50, "images_per_second": 160.0},
        "stage2": {"seconds": 30.0, "steps": 100, "images_per_second": 106.0}}}
           for x in v]
    (wd / "results.json").write_text(json.dumps({"per_split": per}))
  r = rp.summarise(s, tmp_path)
  assert r["paired_difference"]["values"] == pytest.approx([0.1, -0.1, 0.1])
  assert r["frameworks"]["jax"]["mean"] == pytest.approx(np.mean(vals["jax"]))
  # images/s over both stages: (10 * 160 + 30 * 106) / 40.
  assert r["frameworks"]["torch"]["loop_images_per_second"][0] == pytest.approx(119.5)
  rp.write_report([r], tmp_path / "out", "# t")
  text = (tmp_path / "out" / "README.md").read_text()
  assert "TOST (paired)" in text and "torch" in text
  assert rp.summarise(rp.SETTINGS["devries"], tmp_path) is None   # no runs
