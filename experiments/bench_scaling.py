r"""How the train step's cost grows: batch size, input size N and U-Net depth.

    python -m experiments.bench_scaling                  # CPU sweeps, ~15 min
    python -m experiments.bench_scaling --sweeps=devries/batch --repeats=5
    python -m experiments.bench_scaling --quick --out=/tmp/s.json --plot=/tmp/s.png --markdown=

Issue #12 item 5. Every point is one row group of ``experiments.bench``
(THE JAX train step and the torch eager twin, the same initial weights and
batch, run round-robin in one process, ``--repeats`` timed runs each), so
the numbers are comparable with BENCHMARKS.md's tables. Sweeps:

  * ``devries/batch``: the DeVries net (paper size, FC 3072) over
    ``--devries_batches``;
  * ``unet/batch``: the Chu U-Net at stage 2 (landmark + emotion MSE, Adam),
    the main job's size (``demo.flags``: N=64, depth 3, width 8, FC 256;
    the paper-size U-Net is GPU work), over ``--unet_batches``;
  * ``unet/size``: that U-Net at batch ``--unet_batch`` over ``--unet_sizes``;
  * ``unet/depth``: at N = ``--unet_depth_size`` over ``--unet_depths``.

Per point and framework: the median step time, images/s, the per-repeat
paired speed ratio (``bench_report.paired_ratios``), the step's working
memory (CPU: the growth of the process RSS above its level before the
timed run, high-water mark; GPU: the device peak) and, for JAX, XLA's FLOP
count of the step and its static buffer sizes. The float32 matmul peak
(2048^3 ``jnp.dot`` / ``torch.mm``) is measured once, so each point's
achieved GFLOP/s can be read against it. ``saturation`` per batch sweep and
framework: the first batch size after which doubling the batch raises
images/s by less than 10 %.

Outputs: a table on stdout, ``benchmarks/scaling-<hardware>.json``, a plot
``benchmarks/scaling-<hardware>.png`` (images/s and working memory against
each swept variable, both frameworks) and a section of BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import pathlib
import sys
from typing import Any

from experiments import bench

REPO = pathlib.Path(__file__).resolve().parents[1]
SWEEPS = ("devries/batch", "unet/batch", "unet/size", "unet/depth")
SATURATION_GAIN = 0.10   # doubling the batch gains less than this: saturated


def _ints(text: str) -> list[int]:
  return [int(v) for v in text.split(",") if v.strip()]


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(prog="python -m experiments.bench_scaling",
                              description=__doc__.split("\n\n")[0])
  p.add_argument("--sweeps", default=",".join(SWEEPS))
  p.add_argument("--frameworks", default="jax,torch_eager")
  p.add_argument("--devries_batches", default="8,16,32,64,128,256,512")
  p.add_argument("--unet_batches", default="8,16,32,64,128,256,512")
  p.add_argument("--unet_sizes", default="64,128,256")
  p.add_argument("--unet_batch", type=int, default=16)
  p.add_argument("--unet_depths", default="2,3,4,5")
  p.add_argument("--unet_depth_size", type=int, default=128)
  p.add_argument("--unet_width", type=int, default=8)
  p.add_argument("--unet_fc", type=int, default=256)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--min_time", type=float, default=0.5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
  p.add_argument("--cpu_xla_flags", default=bench.CPU_XLA_FLAGS)
  p.add_argument("--quick", action="store_true",
                 help="tiny nets and two points per sweep (smoke test)")
  p.add_argument("--hardware", default=None)
  p.add_argument("--out", default=None)
  p.add_argument("--plot", default=None)
  p.add_argument("--markdown", default=str(REPO / "BENCHMARKS.md"))
  args = p.parse_args(argv)
  args.sweeps = bench._split(args.sweeps, SWEEPS, "--sweeps")
  args.frameworks = bench._split(args.frameworks, bench.FRAMEWORKS, "--frameworks")
  if args.quick:
    args.devries_batches, args.unet_batches = "4,8", "4,8"
    args.unet_sizes, args.unet_depths = "16,32", "1,2"
    args.unet_batch, args.unet_depth_size = 4, 32
    args.unet_width, args.unet_fc = 2, 16
    args.repeats, args.min_time, args.warmup = min(args.repeats, 2), 0.0, 0
  args.argv = list(sys.argv[1:] if argv is None else argv)
  return args


def points(args) -> list[tuple[str, Any, bench.Workload]]:
  """``(sweep, x, workload)`` for every point of the chosen sweeps."""
  base = argparse.Namespace(quick=args.quick, batch_size=None,
                            models=["chu_unet/stage2", "devries"])
  unet_w, devries_w = bench._model_workloads(base, on_gpu=False)

  def unet(batch, size, depth):
    kw = dict(unet_w.model_kwargs, input_size=size, depth=depth,
              base_width=args.unet_width, fc_width=args.unet_fc)
    task = dataclasses.replace(unet_w.task, image_size=size)
    return dataclasses.replace(unet_w, model_kwargs=kw, task=task,
                               batch_size=batch, image_size=size)

  depth = 3 if not args.quick else 2
  out = []
  for sweep in args.sweeps:
    if sweep == "devries/batch":
      out += [(sweep, b, dataclasses.replace(devries_w, batch_size=b))
              for b in _ints(args.devries_batches)]
    elif sweep == "unet/batch":
      n = 64 if not args.quick else 32
      out += [(sweep, b, unet(b, n, depth)) for b in _ints(args.unet_batches)]
    elif sweep == "unet/size":
      out += [(sweep, n, unet(args.unet_batch, n, depth))
              for n in _ints(args.unet_sizes)]
    elif sweep == "unet/depth":
      out += [(sweep, d, unet(args.unet_batch, args.unet_depth_size, d))
              for d in _ints(args.unet_depths)]
  return out


def _working_memory(entry: dict) -> int | None:
  mem = entry.get("memory") or {}
  return mem.get("device_peak_bytes") or mem.get("rss_step_increase_bytes")


def saturation(rows: list[dict], framework: str) -> Any:
  """First batch after which doubling it gains < SATURATION_GAIN images/s."""
  pts = sorted((r["x"], r["runners"][framework]["images_per_s"]) for r in rows
               if framework in r["runners"])
  for (b0, v0), (b1, v1) in zip(pts, pts[1:]):
    if b1 == 2 * b0 and v1 < (1 + SATURATION_GAIN) * v0:
      return b0
  return None


def summarise(results: dict) -> None:
  """Adds per-sweep ``saturation`` and each point's share of the matmul peak."""
  peak = results.get("peak_matmul_gflops")
  results["saturation"] = {}
  for sweep in {p["sweep"] for p in results["points"]}:
    rows = [p for p in results["points"] if p["sweep"] == sweep]
    for p in rows:
      for e in p["runners"].values():
        if e.get("achieved_gflops") and peak:
          e["pct_of_peak"] = 100 * e["achieved_gflops"] / peak
    if sweep.endswith("/batch"):
      results["saturation"][sweep] = {f: saturation(rows, f)
                                      for f in results["config"]["frameworks"]}


