"""Timed things of ``experiments.bench``: train steps, matmul peak, input pipeline.

Every runner has ``run(iters) -> seconds`` (synchronised at the end), a
``first_call()`` (compile + first step) and memory hooks; :func:`measure`
runs a list of them round-robin.
"""
from __future__ import annotations

import math
import os
import resource
import time
from typing import Any
class Runner:
  """Something timed round-robin: ``run(iters)`` returns elapsed seconds."""
  kind = "step"          # step | peak | pipeline | augment

  def __init__(self, name: str):
    self.name = name
    self.iters = 1
    self.raw: list[float] = []       # seconds per iteration, one per repeat
    self.info: dict[str, Any] = {}
    self.mem: list[dict] = []

  def first_call(self) -> float:
    start = time.perf_counter()
    self.run(1)
    return time.perf_counter() - start

  def run(self, iters: int) -> float:
    raise NotImplementedError

  def memory_reset(self) -> None:
    pass

  def memory_read(self) -> dict:
    return {}

  def close(self) -> None:
    pass


def _rss_reset() -> bool:
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


def _proc_status(key: str) -> int | None:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(key + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


class _CpuMemory:
  """RSS high-water mark during a runner's timed runs (CPU)."""

  def memory_reset(self):
    self._hwm_reset = _rss_reset()
    self._rss0 = _proc_status("VmRSS")

  def memory_read(self):
    hwm = _proc_status("VmHWM") if self._hwm_reset else None
    if hwm is None:   # no reset possible: the process's lifetime maximum
      hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"rss_peak_bytes": hwm,
            "rss_step_increase_bytes": (hwm - self._rss0) if self._rss0 else None,
            "rss_hwm_reset": self._hwm_reset}


class JaxStepRunner(_CpuMemory, Runner):
  """THE tml train step (shard_map over a 1-device mesh, state donated)."""

  def __init__(self, name, w: Workload, params, batch, mesh, task=None):
    super().__init__(name)
    import jax
    from tml import models, parallel
    from tml import train_step as ts
    self.jax = jax
    model = models.build_model(w.model, **w.model_kwargs,
                               dtype=models.compute_dtype(w.dtype))
    self.info["dtype"] = w.dtype
    stage = ts.StageSpec(w.stage_name, w.weights, epochs=1,
                         trainable=w.trainable)
    tx = ts.make_optimizer(w.optimizer, w.learning_rate,
                           momentum=w.momentum or 0.9, trainable=w.trainable)
    self.state = parallel.replicate(
        ts.init_state(params, tx, jax.random.key(1), 0), mesh)
    self.batch = parallel.global_batch(batch, mesh)
    self.step = ts.make_train_step(model, tx, task or w.task, stage, mesh)
    self.on_gpu = mesh.devices.flat[0].platform != "cpu"

  def first_call(self) -> float:
    start = time.perf_counter()
    self.state, metrics = self.step(self.state, self.batch)
    self.jax.block_until_ready((self.state, metrics))
    elapsed = time.perf_counter() - start
    metrics = self.jax.device_get(metrics)
    self.info["first_loss"] = float(metrics["loss/total"])
    self.info["first_loss_terms"] = {k[5:]: float(v) for k, v in metrics.items()
                                     if k.startswith("loss/") and k != "loss/total"}
    return elapsed

  def analyse(self) -> None:
    """XLA's cost and memory analysis of the compiled step (no retrace)."""
    start = time.perf_counter()
    compiled = self.step.lower(self.state, self.batch).compile()
    self.info["analysis_compile_s"] = time.perf_counter() - start
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
      cost = cost[0]
    cost = cost or {}
    self.info["flops_per_step"] = float(cost.get("flops", float("nan")))
    self.info["bytes_accessed_per_step"] = float(
        cost.get("bytes accessed", float("nan")))
    try:
      m = compiled.memory_analysis()
      self.info["xla_memory"] = {
          "argument_bytes": int(m.argument_size_in_bytes),
          "output_bytes": int(m.output_size_in_bytes),
          "alias_bytes": int(m.alias_size_in_bytes),
          "temp_bytes": int(m.temp_size_in_bytes),
          "step_total_bytes": int(m.argument_size_in_bytes + m.output_size_in_bytes
                                  - m.alias_size_in_bytes + m.temp_size_in_bytes)}
    except Exception as e:  # pylint: disable=broad-except
      self.info["xla_memory"] = {"error": repr(e)}

  def run(self, iters: int) -> float:
    start = time.perf_counter()
    for _ in range(iters):
      self.state, _ = self.step(self.state, self.batch)
    self.jax.block_until_ready(self.state)
    return time.perf_counter() - start

  def memory_reset(self):
    super().memory_reset()

  def memory_read(self):
    out = {} if self.on_gpu else super().memory_read()
    try:
      stats = self.jax.devices()[0].memory_stats() or {}
    except Exception:  # pylint: disable=broad-except
      stats = {}
    if "peak_bytes_in_use" in stats:
      out["device_peak_bytes_in_use"] = int(stats["peak_bytes_in_use"])
    return out

  def close(self):
    del self.state, self.batch


