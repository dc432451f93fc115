r"""Mean-shape and pixel-ridge NME of built thermal datasets: how hard are they?

For each dataset, on the Chu protocol as training runs it
(`tml.input_pipeline.chu_protocol_split`: frontal frames, per emotion 7/8
train and 1/8 test, repeats 0-4 of seed 0), with the crops resized to
``--image_size`` as the network sees them (`load_examples`):

  mean shape  every test image gets the mean training landmark set;
  ridge       `tml.ridge`: 32x32 block means of the crops, standardised,
              lambda chosen on a held-out 1/8 of the TRAINING images, refit
              on all of them.

Both are Chu's Eq. 5 inter-pupil NME (percent). ``--subject_disjoint`` adds
the same on splits that hold out whole subjects (1/8 of them per repeat):
consecutive frames of one subject are near-duplicates, and the per-image
protocol lets a model (ridge included) recognise the subject. A dataset
missing under ``--data_dir`` is built first.

  python -m data_prep.synthetic_thermal.baseline --data_dir=/tmp/tfds \
      --datasets=synthetic_thermal/default,synthetic_thermal/landmark_crops

Measured with builder 2.0.0 (seed 0; 2,240 frontal frames; image_size 128;
5 splits, mean +- std over them; percent inter-pupil NME), each line one
``--datasets=synthetic_thermal/<config>`` run on 2 shared CPU cores, build
included (77-171 s):

  config (crops, variation)         mean shape      ridge          ratio
  narrow_landmark_crops (= 1.0.0)    8.17 +- 0.19    2.66 +- 0.08   0.33
  narrow (facebox, narrow)          10.75 +- 0.28    3.06 +- 0.03   0.28
  landmark_crops (landmarks, wide)  12.78 +- 0.27    3.73 +- 0.05   0.29
  default (facebox, wide)           16.78 +- 0.30    5.09 +- 0.20   0.30
  subject-disjoint splits (--subject_disjoint):
  landmark_crops                    13.08 +- 0.75    6.24 +- 1.08   0.48
  default                           16.71 +- 1.28    7.71 +- 0.98   0.46

The labels' own annotation noise puts a floor of ~1.5 % under any model.
Ridge stays near 0.3 of the mean shape on the per-image protocol whatever
realistic variation is added (head pose, box error, facial hair, sensor
effects, breathing, speech, blinks all scale both numbers alike): a smooth
thermal image's 32x32 block means move almost linearly with each of them,
and every test subject's other frames are in the training set. A plain
six-conv CNN (N=64, 30 epochs, no augmentation) beats it on the default:
see the issue-8 report.
"""
from __future__ import annotations

import math
import time

from absl import app
from absl import flags
import numpy as np

from data_prep import thermal_common
from tml import input_pipeline
from tml import ridge

FLAGS = flags.FLAGS


def _define_flags() -> None:
  """Defined only when run as a program: the names (data_dir, seed, ...) are
  also experiments.run's flags, and absl's registry is process-wide."""
  flags.DEFINE_string("data_dir", None, "TFDS data_dir.")
  flags.DEFINE_list(
      "datasets", ["synthetic_thermal/default"],
      "name/config of thermal datasets (registered in tml.input_pipeline).")
  flags.DEFINE_integer("image_size", 128, "network input side N (crops resized).")
  flags.DEFINE_integer("repeats", 5, "Seeded splits.")
  flags.DEFINE_integer("seed", 0, "Protocol seed.")
  flags.DEFINE_bool("subject_disjoint", False, "Also score subject-disjoint splits.")


inter_pupil_nme = ridge.inter_pupil_nme
_FIELDS = ("image", "landmarks", "emotion", "frontal", "subject",
           "file_name")


