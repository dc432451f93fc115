"""A run started in an existing workdir must be the run that is stored there.

``train_and_evaluate`` calls `check_start` on process 0 before it writes
``config.json``. If the workdir already holds a ``config.json`` and anything
that run produced (checkpoints, metrics, results), the new config is
compared with the stored one field by field:

* fields in `ALLOWED` cannot change what is trained or reported, only how
  often it is logged or saved, where files are, and how the processes meet;
  a change passes with a logged note;
* ``splits`` may grow: a list that contains every stored split keeps the
  finished splits and runs the new ones; dropping or reordering a split
  away is refused;
* any other difference is refused with `ConfigMismatch`, listing each field
  ``old -> new``, before anything is written.

Fields the stored config lacks (added to ``Config`` after that run) count as
having been their default. Fields only the stored config has (removed from
``Config``) are noted, not refused.

`check_start` also honours ``rebuild`` (``--rebuild``): once the config
passes, the prepared dataset is deleted so that the run builds it again
from the current ``manual_dir`` (see `tml.input_pipeline.open_source`).

`locked` (`tml.workdir_lock.hold`) is held around the whole run, taken
before `check_start`, so that two runs never both pass the check and write
the same workdir.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Mapping

from tml import paths
from tml import workdir_lock

log = logging.getLogger("tml")

# One run per workdir: ``with locked(workdir, enabled=is_main): ...``.
locked = workdir_lock.hold
WorkdirLocked = workdir_lock.WorkdirLocked

CONFIG_NAME = "config.json"
# Files `writers.write_run_info` writes before training starts; a workdir
# with nothing else in it holds no results to protect.
# The lock file of the run in progress is no result either.
_RUN_INFO_FILES = {"config.json", "run_info.json", "config.json.tmp",
                   "run_info.json.tmp", workdir_lock.LOCK_NAME}

# Why each may change on resume:
ALLOWED = {
    "log_every_steps": "how often metrics are fetched and written",
    "checkpoint_every_steps": "a resumed run is bit-identical whatever the "
                              "interval",
    "keep_checkpoints": "how many old checkpoints are kept on disk",
    "num_plot_images": "how many test images the landmark figure shows",
    "monitor_every_steps": "the monitor only evaluates; it trains nothing "
                           "(tml.monitor)",
    "monitor_bare_steps": "the monitor steps a copy of the state, never the "
                          "run's (tml.monitor)",
    "workdir": "where the run is (a moved workdir)",
    "data_dir": "where the prepared dataset is (its inputs are checked "
                "against its provenance record)",
    # Per-example predictions do not depend on the batch they are computed
    # in (padding rows have weight 0); only float rounding of the sums can.
    "eval_batch_size": "evaluation batch size; predictions are per example",
    "multihost": "how the processes are started",
    "coordinator_address": "how the processes are started",
    "num_processes": "how the processes are started",
    "process_id": "how the processes are started",
    "rebuild": "rebuilds the dataset; its inputs are checked by provenance",
}


class ConfigMismatch(ValueError):
  """The config differs from the one stored in the workdir."""


def _plain(value: Any) -> Any:
  return json.loads(json.dumps(value, default=str))


def _result_files(workdir: paths.Path) -> list[str]:
  """The run's files under ``workdir`` (relative, sorted): all but the run
  info and the lock. Local or URL (`tml.paths.walk_files`)."""
  root = os.fspath(workdir).rstrip("/") + "/"
  return sorted(os.fspath(p)[len(root):] for p in paths.walk_files(workdir)
                if p.name not in _RUN_INFO_FILES)


def _has_results(workdir: paths.Path) -> bool:
  return bool(_result_files(workdir))


def _inert(key: str, old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
  """Why ``key`` cannot change this run's results, or None: a loss weight or
  early-stopping setting of a head or task that is off in both configs (a
  row whose shared flag file changed a weight it does not use)."""
  def both(pred) -> bool:
    return pred(old) and pred(new)
  no_emotion = lambda c: (not c.get("emotion_head", True)
                          or c.get("model") == "basic_cnn")
  if key == "emotion_weight" or key == "emotion_loss":
    if both(no_emotion):
      return "the run has no emotion head"
  if key.startswith("early_stopping_"):
    if both(no_emotion):
      return "the run has no emotion task to stop"
    if key != "early_stopping_k" and both(lambda c: not c.get("early_stopping_k")):
      return "early stopping is off (--early_stopping_k=0)"
  if key in ("map_weight", "brow_width"):
    if both(lambda c: c.get("model") != "devries" or not c.get("map_head", True)):
      return "the run has no landmark-map head"
  if key == "unet_weight" and both(lambda c: not c.get("stage1_epochs")):
    return "the run has no stage 1"
  return None


def compare(stored: Mapping[str, Any], new: Mapping[str, Any],
            defaults: Mapping[str, Any] | None = None
            ) -> tuple[list[str], list[str]]:
  """``(refused, notes)``: one line per differing field, ``old -> new``.

  Args:
    stored: the workdir's config.json.
    new: the new config as a JSON-able dict (``Config.to_dict()``).
    defaults: field defaults, standing in for fields ``stored`` lacks.
  """
  stored, new = _plain(dict(stored)), _plain(dict(new))
  defaults = _plain(dict(defaults or {}))
  refused, notes = [], []
  for key in sorted(new):
    if key in stored:
      old = stored[key]
    elif key in defaults:
      old = defaults[key]
    else:
      old = "(absent)"
    value = new[key]
    if old == value:
      continue
    line = f"{key}: {old!r} -> {value!r}"
    inert = _inert(key, {**defaults, **stored}, new)
    if key in ALLOWED:
      notes.append(f"{line} (allowed: {ALLOWED[key]})")
    elif inert:
      notes.append(f"{line} (allowed: no effect, {inert})")
    elif key == "splits" and isinstance(old, list) and isinstance(value, list) \
        and set(old) <= set(value):
      added = [s for s in value if s not in old]
      notes.append(f"{line} (allowed: finished splits are kept, "
                   f"{added} will run)")
    else:
      refused.append(line)
  for key in sorted(set(stored) - set(new)):
    notes.append(f"{key}: {stored[key]!r} -> (no longer a config field; "
                 "ignored)")
  return refused, notes


def check_workdir(cfg, workdir) -> None:
  """Raises `ConfigMismatch` if ``cfg`` differs from the workdir's stored
  config in a field that can change results; logs the allowed differences.

  Args:
    cfg: the new ``tml.config.Config`` (any dataclass with ``to_dict``).
    workdir: the run directory (it may not exist yet).
  """
  workdir = paths.as_path(workdir)
  path = workdir / CONFIG_NAME
  if not path.exists():
    if workdir.is_dir() and _has_results(workdir):
      # Checkpoints or results without the config they belong to (a killed
      # run's late checkpoint written after its workdir was cleared, files
      # copied in by hand): resuming them would mix two runs silently.
      found = _result_files(workdir)
      raise ConfigMismatch(
          f"{workdir} holds {len(found)} file(s) of a run (first: {found[0]}) "
          f"but no {CONFIG_NAME}, so nothing tells which config they belong "
          "to; refusing to resume them. Delete or move them, or use a new "
          "--workdir")
    return
  try:
    stored = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise ConfigMismatch(
        f"{path}: unreadable ({e}); cannot tell whether this run matches the "
        "one in this workdir. Use a new --workdir, or delete the file if "
        "the workdir holds nothing to keep") from None
  new = cfg.to_dict()
  defaults = {}
  if dataclasses.is_dataclass(cfg):
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)
                if f.default is not dataclasses.MISSING}
    if "splits" in defaults:
      defaults["splits"] = list(defaults["splits"])
  refused, notes = compare(stored, new, defaults)
  if refused and not _has_results(workdir):
    log.info("%s: the stored config differs but the workdir holds no "
             "results yet; starting with the new config (%s)", workdir,
             "; ".join(refused))
    return
  for note in notes:
    log.info("config change on resume in %s: %s", workdir, note)
  if refused:
    raise ConfigMismatch(
        f"{workdir} holds a run with another config; refusing to mix them. "
        "Changed field(s), stored -> new:\n  " + "\n  ".join(
            f"--{line}" for line in refused) +
        f"\nRerun with the stored values (see {path}) to resume, or use a "
        "new --workdir for the new config")


def check_start(cfg, workdir) -> None:
  """What a run checks before it writes anything in ``workdir``.

  `check_workdir`, then, with ``rebuild`` set, deletes the prepared dataset
  so the run builds it again. Call on process 0 only (the others wait for
  it at the dataset barrier).
  """
  check_workdir(cfg, workdir)
  if getattr(cfg, "rebuild", False):
    from tml import input_pipeline  # local: heavy (TFDS) only when asked
    kwargs = ({"landmarks_file": cfg.landmarks_file}
              if getattr(cfg, "landmarks_file", "") else None)
    input_pipeline.remove_build(cfg.dataset, data_dir=cfg.data_dir,
                                config=cfg.dataset_config or None,
                                builder_kwargs=kwargs)
