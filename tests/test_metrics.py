"""Tests for tml/metrics.py against per-image / per-landmark Python loops."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tml import landmarks as lm
from tml import metrics


def _faces(rng, n, noise=2.0):
  gt = rng.uniform(20, 100, size=(n, 68, 2))
  # Put the eyes at a known, realistic separation so D is well away from 0.
  gt[:, 36:42] = rng.uniform(30, 45, size=(n, 6, 2))
  gt[:, 42:48] = gt[:, 36:42] + [40.0, 0.0]
  pred = gt + rng.normal(scale=noise, size=gt.shape)
  return pred.astype(np.float32), gt.astype(np.float32)


def _ref_d(g, normalisation):
  if normalisation == "inter_pupil":
    r = [sum(g[i][c] for i in range(36, 42)) / 6 for c in range(2)]
    l = [sum(g[i][c] for i in range(42, 48)) / 6 for c in range(2)]
  else:
    r, l = g[36], g[45]
  return math.hypot(r[0] - l[0], r[1] - l[1])


def _ref_nme(pred, gt, normalisation):
  out = []
  for p, g in zip(pred.astype(np.float64), gt.astype(np.float64)):
    total = sum(math.hypot(p[i][0] - g[i][0], p[i][1] - g[i][1])
                for i in range(68))
    out.append(total / (68 * _ref_d(g, normalisation)))
  return np.array(out)


# ---------------------------------------------------------------- NME


def test_per_image_nme_hand_case():
  rng = np.random.default_rng(0)
  gt = rng.uniform(0, 50, size=(1, 68, 2)).astype(np.float32)
  gt[0, 36:42] = (10.0, 20.0)     # right pupil at (10, 20)
  gt[0, 42:48] = (30.0, 20.0)     # left pupil at (30, 20): D = 20
  gt[0, 36] = (4.0, 20.0)         # pupil mean moves by (-6/6, 0) -> (9, 20)
  gt[0, 45] = (36.0, 20.0)        # -> (31, 20): inter-pupil D = 22
  pred = gt + np.array([3.0, 4.0], np.float32)   # every point off by 5 px
  np.testing.assert_allclose(metrics.per_image_nme(pred, gt), [5 / 22],
                             rtol=1e-6)
  # Outer corners 36 -> 45: 32 px.
  np.testing.assert_allclose(
      metrics.per_image_nme(pred, gt, "inter_ocular"), [5 / 32], rtol=1e-6)


@pytest.mark.parametrize("normalisation", ["inter_pupil", "inter_ocular"])
def test_per_image_nme_matches_reference(normalisation):
  pred, gt = _faces(np.random.default_rng(1), 5)
  got = np.asarray(metrics.per_image_nme(pred, gt, normalisation))
  assert got.shape == (5,)
  np.testing.assert_allclose(got, _ref_nme(pred, gt, normalisation), rtol=1e-5)


def test_normaliser_comes_from_ground_truth_not_prediction():
  pred, gt = _faces(np.random.default_rng(2), 3)
  squeezed = pred.copy()
  squeezed[:, 42:48] = squeezed[:, 36:42] + [1.0, 0.0]   # predicted eyes merge
  got = np.asarray(metrics.per_image_nme(squeezed, gt))
  np.testing.assert_allclose(got, _ref_nme(squeezed, gt, "inter_pupil"),
                             rtol=1e-5)
  with pytest.raises(ValueError, match="normalisation"):
    metrics.per_image_nme(pred, gt, "bbox")


def test_per_landmark_and_fig5_match_reference():
  pred, gt = _faces(np.random.default_rng(3), 4)
  got = np.asarray(metrics.per_landmark_nme(pred, gt, "inter_pupil"))
  assert got.shape == (68,)
  p64, g64 = pred.astype(np.float64), gt.astype(np.float64)
  ds = [_ref_d(g, "inter_pupil") for g in g64]
  for i in range(68):
    want = np.mean([math.hypot(*(p64[n, i] - g64[n, i])) / ds[n]
                    for n in range(4)])
    assert got[i] == pytest.approx(want, rel=1e-5)
  fig5 = metrics.fig5_nme(pred, gt, "inter_pupil")
  assert set(fig5) == set(lm.FIG5_POINTS)
  assert all(isinstance(v, float) for v in fig5.values())
  for name, idx in lm.FIG5_POINTS.items():
    errs = []
    for n in range(4):
      pc = [sum(p64[n, i, c] for i in idx) / len(idx) for c in range(2)]
      gc = [sum(g64[n, i, c] for i in idx) / len(idx) for c in range(2)]
      errs.append(math.hypot(pc[0] - gc[0], pc[1] - gc[1]) / ds[n])
    assert fig5[name] == pytest.approx(np.mean(errs), rel=1e-5)
  # A single-index point equals the per-landmark value.
  assert fig5["nose_centre"] == pytest.approx(float(got[lm.NOSE_TIP]), rel=1e-6)


# ------------------------------------------------------- FR, CED and AUC


def test_failure_rate_is_strictly_above():
  errors = np.array([0.05, 0.08, 0.09, 0.2], np.float32)
  assert float(metrics.failure_rate(errors, 0.08)) == 0.5
  assert float(metrics.failure_rate(errors, 0.3)) == 0.0


def test_ced_curve_hand_case():
  errors = np.array([0.0, 0.02, 0.05, 0.2])
  t, frac = metrics.ced_curve(errors, 0.08, num_points=5)   # step 0.02
  np.testing.assert_allclose(t, [0.0, 0.02, 0.04, 0.06, 0.08], atol=1e-7)
  np.testing.assert_allclose(frac, [0.25, 0.5, 0.5, 0.75, 0.75])


def test_ced_auc_hand_case_and_trapezoid_limit():
  # T = 0.08: 0.02 adds 0.75, 0.04 adds 0.5, 0.12 adds nothing -> 1.25 / 3.
  errors = np.array([0.02, 0.04, 0.12], np.float32)
  assert float(metrics.ced_auc(errors, 0.08)) == pytest.approx(1.25 / 3,
                                                                rel=1e-6)
  # Geometric check: the CED is 0 on [0, .02), 1/3 on [.02, .04), 2/3 on
  # [.04, .08]: area (1/3 * 0.02 + 2/3 * 0.04) / 0.08 = 0.41667.
  assert float(metrics.ced_auc(errors, 0.08)) == pytest.approx(
      (0.02 / 3 + 0.04 * 2 / 3) / 0.08, rel=1e-6)
  assert float(metrics.ced_auc(np.zeros(3), 0.1)) == 1.0
  assert float(metrics.ced_auc(np.full(3, 0.5), 0.1)) == 0.0
  rng = np.random.default_rng(4)
  errors = rng.gamma(2.0, 0.02, size=200)
  t, frac = metrics.ced_curve(errors, 0.1, num_points=20001)
  t, frac = np.asarray(t, np.float64), np.asarray(frac, np.float64)
  trapz = float(np.sum((frac[1:] + frac[:-1]) / 2 * np.diff(t))) / 0.1
  assert float(metrics.ced_auc(errors, 0.1)) == pytest.approx(trapz, abs=1e-4)


# ------------------------------------------------------- classification


def test_accuracy_confusion_and_recall_match_loops():
  rng = np.random.default_rng(5)
  logits = rng.normal(size=(50, 4)).astype(np.float32)
  labels = rng.integers(0, 3, size=50)          # class 3 never occurs
  pred = logits.argmax(-1)
  want_acc = sum(int(p == l) for p, l in zip(pred, labels)) / 50
  assert float(metrics.accuracy(logits, labels)) == pytest.approx(want_acc)
  assert float(metrics.accuracy(pred, labels)) == pytest.approx(want_acc)
  conf = np.asarray(metrics.confusion_matrix(pred, labels, 4))
  want = np.zeros((4, 4), int)
  for p, l in zip(pred, labels):
    want[l, p] += 1                              # rows = true class
  np.testing.assert_array_equal(conf, want)
  recall = np.asarray(metrics.per_class_recall(conf))
  for c in range(3):
    assert recall[c] == pytest.approx(want[c, c] / want[c].sum())
  assert math.isnan(recall[3])


def test_confusion_matrix_hand_case():
  conf = np.asarray(metrics.confusion_matrix([0, 1, 1, 2], [0, 0, 1, 2], 3))
  np.testing.assert_array_equal(conf, [[1, 1, 0], [0, 1, 0], [0, 0, 1]])


# ------------------------------------------------------- host summaries


def test_check_finite_names_array_count_and_first_index():
  metrics.check_finite("ok", np.ones((2, 3)))
  metrics.check_finite("ints", np.arange(3))
  a = np.zeros((2, 68, 2), np.float32)
  a[1, 5, 0] = np.nan
  a[1, 7, 1] = np.inf
  with pytest.raises(ValueError) as e:
    metrics.check_finite("pred landmarks", a)
  msg = str(e.value)
  assert "pred landmarks" in msg and "2 non-finite" in msg
  assert "(1, 5, 0)" in msg


def test_landmark_summary_rejects_nan_inputs():
  pred, gt = _faces(np.random.default_rng(6), 3)
  bad = pred.copy()
  bad[2, 10, 1] = np.nan
  with pytest.raises(ValueError, match="pred landmarks"):
    metrics.landmark_summary(bad, gt)
  bad = gt.copy()
  bad[0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="gt landmarks"):
    metrics.landmark_summary(pred, bad)
  with pytest.raises(ValueError, match="zero eye distance"):
    metrics.landmark_summary(pred, np.zeros_like(gt))


def test_landmark_summary_values_are_percent():
  pred, gt = _faces(np.random.default_rng(7), 6, noise=3.0)
  emotions = np.array([0, 2, 2, 0, 2, 0])
  names = ["angry", "contempt", "disgust"]
  s = metrics.landmark_summary(pred, gt, emotions, names)
  ip = _ref_nme(pred, gt, "inter_pupil")
  assert s["num_images"] == 6
  assert s["nme_inter_pupil"] == pytest.approx(100 * ip.mean(), rel=1e-5)
  assert s["nme_inter_ocular"] == pytest.approx(
      100 * _ref_nme(pred, gt, "inter_ocular").mean(), rel=1e-5)
  assert s["failure_rate_0.08"] == pytest.approx(100 * np.mean(ip > 0.08))
  assert s["failure_rate_0.10"] == pytest.approx(100 * np.mean(ip > 0.10))
  assert s["auc_0.10"] == pytest.approx(
      100 * np.mean(np.clip(1 - ip / 0.10, 0, 1)), rel=1e-5)
  assert len(s["per_landmark_nme_inter_pupil"]) == 68
  assert set(s["fig5_nme_inter_pupil"]) == set(lm.FIG5_POINTS)
  assert set(s["nme_per_emotion_inter_pupil"]) == {"angry", "disgust"}
  assert s["nme_per_emotion_inter_pupil"]["disgust"] == pytest.approx(
      100 * ip[[1, 2, 4]].mean(), rel=1e-5)
  json.dumps(s)     # plain Python types only


def test_classification_summary():
  logits = np.eye(3, dtype=np.float32)[[0, 1, 1, 2, 0]]
  labels = np.array([0, 1, 0, 2, 0])
  s = metrics.classification_summary(logits, labels, ["a", "b", "c"])
  assert s["accuracy"] == pytest.approx(80.0)
  assert s["confusion"] == [[2, 1, 0], [0, 1, 0], [0, 0, 1]]
  assert s["per_class_recall"]["a"] == pytest.approx(200 / 3)
  assert s["per_class_recall"]["b"] == 100.0
  with pytest.raises(ValueError, match="labels outside"):
    metrics.classification_summary(logits, np.array([0, 1, 0, 3, 0]),
                                   ["a", "b", "c"])
  json.dumps(s)


def test_mean_and_std():
  s = metrics.mean_and_std([4.0, 4.5, 5.0])
  assert s == {"mean": pytest.approx(4.5), "std": pytest.approx(0.5), "n": 3}
  assert metrics.mean_and_std([3.0])["std"] == 0.0
