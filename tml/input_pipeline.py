"""Data sources -> protocol splits -> deterministic, resumable global batches.

The four datasets are small (FER2013: 35,887 x 48x48; thermal: ~3,000 x
128x128), so a split is read ONCE into stacked numpy arrays (`load_examples`)
and every later step is numpy indexing on the host:

    source = open_source("fer2013", data_dir=..., split="train")
    arrays = load_examples(source, sort_by="id")
    it = BatchIterator(arrays, np.arange(len(arrays["image"])),
                       global_batch_size=128, seed=0, shuffle=True,
                       drop_remainder=True, process_index=jax.process_index(),
                       process_count=jax.process_count())

Record order. ``tfds.data_source`` returns records in a hash-shuffled order
that depends on how the dataset was written, so nothing here may depend on
it: `load_examples(sort_by=...)` puts the arrays in the order of a stored key
(``file_name`` / ``id``), and the protocol splits depend only on stored
fields.

Shuffling uses numpy (``np.random.default_rng([seed, epoch]).permutation``),
not grain's index sampler: the arrays are in memory, the permutation is one
line with an obvious meaning, and grain's per-process record sharding (record
i to process i mod P) is not the "slice p of every global batch" contract
below, nor does it pad evaluation batches with weight-0 examples.
"""
from __future__ import annotations

import dataclasses
import importlib
import logging
import math
import os
import pathlib
import queue
import threading
import time
import zlib
from typing import Any, Mapping

import numpy as np
from PIL import Image

from tml import landmarks as lm
from tml import provenance

log = logging.getLogger(__name__)

# --------------------------------------------------------------- registry

THERMAL_EMOTIONS = ("angry", "contempt", "disgust", "fear", "happy", "sad",
                    "surprise", "neutral")
# FER2013 integer labels 0..6; TFD's 1..7 shifted to 0..6 are the same
# classes in the same order, under the TFD builder's own first name.
EXPRESSION_EMOTIONS = ("angry", "disgust", "fear", "happy", "sad", "surprise",
                       "neutral")
TFD_EMOTIONS = ("anger",) + EXPRESSION_EMOTIONS[1:]


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  """How to find, build and read one dataset.

  Attributes:
    tfds_name: the TFDS builder name.
    module: the python module whose import registers the builder.
    kind: "thermal" (the Chu task: N x N face crops with 68 landmarks, on
      thermal frames or, for ``fer2013_faces``, on FER2013 faces) or
      "expression" (DeVries: 48 x 48 faces, random crops, 10-crop test).
    class_names: emotion names by label; the builder's ClassLabel is the
      source of truth, this copy lets configs size heads without the data.
    key_field: a stored, unique field that gives a canonical record order
      (pass it as `load_examples`' ``sort_by``).
    splits: the TFDS splits the dataset's protocol reads.
  """
  tfds_name: str
  module: str
  kind: str
  class_names: tuple[str, ...]
  key_field: str
  splits: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.class_names)


DATASETS: dict[str, DatasetSpec] = {
    "synthetic_thermal": DatasetSpec(
        "synthetic_thermal", "data_prep.synthetic_thermal", "thermal",
        THERMAL_EMOTIONS, "file_name", ("train",)),
    "kopaczka_thermal": DatasetSpec(
        "kopaczka_thermal", "data_prep.kopaczka_thermal", "thermal",
        THERMAL_EMOTIONS, "file_name", ("train",)),
    "fer2013": DatasetSpec(
        "fer2013_tml", "data_prep.fer2013", "expression",
        EXPRESSION_EMOTIONS, "id", ("train", "public_test", "private_test")),
    # The Chu pipeline on real faces: the same FER2013 build (config dlib68,
    # the label68 landmarks joined by id), read as landmark crops resized to
    # --image_size; faces without detected landmarks train the emotion task
    # only and are left out of every landmark loss and metric.
    "fer2013_faces": DatasetSpec(
        "fer2013_tml", "data_prep.fer2013", "thermal",
        EXPRESSION_EMOTIONS, "id", ("train", "public_test", "private_test")),
    "tfd": DatasetSpec(
        "tfd_tml", "data_prep.tfd", "expression", TFD_EMOTIONS, "id",
        ("labelled",)),
}


