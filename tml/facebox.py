"""A face box found in a thermal frame itself, without landmarks.

Chu & Liu crop the face before the network sees it; cropping a TEST image to
its own ground-truth landmark extent leaks the face's extent (jaw and brow
extremes) into the crop, and the mean shape alone then scores ~8 % NME. A
box from the image is what a deployed system has. Long-wave infrared makes
it simple: skin (32-36 C) is the warmest large thing in a room at ambient
(20-25 C); hair, clothing and glasses are cooler (DESIGN.md, "Facts for a
believable synthetic thermal face").

`find_face_box(image)` takes ONLY the image (any monotone grey scale or
degrees C; warmer must be brighter) and returns a square box ``(x0, y0, x1,
y1)`` in the image's EDGE coordinates (pixel i covers [i, i + 1], the crop
convention of `data_prep.thermal_common`):

  1. Work on a copy area-reduced to about `WORK_SIZE` pixels on its longer
     side, lightly smoothed: the box needs no sensor-scale detail, and the
     reduction makes the cost independent of the camera.
  2. Background = the mode of the histogram (the room fills most of a frame);
     hot = the 99.5th percentile (skin; the canthi are hotter still but
     tiny). Threshold at ``background + THRESHOLD * (hot - background)``:
     between the skin border and the warmest clothing or hair.
  3. The largest connected warm component (4-connectivity); closed (a small
     disk, then `NOTCH_ROWS` vertically) and its holes filled, so opaque
     glasses (near ambient) neither cut the face nor notch its outline.
  4. The neck is as warm as the face: it is cut where the component, below
     its widest rows, narrows under `NECK_RATIO` of the head width (widths
     are row extents, outermost pixel to outermost pixel). The head width W
     is a high percentile of the row widths above the cut (robust to ears
     and a stray warm pixel). The cut (chin / neck junction) anchors the box
     vertically: the head's top row follows the hairline (hair is cooler
     than skin, a bald head is not) and varies 2-3 times as much; it is used
     only when no neck is found.
  5. Square box: centre ``(cx, cut - A_CUT * W)`` (or ``top + A_TOP * W``),
     side ``SIDE * W``. The constants were set once so that on average the
     box matches the landmark extent plus 25 % margin (the 1.0.0 crops), by
     least squares on 448 + 448 frontal renders of the synthetic builder's
     narrow and wide variations; the box's residual error there is 2.5 %
     (narrow) / 3.4 % (wide) of its side in the centre and 5-6 % in the
     side, and 99.8 % of the wide frontal frames keep every landmark inside
     (median margin 15 % of the side). No landmark of the image at hand
     enters. Calibrated on frontal faces: at +-30 degrees of yaw or +-20 of
     pitch the box shifts by up to ~10 % of its side and ~13 % of such
     frames lose a landmark off the crop.

Errors: `FaceBoxError` (a ValueError) when nothing in the image is warmer
than its background (a constant or pure-noise frame, a frame with no
subject) or the warm region is too small to be a face; callers decide
whether to skip the frame or fall back (`centre_box`).
"""
from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

WORK_SIZE = 128        # longer side of the working copy, pixels
THRESHOLD = 0.7        # fraction of the background -> hot range
MIN_CONTRAST_NOISE = 8.0  # hot - background must exceed this many noise stds
MIN_AREA = 0.01        # smallest face component, fraction of the frame
NECK_RATIO = 0.78      # the neck is narrower than this share of the head
NOTCH_ROWS = 11        # side notches shorter than this are closed (glasses)
WIDTH_PERCENTILE = 90  # head width: this percentile of the head's row widths
# Box geometry in head widths (calibrated on synthetic renders, see docstring).
A_CUT = 0.14   # box centre above the neck cut
A_TOP = 0.88   # box centre below the head's top (when no neck is found)
SIDE = 1.55


_DISK = ndimage.generate_binary_structure(2, 1)
_DISK = ndimage.iterate_structure(_DISK, 3)  # radius-3 diamond


class FaceBoxError(ValueError):
  """No face-like warm region in the image; the message says why."""


def _reduce(image: np.ndarray) -> tuple[np.ndarray, float]:
  """Area-reduced copy with longer side about WORK_SIZE, and its step."""
  h, w = image.shape
  f = max(1, int(math.floor(max(h, w) / WORK_SIZE)))
  if f == 1:
    return image, 1.0
  hh, ww = h // f, w // f
  small = image[:hh * f, :ww * f].reshape(hh, f, ww, f).mean(axis=(1, 3))
  return small, float(f)


def _noise_std(image: np.ndarray) -> float:
  """Robust per-pixel noise std from horizontal neighbour differences."""
  d = np.diff(image, axis=1).ravel()
  if d.size == 0:
    return 0.0
  return float(1.4826 * np.median(np.abs(d - np.median(d))) / math.sqrt(2))


def _background_mode(image: np.ndarray) -> float:
  lo, hi = np.percentile(image, [0.5, 99.5])
  if not hi > lo:
    return float(lo)
  counts, edges = np.histogram(image, bins=64, range=(lo, hi))
  k = int(np.argmax(counts))
  return float((edges[k] + edges[k + 1]) / 2)


