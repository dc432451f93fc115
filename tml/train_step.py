"""The one train step and the one eval step, shared by every experiment.

A step is written per device and mapped over the data axis of the mesh with
``jax.shard_map``. The loss is a dict of named per-example terms, each reduced
to its global-batch mean (``psum`` of weighted sums over ``psum`` of weights,
so 1 device and N devices agree), weighted by the stage's weights (0 = off)
and summed. The Chu Eq. 4 early-stopping state lives in the train state and is
updated from the global emotion loss, so it stays identical on every device;
by default it sums that loss over the epoch and pushes the epoch's mean into
its window at the epoch's last step (``StageSpec.steps_per_epoch``).

A step whose loss or gradient is not finite is not applied: the state keeps
the last good parameters and records the first bad step and which terms were
bad, and the training loop stops with that diagnostic.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax
import jax
import jax.numpy as jnp
import optax
from jax import lax
from jax.sharding import PartitionSpec as P

from tml import augment as augment_lib
from tml import early_stopping
from tml import losses
from tml import parallel
from tml import preprocess
from tml import targets

# Fixed order of the loss terms: the non-finite bitmask indexes it.
TERMS = ("unet", "landmark", "emotion", "maps")
# Terms averaged over the examples with landmarks only (weight x
# has_landmarks); "maps" carries DeVries' v_n inside `losses.pixel_bce` and
# keeps the paper's mean over the whole batch.
LANDMARK_TERMS = ("unet", "landmark")


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; a pytree, checkpointed as a whole.

  ``rng`` holds raw key data (uint32) so it checkpoints like any array.
  ``first_nonfinite`` is -1 until a step produces a non-finite loss or
  gradient; ``nonfinite_terms`` is a bitmask over :data:`TERMS` (bit 4 =
  gradient) for that step.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  early_stop: early_stopping.EarlyStopState
  rng: jax.Array
  first_nonfinite: jax.Array
  nonfinite_terms: jax.Array


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """How a batch becomes model inputs and targets (static per run).

  kind: 'thermal' (Chu: N x N crops, landmark regression + heatmap) or
    'expression' (DeVries: 48 x 48 faces, crops, label maps).
  """
  kind: str
  image_size: int
  num_classes: int
  crop_size: int = 0               # expression: network input (42)
  augment: bool = False
  max_shift: float = 0.0
  max_rotate_deg: float = 0.0
  max_zoom: float = 1.0
  flip: bool = False
  integer_shift: bool = False      # whole-pixel translations (random crops)
  ten_crop: bool = False
  emotion_loss: str = "mse"
  brow_width: float = 1.0
  batch_standardise: bool = False

  @property
  def input_size(self) -> int:
    return self.crop_size if self.kind == "expression" else self.image_size


@dataclasses.dataclass(frozen=True)
class StageSpec:
  """One training stage: loss weights and which top-level params train.

  trainable: top-level parameter collections to update (e.g. ('unet',) for
  Chu stage 1); None trains everything.
  """
  name: str
  weights: Mapping[str, float]
  epochs: int
  trainable: tuple[str, ...] | None = None
  early_stopping_k: int = 0
  early_stopping_epsilon: float = 0.0
  # Eq. 4's E(i): "epoch" = mean emotion loss of epoch i (pushed at the last
  # step of every epoch), "step" = each step's batch loss. The loop sets
  # steps_per_epoch from its iterator; 1 makes the two units coincide.
  early_stopping_unit: str = "epoch"
  steps_per_epoch: int = 1

  def weight(self, term: str) -> float:
    return float(self.weights.get(term, 0.0))


def make_schedule(peak: float, *, kind: str = "constant", steps_per_epoch: int = 1,
                  total_steps: int = 1, warmup_epochs: float = 0.0,
                  final_fraction: float = 0.0, step_epochs: int = 0,
                  step_factor: float = 0.1) -> Callable[[jax.Array], jax.Array]:
  """The learning rate of one stage as a function of its step (an optax schedule).

  Linear warm-up to ``peak`` over ``warmup_epochs`` (rounded to whole steps;
  step s runs at ``peak * (s + 1) / warm``), then ``kind``: "constant"; "cosine" from ``peak`` down to
  ``final_fraction * peak`` at ``total_steps``; "step": ``peak`` times
  ``step_factor`` after every ``step_epochs`` epochs (counted from the start
  of the stage, warm-up included).
  """
  warm = int(round(warmup_epochs * steps_per_epoch))
  rest = max(int(total_steps) - warm, 1)
  if kind == "constant":
    main = optax.constant_schedule(peak)
  elif kind == "cosine":
    main = optax.cosine_decay_schedule(peak, rest, alpha=final_fraction)
  elif kind == "step":
    every = step_epochs * steps_per_epoch
    if every <= 0:
      raise ValueError("a step schedule needs step_epochs > 0")
    boundaries = {b - warm: step_factor for b in range(every, int(total_steps) + every, every)
                  if b > warm}
    main = optax.piecewise_constant_schedule(peak, boundaries)
  else:
    raise ValueError(f"unknown schedule {kind!r}; expected constant, cosine or step")
  if warm == 0:
    return main
  # Step s < warm runs at peak * (s + 1) / warm: no wasted step at rate 0.
  ramp = optax.linear_schedule(peak / warm, peak, max(warm - 1, 1))
  return optax.join_schedules([ramp, main], [warm])


def make_optimizer(name: str, learning_rate, *, momentum: float = 0.9,
                   nesterov: bool = False, weight_decay: float = 0.0,
                   trainable: tuple[str, ...] | None = None
                   ) -> optax.GradientTransformation:
  """Adam (Chu) or SGD with momentum (DeVries); frozen params get zero updates.

  ``learning_rate``: a float or a schedule (``make_schedule``). Weight decay
  is L2 added to the gradient before the optimiser (classic SGD weight decay;
  for Adam this is not AdamW).
  """
  if name == "adam":
    base = optax.adam(learning_rate)
  elif name == "sgd":
    base = optax.sgd(learning_rate, momentum=momentum, nesterov=nesterov)
  else:
    raise ValueError(f"unknown optimizer {name!r}; expected adam or sgd")
  if weight_decay:
    base = optax.chain(optax.add_decayed_weights(weight_decay), base)
  if trainable is None:
    return base

  def labels(params):
    missing = set(trainable) - set(params)
    if missing:
      raise ValueError(f"trainable collections {sorted(missing)} not in params "
                       f"(top-level keys: {sorted(params)})")
    return {k: jax.tree.map(lambda _, k=k: "train" if k in trainable else "freeze", v)
            for k, v in params.items()}
  return optax.multi_transform({"train": base, "freeze": optax.set_to_zero()}, labels)


def init_state(params, tx: optax.GradientTransformation, rng: jax.Array,
               early_stopping_k: int) -> TrainState:
  """A fresh state for a stage. ``rng`` is a typed key or raw key data."""
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    rng = jax.random.key_data(rng)
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(params),
      early_stop=early_stopping.init_state(max(early_stopping_k, 2)),
      rng=jnp.asarray(rng, jnp.uint32),
      first_nonfinite=jnp.full((), -1, jnp.int32),
      nonfinite_terms=jnp.zeros((), jnp.int32),
  )


@jax.jit
def param_norm(params) -> jax.Array:
  """Global L2 norm of the parameters, for the log.

  Not part of the step's metrics: it is a pass over every parameter, and
  computed every step it took 10-20 ms of a 136-150 ms DeVries step at batch
  8 on 2 CPU cores (BENCHMARKS.md). ``tml.train``'s loop adds it to the
  metrics of the steps it logs.
  """
  return _tree_norm(params)


def _tree_norm(tree) -> jax.Array:
  """Global L2 norm of a pytree: ``optax.tree.norm`` up to float rounding.

  XLA:CPU lowers a large sum to a scalar tree of reduce-windows that reads
  ~0.3 GB/s (~50 ms for the 16M-weight DeVries map layer, twice a step on 2
  cores); there a big leaf's sum of squares is instead the trace of the 8x8
  Gram matrix of the leaf viewed as ``(n / 8, 8)``, a matrix product that
  runs at memory speed. Other backends sum the squares directly.
  """
  def sum_sq(x):
    x = x.astype(jnp.float32)
    if x.size < 2**16 or x.size % 8:
      return jnp.sum(x * x)
    gram_trace = lambda y: jnp.trace(lax.dot_general(
        y, y, (((0,), (0,)), ((), ())), precision=lax.Precision.HIGHEST))
    return lax.platform_dependent(x.reshape(-1, 8), cpu=gram_trace,
                                  default=lambda y: jnp.sum(y * y))
  leaves = jax.tree.leaves(tree)
  return jnp.sqrt(sum(sum_sq(x) for x in leaves)) if leaves else jnp.float32(0)


def _global_mean(values, weights, total_weight):
  """This device's share of the global weighted mean (sums to it over devices)."""
  return jnp.sum(weights * values.astype(jnp.float32)) / jnp.maximum(total_weight, 1e-12)