class TorchStepRunner(_CpuMemory, Runner):

  def __init__(self, name, w: Workload, params, batch, device, compile_):
    super().__init__(name)
    from experiments import bench_torch
    self.bt = bench_torch
    self.device = device
    self.impl = bench_torch.TorchStep(w, params, batch, device, compile=compile_)
    self.info["dtype"] = w.dtype
    self.info["autocast"] = self.impl.autocast_dtype

  def first_call(self) -> float:
    self.impl.sync()
    start = time.perf_counter()
    loss = self.impl.step()
    self.impl.sync()
    elapsed = time.perf_counter() - start
    self.info["first_loss"] = float(loss.detach())
    return elapsed

  def run(self, iters: int) -> float:
    return self.impl.run(iters)

  def memory_reset(self):
    if self.device.type == "cuda":
      self.bt.memory_reset(self.device)
    else:
      super().memory_reset()

  def memory_read(self):
    if self.device.type == "cuda":
      return {"device_peak_bytes": self.bt.memory_peak(self.device)}
    return super().memory_read()

  def close(self):
    del self.impl


class JaxMatmulRunner(Runner):
  """``n x n`` jnp.dot in ``dtype`` (bfloat16: bf16 operands and result)."""
  kind = "peak"

  def __init__(self, n: int, device, dtype: str = "float32"):
    super().__init__("jnp.dot")
    import jax
    import jax.numpy as jnp
    import numpy as np
    from tml import models
    self.jax, self.n = jax, n
    rng = np.random.default_rng(0)
    dt = models.compute_dtype(dtype)
    put = lambda x: jax.device_put(jnp.asarray(x, dt), device)
    self.a = put(rng.uniform(size=(n, n)))
    self.b = put(rng.uniform(size=(n, n)))
    self.f = jax.jit(jnp.dot)
    self.info.update(n=n, dtype=dtype)

  def run(self, iters):
    start = time.perf_counter()
    out = None
    for _ in range(iters):
      out = self.f(self.a, self.b)
    self.jax.block_until_ready(out)
    return time.perf_counter() - start


class TorchMatmulRunner(Runner):
  kind = "peak"

  def __init__(self, n: int, device, dtype: str = "float32"):
    super().__init__("torch.mm")
    from experiments import bench_torch
    self.f = bench_torch.matmul_runner(n, device, dtype)
    self.info.update(n=n, dtype=dtype)

  def run(self, iters):
    return self.f(iters)


