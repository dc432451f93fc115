"""Data parallelism: one mesh axis over every device of every host.

Steps are written per device and mapped with ``jax.shard_map`` (what pmap is
built on in current JAX). Inside a mapped function the batch axis is local to
the device; reductions over the global batch use ``lax.psum`` / ``lax.pmean``
over :data:`AXIS`.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXIS = "data"


def initialize_distributed(coordinator_address: str = "", num_processes: int = 0,
                           process_id: int = -1) -> None:
  """Multi-host start-up (TPU VM pods, multi-node GPU).

  On a TPU VM every argument can stay empty: JAX discovers the slice from the
  environment. Elsewhere pass all three.
  """
  # CPU processes need gloo for cross-process collectives (used by the
  # tested 2-process CPU recipe); GPU and TPU backends ignore this option.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  kwargs = {}
  if coordinator_address:
    kwargs = dict(coordinator_address=coordinator_address,
                  num_processes=num_processes, process_id=process_id)
  jax.distributed.initialize(**kwargs)


def barrier(name: str) -> None:
  """All processes wait here (no-op in a single-process run)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named :data:`AXIS` over all (or the given) devices."""
  devices = list(jax.devices() if devices is None else devices)
  return Mesh(np.asarray(devices), (AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Puts a host pytree on every device of the mesh (same value everywhere)."""
  return jax.device_put(tree, replicated(mesh))


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> one global array per field, sharded on axis 0.

  Every process passes its own ``global_batch_size / process_count`` rows (the
  input pipeline's per-process slice); the result is the global batch.
  """
  sharding = batch_sharded(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def to_host(tree: Any) -> Any:
  """Fetches (fully addressable or replicated) arrays to numpy on this host.

  Batch-sharded outputs of a multi-host run are gathered across processes
  first so that process 0 sees every prediction.
  """
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))
  return jax.tree.map(fetch, tree)


def map_over_devices(fn: Callable, mesh: Mesh, in_specs, out_specs) -> Callable:
  """``jax.shard_map`` of a per-device function along :data:`AXIS`."""
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)


def check_batch_divisible(global_batch_size: int, mesh: Mesh, flag: str) -> None:
  n = mesh.size
  if global_batch_size % n:
    raise ValueError(f"--{flag}={global_batch_size}: the global batch must be "
                     f"divisible by the number of devices ({n})")
