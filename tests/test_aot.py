"""Compiling the train step for an H200 on this CPU host (`bench_train.py --aot`, mpt_jax.aot).

The rows run as bench_train runs them, in a subprocess with jax's CUDA PJRT plugin (installed
by `make setup` into the venv's aot-plugin folder) and JAX_PLATFORMS=cpu.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from mpt_jax import aot, hlo_cost
from mpt_jax.config import ModelConfig, count_params
from mpt_jax.kernels.flash_attention import default_tilings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import bench_train

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    not bench_train.DEFAULT_AOT_PLUGIN.is_dir() and importlib.util.find_spec("jax_plugins") is None,
    reason=f"no CUDA PJRT plugin in {bench_train.DEFAULT_AOT_PLUGIN} (make setup installs it)",
)
ALIBI = ["alibi=true", "learned_pos_emb=false", "no_bias=true", "attn_impl=auto"]


def _specs(*extra: str, overrides=ALIBI) -> list[dict]:
    argv = ["--aot", "h200", "--models", "tiny", "--seq-lens", "64", "--global-batch", "4"]
    for override in overrides:
        argv += ["--model-override", override]
    return bench_train.plan_rows(bench_train.build_parser().parse_args([*argv, *extra]))


@pytest.mark.slow
def test_the_step_compiled_for_an_h200_does_the_model_flops_in_bf16_matmuls_and_our_kernels():
    spec = _specs("--loss-chunk", "none,16")
    results = [bench_train.run_isolated(s, timeout=300) for s in spec]
    model = ModelConfig.from_dict(spec[0]["model"])
    B, S, L, D = 4, 64, model.n_layers, model.d_model
    H, K = model.n_heads, D // model.n_heads
    norms = (2 * L + 1) * D  # LayerNorm scales, no biases: not matmul weights
    for result in results:
        assert result["status"] == "compiled", result["status"]
        assert result["device_kind"] == "NVIDIA H200"
        work = result["aot"]
        # every weight once forward and twice backward (input and weight gradients), the tied
        # embedding as the output head: llm-foundry's 6 N per token, norms aside, whole logits
        # or chunked alike
        assert work["matmul_flops"] == 6 * B * S * (count_params(model) - norms)
        # our three kernels per layer: 9 matmuls of 2 K FLOPs per causal (query, key) pair of
        # the sequence padded to their blocks
        Sp = default_tilings(K).padded_length(S)
        assert work["attention_flops"] == L * 9 * 2 * K * B * H * Sp * (Sp + 1) / 2
        # the fp32 parameters and two Adam moments at least
        assert result["estimated_bytes"] >= 12 * count_params(model)
        assert work["seconds"]["total"] > 0


@pytest.mark.slow
def test_scanned_layers_store_activations_with_copies_that_unrolled_layers_avoid():
    scanned, unrolled = (
        bench_train.run_isolated(_specs(overrides=[*ALIBI, f"scan_layers={v}"])[0], timeout=300)
        for v in ("true", "false")
    )
    assert scanned["status"] == unrolled["status"] == "compiled"
    # the same work in the matmuls; the scan writes each layer's saved activations into stacked
    # buffers and reads them back out: more bytes in copies
    assert scanned["aot"]["matmul_flops"] == unrolled["aot"]["matmul_flops"]
    assert scanned["aot"]["copies_bytes"] > unrolled["aot"]["copies_bytes"]


@pytest.mark.slow
def test_pallas_norms_move_fewer_bytes_than_xla_norms_for_the_same_flops():
    rows = {
        impl: bench_train.run_isolated(
            _specs(overrides=[*ALIBI, "scan_layers=false", f"norm_impl={impl}"])[0], timeout=300
        )
        for impl in ("xla", "pallas_gpu")
    }
    xla, fused = (rows[impl]["aot"] for impl in ("xla", "pallas_gpu"))
    assert xla["matmul_flops"] == fused["matmul_flops"]
    assert xla["attention_flops"] == fused["attention_flops"]
    # per layer XLA writes and re-reads a float32 x-hat in the forward and needs a column
    # reduction, a second pass and a cast in the backward; the kernels take one pass each way
    # (the tiny model: 30.7 MB -> 20.3 MB on 2026-12-06)
    assert fused["elementwise_bytes"] < 0.8 * xla["elementwise_bytes"]


@pytest.mark.slow
def test_the_tool_writes_the_table_and_a_report_per_row(tmp_path):
    argv = [
        *("--aot", "h200", "--models", "tiny", "--seq-lens", "64", "--global-batch", "4"),
        *("--aot-rates", "matmul=500,memory=2", "--out", str(tmp_path)),
    ]
    for override in ALIBI:
        argv += ["--model-override", override]
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_train.py"), *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    table = (tmp_path / "bench_train.md").read_text()
    assert "| Predicted MFU |" in table and "| compiled |" in table
    (report,) = tmp_path.glob("*.aot.md")
    assert "| attention | 6 |" in report.read_text()  # 2 layers x 3 kernels


def test_without_the_plugin_a_row_fails_in_one_line_naming_the_install(tmp_path):
    (spec,) = _specs("--aot-plugin", str(tmp_path))
    if importlib.util.find_spec("jax_plugins") is not None:
        pytest.skip("the plugin is installed in this Python's own packages")
    result = bench_train.run_isolated(spec, timeout=300)
    assert result["status"].startswith("failed: AotUnavailable: cannot compile for a h200")
    assert "jax-cuda13-pjrt==" in result["status"] or result["status"].endswith("...")


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--aot-rates", "matmul=1"], "--aot-rates: only with --aot"),
        (["--aot", "h200", "--aot-rates", "speed=3"], "expected KEY=VALUE with KEY in"),
        (["--aot", "h200", "--aot-rates", "memory=-1"], "memory must be a number > 0"),
        (["--aot", "b200"], "invalid choice: 'b200'"),
    ],
)
def test_bad_aot_arguments_are_refused_in_one_line(argv, message):
    done = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "bench_train.py"), "--models", "tiny", *argv],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert message in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_card_target_configs_name_hopper():
    assert set(aot.CARDS) == {"h100", "h200"}
    text = aot.card("h200").target_config()
    assert "cuda_compute_capability { major: 9 minor: 0 }" in text
    assert 'device_description_str: "NVIDIA H200"' in text
    with pytest.raises(ValueError, match="unknown GPU card 'a100': expected one of h100, h200"):
        aot.card("a100")


def test_rates_default_to_the_h200_calibration():
    rates = bench_train.parse_aot_rates(None)
    assert rates == bench_train.AOT_RATES
    assert bench_train.parse_aot_rates("attention=250")["attention"] == 250.0
    assert json.dumps(rates)  # travels to the row subprocess
    assert hlo_cost.ATTENTION in hlo_cost.CATEGORY_ORDER
