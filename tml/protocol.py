"""Experimental protocols: which examples train, select and test in each split.

- thermal datasets (Chu & Liu): frontal faces only; per emotion a random 7/8
  trains and 1/8 tests; split r in ``--splits`` is the r-th seeded repeat. No
  selection set (the paper trains for a fixed number of epochs).
- fer2013 (DeVries): trains on Training; split r is the r-th random
  initialisation. ``--selection`` picks the reported parameters: on
  PublicTest (the standard protocol, PrivateTest reported once), on a
  stratified held-out slice of Training (``holdout``, removed from training),
  or the last parameters of a fixed schedule (``last``). ``--test_sets``
  names the reported sets: private_test, public_test, or public_private (the
  7,178 images of both: the paper's "7177 image test set"); none may overlap
  the selection set.
- tfd: split r is official fold r: train / valid (selection) / test.
- fer2013_faces (Chu & Liu on real faces): trains on Training for a fixed
  schedule (the last parameters, as on the thermal data); split r is the
  r-th seed, so "5 splits" are 5 initialisations on the fixed FER splits.
  PrivateTest is reported (``--test_sets=private_test``, the default);
  settings (emotion weight, epsilon, epochs) are chosen with
  ``--test_sets=public_test``, never on PrivateTest.

``--train_limit`` caps every split's training set at a fixed, per-emotion
stratified subset (`limit_train`), for reduced schedules.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator

import jax
import numpy as np

from tml import input_pipeline
from tml import parallel
from tml.config import Config


@dataclasses.dataclass
class SplitData:
  """One split: arrays (host, shared) and index sets into them."""
  name: str
  index: int
  train: dict[str, np.ndarray]
  train_idx: np.ndarray
  test: dict[str, np.ndarray]
  test_idx: np.ndarray
  select: dict[str, np.ndarray] | None = None
  select_idx: np.ndarray | None = None
  test_name: str = "test"
  select_name: str = ""
  # Further reported sets beyond ``test``: name -> (arrays, indices).
  extra_tests: dict = dataclasses.field(default_factory=dict)
  # Sets reported for the last parameters only: they overlap the selection
  # set, which the last parameters of a fixed schedule never depend on (FER:
  # public_private when selecting on PublicTest).
  last_tests: dict = dataclasses.field(default_factory=dict)

  def test_sets(self) -> dict[str, tuple[dict[str, np.ndarray], np.ndarray]]:
    """Every reported set, the primary one first."""
    return {self.test_name: (self.test, self.test_idx), **self.extra_tests}


@dataclasses.dataclass
class Dataset:
  """The loaded dataset: arrays per TFDS split and what the protocol needs."""
  name: str
  kind: str                       # 'thermal' or 'expression'
  class_names: tuple[str, ...]
  arrays: dict[str, dict[str, np.ndarray]]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


def load(cfg: Config) -> Dataset:
  """Opens (building if needed) and loads every split the protocol uses."""
  info = input_pipeline.dataset_info(cfg.dataset)
  # Process 0 builds a missing dataset first; on a shared file system the
  # others then find it prepared instead of racing to write it (hosts with
  # their own disks, like TPU VMs, each build their own copy after that).
  first = jax.process_index() == 0
  if not first:
    parallel.barrier("dataset-built")
  arrays = {}
  for split in info.splits:
    kwargs = builder_kwargs(cfg)
    source = input_pipeline.open_source(
        cfg.dataset, data_dir=cfg.data_dir, split=split,
        manual_dir=cfg.manual_dir or None, config=cfg.dataset_config or None,
        builder_kwargs=kwargs)
    size = cfg.image_size if info.kind == "thermal" else None
    arrays[split] = input_pipeline.load_examples(source, image_size=size,
                                                 sort_by=info.key_field)
  if first:
    parallel.barrier("dataset-built")
  if info.kind == "thermal":
    train = arrays[info.splits[0]]
    if "has_landmarks" not in train or not np.any(train["has_landmarks"]):
      raise ValueError(
          f"--dataset={cfg.dataset}: the {info.splits[0]} split has no image "
          f"with 68 landmarks (--dataset_config={cfg.dataset_config!r}); the "
          "Chu pipeline needs them" + (
              ": use --dataset_config=dlib68 --landmarks_file=<label68 output>"
              if cfg.dataset.startswith("fer2013") else ""))
  return Dataset(cfg.dataset, info.kind, tuple(info.class_names), arrays)


def builder_kwargs(cfg: Config) -> dict | None:
  """The builder keywords a run's config implies (None: none)."""
  kw: dict = {}
  if cfg.landmarks_file:
    kw["landmarks_file"] = cfg.landmarks_file
  if cfg.dataset == "kopaczka_thermal":
    kw.update(skip_bad=cfg.skip_bad,
              skip_missing_points=cfg.missing_points == "skip",
              mask_missing_points=cfg.missing_points == "mask")
  elif cfg.dataset.startswith(("fer2013", "tfd")):
    kw["skip_bad"] = cfg.skip_bad   # always given, so the build records it
  elif cfg.skip_bad or cfg.missing_points != "error":
    raise ValueError(f"--skip_bad/--missing_points: {cfg.dataset} is generated, "
                     "not read from files; they apply to kopaczka_thermal, "
                     "fer2013(_faces) and tfd")
  if cfg.missing_points != "error" and cfg.dataset != "kopaczka_thermal":
    raise ValueError(f"--missing_points={cfg.missing_points}: only "
                     "kopaczka_thermal has null points (FER2013/TFD faces "
                     "without landmarks are always kept for the emotion task)")
  return kw or None


