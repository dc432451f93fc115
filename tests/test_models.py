"""Tests for tml.models: shapes, parameter trees, counts, errors, dropout.

Speed: shapes and dtypes are checked with ``jax.eval_shape`` (tracing only,
no XLA compile); tests that need numbers share a few module-scoped jitted
applies. Parameters are filled from NumPy (see ``_init``).
"""
from __future__ import annotations

import functools

import flax
import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers

from tml import models
from tml.models import BasicCNN, ChuUNet, DeVriesNet
from tml.models import layers

TINY_UNET = dict(input_size=16, depth=2, base_width=4, fc_width=16)
TINY_CNN = dict(input_size=16, fc_width=16)
TINY_DEVRIES = dict(fc_width=32)  # the conv widths are fixed; 42x42 input


def _images(b, n, seed=0, c=1):
  return jnp.asarray(
      np.random.default_rng(seed).uniform(size=(b, n, n, c)), jnp.float32)


def _shapes(model, shape):
  return jax.eval_shape(model.init, jax.random.key(0),
                        jax.ShapeDtypeStruct(shape, jnp.float32))


def _init(model, images, seed=0):
  """Variables of ``model`` for ``images``, filled from NumPy (tests.helpers)."""
  return helpers.numpy_variables(model, images.shape, seed)


def _out_shapes(model, images, **kwargs):
  variables = _shapes(model, images.shape)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, **kwargs), variables,
                       images)
  return variables, {k: (v.shape, v.dtype) for k, v in out.items()}


@pytest.fixture(scope="module")
def unet():
  model = ChuUNet(**TINY_UNET)
  x = _images(2, 16)
  apply = jax.jit(model.apply, static_argnames="train")
  return model, _init(model, x), x, apply


@pytest.fixture(scope="module")
def devries():
  model = DeVriesNet(**TINY_DEVRIES)
  x = _images(2, 42)
  apply = jax.jit(model.apply, static_argnames="train")
  return model, _init(model, x), x, apply


# ----------------------------------------------------------------------------
# Independent parameter counts, from the architecture formulas.
# ----------------------------------------------------------------------------
def _conv(k, cin, cout):
  return k * k * cin * cout + cout


def _dense(din, dout):
  return din * dout + dout


def unet_body_count(depth, base, cin=1):
  total, c = 0, cin
  for level in range(depth):
    w = base * 2**level
    total += _conv(3, c, w) + _conv(3, w, w)
    c = w
  w = base * 2**depth
  total += _conv(3, c, w) + _conv(3, w, w)
  for level in reversed(range(depth)):
    c, w = w, base * 2**level
    total += _conv(2, c, w)                    # 2x2 transposed conv
    total += _conv(3, 2 * w, w) + _conv(3, w, w)
  return total + _conv(1, w, 1)


def chu_head_count(n, fc, k=68, emotions=8, landmark_head=True, r=1):
  total = _dense((n // r)**2, fc)
  total += _dense(fc, 2 * k) if landmark_head else 0
  total += _dense(fc, emotions) if emotions else 0
  return total


# ----------------------------------------------------------------------------
# Registry.
# ----------------------------------------------------------------------------
def test_registry_names_and_classes():
  assert models.model_names() == ["basic_cnn", "chu_unet", "devries"]
  assert isinstance(models.build_model("chu_unet", **TINY_UNET), ChuUNet)
  assert models.build_model("chu_unet", **TINY_UNET).depth == 2
  assert isinstance(models.build_model("basic_cnn"), BasicCNN)
  assert isinstance(models.build_model("devries"), DeVriesNet)


def test_registry_unknown_name_lists_known_names():
  with pytest.raises(KeyError, match="basic_cnn, chu_unet, devries"):
    models.build_model("resnet50")


def test_registry_unknown_argument():
  with pytest.raises(TypeError, match="no argument"):
    models.build_model("devries", input_size=42)


# ----------------------------------------------------------------------------
# Shapes, keys, parameter trees (eval_shape: no compile).
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,keys", [
    (dict(TINY_UNET), {"heatmap", "landmarks", "emotion_logits"}),
    (dict(TINY_UNET, num_emotions=0), {"heatmap", "landmarks"}),
    (dict(TINY_UNET, landmark_head=False), {"heatmap", "emotion_logits"}),
    (dict(TINY_UNET, landmark_head=False, num_emotions=0), {"heatmap"}),
])
def test_chu_unet_outputs(kwargs, keys):
  variables, out = _out_shapes(ChuUNet(**kwargs), _images(2, 16))
  assert set(variables) == {"params"}  # no mutable collections
  want = {"heatmap": (2, 16, 16), "landmarks": (2, 68, 2),
          "emotion_logits": (2, 8)}
  assert out == {k: (want[k], jnp.float32) for k in keys}
  has_head = keys != {"heatmap"}
  assert set(variables["params"]) == ({"unet", "head"} if has_head
                                      else {"unet"})


