"""Evaluation metrics: landmark NME / failure rate / CED, and classification.

All error values are FRACTIONS (0.045 = 4.5 %); only the host-side summaries
(:func:`landmark_summary`, :func:`classification_summary`) multiply by 100.

Landmarks are ``(N, 68, 2)`` (x, y) pixels in one frame per image (DESIGN.md).
NME is a ratio of distances, so any frame related to the original by a
uniform scale and a translation (e.g. a square crop resized to N x N) gives
the same value; a non-square resize does not.

Never mix normalisations: every function takes ``normalisation`` explicitly
and the summary keys name it.

The array metrics are ``jax.jit``-wrapped (``normalisation``, ``num_points``,
``num_classes`` static) so host-side evaluation compiles each once.
"""
from __future__ import annotations

import functools
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tml import landmarks as lm

NORMALISATIONS = ("inter_pupil", "inter_ocular")


# ----------------------------------------------------------------- landmarks


@functools.partial(jax.jit, static_argnames=("normalisation",))
def normalising_distance(gt: jax.Array,
                         normalisation: str = "inter_pupil") -> jax.Array:
  """``(N,)`` per-image normaliser D, always from the GROUND TRUTH.

  * ``"inter_pupil"`` (Chu Eq. 5): distance between the means of the eye
    contours 36-41 and 42-47 (the thermal database has no pupil points).
  * ``"inter_ocular"`` (300-W): distance between outer eye corners 36, 45.

  A zero D gives inf/NaN errors; check with :func:`check_finite`.
  """
  gt = jnp.asarray(gt, jnp.float32)
  if normalisation == "inter_pupil":
    a, b = lm.pupil_centres(gt)
  elif normalisation == "inter_ocular":
    right, left = lm.OUTER_EYE_CORNERS
    a, b = gt[..., right, :], gt[..., left, :]
  else:
    raise ValueError(f"normalisation must be one of {NORMALISATIONS}, "
                     f"got {normalisation!r}")
  return jnp.linalg.norm(a - b, axis=-1)


def _point_errors(pred, gt):
  """``(N, K)`` Euclidean distances in pixels."""
  pred = jnp.asarray(pred, jnp.float32)
  gt = jnp.asarray(gt, jnp.float32)
  return jnp.linalg.norm(pred - gt, axis=-1)


@functools.partial(jax.jit, static_argnames=("normalisation",))
def per_image_nme(pred: jax.Array, gt: jax.Array,
                  normalisation: str = "inter_pupil") -> jax.Array:
  """Chu Eq. 5 per image: ``sum_i ||l_i - l^_i||_2 / (K * D)``.

  Args:
    pred: ``(N, K, 2)`` predicted (x, y) pixels.
    gt: ``(N, K, 2)`` ground truth, same frame.
    normalisation: ``"inter_pupil"`` or ``"inter_ocular"`` (D from ``gt``).

  Returns:
    ``(N,)`` fractions; the paper's NME is ``100 * mean`` of this.
  """
  d = normalising_distance(gt, normalisation)
  return jnp.mean(_point_errors(pred, gt), axis=-1) / d


@functools.partial(jax.jit, static_argnames=("normalisation",))
def per_landmark_nme(pred: jax.Array, gt: jax.Array,
                     normalisation: str = "inter_pupil") -> jax.Array:
  """``(K,)`` mean over images of ``||l_i - l^_i|| / D`` for each landmark."""
  d = normalising_distance(gt, normalisation)
  return jnp.mean(_point_errors(pred, gt) / d[:, None], axis=0)


def fig5_nme(pred: jax.Array, gt: jax.Array,
             normalisation: str = "inter_pupil") -> dict[str, float]:
  """NME of the points Chu's Fig. 5 singles out (``landmarks.FIG5_POINTS``).

  A point given as several indices (an eye centre) is the mean of those
  points, in the prediction and in the ground truth alike; its error is the
  distance between the two means over D, averaged over images.

  Returns:
    dict name -> float fraction (host-side Python floats).
  """
  values = _fig5_errors(pred, gt, normalisation)
  return {name: float(v) for name, v in zip(lm.FIG5_POINTS, values)}


@functools.partial(jax.jit, static_argnames=("normalisation",))
def _fig5_errors(pred, gt, normalisation):
  """``(len(FIG5_POINTS),)`` mean errors, in the dict's order."""
  pred = jnp.asarray(pred, jnp.float32)
  gt = jnp.asarray(gt, jnp.float32)
  d = normalising_distance(gt, normalisation)
  out = []
  for idx in lm.FIG5_POINTS.values():
    idx = np.asarray(idx)
    p = pred[:, idx, :].mean(axis=1)
    g = gt[:, idx, :].mean(axis=1)
    out.append(jnp.mean(jnp.linalg.norm(p - g, axis=-1) / d))
  return jnp.stack(out)


