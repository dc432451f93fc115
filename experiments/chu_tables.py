r"""Runs every row of Chu & Liu 2019 Tables II-IV and writes the three tables.

  python -m experiments.chu_tables --root=runs/chu_tables            # all rows
  python -m experiments.chu_tables --root=runs/chu_tables --only_report
  python -m experiments.chu_tables --root=runs/chu_tables -- --flagfile=demo.flags

Flags after ``--`` are appended to every row (e.g. a smaller model for a
quick look). Each row is an ordinary ``experiments.run`` in its own workdir
under --root, so a killed table run resumes row by row. Rows from other
systems in the paper (AAM, dlib on CycleGAN faces) are not reimplemented.
"""
from __future__ import annotations

import json
import pathlib
import subprocess
import sys

from absl import app
from absl import flags

flags.DEFINE_string("root", "runs/chu_tables", "Where each row's workdir goes.")
flags.DEFINE_bool("only_report", False, "Only assemble tables from finished rows.")
FLAGS = flags.FLAGS

# (row name, flag file, tables the row appears in)
ROWS = (
    ("basic CNN", "chu_basic_cnn.flags", ("II",)),
    ("U-Net, single task, without two-stage", "chu_unet_single_one_stage.flags", ("III",)),
    ("U-Net, single task", "chu_unet_single.flags", ("II", "III")),
    ("U-Net, multi-task", "chu_multitask.flags", ("II", "IV")),
    ("U-Net, multi-task + early stopping", "chu.flags", ("II", "IV")),
    ("U-Net, single-task emotion", "chu_emotion_single.flags", ("IV",)),
)
PAPER = {  # the paper's numbers, for the side-by-side column
    ("II", "basic CNN"): "5.37", ("II", "U-Net, single task"): "4.57",
    ("II", "U-Net, multi-task"): "4.31",
    ("II", "U-Net, multi-task + early stopping"): "4.03",
    ("III", "U-Net, single task, without two-stage"): "6.84",
    ("III", "U-Net, single task"): "4.57",
    ("IV", "U-Net, single-task emotion"): "73.80",
    ("IV", "U-Net, multi-task"): "69.37",
    ("IV", "U-Net, multi-task + early stopping"): "65.68",
}


def _fmt(res, key):
  v = res.get(key)
  if not isinstance(v, (int, float)):
    return "n/a"
  s = res.get(f"{key}_std")
  return f"{v:.2f} ± {s:.2f}" if isinstance(s, (int, float)) else f"{v:.2f}"


def tables(root: pathlib.Path) -> str:
  out = []
  spec = {"II": ("Table II: landmark detection, NME (inter-pupil, %)", "nme_inter_pupil"),
          "III": ("Table III: with / without two-stage training, NME (%)", "nme_inter_pupil"),
          "IV": ("Table IV: emotion recognition accuracy (%)", "emotion_accuracy")}
  for table, (title, key) in spec.items():
    out += [f"### {title}", "", "| row | ours (mean ± std over splits) | "
            "mean-shape NME | paper |", "|---|---|---|---|"]
    for name, flagfile, in_tables in ROWS:
      if table not in in_tables:
        continue
      f = root / pathlib.Path(flagfile).stem / "results.json"
      res = json.loads(f.read_text()) if f.exists() else {}
      paper = PAPER.get((table, name), "n/a")
      out.append(f"| {name} | {_fmt(res, key) if res else 'not run'} | "
                 f"{_fmt(res, 'mean_shape_nme_inter_pupil') if res else ''} | {paper} |")
    out.append("")
  return "\n".join(out)


def main(argv):
  extra = argv[1:]
  root = pathlib.Path(FLAGS.root)
  if not FLAGS.only_report:
    for name, flagfile, _ in ROWS:
      cmd = [sys.executable, "-m", "experiments.run", f"--flagfile={flagfile}",
             *extra, f"--workdir={root / pathlib.Path(flagfile).stem}"]
      print(f"== {name}: {' '.join(cmd[1:])}", flush=True)
      subprocess.run(cmd, check=True)
  text = tables(root)
  root.mkdir(parents=True, exist_ok=True)
  (root / "tables.md").write_text(text)
  print(text)


if __name__ == "__main__":
  from experiments.run import expand_flagfiles
  app.run(main, argv=[sys.argv[0]] + expand_flagfiles(sys.argv[1:]))
