r"""Issue #12 accuracy check: the same runs in float32 and in bfloat16, 3 seeds.

    python -m experiments.precision_check --root=runs/precision_check
    python -m experiments.precision_check --root=runs/precision_check --only_report
    python -m experiments.precision_check --profile=tiny --root=/tmp/pc   # smoke test

For every study, compute dtype and seed, one training run through the real
entry point (a subprocess, exactly what a user types):

    python -m experiments.run --flagfile=<study flags> <profile flags> \
        [flags after --] --seed=<s> --compute_dtype=<dtype> \
        --workdir=<root>/<study>/<dtype>/seed_<s>

Studies, at demo size (``--profile=demo``, the default):
  * ``chu_unet``: ``demo.flags`` (the Chu pipeline, multi-task U-Net at
    N=64, both stages, one split; the seed also draws the split);
  * ``devries``: ``devries_fer2013.flags`` at the CPU budget of
    ``results/devries_fer2013/`` (``--splits=0 --stage2_epochs=2
    --eval_every_epochs=1``; needs the prepared FER2013 with its dlib
    labels, see README "Real datasets").
``--profile=tiny`` shrinks both to a smoke test (a few seconds of training
each); its numbers mean nothing.

A finished run (its workdir holds ``results.json`` from the same dtype and
seed) is not rerun, so an interrupted check resumes where it stopped. Before
any training the script checks that ``tml.train.build_model`` really builds
each study's network with a bfloat16 compute dtype from
``--compute_dtype=bfloat16``, so a bfloat16 column can never be a float32
run in disguise.

Report (printed, and written to ``<root>/precision_check.json`` and
``<root>/precision_check.md``): per study and metric, the float32 and
bfloat16 mean and sample std over the seeds, the per-seed paired difference
(bfloat16 - float32, same seed: same split, initial weights and data order),
and the verdict. "Within seed noise" means
``|mean_bf16 - mean_f32| <= 2 * sqrt(s_f32^2 / n_f32 + s_bf16^2 / n_bf16)``
(two standard errors of the difference of the means); with fewer than two
seeds per dtype there is no noise estimate and the verdict is "n/a".
Wall time per run (summed over invocations when a run was resumed, and
including process start and compiles) is reported too, but this is an
accuracy check on a possibly shared machine: time the steps with
``experiments.bench --dtype=float32,bfloat16``.
"""
from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import subprocess
import sys
import time
from typing import Any

REPO = pathlib.Path(__file__).resolve().parents[1]
DTYPES = ("float32", "bfloat16")

# study -> the flags of its runs, per profile (after the flag file).
STUDIES: dict[str, dict[str, Any]] = {
    "chu_unet": {
        "model": "chu_unet",
        "flagfile": "demo.flags",
        "profiles": {
            "demo": [],
            "tiny": ["--image_size=16", "--unet_depth=2", "--unet_width=4",
                     "--fc_width=16", "--batch_size=16", "--eval_batch_size=64",
                     "--stage1_epochs=1", "--stage2_epochs=1",
                     "--early_stopping_k=0", "--train_limit=64",
                     "--log_every_steps=1", "--num_plot_images=2"],
        },
        # (results.json key, label, lower is better)
        "metrics": (("nme_inter_pupil", "NME inter-pupil (%)", True),
                    ("nme_inter_ocular", "NME inter-ocular (%)", True),
                    ("emotion_accuracy", "emotion accuracy (%)", False)),
    },
    "devries": {
        "model": "devries",
        "flagfile": "devries_fer2013.flags",
        "profiles": {
            "demo": ["--splits=0", "--stage2_epochs=2", "--eval_every_epochs=1"],
            "tiny": ["--splits=0", "--fc_width=32", "--train_limit=256",
                     "--batch_size=32", "--eval_batch_size=256",
                     "--stage2_epochs=1", "--eval_every_epochs=1",
                     "--ten_crop=false", "--log_every_steps=1",
                     "--checkpoint_every_steps=100"],
        },
        "metrics": (("emotion_accuracy",
                     "PrivateTest accuracy (%), epoch selected on PublicTest",
                     False),),
    },
}
# Flags the script sets itself, per run; not allowed after --.
OWN_FLAGS = ("seed", "compute_dtype", "workdir", "flagfile", "model", "splits")


