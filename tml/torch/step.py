"""The PyTorch train step: the twin of ``tml.train_step.make_train_step``.

Part of the optional ``torch`` extra. Same contract as the JAX step, so one
training loop can drive either: ``step(state, batch) -> (state, metrics)``
with ``batch`` the host batch of ``tml.input_pipeline`` (numpy ``image``
(B,H,W,C) float32, ``landmarks`` (B,68,2) pixels, ``emotion`` (B,) int,
``has_landmarks`` (B,) and ``weight`` (B,) float32) and ``metrics`` the same
flat dict of scalars (``loss/<term>``, ``loss/total``, ``grad_norm``,
``learning_rate``, ``nonfinite``, and with Eq. 4 ``early_stop/criterion`` /
``early_stop/stopped``), here as Python floats. (``param_norm`` is added by
the loop on the steps it logs, for both frameworks.)

What it computes, term by term as the JAX step does:

  * inputs (``prepare_inputs`` without augmentation): expression tasks take
    the centred crop (landmarks shifted by ``floor((size - crop) / 2)``) and
    the batch standardisation with the example weights;
  * the named per-example terms of ``per_example_terms`` with the twins of
    ``tml.torch.twins`` / ``tml.torch.inputs``; ``unet`` and ``landmark``
    averaged over ``weight * has_landmarks``, ``emotion`` and ``maps`` over
    ``weight`` (the global weighted means of ``_global_mean``); each term
    times its stage weight, the emotion term also times ``1 - stopped``;
  * Eq. 4 early stopping with ``tml.early_stopping`` itself (jitted, on the
    host, from the step's emotion loss: the same state and the same
    numbers as the JAX step's);
  * the optimiser of ``tml.torch.optim`` (optax's update rules) on the
    trainable top-level modules only (``StageSpec.trainable``), the others
    frozen;
  * the non-finite guard: a step whose loss terms or gradient norm are not
    finite is not applied (parameters, optimiser and early-stopping state
    keep their old values) and ``first_nonfinite`` / ``nonfinite_terms``
    record it with the JAX step's bitmask.

Augmentation is not done here: the draws must be the JAX step's, so the
caller passes the augmented inputs as ``net_image`` / ``net_landmarks``
(``tml.torch.trainer`` makes them with the JAX input code); without them an
augmenting task is refused. Dropout likewise: a batch with ``dropout_keep``
(the JAX step's keep mask of the hidden layer,
``tml.models.dropout_keep_masks``) drops those units; without it the twin
draws its own masks from torch's generator (the same rate).

``TorchTrainState.model`` holds the parameters (updated in place); the step
returns the same state object, advanced. ``state.flax_params(template)``
converts them back to a Flax tree (for checkpoints, evaluation with the JAX
eval step, or ``results.json``).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from tml import early_stopping
from tml import train_step as jax_step
from tml.torch import convert
from tml.torch import inputs as inputs_lib
from tml.torch import twins

BATCH_KEYS = ("image", "landmarks", "emotion", "has_landmarks", "weight")
# Network inputs made elsewhere (``tml.torch.trainer``: by the JAX input code,
# so that augmentation draws are shared); when present they are used as is.
PREPARED_KEYS = ("net_image", "net_landmarks", "dropout_keep")


@dataclasses.dataclass
class TorchTrainState:
  """The torch counterpart of ``tml.train_step.TrainState``.

  ``model``: the twin, parameters included (``model.named_parameters()``);
  ``opt_state``: the optimiser's state (``tml.torch.optim``) over the
  trainable parameters; ``early_stop``: ``tml.early_stopping``'s state (jax
  arrays on the host); the rest as in the JAX state.
  """
  step: int
  model: nn.Module
  opt_state: dict
  early_stop: early_stopping.EarlyStopState
  first_nonfinite: int = -1
  nonfinite_terms: int = 0

  def flax_params(self, template: Mapping) -> dict:
    """The parameters as a Flax tree shaped like ``template``."""
    return convert.torch_to_flax(self.model, template)


def trainable_parameters(model: nn.Module, trainable: tuple[str, ...] | None
                         ) -> dict[str, nn.Parameter]:
  """``{name: param}`` of the top-level modules in ``trainable`` (None: all).

  Top-level module names are the Flax top-level parameter collections
  (``'unet'``, ``'head'``, ...), as ``tml.train_step.make_optimizer`` uses them.
  """
  params = dict(model.named_parameters())
  if trainable is None:
    return params
  tops = {n.split(".", 1)[0] for n in params}
  missing = set(trainable) - tops
  if missing:
    raise ValueError(f"trainable collections {sorted(missing)} not in params "
                     f"(top-level keys: {sorted(tops)})")
  return {n: p for n, p in params.items() if n.split(".", 1)[0] in trainable}


def init_state(model: nn.Module, flax_params: Mapping, tx, *,
               trainable: tuple[str, ...] | None = None,
               early_stopping_k: int = 0,
               device: torch.device | str | None = None) -> TorchTrainState:
  """A fresh state: ``flax_params`` loaded into ``model``, optimiser state.

  The same starting point as ``tml.train_step.init_state(flax_params, ...)``.
  """
  convert.flax_to_torch(flax_params, model)
  if device is not None:
    model.to(device)
  model.train()
  return TorchTrainState(
      step=0, model=model,
      opt_state=tx.init(trainable_parameters(model, trainable)),
      early_stop=early_stopping.init_state(max(early_stopping_k, 2)))


def to_tensors(batch: Mapping[str, np.ndarray], device) -> dict[str, torch.Tensor]:
  """The host batch as tensors on ``device`` (emotion ids as int64)."""
  out = {}
  for k in BATCH_KEYS + tuple(k for k in PREPARED_KEYS if k in batch):
    v = np.ascontiguousarray(batch[k])
    if k == "dropout_keep":
      t = torch.from_numpy(v.astype(bool, copy=False))
    else:
      t = torch.from_numpy(v.astype(np.int64) if k == "emotion" else
                           v.astype(np.float32, copy=False))
    out[k] = t.to(device)
  return out


def prepare_inputs(task: jax_step.TaskSpec, batch: Mapping[str, torch.Tensor]):
  """Twin of ``tml.train_step.prepare_inputs`` without augmentation.

  A batch with ``net_image`` / ``net_landmarks`` (``PREPARED_KEYS``) carries
  its network inputs already (augmented and standardised): they are used.
  """
  if "net_image" in batch:
    return batch["net_image"], batch["net_landmarks"]
  if task.augment:
    raise NotImplementedError(
        "the torch step does not augment: the augmentation draws must be "
        "sampled once and fed to both frameworks: pass them as net_image / "
        "net_landmarks (tml.torch.trainer does), or run with augment=False")
  images, lms = batch["image"], batch["landmarks"]
  if task.kind == "expression":
    images, lms = inputs_lib.center_crop_torch(images, lms, task.crop_size)
  if task.batch_standardise:
    images = inputs_lib.batch_standardise_torch(images, batch["weight"])
  return images, lms


def _weighted_mean(values, weights):
  """``_global_mean`` on one device: ``sum(w * v) / max(sum(w), 1e-12)``."""
  return (weights * values.float()).sum() / weights.sum().clamp(min=1e-12)


def _outputs(model: nn.Module, stage: jax_step.StageSpec, images,
             dropout_keep=None):
  # Stage 1 needs only the U-Net's map; the head's forward would be dead
  # work (XLA drops it from the JAX step too).
  only_unet = all(stage.weight(t) == 0 for t in ("landmark", "emotion", "maps"))
  if only_unet and hasattr(model, "unet"):
    with model.autocast(images.device.type):
      return {"heatmap": model.unet(images.permute(0, 3, 1, 2)).float()}
  if dropout_keep is not None:
    return model(images, train=True, dropout_keep=dropout_keep)
  return model(images, train=True)


def loss_terms(model: nn.Module, task: jax_step.TaskSpec,
               stage: jax_step.StageSpec, batch: Mapping[str, torch.Tensor],
               emotion_on: float | torch.Tensor = 1.0):
  """``(total, terms)``: the stage's weighted loss and its named terms.

  ``batch``: tensors (``to_tensors``). ``terms``: ``{name: ()}`` global
  means, unweighted, as the JAX step logs them; ``total`` = sum of
  ``stage.weight(name) * term`` (the emotion term times ``emotion_on``).
  Pure tensor code (``torch.compile``-able; the benchmark compiles it).
  """
  images, lms = prepare_inputs(task, batch)
  out = _outputs(model, stage, images, batch.get("dropout_keep"))
  w = batch["weight"].float()
  w_lm = w * batch["has_landmarks"].float()
  n = images.shape[1]
  per_ex = {}
  if stage.weight("unet") > 0:
    heat = inputs_lib.chu_heatmap_torch(lms, n, n)
    per_ex["unet"] = twins.unet_loss_torch(out["heatmap"], heat)
  if stage.weight("landmark") > 0:
    per_ex["landmark"] = twins.landmark_mse_torch(out["landmarks"], lms / n)
  if stage.weight("emotion") > 0:
    fn = (twins.emotion_mse_torch if task.emotion_loss == "mse"
          else twins.emotion_xent_torch)
    per_ex["emotion"] = fn(out["emotion_logits"], batch["emotion"])
  if stage.weight("maps") > 0:
    maps = inputs_lib.devries_label_maps_torch(lms, n, n, task.brow_width)
    per_ex["maps"] = twins.pixel_bce_torch(out["maps"], maps,
                                           batch["has_landmarks"])
  terms = {k: _weighted_mean(v, w_lm if k in jax_step.LANDMARK_TERMS else w)
           for k, v in per_ex.items()}
  total = images.new_zeros(())
  for name, value in terms.items():
    scale = stage.weight(name) * (emotion_on if name == "emotion" else 1.0)
    total = total + scale * value
  return total, terms


def _norm(tensors) -> torch.Tensor:
  tensors = list(tensors)
  if not tensors:
    return torch.zeros(())
  return torch.sqrt(sum((t.float() * t.float()).sum() for t in tensors))


def make_train_step(tx, task: jax_step.TaskSpec, stage: jax_step.StageSpec,
                    learning_rate=None) -> Callable:
  """Returns ``step(state, batch) -> (state, metrics)`` (see the module doc).

  ``tx``: an optimiser of ``tml.torch.optim``; ``learning_rate``: the float
  or schedule it was given, logged as ``learning_rate`` (None: ``tx``'s).
  ``batch``: a host batch (numpy) or ``to_tensors`` output.
  """
  use_es = stage.early_stopping_k > 0 and stage.weight("emotion") > 0
  if stage.early_stopping_unit not in early_stopping.UNITS:
    raise ValueError(f"early_stopping_unit {stage.early_stopping_unit!r}: "
                     f"expected one of {', '.join(early_stopping.UNITS)}")
  if stage.steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch must be >= 1, got {stage.steps_per_epoch}")
  lr = learning_rate if learning_rate is not None else tx.learning_rate
  epsilon = jnp.float32(stage.early_stopping_epsilon)
  es_update = jax.jit(early_stopping.update_epoch
                      if stage.early_stopping_unit == "epoch"
                      else early_stopping.update)

  def step(state: TorchTrainState, batch):
    model = state.model
    device = next(model.parameters()).device
    if not isinstance(batch.get("weight"), torch.Tensor):
      batch = to_tensors(batch, device)
    emotion_on = 1.0 - float(state.early_stop.stopped) if use_es else 1.0
    params = dict(model.named_parameters())
    for p in params.values():
      p.grad = None
    total, terms = loss_terms(model, task, stage, batch, emotion_on)
    total.backward()
    grads = {n: (p.grad if p.grad is not None else torch.zeros_like(p))
             for n, p in params.items()}
    grad_norm = float(_norm(grads.values()))
    terms = {k: float(v.detach()) for k, v in terms.items()}

    es_state, criterion = state.early_stop, 0.0
    if use_es:
      kwargs = {"step": state.step + 1}
      if stage.early_stopping_unit == "epoch":
        kwargs["epoch_end"] = (state.step + 1) % stage.steps_per_epoch == 0
      es_state, crit, _ = es_update(state.early_stop, jnp.float32(terms["emotion"]),
                                    epsilon, **kwargs)
      criterion = float(crit)

    bad = 0
    for i, name in enumerate(jax_step.TERMS):
      if name in terms and not np.isfinite(terms[name]):
        bad |= 1 << i
    if not np.isfinite(grad_norm):
      bad |= 1 << len(jax_step.TERMS)
    if bad == 0:
      train = trainable_parameters(model, stage.trainable)
      state.opt_state = tx.update(train, {n: grads[n] for n in train},
                                  state.opt_state)
      state.early_stop = es_state
    elif state.first_nonfinite < 0:
      state.first_nonfinite, state.nonfinite_terms = state.step, bad
    for p in params.values():
      p.grad = None
    lr_now = lr(state.step) if callable(lr) else lr
    metrics = {f"loss/{k}": v for k, v in terms.items()}
    metrics.update({
        "loss/total": float(total.detach()),
        "grad_norm": grad_norm,
        "learning_rate": float(np.float32(np.asarray(lr_now))),
        "nonfinite": float(bad != 0),
    })
    if use_es:
      metrics["early_stop/criterion"] = criterion
      metrics["early_stop/stopped"] = float(state.early_stop.stopped)
    state.step += 1
    return state, metrics

  return step

