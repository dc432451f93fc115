"""Issue 11, item 4: one run per workdir (tml.workdir_lock)."""
from __future__ import annotations

import json
import logging
import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap

import pytest

from tml import workdir_lock as wl

REPO = pathlib.Path(__file__).resolve().parents[1]

# A child that takes the lock, says so, then waits for a line on stdin (or a
# signal) and exits normally.
_HOLDER = textwrap.dedent("""
    import sys
    from tml import workdir_lock
    with workdir_lock.hold(sys.argv[1]):
      print("held", flush=True)
      sys.stdin.readline()
    print("released", flush=True)
""")


def _holder(workdir):
  proc = subprocess.Popen(
      [sys.executable, "-c", _HOLDER, str(workdir)], cwd=REPO,
      env=dict(os.environ, PYTHONPATH=str(REPO)), stdin=subprocess.PIPE,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  assert proc.stdout.readline().strip() == "held", proc.stderr.read()
  return proc


def _record(workdir):
  return json.loads((pathlib.Path(workdir) / wl.LOCK_NAME).read_text())


def test_second_run_is_refused_naming_the_holder(tmp_path):
  proc = _holder(tmp_path / "run")
  try:
    record = _record(tmp_path / "run")
    assert record["pid"] == proc.pid
    assert record["host"] == socket.gethostname()
    with pytest.raises(wl.WorkdirLocked) as err:
      with wl.hold(tmp_path / "run"):
        pass
    msg = str(err.value)
    assert "\n" not in msg
    assert f"pid {proc.pid} on host {socket.gethostname()} since " \
           f"{record['started']}" in msg
    assert f"--workdir={tmp_path / 'run'}" in msg
    assert _record(tmp_path / "run") == record   # the holder's lock is intact
  finally:
    out, _ = proc.communicate("\n", timeout=60)
  assert proc.returncode == 0 and "released" in out
  assert not (tmp_path / "run" / wl.LOCK_NAME).exists()   # released on exit
  with wl.hold(tmp_path / "run") as lock:   # and free for the next run
    assert lock.held and _record(tmp_path / "run")["pid"] == os.getpid()


def test_same_process_cannot_take_it_twice(tmp_path):
  with wl.hold(tmp_path):
    with pytest.raises(wl.WorkdirLocked, match=f"pid {os.getpid()} "):
      wl.WorkdirLock(tmp_path).acquire()
  wl.WorkdirLock(tmp_path).acquire().release()


def test_stale_lock_of_a_killed_run_is_taken_over_with_one_line(tmp_path,
                                                                 caplog):
  proc = _holder(tmp_path)
  proc.send_signal(signal.SIGKILL)   # no cleanup: the file stays
  proc.wait(timeout=60)
  proc.stdout.close()
  proc.stdin.close()
  proc.stderr.close()
  stale = _record(tmp_path)
  assert stale["pid"] == proc.pid
  with caplog.at_level(logging.INFO, logger="tml"):
    with wl.hold(tmp_path):
      assert _record(tmp_path)["pid"] == os.getpid()
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 1, lines
  assert "stale lock" in lines[0] and f"pid {proc.pid} on host" in lines[0]
  assert f"process {proc.pid} is not running" in lines[0]
  assert not (tmp_path / wl.LOCK_NAME).exists()


def _write_record(workdir, **kw):
  pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
  record = dict(pid=os.getppid(), host=socket.gethostname(),
                started="2026-01-01T00:00:00+00:00", boot_id=wl._boot_id(),
                pid_start=wl._pid_start(os.getppid()))
  record.update(kw)
  (pathlib.Path(workdir) / wl.LOCK_NAME).write_text(json.dumps(record))
  return record


def test_a_live_pid_in_the_record_is_refused_even_without_flock(tmp_path):
  # The flock is free (e.g. a file system that does not share it), but the
  # record names a live process of this host: refused.
  _write_record(tmp_path)
  with pytest.raises(wl.WorkdirLocked, match=f"pid {os.getppid()} on host "):
    wl.WorkdirLock(tmp_path).acquire()


@pytest.mark.skipif(not os.path.exists("/proc/self/stat"), reason="Linux")
def test_reused_pid_and_reboot_are_stale(tmp_path, caplog):
  _write_record(tmp_path, pid_start=wl._pid_start(os.getppid()) + 1)
  with caplog.at_level(logging.WARNING, logger="tml"):
    wl.WorkdirLock(tmp_path).acquire().release()
  assert "now belongs to another process" in caplog.text
  _write_record(tmp_path, boot_id="another-boot")
  with caplog.at_level(logging.WARNING, logger="tml"):
    wl.WorkdirLock(tmp_path).acquire().release()
  assert "rebooted" in caplog.text


def test_a_lock_from_another_host_is_refused_with_what_to_do(tmp_path):
  _write_record(tmp_path, host="other-host", pid=12345)
  with pytest.raises(wl.WorkdirLocked) as err:
    wl.WorkdirLock(tmp_path).acquire()
  msg = str(err.value)
  assert "pid 12345 on host other-host since 2026-01-01T00:00:00+00:00" in msg
  assert f"delete {tmp_path / wl.LOCK_NAME}" in msg


def test_released_on_exception_and_disabled_does_nothing(tmp_path):
  with pytest.raises(KeyError):
    with wl.hold(tmp_path / "a"):
      raise KeyError("boom")
  assert not (tmp_path / "a" / wl.LOCK_NAME).exists()
  with wl.hold(tmp_path / "b", enabled=False) as lock:
    assert lock is None
  assert not (tmp_path / "b").exists()


def test_released_on_sigterm_with_exit_status_143(tmp_path):
  proc = _holder(tmp_path)
  proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=60)
  assert proc.returncode == 143, err
  assert "Traceback" not in err, err
  assert not (tmp_path / wl.LOCK_NAME).exists()


def test_train_and_evaluate_refuses_a_locked_workdir_before_writing(tmp_path):
  from experiments import run
  from tml import config as config_lib
  from tml import train
  cfg = config_lib.Config(workdir=str(tmp_path / "run"),
                          data_dir=str(tmp_path / "no_data"))
  with wl.hold(tmp_path / "run"):
    with pytest.raises(wl.WorkdirLocked) as err:
      train.train_and_evaluate(cfg)
  assert not (tmp_path / "run" / "config.json").exists()
  assert not (tmp_path / "no_data").exists()
  assert run.user_error(err.value) is err.value
  line = run.error_line(err.value)
  assert line.startswith(f"error: --workdir={tmp_path / 'run'} is in use by "
                         f"another run: pid {os.getpid()} on host ")
  assert "\n" not in line


def test_the_lock_file_is_no_result_for_the_config_guard(tmp_path):
  from tml import run_config_guard as guard
  from tml import writers
  from tml.config import Config
  cfg = Config(batch_size=4096)
  writers.write_run_info(tmp_path, cfg.to_dict(), enabled=True)
  with wl.hold(tmp_path):   # a run that died of a bad flag: nothing to keep
    guard.check_workdir(cfg.replace(batch_size=32), tmp_path)
