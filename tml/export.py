"""Exports of a trained run: the portable ``.npz`` and the PyTorch twin.

* ``.npz`` (`tml.predict.Predictor.export`): the Flax parameters flattened to
  ``params/<module>/.../<leaf>``, the run's config, kind, class names, split,
  run id, and (expression runs) Tang's per-pixel training statistics; read by
  `tml.predict.Predictor.from_export` with numpy only (no orbax, no dataset).
* PyTorch (`torch_model`, `export_torch`): the twin of `tml.torch.twins` with
  the run's weights loaded through `tml.torch.convert.flax_to_torch`, saved as
  ``{"state_dict", "model", "kwargs", "meta"}`` with ``torch.save``. The twin
  takes the same NHWC network-input crops as the Flax model (see
  `Predictor.prepare_crops`) and returns the same output dict; PyTorch is
  the optional ``torch`` extra and is imported only here.
* `torch_predict_crops`: the PyTorch twin of `Predictor.predict_crops` (the
  same numpy preprocessing, then in torch what the eval step does on the
  device: centre crop or ten crops and batch standardisation for DeVries,
  softmax, landmarks to pixels, sigmoid maps), for parity tests and the
  inference benchmark (`experiments.bench_predict`).
"""
from __future__ import annotations

import json
import pathlib
from typing import Any


def twin_kwargs(predictor) -> tuple[str, dict[str, Any]]:
  """``(model name, kwargs)`` of the torch twin; mirrors `tml.train.build_model`."""
  return twin_kwargs_for(predictor.cfg, len(predictor.class_names))


def twin_kwargs_for(cfg, num_classes: int) -> tuple[str, dict[str, Any]]:
  """`twin_kwargs` from a Config and the dataset's number of classes."""
  n = num_classes
  if cfg.model == "chu_unet":
    return "chu_unet", dict(
        input_size=cfg.image_size, depth=cfg.unet_depth, base_width=cfg.unet_width,
        fc_width=cfg.fc_width, num_emotions=n if cfg.emotion_head else 0,
        landmark_head=cfg.landmark_head, map_reduction=cfg.map_reduction)
  if cfg.model == "basic_cnn":
    return "basic_cnn", dict(input_size=cfg.image_size, fc_width=cfg.fc_width)
  if cfg.model == "devries":
    return "devries", dict(num_classes=n, map_head=cfg.map_head,
                           map_size=cfg.crop_size, dropout_rate=cfg.dropout)
  raise ValueError(f"model {cfg.model!r} has no torch twin")


def torch_model(predictor):
  """The torch twin (eval mode) with the predictor's weights loaded."""
  from tml.torch import convert, twins
  name, kwargs = twin_kwargs(predictor)
  model = twins.build_torch_model(name, **kwargs).eval()
  convert.flax_to_torch(predictor.params, model)
  return model


def export_torch(predictor, path) -> pathlib.Path:
  """Writes the twin's ``state_dict`` plus what rebuilds it to ``path``."""
  import torch
  from tml import writers
  name, kwargs = twin_kwargs(predictor)
  model = torch_model(predictor)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  torch.save({"state_dict": model.state_dict(), "model": name, "kwargs": kwargs,
              "meta": json.dumps({"config": writers.config_to_dict(predictor.cfg),
                                  "kind": predictor.kind,
                                  "class_names": list(predictor.class_names),
                                  "split": predictor.split,
                                  "run_id": predictor.run_id})}, path)
  return path


def load_torch(path):
  """The twin saved by `export_torch`, eval mode, and its meta dict."""
  import torch
  from tml.torch import twins
  blob = torch.load(path, map_location="cpu", weights_only=True)
  model = twins.build_torch_model(blob["model"], **blob["kwargs"]).eval()
  model.load_state_dict(blob["state_dict"], strict=True)
  return model, json.loads(blob["meta"])


def torch_predict_crops(model, predictor, crops, *, device=None):
  """`Predictor.predict_crops` with the torch twin ``model`` (eval mode).

  Args:
    model: `torch_model` / `load_torch`'s twin of ``predictor``'s network.
    predictor: the `tml.predict.Predictor` whose preprocessing and batch
      size are used (batch standardisation is per chunk of
      ``predictor.batch_size``, as on the JAX side).
    crops: ``(B, S, S[, 1])`` grey network-size crops.
    device: torch device for the forward pass (default: the model's).

  Returns:
    numpy ``landmarks`` ``(B, 68, 2)`` (crop-frame pixels), ``emotion_probs``
    ``(B, C)``, ``maps`` ``(B, c, c, 3)`` where the model has them.
  """
  import numpy as np
  import torch
  from tml import augment
  if device is None:
    device = next(model.parameters()).device
  x_all = predictor.prepare_crops(crops)
  task = predictor._task  # pylint: disable=protected-access
  out: dict[str, list] = {}
  b = predictor.batch_size
  with torch.no_grad():
    for start in range(0, len(x_all), b):
      x = torch.from_numpy(np.ascontiguousarray(x_all[start:start + b])).to(device)
      res = {}
      if task.kind == "expression":
        c = task.crop_size
        offsets = augment.crop_offsets(tuple(x.shape[1:3]), (c, c))
        oy, ox = offsets[4]
        centre = _standardise(x[:, oy:oy + c, ox:ox + c])
        o = model(centre)
        if "maps" in o:
          res["maps"] = torch.sigmoid(o["maps"])
        if task.ten_crop:
          srcs = (x, torch.flip(x, dims=(2,)))
          patches = torch.stack([s[:, py:py + c, px:px + c] for s in srcs
                                 for (py, px) in offsets], 1)
          n, t = patches.shape[:2]
          p = model(_standardise(patches.reshape((n * t,) + patches.shape[2:])))
          res["emotion_probs"] = torch.softmax(
              p["emotion_logits"].float(), -1).reshape(n, t, -1).mean(1)
        elif "emotion_logits" in o:
          res["emotion_probs"] = torch.softmax(o["emotion_logits"].float(), -1)
      else:
        o = model(x)
        if "landmarks" in o:
          res["landmarks"] = o["landmarks"].float() * x.shape[1]
        if "emotion_logits" in o:
          res["emotion_probs"] = torch.softmax(o["emotion_logits"].float(), -1)
      for k, v in res.items():
        out.setdefault(k, []).append(v.cpu().numpy())
  return {k: np.concatenate(v) for k, v in out.items()}


def _standardise(x, eps: float = 1e-6):
  """`tml.preprocess.batch_standardise` (one scalar mean and std) in torch."""
  x = x.float()
  d = x - x.mean()
  return d / d.pow(2).mean().sqrt().clamp_min(eps)