def dataset_names() -> list[str]:
  return sorted(DATASETS)


def dataset_info(name: str) -> DatasetSpec:
  """The registry entry of ``name``; KeyError naming the known datasets."""
  if name not in DATASETS:
    raise KeyError(f"unknown dataset {name!r}; known: {dataset_names()}")
  return DATASETS[name]


class DatasetIncomplete(RuntimeError):
  """A prepared dataset lacks splits its protocol reads."""


def _make_builder(spec: DatasetSpec, data_dir: str, config, builder_kwargs):
  import tensorflow_datasets as tfds  # local: heavy, only needed here
  importlib.import_module(spec.module)
  return tfds.builder(spec.tfds_name, data_dir=data_dir, config=config,
                      file_format="array_record", **(builder_kwargs or {}))


def remove_build(name: str, *, data_dir, config: str | None = None,
                 builder_kwargs: Mapping[str, Any] | None = None) -> bool:
  """Deletes the prepared copy of ``name`` (this config and version) under
  ``data_dir``; returns whether there was one. ``--rebuild`` calls this once,
  before the run opens the dataset."""
  spec = dataset_info(name)
  data_dir = os.path.expanduser(os.fspath(data_dir))
  builder = _make_builder(spec, data_dir, config, builder_kwargs)
  build_dir = _build_dir(builder)
  if not build_dir.exists():
    return False
  log.warning("removing the build of %s at %s (rebuild)", name, build_dir)
  build_dir.rmtree()
  return True


def _build_dir(builder):
  """The versioned folder of a build, as an ``epath.Path`` (TFDS gives str)."""
  from etils import epath  # local: comes with TFDS
  return epath.Path(builder.data_dir)


def _build_dir_text(builder) -> str:
  return os.fspath(builder.data_dir)


def open_source(name: str, *, data_dir, split: str, manual_dir=None,
                config: str | None = None, build_if_missing: bool = True,
                builder_kwargs: Mapping[str, Any] | None = None,
                rebuild: bool = False):
  """A random-access source of one split of a registered dataset.

  Imports the builder's module lazily (so tml imports no builder code until
  asked), builds the array_record dataset under ``data_dir`` if it is not
  there yet, and returns ``builder.as_data_source(split)``: ``len(source)``
  and ``source[i] -> dict of numpy arrays``. TensorFlow is never imported.

  What the build was made from (the ``manual_dir``'s files with sizes and
  modification times, and any path-valued ``builder_kwargs`` such as
  ``landmarks_file``) is recorded beside it (`tml.provenance`); a later open
  whose inputs differ is refused, naming the files added, removed or
  changed. A build without a record (made by an older tml) is adopted with a
  warning. ``rebuild=True`` deletes the old build first and builds afresh.

  A build must hold every split of the dataset's protocol
  (``DatasetSpec.splits``): a fresh build that lacks one (a source with only
  Training rows) is deleted again and refused, so it is never served and a
  fixed source builds cleanly on the next run.

  Raises:
    FileNotFoundError: the dataset is not prepared and ``build_if_missing``
      is False.
    provenance.DatasetChanged: the inputs changed since the build.
    DatasetIncomplete: the build lacks splits of the protocol.
  """
  spec = dataset_info(name)
  data_dir = os.path.expanduser(os.fspath(data_dir))  # TFDS would make './~'
  if manual_dir:
    manual_dir = os.path.expanduser(os.fspath(manual_dir))
  if rebuild:
    remove_build(name, data_dir=data_dir, config=config,
                 builder_kwargs=builder_kwargs)
  builder = _make_builder(spec, data_dir, config, builder_kwargs)
  # TFDS reads <data_dir>/downloads/manual when no manual_dir is given.
  default_manual = os.path.join(data_dir, "downloads", "manual")
  if (not manual_dir and getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
      and os.path.isdir(default_manual)):
    current = provenance.fingerprint(default_manual, builder_kwargs)
  else:
    current = provenance.fingerprint(manual_dir, builder_kwargs)
  if not builder.is_prepared():
    if not build_if_missing:
      raise FileNotFoundError(
          f"dataset {name!r} ({spec.tfds_name}) is not prepared under "
          f"{data_dir}; build it or pass build_if_missing=True")
    import tensorflow_datasets as tfds  # local: heavy, only needed here
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
    missing = [s for s in spec.splits if s not in builder.info.splits]
    if missing:
      where = _build_dir_text(builder)
      _build_dir(builder).rmtree()
      raise DatasetIncomplete(
          f"dataset {name!r}: the build from "
          f"{manual_dir or (builder_kwargs or {}) or data_dir} has no records "
          f"for split(s) {', '.join(missing)} (it has "
          f"{', '.join(builder.info.splits) or 'none'}); {name} needs "
          f"{', '.join(spec.splits)}. The partial build at {where} was "
          "removed; supply the complete source and rerun")
    provenance.write_record(_build_dir(builder), current)
  else:
    _check_prepared(name, spec, builder, current, manual_dir)
  return builder.as_data_source(split=split)


