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
  assert float(s.criterion) == 0.0 and float(s.epoch_sum) == 0.0
  assert int(s.epoch_count) == 0 and int(s.stopped_step) == -1
  assert s.stopped_step.dtype == jnp.int32 and s.epoch_count.dtype == jnp.int32
  # A pytree: leaves are the seven arrays (all checkpointed with the state).
  assert len(jax.tree_util.tree_leaves(s)) == 7
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


# =============================================================================
# The epoch form: E(i) = mean loss of epoch i, pushed at the epoch boundary
# =============================================================================
def _ref_epoch_run(losses, steps_per_epoch, k, epsilon):
  """NumPy reference of :func:`es.update_epoch` over a per-step loss history.

  Returns per step the reported criterion (value at the last push; NaN on a
  non-finite step) and the stopped flag, plus the pushed epoch means and the
  step count at which it stopped (-1 if never).
  """
  means, acc = [], []
  crit_last, stopped, stopped_step = 0.0, False, -1
  crits, flags = [], []
  for s, e in enumerate(losses):
    if math.isfinite(e):
      acc.append(np.float32(e))
    if (s + 1) % steps_per_epoch == 0:
      if acc:
        means.append(float(np.sum(np.asarray(acc, np.float32), dtype=np.float32)
                           / np.float32(len(acc))))
        push_crits, push_flags = _ref_run(means, k, epsilon)
        crit_last = push_crits[-1]
        if push_flags[-1] and not stopped:
          stopped, stopped_step = True, s + 1
      acc = []
    crits.append(crit_last if math.isfinite(e) else math.nan)
    flags.append(stopped)
  return crits, flags, means, stopped_step


def _scan_epoch_run(losses, steps_per_epoch, k, epsilon):
  @jax.jit
  def run(losses, epsilon):
    def body(state, x):
      i, e = x
      state, c, s = es.update_epoch(state, e, epsilon,
                                    epoch_end=(i + 1) % steps_per_epoch == 0,
                                    step=i + 1)
      return state, (c, s)
    n = losses.shape[0]
    return jax.lax.scan(body, es.init_state(k), (jnp.arange(n), losses))
  final, (crits, flags) = run(jnp.asarray(losses, jnp.float32), jnp.float32(epsilon))
  return final, np.asarray(crits), np.asarray(flags)


@pytest.mark.parametrize("steps_per_epoch,k,eps", [(3, 2, 1.9), (4, 3, 2.9), (1, 3, 2.9)])
def test_epoch_accumulation_matches_numpy_reference(steps_per_epoch, k, eps):
  rng = np.random.default_rng(steps_per_epoch + k)
  n = 60
  epoch = np.arange(n) // steps_per_epoch
  losses = (0.05 + 0.1 * np.exp(-epoch / 3) * (1 + 0.3 * rng.standard_normal(n))
            ).astype(np.float32).tolist()
  losses[7] = float("nan")            # mid-epoch: dropped from that epoch's mean
  final, crits, flags = _scan_epoch_run(losses, steps_per_epoch, k, eps)
  ref_crits, ref_flags, means, stopped_step = _ref_epoch_run(
      losses, steps_per_epoch, k, np.float32(eps))
  np.testing.assert_allclose(crits, ref_crits, rtol=2e-5)   # NaN == NaN here
  assert flags.tolist() == ref_flags
  # One push per epoch; with one step per epoch the NaN step's epoch is empty.
  assert int(final.count) == len(means) == n // steps_per_epoch - (steps_per_epoch == 1)
  window = np.sort(np.asarray(final.window))
  np.testing.assert_allclose(window, np.sort(means[-(k + 1):]), rtol=1e-6)
  assert int(final.stopped_step) == stopped_step
  assert stopped_step > 0 and stopped_step % steps_per_epoch == 0   # fires at a boundary
  # The criterion only changes at epoch boundaries.
  finite = np.isfinite(crits)
  for s in range(1, n):
    if (s + 1) % steps_per_epoch and finite[s] and finite[s - 1]:
      assert crits[s] == crits[s - 1]


