"""Tests for tml/early_stopping.py (Chu Eq. 4) against a list reference."""
from __future__ import annotations

import math
import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tml import early_stopping as es

_update = jax.jit(es.update)


def _ref_run(losses, k, epsilon):
  """Plain-Python Eq. 4 over a loss history: (criteria, stopped flags)."""
  history, crits, flags, stopped = [], [], [], False
  for e in losses:
    if not math.isfinite(e):
      crits.append(math.nan)
      flags.append(stopped)
      continue
    history.append(e)
    if len(history) < k + 1:
      crit = 0.0
    else:
      win = history[-(k + 1):]
      med = statistics.median(win)
      denom = sum(win) - k * med
      crit = k * med / denom if denom > 0 else 0.0
      stopped = stopped or (denom > 0 and crit > epsilon)
    crits.append(crit)
    flags.append(stopped)
  return crits, flags


def _run_python_loop(losses, k, epsilon):
  state = es.init_state(k)
  crits, flags = [], []
  for e in losses:
    state, c, s = _update(state, np.float32(e), np.float32(epsilon))
    crits.append(float(c))
    flags.append(bool(s))
    assert bool(state.stopped) == bool(s)
  return state, crits, flags


def test_init_state_shapes_and_validation():
  s = es.init_state(4)
  assert s.window.shape == (5,) and s.window.dtype == jnp.float32
  assert s.count.dtype == jnp.int32 and int(s.count) == 0
  assert s.stopped.dtype == jnp.bool_ and not bool(s.stopped)
  assert s.k == 4
  # A pytree: leaves are the three arrays.
  assert len(jax.tree_util.tree_leaves(s)) == 3
  with pytest.raises(ValueError, match="k"):
    es.init_state(0)


def test_window_not_full_reports_zero_and_never_stops():
  # Even a huge-criterion pattern cannot stop before k + 1 values.
  state, crits, flags = _run_python_loop([1.0, 1.0, 1.0], k=3, epsilon=-1.0)
  assert crits == [0.0, 0.0, 0.0] and flags == [False] * 3
  assert int(state.count) == 3


def test_flat_window_gives_k():
  _, crits, _ = _run_python_loop([0.7] * 6, k=4, epsilon=100.0)
  assert crits[:4] == [0.0] * 4
  np.testing.assert_allclose(crits[4:], [4.0, 4.0], rtol=1e-6)


def test_hand_cases_odd_and_even_window_with_ties():
  # k = 2, window [1, 1, 4]: med 1 (a tie), sum 6 -> 2 / (6 - 2) = 0.5.
  _, crits, _ = _run_python_loop([1.0, 4.0, 1.0], k=2, epsilon=10.0)
  assert crits[-1] == pytest.approx(0.5)
  # k = 3, window [1, 2, 2, 5]: even count, med = (2 + 2) / 2 = 2, sum 10 ->
  # 6 / (10 - 6) = 1.5.
  _, crits, _ = _run_python_loop([2.0, 5.0, 1.0, 2.0], k=3, epsilon=10.0)
  assert crits[-1] == pytest.approx(1.5)
  # k = 3, window [1, 2, 3, 10]: med = 2.5 (mean of the middle two), sum 16
  # -> 7.5 / 8.5.
  _, crits, _ = _run_python_loop([10.0, 3.0, 2.0, 1.0], k=3, epsilon=10.0)
  assert crits[-1] == pytest.approx(7.5 / 8.5, rel=1e-6)


def test_non_positive_denominator_is_not_converged():
  # k = 4, [0, 0, 5, 5, 5]: med 5, sum 15 - 20 < 0 -> 0.0, not stopped.
  _, crits, flags = _run_python_loop([0.0, 5.0, 0.0, 5.0, 5.0], k=4,
                                     epsilon=-1.0)
  assert crits[-1] == 0.0 and not flags[-1]
  # k = 2, all zeros: denominator exactly 0.
  _, crits, flags = _run_python_loop([0.0, 0.0, 0.0], k=2, epsilon=-1.0)
  assert crits[-1] == 0.0 and not flags[-1]


def test_stop_is_sticky():
  k, eps = 2, 1.9
  losses = [1.0, 1.0, 1.0,       # flat: criterion 2 > 1.9 -> stop
            9.0, 0.1, 5.0, 0.0]  # would not stop on their own
  _, crits, flags = _run_python_loop(losses, k, eps)
  assert flags[2] and all(flags[2:]) and not any(flags[:2])
  ref_crits, _ = _ref_run(losses, k, eps)
  np.testing.assert_allclose(crits, ref_crits, rtol=1e-6)
  assert min(crits[3:]) < eps   # the later values are below the threshold


def test_nan_loss_reports_nan_and_does_not_touch_state():
  state = es.init_state(2)
  for e in [1.0, 2.0]:
    state, _, _ = _update(state, e, 0.5)
  before = jax.tree_util.tree_map(np.asarray, state)
  state, crit, stopped = _update(state, jnp.nan, -1.0)   # would stop if pushed
  assert math.isnan(float(crit)) and not bool(stopped)
  np.testing.assert_array_equal(state.window, before.window)
  assert int(state.count) == 2
  state, crit, stopped = _update(state, jnp.inf, -1.0)
  assert math.isnan(float(crit)) and not bool(stopped)
  # The next finite value fills the window as if the NaN never happened.
  state, crit, _ = _update(state, 3.0, 100.0)
  assert float(crit) == pytest.approx(2 * 2.0 / (6.0 - 4.0))
  # A NaN after stopping leaves it stopped.
  state, _, stopped = _update(state, 3.0, -1.0)
  state, crit, stopped = _update(state, jnp.nan, 100.0)
  assert bool(stopped) and math.isnan(float(crit))


@pytest.mark.parametrize("k", [3, 4])
def test_long_random_history_matches_reference_through_ring_wrap(k):
  rng = np.random.default_rng(k)
  losses = (np.exp(-np.arange(40) / 10) + rng.uniform(0, 0.3, 40))
  losses = losses.astype(np.float32).tolist()
  losses[17] = float("nan")
  eps = float(np.float32(k * 0.97))
  _, crits, flags = _run_python_loop(losses, k, eps)
  ref_crits, ref_flags = _ref_run(losses, k, eps)
  np.testing.assert_allclose(crits, ref_crits, rtol=2e-5)   # NaN == NaN here
  assert flags == ref_flags


def test_lax_scan_with_traced_epsilon_matches_reference():
  k = 3
  rng = np.random.default_rng(11)
  losses = (1.0 / (1 + np.arange(30)) + rng.uniform(0, 0.05, 30)).astype(
      np.float32)

  @jax.jit
  def run(losses, epsilon):
    def body(state, e):
      state, c, s = es.update(state, e, epsilon)
      return state, (c, s)
    return jax.lax.scan(body, es.init_state(k), losses)

  first_stop = []
  for eps in [2.0, 3.5, 100.0]:
    final, (crits, flags) = run(losses, jnp.float32(eps))
    ref_crits, ref_flags = _ref_run(losses.tolist(), k, np.float32(eps))
    np.testing.assert_allclose(crits, ref_crits, rtol=2e-5)
    assert np.asarray(flags).tolist() == ref_flags
    assert int(final.count) == 30 and bool(final.stopped) == ref_flags[-1]
    first_stop.append(ref_flags.index(True) if any(ref_flags) else None)
  # Non-trivial: stops early, stops late, never stops.
  assert first_stop[0] < first_stop[1] and first_stop[2] is None
