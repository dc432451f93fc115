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


def test_quick_run_writes_json_and_markdown(tmp_path, monkeypatch):
  # main() adds its CPU XLA flags to os.environ; restore it afterwards.
  monkeypatch.setenv("XLA_FLAGS", __import__("os").environ.get("XLA_FLAGS", ""))
  out, md = tmp_path / "b.json", tmp_path / "B.md"
  results = bench.main([
      "--quick", "--models=devries", "--frameworks=jax,torch_eager",
      "--repeats=2", "--device=cpu", f"--out={out}", f"--markdown={md}"])
  data = json.loads(out.read_text())
  assert data["hardware"] == results["hardware"] == "cpu-quick"
  m = data["machine"]
  assert m["cpu_model"] and m["cpu_affinity"] >= 1 and m["versions"]["jax"]
  (g,) = data["benchmarks"]
  run = g["runners"]
  assert {"jax", "torch_eager", "jax+augment", "augment_only", "jnp.dot",
          "torch.mm", "pipeline", "pipeline+transfer"} <= set(run)
  for entry in run.values():
    assert len(entry["raw_s_per_iter"]) == 2
    assert all(t > 0 for t in entry["raw_s_per_iter"])
    assert entry["median_s"] == pytest.approx(np.median(entry["raw_s_per_iter"]))
  assert run["jax"]["flops_per_step"] > 0 and run["jax"]["compile_s"] >= 0
  assert 0 < run["jax"]["pct_of_peak"] and data["peak_matmul_gflops"] > 0
  assert g["jax_speedup_vs_torch_eager"] > 0
  assert g["pipeline_vs_step_consumption"] > 0
  assert "augment_overhead_in_step" in g
  # Same initial weights, same batch, no dropout in --quick: the first losses
  # of the two frameworks' steps agree.
  assert run["torch_eager"]["first_loss"] == pytest.approx(
      run["jax"]["first_loss"], rel=1e-3)
  text = md.read_text()
  assert "<!-- bench:cpu-quick:start -->" in text
  assert "python -m experiments.bench --quick --models=devries" in text
  assert "| devries | 4 | jax |" in text
