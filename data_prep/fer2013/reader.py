"""Reads FER2013 from the forms it is distributed in, as plain records.

FER2013 (Goodfellow et al., ICML 2013 representation-learning challenge) is
35,887 48x48 grey faces, labelled 0=angry 1=disgust 2=fear 3=happy 4=sad
5=surprise 6=neutral, split by the csv's ``Usage`` column into Training
(28,709), PublicTest (3,589) and PrivateTest (3,589). Accepted forms:

* the original Kaggle ``fer2013.csv`` (or ``.csv.gz``): header
  ``emotion,pixels,Usage`` (column order and surrounding spaces do not
  matter), ``pixels`` = 2,304 space-separated grey levels, row-major 48x48.
  Ids are ``row_<i>``, i the 0-based data row (row_0 is line 2).
* the widely mirrored image-folder layout, as a folder or as the zip it is
  shipped in (read from the zip directly, nothing is extracted):
  ``train/<class>/Training_<n>.jpg``, ``test/<class>/PublicTest_<n>.jpg``,
  ``test/<class>/PrivateTest_<n>.jpg``; the file-name prefix is the csv's
  ``Usage``, the class folder the label. Ids are the file stems
  (``Training_<n>``; the two stems the layout reuses for different images
  get their class appended, see ``_disambiguate``). Leading folders above
  ``train/``/``test/`` are allowed;
  ``__MACOSX/`` and dot-files are ignored.

The csv and the image folders number images differently (row index vs. an
opaque ``<n>``), so ids from one form do not match ids from the other.

Every malformed record raises ``ExpressionDataError`` naming the file and the
row or member, unless the caller's ``BadInputPolicy`` skips it.
"""
from __future__ import annotations

import collections
import csv
import dataclasses
import functools
import gzip
import io
import os
import pathlib
import re
import zipfile
from typing import Iterable, Iterator

import numpy as np
from PIL import Image

from data_prep.expression_common import (BadInputPolicy, ExpressionDataError,
                                         IMAGE_SIZE)

EMOTION_NAMES = ("angry", "disgust", "fear", "happy", "sad", "surprise",
                 "neutral")
SPLITS = ("train", "public_test", "private_test")
USAGE_TO_SPLIT = {"Training": "train", "PublicTest": "public_test",
                  "PrivateTest": "private_test"}
# Which top folder of the image layout holds each Usage prefix.
_TOP_FOLDER = {"Training": "train", "PublicTest": "test", "PrivateTest": "test"}
# Looked for in manual_dir, in this order.
SOURCE_NAMES = ("fer2013.csv", "fer2013.csv.gz", "fer2013_images.zip",
                "fer2013_images")
NUM_PIXELS = IMAGE_SIZE * IMAGE_SIZE

_MEMBER_RE = re.compile(
    r"^(?P<usage>Training|PublicTest|PrivateTest)_(?P<n>\d+)\.(jpe?g|png)$",
    re.IGNORECASE)
_IGNORED_NAMES = {"thumbs.db", "desktop.ini"}


@dataclasses.dataclass(frozen=True)
class FerRecord:
  """One FER2013 image.

  Attributes:
    id: stable id (``Training_<n>`` etc., or ``row_<i>`` for the csv).
    split: one of SPLITS.
    emotion: 0..6 in FER order (EMOTION_NAMES).
    image: ``(48, 48)`` uint8, row-major, upright.
    where: file and row/member, for messages.
  """
  id: str
  split: str
  emotion: int
  image: np.ndarray
  where: str


@dataclasses.dataclass(frozen=True)
class TreeEntry:
  """A member of the image-folder layout, before decoding."""
  name: str      # zip member name or path relative to the folder
  split: str
  emotion: int
  id: str


def find_source(manual_dir: str | os.PathLike) -> pathlib.Path:
  """The first of SOURCE_NAMES present in ``manual_dir``, or a folder that is
  itself the image layout (has ``train/`` or ``test/``)."""
  manual_dir = pathlib.Path(manual_dir)
  for name in SOURCE_NAMES:
    if (manual_dir / name).exists():
      return manual_dir / name
  if (manual_dir / "train").is_dir() or (manual_dir / "test").is_dir():
    return manual_dir
  raise FileNotFoundError(
      f"{manual_dir}: no FER2013 found; expected one of {list(SOURCE_NAMES)} "
      "or the folders train/ and test/ of the image layout")


