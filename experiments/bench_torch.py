"""PyTorch side of ``experiments.bench``: the same train step as tml's, in torch.

For each benchmark the torch step does the work that ``tml.train_step`` does
for that stage, on the same device-resident batch and from the same initial
weights (converted from the Flax init with ``tml.torch_twins.flax_to_torch``):

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

Loss terms are ``tml.torch_twins``' twins reduced with the example weights
like the JAX step's global weighted mean. What the JAX step does and torch
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
import torch.nn.functional as F

from tml import landmarks as lm
from tml import torch_twins as tt
from tml import targets as targets_lib


# ----------------------------------------------------------------------------
# Target and preprocessing twins (tml.targets, tml.preprocess, tml.augment).
# ----------------------------------------------------------------------------
def chu_heatmap_torch(landmarks: torch.Tensor, height: int,
                      width: int) -> torch.Tensor:
  """Twin of ``tml.targets.chu_heatmap``: ``(B, K, 2)`` -> ``(B, H, W)``.

  ``sum_i min(0.5 ** |y_i - row|, 0.5 ** |x_i - col|)``, non-finite points
  contribute nothing.
  """
  lms = landmarks.float()
  xs, ys = lms[..., 0], lms[..., 1]
  finite = torch.isfinite(xs) & torch.isfinite(ys)
  xs = torch.where(finite, xs, torch.zeros_like(xs))
  ys = torch.where(finite, ys, torch.zeros_like(ys))
  cols = torch.arange(width, dtype=torch.float32, device=lms.device)
  rows = torch.arange(height, dtype=torch.float32, device=lms.device)
  px = torch.exp2(-(xs[..., None] - cols).abs())                # (B, K, W)
  py = torch.exp2(-(ys[..., None] - rows).abs())                # (B, K, H)
  px = torch.where(finite[..., None], px, torch.zeros_like(px))
  return torch.minimum(py[..., :, :, None], px[..., :, None, :]).sum(-3)


def _segment_sq_distance(px, py, a, b):
  ax, ay = a[..., 0, None, None], a[..., 1, None, None]
  dx = (b[..., 0] - a[..., 0])[..., None, None]
  dy = (b[..., 1] - a[..., 1])[..., None, None]
  len2 = dx * dx + dy * dy
  pos = len2 > 0
  t = ((px - ax) * dx + (py - ay) * dy) / torch.where(pos, len2,
                                                      torch.ones_like(len2))
  t = torch.where(pos, t, torch.zeros_like(t)).clamp(0.0, 1.0)
  ex = px - (ax + t * dx)
  ey = py - (ay + t * dy)
  return ex * ex + ey * ey


def _ends(points, segments):
  starts = points[..., [i for i, _ in segments], :]
  ends = points[..., [j for _, j in segments], :]
  return starts, ends


def _near_polyline(points, segments, px, py, half_width):
  starts, ends = _ends(points, segments)
  d2 = _segment_sq_distance(px, py, starts, ends)
  return (d2 <= half_width * half_width).any(dim=-3)


def _inside_polygon(points, segments, px, py):
  starts, ends = _ends(points, segments)
  ax, ay = starts[..., 0, None, None], starts[..., 1, None, None]
  bx, by = ends[..., 0, None, None], ends[..., 1, None, None]
  straddles = (ay > py) != (by > py)
  dy = by - ay
  x_cross = ax + (py - ay) * (bx - ax) / torch.where(straddles, dy,
                                                     torch.ones_like(dy))
  crossings = (straddles & (px < x_cross)).sum(dim=-3)
  return (crossings % 2) == 1


def devries_label_maps_torch(landmarks: torch.Tensor, height: int, width: int,
                             brow_width: float = 1.0) -> torch.Tensor:
  """Twin of ``tml.targets.devries_label_maps``: ``(B, 68, 2)`` -> ``(B, H, W, 3)``."""
  lms = landmarks.float()
  lms = torch.where(torch.isfinite(lms), lms, torch.zeros_like(lms))
  half = brow_width / 2
  rows = torch.arange(height, dtype=torch.float32, device=lms.device)
  cols = torch.arange(width, dtype=torch.float32, device=lms.device)
  py, px = torch.meshgrid(rows, cols, indexing="ij")
  open_ = targets_lib._open_segments      # pylint: disable=protected-access
  closed = targets_lib._closed_segments   # pylint: disable=protected-access
  left = _near_polyline(lms, open_(lm.RIGHT_BROW), px, py, half)
  right = _near_polyline(lms, open_(lm.LEFT_BROW), px, py, half)
  mouth_edges = closed(lm.OUTER_MOUTH)
  mouth = (_inside_polygon(lms, mouth_edges, px, py)
           | _near_polyline(lms, mouth_edges, px, py, half))
  return torch.stack([left, right, mouth], dim=-1).float()


def batch_standardise_torch(images: torch.Tensor, weights: torch.Tensor,
                            eps: float = 1e-6) -> torch.Tensor:
  """Twin of ``tml.preprocess.batch_standardise`` (one scalar mean and std)."""
  x = images.float()
  w = weights.float().reshape((-1,) + (1,) * (x.ndim - 1))
  count = w.sum() * x[0].numel()
  mean = (w * x).sum() / count.clamp(min=1.0)
  d = x - mean
  std = torch.sqrt((w * d * d).sum() / count.clamp(min=1.0))
  return d / std.clamp(min=eps)


def center_crop_torch(images: torch.Tensor, landmarks: torch.Tensor,
                      size: int):
  """``tml.augment.center_crop`` + the landmark offset of ``prepare_inputs``."""
  h, w = images.shape[1:3]
  oy, ox = (h - size) // 2, (w - size) // 2
  return (images[:, oy:oy + size, ox:ox + size, :],
          landmarks - float((h - size) // 2))


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
    tt.flax_to_torch(flax_params, model)
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
    fn = self._loss
    self.loss_fn = torch.compile(fn) if compile else fn

  # The loss mirrors tml.train_step.per_example_terms + _global_mean.
  def _loss(self, image, landmarks, emotion, has_landmarks, weight):
    spec, task = self.spec, self.spec.task
    w = weight.float()
    total_w = w.sum().clamp(min=1e-12)
    mean = lambda v: (w * v).sum() / total_w
    if task.kind == "expression":
      image, landmarks = center_crop_torch(image, landmarks, task.crop_size)
      if task.batch_standardise:
        image = batch_standardise_torch(image, w)
    n = image.shape[1]
    weights = spec.weights
    loss = image.new_zeros(())
    if spec.stage_name == "stage1":
      with self.model.autocast(image.device.type):
        heat = self.model.unet(image.permute(0, 3, 1, 2))
      target = chu_heatmap_torch(landmarks, n, n)
      return weights["unet"] * mean(tt.unet_loss_torch(heat, target))
    out = self.model(image, train=True)
    if weights.get("landmark", 0) > 0:
      loss = loss + weights["landmark"] * mean(
          tt.landmark_mse_torch(out["landmarks"], landmarks / n))
    if weights.get("emotion", 0) > 0:
      fn = (tt.emotion_mse_torch if task.emotion_loss == "mse"
            else tt.emotion_xent_torch)
      loss = loss + weights["emotion"] * mean(fn(out["emotion_logits"], emotion))
    if weights.get("maps", 0) > 0:
      maps = devries_label_maps_torch(landmarks, n, n, task.brow_width)
      loss = loss + weights["maps"] * mean(
          tt.pixel_bce_torch(out["maps"], maps, has_landmarks))
    return loss

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
