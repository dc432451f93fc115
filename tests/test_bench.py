"""experiments.bench: the torch step's targets equal tml's, and a tiny run works.

The end-to-end test runs the real bench in this process on tiny sizes
(``--quick``, the DeVries net only, JAX and torch eager: torch.compile's
first call alone takes tens of seconds on CPU) and checks the JSON and the
Markdown it writes.
"""
from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the bench needs the torch extra")

from experiments import bench  # noqa: E402
from experiments import bench_report  # noqa: E402
from experiments import bench_torch  # noqa: E402
from tml import preprocess  # noqa: E402
from tml import targets  # noqa: E402
from tml import train_step as ts  # noqa: E402


def _faces(b=3, size=48, seed=0):
  return bench.face_landmarks(np.random.default_rng(seed), b, size)


def test_torch_targets_match_tml():
  """The torch step rasterises and normalises exactly what the JAX step does."""
  lms = _faces()
  lms[1, 20] = np.nan                    # a missing point
  t = torch.from_numpy(lms)
  np.testing.assert_array_equal(
      bench_torch.devries_label_maps_torch(t, 42, 42).numpy(),
      np.asarray(targets.devries_label_maps(jnp.asarray(lms), 42, 42)))
  np.testing.assert_allclose(
      bench_torch.chu_heatmap_torch(t, 48, 40).numpy(),
      np.asarray(targets.chu_heatmap(jnp.asarray(lms), 48, 40)),
      rtol=1e-5, atol=1e-6)
  rng = np.random.default_rng(1)
  images = rng.normal(2.0, 3.0, (4, 48, 48, 1)).astype(np.float32)
  weights = np.array([1, 1, 0, 1], np.float32)
  np.testing.assert_allclose(
      bench_torch.batch_standardise_torch(torch.from_numpy(images),
                                          torch.from_numpy(weights)).numpy(),
      preprocess.batch_standardise(images, weights=weights), rtol=1e-5,
      atol=1e-5)
  task = ts.TaskSpec(kind="expression", image_size=48, num_classes=7,
                     crop_size=42)
  want_img, want_lms = ts.prepare_inputs(
      task, None, {"image": jnp.asarray(images), "landmarks": jnp.asarray(lms[:1])},
      train=False)
  got_img, got_lms = bench_torch.center_crop_torch(
      torch.from_numpy(images), torch.from_numpy(lms[:1]), 42)
  np.testing.assert_array_equal(got_img.numpy(), np.asarray(want_img))
  np.testing.assert_array_equal(got_lms.numpy(), np.asarray(want_lms))


def test_markdown_section_is_replaced_not_duplicated(tmp_path):
  md = tmp_path / "B.md"
  md.write_text("# Benchmarks\n\nintro\n\n<!-- bench:results -->\n\nfooter\n")
  for text in ("first", "second"):
    section = f"<!-- bench:cpu:start -->\n{text}\n<!-- bench:cpu:end -->"
    bench_report.update_markdown(md, section, "cpu")
  out = md.read_text()
  assert out.count("bench:cpu:start") == 1 and "second" in out
  assert "first" not in out and out.index("intro") < out.index("second")
  assert out.rstrip().endswith("footer")


def test_environment_is_set_only_before_jax_starts(monkeypatch):
  import os
  import types
  args = types.SimpleNamespace(device="cpu", quick=True,
                               cpu_xla_flags=bench.CPU_XLA_FLAGS)
  for k in ("XLA_FLAGS", "JAX_PLATFORMS"):
    monkeypatch.setenv(k, os.environ.get(k, ""))
  before = os.environ["XLA_FLAGS"]
  # The tests' backend is running (conftest): flags could not take effect.
  bench.setup_environment(args)
  assert os.environ["XLA_FLAGS"] == before
  # In a process whose backend has not started, they are added.
  monkeypatch.setattr(bench, "_backend_started", lambda: False)
  monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
  bench.setup_environment(args)
  assert os.environ["XLA_FLAGS"] == (
      "--xla_force_host_platform_device_count=2 " + bench.CPU_XLA_FLAGS)


