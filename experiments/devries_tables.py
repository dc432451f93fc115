r"""DeVries et al. 2014 Table I on FER2013: runs the four settings, writes the page.

  python -m experiments.devries_tables --runs=runs/devries_table1 --seeds=0,1,2 \
      -- --stage2_epochs=2 --eval_every_epochs=1        # the CPU budget used here
  python -m experiments.devries_tables --runs=runs/devries_table1 --only_report

Each setting is ``python -m experiments.run --flagfile=<setting>.flags
--splits=<seeds> <flags after --> --workdir=<runs>/<setting>``; flags after
``--`` may change only the budget (epochs, evaluation cadence, batch sizes,
logging), never a setting's model or data flags. Then it reads every ``<runs>/<setting>/results.json`` (settings named after the Table
I flag files) and ``<runs>/sweep/*/`` (the recipe sweep), and writes into
--out: ``README.md`` tables (Table I in the paper's layout, ours beside the
paper's, on PrivateTest with PublicTest selection and on all 7,178 test
images with the last parameters), ``results.json`` (everything the tables
show), learning curves, the confusion matrix and per-class recall of the
headline setting, label-map statistics and a figure of the label maps over
real faces (Fig. 2), and the predicted maps over test faces (Fig. 3) when the
multi-task run's parameters are present.
"""
from __future__ import annotations

import json
import pathlib

from absl import app
from absl import flags
import numpy as np

from tml import paths


def _define_flags() -> None:
  """Only when run as a program (absl's flag registry is process-wide, and
  experiments.run defines a flag per Config field)."""
  flags.DEFINE_string("runs", "runs/devries_table1", "Folder with one workdir per setting.")
  flags.DEFINE_list("seeds", ["0", "1", "2"], "Random initialisations (--splits) per setting.")
  flags.DEFINE_string("sweep", "", "Folder of recipe-sweep workdirs (default <runs>/sweep).")
  flags.DEFINE_bool("backfill", False, "Add last/public_private to finished splits "
                    "that lack it (see backfill_last) before the report.")
  flags.DEFINE_bool("only_report", False, "Only assemble the page from finished runs.")
  flags.DEFINE_string("out", "results/devries_fer2013", "Report folder.")
  flags.DEFINE_string("landmarks_file", "workdirs/fer2013_landmarks/fer2013_landmarks.npz",
                      "label68 output for FER2013 (label-map statistics and figures).")
  flags.DEFINE_string("zip", "../shared/data/fer2013/fer2013_images.zip", "FER2013 zip.")


FLAGS = flags.FLAGS

SETTINGS = (  # (workdir name = flag file stem, transformations, multi-task)
    ("devries_fer2013_baseline_notrans", False, False),
    ("devries_fer2013_notrans", False, True),
    ("devries_fer2013_baseline", True, False),
    ("devries_fer2013", True, True),
)
PAPER = {(False, False): "63.71 ± 0.63", (False, True): "66.83 ± 0.66",
         (True, False): "66.39 ± 0.58", (True, True): "67.21 ± 0.70"}


def _load(path: pathlib.Path):
  return json.loads(path.read_text()) if path.exists() else None


def _acc(split: dict, key: str):
  if key == "selected/private_test":
    return split.get("emotion_accuracy")
  return split.get("evaluations", {}).get(key, {}).get("emotion_accuracy")


def _mean_std(values):
  v = np.array([x for x in values if x is not None], np.float64)
  if v.size == 0:
    return None, None, 0
  return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else None, int(v.size)


def _fmt(m, s, n):
  if m is None:
    return "not run"
  return f"{m:.2f} ± {s:.2f} (n={n})" if s is not None else f"{m:.2f} (n={n})"