def read(source: str | os.PathLike, splits: Iterable[str] | None = None,
         policy: BadInputPolicy | None = None) -> Iterator[FerRecord]:
  """Yields the records of ``splits`` (default all) from any accepted form."""
  source = pathlib.Path(source)
  wanted = _check_splits(splits)
  policy = policy or BadInputPolicy()
  name = source.name.lower()
  if name.endswith(".csv") or name.endswith(".csv.gz"):
    yield from _read_csv(source, wanted, policy)
  elif name.endswith(".zip") or source.is_dir():
    yield from _read_tree(source, wanted, policy)
  else:
    raise ExpressionDataError(
        f"{source}: expected a .csv, .csv.gz, .zip or a folder of images")


def split_counts(source: str | os.PathLike) -> collections.Counter:
  """Records per split, from the cheap fields only (no pixels decoded).

  Bad records are not counted, nor raised on: that is ``read``'s job.
  """
  source = pathlib.Path(source)
  if source.name.lower().endswith((".csv", ".csv.gz")):
    counts = collections.Counter()
    with _open_text(source) as f:
      rows = csv.reader(f)
      header = [h.strip() for h in next(rows, [])]
      if "Usage" not in header:
        return counts
      col = header.index("Usage")
      for row in rows:
        split = USAGE_TO_SPLIT.get(row[col].strip()) if len(row) > col else None
        counts[split] += split is not None
    return +counts
  entries = list_tree(source, BadInputPolicy(skip_bad=True))
  return collections.Counter(e.split for e in entries)


def check_has_records(source: str | os.PathLike) -> None:
  """Raises ``ExpressionDataError`` naming ``source`` unless it holds at
  least one record of a known split (an empty file, a header-only csv, an
  empty folder or zip)."""
  source = pathlib.Path(source)
  if split_counts(source):
    return
  if source.name.lower().endswith((".csv", ".csv.gz")):
    # Raises the precise header problem (empty file, missing columns) first.
    next(read(source), None)
    raise ExpressionDataError(
        f"{source}: no data rows (header only); expected rows "
        "'emotion,pixels,Usage' with Usage in "
        f"{list(USAGE_TO_SPLIT)}", field="file")
  raise ExpressionDataError(
      f"{source}: no images in the layout; expected "
      "train/<class>/Training_<n>.jpg and "
      "test/<class>/{PublicTest,PrivateTest}_<n>.jpg", field="file")


def _check_splits(splits):
  wanted = set(SPLITS if splits is None else splits)
  unknown = wanted - set(SPLITS)
  if unknown:
    raise ValueError(f"unknown split(s) {sorted(unknown)}; expected {SPLITS}")
  return wanted


# ---------------------------------------------------------------------- csv --

def _open_text(path: pathlib.Path):
  if path.name.lower().endswith(".gz"):
    return gzip.open(path, "rt", encoding="ascii", newline="")
  return open(path, "r", encoding="ascii", newline="")


def _read_csv(path, wanted, policy) -> Iterator[FerRecord]:
  with _open_text(path) as f:
    reader = csv.reader(f)
    try:
      header = [h.strip() for h in next(reader)]
    except StopIteration:
      raise ExpressionDataError(f"{path}: empty file, expected a header "
                                "'emotion,pixels,Usage'") from None
    missing = [c for c in ("emotion", "pixels", "Usage") if c not in header]
    if missing:
      raise ExpressionDataError(
          f"{path}: header {header}: missing column(s) {missing}; expected "
          "'emotion,pixels,Usage' (the original Kaggle fer2013.csv)")
    col = {c: header.index(c) for c in ("emotion", "pixels", "Usage")}
    for i, row in enumerate(reader):
      where = f"{path}: data row {i} (line {reader.line_num})"
      try:
        record = _parse_row(row, i, where, col, len(header), wanted)
      except ExpressionDataError as e:
        policy.handle(e)
        continue
      if record is not None:
        yield record


