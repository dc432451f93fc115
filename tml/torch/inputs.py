"""PyTorch twins of the JAX step's input side: targets and preprocessing.

Part of the optional ``torch`` extra. Each function computes what its
``tml`` original computes inside ``tml.train_step`` (``tml.targets``,
``tml.preprocess``, ``tml.augment``), on the device, from the batch:
the Eq. 1 heatmap, the DeVries label maps, the batch standardisation and
the centred crop (tests/test_bench.py checks them against tml).
"""
from __future__ import annotations

import torch

from tml import landmarks as lm
from tml import targets as targets_lib


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