def _rows_text(results: dict) -> list[list[str]]:
  from experiments import bench_report as report
  rows = []
  for p in results["points"]:
    j = p["runners"].get("jax", {})
    t = p["runners"].get("torch_eager", {})
    ratio = p.get("paired_speedup_vs_torch_eager") or {}
    mib = lambda e: report.fmt(_working_memory(e) and _working_memory(e) / 2**20, ".0f")
    rows.append([
        p["sweep"], str(p["x"]), str(p["batch_size"]), str(p["network_input"]),
        report.fmt(j.get("median_s") and j["median_s"] * 1e3),
        report.fmt(t.get("median_s") and t["median_s"] * 1e3),
        report.fmt(j.get("images_per_s"), ".0f"),
        report.fmt(t.get("images_per_s"), ".0f"),
        (f"{ratio['median']:.2f} [{ratio['min']:.2f}, {ratio['max']:.2f}] "
         f"{ratio['verdict']}") if ratio.get("median") else "-",
        report.fmt(j.get("achieved_gflops"), ".1f"),
        report.fmt(j.get("pct_of_peak"), ".0f"), mib(j), mib(t),
        str(p.get("loadavg_1min_per_repeat"))])
  return rows


HEADER = ["sweep", "x", "batch", "N", "JAX ms", "torch ms", "JAX img/s",
          "torch img/s", "JAX/torch paired: median [range]", "JAX GFLOP/s",
          "% f32 peak", "JAX work MiB", "torch work MiB", "load/repeat"]


