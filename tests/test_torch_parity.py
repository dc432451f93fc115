"""Parity of the Flax models and losses with their PyTorch twins.

Same weights (Flax -> torch with the converter), same batch: the outputs, every
loss term, and the gradients of a scalar loss mixing all the terms w.r.t. every
parameter must agree. Tolerances (float32 on CPU; the two frameworks sum in
different orders, so bit equality is not expected):

  * outputs and loss values: ``|jax - torch| <= 1e-4 * |jax| + 1e-5``;
  * gradients, per parameter array: ``|jax - torch| <= 1e-4 * |jax| +
    1e-5 * max|jax|`` (the absolute part scales with the array, since a
    gradient's magnitude depends on the loss scale);
  * weight conversions: exact, both ways.

Dropout is off (eval mode) in the network comparisons; train-mode dropout
draws different masks in each framework by construction.
"""
from __future__ import annotations

import copy
import warnings

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests import helpers

torch = pytest.importorskip(
    "torch", reason="PyTorch is the optional 'torch' extra (pip install "
    "tml[torch]); parity tests need it")

from tml import losses  # noqa: E402
from tml import models  # noqa: E402
from tml import torch_twins as tt  # noqa: E402

RTOL, ATOL = 1e-4, 1e-5
GRAD_RTOL, GRAD_ATOL_REL = 1e-4, 1e-5

# name, registry kwargs, batch size.
CASES = {
    "unet_d2": ("chu_unet", dict(input_size=32, depth=2, base_width=4,
                                 fc_width=32, num_emotions=8), 3),
    "unet_d3_pooled": ("chu_unet", dict(input_size=32, depth=3, base_width=8,
                                        fc_width=16, num_emotions=0,
                                        map_reduction=2), 2),
    "basic_cnn": ("basic_cnn", dict(input_size=32, fc_width=32,
                                    num_emotions=4), 3),
    # The real DeVries net (42x42, 32/64/64 convs, FC 3072, 5292 map units).
    "devries": ("devries", {}, 3),
}


def _random_params(model, image_shape, seed):
  """Real parameter structure, NumPy-filled, biases nonzero (tests.helpers)."""
  return helpers.numpy_variables(model, image_shape, seed)["params"]



def _batch(name, kwargs, b, seed):
  """Images and targets for every term the model's outputs support."""
  rng = np.random.default_rng(seed)
  n = kwargs.get("input_size", 42)
  batch = {"images": rng.uniform(size=(b, n, n, 1)).astype(np.float32)}
  batch["weights"] = np.array([1.0, 0.0, 0.5][:b], np.float32)
  if name == "chu_unet":
    batch["heat"] = (rng.uniform(size=(b, n, n)) ** 8).astype(np.float32)
  if name in ("chu_unet", "basic_cnn"):
    batch["landmarks"] = rng.uniform(size=(b, 68, 2)).astype(np.float32)
  num_classes = kwargs.get("num_emotions", kwargs.get("num_classes", 7))
  batch["labels"] = rng.integers(0, max(num_classes, 1), size=b)
  if name == "devries":
    batch["maps"] = (rng.uniform(size=(b, 42, 42, 3)) < 0.1).astype(np.float32)
    batch["valid"] = np.array([1.0, 0.0, 1.0][:b], np.float32)
  return batch


def _terms(lib, outputs, batch, xp):
  """Per-example loss terms ``{name: (B,)}`` with ``lib`` (jax or torch)."""
  t = {}
  if "heatmap" in outputs:
    t["unet"] = lib["unet_loss"](outputs["heatmap"], xp(batch["heat"]))
  if "landmarks" in outputs:
    t["landmark"] = lib["landmark_mse"](outputs["landmarks"],
                                        xp(batch["landmarks"]))
  if "emotion_logits" in outputs:
    labels = xp(batch["labels"])
    t["emotion_mse"] = lib["emotion_mse"](outputs["emotion_logits"], labels)
    t["emotion_xent"] = lib["emotion_xent"](outputs["emotion_logits"], labels)
  if "maps" in outputs:
    t["maps"] = lib["pixel_bce"](outputs["maps"], xp(batch["maps"]),
                                 xp(batch["valid"]))
  return t