def _check_prepared(name, spec, builder, current, manual_dir):
  """Refuses a prepared build that is incomplete or whose inputs changed."""
  where = _build_dir_text(builder)
  missing = [s for s in spec.splits if s not in builder.info.splits]
  if missing:
    raise DatasetIncomplete(
        f"dataset {name!r} at {where} has no split(s) {', '.join(missing)} "
        f"(it has {', '.join(builder.info.splits) or 'none'}); it was built "
        "from an incomplete source. Supply the complete source and pass "
        "--rebuild (rebuild=True) to rebuild it")
  if not provenance.has_inputs(current):
    return
  manual_dir = current["manual_dir"]
  if manual_dir and not os.path.exists(manual_dir):
    log.warning("%s: --manual_dir=%s does not exist; using the prepared "
                "build at %s without checking what it was built from", name,
                manual_dir, where)
    return
  stored = provenance.read_record(_build_dir(builder))
  if stored is None:
    log.warning("%s at %s has no record of what it was built from (built by "
                "an older tml); recording %s now. If it was built from other "
                "files, pass --rebuild", name, where,
                manual_dir or sorted(current["inputs"]))
    try:
      provenance.write_record(_build_dir(builder), current)
    except OSError as e:  # a read-only copy of a prepared dataset
      log.warning("%s: cannot write the record (%s)", where, e)
    return
  diff = provenance.differences(stored, current)
  if diff:
    raise provenance.DatasetChanged(
        f"dataset {name!r} at {where} was built from other files than the "
        "ones given now:\n  " + "\n  ".join(diff) +
        "\nPass --rebuild (rebuild=True) to delete it and build it from the "
        "current files, or point --data_dir elsewhere")
  if provenance.times_changed(stored, current):
    log.info("%s: inputs re-copied with new times, same content (SHA-256); "
             "record refreshed", name)
    try:
      provenance.write_record(_build_dir(builder), current)
    except OSError as e:  # a read-only copy of a prepared dataset
      log.warning("%s: cannot refresh the record (%s)", where, e)
  if (stored.get("manual_dir") and current.get("manual_dir")
      and stored["manual_dir"] != current["manual_dir"]):
    log.info("%s: same files under a new manual_dir %s (built from %s)",
             name, current["manual_dir"], stored["manual_dir"])


# ------------------------------------------------------------- examples