def test_basic_cnn_outputs():
  variables, out = _out_shapes(BasicCNN(**TINY_CNN, num_emotions=3),
                               _images(2, 16))
  assert out == {"landmarks": ((2, 68, 2), jnp.float32),
                 "emotion_logits": ((2, 3), jnp.float32)}
  assert set(variables) == {"params"}
  assert set(variables["params"]) == {"features", "head"}
  assert set(variables["params"]["features"]) == {
      f"conv_{i}" for i in range(6)}
  # 16 -> 8 -> 4 -> 2 -> 1 after the four pools: 1 * 1 * 128 features.
  assert variables["params"]["head"]["fc_hidden"]["kernel"].shape == (128, 16)
  _, out = _out_shapes(BasicCNN(**TINY_CNN), _images(2, 16))
  assert set(out) == {"landmarks"}


@pytest.mark.parametrize("map_head", [True, False])
def test_devries_outputs(map_head):
  variables, out = _out_shapes(DeVriesNet(map_head=map_head, **TINY_DEVRIES),
                               _images(2, 42), train=False)
  want = {"emotion_logits": ((2, 7), jnp.float32)}
  if map_head:
    want["maps"] = ((2, 42, 42, 3), jnp.float32)
  assert out == want
  assert set(variables) == {"params"}
  assert set(variables["params"]) == {"features", "head"}
  # 42 -> 21 -> 10 -> 5: the hidden layer sees 5 * 5 * 64 inputs.
  assert variables["params"]["head"]["fc_hidden"]["kernel"].shape == (1600, 32)


def test_unet_body_structure():
  params = _shapes(ChuUNet(input_size=32, depth=3, base_width=4, fc_width=8),
                   (1, 32, 32, 1))["params"]["unet"]
  assert set(params) == (
      {f"enc_{l}_conv{i}" for l in range(3) for i in (1, 2)}
      | {"bottleneck_conv1", "bottleneck_conv2", "out_conv"}
      | {f"upconv_{l}" for l in range(3)}
      | {f"dec_{l}_conv{i}" for l in range(3) for i in (1, 2)})
  assert params["enc_0_conv1"]["kernel"].shape == (3, 3, 1, 4)
  assert params["bottleneck_conv2"]["kernel"].shape == (3, 3, 32, 32)
  assert params["upconv_2"]["kernel"].shape == (2, 2, 32, 16)
  assert params["upconv_0"]["kernel"].shape == (2, 2, 8, 4)
  assert params["dec_0_conv1"]["kernel"].shape == (3, 3, 8, 4)
  assert params["out_conv"]["kernel"].shape == (1, 1, 4, 1)


@pytest.mark.parametrize("depth,base,fc,emotions,lm_head,r,n", [
    (1, 4, 8, 8, True, 1, 16),
    (2, 4, 16, 0, True, 2, 16),
    (3, 2, 8, 5, False, 4, 32),
    (4, 64, 1024, 8, True, 1, 128),   # the default model
])
def test_unet_param_count_matches_formula(depth, base, fc, emotions, lm_head,
                                          r, n):
  model = ChuUNet(input_size=n, depth=depth, base_width=base, fc_width=fc,
                  num_emotions=emotions, landmark_head=lm_head,
                  map_reduction=r)
  p = _shapes(model, (1, n, n, 1))["params"]
  assert models.param_count(p["unet"]) == unet_body_count(depth, base)
  assert models.param_count(p["head"]) == chu_head_count(
      n, fc, emotions=emotions, landmark_head=lm_head, r=r)


