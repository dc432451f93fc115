"""Trajectory parity: one network trained in JAX and in PyTorch, step by step.

Part of the optional ``torch`` extra (issue 14, item 2). For one case (a
network, its task, its stage and optimiser) every variant starts from the
same Flax init (converted to torch for the torch variants) and takes the
same numpy batches in the same order (a synthetic face set drawn once from
the seed, reshuffled per epoch from the seed; no dropout, no augmentation).
The variants run in lock step, so the parameters of each are compared with
the base run's after every step without storing them:

  ``jax``            the base: ``tml.train_step.make_train_step`` on a
                     one-device mesh, the step the training code runs;
  ``torch``          ``tml.torch.step`` with ``tml.torch.optim``'s optax
                     rules;
  ``jax_2dev``       the JAX step on a two-device mesh: the same arithmetic
                     with the reductions split in two, i.e. float32 rounding
                     injected at every step (the rounding reference);
  ``jax_ulp``        the JAX step from the init moved 1 ulp up (every
                     weight ``nextafter(w, +inf)``): rounding injected once;
  ``torch_native``   ``tml.torch.step`` with ``torch.optim.Adam`` /
                     ``torch.optim.SGD`` (same algorithm, other rounding);
  ``jax_ulp_down``, ``torch_ulp``  more rounding references (-1 ulp; the
                     torch step from +1 ulp);
  ``wrong_a``, ``wrong_b``  deliberately mismatched optimisers, which a
                     parity test must tell apart from rounding.

Recorded per variant and step: the loss (``loss/total`` at the parameters
before the update, as the steps log it); against the base: the relative loss
difference ``|L - L_jax| / |L_jax|`` and the parameter difference (max abs
and relative L2 ``||p - p_jax|| / ||p_jax||`` over all parameters).

Everything runs on the CPU in float32.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Mapping, Sequence

import flax
import jax
import numpy as np
import torch

from tml import landmarks as lm
from tml import models
from tml import parallel
from tml import train_step as ts
from tml.torch import convert
from tml.torch import optim
from tml.torch import step as step_lib
from tml.torch import twins


# ----------------------------------------------------------------------------
# Cases: network, task, stage, optimiser, sizes.
# ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Case:
  """One network's training setting (static)."""
  name: str
  model: str
  model_kwargs: Mapping[str, Any]
  task: ts.TaskSpec
  stage: ts.StageSpec
  optimizer: str            # "adam" | "sgd"
  learning_rate: float
  momentum: float = 0.9
  batch_size: int = 16
  num_examples: int = 256

  def describe(self) -> dict[str, Any]:
    return {"model": self.model, "model_kwargs": dict(self.model_kwargs),
            "task": dataclasses.asdict(self.task),
            "stage": {"name": self.stage.name, "weights": dict(self.stage.weights),
                      "trainable": self.stage.trainable},
            "optimizer": self.optimizer, "learning_rate": self.learning_rate,
            "momentum": self.momentum if self.optimizer == "sgd" else None,
            "batch_size": self.batch_size, "num_examples": self.num_examples}


CASE_NAMES = ("chu_unet", "basic_cnn", "devries", "chu_unet_stage1")
SIZES = ("tiny", "report")


