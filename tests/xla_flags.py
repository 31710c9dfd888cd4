"""XLA flags for the tests and the processes they start (no jax import: conftest sets them)."""

from importlib.metadata import version

# The suite compiles far more than it computes: XLA's CPU backend at -O0 compiles about 40% faster
# (tests/test_train.py + test_model.py from a cold cache: 173 s -> 107 s on 2 cores).
FAST_CPU_COMPILE = "--xla_backend_optimization_level=0"
# And without jaxlib 0.10's MLIR fusion emitters (XLA falls back to its older LLVM ones) and the
# concurrency-optimized scheduler, 44% less again: 4 tests/test_train.py tests and 17
# interpreted-kernel cases of tests/test_flash_attention.py from a cold cache, 161 s -> 91 s of
# CPU time (jaxlib 0.10.2, 2 cores). jaxlib 0.11 has no such switch (an unknown flag stops XLA).
SIMPLER_CPU_COMPILE = "--xla_cpu_enable_concurrency_optimized_scheduler=false" + (
    " --xla_cpu_use_fusion_emitters=false" if version("jaxlib").startswith("0.10.") else ""
)


def xla_flags(host_devices: int | None = None) -> str:
    """XLA_FLAGS with the fast CPU compile, and `host_devices` forced host devices if given."""
    fast = f"{FAST_CPU_COMPILE} {SIMPLER_CPU_COMPILE}"
    if host_devices is None:
        return fast
    return f"--xla_force_host_platform_device_count={host_devices} {fast}"
