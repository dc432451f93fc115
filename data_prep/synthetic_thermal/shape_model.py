"""A 3D shape model of the 68 iBUG landmarks: identity, emotion and pose.

Model space: units of face width (jaw points 0 and 16 are 1.0 apart), origin
midway between the eye centres, x to the image right, y down, z toward the
camera. Each landmark has a depth, so head pose is a rigid 3D rotation followed
by a weak-perspective (scaled orthographic) projection into the frame, giving
(x, y) pixel-centre coordinates, x = column.

The mean frontal shape is the widely used dlib / OpenFace 68-point mean face
template, made left-right symmetric, with hand-set depths. The renderer adds
outlines of its own (skull, hairline, ears, neck, shoulders) posed the same
way.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from tml import landmarks as lm_lib

# (x, y) of the OpenFace mean face template in a unit box (openface/align_dlib).
_TEMPLATE = np.array([
    (0.0792, 0.3392), (0.0829, 0.4570), (0.0968, 0.5756), (0.1221, 0.6919),
    (0.1687, 0.8003), (0.2398, 0.8957), (0.3257, 0.9771), (0.4223, 1.0433),
    (0.5318, 1.0608), (0.6413, 1.0398), (0.7381, 0.9723), (0.8244, 0.8896),
    (0.8948, 0.7925), (0.9394, 0.6815), (0.9611, 0.5622), (0.9706, 0.4418),
    (0.9712, 0.3221), (0.1638, 0.2492), (0.2178, 0.2043), (0.2913, 0.1924),
    (0.3675, 0.2036), (0.4393, 0.2331), (0.5864, 0.2281), (0.6602, 0.1959),
    (0.7375, 0.1824), (0.8132, 0.1928), (0.8708, 0.2353), (0.5153, 0.3186),
    (0.5162, 0.3962), (0.5171, 0.4738), (0.5182, 0.5532), (0.4337, 0.6041),
    (0.4755, 0.6208), (0.5207, 0.6343), (0.5659, 0.6188), (0.6071, 0.6016),
    (0.2524, 0.3311), (0.2987, 0.3026), (0.3557, 0.3030), (0.4037, 0.3387),
    (0.3525, 0.3500), (0.2968, 0.3505), (0.6313, 0.3341), (0.6791, 0.2965),
    (0.7360, 0.2947), (0.7829, 0.3213), (0.7403, 0.3418), (0.6850, 0.3437),
    (0.3532, 0.7462), (0.4146, 0.7191), (0.4777, 0.7068), (0.5227, 0.7171),
    (0.5698, 0.7054), (0.6352, 0.7157), (0.6995, 0.7394), (0.6394, 0.8052),
    (0.5764, 0.8354), (0.5254, 0.8417), (0.4764, 0.8375), (0.4138, 0.8100),
    (0.3801, 0.7500), (0.4780, 0.7451), (0.5234, 0.7489), (0.5711, 0.7433),
    (0.6724, 0.7442), (0.5725, 0.7766), (0.5240, 0.7834), (0.4776, 0.7785),
])

# Depth toward the camera per landmark, face-width units: the jaw's ends sit
# near the ears, the nose tip stands out most.
_DEPTH = np.array(
    [-0.40, -0.37, -0.32, -0.25, -0.17, -0.10, -0.04, 0.00, 0.02, 0.00, -0.04,
     -0.10, -0.17, -0.25, -0.32, -0.37, -0.40]            # jaw 0-16
    + [-0.10, -0.05, -0.02, 0.00, 0.01]                    # right brow 17-21
    + [0.01, 0.00, -0.02, -0.05, -0.10]                    # left brow 22-26
    + [0.00, 0.06, 0.12, 0.18]                             # bridge 27-30
    + [0.04, 0.08, 0.10, 0.08, 0.04]                       # nostrils 31-35
    + [-0.12, -0.05, -0.04, -0.06, -0.04, -0.05]           # right eye 36-41
    + [-0.06, -0.04, -0.05, -0.12, -0.05, -0.04]           # left eye 42-47
    + [0.00, 0.05, 0.08, 0.09, 0.08, 0.05, 0.00,           # outer mouth 48-54
       0.05, 0.07, 0.07, 0.07, 0.05]                       # 55-59
    + [0.01, 0.06, 0.07, 0.06, 0.01, 0.06, 0.065, 0.06])   # inner mouth 60-67


def _symmetrise(xy: np.ndarray) -> np.ndarray:
  flipped = xy.copy()
  flipped[:, 0] = 1.0 - flipped[:, 0]
  return (xy + flipped[lm_lib.FLIP_PERM]) / 2


def _mean_shape() -> np.ndarray:
  xy = _symmetrise(_TEMPLATE)
  eyes_y = (xy[36:42, 1].mean() + xy[42:48, 1].mean()) / 2
  xy = (xy - [0.5, eyes_y]) / (xy[16, 0] - xy[0, 0])
  # The template's lips are parted; a neutral face keeps them closed, so the
  # inner lower lip meets the inner upper lip.
  for lower, upper in ((67, 61), (66, 62), (65, 63)):
    xy[lower, 1] = xy[upper, 1] + 0.004
  return np.concatenate([xy, _DEPTH[:, None]], axis=1)


MEAN_SHAPE = _mean_shape()  # (68, 3) model units, (x, y, z)
assert MEAN_SHAPE.shape == (lm_lib.NUM_LANDMARKS, 3)
PIVOT = np.array([0.0, 0.15, -0.55])  # head rotation centre, behind the face

# Nine head poses, (yaw, pitch) in degrees: frontal and the eight directions
# of a 3 x 3 gaze grid. Yaw > 0 turns the nose to the image right, pitch > 0
# tilts it down. This synthetic convention stands in for the database's
# nine poses, whose exact angles are not published with the images.
POSES = {
    0: (0.0, 0.0), 1: (-30.0, 0.0), 2: (30.0, 0.0), 3: (0.0, -20.0),
    4: (0.0, 20.0), 5: (-30.0, -20.0), 6: (30.0, -20.0), 7: (-30.0, 20.0),
    8: (30.0, 20.0),
}


# ----------------------------------------------------------------------------
# Identity.
# ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Identity:
  """Persistent per-subject shape parameters (multiplicative ones around 1)."""
  width: float = 1.0
  face_length: float = 1.0
  eye_spacing: float = 1.0
  eye_size: float = 1.0
  brow_raise: float = 0.0
  brow_arch: float = 0.0
  nose_length: float = 1.0
  nose_width: float = 1.0
  mouth_width: float = 1.0
  mouth_shift: float = 0.0
  lip_thickness: float = 1.0
  jaw_width: float = 1.0
  chin_length: float = 0.0
  hairline: float = 0.0
  residual: np.ndarray | None = None  # (68, 2) small per-point offsets

  @classmethod
  def sample(cls, rng: np.random.Generator) -> "Identity":
    n = rng.normal
    residual = n(0.0, 0.005, size=(lm_lib.NUM_LANDMARKS, 2))
    return cls(width=n(1, 0.04), face_length=n(1, 0.05),
               eye_spacing=n(1, 0.055), eye_size=n(1, 0.08),
               brow_raise=n(0, 0.016), brow_arch=n(0, 0.01),
               nose_length=n(1, 0.065), nose_width=n(1, 0.08),
               mouth_width=n(1, 0.065), mouth_shift=n(0, 0.016),
               lip_thickness=n(1, 0.12), jaw_width=n(1, 0.055),
               chin_length=n(0, 0.024), hairline=n(0, 0.06), residual=residual)


def apply_identity(identity: Identity, shape: np.ndarray = MEAN_SHAPE
                   ) -> np.ndarray:
  """The subject's neutral frontal shape, ``(68, 3)`` model units."""
  p = shape.copy()
  idn = identity
  for eye in (lm_lib.RIGHT_EYE, lm_lib.LEFT_EYE):
    e = list(eye)
    centre = p[e, :2].mean(axis=0)
    p[e, :2] = (centre * [idn.eye_spacing, 1.0]
                + (p[e, :2] - centre) * idn.eye_size)
  brows = list(lm_lib.RIGHT_BROW + lm_lib.LEFT_BROW)
  p[brows, 1] -= idn.brow_raise
  p[[19, 24], 1] -= idn.brow_arch
  nose = list(lm_lib.NOSE)
  p[nose, 1] = p[27, 1] + (p[nose, 1] - p[27, 1]) * idn.nose_length
  p[list(lm_lib.NOSTRILS), 0] *= idn.nose_width
  mouth = list(lm_lib.MOUTH)
  p[mouth, 0] *= idn.mouth_width
  p[mouth, 1] += idn.mouth_shift
  mid = p[list(lm_lib.INNER_MOUTH), 1].mean()
  outer = list(lm_lib.OUTER_MOUTH)
  p[outer, 1] = mid + (p[outer, 1] - mid) * idn.lip_thickness
  # Lower jaw: graded so the ends near the ears stay put.
  jaw = np.array(lm_lib.JAW)
  grade = np.sin(np.pi * jaw / 16.0)
  p[jaw, 0] *= 1.0 + (idn.jaw_width - 1.0) * grade
  p[jaw, 1] += idn.chin_length * grade ** 2
  lower = p[:, 1] > 0  # below the eye line
  p[lower, 1] *= idn.face_length
  p[:, 0] *= idn.width
  if idn.residual is not None:
    p[:, :2] += idn.residual
  return p


