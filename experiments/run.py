r"""Runs one tml experiment: flags -> one frozen Config -> tml.train.

  python -m experiments.run --flagfile=chu.flags
  python -m experiments.run --flagfile=demo.flags --workdir=runs/demo

A ``--flagfile`` is looked up relative to the current directory, then to the
including flag file, then to ``experiments/``, so ``--flagfile=chu.flags``
works from the repository root and flag files can include each other.
"""
from __future__ import annotations

import dataclasses
import errno
import logging
import os
import pathlib
import re
import shutil
import sys
import typing

from absl import app
from absl import flags

from tml import config as config_lib

HERE = pathlib.Path(__file__).resolve().parent
FLAGS = flags.FLAGS


def _define_flags() -> None:
  """One flag per Config field, same name, typed from the dataclass."""
  hints = typing.get_type_hints(config_lib.Config)
  for f in dataclasses.fields(config_lib.Config):
    t, default = hints[f.name], f.default
    doc = f"Config.{f.name}"
    if t is bool:
      flags.DEFINE_boolean(f.name, default, doc)
    elif t is int:
      flags.DEFINE_integer(f.name, default, doc)
    elif t is float:
      flags.DEFINE_float(f.name, default, doc)
    elif t is str:
      flags.DEFINE_string(f.name, default, doc)
    else:  # tuple[int, ...]
      flags.DEFINE_list(f.name, [str(v) for v in default], doc)


_define_flags()
flags.DEFINE_boolean(
    "traceback", False,
    "On a data, config or resource error print the full Python traceback "
    "instead of the one-line 'error: ...' message.")

# Errors that are the input's fault, not the code's: without --traceback they
# end the run as one line. Named, not imported, so the check never imports
# (or fails to import) a module the failing run did not reach.
_USER_ERRORS = frozenset({
    "tml.config.ConfigError",
    "tml.run_config_guard.ConfigMismatch",
    "tml.workdir_lock.WorkdirLocked",
    "tml.provenance.DatasetChanged",
    "tml.input_pipeline.DatasetIncomplete",
    "tml.landmarks.LandmarkFormatError",
    "tml.facebox.FaceBoxError",
    "tml.train.TrainingDiverged",
    "data_prep.expression_common.ExpressionDataError",
    "data_prep.thermal_common.ThermalFormatError",
    "data_prep.label68.io.LandmarkFileError",
})


def expand_flagfiles(argv: list[str], _seen: tuple = (), _base: pathlib.Path | None = None
                     ) -> list[str]:
  """Inlines ``--flagfile=`` arguments, resolving paths as the docstring says."""
  out = []
  for arg in argv:
    if not arg.startswith("--flagfile="):
      out.append(arg)
      continue
    name = arg.split("=", 1)[1]
    candidates = [pathlib.Path(name)]
    if _base is not None:
      candidates.append(_base / name)
    candidates.append(HERE / name)
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
      sys.exit(f"--flagfile={name}: no such file (looked in "
               f"{', '.join(str(c.parent.resolve()) for c in candidates)})")
    path = path.resolve()
    if path in _seen:
      sys.exit(f"--flagfile={name}: includes itself ({' -> '.join(map(str, _seen))})")
    lines = [ln.strip() for ln in path.read_text().splitlines()]
    lines = [ln for ln in lines if ln and not ln.startswith("#")]
    out.extend(expand_flagfiles(lines, _seen + (path,), path.parent))
  return out


def config_from_flags() -> config_lib.Config:
  hints = typing.get_type_hints(config_lib.Config)
  kwargs = {}
  for f in dataclasses.fields(config_lib.Config):
    value = getattr(FLAGS, f.name)
    if hints[f.name] not in (bool, int, float, str):
      try:
        value = tuple(int(v) for v in value)
      except ValueError:
        raise config_lib.ConfigError(
            f"--{f.name}={','.join(value)}: expected comma-separated integers") from None
    kwargs[f.name] = value
  return config_lib.Config(**kwargs)


class _OrbaxThreadErrors(logging.Filter):
  """Drops orbax's ``[process=N]`` ERROR records (re-raised in the main thread)."""

  def filter(self, record: logging.LogRecord) -> bool:
    return not (record.levelno >= logging.ERROR
                and str(record.msg).startswith("[process="))


