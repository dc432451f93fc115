"""Experimental protocols: which examples train, select and test in each split.

- thermal datasets (Chu & Liu): frontal faces only; per emotion a random 7/8
  trains and 1/8 tests; split r in ``--splits`` is the r-th seeded repeat. No
  selection set (the paper trains for a fixed number of epochs).
- fer2013 (DeVries): trains on Training, selects on PublicTest, reports
  PrivateTest once; split r is the r-th random initialisation.
- tfd: split r is official fold r: train / valid (selection) / test.
"""
from __future__ import annotations

import dataclasses
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
    kwargs = {"landmarks_file": cfg.landmarks_file} if cfg.landmarks_file else None
    source = input_pipeline.open_source(
        cfg.dataset, data_dir=cfg.data_dir, split=split,
        manual_dir=cfg.manual_dir or None, config=cfg.dataset_config or None,
        builder_kwargs=kwargs)
    size = cfg.image_size if info.kind == "thermal" else None
    arrays[split] = input_pipeline.load_examples(source, image_size=size,
                                                 sort_by=info.key_field)
  if first:
    parallel.barrier("dataset-built")
  return Dataset(cfg.dataset, info.kind, tuple(info.class_names), arrays)


def splits(cfg: Config, data: Dataset) -> Iterator[SplitData]:
  """Yields the protocol's splits in ``cfg.splits`` order."""
  for r in cfg.splits:
    if data.kind == "thermal":
      a = data.arrays["train"]
      train_idx, test_idx = input_pipeline.chu_protocol_split(
          a["emotion"], a["frontal"], repeat=r, seed=cfg.seed,
          keys=a.get("file_name"))
      yield SplitData(f"split_{r}", r, a, train_idx, a, test_idx)
    elif data.name.startswith("fer2013"):
      tr, pub, priv = (data.arrays[s] for s in ("train", "public_test", "private_test"))
      test, test_name = (pub, "public_test") if cfg.eval_split == "public_test" else (
          priv, "private_test")
      yield SplitData(f"init_{r}", r, tr, _all(tr), test, _all(test),
                      select=pub, select_idx=_all(pub), test_name=test_name,
                      select_name="public_test")
    elif data.name.startswith("tfd"):
      a = data.arrays["labelled"]
      if not 0 <= r < a["folds"].shape[1]:
        raise ValueError(f"--splits: TFD has folds 0..{a['folds'].shape[1] - 1}, got {r}")
      f = input_pipeline.tfd_fold(a["folds"], r)
      yield SplitData(f"fold_{r}", r, a, f["train"], a, f["test"], select=a,
                      select_idx=f["valid"], select_name="valid")
    else:
      raise ValueError(f"--dataset={data.name!r}: no protocol for it")


def _all(arrays: dict[str, np.ndarray]) -> np.ndarray:
  return np.arange(len(arrays["emotion"]))
