r"""Time to accuracy (issue 12, item 6): the real training loop's wall time to
a fixed held-out accuracy, and its images/s against the bare step's.

  python -m experiments.time_to_accuracy                   # both settings, jax + torch
  python -m experiments.time_to_accuracy --settings=chu_demo --frameworks=jax

For each setting and framework, one ``experiments.run`` in a subprocess with
``--monitor_every_steps`` and ``--monitor_bare_steps`` on (`tml.monitor`: it
evaluates a held-out set, and times the same step function on a copy of the
state and the last batch; it trains nothing). Per run it reports:

- ``seconds_to_target``: the loop seconds (input pipeline, the step with its
  on-device augmentation, logging, model-selection evaluations, checkpoints
  and the first step's compilation; the monitor's own work left out) at the
  first monitor record that reaches the target, counting the stages before
  it; resolution: one monitor interval. None where it never does.
- ``paired_ratio``: per stage, the loop's images/s over each monitor
  interval (after the first, which holds the compilation) divided by the
  bare step's images/s timed at the interval's end, in the same process
  seconds later: median and range over the intervals. Paired because the
  same step timed in separate processes minutes apart differed by 20 % on
  the shared 2-core machine (165 vs 133 img/s for the demo's stage 2).
- ``whole_stage_ratio``: the stage's loop images/s (compilation and all
  included) over the median bare rate.

Settings (targets fixed before any run; the monitor set is the one model
selection reads where there is one, otherwise the test set):

- ``devries_fer2013``: DeVries baseline without transformations
  (devries_fer2013_baseline_notrans.flags), split 0, 2 passes, selection each
  pass; target 40 % on FER2013 PublicTest (the 2-pass runs of the recipe
  ended at 45.5-48.6 % on PublicTest). Needs ../shared/data/fer2013.
- ``chu_demo``: demo.flags (synthetic thermal, small U-Net at N=64, both
  stages); target NME 6 % (inter-pupil) on split 0's test set.

Writes ``--out``/time_to_accuracy.json and .md, each run's workdir and log. A finished run's workdir is reused (its results and
metrics are read again), so an interrupted sweep reruns only what is missing.
"""
from __future__ import annotations

import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

from absl import app
from absl import flags

from tml import monitor as monitor_lib

REPO = pathlib.Path(__file__).resolve().parents[1]

SETTINGS = {
    "devries_fer2013": {
        "flags": ["--flagfile=devries_fer2013_baseline_notrans.flags", "--splits=0",
                  "--stage2_epochs=2", "--eval_every_epochs=1",
                  "--monitor_every_steps=28", "--monitor_bare_steps=10",
                  "--log_every_steps=28"],
        "split": "init_0", "tag": "stage2/monitor/emotion_accuracy",
        "target": 40.0, "higher_is_better": True, "unit": "% PublicTest accuracy"},
    "chu_demo": {
        "flags": ["--flagfile=demo.flags", "--monitor_every_steps=122",
                  "--monitor_bare_steps=20"],
        "split": "split_0", "tag": "stage2/monitor/nme_inter_pupil",
        "target": 6.0, "higher_is_better": False, "unit": "% NME (inter-pupil), test"},
}


def _define_flags() -> None:
  """Only when run as a program (absl's flag registry is process-wide)."""
  flags.DEFINE_list("settings", list(SETTINGS), f"Of {', '.join(SETTINGS)}.")
  flags.DEFINE_list("frameworks", ["jax", "torch"], "jax, torch.")
  flags.DEFINE_string("out", "results/time_to_accuracy", "Output folder.")
  flags.DEFINE_list("extra", [], "More experiments.run flags for every run "
                    "(e.g. --extra=--max_steps_per_stage=4 for a smoke test).")


FLAGS = flags.FLAGS


def _run(cmd: list[str], log: pathlib.Path) -> float:
  t0 = time.time()
  with log.open("w") as f:
    proc = subprocess.run(cmd, cwd=REPO, stdout=f, stderr=subprocess.STDOUT,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
  if proc.returncode:
    tail = "".join(log.read_text().splitlines(True)[-20:])
    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}); {log}:\n{tail}")
  return time.time() - t0


def paired_ratios(records: list[dict], stage: str, batch_size: int) -> list[dict]:
  """Per monitor interval after the stage's first record (which holds the
  compilation): the loop's images/s over the interval, the bare step's
  images/s timed at its end (`tml.monitor.Monitor.bare_rate`), their ratio."""
  mon = [r for r in records if f"{stage}/monitor/bare_images_per_second" in r]
  out = []
  for a, b in zip(mon, mon[1:]):
    ds = b[f"{stage}/monitor/loop_seconds"] - a[f"{stage}/monitor/loop_seconds"]
    if ds <= 0 or b["step"] <= a["step"]:
      continue
    loop = (b["step"] - a["step"]) * batch_size / ds
    bare = b[f"{stage}/monitor/bare_images_per_second"]
    out.append({"step": b["step"], "loop": loop, "bare": bare, "ratio": loop / bare})
  return out


