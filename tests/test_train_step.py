"""The shared train step: data parallelism, NaN guard, one trace per stage, Eq. 4 mask."""
from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tml import early_stopping
from tml import models
from tml import parallel
from tml import train_step as ts

N = 16


def _batch(rng, b=8, n=N, num_classes=8):
  rs = np.random.RandomState(rng)
  lms = rs.uniform(2, n - 3, size=(b, 68, 2)).astype(np.float32)
  return {
      "image": rs.uniform(0, 1, size=(b, n, n, 1)).astype(np.float32),
      "landmarks": lms,
      "emotion": rs.randint(0, num_classes, size=(b,)).astype(np.int32),
      "has_landmarks": np.ones((b,), np.float32),
      "weight": np.ones((b,), np.float32),
  }


def _setup(mesh, stage, *, emotion_loss="mse", optimizer="adam"):
  model = models.build_model("chu_unet", input_size=N, depth=2, base_width=4,
                             fc_width=16, num_emotions=8)
  params = models.init_params(model, (1, N, N, 1), seed=0)
  task = ts.TaskSpec(kind="thermal", image_size=N, num_classes=8,
                     emotion_loss=emotion_loss)
  tx = ts.make_optimizer(optimizer, 1e-2, trainable=stage.trainable)
  state = parallel.replicate(
      ts.init_state(params, tx, jax.random.key(1), stage.early_stopping_k), mesh)
  return model, task, tx, state


STAGE2 = ts.StageSpec("stage2", {"landmark": 1.0, "emotion": 1.0}, epochs=1,
                      early_stopping_k=3, early_stopping_epsilon=100.0)
STAGE1 = ts.StageSpec("stage1", {"unet": 1.0}, epochs=1, trainable=("unet",))


def _run(mesh, stage, batches, optimizer="adam"):
  model, task, tx, state = _setup(mesh, stage, optimizer=optimizer)
  step = ts.make_train_step(model, tx, task, stage, mesh)
  history = []
  for b in batches:
    state, m = step(state, parallel.global_batch(b, mesh))
    history.append(jax.device_get(m))
  return jax.device_get(state), history


@pytest.mark.parametrize("stage", [STAGE1, STAGE2], ids=["stage1", "stage2"])
def test_one_device_equals_four_devices(stage):
  assert jax.device_count() >= 4, "tests/conftest.py forces 4 CPU devices"
  # SGD: Adam turns float-rounding noise of a zero-gradient parameter (the
  # final 1x1 conv bias, to which Eq. 2's softmax is invariant) into +-lr
  # steps, which would hide the comparison behind noise.
  batches = [_batch(i) for i in range(2)]
  s1, h1 = _run(parallel.make_mesh(jax.devices()[:1]), stage, batches, "sgd")
  s4, h4 = _run(parallel.make_mesh(jax.devices()[:4]), stage, batches, "sgd")
  for a, b in zip(h1, h4):
    assert a.keys() == b.keys()
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=2e-5, atol=1e-6, err_msg=k)
  # Summation order differs between 1 and 4 devices; stage 1's unet loss is
  # in the thousands, so two lr-1e-2 steps leave ~1e-6 rounding on weights of
  # order 0.1 (a real mismatch, e.g. a doubled gradient, is ~1e-2).
  chex.assert_trees_all_close(s1.params, s4.params, rtol=2e-5, atol=1e-5)
  # The step really trained something (a test of equality must be able to fail).
  _, _, _, s0 = _setup(parallel.make_mesh(jax.devices()[:1]), stage, optimizer="sgd")
  diff = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                      s1.params, jax.device_get(s0.params))
  assert max(jax.tree.leaves(diff["unet"])) > 0


def test_stage1_freezes_head_and_trains_unet():
  mesh = parallel.make_mesh(jax.devices()[:2])
  s, _ = _run(mesh, STAGE1, [_batch(0)])
  _, _, _, s0 = _setup(mesh, STAGE1)
  s0 = jax.device_get(s0)
  chex.assert_trees_all_equal(s.params["head"], s0.params["head"])
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)), s.params["unet"],
                         s0.params["unet"])
  assert all(jax.tree.leaves(changed))


