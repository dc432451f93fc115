"""Results: results.json, split aggregation, Markdown tables, plots.

Process 0 only: callers gate on ``jax.process_index() == 0``; nothing here
touches devices. Plots use matplotlib's object API on an Agg canvas
(``matplotlib.figure.Figure`` + ``savefig``), never pyplot: no GUI backend,
no global backend switch, no figure registry to leak memory in long runs.

Conventions:
* results.json: sorted keys, indent 2, NaN and +-inf written as null (strict
  JSON; a metric that could not be computed reads as missing).
* ``aggregate_splits``: mean and *sample* standard deviation (ddof=1) over
  the repeats of the Chu protocol (5 random 7/8-1/8 splits); with one split
  the std is undefined and stored as NaN (null in results.json; tables then
  show the mean alone). A NaN or null in any split makes that mean NaN: a
  failed split is shown, not averaged away.
* Landmarks are ``(n, 68, 2)`` in (x, y) pixel order (x = column), drawn on
  images shown with pixel centres at integer coordinates.
* Paths are local or URLs (``gs://...``; `tml.paths`): every file is written
  as whole bytes (plots are rendered into memory first), atomically: through
  a temporary file and a rename locally, as one object upload on a URL.
"""
from __future__ import annotations

import io
import json
import math
import numbers
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

from matplotlib.figure import Figure
import numpy as np

from tml import paths

RESULTS_JSON = "results.json"
RESULTS_MD = "results.md"

# ----------------------------------------------------------------------------
# JSON.
# ----------------------------------------------------------------------------


