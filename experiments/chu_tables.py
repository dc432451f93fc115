r"""Runs every row of Chu & Liu 2019 Tables II-IV and writes the three tables.

  python -m experiments.chu_tables --root=runs/chu_tables                 # paper size
  python -m experiments.chu_tables --root=runs/chu_quick --profile=quick  # 2 CPU cores
  python -m experiments.chu_tables --root=runs/chu_quick --profile=quick --only_report
  python -m experiments.chu_tables --root=runs/chu_quick --profile=quick -- --splits=0

Each row is an ordinary ``experiments.run`` of its own flag file in its own
workdir under --root, so a killed table run resumes row by row, and every row
can be rerun alone (the command is printed and written next to the tables).

Comparing like with like:

* A row's model, heads, loss weights, early stopping and epochs come from its
  flag file only. ``--profile`` changes size fields only (``quick`` appends
  ``chu_quick_size.flags``: image size, U-Net depth/width, FC width, batch
  size, learning rate, splits, log interval) and the epoch budget.
* Every row's epochs come from one budget ``(S1, S2)`` (paper: 40 + 60) by
  the row's budget kind: ``two_stage`` trains S1 + S2; ``one_stage`` trains
  S1 + S2 epochs in one stage (Table III "without two-stage training" and
  the emotion-only row: equal totals with the rows they are compared with);
  ``first_stage`` trains S1 (the basic CNN: "the same as the first-stage
  training", paper Sec. IV). The tables state each row's budget.
* Flags after ``--`` go to every row but may not set a row-defining field
  (model, heads, loss weights and the emotion loss, early stopping, stage
  epochs, the step cap, the workdir); a flag file after ``--`` is expanded
  and checked the same way. ``demo.flags`` (which includes ``chu.flags``) is
  therefore refused: use ``--profile=quick``.

Rows from other systems in the paper (AAM, dlib on CycleGAN faces) are not
reimplemented; the mean shape and the pixel ridge regression are baseline
rows read from the rows' results (``mean_shape_<metric>`` and
``ridge_<metric>``, e.g. ``ridge_nme_inter_pupil``; "n/a" where absent).
"""
from __future__ import annotations

import copy
import dataclasses
import io
import json
import pathlib
import shlex
import subprocess
import sys
import typing
from typing import Any, Sequence

from absl import app
from absl import flags

from experiments import run as run_lib
from tml import config as config_lib
from tml import paths

def _define_flags() -> None:
  """The driver's own flags; defined only when run as a script, so importing
  this module (tests) adds nothing to the global FLAGS (devries_tables.py
  defines an --only_report too)."""
  flags.DEFINE_string("root", "runs/chu_tables", "Where each row's workdir goes.")
  flags.DEFINE_bool("only_report", False, "Only assemble tables from finished rows.")
  flags.DEFINE_enum("profile", "paper", ["paper", "quick"],
                    "paper: the rows' flag files as they are (paper size, 40 + 60 "
                    "epochs); quick: chu_quick_size.flags and a smaller budget.")
  flags.DEFINE_list("budget", [], "S1,S2: the epoch budget (stage 1, stage 2) that "
                    "every row's epochs derive from; default: the profile's.")
  flags.DEFINE_list("rows", [], "Run only these rows (flag-file stems, e.g. "
                    "chu,chu_multitask); default all. The tables list every row.")


FLAGS = flags.FLAGS


@dataclasses.dataclass(frozen=True)
class Row:
  name: str
  flagfile: str
  tables: tuple[str, ...]
  budget: str          # "two_stage", "one_stage" (S1 + S2 in one) or "first_stage"

  @property
  def stem(self) -> str:
    return pathlib.Path(self.flagfile).stem