def test_epoch_sum_and_count_mid_epoch():
  state = es.init_state(2)
  for i, e in enumerate([1.0, 2.0, 4.0, 8.0]):   # 3 steps per epoch
    state, crit, _ = jax.jit(es.update_epoch)(state, e, 1.0,
                                              epoch_end=(i + 1) % 3 == 0)
  assert int(state.count) == 1 and float(state.window[0]) == pytest.approx(7 / 3)
  assert float(state.epoch_sum) == 8.0 and int(state.epoch_count) == 1
  assert float(crit) == 0.0 and int(state.stopped_step) == -1
  # An epoch with only non-finite losses pushes nothing.
  state = es.init_state(2)
  for e in [jnp.nan, jnp.inf]:
    state, crit, _ = es.update_epoch(state, e, 1.0, epoch_end=False)
  state, crit, _ = es.update_epoch(state, jnp.nan, 1.0, epoch_end=True)
  assert int(state.count) == 0 and math.isnan(float(crit))
  assert int(state.epoch_count) == 0 and float(state.epoch_sum) == 0.0


def test_linear_decline_gives_exactly_k():
  """Why no epsilon < k can wait through a linear decline (see the docs)."""
  k = 5
  _, crits, flags = _run_python_loop((1.0 - 0.02 * np.arange(20)).tolist(), k, k - 0.5)
  np.testing.assert_allclose(crits[k:], k, rtol=1e-4)
  assert flags[k]          # fires at the first full window


# =============================================================================
# The shipped defaults on simulated noisy exponential decays
# =============================================================================
def _shipped_defaults():
  """(unit, k, epsilon) as experiments/chu.flags sets them."""
  import pathlib
  text = (pathlib.Path(__file__).resolve().parents[1] / "experiments" /
          "chu.flags").read_text()
  vals = dict(line.strip()[2:].split("=", 1) for line in text.splitlines()
              if line.strip().startswith("--early_stopping_"))
  return (vals["early_stopping_unit"], int(vals["early_stopping_k"]),
          float(vals["early_stopping_epsilon"]))


TAUS = (3.0, 8.0, 20.0)            # epochs
AMPLITUDES = (0.0, 0.5, 1.0, 2.0)  # a / c; 0 = flat from the start
NOISE = ((0.0, 0.01), (0.0, 0.03), (0.02, 0.02), (0.03, 0.03))   # (s_m, s_a)
SEEDS = 25
EPOCHS = 200
C = 0.05                           # the floor: a converged emotion MSE


def _simulate():
  """Epoch losses E = (a exp(-i/tau) + c)(1 + s_m n1) + s_a c n2, every case."""
  rng = np.random.default_rng(2024)
  i = np.arange(EPOCHS)
  cases, curves = [], []
  for tau in TAUS:
    for ar in AMPLITUDES:
      for sm, sa in NOISE:
        clean = ar * C * np.exp(-i / tau) + C
        noisy = (clean * (1 + sm * rng.standard_normal((SEEDS, EPOCHS)))
                 + sa * C * rng.standard_normal((SEEDS, EPOCHS)))
        cases.append((tau, ar, sm, sa, clean))
        curves.append(noisy)
  return cases, np.concatenate(curves).astype(np.float32)


def _first_fire(curves, k, epsilon):
  """First epoch index (0-based, last of the window) at which Eq. 4 fires."""
  @jax.jit
  def run(curves):
    def one(losses):
      def body(state, e):
        state, _, s = es.update(state, e, epsilon)
        return state, s
      return jax.lax.scan(body, es.init_state(k), losses)[1]
    return jax.vmap(one)(curves)
  flags = np.asarray(run(jnp.asarray(curves)))
  return np.where(flags.any(1), flags.argmax(1), -1)


@pytest.fixture(scope="module")
def simulated_fires():
  unit, k, eps = _shipped_defaults()
  assert unit == "epoch"
  cases, curves = _simulate()
  fires = _first_fire(curves, k, eps).reshape(len(cases), SEEDS)
  return k, cases, fires


def test_shipped_defaults_do_not_fire_while_the_loss_still_falls(simulated_fires):
  """(a) At the epoch where it fires, the noiseless curve falls by < 8 %
  of its value per epoch (< 6.5 % for noise <= 2 % of c)."""
  k, cases, fires = simulated_fires
  worst = {}
  for (tau, ar, sm, sa, clean), t in zip(cases, fires):
    if ar == 0:
      continue
    drop = (clean[:-1] - clean[1:]) / clean[:-1]
    t = t[t >= 0]
    rate = float(drop[t].max())
    limit = 0.065 if max(sm, sa) <= 0.02 else 0.08
    assert rate < limit, (tau, ar, sm, sa, rate)
    worst[tau] = max(worst.get(tau, 0.0), rate)
  # Non-trivial: steep curves (tau = 3) are not stopped while they fall by
  # 10-28 %/epoch, so the first full window (epoch k) must not be where
  # they stop.
  steep = [t for (tau, ar, *_), t in zip(cases, fires) if tau == 3 and ar == 2]
  assert min(np.min(t) for t in steep) > k