# ----------------------------------------------------------------------------
# Emotions: landmark displacements at full intensity, face-width units.
# ----------------------------------------------------------------------------

def _displacements(spec: dict[int, tuple[float, float]],
                   symmetric: bool = True) -> np.ndarray:
  """Expands image-left points' (inward dx, dy) to both sides.

  For a point on the image-left half, dx > 0 moves it toward the midline; its
  mirror twin (FLIP_PERM) gets the mirrored move. Midline points take dy only.
  """
  d = np.zeros((lm_lib.NUM_LANDMARKS, 2))
  for i, (dx, dy) in spec.items():
    d[i] = (dx, dy)
    j = int(lm_lib.FLIP_PERM[i])
    if symmetric and j != i:
      d[j] = (-dx, dy)
  return d


def _jaw_drop(depth: float) -> dict[int, tuple[float, float]]:
  return {8: (0.0, 0.85 * depth), 7: (0.005, 0.8 * depth),
          6: (0.01, 0.65 * depth), 5: (0.01, 0.45 * depth),
          4: (0.01, 0.25 * depth), 3: (0.0, 0.1 * depth)}


_D = 0.11  # surprise jaw drop
EXPRESSIONS = {
    "neutral": _displacements({}),
    "surprise": _displacements({
        17: (0, -0.045), 18: (0, -0.06), 19: (0, -0.065), 20: (0, -0.06),
        21: (0, -0.05), 37: (0, -0.015), 38: (0, -0.015), 40: (0, 0.005),
        41: (0, 0.005), 48: (0.025, 0.35 * _D), 49: (0.01, -0.005),
        50: (0, -0.01), 51: (0, -0.01), 57: (0, _D), 58: (0, 0.95 * _D),
        59: (0.01, 0.6 * _D), 60: (0.02, 0.35 * _D), 61: (0, -0.008),
        62: (0, -0.01), 67: (0, 0.9 * _D), 66: (0, 0.95 * _D),
        **_jaw_drop(_D)}),
    "happy": _displacements({
        48: (-0.045, -0.035), 49: (-0.02, -0.02), 50: (-0.005, -0.01),
        51: (0, -0.008), 59: (-0.03, -0.01), 58: (-0.01, 0.01), 57: (0, 0.015),
        60: (-0.04, -0.03), 61: (-0.01, -0.015), 62: (0, -0.01),
        67: (-0.01, 0.015), 66: (0, 0.02), 40: (0, -0.008), 41: (0, -0.008),
        31: (-0.008, -0.006), 32: (-0.004, -0.004), 3: (-0.005, -0.01),
        4: (-0.005, -0.01)}),
    "sad": _displacements({
        48: (0.01, 0.03), 49: (0, 0.008), 59: (0.005, 0.012),
        60: (0.008, 0.025),
        57: (0, -0.008), 58: (0, -0.005), 66: (0, -0.004), 21: (0.005, -0.03),
        20: (0, -0.015), 19: (0, -0.003), 17: (0, 0.012), 18: (0, 0.006),
        37: (0, 0.01), 38: (0, 0.01)}),
    "angry": _displacements({
        21: (0.022, 0.04), 20: (0.015, 0.035), 19: (0.008, 0.025),
        18: (0.004, 0.015), 17: (0, 0.008), 37: (0, -0.006), 38: (0, -0.006),
        40: (0, -0.008), 41: (0, -0.008), 49: (0, 0.008), 50: (0, 0.008),
        51: (0, 0.008), 57: (0, -0.015), 58: (0, -0.015), 59: (0, -0.012),
        48: (0.02, 0.004), 60: (0.018, 0.004), 31: (-0.008, 0),
        32: (-0.004, 0)}),
    "disgust": _displacements({
        49: (0, -0.03), 50: (0, -0.04), 51: (0, -0.04), 61: (0, -0.032),
        62: (0, -0.035), 60: (0.005, -0.01), 48: (0.005, 0.008),
        57: (0, 0.012), 58: (0, 0.012), 59: (0, 0.01), 66: (0, 0.01),
        67: (0, 0.01), 31: (-0.01, -0.025), 32: (-0.005, -0.028),
        33: (0, -0.028), 30: (0, -0.015), 29: (0, -0.008), 21: (0.01, 0.02),
        20: (0.005, 0.015), 19: (0, 0.01), 40: (0, -0.012), 41: (0, -0.012)}),
    "fear": _displacements({
        17: (0, -0.025), 18: (0, -0.04), 19: (0.005, -0.045),
        20: (0.01, -0.045), 21: (0.018, -0.04), 37: (0, -0.02), 38: (0, -0.02),
        40: (0, -0.004), 41: (0, -0.004), 48: (-0.05, 0.015),
        49: (-0.025, 0.002), 59: (-0.03, 0.02), 58: (-0.01, 0.03),
        57: (0, 0.03), 60: (-0.045, 0.015), 61: (-0.015, 0),
        67: (-0.01, 0.028), 66: (0, 0.03), 8: (0, 0.015), 7: (0, 0.014),
        6: (0, 0.01)}),
    # One-sided: the image-right mouth corner (54, subject's left) rises and
    # pulls outward; `apply_expression` mirrors it for side = -1.
    "contempt": _displacements({
        54: (0.03, -0.035), 53: (0.012, -0.015), 55: (0.015, -0.012),
        64: (0.028, -0.03), 63: (0.008, -0.01), 65: (0.01, -0.01),
        52: (0.003, -0.004)}, symmetric=False),
}


