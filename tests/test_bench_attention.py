"""tools/bench_attention.py --tune, run through on CPU with the kernels interpreted."""

import importlib.util
import sys
from pathlib import Path

from mpt_jax.kernels.flash_attention import Tiling, Tilings, default_tilings

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "bench_attention", REPO / "tools" / "bench_attention.py"
)
bench_attention = importlib.util.module_from_spec(_spec)
sys.modules["bench_attention"] = bench_attention
_spec.loader.exec_module(bench_attention)


def test_tune_sweeps_each_kernel_skips_failures_and_checks_the_winner(monkeypatch):
    # the default goes first; a zero block cannot tile anything: that candidate fails and the
    # sweep goes on
    default = Tilings(fwd=Tiling(32, 16, 4, 2), dq=Tiling(16, 16, 4, 2), dkv=Tiling(16, 32, 4, 2))
    monkeypatch.setattr(bench_attention, "default_tilings", lambda head_dim: default)
    blocks = {"fwd": [(0, 16), (32, 16)], "dq": [(16, 16)], "dkv": [(16, 32)]}
    lines, winners = bench_attention.tune(
        [32],
        reps=1,
        budget_s=600,
        shape=(1, 32, 4),
        blocks=blocks,
        warps=(4,),
        stages=(2,),
        interpret=True,
    )
    candidates = [line for line in lines if line.startswith("| 32 |")]
    assert [line.split(" | ")[1:3] for line in candidates] == [
        ["fwd", "32 x 16"],
        ["fwd", "0 x 16"],
        ["dq", "16 x 16"],
        ["dkv", "16 x 32"],
    ]
    assert [("failed" in line) for line in candidates] == [False, True, False, False]
    assert winners[32] == default
    assert f"best tilings, head dim 32: {default!r}" in lines
    checks = [line for line in lines if line.startswith("check ")]
    assert len(checks) == 4 and all(line.endswith("OK") for line in checks), checks
    assert any(line.startswith("fwd+bwd (1, 32, 4, 32): default") for line in lines)


def test_tune_past_its_budget_still_times_every_kernel_at_its_default():
    blocks = {kernel: [(16, 16), (32, 32)] for kernel in ("fwd", "dq", "dkv")}
    lines, winners = bench_attention.tune(
        [32], reps=1, budget_s=0, shape=(1, 32, 4), blocks=blocks, interpret=True
    )
    candidates = [line.split(" | ")[1:5] for line in lines if line.startswith("| 32 |")]
    defaults = [getattr(default_tilings(32), kernel) for kernel in ("fwd", "dq", "dkv")]
    assert candidates == [
        [kernel, f"{t.block_q} x {t.block_k}", str(t.num_warps), str(t.num_stages)]
        for kernel, t in zip(("fwd", "dq", "dkv"), defaults, strict=True)
    ]
    assert winners[32] == default_tilings(32)


def test_once_runs_each_program_a_single_time_with_finite_gradients():
    impls = (("ours", "pallas_gpu", True), ("reference", "xla", True), ("no ALiBi", "xla", False))
    lines = bench_attention.run_once(shape=(1, 40, 2, 16), impls=impls)
    assert lines == [
        f"ran once: {label} fwd+bwd at (1, 40, 2, 16), gradients finite: True"
        for label, _, _ in impls
    ]