def _quiet_logging() -> None:
  """Our progress and log lines on the console; library INFO chatter off."""
  from absl import logging as absl_logging
  absl_logging.set_verbosity(absl_logging.WARNING)
  tml_log = logging.getLogger("tml")
  tml_log.setLevel(logging.INFO)
  if not tml_log.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    tml_log.addHandler(handler)
    tml_log.propagate = False
  logging.getLogger("tensorboardX").setLevel(logging.ERROR)
  if not FLAGS.traceback:
    # Orbax's background threads log a failed checkpoint write (a full
    # disk) with full tracebacks before the main thread re-raises it as the
    # one-line error; --traceback keeps them.
    logging.getLogger("absl").addFilter(_OrbaxThreadErrors())
  import tensorflow_datasets as tfds
  tfds.disable_progress_bar()


# A full disk: OSError ENOSPC / EDQUOT, or the same from tensorstore (orbax's
# array writer), which raises e.g. ValueError('RESOURCE_EXHAUSTED: Error
# writing ... local file "/w/ckpt/4.orbax-checkpoint-tmp/...": Failed writing:
# "...": ... No space left on device [os_error_code='28']'). A bare
# RESOURCE_EXHAUSTED is something else (XLA's out of device memory).
_NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_NO_SPACE_TEXT = re.compile(r"No space left on device|Disk quota exceeded|"
                            r"os_error_code='?(28|122)\b|\[Errno (28|122)\]")
_QUOTED_PATH = re.compile(r'"((?:/|[a-z][a-z0-9+.-]*://)[^"]+)"')
_ORBAX_TMP = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


def _chain(exc: BaseException | None):
  """``exc``, then its causes and contexts (each once)."""
  seen = set()
  todo = [exc]
  while todo:
    e = todo.pop(0)
    if e is None or id(e) in seen:
      continue
    seen.add(id(e))
    yield e
    todo += [e.__cause__, e.__context__]


def _no_space(exc: BaseException) -> bool:
  if isinstance(exc, OSError) and exc.errno in _NO_SPACE_ERRNOS:
    return True
  return bool(_NO_SPACE_TEXT.search(str(exc)))


def disk_full(exc: BaseException) -> BaseException | None:
  """The "no space left" error in ``exc``'s cause / context chain, or None.

  Contexts count here (not in `user_error`): a full disk makes the cleanup
  that follows fail too (a checkpoint wait, a log flush), and those later
  errors are not what the user needs to hear."""
  return next((e for e in _chain(exc) if _no_space(e)), None)


def user_error(exc: BaseException) -> BaseException | None:
  """The input error behind ``exc`` (itself or its ``raise ... from`` cause):
  a data-format, config or resource (OSError: disk, permissions, missing
  file; a full disk also when reported by tensorstore) error, or a
  ValueError whose message names a flag; else None."""
  full = disk_full(exc)
  if full is not None:
    return full
  seen = set()
  while exc is not None and id(exc) not in seen:
    seen.add(id(exc))
    names = {f"{t.__module__}.{t.__qualname__}" for t in type(exc).__mro__}
    if (names & _USER_ERRORS or isinstance(exc, OSError)
        or (isinstance(exc, ValueError) and str(exc).startswith("--"))):
      return exc
    exc = exc.__cause__
  return None


def _flag(name: str):
  try:
    return getattr(FLAGS, name) if FLAGS.is_parsed() else None
  except (AttributeError, flags.Error):
    return None


