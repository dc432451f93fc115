"""Reading the Kopaczka database's files: frame names, labels.csv, images.

Every problem becomes a `ThermalFormatError` naming the file, the field and
what was expected, with a `reason` under which a build that skips bad frames
counts it. ``strict=True`` raises at the first problem; ``strict=False``
collects them so the builder can skip the frames concerned.
"""
from __future__ import annotations

import csv
import dataclasses
import os
import re

import numpy as np
from PIL import Image

from data_prep import thermal_common
from tml import landmarks as lm_lib

_error = thermal_common.format_error
BASE_RE = re.compile(
    r"^irface_sub(?P<subject>\d+)_seq(?P<sequence>\d+)_frm(?P<frame>\d+)"
    r"\.(?:jpg|png)_lfb$")
IMAGE_EXTS = (".png", ".npy")
LJSON_EXT = ".ljson"
_TRUE, _FALSE = {"1", "true", "yes", "y"}, {"0", "false", "no", "n", ""}


@dataclasses.dataclass(frozen=True)
class Frame:
  """One frame's files and the ids in its name."""
  base: str
  image_path: str
  ljson_path: str
  subject: int
  sequence: int
  frame: int


@dataclasses.dataclass(frozen=True)
class Label:
  emotion: str
  pose: int
  glasses: bool


def base_name(file_name: str) -> str:
  """``dir/x.jpg_lfb.png`` -> ``x.jpg_lfb``: drops directories and one image
  or LJSON extension."""
  name = os.path.basename(file_name.strip())
  root, ext = os.path.splitext(name)
  return root if ext.lower() in IMAGE_EXTS + (LJSON_EXT,) else name


def parse_base(base: str, path: str) -> tuple[int, int, int]:
  """(subject, sequence, frame) of ``irface_subSSS_seqQQ_frmFFFFF.jpg_lfb``."""
  m = BASE_RE.match(base)
  if not m:
    raise _error(path, "file_name",
                 "irface_subSSS_seqQQ_frmFFFFF.jpg_lfb (or .png_lfb) plus "
                 ".png/.npy/.ljson", repr(os.path.basename(path)),
                 reason="file_name")
  return int(m["subject"]), int(m["sequence"]), int(m["frame"])


def scan_frames(directory: str, strict: bool = True
                ) -> tuple[list[Frame],
                           list[thermal_common.ThermalFormatError]]:
  """Pairs ``<base>.png|.npy`` with ``<base>.ljson`` in a flat directory.

  Returns the complete frames sorted by base name, and (``strict=False``)
  the problems found: a bad name, an image without its LJSON, an LJSON
  without its image, or both a .png and a .npy for one base.
  """
  if not os.path.isdir(directory):
    raise _error(directory, "manual_dir", "a directory holding the frames",
                 "no such directory", reason="config")
  files: dict[str, dict[str, str]] = {}
  for name in sorted(os.listdir(directory)):
    root, ext = os.path.splitext(name)
    if ext.lower() in IMAGE_EXTS + (LJSON_EXT,):
      files.setdefault(root, {})[ext.lower()] = os.path.join(directory, name)
  frames, errors = [], []
  for base, by_ext in sorted(files.items()):
    try:
      any_path = next(iter(by_ext.values()))
      ids = parse_base(base, any_path)
      images = [by_ext[e] for e in IMAGE_EXTS if e in by_ext]
      if LJSON_EXT not in by_ext:
        raise _error(images[0], "ljson", f"a companion file {base}{LJSON_EXT}",
                     "none", reason="missing_ljson")
      if not images:
        raise _error(by_ext[LJSON_EXT], "image",
                     f"a companion image {base}.png or {base}.npy", "none",
                     reason="missing_image")
      if len(images) > 1:
        raise _error(images[0], "image",
                     f"one image per frame, .png or .npy", "both",
                     reason="ambiguous_image")
      frames.append(Frame(base, images[0], by_ext[LJSON_EXT], *ids))
    except thermal_common.ThermalFormatError as err:
      if strict:
        raise
      errors.append(err)
  return frames, errors


def _parse_emotion(value: str) -> str:
  v = value.strip().lower()
  if v in thermal_common.THERMAL_EMOTIONS:
    return v
  if v.isdigit() and int(v) < len(thermal_common.THERMAL_EMOTIONS):
    return thermal_common.THERMAL_EMOTIONS[int(v)]
  raise ValueError


