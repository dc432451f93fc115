"""Engines: the state and the step of one framework, for tml.train's one loop.

``--framework=jax`` (default) trains with the jitted shard_map step of
``tml.train_step``; ``--framework=torch`` with the PyTorch twins
(``tml.torch.trainer``, the optional ``torch`` extra, imported only then).
The loop, data, stages, evaluation and reports are ``tml.train``'s for both.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from tml import parallel
from tml import protocol
from tml import train_step as step_lib
from tml.config import Config
from tml.config import ConfigError


class JaxEngine:
  """The JAX step: ``tml.train_step``'s state, replicated over the mesh.

  The engine interface (``tml.torch.trainer.TorchEngine`` has the same):
  ``init_state(stage, params, schedule, rng, split_index)``,
  ``make_step(stage, schedule) -> step(state, host_batch) -> (state,
  metrics)``, ``checkpoint_tree(state)`` (the pytree a checkpoint holds) and
  ``restore(tree, state)``. A state has ``step``, ``params`` (a Flax tree),
  ``early_stop``, ``first_nonfinite`` and ``nonfinite_terms``.
  """

  def __init__(self, cfg: Config, model, task, mesh):
    self.cfg, self.model, self.task, self.mesh = cfg, model, task, mesh

  def _optimizer(self, stage, schedule):
    cfg = self.cfg
    return step_lib.make_optimizer(cfg.optimizer, schedule, momentum=cfg.momentum,
                                   nesterov=cfg.nesterov,
                                   weight_decay=cfg.weight_decay,
                                   trainable=stage.trainable)

  def init_state(self, stage, params, schedule, rng, split_index):
    del split_index
    state = step_lib.init_state(params, self._optimizer(stage, schedule), rng,
                                stage.early_stopping_k)
    return parallel.replicate(state, self.mesh)

  def make_step(self, stage, schedule):
    step_fn = step_lib.make_train_step(self.model, self._optimizer(stage, schedule),
                                       self.task, stage, self.mesh,
                                       learning_rate=schedule)

    def step(state, batch):
      return step_fn(state, parallel.global_batch(batch, self.mesh))
    return step

  def info(self) -> dict[str, Any]:
    return {"framework": "jax", "devices": int(self.mesh.devices.size),
            "platform": jax.devices()[0].platform}

  def checkpoint_tree(self, state):
    return state

  def copy_state(self, state):
    """An independent copy (the step donates its state; `tml.monitor` steps
    a copy to time the bare step without touching the run)."""
    return jax.tree.map(jnp.copy, state)

  def restore(self, tree, state):
    del state
    return tree


def make_engine(cfg: Config, model, task, mesh, data: protocol.Dataset):
  """The engine of ``cfg.framework``."""
  if cfg.framework == "jax":
    return JaxEngine(cfg, model, task, mesh)
  try:
    from tml.torch import trainer as torch_trainer
  except ImportError as e:
    raise ConfigError(f"--framework=torch needs PyTorch ({e}); install the "
                      'torch extra: pip install -e ".[torch]"') from None
  return torch_trainer.TorchEngine(cfg, model, task, mesh, data.num_classes)
