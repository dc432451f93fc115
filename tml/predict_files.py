"""Files in, records out: the file side of `tml.predict`'s CLI.

Reading (`expand_inputs`, `read_input`: PNG / JPEG / TIFF, 8/16-bit grey or
RGB, ``.npy`` temperatures), user boxes (`read_boxes`), the JSON Lines loop
(`run_files`: one record per file, bad files recorded with their reason),
overlays (`draw_overlay`) and the CSV view (`jsonl_to_csv`).
"""
from __future__ import annotations

import glob as glob_lib
import json
import os
import pathlib
import sys
from typing import Any, Iterable, Sequence

import numpy as np

from tml.predict import InputError
from tml.predict import Predictor

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
ARRAY_SUFFIXES = (".npy",)


# =============================================================================
# Files
# =============================================================================
def expand_inputs(inputs: Iterable[str]) -> list[pathlib.Path]:
  """Files, folders (recursive, supported suffixes) and globs -> file list.

  A name that matches nothing is kept, so it gets its own error record.
  """
  suffixes = IMAGE_SUFFIXES + ARRAY_SUFFIXES
  out: list[pathlib.Path] = []
  for item in inputs:
    p = pathlib.Path(item).expanduser()
    if p.is_dir():
      out += sorted(f for f in p.rglob("*") if f.is_file()
                    and f.suffix.lower() in suffixes)
    elif p.exists():
      out.append(p)
    else:
      matches = sorted(glob_lib.glob(os.path.expanduser(item), recursive=True))
      if matches:
        for m in matches:
          mp = pathlib.Path(m)
          out += (sorted(f for f in mp.rglob("*") if f.is_file()
                         and f.suffix.lower() in suffixes) if mp.is_dir() else [mp])
      else:
        out.append(p)
  return out


def read_input(path: pathlib.Path) -> tuple[np.ndarray, bool]:
  """``(array, is_temperature)`` of an image or .npy file; InputError if bad.

  PNG/JPEG/TIFF: 8-bit or 16-bit grey, RGB(A), palette; 32-bit float TIFF is
  read as temperatures. ``.npy``: float = degrees C, uint8/uint16 = grey.
  """
  if not path.is_file():
    raise InputError(f"{path}: no such file", "unreadable")
  if path.suffix.lower() == ".npy":
    try:
      a = np.load(path, allow_pickle=False)
    except Exception as err:  # pylint: disable=broad-except
      raise InputError(f"unreadable .npy: {err}", "unreadable") from err
    return a, bool(np.issubdtype(a.dtype, np.floating))
  from PIL import Image, UnidentifiedImageError
  try:
    with Image.open(path) as im:
      im.load()
      if im.mode in ("P", "PA", "LA", "CMYK", "YCbCr", "1"):
        im = im.convert("RGB" if im.mode != "1" else "L")
      a = np.asarray(im)
  except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
    raise InputError(f"unreadable image: {err}", "unreadable") from err
  if a.dtype in (np.int32, np.uint32, np.int16, np.dtype(">u2"), np.dtype("<u2")):
    if a.size and (a.min() < 0 or a.max() > 65535):
      raise InputError(f"integer pixels outside 0..65535 ({a.dtype})", "bad_dtype")
    a = a.astype(np.uint16)
  if a.dtype == bool:
    a = a.astype(np.uint8) * 255
  return a, bool(np.issubdtype(a.dtype, np.floating))


POINT_COLOUR = (255, 40, 40)
BOX_COLOUR = (40, 220, 40)


def vis_scale(height: int, width: int, target: int = 512) -> int:
  """The integer upscaling of an overlay: small frames are blown up."""
  return max(1, int(np.ceil(target / max(height, width))) if max(height, width) < target else 1)