def step_keys(rng, step, device_index) -> tuple[jax.Array, jax.Array]:
  """``(augmentation key, dropout key)`` of a train step on one device.

  ``fold_in(fold_in(key(rng), step), device_index)``, split in two: fresh
  draws every step, independent per device. ``rng`` is the state's raw key
  data. The torch engine derives its shared draws from device 0's keys.
  """
  key = jax.random.wrap_key_data(rng)
  key = jax.random.fold_in(jax.random.fold_in(key, step), device_index)
  aug_key, drop_key = jax.random.split(key)
  return aug_key, drop_key


def prepare_inputs(task: TaskSpec, rng, batch, *, train: bool, axis_name=None):
  """Augments (train only) and returns ``(images, landmarks_px)`` at network size."""
  images, lms = batch["image"], batch["landmarks"]
  if task.kind == "expression":
    out = (task.crop_size, task.crop_size)
    if train and task.augment:
      images, lms = augment_lib.augment(
          rng, images, lms, out_size=out, max_shift=task.max_shift,
          max_rotate_deg=task.max_rotate_deg, max_zoom=task.max_zoom, flip=task.flip,
          integer_shift=task.integer_shift)
    else:
      offset = (task.image_size - task.crop_size) / 2
      images = augment_lib.center_crop(images, out)
      lms = lms - jnp.floor(offset)
  elif train and task.augment:
    n = (task.image_size, task.image_size)
    images, lms = augment_lib.augment(
        rng, images, lms, out_size=n, max_shift=task.max_shift,
        max_rotate_deg=task.max_rotate_deg, max_zoom=task.max_zoom, flip=task.flip)
  if task.batch_standardise:
    images = preprocess.batch_standardise(images, weights=batch["weight"],
                                          axis_name=axis_name)
  return images, lms


