r"""Inference throughput: `tml.Predictor` (JAX) vs the PyTorch twin on exported weights.

    python -m experiments.bench_predict                       # CPU or GPU, auto
    python -m experiments.bench_predict --models=chu_unet,basic_cnn,devries --batch=32,128
    python -m experiments.bench_predict --quick --repeats=1 --out=/tmp/p.json

What is measured, for every model and batch size B, in ONE process,
interleaved (the runners take turns, one timed run each per repeat, the first
one rotating every repeat, so machine noise hits all of them alike):

  * ``jax_predict``: ``Predictor.predict(images, detect=False)``, the whole
    Python API on B uint8 images of the network's input size (grey
    conversion, box, crop, the preprocessing of the run, the jitted eval step
    over all local devices, the records);
  * ``jax_crops``: ``Predictor.predict_crops(crops)`` on the same B grey
    crops (the run's preprocessing, the jitted step, the fetch to numpy);
  * ``torch_crops``: `tml.export.torch_predict_crops`, the same numpy
    preprocessing and then the PyTorch twin (eval mode, ``torch.no_grad``)
    doing what the eval step does (DeVries: centre crop, batch
    standardisation, softmax, sigmoid maps), the results fetched to numpy.

Both frameworks run on EXPORTED weights: the model (random initial weights,
the shapes of a real run) is written with ``Predictor.export`` (``.npz``)
and ``tml.export.export_torch`` (``.pt``), and read back with
``Predictor.from_export`` and ``tml.export.load_torch``. The outputs of
``jax_crops`` and ``torch_crops`` are compared (``max_abs_diff``).

Timing: the first call (JAX: trace + compile) is reported apart; then
``--warmup`` untimed calls; each timed run repeats the call until it lasts
``--min_time`` seconds; images/s = B / (seconds per call), reported as the
median and the min-max over ``--repeats`` runs. Float32 (``--precision``
float32 also turns TF32 off in both frameworks on GPU).

Sizes: the real protocol's networks (Chu U-Net N=128, depth 4, width 64, FC
1024, 8 emotions; basic CNN N=128; DeVries 48 -> 42 with the map head); with
``--quick`` a 32 x 32 two-level U-Net and basic CNN (DeVries keeps its size:
it has no size options).

Outputs: a table on stdout and a JSON file (default
``benchmarks/predict-<hardware>.json``) with every timing, the devices, the
package versions, the git commit and the command. torch is optional: without
it only the JAX rows are measured (the JSON says why).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import platform
import shlex
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

REPO = pathlib.Path(__file__).resolve().parents[1]
MODEL_CHOICES = ("chu_unet", "basic_cnn", "devries")
FRAMEWORKS = ("jax", "torch")
RUNNERS = ("jax_predict", "jax_crops", "torch_crops")


def parse_args(argv=None) -> argparse.Namespace:
  from experiments import run as run_lib
  p = argparse.ArgumentParser(
      prog="python -m experiments.bench_predict",
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default=",".join(MODEL_CHOICES),
                 help="comma list of %s" % ", ".join(MODEL_CHOICES))
  p.add_argument("--batch", default="32",
                 help="comma list of batch sizes (images per predict call)")
  p.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                 help="comma list of jax, torch")
  p.add_argument("--repeats", type=int, default=5,
                 help="timed runs per runner (median and min-max over them)")
  p.add_argument("--min_time", type=float, default=None,
                 help="seconds each timed run lasts at least (default 1.0, "
                 "0 with --quick)")
  p.add_argument("--warmup", type=int, default=1,
                 help="untimed calls after the first one")
  p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
  p.add_argument("--precision", default="float32", choices=("float32", "tf32"))
  p.add_argument("--cpu_xla_flags", default=" ".join(run_lib.CPU_XLA_FLAGS),
                 help="XLA_FLAGS added on CPU (default %(default)s), as "
                 "experiments.bench")
  p.add_argument("--quick", action="store_true",
                 help="tiny thermal models (smoke test)")
  p.add_argument("--hardware", default=None,
                 help="name of this hardware in the file name (default: "
                 "'cpu', or the GPU's name)")
  p.add_argument("--out", default=None,
                 help="JSON path (default benchmarks/predict-<hardware>.json)")
  args = p.parse_args(argv)
  args.models = _split(args.models, MODEL_CHOICES, "--models")
  args.frameworks = _split(args.frameworks, FRAMEWORKS, "--frameworks")
  try:
    args.batch = [int(b) for b in args.batch.split(",") if b.strip()]
  except ValueError:
    p.error(f"--batch={args.batch!r}: expected a comma list of integers")
  if not args.batch or min(args.batch) < 1:
    p.error("--batch: expected positive batch sizes")
  if args.repeats < 1:
    p.error("--repeats must be >= 1")
  if args.min_time is None:
    args.min_time = 0.0 if args.quick else 1.0
  args.argv = list(sys.argv[1:] if argv is None else argv)
  return args


def _split(value: str, choices, flag: str) -> list[str]:
  items = [v.strip() for v in value.split(",") if v.strip()]
  bad = [v for v in items if v not in choices]
  if bad or not items:
    raise SystemExit(f"{flag}: unknown {bad or value!r}; choose from {choices}")
  return items


# ============================================================================
# Models on exported weights.
# ============================================================================
def make_config(model: str, batch: int, quick: bool):
  """The config of a run of ``model`` at the benchmark's sizes."""
  from tml import config as config_lib
  if model == "devries":
    return config_lib.Config(dataset="fer2013", model="devries", map_head=True,
                             stage1_epochs=0, optimizer="sgd",
                             eval_batch_size=batch)
  n = 32 if quick else 128
  kw = (dict(unet_depth=2, unet_width=4, fc_width=16) if quick else
        dict(unet_depth=4, unet_width=64, fc_width=1024))
  return config_lib.Config(model=model, image_size=n, eval_batch_size=batch,
                           stage1_epochs=0 if model == "basic_cnn" else 40, **kw)