def test_shipped_defaults_fire_within_k_plus_3_epochs_of_flat(simulated_fires):
  """(b) Fires at most k + 3 epochs after the noiseless excess a exp(-i/tau)
  falls below the noise std hypot(s_m, s_a) c (at once for a flat curve)."""
  k, cases, fires = simulated_fires
  for (tau, ar, sm, sa, _), t in zip(cases, fires):
    sigma = math.hypot(sm, sa)
    flat = max(math.ceil(tau * math.log(ar / sigma)), 0) if ar > sigma else 0
    assert (t >= 0).all(), (tau, ar, sm, sa)
    assert t.max() <= flat + k + 3, (tau, ar, sm, sa, flat, t.max())
    assert t.min() >= k              # never before the window is full


# =============================================================================
# Through the real train step
# =============================================================================
def _tiny_setup(mesh, stage):
  from tml import models, parallel
  from tml import train_step as ts
  n = 16
  model = models.build_model("chu_unet", input_size=n, depth=2, base_width=4,
                             fc_width=16, num_emotions=8)
  params = models.init_params(model, (1, n, n, 1), seed=0)
  task = ts.TaskSpec(kind="thermal", image_size=n, num_classes=8)
  tx = ts.make_optimizer("adam", 1e-2)
  state = parallel.replicate(
      ts.init_state(params, tx, jax.random.key(1), stage.early_stopping_k), mesh)
  return ts.make_train_step(model, tx, task, stage, mesh), state


def _tiny_batch(seed, b=8, n=16):
  rs = np.random.RandomState(seed)
  return {
      "image": rs.uniform(0, 1, size=(b, n, n, 1)).astype(np.float32),
      "landmarks": rs.uniform(2, n - 3, size=(b, 68, 2)).astype(np.float32),
      "emotion": rs.randint(0, 8, size=(b,)).astype(np.int32),
      "has_landmarks": np.ones((b,), np.float32),
      "weight": np.ones((b,), np.float32),
  }


@pytest.mark.parametrize("unit", ["epoch", "step"])
def test_train_step_pushes_epoch_means_and_masks_from_next_step(unit):
  from tml import parallel
  from tml import train_step as ts
  mesh = parallel.make_mesh(jax.devices()[:2])
  spe, k = 2, 2
  stage = ts.StageSpec("stage2", {"landmark": 1.0, "emotion": 1.0}, epochs=4,
                       early_stopping_k=k, early_stopping_epsilon=1e-6,
                       early_stopping_unit=unit, steps_per_epoch=spe)
  step, state = _tiny_setup(mesh, stage)
  history = []
  for i in range(7):
    state, m = step(state, parallel.global_batch(_tiny_batch(i), mesh))
    history.append(jax.device_get(m))
  emo = [float(m["loss/emotion"]) for m in history]
  if unit == "epoch":
    ref_crits, ref_flags, means, fired = _ref_epoch_run(emo, spe, k, 1e-6)
    assert fired == 6                    # window of 3 epoch means full at step 6
  else:
    ref_crits, ref_flags = _ref_run(emo, k, 1e-6)
    fired = ref_flags.index(True) + 1    # 3rd step
    assert fired == 3
  np.testing.assert_allclose([m["early_stop/criterion"] for m in history],
                             ref_crits, rtol=1e-5)
  assert [bool(m["early_stop/stopped"]) for m in history] == ref_flags
  es_state = jax.device_get(state.early_stop)
  assert int(es_state.stopped_step) == fired
  if unit == "epoch":
    assert int(es_state.epoch_count) == 1            # step 7 opened epoch 4
    np.testing.assert_allclose(es_state.epoch_sum, emo[6], rtol=1e-6)
  # The firing step still trains on emotion; the next one no longer does.
  land = [float(m["loss/landmark"]) for m in history]
  tot = [float(m["loss/total"]) for m in history]
  np.testing.assert_allclose(tot[fired - 1], land[fired - 1] + emo[fired - 1], rtol=1e-5)
  np.testing.assert_allclose(tot[fired], land[fired], rtol=1e-6)


