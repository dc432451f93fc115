"""Tests for tml.ridge: the pixel ridge-regression baseline."""
from __future__ import annotations

import inspect

import numpy as np
import pytest

from tml import ridge


def _eyes(n, rng):
  """(n, 68, 2) landmarks with pupils ~10 px apart, random elsewhere."""
  lm = rng.normal(32.0, 4.0, (n, 68, 2))
  lm[:, 36:42] += [-5.0, 0.0]
  lm[:, 42:48] += [5.0, 0.0]
  lm[:, 36:48, 0] = np.where(np.arange(12) < 6, 27.0, 37.0) + rng.normal(
      0, 0.1, (n, 12))
  return lm


def test_inter_pupil_nme_by_hand():
  truth = np.zeros((2, 68, 2))
  truth[:, 36:42, 0], truth[:, 42:48, 0] = -5.0, 5.0  # pupils 10 apart
  pred = truth + [0.0, 1.0]                           # every point 1 px off
  np.testing.assert_allclose(ridge.inter_pupil_nme(truth, pred), [10, 10])
  pred[1, :34] += [0.0, 1.0]                          # half of them 2 px off
  np.testing.assert_allclose(ridge.inter_pupil_nme(truth, pred), [10, 15])


def test_block_features_are_block_means():
  rng = np.random.default_rng(0)
  img = rng.random((3, 64, 64, 1))
  f = ridge.block_features(img)
  assert f.shape == (3, 1024)
  np.testing.assert_allclose(f[1].reshape(32, 32)[5, 7],
                             img[1, 10:12, 14:16, 0].mean())
  # A side that is not a multiple of 32: area resize, a constant stays.
  np.testing.assert_allclose(ridge.block_features(np.full((2, 48, 48), 0.3)),
                             0.3, rtol=1e-6)
  with pytest.raises(ValueError, match="square"):
    ridge.block_features(np.zeros((2, 32, 48)))


def test_grid_solution_is_the_closed_form_ridge():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(80, 12))
  x -= x.mean(0)
  y = rng.normal(size=(80, 3))
  y -= y.mean(0)
  lams = [1e-3, 0.1, 10.0]
  for lam, w in zip(lams, ridge._solve_grid(x, y, lams)):
    ref = np.linalg.solve(x.T @ x + lam * len(x) * np.eye(12), x.T @ y)
    np.testing.assert_allclose(w, ref, rtol=1e-8, atol=1e-10)


def test_an_exactly_linear_problem_is_solved_exactly():
  # Landmarks that ARE a linear function of the 32x32 block means: a tiny
  # lambda recovers them to numerical precision, on held-out images too.
  rng = np.random.default_rng(2)
  n, side = 600, 16
  imgs = rng.random((n + 100, side, side))
  true_w = rng.normal(0, 0.05, (side * side, 136))
  lms = (imgs.reshape(len(imgs), -1) @ true_w).reshape(-1, 68, 2)
  lms[:, 36:42, 0] -= 20.0  # pupils far apart: a well-defined NME
  lms[:, 42:48, 0] += 20.0
  model = ridge.fit_fixed(imgs[:n], lms[:n], 1e-9, feature_side=side)
  pred = ridge.predict(model, imgs[n:])
  np.testing.assert_allclose(pred, lms[n:], atol=1e-4)
  # With selection, the grid's smallest lambdas win on such data.
  chosen = ridge.fit(imgs[:n], lms[:n], lambdas=(1e-8, 1e-2, 10.0),
                     feature_side=side)
  assert chosen.lam == 1e-8
  assert chosen.val_nme[0] < 1e-3 < chosen.val_nme[2]


def test_noise_features_fall_back_to_about_the_mean_shape():
  rng = np.random.default_rng(3)
  lms = _eyes(400, rng)
  imgs = rng.random((400, 32, 32))
  model = ridge.fit(imgs[:300], lms[:300], feature_side=16)
  assert model.lam >= 1.0  # heavy shrinkage chosen
  pred = ridge.predict(model, imgs[300:])
  mean = ridge.mean_shape(lms[:300], 100)
  np.testing.assert_allclose(pred, mean, atol=0.5)


def test_lambda_selection_never_sees_the_test_set():
  # `fit` has no test argument at all ...
  params = list(inspect.signature(ridge.fit).parameters)
  assert params[:2] == ["train_images", "train_landmarks"]
  assert not any("test" in p for p in params)
  # ... and in `split_baseline` garbage test labels change the scores, never
  # the chosen lambda or the predictions.
  rng = np.random.default_rng(4)
  lms = _eyes(320, rng)
  imgs = rng.random((320, 32, 32)) + lms[:, :1, :1] / 50.0
  train, test = np.arange(280), np.arange(280, 320)
  a = ridge.split_baseline(imgs, lms, train, test, feature_side=16)
  spoiled = lms.copy()
  spoiled[test] = rng.normal(0, 100, spoiled[test].shape)
  spoiled[test, 36:42, 0] -= 50
  b = ridge.split_baseline(imgs, spoiled, train, test, feature_side=16)
  assert a["ridge_lambda"] == b["ridge_lambda"]
  assert a["ridge_nme_inter_pupil"] != b["ridge_nme_inter_pupil"]
  model = ridge.fit(imgs[train], lms[train], feature_side=16)
  np.testing.assert_allclose(
      ridge.inter_pupil_nme(lms[test], ridge.predict(model, imgs[test])),
      a["ridge_per_image"])
  with pytest.raises(ValueError, match="overlap"):
    ridge.split_baseline(imgs, lms, train, train[:5], feature_side=16)


def test_validation_slice_is_seeded_and_inside_the_training_set():
  rng = np.random.default_rng(5)
  lms = _eyes(200, rng)
  imgs = rng.random((200, 32, 32)) + lms[:, 30:31, :1] / 20.0
  a = ridge.fit(imgs, lms, seed=0, feature_side=16)
  b = ridge.fit(imgs, lms, seed=0, feature_side=16)
  c = ridge.fit(imgs, lms, seed=1, feature_side=16)
  np.testing.assert_array_equal(a.val_nme, b.val_nme)
  assert not np.array_equal(a.val_nme, c.val_nme)
  assert len(a.val_nme) == len(ridge.DEFAULT_LAMBDAS)


def test_predict_checks_the_image_side_and_inputs():
  rng = np.random.default_rng(6)
  lms = _eyes(50, rng)
  model = ridge.fit_fixed(rng.random((50, 64, 64, 1)), lms, 1.0,
                          feature_side=8)
  assert ridge.predict(model, rng.random((3, 64, 64, 1))).shape == (3, 68, 2)
  with pytest.raises(ValueError, match="64-pixel"):
    ridge.predict(model, rng.random((3, 32, 32)))
  bad = lms.copy()
  bad[0, 0, 0] = np.nan
  with pytest.raises(ValueError, match="finite"):
    ridge.fit_fixed(rng.random((50, 32, 32)), bad, 1.0, feature_side=8)
  with pytest.raises(ValueError, match="positive"):
    ridge.fit_fixed(rng.random((50, 32, 32)), lms, 0.0, feature_side=8)
