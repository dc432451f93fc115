"""Model registry: look networks up by name.

Every registered model is a Flax linen module with params only (no batch
statistics or other mutable collections) and the call signature
``model.apply({'params': params}, images, train=False, rngs=...)`` ->
``dict[str, jax.Array]``; images are ``(B, H, W, C)`` float NHWC. The output
keys, present only when the model has that output:

  ``'heatmap'``        ``(B, N, N)``      Chu's map A, logits (pre-softmax).
  ``'landmarks'``      ``(B, 68, 2)``     sigmoid, normalised (x/W, y/H).
  ``'emotion_logits'`` ``(B, C)``         logits (the loss applies softmax).
  ``'maps'``           ``(B, h, w, 3)``   DeVries per-pixel map logits.

Registered names: ``chu_unet`` (ChuUNet), ``basic_cnn`` (BasicCNN), ``devries``
(DeVriesNet).

Mixed precision, the same for every model: the ``dtype`` attribute (from
``Config.compute_dtype`` through :func:`compute_dtype`) is the dtype the
convolutions and dense layers compute in; parameters are always created in
float32 (Flax's ``param_dtype`` default, so the optimizer state is float32
too and the gradients w.r.t. them are float32), and every output is cast to
float32 inside the model (the landmark sigmoid is applied after that cast),
so the losses, softmaxes and metrics never see bfloat16.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tml.models.cnn import BasicCNN
from tml.models.devries import DeVriesNet
from tml.models.unet import ChuUNet

MODELS: dict[str, type[nn.Module]] = {
    "chu_unet": ChuUNet,
    "basic_cnn": BasicCNN,
    "devries": DeVriesNet,
}


# ``Config.compute_dtype`` names -> the ``dtype`` attribute of the models.
COMPUTE_DTYPES: dict[str, Any] = {"float32": jnp.float32,
                                  "bfloat16": jnp.bfloat16}


def compute_dtype(name: str) -> Any:
  """``'float32'`` or ``'bfloat16'`` -> the jnp dtype for a model's ``dtype``.

  Raises:
    ValueError: another name (the message lists the known ones).
  """
  try:
    return COMPUTE_DTYPES[name]
  except KeyError:
    raise ValueError(f"unknown compute dtype {name!r}; known: "
                     f"{', '.join(COMPUTE_DTYPES)}") from None


def model_names() -> list[str]:
  """The registered model names, sorted."""
  return sorted(MODELS)


def build_model(name: str, **kwargs: Any) -> nn.Module:
  """Instantiates the registered model ``name`` with constructor ``kwargs``.

  Raises:
    KeyError: ``name`` is not registered (the message lists the known names).
    TypeError: a keyword is not an attribute of that model.
  """
  try:
    cls = MODELS[name]
  except KeyError:
    raise KeyError(f"unknown model {name!r}; known models: "
                   f"{', '.join(model_names())}") from None
  fields = set(cls.__dataclass_fields__) - {"parent", "name"}
  unknown = sorted(set(kwargs) - fields)
  if unknown:
    raise TypeError(f"model {name!r} has no argument(s) {unknown}; it takes "
                    f"{sorted(fields)}")
  return cls(**kwargs)


def init_params(model: nn.Module, input_shape: tuple[int, ...], seed: int,
                index: int = 0) -> Any:
  """Initial parameters of ``model`` for inputs of ``input_shape`` (B, H, W, C).

  Jitted, from an ``rbg`` key ``fold_in(key(seed), index)``: initialising
  with threefry keys compiles one threefry kernel per parameter shape, which
  takes tens of seconds on CPU even for a tiny U-Net; rbg takes a few. The
  values are deterministic for a seed on a given backend (rbg streams may
  differ between CPU, GPU and TPU).
  """
  key = jax.random.fold_in(jax.random.key(seed, impl="rbg"), index)
  sample = jax.numpy.zeros((1,) + tuple(input_shape[1:]), jax.numpy.float32)

  @jax.jit
  def init(k):
    return model.init({"params": k, "dropout": k}, sample, train=False)["params"]
  return init(key)


def param_count(params: Any) -> int:
  """Total number of scalars in a parameter pytree."""
  leaves = jax.tree_util.tree_leaves(params)
  return int(sum(np.prod(np.shape(x)) for x in leaves))


def dropout_keep_masks(model: nn.Module, params: Any, images: jax.Array,
                       dropout_key: jax.Array) -> dict[str, jax.Array]:
  """The keep masks ``model.apply(..., train=True, rngs={'dropout': key})`` draws.

  One bool array per ``nn.Dropout`` call, keyed by its module path
  (``'head/Dropout_0'``), shaped like that layer's input: True where the
  unit is kept (and scaled by ``1 / (1 - rate)``). The masks are Flax's own:
  each Dropout layer is intercepted and called once, as in the real forward
  (so ``make_rng`` derives the same per-module key), on ones, whose output
  is nonzero exactly where the mask keeps. Given the same ``dropout_key`` as
  a training step, a twin in another framework that applies these masks
  drops the same units (``tml.torch.trainer`` does). Under ``jax.jit`` the
  masks depend on the key and the shapes only, so XLA drops the forward
  pass; ``params`` may be any tree of the right shapes (zeros).
  """
  masks: dict[str, jax.Array] = {}

  def capture(next_fun, args, kwargs, context):
    if (isinstance(context.module, nn.Dropout)
        and context.method_name == "__call__"):
      inputs, *rest = args
      scaled = next_fun(jnp.ones_like(inputs), *rest, **kwargs)
      masks["/".join(context.module.path)] = scaled != 0
      return inputs * scaled          # only the masks are wanted
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(capture):
    model.apply({"params": params}, images, train=True,
                rngs={"dropout": dropout_key})
  return masks


__all__ = ["COMPUTE_DTYPES", "MODELS", "BasicCNN", "ChuUNet", "DeVriesNet",
           "build_model", "compute_dtype", "dropout_keep_masks", "init_params",
           "model_names", "param_count"]