# Movements that come and go within any expression, at full amount: speech
# or breathing through the mouth drops the jaw and lower lip; a blink closes
# the upper lids onto the lower ones. Face-width units, like EXPRESSIONS.
_T = 0.07
MOVEMENTS = {
    "talk": _displacements({
        57: (0, _T), 58: (0, 0.95 * _T), 59: (0.005, 0.6 * _T),
        66: (0, 0.9 * _T), 67: (0, 0.85 * _T), 60: (0.005, 0.2 * _T),
        48: (0.005, 0.2 * _T), 62: (0, -0.004), 51: (0, -0.004),
        **_jaw_drop(_T)}),
}


def apply_movement(shape: np.ndarray, movement: str, amount: float
                   ) -> np.ndarray:
  """Adds a movement, ``(68, 3)`` -> ``(68, 3)``.

  "talk": the `MOVEMENTS` displacement times ``amount``. "blink": relative
  to each eye's own opening; ``amount`` = 1 closes the lids (upper lid 80 %,
  lower lid 20 % of the way).
  """
  out = shape.copy()
  if movement == "blink":
    for upper, lower in (((37, 38), (41, 40)), ((43, 44), (47, 46))):
      gap = out[list(lower), 1] - out[list(upper), 1]
      out[list(upper), 1] += amount * 0.8 * gap
      out[list(lower), 1] -= amount * 0.2 * gap
    return out
  out[:, :2] += amount * MOVEMENTS[movement]
  return out


