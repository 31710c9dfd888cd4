"""Device memory: what a device offers, and what XLA says a compiled program needs of it."""

from __future__ import annotations

from typing import Any


def device_memory_bytes(devices: list[Any]) -> int:
    """Memory per device: the allocator's limit (the smallest), or host RAM / devices on CPU."""
    stats = [d.memory_stats() for d in devices]
    if all(s and "bytes_limit" in s for s in stats):
        return min(int(s["bytes_limit"]) for s in stats)
    with open("/proc/meminfo") as f:
        meminfo = dict(line.split(":", 1) for line in f)
    return int(meminfo["MemAvailable"].split()[0]) * 1024 // len(devices)


def memory_in_use_gib(devices: list[Any]) -> dict[str, float]:
    """What the fullest of `devices` holds now and held at its peak, in GiB (composer's memory
    monitor); empty where the backend keeps no statistics (CPU)."""
    stats = [d.memory_stats() for d in devices]
    if not stats or not all(s and "bytes_in_use" in s for s in stats):
        return {}
    out = {"memory_gib": max(s["bytes_in_use"] for s in stats) / 2**30}
    if all("peak_bytes_in_use" in s for s in stats):
        out["peak_memory_gib"] = max(s["peak_bytes_in_use"] for s in stats) / 2**30
    return out


def compiled_bytes(compiled: Any) -> int | None:
    """XLA's per-device footprint of a compiled program: arguments + outputs + temps - aliased.

    None where the backend gives no memory analysis.
    """
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return (
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )


def describe_bytes(n: float) -> str:
    """A size for people: 1.5 GiB, 320 MiB, 12 KiB."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}" if unit == "GiB" else f"{n / scale:.0f} {unit}"
    return f"{n / 2**10:.0f} KiB"
