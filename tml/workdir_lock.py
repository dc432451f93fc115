"""One run per workdir: a lock taken at run start and released on exit.

Two runs writing one workdir mix their checkpoints, metrics and reports
(issue 11, item 4), so ``train_and_evaluate`` holds `hold` (process 0 only in
multi-host runs) around the whole run. The lock is ``<workdir>/run.lock``:

* the file holds a JSON record of its holder: ``pid``, ``host``, ``started``
  (UTC, ISO 8601), plus ``boot_id`` and ``pid_start`` (Linux) so that a reused
  process id or a rebooted machine is not mistaken for the holder, and the
  command line;
* while the run lives, the open file also carries an ``flock(2)``, which the
  kernel drops when the process dies, however it dies (SIGKILL included).
  That makes two concurrent starts race-free: exactly one gets it.

A second run is refused with `WorkdirLocked`, one line naming the holder (pid,
host, since when). A lock whose holder is gone (a SIGKILL, an OOM kill, a
crash: the flock is free, and the record names this host with a dead pid, a
pid now used by a younger process, or an earlier boot) is stale: one log line
says so, and the new run takes it over. A record from another host cannot be
checked from here, so it is refused; the message says to delete the file if
that run is gone. Where the file system has no flock (some network file
systems) only the record is checked.

The lock is released (the file deleted) on a normal return, on an exception
and on SIGTERM: outside the training loop (which has its own handler and
saves a checkpoint) a SIGTERM raises `Terminated`, exit status 143, so the
``finally`` blocks run. URL workdirs (``gs://...``) are not locked (no atomic
create or flock there); a note is logged.
"""
from __future__ import annotations

import contextlib
import datetime
import errno
import json
import logging
import os
import signal
import socket
import sys
import threading
from typing import Any, Iterator

from tml import paths

try:
  import fcntl
except ImportError:  # not POSIX
  fcntl = None  # type: ignore[assignment]

log = logging.getLogger("tml")

LOCK_NAME = "run.lock"
_HELD: dict[str, "WorkdirLock"] = {}   # lock path -> lock held by this process


class WorkdirLocked(RuntimeError):
  """Another run holds the workdir; the message names it."""


class Terminated(SystemExit):
  """SIGTERM outside the training loop; the exit status is 143."""

  def __init__(self):
    super().__init__(143)


def _read_text(path: str) -> str | None:
  try:
    with open(path, encoding="utf-8") as f:
      return f.read()
  except OSError:
    return None


def _boot_id() -> str | None:
  text = _read_text("/proc/sys/kernel/random/boot_id")
  return text.strip() if text else None


def _pid_start(pid: int) -> int | None:
  """Start time of ``pid`` in clock ticks since boot (Linux), else None."""
  text = _read_text(f"/proc/{pid}/stat")
  if not text:
    return None
  # The command name (field 2) may hold spaces and parentheses: split after
  # its closing parenthesis; starttime is field 22.
  try:
    return int(text[text.rindex(")") + 2:].split()[19])
  except (ValueError, IndexError):
    return None


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True   # someone else's process
  except OSError:
    return False
  return True


def _record() -> dict[str, Any]:
  pid = os.getpid()
  return {"pid": pid, "host": socket.gethostname(),
          "started": datetime.datetime.now(datetime.timezone.utc)
                     .isoformat(timespec="seconds"),
          "boot_id": _boot_id(), "pid_start": _pid_start(pid),
          "argv": list(sys.argv)}


def describe(holder: dict[str, Any] | None) -> str:
  """``pid 123 on host h since 2026-01-01T00:00:00+00:00`` (or what is known)."""
  if not holder:
    return "a run that has not written its lock record yet"
  return (f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')} "
          f"since {holder.get('started', '?')}")


def stale_reason(holder: dict[str, Any] | None) -> str | None:
  """Why ``holder`` (a lock record) cannot be alive, or None if it may be.

  Only a holder on this host can be checked: its pid is gone, the pid now
  belongs to a process started later (reused), or the machine rebooted.
  """
  if not holder:
    return "the lock file holds no record"
  if holder.get("host") != socket.gethostname():
    return None
  pid = holder.get("pid")
  if not isinstance(pid, int):
    return "the lock record names no process id"
  boot = _boot_id()
  if holder.get("boot_id") and boot and holder["boot_id"] != boot:
    return "this machine has rebooted since"
  if pid == os.getpid():
    return "its pid is this process's (the run before had the same pid)"
  if not _pid_alive(pid):
    return f"process {pid} is not running"
  start = _pid_start(pid)
  if holder.get("pid_start") is not None and start is not None \
      and start != holder["pid_start"]:
    return f"pid {pid} now belongs to another process"
  return None


