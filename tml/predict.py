"""Inference for users: a trained run on their own images, folders and arrays.

Python::

  p = Predictor.from_workdir("runs/chu")            # or an exported .npz
  out = p.predict(images, boxes=None)               # list of dicts, one per image

CLI::

  python -m tml.predict --workdir=RUN INPUT... [--out=DIR] [--no_detect]
      [--boxes=BOXES.json|csv] [--split=split_0] [--export=FILE.npz]
      [--export_torch=FILE.pt] [--vis] [--csv] [--t_window=MIN,MAX]

With ``--out``: ``OUT/predictions.jsonl``, ``OUT/maps/`` (DeVries map-head
models: three PNGs per face, named in the record), ``OUT/vis/`` (``--vis``:
one overlay per face and ``contact_sheet.png``, the first 64 overlays with
their file names), ``OUT/predictions.csv`` (``--csv``).

What travels with a run (nothing of the dataset is needed, except see below):

* thermal (Chu U-Net, basic CNN): the frame becomes grey g in [0, 1] the way
  the builders store it (`data_prep.thermal_common.to_unit_grey`: uint8 / 255,
  uint16 / 65535, float = degrees C through the RUN's temperature window,
  `temperature_window`: the ``t_min``, ``t_max`` of the TFDS builder config
  the run trained on, ``--dataset`` / ``--dataset_config`` of config.json;
  20-40 C for every config today; an export stores the window it was made
  with); the face box is the
  landmark-free thermal box (`tml.facebox.find_face_box`, the one the test
  crops use), a user box, or the whole image (``detect=False``); the box is
  resampled to N x N (`thermal_common.crop_and_resize`) and the predicted
  points are mapped back with `thermal_common.crop_to_frame`.
* expression (DeVries): grey, face box from dlib's HOG detector (the
  ``labels`` extra) / user box / whole image, resampled to 48 x 48, Tang's
  per-image norm (`tml.preprocess.per_image_normalise`) and the TRAINING set's
  per-pixel statistics. Those statistics are read from
  ``<workdir>/<split>/pixel_stats.npz`` (`save_pixel_stats`); where a run has
  none (runs trained before training wrote it), they are recomputed from the
  dataset named in config.json (`fit_split_pixel_stats`, exactly what
  `tml.train._prepare_arrays` fits), and a clear `WorkdirError` is raised if
  that dataset is not available either. With the map head the record also
  holds the three predicted maps (`tml.targets.LABEL_MAP_NAMES`: image-left
  brow, image-right brow, mouth), sigmoid probabilities ``(42, 42, 3)`` on
  the centre 42 x 42 crop of the 48 x 48 face, and ``maps_box``, the part
  of the original image they cover (the CLI writes them as PNGs).

The network itself runs through `tml.train_step.make_eval_step`, the very
step the training run evaluated with, over a mesh of all local devices; the
batch is padded (weight 0) to a fixed size, so it compiles once.

Coordinates: (x, y) pixel centres, 0-based, in the ORIGINAL image; boxes are
``(x0, y0, x1, y1)`` in edge coordinates (pixel i covers [i, i + 1]), the
convention of `data_prep.thermal_common`.
"""
from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import pathlib
import sys
from typing import Any, Sequence

import numpy as np

from tml import paths

log = logging.getLogger("tml.predict")

PIXEL_STATS = "pixel_stats.npz"
EXPORT_FORMAT = "tml-export-1"
RUN_WINDOW = "run"   # Predictor.t_window: resolve from the run's dataset config


class WorkdirError(RuntimeError):
  """A run directory (or export) that cannot be used; names what is missing."""


class InputError(ValueError):
  """One input that cannot be processed; ``reason`` is a short category."""

  def __init__(self, message: str, reason: str = "failed"):
    super().__init__(message)
    self.reason = reason


# =============================================================================
# Per-pixel statistics of a training set (DeVries / Tang stage 2)
# =============================================================================
def fit_split_pixel_stats(split):
  """The per-pixel stats `tml.train._prepare_arrays` fits for ``split``.

  Args:
    split: a `tml.protocol.SplitData` of an expression dataset (raw images).

  Returns:
    `tml.preprocess.PixelStats` of ``(48, 48, 1)`` float32 arrays.
  """
  from tml import preprocess
  images = preprocess.per_image_normalise(split.train["image"][split.train_idx])
  return preprocess.fit_pixel_stats(images)


