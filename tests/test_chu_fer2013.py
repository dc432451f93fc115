"""The Chu pipeline on FER2013 faces: landmark metrics over labelled faces only,
a clear error without landmarks, the data flag file, the real-data run."""
from __future__ import annotations

import pathlib

import numpy as np
import pytest

from tml import config as config_lib
from tml import metrics as metrics_lib
from tml import protocol
from tml import train

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _faces(n=40, seed=0):
  rng = np.random.default_rng(seed)
  base = rng.uniform(8, 40, size=(68, 2)).astype(np.float32)
  gt = base + rng.normal(0, 1.5, size=(n, 68, 2)).astype(np.float32)
  has = rng.uniform(size=n) < 0.7
  stored = np.where(has[:, None, None], gt, 0.0).astype(np.float32)   # zeros when missed
  arrays = {"landmarks": stored, "has_landmarks": has,
            "emotion": rng.integers(0, 7, n).astype(np.int32)}
  return arrays, gt, has


def test_evaluate_scores_landmarks_on_labelled_faces_and_emotion_on_all():
  arrays, gt, has = _faces()
  data = protocol.Dataset("fer2013_faces", "thermal", tuple("abcdefg"), {})
  rng = np.random.default_rng(1)
  pred = gt + rng.normal(0, 1.0, size=gt.shape).astype(np.float32)
  probs = rng.dirichlet(np.ones(7), size=len(gt)).astype(np.float32)
  idx = np.arange(len(gt))
  res = train.evaluate({"landmarks": pred, "emotion_probs": probs}, arrays, idx,
                       data, train_landmarks=gt[has])
  want = 100 * np.mean(metrics_lib.per_image_nme(pred[has], gt[has], "inter_pupil"))
  np.testing.assert_allclose(res["nme_inter_pupil"], want, rtol=1e-5)
  assert res["num_landmark_images"] == int(has.sum())
  assert res["num_test_images"] == len(gt)
  acc = 100 * np.mean(np.argmax(probs, -1) == arrays["emotion"])
  np.testing.assert_allclose(res["emotion_accuracy"], acc, rtol=1e-6)
  none = dict(arrays, has_landmarks=np.zeros(len(gt), bool))
  with pytest.raises(ValueError, match="none of the 40 test images has landmarks"):
    train.evaluate({"landmarks": pred}, none, idx, data, train_landmarks=None)


def test_data_flag_file_sets_only_data_and_test_set_fields():
  """chu_fer2013_data.flags goes after any row's flag file (and after ``--``
  of chu_tables): it may not set a row-defining or size field."""
  from experiments import chu_tables
  from experiments import run as run_lib
  args = run_lib.expand_flagfiles(["--flagfile=experiments/chu_fer2013_data.flags"],
                                  _base=ROOT)
  names = {a[2:].split("=", 1)[0] for a in args}
  assert names == {"dataset", "dataset_config", "manual_dir", "landmarks_file",
                   "test_sets"}
  assert chu_tables.check_extra(
      ["--flagfile=experiments/chu_fer2013_data.flags"]) is not None
  fields = {f.name for f in __import__("dataclasses").fields(config_lib.Config)}
  assert names <= fields


def _subset_zip(shared_data, out, per_split):
  """A small FER2013 zip in the image-folder layout: every k-th member of each
  split (all seven classes), so the build has all three splits."""
  import zipfile
  src = shared_data / "fer2013" / "fer2013_images.zip"
  with zipfile.ZipFile(src) as z, zipfile.ZipFile(out, "w") as o:
    names = sorted(m for m in z.namelist() if m.endswith(".jpg"))
    for prefix, n in per_split.items():
      group = [m for m in names if f"/{prefix}_" in m]
      for m in group[::max(1, len(group) // n)][:n]:
        o.writestr(m, z.read(m))


def test_chu_recipe_learns_on_real_fer2013_faces(shared_data, tmp_path):
  """The Chu recipe (two stages, multi-task, emotion weight 0.1) on 1,200
  real FER2013 faces labelled by dlib here: landmark NME on PrivateTest
  faces clearly below the mean shape (a model that learned nothing scores
  the mean shape or worse)."""
  pytest.importorskip("dlib", reason="dlib not installed (pip install -e .[labels])")
  import subprocess
  import sys
  manual = tmp_path / "manual"
  manual.mkdir()
  _subset_zip(shared_data, manual / "fer2013_images.zip",
              {"Training": 1000, "PublicTest": 20, "PrivateTest": 180})
  lms = tmp_path / "fer2013_landmarks.npz"
  proc = subprocess.run(
      [sys.executable, "-m", "data_prep.label68",
       f"--fer2013={manual / 'fer2013_images.zip'}", f"--out={lms}", "--workers=2"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  cfg = config_lib.Config(
      dataset="fer2013_faces", dataset_config="dlib68", manual_dir=str(manual),
      landmarks_file=str(lms), data_dir=str(tmp_path / "tfds"),
      workdir=str(tmp_path / "run"), model="chu_unet", image_size=32,
      unet_depth=2, unet_width=8, fc_width=128, emotion_head=True,
      emotion_weight=0.1, optimizer="adam", learning_rate=1e-3, batch_size=32,
      eval_batch_size=64, stage1_epochs=2, stage2_epochs=14, splits=(0,),
      log_every_steps=50, checkpoint_every_steps=10_000)
  res = train.train_and_evaluate(cfg)["per_split"][0]
  n_lm = res["num_landmark_images"]
  assert 100 <= n_lm < res["num_test_images"] == 180   # only labelled faces scored
  assert res["nme_inter_pupil"] < 0.85 * res["mean_shape_nme_inter_pupil"], res
  assert res["emotion_accuracy"] is not None
