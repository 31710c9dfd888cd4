"""mpt_jax.sass and tools/kernel_sass.py: our kernels' machine code, compiled for an H200 here.

The compile needs jax's CUDA PJRT plugin (`make setup` installs it) and the reading NVIDIA's
cuobjdump and nvdisasm (`make nvidia-tools`).
"""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest

from mpt_jax import sass

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_train
import kernel_sass


def _tools_missing() -> str | None:
    if (
        not bench_train.DEFAULT_AOT_PLUGIN.is_dir()
        and importlib.util.find_spec("jax_plugins") is None
    ):
        return "no CUDA PJRT plugin (make setup installs it)"
    try:
        sass.nvidia_tool("cuobjdump"), sass.nvidia_tool("nvdisasm")
    except sass.SassError as e:
        return str(e)
    return None


needs_tools = pytest.mark.skipif(_tools_missing() is not None, reason=str(_tools_missing()))


def test_snappy_literals_and_back_references():
    # 10 bytes: literal "ab", then 8 bytes copied from 2 back (overlapping: "abababab")
    assert sass.snappy_decompress(b"\x0a\x04ab\x11\x02") == b"ababababab"
    # 8 bytes: literal "abcd", then a 2-byte-offset copy of 4 bytes from 4 back
    assert sass.snappy_decompress(b"\x08\x0cabcd\x0e\x04\x00") == b"abcdabcd"
    with pytest.raises(sass.SassError, match="back-reference 3 bytes back from 2"):
        sass.snappy_decompress(b"\x0a\x04ab\x11\x03")
    with pytest.raises(sass.SassError, match="4 bytes decoded where the header says 5"):
        sass.snappy_decompress(b"\x05\x0cabcd")


def test_bytes_without_a_cubin_have_none():
    assert sass.cubins(b"\x7fELF\x02\x01 not a cubin" * 10) == []


ROOT = Path(__file__).resolve().parents[1]
# the plugin must be on the path before jax starts its backends: a process of its own, as
# bench_train --aot runs its rows
# argv: plugin folder, tools folder, impl, the Hopper backward's launches
_READ_KERNELS = """
import dataclasses, json, sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import kernel_sass
from mpt_jax import sass
from mpt_jax.kernels.flash_attention import Tiling, Tilings
from mpt_jax.kernels.flash_attention_mgpu import HopperTiling
tilings = Tilings(Tiling(128, 32, 8, 2), Tiling(64, 64, 4, 2), Tiling(64, 64, 4, 2))
hopper = HopperTiling(bwd_launches=int(sys.argv[4]))
compiled = kernel_sass.compile_attention(
    "h200", (1, 256, 2, 64), sys.argv[3], tilings, hopper=hopper
)
kernels = sass.read_kernels(sass.executable_cubins(compiled))
print(json.dumps([dataclasses.asdict(k) for k in kernels]))
"""


