"""Our attention kernels' machine code for a GPU, on a host without one.

    python tools/kernel_sass.py [--card h200] [--shape 8,2048,16,128] [--impl pallas_gpu]
    python tools/kernel_sass.py --sweep fwd dq dkv [--out sass_sweep.md]

Compiles causal ALiBi attention forward + backward (bf16) for a compile-only GPU
(`mpt_jax.aot`, jax's CUDA PJRT plugin: `make aot-plugin`) and reads each kernel's cubin
(`mpt_jax.sass`, NVIDIA's cuobjdump and nvdisasm: `make nvidia-tools`): registers
and stack per thread (a kernel at 255 registers with a stack spills), and its matrix
instructions, Hopper's warpgroup HGMMA (with their m x n x k shapes) or the per-warp HMMA.
`--sweep` does this for every tiling candidate of `tools/bench_attention.py --tune` of the
named Triton kernels (one kernel's tiling varied, the others at their defaults); its findings at
head dim 128 are the GPU sweep's first candidates (`bench_attention.TUNE_FIRST_128`). No kernel
runs; nothing here is a timing. `--impl pallas_mgpu` reads our Hopper kernels (jax 0.10 and 0.11:
`mpt_jax.aot` loads the plugin's Mosaic GPU runtime, whose symbols their host code links to).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # compile-only devices; jax must not open a GPU

import jax
import jax.numpy as jnp

from mpt_jax import aot, sass
from mpt_jax.atomic_write import write_atomic
from mpt_jax.attention import alibi_slopes
from mpt_jax.kernels.flash_attention import Tiling, Tilings, default_tilings, flash_attention
from mpt_jax.kernels.flash_attention_mgpu import HopperTiling, flash_attention_mgpu

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_attention
import bench_train

IMPLS = ("pallas_gpu", "pallas_mgpu")
KERNEL_NAMES = {"fwd": "mpt_flash_fwd", "dq": "mpt_flash_dq", "dkv": "mpt_flash_dkdv"}


def compile_attention(
    card: str, shape, impl: str, tilings: Tilings | None = None, hopper: HopperTiling | None = None
):
    """Forward + backward of causal ALiBi attention, compiled for one compile-only `card`;
    `tilings` for the Triton kernels (pallas_gpu), `hopper` for the Mosaic GPU ones."""
    B, S, H, K = shape
    device = aot.compile_only_devices(card)
    mesh = jax.sharding.Mesh(device, ("gpu",))
    whole = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    arg = jax.ShapeDtypeStruct((B, S, H, K), jnp.bfloat16, sharding=whole)
    slopes = alibi_slopes(H)

    def attend(q, k, v):
        if impl == "pallas_mgpu":
            return flash_attention_mgpu(q, k, v, alibi_slopes=slopes, tiling=hopper)
        return flash_attention(q, k, v, alibi_slopes=slopes, tilings=tilings)

    def loss(q, k, v):
        return attend(q, k, v).astype(jnp.float32).sum()

    with aot.lowering_for(mesh):
        lowered = jax.jit(jax.grad(loss, (0, 1, 2))).trace(arg, arg, arg)
        return lowered.lower(lowering_platforms=("cuda",)).compile()


def kernel_rows(compiled) -> list[sass.KernelCode]:
    """Our kernels (and any other kernel of the program) in the compiled program."""
    return sass.read_kernels(sass.executable_cubins(compiled))


def _instructions(kernel: sass.KernelCode) -> str:
    ops = sorted(kernel.matrix_instructions.items())
    return ", ".join(f"{n} {op}" for op, n in ops) or "none"


def _waits(kernel: sass.KernelCode) -> str:
    return ", ".join(f"{n} x {left}" for left, n in sorted(kernel.wgmma_waits.items())) or "none"


def _tiling(t: Tiling) -> str:
    return f"{t.block_q}x{t.block_k} w{t.num_warps} s{t.num_stages}"


def table(card: str, shape, impl: str, hopper: HopperTiling | None = None) -> list[str]:
    tiling = f" ({hopper})" if impl == "pallas_mgpu" and hopper else ""
    lines = [
        f"{impl}{tiling} at {shape} (B, S, H, K), bf16, causal ALiBi fwd+bwd, compiled for a"
        f" {card} (jax {jax.__version__})",
        "",
        "| kernel | registers | stack bytes | static shared bytes | matrix instructions"
        " | wgmma waits (count x products left in flight) | spill loads and stores"
        " | exponentials beside products in flight |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for k in kernel_rows(compile_attention(card, shape, impl, hopper=hopper)):
        cells = (k.registers, k.stack_bytes, k.shared_bytes, _instructions(k), _waits(k))
        row = (k.name, *cells, k.spill_accesses, k.exponentials_in_flight)
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return lines


def sweep(card: str, shape, kernels: list[str]) -> list[str]:
    """Registers, stack and HGMMA shapes of each --tune candidate of the named kernels."""
    default = default_tilings(shape[3])
    lines = [
        f"Tiling candidates of tools/bench_attention.py --tune at {shape}, compiled for a {card}"
        f" (jax {jax.__version__}); * marks the default",
        "",
        "| kernel | tiling (q x k, warps, stages) | registers | stack bytes | matrix instructions"
        " |",
        "|---|---|---|---|---|",
    ]
    for kernel in kernels:
        for candidate in bench_attention.tune_grid(bench_attention.TUNE_BLOCKS[kernel]):
            tilings = dataclasses.replace(default, **{kernel: candidate})
            mark = " *" if candidate == getattr(default, kernel) else ""
            try:
                compiled = compile_attention(card, shape, "pallas_gpu", tilings)
                (k,) = [k for k in kernel_rows(compiled) if k.name == KERNEL_NAMES[kernel]]
                cells = (k.registers, k.stack_bytes, _instructions(k))
            except Exception as e:  # shared memory exceeded and the like: the candidate is out
                cells = ("-", "-", f"failed: {str(e).splitlines()[0][:80]}")
            row = (kernel, _tiling(candidate) + mark, *cells)
            lines.append("| " + " | ".join(map(str, row)) + " |")
            print(lines[-1], file=sys.stderr, flush=True)
    return lines


def _hopper_field(text: str) -> tuple[str, int | None]:
    name, _, value = text.partition("=")
    fields = {f.name for f in dataclasses.fields(HopperTiling)}
    if name not in fields or not value:
        known = ", ".join(sorted(fields))
        raise argparse.ArgumentTypeError(f"want FIELD=VALUE, FIELD one of {known}; got {text!r}")
    try:
        return name, None if value == "None" else int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{name}: want an integer, got {value!r}") from None


def _shape(text: str) -> tuple[int, int, int, int]:
    try:
        B, S, H, K = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--shape: want B,S,H,K, got {text!r}") from None
    return B, S, H, K


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--card", choices=sorted(aot.CARDS), default="h200")
    parser.add_argument("--shape", type=_shape, default=(8, 2048, 16, 128))
    parser.add_argument("--impl", choices=IMPLS, default="pallas_gpu")
    parser.add_argument("--sweep", nargs="+", choices=sorted(KERNEL_NAMES), metavar="KERNEL")
    parser.add_argument(
        "--hopper",
        type=_hopper_field,
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="a HopperTiling field for --impl pallas_mgpu (repeatable), e.g. bwd_launches=2",
    )
    parser.add_argument("--out", type=Path, help="also write the table here (Markdown)")
    parser.add_argument(
        "--aot-plugin", type=Path, default=bench_train.DEFAULT_AOT_PLUGIN, help="make aot-plugin"
    )
    args = parser.parse_args(argv)
    if args.sweep and args.impl != "pallas_gpu":
        parser.error("--sweep: the tiling candidates are the Triton kernels' (--impl pallas_gpu)")
    if args.hopper and args.impl != "pallas_mgpu":
        parser.error("--hopper: the Hopper kernels' tiling (--impl pallas_mgpu)")
    try:
        hopper = HopperTiling(**dict(args.hopper))
    except ValueError as e:
        parser.error(f"--hopper: {e}")
    aot.use_plugin(args.aot_plugin)
    try:
        if args.sweep:
            lines = sweep(args.card, args.shape, args.sweep)
        else:
            lines = table(args.card, args.shape, args.impl, hopper)
    except (aot.AotUnavailable, sass.SassError) as e:
        print(f"kernel_sass: {e}", file=sys.stderr)
        return 2
    except jax.errors.JaxRuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        message = f"kernel_sass: compiling {args.impl} for a {args.card} failed: {first}"
        print(message, file=sys.stderr)
        return 2
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        write_atomic(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