def _median_range(xs: list[float]) -> dict | None:
  return {"median": round(statistics.median(xs), 3), "min": round(min(xs), 3),
          "max": round(max(xs), 3), "n": len(xs)} if xs else None


def summarise(setting: dict, results: dict, records: list[dict]) -> dict:
  """One run's row: time to target and loop/bare ratios per stage."""
  split = results["per_split"][0]
  batch = int(results["config"]["batch_size"])
  hit = monitor_lib.first_reaching(records, setting["tag"], setting["target"],
                                   setting["higher_is_better"])
  last = [r[setting["tag"]] for r in records if setting["tag"] in r]
  stages = {}
  for name, t in (split.get("train_timing") or {}).items():
    if not t:
      continue
    pairs = paired_ratios(records, name, batch)
    bare = _median_range([p["bare"] for p in pairs])
    stages[name] = {
        "loop_seconds": t["seconds"], "steps": t["steps"],
        "loop_images_per_second": t["images_per_second"],
        "interval_loop_images_per_second": _median_range([p["loop"] for p in pairs]),
        "bare_images_per_second": bare,
        "paired_ratio": _median_range([p["ratio"] for p in pairs]),
        "whole_stage_ratio": (round(t["images_per_second"] / bare["median"], 3)
                              if bare else None)}
  return {"target": setting["target"], "unit": setting["unit"], "tag": setting["tag"],
          "reached": hit, "seconds_to_target": hit and round(hit["loop_seconds"], 1),
          "final_monitor_value": last[-1] if last else None,
          "total_loop_seconds": round(sum(s["loop_seconds"] for s in stages.values()), 1),
          "stages": stages}


def _mr(d, scale=1.0, fmt="{:.1f}") -> str:
  if d is None:
    return "n/a"
  return (f"{fmt.format(scale * d['median'])} ({fmt.format(scale * d['min'])}-"
          f"{fmt.format(scale * d['max'])})")


def markdown(rows: list[dict]) -> str:
  lines = ["| setting | framework | target | loop seconds to target (step) "
           "| final value | stage | stage loop img/s | interval loop img/s "
           "| bare step img/s | loop / bare, paired | whole stage / bare |",
           "|" + "---|" * 11]
  for r in rows:
    s = r["summary"]
    hit = s["reached"]
    first = True
    for name, st in s["stages"].items():
      head = (f"| {r['setting']} | {r['framework']} | {s['target']} {s['unit']} | "
              + (f"{s['seconds_to_target']} (step {hit['step']})" if hit else "not reached")
              + f" | {s['final_monitor_value']:.2f} |") if first else "| | | | | |"
      whole = st["whole_stage_ratio"]
      lines.append(
          f"{head} {name} | {st['loop_images_per_second']:.1f} | "
          f"{_mr(st['interval_loop_images_per_second'])} | "
          f"{_mr(st['bare_images_per_second'])} | "
          f"{_mr(st['paired_ratio'], 100, '{:.0f}')} % | "
          + (f"{100 * whole:.0f} % |" if whole is not None else "n/a |"))
      first = False
  return "\n".join(lines) + "\n"


def main(argv):
  del argv
  out = pathlib.Path(FLAGS.out)
  out.mkdir(parents=True, exist_ok=True)
  from tml import writers
  rows = []
  for name in FLAGS.settings:
    if name not in SETTINGS:
      raise app.UsageError(f"--settings={name}: expected one of {', '.join(SETTINGS)}")
    setting = SETTINGS[name]
    for fw in FLAGS.frameworks:
      tag = f"{name}_{fw}"
      workdir = out / tag
      args = setting["flags"] + [f"--framework={fw}", f"--workdir={workdir}",
                                 *FLAGS.extra]
      wall = _run([sys.executable, "-m", "experiments.run", *args], out / f"{tag}.log")
      results = json.loads((workdir / "results.json").read_text())
      records = [json.loads(l) for l in
                 (workdir / setting["split"] / "metrics.jsonl").read_text().splitlines()]
      summary = summarise(setting, results, records)
      rows.append({"setting": name, "framework": fw, "command_args": args,
                   "process_wall_seconds": round(wall, 1), "summary": summary})
      print(f"{tag}: {json.dumps(summary)}", flush=True)
  (out / "time_to_accuracy.json").write_text(json.dumps(rows, indent=1) + "\n")
  (out / "time_to_accuracy.md").write_text(markdown(rows))
  writers.write_run_info(out, {"settings": FLAGS.settings, "frameworks": FLAGS.frameworks,
                               "extra": FLAGS.extra})
  print(markdown(rows))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