def _mount_point(path: str) -> str | None:
  path = os.path.abspath(path)
  while not os.path.exists(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  while not os.path.ismount(path) and os.path.dirname(path) != path:
    path = os.path.dirname(path)
  return path


def _size(n: int) -> str:
  for unit in ("B", "KB", "MB", "GB", "TB"):
    if n < 1024 or unit == "TB":
      return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
    n /= 1024


def no_space_line(exc: BaseException) -> str:
  """``error: no space left on <path> ...`` for a `disk_full` error."""
  path, what = None, ""
  if isinstance(exc, OSError) and exc.filename:
    path = os.fspath(exc.filename)
  else:
    m = _QUOTED_PATH.search(str(exc))
    if m:
      path = m.group(1)
  if path:
    # A checkpoint being written: name its directory and step, not the
    # array file inside orbax's temporary folder.
    parts = path.split("/")
    for i, part in enumerate(parts):
      m = _ORBAX_TMP.match(part)
      if m:
        path, what = "/".join(parts[:i]) or "/", f" (writing checkpoint {m.group(1)})"
        break
  else:
    workdir = _flag("workdir")
    path, what = "device", (f" (writing under --workdir={workdir})"
                            if workdir else "")
  where = ""
  if path != "device" and "://" not in path:
    mount = _mount_point(path)
    try:
      free = shutil.disk_usage(mount).free
      where = f"; file system {mount}, {_size(free)} free"
    except OSError:
      pass
  return (f"error: no space left on {path}{what}{where}. Free some space "
          "there (or use a --workdir / --data_dir on a larger disk) and rerun "
          "the same command: the checkpoints already written are intact and "
          "the run resumes from the latest one")


def error_line(exc: BaseException) -> str:
  """``error: <message>`` for a user error (see `user_error`)."""
  if _no_space(exc):
    return no_space_line(exc)
  if isinstance(exc, OSError) and exc.strerror and exc.filename:
    return f"error: {exc.filename}: {exc.strerror}"
  return f"error: {exc}"


def main(argv):
  try:
    _main(argv)
  except Exception as e:  # pylint: disable=broad-except
    cause = None if FLAGS.traceback else user_error(e)
    if cause is None:
      raise
    sys.exit(error_line(cause))


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  _quiet_logging()
  from tml import input_pipeline, models  # after flag parsing: jax starts here
  kinds = {n: input_pipeline.dataset_info(n).kind
           for n in input_pipeline.dataset_names()}
  cfg = config_lib.validate(
      config_from_flags(), known_models=models.model_names(),
      known_datasets=input_pipeline.dataset_names(), dataset_kinds=kinds)
  if cfg.multihost:
    from tml import parallel
    parallel.initialize_distributed(cfg.coordinator_address, cfg.num_processes,
                                    cfg.process_id)
  import jax  # after the distributed start: it fixes the device count
  cfg = config_lib.validate(cfg, num_devices=jax.device_count())
  from tml import train
  try:
    results = train.train_and_evaluate(cfg)
  except train.Preempted as e:
    logging.warning("%s", e)
    sys.exit(143)
  keys = ("nme_inter_pupil", "mean_shape_nme_inter_pupil", "ridge_nme_inter_pupil",
          "emotion_accuracy")
  summary = ", ".join(f"{k}={results[k]:.2f}" for k in keys
                      if isinstance(results.get(k), (int, float)))
  from tml import paths  # URL-aware (gs:// workdirs)
  workdir = paths.as_path(cfg.workdir)
  print(f"done: {summary}; results in {workdir / 'results.json'}")
  made = [workdir / n for n in ("results.md", "loss_curves.png", "ced.png",
                                "test_landmarks.png") if (workdir / n).exists()]
  if made:
    print(f"tables and plots: {', '.join(map(str, made))}")


# XLA:CPU flags measured faster for our steps (BENCHMARKS.md): YNNPACK's
# convolution filter gradients are slow, so keep convolutions on Eigen
# (DeVries step 1.7x faster on an AMD EPYC, 1.24x on an Intel Xeon, both 2
# cores). Set before JAX starts, only where the user's XLA_FLAGS do not
# decide it; run_info.json records the XLA_FLAGS in force.
CPU_XLA_FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=individual_dot",)


def set_default_cpu_flags(environ=os.environ) -> list[str]:
  """Adds CPU_XLA_FLAGS the user has not set to ``XLA_FLAGS``; returns them."""
  current = environ.get("XLA_FLAGS", "")
  added = [f for f in CPU_XLA_FLAGS if f.split("=", 1)[0] not in current]
  if added:
    environ["XLA_FLAGS"] = " ".join([current, *added]).strip()
  return added


def run() -> None:
  set_default_cpu_flags()
  app.run(main, argv=expand_flagfiles(sys.argv))


if __name__ == "__main__":
  run()