def test_checkpointed_mid_epoch_resume_is_exact(tmp_path):
  """The epoch accumulators travel with the TrainState through a checkpoint."""
  from tml import checkpoint, parallel
  from tml import train_step as ts
  mesh = parallel.make_mesh(jax.devices()[:1])
  stage = ts.StageSpec("stage2", {"landmark": 1.0, "emotion": 1.0}, epochs=4,
                       early_stopping_k=2, early_stopping_epsilon=1e-6,
                       steps_per_epoch=3)
  step, state = _tiny_setup(mesh, stage)
  _, template = _tiny_setup(mesh, stage)
  batches = [parallel.global_batch(_tiny_batch(i), mesh) for i in range(11)]
  for b in batches[:4]:                  # 1 1/3 epochs
    state, _ = step(state, b)
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=1)
  ckpt.save(4, state, {"stage": "stage2"}, force=True)
  ckpt.wait()
  ckpt.close()
  assert int(state.early_stop.epoch_count) == 1
  for b in batches[4:]:
    state, _ = step(state, b)
  ckpt = checkpoint.Checkpointer(tmp_path / "ckpt", max_to_keep=1)
  _, resumed, _ = ckpt.restore_latest(template)
  ckpt.close()
  for b in batches[4:]:
    resumed, _ = step(resumed, b)
  a, r = jax.device_get(state), jax.device_get(resumed)
  assert bool(a.early_stop.stopped) and int(a.early_stop.stopped_step) == 9
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(r)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# =============================================================================
# Config, results and the plot
# =============================================================================
def test_config_unit_is_validated_and_reaches_stage2():
  from tml import config as config_lib
  from tml import train
  assert config_lib.Config().early_stopping_unit == "epoch"
  with pytest.raises(config_lib.ConfigError, match="--early_stopping_unit"):
    config_lib.validate(config_lib.Config(early_stopping_unit="batch"))
  cfg = config_lib.Config(early_stopping_k=5, early_stopping_epsilon=4.5,
                          early_stopping_unit="step")
  data = type("D", (), {"num_classes": 8})()
  stage2 = train.build_stages(cfg, data)[-1]
  assert (stage2.early_stopping_k, stage2.early_stopping_epsilon,
          stage2.early_stopping_unit) == (5, 4.5, "step")


def test_loop_records_when_emotion_stopped(tmp_path, monkeypatch):
  """results.json per split: emotion_stopped_epoch / _step from the state."""
  import json
  import pathlib
  from tests.test_train import _cfg, _fake_thermal
  from tml import protocol, train
  monkeypatch.setattr(protocol, "load", lambda cfg: _fake_thermal())
  # 56 training faces / 8 = 7 steps per epoch; k = 2 epochs and a tiny
  # epsilon: fires at the end of stage-2 epoch 3 (step 21).
  cfg = _cfg(tmp_path, stage1_epochs=0, stage2_epochs=4, early_stopping_k=2,
             early_stopping_epsilon=1e-6, checkpoint_every_steps=100,
             log_every_steps=1)
  train.train_and_evaluate(cfg)
  wd = pathlib.Path(cfg.workdir)
  split = json.loads((wd / "split_0" / "results.json").read_text())
  lines = [json.loads(l) for l in (wd / "split_0/metrics.jsonl").read_text().splitlines()]
  spe = max(l["step"] for l in lines) // 4
  assert split["emotion_stopped_epoch"] == 3
  assert split["emotion_stopped_step"] == 3 * spe
  first = min(l["step"] for l in lines if l.get("stage2/early_stop/stopped") == 1.0)
  assert first == 3 * spe
  # Off -> null.
  cfg = _cfg(tmp_path, stage1_epochs=0, stage2_epochs=1, early_stopping_k=0,
             workdir=str(tmp_path / "off"), checkpoint_every_steps=100)
  train.train_and_evaluate(cfg)
  split = json.loads((pathlib.Path(cfg.workdir) / "split_0" / "results.json").read_text())
  assert split["emotion_stopped_epoch"] is None and split["emotion_stopped_step"] is None


def _red_pixels(png):
  import matplotlib.image
  img = matplotlib.image.imread(png)[..., :3]
  red = np.array([0.839, 0.153, 0.157])     # tab:red
  return int((np.abs(img - red).max(-1) < 0.08).sum())


def test_loss_curve_plot_marks_the_stop(tmp_path):
  from tml import report, writers
  for name, stop in (("stops", 37), ("never", None)):
    d = tmp_path / name
    with writers.MetricWriter(d) as w:
      for s in range(1, 101):
        w.write_scalars(s, {"stage2/loss/emotion": 1.0 / s,
                            "stage2/early_stop/stopped":
                                float(stop is not None and s >= stop)})
    report.plot_loss_curves(d / "metrics.jsonl", d / "loss.png")
  assert _red_pixels(tmp_path / "stops" / "loss.png") > 20
  assert _red_pixels(tmp_path / "never" / "loss.png") == 0