def test_default_param_counts():
  def count(model, n):
    return models.param_count(_shapes(model, (1, n, n, 1)))
  # The classic U-Net body (31.03 M with one input and one output channel).
  assert count(ChuUNet(), 128) == 31_030_593 + 16_925_840 == 47_956_433
  cnn_convs = (_conv(3, 1, 32) + _conv(3, 32, 32) + _conv(3, 32, 64)
               + _conv(3, 64, 64) + _conv(3, 64, 128) + _conv(3, 128, 128))
  assert count(BasicCNN(), 128) == (cnn_convs + _dense(8 * 8 * 128, 1024)
                                    + _dense(1024, 136)) == 8_815_464
  devries = (_conv(5, 1, 32) + _conv(4, 32, 64) + _conv(5, 64, 64)
             + _dense(1600, 3072) + _dense(3072, 7) + _dense(3072, 5292))
  assert count(DeVriesNet(), 42) == devries == 21_338_227


def test_map_reduction_pools_a_before_the_head():
  params = _shapes(ChuUNet(**dict(TINY_UNET, map_reduction=4)),
                   (1, 16, 16, 1))["params"]
  assert params["head"]["fc_hidden"]["kernel"].shape == (16, 16)


# ----------------------------------------------------------------------------
# Errors.
# ----------------------------------------------------------------------------
def test_constructor_errors():
  with pytest.raises(ValueError, match="divisible by 2\\*\\*depth=8"):
    ChuUNet(input_size=36, depth=3)
  with pytest.raises(ValueError, match="map_reduction"):
    ChuUNet(input_size=16, depth=2, map_reduction=3)
  with pytest.raises(ValueError, match="divisible by 16"):
    BasicCNN(input_size=40)
  with pytest.raises(ValueError, match="dropout_rate"):
    DeVriesNet(dropout_rate=1.0)
  with pytest.raises(ValueError, match="num_classes > 0 or map_head"):
    DeVriesNet(num_classes=0, map_head=False)


@pytest.mark.parametrize("model,good,bad", [
    (ChuUNet(**TINY_UNET), (1, 16, 16, 1), (1, 32, 32, 1)),
    (BasicCNN(**TINY_CNN), (1, 16, 16, 1), (1, 32, 16, 1)),
    (DeVriesNet(**TINY_DEVRIES), (1, 42, 42, 1), (1, 48, 48, 1)),
    (DeVriesNet(**TINY_DEVRIES), (1, 42, 42, 1), (42, 42, 1)),
])
def test_wrong_image_shape_is_a_clear_error(model, good, bad):
  variables = _shapes(model, good)
  with pytest.raises(ValueError, match="NHWC|built for"):
    jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct(bad,
                                                                jnp.float32))


# ----------------------------------------------------------------------------
# Numbers: initialisers, head semantics, gradients.
# ----------------------------------------------------------------------------
def test_truncated_normal_initialisers():
  fan_in = 64

  @jax.jit
  def draw(key):
    k1, k2 = jax.random.split(key)
    return (layers.he_truncated_normal(k1, (fan_in, 4096)),
            layers.lecun_truncated_normal(k2, (fan_in, 4096)))

  for w, scale in zip(draw(jax.random.key(0)), (2.0, 1.0)):
    w = np.asarray(w)
    std = np.sqrt(scale / fan_in)
    # Variance as named despite the truncation; nothing beyond 2 sigma of
    # the underlying (wider) normal.
    np.testing.assert_allclose(w.std(), std, rtol=0.02)
    assert np.abs(w).max() <= 2 * std / 0.87962566 + 1e-6


