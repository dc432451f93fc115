r"""The bare train step of a run's config: images/s with nothing around it.

  python -m experiments.bare_step --flagfile=demo.flags --bare_out=bare.json

Takes exactly the flags of ``experiments.run`` (and sets the same default
XLA:CPU flags before JAX starts), builds what `tml.train` would build for the
first split (the data, its preprocessing, the model, the engine of
``--framework``, each stage's optimiser, schedule and step) and times each
stage's step on one fixed host batch from that stage's own iterator: no input
pipeline after the first batch, no metric fetches, no logging, checkpoints or
evaluations. ``--bare_warmup`` calls first (the first compiles: its time is
reported apart), then ``--bare_repeats`` timed runs of ``--bare_steps`` steps
each, every run ending when its last step's metrics are on the host.

`experiments.time_to_accuracy` divides the training loop's images/s by this
(the issue-12 target: above 90 %). Writes ``--bare_out`` (JSON) and prints it.
"""
from __future__ import annotations

import json
import pathlib
import statistics
import time

from absl import app
from absl import flags

from experiments import run as run_lib

FLAGS = flags.FLAGS


def measure(cfg, steps: int, warmup: int, repeats: int) -> dict:
  """Per stage: the bare step's images/s (median, range) and first-call time."""
  import jax
  from tml import engine as engine_lib
  from tml import models, parallel, protocol, train
  mesh = parallel.make_mesh()
  data = protocol.load(cfg)
  split = next(iter(protocol.splits(cfg, data)))
  split = train._prepare_arrays(cfg, data, split)   # pylint: disable=protected-access
  model = train.build_model(cfg, data)
  task = train.build_task(cfg, data)
  engine = engine_lib.make_engine(cfg, model, task, mesh, data)
  params = models.init_params(model, (1, task.input_size, task.input_size, 1),
                              cfg.seed, split.index)
  out = {"split": split.name, "engine": engine.info(), "stages": {}}
  for stage in train.build_stages(cfg, data):
    stage, it, schedule, rng, _ = train.stage_inputs(cfg, stage, split)
    state = engine.init_state(stage, params, schedule, rng, split.index)
    step_fn = engine.make_step(stage, schedule)
    batch = next(it)
    t0 = time.perf_counter()
    state, metrics = step_fn(state, batch)
    jax.device_get(metrics)
    first = time.perf_counter() - t0
    for _ in range(max(warmup - 1, 0)):
      state, metrics = step_fn(state, batch)
    jax.device_get(metrics)
    rates = []
    for _ in range(repeats):
      t0 = time.perf_counter()
      for _ in range(steps):
        state, metrics = step_fn(state, batch)
      jax.device_get(metrics)
      rates.append(steps * cfg.batch_size / (time.perf_counter() - t0))
    out["stages"][stage.name] = {
        "images_per_second": round(statistics.median(rates), 2),
        "images_per_second_range": [round(min(rates), 2), round(max(rates), 2)],
        "first_step_seconds": round(first, 3), "steps": steps, "repeats": repeats,
        "batch_size": cfg.batch_size}
    params = jax.device_get(state.params)   # the next stage starts from these
  return out


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  run_lib._quiet_logging()   # pylint: disable=protected-access
  from tml import config as config_lib
  from tml import input_pipeline, models
  kinds = {n: input_pipeline.dataset_info(n).kind
           for n in input_pipeline.dataset_names()}
  cfg = config_lib.validate(
      run_lib.config_from_flags(), known_models=models.model_names(),
      known_datasets=input_pipeline.dataset_names(), dataset_kinds=kinds)
  import jax
  cfg = config_lib.validate(cfg, num_devices=jax.device_count())
  res = measure(cfg, FLAGS.bare_steps, FLAGS.bare_warmup, FLAGS.bare_repeats)
  import os
  res["xla_flags"] = os.environ.get("XLA_FLAGS", "")
  text = json.dumps(res, indent=1)
  if FLAGS.bare_out:
    pathlib.Path(FLAGS.bare_out).write_text(text + "\n")
  print(text)


def _define_flags() -> None:
  """Only when run as a program (absl's flag registry is process-wide)."""
  flags.DEFINE_integer("bare_steps", 20, "Steps per timed run.")
  flags.DEFINE_integer("bare_warmup", 3, "Untimed steps first (the first compiles).")
  flags.DEFINE_integer("bare_repeats", 3, "Timed runs per stage.")
  flags.DEFINE_string("bare_out", "", "Where the JSON result goes (also printed).")


if __name__ == "__main__":
  _define_flags()
  run_lib.set_default_cpu_flags()
  import sys
  app.run(main, argv=run_lib.expand_flagfiles(sys.argv))
