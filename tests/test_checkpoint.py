"""Tests for tml.checkpoint: round trips, pruning, atomicity, preemption."""
from __future__ import annotations

import os
import pathlib
import select
import signal
import socket
import subprocess
import sys
import textwrap
import time

import flax
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import optax
import pytest

from tml import checkpoint

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]


@flax.struct.dataclass
class EarlyStop:
  """Stand-in for the Eq. 4 early-stopping state carried in the train state."""
  ring: jax.Array
  count: jax.Array
  stopped: jax.Array


@jax.jit
def _make_state(seed: int | jax.Array = 0):
  # Jitted: one compilation instead of dozens of op-by-op ones.
  # The layout flax.linen gives nn.Sequential([Dense(8), relu, Dense(3)]);
  # built by hand because a real first init costs seconds of compilation.
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {
      "layers_0": {"kernel": jax.random.normal(k1, (5, 8)),
                   "bias": jnp.zeros((8,))},
      "layers_2": {"kernel": jax.random.normal(k2, (8, 3)),
                   "bias": jnp.zeros((3,), jnp.bfloat16)},
  }
  tx = optax.adam(1e-3)
  opt_state = tx.init(params)
  # One real update so adam's moments and count are not trivially zero.
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = optax.apply_updates(params, updates)
  return {
      "params": params,
      "opt_state": opt_state,
      "early_stop": EarlyStop(ring=jnp.arange(6, dtype=jnp.float32) + seed,
                              count=jnp.int32(6), stopped=jnp.bool_(True)),
      "step": jnp.int32(1234),
      "rng": jax.random.fold_in(jax.random.key(seed), 7),
  }


def _assert_trees_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    assert x.dtype == y.dtype
    assert x.sharding == y.sharding, (x.sharding, y.sharding)
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


META = {"stage": "stage2", "epoch": 3,
        "data": {"iterator": '{"last_seen_indices": {"0": 95}}', "seed": 1},
        "history": [1.5, 2.5]}


@pytest.fixture(scope="module")
def state():
  return _make_state(0)


def test_round_trip_realistic_state(tmp_path, state):
  with checkpoint.Checkpointer(tmp_path, save_interval_steps=10) as ckpt:
    assert ckpt.save(20, state, META)
    ckpt.wait()
  # A new process starts from a template of the same structure: here an
  # abstract one, as from jax.eval_shape of the init function.
  template = jax.eval_shape(_make_state, 1)
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    step, restored, meta = ckpt.restore_latest(template)
  assert step == 20
  assert meta == META
  assert isinstance(restored["early_stop"], EarlyStop)
  assert isinstance(restored["opt_state"][0], optax.ScaleByAdamState)
  assert jnp.issubdtype(restored["rng"].dtype, jax.dtypes.prng_key)
  assert restored["rng"].dtype == state["rng"].dtype  # same impl (threefry)
  _assert_trees_equal(state, restored)
  # Meta lives in one JSON file per process.
  assert (tmp_path / "20" / "meta" / "process_0-of-1.json").is_file()


def test_replicated_and_sharded_arrays_keep_their_sharding(tmp_path, state):
  assert jax.device_count() == 4  # tests/conftest.py
  mesh = Mesh(np.array(jax.devices()), ("data",))
  replicated = NamedSharding(mesh, P())
  batch = NamedSharding(mesh, P("data"))
  state = jax.device_put(state, replicated)
  state["per_device"] = jax.device_put(jnp.arange(8.0), batch)
  with checkpoint.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(1, state, {})
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    # Abstract template (what jax.eval_shape gives) and concrete template.
    for template in (jax.eval_shape(lambda: state), state):
      step, restored, _ = ckpt.restore_latest(template)
      assert step == 1
      _assert_trees_equal(state, restored)
      assert restored["params"]["layers_0"]["kernel"].is_fully_replicated
      assert restored["rng"].sharding == replicated
      assert restored["per_device"].sharding == batch


def test_restore_when_nothing_exists(tmp_path, state):
  with checkpoint.Checkpointer(tmp_path / "ckpt") as ckpt:
    assert ckpt.restore_latest(state) is None
    assert ckpt.latest_step() is None
    assert ckpt.all_steps() == []


