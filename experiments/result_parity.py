r"""Result parity: the same flag file trained by both frameworks over seeds.

  python -m experiments.result_parity --root=runs/parity --out=results/parity/results
  python -m experiments.result_parity --settings=chu --seeds=0,1,2,3,4   # one setting
  python -m experiments.result_parity --only_report

For each setting and framework it runs ``python -m experiments.run
--flagfile=<setting's flag file> <setting's budget flags> --splits=<seeds>
--framework=<jax|torch> --workdir=<root>/<setting>/<framework>`` (rerunning
skips finished seeds and resumes a killed one), then writes ``README.md`` and
``results.json`` into --out: per framework the metric's mean and sample std
over seeds, the per-seed paired difference (torch - jax: the same seed is the
same Flax init and the same batches in both), two one-sided tests (TOST) for
equivalence within the setting's margin, paired and unpaired (Welch), the
wall time of each run and the training loop's images/s (logging, selection
evaluations and checkpoints included) per framework.

The settings are fixed here (name, flag file, budget, metric, margin), so the
table always compares like with like; flags after ``--`` are added to every
run of both frameworks (a size or budget, the same for both).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys
from typing import Any, Sequence

from absl import app
from absl import flags
import numpy as np


@dataclasses.dataclass(frozen=True)
class Setting:
  name: str
  flagfile: str
  budget: tuple[str, ...]
  metric: str           # a results.json key
  margin: float         # equivalence margin, in the metric's units
  higher_is_better: bool


SETTINGS = {
    # DeVries Table I "No Transformations" baseline at the CPU budget of
    # results/devries_fer2013 (2 passes, PublicTest selection every pass).
    "devries": Setting("devries", "devries_fer2013_baseline_notrans.flags",
                       ("--stage2_epochs=2", "--eval_every_epochs=1"),
                       "emotion_accuracy", 1.0, True),
    # Chu multi-task + Eq. 4 (the main job's size and schedule).
    "chu": Setting("chu", "demo.flags", (), "nme_inter_pupil", 0.2, False),
}
FRAMEWORKS = ("jax", "torch")


def command(s: Setting, framework: str, seeds: Sequence[int], root: pathlib.Path,
            extra: Sequence[str] = ()) -> list[str]:
  return [sys.executable, "-m", "experiments.run", f"--flagfile={s.flagfile}",
          *s.budget, f"--splits={','.join(str(x) for x in seeds)}",
          f"--framework={framework}", f"--workdir={root / s.name / framework}",
          *extra]


def tost(x: np.ndarray, y: np.ndarray | None, margin: float,
         alpha: float = 0.05) -> dict[str, Any]:
  """Two one-sided t-tests that mean(x) - mean(y) lies within +-margin.

  ``y`` None: ``x`` are paired differences (one-sample test on them);
  otherwise Welch's unequal-variance test. ``p`` is the larger one-sided p
  value; equivalent when ``p < alpha``. Also the (1 - 2 alpha) confidence
  interval of the difference, which lies inside +-margin exactly then.
  """
  from scipy import stats
  x = np.asarray(x, float)
  if y is None:
    n = len(x)
    diff, se, df = x.mean(), x.std(ddof=1) / np.sqrt(n), n - 1
  else:
    y = np.asarray(y, float)
    vx, vy = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    diff, se = x.mean() - y.mean(), np.sqrt(vx + vy)
    df = (vx + vy) ** 2 / (vx ** 2 / (len(x) - 1) + vy ** 2 / (len(y) - 1))
  if se == 0:
    p = 0.0 if abs(diff) < margin else 1.0
    lo = hi = diff
  else:
    p_low = stats.t.sf((diff + margin) / se, df)    # H0: diff <= -margin
    p_high = stats.t.cdf((diff - margin) / se, df)  # H0: diff >= +margin
    p = float(max(p_low, p_high))
    half = stats.t.ppf(1 - alpha, df) * se
    lo, hi = diff - half, diff + half
  return {"difference": float(diff), "se": float(se), "df": float(df), "p": p,
          "ci90": [float(lo), float(hi)], "margin": margin,
          "equivalent": bool(p < alpha)}


def _runs(workdir: pathlib.Path) -> dict[int, dict]:
  f = workdir / "results.json"
  if not f.exists():
    return {}
  per = json.loads(f.read_text())["per_split"]
  return {i: s for i, s in enumerate(per)}


def _loop_rate(split: dict) -> tuple[float, float]:
  """(seconds, images/s) of a split's training loop over all its stages."""
  t = [v for v in (split.get("train_timing") or {}).values() if v]
  secs = sum(v["seconds"] for v in t)
  images = sum(v["images_per_second"] * v["seconds"] for v in t)
  return secs, (images / secs if secs else float("nan"))


