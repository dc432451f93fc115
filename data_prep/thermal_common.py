"""What the two thermal face builders share: labels, schema, grey levels, crop.

Both ``synthetic_thermal`` and ``kopaczka_thermal`` store the same features so
that one input pipeline reads either:

  image      (S, S, 1) uint16   grey g in [0, 1] stored as round(g * 65535)
  landmarks  (68, 2) float32    (x, y) in the S x S crop, pixel centres, 0-based
  emotion    ClassLabel(THERMAL_EMOTIONS)
  subject, sequence, frame, pose  int32 (pose 0 = frontal)
  frontal, glasses               bool
  file_name                      text, the frame's image file name in the
                                 real style (tfds.data_source gives bytes)
  crop_box   (4,) float32       (x0, y0, x1, y1) of the square crop in the frame

Crop placement (`CROP_MODES`, a builder config field of both builders):

  facebox    (default) the square box `tml.facebox.find_face_box` finds in
             the frame itself: the warmest large component (skin above
             ambient), neck cut off, box from the head's width. It sees the
             image only, never the landmarks, so a test crop does not leak
             the test face's extent. Used for EVERY frame, training and test
             alike, so both come from one distribution; random jitter for
             training is the on-device augmentation's job (`tml.augment`).
  landmarks  the labelled landmark extent plus `margin` per side (`crop_box`,
             the 1.0.0 behaviour): the mean shape alone then scores ~8 %
             inter-pupil NME on the synthetic data, because the box encodes
             the jaw and brow extremes.

Either way `crop_box` stores the box that was used and `landmarks` are in
that crop's frame; with face-box crops a landmark may fall outside the crop
(the builders count such frames).

Crop geometry. ``crop_box`` is given in the original frame's *edge*
coordinates, in which pixel i covers [i, i + 1] (pixel centres, the landmark
convention, sit at i + 0.5 there). Crop pixel centre x (0-based, crop frame)
and original pixel-centre coordinate x_orig are related by

  x_orig = x0 + (x + 0.5) * (x1 - x0) / S - 0.5
  x      = (x_orig + 0.5 - x0) * S / (x1 - x0) - 0.5

and likewise for y with (y0, y1). This is exactly the sampling of PIL's
``Image.resize(..., box=crop_box)``, which does the resampling, so image and
landmarks cannot drift apart. The box is square (x1 - x0 == y1 - y0), so x and
y scale alike and distance-ratio metrics (NME) are the same in both frames.
"""
from __future__ import annotations

import inspect
import math
from typing import Sequence

from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from tml import facebox
from tml import landmarks as lm_lib

# Kopaczka / Chu order; the class index stored in `emotion` follows it.
THERMAL_EMOTIONS = ("angry", "contempt", "disgust", "fear", "happy", "sad",
                    "surprise", "neutral")
NUM_POSES = 9  # the database's nine head poses; 0 is frontal
DEFAULT_CROP_SIZE = 128
DEFAULT_MARGIN = 0.25
# Radiometric window mapped onto grey [0, 1]; covers ambient to the canthi.
DEFAULT_T_MIN = 20.0
DEFAULT_T_MAX = 40.0
UINT16_MAX = 65535
CROP_MODES = ("facebox", "landmarks")


class ThermalFormatError(ValueError):
  """Input that is not what a thermal builder expects; names file and field.

  Attributes:
    reason: a short category ('image', 'ljson', 'labels', 'file_name', ...)
      under which a build that skips bad frames counts it.
  """

  def __init__(self, message: str, reason: str = "other"):
    super().__init__(message)
    self.reason = reason


def format_error(path, field: str, expected: str, got=None,
                 reason: str = "other") -> ThermalFormatError:
  """The house-style error: ``<file>: field '<f>': expected ..., got ...``."""
  msg = f"{path}: field '{field}': expected {expected}"
  if got is not None:
    msg += f", got {got}"
  return ThermalFormatError(msg, reason)


class CodePathFromFile:
  """Builder mixin: `code_path` from the class's source file.

  TFDS resolves a packaged builder's `code_path` through the
  `importlib_resources` backport, which etils[epath] lists but an environment
  may lack (then every build fails with ModuleNotFoundError). The builders
  here need the path only to look for a checksums file, so the file is enough.
  """

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(inspect.getfile(cls))


def features_dict(crop_size: int) -> tfds.features.FeaturesDict:
  """The common TFDS schema of both thermal builders (see module docstring)."""
  s = int(crop_size)
  return tfds.features.FeaturesDict({
      "image": tfds.features.Tensor(shape=(s, s, 1), dtype=np.uint16),
      "landmarks": tfds.features.Tensor(
          shape=(lm_lib.NUM_LANDMARKS, 2), dtype=np.float32),
      "emotion": tfds.features.ClassLabel(names=THERMAL_EMOTIONS),
      "subject": np.int32,
      "sequence": np.int32,
      "frame": np.int32,
      "pose": np.int32,
      "frontal": np.bool_,
      "glasses": np.bool_,
      "file_name": tfds.features.Text(),
      "crop_box": tfds.features.Tensor(shape=(4,), dtype=np.float32),
  })


