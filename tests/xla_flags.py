"""XLA flags for the tests and the processes they start (no jax import: conftest sets them)."""

# The suite compiles far more than it computes: XLA's CPU backend at -O0 compiles about 40% faster
# (tests/test_train.py + test_model.py from a cold cache: 173 s -> 107 s on 2 cores).
FAST_CPU_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(host_devices: int | None = None) -> str:
    """XLA_FLAGS with the fast CPU compile, and `host_devices` forced host devices if given."""
    if host_devices is None:
        return FAST_CPU_COMPILE
    return f"--xla_force_host_platform_device_count={host_devices} {FAST_CPU_COMPILE}"