@jax.jit
def failure_rate(errors: jax.Array, threshold: float) -> jax.Array:
  """``()`` fraction of images whose error is strictly above ``threshold``."""
  errors = jnp.asarray(errors, jnp.float32)
  return jnp.mean((errors > threshold).astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("num_points",))
def ced_curve(errors: jax.Array, max_threshold: float,
              num_points: int = 1001) -> tuple[jax.Array, jax.Array]:
  """Cumulative error distribution sampled on ``[0, max_threshold]``.

  Returns:
    ``(thresholds (P,), fraction (P,))`` with ``fraction[p]`` the share of
    images with ``error <= thresholds[p]``; ``P = num_points``, evenly spaced
    including both ends. For plots; :func:`ced_auc` is computed exactly.
  """
  errors = jnp.asarray(errors, jnp.float32)
  t = jnp.linspace(0.0, max_threshold, num_points, dtype=jnp.float32)
  frac = jnp.mean((errors[None, :] <= t[:, None]).astype(jnp.float32), axis=1)
  return t, frac


@jax.jit
def ced_auc(errors: jax.Array, max_threshold: float) -> jax.Array:
  """Area under the CED on ``[0, T]`` divided by ``T``, in [0, 1].

  Integration rule: the EXACT integral of the empirical CED step function
  ``F(t) = mean_n [e_n <= t]``, no sampling grid. Swapping sum and integral,
  ``(1/T) int_0^T F(t) dt = mean_n clip(1 - e_n / T, 0, 1)``: an image with
  error ``e`` adds ``(T - e) / T`` if ``e < T`` and nothing otherwise. The
  trapezoid rule on :func:`ced_curve` converges to this as its grid refines
  (with step h, to within h / T).
  """
  errors = jnp.asarray(errors, jnp.float32)
  return jnp.mean(jnp.clip(1.0 - errors / max_threshold, 0.0, 1.0))


# ------------------------------------------------------------ classification


def _as_labels(logits_or_labels, labels):
  x = jnp.asarray(logits_or_labels)
  labels = jnp.asarray(labels)
  if x.ndim == labels.ndim + 1:
    return jnp.argmax(x, axis=-1)
  if x.ndim != labels.ndim:
    raise ValueError(f"predictions of shape {x.shape} match neither labels "
                     f"{labels.shape} nor labels + a class axis")
  return x.astype(jnp.int32)


@jax.jit
def accuracy(logits_or_labels: jax.Array, labels: jax.Array) -> jax.Array:
  """``()`` fraction correct, from ``(N, C)`` scores (argmax) or ``(N,)`` ids."""
  pred = _as_labels(logits_or_labels, labels)
  return jnp.mean((pred == jnp.asarray(labels)).astype(jnp.float32))


@functools.partial(jax.jit, static_argnames=("num_classes",))
def confusion_matrix(pred_labels: jax.Array, labels: jax.Array,
                     num_classes: int) -> jax.Array:
  """``(C, C)`` int32 counts; rows = TRUE class, columns = predicted class.

  Ids must lie in ``[0, C)``; an out-of-range pair is dropped (jit-safe, no
  check here -- the summaries validate on the host).
  """
  pred_labels = jnp.asarray(pred_labels, jnp.int32).reshape(-1)
  labels = jnp.asarray(labels, jnp.int32).reshape(-1)
  ok = ((labels >= 0) & (labels < num_classes)
        & (pred_labels >= 0) & (pred_labels < num_classes))
  flat = jnp.where(ok, labels * num_classes + pred_labels, 0)
  counts = jnp.zeros((num_classes * num_classes,), jnp.int32)
  counts = counts.at[flat].add(ok.astype(jnp.int32))
  return counts.reshape(num_classes, num_classes)


@jax.jit
def per_class_recall(confusion: jax.Array) -> jax.Array:
  """``(C,)`` diagonal over row sums; NaN for a class with no true examples."""
  confusion = jnp.asarray(confusion, jnp.float32)
  support = confusion.sum(axis=1)
  diag = jnp.diagonal(confusion)
  return jnp.where(support > 0, diag / jnp.where(support > 0, support, 1.0),
                   jnp.nan)


# ------------------------------------------------------- host-side summaries


def check_finite(name: str, array) -> None:
  """Raises ValueError naming ``name`` if ``array`` has a non-finite entry.

  The message gives the count of NaN/inf entries, the total, and the index
  and value of the first one, so a bad prediction can be traced to its image.
  """
  a = np.asarray(array)
  if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype,
                                                            np.integer):
    return
  bad = ~np.isfinite(a)
  if bad.any():
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    raise ValueError(
        f"{name}: {int(bad.sum())} non-finite entries of {a.size} "
        f"(shape {a.shape}); first at index {first} = {a[first]}")


def _pct(x) -> float:
  return float(np.asarray(x, np.float64) * 100.0)


