"""Tests for tml.report: results.json, aggregation, Markdown, plots."""
from __future__ import annotations

import json
import math
import statistics

import numpy as np
from PIL import Image
import pytest

from tml import report
from tml import writers

EMOTIONS = ("angry", "contempt", "disgust", "fear", "happy", "sad",
            "surprise", "neutral")


def test_results_json_nan_to_null_sorted_indented(tmp_path):
  results = {"nme": np.float32(4.5), "fr": float("nan"), "auc": math.inf,
             "n": np.int64(3), "ok": np.bool_(True), "name": "unet",
             "per": {"b": 1, "a": [1.0, float("-inf")]},
             "arr": np.array([[1, 2], [3, 4]]), "scalar": np.array(2.5)}
  path = report.write_results(tmp_path, results)
  assert path == tmp_path / "results.json"
  text = path.read_text()
  assert text.startswith('{\n  "arr"')  # sorted keys, indent 2
  assert text.index('"a"') < text.index('"b"')
  assert json.loads(text) == {
      "nme": 4.5, "fr": None, "auc": None, "n": 3, "ok": True,
      "name": "unet", "per": {"a": [1.0, None], "b": 1},
      "arr": [[1, 2], [3, 4]], "scalar": 2.5}


def test_results_json_is_atomic(tmp_path):
  report.write_results(tmp_path, {"nme": 4.0})
  before = (tmp_path / "results.json").read_bytes()
  with pytest.raises(TypeError):
    report.write_results(tmp_path, {"nme": 5.0, "model": object()})
  assert (tmp_path / "results.json").read_bytes() == before
  assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def _splits(n=5, seed=0):
  rng = np.random.default_rng(seed)
  return [{
      "name": "unet_mt",
      "nme_inter_pupil": float(rng.uniform(3, 6)),
      "fr_10": float(rng.uniform(0, 0.1)),
      "steps": int(rng.integers(100, 200)),
      "nme_per_emotion": {e: float(rng.uniform(2, 8)) for e in EMOTIONS},
      "nme_per_landmark": rng.uniform(1, 9, size=68).tolist(),
      "seed": i,  # differs: aggregated as a number too
      "only_here": 1.0 if i == 0 else None,
      "flag": True,
  } for i in range(n)]


def test_aggregate_splits_against_hand_computation():
  splits = _splits()
  splits[2].pop("fr_10")  # a key missing from one split is dropped
  out = report.aggregate_splits(splits)
  ipd = [s["nme_inter_pupil"] for s in splits]
  assert out["nme_inter_pupil"] == pytest.approx(statistics.mean(ipd))
  assert out["nme_inter_pupil_std"] == pytest.approx(statistics.stdev(ipd))
  steps = [s["steps"] for s in splits]
  assert out["steps"] == pytest.approx(statistics.mean(steps))
  assert "fr_10" not in out and "fr_10_std" not in out
  for e in EMOTIONS:
    values = [s["nme_per_emotion"][e] for s in splits]
    assert out["nme_per_emotion"][e] == pytest.approx(statistics.mean(values))
    assert out["nme_per_emotion_std"][e] == pytest.approx(
        statistics.stdev(values))
  assert set(out["nme_per_emotion"]) == set(EMOTIONS)
  for k in (0, 30, 67):
    values = [s["nme_per_landmark"][k] for s in splits]
    assert out["nme_per_landmark"][k] == pytest.approx(statistics.mean(values))
    assert out["nme_per_landmark_std"][k] == pytest.approx(
        statistics.stdev(values))
  assert out["name"] == "unet_mt" and out["flag"] is True
  assert math.isnan(out["only_here"])  # None in some splits: not averaged away
  assert out["n_splits"] == 5
  assert out["per_split"][0]["nme_inter_pupil"] == splits[0]["nme_inter_pupil"]
  json.dumps(report.to_jsonable(out), allow_nan=False)  # writable as is


def test_aggregate_single_split_std_is_undefined(tmp_path):
  out = report.aggregate_splits([{"nme": 4.0, "per": {"a": 1.0}}])
  assert out["nme"] == 4.0 and math.isnan(out["nme_std"])
  assert math.isnan(out["per_std"]["a"])
  report.write_results(tmp_path, out)
  assert json.loads((tmp_path / "results.json").read_text())["nme_std"] is None
  with pytest.raises(ValueError):
    report.aggregate_splits([])


def test_markdown_table():
  rows = [
      {"name": "U-Net", "nme": 4.123, "nme_std": 0.456,
       "per": {"happy": 3.0}, "per_std": {"happy": 0.25}, "fr": None},
      {"name": "basic|CNN", "nme": 7.0, "nme_std": float("nan"),
       "per": {"happy": float("nan")}, "fr": 0.125},
  ]
  table = report.markdown_table(rows, [
      ("name", "Method", "s"), ("nme", "NME (%)", ".2f"),
      ("per.happy", "happy", "{:.1f}"), ("fr", "FR", lambda v: f"{100*v:.1f}%"),
      ("missing", "X", ".1f")])
  assert table.splitlines() == [
      "| Method | NME (%) | happy | FR | X |",
      "|---|---|---|---|---|",
      "| U-Net | 4.12 ± 0.46 | 3.0 ± 0.2 | n/a | n/a |",
      "| basic\\|CNN | 7.00 | n/a | 12.5% | n/a |",
  ]


