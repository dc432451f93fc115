"""TFDS builder `kopaczka_thermal`: the real thermal face database (manual_dir).

Kopaczka et al., "A thermal infrared face database with facial landmarks and
emotion labels" (IEEE TIM 2018), the data of Chu & Liu 2019. It is available
on registration only, so the user places it in the manual directory
(``<data_dir>/downloads/manual/`` or ``download_config.manual_dir``); see
`MANUAL_DOWNLOAD_INSTRUCTIONS` for the layout and for ``labels.csv``, which
the user supplies because the database's own emotion / pose label files are
not public.

  from data_prep.kopaczka_thermal import KopaczkaThermal
  builder = KopaczkaThermal(config="default", data_dir="/data/tfds",
                            file_format="array_record")
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
      manual_dir="/data/kopaczka"))
  source = builder.as_data_source("train")

Crops: by default (``crop_mode="facebox"``) every frame is cropped to the
face box found in the frame itself (`tml.facebox`, the same path as the
synthetic builder's), so test crops do not use the test landmarks;
``crop_mode="landmarks"`` crops to the landmark extent plus `margin` (the
1.0.0 behaviour). See `data_prep.thermal_common` for both. A frame with no
face-like warm region is a `ThermalFormatError` with reason 'face_box'
(skipped and counted under ``skip_bad``); ``info.metadata`` counts the frames
whose landmarks fall partly outside their face-box crop, the first thing to
check on real frames.
Landmarks that cannot be a face (all 68 points at one spot, or points far
off the frame: `thermal_common.check_points`) are a `ThermalFormatError`
with reason 'landmarks' naming the LJSON file (skipped and counted under
``skip_bad``).

  # for a user with the database in /data/kopaczka, build and train:
  python -m experiments.run --flagfile=chu.flags \
      --dataset=kopaczka_thermal --manual_dir=/data/kopaczka

Bad input stops the build with a `ThermalFormatError` (or the LJSON reader's
`LandmarkFormatError`) that names the file, the field and what was expected.
TFDS writes into an ``incomplete.*`` directory and renames it only after the
last example, so a failed build leaves nothing that reads as a dataset. With
``skip_bad=True`` bad frames are skipped instead, counted per reason, and the
counts are logged at the end and stored in ``info.metadata``.
"""
from __future__ import annotations

import collections
import dataclasses
import os

from absl import logging
import numpy as np
import tensorflow_datasets as tfds

from data_prep import thermal_common
from data_prep.kopaczka_thermal import reader
from tml import landmarks as lm_lib

MANUAL_DOWNLOAD_INSTRUCTIONS = """\
Register for the database at RWTH Aachen (Kopaczka et al. 2018) and put its
frames, flat, into the manual directory:

  <base>.png    8-bit or 16-bit greyscale PNG  (or <base>.npy: a float array
                of temperatures in degrees C, mapped through [t_min, t_max])
  <base>.ljson  menpo LJSON v2: 68 iBUG points as [y, x], 0-based;
                null = missing
  labels.csv    one row per frame, written by you (see below)

<base> is irface_subSSS_seqQQ_frmFFFFF.jpg_lfb (a few .png_lfb). Subject,
sequence and frame are read from it. Other files are ignored.

labels.csv: a header row and the columns
  file_name  the frame's image file name or its <base> (directories dropped)
  emotion    angry, contempt, disgust, fear, happy, sad, surprise, neutral
             (case-insensitive) or their index 0-7 in that order
  pose       head pose 0-8, 0 = frontal
  glasses    optional: 1/0, true/false, yes/no (empty = no)
Every frame needs a row; rows without a frame are ignored with a warning.
"""


@dataclasses.dataclass
class KopaczkaThermalConfig(tfds.core.BuilderConfig):
  """How to store the database.

  Attributes:
    crop_size: S, the stored square crop side.
    margin: crop margin per side, fraction of the landmark extent.
    t_min, t_max: temperature window (degrees C) for .npy frames.
    skip_missing_points: skip frames whose LJSON has a null point instead of
      stopping the build.
    mask_missing_points: keep frames whose LJSON has null points: the points
      are stored as NaN, `tml.input_pipeline.load_examples` marks the frame
      ``has_landmarks`` False, and training uses it for the emotion task only
      (every landmark loss and metric leaves it out). ``info.metadata``
      counts the frames and points masked.
    skip_bad: skip (and count) any bad frame instead of stopping the build;
      implies skip_missing_points.
    labels_file: name of the labels CSV inside the manual directory.
    crop_mode: "facebox" (the face box found in each frame) or "landmarks"
      (the landmark extent plus `margin`); see `thermal_common.CROP_MODES`.
  """
  crop_size: int = thermal_common.DEFAULT_CROP_SIZE
  margin: float = thermal_common.DEFAULT_MARGIN
  t_min: float = thermal_common.DEFAULT_T_MIN
  t_max: float = thermal_common.DEFAULT_T_MAX
  skip_missing_points: bool = False
  skip_bad: bool = False
  mask_missing_points: bool = False
  labels_file: str = "labels.csv"
  crop_mode: str = "facebox"