def landmark_summary(pred, gt, emotions: Sequence[int] | None = None,
                     class_names: Sequence[str] | None = None) -> dict:
  """All landmark figures of a test set, in PERCENT, as plain Python types.

  Keys: ``nme_inter_pupil``, ``nme_inter_ocular``, ``failure_rate_0.08``,
  ``failure_rate_0.10``, ``auc_0.08``, ``auc_0.10`` (inter-pupil errors,
  thresholds as fractions), ``per_landmark_nme_inter_pupil`` (list of K),
  ``fig5_nme_inter_pupil`` (dict), ``num_images``; with ``emotions`` also
  ``nme_per_emotion_inter_pupil`` (class name -> NME, only classes present).

  Args:
    pred: ``(N, 68, 2)`` predicted (x, y) pixels.
    gt: ``(N, 68, 2)`` ground truth.
    emotions: optional ``(N,)`` int class ids of the images (Chu Fig. 6).
    class_names: names for the ids; default ``str(id)``.

  Raises:
    ValueError: non-finite or mismatched inputs (never silently averaged).
  """
  pred = np.asarray(pred, np.float32)
  gt = np.asarray(gt, np.float32)
  check_finite("pred landmarks", pred)
  check_finite("gt landmarks", gt)
  if pred.shape != gt.shape or pred.ndim != 3 or pred.shape[-1] != 2:
    raise ValueError(f"pred {pred.shape} and gt {gt.shape} must both be "
                     "(N, K, 2)")
  ip = np.asarray(per_image_nme(pred, gt, "inter_pupil"))
  io = np.asarray(per_image_nme(pred, gt, "inter_ocular"))
  check_finite("per-image inter-pupil NME (zero eye distance in gt?)", ip)
  check_finite("per-image inter-ocular NME (zero eye distance in gt?)", io)
  out = {
      "nme_inter_pupil": _pct(ip.mean()),
      "nme_inter_ocular": _pct(io.mean()),
      "failure_rate_0.08": _pct(failure_rate(ip, 0.08)),
      "failure_rate_0.10": _pct(failure_rate(ip, 0.10)),
      "auc_0.08": _pct(ced_auc(ip, 0.08)),
      "auc_0.10": _pct(ced_auc(ip, 0.10)),
      "per_landmark_nme_inter_pupil": [
          _pct(v) for v in np.asarray(per_landmark_nme(pred, gt))],
      "fig5_nme_inter_pupil": {
          k: _pct(v) for k, v in fig5_nme(pred, gt, "inter_pupil").items()},
      "num_images": int(pred.shape[0]),
  }
  if emotions is not None:
    emotions = np.asarray(emotions).reshape(-1)
    if emotions.shape[0] != pred.shape[0]:
      raise ValueError(f"emotions has {emotions.shape[0]} entries for "
                       f"{pred.shape[0]} images")
    per_emotion = {}
    for c in np.unique(emotions):
      name = class_names[int(c)] if class_names is not None else str(int(c))
      per_emotion[name] = _pct(ip[emotions == c].mean())
    out["nme_per_emotion_inter_pupil"] = per_emotion
  return out


def classification_summary(logits_or_pred_labels, labels,
                           class_names: Sequence[str]) -> dict:
  """Accuracy (percent), confusion (rows = true class) and per-class recall.

  Returns:
    ``{"accuracy": float percent, "confusion": list of C lists of int,
    "per_class_recall": {name: float percent, NaN for a class with no
    examples}, "num_examples": int}``.
  """
  labels = np.asarray(labels).reshape(-1)
  x = np.asarray(logits_or_pred_labels)
  check_finite("classifier outputs", x)
  pred = np.asarray(_as_labels(x, labels))
  num_classes = len(class_names)
  for what, ids in (("labels", labels), ("predicted labels", pred)):
    if ids.size and (ids.min() < 0 or ids.max() >= num_classes):
      raise ValueError(f"{what} outside [0, {num_classes}): "
                       f"min {ids.min()}, max {ids.max()}")
  conf = confusion_matrix(pred, labels, num_classes)
  recall = np.asarray(per_class_recall(conf))
  return {
      "accuracy": _pct(accuracy(pred, labels)),
      "confusion": np.asarray(conf).astype(int).tolist(),
      "per_class_recall": {n: _pct(r) for n, r in zip(class_names, recall)},
      "num_examples": int(labels.shape[0]),
  }


def mean_and_std(values: Sequence[float] | Mapping[str, float]) -> dict:
  """``{"mean", "std", "n"}`` over repeats (e.g. Chu's 5 random splits).

  ``std`` is the sample standard deviation (ddof = 1; 0.0 for one value).
  """
  v = np.asarray(list(values.values()) if isinstance(values, Mapping)
                 else list(values), np.float64)
  return {"mean": float(v.mean()),
          "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
          "n": int(v.size)}
