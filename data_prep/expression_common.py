"""What the FER2013 and TFD builders share: schema, bad input, base builder.

Both datasets are 48x48 grey faces with seven expression classes, and the
DeVries input pipeline reads both through one schema:

  image          Tensor (48, 48, 1) uint8, rows top-down, columns left-right.
  emotion        ClassLabel, the dataset's own 7 names in its own order.
  landmarks      Tensor (68, 2) float32, iBUG-68 points in (x, y) pixel order,
                 0-based, x = column, in the 48x48 frame (pixel centres at
                 integers). Points may lie slightly outside [0, 47] (a jaw
                 predicted past the crop). All zeros when absent.
  has_landmarks  bool scalar: the labeller found a face (DeVries' v_n).
  id             Text, stable per image (read back as ``bytes``).

TFD adds ``identity`` (int32) and ``folds`` ((5,) int8); see data_prep/tfd.
Array features are stored as raw bytes (``Encoding.BYTES``); a data source
returns the same numpy arrays of the shapes and dtypes above.

Bad input (a corrupt image, a malformed row, an unknown label) raises
``ExpressionDataError`` naming the file, the row or member, and what was
expected. With ``skip_bad=True`` a ``BadInputPolicy`` counts and skips such
records instead and logs a summary when the split is done, so a user can
knowingly build from a slightly damaged copy but never does so by accident.

``ExpressionBuilder`` is the abstract TFDS builder both datasets derive from:
configs ``images`` / ``dlib68``, the landmark join by id, the builder options
(``source``, ``landmarks_file``, ``skip_bad``) and provenance metadata.
"""
from __future__ import annotations

import collections
import inspect
import logging
import os
from typing import Iterable, Mapping, Sequence

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from data_prep.label68 import io as label_io  # numpy only, no dlib
from tml.landmarks import NUM_LANDMARKS

IMAGE_SIZE = 48
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, 1)
LANDMARKS_SHAPE = (NUM_LANDMARKS, 2)

# Array features are stored as raw bytes rather than as proto int64/float
# lists: the same arrays come back on read, and writing and reading are ~3x
# faster (a uint8 image is otherwise 2,304 varints).
BYTES = tfds.features.Encoding.BYTES

# Shown in error messages; at most this many skipped records are listed.
_MAX_LISTED = 10


class ExpressionDataError(ValueError):
  """Input that is not what the builder expects; names where and what.

  ``field`` names the kind of problem (``pixels``, ``emotion``, ``image``,
  ...) for the skip summary.
  """

  def __init__(self, message: str, field: str = "record"):
    super().__init__(message)
    self.field = field


class BadInputPolicy:
  """Raise on bad records, or (``skip_bad=True``) count, skip and summarise.

  One instance per split (or per pass over a source), so the summary says
  which split lost which records.
  """

  def __init__(self, skip_bad: bool = False, what: str = "input"):
    self.skip_bad = skip_bad
    self.what = what
    self.skipped: list[str] = []
    self.reasons: collections.Counter[str] = collections.Counter()

  def handle(self, error: ExpressionDataError):
    """Raises ``error`` unless skipping; then records it and returns."""
    if not self.skip_bad:
      raise error
    self.skipped.append(str(error))
    self.reasons[getattr(error, "field", "record")] += 1
    logging.debug("skipped: %s", error)

  @property
  def num_skipped(self) -> int:
    return len(self.skipped)

  def summary(self) -> str:
    if not self.skipped:
      return f"{self.what}: no bad records"
    by_kind = ", ".join(f"{k}: {v}" for k, v in sorted(self.reasons.items()))
    lines = [f"{self.what}: skipped {len(self.skipped)} bad record(s) "
             f"({by_kind})"]
    lines += [f"  {s}" for s in self.skipped[:_MAX_LISTED]]
    if len(self.skipped) > _MAX_LISTED:
      lines.append(f"  ... and {len(self.skipped) - _MAX_LISTED} more")
    return "\n".join(lines)

  def log_summary(self):
    if self.skipped:
      logging.warning("%s", self.summary())
    else:
      logging.info("%s", self.summary())


