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

Resuming exactly (issue 11, item 11): a run that resumes from a checkpoint
at step T (or starts a stage afresh after a run that died before its first
checkpoint) passes ``resume_step=T``. Every record up to T, T itself included,
was logged before that checkpoint was written, so it stays; every record after
T comes from the run that died and is logged again by this one, so it goes
from ``metrics.jsonl`` and is purged in TensorBoard. After any sequence of
kills (SIGTERM, SIGKILL, a NaN stop, a full disk) and reruns, both hold the
(step, tag, value) triples of an uninterrupted run; only wall times differ.

TensorBoard events are written here, synchronously, not by tensorboardX's
``SummaryWriter``: that one queues events for a thread that flushes every
``flush_secs``, so a SIGKILL loses queued events the checkpoint already
covers (the resumed run never writes them again), and a failing write (a
full disk) kills the thread, after which the writer blocks for ever on its
full queue. Each resumed run opens a new event file whose first events are
tensorboardX's purge marker (``SessionLog.START`` at step T + 1): TensorBoard
hides the events at steps >= T + 1 of the earlier files (it does not delete
them from the files). `read_tensorboard_scalars` reads the triples back with
the same rule.

A write that fails (``ENOSPC``: disk full; permissions) raises an ``OSError``
naming the file, at the call that failed.