class PipelineRunner(Runner):
  """BatchIterator (numpy) batches, optionally + host-to-device transfer."""
  kind = "pipeline"

  def __init__(self, name, w: Workload, arrays, mesh, transfer: bool):
    super().__init__(name)
    import jax
    from tml import input_pipeline, parallel
    self.jax, self.parallel, self.mesh = jax, parallel, mesh
    self.transfer = transfer
    n = len(arrays["image"])
    self.it = input_pipeline.BatchIterator(
        arrays, global_batch_size=w.batch_size, seed=0, shuffle=True,
        drop_remainder=True, prefetch=0)
    self.info.update(num_examples=n, batch_size=w.batch_size,
                     transfer=transfer)

  def run(self, iters):
    start = time.perf_counter()
    out = None
    for _ in range(iters):
      b = next(self.it)
      if self.transfer:
        out = self.parallel.global_batch(
            {k: b[k] for k in ("image", "landmarks", "emotion",
                               "has_landmarks", "weight")}, self.mesh)
    if out is not None:
      self.jax.block_until_ready(out)
    return time.perf_counter() - start

  def close(self):
    self.it.close()


class AugmentRunner(Runner):
  """``tml.augment.augment`` alone, jitted, outside the step."""
  kind = "augment"

  def __init__(self, w: Workload, batch, mesh):
    super().__init__("augment_only")
    import jax
    from tml import augment
    t = w.augment_task
    self.jax = jax
    dev = mesh.devices.flat[0]
    self.images = jax.device_put(batch["image"], dev)
    self.lms = jax.device_put(batch["landmarks"], dev)
    self.key = jax.random.key(0)
    self.f = jax.jit(lambda k, x, l: augment.augment(
        k, x, l, out_size=(t.crop_size, t.crop_size), max_shift=t.max_shift,
        max_rotate_deg=t.max_rotate_deg, max_zoom=t.max_zoom, flip=t.flip))
    self.i = 0

  def run(self, iters):
    start = time.perf_counter()
    out = None
    for _ in range(iters):
      self.i += 1
      out = self.f(self.jax.random.fold_in(self.key, self.i), self.images,
                   self.lms)
    self.jax.block_until_ready(out)
    return time.perf_counter() - start


# ============================================================================
# The interleaved measurement.
# ============================================================================
def loadavg():
  try:
    return round(os.getloadavg()[0], 2)
  except OSError:
    return None


def measure(runners: list[Runner], args, log, failures: dict) -> list:
  """First calls, warm-up, then ``repeats`` round-robin timed runs.

  A runner whose first call raises is dropped (removed from ``runners``)
  and its error stored in ``failures``. Returns the 1-minute load average
  after each repeat.
  """
  for r in list(runners):
    try:
      r.info["first_call_s"] = r.first_call()
    except Exception as e:  # pylint: disable=broad-except
      # One framework failing (say, torch.compile without a working
      # compiler toolchain) must not lose the other measurements.
      log(f"  {r.name:<16} FAILED: {e!r}")
      failures[r.name] = repr(e)
      runners.remove(r)
      r.close()
      continue
    log(f"  {r.name:<16} first call {r.info['first_call_s']:.2f} s")
  for r in runners:
    est = []
    for _ in range(max(args.warmup, 1)):
      est.append(r.run(1))
    per = min(est)
    r.info["warmup_s"] = est
    r.iters = max(1, math.ceil(args.min_time / max(per, 1e-6)))
    if r.kind in ("peak", "pipeline", "augment"):
      r.iters = max(r.iters, 3)
  loads = []
  for rep in range(args.repeats):
    k = rep % len(runners)
    for r in runners[k:] + runners[:k]:
      r.memory_reset()
      seconds = r.run(r.iters)
      r.mem.append(r.memory_read())
      r.raw.append(seconds / r.iters)
    loads.append(loadavg())
    log(f"  repeat {rep + 1}/{args.repeats} (load {loads[-1]}): " + ", ".join(
        f"{r.name} {r.raw[-1] * 1e3:.1f} ms" for r in runners))
  return loads