def _parse_row(row, i, where, col, num_fields, wanted) -> FerRecord | None:
  if len(row) != num_fields:
    raise ExpressionDataError(
        f"{where}: fields: expected {num_fields}, got {len(row)}",
        field="fields")
  usage = row[col["Usage"]].strip()
  if usage not in USAGE_TO_SPLIT:
    raise ExpressionDataError(
        f"{where}: Usage: unknown value {usage!r}; expected one of "
        f"{list(USAGE_TO_SPLIT)}", field="Usage")
  split = USAGE_TO_SPLIT[usage]
  emotion = _parse_emotion(row[col["emotion"]], where)
  if split not in wanted:
    return None  # checked the cheap fields; skip the pixel parse
  text = row[col["pixels"]].split()
  if len(text) != NUM_PIXELS:
    raise ExpressionDataError(
        f"{where}: pixels: expected {NUM_PIXELS} grey levels (48x48), got "
        f"{len(text)}", field="pixels")
  try:
    values = np.array(text, dtype=np.int64)
  except ValueError:
    bad = next(t for t in text if not t.lstrip("-").isdigit())
    raise ExpressionDataError(
        f"{where}: pixels: expected integers 0..255, got {bad!r}",
        field="pixels") from None
  if values.min() < 0 or values.max() > 255:
    raise ExpressionDataError(
        f"{where}: pixels: expected integers 0..255, got range "
        f"[{values.min()}, {values.max()}]", field="pixels")
  image = values.astype(np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)
  return FerRecord(f"row_{i}", split, emotion, image, where)


def _parse_emotion(text, where) -> int:
  try:
    emotion = int(text.strip())
  except ValueError:
    emotion = -1
  if not 0 <= emotion < len(EMOTION_NAMES):
    raise ExpressionDataError(
        f"{where}: emotion: expected an integer 0..6 "
        f"({', '.join(EMOTION_NAMES)}), got {text!r}", field="emotion")
  return emotion


# ---------------------------------------------------------- image folders --

def list_tree(source: str | os.PathLike, policy: BadInputPolicy | None = None
              ) -> list[TreeEntry]:
  """The image members of a zip or folder in the image layout (no decoding).

  Sorted by name so the order does not depend on the zip's or the file
  system's. Raises on a member outside the layout (unknown class folder,
  unknown prefix, prefix under the wrong top folder) and on duplicate ids
  that the class folder does not disambiguate.
  """
  source = pathlib.Path(source)
  policy = policy or BadInputPolicy()
  if source.is_dir():
    names = sorted(
        str(p.relative_to(source).as_posix())
        for p in source.rglob("*") if p.is_file())
  else:
    stat = source.stat()
    names = _zip_names(str(source.resolve()), stat.st_size, stat.st_mtime_ns)
  entries = []
  for name in names:
    parts = name.split("/")
    if any(p.startswith(".") or p == "__MACOSX" for p in parts) or (
        parts[-1].lower() in _IGNORED_NAMES):
      continue
    try:
      entries.append(_parse_member(source, name, parts))
    except ExpressionDataError as e:
      policy.handle(e)
  return _disambiguate(source, entries, policy)


def _disambiguate(source, entries, policy) -> list[TreeEntry]:
  """Makes ids unique: a file stem under two class folders gets the class.

  The mirrored layout reuses two Training stems for different images in
  different class folders (Training_52789098 in neutral/ and surprise/,
  Training_8475486 in angry/ and surprise/). Both members of such a pair
  become ``<stem>_<class>`` so neither is privileged and the id stays a
  function of the member name alone. Anything still clashing (the same
  stem in the same class folder under different leading folders) is an
  error.
  """
  by_id = collections.defaultdict(list)
  for entry in entries:
    by_id[entry.id].append(entry)
  out, seen = [], {}
  for entry in entries:
    if len(by_id[entry.id]) > 1:
      entry = dataclasses.replace(
          entry, id=f"{entry.id}_{EMOTION_NAMES[entry.emotion]}")
    if entry.id in seen:
      policy.handle(ExpressionDataError(
          f"{source}: member {entry.name!r}: id {entry.id} also at "
          f"{seen[entry.id]!r}; expected each image once",
          field="duplicate id"))
      continue
    seen[entry.id] = entry.name
    out.append(entry)
  return out