# ----------------------------------------------------------------------------
# Grey levels.
# ----------------------------------------------------------------------------

def to_unit_grey(image: np.ndarray, t_min: float = DEFAULT_T_MIN,
                 t_max: float = DEFAULT_T_MAX, *, source="image") -> np.ndarray:
  """Maps a frame to grey levels g in [0, 1], float32 ``(H, W)``.

  Args:
    image: ``(H, W)`` or ``(H, W, 1)``. uint8 (8-bit PNG): g = v / 255;
      uint16 (16-bit PNG): g = v / 65535; float (radiometric, degrees C):
      g = clip((T - t_min) / (t_max - t_min), 0, 1).
    t_min, t_max: the temperature window for float input.
    source: file name used in error messages.

  Raises:
    ThermalFormatError: other dtypes or shapes, non-finite temperatures, or an
      empty window.
  """
  a = np.asarray(image)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim != 2 or a.size == 0:
    raise format_error(source, "image", "a single-channel (H, W) frame",
                       f"shape {a.shape}", reason="image")
  if a.dtype == np.uint8:
    return a.astype(np.float32) / 255.0
  if a.dtype == np.uint16:
    return a.astype(np.float32) / float(UINT16_MAX)
  if np.issubdtype(a.dtype, np.floating):
    if not t_max > t_min:
      raise format_error(source, "t_max", f"t_max > t_min = {t_min}", t_max,
                         reason="config")
    if not np.all(np.isfinite(a)):
      raise format_error(source, "image", "finite temperatures (degrees C)",
                         f"{int(np.sum(~np.isfinite(a)))} non-finite values",
                         reason="image")
    g = (a.astype(np.float64) - t_min) / (t_max - t_min)
    return np.clip(g, 0.0, 1.0).astype(np.float32)
  raise format_error(source, "image",
                     "uint8, uint16 or float (degrees C) pixels", a.dtype,
                     reason="image")


def unit_to_uint16(grey: np.ndarray) -> np.ndarray:
  """Grey g in [0, 1] -> stored uint16 round(g * 65535); clips overshoot."""
  g = np.clip(np.asarray(grey, dtype=np.float64), 0.0, 1.0)
  return np.round(g * UINT16_MAX).astype(np.uint16)


def uint16_to_unit(stored: np.ndarray) -> np.ndarray:
  """Inverse of `unit_to_uint16` (up to quantisation), float32."""
  return np.asarray(stored, dtype=np.float32) / float(UINT16_MAX)


# ----------------------------------------------------------------------------
# Crop geometry.
# ----------------------------------------------------------------------------

def crop_box(landmarks: np.ndarray, margin: float = DEFAULT_MARGIN
             ) -> tuple[float, float, float, float]:
  """Square crop box ``(x0, y0, x1, y1)`` in edge coordinates (see module doc).

  The box is `tml.landmarks.square_crop_box` (landmark extent plus `margin`
  per side, in pixel-centre coordinates) shifted by +0.5 into edge
  coordinates, so it stays centred on the extent.

  Args:
    landmarks: ``(68, 2)`` (x, y) pixel centres in the frame; NaN points are
      ignored.
    margin: growth per side as a fraction of the larger extent side.
  """
  x0, y0, x1, y1 = lm_lib.square_crop_box(landmarks, margin)
  return (x0 + 0.5, y0 + 0.5, x1 + 0.5, y1 + 0.5)


# How far outside the frame an annotated point may lie, as a fraction of the
# frame's larger side: a jaw point just past the border is a real annotation;
# one a whole frame away is a broken file (e.g. coordinates in another unit).
MAX_OUTSIDE_FRACTION = 0.5