def test_quick_run_writes_json_and_markdown(tmp_path, monkeypatch):
  import os
  # The backend runs already, so main() must leave XLA_FLAGS as it is.
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
  flags_before = os.environ["XLA_FLAGS"]
  out, md = tmp_path / "b.json", tmp_path / "B.md"
  results = bench.main([
      "--quick", "--models=devries", "--frameworks=jax,torch_eager",
      "--dtype=float32,bfloat16", "--repeats=2", "--device=cpu",
      f"--out={out}", f"--markdown={md}", f"--profile_dir={tmp_path / 'prof'}",
      "--profile_steps=2"])
  assert os.environ["XLA_FLAGS"] == flags_before
  data = json.loads(out.read_text())
  # One trace per group, read back (XLA:CPU traces no per-op events).
  for g in data["benchmarks"]:
    prof = g["profile"]
    assert any(f.endswith(".xplane.pb") for f in prof["files"]), prof
    assert prof["steps"] == 2 and "no device-op events" in prof["note"]
  assert "Profiles (JAX step" in md.read_text()
  assert data["complete"] is True
  assert data["hardware"] == results["hardware"] == "cpu-quick"
  assert data["config"]["dtypes"] == ["float32", "bfloat16"]
  m = data["machine"]
  assert m["cpu_model"] and m["cpu_affinity"] >= 1 and m["versions"]["jax"]
  # One row group per dtype, side by side, from the same initial weights.
  g, g16 = data["benchmarks"]
  assert (g["name"], g["dtype"]) == ("devries", "float32")
  assert (g16["name"], g16["dtype"]) == ("devries", "bfloat16")
  run, run16 = g["runners"], g16["runners"]
  assert {"jax", "torch_eager", "jax+augment", "augment_only", "jnp.dot",
          "torch.mm", "pipeline", "pipeline+transfer"} <= set(run)
  # The dtype-independent measurements run once, in the first group.
  assert {"jax", "torch_eager", "jax+augment", "jnp.dot", "torch.mm"} == set(run16)
  for entry in list(run.values()) + list(run16.values()):
    assert len(entry["raw_s_per_iter"]) == 2
    assert all(t > 0 for t in entry["raw_s_per_iter"])
    assert entry["median_s"] == pytest.approx(np.median(entry["raw_s_per_iter"]))
  assert run["jax"]["flops_per_step"] > 0 and run["jax"]["compile_s"] >= 0
  assert 0 < run["jax"]["pct_of_peak"] and data["peak_matmul_gflops"] > 0
  assert set(data["peak_matmul_gflops_by_dtype"]) == {"float32", "bfloat16"}
  assert 0 < run16["jax"]["pct_of_peak"]
  assert run16["jax"]["dtype"] == run16["torch_eager"]["dtype"] == "bfloat16"
  assert run16["torch_eager"]["autocast"] == "bfloat16"
  assert run["torch_eager"]["autocast"] is None
  assert run16["jnp.dot"]["dtype"] == run16["torch.mm"]["dtype"] == "bfloat16"
  assert g["jax_speedup_vs_torch_eager"] > 0
  assert g16["jax_speedup_vs_torch_eager"] > 0
  assert g["pipeline_vs_step_consumption"] > 0
  assert "augment_overhead_in_step" in g and "augment_overhead_in_step" in g16
  # Same initial weights, same batch, no dropout in --quick: the first losses
  # of the two frameworks' steps agree, and bf16 stays near float32.
  assert run["torch_eager"]["first_loss"] == pytest.approx(
      run["jax"]["first_loss"], rel=1e-3)
  assert run16["torch_eager"]["first_loss"] == pytest.approx(
      run16["jax"]["first_loss"], rel=3e-2)
  assert run16["jax"]["first_loss"] == pytest.approx(
      run["jax"]["first_loss"], rel=3e-2)
  text = md.read_text()
  assert "<!-- bench:cpu-quick:start -->" in text
  assert "python -m experiments.bench --quick --models=devries" in text
  assert "| devries | float32 | 4 | jax |" in text
  assert "| devries | bfloat16 | 4 | jax |" in text
  assert "| devries | bfloat16 | 4 | torch_eager |" in text
  assert "compute dtypes float32, bfloat16" in text


def test_dtype_flag_is_checked():
  args = bench.parse_args(["--dtype=bfloat16,float32,bfloat16"])
  assert args.dtypes == ["bfloat16", "float32"]
  with pytest.raises(SystemExit, match="--dtype"):
    bench.parse_args(["--dtype=float16"])