ROWS = (
    Row("basic CNN", "chu_basic_cnn.flags", ("II",), "first_stage"),
    Row("U-Net, single task, without two-stage", "chu_unet_single_one_stage.flags",
        ("III",), "one_stage"),
    Row("U-Net, single task", "chu_unet_single.flags", ("II", "III"), "two_stage"),
    Row("U-Net, multi-task, without two-stage", "chu_multitask_one_stage.flags",
        ("III",), "one_stage"),
    Row("U-Net, multi-task", "chu_multitask.flags", ("II", "III", "IV"), "two_stage"),
    Row("U-Net, multi-task + early stopping", "chu.flags", ("II", "IV"), "two_stage"),
    Row("U-Net, single-task emotion", "chu_emotion_single.flags", ("IV",), "one_stage"),
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
# Table III's multi-task pair lost its numbers in the text rendering.
PAPER_MISSING = "(lost in the text)"


@dataclasses.dataclass(frozen=True)
class Profile:
  size_flagfile: str | None
  budget: tuple[int, int]     # (S1, S2) epochs


PROFILES = {
    "paper": Profile(None, (40, 60)),
    # 2 CPU cores: stage 2 keeps 12 epochs so Eq. 4 (k = 5 epochs) has room.
    "quick": Profile("chu_quick_size.flags", (4, 12)),
}

# Fields that define a row: only its flag file (and the budget) may set them.
ROW_FIELDS = frozenset({
    "model", "emotion_head", "landmark_head", "map_head", "unet_weight",
    "landmark_weight", "emotion_weight", "emotion_loss", "map_weight",
    "stage1_epochs", "stage2_epochs", "max_steps_per_stage", "workdir",
})
ROW_PREFIXES = ("early_stopping_",)
# What a size profile may set (tests/test_chu_tables.py holds the quick file to it).
SIZE_FIELDS = frozenset({
    "image_size", "unet_depth", "unet_width", "fc_width", "map_reduction",
    "batch_size", "eval_batch_size", "learning_rate", "splits",
    "log_every_steps", "checkpoint_every_steps",
})


def is_row_field(name: str) -> bool:
  return name in ROW_FIELDS or name.startswith(ROW_PREFIXES)


def _flag_name(arg: str) -> str | None:
  """``--name=v`` / ``--name`` / ``--noname`` (a Config bool) -> the Config field."""
  if not arg.startswith("-"):
    return None
  name = arg.lstrip("-").split("=", 1)[0]
  fields = {f.name for f in dataclasses.fields(config_lib.Config)}
  if name not in fields and name.startswith("no") and name[2:] in fields:
    name = name[2:]
  return name


def check_extra(extra: Sequence[str]) -> list[str]:
  """The extra flags expanded; raises ``app.UsageError`` for row-defining ones."""
  for arg in extra:
    if not arg.startswith("--flagfile="):
      continue
    inner = [a for a in run_lib.expand_flagfiles([arg]) if is_row_field(_flag_name(a) or "")]
    if inner:
      raise app.UsageError(
          f"{arg} sets row-defining flags ({', '.join(sorted({_flag_name(a) for a in inner}))}); "
          f"they would turn every row into the same run. Sizes: --profile=quick "
          f"(or a file that sets only {', '.join(sorted(SIZE_FIELDS))}); epochs: --budget=S1,S2")
  expanded = run_lib.expand_flagfiles(list(extra))
  bad = sorted({n for n in map(_flag_name, expanded) if n and is_row_field(n)})
  if bad:
    raise app.UsageError(
        f"flags after -- may not set row-defining fields: {', '.join('--' + b for b in bad)} "
        f"(each row's own flag file defines them; epochs come from --budget=S1,S2)")
  return expanded


def row_epochs(row: Row, budget: tuple[int, int]) -> tuple[int, int]:
  """(stage1_epochs, stage2_epochs) of ``row`` under the budget (S1, S2)."""
  s1, s2 = budget
  if row.budget == "two_stage":
    return s1, s2
  if row.budget == "one_stage":
    return 0, s1 + s2
  if row.budget == "first_stage":
    return 0, s1
  raise ValueError(f"unknown budget kind {row.budget!r}")


def row_argv(row: Row, root: pathlib.Path, profile: str = "paper",
             budget: tuple[int, int] | None = None, extra: Sequence[str] = ()
             ) -> list[str]:
  """The ``experiments.run`` arguments of one row (flag files not expanded)."""
  prof = PROFILES[profile]
  s1, s2 = row_epochs(row, budget or prof.budget)
  argv = [f"--flagfile={row.flagfile}"]
  if prof.size_flagfile:
    argv.append(f"--flagfile={prof.size_flagfile}")
  argv += list(check_extra(extra))
  argv += [f"--stage1_epochs={s1}", f"--stage2_epochs={s2}",
           f"--workdir={root / row.stem}"]
  return argv


def resolve_config(argv: Sequence[str]) -> config_lib.Config:
  """The Config that ``experiments.run`` would build from ``argv`` (no training).

  Parses with a private copy of run.py's flags (same names, types, defaults
  and flag-file lookup), so it neither reads nor changes the global FLAGS.
  """
  fv = flags.FlagValues()
  fields = dataclasses.fields(config_lib.Config)
  for f in fields:
    flag = copy.deepcopy(run_lib.FLAGS[f.name])
    flag.unparse()                      # its default, whatever FLAGS holds
    fv[f.name] = flag
  fv(["chu_tables"] + run_lib.expand_flagfiles(list(argv)))
  hints = typing.get_type_hints(config_lib.Config)
  kwargs = {}
  for f in fields:
    value = fv[f.name].value
    if hints[f.name] not in (bool, int, float, str):
      value = tuple(int(v) for v in value)
    kwargs[f.name] = value
  return config_lib.Config(**kwargs)


# =============================================================================
# Tables
# =============================================================================
def _num(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _fmt(res: dict, key: str) -> str:
  v = res.get(key)
  if not _num(v):
    return "n/a"
  s = res.get(f"{key}_std")
  n = res.get("n_splits", 1)
  return f"{v:.2f} ± {s:.2f}" if _num(s) and n and n > 1 else f"{v:.2f}"


def _budget(cfg: config_lib.Config | None) -> str:
  if cfg is None:
    return "?"
  if cfg.stage1_epochs:
    return f"{cfg.stage1_epochs} + {cfg.stage2_epochs}"
  return f"{cfg.stage2_epochs} (one stage)"


def _es_epochs(res: dict, cfg: config_lib.Config | None) -> str:
  """Stage-2 epoch at whose end Eq. 4 stopped the emotion task, per split."""
  if cfg is not None and not (cfg.early_stopping_k > 0 and cfg.emotion_head
                              and cfg.model != "basic_cnn"):
    return "off"
  splits = res.get("per_split") or [res]
  vals = [s.get("emotion_stopped_epoch") for s in splits]
  if not any("emotion_stopped_epoch" in s for s in splits):
    return "n/a"
  return ", ".join("never" if v is None else f"{v:g}" for v in vals)


COLUMNS = (  # (results key, header)
    ("nme_inter_pupil", "NME inter-pupil (%)"),
    ("nme_inter_ocular", "NME inter-ocular (%)"),
    ("failure_rate_0.10", "FR@10% (%)"),
    ("auc_0.10", "AUC@10%"),
    ("emotion_accuracy", "emotion acc. (%)"),
)
TABLES = {
    "II": ("Table II: landmark detection, NME (inter-pupil, %)", "nme_inter_pupil"),
    "III": ("Table III: with / without two-stage training, NME (inter-pupil, %)",
            "nme_inter_pupil"),
    "IV": ("Table IV: emotion recognition accuracy (%)", "emotion_accuracy"),
}
BASELINES = (("mean shape", "mean_shape"), ("pixel ridge regression", "ridge"))


def _md_row(cells: Sequence[str]) -> str:
  return "| " + " | ".join(cells) + " |"


def _load(root: pathlib.Path, row: Row) -> dict:
  f = root / row.stem / "results.json"
  return json.loads(f.read_text()) if f.exists() else {}


def tables(root: pathlib.Path, profile: str = "paper",
           budget: tuple[int, int] | None = None, extra: Sequence[str] = ()) -> str:
  """The three tables as Markdown, from ``root/<row>/results.json``."""
  cfgs = {}
  for row in ROWS:
    try:
      cfgs[row.stem] = resolve_config(row_argv(row, root, profile, budget, extra))
    except Exception:   # a report must still come out of whatever finished
      cfgs[row.stem] = None
  results = {row.stem: _load(root, row) for row in ROWS}
  header = ("| row | budget (epochs) | " + " | ".join(h for _, h in COLUMNS)
            + " | emotion stopped (stage-2 epoch, per split) | paper |")
  rule = "|" + "---|" * (len(COLUMNS) + 4)
  s1, s2 = budget or PROFILES[profile].budget
  out = [f"Profile `{profile}`, budget S1 + S2 = {s1} + {s2} epochs: two-stage rows "
         f"train S1 + S2, one-stage rows S1 + S2 in one stage, the basic CNN S1 "
         f"(the paper's \"same as the first-stage training\"). Mean ± sample std "
         f"over splits.", ""]
  for table, (title, key) in TABLES.items():
    out += [f"### {title}", "", header, rule]
    rows = [r for r in ROWS if table in r.tables]
    for row in rows:
      res, cfg = results[row.stem], cfgs[row.stem]
      paper = PAPER.get((table, row.name),
                        PAPER_MISSING if table == "III" else "n/a")
      if res:
        cells = [_fmt(res, k) for k, _ in COLUMNS] + [_es_epochs(res, cfg)]
      else:
        cells = ["not run"] + [""] * len(COLUMNS)
      out.append(_md_row([row.name, _budget(cfg), *cells, paper]))
    # Baselines from the first finished row of the table (the same splits).
    ref = next((results[r.stem] for r in rows if results[r.stem]), {})
    for name, prefix in BASELINES:
      cells = [_fmt(ref, f"{prefix}_{k}") for k, _ in COLUMNS]
      out.append(_md_row([name, "none", *cells, "off", "n/a"]))
    out.append("")
  return "\n".join(out)


def plot_figures(root: pathlib.Path) -> list[str]:
  """Fig. 5 (NME at five landmarks) and Fig. 6 (NME per emotion) as grouped
  bars, one group per landmark / emotion and one bar per finished landmark
  row; returns the PNG names written under ``root``."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np
  done = [(row, _load(root, row)) for row in ROWS]
  done = [(row, res) for row, res in done
          if res and isinstance(res.get("fig5_nme_inter_pupil"), dict)]
  written = []
  for key, title, png in (
      ("fig5_nme_inter_pupil", "Fig. 5: NME (inter-pupil, %) at five landmarks", "fig5.png"),
      ("nme_per_emotion_inter_pupil", "Fig. 6: NME (inter-pupil, %) per emotion", "fig6.png")):
    if not done:
      break
    groups = list(done[0][1][key])
    width = 0.8 / len(done)
    fig, ax = plt.subplots(figsize=(max(8, 1.3 * len(groups)), 4))
    for i, (row, res) in enumerate(done):
      vals = [res[key].get(g, np.nan) for g in groups]
      errs = [res.get(f"{key}_std", {}).get(g, 0.0) or 0.0 for g in groups]
      ax.bar(np.arange(len(groups)) + i * width, vals, width, yerr=errs,
             label=row.name, capsize=2)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups, rotation=20)
    ax.set(title=title, ylabel="NME (%)")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()   # root may be a gs:// URL (tml.paths)
    fig.savefig(buf, dpi=80, format="png")
    paths.write_atomic(root / png, buf.getvalue())
    plt.close(fig)
    written.append(png)
  return written


def main(argv):
  extra = argv[1:]
  root = paths.as_path(FLAGS.root)   # local, or a gs:// URL kept as one
  budget = tuple(int(v) for v in FLAGS.budget) if FLAGS.budget else None
  if budget is not None and (len(budget) != 2 or min(budget) <= 0):
    raise app.UsageError(f"--budget={','.join(FLAGS.budget)}: expected S1,S2 > 0")
  stray = sorted(f.name for f in dataclasses.fields(config_lib.Config)
                 if FLAGS[f.name].present)
  if stray:
    raise app.UsageError(f"run flags go after --: {', '.join('--' + n for n in stray)}")
  check_extra(extra)
  unknown = set(FLAGS.rows) - {r.stem for r in ROWS}
  if unknown:
    raise app.UsageError(f"--rows: unknown {sorted(unknown)}; known: "
                         f"{', '.join(r.stem for r in ROWS)}")
  commands = []
  for row in ROWS:
    argv_row = row_argv(row, root, FLAGS.profile, budget, extra)
    try:
      config_lib.validate(resolve_config(argv_row))
    except (config_lib.ConfigError, flags.Error, ValueError) as e:
      raise app.UsageError(f"row {row.stem}: {e}") from None
    cmd = [sys.executable, "-m", "experiments.run", *argv_row]
    commands.append(f"# {row.name}\n{shlex.join(['python'] + cmd[1:])}")
    if FLAGS.only_report or (FLAGS.rows and row.stem not in FLAGS.rows):
      continue
    print(f"== {row.name}: {' '.join(cmd[1:])}", flush=True)
    subprocess.run(cmd, check=True)
  text = tables(root, FLAGS.profile, budget, extra)
  root.mkdir(parents=True, exist_ok=True)
  (root / "tables.md").write_text(text)
  (root / "commands.sh").write_text("\n".join(commands) + "\n")
  for png in plot_figures(root):
    print(f"wrote {root / png}")
  print(text)


if __name__ == "__main__":
  _define_flags()
  # Flags after "--" stay unexpanded here: check_extra inspects them.
  app.run(main)