def check_points(points: np.ndarray, frame_shape: Sequence[int], *,
                 source="landmarks") -> np.ndarray:
  """Refuses frame landmarks that cannot be a face; returns them unchanged.

  Args:
    points: ``(68, 2)`` (x, y) pixel centres in the frame; NaN points (missing)
      are left to the caller and ignored here.
    frame_shape: ``(H, W, ...)`` of the frame the points belong to.
    source: file name for error messages.

  Raises:
    ThermalFormatError: (reason 'landmarks') all finite points coincide (a
      zero-size face: no crop, no inter-pupil distance), or a point lies more
      than MAX_OUTSIDE_FRACTION of the frame's larger side outside the frame.
  """
  p = np.asarray(points, dtype=np.float64).reshape(-1, 2)
  finite = p[np.isfinite(p).all(axis=1)]
  if len(finite) == 0:
    return points
  if np.all(finite.max(axis=0) - finite.min(axis=0) == 0):
    x, y = finite[0]
    raise format_error(source, "landmarks.points",
                       "68 distinct points spanning a face",
                       f"all {len(finite)} points at (x={x:g}, y={y:g})",
                       reason="landmarks")
  h, w = int(frame_shape[0]), int(frame_shape[1])
  slack = MAX_OUTSIDE_FRACTION * max(h, w)
  lo = np.array([-0.5 - slack, -0.5 - slack])
  hi = np.array([w - 0.5 + slack, h - 0.5 + slack])
  far = np.flatnonzero(((finite < lo) | (finite > hi)).any(axis=1))
  if far.size:
    idx = np.flatnonzero(np.isfinite(p).all(axis=1))[far]
    x, y = p[idx[0]]
    raise format_error(
        source, f"landmarks.points[{int(idx[0])}]",
        f"points within the {w}x{h} frame (up to {slack:g} px outside)",
        f"{idx.size} point(s) far off the frame, first (x={x:g}, y={y:g})",
        reason="landmarks")
  return points


def check_crop_mode(crop_mode: str) -> str:
  if crop_mode not in CROP_MODES:
    raise format_error("builder config", "crop_mode",
                       f"one of {', '.join(CROP_MODES)}", repr(crop_mode),
                       reason="config")
  return crop_mode


def face_box(grey_frame: np.ndarray, *, source="image"
             ) -> tuple[float, float, float, float]:
  """`tml.facebox.find_face_box` of a whole frame, edge coordinates.

  Raises:
    ThermalFormatError: (reason 'face_box') no face-like warm region.
  """
  try:
    return facebox.find_face_box(grey_frame)
  except facebox.FaceBoxError as err:
    raise format_error(source, "image", "a frame with a face warmer than "
                       "its background (crop_mode='landmarks' crops without "
                       "a face box)", str(err), reason="face_box") from err


def choose_box(grey_frame: np.ndarray, landmarks: np.ndarray, crop_mode: str,
               margin: float = DEFAULT_MARGIN, *, source="image"
               ) -> tuple[float, float, float, float]:
  """The crop box of a frame under `crop_mode` (see the module docstring).

  Args:
    grey_frame: ``(H, W)`` the whole frame (used by "facebox" only).
    landmarks: ``(68, 2)`` frame landmarks (used by "landmarks" only).
    crop_mode: one of CROP_MODES.
    margin: the "landmarks" mode's margin.
    source: file name for error messages.
  """
  if check_crop_mode(crop_mode) == "facebox":
    return face_box(grey_frame, source=source)
  return crop_box(landmarks, margin)


def points_outside(crop_landmarks: np.ndarray, size: int) -> int:
  """How many of the crop-frame points lie outside the S x S crop (NaN
  points, masked as missing, are not counted)."""
  p = np.asarray(crop_landmarks, dtype=np.float64)
  inside = (p >= -0.5) & (p <= size - 0.5)
  finite = np.isfinite(p).all(axis=-1)
  return int(np.sum(finite & ~inside.all(axis=-1)))


def frame_to_crop(points: np.ndarray, box: Sequence[float], size: int
                  ) -> np.ndarray:
  """Frame pixel-centre (x, y) -> crop (x, y). ``(..., 2)`` -> ``(..., 2)``."""
  p = np.asarray(points, dtype=np.float64)
  x0, y0, x1, y1 = (float(v) for v in box)
  if not (x1 > x0 and y1 > y0):
    raise ValueError(f"crop box {tuple(box)} has no area (x1 <= x0 or "
                     "y1 <= y0); see check_points for its usual cause")
  sx, sy = size / (x1 - x0), size / (y1 - y0)
  return np.stack([(p[..., 0] + 0.5 - x0) * sx - 0.5,
                   (p[..., 1] + 0.5 - y0) * sy - 0.5], axis=-1)


def crop_to_frame(points: np.ndarray, box: Sequence[float], size: int
                  ) -> np.ndarray:
  """Crop (x, y) -> frame pixel-centre (x, y). Inverse of `frame_to_crop`."""
  p = np.asarray(points, dtype=np.float64)
  x0, y0, x1, y1 = (float(v) for v in box)
  sx, sy = (x1 - x0) / size, (y1 - y0) / size
  return np.stack([x0 + (p[..., 0] + 0.5) * sx - 0.5,
                   y0 + (p[..., 1] + 0.5) * sy - 0.5], axis=-1)