def to_unit_float(images: np.ndarray) -> np.ndarray:
  """uint8 / 255, uint16 / 65535 (thermal grey), float as float32."""
  images = np.asarray(images)
  if images.dtype == np.uint8:
    return images.astype(np.float32) / np.float32(255)
  if images.dtype == np.uint16:
    return images.astype(np.float32) / np.float32(65535)
  if np.issubdtype(images.dtype, np.floating):
    return images.astype(np.float32, copy=False)
  raise TypeError(f"image dtype {images.dtype}: expected uint8, uint16, float")


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
  """Resizes one ``(H, W, C)`` float32 image to ``(h, w, C)``.

  Pixel-centre aligned (output pixel centre x' maps to (x' + 0.5) / s - 0.5).
  Shrinking uses Pillow's BOX filter, i.e. area averaging (an exact 2x shrink
  is the mean of each 2x2 block; no aliasing of the thermal texture);
  enlarging uses Pillow's bilinear filter, which clamps at the border.
  """
  h, w = size
  in_h, in_w = image.shape[:2]
  if (h, w) == (in_h, in_w):
    return image
  shrink = h <= in_h and w <= in_w
  method = Image.Resampling.BOX if shrink else Image.Resampling.BILINEAR
  # Pillow mode "F" (float32, one channel): no quantisation of 16-bit grey.
  chans = [np.asarray(Image.fromarray(np.ascontiguousarray(image[..., c],
                                                           np.float32))
                      .resize((w, h), resample=method))
           for c in range(image.shape[-1])]
  return np.stack(chans, axis=-1).astype(np.float32)


def scale_landmarks(landmarks: np.ndarray, in_size, out_size) -> np.ndarray:
  """(x, y) pixels of an (H, W) image -> of the image resized to (h, w).

  Pixel centres: ``x' = (x + 0.5) * w / W - 0.5`` (likewise y), matching
  `resize_image`.
  """
  (in_h, in_w), (h, w) = in_size, out_size
  scale = np.array([w / in_w, h / in_h], np.float32)
  return ((landmarks + 0.5) * scale - 0.5).astype(np.float32)


def _as_array(values: list) -> np.ndarray:
  if isinstance(values[0], (bytes, np.bytes_)):
    return np.array([v.decode("utf-8") for v in values])
  return np.stack([np.asarray(v) for v in values])


