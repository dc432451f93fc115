"""tml.predict: the Predictor and CLI on a run trained for a few steps here."""
from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from tml import config as config_lib
from tml import parallel
from tml import predict as predict_lib
from tml import predict_files
from tml import protocol
from tml import train
from tml import train_step as step_lib
from tests.test_train import N, _fake_expression, _fake_thermal


@pytest.fixture(scope="module")
def thermal_run(tmp_path_factory):
  """A tiny two-stage Chu run on the fake thermal data, and its test split."""
  tmp = tmp_path_factory.mktemp("predict")
  cfg = config_lib.validate(config_lib.Config(
      image_size=N, unet_depth=2, unet_width=4, fc_width=16, splits=(0,),
      batch_size=8, eval_batch_size=8, stage1_epochs=1, stage2_epochs=1,
      learning_rate=1e-3, log_every_steps=50, checkpoint_every_steps=50,
      num_plot_images=2, workdir=str(tmp / "run")))
  data = _fake_thermal()
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(protocol, "load", lambda cfg: data)
    train.train_and_evaluate(cfg)
  split = next(protocol.splits(cfg, data))
  return cfg, data, split


def _eval_reference(cfg, data, split, params):
  """What the training run's own eval path predicts on its test crops."""
  model = train.build_model(cfg, data)
  task = train.build_task(cfg, data)
  mesh = parallel.make_mesh()
  eval_step = step_lib.make_eval_step(model, task, mesh)
  return train.predict(eval_step, params, split.test, split.test_idx, cfg, mesh)


def test_predictor_matches_the_eval_path_on_test_crops(thermal_run):
  cfg, data, split = thermal_run
  p = predict_lib.Predictor.from_workdir(cfg.workdir)
  assert p.split == "split_0" and p.kind == "thermal"
  assert "stage2/checkpoints" in p.source
  crops = split.test["image"][split.test_idx]
  out = p.predict(list(crops), detect=False)
  ref = _eval_reference(cfg, data, split, p.params)
  got = np.stack([r["landmarks"] for r in out])
  np.testing.assert_allclose(got, ref["landmarks"], atol=1e-4)
  probs = np.array([[r["emotion_probs"][c] for c in data.class_names] for r in out])
  np.testing.assert_allclose(probs, ref["emotion_probs"], atol=1e-5)
  assert all(r["box"] == [0.0, 0.0, float(N), float(N)] for r in out)
  assert out[0]["emotion"] in data.class_names


def test_landmarks_come_back_in_the_original_frame(thermal_run):
  cfg, _, split = thermal_run
  p = predict_lib.Predictor.from_workdir(cfg.workdir, split="split_0")
  crop = split.test["image"][split.test_idx[0], ..., 0]
  small = p.predict([crop], detect=False)[0]["landmarks"]
  # Translation: the crop pasted into a larger frame, box = where it lies.
  big = np.zeros((40, 50), np.float32)
  big[5:5 + N, 7:7 + N] = crop
  moved = p.predict([big], boxes=[(7, 5, 7 + N, 5 + N)])[0]
  np.testing.assert_allclose(moved["landmarks"], small + [7, 5], atol=1e-4)
  # Scale: a 2x box; the points are the crop-frame predictions mapped with
  # the documented edge-coordinate formula (independent of crop_to_frame).
  up = np.asarray(Image.fromarray(crop).resize((2 * N, 2 * N), Image.BILINEAR))
  frame = np.zeros((60, 70), np.float32)
  frame[3:3 + 2 * N, 11:11 + 2 * N] = up
  box = (11.0, 3.0, 11.0 + 2 * N, 3.0 + 2 * N)
  rec = p.predict([frame], boxes=[box])[0]
  from data_prep import thermal_common
  crop_pts = p.predict_crops(thermal_common.crop_and_resize(frame, box, N)[None])
  expect = np.asarray(box[:2]) + (crop_pts["landmarks"][0] + 0.5) * (2 * N / N) - 0.5
  np.testing.assert_allclose(rec["landmarks"], expect, atol=1e-4)
  # ... and near twice the small prediction (the same face, resampled).
  assert np.median(np.abs(rec["landmarks"] - (2 * small + [11 + 0.5, 3 + 0.5]))) < 2.0


def test_bad_inputs_give_records_and_the_run_continues(thermal_run):
  cfg, _, split = thermal_run
  p = predict_lib.Predictor.from_workdir(cfg.workdir)
  crop = split.test["image"][split.test_idx[0], ..., 0]
  out = p.predict([np.full((20, 20), 0.5, np.float32), crop,
                   np.zeros((4, 4, 7)), np.array([["a"]]),
                   np.where(np.eye(N) > 0, np.nan, crop)], detect=False)
  assert out[0]["reason"] == "constant"
  assert "landmarks" in out[1]
  assert out[2]["reason"] == "bad_shape"
  assert out[3]["reason"] in ("bad_dtype", "bad_shape")
  assert out[4]["reason"] == "bad_values"
  # Temperatures passed as grey are refused, not silently clipped.
  temps = (20 + 20 * crop).astype(np.float32)
  assert p.predict([temps], detect=False)[0]["reason"] == "bad_values"
  np.testing.assert_allclose(
      p.predict([temps], detect=False, temperature=True)[0]["landmarks"],
      out[1]["landmarks"], atol=1e-3)
  noise = np.random.RandomState(0).uniform(size=(64, 64)).astype(np.float32)
  assert p.predict([noise])[0]["reason"] == "no_face"


