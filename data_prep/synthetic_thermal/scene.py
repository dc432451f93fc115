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
    tag, so it does not change what is rendered;
  * the sensor noise of the reduced whole-frame image the face box is found
    in (`detection_rng`): under a third tag, so the landmark-extent crops of
    the "landmarks" crop mode do not depend on it;
  * the extra draws of the wide `Variation` (facial hair, neck, habitual
    pose, temperatures; speech, blinks, focus, breath): under two more tags,
    so the narrow variation's frames are those of builder 1.0.0.

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

_TRAITS, _PLAN, _FRAME, _LABEL, _DETECT, _TRAITS_WIDE, _FRAME_WIDE = range(7)
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
class Variation:
  """How much subjects and frames vary. `NARROW` reproduces builder 1.0.0.

  The 1.0.0 draws come first from their own generators and are kept; a
  wider variation overrides some of them with draws from two further
  generators (tags `_TRAITS_WIDE`, `_FRAME_WIDE`), so the narrow frames stay
  bit-identical and a wide subject keeps its identity shape.

  Attributes:
    name: the builder config's `variation` value.
    pose_sigma: per-frame (yaw, pitch, roll) jitter std, degrees, around the
      nominal pose: nobody holds still while acting an emotion.
    habitual_sigma: per-subject (yaw, pitch, roll) offset std, degrees: how
      a person sits in front of the camera.
    expression_pose: degrees of expression-coupled head motion at full
      intensity (surprise and fear lift the chin, sadness and anger lower
      it, disgust turns away, contempt tilts toward its side).
    scale_sigma: per-frame relative face-size jitter (leaning in and out).
    centre_sigma: per-frame position jitter, fractions of the frame.
    beard_fraction: share of subjects with facial hair (moustache, goatee
      or full beard; cooler than skin, so it also moves the face box).
    neck_width: (low, high) per-subject neck half-width, face widths.
    skin_offset_sigma: per-subject shift of all skin temperatures, C.
    nose_tip: (low, high) per-subject nose-tip temperature, C.
    brow_drop: (low, high) per-subject brow cooling, C (low: barely visible).
    blob_sigma: std of the vascular pattern's amplitudes, C.
    softness: (low, high) per-subject multiplier of edge softness
      (low-contrast, diffuse thermal edges).
    shading: amplitude (C) of each of three smooth sensor-shading waves.
    focus: (low, high) per-frame multiplier of the optics blur (focus).
    netd: (low, high) per-frame multiplier of the sensor noise.
    drift_sigma: per-frame std of the skin temperature drift, C.
    breathing: per-frame std of the breath's temperature at the nostrils, C.
    gain: (low, high) per-frame contrast about ambient (an 8-bit export's
      automatic gain; radiometric frames have 1, the wide default).
    vessels, vessel_amp: number and amplitude std (C) of small warm/cool
      spots of the subject's superficial vessels, on top of the broad blobs.
    talk_fraction: share of frames caught mid-speech or mouth-breathing (jaw
      and lower lip dropped by a random amount).
    blink_fraction: share of frames caught mid-blink (lids partly or fully
      closed).
  """
  name: str
  pose_sigma: tuple[float, float, float] = (2.0, 2.0, 2.5)
  habitual_sigma: float = 0.0
  expression_pose: float = 0.0
  scale_sigma: float = 0.03
  centre_sigma: float = 0.02
  beard_fraction: float = 0.0
  neck_width: tuple[float, float] = (0.26, 0.26)
  skin_offset_sigma: float = 0.0
  nose_tip: tuple[float, float] | None = None
  brow_drop: tuple[float, float] | None = None
  blob_sigma: float | None = None
  softness: tuple[float, float] = (1.0, 1.0)
  shading: float = 0.0
  focus: tuple[float, float] = (1.0, 1.0)
  netd: tuple[float, float] = (1.0, 1.0)
  drift_sigma: float = 0.25
  breathing: float = 0.0
  gain: tuple[float, float] = (1.0, 1.0)
  vessels: int = 0
  vessel_amp: float = 0.0
  talk_fraction: float = 0.0
  blink_fraction: float = 0.0

  @property
  def is_narrow(self) -> bool:
    return self == dataclasses.replace(NARROW, name=self.name)


