"""tml.input_pipeline on fake in-memory sources and a tiny fake TFDS builder."""
from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from scipy import ndimage

from tml import input_pipeline as ip


class FakeSource:
  """Random access like tfds.data_source: len() and [i] -> dict of numpy."""

  def __init__(self, records):
    self.records = records

  def __len__(self):
    return len(self.records)

  def __getitem__(self, i):
    return self.records[i]


def _thermal_records(n=40, size=16, seed=0):
  rng = np.random.default_rng(seed)
  recs = []
  for i in rng.permutation(n):             # hash-shuffled record order
    pts = rng.uniform(0, size - 1, (68, 2)).astype(np.float32)
    if i == 3:
      pts[5] = np.nan                          # one missing point
    recs.append({
        "image": rng.integers(0, 65536, (size, size, 1)).astype(np.uint16),
        "landmarks": pts, "emotion": int(i % 8), "frontal": bool(i % 5),
        "file_name": f"irface_sub{i:03d}.png".encode()})
  return recs


def _arrays(n=103, size=4, seed=0):
  rng = np.random.default_rng(seed)
  pts = rng.uniform(0, 3, (n, 68, 2)).astype(np.float32)
  pts[7, 0, 0] = np.nan
  return {"image": rng.uniform(size=(n, size, size, 1)).astype(np.float32),
          "landmarks": pts, "has_landmarks": np.isfinite(pts).all(axis=(1, 2)),
          "emotion": rng.integers(0, 7, n)}


# ------------------------------------------------------------ load_examples


def test_load_examples_converts_sorts_and_flags_landmarks():
  recs = _thermal_records()
  arrays = ip.load_examples(FakeSource(recs), sort_by="file_name", chunk_size=7)
  assert arrays["image"].dtype == np.float32 and arrays["image"].shape == (40, 16, 16, 1)
  names = arrays["file_name"]
  assert names.dtype.kind == "U" and list(names) == sorted(names)
  by_name = {r["file_name"].decode(): r for r in recs}
  for k in (0, 3, 39):
    rec = by_name[names[k]]
    np.testing.assert_array_equal(arrays["image"][k],
                                  rec["image"].astype(np.float32) / np.float32(65535))
    np.testing.assert_array_equal(arrays["emotion"][k], rec["emotion"])
  assert arrays["has_landmarks"].dtype == bool
  assert not arrays["has_landmarks"][3] and arrays["has_landmarks"].sum() == 39
  # uint8 expression records with a stored flag: flag AND finite.
  rng = np.random.default_rng(1)
  exp = [{"image": rng.integers(0, 256, (6, 6, 1)).astype(np.uint8),
          "landmarks": np.zeros((68, 2), np.float32), "has_landmarks": i != 1,
          "emotion": i, "id": f"{i}"} for i in range(3)]
  a = ip.load_examples(FakeSource(exp), fields=("image", "landmarks",
                                                 "has_landmarks", "emotion"))
  np.testing.assert_allclose(a["image"][2], exp[2]["image"] / 255.0, rtol=1e-6)
  np.testing.assert_array_equal(a["has_landmarks"], [True, False, True])
  assert "id" not in a


def test_resize_area_and_bilinear_with_landmark_scaling():
  rng = np.random.default_rng(2)
  img = rng.uniform(size=(16, 16, 1)).astype(np.float32)
  # Exact 2x shrink = mean of 2x2 blocks (area).
  small = ip.resize_image(img, (8, 8))
  np.testing.assert_allclose(small[..., 0],
                             img[..., 0].reshape(8, 2, 8, 2).mean(axis=(1, 3)),
                             atol=1e-6)
  # Enlarging = bilinear at pixel-centre aligned coordinates, edge-clamped.
  big = ip.resize_image(img, (24, 24))
  c = (np.arange(24) + 0.5) * 16 / 24 - 0.5
  yy, xx = np.meshgrid(c, c, indexing="ij")
  ref = ndimage.map_coordinates(img[..., 0].astype(np.float64), [yy, xx],
                                order=1, mode="nearest")
  np.testing.assert_allclose(big[..., 0], ref, atol=1e-5)
  # Landmarks follow the content: a blob's centroid lands on the scaled point.
  pts = np.array([[10.3, 12.7], [20.0, 9.25]], np.float32)
  ys, xs = np.mgrid[0:32, 0:32]
  for p in pts:
    blob = np.exp(-((xs - p[0]) ** 2 + (ys - p[1]) ** 2) / (2 * 2.0 ** 2))
    blob = blob.astype(np.float32)[..., None]
    for size in (16, 48):
      out = ip.resize_image(blob, (size, size))[..., 0]
      oy, ox = np.mgrid[0:size, 0:size]
      cen = np.array([(out * ox).sum(), (out * oy).sum()]) / out.sum()
      want = ip.scale_landmarks(p[None], (32, 32), (size, size))[0]
      np.testing.assert_allclose(cen, want, atol=0.05)
  # load_examples applies both.
  recs = [{"image": (blob * 65535).astype(np.uint16),
           "landmarks": np.tile(pts[-1], (68, 1)), "emotion": 0}]
  a = ip.load_examples(FakeSource(recs), image_size=16)
  assert a["image"].shape == (1, 16, 16, 1)
  np.testing.assert_allclose(a["landmarks"][0, 0], (pts[-1] + 0.5) / 2 - 0.5)


