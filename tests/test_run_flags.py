"""experiments.run sets the CPU XLA flags measured faster, unless the user did."""
from experiments import run as run_lib


def test_adds_missing_cpu_flags_and_keeps_the_users():
  env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
  added = run_lib.set_default_cpu_flags(env)
  assert added == list(run_lib.CPU_XLA_FLAGS)
  assert env["XLA_FLAGS"].startswith("--xla_force_host_platform_device_count=4 ")
  assert all(f in env["XLA_FLAGS"] for f in run_lib.CPU_XLA_FLAGS)
  # Idempotent, and a user's own choice of the same flag wins.
  assert run_lib.set_default_cpu_flags(env) == []
  mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=none"}
  assert run_lib.set_default_cpu_flags(mine) == []
  assert mine["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=none"
  empty = {}
  run_lib.set_default_cpu_flags(empty)
  assert empty["XLA_FLAGS"] == " ".join(run_lib.CPU_XLA_FLAGS)