def table_one(runs: pathlib.Path) -> tuple[str, dict]:
  """Table I twice: PrivateTest (selected on PublicTest) and 7,178 (last params)."""
  out, data = [], {}
  for key, title in (("selected/private_test", "PrivateTest (3,589), epoch selected on PublicTest"),
                     ("last/public_private", "PublicTest + PrivateTest (7,178, the paper's test set), last parameters of the fixed schedule")):
    out += [f"#### {title}", "",
            "| | Baseline convnet (ours) | Multi-task convnet (ours) | multi-task - baseline | Baseline (paper) | Multi-task (paper) |",
            "|---|---|---|---|---|---|"]
    for trans in (False, True):
      cells, per = [], {}
      for name, t, mt in SETTINGS:
        if t != trans:
          continue
        res = _load(runs / name / "results.json")
        accs = [_acc(s, key) for s in res["per_split"]] if res else []
        per[mt] = accs
        data.setdefault(name, {})[key] = accs
        cells.append(_fmt(*_mean_std(accs)))
      diff = "n/a"
      pairs = [(b, m) for b, m in zip(per.get(False, []), per.get(True, []))
               if b is not None and m is not None]
      if pairs:
        diff = _fmt(*_mean_std([m - b for b, m in pairs])) + " (paired by seed)"
      label = "w/ Transformations" if trans else "No Transformations"
      out.append(f"| {label} | {cells[0]} | {cells[1]} | {diff} | "
                 f"{PAPER[(trans, False)]} | {PAPER[(trans, True)]} |")
    out.append("")
  return "\n".join(out), data


def backfill_last(workdir: pathlib.Path) -> int:
  """Adds ``last/public_private`` to finished splits that lack it.

  Runs selecting on PublicTest report the last parameters on all 7,178 test
  images (``SplitData.last_tests``); splits trained before that evaluation
  existed get it here, from the stage's final checkpoint (the last
  parameters), with the same eval step and metrics. Returns the number of
  splits updated.
  """
  import dataclasses as dc
  import jax
  from tml import checkpoint as checkpoint_lib
  from tml import models, parallel, protocol, report, train
  from tml import train_step as step_lib
  from tml.config import Config
  res_file = workdir / "results.json"
  res = _load(res_file)
  if not res:
    return 0
  # A split file may already hold it (written by an earlier backfill after
  # the workdir summary was last written): take it from there.
  fresh = []
  for s in res["per_split"]:
    f = workdir / s["split"] / "results.json"
    one = json.loads(f.read_text()) if f.exists() else s
    fresh.append(one if "last/public_private" in one.get("evaluations", {}) else s)
  res["per_split"] = fresh
  need = {s["split"] for s in res["per_split"]
          if "last/public_private" not in s.get("evaluations", {})}
  if not need:
    if any(s is not t for s, t in zip(fresh, _load(res_file)["per_split"])):
      _write_aggregate(workdir, res)
    return 0
  fields = json.loads((workdir / "config.json").read_text())
  fields["splits"] = tuple(fields["splits"])
  cfg = Config(**{k: v for k, v in fields.items() if k in {f.name for f in dc.fields(Config)}})
  data = protocol.load(cfg)
  model, task = train.build_model(cfg, data), train.build_task(cfg, data)
  stage = train.build_stages(cfg, data)[-1]
  mesh = parallel.make_mesh()
  eval_step = step_lib.make_eval_step(model, task, mesh)
  done = 0
  for split in protocol.splits(cfg, data):
    if split.name not in need or "public_private" not in split.last_tests:
      continue
    split = train._prepare_arrays(cfg, data, split)
    params = models.init_params(model, (1, task.input_size, task.input_size, 1),
                                cfg.seed, split.index)
    tx = step_lib.make_optimizer(cfg.optimizer, step_lib.make_schedule(cfg.learning_rate),
                                 momentum=cfg.momentum, nesterov=cfg.nesterov,
                                 weight_decay=cfg.weight_decay, trainable=stage.trainable)
    template = step_lib.init_state(params, tx, jax.random.key(0),
                                   stage.early_stopping_k)
    ckpt = checkpoint_lib.Checkpointer(workdir / split.name / stage.name / "checkpoints")
    _, state, meta = ckpt.restore_latest(template)
    ckpt.close()
    assert meta.get("done"), f"{workdir}/{split.name}: stage not finished"
    arrays, idx = split.last_tests["public_private"]
    preds = train.predict(eval_step, jax.device_get(state.params), arrays, idx, cfg, mesh)
    ev = train.evaluate(preds, arrays, idx, data, None)
    split_file = workdir / split.name / "results.json"
    one = json.loads(split_file.read_text())
    one.setdefault("evaluations", {})["last/public_private"] = {
        "emotion_accuracy": ev["emotion_accuracy"], "num_test_images": ev["num_test_images"],
        "added_by": "experiments.devries_tables.backfill_last"}
    report.write_results(split_file.parent, one)
    res["per_split"] = [one if s["split"] == split.name else s for s in res["per_split"]]
    done += 1
  _write_aggregate(workdir, res)
  return done