def save_pixel_stats(split_dir, stats) -> paths.Path:
  """Writes ``split_dir/pixel_stats.npz`` (mean, std) atomically (a local
  folder or a ``gs://`` URL)."""
  split_dir = paths.as_path(split_dir)
  split_dir.mkdir(parents=True, exist_ok=True)
  buf = io.BytesIO()
  np.savez(buf, mean=np.asarray(stats.mean, np.float32),
           std=np.asarray(stats.std, np.float32))
  return paths.write_atomic(split_dir / PIXEL_STATS, buf.getvalue())


def load_pixel_stats(split_dir):
  """`PixelStats` from ``split_dir/pixel_stats.npz``, or None if absent."""
  from tml import preprocess
  path = paths.as_path(split_dir) / PIXEL_STATS
  if not path.is_file():
    return None
  with np.load(io.BytesIO(path.read_bytes())) as z:
    return preprocess.PixelStats(z["mean"].astype(np.float32),
                                 z["std"].astype(np.float32))


def _recompute_pixel_stats(cfg, split_name: str):
  """Recomputes a split's stats from the dataset of config.json."""
  from tml import protocol
  try:
    data = protocol.load(cfg)
  except Exception as err:  # pylint: disable=broad-except
    raise WorkdirError(
        f"the run has no {split_name}/{PIXEL_STATS} (the training set's "
        f"per-pixel statistics of Tang's normalisation) and its dataset "
        f"{cfg.dataset!r} (data_dir {cfg.data_dir}) could not be loaded to "
        f"recompute them: {type(err).__name__}: {err}") from err
  for split in protocol.splits(cfg, data):
    if split.name == split_name:
      return fit_split_pixel_stats(split)
  raise WorkdirError(f"split {split_name!r} is not a split of {cfg.dataset} "
                     f"under this config")


# =============================================================================
# The temperature window of a run
# =============================================================================
def temperature_window(cfg) -> tuple[float, float] | None:
  """``(t_min, t_max)`` degrees C the run's dataset mapped onto grey [0, 1].

  Read from the TFDS builder config the run trained on (``cfg.dataset``,
  ``cfg.dataset_config`` or the builder's default config): the window its
  ``.npy`` / rendered temperatures were stored with
  (`data_prep.thermal_common.to_unit_grey`). Only the builder's code is
  imported; no data is read. None for a run whose dataset stores no
  temperatures (expression datasets, ``fer2013_faces``).

  Raises:
    WorkdirError: the dataset's builder cannot be imported, or
      ``dataset_config`` names no config of it.
  """
  import importlib
  from tml import input_pipeline
  info = input_pipeline.dataset_info(cfg.dataset)
  if info.kind != "thermal":
    return None
  try:
    importlib.import_module(info.module)
    import tensorflow_datasets as tfds
    cls = tfds.builder_cls(info.tfds_name)
  except Exception as err:  # pylint: disable=broad-except
    raise WorkdirError(f"the temperature window of dataset {cfg.dataset!r}: "
                       f"its builder {info.module} cannot be imported: "
                       f"{type(err).__name__}: {err}") from err
  configs = dict(getattr(cls, "builder_configs", {}) or {})
  name = (cfg.dataset_config or getattr(cls, "DEFAULT_CONFIG_NAME", None)
          or next(iter(configs), None))
  if name not in configs:
    raise WorkdirError(f"--dataset_config={name!r} of config.json is not a "
                       f"config of {cfg.dataset} (known: {sorted(configs)})")
  bc = configs[name]
  if not (hasattr(bc, "t_min") and hasattr(bc, "t_max")):
    return None
  return float(bc.t_min), float(bc.t_max)


# =============================================================================
# Loading a run
# =============================================================================
def _config_from_dict(d: dict[str, Any]):
  from tml import config as config_lib
  fields = {f.name: f for f in dataclasses.fields(config_lib.Config)}
  kw = {}
  for k, v in d.items():
    if k in fields:
      kw[k] = tuple(v) if isinstance(v, list) else v
  return config_lib.Config(**kw)


def _dataset_stub(cfg):
  """A `protocol.Dataset` with no arrays: what build_model/build_task read."""
  from tml import input_pipeline, protocol
  info = input_pipeline.dataset_info(cfg.dataset)
  return protocol.Dataset(cfg.dataset, info.kind, tuple(info.class_names), {})


def _last_stage(cfg) -> str:
  return "stage2" if cfg.stage2_epochs > 0 else "stage1"


def _step_dirs(ckpt_dir: paths.Path) -> list[paths.Path]:
  """Complete orbax step directories (tmp directories of a save are skipped)."""
  if not ckpt_dir.is_dir():
    return []
  return sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.isdigit()),
                key=lambda p: int(p.name))