def make_case(name: str, size: str = "report") -> Case:
  """The setting of ``name`` at ``size`` ("tiny": CI, "report": the figure).

  ``chu_unet``: Chu stage 2, multi-task (landmark MSE + 0.1 emotion MSE, as
  ``chu.flags``), Adam; ``chu_unet_stage1``: Chu stage 1 (Eq. 2 on the U-Net
  only, the head frozen), Adam; ``basic_cnn``: landmark MSE, Adam;
  ``devries``: emotion cross-entropy + per-pixel map BCE on the centred crop
  with batch standardisation, SGD with momentum 0.9 (``devries_fer2013.flags``
  without dropout and augmentation).
  """
  if size not in SIZES:
    raise ValueError(f"size {size!r}: expected one of {SIZES}")
  tiny = size == "tiny"
  if name in ("chu_unet", "chu_unet_stage1"):
    n = 16 if tiny else 32
    kwargs = dict(input_size=n, depth=2, base_width=4 if tiny else 8,
                  fc_width=32 if tiny else 128, num_emotions=8)
    task = ts.TaskSpec(kind="thermal", image_size=n, num_classes=8,
                       emotion_loss="mse")
    if name == "chu_unet":
      stage = ts.StageSpec("stage2", {"landmark": 1.0, "emotion": 0.1}, epochs=1)
    else:
      stage = ts.StageSpec("stage1", {"unet": 1.0}, epochs=1, trainable=("unet",))
    return Case(name, "chu_unet", kwargs, task, stage, "adam", 1e-3,
                batch_size=8 if tiny else 16)
  if name == "basic_cnn":
    n = 16 if tiny else 32
    widths = (4, 4, 8, 8, 16, 16) if tiny else (16, 16, 32, 32, 64, 64)
    kwargs = dict(input_size=n, fc_width=32 if tiny else 128, widths=widths)
    task = ts.TaskSpec(kind="thermal", image_size=n, num_classes=8)
    stage = ts.StageSpec("stage2", {"landmark": 1.0}, epochs=1)
    return Case(name, "basic_cnn", kwargs, task, stage, "adam", 1e-3,
                batch_size=8 if tiny else 16)
  if name == "devries":
    crop = 24 if tiny else 42
    kwargs = dict(num_classes=7, map_head=True, map_size=crop,
                  fc_width=32 if tiny else 256, dropout_rate=0.0)
    task = ts.TaskSpec(kind="expression", image_size=crop + 6, num_classes=7,
                       crop_size=crop, emotion_loss="xent", brow_width=3.0,
                       batch_standardise=True)
    stage = ts.StageSpec("stage2", {"emotion": 1.0, "maps": 1.0}, epochs=1)
    return Case(name, "devries", kwargs, task, stage, "sgd", 0.01,
                batch_size=8)
  raise KeyError(f"unknown case {name!r}; known: {', '.join(CASE_NAMES)}")


# ----------------------------------------------------------------------------
# Data: synthetic faces, drawn once from the seed.
# ----------------------------------------------------------------------------
def _template() -> np.ndarray:
  """A frontal 68-point face in [0, 1]^2, (x, y), iBUG order."""
  t = np.linspace(0, 1, 17)
  jaw = np.stack([0.15 + 0.7 * t, 0.45 + 0.4 * np.sin(np.pi * t)], -1)
  s5 = np.linspace(0, 1, 5)
  brow = lambda x0: np.stack([x0 + 0.25 * s5, 0.32 - 0.04 * np.sin(np.pi * s5)], -1)
  nose = np.stack([np.full(4, 0.5), np.linspace(0.4, 0.58, 4)], -1)
  nostrils = np.stack([np.linspace(0.43, 0.57, 5), np.full(5, 0.62)], -1)
  a6 = np.linspace(0, 2 * np.pi, 6, endpoint=False)
  eye = lambda cx: np.stack([cx + 0.08 * np.cos(a6), 0.42 + 0.03 * np.sin(a6)], -1)
  a12 = np.linspace(np.pi, 3 * np.pi, 12, endpoint=False)
  outer = np.stack([0.5 + 0.15 * np.cos(a12), 0.75 + 0.06 * np.sin(a12)], -1)
  a8 = np.linspace(np.pi, 3 * np.pi, 8, endpoint=False)
  inner = np.stack([0.5 + 0.1 * np.cos(a8), 0.75 + 0.03 * np.sin(a8)], -1)
  return np.concatenate([jaw, brow(0.2), brow(0.55), nose, nostrils,
                         eye(0.33), eye(0.67), outer, inner])