def apply_expression(shape: np.ndarray, emotion: str, intensity: float,
                     side: int = 1) -> np.ndarray:
  """Adds an emotion's landmark displacement, ``(68, 3)`` -> ``(68, 3)``.

  Args:
    shape: model-space shape (after `apply_identity`).
    emotion: a name from THERMAL_EMOTIONS.
    intensity: 0 = neutral, 1 = full expression (values a little above 1 are
      allowed).
    side: +1 or -1; mirrors one-sided expressions (contempt).
  """
  d = EXPRESSIONS[emotion]
  if side < 0:
    d = d[lm_lib.FLIP_PERM] * [-1.0, 1.0]
  out = shape.copy()
  out[:, :2] += intensity * d
  return out


# ----------------------------------------------------------------------------
# Pose and projection.
# ----------------------------------------------------------------------------

def rotation(yaw: float, pitch: float, roll: float) -> np.ndarray:
  """3x3 rotation, degrees; x right, y down, z toward the camera."""
  a, b, c = np.deg2rad([yaw, pitch, roll])
  ry = np.array([[np.cos(a), 0, np.sin(a)], [0, 1, 0],
                 [-np.sin(a), 0, np.cos(a)]])
  rx = np.array([[1, 0, 0], [0, np.cos(b), np.sin(b)],
                 [0, -np.sin(b), np.cos(b)]])
  rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0],
                 [0, 0, 1]])
  return rz @ ry @ rx