def _write_aggregate(workdir: pathlib.Path, res: dict) -> None:
  from tml import report
  keep = {k: res[k] for k in ("dataset", "model", "stages", "num_devices", "config") if k in res}
  agg = report.aggregate_splits(res["per_split"])
  agg.update(keep)
  report.write_results(workdir, agg)


def label_map_stats(landmarks_file: str, zip_path: str, out: pathlib.Path,
                    widths=(1.0, 2.0, 3.0)) -> str:
  """Positive pixels per map on the 42x42 centre crop, and a Fig. 2 figure."""
  from data_prep.label68 import io as label_io
  from tml import targets
  table = label_io.load_landmarks(landmarks_file)
  found = np.flatnonzero(table.found)
  rng = np.random.default_rng(0)
  pick = rng.choice(found, size=min(2000, found.size), replace=False)
  lms = table.landmarks[pick].astype(np.float32) - 3.0    # 48 -> centre 42 crop
  lines = ["| brow width (px) | left brow px (median, 5-95 %) | right brow px | mouth px |",
           "|---|---|---|---|"]
  for w in widths:
    maps = np.asarray(targets.devries_label_maps(lms, 42, 42, brow_width=w))
    cnt = maps.sum(axis=(1, 2))
    cell = lambda c: f"{np.median(c):.0f} ({np.percentile(c, 5):.0f}-{np.percentile(c, 95):.0f})"
    lines.append(f"| {w:g} | {cell(cnt[:, 0])} | {cell(cnt[:, 1])} | {cell(cnt[:, 2])} |")
  _maps_figure(table, zip_path, out / "label_maps.png")
  return "\n".join(lines)


def _maps_figure(table, zip_path, png, n=8, brow_width=3.0):
  import zipfile
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from data_prep.fer2013 import reader
  from tml import targets
  width = brow_width
  ids = [str(i) for i in table.ids]
  with zipfile.ZipFile(zip_path) as zf:
    by_id = {}
    for name in zf.namelist():
      stem = pathlib.PurePosixPath(name).stem
      if stem.startswith("PrivateTest_"):
        by_id[stem] = name
    chosen = [i for i, k in enumerate(ids) if k in by_id and table.found[i]][:n]
    images = [reader.decode_image(zf.read(by_id[ids[i]]), ids[i]) for i in chosen]
  fig, axes = plt.subplots(2, n, figsize=(2 * n, 4.2))
  for col, (i, img) in enumerate(zip(chosen, images)):
    lm = table.landmarks[i].astype(np.float32)
    maps = np.asarray(targets.devries_label_maps(lm, 48, 48, brow_width=width))
    axes[0, col].imshow(img, cmap="gray")
    axes[0, col].plot(lm[:, 0], lm[:, 1], ".", ms=2, color="yellow")
    axes[0, col].set_xlim(-0.5, 47.5)
    axes[0, col].set_ylim(47.5, -0.5)
    rgb = np.stack([img / 255.0] * 3, -1) * 0.6
    rgb[..., 0] += 0.4 * maps[..., 0]
    rgb[..., 1] += 0.4 * maps[..., 1]
    rgb[..., 2] += 0.4 * maps[..., 2]
    axes[1, col].imshow(np.clip(rgb, 0, 1))
    for a in axes[:, col]:
      a.axis("off")
  fig.suptitle(f"dlib 68 points (top) and label maps (bottom; red/green brows, "
               f"blue mouth; brow width {width:g} px) on PrivateTest faces")
  fig.tight_layout()
  fig.savefig(png, dpi=80)
  plt.close(fig)


BUDGET_FLAGS = ("stage2_epochs", "eval_every_epochs", "batch_size", "eval_batch_size",
                "log_every_steps", "checkpoint_every_steps", "learning_rate")