# ----------------------------------------------------------------------------
# experiments.precision_check (float32 vs bfloat16 accuracy): the report
# logic on fake finished runs (the runs themselves are experiments.run's).
# ----------------------------------------------------------------------------
def test_precision_check_compare_and_verdicts():
  from experiments import precision_check as pc
  f32 = {0: 10.0, 1: 11.0, 2: 12.0}
  same = pc.compare(f32, {0: 10.5, 1: 10.9, 2: 12.2}, lower_is_better=True)
  assert same["float32"]["mean"] == pytest.approx(11.0)
  assert same["float32"]["std"] == pytest.approx(1.0)
  assert same["paired_diff"]["mean"] == pytest.approx((0.5 - 0.1 + 0.2) / 3)
  assert same["paired_diff"]["min"] == pytest.approx(-0.1)
  assert same["noise_2se"] == pytest.approx(
      2 * np.sqrt(1.0 / 3 + np.var([10.5, 10.9, 12.2], ddof=1) / 3))
  assert same["within_noise"] and same["verdict"] == "within seed noise"
  worse = pc.compare(f32, {s: v + 5 for s, v in f32.items()}, True)
  assert worse["within_noise"] is False and worse["verdict"].endswith("worse")
  better = pc.compare(f32, {s: v + 5 for s, v in f32.items()}, False)
  assert better["verdict"].endswith("better")
  one = pc.compare({0: 1.0}, {0: 1.1}, True)
  assert one["within_noise"] is None and one["verdict"].startswith("n/a")


def test_precision_check_report_from_finished_runs(tmp_path, capsys):
  from experiments import precision_check as pc
  rng = np.random.default_rng(0)
  for dtype in pc.DTYPES:
    for seed in (0, 1, 2):
      wd = pc.workdir(tmp_path, "chu_unet", dtype, seed)
      wd.mkdir(parents=True)
      (wd / "config.json").write_text(json.dumps(
          {"compute_dtype": dtype, "seed": seed}))
      (wd / "results.json").write_text(json.dumps(
          {"nme_inter_pupil": 8 + rng.normal(), "nme_inter_ocular": 5.0,
           "emotion_accuracy": None}))
  # A run of the other dtype in a seed's workdir does not count as finished.
  wd = pc.workdir(tmp_path, "devries", "float32", 0)
  wd.mkdir(parents=True)
  (wd / "config.json").write_text(json.dumps({"compute_dtype": "bfloat16",
                                              "seed": 0}))
  (wd / "results.json").write_text(json.dumps({"emotion_accuracy": 50.0}))
  report = pc.main([f"--root={tmp_path}", "--only_report"])
  chu = report["studies"]["chu_unet"]
  assert set(chu["metrics"]) == {"nme_inter_pupil", "nme_inter_ocular"}
  assert chu["metrics"]["nme_inter_pupil"]["float32"]["n"] == 3
  assert chu["metrics"]["nme_inter_ocular"]["verdict"] == "within seed noise"
  assert chu["missing"] == []
  assert len(report["studies"]["devries"]["missing"]) == 6
  text = (tmp_path / "precision_check.md").read_text()
  assert "| chu_unet | NME inter-pupil (%) |" in text
  assert "not finished" in text and "within seed noise" in text
  on_disk = json.loads((tmp_path / "precision_check.json").read_text())
  assert on_disk["seeds"] == [0, 1, 2]
  cmds = on_disk["runs"]["devries"]["bfloat16"]
  assert len(cmds) == 3 and all("--compute_dtype=bfloat16" in c for c in cmds)
  assert "--flagfile=devries_fer2013.flags" in cmds[0]
  assert "within seed noise" in capsys.readouterr().out


def test_precision_check_commands_and_flag_errors(tmp_path):
  from experiments import precision_check as pc
  cmd = pc.run_command("chu_unet", "bfloat16", 2, tmp_path, "demo",
                       ["--data_dir=/d"])
  assert cmd[:3] == ["-m", "experiments.run", "--flagfile=demo.flags"]
  assert cmd[-4:] == ["--data_dir=/d", "--seed=2", "--compute_dtype=bfloat16",
                      f"--workdir={tmp_path}/chu_unet/bfloat16/seed_2"]
  for bad in (["--", "--seed=3"], ["--", "--compute_dtype=float32"],
              ["--studies=resnet"], ["--seeds=a"]):
    with pytest.raises(SystemExit):
      pc.parse_args(bad)


def test_paired_ratios_per_repeat_and_their_verdict():
  from experiments import bench_report
  # torch / jax per repeat: 2.0, 1.5, 0.5 -> straddles 1: inconclusive.
  r = bench_report.paired_ratios([2.0, 3.0, 1.0], [1.0, 2.0, 2.0])
  assert r["ratios"] == [2.0, 1.5, 0.5]
  assert (r["median"], r["min"], r["max"], r["verdict"]) == (1.5, 0.5, 2.0,
                                                             "inconclusive")
  assert bench_report.paired_ratios([2.0, 3.0], [1.0, 2.0])["verdict"] == "faster"
  assert bench_report.paired_ratios([1.0, 1.0], [2.0, 1.5])["verdict"] == "slower"
  # The medians' ratio can say "faster" while the pairs do not agree.
  other, jax_ = [1.0, 3.0, 3.0], [2.0, 1.0, 2.9]
  assert np.median(other) / np.median(jax_) > 1
  assert bench_report.paired_ratios(other, jax_)["verdict"] == "inconclusive"