def test_loss_terms_match_direct_computation():
  """The step's reported terms equal tml.losses applied to the same outputs."""
  from tml import losses, targets
  mesh = parallel.make_mesh(jax.devices()[:4])
  stage = ts.StageSpec("mix", {"unet": 0.5, "landmark": 2.0, "emotion": 1.0}, 1)
  model, task, tx, state = _setup(mesh, stage)
  params0 = jax.device_get(state.params)
  b = _batch(5)
  step = ts.make_train_step(model, tx, task, stage, mesh)
  _, m = step(state, parallel.global_batch(b, mesh))
  out = model.apply({"params": params0}, b["image"])
  ref = {
      "unet": losses.unet_loss(out["heatmap"], targets.chu_heatmap(b["landmarks"], N, N)),
      "landmark": losses.landmark_mse(out["landmarks"], b["landmarks"] / N),
      "emotion": losses.emotion_mse(out["emotion_logits"], b["emotion"]),
  }
  for k, v in ref.items():
    np.testing.assert_allclose(m[f"loss/{k}"], np.mean(v), rtol=1e-5)
  total = 0.5 * np.mean(ref["unet"]) + 2.0 * np.mean(ref["landmark"]) + np.mean(ref["emotion"])
  np.testing.assert_allclose(m["loss/total"], total, rtol=1e-5)


def test_padding_rows_do_not_count():
  mesh = parallel.make_mesh(jax.devices()[:2])
  stage = ts.StageSpec("s", {"landmark": 1.0}, 1)
  model, task, tx, state = _setup(mesh, stage)
  params0 = jax.device_get(state.params)
  b = _batch(3)
  b["weight"][5:] = 0.0
  b["landmarks"][5:] = 1e6   # garbage that must not leak into the mean
  step = ts.make_train_step(model, tx, task, stage, mesh)
  _, m = step(state, parallel.global_batch(b, mesh))
  out = model.apply({"params": params0}, b["image"][:5])
  from tml import losses
  np.testing.assert_allclose(
      m["loss/landmark"],
      np.mean(losses.landmark_mse(out["landmarks"], b["landmarks"][:5] / N)), rtol=1e-5)


def test_faces_without_landmarks_train_emotion_only():
  """FER2013 faces the labeller missed (has_landmarks 0): the heatmap and
  landmark terms average over the other examples only (their placeholder
  points must not count), the emotion term over all of them."""
  from tml import losses, targets
  mesh = parallel.make_mesh(jax.devices()[:2])
  stage = ts.StageSpec("mix", {"unet": 1.0, "landmark": 1.0, "emotion": 1.0}, 1)
  model, task, tx, state = _setup(mesh, stage)
  params0 = jax.device_get(state.params)
  b = _batch(4)
  has = np.array([1, 0, 1, 1, 0, 0, 1, 1], np.float32)
  b["has_landmarks"] = has
  b["landmarks"][has == 0] = 0.0   # what the input pipeline stores for them
  step = ts.make_train_step(model, tx, task, stage, mesh)
  _, m = step(state, parallel.global_batch(b, mesh))
  out = model.apply({"params": params0}, b["image"])
  keep = has > 0
  unet = losses.unet_loss(out["heatmap"], targets.chu_heatmap(b["landmarks"], N, N))
  lm = losses.landmark_mse(out["landmarks"], b["landmarks"] / N)
  emo = losses.emotion_mse(out["emotion_logits"], b["emotion"])
  np.testing.assert_allclose(m["loss/unet"], np.mean(np.asarray(unet)[keep]), rtol=1e-5)
  np.testing.assert_allclose(m["loss/landmark"], np.mean(np.asarray(lm)[keep]), rtol=1e-5)
  np.testing.assert_allclose(m["loss/emotion"], np.mean(emo), rtol=1e-5)
  # A batch with no landmarks at all: zero landmark terms, no NaN.
  b2 = dict(b, has_landmarks=np.zeros(8, np.float32))
  fresh = _setup(mesh, stage)[3]   # the first state was donated
  _, m2 = step(fresh, parallel.global_batch(b2, mesh))
  assert m2["loss/landmark"] == 0.0 and m2["loss/unet"] == 0.0
  assert np.isfinite(m2["loss/total"]) and m2["nonfinite"] == 0


