"""Test set-up: several fake CPU devices so data-parallel code runs for real.

The flag must be set before jax initialises its backends, hence at import time
of the conftest, before any test module imports jax.
"""
import os
import pathlib
import tempfile

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests build many identical step programs from fresh closures; a persistent
# compilation cache (keyed by the compiled program, shared by xdist workers
# and subprocess runs) compiles each of them once per session.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "tml-tests-jax-cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import pytest  # noqa: E402

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]
SHARED_DATA = pathlib.Path(
    os.environ.get("TML_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data():
  """Path to ../shared/data; skips (with the reason) where it is absent."""
  if not SHARED_DATA.is_dir():
    pytest.skip(f"real data not found at {SHARED_DATA} (set TML_SHARED_DATA)")
  return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def _backend_started_with_test_flags():
  """Start each worker's JAX backend under the flags set above, first.

  Entry points called in-process (``experiments.bench.main``, the inference
  bench) add their own CPU XLA flags to ``os.environ`` when no backend is
  running yet. Were such a test the first in an xdist worker to touch JAX,
  every later test of that worker would compile under those flags: other
  fusions (``chu_heatmap`` then materialises its (B, K, H, W) product) and
  other float32 rounding. Started here, the backend keeps this file's flags,
  and the entry points leave the environment alone (they see it running).
  """
  import jax
  jax.devices()
