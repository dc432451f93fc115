"""Flax <-> PyTorch weight converters for the twins of ``tml.torch.twins``.

Part of the optional ``torch`` extra. The twins use the Flax module names
(torch key ``'unet.enc_0_conv1.weight'`` is Flax
``params['unet']['enc_0_conv1']['kernel']``), so a conversion is a per-layer
layout change and nothing else:

  * conv kernel ``(kh, kw, in, out)`` <-> Conv2d weight ``(out, in, kh, kw)``;
  * transposed conv (layers named ``upconv*``): Flax's ``nn.ConvTranspose``
    applies its kernel without the spatial flip that
    ``torch.nn.ConvTranspose2d`` implies, so
    ``torch_weight = flip(kernel, (0, 1)).permute(2, 3, 0, 1)``;
  * dense kernel ``(in, out)`` <-> Linear weight ``(out, in)``;
  * biases as they are.

Conversions are exact in both directions (tests/test_torch_parity.py).
"""
from __future__ import annotations

from typing import Mapping

import flax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from tml.torch.twins import TRANSPOSED_PREFIX

def _layer_kind(module_path: str, ndim: int) -> str:
  if ndim == 2:
    return "dense"
  if module_path.rsplit(".", 1)[-1].startswith(TRANSPOSED_PREFIX):
    return "conv_transpose"
  return "conv"


def _check_kinds(torch_model: nn.Module):
  """The naming convention must agree with the actual torch layer types."""
  for name, mod in torch_model.named_modules():
    if isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
      want = {nn.Linear: "dense", nn.ConvTranspose2d: "conv_transpose"}.get(
          type(mod), "conv")
      got = _layer_kind(name, mod.weight.ndim)
      if got != want:
        raise ValueError(f"layer {name!r} is a {want} but its name says {got}")


def _kernel_to_torch(kernel: np.ndarray, kind: str) -> np.ndarray:
  if kind == "dense":
    return kernel.T
  if kind == "conv_transpose":
    return kernel[::-1, ::-1].transpose(2, 3, 0, 1)
  return kernel.transpose(3, 2, 0, 1)


def _weight_to_flax(weight: np.ndarray, kind: str) -> np.ndarray:
  if kind == "dense":
    return weight.T
  if kind == "conv_transpose":
    return weight.transpose(2, 3, 0, 1)[::-1, ::-1]
  return weight.transpose(2, 3, 1, 0)


def _unwrap(params: Mapping) -> tuple[dict, bool]:
  params = flax.core.unfreeze(params)
  if set(params) == {"params"}:
    return params["params"], True
  return params, False


def flax_to_torch(params: Mapping, torch_model: nn.Module) -> dict:
  """Loads Flax ``params`` (or ``{'params': params}``) into ``torch_model``.

  Strict: every Flax leaf must land on a torch parameter and vice versa.

  Returns:
    ``torch_model.state_dict()`` after loading.
  """
  _check_kinds(torch_model)
  tree, _ = _unwrap(params)
  state = {}
  for path, leaf in flax.traverse_util.flatten_dict(tree, sep=".").items():
    module_path, pname = path.rsplit(".", 1)
    value = np.asarray(leaf, dtype=np.float32)
    if pname == "kernel":
      state[module_path + ".weight"] = _kernel_to_torch(
          value, _layer_kind(module_path, value.ndim))
    elif pname == "bias":
      state[module_path + ".bias"] = value
    else:
      raise ValueError(f"unexpected Flax parameter {path!r}")
  # np.array copies: jax-backed arrays are read-only, torch wants writable.
  state = {k: torch.from_numpy(np.array(v, dtype=np.float32, order="C"))
           for k, v in state.items()}
  torch_model.load_state_dict(state, strict=True)
  return torch_model.state_dict()


def torch_to_flax(torch_model_or_state_dict: nn.Module | Mapping,
                  flax_params_template: Mapping) -> dict:
  """Torch weights (a model, or a state_dict such as one of gradients) -> Flax.

  Args:
    torch_model_or_state_dict: a twin model, or a mapping from its state_dict
      keys to tensors (e.g. ``{n: p.grad for n, p in m.named_parameters()}``).
    flax_params_template: a Flax params tree (``params`` or
      ``{'params': params}``; arrays or ``jax.ShapeDtypeStruct``) giving the
      structure, shapes and dtypes; the result is wrapped the same way.

  Returns:
    The params tree with ``jnp`` arrays of the template's dtypes.
  """
  src = torch_model_or_state_dict
  if isinstance(src, nn.Module):
    _check_kinds(src)
    src = src.state_dict()
  tree, wrapped = _unwrap(flax_params_template)
  flat = flax.traverse_util.flatten_dict(tree, sep=".")
  used, out = set(), {}
  for path, leaf in flat.items():
    module_path, pname = path.rsplit(".", 1)
    key = module_path + (".weight" if pname == "kernel" else ".bias")
    if key not in src:
      raise KeyError(f"torch weights have no {key!r} for Flax {path!r}")
    value = src[key].detach().cpu().numpy()
    if pname == "kernel":
      value = _weight_to_flax(value, _layer_kind(module_path, value.ndim))
    if value.shape != tuple(leaf.shape):
      raise ValueError(f"{path!r}: converted shape {value.shape} != Flax "
                       f"{tuple(leaf.shape)}")
    out[path] = jnp.asarray(np.ascontiguousarray(value), dtype=leaf.dtype)
    used.add(key)
  extra = sorted(set(src) - used)
  if extra:
    raise ValueError(f"torch weights {extra} have no Flax counterpart")
  tree = flax.traverse_util.unflatten_dict(out, sep=".")
  return {"params": tree} if wrapped else tree


def grads_state_dict(torch_model: nn.Module) -> dict[str, torch.Tensor]:
  """``{name: param.grad}`` (zeros where None), for ``torch_to_flax``."""
  return {n: (p.grad if p.grad is not None else torch.zeros_like(p))
          for n, p in torch_model.named_parameters()}
