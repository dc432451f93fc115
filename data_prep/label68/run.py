"""Labels a stream of images with 68 points, in one or several processes.

The work is CPU-bound dlib code, so parallelism is processes (one Labeller
each, built in the worker's initialiser since dlib objects do not pickle).
Results come back in input order; statistics are kept per group (the
dataset split) so detection rates can be reported per split.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import multiprocessing
import time
from typing import Iterable, Iterator

import numpy as np

from data_prep.label68 import detector as detector_lib

_WORKER_LABELLER = None


@dataclasses.dataclass
class LabelRun:
  """Everything a run produced, ready for ``io.save_landmarks``."""
  arrays: dict
  stats: dict
  seconds: float

  @property
  def images_per_second(self) -> float:
    return len(self.arrays["ids"]) / max(self.seconds, 1e-9)


def _init_worker(settings):
  global _WORKER_LABELLER
  _WORKER_LABELLER = detector_lib.Labeller(settings)


def _label_one(item):
  example_id, group, image = item
  return example_id, group, _WORKER_LABELLER.label(image)


def _results(items, settings, workers, chunksize) -> Iterator:
  if workers <= 1:
    labeller = detector_lib.Labeller(settings)
    for example_id, group, image in items:
      yield example_id, group, labeller.label(image)
    return
  # spawn, not fork: the parent may hold threads (absl logging, TFDS) and
  # forking a threaded process is unsafe.
  ctx = multiprocessing.get_context("spawn")
  with ctx.Pool(workers, initializer=_init_worker,
                initargs=(settings,)) as pool:
    yield from pool.imap(_label_one, items, chunksize=chunksize)


def label_images(items: Iterable[tuple[str, str, np.ndarray]],
                 settings: detector_lib.LabellerSettings,
                 workers: int = 1, total: int | None = None,
                 log_every: int = 2000, chunksize: int = 64) -> LabelRun:
  """Labels ``(id, group, image)`` items.

  Args:
    items: ids (unique), a group name for the statistics (the split), and
      ``(H, W)`` uint8 images.
    settings: the labeller's settings.
    workers: processes; 1 labels in this process.
    total: number of items if known (for the ETA in progress lines).
    log_every: a progress line every this many images.
    chunksize: items per inter-process message.

  Returns:
    A LabelRun with the arrays of data_prep.label68.io and per-group counts.
  """
  ids, points, found, source, boxes, levels = [], [], [], [], [], []
  groups = collections.defaultdict(collections.Counter)
  start = time.perf_counter()
  for example_id, group, result in _results(items, settings, workers,
                                            chunksize):
    ids.append(example_id)
    points.append(result.landmarks)
    found.append(result.found)
    source.append(result.source)
    boxes.append(result.box)
    levels.append(result.level)
    counts = groups[group]
    counts["images"] += 1
    counts["found"] += result.found
    counts["detected"] += result.source == detector_lib.SOURCE_DETECTOR
    counts["fallback"] += result.source == detector_lib.SOURCE_FALLBACK
    if result.level >= 0:
      counts[f"level_{result.level}"] += 1
    n = len(ids)
    if log_every and n % log_every == 0:
      elapsed = time.perf_counter() - start
      eta = f", ETA {(total - n) * elapsed / n:.0f} s" if total else ""
      logging.info("labelled %d%s images in %.0f s (%.1f img/s%s); found "
                   "%.1f %%", n, f"/{total}" if total else "", elapsed,
                   n / elapsed, eta, 100.0 * sum(found) / n)
  seconds = time.perf_counter() - start
  arrays = dict(
      ids=np.array(ids, dtype=str),
      landmarks=np.array(points, dtype=np.float32).reshape(-1, 68, 2),
      found=np.array(found, dtype=bool),
      source=np.array(source, dtype=np.uint8),
      boxes=np.array(boxes, dtype=np.float32).reshape(-1, 4),
      level=np.array(levels, dtype=np.int8))
  if len(set(ids)) != len(ids):
    raise ValueError("duplicate ids in the labelled stream; ids must be "
                     "unique to be joined back to the dataset")
  return LabelRun(arrays=arrays, stats=_summarise(groups), seconds=seconds)


def _summarise(groups) -> dict:
  def rates(c):
    n = max(c["images"], 1)
    out = dict(sorted(c.items()))
    out["found_rate"] = c["found"] / n
    out["detection_rate"] = c["detected"] / n
    return out
  total = collections.Counter()
  for c in groups.values():
    total.update(c)
  return {"per_group": {g: rates(c) for g, c in sorted(groups.items())},
          "all": rates(total)}
