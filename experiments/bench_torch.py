"""PyTorch side of ``experiments.bench``: the same train step as tml's, in torch.

For each benchmark the torch step does the work that ``tml.train_step`` does
for that stage, on the same device-resident batch and from the same initial
weights (converted from the Flax init with ``tml.torch.convert.flax_to_torch``):

  * Chu stage 2 (U-Net, basic CNN): forward, landmark MSE (+ emotion MSE),
    backward, Adam on every parameter;
  * Chu stage 1: the U-Net body only (the stage trains the U-Net without the
    FC layers, and XLA drops the head's dead forward pass too), the Eq. 1
    heatmap rasterised on the device from the landmarks, the softmax-CE
    unet loss, backward, Adam on the U-Net's parameters;
  * DeVries: the centred 42x42 crop of the 48x48 batch, the batch
    standardisation, the three label maps rasterised on the device from the
    landmarks, forward with dropout, softmax CE + per-pixel BCE (v_n masked),
    backward, SGD with momentum.

The loss is ``tml.torch.step.loss_terms``, the torch trainer's own (the
twins of ``tml.torch.twins`` / ``tml.torch.inputs`` reduced with the example
weights like the JAX step's global weighted means). What the JAX step does and torch
does not: the non-finite guard (a ``where`` over the new state) and the grad /
param norms it logs; that is extra work on the JAX side only.

Optimizers use ``fused=True`` (one vectorised kernel per step on CPU and
CUDA), the fastest torch implementation; ``torch.compile`` compiles the
forward + loss (AOTAutograd compiles the backward with it) and leaves the
fused optimizer as it is.

Mixed precision (a workload with ``dtype='bfloat16'``): the twin is built
with ``dtype=bfloat16``, so its forward pass runs under
``torch.autocast(device_type, torch.bfloat16)`` (the stage-1 U-Net body
inside the twin's own ``autocast()`` context); parameters, gradients and the
fused optimizer stay float32 and the loss twins compute in float32, as the
JAX step does with ``dtype=bfloat16`` models. No gradient scaler: bf16 has
float32's exponent range.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping

import numpy as np
import torch

from tml import train_step as ts
from tml.torch import convert
from tml.torch import step as step_lib
from tml.torch import twins as tt
# The target and preprocessing twins, under the names this module had.
from tml.torch.inputs import (batch_standardise_torch,  # noqa: F401
                              center_crop_torch, chu_heatmap_torch,
                              devries_label_maps_torch)


# ----------------------------------------------------------------------------
# The train step.
# ----------------------------------------------------------------------------
class TorchStep:
  """One benchmark's torch train step on a fixed device-resident batch.

  Args:
    spec: the ``bench.Workload`` (model name and kwargs, task, stage,
      optimizer, learning rate).
    flax_params: the JAX run's initial params (same starting point).
    batch: the numpy batch the JAX run uses.
    device: torch device.
    compile: wrap forward + loss in ``torch.compile``.
  """

  def __init__(self, spec, flax_params, batch: Mapping[str, np.ndarray],
               device: torch.device, compile: bool = False):
    self.spec = spec
    dtype = getattr(spec, "dtype", "float32")
    model = tt.build_torch_model(spec.model, **spec.model_kwargs, dtype=dtype)
    # What the forward autocasts to ('bfloat16'), or None (float32).
    self.autocast_dtype = (None if model.compute_dtype is None
                           else str(model.compute_dtype).replace("torch.", ""))
    convert.flax_to_torch(flax_params, model)
    self.model = model.to(device).train()
    if spec.stage_name == "stage1":
      params = list(self.model.unet.parameters())
    else:
      params = list(self.model.parameters())
    if spec.optimizer == "adam":
      self.opt = torch.optim.Adam(params, lr=spec.learning_rate, fused=True)
    else:
      self.opt = torch.optim.SGD(params, lr=spec.learning_rate,
                                 momentum=spec.momentum, fused=True)
    self.device = device
    self.inputs = {k: torch.from_numpy(np.ascontiguousarray(v)).to(device)
                   for k, v in batch.items()}
    self.stage = ts.StageSpec(spec.stage_name, spec.weights, epochs=1,
                              trainable=spec.trainable)
    fn = self._loss
    self.loss_fn = torch.compile(fn) if compile else fn

  def _loss(self, **inputs):
    return step_lib.loss_terms(self.model, self.spec.task, self.stage, inputs)[0]

  def step(self) -> torch.Tensor:
    self.opt.zero_grad(set_to_none=True)
    loss = self.loss_fn(**self.inputs)
    loss.backward()
    self.opt.step()
    return loss

  def sync(self) -> None:
    if self.device.type == "cuda":
      torch.cuda.synchronize(self.device)

  def run(self, iters: int) -> float:
    """Seconds for ``iters`` steps, synchronised at the end."""
    self.sync()
    start = time.perf_counter()
    for _ in range(iters):
      self.step()
    self.sync()
    return time.perf_counter() - start

  def first_loss(self) -> float:
    """The loss of the (not yet trained) initial weights, no update."""
    with torch.no_grad():
      return float(self.loss_fn(**self.inputs))


def matmul_runner(n: int, device: torch.device,
                  dtype: str = "float32") -> Callable[[int], float]:
  """``run(iters)`` -> seconds for ``iters`` ``n x n`` torch.mm in ``dtype``
  (``'float32'`` or ``'bfloat16'``: bf16 operands and result)."""
  dt = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
  gen = torch.Generator().manual_seed(0)
  a = torch.rand(n, n, generator=gen).to(device=device, dtype=dt)
  b = torch.rand(n, n, generator=gen).to(device=device, dtype=dt)
  out = torch.empty(n, n, device=device, dtype=dt)

  def run(iters: int) -> float:
    if device.type == "cuda":
      torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(iters):
      torch.mm(a, b, out=out)
    if device.type == "cuda":
      torch.cuda.synchronize(device)
    return time.perf_counter() - start
  return run


def configure(device: torch.device, threads: int, precision: str) -> dict[str, Any]:
  """Threads, TF32 and cuDNN settings; returns what was set."""
  torch.set_num_threads(threads)
  tf32 = precision == "tf32"
  torch.backends.cuda.matmul.allow_tf32 = tf32
  torch.backends.cudnn.allow_tf32 = tf32
  torch.set_float32_matmul_precision("high" if tf32 else "highest")
  if device.type == "cuda":
    torch.backends.cudnn.benchmark = True
  return {"torch_threads": torch.get_num_threads(), "allow_tf32": tf32,
          "cudnn_benchmark": device.type == "cuda"}


def memory_reset(device: torch.device) -> None:
  if device.type == "cuda":
    torch.cuda.reset_peak_memory_stats(device)


def memory_peak(device: torch.device) -> int | None:
  if device.type == "cuda":
    return int(torch.cuda.max_memory_allocated(device))
  return None
