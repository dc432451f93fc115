r"""Trajectory parity report: each network trained in JAX and in PyTorch.

    python -m experiments.trajectory_parity --models=chu_unet,basic_cnn,devries \
        --steps=300 --out=results/parity/trajectory

For every model, ``tml.torch.trajectory.run_case`` trains the variants in
lock step from the same Flax init on the same synthetic batches (no dropout,
no augmentation): the JAX step (base), the torch step with optax's update
rules, the rounding references (the JAX step on two devices, the JAX and
torch steps from the init moved by 1 ulp), ``torch.optim``'s own Adam / SGD,
and two deliberately wrong optimiser settings. Writes
``<out>/trajectory_parity.json`` (per-step losses, relative loss differences,
parameter differences at log-spaced steps, summaries, wall times, versions)
and ``<out>/trajectory_parity.png`` (loss curves and divergence vs step, log
scale), and prints a summary table.

``--size=tiny`` is the CI size (tests/test_trajectory_parity.py).
Needs the ``torch`` extra. Runs on the CPU (two JAX host devices are forced
for the two-device reference).
"""
from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                             + " --xla_force_host_platform_device_count=2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

DEFAULT_VARIANTS = ("jax,torch,jax_2dev,jax_ulp,"
                    "torch_native,wrong_a,wrong_b")


def _versions() -> dict:
  import flax
  import jax
  import optax
  import torch
  return {"python": platform.python_version(), "jax": jax.__version__,
          "flax": flax.__version__, "optax": optax.__version__,
          "torch": torch.__version__, "numpy": __import__("numpy").__version__}


def _git_state() -> dict:
  """The checked-out commit, read from ``.git`` (no git process is run);
  whether the tree has uncommitted changes is not checked (``dirty``: None)."""
  root = pathlib.Path(__file__).resolve().parents[1] / ".git"
  try:
    head = (root / "HEAD").read_text().strip()
    if head.startswith("ref: "):
      ref = head[5:]
      path = root / ref
      if path.exists():
        head = path.read_text().strip()
      else:
        packed = (root / "packed-refs").read_text().splitlines()
        head = next(l.split()[0] for l in packed if l.endswith(" " + ref))
    return {"commit": head, "dirty": None}
  except Exception:  # pylint: disable=broad-except
    return {"commit": None, "dirty": None}


def main(argv=None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="chu_unet,basic_cnn,devries")
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--size", default="report", choices=("tiny", "report"))
  parser.add_argument("--variants", default=DEFAULT_VARIANTS)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--threads", type=int, default=1,
                      help="torch intra-op threads (1: the JAX run shares the cores)")
  parser.add_argument("--out", default="results/parity/trajectory")
  args = parser.parse_args(argv)

  from tml.torch import trajectory as tr

  out = pathlib.Path(args.out)
  out.mkdir(parents=True, exist_ok=True)
  variants = [v for v in args.variants.split(",") if v]
  results, start = [], time.time()
  for name in [m for m in args.models.split(",") if m]:
    t0 = time.time()
    res = tr.run_case(tr.make_case(name, args.size), args.steps, seed=args.seed,
                      variants=variants, threads=args.threads)
    res["case_wall_s"] = time.time() - t0
    results.append(res)
    _print_case(res)
  report = {
      "command": "python -m experiments.trajectory_parity " + " ".join(
          sys.argv[1:] if argv is None else argv),
      "size": args.size, "steps": args.steps, "seed": args.seed,
      "wall_s": time.time() - start, "machine": {
          "platform": platform.platform(), "cpus": os.cpu_count(),
          "torch_threads": args.threads},
      "versions": _versions(), "git": _git_state(), "cases": results}
  (out / "trajectory_parity.json").write_text(json.dumps(report, indent=1))
  tr.plot(results, out / "trajectory_parity.png")
  print(f"wrote {out / 'trajectory_parity.json'} and "
        f"{out / 'trajectory_parity.png'} ({report['wall_s']:.0f} s)")
  return report


def _print_case(res: dict) -> None:
  loss = res["loss"]["jax"]
  print(f"\n{res['case']['name']} ({res['case']['optimizer']}, "
        f"{res['param_count']} params): loss {loss[0]:.4g} -> {loss[-1]:.4g} "
        f"in {res['steps']} steps, {res['case_wall_s']:.0f} s")
  print(f"  {'variant':14s} {'max rel dL':>10s} {'rel dL@end':>10s} "
        f"{'dp@1':>8s} {'dp@100':>8s} {'dp@end':>8s} {'x/100 st':>9s}  "
        f"first step rel dL > 1e-6 / 1e-4 / 1e-2")
  for v, d in res["vs_base"].items():
    s = d["summary"]
    p = s["param_rel_l2_at"]
    end = str(res["steps"])
    fmt = lambda x: "-" if x is None else f"{x:.1e}"
    growth = s["param_growth_per_100_steps"]
    first = s["first_step_rel_loss_above"]
    print(f"  {v:14s} {s['max_rel_loss_diff']:10.1e} "
          f"{s['rel_loss_diff_at'][end]:10.1e} {fmt(p.get('1')):>8s} "
          f"{fmt(p.get('100')):>8s} {fmt(p.get(end)):>8s} "
          f"{fmt(growth):>9s}  {first['1e-06']} / {first['0.0001']} / {first['0.01']}")


if __name__ == "__main__":
  main()
