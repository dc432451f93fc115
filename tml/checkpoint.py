"""Checkpoints: one small wrapper around orbax's CheckpointManager.

A checkpoint step directory holds two items:

* ``state``: a pytree of ``jax.Array`` (params, optimizer state, early-stopping
  state, step, rng), written with ``StandardSave`` and restored against a
  template so that dtypes and shardings come back exactly, replicated
  ``NamedSharding(mesh, PartitionSpec())`` arrays included. Typed PRNG keys
  (``jax.random.key``, any impl) are handled natively by orbax 0.12: it
  stores the key data plus the impl name in ``state/array_metadatas`` and
  re-wraps them on restore, so no ``key_data`` workaround is needed.
* ``meta``: a small JSON dict (data-iterator state, stage name, epoch, ...).
  Unlike orbax's ``JsonSave`` (written by the primary process only) every
  process writes its own ``meta/process_<i>-of-<n>.json`` and reads back its
  own, because grain iterator states differ per process in multi-host runs.

Atomicity: orbax writes ``<step>.orbax-checkpoint-tmp`` and renames it to
``<step>`` only after every item is written (``commit_success.txt`` is written
*inside* the tmp directory before the rename, so only the name marks a step
complete on a local or POSIX file system). A run killed mid-save leaves a tmp
directory that step listing ignores; it is deleted by the next ``save``.

Typical loop::

  ckpt = Checkpointer(workdir / "ckpt", save_interval_steps=1000)
  restored = ckpt.restore_latest(state)
  if restored is not None:
    step, state, meta = restored
  with PreemptionWatcher() as watcher:
    while step < total:
      state = train_step(state, batch); step += 1
      stop = watcher.should_stop(step)
      ckpt.save(step, state, meta_fn(), force=stop)
      if stop:
        break
  ckpt.close()  # waits for the async write to finish
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import threading
from typing import Any, Iterable, Mapping

from etils import epath
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from tml import paths

_log = logging.getLogger(__name__)

STATE = "state"
META = "meta"


# ----------------------------------------------------------------------------
# The per-process JSON item.
# ----------------------------------------------------------------------------


def _meta_filename(index: int, count: int) -> str:
  return f"process_{index}-of-{count}.json"


class _ProcessJsonHandler(ocp.CheckpointHandler):
  """Writes one JSON file per process into the item directory.

  Synchronous on purpose: the dict is tiny and orbax runs non-async handlers
  in a thread during the blocking part of the save.
  """

  def save(self, directory: epath.Path, args: _ProcessJsonSave):
    name = _meta_filename(jax.process_index(), jax.process_count())
    (directory / name).write_text(args.item)

  def restore(self, directory: epath.Path,
              args: _ProcessJsonRestore | None = None) -> dict[str, Any]:
    del args
    name = _meta_filename(jax.process_index(), jax.process_count())
    path = directory / name
    if not path.exists():
      # Restarted with another process count (e.g. a 1-host eval of a 4-host
      # run): process 0's file still gives the stage and epoch, though its
      # iterator state is not this process's.
      candidates = sorted(directory.glob("process_0-of-*.json"))
      if not candidates:
        raise FileNotFoundError(f"no meta file {path}")
      _log.warning("checkpoint meta %s missing; using %s", path,
                   candidates[0])
      path = candidates[0]
    return json.loads(path.read_text())


@ocp.args.register_with_handler(_ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class _ProcessJsonSave(ocp.args.CheckpointArgs):
  item: str  # already-serialised JSON: a snapshot taken at save() time


@ocp.args.register_with_handler(_ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class _ProcessJsonRestore(ocp.args.CheckpointArgs):
  pass


# ----------------------------------------------------------------------------
# Checkpointer.
# ----------------------------------------------------------------------------


def _abstract(leaf: Any) -> Any:
  """Template leaf -> what StandardRestore needs (shape, dtype, sharding)."""
  if isinstance(leaf, jax.Array):
    # Keeps typed-key dtypes (key<fry>) and the exact sharding.
    return jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=leaf.sharding)
  return leaf


class Checkpointer:
  """Saves and restores (step, state pytree, meta dict) with orbax.

  Every process must call ``save`` and ``restore_latest`` (orbax synchronises
  the processes and writes each process's shards). Saves are asynchronous:
  ``save`` returns once the arrays are copied off the device (so the caller may
  donate or overwrite its buffers) and the files are written in a background
  thread; ``wait`` or ``close`` blocks until they are committed.
  """

  def __init__(self,
               directory: str | os.PathLike[str],
               *,
               max_to_keep: int | None = 3,
               save_interval_steps: int | None = 1000,
               async_save: bool = True,
               read_only: bool = False):
    """Opens (creating if needed) a checkpoint directory.

    Args:
      directory: where step directories go; local path or any epath URL
        (``gs://...``, kept as the URL: orbax writes the arrays through
        tensorstore, which speaks gs:// itself, and the small files through
        epath). Local paths are made absolute (orbax requires it).
      max_to_keep: number of most recent checkpoints kept; None keeps all.
      save_interval_steps: ``save`` writes when ``step % interval == 0``; None
        or 0 means only forced (and multi-host preemption) saves.
      async_save: write in a background thread (orbax's default).
      read_only: for readers of a directory that a training run may be
        writing (eval, predict): never saves, prunes, or deletes the tmp
        directory of a save in progress.
    """
    directory = os.fspath(directory)
    if paths.looks_collapsed(directory):
      # pathlib made gs://b/r into gs:/b/r: every host would write its
      # shards into a local folder named gs:.
      raise ValueError(f"checkpoint directory {directory!r} is a URL that "
                       "lost its '//' (pathlib); pass the gs://... string")
    if not paths.is_url(directory):
      directory = os.path.abspath(directory)
    self.directory = epath.Path(directory)
    policies = []
    if save_interval_steps:
      policies.append(
          ocp.checkpoint_managers.FixedIntervalPolicy(int(save_interval_steps)))
    # Orbax's default also has InitialSavePolicy (save the first step of a
    # fresh run whatever the interval); we want exactly "interval or forced".
    # The preemption policy makes `save` write at the JAX preemption sync
    # point of multi-host runs even when the caller did not force it.
    policies.append(ocp.checkpoint_managers.PreemptionCheckpointingPolicy())
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=ocp.checkpoint_managers.AnySavePolicy(policies),
        preservation_policy=ocp.checkpoint_managers.LatestN(n=max_to_keep),
        create=not read_only,
        # Leftovers of a killed save are never listed as steps; this also
        # deletes them (in the background, awaited by the next save).
        cleanup_tmp_directories=not read_only,
        read_only=read_only,
        enable_async_checkpointing=async_save,
    )
    self._read_only = read_only
    self._manager = ocp.CheckpointManager(
        self.directory, item_names=(STATE, META), options=options)

  # -- queries ---------------------------------------------------------------

  def latest_step(self) -> int | None:
    """The newest complete step, or None when there is none."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """All complete steps on disk (after pruning), ascending."""
    return sorted(self._manager.all_steps())

  def should_save(self, step: int) -> bool:
    """Whether ``save(step, ...)`` without force would write."""
    return self._manager.should_save(int(step))

  def reached_preemption(self, step: int) -> bool:
    """Orbax/JAX multi-host preemption sync point (False single-process)."""
    return self._manager.reached_preemption(int(step))

  # -- save / restore --------------------------------------------------------

  def save(self, step: int, state: Any, meta: Mapping[str, Any], *,
           force: bool = False) -> bool:
    """Saves ``state`` and ``meta`` as ``step`` if on the interval or forced.

    Args:
      step: the number of completed train steps the state corresponds to.
      state: pytree of jax arrays (flax dicts, optax states and
        ``flax.struct`` dataclasses are all fine).
      meta: JSON-serialisable dict; it is serialised here, so mutating it after
        the call does not change what is written.
      force: save regardless of the interval (preemption, end of a stage).

    Returns:
      Whether a checkpoint was started. A step that already exists (say a
      forced save right after the interval save of the same step) is not
      written again and gives False.
    """
    step = int(step)
    meta_json = json.dumps(dict(meta), sort_keys=True, allow_nan=True)
    if self._read_only or step in self._manager.all_steps():
      return False
    return self._manager.save(
        step,
        args=ocp.args.Composite(**{
            STATE: ocp.args.StandardSave(state),
            META: _ProcessJsonSave(meta_json),
        }),
        force=force)

  def restore(self, step: int, state_template: Any
              ) -> tuple[Any, dict[str, Any]]:
    """Restores ``step`` into the structure of ``state_template``.

    Args:
      step: an existing step.
      state_template: a pytree with the same structure as the saved state:
        either concrete arrays (e.g. the freshly initialised state) or
        ``jax.ShapeDtypeStruct`` leaves carrying the target sharding (e.g.
        from ``jax.eval_shape``). Restored arrays get the template's dtype and
        sharding; a ShapeDtypeStruct without sharding lands on device 0.

    Returns:
      ``(state, meta)``.
    """
    abstract = jax.tree.map(_abstract, state_template)
    restored = self._manager.restore(
        int(step),
        args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract),
            META: _ProcessJsonRestore(),
        }))
    return restored[STATE], dict(restored[META])

  def restore_latest(self, state_template: Any
                     ) -> tuple[int, Any, dict[str, Any]] | None:
    """``(step, state, meta)`` of the newest complete checkpoint, or None."""
    step = self.latest_step()
    if step is None:
      return None
    state, meta = self.restore(step, state_template)
    return step, state, meta

  # -- lifecycle -------------------------------------------------------------

  def wait(self) -> None:
    """Blocks until every started save is committed (renamed into place)."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases orbax's threads."""
    self._manager.close()

  def __enter__(self) -> Checkpointer:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


# ----------------------------------------------------------------------------
# Preemption.
# ----------------------------------------------------------------------------


def _jax_preemption_service_active() -> bool:
  """True when jax.distributed runs a preemption sync manager."""
  # pylint: disable-next=g-import-not-at-top,protected-access
  from jax._src import distributed
  state = distributed.global_state
  return (state.client is not None
          and getattr(state, "preemption_sync_manager", None) is not None)


class PreemptionWatcher:
  """Turns a preemption notice into a flag the training loop polls.

  Single process: installs handlers for SIGTERM (and SIGINT when asked) that
  set ``requested``; the loop checks ``should_stop(step)`` after every step,
  saves with ``force=True``, waits for the write and exits. The previous
  handlers come back on ``uninstall`` / leaving the ``with`` block. A second
  SIGINT raises KeyboardInterrupt, so Ctrl-C twice still quits at once.

  Multi-host (``jax.distributed`` with its preemption service, the default):
  JAX's C++ notifier owns SIGTERM and agrees on one step at which *all*
  processes stop; a Python handler would replace it, and a per-process flag
  would make processes stop at different steps and dead-lock in the
  collective save. So no handler is installed and ``should_stop(step)`` asks
  ``multihost_utils.reached_preemption_sync_point(step)`` (what orbax's
  ``CheckpointManager.reached_preemption`` calls). Every process must call
  it once per step with the same step numbers.
  """

  def __init__(self, *, catch_sigint: bool = False,
               use_jax_sync: bool | None = None):
    """Configures the watcher (nothing is installed yet).

    Args:
      catch_sigint: also turn the first Ctrl-C into a clean save-and-exit.
      use_jax_sync: use JAX's multi-host preemption sync point instead of
        Python signal handlers; None decides from whether jax.distributed's
        preemption service is running.
    """
    self._signals: tuple[int, ...] = (signal.SIGTERM,)
    if catch_sigint:
      self._signals += (signal.SIGINT,)
    self._use_jax_sync = use_jax_sync
    self._previous: dict[int, Any] = {}
    self.requested = False
    self.signal_name: str | None = None

  @property
  def uses_jax_sync(self) -> bool:
    if self._use_jax_sync is None:
      return _jax_preemption_service_active()
    return self._use_jax_sync

  def _handle(self, signum: int, frame: Any) -> None:
    del frame
    if signum == signal.SIGINT and self.requested:
      raise KeyboardInterrupt
    self.requested = True
    self.signal_name = signal.Signals(signum).name
    # Only set a flag here: a handler runs between bytecodes of arbitrary
    # code, so it must not save or log through locks the loop may hold.

  def install(self) -> PreemptionWatcher:
    """Installs the handlers (no-op under JAX sync or off the main thread)."""
    if self._previous or self.uses_jax_sync:
      return self
    if threading.current_thread() is not threading.main_thread():
      _log.warning("PreemptionWatcher: not on the main thread; signals are "
                   "not caught")
      return self
    for signum in self._signals:
      self._previous[signum] = signal.signal(signum, self._handle)
    return self

  def uninstall(self) -> None:
    """Puts the previous handlers back."""
    for signum, handler in self._previous.items():
      signal.signal(signum, handler)
    self._previous = {}

  def __enter__(self) -> PreemptionWatcher:
    return self.install()

  def __exit__(self, *exc) -> None:
    self.uninstall()

  def should_stop(self, step: int) -> bool:
    """Call once per step on every process: True means save and exit now.

    The answer is sticky: once True it stays True.
    """
    if not self.requested and self.uses_jax_sync:
      try:
        if multihost_utils.reached_preemption_sync_point(int(step)):
          self.requested = True
          self.signal_name = "jax_preemption_sync"
      except RuntimeError:  # preemption service disabled by config
        pass
    return self.requested


__all__: Iterable[str] = ("Checkpointer", "PreemptionWatcher")
