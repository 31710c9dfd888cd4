"""Device memory: the allocator's statistics and XLA's estimate of a compiled program."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp

from mpt_jax.memory import compiled_bytes, describe_bytes, device_memory_bytes, memory_in_use_gib

GIB = 2**30


def device(**stats):
    return SimpleNamespace(memory_stats=lambda: stats or None)


def test_memory_in_use_is_the_fullest_devices():
    devices = [
        device(bytes_in_use=3 * GIB, peak_bytes_in_use=5 * GIB, bytes_limit=80 * GIB),
        device(bytes_in_use=4 * GIB, peak_bytes_in_use=4.5 * GIB, bytes_limit=80 * GIB),
    ]
    assert memory_in_use_gib(devices) == {"memory_gib": 4.0, "peak_memory_gib": 5.0}
    assert memory_in_use_gib([device(bytes_in_use=GIB)]) == {"memory_gib": 1.0}
    assert memory_in_use_gib(jax.devices()[:2]) == {}  # CPU: no statistics
    assert device_memory_bytes(devices) == 80 * GIB


def test_device_memory_on_cpu_is_host_memory_shared_among_devices():
    one, eight = device_memory_bytes(jax.devices()[:1]), device_memory_bytes(jax.devices()[:8])
    assert one > 0 and abs(one / 8 - eight) <= one / 8 * 0.25  # MemAvailable moves a little


def test_compiled_bytes_grow_with_the_program_and_sizes_read_well():
    def bytes_for(n):
        x = jax.ShapeDtypeStruct((n, n), jnp.float32)
        return compiled_bytes(jax.jit(lambda a: a @ a + 1).lower(x).compile())

    small, large = bytes_for(64), bytes_for(512)
    assert small >= 2 * 64 * 64 * 4 and large >= 2 * 512 * 512 * 4 and large > small
    assert describe_bytes(1.5 * GIB) == "1.5 GiB"
    assert describe_bytes(320 * 2**20) == "320 MiB"
    assert describe_bytes(12 * 2**10) == "12 KiB"
