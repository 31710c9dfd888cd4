"""Compile for a GPU this host does not have: XLA's deviceless compilation for an H100 or H200.

    devices = aot.compile_only_devices("h200")  # on a CPU host, with the CUDA PJRT plugin
    mesh = sharding.make_mesh(cfg.mesh, devices)
    with aot.lowering_for(mesh):
        compiled = step.trace(*abstract_args).lower().compile()
    compiled.memory_analysis(), compiled.as_text()  # XLA GPU's buffers and optimized HLO

XLA compiles for a GPU from a description of it (a `GpuTargetConfigProto`: compute capability,
SMs, shared memory, memory size and bandwidth); jax passes one to the CUDA PJRT plugin as the
`target_config` of a topology whose devices can compile but not run. The program is the one a
GPU host would build, fusions, buffer assignment and our Triton kernels included, with two
differences: nothing is autotuned (XLA's GEMM backends and tilings are its defaults, not the
fastest measured), and XLA's rematerialization limit comes from the card's memory size here
rather than from the allocator's limit.

The plugin (`jax-cuda13-pjrt` and `jax-cuda13-plugin`, the installed jaxlib's version, no CUDA
libraries needed) must be importable, and jax should run with `JAX_PLATFORMS=cpu` so that it
does not try to open a GPU: `tools/bench_train.py --aot CARD` sets both up for its rows.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@dataclasses.dataclass(frozen=True)
class GpuCard:
    """The figures XLA's GPU compiler reads from a device (NVIDIA's published specifications)."""

    device_kind: str
    compute_capability: tuple[int, int]
    sm_count: int
    clock_ghz: float
    memory_bytes: int
    memory_bandwidth: float  # bytes/s
    l2_cache_bytes: int
    shared_memory_per_sm: int
    shared_memory_per_block_optin: int

    def target_config(self) -> str:
        """The card as a `GpuTargetConfigProto` in text format."""
        major, minor = self.compute_capability
        info = {
            "threads_per_block_limit": 1024,
            "threads_per_warp": 32,
            "shared_memory_per_block": 48 * 1024,
            "shared_memory_per_core": self.shared_memory_per_sm,
            "threads_per_core_limit": 2048,
            "core_count": self.sm_count,
            "fpus_per_core": 128,
            "block_dim_limit_x": 2**31 - 1,
            "block_dim_limit_y": 65535,
            "block_dim_limit_z": 65535,
            "memory_bandwidth": int(self.memory_bandwidth),
            "l2_cache_size": self.l2_cache_bytes,
            "clock_rate_ghz": self.clock_ghz,
            "device_memory_size": self.memory_bytes,
            "shared_memory_per_block_optin": self.shared_memory_per_block_optin,
            "registers_per_core_limit": 65536,
            "registers_per_block_limit": 65536,
        }
        fields = "\n".join(f"  {key}: {value}" for key, value in info.items())
        return (
            f"gpu_device_info {{\n{fields}\n"
            f"  cuda_compute_capability {{ major: {major} minor: {minor} }}\n}}\n"
            'platform_name: "CUDA"\n'
            "dnn_version_info { major: 9 minor: 10 }\n"
            f'device_description_str: "{self.device_kind}"\n'
        )


# Hopper SXM: 132 SMs at up to 1.98 GHz, 228 KiB of shared memory per SM (227 KiB per block),
# 50 MB of L2; memory as nvidia-smi reports it (81,559 and 143,771 MiB)
_HOPPER = dict(
    compute_capability=(9, 0),
    sm_count=132,
    clock_ghz=1.98,
    l2_cache_bytes=50 * 2**20,
    shared_memory_per_sm=228 * 1024,
    shared_memory_per_block_optin=227 * 1024,
)
CARDS: dict[str, GpuCard] = {
    "h100": GpuCard(
        "NVIDIA H100 80GB HBM3", memory_bytes=81_559 * 2**20, memory_bandwidth=3.35e12, **_HOPPER
    ),
    "h200": GpuCard(
        "NVIDIA H200", memory_bytes=143_771 * 2**20, memory_bandwidth=4.8e12, **_HOPPER
    ),
}


class AotUnavailable(RuntimeError):
    """This jax cannot compile for a GPU without one (no CUDA PJRT plugin)."""


def card(name: str) -> GpuCard:
    """A card of CARDS by name; a one-line error names the known ones."""
    if name not in CARDS:
        raise ValueError(f"unknown GPU card {name!r}: expected one of {', '.join(CARDS)}")
    return CARDS[name]


def plugin_packages() -> str:
    """The CUDA PJRT plugin's pip requirements, matched to the installed jaxlib (`make
    aot-plugin` installs these)."""
    import jaxlib

    version = jaxlib.__version__
    return f"jax-cuda13-pjrt=={version} jax-cuda13-plugin=={version}"


def plugin_requirement() -> str:
    """The pip line that installs the CUDA PJRT plugin matching the installed jaxlib."""
    return f"pip install --no-deps {plugin_packages()}"


def use_plugin(folder: str | os.PathLike) -> None:
    """Make the CUDA PJRT plugin installed in `folder` (`make aot-plugin`) importable and keep
    jax on the CPU; call before jax opens its first backend."""
    import jax

    sys.path.insert(0, str(folder))
    jax.config.update("jax_platforms", "cpu")


def compile_only_devices(name: str) -> list[Any]:
    """One compile-only device of the named card (`CARDS`): programs compile for it, never run."""
    spec = card(name)
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            spec.device_kind, platform="cuda", topology="1x1x1", target_config=spec.target_config()
        )
    except (NotImplementedError, RuntimeError) as e:
        raise AotUnavailable(
            f"cannot compile for a {name} without one: jax's CUDA PJRT plugin is missing or"
            f" failed ({str(e).splitlines()[0] if str(e) else type(e).__name__});"
            f" {plugin_requirement()}, and run with JAX_PLATFORMS=cpu"
        ) from e
    _load_mosaic_gpu_runtime()
    return list(topology.devices)


def _load_mosaic_gpu_runtime() -> None:
    """Load the CUDA plugin's Mosaic GPU runtime into the process's global symbols.

    Mosaic GPU's compiler links its kernels' host code (TMA descriptors, the launch) against
    that runtime's symbols, which only a started GPU backend loads; a compile-only program has
    none, and compiling our Hopper kernels failed on those symbols.
    """
    try:
        import jax_cuda13_plugin
    except ImportError:
        return
    runtime = Path(jax_cuda13_plugin.__file__).parent / "libmosaic_gpu_runtime.so"
    if runtime.exists():
        ctypes.CDLL(str(runtime), mode=ctypes.RTLD_GLOBAL)


@contextlib.contextmanager
def lowering_for(mesh: Any, device_kind: str | None = None) -> Iterator[None]:
    """Trace and lower for `mesh`'s compile-only GPU devices, or for `mesh`'s shape (a Mesh or an
    AbstractMesh) on the GPU `device_kind` names (tests lowering for CUDA on any host).

    jax's Triton lowering asks the device in use for its compute capability; with no GPU in the
    process an abstract mesh of the same shape, naming the card, answers.
    """
    import jax

    kind = device_kind or mesh.devices.flat[0].device_kind
    device = jax.sharding.AbstractDevice(device_kind=kind, num_cores=None, platform="gpu")
    target = jax.sharding.AbstractMesh(
        mesh.axis_sizes, mesh.axis_names, mesh.axis_types, abstract_device=device
    )
    with jax.sharding.use_abstract_mesh(target):
        yield