def load_examples(source, *, image_size: int | None = None,
                  fields=None, sort_by: str | None = None,
                  chunk_size: int = 1024, cache_path=None) -> dict[str, np.ndarray]:
  """Reads every record of a source into stacked numpy arrays.

  Args:
    source: ``len(source)`` and ``source[i] -> dict`` (``tfds.data_source``);
      ``source.__getitems__(keys)`` is used for chunked reads when present.
    image_size: if given, images are resized to image_size x image_size
      (`resize_image`) and landmarks scaled alike (`scale_landmarks`).
    fields: record keys to keep (default: all). Text fields become numpy
      str arrays.
    sort_by: a stored key field (``file_name``, ``id``) to order the
      examples by, so that indices do not depend on the source's record
      order. None keeps the source's order.
    chunk_size: records per read.
    cache_path: an ``.npz`` file; loaded when it exists, else written after
      reading. The caller keys it (see `cache_path_for`).

  Returns:
    ``{field: (N, ...)}`` with ``image`` float32 (N, S, S, C) in [0, 1]
    (uint16 / 65535, uint8 / 255), ``landmarks`` float32 (N, 68, 2) (x, y)
    pixels of the (resized) image, NaN where missing, and ``has_landmarks``
    bool (N,): the stored flag where the record has one, AND all 68 points
    finite.
  """
  if cache_path is not None and pathlib.Path(cache_path).exists():
    with np.load(cache_path, allow_pickle=False) as data:
      return {k: data[k] for k in data.files}
  n = len(source)
  if n == 0:
    raise ValueError("load_examples: empty source")
  start_time = time.perf_counter()
  columns: dict[str, list] = {}
  for start in range(0, n, chunk_size):
    keys = list(range(start, min(start + chunk_size, n)))
    if hasattr(source, "__getitems__"):
      records = source.__getitems__(keys)
    else:
      records = [source[i] for i in keys]
    for rec in records:
      for k in (fields or rec.keys()):
        value = rec[k]
        if k == "image":
          value = to_unit_float(value)
          if image_size is not None:
            value = resize_image(value, (image_size, image_size))
        elif k == "landmarks":
          value = np.asarray(value, np.float32)
          if image_size is not None:
            value = scale_landmarks(value, rec["image"].shape[:2],
                                    (image_size, image_size))
        columns.setdefault(k, []).append(value)
  arrays = {k: _as_array(v) for k, v in columns.items()}
  if "landmarks" in arrays:
    finite = np.isfinite(arrays["landmarks"]).all(axis=(1, 2))
    stored = arrays.get("has_landmarks", np.ones(n, bool)).astype(bool)
    arrays["has_landmarks"] = stored & finite
  if sort_by is not None:
    order = np.argsort(arrays[sort_by], kind="stable")
    arrays = {k: v[order] for k, v in arrays.items()}
  seconds = time.perf_counter() - start_time
  log.info("load_examples: %d records in %.2f s (%.0f records/s)",
               n, seconds, n / max(seconds, 1e-9))
  if cache_path is not None:
    pathlib.Path(cache_path).parent.mkdir(parents=True, exist_ok=True)
    tmp = pathlib.Path(str(cache_path) + ".tmp.npz")
    np.savez(tmp, **arrays)
    tmp.replace(cache_path)  # atomic: a killed run leaves no half cache
  return arrays


def cache_path_for(cache_dir, name: str, *, split: str, version: str,
                   config: str | None = None,
                   image_size: int | None = None,
                   inputs_digest: str | None = None) -> pathlib.Path:
  """``<cache_dir>/<name>[-<config>]-<version>[-<inputs>]-<split>-<size|orig>.npz``.

  ``inputs_digest`` (`build_digest`) names what a manual_dir build was built
  from, so a rebuild from other files never reads the old cache.
  """
  parts = [name] + ([config] if config else []) + [str(version)] + (
      [inputs_digest] if inputs_digest else []) + [
      split, str(image_size) if image_size else "orig"]
  return pathlib.Path(cache_dir) / ("-".join(parts) + ".npz")


def build_digest(name: str, *, data_dir, config: str | None = None
                 ) -> str | None:
  """8 hex digits of the build's provenance record, None without inputs."""
  import hashlib
  import json
  builder = _make_builder(dataset_info(name),
                          os.path.expanduser(os.fspath(data_dir)), config, None)
  record = provenance.read_record(_build_dir(builder))
  if not record or not provenance.has_inputs(record):
    return None
  text = json.dumps({k: record.get(k) for k in ("files", "inputs")},
                    sort_keys=True)
  return hashlib.sha1(text.encode()).hexdigest()[:8]


def load_split(name: str, *, data_dir, split: str,
               image_size: int | None = None, cache_dir=None,
               manual_dir=None, config: str | None = None,
               build_if_missing: bool = True) -> dict[str, np.ndarray]:
  """`open_source` + `load_examples` in the dataset's canonical key order.

  With ``cache_dir`` the arrays are cached in an ``.npz`` keyed by dataset,
  config, builder version, split and image size (`cache_path_for`).
  """
  spec = dataset_info(name)
  source = open_source(name, data_dir=data_dir, split=split,
                       manual_dir=manual_dir, config=config,
                       build_if_missing=build_if_missing)
  cache_path = None
  if cache_dir is not None:
    version = str(source.dataset_info.version)
    cache_path = cache_path_for(
        cache_dir, name, split=split, version=version, config=config,
        image_size=image_size,
        inputs_digest=build_digest(name, data_dir=data_dir, config=config))
  return load_examples(source, image_size=image_size, sort_by=spec.key_field,
                       cache_path=cache_path)