def point_radius(scale: int) -> int:
  """Half side of a drawn point's square, overlay pixels."""
  return max(1, min(scale // 3, 3))


def draw_overlay(grey: np.ndarray, record: dict[str, Any]):
  """An RGB PIL overlay of one record on its ``(H, W)`` grey frame.

  The frame is upscaled by ``s = vis_scale(H, W)`` (nearest); a point
  (x, y) is drawn as a filled square centred on overlay pixel
  ``round((x + 0.5) * s - 0.5)``, the box as a rectangle on its edges times
  s, the emotion label (if any) at the top left.
  """
  from PIL import Image, ImageDraw
  h, w = grey.shape
  s = vis_scale(h, w)
  base = np.round(np.clip(grey, 0, 1) * 255).astype(np.uint8)
  im = Image.fromarray(base).resize((w * s, h * s), Image.Resampling.NEAREST)
  im = im.convert("RGB")
  d = ImageDraw.Draw(im)
  if record.get("box") is not None:
    x0, y0, x1, y1 = (float(v) * s for v in record["box"])
    d.rectangle([x0, y0, x1 - 1, y1 - 1], outline=BOX_COLOUR, width=max(1, s // 4))
  r = point_radius(s)
  for x, y in np.asarray(record.get("landmarks", np.zeros((0, 2))), np.float64):
    cx, cy = int(round((x + 0.5) * s - 0.5)), int(round((y + 0.5) * s - 0.5))
    d.rectangle([cx - r, cy - r, cx + r, cy + r], fill=POINT_COLOUR)
  if record.get("emotion"):
    p = record["emotion_probs"][record["emotion"]]
    d.text((2, 2), f"{record['emotion']} {p:.2f}", fill=(255, 255, 0))
  return im


def _jsonable(rec: dict[str, Any]) -> dict[str, Any]:
  return {k: (v.tolist() if isinstance(v, np.ndarray) else v) for k, v in rec.items()}


def read_boxes(path) -> dict[str, tuple[float, float, float, float]]:
  """User face boxes: JSON ``{file: [x0, y0, x1, y1]}`` or CSV lines
  ``file,x0,y0,x1,y1`` (edge coordinates of the original image). A key
  matches an input by its path as given, or by its file name."""
  path = pathlib.Path(path)
  text = path.read_text()
  boxes: dict[str, tuple[float, float, float, float]] = {}
  if path.suffix.lower() == ".json":
    for k, v in json.loads(text).items():
      boxes[str(k)] = tuple(float(x) for x in v)
    return boxes
  import csv
  for row in csv.reader(text.splitlines()):
    if not row or row[0].startswith("#") or row[0].strip() == "file":
      continue
    if len(row) != 5:
      raise ValueError(f"{path}: expected file,x0,y0,x1,y1, got {row}")
    boxes[row[0].strip()] = tuple(float(x) for x in row[1:])
  return boxes


def _box_for(boxes, f: pathlib.Path):
  if not boxes:
    return None
  return boxes.get(str(f), boxes.get(f.name))


def run_files(predictor: Predictor, files: Sequence[pathlib.Path], out, *,
              detect: bool = True, boxes=None, vis_dir=None, chunk: int = 64,
              progress: bool = True) -> dict[str, int]:
  """Predicts every file, writes ``out`` JSON Lines; returns the summary.

  ``boxes``: optional ``{file or name: box}`` (`read_boxes`); files without
  one get the detector's box (``detect``) or the whole image. ``vis_dir``:
  also write an overlay PNG per processed file there (`draw_overlay`).
  """
  summary = {"processed": 0, "no_face": 0, "failed": 0}
  for start in range(0, len(files), chunk):
    part = files[start:start + chunk]
    records: list[dict[str, Any] | None] = [None] * len(part)
    groups: dict[bool, list[tuple[int, np.ndarray]]] = {False: [], True: []}
    for i, f in enumerate(part):
      try:
        a, temp = read_input(f)
        groups[temp].append((i, a))
      except InputError as err:
        records[i] = {"error": str(err), "reason": err.reason}
    for temp, items in groups.items():
      if items:
        res = predictor.predict([a for _, a in items],
                                [_box_for(boxes, part[i]) for i, _ in items],
                                detect=detect, temperature=temp)
        for (i, a), r in zip(items, res):
          records[i] = r
          if vis_dir is not None and "error" not in r:
            vis_dir.mkdir(parents=True, exist_ok=True)
            name = f"{start + i:06d}_{part[i].stem}.png"
            draw_overlay(predictor.to_grey(a, temperature=temp), r).save(vis_dir / name)
            r["vis"] = str(vis_dir / name)
    for f, r in zip(part, records):
      rec = {"file": str(f), "run_id": predictor.run_id, "split": predictor.split}
      if "error" in r:
        rec.update(box=None, status=r["reason"], error=r["error"])
        summary["no_face" if r["reason"] == "no_face" else "failed"] += 1
      else:
        rec.update(box=r["box"], status="ok",
                   outputs=_jsonable({k: v for k, v in r.items()
                                      if k not in ("box", "vis")}))
        if "vis" in r:
          rec["vis"] = r["vis"]
        summary["processed"] += 1
      out.write(json.dumps(rec) + "\n")
    out.flush()
    if progress:
      done = min(start + chunk, len(files))
      print(f"\r{done}/{len(files)} files", end="", file=sys.stderr, flush=True)
  if progress and files:
    print(file=sys.stderr)
  return summary


def jsonl_to_csv(jsonl_path, csv_path, class_names: Sequence[str] = ()) -> None:
  """One CSV row per record: file, status, box, emotion, probabilities and
  the 68 points as x0, y0, ..., x67, y67 (blank where not predicted)."""
  import csv
  recs = [json.loads(l) for l in pathlib.Path(jsonl_path).read_text().splitlines() if l]
  header = (["file", "status", "box_x0", "box_y0", "box_x1", "box_y1", "emotion"]
            + [f"p_{c}" for c in class_names]
            + [f"{a}{i}" for i in range(68) for a in ("x", "y")])
  with open(csv_path, "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(header)
    for r in recs:
      out = r.get("outputs") or {}
      probs = out.get("emotion_probs") or {}
      pts = out.get("landmarks")
      w.writerow([r["file"], r["status"]] + list(r["box"] or [""] * 4)
                 + [out.get("emotion", "")] + [probs.get(c, "") for c in class_names]
                 + (list(np.asarray(pts).ravel()) if pts is not None else [""] * 136))