def crop_and_resize(frame: np.ndarray, box: Sequence[float], size: int
                    ) -> np.ndarray:
  """Resamples the square `box` of a frame to ``(size, size)`` float32.

  Antialiased (PIL's bilinear filter widens with the reduction factor), so a
  600-pixel face shrunk to 128 does not alias the sensor noise. Parts of the
  box outside the frame take the value of the nearest border pixel: the frame
  edge of a thermal camera image is background at ambient temperature, and
  a replicated edge keeps the crop free of artificial steps.

  Args:
    frame: ``(H, W)`` float (grey levels or degrees C).
    box: ``(x0, y0, x1, y1)`` in edge coordinates, see the module docstring.
    size: S, the output side.
  """
  frame = np.asarray(frame, dtype=np.float32)
  h, w = frame.shape
  x0, y0, x1, y1 = (float(v) for v in box)
  # Filter support reaches about one box-pixel beyond the box; take a little
  # more so the border handling is ours (edge replicate), not PIL's.
  reach = int(math.ceil(max(x1 - x0, y1 - y0) / size)) + 2
  ix0, iy0 = int(math.floor(x0)) - reach, int(math.floor(y0)) - reach
  ix1, iy1 = int(math.ceil(x1)) + reach, int(math.ceil(y1)) + reach
  # Cut the window out first (cheap views), then pad only what is missing.
  window = frame[max(iy0, 0):max(min(iy1, h), 0),
                 max(ix0, 0):max(min(ix1, w), 0)]
  if window.size == 0:  # box entirely outside: the nearest border pixel
    cy, cx = min(max(iy0, 0), h - 1), min(max(ix0, 0), w - 1)
    window = frame[cy:cy + 1, cx:cx + 1]
    pad = ((0, iy1 - iy0 - 1), (0, ix1 - ix0 - 1))
  else:
    pad = ((max(0, -iy0), max(0, iy1 - h)), (max(0, -ix0), max(0, ix1 - w)))
  if any(p for pair in pad for p in pair):
    window = np.pad(window, pad, mode="edge")
  local = (x0 - ix0, y0 - iy0, x1 - ix0, y1 - iy0)
  out = Image.fromarray(np.ascontiguousarray(window)).resize(
      (size, size), Image.Resampling.BILINEAR, box=local)
  return np.asarray(out, dtype=np.float32)


def make_example(grey_frame: np.ndarray, landmarks: np.ndarray, *,
                 crop_size: int, margin: float, emotion: int | str,
                 subject: int, sequence: int, frame: int, pose: int,
                 glasses: bool, file_name: str, box=None) -> dict:
  """One stored example from a full frame and its frame-coordinate landmarks.

  Args:
    grey_frame: ``(H, W)`` float grey levels in [0, 1] (see `to_unit_grey`).
    landmarks: ``(68, 2)`` (x, y) pixel centres in the frame, all finite.
    crop_size, margin: S and the crop margin.
    box: the square crop box (edge coordinates, e.g. `choose_box`); None:
      the landmark extent plus `margin` (`crop_box`).
    emotion: index into THERMAL_EMOTIONS or its name.
    subject, sequence, frame, pose, glasses, file_name: stored as is;
      `frontal` is derived as ``pose == 0``.
  """
  check_points(landmarks, np.shape(grey_frame), source=file_name)
  if box is None:
    box = crop_box(landmarks, margin)
  crop = crop_and_resize(grey_frame, box, crop_size)
  return assemble_example(
      crop, frame_to_crop(landmarks, box, crop_size), box, emotion=emotion,
      subject=subject, sequence=sequence, frame=frame, pose=pose,
      glasses=glasses, file_name=file_name)


def assemble_example(grey_crop: np.ndarray, crop_landmarks: np.ndarray,
                     box: Sequence[float], *, emotion: int | str,
                     subject: int, sequence: int, frame: int, pose: int,
                     glasses: bool, file_name: str) -> dict:
  """The feature dict from a cropped ``(S, S)`` grey image in [0, 1]."""
  if isinstance(emotion, str):
    emotion = THERMAL_EMOTIONS.index(emotion)
  s = grey_crop.shape[0]
  return {
      "image": unit_to_uint16(grey_crop).reshape(s, s, 1),
      "landmarks": np.asarray(crop_landmarks, dtype=np.float32),
      "emotion": int(emotion),
      "subject": np.int32(subject),
      "sequence": np.int32(sequence),
      "frame": np.int32(frame),
      "pose": np.int32(pose),
      "frontal": bool(pose == 0),
      "glasses": bool(glasses),
      "file_name": file_name,
      "crop_box": np.asarray(box, dtype=np.float32),
  }


def kopaczka_file_name(subject: int, sequence: int, frame: int,
                       source_ext: str = "jpg") -> str:
  """The database's base name style ``irface_subSSS_seqQQ_frmFFFFF.jpg_lfb``."""
  return (f"irface_sub{subject:03d}_seq{sequence:02d}_frm{frame:05d}"
          f".{source_ext}_lfb")