def test_load_examples_cache_roundtrip(tmp_path):
  recs = _thermal_records(n=5)
  path = ip.cache_path_for(tmp_path, "fake", split="train", version="1.0.0",
                           image_size=8)
  assert path.name == "fake-1.0.0-train-8.npz"
  first = ip.load_examples(FakeSource(recs), image_size=8, cache_path=path)
  assert path.exists()

  class Broken(FakeSource):
    def __getitem__(self, i):
      raise AssertionError("cache hit must not read the source")

  second = ip.load_examples(Broken(recs), image_size=8, cache_path=path)
  assert set(first) == set(second)
  for k in first:
    np.testing.assert_array_equal(first[k], second[k])


# ----------------------------------------------------------------- splits


def test_chu_protocol_split_properties():
  rng = np.random.default_rng(3)
  n = 500
  emotions = rng.integers(0, 8, n)
  frontal = rng.uniform(size=n) < 0.7
  emotions[0], frontal[0] = 7, True      # make sure a tiny class exists ...
  emotions[emotions == 7] = 6
  emotions[0] = 7                        # ... with one frontal example
  emotions[1] = -1                       # unlabelled
  splits = []
  for r in range(5):
    train, test = ip.chu_protocol_split(emotions, frontal, repeat=r, seed=11)
    assert len(np.intersect1d(train, test)) == 0
    assert frontal[train].all() and frontal[test].all()
    assert 1 not in train and 1 not in test
    assert set(np.concatenate([train, test])) == set(
        np.flatnonzero(frontal & (emotions >= 0)))
    for e in range(8):
      count = 0
      for i in range(n):                 # independent loop count
        if frontal[i] and emotions[i] == e:
          count += 1
      n_test = math.ceil(count / 8) if count >= 2 else 0
      assert (emotions[test] == e).sum() == n_test, (e, count)
      assert (emotions[train] == e).sum() == count - n_test
      if count >= 2:
        assert (emotions[test] == e).any() and (emotions[train] == e).any()
    splits.append(tuple(test))
    again = ip.chu_protocol_split(emotions, frontal, repeat=r, seed=11)
    np.testing.assert_array_equal(again[1], test)
  assert len(set(splits)) == 5            # the 5 repeats differ
  # With keys, the split names the same examples whatever the record order.
  keys = np.array([f"f{i:04d}" for i in range(n)])
  perm = rng.permutation(n)
  _, t1 = ip.chu_protocol_split(emotions, frontal, 0, 11, keys=keys)
  _, t2 = ip.chu_protocol_split(emotions[perm], frontal[perm], 0, 11,
                                keys=keys[perm])
  assert set(keys[t1]) == set(keys[perm][t2])


def test_tfd_fold_and_fer2013_split():
  folds = np.array([[1, 2, 3, 0, 1], [2, 1, 1, 3, 0], [3, 3, 2, 1, 1],
                    [0, 1, 1, 2, 3]], np.int8)
  f = ip.tfd_fold(folds, 0)
  np.testing.assert_array_equal(f["train"], [0])
  np.testing.assert_array_equal(f["valid"], [1])
  np.testing.assert_array_equal(f["test"], [2])
  f = ip.tfd_fold(folds, 2)
  np.testing.assert_array_equal(f["train"], [1, 3])
  np.testing.assert_array_equal(f["valid"], [2])
  np.testing.assert_array_equal(f["test"], [0])
  with pytest.raises(ValueError):
    ip.tfd_fold(folds, 5)
  assert [ip.fer2013_split(r) for r in ("train", "valid", "test")] == [
      "train", "public_test", "private_test"]
  with pytest.raises(KeyError):
    ip.fer2013_split("public")


# ------------------------------------------------------------ BatchIterator


def _take(it, k):
  return [next(it) for _ in range(k)]


def _same(batches_a, batches_b):
  assert len(batches_a) == len(batches_b)
  for a, b in zip(batches_a, batches_b):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])