def _total(lib, terms, batch, xp):
  # The unet term is ~100x the others; scale it so every term shapes the grads.
  scale = {"unet": 0.01}
  return sum(scale.get(k, 1.0) * lib["weighted_mean"](v, xp(batch["weights"]))
             for k, v in terms.items())


JAX_LOSSES = {k: getattr(losses, k) for k in (
    "unet_loss", "landmark_mse", "emotion_mse", "emotion_xent", "pixel_bce",
    "weighted_mean")}
TORCH_LOSSES = {k: getattr(tt, k + "_torch") for k in JAX_LOSSES}


def _torch_in(x):
  return torch.from_numpy(np.asarray(x))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
  """Runs one network in both frameworks; returns everything to compare."""
  name, kwargs, b = CASES[request.param]
  model = models.build_model(name, **kwargs)
  batch = _batch(name, kwargs, b, seed=1)
  params = _random_params(model, batch["images"].shape, seed=2)

  @jax.jit
  def run(params):
    def loss(p):
      out = model.apply({"params": p}, batch["images"], train=False)
      terms = _terms(JAX_LOSSES, out, batch, jnp.asarray)
      return _total(JAX_LOSSES, terms, batch, jnp.asarray), (out, terms)
    return jax.value_and_grad(loss, has_aux=True)(params)

  (total, (out, terms)), grads = run(params)

  tmodel = tt.build_torch_model(name, **kwargs).eval()
  state = tt.flax_to_torch(params, tmodel)
  t_out = tmodel(_torch_in(batch["images"]))
  t_terms = _terms(TORCH_LOSSES, t_out, batch, _torch_in)
  t_total = _total(TORCH_LOSSES, t_terms, batch, _torch_in)
  t_total.backward()
  t_grads = tt.torch_to_flax(tt.grads_state_dict(tmodel), params)
  return dict(
      name=request.param, model=model, params=params, tmodel=tmodel,
      state=state,
      jax=dict(out=out, terms=terms, total=total, grads=grads),
      torch=dict(out={k: v.detach().numpy() for k, v in t_out.items()},
                 terms={k: v.detach().numpy() for k, v in t_terms.items()},
                 total=t_total.detach().numpy(), grads=t_grads))


def _close(actual, desired, rtol=RTOL, atol=ATOL, what=""):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(desired),
                             rtol=rtol, atol=atol, err_msg=what)


# ----------------------------------------------------------------------------
# Networks.
# ----------------------------------------------------------------------------
def test_outputs_match(case):
  j, t = case["jax"]["out"], case["torch"]["out"]
  assert set(j) == set(t)
  for k in j:
    assert t[k].shape == j[k].shape, k
    _close(t[k], j[k], what=f"{case['name']} output {k}")


def test_loss_terms_match(case):
  j, t = case["jax"]["terms"], case["torch"]["terms"]
  assert set(j) == set(t) and j
  for k in j:
    _close(t[k], j[k], what=f"{case['name']} term {k}")
  _close(case["torch"]["total"], case["jax"]["total"], what="total")


def test_gradients_match(case):
  j, t = case["jax"]["grads"], case["torch"]["grads"]
  assert jax.tree.structure(j) == jax.tree.structure(t)
  for (path, gj), gt in zip(jax.tree_util.tree_leaves_with_path(j),
                            jax.tree_util.tree_leaves(t)):
    gj, gt = np.asarray(gj), np.asarray(gt)
    scale = float(np.abs(gj).max())
    assert scale > 0, path  # every parameter is reached by the mixed loss
    _close(gt, gj, rtol=GRAD_RTOL, atol=GRAD_ATOL_REL * scale,
           what=f"{case['name']} grad {jax.tree_util.keystr(path)}")


