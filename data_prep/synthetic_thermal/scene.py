"""What each synthetic frame shows: subjects, sequences, emotions, poses.

Everything is a pure function of the seed and integer ids, through NumPy
generators seeded with ``(seed, tag, subject[, sequence, frame])``:

  * subject traits (identity shape, temperatures, glasses, placement):
    ``(seed, subject)``;
  * the subject's frame plan (which sequence holds which emotion or poses,
    frame numbers): ``(seed, subject, frames per subject)``;
  * a frame's draws (expression intensity, pose jitter, temperature drift,
    sensor noise): ``(seed, subject, sequence, frame)``;
  * its annotation noise: ``(seed, subject, sequence, frame)`` under another
    tag, so it does not change what is rendered.

So a build with fewer subjects holds exactly the first subjects' frames of a
larger one, and any frame can be rendered alone.

Frame plan per subject: ``frontal`` frontal frames spread over the eight
emotions in the proportions of Chu & Liu's Table I (one sequence per emotion,
sequences 2-9 in a random order), plus ``posed`` off-frontal frames in
sequence 1 cycling through poses 1-8 with emotions drawn from the same
proportions.
"""
from __future__ import annotations

import dataclasses

import numpy as np

from data_prep import thermal_common
from data_prep.synthetic_thermal import render
from data_prep.synthetic_thermal import shape_model

EMOTIONS = thermal_common.THERMAL_EMOTIONS
# Frontal images per emotion in the real database (Chu & Liu 2019, Table I).
TABLE_I_COUNTS = {"angry": 218, "contempt": 179, "disgust": 211, "fear": 238,
                  "happy": 301, "sad": 224, "surprise": 323, "neutral": 496}
TABLE_I = np.array([TABLE_I_COUNTS[e] for e in EMOTIONS], dtype=np.float64)
TABLE_I /= TABLE_I.sum()

_TRAITS, _PLAN, _FRAME, _LABEL = 0, 1, 2, 3
# Annotation noise, face-width units: real landmarks are placed by hand, and
# jaw points, which mark no distinct feature, slide along the contour.
ANNOTATION_SIGMA = 0.004
JAW_SLIDE_SIGMA = 0.012


@dataclasses.dataclass(frozen=True)
class FrameSpec:
  """The planned content of one frame."""
  subject: int
  sequence: int
  frame: int
  emotion: str
  pose: int

  @property
  def file_name(self) -> str:
    return thermal_common.kopaczka_file_name(
        self.subject, self.sequence, self.frame) + ".png"


@dataclasses.dataclass(frozen=True)
class Traits:
  """Persistent per-subject properties."""
  identity: shape_model.Identity
  thermal: render.Thermal
  contempt_side: int
  scale_frac: float   # face width / frame width
  centre: tuple[float, float]  # eye midpoint, fractions of frame W and H


def _rng(*ids: int) -> np.random.Generator:
  return np.random.default_rng([int(i) for i in ids])


def subject_traits(seed: int, subject: int, glasses_fraction: float = 0.15
                   ) -> Traits:
  rng = _rng(seed, _TRAITS, subject)
  u = rng.uniform
  identity = shape_model.Identity.sample(rng)
  ambient = u(20.5, 24.5)
  core = float(np.clip(rng.normal(34.5, 0.3), 33.8, 35.1))
  border = core - u(1.4, 2.4)
  bald = rng.random() < 0.1
  blobs = np.stack([u(-0.45, 0.45, 8), u(-0.45, 0.75, 8), u(0.05, 0.15, 8),
                    rng.normal(0.0, 0.2, 8)], axis=1)
  thermal = render.Thermal(
      ambient=ambient, wall_gradient=u(-1.0, 1.5), skin_core=core,
      skin_border=border, forehead=u(0.1, 0.4),
      hair=border - u(0.3, 1.0) if bald else u(28.5, 31.5),
      ear=border - u(0.5, 1.5), neck=core - u(0.6, 1.2),
      clothing=u(26.5, 30.5), brow_drop=u(0.8, 1.6), eye=u(34.7, 35.3),
      canthus=u(35.6, 36.4), nose_tip=u(30.8, 32.8), lips=u(34.1, 34.9),
      mouth=u(35.7, 36.3), glasses=bool(rng.random() < glasses_fraction),
      lens=ambient + u(1.0, 3.0), blobs=blobs, optics_sigma=u(0.9, 1.6),
      netd=u(0.05, 0.1))
  return Traits(identity=identity, thermal=thermal,
                contempt_side=1 if rng.random() < 0.5 else -1,
                scale_frac=u(0.26, 0.42), centre=(u(0.4, 0.6), u(0.36, 0.46)))