class WorkdirLock:
  """``<workdir>/run.lock``; `acquire` / `release`, or use `hold`."""

  def __init__(self, workdir: str | os.PathLike[str]):
    self.workdir = os.path.abspath(os.path.expanduser(os.fspath(workdir)))
    self.path = os.path.join(self.workdir, LOCK_NAME)
    self._fd: int | None = None
    self._ino: int | None = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def _refuse(self, holder: dict[str, Any] | None, hint: str = "") -> None:
    raise WorkdirLocked(
        f"--workdir={self.workdir} is in use by another run: "
        f"{describe(holder)} (lock {self.path}); wait for it to end or use "
        f"another --workdir{hint}")

  def acquire(self) -> WorkdirLock:
    """Takes the lock or raises `WorkdirLocked` naming the holder."""
    if self.held:
      return self
    os.makedirs(self.workdir, exist_ok=True)
    for _ in range(20):   # the holder may delete the file as we open it
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        if self._try_take(fd):
          return self
      except BaseException:
        os.close(fd)
        raise
      os.close(fd)
    raise WorkdirLocked(f"{self.path}: could not take the lock (it keeps "
                        "being replaced); is another run starting?")

  def _try_take(self, fd: int) -> bool:
    """True once ``fd`` holds the lock; False to retry with a fresh open."""
    if fcntl is not None:
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        self._refuse(self._read(fd))
      except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP,
                           errno.EINVAL, errno.ENOSYS):
          raise
        log.info("%s: the file system has no flock; checking the lock record "
                 "only", self.path)
    st = os.fstat(fd)
    try:
      if os.stat(self.path).st_ino != st.st_ino:
        return False   # released and recreated meanwhile
    except FileNotFoundError:
      return False
    holder = self._read(fd)
    if holder is not None or st.st_size:
      mine = _HELD.get(self.path)
      if mine is not None:
        self._refuse(holder, " (this process already holds it)")
      reason = stale_reason(holder)
      if reason is None:
        if holder and holder.get("host") != socket.gethostname():
          self._refuse(holder, f"; if that run is not running any more (its "
                       f"machine or container is gone), delete {self.path}")
        self._refuse(holder)
      log.warning("%s: stale lock of %s taken over (%s)", self.path,
                  describe(holder), reason)
    data = (json.dumps(_record(), sort_keys=True) + "\n").encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)
    os.fsync(fd)
    self._fd, self._ino = fd, st.st_ino
    _HELD[self.path] = self
    return True

  @staticmethod
  def _read(fd: int) -> dict[str, Any] | None:
    try:
      size = os.fstat(fd).st_size
      text = os.pread(fd, max(size, 1), 0).decode("utf-8", "replace")
      record = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
      return None
    return record if isinstance(record, dict) else None

  def release(self) -> None:
    """Deletes the lock file (if still ours) and drops the flock."""
    if self._fd is None:
      return
    fd, self._fd = self._fd, None
    _HELD.pop(self.path, None)
    try:
      if os.stat(self.path).st_ino == self._ino:
        os.unlink(self.path)   # before the flock goes: see _try_take
    except OSError:
      pass
    finally:
      os.close(fd)


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
  """SIGTERM raises `Terminated` inside the block, where nobody else (the
  training loop's preemption handler, JAX's C++ notifier) handles it."""
  if (threading.current_thread() is not threading.main_thread()
      or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
    yield
    return

  def handler(signum, frame):
    del signum, frame
    raise Terminated()

  signal.signal(signal.SIGTERM, handler)
  try:
    yield
  finally:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def hold(workdir, *, enabled: bool = True) -> Iterator[WorkdirLock | None]:
  """Holds ``workdir``'s lock for the block (`WorkdirLocked` if another run
  has it). ``enabled=False`` (processes other than 0) does nothing."""
  if not enabled:
    yield None
    return
  if paths.is_url(workdir):   # an epath.Path or str URL (tml.paths)
    log.info("%s: a URL workdir is not locked; make sure no other run uses "
             "it", workdir)
    yield None
    return
  lock = WorkdirLock(workdir).acquire()
  try:
    with _sigterm_raises():
      try:
        yield lock
      except Terminated:
        log.warning("SIGTERM: stopped; %s released. Rerun the same command "
                    "to resume from the latest checkpoint", lock.path)
        raise
  finally:
    lock.release()