def test_converter_round_trips_exactly(case):
  params, tmodel = case["params"], case["tmodel"]
  back = tt.torch_to_flax(tmodel, params)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    assert a.dtype == b.dtype
    np.testing.assert_array_equal(a, b)
  # From a bare state_dict, wrapped in {'params': ...}, and back to torch.
  back = tt.torch_to_flax(dict(case["state"]), {"params": params})
  assert set(back) == {"params"}
  fresh = copy.deepcopy(tmodel)
  with torch.no_grad():
    for p in fresh.parameters():
      p.zero_()
  state2 = tt.flax_to_torch(back, fresh)
  assert state2.keys() == case["state"].keys()
  for k in state2:
    assert torch.equal(state2[k], case["state"][k]), k


# ----------------------------------------------------------------------------
# Mixed precision: the twin under torch.autocast(bfloat16) vs Flax bfloat16.
# ----------------------------------------------------------------------------
# Both frameworks round to bf16 (8 significant bits) in different places (XLA
# rounds a conv's output before the bias add, torch fuses it), so each is
# ~1 % of an output's scale from float32 and about as far from the other
# (max |torch - flax| / max |flax|: 0.6 % for the basic CNN and DeVries,
# 1.7 % for the U-Net's heatmap at these seeds).
BF16_REL_ERR = 0.04


def _rel_err(out, ref):
  out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
  return float(np.abs(out - ref).max() / max(np.abs(ref).max(), 1e-6))


def test_autocast_dtype_spellings():
  for d in (None, "float32", jnp.float32, np.float32, torch.float32):
    assert tt.autocast_dtype(d) is None
  for d in ("bfloat16", jnp.bfloat16, torch.bfloat16):
    assert tt.autocast_dtype(d) is torch.bfloat16
  with pytest.raises(ValueError, match="float32 or bfloat16"):
    tt.autocast_dtype("float16")
  with pytest.raises(ValueError):
    tt.build_torch_model("devries", dtype=torch.float16)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bfloat16_twin_matches_flax_bfloat16(name):
  model_name, kwargs, b = CASES[name]
  flax_bf16 = models.build_model(model_name, **kwargs,
                                 dtype=models.compute_dtype("bfloat16"))
  batch = _batch(model_name, kwargs, b, seed=1)
  params = _random_params(flax_bf16, batch["images"].shape, seed=2)

  @jax.jit
  def run(params):
    def loss(p):
      out = flax_bf16.apply({"params": p}, batch["images"], train=False)
      terms = _terms(JAX_LOSSES, out, batch, jnp.asarray)
      return _total(JAX_LOSSES, terms, batch, jnp.asarray), out
    return jax.value_and_grad(loss, has_aux=True)(params)
  (total, out), grads = run(params)

  t32 = tt.build_torch_model(model_name, **kwargs).eval()
  t16 = tt.build_torch_model(model_name, **kwargs, dtype="bfloat16").eval()
  assert t16.compute_dtype is torch.bfloat16 and t32.compute_dtype is None
  tt.flax_to_torch(params, t32)
  tt.flax_to_torch(params, t16)
  x = _torch_in(batch["images"])
  with torch.no_grad():
    ref32 = {k: v.numpy() for k, v in t32(x).items()}
  t_out = t16(x)
  t_total = _total(TORCH_LOSSES, _terms(TORCH_LOSSES, t_out, batch, _torch_in),
                   batch, _torch_in)
  t_total.backward()
  assert set(t_out) == set(out)
  for k in out:
    assert t_out[k].dtype == torch.float32, k   # cast inside the twin
    got = t_out[k].detach().numpy()
    assert np.all(np.isfinite(got)), k
    err = _rel_err(got, out[k])
    assert err < BF16_REL_ERR, f"{name} {k}: torch bf16 vs flax bf16 {err:.4f}"
    assert _rel_err(got, ref32[k]) > 0, f"{name} {k}: autocast had no effect"
  assert float(t_total.detach()) == pytest.approx(float(total), rel=BF16_REL_ERR)
  # Parameters and their gradients stay float32 under autocast, and the
  # gradient agrees with Flax's bf16 gradient in direction.
  assert all(p.dtype == torch.float32 for p in t16.parameters())
  t_grads = tt.torch_to_flax(tt.grads_state_dict(t16), params)
  flat = lambda t: np.concatenate([np.ravel(np.asarray(v, np.float64))
                                   for v in jax.tree.leaves(t)])
  gj, gt = flat(grads), flat(t_grads)
  assert np.dot(gj, gt) / (np.linalg.norm(gj) * np.linalg.norm(gt)) > 0.95