@functools.lru_cache(maxsize=4)
def _zip_names(path: str, size: int, mtime_ns: int) -> tuple[str, ...]:
  """Sorted file members of a zip; cached per (path, size, mtime).

  Reading FER2013's 35,903-entry central directory costs about a second, and
  a build lists the zip once per split plus once to count.
  """
  del size, mtime_ns  # cache key only: a rewritten zip is listed afresh
  try:
    with zipfile.ZipFile(path) as z:
      return tuple(sorted(n for n in z.namelist() if not n.endswith("/")))
  except zipfile.BadZipFile as e:
    raise ExpressionDataError(f"{path}: not a readable zip ({e})",
                              field="file") from None


def _parse_member(source, name, parts) -> TreeEntry:
  expected = ("expected train/<class>/Training_<n>.jpg or "
              "test/<class>/{PublicTest,PrivateTest}_<n>.jpg with <class> in "
              f"{sorted(EMOTION_NAMES)}")
  if len(parts) < 3:
    raise ExpressionDataError(f"{source}: member {name!r}: {expected}",
                              field="layout")
  top, folder, file_name = parts[-3:]
  match = _MEMBER_RE.match(file_name)
  if match is None:
    raise ExpressionDataError(
        f"{source}: member {name!r}: unknown file name; {expected}",
        field="layout")
  if folder.lower() not in EMOTION_NAMES:
    raise ExpressionDataError(
        f"{source}: member {name!r}: unknown class folder {folder!r}; "
        f"{expected}", field="class folder")
  usage = match.group("usage")
  usage = next(u for u in USAGE_TO_SPLIT if u.lower() == usage.lower())
  if top.lower() != _TOP_FOLDER[usage]:
    raise ExpressionDataError(
        f"{source}: member {name!r}: a {usage} image under {top!r}/; "
        f"expected it under {_TOP_FOLDER[usage]!r}/", field="layout")
  return TreeEntry(name=name, split=USAGE_TO_SPLIT[usage],
                   emotion=EMOTION_NAMES.index(folder.lower()),
                   id=f"{usage}_{match.group('n')}")


def _read_tree(source, wanted, policy) -> Iterator[FerRecord]:
  entries = [e for e in list_tree(source, policy) if e.split in wanted]
  if source.is_dir():
    def read_bytes(name):
      return (source / name).read_bytes()
    z = None
  else:
    z = zipfile.ZipFile(source)
    read_bytes = z.read
  try:
    for entry in entries:
      where = f"{source}: member {entry.name!r}"
      try:
        image = decode_image(read_bytes(entry.name), where)
      except ExpressionDataError as e:
        policy.handle(e)
        continue
      yield FerRecord(entry.id, entry.split, entry.emotion, image, where)
  finally:
    if z is not None:
      z.close()


def decode_image(data: bytes, where: str) -> np.ndarray:
  """JPEG/PNG bytes -> ``(48, 48)`` uint8; raises naming ``where``."""
  try:
    with Image.open(io.BytesIO(data)) as img:
      img.load()
      if img.mode != "L":
        # Some mirrors re-save the grey faces as RGB; the channels are equal.
        img = img.convert("L")
      image = np.asarray(img, dtype=np.uint8)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise ExpressionDataError(
        f"{where}: not a readable image ({e}); expected a 48x48 grey "
        "JPEG/PNG", field="image") from None
  if image.shape != (IMAGE_SIZE, IMAGE_SIZE):
    raise ExpressionDataError(
        f"{where}: image size {image.shape[1]}x{image.shape[0]}; expected "
        f"{IMAGE_SIZE}x{IMAGE_SIZE}", field="image")
  return image
