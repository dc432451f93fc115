"""A radiometric (degrees C) long-wave infrared image of a face, from landmarks.

The temperature field is painted in layers (background, shoulders, neck, ears,
hair, face skin, brows, eyes, nose and breath, facial hair, lips, glasses).
Each layer's mask is an analytic soft edge, the normal CDF of the signed
distance to a polygon drawn through the projected landmarks, which is what a
Gaussian blur of a hard edge gives: heat diffusion makes thermal edges smooth
and low in contrast, and being analytic the masks are exact to sub-pixel
precision, so features sit where the landmarks say at any resolution. The facts
encoded (DESIGN.md): ambient background; hair and brows cooler than skin; the
face border and ears cooler than its centre; the nose tip the coolest skin; the
inner eye corners the hottest points with slightly cooler eyeballs; lips a
little warmer than skin and an open mouth hotter still; glasses opaque near
ambient with a sharp edge; facial hair insulates like scalp hair and reads
cooler than skin; exhaled air warms and inhaled air cools the nostrils. Then
residual sensor shading (smooth waves fixed to the frame), optics blur and
sensor noise.

Everything is evaluated on a `Grid`: output pixel (u, v) has its centre at
frame pixel-centre coordinate x = x0 + (u + 0.5) * step - 0.5 (likewise y),
the crop mapping of `data_prep.thermal_common`. Rendering on the crop grid
directly is how the builder avoids painting 1024 x 768 frames it would shrink
to 128 x 128 anyway; sample positions outside the frame are clamped to its
edge, as `thermal_common.crop_and_resize` replicates a real frame's edge.
"""
from __future__ import annotations

import dataclasses

import numpy as np
from PIL import Image
from scipy import ndimage
from scipy import special

from data_prep.synthetic_thermal import shape_model


@dataclasses.dataclass(frozen=True)
class Grid:
  """Output sampling grid: corner (x0, y0) in frame edge coordinates."""
  x0: float
  y0: float
  step: float  # frame pixels per output pixel
  width: int
  height: int

  @classmethod
  def for_crop(cls, box, size: int) -> "Grid":
    x0, y0, x1, _ = (float(v) for v in box)
    return cls(x0, y0, (x1 - x0) / size, size, size)

  @classmethod
  def full_frame(cls, width: int, height: int, step: float = 1.0) -> "Grid":
    return cls(0.0, 0.0, step, int(np.ceil(width / step)),
               int(np.ceil(height / step)))


@dataclasses.dataclass(frozen=True)
class Thermal:
  """Temperatures (degrees C) and sensor properties of one frame."""
  ambient: float = 22.0
  wall_gradient: float = 0.8      # top-to-bottom of the frame
  skin_core: float = 34.6
  skin_border: float = 32.6
  forehead: float = 0.3           # extra warmth of the forehead
  cheek: float = 0.4              # cheeks cooler than forehead by this
  hair: float = 30.0
  ear: float = 31.5
  neck: float = 33.6
  clothing: float = 29.0
  brow_drop: float = 1.2
  eye: float = 35.0
  canthus: float = 36.0
  nose_tip: float = 31.5
  lips: float = 34.6
  mouth: float = 36.0
  glasses: bool = False
  lens: float = 23.5
  blobs: np.ndarray | None = None  # (k, 4): model x, y, sigma, amplitude C
  optics_sigma: float = 1.2       # sensor pixels
  netd: float = 0.07              # noise std per sensor pixel
  beard: str = ""                 # "", "moustache", "goatee" or "full"
  beard_temp: float = 31.0        # facial hair insulates: cooler than skin
  beard_density: float = 0.8      # how far the hair pulls toward beard_temp
  softness: float = 1.0           # multiplies the face's edge softness
  shading: np.ndarray | None = None  # (k, 4): amplitude C, kx, ky, phase
  breath: float = 0.0             # exhaled (> 0) / inhaled (< 0) air, C
  gain: float = 1.0               # contrast about ambient (distance, humidity)