@dataclasses.dataclass(frozen=True)
class Pose:
  """Rigid pose and placement: degrees, pixels per model unit, frame pixels."""
  yaw: float = 0.0
  pitch: float = 0.0
  roll: float = 0.0
  scale: float = 300.0
  tx: float = 512.0  # where the model origin (between the eyes) lands
  ty: float = 300.0


def project(points: np.ndarray, pose: Pose, rotate: bool = True) -> np.ndarray:
  """Model ``(..., 3)`` -> frame pixel-centre ``(..., 2)`` (x, y).

  Args:
    points: model-space points.
    pose: rotation about PIVOT, then scale and translation.
    rotate: False for the body (neck, shoulders), which does not turn with
      the head.
  """
  p = np.asarray(points, dtype=np.float64)
  if rotate:
    p = (p - PIVOT) @ rotation(pose.yaw, pose.pitch, pose.roll).T + PIVOT
  return p[..., :2] * pose.scale + [pose.tx, pose.ty]


def rotated_depth(points: np.ndarray, pose: Pose) -> np.ndarray:
  """Depth toward the camera after rotation, ``(..., 3)`` -> ``(...)``."""
  p = (np.asarray(points) - PIVOT) @ rotation(pose.yaw, pose.pitch,
                                              pose.roll).T + PIVOT
  return p[..., 2]


def fit_pose(shape: np.ndarray, targets: dict[int, tuple[float, float]],
             yaws=np.arange(-40.0, 40.1, 1.0),
             pitches=np.arange(-24.0, 24.1, 1.0)) -> Pose:
  """A pose that puts the given landmarks at the given frame positions.

  Searches yaw and pitch on a grid; for each, the least-squares similarity
  (scale, roll, translation) from the projected model points to the targets.
  Used to place fixture faces where real frames have theirs.

  Args:
    shape: ``(68, 3)`` model-space shape.
    targets: landmark index -> (x, y) frame position; two or more points.
  """
  idx = list(targets)
  dst = np.array([targets[i] for i in idx], dtype=np.float64)
  yy, pp = np.meshgrid(np.asarray(yaws, float), np.asarray(pitches, float))
  yy, pp = yy.ravel(), pp.ravel()
  rots = np.stack([rotation(y, p, 0.0) for y, p in zip(yy, pp)])  # (G, 3, 3)
  src = np.einsum("gij,kj->gki", rots, shape[idx] - PIVOT) + PIVOT
  # Complex-number similarity fit per grid point: dst ~ a * src + b.
  s = src[..., 0] + 1j * src[..., 1]                      # (G, k)
  t = dst[:, 0] + 1j * dst[:, 1]                          # (k,)
  sc, tc = s - s.mean(1, keepdims=True), t - t.mean()
  a = (np.conj(sc) * tc).sum(1) / (np.abs(sc) ** 2).sum(1)
  b = t.mean() - a * s.mean(1)
  err = (np.abs(a[:, None] * s + b[:, None] - t) ** 2).sum(1)
  g = int(np.argmin(err))
  # Roll acts about PIVOT in the model rather than about the origin, which
  # changes only the translation: refit that after placing.
  pose = Pose(float(yy[g]), float(pp[g]), float(np.rad2deg(np.angle(a[g]))),
              float(np.abs(a[g])), 0.0, 0.0)
  shift = (dst - project(shape[idx], pose)).mean(axis=0)
  return dataclasses.replace(pose, tx=float(shift[0]), ty=float(shift[1]))