# ----------------------------------------------------------------------------
# Layer conventions, checked in isolation.
# ----------------------------------------------------------------------------
@pytest.mark.parametrize("k", [3, 4, 5])
def test_same_conv_padding_matches_xla(k):
  rng = np.random.default_rng(k)
  x = rng.normal(size=(2, 9, 10, 3)).astype(np.float32)
  conv = flax.linen.Conv(5, (k, k), padding="SAME")
  params = {"params": {"kernel": rng.normal(size=(k, k, 3, 5)).astype(
      np.float32), "bias": rng.normal(size=(5,)).astype(np.float32)}}
  want = np.asarray(conv.apply(params, x))
  tconv = tt.SameConv2d(3, 5, k)
  with torch.no_grad():
    tconv.weight.copy_(torch.from_numpy(
        params["params"]["kernel"].transpose(3, 2, 0, 1).copy()))
    tconv.bias.copy_(torch.from_numpy(params["params"]["bias"]))
    xt = _torch_in(x).permute(0, 3, 1, 2)
    got = tconv(xt).permute(0, 2, 3, 1).numpy()
    _close(got, want)
    # Torch's own 'same' splits an even kernel's padding like XLA (1 before,
    # 2 after for k=4) in torch 2.13; SameConv2d pads explicitly anyway.
    with warnings.catch_warnings():
      warnings.simplefilter("ignore", UserWarning)  # even-k 'same' copy
      native = torch.nn.functional.conv2d(xt, tconv.weight, tconv.bias,
                                          padding="same")
    _close(native.permute(0, 2, 3, 1).numpy(), want)
    # ... and both differ from padding 2 before / 1 after.
    if k % 2 == 0:
      other = torch.nn.functional.conv2d(
          torch.nn.functional.pad(xt, (k // 2, k // 2 - 1) * 2),
          tconv.weight, tconv.bias)
      assert not np.allclose(other.permute(0, 2, 3, 1).numpy(), want,
                             atol=1e-3)


def test_conv_transpose_convention():
  """Flax ConvTranspose (no kernel flip) == torch ConvTranspose2d, flipped."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 5, 6)).astype(np.float32)
  kernel = rng.normal(size=(2, 2, 6, 3)).astype(np.float32)
  bias = rng.normal(size=(3,)).astype(np.float32)
  up = flax.linen.ConvTranspose(3, (2, 2), strides=(2, 2), padding="VALID")
  want = np.asarray(up.apply({"params": {"kernel": kernel, "bias": bias}}, x))
  assert want.shape == (2, 10, 10, 3)
  tup = torch.nn.ConvTranspose2d(6, 3, 2, stride=2)
  xt = _torch_in(x).permute(0, 3, 1, 2)
  with torch.no_grad():
    for flip, should_match in ((True, True), (False, False)):
      k = kernel[::-1, ::-1] if flip else kernel
      tup.weight.copy_(torch.from_numpy(k.transpose(2, 3, 0, 1).copy()))
      tup.bias.copy_(torch.from_numpy(bias))
      got = tup(xt).permute(0, 2, 3, 1).numpy()
      assert np.allclose(got, want, rtol=RTOL, atol=ATOL) == should_match


def test_torch_dropout_follows_train_flag():
  tmodel = tt.DeVriesNetTorch(fc_width=64)
  x = torch.rand(2, 42, 42, 1)
  tmodel.eval()
  a, b = tmodel(x)["maps"], tmodel(x)["maps"]
  assert torch.equal(a, b)
  assert not torch.equal(tmodel(x, train=True)["maps"], a)
  tmodel.train()
  assert not torch.equal(tmodel(x)["maps"], a)
  assert torch.equal(tmodel(x, train=False)["maps"], a)


def test_torch_twin_applies_the_flax_dropout_mask():
  model = models.build_model("devries", fc_width=64)
  params = _random_params(model, (3, 42, 42, 1), seed=2)
  x = np.random.default_rng(2).random((3, 42, 42, 1), dtype=np.float32)
  key = jax.random.key(7)
  want = model.apply({"params": params}, x, train=True, rngs={"dropout": key})
  keep = models.dropout_keep_masks(model, params, x, key)["head/Dropout_0"]
  tmodel = tt.build_torch_model("devries", fc_width=64)
  tt.flax_to_torch(params, tmodel)
  with torch.no_grad():
    got = tmodel(torch.from_numpy(x), train=True,
                 dropout_keep=torch.from_numpy(np.array(keep)))
    eval_out = tmodel(torch.from_numpy(x), train=False,
                      dropout_keep=torch.from_numpy(np.array(keep)))
  for k in ("emotion_logits", "maps"):
    np.testing.assert_allclose(got[k].numpy(), want[k], rtol=RTOL, atol=ATOL)
  # Eval mode ignores the mask; a mask of the wrong shape is refused.
  evals = model.apply({"params": params}, x, train=False)
  np.testing.assert_allclose(eval_out["maps"].numpy(), evals["maps"],
                             rtol=RTOL, atol=ATOL)
  with pytest.raises(ValueError, match="dropout_keep"):
    tmodel(torch.from_numpy(x), train=True,
           dropout_keep=torch.ones(3, 32, dtype=torch.bool))


def test_converter_errors():
  model = models.build_model("chu_unet", input_size=16, depth=1, base_width=2,
                             fc_width=4)
  params = _random_params(model, (1, 16, 16, 1), seed=0)
  wrong = tt.build_torch_model("chu_unet", input_size=16, depth=2,
                               base_width=2, fc_width=4)
  with pytest.raises((RuntimeError, KeyError, ValueError)):
    tt.flax_to_torch(params, wrong)
  with pytest.raises((KeyError, ValueError)):
    tt.torch_to_flax(wrong, params)
  with pytest.raises(KeyError, match="basic_cnn, chu_unet, devries"):
    tt.build_torch_model("vgg")
  with pytest.raises(ValueError, match="NHWC"):
    tt.build_torch_model("devries")(torch.zeros(1, 48, 48, 1))


# ----------------------------------------------------------------------------
# Loss twins on their own: random inputs, large logits, masks, gradients.
# ----------------------------------------------------------------------------
def _loss_inputs(seed=0, b=4):
  rng = np.random.default_rng(seed)
  big = np.array([1e4, -1e4, 300.0, -80.0], np.float32)
  heat_logits = rng.normal(size=(b, 8, 9)).astype(np.float32) * 30
  heat_logits[0, 0, :4] = big
  logits = rng.normal(size=(b, 5)).astype(np.float32) * 10
  logits[0] = [1e4, -1e4, 0, 50, -50]
  logits[1] = [-1e4, 1e4, 1e4, 0, 3]
  maps = rng.normal(size=(b, 6, 7, 3)).astype(np.float32) * 10
  maps[0, 0, 0] = [1e4, -1e4, 80]
  map_targets = (rng.uniform(size=(b, 6, 7, 3)) < 0.3).astype(np.float32)
  map_targets[2] = np.nan  # an image without landmarks (valid 0)
  return dict(
      heat_logits=heat_logits,
      heat=(rng.uniform(size=(b, 8, 9)) ** 4).astype(np.float32),
      pred=rng.uniform(size=(b, 68, 2)).astype(np.float32),
      target=rng.uniform(size=(b, 68, 2)).astype(np.float32),
      logits=logits,
      labels=np.array([0, 1, 4, 7][:b]),  # 7 is out of range: zero one-hot
      maps=maps, map_targets=map_targets,
      valid=np.array([1.0, 1.0, 0.0, 0.5][:b], np.float32),
      weights=np.array([1.0, 0.0, 2.0, 0.5][:b], np.float32))


LOSS_CALLS = {
    "unet_loss": ("heat_logits", "heat"),
    "landmark_mse": ("pred", "target"),
    "emotion_mse": ("logits", "labels"),
    "emotion_xent": ("logits", "labels"),
    "pixel_bce": ("maps", "map_targets", "valid"),
    "weighted_mean": ("pred_flat", "weights"),
}


@pytest.mark.parametrize("fn", sorted(LOSS_CALLS))
def test_loss_twin_matches_tml_losses(fn):
  inputs = _loss_inputs()
  inputs["pred_flat"] = inputs["pred"][:, :, 0].sum(-1)
  args = [inputs[k] for k in LOSS_CALLS[fn]]

  def jax_fn(first):
    return JAX_LOSSES[fn](first, *[jnp.asarray(a) for a in args[1:]])

  want = jax_fn(jnp.asarray(args[0]))
  want_grad = jax.grad(lambda a: jnp.sum(jax_fn(a) * jnp.arange(
      1.0, 1.0 + want.size).reshape(want.shape)))(jnp.asarray(args[0]))
  first = _torch_in(args[0]).clone().requires_grad_(True)
  got = TORCH_LOSSES[fn](first, *[_torch_in(a) for a in args[1:]])
  (got * torch.arange(1.0, 1.0 + got.numel()).reshape(got.shape)).sum(
      ).backward()
  assert got.shape == want.shape
  assert np.all(np.isfinite(np.asarray(want))), fn
  _close(got.detach().numpy(), want, what=fn)
  g = np.asarray(want_grad)
  assert np.all(np.isfinite(g)), fn
  _close(first.grad.numpy(), g, atol=ATOL * max(1.0, np.abs(g).max()),
         what=f"{fn} grad")


def test_loss_twin_masks():
  inputs = _loss_inputs()
  # valid == 0 with NaN targets: exactly 0 with zero gradient, both sides.
  logits = _torch_in(inputs["maps"]).clone().requires_grad_(True)
  bce = tt.pixel_bce_torch(logits, _torch_in(inputs["map_targets"]),
                           _torch_in(inputs["valid"]))
  assert bce[2].item() == 0.0
  bce.sum().backward()
  assert torch.all(logits.grad[2] == 0)
  assert torch.all(torch.isfinite(logits.grad))
  # weighted_mean: all-zero weights give exactly 0; a NaN in a zero-weight row
  # does not leak.
  zero = tt.weighted_mean_torch(torch.tensor([1.0, 2.0]), torch.zeros(2))
  assert zero.item() == 0.0
  assert float(losses.weighted_mean(jnp.ones(2), jnp.zeros(2))) == 0.0
  v = torch.tensor([1.0, float("nan"), 3.0])
  w = torch.tensor([1.0, 0.0, 1.0])
  assert tt.weighted_mean_torch(v, w).item() == 2.0
  # Out-of-range labels one-hot to zeros (as jax.nn.one_hot), no error.
  xent = tt.emotion_xent_torch(torch.zeros(2, 3), torch.tensor([5, -1]))
  assert torch.all(xent == 0)
