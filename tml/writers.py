"""Logging: TensorBoard + JSONL metrics, a console progress line, run info.

Only process 0 of a multi-host run should log: construct ``MetricWriter`` and
``Progress`` with ``enabled=(jax.process_index() == 0)``; ``write_run_info``
checks by itself. No TensorFlow (CLU's writers need it) and no PyTorch:
tensorboardX tries ``import torch`` when imported, so it is imported with
torch masked out unless the user already imported torch.

``metrics.jsonl`` holds one JSON object per ``write_scalars`` call:
``{"step": 100, "time": 1700000000.0, "train/loss": 0.25, ...}``. Non-finite
values are written as the strings ``"nan"``, ``"inf"`` and ``"-inf"``, which
keeps every line valid JSON (bare NaN is not) and keeps NaN apart from inf for
divergence post-mortems; ``float(v)`` reads every value back, strings
included.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import socket
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, TextIO

import numpy as np

METRICS_FILE = "metrics.jsonl"
TB_DIR = "tb"


# ----------------------------------------------------------------------------
# Scalars: TensorBoard and JSONL.
# ----------------------------------------------------------------------------


def _import_tensorboardx():
  """Imports tensorboardX without letting it import torch."""
  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX
  # A None entry makes `import torch` raise ImportError, which tensorboardX
  # catches (it only wants torch.Tensor for a type annotation).
  sys.modules["torch"] = None  # type: ignore[assignment]
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return tensorboardX


def json_number(value: Any) -> Any:
  """A scalar as a JSON-safe value: int, float, or "nan"/"inf"/"-inf"."""
  if isinstance(value, (bool, np.bool_)):
    return bool(value)
  if isinstance(value, (int, np.integer)):
    return int(value)
  value = float(value)  # also jax/numpy 0-d arrays
  if math.isfinite(value):
    return value
  if math.isnan(value):
    return "nan"
  return "inf" if value > 0 else "-inf"


def _tag(prefix: str, name: str) -> str:
  if not prefix:
    return name
  return prefix + name if prefix.endswith("/") else f"{prefix}/{name}"


def _repair_jsonl(path: pathlib.Path, purge_step: int | None) -> None:
  """Drops a torn last line (a kill mid-write) and records >= purge_step."""
  if not path.exists():
    return
  text = path.read_text()
  lines = text.splitlines()
  keep = []
  for i, line in enumerate(lines):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      if i == len(lines) - 1:
        continue  # torn write
      raise
    if purge_step is None or record.get("step", -1) < purge_step:
      keep.append(line)
  if len(keep) == len(lines) and (not text or text.endswith("\n")):
    return
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text("".join(line + "\n" for line in keep))
  os.replace(tmp, path)


class MetricWriter:
  """Writes scalars to TensorBoard event files and to ``metrics.jsonl``.

  Files: ``workdir/tb/events.out.tfevents.*`` and ``workdir/metrics.jsonl``
  (appended; a resumed run continues the same file). Every method is a no-op
  when ``enabled`` is False, so all processes can call it unconditionally.
  """

  def __init__(self, workdir: str | os.PathLike[str], *, enabled: bool = True,
               purge_step: int | None = None):
    """Opens the writers.

    Args:
      workdir: the run directory (created if needed).
      enabled: False on processes other than 0.
      purge_step: when resuming from a checkpoint at step T, pass T: records
        at steps >= T, logged after that checkpoint by the run that died, are
        dropped from metrics.jsonl and hidden in TensorBoard, so the curves
        read as one uninterrupted run.
    """
    self.enabled = enabled
    self.workdir = pathlib.Path(workdir)
    self._tb = None
    self._jsonl = None
    if not enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.metrics_path = self.workdir / METRICS_FILE
    _repair_jsonl(self.metrics_path, purge_step)
    tensorboardx = _import_tensorboardx()
    self._tb = tensorboardx.SummaryWriter(
        str(self.workdir / TB_DIR), purge_step=purge_step, flush_secs=30)
    self._jsonl = open(self.metrics_path, "a", encoding="utf-8")

  def write_scalars(self, step: int, scalars: Mapping[str, Any], *,
                    prefix: str = "") -> None:
    """Logs ``scalars`` at ``step``.

    Args:
      step: the global step.
      scalars: name -> number (python, numpy or 0-d jax array; fetch jax
        values with one ``jax.device_get`` beforehand to avoid one transfer
        per value). Names become ``prefix/name``.
      prefix: e.g. "train" or "eval"; a trailing "/" is optional.
    """
    if not self.enabled:
      return
    step = int(step)
    record: dict[str, Any] = {"step": step, "time": time.time()}
    for name, value in scalars.items():
      tag = _tag(prefix, name)
      if tag in ("step", "time"):
        raise ValueError(f"scalar name {tag!r} is reserved in {METRICS_FILE}")
      record[tag] = json_number(value)
      self._tb.add_scalar(tag, float(value), step, walltime=record["time"])
    self._jsonl.write(json.dumps(record, allow_nan=False) + "\n")
    # Flushed per call so the file can be tailed and survives a kill; log
    # calls are every N steps, so this costs nothing measurable.
    self._jsonl.flush()

  def write_text(self, step: int, texts: Mapping[str, str]) -> None:
    """Logs strings (e.g. the config as Markdown) to TensorBoard's text tab."""
    if not self.enabled:
      return
    for tag, text in texts.items():
      self._tb.add_text(tag, str(text), int(step))

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Logs ``(H, W)``, ``(H, W, C)`` or ``(N, H, W, C)`` images in [0, 1]."""
    if not self.enabled:
      return
    for tag, image in images.items():
      image = np.asarray(image, dtype=np.float32)
      if image.ndim == 2:
        image = image[..., None]
      if image.ndim == 3:
        self._tb.add_image(tag, image, int(step), dataformats="HWC")
      else:
        self._tb.add_images(tag, image, int(step), dataformats="NHWC")

  def flush(self) -> None:
    if not self.enabled:
      return
    self._tb.flush()
    self._jsonl.flush()

  def close(self) -> None:
    if not self.enabled or self._tb is None:
      return
    self._tb.close()
    self._jsonl.close()
    self._tb = self._jsonl = None
    self.enabled = False

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc) -> None:
    self.close()


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """Reads a metrics.jsonl back; "nan"/"inf" strings become floats."""
  records = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      if not line.strip():
        continue
      record = json.loads(line)
      for key, value in record.items():
        if isinstance(value, str) and value in ("nan", "inf", "-inf"):
          record[key] = float(value)
      records.append(record)
  return records


# ----------------------------------------------------------------------------
# Console progress.
# ----------------------------------------------------------------------------


def format_duration(seconds: float) -> str:
  """h:mm:ss (hours unbounded); "--:--:--" when unknown."""
  if seconds is None or not math.isfinite(seconds) or seconds < 0:
    return "--:--:--"
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  minutes, secs = divmod(rest, 60)
  return f"{hours}:{minutes:02d}:{secs:02d}"


def _format_field(value: Any) -> str:
  if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
    return str(int(value))
  if isinstance(value, str):
    return value
  try:
    return f"{float(value):.4g}"
  except (TypeError, ValueError):
    return str(value)


class Progress:
  """Prints one progress line at most every ``every_seconds``.

  Example line::

    step 1200/10000 (12.0%) | 35.2 steps/s 4506 img/s | elapsed 0:00:41
    ETA 0:04:10 | loss 0.0123 nme 4.56

  The rate comes from the ``update`` calls within the last ``window_seconds``
  and never from the construction time, so the first step (which includes
  compilation) stops counting once the window has moved past it.
  """

  def __init__(self, total_steps: int, *, every_seconds: float = 10.0,
               stream: TextIO | None = None, initial_step: int = 0,
               batch_size: int | None = None,
               window_seconds: float | None = None,
               clock: Callable[[], float] = time.monotonic,
               enabled: bool = True):
    """Starts the clock.

    Args:
      total_steps: the last step of the run.
      every_seconds: minimum time between two printed lines.
      stream: where to print (default: sys.stdout at print time).
      initial_step: the step a resumed run starts from.
      batch_size: global batch size, for images/s; None leaves it out.
      window_seconds: how far back the rate looks; default
        ``max(30, 3 * every_seconds)``.
      clock: monotonic seconds; injectable for tests.
      enabled: False on processes other than 0.
    """
    self.total_steps = int(total_steps)
    self.every_seconds = float(every_seconds)
    self.stream = stream
    self.batch_size = batch_size
    self.window_seconds = (float(window_seconds) if window_seconds is not None
                           else max(30.0, 3.0 * self.every_seconds))
    self.enabled = enabled
    self._clock = clock
    self._start = clock()
    self._last_print = self._start
    self._initial_step = int(initial_step)
    self._samples: collections.deque[tuple[float, int]] = collections.deque()

  def rate(self) -> float | None:
    """Steps per second over the window; None before two updates."""
    if len(self._samples) < 2:
      return None
    (t0, s0), (t1, s1) = self._samples[0], self._samples[-1]
    if t1 <= t0:
      return None
    return (s1 - s0) / (t1 - t0)

  def update(self, step: int, **fields: Any) -> str | None:
    """Records that ``step`` is done; prints and returns a line when due.

    Args:
      step: steps completed so far.
      **fields: a few values to show, e.g. ``loss=0.12``; floats are printed
        with 4 significant digits.

    Returns:
      The printed line, or None when nothing was printed.
    """
    if not self.enabled:
      return None
    now = self._clock()
    step = int(step)
    self._samples.append((now, step))
    # Rate over the samples inside the window, but never fewer than two.
    while (len(self._samples) > 2
           and self._samples[0][0] < now - self.window_seconds):
      self._samples.popleft()
    due = now - self._last_print >= self.every_seconds
    if not (due or step >= self.total_steps):
      return None
    self._last_print = now
    line = self.format_line(step, now, fields)
    stream = self.stream or sys.stdout
    print(line, file=stream, flush=True)
    return line

  def format_line(self, step: int, now: float,
                  fields: Mapping[str, Any]) -> str:
    total = max(self.total_steps, 1)
    parts = [f"step {step}/{self.total_steps} ({100.0 * step / total:.1f}%)"]
    rate = self.rate()
    if rate is None:
      parts.append("-- steps/s")
      eta = None
    else:
      speed = f"{rate:.3g} steps/s"
      if self.batch_size:
        speed += f" {rate * self.batch_size:.4g} img/s"
      parts.append(speed)
      eta = (self.total_steps - step) / rate if rate > 0 else None
    parts.append(f"elapsed {format_duration(now - self._start)} "
                 f"ETA {format_duration(eta)}")
    if fields:
      parts.append(" ".join(f"{k} {_format_field(v)}"
                            for k, v in fields.items()))
    return " | ".join(parts)


# ----------------------------------------------------------------------------
# Run info.
# ----------------------------------------------------------------------------

PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy",
            "tensorflow-datasets", "grain", "chex", "tensorboardX",
            "matplotlib", "scipy", "array-record", "torch", "tensorflow",
            "jax-cuda12-plugin", "jax-cuda13-plugin", "libtpu")


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, Any]:
  """Installed distribution versions (None if absent), read from metadata.

  Nothing is imported: torch and tensorflow stay out of sys.modules.
  """
  versions: dict[str, Any] = {"python": platform.python_version()}
  for name in names:
    try:
      versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      versions[name] = None
  return versions


def git_info(repo_dir: str | os.PathLike[str] | None = None
             ) -> dict[str, Any] | None:
  """``{"commit", "dirty"}`` of the repo holding tml, or None.

  ``dirty`` ignores untracked files (run outputs under the repo would
  otherwise always mark it dirty).
  """
  if repo_dir is None:
    repo_dir = pathlib.Path(__file__).resolve().parents[1]

  def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", os.fspath(repo_dir), *args], check=True,
        capture_output=True, text=True, timeout=10).stdout.strip()

  try:
    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
  except (OSError, subprocess.SubprocessError):
    return None
  return {"commit": commit, "dirty": dirty}


def run_info(config: Any = None) -> dict[str, Any]:
  """Everything needed to say later what ran where.

  Args:
    config: the resolved config; only its SHA-256 goes in (the config itself
      goes to config.json), so two runs can be matched at a glance.

  Returns:
    A JSON-serialisable dict: versions, devices, processes, host, command
    line, git commit, XLA/JAX environment variables, timestamp.
  """
  import jax  # pylint: disable=g-import-not-at-top
  devices = [{"id": d.id, "platform": d.platform,
              "device_kind": d.device_kind, "process_index": d.process_index}
             for d in jax.devices()]
  env = {k: v for k, v in sorted(os.environ.items())
         if k.startswith(("XLA_", "JAX_", "TPU_", "CUDA_VISIBLE"))}
  return {
      "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      "versions": package_versions(),
      "backend": jax.default_backend(),
      "devices": devices,
      "device_count": jax.device_count(),
      "local_device_count": jax.local_device_count(),
      "process_index": jax.process_index(),
      "process_count": jax.process_count(),
      "hostname": socket.gethostname(),
      "platform": platform.platform(),
      "cpu_count": os.cpu_count(),
      "argv": list(sys.argv),
      "cwd": os.getcwd(),
      "git": git_info(),
      "env": env,
      "config_sha256": (None if config is None else hashlib.sha256(
          json.dumps(config_to_dict(config), sort_keys=True,
                     default=str).encode()).hexdigest()),
  }


def config_to_dict(config: Any) -> Any:
  """Dataclasses, ConfigDicts and mappings -> plain JSON-able structures."""
  if dataclasses.is_dataclass(config) and not isinstance(config, type):
    return {f.name: config_to_dict(getattr(config, f.name))
            for f in dataclasses.fields(config)}
  if hasattr(config, "to_dict") and callable(config.to_dict):
    return config_to_dict(config.to_dict())
  if isinstance(config, Mapping):
    return {str(k): config_to_dict(v) for k, v in config.items()}
  if isinstance(config, (list, tuple)):
    return [config_to_dict(v) for v in config]
  if isinstance(config, (str, int, float, bool)) or config is None:
    return config
  if isinstance(config, (np.generic,)):
    return config.item()
  return str(config)  # paths, enums, dtypes


def _write_json_atomic(path: pathlib.Path, obj: Any) -> None:
  text = json.dumps(obj, indent=2, sort_keys=True, default=str)
  tmp = path.with_name(path.name + ".tmp")
  tmp.write_text(text + "\n")
  os.replace(tmp, path)


def write_run_info(workdir: str | os.PathLike[str], config: Any, *,
                   enabled: bool | None = None) -> pathlib.Path | None:
  """Writes ``workdir/config.json`` and ``workdir/run_info.json``.

  Args:
    workdir: the run directory (created if needed).
    config: the fully resolved config (dict, dataclass or ConfigDict).
    enabled: None writes on process 0 only.

  Returns:
    The run_info.json path, or None where nothing was written.
  """
  if enabled is None:
    import jax  # pylint: disable=g-import-not-at-top
    enabled = jax.process_index() == 0
  if not enabled:
    return None
  workdir = pathlib.Path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  _write_json_atomic(workdir / "config.json", config_to_dict(config))
  path = workdir / "run_info.json"
  _write_json_atomic(path, run_info(config))
  return path