def test_interval_and_force(tmp_path):
  state = {"x": jnp.zeros(3)}
  with checkpoint.Checkpointer(tmp_path, save_interval_steps=10,
                               max_to_keep=None) as ckpt:
    assert not ckpt.save(5, state, {})      # off interval, and no save of
    assert ckpt.save(10, state, {})         # the first step of a fresh run
    assert not ckpt.save(15, state, {})
    assert ckpt.save(17, state, {}, force=True)
    assert not ckpt.save(17, state, {}, force=True)  # exists: no error
    assert not ckpt.save(20 - 10, state, {}, force=True)
    assert ckpt.save(20, state, {})
    ckpt.wait()
    assert ckpt.should_save(30) and not ckpt.should_save(25)
    assert ckpt.all_steps() == [10, 17, 20]
    assert ckpt.latest_step() == 20


def test_keeps_last_n(tmp_path):
  with checkpoint.Checkpointer(tmp_path, max_to_keep=2,
                               save_interval_steps=1) as ckpt:
    for step in range(1, 6):
      assert ckpt.save(step, {"x": jnp.full((2,), step)}, {"step": step})
    ckpt.wait()
    assert ckpt.all_steps() == [4, 5]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["4", "5"]
  with checkpoint.Checkpointer(tmp_path) as ckpt:
    step, state, meta = ckpt.restore_latest({"x": jnp.zeros((2,), jnp.int32)})
  assert step == 5 and meta == {"step": 5}
  np.testing.assert_array_equal(state["x"], [5, 5])


def test_save_is_a_snapshot(tmp_path):
  # The caller may donate its buffers and mutate its meta right after save.
  state = {"w": jnp.ones((256, 256))}
  meta = {"epoch": 1}
  bump = jax.jit(lambda s: {"w": s["w"] + 1}, donate_argnums=0)
  with checkpoint.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(1, state, meta)
    state = bump(bump(state))
    meta["epoch"] = 99
    ckpt.wait()
    _, restored, restored_meta = ckpt.restore_latest(state)
  assert float(restored["w"][0, 0]) == 1.0
  assert restored_meta == {"epoch": 1}


def test_leftover_tmp_directory_is_ignored_then_cleaned(tmp_path):
  with checkpoint.Checkpointer(tmp_path, save_interval_steps=10) as ckpt:
    ckpt.save(10, {"x": jnp.ones(2)}, {"ok": True})
  # What a save killed before its final rename leaves behind; orbax writes
  # commit_success.txt before renaming, so even that must not count.
  tmp = tmp_path / "20.orbax-checkpoint-tmp"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "garbage").write_bytes(b"\x00" * 10)
  (tmp / "commit_success.txt").write_text("half")
  with checkpoint.Checkpointer(tmp_path, save_interval_steps=10) as ckpt:
    assert ckpt.all_steps() == [10]
    step, state, meta = ckpt.restore_latest({"x": jnp.zeros(2)})
    assert step == 10 and meta == {"ok": True}
    ckpt.save(30, {"x": jnp.ones(2)}, {})  # awaits the tmp cleanup
    ckpt.wait()
  assert not tmp.exists()


def test_read_only_never_writes_or_cleans(tmp_path):
  with checkpoint.Checkpointer(tmp_path, save_interval_steps=1) as ckpt:
    ckpt.save(1, {"x": jnp.ones(2)}, {})
  tmp = tmp_path / "2.orbax-checkpoint-tmp"  # a save still running elsewhere
  tmp.mkdir()
  with checkpoint.Checkpointer(tmp_path, read_only=True) as reader:
    assert reader.latest_step() == 1
    assert not reader.save(3, {"x": jnp.ones(2)}, {}, force=True)
  assert tmp.exists()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["1", tmp.name]


_KILLED_CHILD = textwrap.dedent("""
    import sys, time
    import jax.numpy as jnp
    from orbax.checkpoint._src.path import async_path
    from tml import checkpoint

    ckpt = checkpoint.Checkpointer(sys.argv[1], save_interval_steps=1)
    ckpt.save(1, {"w": jnp.full((64, 64), 1.0)}, {"step": 1})
    ckpt.wait()

    original_rename = async_path.rename
    async def rename_and_hang(src, dst):
      if dst.name != "2":  # the items' own tmp dirs are renamed first
        return await original_rename(src, dst)
      # Every item is in place and commit_success.txt is in the step's tmp
      # dir: the worst moment to die.
      print("finalizing", src, flush=True)
      time.sleep(600)
    async_path.rename = rename_and_hang
    ckpt.save(2, {"w": jnp.full((64, 64), 2.0)}, {"step": 2})
    ckpt.wait()
    print("not killed", flush=True)
""")


