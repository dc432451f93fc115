"""68-point landmarks for small faces with dlib (detector + shape predictor).

DeVries et al. labelled FER2013 and TFD with a 68-point detector (Zhu &
Ramanan); we use dlib's HOG frontal face detector and the iBUG-68 shape
predictor shipped in ``face_recognition_models``. Both were built for faces
of 80 px and more, so a 48x48 face is first upsampled (bicubic, ``upsample``
times) and edge-padded (FER faces fill the frame, and the detector's window
needs some context around the face; padding raises the detection rate by a
few points), then the detector is tried at its own pyramid levels in turn
until one finds a face.

Coordinates. Landmarks are returned as ``(68, 2)`` float32 (x, y) in the
ORIGINAL image frame, 0-based, x = column, pixel centres at integers. dlib
reports integer pixel indices of the upsampled, padded image; a resize by
``s`` that maps pixel edges to pixel edges (PIL's) puts original pixel centre
x at ``(x + 0.5) * s - 0.5``, so the inverse is
``x_orig = (x_up - pad + 0.5) / s - 0.5``. With s = 4 the predictor's integer
rounding costs at most 1/8 px in the 48x48 frame.

dlib is imported lazily, so ``tml`` and the dataset builders never need it.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
import pathlib

import numpy as np
from PIL import Image

from tml.landmarks import NUM_LANDMARKS

# Why a face has (or lacks) landmarks; stored per image in the output file.
SOURCE_NONE = 0
SOURCE_DETECTOR = 1
SOURCE_FALLBACK = 2

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR,
             "lanczos": Image.LANCZOS, "nearest": Image.NEAREST}
_PREDICTOR_FILE = "shape_predictor_68_face_landmarks.dat"
_INSTALL_HINT = ("the 68-point labeller needs dlib and face_recognition_models;"
                 " install them with `pip install -e .[labels]`")


@dataclasses.dataclass(frozen=True)
class LabellerSettings:
  """How faces are found and landmarked (all recorded in the JSON sidecar).

  Attributes:
    upsample: integer resize factor applied before detection and prediction
      (1 = none).
    resample: PIL filter for the resize (bicubic, bilinear, lanczos, nearest).
    pad_fraction: edge padding per side, as a fraction of the upsampled size.
    detector_levels: dlib pyramid upsampling levels tried in order; the first
      level that finds a face wins.
    fallback_whole_image: if no face is detected, run the predictor on the
      whole image as the box (``source = SOURCE_FALLBACK``). Off by default so
      ``found`` means a detected face.
    predictor_path: the ``.dat`` model; default: face_recognition_models'.
  """
  upsample: int = 4
  resample: str = "bicubic"
  pad_fraction: float = 0.125
  detector_levels: tuple[int, ...] = (0, 1)
  fallback_whole_image: bool = False
  predictor_path: str | None = None

  def __post_init__(self):
    if self.upsample < 1:
      raise ValueError(f"upsample: expected >= 1, got {self.upsample}")
    if self.resample not in _RESAMPLE:
      raise ValueError(f"resample: expected one of {sorted(_RESAMPLE)}, got "
                       f"{self.resample!r}")
    if not 0 <= self.pad_fraction <= 1:
      raise ValueError(f"pad_fraction: expected 0..1, got {self.pad_fraction}")
    if not self.detector_levels or min(self.detector_levels) < 0:
      raise ValueError("detector_levels: expected non-negative levels, got "
                       f"{self.detector_levels}")


@dataclasses.dataclass(frozen=True)
class FaceLandmarks:
  """The labeller's answer for one image.

  Attributes:
    landmarks: ``(68, 2)`` float32 (x, y) in the original frame; zeros when
      ``found`` is False.
    found: landmarks are valid (detected face, or the fallback box).
    source: SOURCE_NONE / SOURCE_DETECTOR / SOURCE_FALLBACK.
    box: ``(left, top, right, bottom)`` float32 in the original frame (edges,
      continuous coordinates); zeros when nothing was found.
    level: the detector pyramid level that found the face, -1 otherwise.
  """
  landmarks: np.ndarray
  found: bool
  source: int
  box: np.ndarray
  level: int


def require_dlib():
  """Imports dlib or raises ImportError telling the user what to install."""
  try:
    import dlib  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ImportError(f"{_INSTALL_HINT} ({e})") from e
  return dlib


def default_predictor_path() -> str:
  """The 68-point model inside the ``face_recognition_models`` package.

  Found without importing the package: its ``__init__`` imports
  ``pkg_resources``, which recent setuptools no longer ship.
  """
  spec = importlib.util.find_spec("face_recognition_models")
  if spec is None or not spec.submodule_search_locations:
    raise ImportError(_INSTALL_HINT + " (face_recognition_models not found)")
  for root in spec.submodule_search_locations:
    path = pathlib.Path(root) / "models" / _PREDICTOR_FILE
    if path.is_file():
      return str(path)
  raise FileNotFoundError(
      f"{_PREDICTOR_FILE} not found in face_recognition_models at "
      f"{list(spec.submodule_search_locations)}; {_INSTALL_HINT}")


@functools.lru_cache(maxsize=2)
def _shape_predictor(path: str):
  # The model is 100 MB and takes seconds to parse; Labellers that differ
  # only in their settings share it (read-only in dlib, so safe to share).
  return require_dlib().shape_predictor(path)


class Labeller:
  """dlib face detector + 68-point shape predictor for one process.

  Not thread-safe or picklable (dlib objects); make one per worker process.
  """

  def __init__(self, settings: LabellerSettings = LabellerSettings()):
    dlib = require_dlib()
    self.settings = settings
    self.predictor_path = settings.predictor_path or default_predictor_path()
    if not os.path.isfile(self.predictor_path):
      raise FileNotFoundError(f"{self.predictor_path}: shape predictor model "
                              "not found")
    self._dlib = dlib
    self._detector = dlib.get_frontal_face_detector()
    self._predictor = _shape_predictor(self.predictor_path)

  # -- frames ---------------------------------------------------------------

  def _prepare(self, image: np.ndarray) -> tuple[np.ndarray, int]:
    """Upsampled, padded uint8 image (grey or RGB) and the pad in pixels."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim not in (2, 3):
      raise ValueError(f"expected a (H, W) or (H, W, 3) uint8 image, got "
                       f"{image.shape} {image.dtype}")
    if image.ndim == 3 and image.shape[2] == 1:
      image = image[..., 0]
    s = self.settings.upsample
    if s != 1:
      h, w = image.shape[:2]
      image = np.asarray(Image.fromarray(image).resize(
          (w * s, h * s), _RESAMPLE[self.settings.resample]))
    pad = int(round(self.settings.pad_fraction * max(image.shape[:2])))
    if pad:
      widths = ((pad, pad), (pad, pad)) + ((0, 0),) * (image.ndim - 2)
      image = np.pad(image, widths, mode="edge")
    return np.ascontiguousarray(image), pad

  def _to_original(self, xy_up: np.ndarray, pad: int) -> np.ndarray:
    s = self.settings.upsample
    return ((xy_up - pad + 0.5) / s - 0.5).astype(np.float32)

  def _box_to_up(self, box, pad: int):
    """Original-frame box edges -> dlib rectangle (inclusive pixel indices)."""
    s = self.settings.upsample
    left, top, right, bottom = (float(v) * s + pad for v in box)
    return self._dlib.rectangle(int(round(left)), int(round(top)),
                                int(round(right)) - 1, int(round(bottom)) - 1)

  def _box_to_original(self, rect, pad: int) -> np.ndarray:
    s = self.settings.upsample
    edges = np.array([rect.left(), rect.top(), rect.right() + 1,
                      rect.bottom() + 1], dtype=np.float32)
    return (edges - pad) / s

  # -- public ---------------------------------------------------------------

  def detect(self, image: np.ndarray, all_levels: bool = False
             ) -> tuple[list[np.ndarray], list[float], list[int]]:
    """Face boxes in the original frame.

    Args:
      image: ``(H, W)`` or ``(H, W, 3)`` uint8.
      all_levels: collect the boxes of every level in ``detector_levels``
        (photos with several faces of different sizes) instead of stopping at
        the first level that finds any (one face per image, as in FER).

    Returns:
      (boxes, scores, levels): boxes as ``(left, top, right, bottom)`` edges
      in original-frame pixel units, detector scores, and the pyramid level
      of each box (empty lists if nothing was found).
    """
    up, pad = self._prepare(image)
    boxes, scores, levels = [], [], []
    for level in self.settings.detector_levels:
      rects, level_scores, _ = self._detector.run(up, level, 0.0)
      boxes += [self._box_to_original(r, pad) for r in rects]
      scores += [float(v) for v in level_scores]
      levels += [level] * len(rects)
      if boxes and not all_levels:
        break
    return boxes, scores, levels

  def predict_in_box(self, image: np.ndarray, box) -> np.ndarray:
    """Runs the shape predictor in a given box.

    Args:
      image: ``(H, W)`` or ``(H, W, 3)`` uint8.
      box: ``(left, top, right, bottom)`` pixel edges in the original frame;
        dlib's inclusive rectangle ``(l, t, r, b)`` is ``(l, t, r+1, b+1)``.

    Returns:
      ``(68, 2)`` float32 (x, y) in the original frame.
    """
    up, pad = self._prepare(image)
    return self._predict(up, self._box_to_up(box, pad), pad)

  def _predict(self, up, rect, pad) -> np.ndarray:
    shape = self._predictor(up, rect)
    xy = np.array([(shape.part(i).x, shape.part(i).y)
                   for i in range(NUM_LANDMARKS)], dtype=np.float64)
    return self._to_original(xy, pad)

  def label(self, image: np.ndarray) -> FaceLandmarks:
    """Landmarks of the largest detected face (or the fallback box)."""
    up, pad = self._prepare(image)
    for level in self.settings.detector_levels:
      rects = self._detector(up, level)
      if len(rects):
        # FER/TFD crops hold one face that fills the frame; a second, smaller
        # box is a false positive in the background or a face fragment.
        rect = max(rects, key=lambda r: r.width() * r.height())
        return FaceLandmarks(self._predict(up, rect, pad), True,
                             SOURCE_DETECTOR,
                             self._box_to_original(rect, pad), level)
    if self.settings.fallback_whole_image:
      h, w = np.asarray(image).shape[:2]
      box = np.array([0, 0, w, h], dtype=np.float32)
      return FaceLandmarks(self._predict(up, self._box_to_up(box, pad), pad),
                           True, SOURCE_FALLBACK, box, -1)
    return FaceLandmarks(np.zeros((NUM_LANDMARKS, 2), np.float32), False,
                         SOURCE_NONE, np.zeros(4, np.float32), -1)