def summarise(s: Setting, root: pathlib.Path) -> dict[str, Any] | None:
  runs = {fw: _runs(root / s.name / fw) for fw in FRAMEWORKS}
  seeds = sorted(set(runs["jax"]) & set(runs["torch"]))
  if len(seeds) < 2:
    return None
  vals = {fw: np.array([runs[fw][i][s.metric] for i in seeds]) for fw in FRAMEWORKS}
  out = {"setting": dataclasses.asdict(s), "seeds": seeds, "frameworks": {}}
  for fw in FRAMEWORKS:
    timing = [_loop_rate(runs[fw][i]) for i in seeds]
    out["frameworks"][fw] = {
        "values": vals[fw].tolist(), "mean": float(vals[fw].mean()),
        "std": float(vals[fw].std(ddof=1)),
        "loop_seconds": [t[0] for t in timing],
        "loop_images_per_second": [t[1] for t in timing]}
  d = vals["torch"] - vals["jax"]
  out["paired_difference"] = {"values": d.tolist(), "mean": float(d.mean()),
                              "std": float(d.std(ddof=1))}
  out["tost_paired"] = tost(d, None, s.margin)
  out["tost_welch"] = tost(vals["torch"], vals["jax"], s.margin)
  return out


def _fmt(xs, f="{:.2f}"):
  return ", ".join(f.format(x) for x in xs)


def write_report(summaries: list[dict], out: pathlib.Path, header: str) -> None:
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(summaries, indent=1))
  lines = [header, ""]
  for r in summaries:
    s = r["setting"]
    lines += [f"## {s['name']}: `{s['flagfile']}` {' '.join(s['budget'])}", "",
              f"Metric `{s['metric']}`, seeds {r['seeds']}, margin +-{s['margin']}.", "",
              "| framework | per seed | mean ± std | loop s per seed | loop images/s (median) |",
              "|---|---|---|---|---|"]
    for fw, v in r["frameworks"].items():
      lines.append(f"| {fw} | {_fmt(v['values'])} | {v['mean']:.2f} ± {v['std']:.2f} | "
                   f"{_fmt(v['loop_seconds'], '{:.0f}')} | "
                   f"{np.median(v['loop_images_per_second']):.1f} |")
    d = r["paired_difference"]
    lines += ["", f"Paired difference torch - jax per seed: {_fmt(d['values'])} "
              f"(mean {d['mean']:+.2f} ± {d['std']:.2f})."]
    for name, key in (("paired", "tost_paired"), ("Welch", "tost_welch")):
      t = r[key]
      verdict = "equivalent" if t["equivalent"] else "not shown equivalent"
      lines.append(f"- TOST ({name}): difference {t['difference']:+.3f}, 90 % CI "
                   f"[{t['ci90'][0]:+.3f}, {t['ci90'][1]:+.3f}], p = {t['p']:.3g}: "
                   f"**{verdict}** at +-{t['margin']}.")
    lines.append("")
  (out / "README.md").write_text("\n".join(lines) + "\n")


def _define_flags():
  flags.DEFINE_string("root", "runs/parity", "One workdir per setting and framework.")
  flags.DEFINE_string("out", "results/parity/results", "Report folder.")
  flags.DEFINE_list("settings", list(SETTINGS), f"Of {', '.join(SETTINGS)}.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds (--splits) per setting.")
  flags.DEFINE_bool("only_report", False, "Only assemble the report.")


def main(argv):
  FLAGS = flags.FLAGS
  extra = argv[1:]
  root = pathlib.Path(FLAGS.root)
  unknown = set(FLAGS.settings) - set(SETTINGS)
  if unknown:
    raise app.UsageError(f"--settings: unknown {sorted(unknown)}; known {list(SETTINGS)}")
  seeds = [int(x) for x in FLAGS.seeds]
  if not FLAGS.only_report:
    for name in FLAGS.settings:
      for fw in FRAMEWORKS:
        cmd = command(SETTINGS[name], fw, seeds, root, extra)
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
  summaries = [r for r in (summarise(SETTINGS[n], root) for n in FLAGS.settings) if r]
  header = ("# Result parity: JAX vs PyTorch on the same flag files\n\n"
            f"Runs under `{root}`; regenerate with `python -m experiments.result_parity "
            f"--root={root} --out={FLAGS.out} --settings={','.join(FLAGS.settings)} "
            f"--seeds={','.join(FLAGS.seeds)}`.")
  write_report(summaries, pathlib.Path(FLAGS.out), header)
  print(f"report: {pathlib.Path(FLAGS.out) / 'README.md'}")


if __name__ == "__main__":
  _define_flags()
  app.run(main)