def splits(cfg: Config, data: Dataset) -> Iterator[SplitData]:
  """Yields the protocol's splits in ``cfg.splits`` order."""
  for r in cfg.splits:
    yield limit_train(_split(cfg, data, r), cfg.train_limit, cfg.holdout_seed)


def _split(cfg: Config, data: Dataset, r: int) -> SplitData:
  if data.name.startswith("fer2013"):   # fer2013 (DeVries), fer2013_faces (Chu)
    return _fer2013_split(cfg, data, r)
  if data.kind == "thermal":
    return _thermal_split(cfg, data, r)
  if data.name.startswith("tfd"):
    a = data.arrays["labelled"]
    if not 0 <= r < a["folds"].shape[1]:
      raise ValueError(f"--splits: TFD has folds 0..{a['folds'].shape[1] - 1}, got {r}")
    f = input_pipeline.tfd_fold(a["folds"], r)
    if selection(cfg, data) == "last":
      return SplitData(f"fold_{r}", r, a, f["train"], a, f["test"])
    return SplitData(f"fold_{r}", r, a, f["train"], a, f["test"], select=a,
                     select_idx=f["valid"], select_name="valid")
  raise ValueError(f"--dataset={data.name!r}: no protocol for it")


def limit_train(split: SplitData, limit: int, seed: int) -> SplitData:
  """``split`` with at most ``limit`` training images (0: unchanged): per
  emotion the same share of its training images, drawn with ``seed`` (not the
  split's index, so every split and row of a table trains on the same images
  where their training sets agree); indices stay sorted."""
  n = len(split.train_idx)
  if limit <= 0 or limit >= n:
    return split
  labels = split.train["emotion"][split.train_idx]
  rng = np.random.default_rng([seed, 104729])
  keep = []
  classes = np.unique(labels)
  for c in classes:
    pos = np.flatnonzero(labels == c)
    k = int(round(limit * len(pos) / n))
    keep.append(rng.permutation(pos)[:k])
  keep = np.sort(np.concatenate(keep))
  return dataclasses.replace(split, train_idx=split.train_idx[keep])


def selection(cfg: Config, data: Dataset) -> str:
  """``cfg.selection`` with "auto" resolved for the dataset; checked."""
  fer, tfd = data.name.startswith("fer2013"), data.name.startswith("tfd")
  chu = data.kind == "thermal"   # the Chu task trains a fixed schedule
  sel = cfg.selection
  if sel == "auto":
    sel = "last" if chu else "public_test" if fer else "valid" if tfd else "last"
  allowed = (("last",) if chu else ("last", "public_test", "holdout") if fer
             else ("last", "valid") if tfd else ("last",))
  if sel not in allowed:
    raise ValueError(f"--selection={cfg.selection!r}: {data.name} allows "
                     f"{', '.join(allowed)}")
  return sel


def test_set_names(cfg: Config, data: Dataset) -> list[str]:
  """``cfg.test_sets`` with "auto" resolved; checked against the selection."""
  fer = data.name.startswith("fer2013")
  sel = selection(cfg, data)
  if cfg.test_sets == "auto":
    if not fer:
      return ["test"]
    if data.kind == "thermal":   # Chu on FER2013: PrivateTest, reported once
      return ["private_test"]
    return ["private_test"] if sel == "public_test" else ["private_test",
                                                          "public_private"]
  names = [t.strip() for t in cfg.test_sets.split(",") if t.strip()]
  allowed = (("private_test", "public_test", "public_private") if fer else
             ("test", "holdout") if data.kind == "thermal" else ("test",))
  for t in names:
    if t not in allowed:
      raise ValueError(f"--test_sets: {t!r} is not a test set of {data.name}; "
                       f"expected {', '.join(allowed)}")
    if sel == "public_test" and t in ("public_test", "public_private"):
      raise ValueError(f"--test_sets={cfg.test_sets}: {t} overlaps the "
                       f"selection set public_test")
  return names