def _run(argv: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def _read_kernels(impl: str, launches: int = 1) -> dict[str, dict]:
    """Our kernels (fields of sass.KernelCode) compiled for an H200 at (1, 256, 2, 64), by name
    (Mosaic GPU's `_mosaic_gpu_kernel` suffix dropped)."""
    plugin = str(bench_train.DEFAULT_AOT_PLUGIN)
    tools = str(ROOT / "tools")
    result = _run([sys.executable, "-c", _READ_KERNELS, plugin, tools, impl, str(launches)])
    assert result.returncode == 0, result.stderr[-2000:]
    return {
        k["name"].removesuffix("_mosaic_gpu_kernel"): k
        for k in json.loads(result.stdout.splitlines()[-1])
        if k["name"].startswith("mpt_flash_")
    }


@needs_tools
def test_our_triton_kernels_compile_to_hoppers_warpgroup_mma_with_the_tilings_shapes():
    """Compiled for an H200: forward, dq and dk/dv are HGMMA (wgmma), not the per-warp HMMA.
    The forward's QK^T has N = block_k and its PV N = the head dim, so the instruction
    shapes follow the tiling (here 128 x 32 blocks, head dim 64)."""
    kernels = _read_kernels("pallas_gpu")
    assert {"mpt_flash_fwd", "mpt_flash_dq", "mpt_flash_dkdv"} <= set(kernels)
    for name in ("mpt_flash_fwd", "mpt_flash_dq", "mpt_flash_dkdv"):
        ops = kernels[name]["matrix_instructions"]
        assert any(op.startswith("HGMMA") for op in ops), (name, ops)
        assert not any(op.startswith("HMMA") for op in ops), (name, ops)
        assert 0 < kernels[name]["registers"] <= 255
    shapes = {op.split(".")[1] for op in kernels["mpt_flash_fwd"]["matrix_instructions"]}
    assert shapes == {"64x32x16", "64x64x16"}


@pytest.mark.slow
@needs_tools
def test_the_tool_writes_its_table(tmp_path):
    out = tmp_path / "sass.md"
    result = _run(
        [sys.executable, "tools/kernel_sass.py", "--shape", "1,256,2,64", "--out", str(out)]
    )
    assert result.returncode == 0, result.stderr[-2000:]
    text = out.read_text()
    assert "compiled for a h200" in text and text == result.stdout
    rows = [line for line in text.splitlines() if line.startswith("| mpt_flash_")]
    assert len(rows) == 3 and all("HGMMA" in row for row in rows)
    assert not list(tmp_path.glob(".*.tmp*"))  # no temporary left


def test_a_program_compiled_for_this_cpu_has_no_cubin():
    compiled = jax.jit(lambda x: x * 2).lower(jnp.ones(4)).compile()
    with pytest.raises(sass.SassError, match="no cubin in the serialized executable"):
        sass.executable_cubins(compiled)


def test_bad_arguments_are_refused_in_one_line(capsys):
    with pytest.raises(SystemExit):
        kernel_sass.main(["--shape", "8,2048,16"])
    assert "--shape: want B,S,H,K, got '8,2048,16'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        kernel_sass.main(["--sweep", "dq", "--impl", "pallas_mgpu"])
    assert "--sweep: the tiling candidates are the Triton kernels'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        kernel_sass.main(["--impl", "pallas_mgpu", "--hopper", "bwd_blocks=2"])
    assert "FIELD one of block_kv, block_q," in capsys.readouterr().err
    with pytest.raises(SystemExit):
        kernel_sass.main(["--impl", "pallas_mgpu", "--hopper", "bwd_launches=3"])
    assert "HopperTiling.bwd_launches: must be 1 or 2" in capsys.readouterr().err


@pytest.mark.slow
@needs_tools
@pytest.mark.parametrize(
    ("launches", "backward"),
    [(1, ["mpt_flash_mgpu_bwd"]), (2, ["mpt_flash_mgpu_dq", "mpt_flash_mgpu_dkdv"])],
)
def test_our_hopper_kernels_compile_here_and_overlap_products_with_the_softmax(launches, backward):
    """The Mosaic GPU kernels compile for an H200 on this host (their host code links against
    the plugin's Mosaic GPU runtime, which `aot` loads), all HGMMA; forward and backward wait
    for a product while the next is still in flight (a wait leaving one in flight),
    FlashAttention-3's order, where waiting for every product left the tensor cores idle
    during each exponential (and ptxas, serializing products whose registers change in
    flight, would wait after each)."""
    kernels = _read_kernels("pallas_mgpu", launches)
    assert sorted(kernels) == sorted(["mpt_flash_mgpu_fwd", *backward])
    for name, kernel in kernels.items():
        ops = kernel["matrix_instructions"]
        assert ops and all(op.startswith("HGMMA") for op in ops), (name, ops)
    for name in ["mpt_flash_mgpu_fwd", *backward]:
        assert any(int(left) >= 1 for left in kernels[name]["wgmma_waits"]), kernels[name]
        # and ptxas left the exponentials there, not below the next full wait
        assert kernels[name]["exponentials_in_flight"] >= 16, kernels[name]


def test_the_listing_is_counted_per_kernel():
    listing = """
        .section .text.first,"ax",@progbits
        /*0010*/                   HGMMA.64x64x16.F32.BF16 R24, gdesc[UR4], RZ ;
        /*0020*/              @!P0 HGMMA.64x64x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0030*/                   WARPGROUP.DEPBAR.LE gsb0, 0x1 ;
        /*0040*/                   LDL.64 R2, [R1+0x8] ;
        /*0048*/                   MUFU.EX2 R3, R3 ;
        /*0050*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;
        /*0058*/                   MUFU.EX2 R4, R4 ;
        .section .text.second,"ax",@progbits
        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
        /*0020*/               @P1 STL [R1+0x10], R4 ;
        /*0030*/                   MUFU.EX2 R5, R5 ;
    """
    counts = sass._listing_counts(listing)
    assert counts["first"].matrix == {"HGMMA.64x64x16.F32.BF16": 2}
    assert counts["first"].waits == {1: 1, 0: 1} and counts["first"].spills == 1
    assert counts["first"].exponentials_in_flight == 1  # the one after the full wait is not
    assert counts["second"].matrix == {"HMMA.16816.F32.BF16": 1}
    assert counts["second"].waits == {} and counts["second"].spills == 1
    assert counts["second"].exponentials_in_flight == 0  # HMMA is synchronous
