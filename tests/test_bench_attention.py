"""tools/bench_attention.py --tune, run through on CPU with the kernels interpreted."""

import importlib.util
import sys
from pathlib import Path

from mpt_jax.kernels.flash_attention import Tiling, default_tilings

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location(
    "bench_attention", REPO / "tools" / "bench_attention.py"
)
bench_attention = importlib.util.module_from_spec(_spec)
sys.modules["bench_attention"] = bench_attention
_spec.loader.exec_module(bench_attention)


def test_tune_sweeps_each_kernel_skips_failures_and_checks_the_winner():
    # a zero block cannot tile anything: that candidate fails and the sweep goes on
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
    assert len(candidates) == 4
    assert [("failed" in line) for line in candidates] == [True, False, False, False]
    best = winners[32]
    assert best.fwd == Tiling(32, 16, 4, 2) and best.dq == Tiling(16, 16, 4, 2)
    assert best.dkv == Tiling(16, 32, 4, 2) and best != default_tilings(32)
    assert f"best tilings, head dim 32: {best!r}" in lines
    checks = [line for line in lines if line.startswith("check ")]
    assert len(checks) == 4 and all(line.endswith("OK") for line in checks), checks
    assert any(line.startswith("fwd+bwd (1, 32, 4, 32): default") for line in lines)
