r"""Mean-shape baseline NME of a built thermal dataset: how hard is it?

Predicts, for every test image, the mean training landmark set (crop
coordinates) and reports Chu & Liu's Eq. 5 inter-pupil NME (pupil = mean of
eye points 36-41 / 42-47) on the Chu protocol: frontal frames only, per
emotion a random 7/8 train and 1/8 test, five seeded repeats. A sanity check
of a dataset's difficulty, not the project's metrics module.

  python -m data_prep.synthetic_thermal.baseline \
      --data_dir=/tmp/tfds --dataset=synthetic_thermal/default
"""
from __future__ import annotations

from absl import app
from absl import flags
import numpy as np
import tensorflow_datasets as tfds

import data_prep.kopaczka_thermal  # noqa: F401  (registers the builder)
import data_prep.synthetic_thermal  # noqa: F401  (registers the builder)
from data_prep import thermal_common

_DATA_DIR = flags.DEFINE_string("data_dir", None, "TFDS data_dir.")
_DATASET = flags.DEFINE_string("dataset", "synthetic_thermal/default",
                               "name/config of a prepared thermal dataset.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Seeded splits.")


def inter_pupil_nme(truth: np.ndarray, pred: np.ndarray) -> np.ndarray:
  """Per-image NME in percent; ``(N, 68, 2)`` each -> ``(N,)``."""
  d = np.linalg.norm(truth[:, 36:42].mean(1) - truth[:, 42:48].mean(1), axis=-1)
  return np.linalg.norm(truth - pred, axis=-1).sum(1) / (68 * d) * 100


def chu_splits(emotion: np.ndarray, seed: int
               ) -> tuple[np.ndarray, np.ndarray]:
  """Per-emotion 7/8 train, 1/8 test index arrays (into `emotion`)."""
  rng = np.random.default_rng(seed)
  train, test = [], []
  for e in np.unique(emotion):
    idx = rng.permutation(np.flatnonzero(emotion == e))
    n_test = len(idx) // 8
    test.append(idx[:n_test])
    train.append(idx[n_test:])
  return np.concatenate(train), np.concatenate(test)


def mean_shape_nme(landmarks: np.ndarray, emotion: np.ndarray,
                   repeats: int = 5) -> tuple[list[float], np.ndarray]:
  """NME of the mean-shape predictor per repeat, and per-emotion NME (%)
  pooled over the repeats' test sets."""
  scores, per_emotion = [], [[] for _ in thermal_common.THERMAL_EMOTIONS]
  for seed in range(repeats):
    train, test = chu_splits(emotion, seed)
    nme = inter_pupil_nme(landmarks[test], landmarks[train].mean(0)[None])
    scores.append(float(nme.mean()))
    for e, v in zip(emotion[test], nme):
      per_emotion[e].append(v)
  return scores, np.array([np.mean(v) if v else np.nan for v in per_emotion])


def main(argv):
  del argv
  source = tfds.data_source(_DATASET.value, split="train",
                            data_dir=_DATA_DIR.value, download=False)
  records = [source[i] for i in range(len(source))]
  frontal = [r for r in records if r["frontal"]]
  lms = np.stack([r["landmarks"] for r in frontal]).astype(np.float64)
  emo = np.array([r["emotion"] for r in frontal])
  scores, per_emotion = mean_shape_nme(lms, emo, _REPEATS.value)
  print(f"{_DATASET.value}: {len(records)} frames, {len(frontal)} frontal")
  print(f"mean-shape inter-pupil NME: {np.mean(scores):.2f} % "
        f"(std {np.std(scores):.2f} over {len(scores)} splits)")
  for name, v in zip(thermal_common.THERMAL_EMOTIONS, per_emotion):
    print(f"  {name:9s} {v:.2f} %")


if __name__ == "__main__":
  flags.mark_flag_as_required("data_dir")
  app.run(main)