def make_predictor(model: str, batch: int, quick: bool, tmp: pathlib.Path,
                   seed: int = 0):
  """``(predictor, export_path)``: initial weights through the ``.npz`` export."""
  import jax
  import numpy as np
  from tml import models, predict, preprocess, train
  cfg = make_config(model, batch, quick)
  stub = predict._dataset_stub(cfg)  # pylint: disable=protected-access
  net, task = train.build_model(cfg, stub), train.build_task(cfg, stub)
  params = jax.device_get(models.init_params(
      net, (1, task.input_size, task.input_size, 1), seed))
  stats = None
  if stub.kind == "expression":   # Tang's per-pixel stage: identity statistics
    stats = preprocess.PixelStats(np.zeros((48, 48, 1), np.float32),
                                  np.ones((48, 48, 1), np.float32))
  p = predict.Predictor(cfg=cfg, kind=stub.kind, class_names=stub.class_names,
                        params=params, split="bench", run_id=f"bench-{model}",
                        source="init", pixel_stats=stats, batch_size=batch)
  path = p.export(tmp / f"{model}-{batch}.npz")
  return predict.Predictor.from_export(path, batch_size=batch), path


def make_inputs(size: int, batch: int, seed: int = 0):
  """B uint8 frames of the network input size and their grey crops."""
  import numpy as np
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, (batch, size, size), dtype=np.uint8)
  return images, images.astype(np.float32) / 255.0


def _count_params(tree) -> int:
  import numpy as np
  import jax
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


# ============================================================================
# Timing.
# ============================================================================
class Runner:
  """One timed callable: ``fn()`` does one batch and returns its outputs."""

  def __init__(self, name: str, fn: Callable[[], Any], batch: int):
    self.name, self.fn, self.batch = name, fn, batch
    self.calls = 1
    self.info: dict[str, Any] = {}
    self.seconds_per_call: list[float] = []
    self.last = None

  def first_call(self) -> float:
    t = time.perf_counter()
    self.last = self.fn()
    return time.perf_counter() - t

  def run(self, calls: int) -> float:
    t = time.perf_counter()
    for _ in range(calls):
      self.last = self.fn()
    return time.perf_counter() - t

  def summary(self) -> dict[str, Any]:
    rates = [self.batch / s for s in self.seconds_per_call]
    return {"images_per_s": {"median": statistics.median(rates),
                             "min": min(rates), "max": max(rates)},
            "seconds_per_call": self.seconds_per_call,
            "calls_per_run": self.calls, **self.info}


