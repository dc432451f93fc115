"""TFDS builder `synthetic_thermal`: procedurally rendered thermal face frames.

The embedded default dataset: nothing to download, deterministic from its
seed, and shaped like the Kopaczka thermal face database that Chu & Liu 2019
use (68 iBUG landmarks, eight emotions, nine head poses, 1024 x 768 frames,
real-style file names), stored in the common thermal schema of
`data_prep.thermal_common`.

  import tensorflow_datasets as tfds
  from data_prep.synthetic_thermal import SyntheticThermal
  builder = SyntheticThermal(config="default", data_dir="/tmp/tfds",
                             file_format="array_record")
  builder.download_and_prepare()
  source = builder.as_data_source("train")
  # elsewhere: tfds.data_source("synthetic_thermal/default", split="train",
  #                             data_dir="/tmp/tfds")

Only the face crop of each frame is rendered, directly on the S x S crop grid
(`render.Grid.for_crop`), in worker processes; see `render` for why that
equals cropping a full rendered frame.

Crops (`crop_mode`, see `data_prep.thermal_common`). The default places every
crop, training and test alike, on the face box that `tml.facebox` finds in
the frame itself: the whole frame is rendered once more at the face box's
working resolution (about 128 pixels across, what a real 1024 x 768 frame is
reduced to there) and the box is found in that image alone. The crop is then
rendered on that box. One crop per frame and one distribution for training
and test; random training jitter is the on-device augmentation's job. The
"landmarks" mode keeps the 1.0.0 crops (landmark extent plus `margin`) for
comparison; they leak the test faces' extent into the crops.

Variation (`variation`, see `scene.Variation`). "wide" (the default since
2.0.0) varies what the real recordings vary and 1.0.0 held nearly fixed:
head pose within the frontal set (per-frame jitter, a per-subject habit,
expression-coupled motion), face size and position, facial hair, neck width,
skin, nose and brow temperatures, edge softness, sensor shading, focus and
noise, breathing at the nostrils, speech and blinks. "narrow" reproduces the
1.0.0 frames exactly (the wide draws come from separate generators).

Difficulty (mean-shape and pixel-ridge NME on the Chu protocol):
``python -m data_prep.synthetic_thermal.baseline`` (see there for numbers).
"""
from __future__ import annotations

import collections
import dataclasses
import multiprocessing
import os

import numpy as np
import tensorflow_datasets as tfds

from data_prep import thermal_common
from data_prep.synthetic_thermal import render
from data_prep.synthetic_thermal import scene
from tml import facebox

# Builds smaller than this render in-process: a worker pool costs a couple
# of seconds to start.
_MIN_FRAMES_FOR_POOL = 400


@dataclasses.dataclass
class SyntheticThermalConfig(tfds.core.BuilderConfig):
  """What to render.

  Attributes:
    crop_size: S, the stored square crop side.
    margin: crop margin per side, fraction of the landmark extent.
    num_subjects: subjects 1..num_subjects (persistent identities).
    frontal_per_subject: frontal frames per subject, spread over the eight
      emotions in the proportions of Chu & Liu's Table I.
    posed_per_subject: off-frontal frames per subject (poses 1-8).
    frame_width, frame_height: the camera frame the crop is taken from.
    seed: everything is a function of it (and of the ids); see `scene`.
    t_min, t_max: temperature window (degrees C) mapped onto grey [0, 1].
    glasses_fraction: share of subjects wearing glasses.
    annotation_noise: multiplier of the simulated hand-labelling noise on
      the stored landmarks (0: the exact rendered geometry); see
      `scene.annotation_offsets`.
    crop_mode: how the square crop is placed, see `thermal_common.CROP_MODES`:
      "facebox" (default) from the image alone (`tml.facebox` on a reduced
      rendering of the whole frame), for every frame, train and test alike;
      "landmarks" from the labelled landmark extent plus `margin` (the 1.0.0
      behaviour; leaks the test faces' extent into their crops).
    variation: "wide" (default) or "narrow" (the 1.0.0 frames); see
      `scene.Variation`.
  """
  crop_size: int = thermal_common.DEFAULT_CROP_SIZE
  margin: float = thermal_common.DEFAULT_MARGIN
  num_subjects: int = 64
  frontal_per_subject: int = 35
  posed_per_subject: int = 12
  frame_width: int = 1024
  frame_height: int = 768
  seed: int = 0
  t_min: float = thermal_common.DEFAULT_T_MIN
  t_max: float = thermal_common.DEFAULT_T_MAX
  glasses_fraction: float = 0.15
  annotation_noise: float = 1.0
  crop_mode: str = "facebox"
  variation: str = "wide"


