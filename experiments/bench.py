r"""Side-by-side train-step benchmark: tml's JAX step vs PyTorch eager and torch.compile.

    python -m experiments.bench                      # CPU or GPU, auto-detected
    python -m experiments.bench --device=gpu         # jax[cuda] + torch CUDA
    python -m experiments.bench --models=devries --repeats=9
    python -m experiments.bench --quick --out=/tmp/b.json --markdown=/tmp/b.md
    python -m experiments.bench --dtype=float32,bfloat16  # both precisions

What is measured, in ONE process, interleaved: for every benchmark (Chu
U-Net stage 2 and stage 1, the basic CNN, the DeVries net) the runners -- the
JAX step, torch eager, torch.compile, the float32 matmul peak (jnp.dot and
torch.mm), the input pipeline, and for DeVries the JAX step with augmentation
and the augmentation alone -- are run round-robin, one timed run each per
repeat, the starting runner rotating every repeat, so that machine noise hits
all of them alike. Reported figures are medians over the repeats, after a
warm-up.

  * The JAX step is THE train step, ``tml.train_step.make_train_step``
    (shard_map over a one-device mesh, state donated), on a device-resident
    batch; the torch steps (``experiments.bench_torch``) do the same work from
    the same initial weights. ``--dtype`` picks the compute dtype(s), one
    row group per model and dtype, side by side: float32 (``--precision=
    float32`` also turns TF32 off in both frameworks on GPU) and/or
    bfloat16 mixed precision (the models' ``dtype=bfloat16``: convs and
    dense layers in bf16, params, optimizer state, losses and softmax in
    float32; torch: the twins under ``torch.autocast(bfloat16)``, float32
    params and fused optimizer). A group's matmul peak (jnp.dot, torch.mm)
    is measured in its dtype, and its "% peak" is relative to that.
  * Compile time: first call minus the median step (JAX: trace + XLA
    compile; torch.compile: dynamo + inductor, forward and backward).
  * FLOPs per step: XLA's cost analysis of the compiled step; achieved FLOP/s
    = that / median JAX step time (the torch rows use the same count, as
    they do the same work); share of the peak = achieved / max(median jnp.dot,
    median torch.mm) measured in the same run.
  * Input pipeline: ``tml.input_pipeline.BatchIterator`` over in-memory
    arrays of the benchmark's shapes (numpy only), and that plus the
    host-to-device transfer of ``tml.parallel.global_batch``; compared with
    the JAX step's consumption rate.
  * Peak memory: GPU -- torch ``max_memory_allocated`` (reset per run) and
    JAX ``memory_stats()['peak_bytes_in_use']`` (the process's peak so far;
    JAX has no reset) with XLA's static buffer sizes of the compiled step;
    CPU -- the process RSS high-water mark during each runner's timed runs
    (VmHWM, reset through /proc/self/clear_refs; ``getrusage`` where that is
    not possible) and, for JAX, XLA's static buffer sizes.

Outputs: a table on stdout, ``benchmarks/<hardware>.json`` (every raw timing,
the medians, the machine, versions, flags, the command) and a Markdown
section in BENCHMARKS.md for this hardware (replaced when re-run on the same
hardware).

XLA CPU options: on CPU the bench sets
``--xla_cpu_experimental_ynn_fusion_type=individual_dot`` unless XLA_FLAGS
already names that flag (``--cpu_xla_flags=`` to run with XLA's defaults).
XLA's default also hands convolutions and reductions to YNNPACK, whose
convolution weight gradient is several times slower than Eigen's for these
networks (the DeVries 4x4 conv's: ~350 ms -> ~30 ms at batch 128 on 2
cores); see BENCHMARKS.md.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import shlex
import sys
from typing import Any

from experiments import run as run_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
CPU_XLA_FLAGS = " ".join(run_lib.CPU_XLA_FLAGS)   # the flags experiments.run sets
MODEL_CHOICES = ("chu_unet", "chu_unet/stage2", "chu_unet/stage1",
                 "basic_cnn", "devries")
FRAMEWORKS = ("jax", "torch_eager", "torch_compile")
DTYPES = ("float32", "bfloat16")


# ============================================================================
# Command line and environment (before jax is imported).
# ============================================================================
def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m experiments.bench",
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--models", default="chu_unet,basic_cnn,devries",
                 help="comma list of %s" % ", ".join(MODEL_CHOICES))
  p.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                 help="comma list of jax, torch_eager, torch_compile")
  p.add_argument("--repeats", type=int, default=None,
                 help="timed runs per runner (default 5; 2 with --quick)")
  p.add_argument("--batch_size", type=int, default=None,
                 help="one batch size for every model (default: U-Net 8 on "
                 "CPU / 32 on GPU, basic CNN 32, DeVries 128)")
  p.add_argument("--min_time", type=float, default=None,
                 help="seconds each timed run lasts at least (steps per run "
                 "are set from the warm-up); default 1.0, 0 with --quick")
  p.add_argument("--warmup", type=int, default=None,
                 help="untimed steps after the first call (default 1)")
  p.add_argument("--device", default="auto", choices=("auto", "cpu", "gpu"))
  p.add_argument("--dtype", default="float32",
                 help="comma list of compute dtypes, each a row group per "
                 "model: %s (bfloat16 = mixed precision: bf16 convs/dense, "
                 "float32 params, optimizer state and losses)"
                 % ", ".join(DTYPES))
  p.add_argument("--precision", default="float32",
                 choices=("float32", "tf32"),
                 help="the float32 rows: full-precision matmuls/convs in both "
                 "frameworks (TF32 off on GPU); tf32: both may use TF32")
  p.add_argument("--cpu_xla_flags", default=CPU_XLA_FLAGS,
                 help="XLA_FLAGS added on CPU (default %(default)s)")
  p.add_argument("--quick", action="store_true",
                 help="tiny models and sizes (smoke test)")
  p.add_argument("--profile_dir", default=None,
                 help="after each group's timed runs, a jax.profiler trace of "
                 "--profile_steps JAX steps into DIR/<group>, with its "
                 "per-op times in the JSON (experiments.bench_profile)")
  p.add_argument("--profile_steps", type=int, default=3)
  p.add_argument("--hardware", default=None,
                 help="name of this hardware in file names and BENCHMARKS.md "
                 "(default: 'cpu', or the GPU's name)")
  p.add_argument("--out", default=None,
                 help="JSON path (default benchmarks/<hardware>.json)")
  p.add_argument("--markdown", default=str(REPO / "BENCHMARKS.md"),
                 help="Markdown file whose section for this hardware is "
                 "replaced ('' = none)")
  args = p.parse_args(argv)
  args.models = _split(args.models, MODEL_CHOICES, "--models")
  args.frameworks = _split(args.frameworks, FRAMEWORKS, "--frameworks")
  args.dtypes = list(dict.fromkeys(_split(args.dtype, DTYPES, "--dtype")))
  if args.repeats is None:
    args.repeats = 2 if args.quick else 5
  if args.min_time is None:
    args.min_time = 0.0 if args.quick else 1.0
  if args.warmup is None:
    args.warmup = 0 if args.quick else 1
  if args.repeats < 1:
    p.error("--repeats must be >= 1")
  args.argv = list(sys.argv[1:] if argv is None else argv)
  return args


def _split(value: str, choices, flag: str) -> list[str]:
  items = [v.strip() for v in value.split(",") if v.strip()]
  bad = [v for v in items if v not in choices]
  if bad or not items:
    raise SystemExit(f"{flag}: unknown {bad or value!r}; choose from {choices}")
  return items


def _backend_started() -> bool:
  if "jax" not in sys.modules:
    return False
  from jax._src import xla_bridge   # no public API says this
  return xla_bridge.backends_are_initialized()


def setup_environment(args) -> None:
  """XLA flags and platform selection; must run before JAX starts a backend.

  Where this process's JAX backend is already running (an in-process caller:
  the tests, a notebook), the flags and platforms could no longer take effect
  and changing them would only mislead whatever starts next (a test worker
  whose later tests would compile under the bench's flags): the environment
  is left as it is, with a warning, and the JSON records the flags in force.
  """
  if _backend_started():
    print("warning: JAX's backend was started before the bench could set "
          "its XLA flags and platforms; running with XLA_FLAGS="
          f"{os.environ.get('XLA_FLAGS', '')!r}", file=sys.stderr)
    return
  if args.device == "cpu":
    os.environ["JAX_PLATFORMS"] = "cpu"
  elif args.device == "gpu":
    os.environ.setdefault("JAX_PLATFORMS", "cuda,cpu")
  if args.device != "cpu":
    # Leave room for torch in the same process (JAX preallocates 75 %).
    os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.45")
  flags = os.environ.get("XLA_FLAGS", "")
  if args.device != "gpu" and args.cpu_xla_flags:
    for flag in args.cpu_xla_flags.split():
      name = flag.split("=")[0]
      if name not in flags:
        flags += " " + flag
  os.environ["XLA_FLAGS"] = flags.strip()
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  # Cold compiles in both frameworks: no inductor caches from earlier runs
  # (JAX's persistent cache is off unless JAX_COMPILATION_CACHE_DIR is set).
  os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "0")
  os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "0")


# ============================================================================
# Workloads.
# ============================================================================
@dataclasses.dataclass(frozen=True)
class Workload:
  """One benchmark row group: model, task, stage, optimizer, batch."""
  name: str
  model: str
  model_kwargs: dict
  task: Any                      # tml.train_step.TaskSpec
  stage_name: str
  weights: dict
  trainable: tuple | None
  optimizer: str
  learning_rate: float
  momentum: float
  batch_size: int
  image_size: int                # of the batch's images (48 for DeVries)
  augment_task: Any = None       # TaskSpec with augmentation (DeVries)
  description: str = ""
  dtype: str = "float32"         # compute dtype (tml.models.COMPUTE_DTYPES)

  @property
  def label(self) -> str:
    """``name`` plus the dtype, e.g. ``devries [bfloat16]``."""
    return f"{self.name} [{self.dtype}]"


def make_workloads(args, on_gpu: bool) -> list[Workload]:
  """One workload per model and ``--dtype``, the dtypes of a model adjacent."""
  base = _model_workloads(args, on_gpu)
  return [dataclasses.replace(w, dtype=d) for w in base
          for d in getattr(args, "dtypes", ["float32"])]


def _model_workloads(args, on_gpu: bool) -> list[Workload]:
  from tml import train_step as ts
  q = args.quick
  bs = lambda default: args.batch_size or (4 if q else default)
  n = 32 if q else 128
  unet_kw = (dict(input_size=n, depth=2, base_width=8, fc_width=32,
                  num_emotions=8) if q else
             dict(input_size=n, depth=4, base_width=64, fc_width=1024,
                  num_emotions=8))
  thermal = ts.TaskSpec(kind="thermal", image_size=n, num_classes=8,
                        emotion_loss="mse")
  out = []
  models = set(args.models)
  if models & {"chu_unet", "chu_unet/stage2"}:
    out.append(Workload(
        "chu_unet/stage2", "chu_unet", unet_kw, thermal, "stage2",
        {"landmark": 1.0, "emotion": 1.0}, None, "adam", 1e-4, 0.0,
        bs(32 if on_gpu else 8), n,
        description="U-Net + FC heads, landmark MSE + emotion MSE, Adam"))
  if models & {"chu_unet", "chu_unet/stage1"}:
    out.append(Workload(
        "chu_unet/stage1", "chu_unet", unet_kw, thermal, "stage1",
        {"unet": 1.0}, ("unet",), "adam", 1e-4, 0.0,
        bs(32 if on_gpu else 8), n,
        description="U-Net only, Eq. 1 heatmap + softmax-CE unet loss, Adam"))
  if "basic_cnn" in models:
    kw = dict(input_size=n, fc_width=32 if q else 1024, num_emotions=0)
    out.append(Workload(
        "basic_cnn", "basic_cnn", kw, thermal, "stage2", {"landmark": 1.0},
        None, "adam", 1e-4, 0.0, bs(32), n,
        description="six 3x3 convs + FC 1024 + FC 136, landmark MSE, Adam"))
  if "devries" in models:
    image, crop = (24, 20) if q else (48, 42)
    kw = dict(num_classes=7, map_head=True, map_size=crop,
              fc_width=64 if q else 3072, dropout_rate=0.0 if q else 0.5)
    task = ts.TaskSpec(kind="expression", image_size=image, num_classes=7,
                       crop_size=crop, emotion_loss="xent",
                       batch_standardise=True, brow_width=1.0)
    aug = dataclasses.replace(task, augment=True, max_shift=3.0,
                              max_rotate_deg=45.0, max_zoom=1.2, flip=True)
    out.append(Workload(
        "devries", "devries", kw, task, "stage2", {"emotion": 1.0, "maps": 1.0},
        None, "sgd", 0.01, 0.9, bs(128), image, augment_task=aug,
        description="centre crop, batch standardise, label maps on device, "
        "dropout, softmax CE + per-pixel BCE, SGD momentum"))
  return out


def face_landmarks(rng, batch: int, size: int):
  """Plausible (x, y) 68-point faces in a ``size`` image, jittered."""
  import numpy as np
  t = np.linspace(0, 1, 17)
  jaw = np.stack([0.15 + 0.7 * t, 0.45 + 0.4 * np.sin(np.pi * t)], -1)
  brow = lambda x0: np.stack([x0 + 0.25 * np.linspace(0, 1, 5),
                              0.32 - 0.04 * np.sin(np.pi * np.linspace(0, 1, 5))], -1)
  nose = np.stack([np.full(4, 0.5), np.linspace(0.4, 0.58, 4)], -1)
  nostrils = np.stack([np.linspace(0.43, 0.57, 5), np.full(5, 0.62)], -1)
  ang = np.linspace(0, 2 * np.pi, 6, endpoint=False)
  eye = lambda cx: np.stack([cx + 0.08 * np.cos(ang), 0.42 + 0.03 * np.sin(ang)], -1)
  ang12 = np.linspace(np.pi, 3 * np.pi, 12, endpoint=False)
  outer = np.stack([0.5 + 0.15 * np.cos(ang12), 0.75 + 0.06 * np.sin(ang12)], -1)
  ang8 = np.linspace(np.pi, 3 * np.pi, 8, endpoint=False)
  inner = np.stack([0.5 + 0.1 * np.cos(ang8), 0.75 + 0.03 * np.sin(ang8)], -1)
  template = np.concatenate([jaw, brow(0.2), brow(0.55), nose, nostrils,
                             eye(0.33), eye(0.67), outer, inner]) * (size - 1)
  jitter = rng.normal(0, 0.02 * size, (batch, 1, 2))
  return (template[None] + jitter +
          rng.normal(0, 0.005 * size, (batch, 68, 2))).astype(np.float32)


def make_batch(w: Workload, seed: int = 0, count: int | None = None):
  """A host batch (or ``count`` examples) of the shapes the step reads."""
  import numpy as np
  rng = np.random.default_rng(seed)
  b = count or w.batch_size
  if w.task.kind == "expression":   # standardised intensities
    image = rng.normal(0, 1, (b, w.image_size, w.image_size, 1))
  else:                             # [0, 1] thermal grey
    image = rng.uniform(0, 1, (b, w.image_size, w.image_size, 1))
  return {
      "image": image.astype(np.float32),
      "landmarks": face_landmarks(rng, b, w.image_size),
      "emotion": rng.integers(0, w.task.num_classes, b).astype(np.int32),
      "has_landmarks": np.ones(b, np.float32),
      "weight": np.ones(b, np.float32),
  }



def open_devices(device: str, precision: str) -> argparse.Namespace:
  """The devices both frameworks time on, after ``setup_environment``.

  ``device``: auto / cpu / gpu; ``precision``: float32 (full-precision
  matmuls in both) or tf32. Returns ``gpu``, ``jax_device``,
  ``torch_device``, ``threads``, ``tconf`` (torch's settings) and ``mesh``
  (one device). Shared by this bench and ``experiments.bench_scaling``.
  """
  import jax
  import torch
  from experiments import bench_torch
  from tml import parallel
  gpu = jax.default_backend() == "gpu" if device == "auto" else device == "gpu"
  if gpu and not torch.cuda.is_available():
    raise SystemExit("bench: JAX sees a GPU but torch.cuda is not available; "
                     "install a CUDA build of torch or pass --device=cpu")
  jax_device = jax.devices("gpu" if gpu else "cpu")[0]
  torch_device = torch.device("cuda", 0) if gpu else torch.device("cpu")
  try:
    threads = len(os.sched_getaffinity(0))
  except AttributeError:
    threads = os.cpu_count() or 1
  if precision == "float32":
    jax.config.update("jax_default_matmul_precision", "highest")
  tconf = bench_torch.configure(torch_device, threads, precision)
  return argparse.Namespace(gpu=gpu, jax_device=jax_device,
                            torch_device=torch_device, threads=threads,
                            tconf=tconf, mesh=parallel.make_mesh([jax_device]))


# ============================================================================
# Main.
# ============================================================================
def main(argv=None) -> dict:
  args = parse_args(argv)
  setup_environment(args)
  import jax
  from experiments import bench_report as report
  from experiments import bench_runners as R

  log = lambda s: print(s, flush=True)
  d = open_devices(args.device, args.precision)
  gpu, jax_device, torch_device = d.gpu, d.jax_device, d.torch_device
  threads, tconf, mesh = d.threads, d.tconf, d.mesh

  info = report.machine_info(jax_device, torch_device)
  hw = args.hardware or report.hardware_name(info) + ("-quick" if args.quick else "")
  out_path = pathlib.Path(args.out or REPO / "benchmarks" / f"{hw}.json")
  matmul_n = 256 if args.quick else (8192 if gpu else 2048)
  command = "python -m experiments.bench " + " ".join(
      shlex.quote(a) for a in args.argv)
  results = {
      "hardware": hw, "command": command.strip(),
      "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime(
          "%Y-%m-%d %H:%M"),
      "machine": info,
      "config": {"models": args.models, "frameworks": args.frameworks,
                 "repeats": args.repeats, "min_time_s": args.min_time,
                 "warmup": args.warmup, "quick": args.quick,
                 "dtypes": args.dtypes,
                 "precision": args.precision, "matmul_n": matmul_n,
                 "device": "gpu" if gpu else "cpu", **tconf,
                 "jax_compilation_cache_dir": os.environ.get(
                     "JAX_COMPILATION_CACHE_DIR"),
                 "torchinductor_fx_graph_cache": os.environ.get(
                     "TORCHINDUCTOR_FX_GRAPH_CACHE")},
      "json_path": os.path.relpath(out_path, REPO) if out_path.is_absolute()
                   and REPO in out_path.parents else str(out_path),
      "benchmarks": []}
  log(f"bench: {info['cpu_model']} x{threads}, jax {jax_device}, torch "
      f"{torch_device}, XLA_FLAGS={info['xla_flags']!r}")

  from tml import models
  params_of = {}   # one init per model: every dtype starts from the same weights
  for w in make_workloads(args, gpu):
    log(f"\n== {w.label} (batch {w.batch_size}): {w.description}")
    first_of_model = w.name not in params_of
    if first_of_model:
      model = models.build_model(w.model, **w.model_kwargs)
      shape = (1, w.task.input_size, w.task.input_size, 1)
      params_of[w.name] = jax.device_get(
          models.init_params(model, shape, seed=0))
    params = params_of[w.name]
    batch = make_batch(w)
    runners: list[R.Runner] = []
    failures: dict[str, str] = {}

    def add(name, make):
      try:
        runners.append(make())
      except Exception as e:  # pylint: disable=broad-except
        log(f"  {name:<16} FAILED to build: {e!r}")
        failures[name] = repr(e)

    if "jax" in args.frameworks:
      add("jax", lambda: R.JaxStepRunner("jax", w, params, batch, mesh))
    for name in ("torch_eager", "torch_compile"):
      if name in args.frameworks:
        add(name, lambda name=name: R.TorchStepRunner(
            name, w, params, batch, torch_device,
            compile_=name == "torch_compile"))
    if w.augment_task is not None and "jax" in args.frameworks:
      add("jax+augment", lambda: R.JaxStepRunner(
          "jax+augment", w, params, batch, mesh, task=w.augment_task))
      if first_of_model:   # float32 augmentation: the same in every dtype
        add("augment_only", lambda: R.AugmentRunner(w, batch, mesh))
    add("jnp.dot", lambda: R.JaxMatmulRunner(matmul_n, jax_device, w.dtype))
    add("torch.mm", lambda: R.TorchMatmulRunner(matmul_n, torch_device,
                                                w.dtype))
    if first_of_model:     # the numpy input pipeline does not depend on dtype
      arrays = make_batch(w, seed=1, count=max(8 * w.batch_size, 1024))
      for name, transfer in (("pipeline", False), ("pipeline+transfer", True)):
        add(name, lambda name=name, transfer=transfer: R.PipelineRunner(
            name, w, arrays, mesh, transfer=transfer))
    loads = R.measure(runners, args, log, failures)
    for r in runners:
      if isinstance(r, R.JaxStepRunner):
        r.analyse()
    profile = None
    jax_runner = next((r for r in runners if r.name == "jax"), None)
    if args.profile_dir and jax_runner is not None:
      from experiments import bench_profile
      profile = bench_profile.record(
          jax_runner, args.profile_steps,
          pathlib.Path(args.profile_dir) / bench_profile.group_dirname(w.label))
      log(f"  profile: {profile['dir']}, device ops "
          f"{profile.get('device_ms_per_step', 0.0):.2f} ms/step"
          + (f" ({profile['note']})" if profile.get("note") else ""))
    results["benchmarks"].append(report.summarise_group(w, runners))
    if profile is not None:
      results["benchmarks"][-1]["profile"] = profile
    # Written after every group, so a run stopped by a time limit keeps what
    # it finished ("complete": false until the end).
    _write_json(out_path, dict(results, complete=False))
    results["benchmarks"][-1]["loadavg_1min_per_repeat"] = loads
    if failures:
      results["benchmarks"][-1]["failures"] = failures
    for r in runners:
      r.close()
    del runners

  report.finalise(results)
  results["machine"]["loadavg_at_end"] = R.loadavg()
  text = report.text_tables(results)
  log("\n" + text + "\n")
  for dtype, peak in results["peak_matmul_gflops_by_dtype"].items():
    log(f"{dtype} matmul peak (max of jnp.dot / torch.mm medians): "
        f"{report.fmt(peak, '.1f')} GFLOP/s")
  results["complete"] = True
  _write_json(out_path, results)
  log(f"wrote {out_path}")
  if args.markdown:
    md = pathlib.Path(args.markdown)
    report.update_markdown(md, report.markdown_section(results), hw)
    log(f"updated {md}")
  return results


def _write_json(path: pathlib.Path, results: dict) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(json.dumps(results, indent=1, default=_json_default) + "\n")
  tmp.replace(path)


def _json_default(x):
  try:
    import numpy as np
    if isinstance(x, np.generic):
      return x.item()
  except ImportError:
    pass
  if isinstance(x, tuple):
    return list(x)
  return repr(x)


if __name__ == "__main__":
  main()