def run_settings(runs: pathlib.Path, seeds, extra) -> None:
  import subprocess
  import sys
  for arg in extra:
    name = arg.lstrip("-").split("=", 1)[0]
    if name not in BUDGET_FLAGS:
      raise app.UsageError(f"{arg}: only budget flags may follow --: {', '.join(BUDGET_FLAGS)}")
  # Seed-major order: every setting gets seed 0 before any gets seed 1, so a
  # budget cut short still leaves all four settings comparable. A workdir
  # skips the seeds it has finished, so rerunning resumes.
  for i in range(len(seeds)):
    for name, _, _ in SETTINGS:
      cmd = [sys.executable, "-m", "experiments.run", f"--flagfile={name}.flags",
             f"--splits={','.join(seeds[:i + 1])}", *extra, f"--workdir={runs / name}"]
      print("==", " ".join(cmd[1:]), flush=True)
      subprocess.run(cmd, check=True)


def _curve(metrics_jsonl: pathlib.Path, key: str):
  steps, vals = [], []
  if metrics_jsonl.exists():
    for line in metrics_jsonl.read_text().splitlines():
      rec = json.loads(line)
      v = rec.get(key)
      if isinstance(v, (int, float)) and np.isfinite(v):
        steps.append(rec["step"])
        vals.append(v)
  return steps, vals


def sweep_table(sweep_root: pathlib.Path) -> str:
  """The recipe sweep: accuracy on the Training holdout per epoch, per run."""
  rows = ["| run | peak lr | holdout accuracy per epoch (%) | final |", "|---|---|---|---|"]
  for d in sorted(sweep_root.glob("*/")):
    cfg_file = d / "config.json"
    if not cfg_file.exists():
      continue
    cfg = json.loads(cfg_file.read_text())
    _, acc = _curve(d / "init_0" / "metrics.jsonl", "stage2/select/accuracy")
    if not acc:
      continue
    rows.append(f"| {d.name} | {cfg['learning_rate']:g} | "
                f"{' / '.join(f'{a:.2f}' for a in acc)} | {acc[-1]:.2f} |")
  return "\n".join(rows)


