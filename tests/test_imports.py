"""The core package imports without PyTorch or TensorFlow (DESIGN.md)."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

_CODE = (
    "import tml, tml.targets, tml.losses, tml.metrics, tml.early_stopping, "
    "tml.landmarks, tml.train_step, tml.export, tml.engine; "
    # The tml.torch package itself imports nothing (its modules import torch).
    "import tml.torch; import sys; "
    "bad = [m for m in ('torch', 'tensorflow') if m in sys.modules]; "
    "assert not bad, f'imported {bad}'")


def test_core_modules_import_without_torch_or_tensorflow():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env["PYTHONPATH"] = os.pathsep.join(
      [str(REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  proc = subprocess.run([sys.executable, "-c", _CODE], cwd=REPO_ROOT, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