def _write_inputs(folder: pathlib.Path, crop: np.ndarray) -> dict[str, str]:
  """One file of each kind; returns name -> expected status."""
  (folder / "sub").mkdir(parents=True)
  g = np.clip(crop, 0, 1)
  Image.fromarray(np.round(g * 255).astype(np.uint8)).save(folder / "grey8.png")
  Image.fromarray(np.round(g * 65535).astype(np.uint16)).save(folder / "grey16.png")
  rgb = np.repeat(np.round(g * 255).astype(np.uint8)[..., None], 3, -1)
  Image.fromarray(rgb).save(folder / "sub" / "rgb.jpg", quality=95)
  Image.fromarray(np.round(g * 65535).astype(np.uint16)).save(folder / "sub" / "t16.tif")
  np.save(folder / "temps.npy", (20 + 20 * g).astype(np.float32))
  (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
  data = (folder / "grey8.png").read_bytes()
  (folder / "truncated.png").write_bytes(data[:len(data) // 2])
  Image.fromarray(np.full((N, N), 77, np.uint8)).save(folder / "constant.png")
  (folder / "empty.png").write_bytes(b"")
  np.save(folder / "sub" / "empty.npy", np.zeros((0, 5), np.float32))
  np.save(folder / "sub" / "complex.npy", (g + 0j).astype(np.complex64))
  arr = (folder / "temps.npy").read_bytes()
  (folder / "sub" / "truncated.npy").write_bytes(arr[:len(arr) // 2])
  return {"grey8.png": "ok", "grey16.png": "ok", "rgb.jpg": "ok", "t16.tif": "ok",
          "temps.npy": "ok", "corrupt.png": "unreadable",
          "truncated.png": "unreadable", "constant.png": "constant",
          "empty.png": "unreadable", "empty.npy": "bad_shape",
          "complex.npy": "bad_dtype", "truncated.npy": "unreadable"}


def test_cli_on_a_folder_writes_jsonl_and_a_summary(thermal_run, tmp_path, capsys):
  cfg, _, split = thermal_run
  crop = split.test["image"][split.test_idx[0], ..., 0]
  expected = _write_inputs(tmp_path / "in", crop)
  rc = predict_lib.main([f"--workdir={cfg.workdir}", str(tmp_path / "in"),
                         str(tmp_path / "missing.png"), f"--out={tmp_path / 'out'}",
                         "--no_detect", "--vis", "--csv"])
  assert rc == 0
  recs = [json.loads(l) for l in
          (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
  by_name = {pathlib.Path(r["file"]).name: r for r in recs}
  assert by_name["missing.png"]["status"] == "unreadable"
  for name, status in expected.items():
    assert by_name[name]["status"] == status, (name, by_name[name])
  ok = [r for r in recs if r["status"] == "ok"]
  assert all(len(r["outputs"]["landmarks"]) == 68 and r["run_id"] for r in ok)
  # 8-bit, 16-bit and the temperature array are the same frame: same points.
  a, b, c = (np.array(by_name[n]["outputs"]["landmarks"])
             for n in ("grey8.png", "grey16.png", "temps.npy"))
  np.testing.assert_allclose(a, b, atol=0.05)
  np.testing.assert_allclose(b, c, atol=0.05)
  # The overlay draws each point where the record says it is.
  rec = by_name["grey8.png"]
  vis = np.asarray(Image.open(rec["vis"]).convert("RGB"))
  s = predict_files.vis_scale(N, N)
  assert vis.shape == (N * s, N * s, 3)
  for x, y in rec["outputs"]["landmarks"]:
    cx, cy = round((x + 0.5) * s - 0.5), round((y + 0.5) * s - 0.5)
    if 0 <= cx < N * s and 0 <= cy < N * s:
      assert tuple(vis[cy, cx]) == predict_files.POINT_COLOUR, (x, y)
  red = np.all(vis == predict_files.POINT_COLOUR, axis=-1)
  ys, xs = np.nonzero(red)
  pts = np.array(rec["outputs"]["landmarks"])
  centres = np.round((pts + 0.5) * s - 0.5)
  near = np.min(np.abs(xs[:, None] - centres[None, :, 0]) +
                np.abs(ys[:, None] - centres[None, :, 1]), axis=1)
  assert near.max() <= 2 * predict_files.point_radius(s)   # no red away from a point
  import csv
  rows = list(csv.DictReader((tmp_path / "out" / "predictions.csv").open()))
  assert len(rows) == len(recs)
  row = next(r for r in rows if r["file"] == rec["file"])
  assert float(row["x30"]) == pytest.approx(rec["outputs"]["landmarks"][30][0])
  assert float(row["y30"]) == pytest.approx(rec["outputs"]["landmarks"][30][1])
  assert "vis" not in by_name["corrupt.png"]
  # The .npy temperatures went through the run's window, and say which.
  assert by_name["temps.npy"]["t_window"] == [20.0, 40.0]
  assert "t_window" not in by_name["grey8.png"]
  err = capsys.readouterr().err
  assert "summary: 13 files: 5 processed, 0 no face, 8 failed" in err
  # One contact sheet: the five overlays in input order, names under them.
  sheet_path = tmp_path / "out" / "vis" / predict_files.CONTACT_SHEET_NAME
  assert f"contact sheet: {sheet_path}" in err
  sheet = np.asarray(Image.open(sheet_path).convert("RGB"))
  tile, strip = predict_files.TILE, predict_files.LABEL_HEIGHT
  assert sheet.shape == (predict_files.HEADER_HEIGHT + 2 * (tile + strip),
                         3 * tile, 3)
  names = [pathlib.Path(r["file"]).name for r in recs if r["status"] == "ok"]
  thumbs = [predict_files.thumbnail(Image.open(by_name[n]["vis"]).convert("RGB"))
            for n in names]
  _, layout = predict_files.contact_sheet(list(zip(names, thumbs)))
  assert [n for n, _ in layout] == names
  for (name, (x0, y0, x1, y1)), th in zip(layout, thumbs):
    np.testing.assert_array_equal(sheet[y0:y1, x0:x1], np.asarray(th), err_msg=name)
    top, left = y0 - (tile - (y1 - y0)) // 2, x0 - (tile - (x1 - x0)) // 2
    label = sheet[top + tile:top + tile + strip, left:left + tile]
    assert (label.min(axis=-1) > 200).sum() > 10, name   # white text drawn
  # Nothing processable: non-zero exit.
  assert predict_lib.main([f"--workdir={cfg.workdir}",
                           str(tmp_path / "in" / "corrupt.png")]) == 1


def test_missing_or_half_written_workdir_names_what_is_missing(thermal_run, tmp_path):
  cfg, _, _ = thermal_run
  with pytest.raises(predict_lib.WorkdirError, match="no such run directory"):
    predict_lib.Predictor.from_workdir(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(predict_lib.WorkdirError, match="config.json: missing"):
    predict_lib.Predictor.from_workdir(tmp_path / "empty")
  half = tmp_path / "half"
  (half / "split_0" / "stage2" / "checkpoints" / "3.orbax-checkpoint-tmp").mkdir(parents=True)
  (half / "config.json").write_text(
      (pathlib.Path(cfg.workdir) / "config.json").read_text())
  with pytest.raises(predict_lib.WorkdirError, match="no complete checkpoint"):
    predict_lib.Predictor.from_workdir(half)
  (half / "split_0" / "stage2" / "checkpoints" / "5").mkdir()   # no 'state' item
  with pytest.raises(predict_lib.WorkdirError, match="5: no 'state' item"):
    predict_lib.Predictor.from_workdir(half)
  (half / "config.json").write_text('{"model": "chu_un')      # cut short
  with pytest.raises(predict_lib.WorkdirError, match="config.json: unreadable"):
    predict_lib.Predictor.from_workdir(half)
  with pytest.raises(predict_lib.WorkdirError, match="split_9.*missing"):
    predict_lib.Predictor.from_workdir(cfg.workdir, split="split_9")
  assert predict_lib.main([f"--workdir={tmp_path / 'empty'}", "x.png"]) == 2


def test_export_round_trip_without_orbax(thermal_run, tmp_path, monkeypatch):
  cfg, _, split = thermal_run
  p = predict_lib.Predictor.from_workdir(cfg.workdir)
  path = p.export(tmp_path / "model.npz")
  import orbax.checkpoint as ocp
  monkeypatch.setattr(ocp, "StandardCheckpointer", None)   # not used on this path
  q = predict_lib.Predictor.from_workdir(path)
  crops = list(split.test["image"][split.test_idx[:4]])
  a = p.predict(crops, detect=False)
  b = q.predict(crops, detect=False)
  for ra, rb in zip(a, b):
    np.testing.assert_array_equal(ra["landmarks"], rb["landmarks"])
    assert ra["emotion_probs"] == rb["emotion_probs"]
  assert q.run_id == p.run_id and q.split == p.split


@pytest.fixture(scope="module")
def expression_run(tmp_path_factory):
  """A DeVries run (map head on) trained one epoch on fake FER2013 data.

  Tests that load it patch `protocol.load` (the stats may be recomputed).
  """
  tmp = tmp_path_factory.mktemp("predict_expression")
  data = _fake_expression()
  cfg = config_lib.validate(config_lib.Config(
      dataset="fer2013", model="devries", optimizer="sgd", learning_rate=0.01,
      batch_size=8, eval_batch_size=8, stage1_epochs=0, stage2_epochs=1,
      splits=(0,), log_every_steps=50, checkpoint_every_steps=50,
      num_plot_images=2, workdir=str(tmp / "run")))
  assert cfg.map_head
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(protocol, "load", lambda cfg: data)
    train.train_and_evaluate(cfg)
  return cfg, data, next(protocol.splits(cfg, data))


def test_expression_run_pixel_stats_saved_or_recomputed(expression_run, monkeypatch):
  cfg, data, split = expression_run
  monkeypatch.setattr(protocol, "load", lambda cfg: data)
  saved = pathlib.Path(cfg.workdir) / "split_0" / predict_lib.PIXEL_STATS
  if saved.exists():   # written by training (tml.train): the same statistics
    stats = predict_lib.load_pixel_stats(saved.parent)
    fit = predict_lib.fit_split_pixel_stats(split)
    np.testing.assert_array_equal(stats.mean, fit.mean)
    np.testing.assert_array_equal(stats.std, fit.std)
    saved.unlink()     # as a run trained before training saved them
  # No saved stats: recomputed from the (here faked) dataset of config.json.
  p = predict_lib.Predictor.from_workdir(cfg.workdir)
  assert "stage2/best" in p.source   # selected on PublicTest
  prepared = train._prepare_arrays(cfg, data, split)   # pylint: disable=protected-access
  model, task = train.build_model(cfg, data), train.build_task(cfg, data)
  mesh = parallel.make_mesh()
  ref = train.predict(step_lib.make_eval_step(model, task, mesh), p.params,
                      prepared.test, prepared.test_idx, cfg, mesh)
  raw = split.test["image"][split.test_idx]
  out = p.predict(list(raw), detect=False)
  probs = np.array([[r["emotion_probs"][c] for c in data.class_names] for r in out])
  np.testing.assert_allclose(probs, ref["emotion_probs"], atol=1e-4)
  assert out[0]["emotion"] in data.class_names and "landmarks" not in out[0]
  # Faces found with dlib's HOG detector: none in noise.
  noise = np.random.RandomState(0).randint(0, 255, (64, 64)).astype(np.uint8)
  assert p.predict([noise])[0]["reason"] in ("no_face", "no_detector")
  # Saved stats are used without the dataset; without either, a clear error.
  predict_lib.save_pixel_stats(pathlib.Path(cfg.workdir) / p.split,
                               predict_lib.fit_split_pixel_stats(split))
  def no_data(cfg):
    raise FileNotFoundError("dataset not prepared")
  monkeypatch.setattr(protocol, "load", no_data)
  q = predict_lib.Predictor.from_workdir(cfg.workdir)
  np.testing.assert_array_equal(q.pixel_stats.mean, p.pixel_stats.mean)
  (pathlib.Path(cfg.workdir) / p.split / predict_lib.PIXEL_STATS).unlink()
  with pytest.raises(predict_lib.WorkdirError, match="per-pixel statistics"):
    predict_lib.Predictor.from_workdir(cfg.workdir)


def _rendered_frame():
  """One synthetic thermal frame in degrees C (the builder's renderer)."""
  from data_prep.synthetic_thermal import render, scene
  from data_prep.synthetic_thermal import synthetic_thermal_dataset_builder as stb
  frame = (256, 192)
  spec = [s for s in stb.frame_specs(stb.SyntheticThermal.builder_configs["default"])
          if s.pose == 0][0]
  traits = scene.subject_traits(0, spec.subject, 0.0, "narrow")
  face, thermal, rng = scene.frame_scene(0, spec, traits, frame)
  temps = render.render(face, thermal, render.Grid.full_frame(*frame, step=1.0),
                        frame, rng)
  return np.asarray(temps, np.float32)


def test_thermal_face_box_detection_and_user_boxes(thermal_run, tmp_path, capsys):
  cfg, _, _ = thermal_run
  from data_prep import thermal_common
  from tml import facebox
  p = predict_lib.Predictor.from_workdir(cfg.workdir)
  temps = _rendered_frame()
  grey = thermal_common.to_unit_grey(temps)
  rec = p.predict([temps], temperature=True)[0]
  box = facebox.find_face_box(grey)
  np.testing.assert_allclose(rec["box"], box, atol=1e-6)
  # The points are the crop's predictions mapped into the frame.
  crop = thermal_common.crop_and_resize(grey, box, N)
  in_crop = p.predict_crops(crop[None])["landmarks"][0]
  np.testing.assert_allclose(
      rec["landmarks"], thermal_common.crop_to_frame(in_crop, box, N), atol=1e-4)
  # CLI: the .npy temperatures with detection, and a user box from JSON.
  np.save(tmp_path / "frame.npy", temps)
  np.save(tmp_path / "boxed.npy", temps)
  noise = np.random.RandomState(0).uniform(20, 40, (64, 64)).astype(np.float32)
  np.save(tmp_path / "noface.npy", noise)
  user = [10.0, 20.0, 110.0, 120.0]
  (tmp_path / "boxes.json").write_text(json.dumps({"boxed.npy": user}))
  assert predict_lib.main([f"--workdir={cfg.workdir}", str(tmp_path / "*.npy"),
                           f"--boxes={tmp_path / 'boxes.json'}",
                           f"--out={tmp_path / 'out'}"]) == 0
  recs = {pathlib.Path(r["file"]).name: r for r in map(json.loads, (
      tmp_path / "out" / "predictions.jsonl").read_text().splitlines())}
  np.testing.assert_allclose(recs["frame.npy"]["box"], box, atol=1e-6)
  np.testing.assert_allclose(recs["frame.npy"]["outputs"]["landmarks"],
                             rec["landmarks"], atol=1e-4)
  assert recs["boxed.npy"]["box"] == user
  assert recs["noface.npy"]["status"] == "no_face" and recs["noface.npy"]["error"]
  assert "3 files: 2 processed, 1 no face, 0 failed" in capsys.readouterr().err


def test_module_entry_point_exports_and_predicts(thermal_run, tmp_path):
  import subprocess
  import sys
  cfg, _, split = thermal_run
  crop = split.test["image"][split.test_idx[0], ..., 0]
  Image.fromarray(np.round(np.clip(crop, 0, 1) * 255).astype(np.uint8)).save(
      tmp_path / "a.png")
  out = subprocess.run(
      [sys.executable, "-m", "tml.predict", f"--workdir={cfg.workdir}",
       f"--export={tmp_path / 'm.npz'}", "--no_detect", str(tmp_path / "a.png")],
      capture_output=True, text=True, timeout=120,
      cwd=pathlib.Path(__file__).resolve().parents[1])
  assert out.returncode == 0, out.stderr
  rec = json.loads(out.stdout.splitlines()[0])
  assert rec["status"] == "ok" and len(rec["outputs"]["landmarks"]) == 68
  assert (tmp_path / "m.npz").is_file() and "1 processed" in out.stderr


def test_torch_twin_on_exported_weights_matches_jax(thermal_run, tmp_path):
  torch = pytest.importorskip("torch")
  from tml import export as export_lib
  cfg, _, split = thermal_run
  p = predict_lib.Predictor.from_workdir(
      predict_lib.Predictor.from_workdir(cfg.workdir).export(tmp_path / "m.npz"))
  assert predict_lib.main([f"--workdir={cfg.workdir}",
                           f"--export_torch={tmp_path / 'm.pt'}"]) == 0
  model, meta = export_lib.load_torch(tmp_path / "m.pt")
  assert meta["run_id"] == p.run_id
  crops = split.test["image"][split.test_idx]
  jax_out = p.predict_crops(crops)
  with torch.no_grad():
    t_out = model(torch.from_numpy(p.prepare_crops(crops)))
  np.testing.assert_allclose(t_out["landmarks"].numpy() * N, jax_out["landmarks"],
                             atol=1e-4)
  np.testing.assert_allclose(torch.softmax(t_out["emotion_logits"], -1).numpy(),
                             jax_out["emotion_probs"], atol=1e-5)
  twin = export_lib.torch_predict_crops(model, p, crops)
  np.testing.assert_allclose(twin["landmarks"], jax_out["landmarks"], atol=1e-4)
  np.testing.assert_allclose(twin["emotion_probs"], jax_out["emotion_probs"],
                             atol=1e-5)


class _FakePredictor:
  """What `run_files` calls, without a network: the whole frame as the box."""
  run_id, split, has_maps = "fake", "split_0", False

  def to_grey(self, a, temperature=False):
    a = np.asarray(a)
    return ((a - 20.0) / 20.0 if temperature else a / 255.0).astype(np.float32)

  def predict(self, images, boxes, detect=True, temperature=False):
    del boxes, detect
    return [{"box": [0.0, 0.0, float(a.shape[1]), float(a.shape[0])],
             **({"t_window": [20.0, 40.0]} if temperature else {})}
            for a in images]


def test_contact_sheet_takes_the_first_overlays_in_input_order(tmp_path):
  # 70 frames, .png and .npy (temperature) interleaved, over chunks of 16:
  # the sheet holds the first 64 in input order, whatever group ran first.
  files = []
  for k in range(70):
    if k % 3:
      f = tmp_path / f"{k:03d}.png"
      Image.fromarray(np.full((12, 16), 3 * k, np.uint8)).save(f)
    else:
      f = tmp_path / f"{k:03d}.npy"
      np.save(f, np.full((12, 16), 20.0 + 20.0 * 3 * k / 255.0))
    files.append(f)
  import io
  summary = predict_files.run_files(_FakePredictor(), files, io.StringIO(),
                                    vis_dir=tmp_path / "vis", chunk=16,
                                    progress=False)
  assert summary["processed"] == 70
  sheet = np.asarray(Image.open(summary["contact_sheet"]).convert("RGB"))
  tile, strip = predict_files.TILE, predict_files.LABEL_HEIGHT
  assert sheet.shape == (predict_files.HEADER_HEIGHT + 8 * (tile + strip),
                         8 * tile, 3)
  thumbs = [(f.name, predict_files.thumbnail(Image.open(
      tmp_path / "vis" / f"{k:06d}_{f.stem}.png").convert("RGB")))
            for k, f in enumerate(files[:64])]
  expect, layout = predict_files.contact_sheet(thumbs, total=70)
  np.testing.assert_array_equal(sheet, np.asarray(expect))
  assert len(layout) == 64 and layout[-1][0] == "063.npy"
  for k, (_, (x0, y0, x1, y1)) in enumerate(layout):
    centre = sheet[(y0 + y1) // 2, (x0 + x1) // 2]
    assert np.all(np.abs(centre.astype(int) - 3 * k) <= 1), (k, centre)
  # The header says the sheet is capped.
  uncapped, _ = predict_files.contact_sheet(thumbs, total=64)
  head = slice(0, predict_files.HEADER_HEIGHT)
  assert not np.array_equal(np.asarray(uncapped)[head], sheet[head])


def test_temperature_window_comes_from_the_run(thermal_run, tmp_path):
  import dataclasses
  from data_prep.synthetic_thermal import synthetic_thermal_dataset_builder as stb
  cfg, _, split = thermal_run
  configs = stb.SyntheticThermal.builder_configs
  default = configs["default"]
  assert predict_lib.temperature_window(cfg) == (default.t_min, default.t_max)
  crop = split.test["image"][split.test_idx[0], ..., 0]
  with pytest.MonkeyPatch.context() as mp:
    # A run whose dataset stored temperatures through 25-45 C: a .npy of
    # 25 + 20 g must come back as the grey g it was trained on.
    mp.setitem(configs, "default", dataclasses.replace(default, t_min=25.0,
                                                       t_max=45.0))
    p = predict_lib.Predictor.from_workdir(cfg.workdir)
    assert p.t_window == (25.0, 45.0)
    temps = (25.0 + 20.0 * crop).astype(np.float32)
    np.testing.assert_allclose(p.to_grey(temps, temperature=True), crop, atol=1e-6)
    rec = p.predict([temps], detect=False, temperature=True)[0]
    assert rec["t_window"] == [25.0, 45.0]
    path = p.export(tmp_path / "m.npz")
  # The export carries the window it was made with.
  q = predict_lib.Predictor.from_workdir(path)
  assert q.t_window == (25.0, 45.0)
  np.testing.assert_allclose(q.predict([temps], detect=False, temperature=True)[0]
                             ["landmarks"], rec["landmarks"], atol=1e-5)
  assert predict_lib.Predictor.from_workdir(cfg.workdir).t_window == (20.0, 40.0)
  # An unknown builder config is named.
  with pytest.raises(predict_lib.WorkdirError, match="dataset_config='nope'"):
    predict_lib.temperature_window(cfg.replace(dataset_config="nope"))
  # --t_window overrides the run's window for arrays from another camera.
  np.save(tmp_path / "t.npy", (0.0 + 100.0 * crop).astype(np.float32))
  assert predict_lib.main([f"--workdir={cfg.workdir}", "--no_detect",
                           "--t_window=0,100", str(tmp_path / "t.npy"),
                           f"--out={tmp_path / 'out'}"]) == 0
  r = json.loads((tmp_path / "out" / "predictions.jsonl").read_text())
  assert r["t_window"] == [0.0, 100.0]
  np.testing.assert_allclose(
      r["outputs"]["landmarks"],
      p.predict([crop], detect=False)[0]["landmarks"], atol=1e-3)
  assert predict_lib.main([f"--workdir={cfg.workdir}", "--t_window=40,20",
                           str(tmp_path / "t.npy")]) == 2


def test_devries_maps_are_written_beside_the_record(expression_run, tmp_path,
                                                    monkeypatch):
  from tml import preprocess
  from tml import targets
  cfg, data, split = expression_run
  monkeypatch.setattr(protocol, "load", lambda cfg: data)
  p = predict_lib.Predictor.from_workdir(cfg.workdir)
  assert p.has_maps and p.t_window is None
  raw = split.test["image"][split.test_idx[:2], ..., 0]
  u8 = np.round(np.clip(raw, 0, 1) * 255).astype(np.uint8)
  folder = tmp_path / "in"
  folder.mkdir()
  Image.fromarray(u8[0]).save(folder / "a.png")
  big = np.asarray(Image.fromarray(u8[1]).resize((96, 96), Image.NEAREST))
  Image.fromarray(big).save(folder / "b.png")
  np.save(folder / "t.npy", 20.0 + raw[0])   # temperatures: not this model's input
  assert predict_lib.main([f"--workdir={cfg.workdir}", str(folder), "--no_detect",
                           "--vis", f"--out={tmp_path / 'out'}"]) == 0
  recs = {pathlib.Path(r["file"]).name: r for r in map(json.loads, (
      tmp_path / "out" / "predictions.jsonl").read_text().splitlines())}
  assert recs["t.npy"]["status"] == "bad_values"
  # Reference, outside the Predictor: the two faces at 48 x 48, Tang's two
  # stages, the centre crop, one batch standardisation, the map head, sigmoid.
  greys = np.stack([u8[0] / 255.0,
                    p.crop((big / 255.0).astype(np.float32), (0, 0, 96, 96))])
  x = preprocess.apply_pixel_stats(
      preprocess.per_image_normalise(greys[..., None].astype(np.float32)),
      p.pixel_stats)
  c = cfg.crop_size
  o = (48 - c) // 2
  x = preprocess.batch_standardise(x[:, o:o + c, o:o + c])
  logits = train.build_model(cfg, data).apply({"params": p.params}, x)["maps"]
  ref = 1.0 / (1.0 + np.exp(-np.asarray(logits, np.float64)))
  for k, name in enumerate(("a.png", "b.png")):
    out = recs[name]["outputs"]
    assert list(out["maps"]) == list(targets.LABEL_MAP_NAMES)
    for m, map_name in enumerate(targets.LABEL_MAP_NAMES):
      path = pathlib.Path(out["maps"][map_name])
      assert path.parent == tmp_path / "out" / "maps"
      png = np.asarray(Image.open(path))
      assert png.dtype == np.uint8 and png.shape == (c, c)
      np.testing.assert_allclose(png, np.round(ref[k, ..., m] * 255), atol=1,
                                 err_msg=f"{name} {map_name}")
    assert out["emotion"] in data.class_names
  # The maps cover the centre 42/48 of the face box, in original pixels.
  assert recs["a.png"]["outputs"]["maps_box"] == [3.0, 3.0, 45.0, 45.0]
  assert recs["b.png"]["outputs"]["maps_box"] == [6.0, 6.0, 90.0, 90.0]
  assert (tmp_path / "out" / "vis" / predict_files.CONTACT_SHEET_NAME).is_file()
  # The API returns the arrays; the probabilities are the eval step's.
  api = p.predict([u8[0], big], detect=False)
  np.testing.assert_allclose(api[0]["maps"], ref[0], atol=1e-5)
  np.testing.assert_allclose(api[1]["maps"], ref[1], atol=1e-5)
  no_maps = predict_lib.Predictor(
      cfg=cfg.replace(map_head=False), kind=p.kind, class_names=p.class_names,
      params={"features": p.params["features"],
              "head": {k: v for k, v in p.params["head"].items() if k != "fc_maps"}},
      split=p.split, run_id=p.run_id, source=p.source, pixel_stats=p.pixel_stats)
  plain = no_maps.predict([u8[0], big], detect=False)
  assert "maps" not in plain[0]
  for a, b in zip(api, plain):
    for cls in data.class_names:
      assert a["emotion_probs"][cls] == pytest.approx(b["emotion_probs"][cls], abs=1e-6)


def test_devries_export_round_trip_in_both_frameworks(expression_run, tmp_path,
                                                      monkeypatch):
  torch = pytest.importorskip("torch")
  from tml import export as export_lib
  cfg, data, split = expression_run
  monkeypatch.setattr(protocol, "load", lambda cfg: data)
  p = predict_lib.Predictor.from_workdir(cfg.workdir)
  path = p.export(tmp_path / "m.npz")
  def no_data(cfg):
    raise FileNotFoundError("dataset not prepared")
  monkeypatch.setattr(protocol, "load", no_data)
  q = predict_lib.Predictor.from_workdir(path)
  np.testing.assert_array_equal(q.pixel_stats.mean, p.pixel_stats.mean)
  np.testing.assert_array_equal(q.pixel_stats.std, p.pixel_stats.std)
  assert q.t_window is None and q.has_maps
  crops = split.test["image"][split.test_idx]
  a, b = p.predict_crops(crops), q.predict_crops(crops)
  assert set(a) == {"emotion_probs", "maps"}
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert predict_lib.main([f"--workdir={path}",
                           f"--export_torch={tmp_path / 'm.pt'}"]) == 0
  model, meta = export_lib.load_torch(tmp_path / "m.pt")
  assert meta["kind"] == "expression" and meta["run_id"] == p.run_id
  t = export_lib.torch_predict_crops(model, q, crops)
  np.testing.assert_allclose(t["emotion_probs"], b["emotion_probs"], atol=1e-5)
  np.testing.assert_allclose(t["maps"], b["maps"], atol=1e-5)
  del torch


def test_bench_predict_writes_throughput_json(tmp_path, monkeypatch):
  pytest.importorskip("torch")
  import os
  from experiments import bench_predict
  for k in ("JAX_PLATFORMS", "XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION",
            "TF_CPP_MIN_LOG_LEVEL", "TORCHINDUCTOR_FX_GRAPH_CACHE",
            "TORCHINDUCTOR_AUTOGRAD_CACHE"):   # the bench sets these; restored
    if k in os.environ:
      monkeypatch.setenv(k, os.environ[k])
    else:
      monkeypatch.delenv(k, raising=False)
  out = tmp_path / "bench.json"
  bench_predict.main(["--models=chu_unet,basic_cnn,devries", "--batch=2",
                      "--repeats=1", "--quick", "--device=cpu", f"--out={out}"])
  r = json.loads(out.read_text())
  assert r["benchmark"] == "predict"
  assert r["command"].startswith("python -m experiments.bench_predict --models=")
  assert r["versions"]["jax"] and r["versions"]["torch"]
  assert r["devices"]["jax_backend"] == "cpu" and r["devices"]["jax"]
  assert r["devices"]["torch"] == "cpu"
  assert "git" in r and (r["git"] is None or len(r["git"]["commit"]) == 40)
  groups = {(g["model"], g["batch"]): g for g in r["results"]}
  assert set(groups) == {("chu_unet", 2), ("basic_cnn", 2), ("devries", 2)}
  for g in groups.values():
    assert set(g["runners"]) == set(bench_predict.RUNNERS), g.get("failures")
    for run in g["runners"].values():
      ips = run["images_per_s"]
      assert 0 < ips["min"] <= ips["median"] <= ips["max"]
      assert len(run["seconds_per_call"]) == 1 and run["first_call_s"] > 0
    # Both frameworks ran the same exported weights.
    assert max(g["max_abs_diff"].values()) < 1e-3, g["max_abs_diff"]
  assert set(groups[("devries", 2)]["max_abs_diff"]) == {"emotion_probs", "maps"}
  assert set(groups[("chu_unet", 2)]["max_abs_diff"]) == {"emotion_probs", "landmarks"}


@pytest.fixture(scope="module")
def converged_run(tmp_path_factory):
  """A U-Net trained to convergence on the small synthetic config (about
  half a minute here); ``TML_PREDICT_RUN`` points at a longer run instead
  (e.g. runs/demo)."""
  import os
  if os.environ.get("TML_PREDICT_RUN"):
    return pathlib.Path(os.environ["TML_PREDICT_RUN"])
  tmp = tmp_path_factory.mktemp("converged")
  cfg = config_lib.validate(config_lib.Config(
      dataset="synthetic_thermal", dataset_config="small",
      data_dir=str(tmp / "tfds"), image_size=32, unet_depth=2, unet_width=8,
      fc_width=64, emotion_head=False, splits=(0,), batch_size=16,
      eval_batch_size=32, stage1_epochs=0, stage2_epochs=200,
      learning_rate=3e-3, lr_schedule="cosine", log_every_steps=100, checkpoint_every_steps=10_000,
      num_plot_images=2, workdir=str(tmp / "run")))
  train.train_and_evaluate(cfg)
  return pathlib.Path(cfg.workdir)


def test_a_trained_run_lands_near_the_rendered_landmarks(converged_run):
  """Whole rendered frames, face box found, points back in the frame, near
  the rendered geometry."""
  from data_prep.synthetic_thermal import render, scene
  from data_prep.synthetic_thermal import synthetic_thermal_dataset_builder as stb
  run = converged_run
  res = json.loads((run / "results.json").read_text())
  p = predict_lib.Predictor.from_workdir(run)
  assert p.cfg.dataset == "synthetic_thermal"
  bc = stb.SyntheticThermal.builder_configs[p.cfg.dataset_config or "default"]
  frame = (bc.frame_width, bc.frame_height)
  nmes = []
  for spec in [s for s in stb.frame_specs(bc) if s.pose == 0][:32:8]:
    traits = scene.subject_traits(bc.seed, spec.subject, bc.glasses_fraction,
                                  bc.variation)
    face, thermal, rng = scene.frame_scene(bc.seed, spec, traits, frame)
    temps = render.render(face, thermal, render.Grid.full_frame(*frame, step=1.0),
                          frame, rng)
    rec = p.predict([np.asarray(temps, np.float32)], temperature=True)[0]
    gt = np.asarray(face.landmarks)
    ipd = np.linalg.norm(gt[36:42].mean(0) - gt[42:48].mean(0))
    nmes.append(np.linalg.norm(rec["landmarks"] - gt, axis=-1).mean() / ipd * 100)
  # The run learned (test NME under half the mean shape's: 9.6 vs 23.2 here),
  # and on whole frames it lands closer to its own test NME than to the
  # mean shape's.
  own, mean_shape = res["nme_inter_pupil"], res["mean_shape_nme_inter_pupil"]
  assert own < 0.5 * mean_shape, (own, mean_shape)
  assert np.mean(nmes) < own + 0.5 * (mean_shape - own), (nmes, own, mean_shape)


def test_expression_detector_finds_real_faces_in_a_larger_frame(expression_run,
                                                                  shared_data):
  """The DeVries predictor's face box (dlib HOG, the labels extra) on real
  FER2013 faces pasted, 3x enlarged, into a 360 x 270 frame: the box it finds
  overlaps where the face was put (IoU > 0.4) for most of them."""
  pytest.importorskip("dlib", reason="dlib not installed (pip install -e .[labels])")
  import io
  import zipfile
  cfg = expression_run[0]
  p = predict_lib.Predictor.from_workdir(cfg.workdir)
  with zipfile.ZipFile(shared_data / "fer2013" / "fer2013_images.zip") as z:
    names = sorted(m for m in z.namelist() if "/happy/PrivateTest_" in m)[:12]
    faces = [np.asarray(Image.open(io.BytesIO(z.read(m))).convert("L")) for m in names]
  found = 0
  for i, face in enumerate(faces):
    big = np.asarray(Image.fromarray(face).resize((144, 144), Image.BICUBIC), np.float32)
    frame = np.full((270, 360), 128.0, np.float32)
    x0, y0 = 40 + 13 * i, 30 + 7 * i
    frame[y0:y0 + 144, x0:x0 + 144] = big
    try:
      bx0, by0, bx1, by1 = p.find_box(frame / 255.0)
    except predict_lib.InputError:
      continue
    ix = max(0.0, min(bx1, x0 + 144) - max(bx0, x0))
    iy = max(0.0, min(by1, y0 + 144) - max(by0, y0))
    union = (bx1 - bx0) * (by1 - by0) + 144 * 144 - ix * iy
    found += ix * iy / union > 0.4
  assert found >= 8, found