def test_landmarks_are_sigmoid_in_unit_range_and_xy_interleaved(unet):
  model, variables, x, apply = unet
  out = apply(variables, x * 1e3)["landmarks"]  # saturate the sigmoid
  assert bool(jnp.all((out >= 0) & (out <= 1)))
  # Unit 2i is x_i, 2i+1 is y_i: with a zero kernel the output is the bias.
  variables = flax.core.unfreeze(jax.tree.map(lambda a: a, variables))
  fc = variables["params"]["head"]["fc_landmarks"]
  fc["kernel"] = jnp.zeros_like(fc["kernel"])
  fc["bias"] = jnp.arange(136, dtype=jnp.float32) / 136 - 0.5
  out = apply(variables, x)["landmarks"]
  np.testing.assert_allclose(out[1, 5], jax.nn.sigmoid(fc["bias"][10:12]),
                             rtol=1e-6)


def test_chu_unet_ignores_train_flag(unet):
  _, variables, x, apply = unet
  a, b = apply(variables, x), apply(variables, x, train=True)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])


def test_heatmap_does_not_depend_on_head_params(unet):
  model, variables, x, apply = unet
  moved = {"params": dict(variables["params"])}
  moved["params"]["head"] = jax.tree.map(lambda a: a + 1.0,
                                         variables["params"]["head"])
  a, b = apply(variables, x), apply(moved, x)
  np.testing.assert_array_equal(a["heatmap"], b["heatmap"])
  assert not np.allclose(a["landmarks"], b["landmarks"])

  # The head outputs reach every parameter of both parts.
  def loss(p):
    out = model.apply({"params": p}, x)
    return jnp.sum(out["landmarks"] ** 2) + jnp.sum(out["emotion_logits"]**2)

  grads = jax.jit(jax.grad(loss))(variables["params"])
  for part in ("unet", "head"):
    for path, g in jax.tree_util.tree_leaves_with_path(grads[part]):
      assert bool(jnp.all(jnp.isfinite(g))), path
      assert float(jnp.abs(g).max()) > 0, path


def test_devries_map_layout(devries):
  _, variables, x, apply = devries
  variables = flax.core.unfreeze(jax.tree.map(lambda a: a, variables))
  fc = variables["params"]["head"]["fc_maps"]
  fc["kernel"] = jnp.zeros_like(fc["kernel"])
  fc["bias"] = jnp.arange(42 * 42 * 3, dtype=jnp.float32)
  maps = apply(variables, x)["maps"]
  # Unit (i * 42 + j) * 3 + c is pixel (row i, col j) of map c.
  assert float(maps[1, 7, 3, 2]) == (7 * 42 + 3) * 3 + 2


def test_dropout_keep_masks_are_the_ones_the_train_forward_uses(devries):
  model, variables, x, apply = devries
  key = jax.random.key(3)
  masks = jax.jit(models.dropout_keep_masks, static_argnums=0)(
      model, variables["params"], x, key)
  assert list(masks) == ["head/Dropout_0"]
  keep = np.asarray(masks["head/Dropout_0"])
  assert keep.shape == (2, TINY_DEVRIES["fc_width"]) and keep.dtype == bool
  assert 0.2 < keep.mean() < 0.8             # rate 0.5
  # Reference: the hidden layer by hand, the mask applied as Flax does, then
  # the output layers; equal to the train-mode forward with the same key.
  p = variables["params"]
  h = jax.nn.relu(_hidden_input(model, p, x) @ p["head"]["fc_hidden"]["kernel"]
                  + p["head"]["fc_hidden"]["bias"])
  h = jnp.where(keep, h / 0.5, 0.0)
  logits = h @ p["head"]["fc_emotion"]["kernel"] + p["head"]["fc_emotion"]["bias"]
  train = apply(variables, x, train=True, rngs={"dropout": key})
  np.testing.assert_allclose(train["emotion_logits"], logits, rtol=1e-5, atol=1e-5)
  other = models.dropout_keep_masks(model, p, x, jax.random.key(4))
  assert not np.array_equal(np.asarray(other["head/Dropout_0"]), keep)


def _hidden_input(model, params, x):
  """DeVriesNet's flattened conv features (the head's input)."""
  _, state = model.apply(
      {"params": params}, x, capture_intermediates=lambda mdl, _: (
          type(mdl).__name__ == "DeVriesFeatures"), mutable=["intermediates"])
  inter = state["intermediates"]["features"]["__call__"][0]
  return inter.reshape(inter.shape[0], -1)


