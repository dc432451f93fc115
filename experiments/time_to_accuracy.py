r"""Time to accuracy (issue 12, item 6): the real training loop's wall time to
a fixed held-out accuracy, and its images/s against the bare step's.

  python -m experiments.time_to_accuracy                   # both settings, jax + torch
  python -m experiments.time_to_accuracy --settings=chu_demo --frameworks=jax

For each setting and framework, one ``experiments.run`` in a subprocess with
``--monitor_every_steps`` on (`tml.monitor`: it evaluates a held-out set and
trains nothing), then one ``experiments.bare_step`` with the same flags in a
fresh process. Per run it reports:

- ``seconds_to_target``: the loop seconds (input pipeline, the step with its
  on-device augmentation, logging, model-selection evaluations, checkpoints
  and the first step's compilation; the monitor's own evaluations left out)
  at the first monitor record that reaches the target, counting the stages
  before it; resolution: one monitor interval. None where it never does.
- ``loop_fraction``: per stage, the loop's images/s over the bare step's,
  twice: for the whole stage (compilation and everything included) and in
  the steady state between the stage's first and last monitor records.

Settings (targets fixed before any run; the monitor set is the one model
selection reads where there is one, otherwise the test set):

- ``devries_fer2013``: DeVries baseline without transformations
  (devries_fer2013_baseline_notrans.flags), split 0, 2 passes, selection each
  pass; target 40 % on FER2013 PublicTest (the 2-pass runs of the recipe
  ended at 45.5-48.6 % on PublicTest). Needs ../shared/data/fer2013.
- ``chu_demo``: demo.flags (synthetic thermal, small U-Net at N=64, both
  stages); target NME 6 % (inter-pupil) on split 0's test set.

Writes ``--out``/time_to_accuracy.json and .md, each run's workdir and log,
and the bare-step JSON. A finished run's workdir is reused (its results and
metrics are read again), so an interrupted sweep reruns only what is missing.
"""
from __future__ import annotations

import json
import os
import pathlib
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
                  "--monitor_every_steps=28", "--log_every_steps=28"],
        "split": "init_0", "tag": "stage2/monitor/emotion_accuracy",
        "target": 40.0, "higher_is_better": True, "unit": "% PublicTest accuracy"},
    "chu_demo": {
        "flags": ["--flagfile=demo.flags", "--monitor_every_steps=122"],
        "split": "split_0", "tag": "stage2/monitor/nme_inter_pupil",
        "target": 6.0, "higher_is_better": False, "unit": "% NME (inter-pupil), test"},
}

flags.DEFINE_list("settings", list(SETTINGS), f"Of {', '.join(SETTINGS)}.")
flags.DEFINE_list("frameworks", ["jax", "torch"], "jax, torch.")
flags.DEFINE_string("out", "results/time_to_accuracy", "Output folder.")
flags.DEFINE_list("extra", [], "More experiments.run flags for every run "
                  "(e.g. --extra=--max_steps_per_stage=4 for a smoke test).")
flags.DEFINE_integer("bare_steps", 20, "experiments.bare_step --bare_steps.")
flags.DEFINE_integer("bare_repeats", 3, "experiments.bare_step --bare_repeats.")
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


def steady_rate(records: list[dict], stage: str, batch_size: int) -> float | None:
  """Loop images/s between a stage's first and last monitor records."""
  mon = [r for r in records if f"{stage}/monitor/loop_seconds" in r]
  if len(mon) < 2:
    return None
  ds = mon[-1][f"{stage}/monitor/loop_seconds"] - mon[0][f"{stage}/monitor/loop_seconds"]
  return (mon[-1]["step"] - mon[0]["step"]) * batch_size / ds if ds > 0 else None


def summarise(setting: dict, results: dict, records: list[dict], bare: dict) -> dict:
  """One run's row: time to target and loop/bare fractions per stage."""
  split = results["per_split"][0]
  batch = int(results["config"]["batch_size"])
  hit = monitor_lib.first_reaching(records, setting["tag"], setting["target"],
                                   setting["higher_is_better"])
  last = [r[setting["tag"]] for r in records if setting["tag"] in r]
  stages = {}
  for name, t in (split.get("train_timing") or {}).items():
    if not t:
      continue
    b = bare["stages"][name]["images_per_second"]
    steady = steady_rate(records, name, batch)
    stages[name] = {
        "loop_seconds": t["seconds"], "steps": t["steps"],
        "loop_images_per_second": t["images_per_second"],
        "steady_loop_images_per_second": None if steady is None else round(steady, 2),
        "bare_images_per_second": b,
        "bare_images_per_second_range": bare["stages"][name]["images_per_second_range"],
        "loop_fraction": round(t["images_per_second"] / b, 3),
        "steady_loop_fraction": None if steady is None else round(steady / b, 3)}
  return {"target": setting["target"], "unit": setting["unit"], "tag": setting["tag"],
          "reached": hit, "seconds_to_target": hit and round(hit["loop_seconds"], 1),
          "final_monitor_value": last[-1] if last else None,
          "total_loop_seconds": round(sum(s["loop_seconds"] for s in stages.values()), 1),
          "stages": stages}


def markdown(rows: list[dict]) -> str:
  lines = ["| setting | framework | target | seconds to target (step) | final value "
           "| stage | loop img/s | steady loop img/s | bare step img/s (range) "
           "| loop / bare | steady / bare |", "|" + "---|" * 11]
  for r in rows:
    s = r["summary"]
    hit = s["reached"]
    first = True
    for name, st in s["stages"].items():
      head = (f"| {r['setting']} | {r['framework']} | {s['target']} {s['unit']} | "
              + (f"{s['seconds_to_target']} (step {hit['step']})" if hit else "not reached")
              + f" | {s['final_monitor_value']:.2f} |") if first else "| | | | | |"
      lo, hi = st["bare_images_per_second_range"]
      lines.append(
          f"{head} {name} | {st['loop_images_per_second']:.1f} | "
          f"{st['steady_loop_images_per_second'] or float('nan'):.1f} | "
          f"{st['bare_images_per_second']:.1f} ({lo:.1f}-{hi:.1f}) | "
          f"{100 * st['loop_fraction']:.0f} % | "
          + (f"{100 * st['steady_loop_fraction']:.0f} % |"
             if st["steady_loop_fraction"] is not None else "n/a |"))
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
      bare_json = out / f"{tag}_bare.json"
      _run([sys.executable, "-m", "experiments.bare_step", *args,
            f"--bare_steps={FLAGS.bare_steps}", f"--bare_repeats={FLAGS.bare_repeats}",
            f"--bare_out={bare_json}"], out / f"{tag}_bare.log")
      results = json.loads((workdir / "results.json").read_text())
      records = [json.loads(l) for l in
                 (workdir / setting["split"] / "metrics.jsonl").read_text().splitlines()]
      summary = summarise(setting, results, records, json.loads(bare_json.read_text()))
      rows.append({"setting": name, "framework": fw, "command_args": args,
                   "process_wall_seconds": round(wall, 1), "summary": summary})
      print(f"{tag}: {json.dumps(summary)}", flush=True)
  (out / "time_to_accuracy.json").write_text(json.dumps(rows, indent=1) + "\n")
  (out / "time_to_accuracy.md").write_text(markdown(rows))
  writers.write_run_info(out, {"settings": FLAGS.settings, "frameworks": FLAGS.frameworks,
                               "extra": FLAGS.extra})
  print(markdown(rows))


if __name__ == "__main__":
  app.run(main)
