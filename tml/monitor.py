"""Time-to-accuracy monitor: held-out metrics against the loop's own wall time.

``--monitor_every_steps=M`` (0, the default, is off) evaluates the current
parameters every M steps of a stage, and at its last step, on one held-out
set: the split's selection set where it has one (FER2013 PublicTest, TFD
valid), otherwise its first test set. It only watches: nothing is selected,
saved or stopped on what it sees, so a run with it on trains exactly the
same parameters as one with it off.

Logged with the stage's other scalars (``metrics.jsonl``, TensorBoard):

- ``<stage>/monitor/emotion_accuracy`` (%), where the model has an emotion head;
- ``<stage>/monitor/nme_inter_pupil`` (%), where it has landmarks;
- ``<stage>/monitor/loop_seconds``: the stage's training-loop wall time so far
  (input pipeline, augmentation, the step, logging, model-selection
  evaluations and checkpoints), summed over resumed segments like
  ``train_timing``, with the monitor's own evaluations left out;
- ``<stage>/monitor/bare_images_per_second`` with ``--monitor_bare_steps=K``:
  K steps of the same step function on a copy of the state and the last
  batch, timed right there (`Monitor.bare_rate`); the loop's images/s over
  the interval before it, divided by this, is a loop/bare ratio paired in
  time.

The monitor's time is also left out of the stage's ``train_timing``, so the
loop images/s a run reports is the same with the monitor on or off (up to
noise). ``loop_seconds`` is a wall time: like every wall time in the logs it
differs between an uninterrupted run and a resumed one.
``experiments/time_to_accuracy.py`` reads these records.
"""
from __future__ import annotations

import time
from typing import Any, Callable

import numpy as np

# What the monitor logs from `tml.train.evaluate`'s result, where not None.
KEYS = ("emotion_accuracy", "nme_inter_pupil")


class Monitor:
  """Evaluates on a schedule and accounts for its own wall time.

  ``evaluate_fn(params) -> dict`` holds `tml.train.evaluate`'s keys; the
  training loop calls `start_segment`, asks `due` after each step, calls the
  monitor when it is, and subtracts ``excluded_seconds`` from its timing.
  """

  def __init__(self, every_steps: int, evaluate_fn: Callable[[Any], dict],
               set_name: str, clock: Callable[[], float] = time.perf_counter,
               bare_steps: int = 0, batch_size: int = 0):
    if every_steps <= 0:
      raise ValueError(f"every_steps={every_steps}: expected a positive integer")
    if bare_steps and batch_size <= 0:
      raise ValueError(f"bare_steps={bare_steps} needs the global batch_size")
    self.every_steps = every_steps
    self.bare_steps, self.batch_size = bare_steps, batch_size
    self.set_name = set_name
    self._evaluate = evaluate_fn
    self._clock = clock
    self.excluded_seconds = 0.0

  def due(self, step: int, done: bool) -> bool:
    """``step``: the stage's steps taken so far (1-based)."""
    return done or step % self.every_steps == 0

  def start_segment(self) -> None:
    """Called as a stage's loop (or a resumed segment of it) starts."""
    self.excluded_seconds = 0.0

  def __call__(self, state, loop_seconds: float, *, engine=None, step_fn=None,
               batch=None) -> dict[str, float]:
    """Scalars to log (names without the stage); adds its own time, reading
    ``state.params`` included (the torch engine converts them), to
    ``excluded_seconds``. With ``bare_steps``: also the bare step's images/s
    here (`bare_rate`; needs ``engine``, ``step_fn`` and the last ``batch``)."""
    t0 = self._clock()
    res = self._evaluate(state.params)
    out = {f"monitor/{k}": float(res[k]) for k in KEYS if res.get(k) is not None}
    for k, v in out.items():
      if not np.isfinite(v):
        raise FloatingPointError(f"monitor on {self.set_name}: {k} = {v}")
    out["monitor/loop_seconds"] = float(loop_seconds)
    if self.bare_steps:
      out["monitor/bare_images_per_second"] = self.bare_rate(engine, step_fn,
                                                             state, batch)
    self.excluded_seconds += self._clock() - t0
    return out

  def bare_rate(self, engine, step_fn, state, batch) -> float:
    """images/s of ``bare_steps`` steps of a copy of ``state`` on ``batch``.

    The copy is stepped and dropped: the run's state, RNG and data stream are
    untouched. One untimed step first, then the timed ones, ending when the
    last step's metrics are on the host. Timed here, between the loop's own
    steps, the loop/bare ratio of the interval before is paired in time (a
    bare step timed in another process, minutes apart, is not: on a shared
    machine the same step's rate drifts by 20 % between processes).
    """
    import jax
    scratch = engine.copy_state(state)
    scratch, metrics = step_fn(scratch, batch)
    jax.device_get(metrics)
    t0 = self._clock()
    for _ in range(self.bare_steps):
      scratch, metrics = step_fn(scratch, batch)
    jax.device_get(metrics)
    dt = self._clock() - t0
    return self.bare_steps * self.batch_size / dt if dt > 0 else float("inf")


def first_reaching(records: list[dict[str, Any]], tag: str, target: float,
                   higher_is_better: bool) -> dict[str, Any] | None:
  """The first ``metrics.jsonl`` record whose ``tag`` reaches ``target``.

  ``tag``: e.g. ``"stage2/monitor/nme_inter_pupil"``. The loop seconds come
  from the same record (``<stage>/monitor/loop_seconds``) plus the last
  ``loop_seconds`` of every stage logged before this one (a run's time to a
  target counts the stages before it; records are in step order). Returns
  ``{"step", "value", "loop_seconds"}``, or None when none reaches it.
  """
  stage = tag.split("/", 1)[0]
  last_of: dict[str, float] = {}     # insertion order: the stages' order
  for r in records:
    for k, v in r.items():
      if k.endswith("/monitor/loop_seconds"):
        last_of[k.split("/", 1)[0]] = float(v)
  earlier = 0.0
  for s, secs in last_of.items():
    if s == stage:
      break
    earlier += secs
  for r in records:
    if tag not in r:
      continue
    v = float(r[tag])
    if (v >= target) if higher_is_better else (v <= target):
      return {"step": int(r["step"]), "value": v,
              "loop_seconds": earlier + float(r[f"{stage}/monitor/loop_seconds"])}
  return None