def per_example_terms(task: TaskSpec, stage: StageSpec, outputs, images, lms, batch):
  """The named per-example loss terms ``(B,)`` that the stage needs."""
  terms = {}
  n = images.shape[1]
  if stage.weight("unet") > 0:
    heat = targets.chu_heatmap(lms, n, n)
    terms["unet"] = losses.unet_loss(outputs["heatmap"], heat)
  if stage.weight("landmark") > 0:
    terms["landmark"] = losses.landmark_mse(outputs["landmarks"], lms / n)
  if stage.weight("emotion") > 0:
    fn = losses.emotion_mse if task.emotion_loss == "mse" else losses.emotion_xent
    terms["emotion"] = fn(outputs["emotion_logits"], batch["emotion"])
  if stage.weight("maps") > 0:
    maps = targets.devries_label_maps(lms, n, n, brow_width=task.brow_width)
    terms["maps"] = losses.pixel_bce(outputs["maps"], maps, batch["has_landmarks"])
  return terms


def make_train_step(model, tx: optax.GradientTransformation, task: TaskSpec,
                    stage: StageSpec, mesh, learning_rate=None) -> Callable:
  """Returns ``step(state, batch) -> (state, metrics)``, jitted, state donated.

  ``batch``: dict of global arrays sharded on axis 0 (``parallel.global_batch``)
  with ``image`` (B,H,W,C) float32, ``landmarks`` (B,68,2) pixels, ``emotion``
  (B,) int32, ``has_landmarks`` (B,) float32, ``weight`` (B,) float32.
  ``metrics``: flat dict of replicated scalars. Traced exactly once per stage
  (asserted). ``learning_rate``: the float or schedule given to the optimiser,
  logged as ``learning_rate`` (None: read from ``tx`` where it exposes it).
  """
  use_es = stage.early_stopping_k > 0 and stage.weight("emotion") > 0
  epsilon = jnp.float32(stage.early_stopping_epsilon)
  if stage.early_stopping_unit not in early_stopping.UNITS:
    raise ValueError(f"early_stopping_unit {stage.early_stopping_unit!r}: expected "
                     f"one of {', '.join(early_stopping.UNITS)}")
  if stage.steps_per_epoch < 1:
    raise ValueError(f"steps_per_epoch must be >= 1, got {stage.steps_per_epoch}")
  lr = _learning_rate_of(tx) if learning_rate is None else (
      learning_rate if callable(learning_rate)
      else (lambda step, v=jnp.float32(learning_rate): v))

  traces = [0]

  def device_step(state: TrainState, batch):
    # One compile per stage: a retrace means a shape/dtype/static change that
    # would silently recompile every few steps.
    traces[0] += 1
    if traces[0] > 1:
      raise AssertionError(
          f"train step of stage {stage.name!r} traced {traces[0]} times; it must "
          f"compile once (batch shapes or dtypes changed?)")
    aug_key, drop_key = step_keys(state.rng, state.step,
                                  lax.axis_index(parallel.AXIS))
    images, lms = prepare_inputs(task, aug_key, batch, train=True,
                                 axis_name=parallel.AXIS)
    w = batch["weight"].astype(jnp.float32)
    total_w = lax.psum(jnp.sum(w), parallel.AXIS)
    # Landmark terms average over the examples that have landmarks (FER2013
    # faces the labeller missed, frames with missing points: emotion only).
    w_lm = w * batch["has_landmarks"].astype(jnp.float32)
    total_lm = lax.psum(jnp.sum(w_lm), parallel.AXIS)
    emotion_on = 1.0 - state.early_stop.stopped.astype(jnp.float32)

    def loss_fn(params):
      outputs = model.apply({"params": params}, images, train=True,
                            rngs={"dropout": drop_key})
      per_ex = per_example_terms(task, stage, outputs, images, lms, batch)
      local = {k: (_global_mean(v, w_lm, total_lm) if k in LANDMARK_TERMS
                   else _global_mean(v, w, total_w)) for k, v in per_ex.items()}
      total = 0.0
      for name, value in local.items():
        scale = stage.weight(name) * (emotion_on if name == "emotion" and use_es else 1.0)
        total = total + scale * value
      return total, local

    (loss_local, terms_local), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params)
    # No explicit psum of grads: params enter replicated (invariant over the
    # axis), so shard_map's varying-axis AD already sums their cotangent over
    # devices. The loss is each device's share of the global mean, so that
    # sum is the gradient of the global-batch loss (tested: 1 vs 4 devices).
    terms = lax.psum(terms_local, parallel.AXIS)
    total = lax.psum(loss_local, parallel.AXIS)
    grad_norm = _tree_norm(grads)

    # Eq. 4 on the global emotion loss (identical on every device). It
    # records the number of stage steps done when it fires; the mask above
    # reads the old flag, so the emotion term goes off from the next step.
    es_state, criterion = state.early_stop, jnp.float32(0.0)
    if use_es and stage.early_stopping_unit == "epoch":
      epoch_end = (state.step + 1) % stage.steps_per_epoch == 0
      es_state, criterion, _ = early_stopping.update_epoch(
          state.early_stop, terms["emotion"], epsilon, epoch_end=epoch_end,
          step=state.step + 1)
    elif use_es:
      es_state, criterion, _ = early_stopping.update(
          state.early_stop, terms["emotion"], epsilon, step=state.step + 1)

    bad_bits = jnp.int32(0)
    for i, name in enumerate(TERMS):
      if name in terms:
        bad_bits |= jnp.where(jnp.isfinite(terms[name]), 0, 1 << i).astype(jnp.int32)
    bad_bits |= jnp.where(jnp.isfinite(grad_norm), 0, 1 << len(TERMS)).astype(jnp.int32)
    finite = bad_bits == 0

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree.map(
        lambda a, b: jnp.where(finite, a, b), new, old)
    first_bad = jnp.where((state.first_nonfinite < 0) & ~finite,
                          state.step, state.first_nonfinite)
    new_state = TrainState(
        step=state.step + 1,
        params=keep(new_params, state.params),
        opt_state=keep(opt_state, state.opt_state),
        early_stop=keep(es_state, state.early_stop),
        rng=state.rng,
        first_nonfinite=first_bad,
        nonfinite_terms=jnp.where(state.first_nonfinite < 0, bad_bits,
                                  state.nonfinite_terms),
    )
    metrics = {f"loss/{k}": v for k, v in terms.items()}
    metrics.update({
        "loss/total": total,
        "grad_norm": grad_norm,
        "learning_rate": jnp.float32(lr(state.step)),
        "nonfinite": (~finite).astype(jnp.float32),
    })
    if use_es:
      metrics["early_stop/criterion"] = criterion
      metrics["early_stop/stopped"] = new_state.early_stop.stopped.astype(jnp.float32)
    return new_state, metrics

  mapped = parallel.map_over_devices(
      device_step, mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=(P(), P()))
  return jax.jit(mapped, donate_argnums=(0,))