def test_write_markdown(tmp_path):
  path = report.write_markdown(tmp_path, "Chu & Liu 2019", "| a |\n|---|\n")
  assert path.name == "results.md"
  assert path.read_text() == "# Chu & Liu 2019\n\n| a |\n|---|\n"


def _png_size(path):
  assert path.stat().st_size > 1000
  with Image.open(path) as image:
    assert image.format == "PNG"
    return image.size


def test_plot_loss_curves(tmp_path):
  with writers.MetricWriter(tmp_path) as writer:
    for step in range(1, 101):
      writer.write_scalars(step, {
          "loss": 1.0 / step, "unet_loss": 5.0 / step,
          "landmark_loss": float("nan") if step == 50 else 0.1 / step,
          "es_criterion": -0.5 + step / 100, "lr": 1e-4}, prefix="train")
  out = report.plot_loss_curves(tmp_path / "metrics.jsonl",
                                tmp_path / "loss.png")
  assert _png_size(out) == (1200, 300)  # 3 loss panels, 4x3 in at 100 dpi
  out = report.plot_loss_curves(tmp_path / "metrics.jsonl",
                                tmp_path / "crit.png",
                                keys=["train/es_criterion", "train/lr"])
  assert _png_size(out) == (800, 300)
  with pytest.raises(ValueError):
    report.plot_loss_curves(tmp_path / "metrics.jsonl", tmp_path / "x.png",
                            keys=["nope"])


def test_ced_curve_values():
  thresholds = np.array([0.0, 0.05, 0.1])
  np.testing.assert_allclose(
      report.ced_curve([0.01, 0.05, 0.2, np.nan], thresholds),
      [0.0, 0.5, 0.5])


def test_plot_ced(tmp_path):
  rng = np.random.default_rng(0)
  out = report.plot_ced({"U-Net": rng.gamma(4, 0.012, 300),
                         "basic CNN": rng.gamma(4, 0.02, 300)},
                        tmp_path / "ced.png", max_threshold=0.10)
  assert _png_size(out) == (600, 450)


def _fake_faces(n, size=64):
  """Blurry bright ellipses with a rough 68-point layout on them."""
  rng = np.random.default_rng(1)
  yy, xx = np.mgrid[0:size, 0:size]
  images, points = [], []
  t = np.linspace(0, 2 * np.pi, 68, endpoint=False)
  for _ in range(n):
    cx, cy = size / 2 + rng.normal(0, 2, 2)
    face = np.exp(-(((xx - cx) / (0.3 * size)) ** 2
                    + ((yy - cy) / (0.38 * size)) ** 2))
    images.append(face + 0.05 * rng.normal(size=face.shape))
    points.append(np.stack([cx + 0.25 * size * np.cos(t),
                            cy + 0.32 * size * np.sin(t)], -1))
  return np.array(images, np.float32), np.array(points, np.float32)


def test_plot_landmark_grid(tmp_path):
  images, gt = _fake_faces(6)
  pred = gt + np.random.default_rng(2).normal(0, 1.0, gt.shape)
  out = report.plot_landmark_grid(images[..., None], pred, gt,
                                  tmp_path / "grid.png", ncols=4,
                                  titles=[f"#{i}" for i in range(6)])
  assert _png_size(out) == (1000, 500)  # 4 x 2 panels of 2.5 in, 100 dpi
  out = report.plot_landmark_grid(images[:2], None, gt[:2],
                                  tmp_path / "two.png", ncols=4)
  assert _png_size(out) == (500, 250)


def test_landmark_grid_draws_at_xy(tmp_path):
  # One point at (x=48, y=8) on a black 64x64 image: red must appear in the
  # top-right area of the panel, not bottom-left (i.e. not (row, col)).
  image = np.zeros((1, 64, 64), np.float32)
  pred = np.full((1, 68, 2), [48.0, 8.0], np.float32)
  out = report.plot_landmark_grid(image, pred, None, tmp_path / "xy.png",
                                  ncols=1, panel_inches=2.56)
  pixels = np.asarray(Image.open(out).convert("RGB")).astype(int)
  red = (pixels[..., 0] > 150) & (pixels[..., 1] < 80) & (pixels[..., 2] < 80)
  rows, cols = np.nonzero(red)
  height, width = red.shape
  assert cols.mean() > 0.6 * width and rows.mean() < 0.35 * height


def test_plot_per_landmark_and_bar(tmp_path):
  out = report.plot_per_landmark(np.linspace(2, 8, 68), tmp_path / "pl.png")
  assert _png_size(out) == (1100, 350)
  means = {e: 3.0 + i * 0.3 for i, e in enumerate(EMOTIONS)}
  stds = {e: 0.2 for e in EMOTIONS}
  out = report.plot_bar(means, tmp_path / "bar.png", "NME per emotion",
                        errors=stds)
  assert _png_size(out) == (740, 350)  # 0.8 in per bar + 1 in


def test_markdown_table_keys_with_dots_are_literal_first():
  rows = [{"failure_rate_0.10": 0.0, "failure_rate_0.10_std": 0.5, "auc_0.10": 72.4,
           "nested": {"x": 1.5}}]
  text = report.markdown_table(rows, [("failure_rate_0.10", "FR", "{:.2f}"),
                                      ("auc_0.10", "AUC", "{:.1f}"),
                                      ("nested.x", "x", "{:.1f}")])
  last = text.strip().splitlines()[-1]
  assert "0.00 ± 0.50" in last and "72.4" in last and "1.5" in last
