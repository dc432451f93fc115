"""The labeller's output file: one ``.npz`` plus a JSON sidecar.

``<out>.npz`` holds, for N images in input order:

  ids        (N,) str      the dataset's stable ids (FER ``Training_<n>``...)
  landmarks  (N, 68, 2)    float32 (x, y), 0-based, x = column, in the
                           image's own (48x48) frame; zeros where not found
  found      (N,) bool     landmarks are valid (``has_landmarks``)
  source     (N,) uint8    0 no face, 1 detector, 2 whole-image fallback
  boxes      (N, 4)        float32 face box (left, top, right, bottom) as
                           pixel edges in the image frame; zeros if none
  level      (N,) int8     detector pyramid level that found it, -1 if none

``<out>.json`` (same stem) holds the settings, model, detection rates,
timings and versions. Both are written to temporary names and renamed when
complete, the ``.npz`` last, so a killed run leaves no output that reads as
finished. Reading needs numpy only (no dlib).
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import tempfile

import numpy as np

from tml.landmarks import NUM_LANDMARKS

_FIELDS = ("ids", "landmarks", "found", "source", "boxes", "level")
REQUIRED_FIELDS = ("ids", "landmarks", "found")


class LandmarkFileError(ValueError):
  """A labeller output file that does not hold what it should."""


@dataclasses.dataclass
class LandmarkTable:
  """Labeller output, indexable by id.

  Attributes:
    ids: ``(N,)`` str.
    landmarks: ``(N, 68, 2)`` float32 (x, y) in the image frame.
    found: ``(N,)`` bool.
    source: ``(N,)`` uint8 or None (files written by other tools).
  """
  ids: np.ndarray
  landmarks: np.ndarray
  found: np.ndarray
  source: np.ndarray | None = None

  def __post_init__(self):
    self._index = {str(k): i for i, k in enumerate(self.ids)}

  def __len__(self) -> int:
    return len(self.ids)

  def get(self, example_id: str):
    """``(landmarks (68, 2), found)`` for ``example_id``, or None."""
    i = self._index.get(example_id)
    if i is None:
      return None
    return self.landmarks[i], bool(self.found[i])


def sidecar_path(npz_path: str | os.PathLike) -> pathlib.Path:
  """``x/landmarks.npz`` -> ``x/landmarks.json``."""
  return pathlib.Path(npz_path).with_suffix(".json")


def _atomic_write(path: pathlib.Path, write_fn):
  path.parent.mkdir(parents=True, exist_ok=True)
  fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp",
                             dir=path.parent)
  try:
    with os.fdopen(fd, "wb") as f:
      write_fn(f)
      f.flush()
      os.fsync(f.fileno())
    # mkstemp makes the file private (0600); give it the usual permissions.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise


def save_landmarks(path: str | os.PathLike, arrays: dict, metadata: dict):
  """Writes ``path`` (.npz) and its JSON sidecar atomically.

  Args:
    path: output ``.npz`` path.
    arrays: the fields above (``ids``, ``landmarks``, ``found`` required).
    metadata: JSON-serialisable settings and statistics.
  """
  path = pathlib.Path(path)
  if path.suffix != ".npz":
    raise ValueError(f"{path}: expected a .npz output path")
  arrays = {k: np.asarray(v) for k, v in arrays.items() if k in _FIELDS}
  arrays["ids"] = arrays["ids"].astype(str)  # never an object array
  _validate(arrays, str(path))
  text = json.dumps(metadata, indent=2, sort_keys=True) + "\n"
  _atomic_write(sidecar_path(path), lambda f: f.write(text.encode("utf-8")))
  # The .npz goes last: its presence is what marks the run complete.
  _atomic_write(path, lambda f: np.savez(f, **arrays))


def load_landmarks(path: str | os.PathLike) -> LandmarkTable:
  """Reads and checks a labeller ``.npz``; raises LandmarkFileError."""
  path = pathlib.Path(path)
  try:
    with np.load(path, allow_pickle=False) as data:
      arrays = {k: data[k] for k in data.files}
  except (OSError, ValueError) as e:
    raise LandmarkFileError(f"{path}: not a readable .npz ({e})") from None
  _validate(arrays, str(path))
  return LandmarkTable(ids=arrays["ids"].astype(str),
                       landmarks=arrays["landmarks"].astype(np.float32),
                       found=arrays["found"].astype(bool),
                       source=arrays.get("source"))


def load_metadata(path: str | os.PathLike) -> dict:
  """The JSON sidecar of a labeller ``.npz``."""
  with open(sidecar_path(path), "r", encoding="utf-8") as f:
    return json.load(f)


def _validate(arrays: dict, where: str):
  missing = [k for k in REQUIRED_FIELDS if k not in arrays]
  if missing:
    raise LandmarkFileError(f"{where}: missing field(s) {missing}; expected "
                            f"{list(REQUIRED_FIELDS)}")
  n = len(arrays["ids"])
  expected = {"ids": (n,), "landmarks": (n, NUM_LANDMARKS, 2), "found": (n,),
              "source": (n,), "boxes": (n, 4), "level": (n,)}
  for key, shape in expected.items():
    if key in arrays and arrays[key].shape != shape:
      raise LandmarkFileError(f"{where}: field {key!r}: expected shape "
                              f"{shape}, got {arrays[key].shape}")
  if arrays["ids"].dtype.kind not in "US":
    raise LandmarkFileError(f"{where}: field 'ids': expected strings, got "
                            f"{arrays['ids'].dtype}")
  if len(set(arrays["ids"].tolist())) != n:
    raise LandmarkFileError(f"{where}: field 'ids': expected unique ids")
  found = arrays["found"].astype(bool)
  if not np.all(np.isfinite(arrays["landmarks"][found])):
    raise LandmarkFileError(f"{where}: field 'landmarks': non-finite values "
                            "where 'found' is True")