@dataclasses.dataclass(frozen=True)
class Face:
  """A posed face: model-space shape and how it lands in the frame."""
  shape: np.ndarray            # (68, 3) model units, identity + expression
  pose: shape_model.Pose
  hairline: float = 0.0
  neck_width: float = 0.26     # half-width of the neck at its top, model units

  @property
  def landmarks(self) -> np.ndarray:
    """``(68, 2)`` (x, y) frame pixel centres."""
    return shape_model.project(self.shape, self.pose)


def outlines(face: Face) -> dict[str, np.ndarray]:
  """Render-only outlines in frame coordinates, name -> ``(n, 2)`` (x, y)."""
  p = face.shape
  cx = (p[0, 0] + p[16, 0]) / 2
  yc = (p[0, 1] + p[16, 1]) / 2 - 0.02
  a = 0.5 * (p[16, 0] - p[0, 0])
  t = np.linspace(0.0, np.pi, 11)
  hairline = np.stack([cx + 0.97 * a * np.cos(t),
                       yc - 0.2 - (0.3 + face.hairline) * np.sin(t) ** 0.5,
                       -0.3 + 0.25 * np.sin(t)], axis=1)
  e = np.linspace(0, 2 * np.pi, 12, endpoint=False)
  ears = [np.stack([np.full_like(e, x) + 0.05 * np.cos(e),
                    0.1 + 0.13 * np.sin(e), np.full_like(e, -0.5)], axis=1)
          for x in (p[0, 0] - 0.02, p[16, 0] + 0.02)]
  lenses = []
  u = np.linspace(0, 2 * np.pi, 20, endpoint=False)
  cu, su = np.cos(u), np.sin(u)
  for eye, out in ((slice(36, 42), -1), (slice(42, 48), 1)):
    c = p[eye].mean(axis=0)
    lenses.append(np.stack([
        c[0] + 0.012 * out + 0.16 * np.sign(cu) * np.abs(cu) ** 0.6,
        c[1] + 0.02 + 0.11 * np.sign(su) * np.abs(su) ** 0.6,
        np.full_like(u, c[2] + 0.08)], axis=1))
  # Glasses' temples run from each lens's outer edge back past the temple.
  temples = [np.array([lenses[0][10], [p[0, 0] + 0.02, p[0, 1] - 0.04, -0.4]]),
             np.array([lenses[1][0], [p[16, 0] - 0.02, p[16, 1] - 0.04, -0.4]])]
  bridge = np.array([lenses[0][0], lenses[1][10]])
  nw = face.neck_width
  neck = np.array([[cx - nw, 0.40, -0.4], [cx + nw, 0.40, -0.4],
                   [cx + nw + 0.05, 2.6, -0.4], [cx - nw - 0.05, 2.6, -0.4]])
  side = [(0.30, 1.0), (0.9, 1.22), (1.4, 1.6), (1.55, 3.5)]
  body = np.array([[cx - x, y, -0.5] for x, y in side]
                  + [[cx + x, y, -0.5] for x, y in side[::-1]])
  proj = lambda q: shape_model.project(q, face.pose)
  flat = lambda q: shape_model.project(q, face.pose, rotate=False)
  return {
      "face": np.concatenate([proj(p[:17]), proj(hairline)]),
      "ear_r": proj(ears[0]), "ear_l": proj(ears[1]),
      "lens_r": proj(lenses[0]), "lens_l": proj(lenses[1]),
      "temple_r": proj(temples[0]), "temple_l": proj(temples[1]),
      "bridge": proj(bridge), "neck": flat(neck), "body": flat(body),
  }