# ---------------------------------------------------------------- splits


def chu_protocol_split(emotions, frontal, repeat: int, seed: int,
                       test_fraction: float = 1 / 8, keys=None):
  """Chu & Liu's protocol: frontal faces, 1/8 of each emotion for testing.

  For each emotion label e >= 0 among the frontal examples, ``ceil(n_e *
  test_fraction)`` of them (at least one, so every emotion is tested) go to
  the test set and the rest to training; an emotion with a single frontal
  example cannot be in both and goes to training. Each (seed, repeat,
  emotion) has its own generator ``default_rng([seed, repeat, e])``, so
  repeats 0..4 give different splits and one class's split does not depend
  on the others. Negative labels (unlabelled) are left out of both.

  Args:
    emotions: ``(N,)`` int labels.
    frontal: ``(N,)`` bool.
    repeat: the repetition r (0..4 in the paper).
    seed: base seed (non-negative).
    test_fraction: the test share per emotion.
    keys: optional ``(N,)`` stored unique keys (file names); examples are
      permuted in key order, so the split names the same files whatever the
      record order of the arrays.

  Returns:
    ``(train_idx, test_idx)`` sorted int64 index arrays, disjoint.
  """
  emotions = np.asarray(emotions)
  frontal = np.asarray(frontal, bool)
  if seed < 0 or repeat < 0:
    raise ValueError(f"seed and repeat must be >= 0, got {seed}, {repeat}")
  order = (np.arange(len(emotions)) if keys is None
           else np.argsort(np.asarray(keys), kind="stable"))
  train, test = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
  for e in np.unique(emotions[frontal & (emotions >= 0)]):
    members = order[(emotions[order] == e) & frontal[order]]
    members = np.random.default_rng([seed, repeat, int(e)]).permutation(members)
    n_test = 0 if len(members) < 2 else max(
        1, math.ceil(len(members) * test_fraction - 1e-9))
    test.append(members[:n_test])
    train.append(members[n_test:])
  return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


FER2013_SPLITS = {"train": "train", "valid": "public_test",
                  "test": "private_test"}


def fer2013_split(role: str) -> str:
  """Protocol role -> TFDS split: train / valid (PublicTest) / test (PrivateTest).

  DeVries train on Training, select on PublicTest and report PrivateTest;
  each is its own TFDS split, so every index of a loaded split is used.
  """
  if role not in FER2013_SPLITS:
    raise KeyError(f"FER2013 role {role!r}: expected {sorted(FER2013_SPLITS)}")
  return FER2013_SPLITS[role]


def tfd_fold(folds, k: int) -> dict[str, np.ndarray]:
  """TFD fold k (0..4): ``folds[:, k]`` 1 = train, 2 = valid, 3 = test, 0 unused.

  Args:
    folds: ``(N, 5)`` int (the ``folds`` field of the labelled split).
    k: fold index, 0-based.

  Returns:
    ``dict(train=, valid=, test=)`` sorted index arrays into the N examples.
  """
  folds = np.asarray(folds)
  if not 0 <= k < folds.shape[1]:
    raise ValueError(f"fold {k} out of range 0..{folds.shape[1] - 1}")
  col = folds[:, k]
  return {role: np.flatnonzero(col == code)
          for role, code in (("train", 1), ("valid", 2), ("test", 3))}


# --------------------------------------------------------------- batches


