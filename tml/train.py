"""The training loop: splits -> stages -> steps, with eval, checkpoints, guards.

``train_and_evaluate(cfg)`` is the whole run. For every split of the protocol
it trains the configured stages (Chu: stage 1 U-Net on the unet loss, then
stage 2 everything on landmark + emotion; single-stage variants skip stage 1),
evaluates with the ``tml.metrics`` functions, and writes results, tables and
plots. Every stage checkpoints on an interval and on SIGTERM; a restarted run
resumes from the latest checkpoint, data-iterator position included, and ends
with the same parameters as an uninterrupted run.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import time
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from tml import checkpoint as checkpoint_lib
from tml import engine as engine_lib
from tml import input_pipeline
from tml import metrics as metrics_lib
from tml import models
from tml import monitor as monitor_lib
from tml import parallel
from tml import paths
from tml import preprocess
from tml import protocol
from tml import report
from tml import ridge
from tml import run_config_guard
from tml import train_step as step_lib
from tml import writers
from tml.config import Config
from tml.config import ConfigError

log = logging.getLogger("tml")


class TrainingDiverged(RuntimeError):
  """A loss term or the gradient became NaN/Inf; the message says where."""


class Preempted(RuntimeError):
  """SIGTERM arrived; a checkpoint was written and the run can be restarted."""


# =============================================================================
# Model, task and stages from the config
# =============================================================================
def build_model(cfg: Config, data: protocol.Dataset):
  dtype = jnp.bfloat16 if cfg.compute_dtype == "bfloat16" else jnp.float32
  if cfg.model == "chu_unet":
    return models.build_model(
        "chu_unet", input_size=cfg.image_size, depth=cfg.unet_depth,
        base_width=cfg.unet_width, fc_width=cfg.fc_width,
        num_emotions=data.num_classes if cfg.emotion_head else 0,
        landmark_head=cfg.landmark_head, map_reduction=cfg.map_reduction,
        dtype=dtype)
  if cfg.model == "basic_cnn":
    return models.build_model("basic_cnn", input_size=cfg.image_size,
                              fc_width=cfg.fc_width, dtype=dtype)
  if cfg.model == "devries":
    return models.build_model("devries", num_classes=data.num_classes,
                              map_head=cfg.map_head, map_size=cfg.crop_size,
                              dropout_rate=cfg.dropout, dtype=dtype)
  raise ValueError(f"--model={cfg.model!r}: unknown; known: {models.model_names()}")


def build_task(cfg: Config, data: protocol.Dataset) -> step_lib.TaskSpec:
  expression = data.kind == "expression"
  return step_lib.TaskSpec(
      kind=data.kind, image_size=48 if expression else cfg.image_size,
      num_classes=data.num_classes, crop_size=cfg.crop_size if expression else 0,
      augment=cfg.augment, max_shift=cfg.max_shift,
      max_rotate_deg=cfg.max_rotate_deg, max_zoom=cfg.max_zoom, flip=cfg.flip,
      integer_shift=cfg.integer_shift and expression,
      ten_crop=cfg.ten_crop and expression, emotion_loss=cfg.emotion_loss,
      brow_width=cfg.brow_width, batch_standardise=expression)


def build_stages(cfg: Config, data: protocol.Dataset) -> list[step_lib.StageSpec]:
  stages = []
  if cfg.stage1_epochs > 0:
    stages.append(step_lib.StageSpec(
        "stage1", {"unet": cfg.unet_weight}, cfg.stage1_epochs, trainable=("unet",)))
  weights = {}
  if cfg.model in ("chu_unet", "basic_cnn") and cfg.landmark_head:
    weights["landmark"] = cfg.landmark_weight
  if cfg.model != "basic_cnn" and cfg.emotion_head:
    weights["emotion"] = cfg.emotion_weight
  if cfg.model == "devries" and cfg.map_head:
    weights["maps"] = cfg.map_weight
  if cfg.stage2_epochs > 0:
    stages.append(step_lib.StageSpec(
        "stage2", weights, cfg.stage2_epochs,
        early_stopping_k=cfg.early_stopping_k,
        early_stopping_epsilon=cfg.early_stopping_epsilon,
        early_stopping_unit=cfg.early_stopping_unit))
    if (cfg.early_stopping_k > 0 and "emotion" in weights
        and cfg.early_stopping_unit == "epoch"
        and cfg.early_stopping_k + 1 > cfg.stage2_epochs):
      log.warning("--early_stopping_k=%d epochs needs %d epochs of stage 2 to fill "
                  "its window; --stage2_epochs=%d: it can never fire",
                  cfg.early_stopping_k, cfg.early_stopping_k + 1, cfg.stage2_epochs)
  return stages


def _early_stop_summary(stage: step_lib.StageSpec, state) -> dict[str, Any] | None:
  """When Eq. 4 stopped the emotion task in ``stage`` (from the final state).

  ``step``: stage steps done when it fired (the emotion term is off from the
  next step on), ``epoch``: the same in epochs of the stage (an integer for
  the epoch unit: the epoch at whose end it fired); both None if it never
  fired. None for a stage without early stopping.
  """
  if not (stage.early_stopping_k > 0 and stage.weight("emotion") > 0):
    return None
  step = int(jax.device_get(state.early_stop.stopped_step))
  if step < 0:
    return {"step": None, "epoch": None, "unit": stage.early_stopping_unit}
  epoch = step / stage.steps_per_epoch
  return {"step": step, "epoch": int(epoch) if epoch == int(epoch) else epoch,
          "unit": stage.early_stopping_unit}


def _prepare_arrays(cfg: Config, data: protocol.Dataset, split: protocol.SplitData):
  """Expression data: per-image norm 150 + per-pixel stats of this train set."""
  if data.kind != "expression":
    return split
  norm = lambda a: dict(a, image=preprocess.per_image_normalise(a["image"]))
  train = norm(split.train)
  stats = preprocess.fit_pixel_stats(train["image"][split.train_idx])
  apply = lambda a: dict(a, image=preprocess.apply_pixel_stats(a["image"], stats))
  done = {id(split.train): apply(train)}   # a set shared by two roles is prepared once

  def prep(a):
    if id(a) not in done:
      done[id(a)] = apply(norm(a))
    return done[id(a)]
  out = dataclasses.replace(
      split, train=done[id(split.train)], test=prep(split.test),
      extra_tests={n: (prep(a), i) for n, (a, i) in split.extra_tests.items()},
      last_tests={n: (prep(a), i) for n, (a, i) in split.last_tests.items()})
  if split.select is not None:
    out.select = prep(split.select)
  return out


# =============================================================================
# Evaluation
# =============================================================================
def predict(eval_step, params, arrays, idx, cfg: Config, mesh) -> dict[str, np.ndarray]:
  """Runs the eval step over ``arrays[idx]`` in order; drops padding rows."""
  it = input_pipeline.BatchIterator(
      arrays, idx, global_batch_size=cfg.eval_batch_size, seed=0, shuffle=False,
      drop_remainder=False, process_index=jax.process_index(),
      process_count=jax.process_count(), num_epochs=1)
  chunks: dict[str, list] = {}
  for batch in it:
    gbatch = parallel.global_batch(batch, mesh)
    out = parallel.to_host(eval_step(params, gbatch))
    keep = parallel.to_host(gbatch["weight"]) > 0
    for k, v in out.items():
      chunks.setdefault(k, []).append(v[keep])
  return {k: np.concatenate(v) for k, v in chunks.items()}


def _has_landmarks(arrays, idx) -> np.ndarray:
  """Bool (len(idx),): the rows whose 68 points are all there."""
  has = np.isfinite(arrays["landmarks"][idx]).all(axis=(1, 2))
  if "has_landmarks" in arrays:
    has &= np.asarray(arrays["has_landmarks"][idx], bool)
  return has


def evaluate(preds, arrays, idx, data: protocol.Dataset,
             train_landmarks: np.ndarray | None) -> dict[str, Any]:
  """tml.metrics on gathered predictions. Percentages; null where n/a."""
  res: dict[str, Any] = {k: None for k in (
      "nme_inter_pupil", "nme_inter_ocular", "mean_shape_nme_inter_pupil",
      "failure_rate_0.08", "failure_rate_0.10", "auc_0.08", "auc_0.10",
      "emotion_accuracy")}
  labels = arrays["emotion"][idx]
  res["num_test_images"] = int(len(idx))
  if "landmarks" in preds:
    # Landmark metrics over the images that have landmarks (all of them on
    # the thermal data; FER2013 faces the labeller found).
    has = _has_landmarks(arrays, idx)
    res["num_landmark_images"] = int(has.sum())
    if not has.any():
      raise ValueError(f"{data.name}: none of the {len(idx)} test images has "
                       "landmarks; landmark metrics need labelled images")
    gt = arrays["landmarks"][idx][has]
    res.update(metrics_lib.landmark_summary(
        preds["landmarks"][has], gt, emotions=labels[has],
        class_names=data.class_names))
    if train_landmarks is not None:
      mean_shape = np.broadcast_to(train_landmarks.mean(axis=0), gt.shape)
      res["mean_shape_nme_inter_pupil"] = 100.0 * float(np.mean(
          metrics_lib.per_image_nme(mean_shape, gt, "inter_pupil")))
  if "emotion_probs" in preds:
    cls = metrics_lib.classification_summary(preds["emotion_probs"], labels,
                                             data.class_names)
    res["emotion_accuracy"] = cls.pop("accuracy")
    res["emotion"] = cls
  return res


# =============================================================================
# One stage
# =============================================================================
def run_stage(cfg: Config, stage: step_lib.StageSpec, engine, params,
              split: protocol.SplitData, split_dir: paths.Path,
              step_offset: int = 0, select_fn=None, monitor=None):
  """Trains one stage; returns ``(params, meta, steps)``. Resumes if checkpointed.

  ``engine``: ``tml.engine.JaxEngine`` or ``tml.torch.trainer.TorchEngine`` (the state,
  the step and what a checkpoint holds); the loop is the same for both.

  ``meta["early_stop"]``: when Eq. 4 stopped the emotion task in this stage
  (``_early_stop_summary``), read from the final state.

  Logged steps are ``step_offset`` + the stage's step, so the curves of
  consecutive stages follow each other in one metrics file.
  """
  stage_dir = split_dir / stage.name
  stage, it, schedule, rng, total = stage_inputs(cfg, stage, split)
  steps_per_epoch = stage.steps_per_epoch
  state = engine.init_state(stage, params, schedule, rng, split.index)
  ckpt = checkpoint_lib.Checkpointer(stage_dir / "checkpoints",
                                     max_to_keep=cfg.keep_checkpoints,
                                     save_interval_steps=cfg.checkpoint_every_steps)

  meta: dict[str, Any] = {}
  restored = ckpt.restore_latest(engine.checkpoint_tree(state))
  if restored is not None:
    _, tree, meta = restored
    state = engine.restore(tree, state)
    it.set_state(meta["iterator"])
    log.info("%s/%s: resumed at step %d", split.name, stage.name, int(state.step))
  if meta.get("done"):
    ckpt.close()
    return (jax.device_get(state.params),
            dict(meta, early_stop=_early_stop_summary(stage, state)), total)

  step_fn = engine.make_step(stage, schedule)
  start = int(state.step)
  is_main = jax.process_index() == 0
  writer = writers.MetricWriter(split_dir, enabled=is_main,
                                resume_step=step_offset + start)
  progress = writers.Progress(total, initial_step=start, batch_size=cfg.batch_size,
                              enabled=is_main)
  best = meta.get("best")
  try:
    state, meta = _train_loop(cfg, stage, split, engine, step_fn, state, it,
                              ckpt, writer, progress, steps_per_epoch, total,
                              step_offset, select_fn, best, stage_dir,
                              meta.get("timing"), monitor)
  except TrainingDiverged as e:
    ckpt.wait()   # an async save in flight counts once it has landed
    raise TrainingDiverged(f"{e}; {_kept_checkpoint(ckpt, stage_dir)}") from None
  finally:
    # Also on divergence or preemption: in-flight async saves must land
    # before anyone reads the directory again.
    ckpt.wait()
    ckpt.close()
  return (jax.device_get(state.params),
          dict(meta, early_stop=_early_stop_summary(stage, state)), total)


def stage_inputs(cfg: Config, stage: step_lib.StageSpec, split: protocol.SplitData):
  """What a stage trains on: ``(stage, iterator, schedule, rng, total_steps)``.

  ``stage`` gains its ``steps_per_epoch`` (Eq. 4 counts epochs). Shared by
  `run_stage` and `experiments.bare_step` (the same step on the same batches).
  """
  rng = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), split.index),
                          zlib.crc32(stage.name.encode()) & 0x7FFFFFFF)
  it = input_pipeline.BatchIterator(
      split.train, split.train_idx, global_batch_size=cfg.batch_size,
      seed=cfg.seed * 7919 + split.index, shuffle=True, drop_remainder=True,
      process_index=jax.process_index(), process_count=jax.process_count())
  steps_per_epoch = it.steps_per_epoch   # the iterator rejects 0 itself
  stage = dataclasses.replace(stage, steps_per_epoch=steps_per_epoch)   # Eq. 4 epochs
  total = stage.epochs * steps_per_epoch
  if cfg.max_steps_per_stage:
    total = min(total, cfg.max_steps_per_stage)
  # The schedule spans the stage's full epochs (a step cap for smoke tests
  # cuts it short rather than compressing it).
  schedule = step_lib.make_schedule(
      cfg.learning_rate, kind=cfg.lr_schedule, steps_per_epoch=steps_per_epoch,
      total_steps=stage.epochs * steps_per_epoch, warmup_epochs=cfg.warmup_epochs,
      final_fraction=cfg.lr_final_fraction, step_epochs=cfg.lr_step_epochs,
      step_factor=cfg.lr_step_factor)
  return stage, it, schedule, rng, total


def _train_loop(cfg, stage, split, engine, step_fn, state, it, ckpt, writer,
                progress, steps_per_epoch, total, step_offset, select_fn, best,
                stage_dir, prior_timing=None, monitor=None):
  """Steps ``state`` to ``total``; saves the final state with meta done=True.

  ``meta["timing"]``: wall seconds and steps of the loop (logging, selection
  evaluations and checkpoints included; a `tml.monitor.Monitor`'s own
  evaluations left out), summed over resumed segments.
  """
  start = int(state.step)
  meta: dict[str, Any] = {}
  prior = dict(prior_timing or {})
  if monitor is not None:
    monitor.start_segment()

  def seconds():
    return (prior.get("seconds", 0.0) + time.perf_counter() - t0
            - (monitor.excluded_seconds if monitor is not None else 0.0))
  t0 = time.perf_counter()
  with checkpoint_lib.PreemptionWatcher() as preempt, writer:
    for step in range(start, total):
      batch = next(it)
      state, metrics = step_fn(state, batch)
      done = step + 1 == total
      epoch_end = (step + 1) % steps_per_epoch == 0
      if (step + 1) % cfg.log_every_steps == 0 or done:
        host = dict(jax.device_get(metrics))
        host["param_norm"] = float(step_lib.param_norm(state.params))
        _guard(state, split, stage)
        writer.write_scalars(step_offset + step + 1,
                             {f"{stage.name}/{k}": float(v) for k, v in host.items()})
        progress.update(step + 1, stage=stage.name, loss=float(host["loss/total"]))
      if select_fn is not None and epoch_end and _eval_due(cfg, step, steps_per_epoch):
        _guard(state, split, stage)
        best, acc = select_fn(state.params, step + 1, best, stage_dir)
        writer.write_scalars(step_offset + step + 1,
                             {f"{stage.name}/select/accuracy": acc})
      if monitor is not None and monitor.due(step + 1, done):
        _guard(state, split, stage)
        writer.write_scalars(step_offset + step + 1, {
            f"{stage.name}/{k}": v for k, v in monitor(
                state, seconds(), engine=engine, step_fn=step_fn, batch=batch).items()})
      timing = {"seconds": seconds(),
                "steps": prior.get("steps", 0) + step + 1 - start}
      meta = {"iterator": it.get_state(), "stage": stage.name,
              "split": split.name, "best": best, "done": done, "timing": timing}
      stop = preempt.should_stop(step + 1)
      if done or stop or (step + 1) % cfg.checkpoint_every_steps == 0:
        _guard(state, split, stage)
        writer.flush()   # a URL workdir's logs: on the URL before the checkpoint
        ckpt.save(step + 1, engine.checkpoint_tree(state), meta, force=True)
      if stop and not done:
        raise Preempted(f"{split.name}/{stage.name}: SIGTERM at step {step + 1}; "
                        f"checkpoint saved in {stage_dir}; rerun the same "
                        f"command to resume")
  return state, meta


def _eval_due(cfg, step, steps_per_epoch) -> bool:
  every = max(cfg.eval_every_epochs, 1)
  return ((step + 1) // steps_per_epoch) % every == 0


def _guard(state, split, stage):
  """NaN guard: raises if any step so far produced a non-finite loss/grad."""
  first = int(jax.device_get(state.first_nonfinite))
  if first >= 0:
    names = step_lib.nonfinite_names(int(jax.device_get(state.nonfinite_terms)))
    raise TrainingDiverged(
        f"{split.name}/{stage.name}: non-finite {', '.join(names)} at step "
        f"{first + 1}; the update was not applied and nothing after it was "
        f"saved")


def _kept_checkpoint(ckpt, stage_dir) -> str:
  """What a NaN stop leaves behind, for its message (after ``ckpt.wait()``)."""
  last = ckpt.latest_step()
  if last is None:
    return (f"no checkpoint of this stage was written yet (none in "
            f"{stage_dir / 'checkpoints'}); a rerun starts the stage afresh")
  return (f"kept: the last good checkpoint, step {last}, in "
          f"{stage_dir / 'checkpoints'}")


# =============================================================================
# The whole run
# =============================================================================
def train_and_evaluate(cfg: Config) -> dict[str, Any]:
  """Runs every split of the protocol; writes results under ``cfg.workdir``.

  Process 0 holds the workdir's lock for the whole run (a second run on the
  same workdir is refused: `tml.workdir_lock`).
  """
  # epath for a gs:// URL (pathlib would make it a local folder "gs:").
  workdir = paths.as_path(cfg.workdir)
  is_main = jax.process_index() == 0
  with run_config_guard.locked(workdir, enabled=is_main):
    if is_main:
      workdir.mkdir(parents=True, exist_ok=True)
      run_config_guard.check_start(cfg, workdir)
      writers.write_run_info(workdir, cfg.to_dict())
    return _train_and_evaluate(cfg, workdir, is_main)


def _train_and_evaluate(cfg: Config, workdir: paths.Path,
                        is_main: bool) -> dict[str, Any]:
  """`train_and_evaluate` once the workdir is locked and checked."""
  mesh = parallel.make_mesh()
  parallel.check_batch_divisible(cfg.batch_size, mesh, "batch_size")
  parallel.check_batch_divisible(cfg.eval_batch_size, mesh, "eval_batch_size")
  t0 = time.time()
  data = protocol.load(cfg)
  log.info("loaded %s in %.1fs", cfg.dataset, time.time() - t0)
  # Before any split is trained: only the run info is written so far, which
  # the config guard does not count as results, so the fixed rerun starts.
  _check_batch_fits(cfg, data)
  _check_landmarks_present(cfg, data)
  model = build_model(cfg, data)
  task = build_task(cfg, data)
  stages = build_stages(cfg, data)
  eval_step = step_lib.make_eval_step(model, task, mesh)
  engine = engine_lib.make_engine(cfg, model, task, mesh, data)

  per_split, curves, grid = [], {}, None
  for split in protocol.splits(cfg, data):
    split_dir = workdir / split.name
    done_file = split_dir / "results.json"
    if done_file.exists():
      res = json.loads(done_file.read_text())
      per_split.append(res)
      log.info("%s: already done (%s)", split.name, done_file)
      if is_main:
        grid = _merge_report_data(curves, grid, split_dir)
      continue
    if data.kind == "expression" and is_main:
      # Tang's per-pixel statistics travel with the run (tml.predict uses them).
      from tml import predict as predict_lib
      predict_lib.save_pixel_stats(split_dir, predict_lib.fit_split_pixel_stats(split))
    split = _prepare_arrays(cfg, data, split)
    params = models.init_params(model, (1, task.input_size, task.input_size, 1),
                                cfg.seed, split.index)
    select_fn = _make_select_fn(cfg, model, task, split, data, mesh, eval_step) \
        if split.select is not None else None
    monitor = _make_monitor(cfg, split, data, mesh, eval_step)
    meta: dict[str, Any] = {}
    offset = 0
    timing = {}
    for stage in stages:
      params, meta, steps = run_stage(cfg, stage, engine, params, split,
                                      split_dir, offset, select_fn, monitor)
      offset += steps
      timing[stage.name] = _timing_summary(meta.get("timing"), cfg.batch_size)
    last_params = params
    # Selected at the final step: the selected parameters are the last ones.
    best_is_last = bool(meta.get("best")) and meta["best"]["step"] == steps
    if select_fn is not None and meta.get("best") and not best_is_last:
      params = _restore_best(split_dir / stages[-1].name, params)
    train_lms = (split.train["landmarks"][split.train_idx][
        _has_landmarks(split.train, split.train_idx)]
                 if data.kind == "thermal" else None)
    # The reported parameters (selected, or the last ones) on every test set;
    # with a selection set also the last parameters, which never saw it.
    evaluations, first_preds = {}, None
    chosen = "selected" if select_fn is not None else "last"
    for which, p in ((chosen, params),) + (
        (("last", last_params),) if select_fn is not None else ()):
      sets = dict(split.test_sets(), **(split.last_tests if which == "last" else {}))
      for name, (arrays, idx) in sets.items():
        if which == "last" and best_is_last and f"selected/{name}" in evaluations:
          evaluations[f"last/{name}"] = evaluations[f"selected/{name}"]   # same params
          continue
        preds_ = predict(eval_step, p, arrays, idx, cfg, mesh)
        evaluations[f"{which}/{name}"] = evaluate(preds_, arrays, idx, data, train_lms)
        if first_preds is None:
          first_preds = preds_
    preds = first_preds
    res = dict(evaluations[f"{chosen}/{split.test_name}"])
    res.update(split=split.name, test_set=split.test_name,
               selected_by=split.select_name or None,
               best_selection=meta.get("best"))
    # Eq. 4 lives in the last stage (stage 2); null where off or never fired.
    es = meta.get("early_stop") or {}
    res.update(emotion_stopped_epoch=es.get("epoch"),
               emotion_stopped_step=es.get("step"),
               framework=cfg.framework, engine=engine.info(),
               train_timing=timing)
    if len(evaluations) > 1:
      res["evaluations"] = {k: {m: v.get(m) for m in _EVAL_KEYS if v.get(m) is not None}
                            for k, v in evaluations.items()}
    ridge_per_image = None
    if data.kind == "thermal" and "landmarks" in preds:
      # The linear baseline on the same crops, lambda chosen on the training
      # images only: a test bed where it comes close cannot rank the models.
      rb = _ridge_baseline(split)
      ridge_per_image = rb.pop("ridge_per_image")
      res.update(ridge_nme_inter_pupil=rb["ridge_nme_inter_pupil"],
                 ridge_lambda=rb["ridge_lambda"])
    if is_main:
      split_curves, split_grid = {}, None
      if "landmarks" in preds:
        has = _has_landmarks(split.test, split.test_idx)
        gt = split.test["landmarks"][split.test_idx][has]
        split_curves[f"{cfg.model} ({split.name})"] = metrics_lib.per_image_nme(
            preds["landmarks"][has], gt, "inter_pupil")
        if train_lms is not None:
          split_curves["mean shape"] = metrics_lib.per_image_nme(
              np.broadcast_to(train_lms.mean(0), gt.shape), gt, "inter_pupil")
        if ridge_per_image is not None:
          split_curves["pixel ridge"] = ridge_per_image / 100.0
        n = min(cfg.num_plot_images, int(has.sum()))
        split_grid = (split.test["image"][split.test_idx[has][:n]],
                      preds["landmarks"][has][:n], gt[:n])
      # results.json marks the split done, so it goes last: a split killed
      # before it is redone, and a done split can always be re-plotted.
      _save_report_data(split_dir, split_curves, split_grid)
      report.write_results(split_dir, res)
      grid = _merge_report_data(curves, grid, split_dir)
    per_split.append(res)

  results = report.aggregate_splits(per_split)
  results.update(dataset=cfg.dataset, model=cfg.model,
                 stages=[s.name for s in stages], num_devices=jax.device_count(),
                 config=cfg.to_dict())
  if is_main:
    _write_tables_and_plots(cfg, workdir, results, curves, grid)
    report.write_results(workdir, results)   # last: the report is complete
  return results


_REPORT_DATA = "report_data.npz"


def _save_report_data(split_dir: paths.Path, curves: dict, grid) -> None:
  """A split's plot inputs (per-image NME curves, landmark grid), atomically.

  Written before the split's results.json, so a run killed while its report
  is being drawn still has what the rerun needs to redraw it.
  """
  arrays = {f"curve_{i}": np.asarray(v, np.float64)
            for i, v in enumerate(curves.values())}
  arrays["curve_names"] = np.asarray(list(curves), dtype=str)
  if grid is not None:
    arrays.update(grid_image=grid[0], grid_pred=grid[1], grid_gt=grid[2])
  split_dir.mkdir(parents=True, exist_ok=True)
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  paths.write_atomic(split_dir / _REPORT_DATA, buf.getvalue(), fsync=True)


def _merge_report_data(curves: dict, grid, split_dir: paths.Path):
  """Adds a split's saved plot inputs to ``curves`` (first split's mean-shape
  and ridge curves win); returns the grid (the first split's)."""
  path = split_dir / _REPORT_DATA
  if not path.exists():   # a split finished before report data was saved
    log.warning("%s: no %s; its curves are left out of ced.png", split_dir.name,
                _REPORT_DATA)
    return grid
  with np.load(io.BytesIO(path.read_bytes())) as z:
    for i, name in enumerate(z["curve_names"].tolist()):
      curves.setdefault(str(name), z[f"curve_{i}"])
    if grid is None and "grid_image" in z.files:
      grid = (z["grid_image"], z["grid_pred"], z["grid_gt"])
  return grid


def _ridge_baseline(split: protocol.SplitData) -> dict[str, Any]:
  """``tml.ridge.split_baseline`` on this split's network-input crops."""
  tr, te = split.train, split.test
  tri = split.train_idx[_has_landmarks(tr, split.train_idx)]
  tei = split.test_idx[_has_landmarks(te, split.test_idx)]
  images = np.concatenate([tr["image"][tri], te["image"][tei]])
  lms = np.concatenate([tr["landmarks"][tri], te["landmarks"][tei]])
  n = len(tri)
  return ridge.split_baseline(images, lms, np.arange(n), np.arange(n, len(images)),
                              seed=split.index)


_EVAL_KEYS = ("emotion_accuracy", "nme_inter_pupil", "nme_inter_ocular",
              "failure_rate_0.10", "auc_0.10", "num_test_images")


def _make_select_fn(cfg, model, task, split, data, mesh, eval_step):
  """Model selection on the selection split (FER PublicTest, TFD valid)."""
  def select(params, step, best, stage_dir):
    preds = predict(eval_step, params, split.select, split.select_idx, cfg, mesh)
    acc = 100.0 * float(np.mean(np.argmax(preds["emotion_probs"], -1)
                                == split.select["emotion"][split.select_idx]))
    log.info("%s step %d: %s accuracy %.2f%%", split.name, step,
             split.select_name, acc)
    if best is None or acc > best["accuracy"]:
      best = {"accuracy": acc, "step": step}
      ckpt = checkpoint_lib.Checkpointer(stage_dir / "best", max_to_keep=1,
                                         save_interval_steps=1)
      ckpt.save(step, {"params": params}, {"best": best}, force=True)
      ckpt.wait()
      ckpt.close()
    return best, acc
  return select


def _make_monitor(cfg, split, data, mesh, eval_step):
  """`tml.monitor.Monitor` on the selection set, else the first test set;
  None when ``--monitor_every_steps=0``."""
  if not cfg.monitor_every_steps:
    return None
  if split.select is not None:
    name, (arrays, idx) = split.select_name, (split.select, split.select_idx)
  else:
    name, (arrays, idx) = next(iter(split.test_sets().items()))

  def evaluate_fn(params):
    preds = predict(eval_step, params, arrays, idx, cfg, mesh)
    return evaluate(preds, arrays, idx, data, None)
  return monitor_lib.Monitor(cfg.monitor_every_steps, evaluate_fn, name,
                             bare_steps=cfg.monitor_bare_steps,
                             batch_size=cfg.batch_size)


def _check_landmarks_present(cfg: Config, data: protocol.Dataset) -> None:
  """ConfigError for a landmark-map head on training images without any
  landmarks: every step would add a zero ``loss/maps`` and the run would read
  as multi-task while training the baseline."""
  if not (cfg.model == "devries" and cfg.map_head and cfg.map_weight > 0):
    return
  for split in protocol.splits(cfg, data):
    has = split.train.get("has_landmarks")
    if has is None or not np.any(np.asarray(has)[split.train_idx]):
      raise ConfigError(
          f"--map_head=true: none of the {len(split.train_idx)} training "
          f"images of {split.name} ({cfg.dataset}, dataset config "
          f"{cfg.dataset_config or 'default'!r}) has landmarks, so the map loss "
          "would be 0 at every step; use --dataset_config=dlib68 "
          "--landmarks_file=<label68 output>, or --map_head=false for the baseline")


def _check_batch_fits(cfg: Config, data: protocol.Dataset) -> None:
  """ConfigError unless every split's training set holds one full batch
  (batches drop the remainder, so a smaller set gives epochs of 0 steps)."""
  for split in protocol.splits(cfg, data):
    n = len(split.train_idx)
    if n < cfg.batch_size:
      raise ConfigError(
          f"--batch_size={cfg.batch_size}: larger than the {n} training "
          f"images of {split.name} ({cfg.dataset}); an epoch needs one full "
          f"batch, so use --batch_size={max(1, n)} or less")


def _timing_summary(timing, batch_size: int) -> dict[str, Any] | None:
  """A stage's loop wall time, steps and images/s (None: not recorded)."""
  if not timing or not timing.get("seconds"):
    return None
  return {"seconds": round(timing["seconds"], 3), "steps": timing["steps"],
          "images_per_second": round(timing["steps"] * batch_size
                                     / timing["seconds"], 2)}


def _restore_best(stage_dir: paths.Path, params_template):
  ckpt = checkpoint_lib.Checkpointer(stage_dir / "best", max_to_keep=1)
  restored = ckpt.restore_latest({"params": params_template})
  ckpt.close()
  return restored[1]["params"] if restored else params_template


def _write_tables_and_plots(cfg, workdir, results, curves, grid):
  cols = [("split", "split", "{}"), ("nme_inter_pupil", "NME (inter-pupil, %)", "{:.2f}"),
          ("nme_inter_ocular", "NME (inter-ocular, %)", "{:.2f}"),
          ("mean_shape_nme_inter_pupil", "mean-shape NME (%)", "{:.2f}"),
          ("failure_rate_0.10", "FR@10% (%)", "{:.2f}"), ("auc_0.10", "AUC@10%", "{:.2f}"),
          ("emotion_accuracy", "emotion acc. (%)", "{:.2f}")]
  rows = list(results.get("per_split", [])) + [dict(results, split="mean")]
  text = report.markdown_table(rows, cols)
  report.write_markdown(workdir, f"{cfg.model} on {cfg.dataset}", text)
  metrics_files = sorted(workdir.glob("*/metrics.jsonl"))
  if metrics_files:
    report.plot_loss_curves(metrics_files[0], workdir / "loss_curves.png")
  if curves:
    report.plot_ced(curves, workdir / "ced.png", max_threshold=0.10)
  if grid is not None:
    report.plot_landmark_grid(*grid, workdir / "test_landmarks.png")
