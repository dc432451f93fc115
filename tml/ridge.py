"""The pixel ridge-regression baseline and the mean shape: how hard is data?

A linear map from the network's input crop to the 68 landmarks. If it comes
close to a trained CNN, the data set cannot tell the paper's models apart
(issue 8: on landmark-extent crops it beat the paper-size U-Net). Pure NumPy,
no JAX, so it runs anywhere in seconds.

  model = fit(train_images, train_landmarks)          # lambda chosen inside
  pred = predict(model, test_images)                  # (N, 68, 2)
  nme = inter_pupil_nme(test_landmarks, pred)         # (N,) percent

Features: each image is area-reduced to ``32 x 32`` (`block_features`: block
means when the side is a multiple of 32, Pillow's BOX filter otherwise),
flattened, and standardised with the TRAINING images' per-feature mean and
std. Targets: the 136 landmark coordinates, centred on the training mean.
Ridge: ``W = argmin |X W - Y|^2 + lambda N |W|^2`` (N training images),
solved through one eigendecomposition of X^T X for the whole lambda grid.

Lambda selection (`fit`): the training images only. A seeded random
`VAL_FRACTION` of them is held out, every lambda of the grid is fitted on the
rest and scored by mean inter-pupil NME on the held-out part; the best one is
refitted on ALL training images. `fit` takes no test argument, so the test
set cannot reach the choice. A random (not subject-disjoint) slice, because
the Chu protocol's test set is a random per-emotion slice too.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np
from PIL import Image

FEATURE_SIDE = 32
VAL_FRACTION = 1 / 8
# Relative to the mean eigenvalue of X^T X / n (features are standardised, so
# that is 1): from almost unregularised to almost the mean shape.
DEFAULT_LAMBDAS = tuple(float(v) for v in np.logspace(-4, 3, 22))


@dataclasses.dataclass(frozen=True)
class RidgeModel:
  """A fitted baseline; ``predict`` maps images to ``(N, 68, 2)`` landmarks.

  Attributes:
    feature_mean, feature_std: ``(F,)`` training standardisation.
    target_mean: ``(136,)`` mean training landmark vector (x0, y0, x1, ...).
    weights: ``(F, 136)``.
    lam: the chosen lambda (relative, see `DEFAULT_LAMBDAS`).
    image_side: the side S of the images it was fitted on (predictions are in
      that frame).
    feature_side: the reduced side.
    val_nme: ``(len(lambdas),)`` validation NME per lambda (empty when the
      lambda was given).
  """
  feature_mean: np.ndarray
  feature_std: np.ndarray
  target_mean: np.ndarray
  weights: np.ndarray
  lam: float
  image_side: int
  feature_side: int = FEATURE_SIDE
  val_nme: np.ndarray = dataclasses.field(
      default_factory=lambda: np.zeros(0))


def block_features(images: np.ndarray, side: int = FEATURE_SIDE
                   ) -> np.ndarray:
  """``(N, S, S[, 1])`` images -> ``(N, side * side)`` float64 area means."""
  a = np.asarray(images, dtype=np.float64)
  if a.ndim == 4:
    if a.shape[-1] != 1:
      raise ValueError(f"expected one channel, got shape {a.shape}")
    a = a[..., 0]
  if a.ndim != 3 or a.shape[1] != a.shape[2]:
    raise ValueError(f"expected (N, S, S) square images, got {a.shape}")
  n, s, _ = a.shape
  if s % side == 0:
    f = s // side
    return a.reshape(n, side, f, side, f).mean(axis=(2, 4)).reshape(n, -1)
  out = np.empty((n, side * side))
  for i, img in enumerate(a.astype(np.float32)):
    small = Image.fromarray(img).resize((side, side), Image.Resampling.BOX)
    out[i] = np.asarray(small, dtype=np.float64).ravel()
  return out


def inter_pupil_nme(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
  """Chu Eq. 5 per image, percent: ``(N, 68, 2)`` each -> ``(N,)``.

  D = distance between the means of eye points 36-41 and 42-47 of the truth.
  """
  truth = np.asarray(truth, dtype=np.float64)
  pred = np.asarray(pred, dtype=np.float64)
  d = np.linalg.norm(truth[:, 36:42].mean(1) - truth[:, 42:48].mean(1),
                     axis=-1)
  return np.linalg.norm(truth - pred, axis=-1).sum(1) / (68 * d) * 100


def _standardise(x: np.ndarray):
  mean = x.mean(axis=0)
  std = x.std(axis=0)
  std = np.where(std > 1e-12 * max(1.0, float(np.abs(mean).max())), std, 1.0)
  return mean, std


def _solve_grid(x: np.ndarray, y: np.ndarray, lambdas: Sequence[float]
                ) -> list[np.ndarray]:
  """Ridge weights ``(F, T)`` for each (relative) lambda; x, y centred.

  Through the eigendecomposition of the Gram matrix X^T X (F x F): LAPACK's
  SVD of a 2,000 x 1,024 X takes ~10 s on two cores, eigh ~1 s. With
  lambda > 0 the shifted eigenvalues stay positive, so this is stable.
  """
  n = max(len(x), 1)
  evals, evecs = np.linalg.eigh(x.T @ x)
  evals = np.maximum(evals, 0.0)
  vty = evecs.T @ (x.T @ y)
  out = []
  for lam in lambdas:
    if not lam > 0:
      raise ValueError(f"lambda must be positive, got {lam}")
    out.append(evecs @ (vty / (evals + float(lam) * n)[:, None]))
  return out


def fit_fixed(images: np.ndarray, landmarks: np.ndarray, lam: float,
              feature_side: int = FEATURE_SIDE) -> RidgeModel:
  """Ridge with a given lambda on all the given images (no selection)."""
  feats = block_features(images, feature_side)
  return _fit_features(feats, _targets(landmarks), [lam], _side(images),
                       feature_side)[0]


def fit(train_images: np.ndarray, train_landmarks: np.ndarray, *,
        lambdas: Sequence[float] = DEFAULT_LAMBDAS,
        val_fraction: float = VAL_FRACTION, seed: int = 0,
        feature_side: int = FEATURE_SIDE) -> RidgeModel:
  """Chooses lambda on a held-out slice of the TRAINING set, refits on all.

  Args:
    train_images: ``(N, S, S[, 1])`` training crops (the network's input).
    train_landmarks: ``(N, 68, 2)`` (x, y) in those crops, all finite.
    lambdas: the grid (relative to the mean eigenvalue of the standardised
      features, i.e. ``lambda * N`` on the sum of squares).
    val_fraction: share of the training images held out for the choice.
    seed: of the held-out slice.
    feature_side: the reduced image side.

  Returns:
    The model refitted on all training images with the chosen lambda; its
    ``val_nme`` holds the validation NME per lambda.
  """
  y = _targets(train_landmarks)
  feats = block_features(train_images, feature_side)
  n = len(feats)
  if n != len(y):
    raise ValueError(f"{n} images but {len(y)} landmark sets")
  n_val = int(round(n * val_fraction))
  if not 1 <= n_val < n - 1:
    raise ValueError(f"{n} training images leave no validation slice "
                     f"(val_fraction {val_fraction})")
  perm = np.random.default_rng(seed).permutation(n)
  val, fit_idx = perm[:n_val], perm[n_val:]
  models = _fit_features(feats[fit_idx], y[fit_idx], lambdas,
                         _side(train_images), feature_side)
  truth = y[val].reshape(-1, 68, 2)
  val_nme = np.array([
      inter_pupil_nme(truth, _predict_features(m, feats[val])).mean()
      for m in models])
  best = float(lambdas[int(np.argmin(val_nme))])
  model = _fit_features(feats, y, [best], _side(train_images),
                        feature_side)[0]
  return dataclasses.replace(model, val_nme=val_nme)


def predict(model: RidgeModel, images: np.ndarray) -> np.ndarray:
  """``(N, S, S[, 1])`` -> ``(N, 68, 2)`` (x, y) in the images' frame."""
  if _side(images) != model.image_side:
    raise ValueError(f"model fitted on {model.image_side}-pixel images, got "
                     f"{_side(images)}")
  return _predict_features(model, block_features(images, model.feature_side))


def mean_shape(train_landmarks: np.ndarray, n: int) -> np.ndarray:
  """The mean training landmark set repeated n times, ``(n, 68, 2)``."""
  m = np.asarray(train_landmarks, dtype=np.float64).mean(axis=0)
  return np.broadcast_to(m, (n,) + m.shape).copy()


def split_baseline(images: np.ndarray, landmarks: np.ndarray,
                   train_idx: np.ndarray, test_idx: np.ndarray, *,
                   seed: int = 0, lambdas: Sequence[float] = DEFAULT_LAMBDAS,
                   feature_side: int = FEATURE_SIDE) -> dict:
  """Mean-shape and ridge NME of one protocol split.

  Fits (and chooses lambda) on ``images[train_idx]`` only, then scores the
  test images. Index arrays select rows of `images` / `landmarks`.

  Args:
    images: ``(N, S, S[, 1])`` the network's input crops, any float scale.
    landmarks: ``(N, 68, 2)`` (x, y) in those crops; the selected rows must
      be finite.
    train_idx, test_idx: disjoint index arrays.
    seed: of the validation slice inside the training rows.
    lambdas, feature_side: see `fit`.

  Returns:
    A dict: ``ridge_nme_inter_pupil`` and ``mean_shape_nme_inter_pupil``
    (percent, mean over the test images), ``ridge_lambda`` (the chosen
    lambda), ``ridge_per_image`` and ``mean_shape_per_image`` (percent,
    ``(len(test_idx),)`` arrays).
  """
  train_idx, test_idx = np.asarray(train_idx), np.asarray(test_idx)
  if np.intersect1d(train_idx, test_idx).size:
    raise ValueError("train and test indices overlap")
  lms = np.asarray(landmarks, dtype=np.float64)
  model = fit(images[train_idx], lms[train_idx], seed=seed, lambdas=lambdas,
              feature_side=feature_side)
  truth = lms[test_idx]
  ridge = inter_pupil_nme(truth, predict(model, images[test_idx]))
  mean = inter_pupil_nme(truth, mean_shape(lms[train_idx], len(test_idx)))
  return {"ridge_nme_inter_pupil": float(ridge.mean()),
          "mean_shape_nme_inter_pupil": float(mean.mean()),
          "ridge_lambda": model.lam, "ridge_per_image": ridge,
          "mean_shape_per_image": mean}


# ------------------------------------------------------------------ helpers

def _side(images) -> int:
  return int(np.shape(images)[1])


def _targets(landmarks) -> np.ndarray:
  y = np.asarray(landmarks, dtype=np.float64)
  if y.ndim != 3 or y.shape[1:] != (68, 2):
    raise ValueError(f"expected (N, 68, 2) landmarks, got {y.shape}")
  if not np.all(np.isfinite(y)):
    raise ValueError("landmarks must be finite")
  return y.reshape(len(y), -1)


def _fit_features(feats, y, lambdas, image_side, feature_side
                  ) -> list[RidgeModel]:
  fm, fs = _standardise(feats)
  x = (feats - fm) / fs
  ym = y.mean(axis=0)
  weights = _solve_grid(x, y - ym, lambdas)
  return [RidgeModel(fm, fs, ym, w, float(lam), int(image_side),
                     int(feature_side))
          for w, lam in zip(weights, lambdas)]


def _predict_features(model: RidgeModel, feats: np.ndarray) -> np.ndarray:
  x = (feats - model.feature_mean) / model.feature_std
  y = x @ model.weights + model.target_mean
  return y.reshape(len(y), 68, 2)


__all__ = ["DEFAULT_LAMBDAS", "FEATURE_SIDE", "RidgeModel", "VAL_FRACTION",
           "block_features", "fit", "fit_fixed", "inter_pupil_nme",
           "mean_shape", "predict", "split_baseline"]