def _restore_params(step_dir: paths.Path):
  """The ``params`` subtree of a checkpoint's ``state`` item, no template."""
  import orbax.checkpoint as ocp
  state_dir = step_dir / "state"
  if not state_dir.is_dir():
    raise WorkdirError(f"{step_dir}: no 'state' item (half-written checkpoint?)")
  with ocp.StandardCheckpointer() as ckptr:
    # A URL stays a URL (epath's absolute() would glue it to the cwd).
    restored = ckptr.restore(state_dir if paths.is_url(state_dir)
                             else state_dir.absolute())
  if not isinstance(restored, dict) or "params" not in restored:
    raise WorkdirError(f"{state_dir}: no 'params' in the checkpoint")
  import jax
  return jax.tree.map(np.asarray, restored["params"])


def _find_params(workdir: paths.Path, cfg, split: str | None):
  """``(split_name, params, source)``; WorkdirError naming what is missing."""
  stage = _last_stage(cfg)
  if split is None:
    candidates = sorted(p.parent.name for p in workdir.glob(f"*/{stage}")
                        if p.is_dir())
    if not candidates:
      raise WorkdirError(
          f"{workdir}: no trained split: no {workdir}/<split>/{stage}/ "
          f"directory (the run's last stage is {stage}); has it trained yet?")
    split = candidates[0]
  stage_dir = workdir / split / stage
  if not stage_dir.is_dir():
    if (workdir / split).is_dir():
      raise WorkdirError(f"{stage_dir}: missing: {split} has not reached the "
                         f"run's last stage ({stage}) yet")
    have = sorted(p.parent.name for p in workdir.glob(f"*/{stage}") if p.is_dir())
    raise WorkdirError(f"{stage_dir}: missing (trained splits here: "
                       f"{have or 'none'})")
  steps = _step_dirs(stage_dir / "checkpoints")
  if steps and not _stage_done(steps[-1]):
    log.warning("%s: the stage has not finished training (its latest "
                "checkpoint, step %s, is not marked done); using it anyway",
                stage_dir, steps[-1].name)
  best = _step_dirs(stage_dir / "best")
  if best:
    return split, _restore_params(best[-1]), str(best[-1])
  if not steps:
    raise WorkdirError(
        f"{stage_dir}: no complete checkpoint in best/ or checkpoints/ "
        f"(a run killed before its first save of {stage}?)")
  return split, _restore_params(steps[-1]), str(steps[-1])


def _stage_done(step_dir: paths.Path) -> bool:
  """Whether a training checkpoint's meta says its stage finished."""
  for f in sorted((step_dir / "meta").glob("process_0-of-*.json")):
    try:
      return bool(json.loads(f.read_text()).get("done"))
    except ValueError:
      return False
  return False


def _check_params(model, task, params):
  """Raises WorkdirError unless ``params`` fit the model the config builds."""
  import jax
  from tml import models
  shape = (1, task.input_size, task.input_size, 1)
  template = jax.eval_shape(lambda: models.init_params(model, shape, 0))
  want = jax.tree.map(lambda x: tuple(x.shape), template)
  got = jax.tree.map(lambda x: tuple(np.shape(x)), params)
  if want != got:
    raise WorkdirError("the checkpoint's parameters do not fit the model that "
                       "config.json builds (config edited after training?)")