def plot(results: dict, path: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  sweeps = [s for s in SWEEPS if any(p["sweep"] == s for p in results["points"])]
  fig, axes = plt.subplots(2, len(sweeps), figsize=(4.2 * len(sweeps), 7),
                           squeeze=False)
  for col, sweep in enumerate(sweeps):
    rows = sorted((p for p in results["points"] if p["sweep"] == sweep),
                  key=lambda p: p["x"])
    for fw, style in (("jax", "o-"), ("torch_eager", "s--")):
      got = [(p["x"], p["runners"][fw]) for p in rows if fw in p["runners"]]
      if not got:
        continue
      xs = [x for x, _ in got]
      axes[0, col].plot(xs, [e["images_per_s"] for _, e in got], style, label=fw)
      mem = [(x, _working_memory(e)) for x, e in got if _working_memory(e)]
      if mem:
        axes[1, col].plot([x for x, _ in mem], [m / 2**20 for _, m in mem],
                          style, label=fw)
    kind, var = sweep.split("/")
    for row, label in ((0, "images/s"), (1, "step working memory (MiB)")):
      ax = axes[row, col]
      if var == "batch":
        ax.set_xscale("log", base=2)
      ax.set_xlabel({"batch": "batch size", "size": "input size N",
                     "depth": "U-Net depth"}[var])
      ax.set_ylabel(label)
      ax.set_title(f"{kind}: {label.split(' (')[0]} vs {var}")
      ax.grid(alpha=0.3)
      if ax.get_lines():
        ax.legend()
  fig.suptitle(f"train step scaling, {results['hardware']} "
               f"({results['machine']['cpu_model']})", fontsize=10)
  fig.tight_layout()
  path.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(path, dpi=90)
  plt.close(fig)


def markdown(results: dict, plot_rel: str | None) -> str:
  from experiments import bench_report as report
  hw = results["hardware"]
  lines = [f"<!-- bench:scaling-{hw}:start -->",
           f"### Scaling: {hw} ({results['machine']['cpu_model']})", "",
           f"`{results['command']}` at commit {results['machine'].get('git_head')}"
           + (" + uncommitted changes" if results["machine"].get("git_dirty")
              else "") + ", "
           f"{results['date_utc']} UTC; float32 matmul peak "
           f"{report.fmt(results.get('peak_matmul_gflops'), '.1f')} GFLOP/s; "
           f"JSON `{results['json_path']}`.", ""]
  if plot_rel:
    lines += [f"![scaling]({plot_rel})", ""]
  lines.append(report.format_markdown_table(HEADER, _rows_text(results)))
  sat = results.get("saturation") or {}
  if sat:
    lines += ["", "Saturation (first batch after which doubling it gains < "
              f"{SATURATION_GAIN:.0%} images/s; None = still scaling at the "
              "largest batch): " + "; ".join(
                  f"{s}: " + ", ".join(f"{f} {b}" for f, b in v.items())
                  for s, v in sorted(sat.items()))]
  lines.append(f"<!-- bench:scaling-{hw}:end -->")
  return "\n".join(lines)


def main(argv=None) -> dict:
  args = parse_args(argv)
  bench.setup_environment(args)
  import jax
  from experiments import bench_report as report
  from experiments import bench_runners as R
  from tml import models

  log = lambda s: print(s, flush=True)
  d = bench.open_devices(args.device, "float32")
  gpu, jax_device, torch_device = d.gpu, d.jax_device, d.torch_device
  threads, tconf, mesh = d.threads, d.tconf, d.mesh
  info = report.machine_info(jax_device, torch_device)
  hw = args.hardware or report.hardware_name(info) + ("-quick" if args.quick else "")
  out_path = pathlib.Path(args.out or REPO / "benchmarks" / f"scaling-{hw}.json")
  plot_path = pathlib.Path(args.plot or out_path.with_suffix(".png"))
  results: dict[str, Any] = {
      "hardware": hw,
      "command": "python -m experiments.bench_scaling " + " ".join(args.argv),
      "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%d %H:%M"),
      "machine": info,
      "config": {k: v for k, v in vars(args).items() if k != "argv"} | tconf,
      "json_path": os.path.relpath(out_path, REPO) if REPO in out_path.parents
                   else str(out_path),
      "points": []}
  results["command"] = results["command"].strip()
  log(f"bench_scaling: {info['cpu_model']} x{threads}, XLA_FLAGS="
      f"{info['xla_flags']!r}")

  n = 256 if args.quick else (8192 if gpu else 2048)
  peaks = [R.JaxMatmulRunner(n, jax_device), R.TorchMatmulRunner(n, torch_device)]
  R.measure(peaks, args, log, {})
  results["peak_matmul_gflops"] = max(2 * n ** 3 / min(r.raw) / 1e9 for r in peaks)

  for sweep, x, w in points(args):
    log(f"\n== {sweep} = {x}: {w.name}, batch {w.batch_size}, "
        f"N {w.task.input_size}, {w.model_kwargs}")
    model = models.build_model(w.model, **w.model_kwargs)
    shape = (1, w.task.input_size, w.task.input_size, 1)
    params = jax.device_get(models.init_params(model, shape, seed=0))
    batch = bench.make_batch(w)
    runners, failures = [], {}
    try:
      if "jax" in args.frameworks:
        runners.append(R.JaxStepRunner("jax", w, params, batch, mesh))
      for name in ("torch_eager", "torch_compile"):
        if name in args.frameworks:
          runners.append(R.TorchStepRunner(name, w, params, batch, torch_device,
                                           compile_=name == "torch_compile"))
    except Exception as e:  # pylint: disable=broad-except
      failures["build"] = repr(e)   # e.g. out of memory at a large batch
      log(f"  FAILED to build: {e!r}")
    loads = R.measure(runners, args, log, failures) if runners else []
    for r in runners:
      if isinstance(r, R.JaxStepRunner):
        r.analyse()
    group = report.summarise_group(w, runners)
    group.update(sweep=sweep, x=x, loadavg_1min_per_repeat=loads)
    if failures:
      group["failures"] = failures
    results["points"].append(group)
    for r in runners:
      r.close()
    del runners
    # After every point, so a run stopped by a time limit keeps what it did.
    bench._write_json(out_path, dict(results, complete=False))

  summarise(results)
  log("\n" + report.format_text_table(HEADER, _rows_text(results)))
  log(f"saturation: {results['saturation']}")
  results["complete"] = True
  bench._write_json(out_path, results)
  plot(results, plot_path)
  log(f"wrote {out_path} and {plot_path}")
  if args.markdown:
    md = pathlib.Path(args.markdown)
    rel = os.path.relpath(plot_path, md.parent)
    report.update_markdown(md, markdown(results, rel), f"scaling-{hw}")
    log(f"updated {md}")
  return results


if __name__ == "__main__":
  main()
