"""``--framework=torch``: the PyTorch engine that ``tml.train``'s loop drives.

Part of the optional ``torch`` extra (``pip install -e ".[torch]"``). The
loop, the data, the stages, the evaluation and the reports are
``tml.train``'s own; only the step and its state differ:

  * the model is the twin of ``tml.torch.twins`` with the Flax init of the
    split loaded (``tml.torch.convert``), so both frameworks start from the
    same weights;
  * the optimiser is ``tml.torch.optim`` (optax's Adam / SGD update rules, in
    float32) over the same schedule function (``tml.train_step.make_schedule``);
  * the step is ``tml.torch.step.make_train_step``: the same loss terms,
    stage weights, landmark weighting, Eq. 4 early stopping and non-finite
    guard as the JAX step, the same metric names;
  * the batches are ``tml.input_pipeline``'s numpy batches in the same order;
  * with ``--augment`` the network inputs of every step are made by the JAX
    step's own input code (``tml.train_step.prepare_inputs``) from the same
    key the JAX step derives for that step on one device, so a torch run and
    a one-device JAX run see identical crops, rotations and flips;
  * dropout masks are shared too: every step's keep mask is Flax's own
    (``tml.models.dropout_keep_masks``, from the dropout key the one-device
    JAX step derives for that step), applied by the twin, so both frameworks
    drop the same units. Torch's generator (seeded from the run's seed,
    split and stage, checkpointed) is left for any draw outside that;
  * evaluation converts the parameters back to Flax and uses the JAX eval
    step, so both frameworks are scored by exactly the same code;
  * checkpoints go through ``tml.checkpoint.Checkpointer`` like the JAX
    state: parameters in Flax layout, the optimiser's slots, Eq. 4's state,
    the step, the input key and torch's RNG state, so a killed run resumes.

Refused (one line naming the option): multi-process runs (the torch step
trains on one device). The device is CUDA when torch sees one, else the CPU.
"""
from __future__ import annotations

import copy
import zlib
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import torch

from tml import export
from tml import models
from tml import train_step as jax_step
from tml.torch import convert
from tml.torch import optim
from tml.torch import step as torch_step
from tml.torch import twins


def _device() -> torch.device:
  return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class LoopState:
  """What ``tml.train``'s loop reads of a state, over a ``TorchTrainState``.

  ``params``: the parameters as a Flax tree (converted on access, cached per
  step); ``step``, ``early_stop``, ``first_nonfinite``, ``nonfinite_terms``:
  those of the torch state; ``rng``: the raw JAX key the input code uses.
  """

  def __init__(self, inner: torch_step.TorchTrainState, template, rng):
    self.inner, self.template, self.rng = inner, template, rng
    self._params: tuple[int, Any] | None = None

  step = property(lambda self: self.inner.step)
  early_stop = property(lambda self: self.inner.early_stop)
  first_nonfinite = property(lambda self: self.inner.first_nonfinite)
  nonfinite_terms = property(lambda self: self.inner.nonfinite_terms)

  @property
  def params(self):
    if self._params is None or self._params[0] != self.inner.step:
      self._params = (self.inner.step, convert.torch_to_flax(self.inner.model,
                                                             self.template))
    return self._params[1]


def shared_draws(task: jax_step.TaskSpec, flax_model, template,
                 dropout: bool) -> Callable | None:
  """``f(rng, step, batch) -> {name: array}``: the one-device JAX step's draws.

  From that step's keys (``tml.train_step.step_keys`` on device 0):
  ``net_image`` / ``net_landmarks``, its augmented network inputs (when the
  task augments), and ``dropout_keep``, the keep mask of the hidden layer
  that ``flax_model`` draws in that step (when ``dropout``). ``template``:
  the parameters' shapes (the masks do not depend on their values, so zeros
  stand in, and XLA drops the forward pass). None when there is nothing to
  share.
  """
  if not (task.augment or dropout):
    return None

  @jax.jit
  def f(rng, step, batch):
    aug_key, drop_key = jax_step.step_keys(rng, step, 0)
    images, lms = jax_step.prepare_inputs(task, aug_key, batch, train=True,
                                          axis_name=None)
    out = {}
    if task.augment:
      out["net_image"], out["net_landmarks"] = images, lms
    if dropout:
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), template)
      masks = models.dropout_keep_masks(flax_model, zeros, images, drop_key)
      if len(masks) != 1:
        raise NotImplementedError(
            f"the torch twins take one dropout mask; {type(flax_model).__name__} "
            f"draws {sorted(masks)}")
      out["dropout_keep"], = masks.values()
    return out
  return f


def _torch_seed(cfg, split_index: int, stage_name: str) -> int:
  return (cfg.seed * 1_000_003 + split_index * 7919
          + (zlib.crc32(stage_name.encode()) & 0xFFFF)) & 0x7FFFFFFF