class BatchIterator:
  """Deterministic, resumable per-process slices of global batches.

  Epoch e visits ``indices`` in the order ``default_rng([seed, e])
  .permutation(n)`` (or as given if not shuffling). Global batch j of an
  epoch is positions ``[j*G, (j+1)*G)`` of that order; process p yields rows
  ``[p*b, (p+1)*b)`` of it, ``b = G / process_count``, so the processes'
  slices are disjoint and together form the global batch.

  Last partial batch: with ``drop_remainder`` (training) the ``n mod G``
  leftover examples of an epoch are skipped (they differ per epoch when
  shuffling). Without it (evaluation) the last batch is padded to G by
  repeating examples from the start of the epoch order with ``weight`` 0, so
  shapes stay static and a weighted sum counts every example exactly once.

  Batches are dicts of numpy arrays: ``image`` float32 (b, H, W, C),
  ``landmarks`` float32 (b, 68, 2) with non-finite values set to 0,
  ``has_landmarks`` float32 (b,), ``emotion`` int32 (b,) (-1 if absent),
  ``weight`` float32 (b,), ``index`` int32 (b,) (row in ``arrays``), plus
  ``extra_fields``.

  `get_state` / `set_state` give a JSON-serialisable position that is the
  same on every process; with ``prefetch > 0`` a background thread fills a
  bounded queue, and the state still describes the batches CONSUMED.
  """

  def __init__(self, arrays: Mapping[str, np.ndarray], indices=None, *,
               global_batch_size: int, seed: int = 0, shuffle: bool = True,
               drop_remainder: bool = True, process_index: int = 0,
               process_count: int = 1, num_epochs: int | None = None,
               prefetch: int = 0, extra_fields=()):
    if global_batch_size <= 0 or global_batch_size % process_count:
      raise ValueError(
          f"global_batch_size {global_batch_size} must be a positive multiple "
          f"of process_count {process_count}")
    if not 0 <= process_index < process_count:
      raise ValueError(f"process_index {process_index} not in "
                       f"[0, {process_count})")
    self._arrays = arrays
    n_all = len(arrays["image"])
    self._indices = np.asarray(
        np.arange(n_all) if indices is None else indices, np.int64)
    self._n = len(self._indices)
    self._global = global_batch_size
    self._local = global_batch_size // process_count
    self._p = process_index
    self._seed, self._shuffle = int(seed), bool(shuffle)
    self._drop = bool(drop_remainder)
    self._num_epochs = num_epochs
    self._extra = tuple(extra_fields)
    if self.steps_per_epoch == 0:
      raise ValueError(f"{self._n} examples give no batch of "
                       f"{global_batch_size} (drop_remainder={self._drop})")
    self._crc = zlib.crc32(self._indices.tobytes())
    self._pos = (0, 0)            # (epoch, step) of the next batch to consume
    self._order_cache = (-1, None)
    self._prefetch = int(prefetch)
    self._thread = None
    self._queue = None
    self._stop = None

  # -- positions ------------------------------------------------------
  @property
  def steps_per_epoch(self) -> int:
    if self._drop:
      return self._n // self._global
    return -(-self._n // self._global)

  @property
  def local_batch_size(self) -> int:
    return self._local

  def _order(self, epoch: int) -> np.ndarray:
    cached_epoch, order = self._order_cache
    if cached_epoch != epoch:
      if self._shuffle:
        order = np.random.default_rng([self._seed, epoch]).permutation(self._n)
      else:
        order = np.arange(self._n)
      self._order_cache = (epoch, order)  # one tuple store: thread-safe
    return order

  def _next_pos(self, pos):
    epoch, step = pos
    step += 1
    return (epoch + 1, 0) if step == self.steps_per_epoch else (epoch, step)

  def _done(self, pos) -> bool:
    return self._num_epochs is not None and pos[0] >= self._num_epochs

  def _batch_at(self, pos) -> dict[str, np.ndarray]:
    epoch, step = pos
    start = step * self._global + self._p * self._local
    positions = np.arange(start, start + self._local)
    weight = (positions < self._n).astype(np.float32)
    rows = self._indices[self._order(epoch)[positions % self._n]]
    a = self._arrays
    batch = {"image": to_unit_float(a["image"][rows])}
    if "landmarks" in a:
      pts = a["landmarks"][rows].astype(np.float32)
      finite = np.isfinite(pts)
      batch["landmarks"] = np.where(finite, pts, np.float32(0))
      has = finite.all(axis=(1, 2))
      if "has_landmarks" in a:
        has &= a["has_landmarks"][rows].astype(bool)
    else:
      batch["landmarks"] = np.zeros((self._local, lm.NUM_LANDMARKS, 2),
                                    np.float32)
      has = np.zeros(self._local, bool)
    batch["has_landmarks"] = np.asarray(has, np.float32)
    batch["emotion"] = (a["emotion"][rows].astype(np.int32) if "emotion" in a
                        else np.full(self._local, -1, np.int32))
    batch["weight"] = weight
    batch["index"] = rows.astype(np.int32)
    for k in self._extra:
      batch[k] = a[k][rows]
    return batch

  # -- state ------------------------------------------------------------
  def get_state(self) -> dict[str, Any]:
    """The position after the last CONSUMED batch, JSON-serialisable."""
    epoch, step = self._pos
    return {"epoch": epoch, "step": step, "seed": self._seed,
            "shuffle": self._shuffle, "drop_remainder": self._drop,
            "global_batch_size": self._global, "num_examples": self._n,
            "indices_crc32": self._crc}

  def set_state(self, state: Mapping[str, Any]) -> None:
    """Continues from a `get_state` result (of any process of the run)."""
    mine = self.get_state()
    for k in ("seed", "shuffle", "drop_remainder", "global_batch_size",
              "num_examples", "indices_crc32"):
      if state[k] != mine[k]:
        raise ValueError(f"iterator state field {k!r} is {state[k]!r}, this "
                         f"iterator has {mine[k]!r}: not the same data stream")
    if not 0 <= state["step"] < self.steps_per_epoch:
      raise ValueError(f"state step {state['step']} out of range")
    self._stop_prefetch()
    self._pos = (int(state["epoch"]), int(state["step"]))

  # -- iteration --------------------------------------------------------
  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._prefetch <= 0:
      if self._done(self._pos):
        raise StopIteration
      batch = self._batch_at(self._pos)
      self._pos = self._next_pos(self._pos)
      return batch
    if self._thread is None:
      if self._done(self._pos):
        raise StopIteration
      self._start_prefetch()
    item = self._queue.get()
    if isinstance(item, BaseException):
      self._stop_prefetch()
      raise item
    if item is None:            # the producer ran past num_epochs
      self._stop_prefetch()
      raise StopIteration
    batch, after = item
    self._pos = after
    return batch

  def _start_prefetch(self):
    self._queue = queue.Queue(maxsize=self._prefetch)
    self._stop = threading.Event()
    self._thread = threading.Thread(
        target=self._produce, args=(self._pos, self._queue, self._stop),
        daemon=True, name="BatchIterator-prefetch")
    self._thread.start()

  def _produce(self, pos, out: queue.Queue, stop: threading.Event):
    def put(item):
      while not stop.is_set():
        try:
          out.put(item, timeout=0.1)
          return True
        except queue.Full:
          continue
      return False
    try:
      while not self._done(pos):
        batch = self._batch_at(pos)
        pos = self._next_pos(pos)
        if not put((batch, pos)):
          return
      put(None)
    except BaseException as e:  # surfaced to the consumer, not swallowed
      put(e)

  def _stop_prefetch(self):
    if self._thread is not None:
      self._stop.set()
      self._thread.join()
      self._thread = self._queue = self._stop = None

  def close(self) -> None:
    """Stops the prefetch thread (also done by `set_state`)."""
    self._stop_prefetch()

  def __del__(self):
    try:
      self._stop_prefetch()
    except Exception:  # pylint: disable=broad-except
      pass