def features(emotion_names: Sequence[str], extra: Mapping | None = None):
  """The shared ``tfds.features.FeaturesDict`` (plus ``extra`` fields)."""
  if len(emotion_names) != 7:
    raise ValueError(f"expected 7 emotion names, got {list(emotion_names)}")
  spec = {
      "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8,
                                    encoding=BYTES),
      "emotion": tfds.features.ClassLabel(names=list(emotion_names)),
      "landmarks": tfds.features.Tensor(shape=LANDMARKS_SHAPE,
                                        dtype=np.float32, encoding=BYTES),
      "has_landmarks": tfds.features.Tensor(shape=(), dtype=np.bool_),
      "id": tfds.features.Text(),
  }
  spec.update(extra or {})
  return tfds.features.FeaturesDict(spec)


def make_example(image: np.ndarray, emotion: int, example_id: str,
                 landmarks: np.ndarray | None = None, **extra) -> dict:
  """One record in the shared schema.

  Args:
    image: ``(48, 48)`` or ``(48, 48, 1)`` uint8, upright.
    emotion: class index in the dataset's own order.
    example_id: the stable id.
    landmarks: ``(68, 2)`` (x, y) in the 48x48 frame, or None when the
      labeller found no face (stored as zeros with ``has_landmarks=False``).
    **extra: dataset-specific fields, passed through.
  """
  image = np.asarray(image, dtype=np.uint8).reshape(IMAGE_SHAPE)
  if landmarks is None:
    points, has = np.zeros(LANDMARKS_SHAPE, np.float32), False
  else:
    points = np.asarray(landmarks, dtype=np.float32)
    if points.shape != LANDMARKS_SHAPE or not np.all(np.isfinite(points)):
      raise ExpressionDataError(
          f"{example_id}: landmarks: expected finite {LANDMARKS_SHAPE} "
          f"(x, y), got shape {points.shape}")
    has = True
  return dict(image=image, emotion=int(emotion), landmarks=points,
              has_landmarks=has, id=example_id, **extra)


class LandmarkJoin:
  """Joins labeller output (data_prep.label68 ``.npz``) to examples by id.

  Ids missing from the file get ``has_landmarks=False`` and are counted; a
  split where *no* id matches is an error, since that means the file belongs
  to another dataset (or another id scheme) rather than that the detector
  missed every face.
  """

  def __init__(self, path):
    self.path = str(path)
    self.table = label_io.load_landmarks(path)

  def begin_split(self, split: str):
    self._split = split
    self._counts = collections.Counter()

  def lookup(self, example_id: str) -> np.ndarray | None:
    """``(68, 2)`` landmarks for ``example_id``, or None (none / not found)."""
    entry = self.table.get(example_id)
    if entry is None:
      self._counts["missing"] += 1
      return None
    points, found = entry
    self._counts["found" if found else "no_face"] += 1
    return points if found else None

  def end_split(self):
    c = self._counts
    total = sum(c.values())
    logging.info("landmarks for split %s from %s: %d with landmarks, %d no "
                 "face, %d ids not in the file", self._split, self.path,
                 c["found"], c["no_face"], c["missing"])
    if total and c["missing"] == total:
      raise ExpressionDataError(
          f"{self.path}: none of the {total} ids of split {self._split!r} is "
          f"in this landmark file (its ids look like "
          f"{list(self.table.ids[:3])}); expected the labeller output for "
          "this dataset")




# ------------------------------------------------------------- builders --

IMAGES_CONFIG = "images"
LANDMARKS_CONFIG = "dlib68"


def builder_configs(dataset: str, landmarks_name: str) -> list:
  """The two configs both builders offer (the first is the default).

  ``images``: no landmarks (all ``has_landmarks`` False). ``dlib68``: joined
  by id with the labeller's output, ``<manual_dir>/<landmarks_name>`` unless
  the builder is given ``landmarks_file=``.
  """
  return [
      tfds.core.BuilderConfig(
          name=IMAGES_CONFIG,
          description=f"{dataset} images and labels; no landmarks."),
      tfds.core.BuilderConfig(
          name=LANDMARKS_CONFIG,
          description=(f"{dataset} with 68 dlib landmarks from "
                       f"data_prep.label68 ({landmarks_name} in manual_dir, "
                       "or the builder's landmarks_file)")),
  ]