class TorchEngine:
  """The torch side of ``tml.train``'s engine interface (see ``JaxEngine``)."""

  def __init__(self, cfg, model, task: jax_step.TaskSpec, mesh, num_classes: int):
    del mesh   # one torch device
    self.flax_model = model   # for the shared dropout masks; the twin trains
    if jax.process_count() > 1:
      raise ValueError("--framework=torch trains on one device: multi-process "
                       "runs (--multihost) are JAX only")
    self.cfg, self.task = cfg, task
    self.device = _device()
    self.twin_name, self.twin_kwargs = export.twin_kwargs_for(cfg, num_classes)
    if cfg.compute_dtype != "float32":
      self.twin_kwargs["dtype"] = cfg.compute_dtype
    self._dropout = cfg.model == "devries" and cfg.dropout > 0
    self._draws: Callable | None = None

  def info(self) -> dict[str, Any]:
    """For results.json: the torch build and device this engine trains on."""
    return {"framework": "torch", "torch": torch.__version__,
            "device": str(self.device), "threads": torch.get_num_threads()}

  # -- state -----------------------------------------------------------------

  def _optimizer(self, schedule):
    cfg = self.cfg
    return optim.make_optimizer(cfg.optimizer, schedule, momentum=cfg.momentum,
                                nesterov=cfg.nesterov, weight_decay=cfg.weight_decay)

  def init_state(self, stage: jax_step.StageSpec, params, schedule, rng,
                 split_index: int) -> LoopState:
    model = twins.build_torch_model(self.twin_name, **self.twin_kwargs)
    tx = self._optimizer(schedule)
    inner = torch_step.init_state(model, params, tx, trainable=stage.trainable,
                                  early_stopping_k=stage.early_stopping_k,
                                  device=self.device)
    torch.manual_seed(_torch_seed(self.cfg, split_index, stage.name))
    template = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype),
                            params)
    if self._draws is None:
      self._draws = shared_draws(self.task, self.flax_model, template,
                                 self._dropout) or (lambda *a: {})
    return LoopState(inner, template, np.asarray(jax.random.key_data(rng)))

  def make_step(self, stage: jax_step.StageSpec, schedule) -> Callable:
    tx = self._optimizer(schedule)
    step = torch_step.make_train_step(tx, self.task, stage, learning_rate=schedule)

    def run(state: LoopState, batch: Mapping[str, np.ndarray]):
      host = dict(batch)
      draws = self._draws(state.rng, jnp.int32(state.step),
                          {k: host[k] for k in torch_step.BATCH_KEYS})
      host.update({k: np.array(v) for k, v in draws.items()})   # writable
      state.inner, metrics = step(state.inner, host)
      return state, metrics
    return run

  def copy_state(self, state: LoopState) -> LoopState:
    """An independent copy (model, optimiser slots, counters); the step uses
    no torch RNG (its draws come from the JAX keys), so none is saved."""
    return LoopState(copy.deepcopy(state.inner), state.template, state.rng.copy())

  # -- checkpoints -------------------------------------------------------------

  def checkpoint_tree(self, state: LoopState) -> dict:
    """Everything a resumed run needs, as a pytree of arrays."""
    inner = state.inner
    slots = {k: [v[n].detach().cpu().numpy() for n in sorted(v)]
             for k, v in inner.opt_state.items() if isinstance(v, dict)}
    return {
        "step": np.asarray(inner.step, np.int32),
        "params": jax.tree.map(np.asarray, state.params),
        "opt": {"count": np.asarray(inner.opt_state["count"], np.int64),
                "slots": slots},
        "early_stop": jax.tree.map(np.asarray, inner.early_stop),
        "rng": np.asarray(state.rng),
        "torch_rng": torch.get_rng_state().numpy(),
        "first_nonfinite": np.asarray(inner.first_nonfinite, np.int32),
        "nonfinite_terms": np.asarray(inner.nonfinite_terms, np.int32),
    }

  def restore(self, tree: Mapping, state: LoopState) -> LoopState:
    inner = state.inner
    convert.flax_to_torch(jax.tree.map(np.asarray, tree["params"]), inner.model)
    inner.model.to(self.device)
    for k, values in tree["opt"]["slots"].items():
      names = sorted(inner.opt_state[k])
      for n, v in zip(names, values):
        inner.opt_state[k][n] = torch.as_tensor(np.asarray(v)).to(self.device)
    inner.opt_state["count"] = int(tree["opt"]["count"])
    inner.early_stop = jax.tree.map(jnp.asarray, tree["early_stop"])
    inner.step = int(tree["step"])
    inner.first_nonfinite = int(tree["first_nonfinite"])
    inner.nonfinite_terms = int(tree["nonfinite_terms"])
    torch.set_rng_state(torch.as_tensor(np.asarray(tree["torch_rng"], np.uint8)))
    state.rng = np.asarray(tree["rng"])
    state._params = None
    return state
