"""Adam and SGD with momentum in PyTorch, exactly as optax defines them.

Part of the optional ``torch`` extra. The JAX step uses ``optax.adam`` and
``optax.sgd`` (``tml.train_step.make_optimizer``); the torch trainer must
apply the same update, so the update rules are written out here op by op in
optax's order, in float32:

  Adam (``optax.scale_by_adam`` + ``scale_by_learning_rate``), count ``t``
  starting at 1::

      mu = (1 - b1) * g + b1 * mu
      nu = (1 - b2) * g**2 + b2 * nu
      mu_hat = mu / (1 - b1**t)          # bias corrections in float32
      nu_hat = nu / (1 - b2**t)
      p = p + (-lr(t - 1)) * (mu_hat / (sqrt(nu_hat + eps_root) + eps))

  SGD (``optax.trace`` + ``scale_by_learning_rate``)::

      trace = g + momentum * trace       # first step: trace = g
      u = g + momentum * trace if nesterov else trace
      p = p + (-lr(t - 1)) * u

  Weight decay (``optax.add_decayed_weights`` chained before either):
  ``g = g + weight_decay * p`` (L2 on the gradient; for Adam this is not
  AdamW).

How ``torch.optim`` compares (torch 2.13), read from both sources:

  * ``torch.optim.Adam``: the same algorithm. Its eps is added to the
    bias-corrected ``sqrt(v) / sqrt(1 - b2**t)``, as in optax (not the
    Keras/TF ``eps_hat`` on the uncorrected denominator); the bias
    corrections are computed in float64 from a Python step count and
    folded into a step size ``lr / (1 - b1**t)``, so the float32 rounding
    differs but not the arithmetic. ``torch.optim.AdamW`` is another
    optimiser (decoupled decay, default ``weight_decay=0.01``).
  * ``torch.optim.SGD(momentum=m)``: ``buf = m * buf + (1 - dampening) * g``,
    first step ``buf = g``; with the default ``dampening=0`` that is optax's
    trace, and ``nesterov=True`` is ``g + m * buf`` as in optax. A nonzero
    ``dampening`` has no optax counterpart.
  * ``lr`` schedules: optax evaluates the schedule at the number of updates
    already applied (0 for the first); :class:`TorchOptimizer` sets the param
    groups' ``lr`` the same way before each step.

The trajectory parity report (``results/parity/trajectory``) measures
``torch.optim`` against these hand-written rules; the trainer uses these.

Interface, optax-like but in place: ``state = opt.init(params)`` with
``params`` a ``{name: tensor}`` dict of the trainable parameters;
``opt.update(params, grads, state)`` updates ``params`` and ``state`` in
place (under ``torch.no_grad``) and returns ``state``. ``state`` is a dict of
tensors plus an int ``count`` (checkpointable with ``torch.save``).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch

LearningRate = float | Callable[[int], Any]


def _lr_at(learning_rate: LearningRate, count: int) -> float:
  """The rate of update number ``count`` (0-based), as optax evaluates it.

  A schedule may return a jax or numpy scalar; it is read as float32, the
  dtype optax computes it in.
  """
  value = learning_rate(count) if callable(learning_rate) else learning_rate
  return float(np.float32(np.asarray(value)))


def _bias_correction(decay: float, count: int) -> float:
  """``1 - decay**count`` in float32, as optax computes it."""
  return float(np.float32(1) - np.float32(decay) ** np.float32(count))


class OptaxAdam:
  """``optax.adam(learning_rate, b1, b2, eps, eps_root)`` (+ optional L2)."""

  def __init__(self, learning_rate: LearningRate, b1: float = 0.9,
               b2: float = 0.999, eps: float = 1e-8, eps_root: float = 0.0,
               weight_decay: float = 0.0):
    self.learning_rate = learning_rate
    self.b1, self.b2, self.eps, self.eps_root = b1, b2, eps, eps_root
    self.weight_decay = weight_decay

  def init(self, params: Mapping[str, torch.Tensor]) -> dict:
    return {"count": 0,
            "mu": {n: torch.zeros_like(p) for n, p in params.items()},
            "nu": {n: torch.zeros_like(p) for n, p in params.items()}}

  @torch.no_grad()
  def update(self, params, grads, state) -> dict:
    lr = _lr_at(self.learning_rate, state["count"])
    t = state["count"] + 1
    bc1, bc2 = _bias_correction(self.b1, t), _bias_correction(self.b2, t)
    for name, p in params.items():
      g = grads[name]
      if self.weight_decay:
        g = g + self.weight_decay * p
      mu = (1 - self.b1) * g + self.b1 * state["mu"][name]
      nu = (1 - self.b2) * (g * g) + self.b2 * state["nu"][name]
      step = (mu / bc1) / (torch.sqrt(nu / bc2 + self.eps_root) + self.eps)
      p.add_(-lr * step)
      state["mu"][name], state["nu"][name] = mu, nu
    state["count"] = t
    return state


class OptaxSGD:
  """``optax.sgd(learning_rate, momentum, nesterov)`` (+ optional L2)."""

  def __init__(self, learning_rate: LearningRate, momentum: float = 0.0,
               nesterov: bool = False, weight_decay: float = 0.0):
    self.learning_rate = learning_rate
    self.momentum, self.nesterov = momentum, nesterov
    self.weight_decay = weight_decay

  def init(self, params: Mapping[str, torch.Tensor]) -> dict:
    return {"count": 0,
            "trace": {n: torch.zeros_like(p) for n, p in params.items()}}

  @torch.no_grad()
  def update(self, params, grads, state) -> dict:
    lr = _lr_at(self.learning_rate, state["count"])
    for name, p in params.items():
      g = grads[name]
      if self.weight_decay:
        g = g + self.weight_decay * p
      trace = g + self.momentum * state["trace"][name]
      u = g + self.momentum * trace if self.nesterov else trace
      p.add_(-lr * u)
      state["trace"][name] = trace
    state["count"] += 1
    return state


class TorchOptimizer:
  """A native ``torch.optim`` optimiser behind the same interface.

  ``TorchOptimizer(torch.optim.Adam, learning_rate, fused=True)``: the class
  and its keyword arguments; ``lr`` follows ``learning_rate`` (a float or a
  schedule of the update count, set before every step as optax would).
  Used by the benchmark (``fused=True`` is torch's fastest path) and by the
  trajectory report to measure torch.optim against :class:`OptaxAdam` /
  :class:`OptaxSGD`.
  """

  def __init__(self, cls: type[torch.optim.Optimizer],
               learning_rate: LearningRate, **kwargs: Any):
    self.cls, self.learning_rate, self.kwargs = cls, learning_rate, kwargs

  def init(self, params: Mapping[str, torch.Tensor]) -> dict:
    lr = _lr_at(self.learning_rate, 0)
    return {"count": 0,
            "optimizer": self.cls(list(params.values()), lr=lr, **self.kwargs)}

  @torch.no_grad()
  def update(self, params, grads, state) -> dict:
    opt = state["optimizer"]
    for group in opt.param_groups:
      group["lr"] = _lr_at(self.learning_rate, state["count"])
    for name, p in params.items():
      p.grad = grads[name]
    opt.step()
    for p in params.values():
      p.grad = None
    state["count"] += 1
    return state


def make_optimizer(name: str, learning_rate: LearningRate, *,
                   momentum: float = 0.9, nesterov: bool = False,
                   weight_decay: float = 0.0):
  """The twin of ``tml.train_step.make_optimizer`` (without ``trainable``:
  the torch step passes only the trainable parameters to ``init``)."""
  if name == "adam":
    return OptaxAdam(learning_rate, weight_decay=weight_decay)
  if name == "sgd":
    return OptaxSGD(learning_rate, momentum=momentum, nesterov=nesterov,
                    weight_decay=weight_decay)
  raise ValueError(f"unknown optimizer {name!r}; expected adam or sgd")
