"""Reads the Toronto Face Database ``TFD_48x48.mat`` as plain records.

TFD (Susskind, Anderson & Hinton, U. Toronto TR-2010-001) as distributed to
researchers is one MATLAB v5 file with

  images   N x 48 x 48 uint8    face crops
  labs_ex  N x 1                expression 1..7, -1 = unlabelled
  labs_id  N x 1                identity (-1 or 0 where unknown)
  folds    N x 5                per official fold: 0 unused, 1 train,
                                2 valid, 3 test

with 4,178 labelled images. Expression codes follow the TR's order,
1 anger, 2 disgust, 3 fear, 4 happy, 5 sad, 6 surprise, 7 neutral; we store
``labs_ex - 1`` so that class k is EMOTION_NAMES[k].

Orientation. ``scipy.io.loadmat`` keeps MATLAB's indexing (it returns the
column-major data as a Fortran-ordered array), so ``images[n, r, c]`` is
MATLAB's ``images(n+1, r+1, c+1)``. We assume TFD stores each face as
``images(n, row, col)``, upright, which is how the public loaders that train
on it read it (pylearn2's ``TFD`` reshapes ``images[n]`` as rows x cols with
no transpose). If a copy stores ``images(n, col, row)`` instead, faces come
out transposed (rotated and mirrored): pass ``transpose_images=True``. A
file with images stacked along the LAST axis (48 x 48 x N) is refused rather
than guessed at.

Ids are ``tfd_<i>``, i the 0-based row in the file.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Iterator

import numpy as np

from data_prep.expression_common import (BadInputPolicy, ExpressionDataError,
                                         IMAGE_SIZE)

EMOTION_NAMES = ("anger", "disgust", "fear", "happy", "sad", "surprise",
                 "neutral")
SPLITS = ("labelled", "unlabelled")
NUM_FOLDS = 5
NUM_LABELLED = 4178   # in the official TFD_48x48.mat
FOLD_UNUSED, FOLD_TRAIN, FOLD_VALID, FOLD_TEST = 0, 1, 2, 3
UNLABELLED = -1
MAT_NAME = "TFD_48x48.mat"


@dataclasses.dataclass(frozen=True)
class TfdData:
  """The arrays of a TFD .mat file, checked and in numpy order.

  Attributes:
    images: ``(N, 48, 48)`` uint8, upright (see module docstring).
    labs_ex: ``(N,)`` int64, 1..7 or -1.
    labs_id: ``(N,)`` int64.
    folds: ``(N, 5)`` int8 in {0, 1, 2, 3}.
    path: the file, for messages.
  """
  images: np.ndarray
  labs_ex: np.ndarray
  labs_id: np.ndarray
  folds: np.ndarray
  path: str


@dataclasses.dataclass(frozen=True)
class TfdRecord:
  """One TFD image. ``emotion`` is 0..6 (EMOTION_NAMES) or -1 (unlabelled)."""
  id: str
  split: str
  emotion: int
  identity: int
  folds: np.ndarray
  image: np.ndarray
  where: str


def load_mat(path: str | os.PathLike, transpose_images: bool = False
             ) -> TfdData:
  """Loads and checks the arrays of ``TFD_48x48.mat``.

  Raises:
    ExpressionDataError: missing variable, wrong shape, non-integer labels
      (the file as a whole is unusable; per-image problems are left to
      ``records``).
  """
  import scipy.io  # pylint: disable=g-import-not-at-top
  from scipy.io import matlab  # pylint: disable=g-import-not-at-top
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise ExpressionDataError(
        f"{path}: no such file; expected the TFD MATLAB file {MAT_NAME}",
        field="file")
  try:
    mat = scipy.io.loadmat(path)
  except NotImplementedError:
    raise ExpressionDataError(
        f"{path}: MATLAB v7.3 (HDF5) file; expected MATLAB v5 (re-save in "
        "MATLAB with save(..., '-v7'))", field="file") from None
  except (OSError, ValueError, TypeError, IndexError, KeyError, EOFError,
          matlab.MatReadError) as e:
    # scipy's parser fails on foreign bytes with whatever it trips over
    # (MatReadError, IndexError, TypeError, ...): all mean "not a .mat".
    raise ExpressionDataError(
        f"{path}: not a readable MATLAB v5 file ({type(e).__name__}: {e}); "
        f"expected {MAT_NAME} as distributed (MATLAB v5 .mat)",
        field="file") from None
  missing = [k for k in ("images", "labs_ex", "labs_id", "folds")
             if k not in mat]
  if missing:
    found = sorted(k for k in mat if not k.startswith("__"))
    raise ExpressionDataError(
        f"{path}: missing variable(s) {missing}; expected images, labs_ex, "
        f"labs_id, folds (found {found})", field="file")
  images = np.asarray(mat["images"])
  if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
    hint = (" (images stacked along the last axis? expected N x 48 x 48)"
            if images.shape[:2] == (IMAGE_SIZE, IMAGE_SIZE) else "")
    raise ExpressionDataError(
        f"{path}: variable 'images': expected N x {IMAGE_SIZE} x {IMAGE_SIZE},"
        f" got {' x '.join(map(str, images.shape))}{hint}", field="file")
  n = images.shape[0]
  labs_ex = _column(mat, "labs_ex", n, path)
  labs_id = _column(mat, "labs_id", n, path)
  folds = np.asarray(mat["folds"])
  if folds.shape != (n, NUM_FOLDS):
    raise ExpressionDataError(
        f"{path}: variable 'folds': expected {n} x {NUM_FOLDS}, got "
        f"{' x '.join(map(str, folds.shape))}", field="file")
  folds = _integers(folds, "folds", path).astype(np.int8)
  if images.dtype != np.uint8:
    values = _integers(images, "images", path)
    if values.min() < 0 or values.max() > 255:
      raise ExpressionDataError(
          f"{path}: variable 'images': expected grey levels 0..255, got range "
          f"[{values.min()}, {values.max()}]", field="file")
    images = values.astype(np.uint8)
  if transpose_images:
    images = images.transpose(0, 2, 1)
  return TfdData(images=np.ascontiguousarray(images), labs_ex=labs_ex,
                 labs_id=labs_id, folds=np.ascontiguousarray(folds),
                 path=path)


def _column(mat, key, n, path) -> np.ndarray:
  value = np.asarray(mat[key])
  if value.size != n or (value.ndim == 2 and 1 not in value.shape):
    raise ExpressionDataError(
        f"{path}: variable {key!r}: expected {n} x 1, got "
        f"{' x '.join(map(str, value.shape))}", field="file")
  return _integers(value.reshape(n), key, path)


def _integers(value, key, path) -> np.ndarray:
  if value.dtype.kind in "iu":
    return value.astype(np.int64)
  if value.dtype.kind != "f" or not np.all(np.isfinite(value)) or np.any(
      value != np.round(value)):
    raise ExpressionDataError(
        f"{path}: variable {key!r}: expected integers, got {value.dtype} "
        "with non-integer values", field="file")
  return value.astype(np.int64)


def records(data: TfdData, splits=None, policy: BadInputPolicy | None = None
            ) -> Iterator[TfdRecord]:
  """Yields the images of ``splits`` (default both) in file order.

  ``labelled``: ``labs_ex`` in 1..7, with their folds; ``unlabelled``:
  ``labs_ex == -1``. A label outside {-1, 1..7} or a fold value outside
  {0, 1, 2, 3} is an ExpressionDataError naming the row (or, with
  ``policy.skip_bad``, a skipped record).
  """
  wanted = set(SPLITS if splits is None else splits)
  if wanted - set(SPLITS):
    raise ValueError(f"unknown split(s) {sorted(wanted - set(SPLITS))}; "
                     f"expected {SPLITS}")
  policy = policy or BadInputPolicy()
  for i in range(len(data.images)):
    where = f"{data.path}: row {i} (MATLAB index {i + 1})"
    label = int(data.labs_ex[i])
    try:
      if label != UNLABELLED and not 1 <= label <= len(EMOTION_NAMES):
        raise ExpressionDataError(
            f"{where}: labs_ex: expected 1..7 ({', '.join(EMOTION_NAMES)}) "
            f"or -1 (unlabelled), got {label}", field="labs_ex")
      bad = data.folds[i][(data.folds[i] < FOLD_UNUSED) |
                          (data.folds[i] > FOLD_TEST)]
      if bad.size:
        raise ExpressionDataError(
            f"{where}: folds: expected values 0 (unused), 1 (train), 2 "
            f"(valid), 3 (test), got {data.folds[i].tolist()}", field="folds")
    except ExpressionDataError as e:
      policy.handle(e)
      continue
    split = SPLITS[1] if label == UNLABELLED else SPLITS[0]
    if split not in wanted:
      continue
    yield TfdRecord(id=f"tfd_{i}", split=split,
                    emotion=UNLABELLED if label == UNLABELLED else label - 1,
                    identity=int(data.labs_id[i]), folds=data.folds[i].copy(),
                    image=data.images[i], where=where)