def skull_ellipse(face: Face) -> tuple[np.ndarray, np.ndarray]:
  """The cranium's silhouette: centre ``(2,)`` and 2x2 matrix M in the frame.

  The cranium is an ellipsoid; under any rotation its orthographic outline is
  the ellipse {q : (q - centre)^T M (q - centre) <= 1}.
  """
  p, pose = face.shape, face.pose
  half = 0.5 * (p[16, 0] - p[0, 0])
  centre = np.array([(p[0, 0] + p[16, 0]) / 2,
                     (p[0, 1] + p[16, 1]) / 2 - 0.09, -0.62])
  r = shape_model.rotation(pose.yaw, pose.pitch, pose.roll)
  a = r @ np.diag(1.0 / np.array([1.1 * half, 0.78, 0.68]) ** 2) @ r.T
  m = a[:2, :2] - np.outer(a[:2, 2], a[2, :2]) / a[2, 2]
  return shape_model.project(centre, pose), m / pose.scale ** 2


class _Canvas:
  """Sample coordinates of a grid and soft-mask painting on windows of it."""

  def __init__(self, grid: Grid, frame_size: tuple[int, int], scale: float,
               softness: float = 1.0):
    fw, fh = frame_size
    self.grid, self.unit = grid, float(scale)  # frame pixels per model unit
    self.softness = float(softness)
    xs = grid.x0 + (np.arange(grid.width) + 0.5) * grid.step - 0.5
    ys = grid.y0 + (np.arange(grid.height) + 0.5) * grid.step - 0.5
    self.xs = np.clip(xs, 0, fw - 1).astype(np.float32)
    self.ys = np.clip(ys, 0, fh - 1).astype(np.float32)
    # A sample's footprint softens every edge a little: analytic antialiasing.
    self.min_soft = 0.4 * grid.step

  def window(self, pts: np.ndarray, pad: float):
    """Row and column slices covering the bounding box of `pts` +- `pad`."""
    (x0, y0), (x1, y1) = pts.min(axis=0) - pad, pts.max(axis=0) + pad
    cols = slice(np.searchsorted(self.xs, x0),
                 np.searchsorted(self.xs, x1, "right"))
    rows = slice(np.searchsorted(self.ys, y0),
                 np.searchsorted(self.ys, y1, "right"))
    return rows, cols

  def soft_px(self, units: float) -> float:
    """An edge softness in model units -> frame pixels, with the floor."""
    return float(np.hypot(units * self.softness * self.unit, self.min_soft))

  def polygon(self, pts, soft_units: float):
    """Soft inside-mask of a closed polygon: ``(rows, cols, mask)``."""
    soft = self.soft_px(soft_units)
    rows, cols = self.window(pts, 3 * soft)
    sd = _signed_distance(self.xs[None, cols], self.ys[rows, None], pts)
    return rows, cols, special.ndtr(sd / soft).astype(np.float32)

  def line(self, pts, width_units: float, soft_units: float):
    """Soft mask of a polyline of the given width: ``(rows, cols, mask)``."""
    soft, half = self.soft_px(soft_units), 0.5 * width_units * self.unit
    rows, cols = self.window(pts, half + 3 * soft)
    d = _distance(self.xs[None, cols], self.ys[rows, None], pts, closed=False)
    return rows, cols, special.ndtr((half - d) / soft).astype(np.float32)

  def gauss(self, centre, sx_units: float, sy_units: float):
    """Gaussian bump of peak 1 at a frame point: ``(rows, cols, weight)``."""
    sx, sy = sx_units * self.unit, sy_units * self.unit
    rows, cols = self.window(np.array([centre]), 3 * max(sx, sy))
    gx = np.exp(-0.5 * ((self.xs[cols] - centre[0]) / sx) ** 2)
    gy = np.exp(-0.5 * ((self.ys[rows] - centre[1]) / sy) ** 2)
    return rows, cols, np.outer(gy, gx).astype(np.float32)