def measure(runners: list[Runner], args, log) -> dict[str, str]:
  """First call, warm-up, then round-robin timed runs; returns failures."""
  failures = {}
  for r in list(runners):
    try:
      r.info["first_call_s"] = r.first_call()
    except Exception as e:  # pylint: disable=broad-except
      log(f"  {r.name:<12} FAILED: {e!r}")
      failures[r.name] = repr(e)
      runners.remove(r)
  for r in runners:
    per = min([r.run(1) for _ in range(max(args.warmup, 1))])
    r.calls = max(1, math.ceil(args.min_time / max(per, 1e-9)))
  for rep in range(args.repeats):
    k = rep % max(len(runners), 1)
    for r in runners[k:] + runners[:k]:
      r.seconds_per_call.append(r.run(r.calls) / r.calls)
  return failures


def max_abs_diff(a: dict, b: dict) -> dict[str, float]:
  """Per output, max |JAX - torch| over the batch (on the keys both have)."""
  import numpy as np
  return {k: float(np.max(np.abs(np.asarray(a[k]) - np.asarray(b[k]))))
          for k in sorted(set(a) & set(b))}


# ============================================================================
# Machine.
# ============================================================================
def machine_info(torch_device=None) -> dict[str, Any]:
  """Devices (JAX and torch), versions, CPU, and the git commit."""
  import jax
  import jaxlib
  from tml import writers
  cpu = None
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next((l.split(":", 1)[1].strip() for l in f
                  if l.startswith("model name")), None)
  except OSError:
    pass
  try:
    affinity = len(os.sched_getaffinity(0))
  except AttributeError:
    affinity = os.cpu_count()
  devices = {"jax_backend": jax.default_backend(),
             "jax": [{"id": d.id, "platform": d.platform,
                      "device_kind": d.device_kind} for d in jax.local_devices()],
             "torch": None if torch_device is None else str(torch_device)}
  versions = dict(writers.package_versions())
  versions.update(jax_runtime=jax.__version__, jaxlib_runtime=jaxlib.__version__)
  if torch_device is not None:
    import torch
    versions["torch_runtime"] = torch.__version__
    if torch_device.type == "cuda":
      devices["torch_gpu_name"] = torch.cuda.get_device_name(torch_device)
      versions["cuda"] = torch.version.cuda
      versions["cudnn"] = torch.backends.cudnn.version()
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  return {"devices": devices, "versions": versions, "git": writers.git_info(),
          "machine": {"platform": platform.platform(), "cpu_model": cpu,
                      "cpu_count_logical": os.cpu_count(),
                      "cpu_affinity": affinity, "loadavg_at_start": load,
                      "xla_flags": os.environ.get("XLA_FLAGS", "")}}


def hardware_name(info: dict) -> str:
  import re
  if info["devices"]["jax_backend"] == "gpu":
    kind = info["devices"]["jax"][0]["device_kind"]
    return "gpu-" + re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")
  return "cpu"


def text_table(results: dict) -> str:
  header = ["model", "batch", "runner", "images/s", "min-max", "first call s"]
  rows = []
  for g in results["results"]:
    for name in RUNNERS:
      r = g["runners"].get(name)
      if r is None:
        why = g.get("failures", {}).get(name) or g.get("skipped", {}).get(name)
        if why:
          rows.append([g["model"], str(g["batch"]), name, "-", why[:40], "-"])
        continue
      ips = r["images_per_s"]
      rows.append([g["model"], str(g["batch"]), name, f"{ips['median']:.1f}",
                   f"{ips['min']:.1f}-{ips['max']:.1f}",
                   f"{r['first_call_s']:.2f}"])
  widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(header)]
  fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))
  return "\n".join([fmt(header), fmt(["-" * w for w in widths])]
                   + [fmt(r) for r in rows])


