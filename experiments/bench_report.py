"""Reporting for ``experiments.bench``: medians, ratios, machine, tables, Markdown."""
from __future__ import annotations

import math
import os
import pathlib
import platform
import re
import statistics
import subprocess
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]


def _median(xs):
  return statistics.median(xs) if xs else float("nan")


def summarise_group(w: Workload, runners: list[Runner]) -> dict:
  by = {r.name: r for r in runners}
  res: dict[str, Any] = {
      "name": w.name, "dtype": getattr(w, "dtype", "float32"),
      "model": w.model, "model_kwargs": w.model_kwargs,
      "description": w.description, "batch_size": w.batch_size,
      "input_shape": [w.batch_size, w.image_size, w.image_size, 1],
      "network_input": w.task.input_size, "stage": w.stage_name,
      "loss_weights": w.weights, "optimizer": w.optimizer,
      "learning_rate": w.learning_rate, "runners": {}}
  for r in runners:
    med = _median(r.raw)
    entry = {"kind": r.kind, "iters_per_run": r.iters,
             "raw_s_per_iter": r.raw, "median_s": med, **r.info}
    if r.kind in ("step", "pipeline", "augment"):
      entry["images_per_s"] = w.batch_size / med
    if r.kind == "step":
      entry["compile_s"] = max(r.info["first_call_s"] - med, 0.0)
      mems = [m for m in r.mem if m]
      if mems:
        entry["memory"] = {k: max((m[k] for m in mems if m.get(k) is not None),
                                  default=None)
                           for k in mems[0] if k != "rss_hwm_reset"}
    if r.kind == "peak":
      entry["gflops"] = 2 * r.info["n"] ** 3 / med / 1e9
    res["runners"][r.name] = entry
  peaks = [e["gflops"] for e in res["runners"].values() if e["kind"] == "peak"]
  res["group_peak_gflops"] = max(peaks) if peaks else None
  jax_entry = res["runners"].get("jax")
  if jax_entry:
    for e in res["runners"].values():
      # Torch rows do the same work as the JAX step: XLA's count for both.
      flops = e.get("flops_per_step") or jax_entry.get("flops_per_step")
      if e["kind"] == "step" and flops:
        e["gflop_per_step"] = flops / 1e9
        e["achieved_gflops"] = flops / e["median_s"] / 1e9
    for other in ("torch_eager", "torch_compile"):
      if other in res["runners"]:
        res[f"jax_speedup_vs_{other}"] = (res["runners"][other]["median_s"] /
                                          jax_entry["median_s"])
        res[f"paired_speedup_vs_{other}"] = paired_ratios(
            res["runners"][other]["raw_s_per_iter"], jax_entry["raw_s_per_iter"])
    for p in ("pipeline", "pipeline+transfer"):
      if p in res["runners"]:
        res[f"{p}_vs_step_consumption"] = (
            res["runners"][p]["images_per_s"] / jax_entry["images_per_s"])
    if "jax+augment" in res["runners"]:
      on = res["runners"]["jax+augment"]["median_s"]
      res["augment_overhead_in_step"] = on / jax_entry["median_s"] - 1.0
      if "augment_only" in res["runners"]:
        res["augment_only_share_of_step"] = (
            res["runners"]["augment_only"]["median_s"] / jax_entry["median_s"])
  return res


def paired_ratios(other_s: list[float], jax_s: list[float]) -> dict[str, Any]:
  """JAX's speed-up over ``other`` repeat by repeat (same repeat = adjacent runs).

  ``median``, ``min``, ``max`` of the per-repeat ratios ``other / jax`` and a
  ``verdict``: "faster" / "slower" when every repeat agrees on the side of
  1.0, "inconclusive" when the range straddles it (the spread is wider than
  the effect; the medians' ratio then says nothing).
  """
  ratios = [o / j for o, j in zip(other_s, jax_s) if j > 0]
  if not ratios:
    return {"ratios": [], "median": None, "min": None, "max": None,
            "verdict": "inconclusive"}
  lo, hi = min(ratios), max(ratios)
  verdict = "faster" if lo > 1.0 else "slower" if hi < 1.0 else "inconclusive"
  return {"ratios": ratios, "median": _median(ratios), "min": lo, "max": hi,
          "verdict": verdict}


def finalise(results: dict) -> None:
  """The run's peak per dtype (max over every measurement in that dtype) and
  each step's % of the peak of its own dtype.

  ``peak_matmul_gflops_by_dtype``: ``{dtype: GFLOP/s}``;
  ``peak_matmul_gflops``: the float32 one (None if no float32 group ran).
  """
  by_dtype: dict[str, float] = {}
  for g in results["benchmarks"]:
    d = g.get("dtype", "float32")
    if g["group_peak_gflops"]:
      by_dtype[d] = max(by_dtype.get(d, 0.0), g["group_peak_gflops"])
  results["peak_matmul_gflops_by_dtype"] = by_dtype
  results["peak_matmul_gflops"] = by_dtype.get("float32")
  for g in results["benchmarks"]:
    peak = by_dtype.get(g.get("dtype", "float32"))
    for e in g["runners"].values():
      if e.get("achieved_gflops") and peak:
        e["pct_of_peak"] = 100 * e["achieved_gflops"] / peak
        if g["group_peak_gflops"]:
          e["pct_of_group_peak"] = 100 * e["achieved_gflops"] / g["group_peak_gflops"]