_CROP_TEXT = {
    "facebox": "face box found in each frame",
    "landmarks": "landmark extent plus margin",
}


def frame_specs(cfg: SyntheticThermalConfig) -> list[scene.FrameSpec]:
  """Every frame of a config, subject by subject."""
  return [spec for subject in range(1, cfg.num_subjects + 1)
          for spec in scene.subject_plan(cfg.seed, subject,
                                         cfg.frontal_per_subject,
                                         cfg.posed_per_subject)]


def render_example(cfg: SyntheticThermalConfig, spec: scene.FrameSpec
                   ) -> tuple[str, dict]:
  """The stored (key, example) of one frame; pure function of its inputs."""
  frame_size = (cfg.frame_width, cfg.frame_height)
  traits = scene.subject_traits(cfg.seed, spec.subject, cfg.glasses_fraction,
                                cfg.variation)
  face, thermal, rng = scene.frame_scene(cfg.seed, spec, traits, frame_size)
  landmarks = face.landmarks
  # The stored labels carry annotation noise, as hand-placed points do; the
  # crop follows the labels, as it does for the real database.
  landmarks = landmarks + scene.annotation_offsets(
      cfg.seed, spec, landmarks, face.pose.scale, cfg.annotation_noise)
  if cfg.crop_mode == "facebox":
    box = face_box(cfg, spec, face, thermal)
  else:
    box = thermal_common.crop_box(landmarks, cfg.margin)
  temps = render.render(face, thermal,
                        render.Grid.for_crop(box, cfg.crop_size), frame_size,
                        rng)
  grey = thermal_common.to_unit_grey(temps, cfg.t_min, cfg.t_max,
                                     source=spec.file_name)
  example = thermal_common.assemble_example(
      grey, thermal_common.frame_to_crop(landmarks, box, cfg.crop_size), box,
      emotion=spec.emotion, subject=spec.subject, sequence=spec.sequence,
      frame=spec.frame, pose=spec.pose, glasses=thermal.glasses,
      file_name=spec.file_name)
  return spec.file_name, example


def face_box(cfg: SyntheticThermalConfig, spec: scene.FrameSpec,
             face, thermal) -> tuple[float, float, float, float]:
  """The landmark-free face box of one frame, frame edge coordinates.

  The whole frame is rendered on a grid of about `facebox.WORK_SIZE` pixels
  across (the resolution `tml.facebox` works at anyway; a real 1024 x 768
  frame is area-reduced to the same), with its own noise draws, and the box
  is found in that image alone.
  """
  frame_size = (cfg.frame_width, cfg.frame_height)
  step = cfg.frame_width / facebox.WORK_SIZE
  rng = scene.detection_rng(cfg.seed, spec)
  coarse = render.render(face, thermal,
                         render.Grid.full_frame(*frame_size, step=step),
                         frame_size, rng)
  try:
    box = facebox.find_face_box(coarse)
  except facebox.FaceBoxError as err:
    raise ValueError(f"{spec.file_name}: no face box: {err}") from err
  return tuple(v * step for v in box)


def _render_star(args):
  return render_example(*args)


def _summary(specs: list[scene.FrameSpec]) -> dict:
  frontal = [s for s in specs if s.pose == 0]
  per_emotion = collections.Counter(s.emotion for s in frontal)
  return {
      "num_frames": len(specs),
      "num_frontal": len(frontal),
      "num_subjects": len({s.subject for s in specs}),
      "frontal_per_emotion": {e: per_emotion.get(e, 0)
                              for e in thermal_common.THERMAL_EMOTIONS},
  }


