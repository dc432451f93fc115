"""tml.augment against independent references (scipy, numpy slicing, blobs)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage

from tml import augment as aug
from tml import landmarks as lm

DEVRIES = dict(max_shift=3.0, max_rotate_deg=45.0, max_zoom=1.2, flip=True)


def _params(flip, angle_deg, zoom, shift):
  """AffineParams for a batch from python lists."""
  return aug.AffineParams(
      jnp.asarray(flip, bool), jnp.deg2rad(jnp.asarray(angle_deg, jnp.float32)),
      jnp.asarray(zoom, jnp.float32), jnp.asarray(shift, jnp.float32))


def _scipy_warp(images, matrices, out_size, mode="nearest", cval=0.0):
  """Reference: map_coordinates(order=1) at M @ (x, y, 1), per channel."""
  h, w = out_size
  ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
  out = np.zeros((len(images), h, w, images.shape[-1]))
  for b, (img, m) in enumerate(zip(images, matrices)):
    xi = m[0, 0] * xs + m[0, 1] * ys + m[0, 2]
    yi = m[1, 0] * xs + m[1, 1] * ys + m[1, 2]
    for c in range(img.shape[-1]):
      out[b, ..., c] = ndimage.map_coordinates(
          img[..., c].astype(np.float64), [yi, xi], order=1, mode=mode, cval=cval)
  return out


def _random_matrices(rng, batch, scale=1.0):
  m = np.zeros((batch, 2, 3), np.float32)
  m[:, :, :2] = np.eye(2) + rng.normal(0, 0.4 * scale, (batch, 2, 2))
  m[:, :, 2] = rng.uniform(-6, 20, (batch, 2))
  return m


@pytest.mark.parametrize("mode,ref_mode", [("edge", "nearest"),
                                           ("constant", "grid-constant")])
def test_warp_images_matches_scipy_map_coordinates(mode, ref_mode):
  rng = np.random.default_rng(0)
  images = rng.uniform(0, 1, (5, 20, 24, 2)).astype(np.float32)
  matrices = _random_matrices(rng, 5)        # partly samples outside
  got = aug.warp_images(jnp.asarray(images), jnp.asarray(matrices), (17, 19),
                        mode=mode, cval=0.25)
  want = _scipy_warp(images, matrices, (17, 19), ref_mode, cval=0.25)
  np.testing.assert_allclose(np.asarray(got), want, atol=2e-5)


def test_identity_matrix_is_identity():
  images = np.random.default_rng(1).uniform(size=(3, 9, 11, 1)).astype(np.float32)
  eye = np.tile(np.array([[1, 0, 0], [0, 1, 0]], np.float32), (3, 1, 1))
  got = aug.warp_images(jnp.asarray(images), jnp.asarray(eye), (9, 11))
  np.testing.assert_array_equal(np.asarray(got), images)
  # Zero parameters with in == out size give exactly the identity map too.
  m = aug.sampling_matrices(_params([False] * 3, [0] * 3, [1] * 3,
                                    [[0, 0]] * 3), (9, 11), (9, 11))
  np.testing.assert_allclose(np.asarray(m), eye, atol=1e-6)


def test_integer_shift_is_exact_slice_and_roll():
  rng = np.random.default_rng(2)
  images = rng.uniform(size=(16, 48, 48, 1)).astype(np.float32)
  params = aug.sample_params(jax.random.key(3), 16, max_shift=3,
                             max_rotate_deg=0.0, max_zoom=1.0, flip=False,
                             integer_shift=True)
  assert not np.asarray(params.flip).any()
  matrices = aug.sampling_matrices(params, (48, 48), (42, 42))
  out = np.asarray(aug.warp_images(jnp.asarray(images), matrices, (42, 42)))
  shifts = np.asarray(params.shift).astype(int)
  assert np.abs(shifts).max() <= 3 and len(np.unique(shifts)) > 1
  for b, (tx, ty) in enumerate(shifts):
    # Output (x, y) shows input (x + 3 - tx, y + 3 - ty): a 42-crop at
    # offset (3 - ty, 3 - tx), i.e. the random crop.
    want = images[b, 3 - ty:3 - ty + 42, 3 - tx:3 - tx + 42]
    np.testing.assert_array_equal(out[b], want)
  # A hand-made shift by (dx, dy) = (2, -1) on an in == out frame is np.roll
  # away from the clamped border.
  m = np.array([[[1, 0, -2], [0, 1, 1]]], np.float32)
  rolled = np.roll(images[:1], shift=(-1, 2), axis=(1, 2))
  got = np.asarray(aug.warp_images(jnp.asarray(images[:1]), m, (48, 48)))
  np.testing.assert_array_equal(got[:, :47, 2:], rolled[:, :47, 2:])


def test_pure_flip_mirrors_image_and_matches_flip_horizontal():
  rng = np.random.default_rng(4)
  images = rng.uniform(size=(2, 10, 13, 1)).astype(np.float32)
  pts = rng.uniform(0, 12, (2, 68, 2)).astype(np.float32)
  params = _params([True, False], [0, 0], [1, 1], [[0, 0], [0, 0]])
  m = aug.sampling_matrices(params, (10, 13), (10, 13))
  out = np.asarray(aug.warp_images(jnp.asarray(images), m, (10, 13)))
  np.testing.assert_allclose(out[0], images[0, :, ::-1], atol=1e-6)
  np.testing.assert_allclose(out[1], images[1], atol=1e-6)
  moved = np.asarray(aug.warp_landmarks(jnp.asarray(pts), m, params.flip))
  np.testing.assert_allclose(moved[0], lm.flip_horizontal(pts[0], 13), atol=1e-5)
  np.testing.assert_allclose(moved[1], pts[1], atol=1e-5)


def test_forward_matrices_match_hand_composition_and_inverse():
  params = _params([True, False], [30.0, -10.0], [1.1, 1.2], [[1.5, -2], [0, 3]])
  fwd = np.asarray(aug.forward_matrices(params, (48, 48), (42, 42)))
  samp = np.asarray(aug.sampling_matrices(params, (48, 48), (42, 42)))
  for b in range(2):
    th = math.radians([30.0, -10.0][b])
    z = [1.1, 1.2][b]
    s = -1.0 if b == 0 else 1.0
    p = np.array([[5.0, 40.0], [23.5, 23.5], [0.0, 0.0]])
    # Forward by hand: centre, mirror, rotate, zoom, shift, re-centre.
    q = p - 23.5
    q[:, 0] *= s
    rot = np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    q = z * q @ rot.T + 20.5 + np.array([[1.5, -2], [0, 3]][b])
    hom = np.c_[p, np.ones(3)]
    np.testing.assert_allclose(hom @ fwd[b, :2].T, q, atol=1e-4)
    # Sampling map takes the output point back to the input point.
    np.testing.assert_allclose(np.c_[q, np.ones(3)] @ samp[b].T, p, atol=1e-4)
  back = np.asarray(aug.invert_affine(aug.invert_affine(jnp.asarray(samp))))
  np.testing.assert_allclose(back, samp, atol=1e-5)


def _blob_images(points, size, sigma=1.4):
  ys, xs = np.mgrid[0:size[0], 0:size[1]]
  d2 = (xs[None] - points[:, 0, None, None]) ** 2 + (
      ys[None] - points[:, 1, None, None]) ** 2
  return np.exp(-d2 / (2 * sigma ** 2)).astype(np.float32)[..., None]


def _centroids(images):
  w = images[..., 0]
  ys, xs = np.mgrid[0:w.shape[1], 0:w.shape[2]]
  total = w.sum(axis=(1, 2))
  return np.stack([(w * xs).sum(axis=(1, 2)) / total,
                   (w * ys).sum(axis=(1, 2)) / total], -1)


# One configuration shared by several tests: each distinct static argument
# set costs a compilation of the random draw (seconds on a loaded CPU).
N_DRAWS, IN, OUT = 512, (64, 64), (56, 56)


def _draws():
  return aug.sample_params(jax.random.key(6), N_DRAWS, **DEVRIES)


def test_blob_centroids_follow_warped_landmarks():
  """One image per landmark holding a blob there; warp both, compare."""
  rng = np.random.default_rng(5)
  pts = (31.5 + rng.uniform(-10, 10, (68, 2))).astype(np.float32)
  blobs = _blob_images(pts, IN)                            # (68, 64, 64, 1)
  n_ex = 6
  params = jax.tree.map(lambda a: a[:n_ex], _draws())
  params = params._replace(flip=jnp.array([True, False] * 3))  # both cases
  matrices = aug.sampling_matrices(params, IN, OUT)
  moved = np.asarray(aug.warp_landmarks(
      jnp.broadcast_to(pts, (n_ex, 68, 2)), matrices, params.flip))
  warped = np.asarray(aug.warp_images(
      jnp.asarray(np.tile(blobs, (n_ex, 1, 1, 1))),
      jnp.repeat(matrices, 68, axis=0), OUT)).reshape((n_ex, 68) + OUT + (1,))
  for b in range(n_ex):
    cents = _centroids(warped[b])          # centroid of blob k = original k
    want = cents[lm.FLIP_PERM] if params.flip[b] else cents
    np.testing.assert_allclose(moved[b], want, atol=0.15)


def _symmetric_face(width=64):
  """A left-right symmetric 68-point face whose sides follow iBUG anatomy."""
  rng = np.random.default_rng(7)
  subject_right = (list(range(0, 8)) + list(range(17, 22)) + [31, 32]
                   + list(range(36, 42)) + [48, 49, 50, 58, 59, 60, 61, 67])
  pts = np.zeros((68, 2), np.float32)
  c = (width - 1) / 2
  for i in subject_right:
    j = lm.FLIP_PERM[i]
    d, y = rng.uniform(3, 20), rng.uniform(10, 54)
    pts[i] = (c - d, y)           # subject's right = image-left
    pts[j] = (c + d, y)
  for i in range(68):
    if lm.FLIP_PERM[i] == i:
      pts[i] = (c, rng.uniform(10, 54))
  return pts


def test_flip_keeps_anatomical_meaning():
  face = _symmetric_face()
  # Mirroring a symmetric face with re-indexing gives back the same array.
  np.testing.assert_allclose(lm.flip_horizontal(face, 64), face, atol=1e-5)
  params = _params([True] * 4, [-15, 0, 10, 15], [1.0, 1.1, 1.2, 1.0],
                   [[0, 0], [3, -3], [-2, 1], [1, 1]])
  m = aug.sampling_matrices(params, (64, 64), (58, 58))
  moved = np.asarray(aug.warp_landmarks(jnp.broadcast_to(face, (4, 68, 2)), m,
                                        params.flip))
  for right, left in [(36, 45), (39, 42), (48, 54), (17, 26), (0, 16)]:
    assert (moved[:, right, 0] < moved[:, left, 0]).all(), (right, left)
  # The same geometry without the mirror lands on the same points.
  unflipped = params._replace(flip=jnp.zeros(4, bool))
  m2 = aug.sampling_matrices(unflipped, (64, 64), (58, 58))
  moved2 = np.asarray(aug.warp_landmarks(jnp.broadcast_to(face, (4, 68, 2)),
                                         m2, unflipped.flip))
  np.testing.assert_allclose(moved, moved2, atol=1e-3)


def test_sampled_parameters_respect_limits():
  flip, angle, zoom, shift = (np.asarray(a) for a in _draws())
  assert np.abs(np.rad2deg(angle)).max() <= 45.0 + 1e-4
  assert np.abs(np.rad2deg(angle)).max() > 40.0
  assert zoom.min() >= 1.0 and zoom.max() <= 1.2 + 1e-6 and zoom.max() > 1.18
  assert np.abs(shift).max() <= 3.0 and np.abs(shift).max() > 2.9
  assert 0.4 < flip.mean() < 0.6
  # sample_affine draws the same parameters, and its matrices encode them:
  # A = D(f) R(-theta) / z, b = c_in - A (c_out + t).
  m, flips = aug.sample_affine(jax.random.key(6), N_DRAWS, in_size=IN,
                               out_size=OUT, **DEVRIES)
  m = np.asarray(m, np.float64)
  np.testing.assert_array_equal(np.asarray(flips), flip)
  det = m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 1, 0]
  np.testing.assert_array_equal(det < 0, flip)
  np.testing.assert_allclose(1 / np.sqrt(np.abs(det)), zoom, rtol=1e-5)
  np.testing.assert_allclose(np.arctan2(-m[:, 1, 0], m[:, 1, 1]), angle,
                             atol=1e-5)
  t = np.linalg.solve(m[:, :, :2], (31.5 - m[:, :, 2])[..., None])[..., 0]
  np.testing.assert_allclose(t - 27.5, shift, atol=1e-4)
  none = aug.sample_params(jax.random.key(9), N_DRAWS, max_shift=3,
                           max_rotate_deg=0.0, max_zoom=1.0, flip=False)
  assert not np.asarray(none.flip).any()
  np.testing.assert_array_equal(np.asarray(none.angle), 0)
  np.testing.assert_array_equal(np.asarray(none.zoom), 1)
  with pytest.raises(ValueError):
    aug.sample_params(jax.random.key(0), 2, max_shift=1, max_rotate_deg=0,
                      max_zoom=0.9, flip=False)


def test_zero_params_warp_equals_center_crop():
  images = np.random.default_rng(10).uniform(size=(3, 48, 48, 1)).astype(np.float32)
  params = _params([False] * 3, [0] * 3, [1] * 3, [[0, 0]] * 3)
  m = aug.sampling_matrices(params, (48, 48), (42, 42))
  got = np.asarray(aug.warp_images(jnp.asarray(images), m, (42, 42)))
  np.testing.assert_array_equal(got, images[:, 3:45, 3:45])
  np.testing.assert_array_equal(
      np.asarray(aug.center_crop(jnp.asarray(images), (42, 42))), got)


def test_ten_crops_match_numpy_slicing():
  rng = np.random.default_rng(11)
  images = rng.uniform(size=(2, 48, 47, 3)).astype(np.float32)
  crops = np.asarray(aug.ten_crops(jnp.asarray(images), (42, 40)))
  assert crops.shape == (2, 10, 42, 40, 3)
  mirror = images[:, :, ::-1]
  want = [images[:, :42, :40], images[:, :42, 7:], images[:, 6:, :40],
          images[:, 6:, 7:], images[:, 3:45, 3:43]]
  want += [mirror[:, :42, :40], mirror[:, :42, 7:], mirror[:, 6:, :40],
           mirror[:, 6:, 7:], mirror[:, 3:45, 3:43]]
  for k, w in enumerate(want):
    np.testing.assert_array_equal(crops[:, k], w)


def test_ten_crop_landmarks_follow_single_pixels():
  """A lone bright pixel at an integer landmark shows up where the crop says."""
  rng = np.random.default_rng(12)
  pts = rng.integers(8, 38, (1, 68, 2)).astype(np.float32)
  crop_pts = np.asarray(aug.ten_crop_landmarks(jnp.asarray(pts), (48, 48),
                                               (42, 42)))
  for i in (0, 36, 45, 30, 60):
    img = np.zeros((1, 48, 48, 1), np.float32)
    img[0, int(pts[0, i, 1]), int(pts[0, i, 0]), 0] = 1
    crops = np.asarray(aug.ten_crops(jnp.asarray(img), (42, 42)))
    for k in range(10):
      idx = lm.FLIP_PERM.tolist().index(i) if k >= 5 else i   # new index of i
      ys, xs = np.nonzero(crops[0, k, :, :, 0])
      np.testing.assert_array_equal(crop_pts[0, k, idx], [xs[0], ys[0]])


def test_jit_vmap_and_determinism_per_key():
  images = jnp.asarray(np.random.default_rng(13).uniform(
      size=(8, 48, 48, 1)).astype(np.float32))
  pts = jnp.asarray(np.random.default_rng(14).uniform(
      5, 40, (8, 68, 2)).astype(np.float32))
  fn = jax.jit(lambda k, x, p: aug.augment(k, x, p, out_size=(42, 42), **DEVRIES))
  a1, l1 = fn(jax.random.key(0), images, pts)
  a2, l2 = fn(jax.random.key(0), images, pts)
  a3, _ = fn(jax.random.key(1), images, pts)
  np.testing.assert_array_equal(np.asarray(a1), np.asarray(a2))
  np.testing.assert_array_equal(np.asarray(l1), np.asarray(l2))
  assert not np.allclose(np.asarray(a1), np.asarray(a3))
  assert a1.shape == (8, 42, 42, 1) and l1.shape == (8, 68, 2)
  # vmap over per-device keys (what a shard_map-ed step does per device):
  # the same draws as one call per key, and different keys differ.
  keys = jnp.stack([jax.random.key(6), jax.random.key(7)])
  m, f = jax.vmap(lambda k: aug.sample_affine(
      k, N_DRAWS, in_size=IN, out_size=OUT, **DEVRIES))(keys)
  assert m.shape == (2, N_DRAWS, 2, 3) and f.shape == (2, N_DRAWS)
  assert not np.allclose(np.asarray(m[0]), np.asarray(m[1]))
  np.testing.assert_allclose(
      np.asarray(m[0]), np.asarray(aug.sampling_matrices(_draws(), IN, OUT)),
      atol=1e-5)


def test_integer_images_and_bad_mode():
  images = jnp.asarray(np.random.default_rng(15).integers(
      0, 255, (2, 12, 12, 1)).astype(np.uint8))
  eye = jnp.tile(jnp.array([[1.0, 0, 0], [0, 1, 0]]), (2, 1, 1))
  out = aug.warp_images(images, eye, (12, 12))
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), np.asarray(images, np.float32))
  with pytest.raises(ValueError):
    aug.warp_images(images, eye, (10, 10), mode="wrap")
