"""Paths that understand URLs: the workdir and every file written under it.

A TPU VM batch job writes to ``--workdir=gs://BUCKET/runs/chu``. ``pathlib``
cannot hold that (``pathlib.Path("gs://b/r")`` is the local folder
``gs:/b/r``), so the workdir and everything under it go through `as_path`,
which makes a URL an ``etils.epath.Path``: epath sends ``gs://``, ``s3://``
... to fsspec (``gcsfs`` for GCS; TensorFlow's gfile instead where
TensorFlow is installed). Local paths stay ``pathlib.Path``.

Object stores have no rename and no append, but a single object write is
atomic (the object appears whole when the upload completes, or not at all).
`write_atomic` therefore writes a URL in one upload and a local file through
a temporary file and ``os.replace``.
"""
from __future__ import annotations

import os
import pathlib
from typing import Union

from etils import epath

PathLike = Union[str, os.PathLike]
Path = Union[pathlib.Path, epath.Path]


def is_url(path: PathLike) -> bool:
  """True for ``scheme://...`` paths (``gs://b/r``), False for local ones."""
  return "://" in os.fspath(path)


def as_path(path: PathLike) -> Path:
  """``path`` with ``~`` expanded: an ``epath.Path`` for a URL, else a
  ``pathlib.Path``.

  Local paths stay ``pathlib.Path`` so that everything local behaves exactly
  as before (``stat``, ``rglob``, ``os.replace``); a URL never goes through
  ``pathlib``. Both have the pathlib API the callers use (``/``, ``name``,
  ``parent``, ``exists``, ``is_dir``, ``iterdir``, ``glob``, ``mkdir``,
  ``open``, ``read_*``/``write_*``, ``unlink``).

  Raises:
    ValueError: for a URL already collapsed by ``pathlib`` (``gs:/b/r``):
      writing there would fill a local folder named ``gs:``.
  """
  text = os.fspath(path)
  if is_url(text):
    return epath.Path(text)
  if looks_collapsed(text):
    raise ValueError(
        f"{text!r} looks like a URL whose '//' was lost (pathlib.Path turns "
        f"'gs://b' into 'gs:/b'); pass the URL as a string or epath.Path")
  return pathlib.Path(text).expanduser()


def looks_collapsed(text: str) -> bool:
  """``gs:/b/r``, ``s3:/b``: a URL that went through ``pathlib``."""
  scheme, sep, rest = text.partition(":/")
  return bool(sep) and scheme in ("gs", "s3", "az", "hf") and \
      not rest.startswith("/")


def write_atomic(path: PathLike, data: bytes, *, tmp_name: str | None = None,
                 fsync: bool = False) -> Path:
  """Writes ``data`` to ``path`` so that readers see the old or the new file.

  Args:
    path: the file (local or URL).
    data: the whole content.
    tmp_name: local only: the temporary file's name in the same folder
      (default ``<name>.tmp``).
    fsync: local only: fsync the temporary file before the rename.

  Raises:
    OSError: the write failed; a local temporary file is removed and the old
      file is left as it was.
  """
  path = as_path(path)
  if is_url(path):
    path.write_bytes(data)   # one upload: atomic on GCS / S3
    return path
  target = os.fspath(path)
  tmp = os.path.join(os.path.dirname(target) or ".",
                     tmp_name or os.path.basename(target) + ".tmp")
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      if fsync:
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, target)
  except BaseException:
    try:
      os.unlink(tmp)
    except OSError:
      pass
    raise
  return path


def walk_files(root: PathLike):
  """Every file under ``root`` (recursive), as paths; nothing if it is absent.

  By listing folder by folder: ``epath`` refuses ``rglob`` on URLs, and its
  ``walk`` drops the ``gs://`` of the folders it yields on the fsspec backend.
  """
  root = as_path(root)
  if not root.is_dir():
    return
  for p in sorted(root.iterdir()):
    if p.is_dir():
      yield from walk_files(p)
    else:
      yield p
