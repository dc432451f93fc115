r"""Labels FER2013 (or TFD) with 68 dlib landmarks: ``.npz`` + JSON sidecar.

  python -m data_prep.label68 \
      --fer2013=/path/to/fer2013_images.zip \
      --out=/path/to/fer2013_landmarks.npz [--workers=2]

``--fer2013`` takes any form the FER2013 builder reads (the csv, the zip,
the image folder); ``--tfd`` takes ``TFD_48x48.mat``. Ids match the
builders', so the output plugs into their ``landmarks`` config. The output
is written only when the run is complete (temporary files, then rename).
Needs the ``labels`` extra: ``pip install -e .[labels]``.
"""
from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import sys

from absl import app
from absl import flags
from absl import logging

from data_prep.expression_common import BadInputPolicy
from data_prep.label68 import detector as detector_lib
from data_prep.label68 import io as label_io
from data_prep.label68 import run as run_lib

_FER2013 = flags.DEFINE_string(
    "fer2013", None, "FER2013 source: fer2013.csv[.gz], fer2013_images.zip or "
    "the image folder.")
_TFD = flags.DEFINE_string("tfd", None, "TFD_48x48.mat (MATLAB v5).")
_OUT = flags.DEFINE_string("out", None, "Output .npz (JSON sidecar next to "
                           "it).")
_WORKERS = flags.DEFINE_integer("workers", 1, "Worker processes.")
_UPSAMPLE = flags.DEFINE_integer("upsample", 4, "Resize factor before "
                                 "detection and prediction.")
_RESAMPLE = flags.DEFINE_enum("resample", "bicubic",
                              ["bicubic", "bilinear", "lanczos", "nearest"],
                              "Resize filter.")
_PAD = flags.DEFINE_float("pad_fraction", 0.125, "Edge padding per side, as a"
                          " fraction of the upsampled size.")
_LEVELS = flags.DEFINE_list("detector_levels", ["0", "1"], "dlib pyramid "
                            "upsampling levels, tried in order.")
_FALLBACK = flags.DEFINE_bool(
    "fallback_whole_image", False, "If no face is detected, predict in the "
    "whole-image box (found=True, source=2) instead of leaving it unlabelled.")
_LIMIT = flags.DEFINE_integer("limit", 0, "Label only the first N images "
                              "(0 = all); for trials.")
_SKIP_BAD = flags.DEFINE_bool("skip_bad", False, "Skip and count unreadable "
                              "records instead of failing.")
_LOG_EVERY = flags.DEFINE_integer("log_every", 2000, "Progress line period.")


def _items(policy):
  """(id, split, image) from the chosen source, and the total if known."""
  if bool(_FER2013.value) == bool(_TFD.value):
    raise app.UsageError("give exactly one of --fer2013 and --tfd")
  if _FER2013.value:
    from data_prep.fer2013 import reader  # pylint: disable=g-import-not-at-top
    source = _FER2013.value
    total = (len(reader.list_tree(source)) if not source.endswith(
        (".csv", ".csv.gz")) else None)
    records = ((r.id, r.split, r.image)
               for r in reader.read(source, policy=policy))
  else:
    from data_prep.tfd import reader  # pylint: disable=g-import-not-at-top
    source = _TFD.value
    data = reader.load_mat(source)
    total = len(data.images)
    records = ((r.id, r.split, r.image)
               for r in reader.records(data, policy=policy))
  if _LIMIT.value:
    total = min(total or _LIMIT.value, _LIMIT.value)
    records = (r for i, r in zip(range(_LIMIT.value), records))
  return source, records, total


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}")
  if not _OUT.value or not _OUT.value.endswith(".npz"):
    raise app.UsageError("--out must name a .npz file")
  settings = detector_lib.LabellerSettings(
      upsample=_UPSAMPLE.value, resample=_RESAMPLE.value,
      pad_fraction=_PAD.value,
      detector_levels=tuple(int(v) for v in _LEVELS.value),
      fallback_whole_image=_FALLBACK.value)
  # Fail now, not after the first chunk, if dlib or the model is missing.
  predictor_path = detector_lib.Labeller(settings).predictor_path
  dlib_version = detector_lib.require_dlib().__version__
  policy = BadInputPolicy(skip_bad=_SKIP_BAD.value, what="labeller input")
  source, items, total = _items(policy)
  started = datetime.datetime.now(datetime.timezone.utc)
  logging.info("labelling %s -> %s with %d worker(s), %s", source,
               _OUT.value, _WORKERS.value, settings)
  result = run_lib.label_images(items, settings, workers=_WORKERS.value,
                                total=total, log_every=_LOG_EVERY.value)
  policy.log_summary()
  metadata = {
      "source": os.path.abspath(source),
      "dataset": "fer2013" if _FER2013.value else "tfd",
      "settings": dataclasses.asdict(settings),
      "predictor": {"path": predictor_path,
                    "bytes": os.path.getsize(predictor_path)},
      "detector": "dlib.get_frontal_face_detector (HOG)",
      "coordinates": "(x, y), 0-based, x = column, pixel centres at "
                     "integers, in the input image frame",
      "num_images": int(len(result.arrays["ids"])),
      "stats": result.stats,
      "skipped_bad_records": policy.num_skipped,
      "seconds": round(result.seconds, 2),
      "images_per_second": round(result.images_per_second, 2),
      "workers": _WORKERS.value,
      "limit": _LIMIT.value,
      "started_utc": started.isoformat(timespec="seconds"),
      "versions": {"dlib": dlib_version, "python": platform.python_version()},
      "host": {"cpus": os.cpu_count(), "machine": platform.machine()},
      "command": " ".join([os.path.basename(sys.executable), "-m",
                           "data_prep.label68"] + sys.argv[1:]),
  }
  label_io.save_landmarks(_OUT.value, result.arrays, metadata)
  overall = result.stats["all"]
  logging.info("wrote %s: %d images, found %.2f %% (detected %.2f %%), "
               "%.1f s, %.1f img/s", _OUT.value, metadata["num_images"],
               100 * overall["found_rate"], 100 * overall["detection_rate"],
               result.seconds, result.images_per_second)
  for group, stats in result.stats["per_group"].items():
    logging.info("  %s: %d images, detection rate %.2f %%", group,
                 stats["images"], 100 * stats["detection_rate"])


if __name__ == "__main__":
  app.run(main)