def stratified_holdout(labels: np.ndarray, fraction: float, seed: int
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Per-class random ``fraction`` held out: ``(train_idx, holdout_idx)``, sorted."""
  rng = np.random.default_rng(seed)
  hold = []
  for c in np.unique(labels):
    idx = np.flatnonzero(labels == c)
    n = int(round(fraction * len(idx)))
    hold.append(rng.permutation(idx)[:n])
  hold = np.sort(np.concatenate(hold)) if hold else np.zeros((0,), np.int64)
  train = np.setdiff1d(np.arange(len(labels)), hold)
  return train, hold


def subject_split(subjects: np.ndarray, frontal: np.ndarray, emotions: np.ndarray,
                  repeat: int, seed: int, test_fraction: float = 1 / 8
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Subject-disjoint variant of the Chu protocol: ``ceil(S * test_fraction)``
  of the S subjects (seeded per repeat) give all their frontal labelled frames
  to the test set, the others train. ``(train_idx, test_idx)``, sorted."""
  ok = np.asarray(frontal, bool) & (np.asarray(emotions) >= 0)
  subs = np.unique(np.asarray(subjects)[ok])
  n_test = max(1, math.ceil(len(subs) * test_fraction - 1e-9))
  test_subs = np.random.default_rng([seed, repeat, 7919]).permutation(subs)[:n_test]
  is_test = np.isin(subjects, test_subs)
  return np.flatnonzero(ok & ~is_test), np.flatnonzero(ok & is_test)


def _thermal_split(cfg: Config, data: Dataset, r: int) -> SplitData:
  """The Chu protocol split r; ``--test_sets=holdout`` reports instead on a
  validation slice of its training images (per emotion 1/8, or 1/8 of the
  training subjects for ``--thermal_split=subject``), trained without them:
  for choosing settings (emotion weight, epsilon) without the test split."""
  a = data.arrays["train"]
  if cfg.thermal_split == "subject":
    if "subject" not in a:
      raise ValueError(f"--thermal_split=subject: {data.name} has no subject field")
    train_idx, test_idx = subject_split(a["subject"], a["frontal"], a["emotion"],
                                        repeat=r, seed=cfg.seed)
  else:
    train_idx, test_idx = input_pipeline.chu_protocol_split(
        a["emotion"], a["frontal"], repeat=r, seed=cfg.seed, keys=a.get("file_name"))
  names = test_set_names(cfg, data)
  if len(names) != 1:
    raise ValueError(f"--test_sets={cfg.test_sets}: thermal runs report one set, "
                     f"test or holdout")
  if names == ["holdout"]:
    if cfg.thermal_split == "subject":
      sub = a["subject"][train_idx]
      tr, ho = subject_split(sub, np.ones(len(sub), bool), a["emotion"][train_idx],
                             repeat=r, seed=cfg.holdout_seed + 1)
    else:
      # The same per-emotion rule on the training part only.
      frontal = np.zeros(len(a["emotion"]), bool)
      frontal[train_idx] = True
      tr, ho = input_pipeline.chu_protocol_split(
          a["emotion"], frontal, repeat=r, seed=cfg.holdout_seed + 1,
          keys=a.get("file_name"))
      tr, ho = np.searchsorted(train_idx, tr), np.searchsorted(train_idx, ho)
    train_idx, test_idx = train_idx[tr], train_idx[ho]
    return SplitData(f"split_{r}", r, a, train_idx, a, test_idx, test_name="holdout")
  return SplitData(f"split_{r}", r, a, train_idx, a, test_idx)


def _concat(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  return {k: np.concatenate([a[k], b[k]]) for k in a if k in b}


def _fer2013_split(cfg: Config, data: Dataset, r: int) -> SplitData:
  tr, pub, priv = (data.arrays[s] for s in ("train", "public_test", "private_test"))
  sel = selection(cfg, data)
  sets = {"private_test": priv, "public_test": pub}
  names = test_set_names(cfg, data)
  if "public_private" in names:
    sets["public_private"] = _concat(pub, priv)
  tests = {n: (sets[n], _all(sets[n])) for n in names}
  first = names[0]
  train_idx = _all(tr)
  select, select_idx, select_name = None, None, ""
  if sel == "public_test":
    select, select_idx, select_name = pub, _all(pub), "public_test"
  elif sel == "holdout":
    train_idx, select_idx = stratified_holdout(tr["emotion"], cfg.holdout_fraction,
                                               cfg.holdout_seed)
    select, select_name = tr, "holdout"
  last_tests = {}
  if sel == "public_test" and "public_private" not in names:
    pp = _concat(pub, priv)
    last_tests["public_private"] = (pp, _all(pp))
  return SplitData(f"init_{r}", r, tr, train_idx, tests[first][0], tests[first][1],
                   select=select, select_idx=select_idx, test_name=first,
                   select_name=select_name,
                   extra_tests={n: v for n, v in tests.items() if n != first},
                   last_tests=last_tests)


def _all(arrays: dict[str, np.ndarray]) -> np.ndarray:
  return np.arange(len(arrays["emotion"]))