NARROW = Variation("narrow")
WIDE = Variation(
    "wide", pose_sigma=(5.0, 4.0, 4.0), habitual_sigma=3.0,
    expression_pose=5.0, scale_sigma=0.05, centre_sigma=0.04,
    beard_fraction=0.25, neck_width=(0.20, 0.34), skin_offset_sigma=0.4,
    nose_tip=(30.0, 33.0), brow_drop=(0.4, 1.8), blob_sigma=0.35,
    softness=(0.8, 1.8), shading=0.25, focus=(0.8, 2.5), netd=(0.8, 2.0),
    drift_sigma=0.5, breathing=1.0, talk_fraction=0.4,
    blink_fraction=0.1)
VARIATIONS = {v.name: v for v in (NARROW, WIDE)}

# Head motion at full expression intensity, in units of
# `Variation.expression_pose`: (yaw, pitch, roll); yaw and roll follow the
# contempt side where signed.
_EXPRESSION_POSE = {
    "surprise": (0.0, -1.0, 0.0), "fear": (0.0, -0.6, 0.0),
    "sad": (0.0, 1.0, 0.0), "angry": (0.0, 0.6, 0.0),
    "disgust": (0.8, -0.4, 0.0), "contempt": (0.4, -0.3, 0.6),
    "happy": (0.0, -0.2, 0.0), "neutral": (0.0, 0.0, 0.0),
}


def variation(name_or_variation) -> Variation:
  """A `Variation` by name ("narrow", "wide"), or the argument itself."""
  if isinstance(name_or_variation, Variation):
    return name_or_variation
  if name_or_variation not in VARIATIONS:
    raise ValueError(f"variation: expected one of {sorted(VARIATIONS)}, got "
                     f"{name_or_variation!r}")
  return VARIATIONS[name_or_variation]


@dataclasses.dataclass(frozen=True)
class Traits:
  """Persistent per-subject properties."""
  identity: shape_model.Identity
  thermal: render.Thermal
  contempt_side: int
  scale_frac: float   # face width / frame width
  centre: tuple[float, float]  # eye midpoint, fractions of frame W and H
  habitual: tuple[float, float, float] = (0.0, 0.0, 0.0)  # yaw, pitch, roll
  neck_width: float = 0.26
  variation: Variation = NARROW


def _rng(*ids: int) -> np.random.Generator:
  return np.random.default_rng([int(i) for i in ids])


def subject_traits(seed: int, subject: int, glasses_fraction: float = 0.15,
                   variation_name="narrow") -> Traits:
  """Persistent properties of one subject (see `Variation`)."""
  var = variation(variation_name)
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
  traits = Traits(identity=identity, thermal=thermal,
                  contempt_side=1 if rng.random() < 0.5 else -1,
                  scale_frac=u(0.26, 0.42),
                  centre=(u(0.4, 0.6), u(0.36, 0.46)), variation=var)
  if var.is_narrow:
    return traits
  return _widen_traits(seed, subject, traits)