def test_batches_deterministic_and_seeded():
  arrays = _arrays()
  kw = dict(global_batch_size=8, shuffle=True, drop_remainder=True)
  a = _take(ip.BatchIterator(arrays, **kw, seed=1), 20)
  b = _take(ip.BatchIterator(arrays, **kw, seed=1), 20)
  c = _take(ip.BatchIterator(arrays, **kw, seed=2), 20)
  _same(a, b)
  assert not all(np.array_equal(x["index"], y["index"]) for x, y in zip(a, c))
  batch = a[0]
  assert batch["image"].dtype == np.float32 and batch["image"].shape == (8, 4, 4, 1)
  assert batch["landmarks"].shape == (8, 68, 2) and batch["emotion"].dtype == np.int32
  for x in a:
    assert np.isfinite(x["landmarks"]).all()
    np.testing.assert_array_equal(x["image"], arrays["image"][x["index"]])
    np.testing.assert_array_equal(x["has_landmarks"],
                                  arrays["has_landmarks"][x["index"]])
  # Epoch 0 (12 steps of 8 from 103) visits distinct examples; epoch 1 differs.
  it = ip.BatchIterator(arrays, **kw, seed=1)
  assert it.steps_per_epoch == 12
  e0 = np.concatenate([x["index"] for x in _take(it, 12)])
  e1 = np.concatenate([x["index"] for x in _take(it, 12)])
  assert len(set(e0)) == 96 and not np.array_equal(e0, e1)


