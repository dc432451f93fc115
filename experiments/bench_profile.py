"""Profile traces of the benchmarked JAX steps, and their per-op times.

``experiments.bench --profile_dir=DIR`` records, after each row group's timed
runs, a ``jax.profiler`` trace of ``--profile_steps`` more steps of that
group's JAX step into ``DIR/<group>/`` (TensorBoard's profile plugin, XProf
or Perfetto open it: ``plugins/profile/<run>/*.xplane.pb`` and
``*.trace.json.gz``), and summarises the trace: the device ops (kernels on
GPU/TPU) that take the most time per step, which is where an A/B of a layout,
fusion or algorithm change should look first. XLA:CPU records no per-op
events in these traces (its thunks run inside the host's executable call),
so on CPU the summary is empty and says so; use XLA dumps there.
"""
from __future__ import annotations

import collections
import gzip
import json
import pathlib
import re
from typing import Any

TOP_OPS = 15


def group_dirname(label: str) -> str:
  """A file-system name for a row group label (``devries [bfloat16]``)."""
  return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_")


def record(runner, steps: int, directory: pathlib.Path) -> dict[str, Any]:
  """Traces ``steps`` calls of a ``JaxStepRunner``; returns the summary."""
  import jax
  directory.mkdir(parents=True, exist_ok=True)
  runner.run(1)                       # nothing of the warm-up in the trace
  jax.profiler.start_trace(str(directory))
  try:
    runner.run(steps)
  finally:
    jax.profiler.stop_trace()
  traces = sorted(directory.rglob("*.trace.json.gz"))
  out: dict[str, Any] = {"dir": str(directory), "steps": steps,
                         "files": [str(p) for p in sorted(directory.rglob("*"))
                                   if p.is_file()]}
  if not traces:
    out["note"] = "no trace.json.gz written"
    return out
  with gzip.open(traces[-1], "rt") as f:
    out.update(op_summary(json.load(f), steps))
  return out


def op_summary(trace: dict, steps: int, top: int = TOP_OPS) -> dict[str, Any]:
  """Per-step time of the device ops of a Chrome-format trace.

  Complete events (``ph == 'X'``) of processes named ``/device:...`` are
  summed by name; returns ``device_ms_per_step`` (all device ops),
  ``top_ops`` (``[name, ms per step, share of device time, calls per
  step]``, the ``top`` largest) and ``note`` when there are no device ops.
  """
  events = trace.get("traceEvents", [])
  names = {e["pid"]: e.get("args", {}).get("name", "") for e in events
           if e.get("ph") == "M" and e.get("name") == "process_name"}
  device = {pid for pid, name in names.items() if name.startswith("/device:")}
  total: dict[str, float] = collections.defaultdict(float)
  calls: dict[str, int] = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("pid") in device:
      total[e["name"]] += float(e.get("dur", 0.0))   # microseconds
      calls[e["name"]] += 1
  all_us = sum(total.values())
  out: dict[str, Any] = {"device_ms_per_step": all_us / 1e3 / steps}
  if not total:
    out["note"] = ("no device-op events: XLA:CPU does not trace its ops here "
                   "(processes: " + ", ".join(sorted(names.values())) + ")")
    out["top_ops"] = []
    return out
  ranked = sorted(total.items(), key=lambda kv: -kv[1])[:top]
  out["top_ops"] = [[name, us / 1e3 / steps, us / all_us, calls[name] / steps]
                    for name, us in ranked]
  return out


def markdown_rows(profiles: dict[str, dict]) -> list[str]:
  """Markdown lines: one table of the top ops per profiled group."""
  lines = []
  for label, p in profiles.items():
    lines.append(f"- `{label}`: trace in `{p['dir']}`; device time "
                 f"{p.get('device_ms_per_step', 0.0):.2f} ms/step"
                 + (f" ({p['note']})" if p.get("note") else ""))
    if p.get("top_ops"):
      lines += ["", "  | op | ms/step | share | calls/step |",
                "  |---|---|---|---|"]
      lines += [f"  | `{n[:60]}` | {ms:.3f} | {share:.1%} | {c:g} |"
                for n, ms, share, c in p["top_ops"]]
      lines.append("")
  return lines