# ============================================================================
# Main.
# ============================================================================
def main(argv=None) -> dict:
  args = parse_args(argv)
  from experiments import bench as bench_lib
  args_env = argparse.Namespace(device=args.device, quick=True,
                                cpu_xla_flags=args.cpu_xla_flags)
  bench_lib.setup_environment(args_env)   # XLA flags, platforms, as the bench
  import jax
  from tml import export as export_lib
  log = lambda s: print(s, flush=True)

  torch = torch_device = None
  skipped = {}
  tconf = {}
  if "torch" in args.frameworks:
    try:
      import torch  # pylint: disable=redefined-outer-name
      from experiments import bench_torch
    except ImportError as err:
      skipped["torch_crops"] = f"torch not installed ({err})"
      torch = None
  else:
    skipped["torch_crops"] = "not in --frameworks"
  gpu = (jax.default_backend() == "gpu" if args.device == "auto"
         else args.device == "gpu")
  if torch is not None:
    if gpu and not torch.cuda.is_available():
      raise SystemExit("bench_predict: JAX sees a GPU but torch.cuda is not "
                       "available; install a CUDA build of torch or pass "
                       "--device=cpu or --frameworks=jax")
    torch_device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    try:
      threads = len(os.sched_getaffinity(0))
    except AttributeError:
      threads = os.cpu_count() or 1
    tconf = bench_torch.configure(torch_device, threads, args.precision)

  info = machine_info(torch_device)
  hw = args.hardware or hardware_name(info) + ("-quick" if args.quick else "")
  out_path = pathlib.Path(args.out or REPO / "benchmarks" / f"predict-{hw}.json")
  command = "python -m experiments.bench_predict " + " ".join(
      shlex.quote(a) for a in args.argv)
  results: dict[str, Any] = {
      "benchmark": "predict", "hardware": hw, "command": command.strip(),
      "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%d %H:%M"),
      **info,
      "config": {"models": args.models, "batch": args.batch,
                 "frameworks": args.frameworks, "repeats": args.repeats,
                 "min_time_s": args.min_time, "warmup": args.warmup,
                 "quick": args.quick, "precision": args.precision, **tconf},
      "results": []}
  log(f"bench_predict: jax {jax.default_backend()} x{jax.local_device_count()}, "
      f"torch {torch_device}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}")

  precision = "highest" if args.precision == "float32" else "default"
  with tempfile.TemporaryDirectory() as tmp, \
      jax.default_matmul_precision(precision):
    tmp = pathlib.Path(tmp)
    for model in args.models:
      for batch in args.batch:
        p, npz = make_predictor(model, batch, args.quick, tmp)
        images, crops = make_inputs(p.input_size, batch)
        group = {"model": model, "batch": batch, "input_size": p.input_size,
                 "devices": p._mesh.size,  # pylint: disable=protected-access
                 "padded_batch": p.batch_size, "params": _count_params(p.params),
                 "export": {"npz_bytes": npz.stat().st_size}, "runners": {}}
        log(f"\n== {model} batch {batch} ({group['params']:,} params, "
            f"{p.input_size}x{p.input_size} input)")
        runners = [
            Runner("jax_predict",
                   lambda p=p, images=images: p.predict(list(images), detect=False),
                   batch),
            Runner("jax_crops", lambda p=p, crops=crops: p.predict_crops(crops),
                   batch)]
        if torch is not None:
          pt = export_lib.export_torch(p, tmp / f"{model}-{batch}.pt")
          group["export"]["pt_bytes"] = pt.stat().st_size
          twin, _ = export_lib.load_torch(pt)
          twin = twin.to(torch_device)
          runners.append(Runner(
              "torch_crops", lambda p=p, twin=twin, crops=crops:
              export_lib.torch_predict_crops(twin, p, crops, device=torch_device),
              batch))
        failures = measure(runners, args, log)
        for r in runners:
          group["runners"][r.name] = r.summary()
          ips = group["runners"][r.name]["images_per_s"]
          log(f"  {r.name:<12} {ips['median']:10.1f} images/s "
              f"({ips['min']:.1f}-{ips['max']:.1f}), first call "
              f"{r.info['first_call_s']:.2f} s")
        by_name = {r.name: r for r in runners}
        if "jax_crops" in by_name and "torch_crops" in by_name:
          group["max_abs_diff"] = max_abs_diff(by_name["jax_crops"].last,
                                               by_name["torch_crops"].last)
        if failures:
          group["failures"] = failures
        if skipped:
          group["skipped"] = dict(skipped)
        results["results"].append(group)

  text = text_table(results)
  log("\n" + text)
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_text(json.dumps(results, indent=1, default=bench_lib._json_default) + "\n")
  log(f"wrote {out_path}")
  return results


if __name__ == "__main__":
  main()