def load_frontal(dataset: str, data_dir, image_size: int | None
                 ) -> dict[str, np.ndarray]:
  """The frontal frames of ``name/config``, in file-name order."""
  name, _, config = dataset.partition("/")
  source = input_pipeline.open_source(name, data_dir=data_dir, split="train",
                                      config=config or None)
  a = input_pipeline.load_examples(source, image_size=image_size,
                                   fields=_FIELDS, sort_by="file_name")
  keep = a["frontal"].astype(bool)
  return {k: v[keep] for k, v in a.items()}


def subject_split(subjects: np.ndarray, repeat: int, seed: int,
                  test_fraction: float = 1 / 8
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Holds out ceil(test_fraction * #subjects) whole subjects (sorted idx)."""
  ids = np.unique(subjects)
  n_test = max(1, math.ceil(len(ids) * test_fraction - 1e-9))
  test_ids = np.random.default_rng([seed, repeat]).permutation(ids)[:n_test]
  test = np.isin(subjects, test_ids)
  return np.flatnonzero(~test), np.flatnonzero(test)


def difficulty(arrays: dict[str, np.ndarray], repeats: int = 5,
               seed: int = 0, subject_disjoint: bool = False) -> dict:
  """Mean-shape and ridge NME per split of frontal ``arrays``.

  Args:
    arrays: ``image`` (N, S, S, 1), ``landmarks`` (N, 68, 2), ``emotion``
      (N,), and (for the subject-disjoint splits) ``subject``; optionally
      ``file_name`` (keys of the per-image split).
    repeats, seed: the protocol's repeats 0..repeats-1 and seed.
    subject_disjoint: hold out whole subjects instead of 1/8 per emotion.

  Returns:
    ``dict(mean_shape=[..], ridge=[..], ridge_lambda=[..])`` one value per
    split (percent), plus ``frames_outside``: frames with a landmark
    outside the crop.
  """
  n = len(arrays["image"])
  out = {"mean_shape": [], "ridge": [], "ridge_lambda": []}
  for r in range(repeats):
    if subject_disjoint:
      train, test = subject_split(arrays["subject"], r, seed)
    else:
      train, test = input_pipeline.chu_protocol_split(
          arrays["emotion"], np.ones(n, bool), repeat=r, seed=seed,
          keys=arrays.get("file_name"))
    d = ridge.split_baseline(arrays["image"], arrays["landmarks"], train,
                             test, seed=r)
    out["mean_shape"].append(d["mean_shape_nme_inter_pupil"])
    out["ridge"].append(d["ridge_nme_inter_pupil"])
    out["ridge_lambda"].append(d["ridge_lambda"])
  side = arrays["image"].shape[1]
  out["frames_outside"] = int(sum(
      bool(thermal_common.points_outside(p, side))
      for p in arrays["landmarks"]))
  return out


def _line(label: str, d: dict) -> str:
  m, r = np.array(d["mean_shape"]), np.array(d["ridge"])
  return (f"  {label:16s} mean shape {m.mean():6.2f} +- {m.std():.2f} %   "
          f"ridge {r.mean():6.2f} +- {r.std():.2f} %   ridge / mean "
          f"{r.mean() / m.mean():.2f}   lambda "
          f"{', '.join(f'{v:.2g}' for v in d['ridge_lambda'])}")


def main(argv):
  del argv
  for dataset in FLAGS.datasets:
    start = time.perf_counter()
    arrays = load_frontal(dataset, FLAGS.data_dir, FLAGS.image_size)
    loaded = time.perf_counter() - start
    per_image = difficulty(arrays, FLAGS.repeats, FLAGS.seed)
    print(f"{dataset}: {len(arrays['image'])} frontal frames at "
          f"{FLAGS.image_size} px, {per_image['frames_outside']} with a "
          f"landmark outside the crop (loaded in {loaded:.0f} s)")
    print(_line("per-image split", per_image))
    if FLAGS.subject_disjoint:
      print(_line("subject split", difficulty(arrays, FLAGS.repeats,
                                              FLAGS.seed, True)))
    print(f"  ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flag_as_required("data_dir")
  app.run(main)