def _distance(x, y, pts, closed: bool):
  """Distance from sample points to a polyline; x ``(1, w)``, y ``(h, 1)``."""
  pts = np.asarray(pts, dtype=np.float32)
  ends = np.roll(pts, -1, axis=0) if closed else pts[1:]
  d2 = None
  for (ax, ay), (bx, by) in zip(pts, ends):
    ex, ey = bx - ax, by - ay
    px, py = x - ax, y - ay
    t = np.clip((px * ex + py * ey) / max(ex * ex + ey * ey, 1e-12), 0, 1)
    dx, dy = px - t * ex, py - t * ey
    seg = dx * dx + dy * dy
    d2 = seg if d2 is None else np.minimum(d2, seg)
  return np.sqrt(d2)


def _signed_distance(x, y, pts):
  """Signed distance to a closed polygon, positive inside (even-odd rule)."""
  pts = np.asarray(pts, dtype=np.float32)
  inside = np.zeros(np.broadcast_shapes(x.shape, y.shape), dtype=bool)
  for (ax, ay), (bx, by) in zip(pts, np.roll(pts, -1, axis=0)):
    crosses = (ay > y) != (by > y)  # (h, 1): rows the edge spans
    if not crosses.any() or by == ay:
      continue
    x_at = ax + (y - ay) * ((bx - ax) / (by - ay))
    inside ^= crosses & (x < x_at)
  d = _distance(x, y, pts, closed=True)
  return np.where(inside, d, -d)