def to_jsonable(obj: Any) -> Any:
  """numpy/jax scalars and arrays -> python; NaN/inf -> None.

  Raises:
    TypeError: for objects with no JSON form (nothing is written then).
  """
  if isinstance(obj, Mapping):
    return {str(k): to_jsonable(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [to_jsonable(v) for v in obj]
  if obj is None or isinstance(obj, (str, bool, np.bool_)):
    return bool(obj) if isinstance(obj, np.bool_) else obj
  if isinstance(obj, (numbers.Integral, np.integer)):
    return int(obj)
  if isinstance(obj, (numbers.Real, np.floating)):
    value = float(obj)
    return value if math.isfinite(value) else None
  if hasattr(obj, "__array__"):  # numpy or (fetched) jax arrays
    array = np.asarray(obj)
    return to_jsonable(array.item() if array.ndim == 0 else array.tolist())
  raise TypeError(f"cannot write {type(obj).__name__} to JSON: {obj!r}")


def _write_text_atomic(path: paths.Path, text: str) -> None:
  if paths.is_url(path):   # one object upload: the old object or the new one
    path.write_text(text)
    return
  # Same directory, so os.replace is an atomic rename: readers see the old
  # file or the new one, never a prefix.
  tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
  try:
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
  finally:
    if tmp.exists():
      tmp.unlink()


def write_results(workdir: str | os.PathLike[str],
                  results: Mapping[str, Any]) -> paths.Path:
  """Writes ``workdir/results.json`` atomically; returns its path.

  The whole text is serialised before anything touches the disk, so a value
  JSON cannot encode raises TypeError and leaves an existing file intact.
  """
  workdir = paths.as_path(workdir)
  text = json.dumps(to_jsonable(results), indent=2, sort_keys=True,
                    allow_nan=False) + "\n"
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / RESULTS_JSON
  _write_text_atomic(path, text)
  return path


# ----------------------------------------------------------------------------
# Aggregation over splits.
# ----------------------------------------------------------------------------


def _is_number(x: Any) -> bool:
  return (isinstance(x, (numbers.Real, np.floating, np.integer))
          and not isinstance(x, (bool, np.bool_)))


def _is_number_list(x: Any) -> bool:
  return (isinstance(x, (list, tuple, np.ndarray)) and len(x) > 0
          and all(_is_number(v) for v in np.asarray(x, dtype=object).ravel()))


def _mean_std(values: np.ndarray) -> tuple[Any, Any]:
  """Mean and sample std over axis 0 (std NaN when there is one value)."""
  values = np.asarray(values, dtype=np.float64)
  mean = values.mean(axis=0)
  if values.shape[0] > 1:
    std = values.std(axis=0, ddof=1)
  else:
    std = np.full_like(mean, np.nan)
  if mean.ndim == 0:
    return float(mean), float(std)
  return mean.tolist(), std.tolist()


def _aggregate(dicts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  out: dict[str, Any] = {}
  common = [k for k in dicts[0] if all(k in d for d in dicts[1:])]
  for key in common:
    values = [d[key] for d in dicts]
    if (all(_is_number(v) or v is None for v in values)
        and any(_is_number(v) for v in values)):
      # None: a metric a split could not compute (NaN read back from JSON).
      values = [np.nan if v is None else v for v in values]
      out[key], out[f"{key}_std"] = _mean_std(np.array(values, np.float64))
    elif all(isinstance(v, Mapping) for v in values):
      nested = _aggregate(values)
      means = {k: v for k, v in nested.items() if not k.endswith("_std")
               or k[:-4] not in nested}
      stds = {k[:-4]: v for k, v in nested.items()
              if k.endswith("_std") and k[:-4] in nested}
      if means:
        out[key] = means
      if stds:
        out[f"{key}_std"] = stds
    elif (all(_is_number_list(v) for v in values)
          and len({np.shape(v) for v in values}) == 1):
      out[key], out[f"{key}_std"] = _mean_std(np.array(values, np.float64))
    elif all(v == values[0] for v in values[1:]):
      out[key] = values[0]  # e.g. the model name: identical in every split
  return out


def aggregate_splits(per_split: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Mean and spread over repeated splits.

  Args:
    per_split: one results dict per split, e.g.
      ``[{"nme_inter_pupil": 4.1, "nme_per_emotion": {"happy": 3.9, ...}}]``.

  Returns:
    For each number present in every split, ``key`` (mean) and ``key_std``
    (sample std); nested dicts keep their shape, with their stds in a
    parallel ``<key>_std`` dict (``{"nme_per_emotion": {"happy": m},
    "nme_per_emotion_std": {"happy": s}}``); equal-length number lists (per
    landmark NME) are aggregated elementwise; values equal in every split
    (names) are kept; anything else is dropped. Plus ``n_splits`` and
    ``per_split`` (the inputs, JSON-ready).
  """
  if not per_split:
    raise ValueError("aggregate_splits needs at least one split")
  out = _aggregate(list(per_split))
  out["n_splits"] = len(per_split)
  out["per_split"] = [to_jsonable(d) for d in per_split]
  return out


# ----------------------------------------------------------------------------
# Markdown.
# ----------------------------------------------------------------------------


def _lookup(row: Mapping[str, Any], key: str) -> Any:
  """``a.b`` looks into nested dicts; missing -> None.

  A key present literally wins, so names with a dot (``failure_rate_0.10``)
  are found as they are.
  """
  if key in row:
    return row[key]
  value: Any = row
  for part in key.split("."):
    if not isinstance(value, Mapping) or part not in value:
      return None
    value = value[part]
  return value


def _std_of(row: Mapping[str, Any], key: str) -> Any:
  parts = key.split(".")
  std = _lookup(row, ".".join(parts[:-1] + [parts[-1] + "_std"]))
  if std is None and len(parts) > 1:  # parallel dict: a_std.b
    std = _lookup(row, ".".join([parts[0] + "_std"] + parts[1:]))
  return std


def _missing(value: Any) -> bool:
  return value is None or (_is_number(value) and not math.isfinite(value))


def _format(value: Any, fmt: str | Callable[[Any], str]) -> str:
  if callable(fmt):
    return fmt(value)
  if fmt.startswith("{"):
    return fmt.format(value)
  return format(value, fmt)


def markdown_table(rows: Sequence[Mapping[str, Any]],
                   columns: Sequence[tuple[str, str, Any]]) -> str:
  """A GitHub Markdown table.

  Args:
    rows: one dict per row (e.g. ``aggregate_splits`` outputs with a "name").
    columns: ``(key, header, fmt)``; ``key`` may be dotted for nested dicts
      ("nme_per_emotion.happy"); ``fmt`` is a format spec (".2f"), a format
      string ("{:.2f}%") or a callable. A number with a finite ``<key>_std``
      beside it prints as "mean ± std"; None/NaN print as "n/a".

  Returns:
    The table text, ending with a newline.
  """
  lines = ["| " + " | ".join(h for _, h, _ in columns) + " |",
           "|" + "|".join("---" for _ in columns) + "|"]
  for row in rows:
    cells = []
    for key, _, fmt in columns:
      value = _lookup(row, key)
      if _missing(value):
        cell = "n/a"
      elif _is_number(value):
        cell = _format(value, fmt)
        std = _std_of(row, key)
        if _is_number(std) and math.isfinite(std):
          cell += " ± " + _format(std, fmt)
      else:
        cell = str(value)
      cells.append(cell.replace("|", "\\|"))
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def write_markdown(workdir: str | os.PathLike[str], title: str,
                   text: str) -> paths.Path:
  """Writes ``workdir/results.md`` (a title and the body) atomically."""
  workdir = paths.as_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  path = workdir / RESULTS_MD
  _write_text_atomic(path, f"# {title}\n\n{text.rstrip()}\n")
  return path


# ----------------------------------------------------------------------------
# Plots.
# ----------------------------------------------------------------------------


def _save(fig: Figure, out_png: str | os.PathLike[str],
          dpi: int) -> paths.Path:
  path = paths.as_path(out_png)
  path.parent.mkdir(parents=True, exist_ok=True)
  # No bbox_inches="tight": the pixel size stays figsize * dpi, predictable.
  # Rendered in memory, then written whole (matplotlib's own open() would
  # not understand a gs:// URL).
  buf = io.BytesIO()
  fig.savefig(buf, dpi=dpi, format="png")
  paths.write_atomic(path, buf.getvalue(),
                     tmp_name=f".{path.name}.tmp.{os.getpid()}")
  return path


def _grid(n: int, ncols: int) -> tuple[int, int]:
  ncols = max(1, min(ncols, n))
  return -(-n // ncols), ncols


def plot_loss_curves(metrics_jsonl_path: str | os.PathLike[str],
                     out_png: str | os.PathLike[str], *,
                     keys: Iterable[str] | None = None, ncols: int = 3,
                     dpi: int = 100) -> paths.Path:
  """One panel per loss term against step, from a metrics.jsonl.

  Args:
    metrics_jsonl_path: written by ``tml.writers.MetricWriter``.
    out_png: output path; the image is ``(4 * ncols) x (3 * nrows)`` inches.
    keys: the series to plot; default every key containing "loss" (every
      numeric key if none does).
    ncols: panels per row.
    dpi: dots per inch.

  Non-finite values (the "nan"/"inf" strings) are left as gaps; a panel gets a
  log y axis when all its finite values are positive. Where Eq. 4 stopped the
  emotion task (the first logged step at which a ``.../early_stop/stopped``
  series is 1; exact to the log interval) every panel whose steps span it
  (not the stage-1 ones) gets a dashed vertical line.
  """
  series: dict[str, tuple[list[int], list[float]]] = {}
  with paths.as_path(metrics_jsonl_path).open("r", encoding="utf-8") as f:
    for line in f:
      if not line.strip():
        continue
      record = json.loads(line)
      step = record.get("step")
      for key, value in record.items():
        if key in ("step", "time") or isinstance(value, bool):
          continue
        try:
          value = float(value)  # "nan"/"inf" strings included
        except (TypeError, ValueError):
          continue
        xs, ys = series.setdefault(key, ([], []))
        xs.append(step)
        ys.append(value)
  if keys is None:
    keys = [k for k in series if "loss" in k.split("/")[-1]] or list(series)
  keys = [k for k in keys if k in series]
  if not keys:
    raise ValueError(f"no plottable series in {metrics_jsonl_path}")
  stopped_at = None
  for key, (xs, ys) in series.items():
    if key.endswith("early_stop/stopped"):
      hits = [x for x, y in zip(xs, ys) if y >= 0.5 and x is not None]
      if hits and (stopped_at is None or min(hits) < stopped_at):
        stopped_at = min(hits)
  nrows, ncols = _grid(len(keys), ncols)
  fig = Figure(figsize=(4 * ncols, 3 * nrows), layout="constrained")
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  for ax, key in zip(axes, keys):
    steps, values = (np.asarray(v, np.float64) for v in series[key])
    order = np.argsort(steps, kind="stable")
    steps, values = steps[order], values[order]
    if stopped_at is not None and steps.min() <= stopped_at <= steps.max():
      ax.axvline(stopped_at, color="tab:red", ls="--", lw=1,
                 label=f"emotion stopped (step {stopped_at})")
      ax.legend(fontsize=7, loc="upper right")
    finite = np.isfinite(values)
    ax.plot(steps, np.where(finite, values, np.nan), lw=1)
    if finite.any() and (values[finite] > 0).all():
      ax.set_yscale("log")
    ax.set_title(key, fontsize=9)
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
  for ax in axes[len(keys):]:
    ax.set_axis_off()
  return _save(fig, out_png, dpi)


def ced_curve(errors: Any, thresholds: np.ndarray) -> np.ndarray:
  """Fraction of images whose error is <= each threshold (NaN counts as a
  failure)."""
  errors = np.asarray(errors, np.float64).ravel()
  errors = np.where(np.isnan(errors), np.inf, errors)
  return (errors[None, :] <= thresholds[:, None]).mean(axis=1)


def plot_ced(curves: Mapping[str, Any], out_png: str | os.PathLike[str], *,
             max_threshold: float = 0.10, title: str = "",
             xlabel: str = "NME (inter-pupil)",
             dpi: int = 100) -> paths.Path:
  """Cumulative error distribution curves, one per method.

  Args:
    curves: name -> per-image errors as fractions (0.05 = 5 % NME).
    out_png: output path (6 x 4.5 inches).
    max_threshold: right end of the x axis, also the AUC and failure-rate
      threshold shown in the legend (AUC normalised to [0, 1]).
    title: figure title.
    xlabel: says which normaliser the errors use (never mix them).
    dpi: dots per inch.
  """
  thresholds = np.linspace(0.0, max_threshold, 1001)
  fig = Figure(figsize=(6, 4.5), layout="constrained")
  ax = fig.subplots()
  for name, errors in curves.items():
    fraction = ced_curve(errors, thresholds)
    auc = float(np.trapezoid(fraction, thresholds) / max_threshold)
    failure = 1.0 - fraction[-1]
    ax.plot(thresholds * 100, fraction, lw=1.5,
            label=f"{name} (AUC {auc:.3f}, FR {100 * failure:.1f}%)")
  ax.set_xlim(0, max_threshold * 100)
  ax.set_ylim(0, 1)
  ax.set_xlabel(f"{xlabel} (%)")
  ax.set_ylabel("fraction of images")
  ax.grid(True, alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  if title:
    ax.set_title(title)
  return _save(fig, out_png, dpi)


def plot_landmark_grid(images: Any, pred: Any, gt: Any,
                       out_png: str | os.PathLike[str], *, ncols: int = 4,
                       titles: Sequence[str] | None = None,
                       panel_inches: float = 2.5, cmap: str = "gray",
                       dpi: int = 100) -> paths.Path:
  """Images with ground truth (green dots) and predictions (red crosses).

  Args:
    images: ``(n, H, W)``, ``(n, H, W, 1)`` or ``(n, H, W, 3)`` floats; each
      panel is scaled to its own min..max.
    pred: ``(n, 68, 2)`` predicted (x, y) pixels, or None.
    gt: ``(n, 68, 2)`` true (x, y) pixels, or None.
    out_png: output path; the image is ``ncols * panel_inches`` by
      ``nrows * panel_inches`` inches.
    ncols: panels per row (fewer if n is smaller).
    titles: one per image (e.g. "NME 4.2%").
    panel_inches: panel side.
    cmap: colour map for single-channel images.
    dpi: dots per inch.
  """
  images = np.asarray(images, np.float32)
  if images.ndim == 4 and images.shape[-1] == 1:
    images = images[..., 0]
  n = images.shape[0]
  nrows, ncols = _grid(n, ncols)
  fig = Figure(figsize=(ncols * panel_inches, nrows * panel_inches))
  fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.93,
                      wspace=0.04, hspace=0.12)
  axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
  for i, ax in enumerate(axes):
    ax.set_axis_off()
    if i >= n:
      continue
    image = images[i]
    lo, hi = float(np.min(image)), float(np.max(image))
    image = (image - lo) / (hi - lo) if hi > lo else np.zeros_like(image)
    # Default imshow extent puts pixel (r, c)'s centre at (x=c, y=r): the
    # same convention as the landmarks.
    ax.imshow(image, cmap=cmap if image.ndim == 2 else None,
              interpolation="nearest")
    if gt is not None:
      g = np.asarray(gt[i], np.float32)
      ax.scatter(g[:, 0], g[:, 1], s=6, c="lime", marker="o", linewidths=0,
                 label="truth")
    if pred is not None:
      p = np.asarray(pred[i], np.float32)
      ax.scatter(p[:, 0], p[:, 1], s=10, c="red", marker="x",
                 linewidths=0.8, label="prediction")
    ax.set_xlim(-0.5, image.shape[1] - 0.5)
    ax.set_ylim(image.shape[0] - 0.5, -0.5)
    if titles is not None:
      ax.set_title(str(titles[i]), fontsize=8)
  return _save(fig, out_png, dpi)


def plot_per_landmark(values: Any, out_png: str | os.PathLike[str], *,
                      ylabel: str = "NME (%)", title: str = "",
                      dpi: int = 100) -> paths.Path:
  """Bar per landmark (68), coloured by facial part (11 x 3.5 inches)."""
  from tml import landmarks  # pylint: disable=g-import-not-at-top
  values = np.asarray(values, np.float64).ravel()
  colours = np.array(["0.5"] * len(values), dtype=object)
  palette = ["tab:blue", "tab:orange", "tab:orange", "tab:green", "tab:green",
             "tab:red", "tab:red", "tab:purple", "tab:purple"]
  names = ["jaw", "right_brow", "left_brow", "nose_bridge", "nostrils",
           "right_eye", "left_eye", "outer_mouth", "inner_mouth"]
  for name, colour in zip(names, palette):
    for index in landmarks.GROUPS.get(name, ()):
      if index < len(values):
        colours[index] = colour
  fig = Figure(figsize=(11, 3.5), layout="constrained")
  ax = fig.subplots()
  ax.bar(np.arange(len(values)), values, color=list(colours))
  ax.set_xlim(-1, len(values))
  ax.set_xticks(np.arange(0, len(values), 4))
  ax.set_xlabel("landmark (0-based iBUG index)")
  ax.set_ylabel(ylabel)
  ax.grid(True, axis="y", alpha=0.3)
  if title:
    ax.set_title(title)
  return _save(fig, out_png, dpi)


def plot_bar(values: Mapping[str, float], out_png: str | os.PathLike[str],
             title: str = "", *, errors: Mapping[str, float] | None = None,
             ylabel: str = "NME (%)", dpi: int = 100) -> paths.Path:
  """One bar per key (e.g. NME per emotion), with optional error bars.

  The figure is ``max(4, 0.8 * len(values) + 1)`` x 3.5 inches.
  """
  names = list(values)
  heights = [float(values[k]) if not _missing(values[k]) else np.nan
             for k in names]
  yerr = None
  if errors is not None:
    yerr = [float(errors[k]) if k in errors and not _missing(errors[k])
            else 0.0 for k in names]
  fig = Figure(figsize=(max(4.0, 0.8 * len(names) + 1), 3.5),
               layout="constrained")
  ax = fig.subplots()
  x = np.arange(len(names))
  ax.bar(x, heights, yerr=yerr, capsize=3 if yerr else 0, color="tab:blue")
  ax.set_xticks(x, names, rotation=30, ha="right")
  ax.margins(y=0.12)  # room for the value labels
  ax.set_ylabel(ylabel)
  ax.grid(True, axis="y", alpha=0.3)
  for i, (xi, h) in enumerate(zip(x, heights)):
    if np.isfinite(h):
      top = h + (yerr[i] if yerr else 0.0)  # above the error bar
      ax.annotate(f"{h:.2f}", (xi, top), ha="center", va="bottom",
                  fontsize=7, xytext=(0, 2), textcoords="offset points")
  if title:
    ax.set_title(title)
  return _save(fig, out_png, dpi)
