"""Tests for tml/losses.py against float64 per-example loops."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from tml import losses


def _logsumexp64(v):
  v = np.asarray(v, np.float64).ravel()
  m = v.max()
  return m + math.log(sum(math.exp(x - m) for x in v))


def _ref_unet(logits, target):
  out = []
  for a, b in zip(np.asarray(logits, np.float64),
                  np.asarray(target, np.float64)):
    lse = _logsumexp64(a)
    total = 0.0
    for k in range(a.shape[0]):
      for j in range(a.shape[1]):
        total -= b[k, j] * (a[k, j] - lse)
    out.append(total)
  return np.array(out)


def _ref_softmax64(row):
  lse = _logsumexp64(row)
  return np.array([math.exp(x - lse) for x in np.asarray(row, np.float64)])


def _ref_bce_unit(z, t):
  # log sigmoid(z) = -log(1 + e^-z), written per sign so float64 never
  # overflows; an independent route from the module's max/log1p form.
  z, t = float(z), float(t)
  log_sig = -math.log1p(math.exp(-z)) if z >= 0 else z - math.log1p(math.exp(z))
  log_one_minus = log_sig - z
  return -(t * log_sig + (1 - t) * log_one_minus)


def _fd_check(f, x, num_dirs=3, h=1e-2, seed=0):
  """Central finite differences of scalar ``f`` along random unit directions
  against ``jax.grad`` (all through one compiled function each)."""
  f = jax.jit(f)
  g = np.asarray(jax.jit(jax.grad(f))(x), np.float64)
  assert np.isfinite(g).all()
  rng = np.random.default_rng(seed)
  x = np.asarray(x, np.float32)
  for _ in range(num_dirs):
    d = rng.normal(size=x.shape)
    d /= np.linalg.norm(d)
    fd = (float(f(x + h * d.astype(np.float32)))
          - float(f(x - h * d.astype(np.float32)))) / (2 * h)
    np.testing.assert_allclose(fd, float((g * d).sum()), rtol=2e-2, atol=2e-3)


def _ref_pixel_bce(logits, targets, valid):
  out = []
  for z, t, v in zip(logits, targets, valid):
    if v == 0:
      out.append(0.0)
      continue
    vals = [_ref_bce_unit(a, b) for a, b in zip(np.ravel(z), np.ravel(t))]
    out.append(sum(vals) / len(vals) * v)
  return np.array(out)


# -------------------------------------------------------------- unet_loss


def test_unet_loss_hand_case_uniform_logits():
  # Uniform logits: log softmax = -log(H W) everywhere -> sum(B) log(H W).
  target = np.zeros((1, 3, 5), np.float32)
  target[0, 1, 2] = 2.0
  target[0, 0, 0] = 0.5
  got = losses.unet_loss(jnp.zeros((1, 3, 5)), target)
  assert got.shape == (1,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, [2.5 * math.log(15)], rtol=1e-6)


def test_unet_loss_softmax_is_over_all_positions():
  # A peaked logit map puts nearly all mass on one pixel: loss ~ 0 there.
  logits = np.full((1, 4, 6), -30.0, np.float32)
  logits[0, 2, 3] = 30.0
  target = np.zeros((1, 4, 6), np.float32)
  target[0, 2, 3] = 1.0
  assert float(losses.unet_loss(logits, target)[0]) < 1e-6


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_unet_loss_matches_reference_non_square(scale):
  rng = np.random.default_rng(0)
  logits = (rng.normal(size=(3, 5, 7)) * scale).astype(np.float32)
  target = rng.uniform(0, 2, size=(3, 5, 7)).astype(np.float32)
  got = np.asarray(losses.unet_loss(logits, target))
  assert np.isfinite(got).all()
  np.testing.assert_allclose(got, _ref_unet(logits, target), rtol=1e-5)


def test_unet_loss_gradients():
  rng = np.random.default_rng(1)
  logits = jnp.asarray(rng.normal(size=(2, 3, 4)), jnp.float32)
  target = jnp.asarray(rng.uniform(size=(2, 3, 4)), jnp.float32)
  check_grads(jax.jit(lambda a: losses.unet_loss(a, target).sum()),
              (logits,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2,
              eps=1e-2)
  # Analytic gradient: dL/dA = sum(B) softmax(A) - B, per image.
  g = jax.jit(jax.grad(lambda a: losses.unet_loss(a, target).sum()))(logits)
  a64 = np.asarray(logits, np.float64).reshape(2, -1)
  b64 = np.asarray(target, np.float64).reshape(2, -1)
  p = np.stack([_ref_softmax64(row) for row in a64])
  want = (b64.sum(1, keepdims=True) * p - b64).reshape(logits.shape)
  np.testing.assert_allclose(g, want, atol=1e-5)


# ------------------------------------------------------------ landmark_mse


def test_landmark_mse_hand_case_and_reference():
  pred = np.zeros((1, 2, 2), np.float32)
  target = np.array([[[0.3, 0.4], [0.0, 0.1]]], np.float32)
  # ((0.09 + 0.16) + (0 + 0.01)) / K = 0.26 / 2.
  np.testing.assert_allclose(losses.landmark_mse(pred, target), [0.13],
                             rtol=1e-6)
  rng = np.random.default_rng(2)
  pred = rng.uniform(size=(4, 68, 2)).astype(np.float32)
  target = rng.uniform(size=(4, 68, 2)).astype(np.float32)
  want = [sum((float(pred[n, i, 0]) - float(target[n, i, 0])) ** 2
              + (float(pred[n, i, 1]) - float(target[n, i, 1])) ** 2
              for i in range(68)) / 68 for n in range(4)]
  np.testing.assert_allclose(losses.landmark_mse(pred, target), want, rtol=1e-5)


# --------------------------------------------------------- emotion losses


def test_emotion_mse_hand_case():
  # Zero logits, C = 4: softmax 0.25 each; ((0.75)^2 + 3 * 0.25^2) / 4.
  got = losses.emotion_mse(jnp.zeros((1, 4)), jnp.array([0]))
  np.testing.assert_allclose(got, [(0.5625 + 3 * 0.0625) / 4], rtol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_emotion_losses_match_reference(scale):
  rng = np.random.default_rng(3)
  logits = (rng.normal(size=(5, 8)) * scale).astype(np.float32)
  labels = rng.integers(0, 8, size=5)
  mse = np.asarray(losses.emotion_mse(logits, labels))
  xent = np.asarray(losses.emotion_xent(logits, labels))
  assert mse.shape == xent.shape == (5,)
  assert np.isfinite(mse).all() and np.isfinite(xent).all()
  for n in range(5):
    p = _ref_softmax64(logits[n])
    want = sum((p[c] - (1.0 if c == labels[n] else 0.0)) ** 2
               for c in range(8)) / 8
    np.testing.assert_allclose(mse[n], want, rtol=1e-5, atol=1e-7)
    want_xent = _logsumexp64(logits[n]) - float(logits[n, labels[n]])
    np.testing.assert_allclose(xent[n], want_xent, rtol=1e-5, atol=1e-6)


def test_emotion_xent_gradient_is_softmax_minus_onehot():
  rng = np.random.default_rng(4)
  logits = jnp.asarray(rng.normal(size=(3, 7)), jnp.float32)
  labels = jnp.array([0, 6, 3])
  g = jax.jit(jax.grad(lambda z: losses.emotion_xent(z, labels).sum()))(
      logits)
  want = np.stack([_ref_softmax64(row) for row in np.asarray(logits)])
  want[np.arange(3), np.asarray(labels)] -= 1.0
  np.testing.assert_allclose(g, want, atol=1e-6)
  _fd_check(lambda z: losses.emotion_mse(z, labels).sum(), logits)


# -------------------------------------------------------------- pixel_bce


def test_pixel_bce_hand_case():
  # z = 0 -> log 2 per unit whatever the target.
  got = losses.pixel_bce(jnp.zeros((2, 2, 3, 3)), jnp.ones((2, 2, 3, 3)),
                         jnp.array([1.0, 0.0]))
  np.testing.assert_allclose(got, [math.log(2), 0.0], rtol=1e-6)


@pytest.mark.parametrize("scale", [1.0, 1e4])
def test_pixel_bce_matches_reference(scale):
  rng = np.random.default_rng(5)
  logits = (rng.normal(size=(3, 4, 5, 3)) * scale).astype(np.float32)
  targets = (rng.uniform(size=(3, 4, 5, 3)) > 0.5).astype(np.float32)
  targets[1] = rng.uniform(size=(4, 5, 3))       # soft targets too
  valid = np.array([1.0, 1.0, 0.0], np.float32)
  got = np.asarray(losses.pixel_bce(logits, targets, valid))
  assert got.shape == (3,) and np.isfinite(got).all()
  np.testing.assert_allclose(got, _ref_pixel_bce(logits, targets, valid),
                             rtol=1e-5, atol=1e-6)


def test_pixel_bce_invalid_examples_are_exactly_zero_with_nan_targets():
  rng = np.random.default_rng(6)
  logits = jnp.asarray(rng.normal(size=(3, 4, 4, 3)), jnp.float32)
  targets = np.asarray(rng.uniform(size=(3, 4, 4, 3)) > 0.5, np.float32)
  targets[0] = np.nan
  targets[2] = np.nan
  valid = jnp.array([0.0, 1.0, 0.0])
  weights = jnp.ones(3)

  def total(z):
    return losses.weighted_mean(losses.pixel_bce(z, targets, valid), weights)

  per = np.asarray(losses.pixel_bce(logits, targets, valid))
  assert per[0] == 0.0 and per[2] == 0.0 and per[1] > 0
  # The mean divides by N = 3 (Eq. 2's 1/|D|), not by sum(v_n) = 1.
  np.testing.assert_allclose(total(logits), per[1] / 3, rtol=1e-6)
  g = np.asarray(jax.jit(jax.grad(total))(logits))
  assert np.isfinite(g).all()
  assert (g[0] == 0).all() and (g[2] == 0).all() and np.abs(g[1]).sum() > 0


def test_pixel_bce_all_invalid_batch_is_zero_with_finite_gradient():
  logits = jnp.ones((2, 3, 3, 3))
  targets = jnp.full((2, 3, 3, 3), jnp.nan)
  valid = jnp.zeros(2)
  f = jax.jit(lambda z: losses.weighted_mean(
      losses.pixel_bce(z, targets, valid), valid))
  assert float(f(logits)) == 0.0
  g = np.asarray(jax.jit(jax.grad(f))(logits))
  assert np.isfinite(g).all() and (g == 0).all()


def test_pixel_bce_gradients_finite_difference():
  rng = np.random.default_rng(7)
  logits = jnp.asarray(rng.normal(size=(2, 3, 3, 2)), jnp.float32)
  targets = jnp.asarray(rng.uniform(size=(2, 3, 3, 2)) > 0.5, jnp.float32)
  valid = jnp.array([1.0, 1.0])
  _fd_check(lambda z: losses.pixel_bce(z, targets, valid).sum(), logits)


# ---------------------------------------------------------- weighted_mean


def test_weighted_mean_hand_cases():
  assert float(losses.weighted_mean(jnp.array([1.0, 2.0, 4.0]),
                                    jnp.array([1.0, 1.0, 0.0]))) == 1.5
  assert float(losses.weighted_mean(jnp.array([1.0, 3.0]),
                                    jnp.array([3.0, 1.0]))) == 1.5
  got = losses.weighted_mean(jnp.array([1.0, 2.0]), jnp.zeros(2))
  assert float(got) == 0.0 and got.shape == ()
  # A NaN in a padding row does not leak into the mean.
  assert float(losses.weighted_mean(jnp.array([jnp.nan, 2.0]),
                                    jnp.array([0.0, 1.0]))) == 2.0


def test_weighted_mean_zero_weights_gradient_finite():
  grad = jax.jit(jax.grad(losses.weighted_mean))
  np.testing.assert_array_equal(grad(np.ones(3, np.float32),
                                     np.zeros(3, np.float32)), np.zeros(3))
  g = grad(np.array([1.0, np.nan, 2.0], np.float32),
           np.array([1.0, 0.0, 3.0], np.float32))
  np.testing.assert_allclose(g, [0.25, 0.0, 0.75])