def test_devries_dropout_only_in_train_mode(devries):
  model, variables, x, apply = devries
  eval1 = apply(variables, x)   # no rng needed in eval mode
  eval2 = apply(variables, x, train=False,
                rngs={"dropout": jax.random.key(1)})
  np.testing.assert_array_equal(eval1["maps"], eval2["maps"])
  tr1 = apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
  tr2 = apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
  tr1b = apply(variables, x, train=True, rngs={"dropout": jax.random.key(1)})
  assert not np.allclose(tr1["maps"], tr2["maps"])
  assert not np.allclose(tr1["maps"], eval1["maps"])
  np.testing.assert_array_equal(tr1["maps"], tr1b["maps"])
  with pytest.raises(Exception, match="dropout"):
    jax.eval_shape(functools.partial(model.apply, train=True), variables, x)
  no_drop = model.clone(dropout_rate=0.0)
  out = jax.eval_shape(functools.partial(no_drop.apply, train=True),
                       variables, x)  # needs no rng at rate 0
  assert out["maps"].shape == (2, 42, 42, 3)


# ----------------------------------------------------------------------------
# Mixed precision: bfloat16 compute, float32 params and outputs.
# ----------------------------------------------------------------------------
# name -> (class, kwargs, input size); every output head switched on.
BF16_CASES = {
    "chu_unet": (ChuUNet, dict(TINY_UNET, num_emotions=8), 16),
    "basic_cnn": (BasicCNN, dict(TINY_CNN, num_emotions=4), 16),
    "devries": (DeVriesNet, dict(TINY_DEVRIES, dropout_rate=0.0), 42),
}
# bfloat16 keeps 8 significant bits (relative rounding 2**-9 ~ 0.2 %); a few
# layers of it leave errors of ~1 % of an output's scale.
BF16_REL_ERR = 0.03


def _matmul_operand_dtypes(jaxpr) -> set:
  """Dtypes of the operands of every conv and dot in ``jaxpr`` (recursive)."""
  found = set()
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in ("conv_general_dilated", "dot_general"):
      found |= {v.aval.dtype for v in eqn.invars}
    for sub in jax.extend.core.jaxprs_in_params(eqn.params):
      found |= _matmul_operand_dtypes(sub)
  return found


def _rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-6))


