"""Protocol splits: FER2013 holdout, thermal validation slice, subject-disjoint split."""
from __future__ import annotations

import numpy as np
import pytest

from tml import config as config_lib
from tml import protocol


def _thermal(n_subjects=16, per=24, seed=0):
  rng = np.random.default_rng(seed)
  subject = np.repeat(np.arange(n_subjects), per)
  n = subject.size
  arrays = {"emotion": rng.integers(0, 8, n).astype(np.int32),
            "frontal": rng.uniform(size=n) < 0.8, "subject": subject.astype(np.int32),
            "file_name": np.array([f"f{i:05d}" for i in range(n)]),
            "landmarks": np.zeros((n, 68, 2), np.float32)}
  return protocol.Dataset("synthetic_thermal", "thermal", tuple("abcdefgh"),
                          {"train": arrays})


def _split(cfg, data, r=0):
  return next(iter(protocol.splits(cfg.replace(splits=(r,)), data)))


def test_subject_split_is_subject_disjoint_frontal_and_seeded():
  data = _thermal()
  a = data.arrays["train"]
  cfg = config_lib.Config(thermal_split="subject")
  s0, s1 = _split(cfg, data, 0), _split(cfg, data, 1)
  for s in (s0, s1):
    assert not set(a["subject"][s.train_idx]) & set(a["subject"][s.test_idx])
    assert a["frontal"][s.train_idx].all() and a["frontal"][s.test_idx].all()
    assert len(set(a["subject"][s.test_idx])) == 2       # ceil(16 / 8)
    # every frontal frame of a test subject is tested
    test_subs = set(a["subject"][s.test_idx])
    want = np.flatnonzero(a["frontal"] & np.isin(a["subject"], list(test_subs)))
    assert np.array_equal(np.sort(s.test_idx), want)
  assert set(a["subject"][s0.test_idx]) != set(a["subject"][s1.test_idx])


@pytest.mark.parametrize("thermal_split", ["per_image", "subject"])
def test_thermal_holdout_is_a_slice_of_the_training_images(thermal_split):
  data = _thermal()
  a = data.arrays["train"]
  cfg = config_lib.Config(thermal_split=thermal_split)
  full = _split(cfg, data)
  val = _split(cfg.replace(test_sets="holdout"), data)
  assert val.test_name == "holdout"
  # the validation run never sees the reported test split, in either role
  assert not set(val.train_idx) & set(full.test_idx)
  assert not set(val.test_idx) & set(full.test_idx)
  assert not set(val.train_idx) & set(val.test_idx)
  assert set(val.train_idx) | set(val.test_idx) == set(full.train_idx)
  frac = len(val.test_idx) / len(full.train_idx)
  assert 0.08 < frac < 0.25
  if thermal_split == "subject":
    assert not set(a["subject"][val.train_idx]) & set(a["subject"][val.test_idx])


def test_thermal_reports_one_set():
  data = _thermal()
  with pytest.raises(ValueError, match="one set"):
    _split(config_lib.Config(test_sets="test,holdout"), data)


def test_stratified_holdout_is_per_class_disjoint_and_fixed():
  from tml import protocol
  labels = np.repeat(np.arange(7), [40, 5, 30, 80, 50, 20, 60])
  rng = np.random.default_rng(1)
  labels = labels[rng.permutation(len(labels))]
  train_idx, hold = protocol.stratified_holdout(labels, 0.1, seed=3)
  assert np.intersect1d(train_idx, hold).size == 0
  assert np.union1d(train_idx, hold).size == len(labels)
  for c, n in enumerate([40, 5, 30, 80, 50, 20, 60]):
    assert np.sum(labels[hold] == c) == int(round(0.1 * n))   # per class, rounded
  again = protocol.stratified_holdout(labels, 0.1, seed=3)[1]
  assert np.array_equal(hold, again)                          # same images every run
  other = protocol.stratified_holdout(labels, 0.1, seed=4)[1]
  assert not np.array_equal(hold, other)




def _fer_faces(n=(400, 60, 60), seed=0):
  rng = np.random.default_rng(seed)
  arrays = {}
  for split, k in zip(("train", "public_test", "private_test"), n):
    arrays[split] = {"emotion": rng.integers(0, 7, k).astype(np.int32),
                     "has_landmarks": rng.uniform(size=k) < 0.8,
                     "landmarks": np.zeros((k, 68, 2), np.float32)}
  return protocol.Dataset("fer2013_faces", "thermal", tuple("abcdefg"), arrays)


def test_chu_on_fer2013_faces_trains_a_fixed_schedule_and_reports_private_test():
  data = _fer_faces()
  cfg = config_lib.Config(dataset="fer2013_faces")
  assert protocol.selection(cfg, data) == "last"
  split = _split(cfg, data, r=3)
  assert (split.name, split.index, split.test_name) == ("init_3", 3, "private_test")
  assert split.select is None and not split.extra_tests and not split.last_tests
  np.testing.assert_array_equal(split.train_idx, np.arange(400))
  assert split.test is data.arrays["private_test"]
  # Settings are chosen on PublicTest; the Chu task has no selection set.
  val = _split(cfg.replace(test_sets="public_test"), data)
  assert val.test is data.arrays["public_test"]
  with pytest.raises(ValueError, match="selection"):
    protocol.selection(cfg.replace(selection="public_test"), data)


def test_train_limit_is_a_fixed_stratified_subset():
  data = _fer_faces(n=(1000, 10, 10))
  labels = data.arrays["train"]["emotion"]
  cfg = config_lib.Config(dataset="fer2013_faces", train_limit=300)
  a = _split(cfg, data, r=0).train_idx
  b = _split(cfg, data, r=4).train_idx   # every seed trains on the same images
  np.testing.assert_array_equal(a, b)
  assert abs(len(a) - 300) <= 7 and np.all(np.diff(a) > 0)
  for c in range(7):   # per-class shares within rounding
    assert abs(np.sum(labels[a] == c) - 300 * np.mean(labels == c)) <= 1
  assert not np.array_equal(a, _split(cfg.replace(holdout_seed=1), data).train_idx)
  assert len(_split(cfg.replace(train_limit=0), data).train_idx) == 1000
  with pytest.raises(config_lib.ConfigError, match="--train_limit"):
    config_lib.validate(cfg.replace(train_limit=-1))
