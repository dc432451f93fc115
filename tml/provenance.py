"""What a built dataset was built from, and whether that has changed.

A dataset built from a ``manual_dir`` (Kopaczka, FER2013, TFD) is a copy of
the files that were there at build time. Opening it again with a
``manual_dir`` whose files have since changed would silently serve the old
records, so `open_source` stores a record of the inputs beside the build
(``<build dir>/tml_provenance.json``) and compares it on every later open:

  record = {"manual_dir": "/abs/path" or None,
            "files": {"relative/posix/path": [size_bytes, mtime_ns, sha256], ...},
            "inputs": {"landmarks_file": {"path": ..., "files": {...}}, ...},
            "options": {"skip_bad": false, ...}}

Build options (the builder keywords that are not paths) are compared
where both records name them: a build made under other options is refused.

Files are compared by size and modification time first (a stat, what
``make`` trusts); a file of the same size whose time changed is hashed and
compared with the SHA-256 stored at build time, so a copy that did not keep
the times (``cp`` without ``-p``, a fresh checkout of a data bucket) is not a
change, while an edit that kept the size is. The build hashes every input
once (about 0.3 s per 100 MB). Records written before hashes were stored
(two fields per file) fall back to size and time. Dot-files (``.DS_Store``,
editor swap files) are ignored. Moving the folder (same relative names) is
not a change.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Mapping

RECORD_NAME = "tml_provenance.json"
_MAX_LISTED = 10


class DatasetChanged(RuntimeError):
  """The inputs of a built dataset differ from the ones it was built from."""


def sha256(path: str, chunk: int = 1 << 20) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(chunk), b""):
      h.update(block)
  return h.hexdigest()


def _files(path: str) -> dict[str, str]:
  """``{relative posix path: absolute path}`` of the files under path."""
  if os.path.isfile(path):
    return {os.path.basename(path): path}
  out = {}
  for root, dirs, files in os.walk(path):
    dirs[:] = sorted(d for d in dirs if not d.startswith("."))
    for name in files:
      if name.startswith("."):
        continue
      full = os.path.join(root, name)
      out[os.path.relpath(full, path).replace(os.sep, "/")] = full
  return dict(sorted(out.items()))


def _tree(path: str, hashes: bool = False) -> dict[str, list]:
  """``{relative posix path: [size, mtime_ns(, sha256)]}`` of the files under
  path; each entry also remembers its absolute path for a later hash."""
  out = {}
  for rel, full in _files(path).items():
    st = os.stat(full)
    out[rel] = _Entry([st.st_size, st.st_mtime_ns] + ([sha256(full)] if hashes else []),
                      full)
  return out


class _Entry(list):
  """A ``[size, mtime_ns(, sha256)]`` list (what JSON stores) that knows its file."""

  def __init__(self, values, full_path):
    super().__init__(values)
    self.full_path = full_path


def _same(old, new) -> bool:
  """Same file: same size, and the same time or (hashes known) the same content."""
  if old[0] != new[0]:
    return False
  if old[1] == new[1]:
    return True
  if len(old) > 2 and getattr(new, "full_path", None):
    return old[2] == sha256(new.full_path)
  return False


def with_hashes(record: Mapping[str, Any]) -> dict[str, Any]:
  """``record`` with a SHA-256 for every file (what a build stores)."""
  def hashed(files):
    return {k: [v[0], v[1], sha256(v.full_path)] if getattr(v, "full_path", None)
            else list(v) for k, v in files.items()}
  out = dict(record)
  out["files"] = hashed(record.get("files", {}))
  out["inputs"] = {k: dict(v, files=hashed(v["files"]))
                   for k, v in record.get("inputs", {}).items()}
  return out


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
    elif isinstance(value, (bool, int, float)) or value is None:
      # Build options (skip_bad, mask_missing_points): a build made under
      # other options holds other records.
      record.setdefault("options", {})[name] = value
  return record


def _file_diff(where: str, old: Mapping, new: Mapping) -> list[str]:
  added = sorted(set(new) - set(old))
  removed = sorted(set(old) - set(new))
  changed = sorted(k for k in set(old) & set(new) if not _same(old[k], new[k]))
  lines = []
  for label, names in (("added", added), ("removed", removed),
                       ("changed", changed)):
    if not names:
      continue
    shown = []
    for k in names[:_MAX_LISTED]:
      if label == "changed":
        s0, s1 = old[k][0], new[k][0]
        what = (f"size {s0} -> {s1} bytes" if s0 != s1 else
                "same size, other content" if len(old[k]) > 2 else
                "same size, modified since the build")
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
  old_opt, new_opt = old.get("options", {}), new.get("options", {})
  for name in sorted(set(old_opt) & set(new_opt)):
    if old_opt[name] != new_opt[name]:
      lines.append(f"build option {name}: {old_opt[name]!r} -> {new_opt[name]!r}")
  old_in, new_in = old.get("inputs", {}), new.get("inputs", {})
  for name in sorted(set(old_in) & set(new_in)):
    o, n = old_in[name], new_in[name]
    sub = _file_diff(f"{name} {n['path']}", o["files"], n["files"])
    if sub and o["path"] != n["path"]:
      sub.insert(0, f"{name}: {o['path']} -> {n['path']}")
    lines += sub
  return lines


def times_changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
  """Some file kept its size and content but not its time (re-copied): the
  caller refreshes the record so later opens need no hashing."""
  pairs = [(old.get("files", {}), new.get("files", {}))] + [
      (old.get("inputs", {})[k]["files"], new.get("inputs", {})[k]["files"])
      for k in set(old.get("inputs", {})) & set(new.get("inputs", {}))]
  return any(o[k][1] != n[k][1] for o, n in pairs for k in set(o) & set(n))


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
  tmp.write_text(json.dumps(with_hashes(record), indent=1, sort_keys=True) + "\n")
  tmp.replace(path)