def render(face: Face, thermal: Thermal, grid: Grid,
           frame_size: tuple[int, int], rng: np.random.Generator
           ) -> np.ndarray:
  """Temperatures in degrees C on `grid`, ``(grid.height, grid.width)`` float32.

  Args:
    face: the posed face (landmarks and outlines follow from it).
    thermal: temperatures and sensor properties.
    grid: where to sample; `Grid.for_crop` or `Grid.full_frame`.
    frame_size: (W, H) of the camera frame; outside it the edge is replicated.
    rng: draws the sensor noise.
  """
  c = _Canvas(grid, frame_size, face.pose.scale, thermal.softness)
  lm = face.landmarks
  out = outlines(face)
  th = thermal
  fw, fh = frame_size

  t = (th.ambient + th.wall_gradient * (c.ys[:, None] / fh - 0.5)
       + 0.3 * th.wall_gradient * (c.xs[None, :] / fw - 0.5)).astype(np.float32)

  def paint(value, layer, weight=1.0):
    rows, cols, m = layer
    t[rows, cols] += (value - t[rows, cols]) * (weight * m)

  paint(th.clothing, c.polygon(out["body"], 0.05))
  paint(th.neck, c.polygon(out["neck"], 0.05))
  for ear in ("ear_r", "ear_l"):
    paint(th.ear, c.polygon(out[ear], 0.025))

  # Cranium (hair) as the ellipsoid's silhouette, then the face skin.
  centre, m = skull_ellipse(face)
  soft = c.soft_px(0.02)
  rows, cols = c.window(np.array([centre]), 1.2 * face.pose.scale)
  dx, dy = c.xs[None, cols] - centre[0], c.ys[rows, None] - centre[1]
  r = np.sqrt(m[0, 0] * dx * dx + 2 * m[0, 1] * dx * dy + m[1, 1] * dy * dy)
  radial = np.sqrt(dx * dx + dy * dy) / np.maximum(r, 1e-6)
  paint(th.hair, (rows, cols, special.ndtr((1 - r) * radial / soft)))

  # Face skin: warm in the middle, cooler toward its border (distance-based),
  # with a warmer forehead, cooler cheeks and a subject's vascular pattern.
  soft = c.soft_px(0.025)
  rows, cols = c.window(out["face"], 3 * soft)
  sd = _signed_distance(c.xs[None, cols], c.ys[rows, None], out["face"])
  core = np.clip(sd / (0.16 * c.unit), 0.0, 1.0)
  skin = th.skin_border + (th.skin_core - th.skin_border) * core * (2 - core)
  skin = skin.astype(np.float32)
  brow_mid = lm[17:27].mean(axis=0)
  bumps = [(th.forehead, brow_mid + [0, -0.17 * c.unit], 0.25, 0.1)]
  bumps += [(-th.cheek, (lm[j] + lm[n]) / 2, 0.1, 0.1)
            for j, n in ((3, 31), (13, 35))]
  if th.blobs is not None:
    centres = shape_model.project(
        np.concatenate([th.blobs[:, :2], np.zeros((len(th.blobs), 1))], 1),
        face.pose)
    bumps += [(amp, xy, sig, sig)
              for (_, _, sig, amp), xy in zip(th.blobs, centres)]
  for amp, xy, sx, sy in bumps:
    br, bc, w = c.gauss(xy, sx, sy)
    br, bc, w = _intersect((rows, cols), (br, bc), w)
    skin[br, bc] += amp * w
  # The inner eye corners stay the hottest skin: a smooth minimum keeps any
  # warm forehead or vascular bump below them.
  cap, knee = th.canthus - 0.3, 0.15
  skin = -knee * np.logaddexp(-skin / knee, -cap / knee)
  paint(skin, (rows, cols, special.ndtr(sd / soft)))

  # Brows: hair insulates, so they read cooler than the skin around them.
  for brow in (lm[17:22], lm[22:27]):
    rows, cols, w = c.line(brow, 0.04, 0.015)
    t[rows, cols] -= th.brow_drop * w

  for eye, inner in ((lm[36:42], lm[39]), (lm[42:48], lm[42])):
    centre = eye.mean(axis=0)
    paint(th.eye - 0.3, c.gauss(centre, 0.1, 0.055), 0.6)
    paint(th.eye, c.polygon(eye, 0.01))
    # The caruncle sits at the inner corner, a little toward the nose.
    paint(th.canthus, c.gauss(inner + (inner - centre) * 0.05, 0.025, 0.022))

  nostrils = lm[31:36].mean(axis=0)
  paint(th.nose_tip, c.gauss(lm[29], 0.04, 0.09), 0.33)
  paint(th.nose_tip, c.gauss(nostrils, 0.09, 0.035), 0.76)
  paint(th.nose_tip, c.gauss(lm[30], 0.06, 0.05), 0.95)
  if th.breath:
    # Breathing: exhaled air warms, inhaled air cools the nostrils and the
    # skin below them (the signal thermal respiration monitors read).
    rows, cols, w = c.gauss(nostrils + [0.0, 0.03 * c.unit], 0.09, 0.05)
    t[rows, cols] += th.breath * w

  if th.beard:
    for poly in beard_outlines(lm, th.beard, c.unit):
      paint(th.beard_temp, c.polygon(poly, 0.02), th.beard_density)

  paint(th.lips, c.polygon(lm[48:60], 0.01))
  inner = lm[60:68]
  opening = np.linalg.norm(inner[[7, 6, 5]] - inner[[1, 2, 3]],
                           axis=1).mean() / c.unit
  if opening > 0.01:  # model units; a closed mouth shows no interior
    paint(th.mouth, c.polygon(inner, 0.006), min(1.0, (opening - 0.01) / 0.03))

  if th.glasses:
    # Glass is opaque at 8-14 um: the lenses show their own near-ambient
    # temperature with a sharp rim.
    for k in ("lens_r", "lens_l"):
      paint(th.lens, c.polygon(out[k], 0.002))
    for k in ("bridge", "temple_r", "temple_l"):
      paint(th.lens + 2.0, c.line(out[k], 0.014, 0.002))

  if th.gain != 1.0:
    t = th.ambient + th.gain * (t - th.ambient)
  if th.shading is not None:
    # Residual non-uniformity of an uncooled sensor: smooth, frame-fixed.
    u, v = c.xs[None, :] / fw, c.ys[:, None] / fh
    for amp, kx, ky, phase in th.shading:
      t += (amp * np.cos(2 * np.pi * (kx * u + ky * v) + phase)).astype(
          np.float32)

  # Optics blur (sensor pixels -> output pixels) and, where one output pixel
  # stands for several sensor pixels, the spread of the antialiasing filter
  # that `thermal_common.crop_and_resize` would apply (a triangle of
  # half-width one output pixel: std 1/sqrt(6)).
  sigma = np.hypot(th.optics_sigma / grid.step,
                   0.41 if grid.step > 1 else 0.0)
  if sigma > 0.3:
    t = ndimage.gaussian_filter(t, sigma, truncate=3.0)
  # Averaging step^2 sensor pixels into one output pixel shrinks their noise.
  noise = th.netd / max(grid.step, 1.0)
  return (t + rng.normal(0.0, noise, t.shape)).astype(np.float32)