# ============================================================================
# Command line.
# ============================================================================
def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
      prog="python -m experiments.precision_check",
      description=__doc__.split("\n\n")[0],
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--root", default="runs/precision_check",
                 help="folder with one workdir per study, dtype and seed")
  p.add_argument("--studies", default=",".join(STUDIES),
                 help="comma list of %s" % ", ".join(STUDIES))
  p.add_argument("--seeds", default="0,1,2", help="comma list of --seed values")
  p.add_argument("--profile", default="demo", choices=("demo", "tiny"),
                 help="demo: the issue's size; tiny: a smoke test")
  p.add_argument("--only_report", action="store_true",
                 help="run nothing; report the finished runs under --root")
  p.add_argument("extra", nargs="*",
                 help="flags after -- go to every run (e.g. -- --data_dir=...)")
  args = p.parse_args(argv)
  args.studies = [s.strip() for s in args.studies.split(",") if s.strip()]
  bad = [s for s in args.studies if s not in STUDIES]
  if bad or not args.studies:
    p.error(f"--studies: unknown {bad}; choose from {', '.join(STUDIES)}")
  try:
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
  except ValueError:
    p.error(f"--seeds={args.seeds}: expected comma-separated integers")
  if not args.seeds:
    p.error("--seeds: expected at least one seed")
  for flag in args.extra:
    name = flag.lstrip("-").split("=", 1)[0]
    if not flag.startswith("--") or name in OWN_FLAGS:
      p.error(f"{flag}: flags after -- must be --name=value and not one of "
              f"{', '.join('--' + f for f in OWN_FLAGS)} (set per run)")
  args.root = pathlib.Path(args.root)
  args.argv = list(sys.argv[1:] if argv is None else argv)
  return args


def workdir(root: pathlib.Path, study: str, dtype: str, seed: int) -> pathlib.Path:
  return root / study / dtype / f"seed_{seed}"


def run_command(study: str, dtype: str, seed: int, root: pathlib.Path,
                profile: str, extra=()) -> list[str]:
  """The ``experiments.run`` command line of one run (without the python)."""
  spec = STUDIES[study]
  return (["-m", "experiments.run", f"--flagfile={spec['flagfile']}"]
          + list(spec["profiles"][profile]) + list(extra)
          + [f"--seed={seed}", f"--compute_dtype={dtype}",
             f"--workdir={workdir(root, study, dtype, seed)}"])


# ============================================================================
# The bfloat16 wiring check and the runs.
# ============================================================================
def check_bfloat16_reaches_models(studies) -> None:
  """Raises SystemExit unless ``tml.train.build_model`` builds each study's
  model with a bfloat16 compute dtype from ``compute_dtype='bfloat16'``."""
  import jax.numpy as jnp
  from tml import input_pipeline, protocol, train
  from tml.config import Config
  datasets = {"chu_unet": "synthetic_thermal", "devries": "fer2013"}
  for study in studies:
    name = STUDIES[study]["model"]
    cfg = Config(model=name, dataset=datasets[name], compute_dtype="bfloat16")
    info = input_pipeline.dataset_info(cfg.dataset)
    stub = protocol.Dataset(cfg.dataset, info.kind, tuple(info.class_names), {})
    model = train.build_model(cfg, stub)
    if jnp.dtype(model.dtype) != jnp.dtype(jnp.bfloat16):
      raise SystemExit(
          f"precision_check: --compute_dtype=bfloat16 does not reach the "
          f"{name} model (tml.train.build_model built it with dtype="
          f"{jnp.dtype(model.dtype).name}); pass dtype= to it there first")


def _finished(wd: pathlib.Path, dtype: str, seed: int) -> bool:
  try:
    cfg = json.loads((wd / "config.json").read_text())
  except (OSError, ValueError):
    return False
  return ((wd / "results.json").is_file() and cfg.get("compute_dtype") == dtype
          and cfg.get("seed") == seed)


def run_all(args, log=print) -> dict[str, float]:
  """Runs every missing (study, dtype, seed); returns wall seconds per run.

  Seed-major order (every study and dtype gets seed 0 before any gets seed
  1), so a check cut short still leaves paired, comparable runs.
  """
  walls = {}
  for seed in args.seeds:
    for study in args.studies:
      for dtype in DTYPES:
        wd = workdir(args.root, study, dtype, seed)
        if _finished(wd, dtype, seed):
          log(f"== {study} {dtype} seed {seed}: done, kept ({wd})")
          continue
        cmd = run_command(study, dtype, seed, args.root, args.profile,
                          args.extra)
        log("== python " + " ".join(cmd))
        wall_file = wd / "precision_check_wall_s.json"
        start = time.perf_counter()
        try:
          subprocess.run([sys.executable, *cmd], check=True, cwd=REPO)
        finally:
          # A killed run resumes from its checkpoint next time; its wall
          # time is the sum over the invocations.
          wall = time.perf_counter() - start
          try:
            before = json.loads(wall_file.read_text())
          except (OSError, ValueError):
            before = {"wall_s": 0.0, "invocations": 0}
          walls[str(wd)] = before["wall_s"] + wall
          wd.mkdir(parents=True, exist_ok=True)
          wall_file.write_text(json.dumps(
              {"wall_s": walls[str(wd)],
               "invocations": before.get("invocations", 0) + 1}) + "\n")
  return walls