def _allocate(total: int, p: np.ndarray, rng: np.random.Generator
              ) -> np.ndarray:
  """Integer counts summing to `total`, proportional to `p` (largest remainder,
  ties and remainders broken at random so small totals still vary)."""
  raw = total * p
  counts = np.floor(raw).astype(int)
  rest = total - counts.sum()
  if rest:
    frac = raw - counts
    extra = rng.choice(len(p), size=rest, replace=False, p=frac / frac.sum())
    counts[extra] += 1
  return counts


def subject_plan(seed: int, subject: int, frontal: int, posed: int
                 ) -> list[FrameSpec]:
  """The frames of one subject, in sequence/frame order."""
  rng = _rng(seed, _PLAN, subject, frontal, posed)
  specs = []

  def frame_numbers(n):
    # Sparse, increasing frame numbers, as in the database's sampled frames.
    if not n:
      return []
    gaps = np.r_[0, rng.integers(20, 60, n - 1)]
    return rng.integers(1, 40) + np.cumsum(gaps)

  counts = _allocate(frontal, TABLE_I, rng)
  sequences = rng.permutation(len(EMOTIONS)) + 2
  for emotion, count, seq in zip(EMOTIONS, counts, sequences):
    for f in frame_numbers(count):
      specs.append(FrameSpec(subject, int(seq), int(f), emotion, 0))
  poses = np.concatenate([rng.permutation(8) + 1
                          for _ in range(posed // 8 + 1)])
  emotions = rng.choice(len(EMOTIONS), size=posed, p=TABLE_I)
  for f, pose, e in zip(frame_numbers(posed), poses, emotions):
    specs.append(FrameSpec(subject, 1, int(f), EMOTIONS[e], int(pose)))
  return sorted(specs, key=lambda s: (s.sequence, s.frame))


def frame_scene(seed: int, spec: FrameSpec, traits: Traits,
                frame_size: tuple[int, int]
                ) -> tuple[render.Face, render.Thermal, np.random.Generator]:
  """The posed face and temperatures of one frame, and its noise generator."""
  rng = _rng(seed, _FRAME, spec.subject, spec.sequence, spec.frame)
  fw, fh = frame_size
  n = rng.normal
  if spec.emotion == "neutral":
    # Nobody holds a perfectly blank face: a trace of some expression.
    emotion = EMOTIONS[rng.integers(len(EMOTIONS))]
    intensity = rng.uniform(0.0, 0.15)
  else:
    emotion, intensity = spec.emotion, rng.uniform(0.45, 1.1)
  shape = shape_model.apply_expression(
      shape_model.apply_identity(traits.identity), emotion, intensity,
      traits.contempt_side)
  yaw, pitch = shape_model.POSES[spec.pose]
  scale = traits.scale_frac * fw * n(1.0, 0.03)
  pose = shape_model.Pose(
      yaw=yaw + n(0, 2.0), pitch=pitch + n(0, 2.0), roll=n(0, 2.5),
      scale=scale, tx=fw * (traits.centre[0] + n(0, 0.02)),
      ty=fh * (traits.centre[1] + n(0, 0.02)))
  face = render.Face(shape=shape, pose=pose,
                     hairline=traits.identity.hairline)
  th = traits.thermal
  drift = n(0, 0.25)
  # Stress-like emotions cool the nose (a reported thermal effect of arousal).
  stress = 0.4 * intensity if spec.emotion in ("fear", "surprise", "sad") else 0
  thermal = dataclasses.replace(
      th, skin_core=th.skin_core + drift, skin_border=th.skin_border + drift,
      neck=th.neck + drift, eye=th.eye + 0.5 * drift,
      canthus=float(np.clip(th.canthus + 0.3 * drift, 35.5, 36.5)),
      nose_tip=float(np.clip(th.nose_tip + drift + n(0, 0.3) - stress,
                             30.0, 33.0)),
      lips=th.lips + 0.5 * drift)
  return face, thermal, rng


def annotation_offsets(seed: int, spec: FrameSpec, landmarks: np.ndarray,
                       scale: float, amount: float = 1.0) -> np.ndarray:
  """Hand-labelling noise to add to the true landmarks, ``(68, 2)`` pixels.

  Args:
    seed, spec: identify the frame (own generator, see module docstring).
    landmarks: ``(68, 2)`` true (x, y) frame positions; the jaw's tangents
      come from them.
    scale: frame pixels per model unit (face width).
    amount: multiplier of the noise; 0 gives exact labels.
  """
  rng = _rng(seed, _LABEL, spec.subject, spec.sequence, spec.frame)
  offsets = rng.normal(0.0, ANNOTATION_SIGMA, (len(landmarks), 2))
  jaw = np.asarray(landmarks[:17], dtype=np.float64)
  tangent = np.gradient(jaw, axis=0)
  tangent /= np.maximum(np.linalg.norm(tangent, axis=1, keepdims=True), 1e-9)
  offsets[:17] += rng.normal(0.0, JAW_SLIDE_SIGMA, (17, 1)) * tangent
  return offsets * scale * amount
