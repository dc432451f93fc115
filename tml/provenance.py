"""What a built dataset was built from, and whether that has changed.

A dataset built from a ``manual_dir`` (Kopaczka, FER2013, TFD) is a copy of
the files that were there at build time. Opening it again with a
``manual_dir`` whose files have since changed would silently serve the old
records, so `open_source` stores a record of the inputs beside the build
(``<build dir>/tml_provenance.json``) and compares it on every later open:

  record = {"manual_dir": "/abs/path" or None,
            "files": {"relative/posix/path": [size_bytes, mtime_ns], ...},
            "inputs": {"landmarks_file": {"path": ..., "files": {...}}, ...}}

Files are compared by size and modification time (no content hash: the
FER2013 zip and the Kopaczka frames are hundreds of MB to GB, and a stat is
what ``make`` trusts too). Dot-files (``.DS_Store``, editor swap files) are
ignored. Moving the folder (same relative names, sizes and times, e.g.
``cp -p`` / ``rsync -a``) is not a change.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

RECORD_NAME = "tml_provenance.json"
_MAX_LISTED = 10


class DatasetChanged(RuntimeError):
  """The inputs of a built dataset differ from the ones it was built from."""


def _tree(path: str) -> dict[str, list[int]]:
  """``{relative posix path: [size, mtime_ns]}`` of the files under path."""
  if os.path.isfile(path):
    st = os.stat(path)
    return {os.path.basename(path): [st.st_size, st.st_mtime_ns]}
  out = {}
  for root, dirs, files in os.walk(path):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in files:
      if name.startswith("."):
        continue
      full = os.path.join(root, name)
      st = os.stat(full)
      rel = os.path.relpath(full, path).replace(os.sep, "/")
      out[rel] = [st.st_size, st.st_mtime_ns]
  return dict(sorted(out.items()))


def fingerprint(manual_dir, inputs: Mapping[str, Any] | None = None
                ) -> dict[str, Any]:
  """The record of ``manual_dir`` (a folder, or None) and of named input
  paths (builder options such as ``source`` or ``landmarks_file``; values
  that are not existing paths are ignored)."""
  record: dict[str, Any] = {"manual_dir": None, "files": {}, "inputs": {}}
  if manual_dir:
    manual_dir = os.path.abspath(os.fspath(manual_dir))
    record["manual_dir"] = manual_dir
    record["files"] = _tree(manual_dir) if os.path.exists(manual_dir) else {}
  for name, value in sorted((inputs or {}).items()):
    if isinstance(value, (str, os.PathLike)) and os.path.exists(value):
      path = os.path.abspath(os.fspath(value))
      record["inputs"][name] = {"path": path, "files": _tree(path)}
  return record


def _file_diff(where: str, old: Mapping, new: Mapping) -> list[str]:
  added = sorted(set(new) - set(old))
  removed = sorted(set(old) - set(new))
  changed = sorted(k for k in set(old) & set(new)
                   if list(old[k]) != list(new[k]))
  lines = []
  for label, names in (("added", added), ("removed", removed),
                       ("changed", changed)):
    if not names:
      continue
    shown = []
    for k in names[:_MAX_LISTED]:
      if label == "changed":
        (s0, t0), (s1, t1) = old[k], new[k]
        what = (f"size {s0} -> {s1} bytes" if s0 != s1
                else "same size, modified since the build")
        del t0, t1
        shown.append(f"{k} ({what})")
      else:
        shown.append(k)
    more = (f", ... and {len(names) - _MAX_LISTED} more"
            if len(names) > _MAX_LISTED else "")
    lines.append(f"{where}: {len(names)} file(s) {label}: "
                 f"{', '.join(shown)}{more}")
  return lines


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """Human-readable lines, one per kind of change; [] when nothing changed.

  Only what both records name is compared: a dataset opened without a
  ``manual_dir`` (reading a prepared build) is not a change.
  """
  lines = []
  if old.get("manual_dir") and new.get("manual_dir"):
    lines += _file_diff(f"manual_dir {new['manual_dir']}",
                        old.get("files", {}), new.get("files", {}))
    if lines and old["manual_dir"] != new["manual_dir"]:
      lines.insert(0, f"manual_dir: {old['manual_dir']} -> {new['manual_dir']}")
  old_in, new_in = old.get("inputs", {}), new.get("inputs", {})
  for name in sorted(set(old_in) & set(new_in)):
    o, n = old_in[name], new_in[name]
    sub = _file_diff(f"{name} {n['path']}", o["files"], n["files"])
    if sub and o["path"] != n["path"]:
      sub.insert(0, f"{name}: {o['path']} -> {n['path']}")
    lines += sub
  return lines


def has_inputs(record: Mapping[str, Any]) -> bool:
  return bool(record.get("manual_dir") or record.get("inputs"))


def read_record(build_dir) -> dict[str, Any] | None:
  """The stored record of a build folder (an ``epath.Path``), or None."""
  path = build_dir / RECORD_NAME
  if not path.exists():
    return None
  return json.loads(path.read_text())


def write_record(build_dir, record: Mapping[str, Any]) -> None:
  """Writes the record atomically (a killed run leaves the old one or none)."""
  path = build_dir / RECORD_NAME
  tmp = build_dir / (RECORD_NAME + ".tmp")
  tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
  tmp.replace(path)
