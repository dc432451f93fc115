"""Files in, records out: the file side of `tml.predict`'s CLI.

Reading (`expand_inputs`, `read_input`: PNG / JPEG / TIFF, 8/16-bit grey or
RGB, ``.npy`` temperatures), user boxes (`read_boxes`), the JSON Lines loop
(`run_files`: one record per file, bad files recorded with their reason),
overlays (`draw_overlay`) and their contact sheet (`contact_sheet`), the
DeVries maps as PNGs (`write_maps`) and the CSV view (`jsonl_to_csv`).
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


CONTACT_SHEET_MAX = 64      # overlays on the contact sheet (the first ones)
CONTACT_SHEET_NAME = "contact_sheet.png"
TILE = 128                  # side of a contact-sheet cell, pixels
LABEL_HEIGHT = 14           # the file-name strip under each cell
HEADER_HEIGHT = 16
SHEET_BACKGROUND = (24, 24, 24)


def thumbnail(im):
  """An overlay shrunk to fit a TILE x TILE cell (aspect kept, never enlarged)."""
  from PIL import Image
  t = im.copy()
  t.thumbnail((TILE, TILE), Image.Resampling.BILINEAR)
  return t


def contact_sheet(items, total: int | None = None,
                  max_tiles: int = CONTACT_SHEET_MAX):
  """One PNG-able grid of overlays, each with its file name under it.

  Args:
    items: ``(name, thumbnail)`` pairs (`thumbnail`), in input order; only
      the first ``max_tiles`` are drawn.
    total: how many overlays there were (default ``len(items)``); the header
      says "first <max_tiles> of <total>" when the sheet is capped.

  Returns:
    ``(sheet, layout)``: an RGB PIL image, and per drawn tile ``(name,
    (x0, y0, x1, y1))``, where its thumbnail was pasted (the name is drawn
    in the LABEL_HEIGHT strip below the cell).
  """
  from PIL import Image, ImageDraw
  items = list(items)
  total = len(items) if total is None else total
  items = items[:max_tiles]
  n = max(len(items), 1)
  cols = min(8, int(np.ceil(np.sqrt(n))))
  rows = -(-n // cols)
  cell_h = TILE + LABEL_HEIGHT
  sheet = Image.new("RGB", (cols * TILE, HEADER_HEIGHT + rows * cell_h),
                    SHEET_BACKGROUND)
  d = ImageDraw.Draw(sheet)
  head = (f"{total} overlays" if len(items) == total
          else f"first {len(items)} of {total} overlays")
  d.text((2, 2), head, fill=(200, 200, 200))
  layout = []
  max_chars = TILE // 6
  for k, (name, thumb) in enumerate(items):
    r, c = divmod(k, cols)
    x = c * TILE + (TILE - thumb.width) // 2
    y = HEADER_HEIGHT + r * cell_h + (TILE - thumb.height) // 2
    sheet.paste(thumb, (x, y))
    layout.append((name, (x, y, x + thumb.width, y + thumb.height)))
    label = name if len(name) <= max_chars else name[:max_chars - 1] + "~"
    d.text((c * TILE + 2, HEADER_HEIGHT + r * cell_h + TILE + 1), label,
           fill=(255, 255, 255))
  return sheet, layout


def write_maps(maps: np.ndarray, maps_dir: pathlib.Path, stem: str
               ) -> dict[str, str]:
  """The DeVries maps ``(c, c, 3)`` probabilities as three 8-bit grey PNGs.

  Pixel value ``round(255 * p)``; pixel (row, col) is map pixel (row, col),
  i.e. the record's ``maps_box`` split into c x c cells. Returns
  ``{map name: path}`` in `tml.targets.LABEL_MAP_NAMES` order.
  """
  from PIL import Image
  from tml import targets
  maps_dir.mkdir(parents=True, exist_ok=True)
  out = {}
  for k, name in enumerate(targets.LABEL_MAP_NAMES):
    path = maps_dir / f"{stem}_{name}.png"
    u8 = np.round(np.clip(maps[..., k], 0, 1) * 255).astype(np.uint8)
    Image.fromarray(u8).save(path)
    out[name] = str(path)
  return out


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
              detect: bool = True, boxes=None, vis_dir=None, maps_dir=None,
              chunk: int = 64, progress: bool = True) -> dict[str, Any]:
  """Predicts every file, writes ``out`` JSON Lines; returns the summary.

  ``boxes``: optional ``{file or name: box}`` (`read_boxes`); files without
  one get the detector's box (``detect``) or the whole image. ``vis_dir``:
  also write an overlay PNG per processed file there (`draw_overlay`) and
  one contact sheet of the first CONTACT_SHEET_MAX overlays
  (``vis_dir/contact_sheet.png``, `contact_sheet`). ``maps_dir``: where the
  DeVries maps go (`write_maps`; the record's ``outputs.maps`` names the
  three PNGs); without it a map-head model's records carry no maps.

  Summary: ``processed``, ``no_face``, ``failed`` counts, and
  ``contact_sheet`` (its path, or None).
  """
  summary: dict[str, Any] = {"processed": 0, "no_face": 0, "failed": 0,
                             "contact_sheet": None}
  thumbs: list[tuple[str, Any]] = []
  overlays = 0
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
          stem = f"{start + i:06d}_{part[i].stem}"
          if "maps" in r:
            maps = r.pop("maps")
            if maps_dir is not None:
              r["maps"] = write_maps(maps, pathlib.Path(maps_dir), stem)
            else:
              r.pop("maps_box", None)
          if vis_dir is not None and "error" not in r:
            vis_dir.mkdir(parents=True, exist_ok=True)
            im = draw_overlay(predictor.to_grey(a, temperature=temp), r)
            im.save(vis_dir / f"{stem}.png")
            r["vis"] = str(vis_dir / f"{stem}.png")
            overlays += 1
            thumbs.append((start + i, part[i].name, thumbnail(im)))
    # The first CONTACT_SHEET_MAX in input order (the grey and temperature
    # groups of a chunk finish out of order).
    thumbs.sort(key=lambda t: t[0])
    del thumbs[CONTACT_SHEET_MAX:]
    for f, r in zip(part, records):
      rec = {"file": str(f), "run_id": predictor.run_id, "split": predictor.split}
      if "error" in r:
        rec.update(box=None, status=r["reason"], error=r["error"])
        summary["no_face" if r["reason"] == "no_face" else "failed"] += 1
      else:
        rec.update(box=r["box"], status="ok",
                   outputs=_jsonable({k: v for k, v in r.items()
                                      if k not in ("box", "vis", "t_window")}))
        for k in ("t_window", "vis"):
          if k in r:
            rec[k] = r[k]
        summary["processed"] += 1
      out.write(json.dumps(rec) + "\n")
    out.flush()
    if progress:
      done = min(start + chunk, len(files))
      print(f"\r{done}/{len(files)} files", end="", file=sys.stderr, flush=True)
  if progress and files:
    print(file=sys.stderr)
  if thumbs:
    sheet, _ = contact_sheet([(n, t) for _, n, t in thumbs], total=overlays)
    path = pathlib.Path(vis_dir) / CONTACT_SHEET_NAME
    sheet.save(path)
    summary["contact_sheet"] = str(path)
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