class SyntheticThermal(thermal_common.CodePathFromFile,
                       tfds.core.GeneratorBasedBuilder):
  """Synthetic thermal faces with 68 landmarks, emotion and head pose."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "2.0.0": "Crops from the face box found in each frame (tml.facebox), "
               "not from the landmark extent, for every frame; the 'wide' "
               "variation of the real recordings (head pose within the "
               "frontal set, face size and position, facial hair, neck, "
               "temperatures, edge softness, sensor shading, focus, noise, "
               "breathing, speech, blinks). New configs landmark_crops "
               "(the same frames cropped to the landmark extent) and "
               "narrow_landmark_crops (the 1.0.0 default, frame for frame).",
  }
  BUILDER_CONFIGS = [
      SyntheticThermalConfig(
          name="default",
          description="64 subjects, 3,008 frames of 1024x768, 128x128 "
          "face-box crops, wide variation."),
      SyntheticThermalConfig(
          name="landmark_crops", crop_mode="landmarks",
          description="The default's frames cropped to the landmark extent "
          "plus 25 % (leaks the test faces' extent; for comparison)."),
      SyntheticThermalConfig(
          name="narrow", variation="narrow",
          description="The 1.0.0 frames (narrow variation) in face-box "
          "crops."),
      SyntheticThermalConfig(
          name="narrow_landmark_crops", variation="narrow",
          crop_mode="landmarks",
          description="The 1.0.0 default, frame for frame."),
      SyntheticThermalConfig(
          name="small", crop_size=64, num_subjects=8, frontal_per_subject=9,
          posed_per_subject=3, frame_width=256, frame_height=192,
          description="96 frames of 256x192, 64x64 face-box crops; for "
          "tests."),
      SyntheticThermalConfig(
          name="small_landmark_crops", crop_size=64, num_subjects=8,
          frontal_per_subject=9, posed_per_subject=3, frame_width=256,
          frame_height=192, crop_mode="landmarks",
          description="small, cropped to the landmark extent; for tests."),
  ]
  DEFAULT_CONFIG_NAME = "default"

  def __init__(self, *, num_workers: int | None = None, **kwargs):
    """Args: num_workers: render processes; None: one per CPU (at most 8)
    for builds of 400+ frames, else in-process; 1: in-process. The records
    do not depend on it. Other kwargs go to tfds (data_dir, config, ...)."""
    self._num_workers = num_workers
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    thermal_common.check_crop_mode(cfg.crop_mode)
    scene.variation(cfg.variation)  # fails early if unknown
    summary = _summary(frame_specs(cfg))
    per_emotion = ", ".join(f"{e} {n}" for e, n in
                            summary["frontal_per_emotion"].items())
    description = (
        "Procedurally rendered long-wave infrared face frames with 68 iBUG "
        "landmarks, eight emotions (Kopaczka / Chu & Liu classes) and nine "
        "head poses, stored as square face crops in the common thermal schema "
        "(data_prep/thermal_common.py). Radiometric temperatures are stored "
        f"through the window {cfg.t_min:g}-{cfg.t_max:g} C. Config "
        f"'{cfg.name}': {summary['num_frames']} frames of "
        f"{cfg.frame_width}x{cfg.frame_height}, {summary['num_subjects']} "
        f"subjects, {summary['num_frontal']} frontal (pose 0) frames "
        f"[{per_emotion}], crops {cfg.crop_size}x{cfg.crop_size} "
        f"({_CROP_TEXT[cfg.crop_mode]}, margin {cfg.margin:g}), "
        f"{getattr(cfg.variation, 'name', cfg.variation)} variation, "
        f"seed {cfg.seed}. Single split 'train'; the Chu "
        "protocol (frontal only, per-emotion 7/8 train, 1/8 test) is applied "
        "by the input pipeline from the 'emotion' and 'frontal' fields.")
    metadata = tfds.core.MetadataDict(
        summary, crop_mode=cfg.crop_mode,
        variation=str(getattr(cfg.variation, "name", cfg.variation)))
    return tfds.core.DatasetInfo(
        builder=self, description=description,
        features=thermal_common.features_dict(cfg.crop_size),
        metadata=metadata)

  def _split_generators(self, dl_manager):
    del dl_manager  # nothing to download
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    cfg = self.builder_config
    outside = 0
    for key, example in self._render_all(cfg):
      outside += bool(thermal_common.points_outside(example["landmarks"],
                                                    cfg.crop_size))
      yield key, example
    self.info.metadata["frames_with_points_outside_crop"] = outside

  def _render_all(self, cfg):
    specs = frame_specs(cfg)
    workers = self._num_workers
    if workers is None:
      workers = min(os.cpu_count() or 1, 8)
      if len(specs) < _MIN_FRAMES_FOR_POOL:
        workers = 1
    if workers <= 1:
      for spec in specs:
        yield render_example(cfg, spec)
      return
    # forkserver, not fork: the caller may already run JAX's threads, and
    # forking a multithreaded process can deadlock the child.
    ctx = multiprocessing.get_context("forkserver")
    with ctx.Pool(workers) as pool:
      yield from pool.imap(_render_star, ((cfg, s) for s in specs),
                           chunksize=16)