# ============================================================================
# Machine description.
# ============================================================================
def machine_info(jax_device, torch_device) -> dict:
  import jax
  import jaxlib
  import flax
  import numpy as np
  import optax
  import torch
  info = {"platform": platform.platform(), "python": platform.python_version(),
          "hostname_hash": None}
  cpu = None
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          cpu = line.split(":", 1)[1].strip()
          break
  except OSError:
    pass
  info["cpu_model"] = cpu or platform.processor()
  info["cpu_count_logical"] = os.cpu_count()
  try:
    info["cpu_affinity"] = len(os.sched_getaffinity(0))
  except AttributeError:
    info["cpu_affinity"] = os.cpu_count()
  try:
    info["loadavg_at_start"] = os.getloadavg()
  except OSError:
    pass
  info["jax_device"] = str(jax_device)
  info["jax_device_kind"] = getattr(jax_device, "device_kind", "")
  info["jax_backend"] = jax.default_backend()
  info["torch_device"] = str(torch_device)
  if torch_device.type == "cuda":
    info["gpu_name"] = torch.cuda.get_device_name(torch_device)
    info["cuda"] = torch.version.cuda
    info["cudnn"] = torch.backends.cudnn.version()
  else:
    info["gpu_name"] = None
  info["versions"] = {"jax": jax.__version__, "jaxlib": jaxlib.__version__,
                      "flax": flax.__version__, "optax": optax.__version__,
                      "torch": torch.__version__, "numpy": np.__version__}
  info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  try:
    rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True, timeout=10)
    info["git_head"] = rev.stdout.strip() or None
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain",
                            "--untracked-files=no"],
                           capture_output=True, text=True, timeout=10)
    info["git_dirty"] = bool(dirty.stdout.strip())
  except (OSError, subprocess.SubprocessError):
    info["git_head"] = None
  del info["hostname_hash"]
  return info


def hardware_name(info: dict) -> str:
  if info.get("gpu_name"):
    return "gpu-" + re.sub(r"[^a-z0-9]+", "-", info["gpu_name"].lower()).strip("-")
  return "cpu"


# ============================================================================
# Reporting.
# ============================================================================
def fmt(x, spec=".1f", none="-"):
  if x is None or (isinstance(x, float) and math.isnan(x)):
    return none
  return format(x, spec)


def _mib(x):
  return None if x is None else x / 2**20


def table_rows(results: dict) -> list[list[str]]:
  rows = []
  for g in results["benchmarks"]:
    run = g["runners"]
    for name in ("jax", "torch_eager", "torch_compile", "jax+augment"):
      if name not in run:
        continue
      e = run[name]
      mem = e.get("memory", {})
      peak_mem = (mem.get("device_peak_bytes") or
                  mem.get("device_peak_bytes_in_use") or mem.get("rss_peak_bytes"))
      xla_mem = (e.get("xla_memory") or {}).get("step_total_bytes")
      vs = "-"
      if name == "jax":
        parts = []
        for other, short in (("torch_eager", "eager"), ("torch_compile", "compile")):
          pr = g.get(f"paired_speedup_vs_{other}")
          if pr and pr["median"] is not None:
            flag = "" if pr["verdict"] != "inconclusive" else " (inconclusive)"
            parts.append(f"{pr['median']:.2f}x {short} [{pr['min']:.2f}-"
                         f"{pr['max']:.2f}]{flag}")
          elif f"jax_speedup_vs_{other}" in g:
            parts.append(f"{g[f'jax_speedup_vs_{other}']:.2f}x {short}")
        vs = ", ".join(parts) or "-"
      elif name == "jax+augment" and "augment_overhead_in_step" in g:
        vs = f"{100 * g['augment_overhead_in_step']:+.0f}% vs no aug"
      rows.append([
          g["name"], g.get("dtype", "float32"), str(g["batch_size"]), name,
          fmt(e["median_s"] * 1e3, ".1f"), fmt(e["images_per_s"], ".1f"),
          vs, fmt(e.get("compile_s"), ".1f"),
          fmt(e.get("gflop_per_step"), ".1f"),
          fmt(e.get("achieved_gflops"), ".1f"),
          fmt(e.get("pct_of_peak"), ".1f"),
          fmt(_mib(peak_mem), ".0f") + (f" ({fmt(_mib(xla_mem), '.0f')})"
                                         if xla_mem else "")])
  return rows


HEADER = ["benchmark", "dtype", "batch", "framework", "step ms (median)",
          "images/s", "JAX speed-up (paired median [range])", "compile s", "GFLOP/step", "GFLOP/s",
          "% peak", "peak mem MiB (XLA)"]