def plot_curves(runs: pathlib.Path, sweep_root: pathlib.Path, png: pathlib.Path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for name, _, _ in SETTINGS:
    f = runs / name / "init_0" / "metrics.jsonl"
    axes[0].plot(*_curve(f, "stage2/loss/emotion"), label=name, lw=0.8)
    axes[1].plot(*_curve(f, "stage2/select/accuracy"), "o-", label=name)
  for d in sorted(sweep_root.glob("*/")):
    f = d / "init_0" / "metrics.jsonl"
    axes[2].plot(*_curve(f, "stage2/select/accuracy"), "o-", label=d.name)
  axes[0].set(title="training loss (expression NLL), seed 0", xlabel="step")
  axes[1].set(title="PublicTest accuracy (selection set), seed 0", xlabel="step",
              ylabel="%")
  axes[2].set(title="recipe sweep: Training-holdout accuracy", xlabel="step", ylabel="%")
  for a in axes:
    a.legend(fontsize=7)
    a.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(png, dpi=80)
  plt.close(fig)


def confusion_section(res: dict, png: pathlib.Path) -> str:
  """Confusion matrix (summed over seeds) and per-class recall, PrivateTest."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from tml import input_pipeline
  names = list(input_pipeline.EXPRESSION_EMOTIONS)
  conf = np.sum([np.array(s["emotion"]["confusion"]) for s in res["per_split"]], axis=0)
  recall = 100.0 * np.diag(conf) / np.maximum(conf.sum(1), 1)
  fig, ax = plt.subplots(figsize=(5, 4.5))
  ax.imshow(conf / np.maximum(conf.sum(1, keepdims=True), 1), cmap="Blues", vmin=0, vmax=1)
  for i in range(len(names)):
    for j in range(len(names)):
      ax.text(j, i, int(conf[i, j]), ha="center", va="center", fontsize=7)
  ax.set_xticks(range(len(names)), names, rotation=45)
  ax.set_yticks(range(len(names)), names)
  ax.set(xlabel="predicted", ylabel="true", title="PrivateTest, summed over seeds")
  fig.tight_layout()
  fig.savefig(png, dpi=80)
  plt.close(fig)
  return ("| class | " + " | ".join(names) + " |\n|---|" + "---|" * len(names) + "\n"
          "| recall (%) | " + " | ".join(f"{r:.1f}" for r in recall) + " |")


def predicted_maps_figure(workdir: pathlib.Path, png: pathlib.Path, n: int = 8) -> bool:
  """Fig. 3: the multi-task net's map outputs (p > 0.5) over PrivateTest faces."""
  import jax
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  from tml import checkpoint as checkpoint_lib
  from tml import models, preprocess, protocol, train
  from tml.config import Config
  cfg_file = workdir / "config.json"
  best = workdir / "init_0" / "stage2" / "best"
  if not (cfg_file.exists() and best.exists()):
    return False
  fields = json.loads(cfg_file.read_text())
  fields["splits"] = tuple(fields["splits"])
  cfg = Config(**{k: v for k, v in fields.items() if k in Config.__dataclass_fields__})
  data = protocol.load(cfg)
  model = train.build_model(cfg, data)
  template = models.init_params(model, (1, cfg.crop_size, cfg.crop_size, 1), cfg.seed, 0)
  ckpt = checkpoint_lib.Checkpointer(best, max_to_keep=1)
  params = ckpt.restore_latest({"params": template})[1]["params"]
  ckpt.close()
  tr, te = data.arrays["train"], data.arrays["private_test"]
  stats = preprocess.fit_pixel_stats(preprocess.per_image_normalise(tr["image"]))
  idx = np.flatnonzero(te["has_landmarks"])[:n]
  x = preprocess.apply_pixel_stats(preprocess.per_image_normalise(te["image"][idx]), stats)
  x = np.asarray(preprocess.batch_standardise(x))[:, 3:45, 3:45]
  out = model.apply({"params": params}, x, train=False)
  probs = np.asarray(jax.nn.sigmoid(out["maps"]))
  from tml import targets
  truth = np.asarray(targets.devries_label_maps(te["landmarks"][idx] - 3.0, 42, 42,
                                                brow_width=cfg.brow_width))
  fig, axes = plt.subplots(2, n, figsize=(2 * n, 4.2))
  for col in range(len(idx)):
    face = te["image"][idx[col], 3:45, 3:45, 0]
    face = (face - face.min()) / max(face.max() - face.min(), 1e-6)
    for row, maps in ((0, probs[col] > 0.5), (1, truth[col] > 0.5)):
      rgb = np.stack([face] * 3, -1) * 0.6
      rgb += 0.4 * maps.astype(np.float32)
      axes[row, col].imshow(np.clip(rgb, 0, 1))
      axes[row, col].axis("off")
  fig.suptitle("Fig. 3: predicted maps (top, p > 0.5) and label maps (bottom), "
               "PrivateTest faces, multi-task w/ transformations, seed 0")
  fig.tight_layout()
  fig.savefig(png, dpi=80)
  plt.close(fig)
  return True


def main(argv):
  # The workdirs may be gs:// URLs (tml.paths); the page goes to a local --out.
  runs, out = paths.as_path(FLAGS.runs), pathlib.Path(FLAGS.out)
  if not FLAGS.only_report:
    run_settings(runs, FLAGS.seeds, argv[1:])
  out.mkdir(parents=True, exist_ok=True)
  if FLAGS.backfill:
    for name, _, _ in SETTINGS:
      print(f"backfill {name}: {backfill_last(runs / name)} split(s)", flush=True)
  text, data = table_one(runs)
  parts = ["## Table I (generated)", "", text]
  sweep_root = paths.as_path(FLAGS.sweep) if FLAGS.sweep else runs / "sweep"
  parts += ["## Recipe sweep (Training holdout)", "", sweep_table(sweep_root), ""]
  plot_curves(runs, sweep_root, out / "learning_curves.png")
  head = _load(runs / "devries_fer2013" / "results.json")
  if head:
    parts += ["## Per-class recall, multi-task w/ transformations (PrivateTest)", "",
              confusion_section(head, out / "confusion.png"), ""]
  predicted_maps_figure(runs / "devries_fer2013", out / "predicted_maps.png")
  if pathlib.Path(FLAGS.landmarks_file).exists():
    parts += ["## Label maps", "", label_map_stats(FLAGS.landmarks_file, FLAGS.zip, out), ""]
  (out / "tables.md").write_text("\n".join(parts))
  (out / "results.json").write_text(json.dumps(data, indent=1))
  print("\n".join(parts))


if __name__ == "__main__":
  _define_flags()
  app.run(main)