def read_labels(path: str, strict: bool = True
                ) -> tuple[dict[str, Label],
                           dict[str, thermal_common.ThermalFormatError]]:
  """Reads labels.csv into base name -> Label.

  Columns ``file_name,emotion,pose[,glasses]`` (see the builder's manual
  instructions). A missing file or missing columns always raise. Bad rows
  raise (``strict``) or come back as base name -> error.
  """
  if not os.path.isfile(path):
    raise _error(path, "labels", "a CSV file with columns "
                 "file_name,emotion,pose[,glasses] next to the frames",
                 "no such file", reason="config")
  with open(path, "r", encoding="utf-8-sig", newline="") as f:
    rows = list(csv.reader(f))
  header = [h.strip().lower() for h in rows[0]] if rows else []
  missing = [c for c in ("file_name", "emotion", "pose") if c not in header]
  if missing:
    raise _error(path, "header", "columns file_name,emotion,pose[,glasses]",
                 f"{header} (missing {missing})", reason="config")
  col = {name: header.index(name) for name in header}
  labels, errors = {}, {}
  seen: dict[str, int] = {}
  for line, row in enumerate(rows[1:], start=2):
    if not any(cell.strip() for cell in row):
      continue
    where = f"{path} line {line}"
    cell = lambda name: row[col[name]] if col[name] < len(row) else ""
    base = base_name(cell("file_name"))
    try:
      if not base:
        raise _error(where, "file_name", "a frame's file name", "empty",
                     reason="labels")
      if base in seen:
        raise _error(where, "file_name", f"one row per frame; {base} is "
                     f"already on line {seen[base]}", "a second row",
                     reason="labels")
      seen[base] = line
      try:
        emotion = _parse_emotion(cell("emotion"))
      except ValueError:
        raise _error(where, "emotion", "one of "
                     f"{', '.join(thermal_common.THERMAL_EMOTIONS)} or 0-7",
                     repr(cell("emotion")), reason="labels") from None
      try:
        pose = int(cell("pose").strip())
        if not 0 <= pose < thermal_common.NUM_POSES:
          raise ValueError
      except ValueError:
        raise _error(where, "pose", "an integer 0-8 (0 = frontal)",
                     repr(cell("pose")), reason="labels") from None
      glasses = cell("glasses").strip().lower() if "glasses" in col else ""
      if glasses not in _TRUE | _FALSE:
        raise _error(where, "glasses", "1/0, true/false, yes/no or empty",
                     repr(glasses), reason="labels")
      labels[base] = Label(emotion, pose, glasses in _TRUE)
    except thermal_common.ThermalFormatError as err:
      if strict:
        raise
      labels.pop(base, None)
      errors[base] = err
  return labels, errors


def load_image(path: str) -> np.ndarray:
  """A frame as ``(H, W)`` uint8 / uint16 (PNG) or float degrees C (.npy)."""
  if path.lower().endswith(".npy"):
    try:
      a = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
      raise _error(path, "image", "a NumPy .npy array of temperatures "
                   "(degrees C)", f"unreadable ({e})", reason="image") from None
    if not (np.issubdtype(a.dtype, np.floating) or a.dtype in (np.uint8,
                                                               np.uint16)):
      raise _error(path, "image", "float temperatures (degrees C) or "
                   "uint8/uint16 grey levels", a.dtype, reason="image")
    return a
  try:
    with Image.open(path) as img:
      img.load()
      mode = img.mode
      a = np.asarray(img)
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    raise _error(path, "image", "a readable 8-bit or 16-bit greyscale PNG",
                 f"undecodable ({e})", reason="image") from None
  if mode == "L":
    return a.astype(np.uint8)
  if mode.startswith("I;16") or mode == "I":
    if a.min() < 0 or a.max() > thermal_common.UINT16_MAX:
      raise _error(path, "image", "16-bit grey levels 0-65535",
                   f"values {a.min()}..{a.max()}", reason="image")
    return a.astype(np.uint16)
  if mode in ("LA", "RGB", "RGBA") and a.ndim == 3:
    # Grey stored as colour is fine; a false-colour palette is not temperature.
    channels = a[..., :3] if mode != "LA" else a[..., :1]
    if (channels == channels[..., :1]).all():
      return channels[..., 0].astype(np.uint8)
  raise _error(path, "image", "a greyscale PNG (mode L or I;16)",
               f"mode {mode}", reason="image")


def reason_of(err: Exception) -> str:
  """The skip-count category of an error."""
  if isinstance(err, lm_lib.LandmarkFormatError):
    return "ljson"
  return getattr(err, "reason", "other")