def extras_rows(results: dict) -> list[list[str]]:
  rows = []
  for g in results["benchmarks"]:
    run = g["runners"]
    step = run.get("jax", {}).get("images_per_s")
    for name in ("pipeline", "pipeline+transfer", "augment_only"):
      if name in run:
        e = run[name]
        ratio = e["images_per_s"] / step if step else None
        rows.append([g["name"], g.get("dtype", "float32"), name,
                     fmt(e["median_s"] * 1e3, ".2f"),
                     fmt(e["images_per_s"], ".0f"),
                     fmt(ratio, ".1f") + "x" if ratio else "-"])
  return rows


EXTRAS_HEADER = ["benchmark", "step dtype", "measurement", "ms per batch",
                 "images/s", "vs JAX step consumption"]


def format_text_table(header, rows) -> str:
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  line = lambda r: "  ".join(str(x).ljust(w) for x, w in zip(r, widths))
  return "\n".join([line(header), line(["-" * w for w in widths])] +
                   [line(r) for r in rows])


def format_markdown_table(header, rows) -> str:
  out = ["| " + " | ".join(header) + " |",
         "|" + "|".join("---" for _ in header) + "|"]
  out += ["| " + " | ".join(r) + " |" for r in rows]
  return "\n".join(out)


def _load_range(results) -> str:
  loads = [x for g in results["benchmarks"]
           for x in g.get("loadavg_1min_per_repeat", []) if x is not None]
  if not loads:
    return "n/a"
  return f"{min(loads):.1f}-{max(loads):.1f}"


def markdown_section(results: dict) -> str:
  m = results["machine"]
  hw = results["hardware"]
  peaks = results.get("peak_matmul_gflops_by_dtype") or {
      "float32": results.get("peak_matmul_gflops")}
  dtypes = results["config"].get("dtypes", ["float32"])
  lines = [
      f"<!-- bench:{hw}:start -->",
      f"### {hw}: {m.get('gpu_name') or m['cpu_model']}",
      "",
      f"- Command: `{results['command']}`",
      f"- Date (UTC): {results['date_utc']}; git {m.get('git_head')}"
      + (" + uncommitted changes" if m.get("git_dirty") else ""),
      f"- Machine: {m['cpu_model']}, {m['cpu_affinity']} cores"
      + (f", GPU {m['gpu_name']} (CUDA {m.get('cuda')}, cuDNN {m.get('cudnn')})"
         if m.get("gpu_name") else "")
      + f"; 1-min load average {_load_range(results)} during the run",
      f"- Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
      f"- XLA_FLAGS: `{m['xla_flags'] or '(none)'}`; compute dtypes "
      f"{', '.join(dtypes)} (bfloat16: bf16 convs/dense, float32 params, "
      f"optimizer state and losses; torch under autocast); float32 "
      f"precision {results['config']['precision']}; torch threads "
      f"{results['config'].get('torch_threads')}",
      f"- Matmul peak measured in the run, per dtype (max of the medians of "
      f"jnp.dot and torch.mm, n={results['config']['matmul_n']}; '% peak' "
      f"is relative to the row's dtype): " + ", ".join(
          f"{d} {fmt(p, '.0f')} GFLOP/s" for d, p in peaks.items()),
      f"- Medians of {results['config']['repeats']} interleaved repeats; raw "
      f"timings in `{results['json_path']}`.",
  ]
  for g in results["benchmarks"]:
    for name, err in g.get("failures", {}).items():
      lines.append(f"- {g['name']} [{g.get('dtype', 'float32')}]: {name} "
                   f"failed: `{err[:200]}`")
  lines += [
      "",
      format_markdown_table(HEADER, table_rows(results)),
      "",
      format_markdown_table(EXTRAS_HEADER, extras_rows(results)),
      "",
  ]
  profiles = {f"{g['name']} [{g.get('dtype', 'float32')}]": g["profile"]
              for g in results["benchmarks"] if g.get("profile")}
  if profiles:
    from experiments import bench_profile
    lines += ["Profiles (JAX step, `--profile_dir`): the device ops that take "
              "the most time per step.", ""]
    lines += bench_profile.markdown_rows(profiles) + [""]
  lines.append(f"<!-- bench:{hw}:end -->")
  return "\n".join(lines)


def update_markdown(path: pathlib.Path, section: str, hw: str) -> None:
  start, end = f"<!-- bench:{hw}:start -->", f"<!-- bench:{hw}:end -->"
  text = path.read_text() if path.exists() else "# Benchmarks\n"
  if start in text and end in text:
    before, rest = text.split(start, 1)
    _, after = rest.split(end, 1)
    text = before + section + after
  else:
    marker = "<!-- bench:results -->"
    if marker in text:
      text = text.replace(marker, marker + "\n\n" + section, 1)
    else:
      text = text.rstrip("\n") + "\n\n" + section + "\n"
  path.write_text(text)


def text_tables(results: dict) -> str:
  """The two plain-text tables printed at the end of a run."""
  return (format_text_table(HEADER, table_rows(results)) + "\n\n" +
          format_text_table(EXTRAS_HEADER, extras_rows(results)))