def _learning_rate_of(tx) -> Callable[[jax.Array], jax.Array]:
  """The stage's learning rate as a function of the step (constant here)."""
  lr = getattr(tx, "learning_rate", None)
  if callable(lr):
    return lr
  value = jnp.float32(lr if lr is not None else jnp.nan)
  return lambda step: value


def make_eval_step(model, task: TaskSpec, mesh) -> Callable:
  """Returns ``eval_step(params, batch) -> predictions`` (global, batch-sharded).

  Predictions: ``landmarks`` (B,68,2) pixels in the network-input frame
  (thermal) when the model has them; ``emotion_probs`` (B,C) softmax, averaged
  over the 10 test-time crops when ``task.ten_crop``.
  """
  def device_eval(params, batch):
    preds = {}
    if task.kind == "expression" and task.ten_crop:
      crops = augment_lib.ten_crops(batch["image"], (task.crop_size, task.crop_size))
      b, t = crops.shape[:2]
      crops = crops.reshape((b * t,) + crops.shape[2:])
      if task.batch_standardise:
        crops = preprocess.batch_standardise(
            crops, weights=jnp.repeat(batch["weight"], t), axis_name=parallel.AXIS)
      out = model.apply({"params": params}, crops, train=False)
      probs = jax.nn.softmax(out["emotion_logits"].astype(jnp.float32))
      preds["emotion_probs"] = probs.reshape(b, t, -1).mean(axis=1)
      return preds
    images, _ = prepare_inputs(task, None, batch, train=False, axis_name=parallel.AXIS)
    out = model.apply({"params": params}, images, train=False)
    if "landmarks" in out:
      preds["landmarks"] = out["landmarks"].astype(jnp.float32) * images.shape[1]
    if "emotion_logits" in out:
      preds["emotion_probs"] = jax.nn.softmax(out["emotion_logits"].astype(jnp.float32))
    return preds

  mapped = parallel.map_over_devices(
      device_eval, mesh, in_specs=(P(), P(parallel.AXIS)), out_specs=P(parallel.AXIS))
  return jax.jit(mapped)


def nonfinite_names(bits: int) -> list[str]:
  """Decodes ``TrainState.nonfinite_terms`` into term names."""
  names = [f"loss/{t}" for i, t in enumerate(TERMS) if bits & (1 << i)]
  if bits & (1 << len(TERMS)):
    names.append("gradient")
  return names