def test_nonfinite_step_is_not_applied_and_is_recorded():
  mesh = parallel.make_mesh(jax.devices()[:2])
  model, task, tx, state = _setup(mesh, STAGE2)
  step = ts.make_train_step(model, tx, task, STAGE2, mesh)
  state, _ = step(state, parallel.global_batch(_batch(0), mesh))
  good = jax.device_get(state.params)
  bad = _batch(1)
  bad["image"][3, 2, 2, 0] = np.nan
  state, m = step(state, parallel.global_batch(bad, mesh))
  assert m["nonfinite"] == 1.0
  chex.assert_trees_all_equal(jax.device_get(state.params), good)
  assert int(state.first_nonfinite) == 1
  names = ts.nonfinite_names(int(state.nonfinite_terms))
  assert "loss/landmark" in names and "gradient" in names
  # Later good steps train again but the first bad step stays recorded.
  state, m = step(state, parallel.global_batch(_batch(2), mesh))
  assert m["nonfinite"] == 0.0 and int(state.first_nonfinite) == 1


def test_each_stage_traces_once():
  mesh = parallel.make_mesh(jax.devices()[:2])
  for stage in (STAGE1, STAGE2):
    model, task, tx, state = _setup(mesh, stage)
    step = ts.make_train_step(model, tx, task, stage, mesh)
    for i in range(3):
      state, _ = step(state, parallel.global_batch(_batch(i), mesh))
    # A retrace (a new batch shape) trips the assertion: it can fail.
    with pytest.raises(AssertionError):
      step(state, parallel.global_batch(_batch(9, b=4), mesh))


def test_early_stopping_masks_emotion_term():
  """Once the Eq. 4 flag is set, the emotion term no longer moves the params."""
  mesh = parallel.make_mesh(jax.devices()[:1])
  stage_es = ts.StageSpec("s", {"emotion": 1.0}, 1, early_stopping_k=3,
                          early_stopping_epsilon=0.0)
  model, task, tx, state = _setup(mesh, stage_es)
  stopped = parallel.replicate(state.replace(early_stop=state.early_stop.replace(
      stopped=jnp.ones((), bool))), mesh)
  step = ts.make_train_step(model, tx, task, stage_es, mesh)
  before = jax.device_get(stopped.params)
  after, m = step(stopped, parallel.global_batch(_batch(0), mesh))
  chex.assert_trees_all_equal(jax.device_get(after.params), before)
  assert m["loss/emotion"] > 0 and m["early_stop/stopped"] == 1.0
  # Not stopped: the same step moves the parameters.
  model, task, tx, state = _setup(mesh, stage_es)
  moved, m = step(state, parallel.global_batch(_batch(0), mesh))
  changed = jax.tree.map(lambda a, b: bool(np.any(a != b)),
                         jax.device_get(moved.params), before)
  assert any(jax.tree.leaves(changed["head"]))
  assert float(m["loss/total"]) > 0


def test_early_stopping_fires_inside_step_from_global_loss():
  """Window of k+1 = 3 global emotion losses; epsilon tiny -> fires at step 3."""
  mesh = parallel.make_mesh(jax.devices()[:4])
  stage = ts.StageSpec("s", {"landmark": 1.0, "emotion": 1.0}, 1,
                       early_stopping_k=2, early_stopping_epsilon=1e-6)
  model, task, tx, state = _setup(mesh, stage)
  step = ts.make_train_step(model, tx, task, stage, mesh)
  ref = early_stopping.init_state(2)
  for i in range(4):
    state, m = step(state, parallel.global_batch(_batch(i), mesh))
    ref, crit, stopped = early_stopping.update(ref, m["loss/emotion"], 1e-6)
    np.testing.assert_allclose(m["early_stop/criterion"], crit, rtol=1e-5)
    assert bool(m["early_stop/stopped"]) == bool(stopped) == (i >= 2)


def test_tree_norm_matches_optax():
  """The step's grad/param norm (Gram-trace path for big leaves on CPU)."""
  import optax
  rng = np.random.default_rng(0)
  tree = {"big": rng.normal(size=(300, 512)).astype(np.float32),   # Gram path
          "odd": rng.normal(size=(70001,)).astype(np.float32),     # size % 8
          "small": rng.normal(size=(3, 5)).astype(np.float32)}
  want = float(optax.tree.norm(tree))
  np.testing.assert_allclose(float(jax.jit(ts._tree_norm)(tree)), want, rtol=1e-6)
  np.testing.assert_allclose(float(ts._tree_norm({})), 0.0)
  # The loop's param_norm (logged steps only), against a float64 loop.
  ref = np.sqrt(sum(float(np.sum(v.astype(np.float64) ** 2)) for v in tree.values()))
  np.testing.assert_allclose(float(ts.param_norm(tree)), ref, rtol=1e-6)