class KopaczkaThermal(thermal_common.CodePathFromFile,
                      tfds.core.GeneratorBasedBuilder):
  """The Kopaczka thermal face database as square crops with 68 landmarks."""

  VERSION = tfds.core.Version("2.0.0")
  RELEASE_NOTES = {
      "1.0.0": "Initial release.",
      "2.0.0": "Crops from the face box found in each frame (tml.facebox) "
               "by default, not from the landmark extent; crop_mode="
               "'landmarks' keeps the old crops. Metadata counts frames with "
               "landmarks outside their crop.",
  }
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  # How bad frames are handled, also as constructor keywords (what
  # `experiments.run` passes for --skip_bad / --missing_points); a keyword
  # given overrides the config's field. `tml.provenance` records them with
  # the build, so a build made under other options is refused, not reused.
  OPTIONS = ("skip_bad", "skip_missing_points", "mask_missing_points")

  def __init__(self, *, skip_bad: bool | None = None,
               skip_missing_points: bool | None = None,
               mask_missing_points: bool | None = None, **kwargs):
    super().__init__(**kwargs)
    given = {"skip_bad": skip_bad, "skip_missing_points": skip_missing_points,
             "mask_missing_points": mask_missing_points}
    self._options = {k: bool(getattr(self.builder_config, k)) if v is None else bool(v)
                     for k, v in given.items()}
    if self._options["skip_missing_points"] and self._options["mask_missing_points"]:
      raise ValueError("kopaczka_thermal: skip_missing_points and "
                       "mask_missing_points exclude each other")

  BUILDER_CONFIGS = [
      KopaczkaThermalConfig(name="default", description="128x128 crops."),
      KopaczkaThermalConfig(name="crop64", crop_size=64,
                            description="64x64 crops."),
      KopaczkaThermalConfig(name="crop256", crop_size=256,
                            description="256x256 crops."),
      KopaczkaThermalConfig(name="landmark_crops", crop_mode="landmarks",
                            description="128x128 crops from the landmark "
                            "extent plus margin (the 1.0.0 crops)."),
  ]
  DEFAULT_CONFIG_NAME = "default"

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    thermal_common.check_crop_mode(cfg.crop_mode)
    description = (
        "Kopaczka et al. 2018 thermal face database (1024x768 long-wave "
        "infrared frames, 68 manually placed iBUG landmarks; emotion and "
        "head pose from a user-supplied labels.csv), stored as square face "
        f"crops ({_CROP_TEXT[cfg.crop_mode]}) in the common thermal schema "
        f"(data_prep/thermal_common.py): crops {cfg.crop_size}x"
        f"{cfg.crop_size}, margin {cfg.margin:g}, temperature window "
        f"{cfg.t_min:g}-{cfg.t_max:g} C for .npy frames. Chu & Liu 2019 use "
        "its 2,190 frontal frames of 64 subjects. Single split 'train'; the "
        "numbers of frames, frontal frames (per emotion) and skipped frames "
        "of a build are in info.metadata.")
    return tfds.core.DatasetInfo(
        builder=self, description=description,
        features=thermal_common.features_dict(cfg.crop_size),
        metadata=tfds.core.MetadataDict(), citation=_CITATION)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(dl_manager.manual_dir)}

  def _generate_examples(self, manual_dir):
    cfg = self.builder_config
    opts = self._options
    manual_dir = os.fspath(manual_dir)
    strict = not opts["skip_bad"]
    labels_path = os.path.join(manual_dir, cfg.labels_file)
    # A missing or unreadable labels file is never skipped: nothing to build.
    labels, label_errors = reader.read_labels(labels_path, strict=strict)
    frames, file_errors = reader.scan_frames(manual_dir, strict=strict)
    if not frames and not file_errors:
      raise thermal_common.format_error(
          manual_dir, "frames", "<base>.png or .npy with <base>.ljson files "
          "(see MANUAL_DOWNLOAD_INSTRUCTIONS)", "none", reason="config")

    skipped = collections.Counter()
    written, frontal = collections.Counter(), collections.Counter()
    self._outside = 0
    self._masked_frames = self._masked_points = 0
    for err in file_errors:
      skipped[err.reason] += 1
      logging.warning("kopaczka_thermal: skipping: %s", err)
    for frame in frames:
      try:
        label = labels.get(frame.base)
        if label is None:
          raise label_errors.get(frame.base) or thermal_common.format_error(
              labels_path, "file_name", f"a row for frame {frame.base} "
              f"(from {frame.image_path})", "none", reason="labels")
        example = self._example(frame, label)
      except (thermal_common.ThermalFormatError,
              lm_lib.LandmarkFormatError) as err:
        reason = reader.reason_of(err)
        if strict and not (reason == "missing_points"
                           and opts["skip_missing_points"]):
          raise
        skipped[reason] += 1
        logging.warning("kopaczka_thermal: skipping: %s", err)
        continue
      written[label.emotion] += 1
      frontal[label.emotion] += label.pose == 0
      yield frame.base, example

    unused = sorted(set(labels) - {f.base for f in frames})
    if unused:
      logging.warning("kopaczka_thermal: %d labels.csv rows name no frame in "
                      "%s (first: %s)", len(unused), manual_dir, unused[0])
    self._record_summary(written, frontal, skipped, len(unused))

  def _example(self, frame: reader.Frame, label: reader.Label) -> dict:
    """One frame's stored example; raises on any bad input."""
    cfg = self.builder_config
    points = lm_lib.read_ljson(frame.ljson_path)
    missing = np.flatnonzero(~np.isfinite(points).all(axis=1)).tolist()
    if missing and not self._options["mask_missing_points"]:
      raise thermal_common.format_error(
          frame.ljson_path, f"landmarks.points[{missing[0]}]",
          "68 [y, x] points (--missing_points=mask keeps such frames for the "
          "emotion task, --missing_points=skip drops them; builder options "
          "mask_missing_points / skip_missing_points)",
          f"null at indices {missing}", reason="missing_points")
    if missing and len(missing) == len(points):
      raise thermal_common.format_error(
          frame.ljson_path, "landmarks.points", "at least one point",
          "all 68 points null", reason="missing_points")
    image = reader.load_image(frame.image_path)
    grey = thermal_common.to_unit_grey(image, cfg.t_min, cfg.t_max,
                                       source=frame.image_path)
    thermal_common.check_points(points, grey.shape, source=frame.ljson_path)
    box = thermal_common.choose_box(grey, points, cfg.crop_mode, cfg.margin,
                                    source=frame.image_path)
    example = thermal_common.make_example(
        grey, points, crop_size=cfg.crop_size, margin=cfg.margin,
        emotion=label.emotion, subject=frame.subject, sequence=frame.sequence,
        frame=frame.frame, pose=label.pose, glasses=label.glasses,
        file_name=os.path.basename(frame.image_path), box=box)
    if thermal_common.points_outside(example["landmarks"], cfg.crop_size):
      self._outside += 1
    if missing:
      self._masked_frames += 1
      self._masked_points += len(missing)
    return example

  def _record_summary(self, written, frontal, skipped, unused_rows):
    emotions = thermal_common.THERMAL_EMOTIONS
    summary = {
        "num_frames": sum(written.values()),
        "num_frontal": sum(frontal.values()),
        "frontal_per_emotion": {e: frontal.get(e, 0) for e in emotions},
        "frames_per_emotion": {e: written.get(e, 0) for e in emotions},
        "num_skipped": sum(skipped.values()),
        "skipped_by_reason": dict(sorted(skipped.items())),
        "unused_label_rows": unused_rows,
        "crop_mode": self.builder_config.crop_mode,
        "frames_with_points_outside_crop": self._outside,
        "masked_frames": self._masked_frames,
        "masked_points": self._masked_points,
        "options": dict(self._options),
    }
    self.info.metadata.update(summary)
    logging.info(
        "kopaczka_thermal: wrote %d frames (%d frontal); skipped %d %s; "
        "%d unused label rows; %d frames with landmarks outside their %s "
        "crop; %d frames (%d points) with null points kept, masked",
        summary["num_frames"], summary["num_frontal"], summary["num_skipped"],
        summary["skipped_by_reason"], unused_rows, self._outside,
        summary["crop_mode"], self._masked_frames, self._masked_points)


_CROP_TEXT = {
    "facebox": "from the face box found in each frame, tml.facebox",
    "landmarks": "from the landmark extent plus margin",
}

_CITATION = """\
@article{kopaczka2018thermal,
  title={A Thermal Infrared Face Database With Facial Landmarks and Emotion
         Labels},
  author={Kopaczka, Marcin and Kolk, Raphael and Schock, Justus and
          Burkhard, Felix and Merhof, Dorit},
  journal={IEEE Transactions on Instrumentation and Measurement},
  year={2018}
}"""