# ============================================================================
# Report.
# ============================================================================
def _mean_std(xs):
  if not xs:
    return None, None
  return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def compare(f32: dict[int, float], bf16: dict[int, float],
            lower_is_better: bool) -> dict[str, Any]:
  """Float32 vs bfloat16 values by seed -> means, stds, paired diffs, verdict."""
  a, b = list(f32.values()), list(bf16.values())
  ma, sa = _mean_std(a)
  mb, sb = _mean_std(b)
  paired = [bf16[s] - f32[s] for s in sorted(set(f32) & set(bf16))]
  out = {"float32": {"mean": ma, "std": sa, "n": len(a), "by_seed": f32},
         "bfloat16": {"mean": mb, "std": sb, "n": len(b), "by_seed": bf16},
         "paired_diff": {"mean": statistics.fmean(paired) if paired else None,
                         "min": min(paired) if paired else None,
                         "max": max(paired) if paired else None,
                         "n": len(paired)},
         "lower_is_better": lower_is_better}
  if sa is None or sb is None:
    out.update(noise_2se=None, within_noise=None, verdict="n/a (< 2 seeds)")
    return out
  two_se = 2.0 * math.sqrt(sa**2 / len(a) + sb**2 / len(b))
  diff = mb - ma
  within = abs(diff) <= two_se
  out.update(noise_2se=two_se, within_noise=within)
  if within:
    out["verdict"] = "within seed noise"
  else:
    better = (diff < 0) == lower_is_better
    out["verdict"] = ("outside seed noise: bfloat16 "
                      + ("better" if better else "worse"))
  return out


def collect(root: pathlib.Path, studies, seeds) -> dict[str, Any]:
  """Reads every finished run's results.json under ``root``."""
  report: dict[str, Any] = {"studies": {}}
  for study in studies:
    spec = STUDIES[study]
    values = {d: {} for d in DTYPES}
    walls = {d: [] for d in DTYPES}
    missing = []
    for dtype in DTYPES:
      for seed in seeds:
        wd = workdir(root, study, dtype, seed)
        if not _finished(wd, dtype, seed):
          missing.append(str(wd))
          continue
        values[dtype][seed] = json.loads((wd / "results.json").read_text())
        try:
          walls[dtype].append(json.loads(
              (wd / "precision_check_wall_s.json").read_text())["wall_s"])
        except (OSError, ValueError, KeyError):
          pass
    metrics = {}
    for key, label, lower in spec["metrics"]:
      pick = {d: {s: float(r[key]) for s, r in values[d].items()
                  if isinstance(r.get(key), (int, float))} for d in DTYPES}
      if not pick["float32"] and not pick["bfloat16"]:
        continue
      metrics[key] = dict(label=label,
                          **compare(pick["float32"], pick["bfloat16"], lower))
    report["studies"][study] = {
        "flagfile": spec["flagfile"], "metrics": metrics, "missing": missing,
        "wall_s_mean": {d: (statistics.fmean(w) if w else None)
                        for d, w in walls.items()}}
  return report


def _fmt(x, spec=".2f"):
  return "-" if x is None else format(x, spec)


def _cell(d):
  if d["mean"] is None:
    return "-"
  std = f" ± {d['std']:.2f}" if d["std"] is not None else ""
  return f"{d['mean']:.2f}{std} (n={d['n']})"


def markdown(report: dict[str, Any]) -> str:
  lines = [
      "| study | metric | float32 | bfloat16 | bf16 - f32, paired by seed: "
      "mean [min, max] | 2 SE of the difference | verdict | wall s per run "
      "f32 / bf16 |",
      "|---|---|---|---|---|---|---|---|"]
  for study, s in report["studies"].items():
    wall = (f"{_fmt(s['wall_s_mean']['float32'], '.0f')} / "
            f"{_fmt(s['wall_s_mean']['bfloat16'], '.0f')}")
    for m in s["metrics"].values():
      p = m["paired_diff"]
      diff = (f"{p['mean']:+.2f} [{p['min']:+.2f}, {p['max']:+.2f}]"
              if p["n"] else "-")
      lines.append(f"| {study} | {m['label']} | {_cell(m['float32'])} | "
                   f"{_cell(m['bfloat16'])} | {diff} | "
                   f"{_fmt(m['noise_2se'])} | {m['verdict']} | {wall} |")
    for wd in s["missing"]:
      lines.append(f"| {study} | not finished: `{wd}` | | | | | | |")
  return "\n".join(lines)


def main(argv=None) -> dict[str, Any]:
  args = parse_args(argv)
  if not args.only_report:
    check_bfloat16_reaches_models(args.studies)
    run_all(args)
  report = collect(args.root, args.studies, args.seeds)
  report.update(
      command="python -m experiments.precision_check " + " ".join(args.argv),
      profile=args.profile, seeds=args.seeds,
      criterion="within seed noise: |mean_bf16 - mean_f32| <= 2 * "
                "sqrt(s_f32^2/n_f32 + s_bf16^2/n_bf16)",
      runs={study: {d: [" ".join(["python"] + run_command(
          study, d, s, args.root, args.profile, args.extra))
          for s in args.seeds] for d in DTYPES} for study in args.studies})
  text = markdown(report)
  print("\n" + text)
  args.root.mkdir(parents=True, exist_ok=True)
  (args.root / "precision_check.json").write_text(
      json.dumps(report, indent=1) + "\n")
  (args.root / "precision_check.md").write_text(
      f"Command: `{report['command']}`\n\nCriterion: {report['criterion']}\n\n"
      + text + "\n")
  print(f"wrote {args.root / 'precision_check.json'} and "
        f"{args.root / 'precision_check.md'}")
  return report


if __name__ == "__main__":
  main()