def synthetic_faces(seed: int, num_examples: int, size: int,
                    num_classes: int) -> dict[str, np.ndarray]:
  """A learnable toy face set: ``image`` (M, size, size, 1) in [0, 1],
  ``landmarks`` (M, 68, 2) pixels, ``emotion`` (M,) int32 (it sets the mouth's
  opening and the brows' height, so the emotion is visible), ``has_landmarks``
  and ``weight`` ones."""
  rng = np.random.default_rng(seed)
  emotion = rng.integers(0, num_classes, num_examples).astype(np.int32)
  pts = np.repeat(_template()[None], num_examples, 0)
  level = (emotion / max(num_classes - 1, 1) - 0.5)[:, None]
  mouth = list(lm.MOUTH)
  centre_y = pts[:, mouth, 1].mean(1, keepdims=True)
  pts[:, mouth, 1] = centre_y + (pts[:, mouth, 1] - centre_y) * (1 + 1.2 * level)
  pts[:, 17:27, 1] -= 0.04 * level
  scale = 1 + rng.normal(0, 0.05, (num_examples, 1, 1))
  shift = rng.normal(0, 0.03, (num_examples, 1, 2))
  pts = 0.5 + (pts - 0.5) * scale + shift + rng.normal(0, 0.005, pts.shape)
  lms = (pts * (size - 1)).astype(np.float32)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  sigma2 = (0.04 * size) ** 2
  d2 = ((xx[None, None] - lms[..., 0, None, None]) ** 2
        + (yy[None, None] - lms[..., 1, None, None]) ** 2)       # (M, 68, H, W)
  img = np.exp(-d2 / (2 * sigma2)).sum(1)
  img = img / img.max(axis=(1, 2), keepdims=True)
  img = 0.2 + 0.6 * img + rng.normal(0, 0.05, img.shape)
  ones = np.ones(num_examples, np.float32)
  return {"image": np.clip(img, 0, 1).astype(np.float32)[..., None],
          "landmarks": lms, "emotion": emotion,
          "has_landmarks": ones, "weight": ones.copy()}


