"""tml.preprocess against loop references, edge cases and 1-vs-N devices."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from tml import preprocess as pp


def _images(n=6, seed=0):
  rng = np.random.default_rng(seed)
  return rng.uniform(0, 1, (n, 8, 7, 1)).astype(np.float32)


def test_per_image_normalise_matches_loop():
  x = _images()
  got = pp.per_image_normalise(x)
  assert isinstance(got, np.ndarray) and got.dtype == np.float32
  for img, out in zip(x, got):
    v = img.astype(np.float64).ravel()
    v = v - sum(v) / len(v)
    v = v * 150.0 / np.sqrt(sum(v * v))
    np.testing.assert_allclose(out.ravel(), v, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(got.reshape(6, -1), axis=1), 150,
                             rtol=1e-5)
  np.testing.assert_allclose(got.reshape(6, -1).mean(axis=1), 0, atol=1e-4)
  # jnp in, jnp out, same values.
  got_j = pp.per_image_normalise(jnp.asarray(x), norm=10.0)
  assert isinstance(got_j, jax.Array)
  np.testing.assert_allclose(np.asarray(got_j), got / 15.0, rtol=1e-5, atol=1e-6)


def test_constant_images_are_zero_not_nan():
  x = np.full((3, 48, 48, 1), 0.3, np.float32)   # float32 mean != 0.3 exactly
  x[1] = 0.0
  x[2, 0, 0, 0] = 0.3 + 1 / 255                  # nearly constant: a real image
  out = pp.per_image_normalise(x)
  assert np.isfinite(out).all()
  np.testing.assert_array_equal(out[:2], 0)
  np.testing.assert_allclose(np.linalg.norm(out[2]), 150, rtol=1e-4)
  out_j = np.asarray(jax.jit(pp.per_image_normalise)(jnp.asarray(x)))
  np.testing.assert_array_equal(out_j[:2], 0)


def test_pixel_stats_match_loop_and_floor_std():
  x = pp.per_image_normalise(_images(n=50, seed=1))
  x[:, 0, 0, 0] = 2.0                              # a pixel constant over the set
  stats = pp.fit_pixel_stats(x, chunk_size=7, min_std=1e-3)   # several chunks
  for r in range(8):
    for c in range(7):
      col = x[:, r, c, 0].astype(np.float64)
      m = sum(col) / len(col)
      s = np.sqrt(sum((col - m) ** 2) / len(col))
      np.testing.assert_allclose(stats.mean[r, c, 0], m, rtol=1e-5, atol=1e-6)
      np.testing.assert_allclose(stats.std[r, c, 0], max(s, 1e-3), rtol=1e-5)
  assert stats.std[0, 0, 0] == np.float32(1e-3)
  z = pp.apply_pixel_stats(x, stats)
  assert np.isfinite(z).all()
  np.testing.assert_allclose(z[:, 0, 0, 0], 0, atol=1e-6)
  np.testing.assert_allclose(z.mean(axis=0)[1:], 0, atol=1e-4)
  np.testing.assert_allclose(z.std(axis=0)[1:], 1, rtol=1e-4)
  zj = pp.apply_pixel_stats(jnp.asarray(x), stats)
  np.testing.assert_allclose(np.asarray(zj), z, rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError):
    pp.fit_pixel_stats(x[:0])


def test_batch_standardise_global_scalars_and_weights():
  x = _images(n=5, seed=2) * 3 + 1
  out = pp.batch_standardise(x)
  flat = x.astype(np.float64).ravel()
  m = flat.mean()
  s = np.sqrt(((flat - m) ** 2).mean())
  np.testing.assert_allclose(out, (x - m) / s, rtol=1e-4, atol=1e-5)
  # Weight-0 rows (padding) do not move the statistics.
  w = np.array([1, 1, 1, 0, 0], np.float32)
  padded = x.copy()
  padded[3:] = 100.0
  outw = pp.batch_standardise(padded, weights=w)
  ref = pp.batch_standardise(x[:3])
  np.testing.assert_allclose(outw[:3], ref, rtol=1e-4, atol=1e-5)
  const = pp.batch_standardise(np.ones((2, 4, 4, 1), np.float32))
  np.testing.assert_array_equal(const, 0)


def test_batch_standardise_same_on_one_and_four_devices():
  devices = jax.devices()
  if len(devices) < 4:
    pytest.skip("needs 4 (fake) devices; see tests/conftest.py")
  mesh = jax.sharding.Mesh(np.array(devices[:4]), ("data",))
  x = jnp.asarray(_images(n=8, seed=3) * 2 - 0.5)
  w = jnp.array([1, 1, 1, 1, 1, 1, 0, 0], jnp.float32)   # padding on device 3
  fn = jax.jit(jax.shard_map(
      lambda xs, ws: pp.batch_standardise(xs, weights=ws, axis_name="data"),
      mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data")))
  sharded = np.asarray(fn(x, w))
  single = np.asarray(jax.jit(lambda a, b: pp.batch_standardise(a, weights=b))(x, w))
  np.testing.assert_allclose(sharded, single, rtol=1e-5, atol=1e-5)
  # Without the axis name each device would use its own statistics.
  local = jax.jit(jax.shard_map(
      lambda xs, ws: pp.batch_standardise(xs, weights=ws), mesh=mesh,
      in_specs=(P("data"), P("data")), out_specs=P("data")))(x, w)
  assert not np.allclose(np.asarray(local), single, atol=1e-3)
