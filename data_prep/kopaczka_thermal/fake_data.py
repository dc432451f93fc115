"""Writes a folder in the Kopaczka database's on-disk format, from the renderer.

For tests and demos of `kopaczka_thermal` without the real (registration-only)
database: ``<base>.png`` (8-bit or 16-bit) or ``<base>.npy`` (degrees C) plus
``<base>.ljson`` (menpo LJSON v2, [y, x] points) per frame and a
``labels.csv``. Given a real frame's three known points (inner eye corners 39
and 42 and nose tip 30, as in kopaczka_filenames_3points.csv), the synthetic
face is posed so that those landmarks land there.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
from typing import Sequence

import numpy as np
from PIL import Image

from data_prep import thermal_common
from data_prep.kopaczka_thermal import reader
from data_prep.synthetic_thermal import render
from data_prep.synthetic_thermal import scene
from data_prep.synthetic_thermal import shape_model
from tml import landmarks as lm_lib

# Label groups of the database's LJSON files. "l"/"r" follow menpo's
# image-side naming: leyebrow/leye are points 17-21/36-41.
LJSON_GROUPS = {
    "chin": range(0, 17), "leyebrow": range(17, 22),
    "reyebrow": range(22, 27), "centernose": range(27, 31),
    "bottomnose": range(31, 36), "leye": range(36, 42),
    "reye": range(42, 48), "outermouth": range(48, 60),
    "innermouth": range(60, 68),
}
_CLOSED = ("leye", "reye", "outermouth", "innermouth")


@dataclasses.dataclass(frozen=True)
class FakeFrame:
  """What was written for one frame (for assertions)."""
  base: str
  image_name: str
  landmarks: np.ndarray  # (68, 2) (x, y) frame pixel centres
  emotion: str
  pose: int
  glasses: bool


def ljson_document(landmarks: np.ndarray) -> dict:
  """An LJSON v2 document for ``(68, 2)`` (x, y); NaN points become null."""
  points = [None if not np.all(np.isfinite(p)) else [float(p[1]), float(p[0])]
            for p in np.asarray(landmarks, dtype=np.float64)]
  connectivity = []
  for name, idx in LJSON_GROUPS.items():
    idx = list(idx)
    connectivity += [[a, b] for a, b in zip(idx, idx[1:])]
    if name in _CLOSED:
      connectivity.append([idx[-1], idx[0]])
  return {
      "labels": [{"label": k, "mask": list(v)}
                 for k, v in LJSON_GROUPS.items()],
      "landmarks": {"points": points, "connectivity": connectivity},
      "version": 2,
  }


def write_ljson(path: str, landmarks: np.ndarray) -> None:
  with open(path, "w", encoding="utf-8") as f:
    json.dump(ljson_document(landmarks), f)


def write_database(
    out_dir: str, image_names: Sequence[str],
    anchors: Sequence[dict[int, tuple[float, float]] | None] | None = None, *,
    seed: int = 0, frame_size: tuple[int, int] = (1024, 768),
    image_format: str = "png8", render_step: float = 4.0,
    emotions: Sequence[str] | None = None, poses: Sequence[int] | None = None,
    glasses: Sequence[bool] | None = None, t_window=(20.0, 40.0),
    labels_csv: bool = True, variation: str = "wide",
) -> list[FakeFrame]:
  """Renders and writes frames plus labels.csv; returns what it wrote.

  Args:
    out_dir: created if needed.
    image_names: real-style names ``irface_subSSS_seqQQ_frmFFFFF.jpg_lfb.png``.
    anchors: per frame, landmark index -> (x, y) frame position to pose the
      face onto (e.g. {39: .., 42: .., 30: ..}); None places it at random.
    seed: identities and draws follow from (seed, subject, sequence, frame).
    frame_size: (W, H).
    image_format: "png8", "png16" (grey through `t_window`) or "npy"
      (degrees C, float32).
    render_step: paint every this many pixels and resize up (speed).
    emotions, poses, glasses: per-frame labels; default: drawn at random,
      pose 0, from the subject's traits.
    t_window: degrees C mapped onto the PNG grey range.
    labels_csv: also write labels.csv for exactly these frames.
    variation: the synthetic builder's `scene.Variation` name.
  """
  os.makedirs(out_dir, exist_ok=True)
  written = []
  for i, name in enumerate(image_names):
    base = name[:-4] if name.endswith((".png", ".npy")) else name
    subject, sequence, frame = reader.parse_base(base, name)
    rng = np.random.default_rng([seed, subject, sequence, frame])
    emotion = (emotions[i] if emotions else
               thermal_common.THERMAL_EMOTIONS[rng.choice(8, p=scene.TABLE_I)])
    pose_id = poses[i] if poses else 0
    traits = scene.subject_traits(seed, subject, variation_name=variation)
    spec = scene.FrameSpec(subject, sequence, frame, emotion, pose_id)
    face, thermal, rng = scene.frame_scene(seed, spec, traits, frame_size)
    if glasses is not None:
      thermal = dataclasses.replace(thermal, glasses=bool(glasses[i]))
    anchor = anchors[i] if anchors else None
    if anchor:
      face = dataclasses.replace(
          face, pose=shape_model.fit_pose(face.shape, anchor))
    temps = render.render_frame(face, thermal, frame_size, rng,
                                step=render_step)
    image_name = _write_image(out_dir, base, temps, image_format, t_window)
    write_ljson(os.path.join(out_dir, base + ".ljson"), face.landmarks)
    written.append(FakeFrame(base, image_name, face.landmarks, emotion,
                             pose_id, thermal.glasses))
  if labels_csv:
    write_labels(os.path.join(out_dir, "labels.csv"), written)
  return written


def write_labels(path: str, frames: Sequence[FakeFrame]) -> None:
  with open(path, "w", encoding="utf-8", newline="") as f:
    w = csv.writer(f)
    w.writerow(["file_name", "emotion", "pose", "glasses"])
    for fr in frames:
      w.writerow([fr.image_name, fr.emotion, fr.pose, int(fr.glasses)])


def _write_image(out_dir, base, temps, image_format, t_window) -> str:
  grey = thermal_common.to_unit_grey(temps, *t_window)
  if image_format == "png8":
    name = base + ".png"
    Image.fromarray(np.round(grey * 255).astype(np.uint8)).save(
        os.path.join(out_dir, name), compress_level=1)
  elif image_format == "png16":
    name = base + ".png"
    Image.fromarray(thermal_common.unit_to_uint16(grey)).save(
        os.path.join(out_dir, name), compress_level=1)
  elif image_format == "npy":
    name = base + ".npy"
    np.save(os.path.join(out_dir, name), temps.astype(np.float32))
  else:
    raise ValueError(f"image_format: expected png8, png16 or npy, got "
                     f"{image_format!r}")
  return name


def read_three_points(csv_path: str
                      ) -> dict[str, dict[int, tuple[float, float]]]:
  """kopaczka_filenames_3points.csv -> image name -> {39:, 42:, 30: (x, y)}.

  The file's "leftEye" is the image-left inner corner (39), "rightEye" the
  image-right one (42); values are truncated integers, so +0.5 recentres
  them on average. Rows for non-image files (.pts) are dropped.
  """
  out = {}
  with open(csv_path, "r", encoding="utf-8") as f:
    for row in csv.DictReader(f):
      if not row["filename"].endswith(".png"):
        continue
      g = lambda k: float(row[k]) + 0.5
      out[row["filename"]] = {39: (g("leftEyeX"), g("leftEyeY")),
                              42: (g("rightEyeX"), g("rightEyeY")),
                              30: (g("noseX"), g("noseY"))}
  return out


__all__ = ["FakeFrame", "LJSON_GROUPS", "ljson_document", "read_three_points",
           "write_database", "write_labels", "write_ljson"]
assert sum(len(v) for v in LJSON_GROUPS.values()) == lm_lib.NUM_LANDMARKS