class ExpressionBuilder(tfds.core.GeneratorBasedBuilder):
  """What the FER2013 and TFD builders share (abstract: not registered).

  Constructor keywords (also through ``builder_kwargs``):
    source: the input file or folder; default: looked up in manual_dir.
    landmarks_file: labeller ``.npz`` for config ``dlib68`` (default
      ``<manual_dir>/LANDMARKS_NAME``) or for a custom config.
    skip_bad: skip and count malformed records instead of failing.

  Subclasses set LANDMARKS_NAME and DATASET and yield records through
  ``_examples``. What was used (source, landmark file, skipped records) is
  kept in ``info.metadata`` and saved with the dataset.
  """

  LANDMARKS_NAME: str
  DATASET: str

  def __init__(self, *, source: str | os.PathLike | None = None,
               landmarks_file: str | os.PathLike | None = None,
               skip_bad: bool = False, **kwargs):
    self._source = source
    self._landmarks_file = landmarks_file
    self._skip_bad = skip_bad
    super().__init__(**kwargs)

  # TFDS locates a builder's source through its top-level package name
  # (``importlib.resources``), which goes wrong twice here: TFDS 4.9.10 probes
  # the optional ``importlib_resources`` backport and fails without it, and
  # under pytest a ``tests/data_prep`` package can shadow the name
  # ``data_prep``. The defining file is the one right answer for both.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(inspect.getfile(cls))

  @classmethod
  def _get_pkg_dir_path(cls) -> epath.Path:
    """Where TFDS looks for README.md / CITATIONS.bib / TAGS.txt."""
    return epath.Path(inspect.getfile(cls)).parent

  def _prepare_build(self, dl_manager, source) -> LandmarkJoin | None:
    """Records the inputs in the metadata; returns the landmark join."""
    join = self._landmark_join(dl_manager)
    self.info.metadata["source"] = os.fspath(source)
    self.info.metadata["landmarks_file"] = join.path if join else None
    self.info.metadata["skip_bad"] = self._skip_bad
    self.info.metadata["skipped_bad_records"] = {}
    logging.info("%s from %s%s", self.DATASET, source,
                 f", landmarks from {join.path}" if join else "")
    return join

  def _landmark_join(self, dl_manager) -> LandmarkJoin | None:
    config, path = self.builder_config.name, self._landmarks_file
    if config == IMAGES_CONFIG:
      if path:
        raise ValueError(
            f"landmarks_file={os.fspath(path)!r} given with config "
            f"{IMAGES_CONFIG!r}, which has no landmarks; use config "
            f"{LANDMARKS_CONFIG!r}")
      return None
    if not path:
      if config != LANDMARKS_CONFIG:
        return None
      # Only now: TFDS asserts when manual_dir is read but empty, and a build
      # from source= with landmarks_file= needs no manual_dir at all.
      path = os.path.join(os.fspath(dl_manager.manual_dir),
                          self.LANDMARKS_NAME)
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"{os.fspath(path)}: landmark file not found; make it with "
          "`python -m data_prep.label68 ... --out=<file>` and pass "
          f"landmarks_file=<file> (or put it in manual_dir as "
          f"{self.LANDMARKS_NAME})")
    return LandmarkJoin(path)

  def _policy(self, split: str) -> BadInputPolicy:
    return BadInputPolicy(self._skip_bad, what=f"{self.DATASET} {split}")

  def _examples(self, split: str, records: Iterable[tuple[str, dict]],
                policy: BadInputPolicy, join: LandmarkJoin | None):
    """Yields ``(key, example)`` from ``(id, fields)`` records.

    ``fields`` holds ``image``, ``emotion`` and any dataset-specific
    features; landmarks are looked up here. The summary of skipped records
    is logged and stored once the split's records are exhausted.
    """
    if join:
      join.begin_split(split)
    for example_id, fields in records:
      points = join.lookup(example_id) if join else None
      yield example_id, make_example(example_id=example_id,
                                     landmarks=points, **fields)
    if join:
      join.end_split()
    policy.log_summary()
    self.info.metadata["skipped_bad_records"][split] = policy.num_skipped