@pytest.mark.parametrize("procs", [2, 4])
def test_process_shards_are_disjoint_and_form_the_global_batch(procs):
  arrays = _arrays()
  idx = np.arange(3, 100)
  kw = dict(global_batch_size=8, seed=5, shuffle=True, drop_remainder=False,
            num_epochs=2)
  glob = list(ip.BatchIterator(arrays, idx, **kw))
  shards = [list(ip.BatchIterator(arrays, idx, **kw, process_index=p,
                                  process_count=procs)) for p in range(procs)]
  assert all(len(s) == len(glob) for s in shards)
  for j, g in enumerate(glob):
    parts = [s[j] for s in shards]
    assert all(len(p["index"]) == 8 // procs for p in parts)
    for k in g:
      np.testing.assert_array_equal(np.concatenate([p[k] for p in parts]), g[k])
    real = np.concatenate([p["index"][p["weight"] > 0] for p in parts])
    assert len(set(real)) == len(real)
  with pytest.raises(ValueError):
    ip.BatchIterator(arrays, global_batch_size=6, process_count=4)


@pytest.mark.parametrize("prefetch", [0, 2])
@pytest.mark.parametrize("n_first", [5, 12, 13])   # mid-epoch, boundary, after
def test_exact_resume(n_first, prefetch):
  arrays = _arrays()
  kw = dict(global_batch_size=8, seed=3, shuffle=True, drop_remainder=True)
  it = ip.BatchIterator(arrays, **kw, prefetch=prefetch)
  _take(it, n_first)
  state = json.loads(json.dumps(it.get_state()))
  want = _take(it, 15)
  it.close()
  fresh = ip.BatchIterator(arrays, **kw, prefetch=prefetch)
  _take(fresh, 2)                        # a used iterator can be reset too
  fresh.set_state(state)
  _same(_take(fresh, 15), want)
  fresh.close()
  assert state["epoch"] == n_first // 12 and state["step"] == n_first % 12
  with pytest.raises(ValueError):
    ip.BatchIterator(arrays, **dict(kw, seed=4)).set_state(state)
  with pytest.raises(ValueError):
    ip.BatchIterator(arrays, np.arange(50), **kw).set_state(state)


def test_prefetch_yields_the_same_stream_and_consumed_state():
  arrays = _arrays()
  kw = dict(global_batch_size=8, seed=9, shuffle=True, drop_remainder=False,
            num_epochs=3)
  plain = list(ip.BatchIterator(arrays, **kw))
  it = ip.BatchIterator(arrays, **kw, prefetch=3)
  first = _take(it, 4)
  assert it.get_state()["step"] == 4     # consumed, not prefetched
  rest = list(it)
  _same(first + rest, plain)
  assert len(plain) == 3 * 13


def test_eval_padding_covers_every_example_once():
  arrays = _arrays()
  idx = np.arange(5, 90)                 # 85 examples, batches of 16
  it = ip.BatchIterator(arrays, idx, global_batch_size=16, shuffle=False,
                        drop_remainder=False, num_epochs=1)
  assert it.steps_per_epoch == 6
  batches = list(it)
  assert len(batches) == 6 and all(len(b["weight"]) == 16 for b in batches)
  weights = np.concatenate([b["weight"] for b in batches])
  seen = np.concatenate([b["index"] for b in batches])
  assert weights.sum() == 85 and (weights[85:] == 0).all()
  np.testing.assert_array_equal(seen[weights > 0], idx)   # in order, once
  # Training drops the remainder instead.
  train = ip.BatchIterator(arrays, idx, global_batch_size=16, num_epochs=1)
  assert train.steps_per_epoch == 5
  assert all(b["weight"].min() == 1 for b in train)
  with pytest.raises(ValueError):
    ip.BatchIterator(arrays, np.arange(10), global_batch_size=16)


def test_batches_without_landmarks_or_emotion():
  arrays = {"image": np.zeros((10, 4, 4, 1), np.uint8)}
  b = next(ip.BatchIterator(arrays, global_batch_size=4))
  assert b["image"].dtype == np.float32
  assert (b["has_landmarks"] == 0).all() and (b["emotion"] == -1).all()
  assert b["landmarks"].shape == (4, 68, 2)


# -------------------------------------------------------------- registry


def test_registry_names_and_classes():
  assert set(ip.dataset_names()) == {"synthetic_thermal", "kopaczka_thermal",
                                     "fer2013", "fer2013_faces", "tfd"}
  assert ip.dataset_info("kopaczka_thermal").num_classes == 8
  assert ip.dataset_info("fer2013").tfds_name == "fer2013_tml"
  # The Chu task on FER2013 faces reads the same build as landmark crops.
  faces = ip.dataset_info("fer2013_faces")
  assert (faces.tfds_name, faces.kind, faces.num_classes) == ("fer2013_tml", "thermal", 7)
  assert ip.dataset_info("tfd").kind == "expression"
  with pytest.raises(KeyError):
    ip.dataset_info("imagenet")


def test_registry_matches_the_builders(tmp_path):
  """Names, modules and class names agree with data_prep's builders."""
  import importlib
  tfds = pytest.importorskip("tensorflow_datasets")
  for name in ip.dataset_names():
    spec = ip.dataset_info(name)
    try:
      importlib.import_module(spec.module)
    except ImportError as e:             # a builder not written yet
      pytest.skip(f"{spec.module}: {e}")
    builder = tfds.builder(spec.tfds_name, data_dir=tmp_path,
                           file_format="array_record")
    features = builder.info.features
    assert tuple(features["emotion"].names) == spec.class_names, name
    assert spec.key_field in features and "image" in features, name


_FAKE_BUILDER = None


def _fake_builder_cls():
  """Defines (once) a tiny array_record TFDS builder, registered by import."""
  global _FAKE_BUILDER
  if _FAKE_BUILDER is None:
    import tensorflow_datasets as tfds

    class TmlFakeThermal(tfds.core.GeneratorBasedBuilder):
      """Tensor features only: no TensorFlow needed to encode."""
      VERSION = tfds.core.Version("1.0.0")

      def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(16, 16, 1), dtype=np.uint16),
            "landmarks": tfds.features.Tensor(shape=(68, 2), dtype=np.float32),
            "emotion": tfds.features.ClassLabel(names=list(ip.THERMAL_EMOTIONS)),
            "frontal": tfds.features.Scalar(dtype=np.bool_),
            "file_name": tfds.features.Text()}))

      def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

      def _generate_examples(self):
        for rec in _thermal_records(n=24):
          rec = dict(rec, landmarks=np.nan_to_num(rec["landmarks"]))
          yield rec["file_name"].decode(), rec

    _FAKE_BUILDER = TmlFakeThermal
  return _FAKE_BUILDER


def test_open_source_builds_and_reads_without_tensorflow(tmp_path, monkeypatch):
  _fake_builder_cls()
  monkeypatch.setitem(ip.DATASETS, "fake", ip.DatasetSpec(
      "tml_fake_thermal", __name__, "thermal", ip.THERMAL_EMOTIONS,
      "file_name", ("train",)))
  with pytest.raises(FileNotFoundError):
    ip.open_source("fake", data_dir=tmp_path, split="train",
                   build_if_missing=False)
  source = ip.open_source("fake", data_dir=tmp_path, split="train")
  assert len(source) == 24
  arrays = ip.load_split("fake", data_dir=tmp_path, split="train",
                         image_size=8, cache_dir=tmp_path / "cache")
  assert (tmp_path / "cache" / "fake-1.0.0-train-8.npz").exists()
  assert arrays["image"].shape == (24, 8, 8, 1)
  assert list(arrays["file_name"]) == sorted(arrays["file_name"])
  assert arrays["has_landmarks"].all()
  batch = next(ip.BatchIterator(arrays, global_batch_size=8, seed=0))
  assert batch["image"].shape == (8, 8, 8, 1)
  assert "tensorflow" not in sys.modules