URL workdirs (``gs://BUCKET/run``, through ``etils.epath``; `tml.paths`):
an object store cannot append (gcsfs silently overwrites in mode "a"), so
there ``metrics.jsonl`` and this run's event file are held in memory and
each is rewritten as one whole object on `MetricWriter.flush`, which runs
before every checkpoint save (the training loop calls it), at the first
write ``flush_secs`` or more after the last flush, and on close. What a
checkpoint covers is therefore on the URL before the checkpoint is, and the
exact-resume rule above holds there too; a kill loses at most the records
after the last flush, which are all at steps after the last checkpoint. The
cost: every flush uploads the whole of both files (a few hundred bytes per
logged step), so a run that logs L times and flushes F times uploads at most
``F * L`` lines, e.g. 50 flushes of a 2,000-line file of 300-byte lines:
30 MB.
Each object write is atomic (readers see the old or the new object), so
there are no torn records on a URL. Local paths are appended and on disk
when each call returns, as described above.
"""
from __future__ import annotations

import collections
import dataclasses
import datetime
import errno
import hashlib
import importlib.metadata
import json
import math
import os
import pathlib
import platform
import re
import socket
import struct
import subprocess
import sys
import time
from typing import Any, Callable, Mapping, TextIO

import numpy as np

from tml import paths

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


def _with_path(error: OSError, path: str | os.PathLike[str]) -> OSError:
  """``error`` with ``path`` as its filename (a failed ``write`` has none)."""
  if error.filename:
    return error
  return OSError(error.errno, error.strerror or str(error), os.fspath(path))


def _write_all(f, data: bytes) -> None:
  """Writes all of ``data`` to the unbuffered binary file ``f``.

  A short write (the disk filled up mid-record) is retried, and the retry
  raises the ``OSError``; what was written is a torn last record, which the
  readers drop.
  """
  view = memoryview(data)
  while view:
    n = f.write(view)
    if not n:   # no progress: a full disk that did not say so
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    view = view[n:]


def _purged_lines(text: str, purge_step: int | None) -> list[str] | None:
  """``text``'s lines without a torn last one and records >= purge_step;
  None when nothing changes."""
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
    return None
  return keep


def _repair_jsonl(path: pathlib.Path, purge_step: int | None) -> None:
  """Drops a torn last line (a kill mid-write) and records >= purge_step."""
  if not path.exists():
    return
  try:
    text = path.read_text()
  except OSError as e:
    raise _with_path(e, path) from e
  keep = _purged_lines(text, purge_step)
  if keep is None:
    return
  tmp = path.with_name(path.name + ".tmp")
  try:
    tmp.write_text("".join(line + "\n" for line in keep))
  except OSError as e:
    tmp.unlink(missing_ok=True)   # the old file is left as it was
    raise _with_path(e, tmp) from e
  os.replace(tmp, path)


class _RewrittenObject:
  """A file on an object store (``gs://``), "appended" by rewriting it whole.

  ``write`` adds to the in-memory content; ``flush`` uploads all of it as
  one object (atomic: readers see the old or the new object).
  """

  def __init__(self, path, initial: bytes = b"", dirty: bool = False):
    self.path = path
    self._data = bytearray(initial)
    self._dirty = dirty

  def write(self, data) -> int:
    self._data += data
    self._dirty = True
    return len(data)

  def flush(self) -> None:
    if not self._dirty:
      return
    try:
      self.path.write_bytes(bytes(self._data))
    except OSError as e:
      raise _with_path(e, self.path) from e
    self._dirty = False

  def close(self) -> None:
    self.flush()


# ----------------------------------------------------------------------------
# TensorBoard event files, written synchronously.
# ----------------------------------------------------------------------------

_EVENT_PREFIX = "events.out.tfevents."
_EVENT_TIME = re.compile(r"events\.out\.tfevents\.(\d+)\.")


def _tb_modules():
  """tensorboardX's summary builders, Event proto and record CRC (no torch)."""
  _import_tensorboardx()
  # pylint: disable=g-import-not-at-top
  from tensorboardX import summary
  from tensorboardX.proto import event_pb2
  from tensorboardX.record_writer import masked_crc32c
  # pylint: enable=g-import-not-at-top
  return summary, event_pb2, masked_crc32c


def _frame(data: bytes, crc) -> bytes:
  """One TFRecord: length, its masked CRC, the data, the data's masked CRC."""
  header = struct.pack("<Q", len(data))
  return (header + struct.pack("<I", crc(header)) + data
          + struct.pack("<I", crc(data)))


class _EventFile:
  """One TensorBoard event file in ``logdir``, appended without a thread.

  Named ``events.out.tfevents.<seconds>.<host>.<pid>``; the seconds are
  bumped past every event file already there, so that the files sort (as
  TensorBoard reads them) in the order they were written, however quick a
  rerun is.
  """

  def __init__(self, logdir, purge_step: int | None):
    self.summary, self._event_pb2, self._crc = _tb_modules()
    logdir = paths.as_path(logdir)
    logdir.mkdir(parents=True, exist_ok=True)
    stamp = int(time.time())
    for p in logdir.glob(_EVENT_PREFIX + "*"):
      m = _EVENT_TIME.match(p.name)
      if m:
        stamp = max(stamp, int(m.group(1)) + 1)
    self.path = logdir / (f"{_EVENT_PREFIX}{stamp:010d}."
                          f"{socket.gethostname()}.{os.getpid()}")
    if paths.is_url(self.path):
      self._file = _RewrittenObject(self.path, dirty=True)
    else:
      try:
        self._file = open(self.path, "xb", buffering=0)
      except OSError as e:
        raise _with_path(e, self.path) from e
    event = self._event_pb2.Event
    now = time.time()
    first = [event(wall_time=now, step=purge_step or 0,
                   file_version="brain.Event:2")]
    if purge_step is not None:
      # What tensorboardX writes for purge_step: TensorBoard drops the
      # events at steps >= purge_step that it read before this one.
      first.append(event(wall_time=now, step=purge_step,
                         session_log=self._event_pb2.SessionLog(
                             status=self._event_pb2.SessionLog.START)))
    self.write(first)

  def event(self, summary, step: int, walltime: float):
    return self._event_pb2.Event(summary=summary, step=int(step),
                                 wall_time=walltime)

  def write(self, events) -> None:
    data = b"".join(_frame(e.SerializeToString(), self._crc) for e in events)
    try:
      _write_all(self._file, data)
    except OSError as e:
      raise _with_path(e, self.path) from e

  def flush(self) -> None:
    """Uploads a URL event file (local ones are written at each call)."""
    if isinstance(self._file, _RewrittenObject):
      self._file.flush()

  def close(self) -> None:
    self._file.close()


def _read_event_file(path: pathlib.Path):
  """The events of one file, in order; stops at a torn or corrupt record."""
  _, event_pb2, crc = _tb_modules()
  data = paths.as_path(path).read_bytes()
  pos = 0
  while pos + 12 <= len(data):
    header = data[pos:pos + 8]
    (length,) = struct.unpack("<Q", header)
    (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
    end = pos + 12 + length
    if header_crc != crc(header) or end + 4 > len(data):
      return
    payload = data[pos + 12:end]
    if struct.unpack("<I", data[end:end + 4])[0] != crc(payload):
      return
    yield event_pb2.Event.FromString(payload)
    pos = end + 4


def read_tensorboard_scalars(logdir: str | os.PathLike[str]
                             ) -> list[tuple[int, str, float]]:
  """``(step, tag, value)`` of every scalar in ``logdir``'s event files as
  TensorBoard shows them: files in name order, and a purge marker
  (``SessionLog.START`` at step S) drops the earlier scalars at steps >= S."""
  _, event_pb2, _ = _tb_modules()
  start = event_pb2.SessionLog.START
  out: list[tuple[int, str, float]] = []
  for path in sorted(paths.as_path(logdir).glob(_EVENT_PREFIX + "*")):
    for event in _read_event_file(path):
      if event.HasField("session_log") and event.session_log.status == start:
        out = [t for t in out if t[0] < event.step]
      for value in event.summary.value:
        if value.HasField("simple_value"):
          out.append((int(event.step), value.tag, float(value.simple_value)))
  return out


class MetricWriter:
  """Writes scalars to TensorBoard event files and to ``metrics.jsonl``.

  Files: ``workdir/tb/events.out.tfevents.*`` and ``workdir/metrics.jsonl``
  (appended; a resumed run continues the same file). Every method is a no-op
  when ``enabled`` is False, so all processes can call it unconditionally.
  Every call is on disk (in the OS) when it returns, so a killed run keeps
  everything it logged. On a URL workdir (``gs://...``) both files are
  rewritten whole on `flush` instead (see the module docstring): call it
  before each checkpoint save.
  """

  def __init__(self, workdir: str | os.PathLike[str], *, enabled: bool = True,
               resume_step: int | None = None,
               purge_step: int | None = None,
               flush_secs: float = 120.0):
    """Opens the writers.

    Args:
      workdir: the run directory (created if needed).
      enabled: False on processes other than 0.
      resume_step: the step this run continues from: its checkpoint's step,
        or, for a stage that starts afresh, the last step before it (0 for
        the first stage). Records at steps > resume_step were logged by a run
        that died after that point (also before its first checkpoint, or at a
        NaN stop) and are logged again by this one: they are dropped from
        metrics.jsonl and purged in TensorBoard, so the curves hold exactly
        the records of one uninterrupted run. Records at resume_step stay
        (they were logged before its checkpoint was written).
      purge_step: the same as ``resume_step=purge_step - 1`` (tensorboardX's
        convention: records at steps >= purge_step go). Give one of the two.
      flush_secs: URL workdirs only: a write flushes (rewrites both files)
        when the last flush is this old.
    """
    if resume_step is not None:
      if purge_step is not None:
        raise ValueError("give resume_step or purge_step, not both")
      purge_step = int(resume_step) + 1
    self.enabled = enabled
    self._remote = paths.is_url(workdir)
    self.workdir = paths.as_path(workdir)
    self.flush_secs = float(flush_secs)
    self._last_flush = time.monotonic()
    self._tb = None
    self._jsonl = None
    if not enabled:
      return
    self.workdir.mkdir(parents=True, exist_ok=True)
    self.metrics_path = self.workdir / METRICS_FILE
    if self._remote:
      self._jsonl = self._open_remote_jsonl(purge_step)
    else:
      _repair_jsonl(self.metrics_path, purge_step)
    self._tb = _EventFile(self.workdir / TB_DIR, purge_step)
    if self._remote:
      return
    try:
      self._jsonl = open(self.metrics_path, "ab", buffering=0)
    except OSError as e:
      self._tb.close()
      raise _with_path(e, self.metrics_path) from e

  def _open_remote_jsonl(self, purge_step: int | None) -> _RewrittenObject:
    """metrics.jsonl of a URL workdir: read, purged in memory (uploaded by
    the first flush; until then the stored object stays as it was)."""
    text = ""
    try:
      if self.metrics_path.exists():
        text = self.metrics_path.read_text()
    except OSError as e:
      raise _with_path(e, self.metrics_path) from e
    keep = _purged_lines(text, purge_step)
    if keep is None:
      return _RewrittenObject(self.metrics_path, text.encode("utf-8"))
    return _RewrittenObject(
        self.metrics_path, "".join(l + "\n" for l in keep).encode("utf-8"),
        dirty=True)

  @property
  def event_file(self) -> paths.Path | None:
    """This writer's TensorBoard event file (None when disabled)."""
    return None if self._tb is None else self._tb.path

  def write_scalars(self, step: int, scalars: Mapping[str, Any], *,
                    prefix: str = "") -> None:
    """Logs ``scalars`` at ``step``.

    Args:
      step: the global step.
      scalars: name -> number (python, numpy or 0-d jax array; fetch jax
        values with one ``jax.device_get`` beforehand to avoid one transfer
        per value). Names become ``prefix/name``.
      prefix: e.g. "train" or "eval"; a trailing "/" is optional.

    Raises:
      OSError: naming metrics.jsonl or the event file, when a write fails
        (``errno.ENOSPC``: the disk is full).
    """
    if not self.enabled:
      return
    step = int(step)
    record: dict[str, Any] = {"step": step, "time": time.time()}
    summary = None   # one event (one TFRecord) per call, like the JSON line
    for name, value in scalars.items():
      tag = _tag(prefix, name)
      if tag in ("step", "time"):
        raise ValueError(f"scalar name {tag!r} is reserved in {METRICS_FILE}")
      record[tag] = json_number(value)
      one = self._tb.summary.scalar(tag, float(value))
      if summary is None:
        summary = one
      else:
        summary.value.extend(one.value)
    events = ([] if summary is None else
              [self._tb.event(summary, step, record["time"])])
    line = (json.dumps(record, allow_nan=False) + "\n").encode("utf-8")
    # metrics.jsonl first: a torn last line is dropped on resume, and a
    # record that reached only one of the two files is at a step after the
    # last checkpoint, which the resumed run purges from both.
    try:
      _write_all(self._jsonl, line)
    except OSError as e:
      raise _with_path(e, self.metrics_path) from e
    self._tb.write(events)
    self._flush_if_due()

  def _flush_if_due(self) -> None:
    if self._remote and time.monotonic() - self._last_flush >= self.flush_secs:
      self.flush()

  def write_text(self, step: int, texts: Mapping[str, str]) -> None:
    """Logs strings (e.g. the config as Markdown) to TensorBoard's text tab."""
    if not self.enabled:
      return
    now = time.time()
    self._tb.write([self._tb.event(self._tb.summary.text(tag, str(text)),
                                   step, now) for tag, text in texts.items()])

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Logs ``(H, W)``, ``(H, W, C)`` or ``(N, H, W, C)`` images in [0, 1]."""
    if not self.enabled:
      return
    now, events = time.time(), []
    for tag, image in images.items():
      image = np.asarray(image, dtype=np.float32)
      if image.ndim == 2:
        image = image[..., None]
      fmt = "HWC" if image.ndim == 3 else "NHWC"
      events.append(self._tb.event(
          self._tb.summary.image(tag, image, dataformats=fmt), step, now))
    self._tb.write(events)
    self._flush_if_due()

  def flush(self) -> None:
    """URL workdirs: rewrites metrics.jsonl, then this run's event file, as
    whole objects. Local ones: nothing to do (every call is written when it
    returns)."""
    if not self.enabled or self._tb is None or not self._remote:
      return
    self._jsonl.flush()   # first, as in write_scalars
    self._tb.flush()
    self._last_flush = time.monotonic()

  def close(self) -> None:
    if not self.enabled or self._tb is None:
      return
    if self._remote:
      self.flush()
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
  with paths.as_path(path).open("r", encoding="utf-8") as f:
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


def _cpu_model() -> str | None:
  """The processor's model name (CPU flags and speed depend on it)."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or None


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
      "cpu_model": _cpu_model(),
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
  if paths.is_url(path):   # one object upload: atomic, no rename needed
    try:
      path.write_text(text + "\n")
    except OSError as e:
      raise _with_path(e, path) from e
    return
  tmp = path.with_name(path.name + ".tmp")
  try:
    tmp.write_text(text + "\n")
  except OSError as e:
    tmp.unlink(missing_ok=True)   # a full disk: the old file stays as it was
    raise _with_path(e, path) from e
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
  workdir = paths.as_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  _write_json_atomic(workdir / "config.json", config_to_dict(config))
  path = workdir / "run_info.json"
  _write_json_atomic(path, run_info(config))
  return path