@pytest.mark.parametrize("name", sorted(BF16_CASES))
def test_bfloat16_outputs_float32_and_close_to_float32(name):
  """Same params: bf16 compute in every conv/dense, f32 params and outputs."""
  cls, kwargs, n = BF16_CASES[name]
  f32, bf16 = cls(**kwargs), cls(**kwargs, dtype=models.compute_dtype("bfloat16"))
  x = _images(3, n, seed=1)
  variables = _init(f32, x)
  # The bf16 model builds exactly the same float32 parameter tree.
  shapes = _shapes(bf16, x.shape)
  assert (jax.tree.map(lambda a: (a.shape, a.dtype), shapes) ==
          jax.tree.map(lambda a: (a.shape, a.dtype), variables))
  assert {a.dtype for a in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  # Every convolution and matrix product computes in bf16 (none in f32) ...
  ops = _matmul_operand_dtypes(jax.make_jaxpr(bf16.apply)(variables, x).jaxpr)
  assert ops == {jnp.dtype(jnp.bfloat16)}, ops
  assert _matmul_operand_dtypes(
      jax.make_jaxpr(f32.apply)(variables, x).jaxpr) == {jnp.dtype(jnp.float32)}
  # ... and what feeds the losses is float32, within bf16 rounding of f32.
  ref = jax.jit(f32.apply)(variables, x)
  out = jax.jit(bf16.apply)(variables, x)
  assert set(out) == set(ref)
  for k in ref:
    assert out[k].dtype == jnp.float32, k
    assert bool(jnp.all(jnp.isfinite(out[k]))), k
    assert _rel_err(out[k], ref[k]) < BF16_REL_ERR, (k, _rel_err(out[k], ref[k]))
  # Not trivially equal: the bf16 model really rounds.
  assert any(_rel_err(out[k], ref[k]) > 0 for k in ref)


def test_compute_dtype_names():
  assert models.compute_dtype("float32") == jnp.float32
  assert models.compute_dtype("bfloat16") == jnp.bfloat16
  with pytest.raises(ValueError, match="float32, bfloat16"):
    models.compute_dtype("float16")


def _train_setup(name, dtype):
  from tml import train_step as ts
  cls, kwargs, n = BF16_CASES[name]
  model = cls(**kwargs, dtype=models.compute_dtype(dtype))
  rng = np.random.default_rng(0)
  if name == "devries":
    size, b = 48, 4
    task = ts.TaskSpec(kind="expression", image_size=size, num_classes=7,
                       crop_size=n, emotion_loss="xent",
                       batch_standardise=True)
    stage = ts.StageSpec("stage2", {"emotion": 1.0, "maps": 1.0}, epochs=1)
    image = rng.normal(0, 1, (b, size, size, 1))
    classes = 7
  else:
    size, b = n, 4
    classes = kwargs["num_emotions"]
    task = ts.TaskSpec(kind="thermal", image_size=n, num_classes=classes,
                       emotion_loss="mse")
    weights = {"landmark": 1.0, "emotion": 1.0}
    if name == "chu_unet":
      weights["unet"] = 0.01
    stage = ts.StageSpec("stage2", weights, epochs=1)
    image = rng.uniform(0, 1, (b, n, n, 1))
  batch = {
      "image": image.astype(np.float32),
      "landmarks": rng.uniform(0.25 * size, 0.75 * size,
                               (b, 68, 2)).astype(np.float32),
      "emotion": rng.integers(0, classes, b).astype(np.int32),
      "has_landmarks": np.ones(b, np.float32),
      "weight": np.ones(b, np.float32),
  }
  return model, task, stage, batch


def _loss_and_grads(model, task, stage, params, batch):
  """The step's loss (tml.train_step's own functions), without the update."""
  from tml import losses
  from tml import train_step as ts
  images, lms = ts.prepare_inputs(task, None, batch, train=False)

  def loss(p):
    out = model.apply({"params": p}, images, train=False)
    terms = ts.per_example_terms(task, stage, out, images, lms, batch)
    return sum(stage.weight(k) * losses.weighted_mean(v, batch["weight"])
               for k, v in terms.items())
  return jax.jit(jax.value_and_grad(loss))(params)


@pytest.mark.parametrize("name", sorted(BF16_CASES))
def test_bfloat16_train_step_finite_float32(name):
  """One bf16 train step: finite losses, f32 grads, params and optimizer state."""
  from tml import parallel
  from tml import train_step as ts
  model, task, stage, batch = _train_setup(name, "bfloat16")
  f32_model = _train_setup(name, "float32")[0]
  shape = (1, task.input_size, task.input_size, 1)
  params = helpers.numpy_variables(model, shape, seed=3)["params"]
  jbatch = jax.tree.map(jnp.asarray, batch)
  value, grads = _loss_and_grads(model, task, stage, params, jbatch)
  ref_value, ref_grads = _loss_and_grads(f32_model, task, stage, params, jbatch)
  assert value.dtype == jnp.float32 and np.isfinite(float(value))
  assert float(value) == pytest.approx(float(ref_value), rel=BF16_REL_ERR)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    assert g.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(g)))
  # The gradient direction survives bf16 compute.
  flat = lambda t: np.concatenate([np.ravel(x) for x in jax.tree.leaves(t)])
  g, r = flat(grads), flat(ref_grads)
  assert np.dot(g, r) / (np.linalg.norm(g) * np.linalg.norm(r)) > 0.95

  mesh = parallel.make_mesh(jax.devices()[:1])
  tx = ts.make_optimizer("adam", 1e-3)
  params0 = jax.tree.map(np.array, params)   # the step donates its state
  state = parallel.replicate(
      ts.init_state(params, tx, jax.random.key(0), 0), mesh)
  step = ts.make_train_step(model, tx, task, stage, mesh, learning_rate=1e-3)
  state, metrics = step(state, parallel.global_batch(batch, mesh))
  metrics, state = jax.device_get((metrics, state))
  assert metrics["nonfinite"] == 0 and int(state.first_nonfinite) == -1
  for k, v in metrics.items():
    assert np.isfinite(v), k
  assert metrics["loss/total"] == pytest.approx(float(ref_value),
                                                rel=BF16_REL_ERR)
  assert metrics["grad_norm"] > 0
  for leaf in jax.tree.leaves((state.params, state.opt_state)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  moved = jax.tree.map(lambda a, b: bool(np.any(a != b)), state.params,
                       params0)
  assert any(jax.tree.leaves(moved))


# --------------------------------------------------------------------------
# The performance layers are drop-ins: same parameters, same numbers.
# --------------------------------------------------------------------------
def _reference_pool(x):
  return flax.linen.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")


@pytest.mark.parametrize("shape", [(2, 5, 7, 3), (3, 8, 8, 4), (2, 21, 21, 5)])
def test_max_pool_matches_flax_values_and_gradient_exactly(shape):
  """Including ties (first maximum wins, as select-and-scatter) and odd sizes."""
  rng = np.random.default_rng(0)
  x = np.round(rng.normal(size=shape), 1).astype(np.float32)  # many ties
  x[0, :4, :4, 0] = 1.0
  x[1, :, :, 1] = 0.0                                         # all tied
  x = jnp.asarray(x)
  y_ref, vjp_ref = jax.vjp(_reference_pool, x)
  g = jnp.asarray(rng.normal(size=y_ref.shape), jnp.float32)
  y, vjp = jax.vjp(layers.max_pool_2x2, x)
  np.testing.assert_array_equal(y, y_ref)
  np.testing.assert_array_equal(vjp(g)[0], vjp_ref(g)[0])
  jitted = jax.jit(lambda x, g: jax.vjp(layers.max_pool_2x2, x)[1](g)[0])
  np.testing.assert_array_equal(jitted(x, g), vjp_ref(g)[0])


def test_upconv_matches_flax_conv_transpose():
  """Same init (same rng path and shapes) and the same outputs and gradients."""
  x = _images(2, 6, c=8)
  kw = dict(kernel_init=layers.he_truncated_normal, name="up")
  ref = flax.linen.ConvTranspose(4, (2, 2), strides=(2, 2), padding="VALID",
                                 **kw)
  new = layers.UpConv2x2(4, **kw)
  v_ref = ref.init(jax.random.key(3), x)
  v_new = new.init(jax.random.key(3), x)
  jax.tree.map(np.testing.assert_array_equal, v_ref, v_new)
  rng = np.random.default_rng(1)
  v = jax.tree.map(lambda a: a + jnp.asarray(0.1 * rng.normal(size=a.shape),
                                             a.dtype), v_ref)
  np.testing.assert_allclose(new.apply(v, x), ref.apply(v, x),
                             rtol=1e-5, atol=1e-6)
  loss = lambda m: lambda v, x: jnp.sum(m.apply(v, x) ** 2)
  g_ref = jax.grad(loss(ref), argnums=(0, 1))(v, x)
  g_new = jax.grad(loss(new), argnums=(0, 1))(v, x)
  for a, b in zip(jax.tree.leaves(g_new), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


@pytest.mark.parametrize("shape,k", [((3, 42, 42, 1), 5), ((2, 16, 16, 1), 3),
                                     ((2, 21, 21, 1), 4), ((2, 8, 8, 3), 3)])
def test_conv_matches_lax_conv(shape, k):
  """The one-channel CPU path (and the pass-through) equal lax's convolution."""
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, shape[-1], 6)), jnp.float32)
  dn = jax.lax.conv_dimension_numbers(x.shape, w.shape, ("NHWC", "HWIO", "NHWC"))
  ref = lambda x, w: jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                                  dimension_numbers=dn)
  new = lambda x, w: layers.conv_general_dilated(x, w, (1, 1), "SAME",
                                                 dimension_numbers=dn)
  y_ref, vjp_ref = jax.vjp(ref, x, w)
  y, vjp = jax.vjp(jax.jit(new), x, w)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
  g = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
  for a, b in zip(vjp(g), vjp_ref(g)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