def test_scaling_saturation_is_the_first_flat_doubling():
  from experiments import bench_scaling as bs
  rows = [{"x": b, "runners": {"jax": {"images_per_s": v}}}
          for b, v in ((8, 100.0), (16, 190.0), (32, 205.0), (64, 300.0))]
  assert bs.saturation(rows, "jax") == 16        # 190 -> 205 is < 10 %
  assert bs.saturation(rows[:2], "jax") is None  # still scaling
  assert bs.saturation(rows, "torch_eager") is None


def test_scaling_quick_run_writes_json_plot_and_markdown(tmp_path, monkeypatch):
  import os
  from experiments import bench_scaling as bs
  monkeypatch.setenv("XLA_FLAGS", os.environ.get("XLA_FLAGS", ""))
  out, png, md = tmp_path / "s.json", tmp_path / "s.png", tmp_path / "B.md"
  bs.main(["--quick", "--sweeps=devries/batch", "--device=cpu", f"--out={out}",
           f"--plot={png}", f"--markdown={md}"])
  data = json.loads(out.read_text())
  assert [p["x"] for p in data["points"]] == [4, 8]
  for p in data["points"]:
    assert p["batch_size"] == p["x"] and p["sweep"] == "devries/batch"
    for fw in ("jax", "torch_eager"):
      e = p["runners"][fw]
      assert len(e["raw_s_per_iter"]) == 2 and e["images_per_s"] > 0
    assert p["runners"]["jax"]["flops_per_step"] > 0
  # The FLOP count grows with the batch (the same net, twice the examples).
  f4, f8 = (p["runners"]["jax"]["flops_per_step"] for p in data["points"])
  assert 1.8 < f8 / f4 < 2.2
  assert set(data["saturation"]["devries/batch"]) == {"jax", "torch_eager"}
  assert data["peak_matmul_gflops"] > 0
  assert png.stat().st_size > 1000
  text = md.read_text()
  assert text.count("bench:scaling-cpu-quick:start") == 1 and "s.png" in text


def test_profile_op_summary_sums_device_ops_per_step():
  from experiments import bench_profile as bp
  meta = lambda pid, name: {"ph": "M", "name": "process_name", "pid": pid,
                            "args": {"name": name}}
  x = lambda pid, name, dur: {"ph": "X", "pid": pid, "name": name, "dur": dur}
  trace = {"traceEvents": [
      meta(1, "/host:CPU"), meta(2, "/device:GPU:0"),
      x(1, "PjitFunction(step)", 9000.0),             # host: not counted
      x(2, "fusion.1", 300.0), x(2, "fusion.1", 300.0), x(2, "conv.2", 1200.0),
      x(2, "fusion.1", 300.0), x(2, "conv.2", 1200.0), x(2, "copy", 60.0)]}
  s = bp.op_summary(trace, steps=2, top=2)
  assert s["device_ms_per_step"] == pytest.approx((900 + 2400 + 60) / 1e3 / 2)
  (n0, ms0, share0, c0), (n1, ms1, _, c1) = s["top_ops"]
  assert (n0, n1) == ("conv.2", "fusion.1")
  assert ms0 == pytest.approx(1.2) and c0 == 1 and c1 == 1.5
  assert share0 == pytest.approx(2400 / 3360)
  empty = bp.op_summary({"traceEvents": [meta(1, "/host:CPU")]}, steps=1)
  assert empty["top_ops"] == [] and "/host:CPU" in empty["note"]
  assert bp.group_dirname("chu_unet/stage2 [bfloat16]") == "chu_unet_stage2_bfloat16"


def test_gpu_session_script_parses_and_refuses_without_a_gpu(tmp_path):
  # The full session runs on a GPU machine (or QUICK=1 DEVICE=cpu by hand);
  # here: its syntax, and the one-line refusal where JAX sees no GPU.
  import os
  import subprocess
  script = bench.REPO / "benchmarks" / "gpu_session.sh"
  subprocess.run(["bash", "-n", str(script)], check=True)
  env = dict(os.environ, OUT=str(tmp_path / "out"), JAX_PLATFORMS="cpu")
  env.pop("DEVICE", None)
  r = subprocess.run(["bash", str(script)], env=env, capture_output=True,
                     text=True, timeout=120)
  assert r.returncode == 2, r.stdout + r.stderr
  assert "refused: JAX sees no GPU" in r.stdout
  assert "refused" in (tmp_path / "out" / "session.log").read_text()