def _readline(proc, timeout):
  ready, _, _ = select.select([proc.stdout], [], [], timeout)
  return proc.stdout.readline() if ready else ""


def test_sigkill_mid_save_leaves_previous_checkpoint(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(tmp_path)],
                          stdout=subprocess.PIPE, text=True, env=env,
                          cwd=REPO_ROOT)
  try:
    line = _readline(proc, timeout=60)
    assert line.startswith("finalizing"), line
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()
  names = sorted(p.name for p in tmp_path.iterdir())
  assert names == ["1", "2.orbax-checkpoint-tmp"], names
  assert (tmp_path / "2.orbax-checkpoint-tmp" / "commit_success.txt").exists()
  with checkpoint.Checkpointer(tmp_path, read_only=True) as ckpt:
    step, state, meta = ckpt.restore_latest({"w": jnp.zeros((64, 64))})
  assert (step, meta) == (1, {"step": 1})
  assert float(state["w"][0, 0]) == 1.0


def test_sigterm_sets_flag_and_restores_handler():
  before = signal.getsignal(signal.SIGTERM)
  with checkpoint.PreemptionWatcher(use_jax_sync=False) as watcher:
    assert not watcher.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.monotonic() + 5
    while not watcher.requested and time.monotonic() < deadline:
      time.sleep(0.001)  # the Python-level handler runs between bytecodes
    assert watcher.requested
    assert watcher.should_stop(2) and watcher.should_stop(3)  # sticky
    assert watcher.signal_name == "SIGTERM"
  assert signal.getsignal(signal.SIGTERM) is before


def test_optional_sigint_second_one_interrupts():
  before = signal.getsignal(signal.SIGINT)
  watcher = checkpoint.PreemptionWatcher(catch_sigint=True, use_jax_sync=False)
  watcher.install()
  try:
    signal.raise_signal(signal.SIGINT)
    assert watcher.requested and watcher.signal_name == "SIGINT"
    with pytest.raises(KeyboardInterrupt):
      signal.raise_signal(signal.SIGINT)
  finally:
    watcher.uninstall()
  assert signal.getsignal(signal.SIGINT) is before


_JAX_SYNC_CHILD = textwrap.dedent("""
    import os, signal, sys, time
    import jax
    jax.distributed.initialize(coordinator_address="localhost:" + sys.argv[2],
                               num_processes=1, process_id=0)
    import jax.numpy as jnp
    from tml import checkpoint

    ckpt = checkpoint.Checkpointer(sys.argv[1], save_interval_steps=10**9)
    watcher = checkpoint.PreemptionWatcher().install()
    assert watcher.uses_jax_sync
    state = {"w": jnp.zeros(3)}
    deadline = time.monotonic() + 60
    step = 0
    while time.monotonic() < deadline:
      step += 1
      if step == 5:
        os.kill(os.getpid(), signal.SIGTERM)  # JAX's notifier, not Python's
      time.sleep(0.01)
      state = {"w": state["w"] + 1}
      stop = watcher.should_stop(step)
      saved = ckpt.save(step, state, {"step": step})  # not forced
      if stop:
        break
    ckpt.close()
    print("stopped" if stop else "timeout", step, saved, flush=True)
    jax.distributed.shutdown()
""")


def test_multihost_preemption_sync_point_on_cpu(tmp_path):
  # jax.distributed with one process runs the real preemption sync service.
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, PYTHONPATH=str(REPO_ROOT), JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, "-c", _JAX_SYNC_CHILD, str(tmp_path), str(port)],
      capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  outcome, step, saved = out.stdout.split()
  assert outcome == "stopped"
  assert int(step) > 5
  # Orbax's PreemptionCheckpointingPolicy saved at the sync step unforced.
  assert saved == "True"
  with checkpoint.Checkpointer(tmp_path, read_only=True) as ckpt:
    assert ckpt.all_steps() == [int(step)]