def batch_indices(seed: int, num_examples: int, batch_size: int,
                  steps: int) -> list[np.ndarray]:
  """Epoch-wise seeded shuffles cut into ``steps`` full batches."""
  per_epoch = num_examples // batch_size
  out = []
  for epoch in range(-(-steps // per_epoch)):
    perm = np.random.default_rng([seed, epoch]).permutation(num_examples)
    out += [perm[i * batch_size:(i + 1) * batch_size] for i in range(per_epoch)]
  return out[:steps]


# ----------------------------------------------------------------------------
# Variants: one run each, stepped in lock step.
# ----------------------------------------------------------------------------
OptimizerFactory = Callable[[Case], Any]


@dataclasses.dataclass(frozen=True)
class Variant:
  """``framework``: "jax" or "torch"; ``devices``: JAX mesh size;
  ``perturb_ulp``: start 1 ulp up (+1) or down (-1) from the shared init;
  ``optimizer``: torch optimiser factory (None:
  ``tml.torch.optim.make_optimizer``, optax's rules)."""
  name: str
  framework: str
  devices: int = 1
  perturb_ulp: int = 0
  optimizer: OptimizerFactory | None = None
  description: str = ""


def _native(case: Case):
  if case.optimizer == "adam":
    return optim.TorchOptimizer(torch.optim.Adam, case.learning_rate)
  return optim.TorchOptimizer(torch.optim.SGD, case.learning_rate,
                              momentum=case.momentum)


def _wrong_a(case: Case):
  if case.optimizer == "adam":      # eps inside the square root (eps_root)
    return optim.OptaxAdam(case.learning_rate, eps=0.0, eps_root=1e-8)
  # torch's dampening: buf = m * buf + (1 - m) * g, an EMA of the gradient
  return optim.TorchOptimizer(torch.optim.SGD, case.learning_rate,
                              momentum=case.momentum, dampening=case.momentum)


def _wrong_b(case: Case):
  if case.optimizer == "adam":      # torch.optim.AdamW: default weight_decay 0.01
    return optim.TorchOptimizer(torch.optim.AdamW, case.learning_rate)
  return optim.OptaxSGD(case.learning_rate, momentum=case.momentum, nesterov=True)


VARIANTS = {
    "jax": Variant("jax", "jax", description="JAX step, one device (the base)"),
    "torch": Variant("torch", "torch",
                     description="torch step, optax's rules (tml.torch.optim)"),
    "jax_2dev": Variant("jax_2dev", "jax", devices=2,
                        description="JAX step on 2 devices: per-step rounding "
                        "reference"),
    "jax_ulp": Variant("jax_ulp", "jax", perturb_ulp=1,
                       description="JAX step from the init + 1 ulp: one-off "
                       "rounding reference"),
    "jax_ulp_down": Variant("jax_ulp_down", "jax", perturb_ulp=-1,
                            description="JAX step from the init - 1 ulp"),
    "torch_ulp": Variant("torch_ulp", "torch", perturb_ulp=1,
                         description="torch step (optax rules) from the init "
                         "+ 1 ulp"),
    "torch_native": Variant("torch_native", "torch", optimizer=_native,
                            description="torch step, torch.optim.Adam / SGD"),
    "wrong_a": Variant("wrong_a", "torch", optimizer=_wrong_a,
                       description="Adam: eps inside the sqrt (eps_root=1e-8, "
                       "eps=0); SGD: torch dampening = momentum"),
    "wrong_b": Variant("wrong_b", "torch", optimizer=_wrong_b,
                       description="Adam: torch.optim.AdamW defaults (decoupled "
                       "weight decay 0.01); SGD: Nesterov momentum"),
}


def _flat(tree) -> tuple[list[str], np.ndarray]:
  flat = flax.traverse_util.flatten_dict(flax.core.unfreeze(tree), sep=".")
  names = sorted(flat)
  return names, np.concatenate([np.asarray(flat[k], np.float32).ravel()
                                for k in names])


def _perturb(params, ulps: int):
  """Every weight moved ``ulps`` (+-1) ulp; 0 leaves ``params`` as they are."""
  if not ulps:
    return params
  to = np.float32(np.inf if ulps > 0 else -np.inf)
  return jax.tree.map(lambda p: np.nextafter(p, to).astype(np.float32), params)


class _JaxRun:

  def __init__(self, case: Case, params0, variant: Variant):
    devices = jax.devices()[:variant.devices]
    if len(devices) < variant.devices:
      raise RuntimeError(f"variant {variant.name} needs {variant.devices} "
                         f"devices; this process has {len(devices)}")
    if case.batch_size % variant.devices:
      raise ValueError("batch size must divide over the devices")
    self.mesh = parallel.make_mesh(devices)
    model = models.build_model(case.model, **case.model_kwargs)
    tx = ts.make_optimizer(case.optimizer, case.learning_rate,
                           momentum=case.momentum,
                           trainable=case.stage.trainable)
    params0 = _perturb(params0, variant.perturb_ulp)
    state = ts.init_state(params0, tx, jax.random.key(0),
                          case.stage.early_stopping_k)
    self.state = parallel.replicate(state, self.mesh)
    self.step_fn = ts.make_train_step(model, tx, case.task, case.stage,
                                      self.mesh, learning_rate=case.learning_rate)

  def step(self, batch) -> float:
    self.state, m = self.step_fn(self.state, parallel.global_batch(batch, self.mesh))
    return float(m["loss/total"])

  def params(self):
    return jax.device_get(self.state.params)


class _TorchRun:

  def __init__(self, case: Case, params0, variant: Variant):
    self.template = params0
    model = twins.build_torch_model(case.model, **case.model_kwargs)
    tx = (variant.optimizer(case) if variant.optimizer is not None else
          optim.make_optimizer(case.optimizer, case.learning_rate,
                               momentum=case.momentum))
    self.state = step_lib.init_state(
        model, _perturb(params0, variant.perturb_ulp), tx, trainable=case.stage.trainable,
        early_stopping_k=case.stage.early_stopping_k)
    self.step_fn = step_lib.make_train_step(tx, case.task, case.stage,
                                            learning_rate=case.learning_rate)

  def step(self, batch) -> float:
    self.state, m = self.step_fn(self.state, batch)
    return m["loss/total"]

  def params(self):
    return convert.torch_to_flax(self.state.model, self.template)


def _make_run(case, params0, variant):
  if variant.framework == "jax":
    return _JaxRun(case, params0, variant)
  if variant.framework == "torch":
    return _TorchRun(case, params0, variant)
  raise ValueError(f"framework {variant.framework!r}")


def compare_steps(steps: int, count: int = 40) -> list[int]:
  """Log-spaced steps 1..steps (plus 0) at which parameters are compared."""
  pts = np.round(np.geomspace(1, steps, count)).astype(int)
  pts = np.unique(np.concatenate([pts, [s for s in (1, 10, 100) if s <= steps]]))
  return [0] + [int(p) for p in pts]


def run_case(case: Case, steps: int, *, seed: int = 0,
             variants: Sequence[str] = ("jax", "torch"),
             param_steps: Sequence[int] | None = None,
             threads: int | None = None) -> dict[str, Any]:
  """Trains every variant of ``case`` for ``steps`` steps in lock step.

  Returns a JSON-able dict: ``case``; ``variants`` (descriptions);
  ``loss[v]`` (steps,) per variant; ``wall_s[v]``; and per non-base variant
  ``vs_base[v]``: ``rel_loss_diff`` (steps,), ``param_steps`` and, at
  those steps (parameters after that many updates), ``param_max_abs`` and
  ``param_rel_l2``; plus ``param_moved_rel_l2`` (the base's distance from
  its init, for scale) and ``param_count``.
  """
  if threads:
    torch.set_num_threads(threads)
  variants = [VARIANTS[v] if isinstance(v, str) else v for v in variants]
  if (variants[0].framework != "jax" or variants[0].devices != 1
      or variants[0].perturb_ulp):
    raise ValueError("the first variant is the base and must be the plain JAX run")
  torch.manual_seed(seed)
  model = models.build_model(case.model, **case.model_kwargs)
  shape = (1, case.task.image_size, case.task.image_size, 1)
  if case.task.kind == "expression":
    shape = (1, case.task.crop_size, case.task.crop_size, 1)
  params0 = jax.tree.map(np.array, jax.device_get(models.init_params(model, shape, seed)))
  data = synthetic_faces(seed, case.num_examples, case.task.image_size,
                         case.task.num_classes)
  order = batch_indices(seed, case.num_examples, case.batch_size, steps)
  runs = {v.name: _make_run(case, params0, v) for v in variants}
  base = variants[0].name
  param_steps = sorted(set(param_steps if param_steps is not None
                           else compare_steps(steps)) | {0, steps})
  _, p0 = _flat(params0)
  loss = {v: [] for v in runs}
  wall = {v: 0.0 for v in runs}
  par = {v: {"param_steps": [], "param_max_abs": [], "param_rel_l2": []}
         for v in runs if v != base}
  moved = []

  def compare(step_count):
    _, pb = _flat(runs[base].params())
    norm = float(np.linalg.norm(pb))
    moved.append(float(np.linalg.norm(pb - p0)) / norm)
    for v, r in runs.items():
      if v == base:
        continue
      _, pv = _flat(r.params())
      d = pv - pb
      par[v]["param_steps"].append(step_count)
      par[v]["param_max_abs"].append(float(np.abs(d).max()))
      par[v]["param_rel_l2"].append(float(np.linalg.norm(d)) / norm)

  compare(0)
  for i, idx in enumerate(order):
    batch = {k: np.ascontiguousarray(v[idx]) for k, v in data.items()}
    for v, r in runs.items():
      t0 = time.perf_counter()
      loss[v].append(r.step(batch))
      wall[v] += time.perf_counter() - t0
    if i + 1 in param_steps and i + 1 != 0:
      compare(i + 1)

  lb = np.asarray(loss[base])
  vs = {}
  for v in par:
    lv = np.asarray(loss[v])
    rel = np.abs(lv - lb) / np.maximum(np.abs(lb), 1e-30)
    vs[v] = dict(par[v], rel_loss_diff=rel.tolist(), summary=summarise(
        rel, par[v]["param_steps"], par[v]["param_rel_l2"]))
  return {"case": dict(name=case.name, **case.describe()), "steps": steps,
          "seed": seed, "param_count": int(p0.size),
          "variants": {v.name: v.description for v in variants},
          "loss": {v: list(map(float, l)) for v, l in loss.items()},
          "wall_s": wall, "param_steps": par[next(iter(par))]["param_steps"] if par else [],
          "param_moved_rel_l2": moved, "vs_base": vs}


def summarise(rel_loss: np.ndarray, param_steps: Sequence[int],
              param_rel: Sequence[float]) -> dict[str, Any]:
  """Where the divergence starts and how fast it grows.

  ``first_step_rel_loss_above``: the first step (1-based) whose relative
  loss difference exceeds 1e-6 / 1e-4 / 1e-2 (None: never);
  ``rel_loss_diff_at``: at steps 1, 10, 100 and the last; ``max_rel_loss_diff``
  over the run and over the first ``min(100, steps)`` steps;
  ``param_rel_l2_at``: after 1, 10, 100 updates and at the end;
  ``param_growth_per_100_steps``: the fitted factor by which the parameter
  difference grows per 100 steps (log-linear least squares over the compared
  steps >= 10).
  """
  rel_loss = np.asarray(rel_loss)
  n = len(rel_loss)
  first = {}
  for thr in (1e-6, 1e-4, 1e-2):
    hit = np.nonzero(rel_loss > thr)[0]
    first[f"{thr:g}"] = int(hit[0]) + 1 if hit.size else None
  at = {str(s): float(rel_loss[s - 1]) for s in (1, 10, 100, n) if s <= n}
  steps_ = np.asarray(param_steps)
  prel = np.asarray(param_rel, np.float64)
  p_at = {str(s): float(prel[steps_ == s][0]) for s in (1, 10, 100, n)
          if (steps_ == s).any()}
  sel = (steps_ >= 10) & (prel > 0)
  growth = None
  if sel.sum() >= 3:
    slope = np.polyfit(steps_[sel], np.log10(prel[sel]), 1)[0]
    growth = float(10 ** (100 * slope))
  return {"first_step_rel_loss_above": first, "rel_loss_diff_at": at,
          "max_rel_loss_diff": float(rel_loss.max()),
          "max_rel_loss_diff_first_100": float(rel_loss[:100].max()),
          "param_rel_l2_at": p_at, "param_growth_per_100_steps": growth}


# ----------------------------------------------------------------------------
# Figure.
# ----------------------------------------------------------------------------
_STYLE = {"torch": ("C1", "-"), "jax_2dev": ("C2", "-"), "jax_ulp": ("C2", ":"),
          "jax_ulp_down": ("C2", "--"), "torch_ulp": ("C9", ":"),
          "torch_native": ("C4", "--"), "wrong_a": ("C3", "-."),
          "wrong_b": ("C5", "-.")}


def plot(results: Sequence[Mapping[str, Any]], path) -> None:
  """Loss curves (top), relative loss difference (middle) and parameter
  difference (bottom) against step, log scale, one column per case."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  cols = len(results)
  fig, axes = plt.subplots(3, cols, figsize=(4.6 * cols, 10), squeeze=False)
  for c, res in enumerate(results):
    steps = np.arange(1, res["steps"] + 1)
    ax = axes[0, c]
    ax.plot(steps, res["loss"]["jax"], "k-", lw=1.5, label="jax")
    if "torch" in res["loss"]:
      ax.plot(steps, res["loss"]["torch"], "C1--", lw=1, label="torch")
    ax.set_yscale("log")
    ax.set_title(f"{res['case']['name']} ({res['case']['optimizer']})")
    ax.set_ylabel("training loss")
    ax.legend(fontsize=8)
    for v, d in res["vs_base"].items():
      color, ls = _STYLE.get(v, ("C7", "-"))
      rel = np.maximum(np.asarray(d["rel_loss_diff"]), 1e-10)
      axes[1, c].plot(steps, rel, color=color, ls=ls, lw=0.8, label=v)
      prel = np.maximum(np.asarray(d["param_rel_l2"][1:]), 1e-12)
      axes[2, c].plot(d["param_steps"][1:], prel, color=color, ls=ls,
                      marker=".", ms=3, lw=1, label=v)
    axes[1, c].set_ylabel("|L - L_jax| / L_jax")
    axes[2, c].set_ylabel("||p - p_jax|| / ||p_jax||")
    for r in (1, 2):
      axes[r, c].set_yscale("log")
      axes[r, c].set_xscale("log")
      axes[r, c].grid(True, which="major", alpha=0.3)
    axes[2, c].set_xlabel("step")
    axes[1, c].legend(fontsize=7)
  fig.suptitle("JAX vs PyTorch trajectory parity (float32, CPU); references: "
               "jax_2dev (per-step rounding), jax_ulp (init + 1 ulp)", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