def beard_outlines(lm: np.ndarray, kind: str, unit: float
                   ) -> list[np.ndarray]:
  """Facial-hair polygons in frame coordinates from the ``(68, 2)`` landmarks.

  moustache: between the nostrils and the upper lip; goatee: the chin below
  the lower lip; full: the lower cheeks and chin down past the jaw line
  (hair grows a little beyond the skin's outline), plus the moustache.
  `unit` is frame pixels per model unit (face width).
  """
  out = []
  if kind in ("moustache", "full"):
    out.append(np.concatenate([lm[31:36], lm[[54, 53, 52, 51, 50, 49, 48]]]))
  if kind == "goatee":
    out.append(np.concatenate([lm[[59, 58, 57, 56, 55]],
                               _grow(lm[6:11][::-1], lm, 0.02 * unit)]))
  if kind == "full":
    out.append(np.concatenate([_grow(lm[2:15], lm, 0.03 * unit),
                               lm[[54, 55, 56, 57, 58, 59, 48]]]))
  if kind not in ("", "moustache", "goatee", "full"):
    raise ValueError(f"beard: expected '', moustache, goatee or full, got "
                     f"{kind!r}")
  return out


def _grow(points, lm, by):
  """Moves outline points `by` pixels away from the face's centre."""
  centre = lm[27:36].mean(axis=0)
  d = points - centre
  return points + by * d / np.maximum(np.linalg.norm(d, axis=1,
                                                     keepdims=True), 1e-9)


def _intersect(a, b, w):
  """Restricts window `b` (and its array `w`) to window `a`, in a's frame."""
  (ar, ac), (br, bc) = a, b
  r0, r1 = max(ar.start, br.start), min(ar.stop, br.stop)
  c0, c1 = max(ac.start, bc.start), min(ac.stop, bc.stop)
  if r1 <= r0 or c1 <= c0:
    return slice(0, 0), slice(0, 0), w[:0, :0]
  sub = w[r0 - br.start:r1 - br.start, c0 - bc.start:c1 - bc.start]
  return (slice(r0 - ar.start, r1 - ar.start),
          slice(c0 - ac.start, c1 - ac.start), sub)


def render_frame(face: Face, thermal: Thermal, frame_size: tuple[int, int],
                 rng: np.random.Generator, step: float = 1.0) -> np.ndarray:
  """A whole camera frame in degrees C, ``(H, W)`` float32.

  With ``step > 1`` the field is painted on a coarser grid and resized up
  (thermal images have little detail at the sensor scale), then full sensor
  noise is added; tests use it to make 1024 x 768 fixtures quickly.
  """
  fw, fh = frame_size
  quiet = dataclasses.replace(thermal, netd=0.0)
  t = render(face, quiet, Grid.full_frame(fw, fh, step), frame_size, rng)
  if step > 1:
    img = Image.fromarray(t).resize(
        (fw, fh), Image.Resampling.BILINEAR,
        box=(0.0, 0.0, fw / step, fh / step))
    t = np.asarray(img, dtype=np.float32)
  return (t + rng.normal(0.0, thermal.netd, t.shape)).astype(np.float32)