# =============================================================================
# The predictor
# =============================================================================
@dataclasses.dataclass
class Predictor:
  """A trained model plus the preprocessing of its run.

  Build with `from_workdir` (a training run directory) or `from_export`
  (the ``.npz`` of `export`). ``predict`` is the one entry point.
  """
  cfg: Any
  kind: str                       # "thermal" | "expression"
  class_names: tuple[str, ...]
  params: Any
  split: str
  run_id: str
  source: str
  pixel_stats: Any = None
  batch_size: int = 0             # padded batch; 0 = cfg.eval_batch_size
  # Degrees C mapped onto grey [0, 1] for temperature input: (t_min, t_max);
  # RUN_WINDOW = the run's (`temperature_window`); None = the run's dataset
  # has no temperatures (temperature input is refused).
  t_window: Any = RUN_WINDOW

  def __post_init__(self):
    import jax
    from tml import parallel
    from tml import train
    from tml import train_step as step_lib
    stub = _dataset_stub(self.cfg)
    self._model = train.build_model(self.cfg, stub)
    self._task = train.build_task(self.cfg, stub)
    _check_params(self._model, self._task, self.params)
    if isinstance(self.t_window, str) and self.t_window == RUN_WINDOW:
      self.t_window = temperature_window(self.cfg)
    if self.t_window is not None:
      lo, hi = (float(v) for v in self.t_window)
      if not hi > lo:
        raise ValueError(f"temperature window {self.t_window}: needs t_max > t_min")
      self.t_window = (lo, hi)
    self._mesh = parallel.make_mesh(jax.local_devices())
    n = self._mesh.size
    b = self.batch_size or self.cfg.eval_batch_size
    self.batch_size = max(n, -(-b // n) * n)
    self._eval_step = step_lib.make_eval_step(self._model, self._task, self._mesh)
    self._map_step = (_make_map_step(self._model, self._task, self._mesh)
                      if self.has_maps else None)
    self._device_params = parallel.replicate(self.params, self._mesh)
    self._labeller = None
    if self.kind == "expression" and self.pixel_stats is None:
      raise WorkdirError("an expression model needs the training set's "
                         "per-pixel statistics")

  @property
  def has_maps(self) -> bool:
    """Whether the model has DeVries' landmark-map head."""
    return self.cfg.model == "devries" and bool(self.cfg.map_head)

  # -- construction ----------------------------------------------------------

  @classmethod
  def from_workdir(cls, path, split: str | None = None, **kw) -> Predictor:
    """Loads ``path/config.json`` and the best (else last) params of a split.

    Args:
      path: a training run directory, or an exported ``.npz`` file.
      split: e.g. ``"split_0"``; None = the first split that has trained.

    Raises:
      WorkdirError: one message naming what is missing.
    """
    path = paths.as_path(path)   # a local folder or a gs:// URL
    if path.is_file() and path.suffix == ".npz":
      return cls.from_export(path, **kw)
    if not path.is_dir():
      raise WorkdirError(f"{path}: no such run directory")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
      raise WorkdirError(f"{cfg_file}: missing (not a tml run directory, or "
                         f"the run never started)")
    try:
      cfg = _config_from_dict(json.loads(cfg_file.read_text()))
    except (ValueError, TypeError) as err:
      raise WorkdirError(f"{cfg_file}: unreadable: {err}") from err
    split, params, source = _find_params(path, cfg, split)
    stub = _dataset_stub(cfg)
    stats = None
    if stub.kind == "expression":
      stats = load_pixel_stats(path / split)
      if stats is None:
        log.warning("%s: no %s; recomputing from dataset %s", path / split,
                    PIXEL_STATS, cfg.dataset)
        stats = _recompute_pixel_stats(cfg, split)
    return cls(cfg=cfg, kind=stub.kind, class_names=stub.class_names,
               params=params, split=split, run_id=_run_id(path), source=source,
               pixel_stats=stats, **kw)

  @classmethod
  def from_export(cls, path, **kw) -> Predictor:
    """Loads an `export` file (no orbax, no dataset)."""
    from tml import preprocess
    path = paths.as_path(path)
    try:
      z = np.load(io.BytesIO(path.read_bytes()) if paths.is_url(path) else path,
                  allow_pickle=False)
    except (OSError, ValueError) as err:
      raise WorkdirError(f"{path}: not a readable export: {err}") from err
    with z:
      if "__meta__" not in z.files:
        raise WorkdirError(f"{path}: no __meta__ entry; not a tml export")
      meta = json.loads(str(z["__meta__"]))
      if meta.get("format") != EXPORT_FORMAT:
        raise WorkdirError(f"{path}: format {meta.get('format')!r}, expected "
                           f"{EXPORT_FORMAT!r}")
      flat = {k[len("params/"):]: z[k] for k in z.files if k.startswith("params/")}
      stats = (preprocess.PixelStats(z["pixel_stats/mean"], z["pixel_stats/std"])
               if "pixel_stats/mean" in z.files else None)
    cfg = _config_from_dict(meta["config"])
    if "t_window" in meta:   # exports made before it carried one: the run's
      kw.setdefault("t_window", meta["t_window"] and tuple(meta["t_window"]))
    return cls(cfg=cfg, kind=meta["kind"], class_names=tuple(meta["class_names"]),
               params=_unflatten(flat), split=meta["split"], run_id=meta["run_id"],
               source=str(path), pixel_stats=stats, **kw)

  def export(self, path) -> pathlib.Path:
    """Params + config (+ pixel stats) as one ``.npz`` that `from_export` reads."""
    path = pathlib.Path(path)
    from tml import writers
    meta = {"format": EXPORT_FORMAT, "config": writers.config_to_dict(self.cfg),
            "kind": self.kind, "class_names": list(self.class_names),
            "split": self.split, "run_id": self.run_id, "source": self.source,
            "t_window": list(self.t_window) if self.t_window else None}
    arrays = {f"params/{k}": v for k, v in _flatten(self.params).items()}
    if self.pixel_stats is not None:
      arrays["pixel_stats/mean"] = np.asarray(self.pixel_stats.mean)
      arrays["pixel_stats/std"] = np.asarray(self.pixel_stats.std)
    arrays["__meta__"] = np.asarray(json.dumps(meta, sort_keys=True))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
      np.savez(f, **arrays)
    os.replace(tmp, path)
    return path

  # -- preprocessing ---------------------------------------------------------

  @property
  def input_size(self) -> int:
    """Side of the square the face box is resampled to (N, or 48)."""
    return 48 if self.kind == "expression" else int(self.cfg.image_size)

  def to_grey(self, image: np.ndarray, *, temperature: bool = False) -> np.ndarray:
    """``(H, W)`` float32 grey. uint8 / 255, uint16 / 65535; float images are
    grey in [0, 1] already, or degrees C with ``temperature=True`` (through
    ``t_window``, the run's window); RGB(A) is reduced with ITU-R 601 luma.

    Raises:
      InputError: wrong dtype or shape, non-finite values, constant image.
    """
    a = np.asarray(image)
    if a.ndim == 3 and a.shape[-1] in (3, 4):
      rgb = a[..., :3]
      if not (np.issubdtype(rgb.dtype, np.integer) or np.issubdtype(rgb.dtype, np.floating)):
        raise InputError(f"unsupported dtype {a.dtype}", "bad_dtype")
      scale = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}.get(rgb.dtype, 1.0)
      a = (rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / scale
           ).astype(np.float32)
    if a.ndim == 3 and a.shape[-1] == 1:
      a = a[..., 0]
    if a.ndim != 2 or min(a.shape) < 2:
      raise InputError(f"expected an (H, W), (H, W, 1) or (H, W, 3) image, got "
                       f"shape {a.shape}", "bad_shape")
    if a.dtype == np.uint8:
      g = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
      g = a.astype(np.float32) / 65535.0
    elif np.issubdtype(a.dtype, np.floating):
      if not np.all(np.isfinite(a)):
        raise InputError(f"{int(np.sum(~np.isfinite(a)))} non-finite values",
                         "bad_values")
      if temperature:
        if self.t_window is None:
          raise InputError(
              f"temperatures (a float .npy / TIFF) for a model whose dataset "
              f"({self.cfg.dataset}) stores no temperatures: pass 8/16-bit "
              f"images, or grey in [0, 1] through the API", "bad_values")
        lo, hi = self.t_window
        g = np.clip((a.astype(np.float64) - lo) / (hi - lo),
                    0.0, 1.0).astype(np.float32)
      elif self.kind == "thermal" and (a.min() < -1e-3 or a.max() > 1 + 1e-3):
        raise InputError(
            f"float pixels in [{a.min():.3g}, {a.max():.3g}], outside grey "
            f"[0, 1]; temperatures in degrees C need temperature=True (a "
            f".npy file of floats is read as temperatures)", "bad_values")
      else:
        g = a.astype(np.float32)
    else:
      raise InputError(f"unsupported dtype {a.dtype} (uint8, uint16 or float)",
                       "bad_dtype")
    if g.max() == g.min():
      raise InputError("constant image (every pixel the same)", "constant")
    return g

  def find_box(self, grey: np.ndarray) -> tuple[float, float, float, float]:
    """The face box of a grey frame (edge coordinates); InputError 'no_face'."""
    if self.kind == "thermal":
      from tml import facebox
      try:
        return facebox.find_face_box(grey)
      except facebox.FaceBoxError as err:
        raise InputError(f"no face: {err}", "no_face") from err
    if self._labeller is None:
      try:
        from data_prep.label68 import detector
        self._labeller = detector.Labeller()
      except Exception as err:  # pylint: disable=broad-except
        raise InputError(f"no face detector (dlib, the 'labels' extra): {err}; "
                         f"pass boxes or use --no_detect", "no_detector") from err
    u8 = np.round(np.clip(grey, 0, 1) * 255).astype(np.uint8)
    boxes, scores, _ = self._labeller.detect(u8)
    if not boxes:
      raise InputError("no face found by the detector", "no_face")
    return tuple(float(v) for v in boxes[int(np.argmax(scores))])

  def crop(self, grey: np.ndarray, box) -> np.ndarray:
    """``box`` of ``grey`` resampled to ``(S, S)``; a whole S x S image is
    used as is."""
    from data_prep import thermal_common
    s = self.input_size
    h, w = grey.shape
    if tuple(float(v) for v in box) == (0.0, 0.0, float(w), float(h)) and h == w == s:
      return grey.astype(np.float32)
    x0, y0, x1, y1 = (float(v) for v in box)
    if not (x1 > x0 and y1 > y0):
      raise InputError(f"box {tuple(box)} has no area", "bad_box")
    return thermal_common.crop_and_resize(grey, box, s)

  # -- inference -------------------------------------------------------------

  def predict(self, images: Sequence[np.ndarray] | np.ndarray, boxes=None, *,
              detect: bool = True, temperature: bool = False
              ) -> list[dict[str, Any]]:
    """Runs the model on a list (or ``(B, H, W[, C])`` array) of images.

    Args:
      images: frames of any size; see `to_grey` for dtypes.
      boxes: None, or one ``(x0, y0, x1, y1)`` (edge coordinates) or None per
        image. Where no box is given: the face box (``detect``) or the whole
        image (``detect=False``).
      detect: find the face box when none is given.
      temperature: float images are degrees C (thermal window), not grey.

    Returns:
      One dict per image: ``box`` (the box used, edge coordinates),
      ``landmarks`` ``(68, 2)`` (x, y) original-image pixel centres (landmark
      models), ``emotion`` (label) and ``emotion_probs`` ``{name: p}`` (models
      with an emotion head), ``maps`` ``(42, 42, 3)`` probabilities and
      ``maps_box`` (DeVries with the map head, see `_record`), ``t_window``
      (temperature input: the window used); or ``error`` and ``reason`` for
      an image that could not be processed.

    Expression models standardise by the batch (DeVries' last step, as the
    eval step does), so their probabilities depend a little on which images
    share a batch of ``batch_size``; thermal models are per image.
    """
    n = len(images)
    if boxes is None:
      boxes = [None] * n
    if len(boxes) != n:
      raise ValueError(f"{len(boxes)} boxes for {n} images")
    results: list[dict[str, Any]] = [{} for _ in range(n)]
    crops, where, used = [], [], []
    for i, (image, box) in enumerate(zip(images, boxes)):
      try:
        grey = self.to_grey(image, temperature=temperature)
        if box is None:
          box = (self.find_box(grey) if detect
                 else (0.0, 0.0, float(grey.shape[1]), float(grey.shape[0])))
        box = tuple(float(v) for v in box)
        crops.append(self.crop(grey, box))
        where.append(i)
        used.append(box)
      except InputError as err:
        results[i] = {"error": str(err), "reason": err.reason}
    if crops:
      preds = self.predict_crops(np.stack(crops))
      for j, (i, box) in enumerate(zip(where, used)):
        results[i] = self._record(preds, j, box)
        if temperature:
          results[i]["t_window"] = list(self.t_window)
    return results

  def prepare_crops(self, crops: np.ndarray) -> np.ndarray:
    """Grey crops ``(B, S, S[, 1])`` -> what the eval step is fed, ``(B, S, S, 1)``.

    Thermal: unchanged. Expression: Tang's per-image norm and the training
    set's per-pixel statistics (the eval step then centre-crops to 42 x 42,
    or takes the ten crops, and standardises by the batch).
    """
    from tml import preprocess
    x = np.asarray(crops, np.float32)
    if x.ndim == 3:
      x = x[..., None]
    if self.kind == "expression":
      x = preprocess.apply_pixel_stats(preprocess.per_image_normalise(x),
                                       self.pixel_stats)
    return x

  def predict_crops(self, crops: np.ndarray) -> dict[str, np.ndarray]:
    """The eval step on network-size crops ``(B, S, S)`` grey (or ``(B, S, S, 1)``).

    Returns the eval step's outputs: ``landmarks`` ``(B, 68, 2)`` in the crop
    frame, ``emotion_probs`` ``(B, C)``; with the map head ``maps``
    ``(B, c, c, 3)`` sigmoid probabilities on the centre c x c crop (c =
    ``cfg.crop_size``), from the same forward pass as the probabilities
    unless the run tests on ten crops (then the maps are the centre crop's).
    """
    from tml import parallel
    x = self.prepare_crops(crops)
    out: dict[str, list] = {}
    b = self.batch_size
    for start in range(0, len(x), b):
      chunk = x[start:start + b]
      m = len(chunk)
      pad = np.zeros((b - m,) + chunk.shape[1:], np.float32)
      batch = {"image": np.concatenate([chunk, pad]),
               "landmarks": np.zeros((b, 68, 2), np.float32),
               "weight": np.concatenate([np.ones(m, np.float32),
                                         np.zeros(b - m, np.float32)])}
      batch = parallel.global_batch(batch, self._mesh)
      if self._map_step is not None:
        res = self._map_step(self._device_params, batch)
        if self._task.ten_crop or "emotion_probs" not in res:
          res = {"maps": res["maps"],
                 **self._eval_step(self._device_params, batch)}
      else:
        res = self._eval_step(self._device_params, batch)
      res = parallel.to_host(res)
      for k, v in res.items():
        out.setdefault(k, []).append(np.asarray(v)[:m])
    return {k: np.concatenate(v) for k, v in out.items()}

  def maps_box(self, box) -> list[float]:
    """The part of the original image (edge coordinates) the predicted maps
    cover: the centre c x c crop of the S x S face crop of ``box``."""
    from tml import augment
    s, c = self.input_size, int(self.cfg.crop_size)
    oy, ox = augment.crop_offsets((s, s), (c, c))[4]
    x0, y0, x1, y1 = (float(v) for v in box)
    sx, sy = (x1 - x0) / s, (y1 - y0) / s
    return [x0 + ox * sx, y0 + oy * sy, x0 + (ox + c) * sx, y0 + (oy + c) * sy]

  def _record(self, preds, j, box) -> dict[str, Any]:
    from data_prep import thermal_common
    rec: dict[str, Any] = {"box": [float(v) for v in box]}
    if "maps" in preds:
      rec["maps"] = np.asarray(preds["maps"][j], np.float32)
      rec["maps_box"] = self.maps_box(box)
    if "landmarks" in preds:
      rec["landmarks"] = thermal_common.crop_to_frame(
          preds["landmarks"][j], box, self.input_size).astype(np.float32)
    if "emotion_probs" in preds:
      p = preds["emotion_probs"][j]
      rec["emotion"] = self.class_names[int(np.argmax(p))]
      rec["emotion_probs"] = {c: float(v) for c, v in zip(self.class_names, p)}
    return rec


def _make_map_step(model, task, mesh):
  """``step(params, batch) -> {maps, emotion_probs}`` of a map-head model.

  The eval step's centre-crop path (`train_step.prepare_inputs`: centre
  crop, batch standardisation over the real rows) plus the map head's
  sigmoid; jitted over the mesh like `train_step.make_eval_step`.
  """
  import jax
  from jax.sharding import PartitionSpec as P
  from tml import parallel
  from tml import train_step as step_lib

  def device_predict(params, batch):
    images, _ = step_lib.prepare_inputs(task, None, batch, train=False,
                                        axis_name=parallel.AXIS)
    out = model.apply({"params": params}, images, train=False)
    preds = {"maps": jax.nn.sigmoid(out["maps"].astype(np.float32))}
    if "emotion_logits" in out:
      preds["emotion_probs"] = jax.nn.softmax(
          out["emotion_logits"].astype(np.float32))
    return preds

  return jax.jit(parallel.map_over_devices(
      device_predict, mesh, in_specs=(P(), P(parallel.AXIS)),
      out_specs=P(parallel.AXIS)))


def _run_id(workdir: paths.Path) -> str:
  info = workdir / "run_info.json"
  sha = None
  if info.is_file():
    try:
      sha = json.loads(info.read_text()).get("config_sha256")
    except ValueError:
      pass
  return f"{workdir.name}@{sha[:12]}" if sha else workdir.name


def _flatten(tree, prefix="") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    key = f"{prefix}{k}"
    if isinstance(v, dict) or hasattr(v, "items"):
      out.update(_flatten(v, key + "/"))
    else:
      out[key] = np.asarray(v)
  return out


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for key, v in flat.items():
    node = tree
    *parents, leaf = key.split("/")
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def main(argv: Sequence[str] | None = None) -> int:
  import argparse
  from tml import predict_files as files_lib
  ap = argparse.ArgumentParser(prog="python -m tml.predict", description=(
      "Landmarks / emotions of a trained tml run on images (PNG, JPEG, TIFF; "
      "8/16-bit grey or RGB), .npy temperature arrays (degrees C), folders "
      "(recursive) and globs. Writes JSON Lines."))
  ap.add_argument("--workdir", required=True,
                  help="the training run directory (or an exported .npz)")
  ap.add_argument("inputs", nargs="*", metavar="INPUT")
  ap.add_argument("--out", default=None,
                  help="output folder (predictions.jsonl); default: stdout")
  ap.add_argument("--split", default=None, help="e.g. split_0 (default: first)")
  ap.add_argument("--no_detect", action="store_true",
                  help="use the whole image as the face box")
  ap.add_argument("--boxes", default=None,
                  help="face boxes per file: JSON {file: [x0,y0,x1,y1]} or "
                       "CSV file,x0,y0,x1,y1 (original-image edge coordinates)")
  ap.add_argument("--export_torch", default=None,
                  help="also write the PyTorch twin's state_dict to this file "
                       "(needs the torch extra)")
  ap.add_argument("--vis", action="store_true",
                  help="also write overlay PNGs (points, box, label) to OUT/vis "
                       "and one contact sheet of the first "
                       f"{files_lib.CONTACT_SHEET_MAX} (OUT/vis/"
                       f"{files_lib.CONTACT_SHEET_NAME})")
  ap.add_argument("--csv", action="store_true",
                  help="also write OUT/predictions.csv")
  ap.add_argument("--batch_size", type=int, default=0)
  ap.add_argument("--export", default=None,
                  help="also write params + config to this .npz")
  ap.add_argument("--t_window", default=None, metavar="MIN,MAX",
                  help="degrees C mapped onto grey [0, 1] for temperature "
                       "input (.npy, float TIFF); default: the run's window "
                       "(its dataset config's t_min, t_max)")
  args = ap.parse_args(argv)
  kw = {}
  if args.t_window:
    try:
      lo, hi = (float(v) for v in args.t_window.split(","))
      if not hi > lo:
        raise ValueError("needs MIN < MAX")
    except ValueError as err:
      print(f"error: --t_window={args.t_window!r}: expected MIN,MAX degrees C "
            f"with MIN < MAX ({err})", file=sys.stderr)
      return 2
    kw["t_window"] = (lo, hi)
  try:
    predictor = Predictor.from_workdir(args.workdir, split=args.split,
                                       batch_size=args.batch_size, **kw)
  except WorkdirError as err:
    print(f"error: {err}", file=sys.stderr)
    return 2
  if args.export:
    print(f"exported {predictor.export(args.export)}", file=sys.stderr)
  if args.export_torch:
    from tml import export as export_lib
    print(f"exported {export_lib.export_torch(predictor, args.export_torch)}",
          file=sys.stderr)
  if (args.export or args.export_torch) and not args.inputs:
    return 0
  if not args.inputs:
    print("error: no INPUT given", file=sys.stderr)
    return 2
  if (args.vis or args.csv) and not args.out:
    print("error: --vis and --csv need --out", file=sys.stderr)
    return 2
  files = files_lib.expand_inputs(args.inputs)
  try:
    boxes = files_lib.read_boxes(args.boxes) if args.boxes else None
  except (OSError, ValueError) as err:
    print(f"error: --boxes: {err}", file=sys.stderr)
    return 2
  out_dir = None
  if args.out:
    out_dir = pathlib.Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stream = open(out_dir / "predictions.jsonl", "w")
  else:
    stream = sys.stdout
    if predictor.has_maps:
      print("note: the predicted maps are written only with --out",
            file=sys.stderr)
  try:
    summary = files_lib.run_files(
        predictor, files, stream, detect=not args.no_detect, boxes=boxes,
        vis_dir=out_dir / "vis" if args.vis else None,
        maps_dir=out_dir / "maps" if args.out else None,
        progress=args.out is not None)
  finally:
    if stream is not sys.stdout:
      stream.close()
  if args.csv:
    files_lib.jsonl_to_csv(out_dir / "predictions.jsonl", out_dir / "predictions.csv",
                 predictor.class_names)
  print(f"summary: {len(files)} files: {summary['processed']} processed, "
        f"{summary['no_face']} no face, {summary['failed']} failed "
        f"(run {predictor.run_id}, {predictor.split})", file=sys.stderr)
  if summary.get("contact_sheet"):
    print(f"contact sheet: {summary['contact_sheet']}", file=sys.stderr)
  return 0 if summary["processed"] > 0 else 1


if __name__ == "__main__":
  logging.basicConfig(level=logging.WARNING)
  # Through the imported module, so tml.predict_files and this CLI share one
  # set of classes (InputError, Predictor) rather than a __main__ copy.
  from tml import predict as _self
  sys.exit(_self.main())