def warm_mask(image: np.ndarray) -> tuple[np.ndarray, float]:
  """The face's warm component on the working copy, and the copy's step.

  Args:
    image: ``(H, W)`` float (or ``(H, W, 1)``), warmer = larger.

  Returns:
    ``(mask, step)``: bool ``(h, w)`` mask on the reduced copy (holes
    filled), and frame pixels per copy pixel.

  Raises:
    FaceBoxError: see the module docstring.
  """
  a = np.asarray(image, dtype=np.float64)
  if a.ndim == 3 and a.shape[-1] == 1:
    a = a[..., 0]
  if a.ndim != 2 or min(a.shape) < 8:
    raise FaceBoxError(f"expected an (H, W) frame of at least 8x8, got shape "
                       f"{np.shape(image)}")
  if not np.all(np.isfinite(a)):
    raise FaceBoxError("the image has non-finite values")
  small, step = _reduce(a)
  noise = _noise_std(small)
  smooth = ndimage.gaussian_filter(small, 1.0)
  bg = _background_mode(smooth)
  hot = float(np.percentile(smooth, 99.5))
  contrast = hot - bg
  if not contrast > max(MIN_CONTRAST_NOISE * noise, 1e-6 * max(abs(hot), 1)):
    raise FaceBoxError(
        f"no warm region: hot (99.5th percentile) - background mode = "
        f"{contrast:.3g}, noise std {noise:.3g}")
  mask = smooth > bg + THRESHOLD * contrast
  labels, n = ndimage.label(mask)
  if n == 0:
    raise FaceBoxError("no pixel above the warm threshold")
  sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
  k = int(np.argmax(sizes)) + 1
  if sizes[k - 1] < MIN_AREA * mask.size:
    raise FaceBoxError(
        f"largest warm region is {int(sizes[k - 1])} pixels of {mask.size} "
        f"(under {MIN_AREA:.0%} of the frame): no face")
  # Closing first: a lens or its temple reaching the face's edge leaves a
  # notch, not a hole, and fill_holes alone would keep it; a vertical
  # closing fills notches up to NOTCH_ROWS high, which a neck never is.
  face = ndimage.binary_closing(labels == k, structure=_DISK)
  face = ndimage.binary_closing(face, structure=np.ones((NOTCH_ROWS, 1)))
  return ndimage.binary_fill_holes(face) | (labels == k), step


def head_geometry(mask: np.ndarray
                  ) -> tuple[float, float, float | None, float]:
  """``(cx, top, cut, width)`` of the head in `mask`'s edge coordinates.

  top: the first row's upper edge; cut: the upper edge of the first neck row
  (None when the component never narrows into a neck); width: the head
  width; cx: the median mid-point of the head rows.
  """
  rows = np.flatnonzero(mask.any(axis=1))
  top, bottom = int(rows[0]), int(rows[-1])
  # Row extents (outermost pixels), not pixel counts: a cold lens or its
  # temple inside a row does not make the head narrower.
  band = mask[top:bottom + 1]
  filled = band.any(axis=1)
  left = np.argmax(band, axis=1)
  right = band.shape[1] - np.argmax(band[:, ::-1], axis=1)
  widths = np.where(filled, right - left, 0).astype(np.float64)
  run_max = np.maximum.accumulate(widths)
  cut = None
  for i in range(len(widths)):
    # Below the widest rows (at least ~0.8 head widths down), the first
    # clearly narrower row is the neck.
    if i >= 0.8 * run_max[i] and widths[i] < NECK_RATIO * run_max[i]:
      cut = top + i
      break
  n_head = len(widths) if cut is None else cut - top
  head_w = widths[:n_head][filled[:n_head]]
  width = float(np.percentile(head_w, WIDTH_PERCENTILE))
  # The median row mid-point: an ear or a hand at one side moves it little.
  mids = ((left + right) / 2)[:n_head][filled[:n_head]]
  cx = float(np.median(mids))
  return cx, float(top), None if cut is None else float(cut), width


def find_face_box(image: np.ndarray) -> tuple[float, float, float, float]:
  """Square face box ``(x0, y0, x1, y1)``, edge coordinates of `image`.

  Args:
    image: ``(H, W)`` or ``(H, W, 1)`` frame, any grey scale or degrees C,
      warmer = larger. Nothing else: the box cannot depend on landmarks.

  Raises:
    FaceBoxError: no face-like warm region (see the module docstring).
  """
  mask, step = warm_mask(image)
  cx, top, cut, width = head_geometry(mask)
  cy = top + A_TOP * width if cut is None else cut - A_CUT * width
  half = 0.5 * SIDE * width
  return tuple(float(v * step) for v in
               (cx - half, cy - half, cx + half, cy + half))


def centre_box(height: int, width: int, fraction: float = 0.5
               ) -> tuple[float, float, float, float]:
  """A fallback: the centred square of side ``fraction * min(H, W)``."""
  side = fraction * min(height, width)
  cx, cy = width / 2, height / 2
  return (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2)