def _widen_traits(seed: int, subject: int, traits: Traits) -> Traits:
  """Overrides / adds the per-subject draws of a wide `Variation`."""
  var = traits.variation
  rng = _rng(seed, _TRAITS_WIDE, subject)
  u, n = rng.uniform, rng.normal
  th = traits.thermal
  habitual = tuple(float(v) for v in n(0.0, var.habitual_sigma, 3))
  offset = n(0.0, var.skin_offset_sigma)
  beard = ""
  if rng.random() < var.beard_fraction:
    beard = ("moustache", "goatee", "full")[rng.choice(3, p=[0.3, 0.3, 0.4])]
  beard_temp, beard_density = u(29.5, 32.0), u(0.6, 1.0)
  blobs = th.blobs.copy()
  amp = n(0.0, 1.0, len(blobs))
  if var.blob_sigma is not None:
    blobs[:, 3] = var.blob_sigma * amp
  k = var.vessels
  vessels = np.stack([u(-0.45, 0.45, k), u(-0.4, 0.7, k), u(0.015, 0.04, k),
                      n(0.0, var.vessel_amp, k)], axis=1)
  blobs = np.concatenate([blobs, vessels])
  nose = u(*var.nose_tip) if var.nose_tip else th.nose_tip
  brow = u(*var.brow_drop) if var.brow_drop else th.brow_drop
  shading = np.stack([var.shading * u(0.3, 1.0, 3), u(-1.5, 1.5, 3),
                      u(-1.5, 1.5, 3), u(0, 2 * np.pi, 3)], axis=1)
  thermal = dataclasses.replace(
      th, skin_core=th.skin_core + offset, skin_border=th.skin_border + offset,
      neck=th.neck + offset, eye=th.eye + 0.5 * offset,
      lips=th.lips + 0.5 * offset, nose_tip=nose, brow_drop=brow,
      blobs=blobs, beard=beard, beard_temp=beard_temp,
      beard_density=beard_density, softness=u(*var.softness),
      shading=shading if var.shading > 0 else None)
  return dataclasses.replace(traits, thermal=thermal, habitual=habitual,
                             neck_width=u(*var.neck_width))


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
  var = traits.variation
  wide = None
  if not var.is_narrow:
    wide = _rng(seed, _FRAME_WIDE, spec.subject, spec.sequence, spec.frame)
    talk, blink = wide.random(2)
    talk_amount, blink_amount = wide.uniform(0.2, 1.0), wide.uniform(0.3, 1.0)
    if talk < var.talk_fraction:
      shape = shape_model.apply_movement(shape, "talk", talk_amount)
    if blink < var.blink_fraction:
      shape = shape_model.apply_movement(shape, "blink", blink_amount)
  yaw, pitch = shape_model.POSES[spec.pose]
  # Standard-normal draws scaled by the variation, in the 1.0.0 order.
  z_scale, z_yaw, z_pitch, z_roll, z_tx, z_ty = (n() for _ in range(6))
  sy, sp, sr = var.pose_sigma
  move = np.zeros(3)
  if not var.is_narrow:
    ey, ep, er = _EXPRESSION_POSE[emotion]
    move = (np.array(traits.habitual) + var.expression_pose * intensity
            * np.array([ey * traits.contempt_side, ep,
                        er * traits.contempt_side]))
  scale = traits.scale_frac * fw * (1.0 + var.scale_sigma * z_scale)
  pose = shape_model.Pose(
      yaw=yaw + sy * z_yaw + move[0], pitch=pitch + sp * z_pitch + move[1],
      roll=sr * z_roll + move[2], scale=scale,
      tx=fw * (traits.centre[0] + var.centre_sigma * z_tx),
      ty=fh * (traits.centre[1] + var.centre_sigma * z_ty))
  face = render.Face(shape=shape, pose=pose,
                     hairline=traits.identity.hairline,
                     neck_width=traits.neck_width)
  th = traits.thermal
  drift = var.drift_sigma * n()
  # Stress-like emotions cool the nose (a reported thermal effect of arousal).
  stress = 0.4 * intensity if spec.emotion in ("fear", "surprise", "sad") else 0
  thermal = dataclasses.replace(
      th, skin_core=th.skin_core + drift, skin_border=th.skin_border + drift,
      neck=th.neck + drift, eye=th.eye + 0.5 * drift,
      canthus=float(np.clip(th.canthus + 0.3 * drift, 35.5, 36.5)),
      nose_tip=float(np.clip(th.nose_tip + drift + n(0, 0.3) - stress,
                             30.0, 33.0)),
      lips=th.lips + 0.5 * drift)
  if wide is not None:
    thermal = dataclasses.replace(
        thermal, optics_sigma=thermal.optics_sigma * wide.uniform(*var.focus),
        netd=thermal.netd * wide.uniform(*var.netd),
        breath=var.breathing * wide.normal(), gain=wide.uniform(*var.gain))
  return face, thermal, rng


def detection_rng(seed: int, spec: FrameSpec) -> np.random.Generator:
  """Noise generator of the frame's reduced whole-frame rendering."""
  return _rng(seed, _DETECT, spec.subject, spec.sequence, spec.frame)


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
