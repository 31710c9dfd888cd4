"""FLOPs/MFU against llm-foundry's published benchmark tables; peaks; throughput; metric logs."""

import json
import math
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
from helpers import tensorboard_scalars

from mpt_jax import metrics
from mpt_jax.config import count_params, load_model_config
from mpt_jax.metrics import (
    PEAK_FLOPS,
    MetricsLogger,
    Throughput,
    flops_per_sequence,
    format_metrics,
    hardware_flops_per_sequence,
    mfu,
    peak_flops,
)

H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"

# Rows of llm-foundry's scripts/train/benchmarking/README.md tables:
# (preset, seq, GPUs, tok/s/GPU, device, MFU%, HFU%, activation checkpointing)
BENCHMARK_ROWS = [
    ("mpt-7b", 2048, 8, 10643, H100, 46.44, 46.44, False),
    ("mpt-1b", 2048, 8, 45455, H100, 41.82, 41.82, False),
    ("mpt-125m", 2048, 8, 142830, A100, 44.79, 44.79, False),
    ("mpt-7b", 8192, 8, 6935, H100, 37.14, 49.52, True),
    ("mpt-13b", 4096, 8, 4717, H100, 41.6, 55.47, True),
    ("mpt-760m", 32768, 8, 16291, H100, 31.84, 31.84, False),
    ("mpt-350m", 65536, 8, 7524, A100, 52.7, 52.7, False),
    ("mpt-3b", 512, 8, 12127, A100, 63.71, 63.71, False),
    ("mpt-30b", 8192, 8, 574, A100, 39.38, 52.5, True),
    ("mpt-70b", 2048, 64, 1039, H100, 42.57, 56.76, True),
]


@pytest.mark.parametrize("row", BENCHMARK_ROWS, ids=lambda r: f"{r[0]}-{r[1]}-{r[2]}")
def test_mfu_and_hfu_match_llm_foundry_tables(row):
    name, seq, gpus, tok_per_gpu, device, want_mfu, want_hfu, ckpt = row
    # The benchmark models' wpe has max_seq_len rows, so NumParams grows with seq.
    cfg = load_model_config(name, [f"max_seq_len={seq}"])
    peak = peak_flops(device, "amp_bf16")
    seqs_per_s = tok_per_gpu * gpus / seq
    model = mfu(seqs_per_s, flops_per_sequence(cfg, seq), gpus, peak)
    remat = "full" if ckpt else "none"
    hardware = mfu(seqs_per_s, hardware_flops_per_sequence(cfg, seq, remat), gpus, peak)
    assert 100 * model == pytest.approx(want_mfu, abs=0.05)
    assert 100 * hardware == pytest.approx(want_hfu, abs=0.05)


def test_7b_flops_per_sequence_is_the_readme_number():
    cfg = load_model_config("mpt-7b")
    assert count_params(cfg) == 6_658_859_008
    flops = flops_per_sequence(cfg, 2048)
    assert flops == 3 * (2 * 6_658_859_008 * 2048 + 32 * 4 * 4096 * 2048**2)
    assert flops == pytest.approx(8.842e13, rel=1e-3)
    seqs_per_s = 10643 * 8 / 2048
    assert seqs_per_s == pytest.approx(41.57, abs=0.01)
    assert 100 * mfu(seqs_per_s, flops, 8, 989.5e12) == pytest.approx(46.4, abs=0.05)


def test_untied_embeddings_subtract_the_lookup_only():
    tied = load_model_config("mpt-125m")
    untied = load_model_config("mpt-125m", ["tie_word_embeddings=false"])
    # Untied adds an lm_head (vocab x d) and then drops the wte lookup: same FLOPs.
    assert count_params(untied) == count_params(tied) + tied.vocab_size * tied.d_model
    assert flops_per_sequence(untied, 2048) == flops_per_sequence(tied, 2048)


def test_hardware_flops():
    cfg = load_model_config("mpt-125m")
    flops = flops_per_sequence(cfg, 1024)
    assert hardware_flops_per_sequence(cfg, 1024, "full") * 3 == flops * 4
    assert hardware_flops_per_sequence(cfg, 1024, "none") == flops
    assert hardware_flops_per_sequence(cfg, 1024, "dots_saveable") == flops
    with pytest.raises(ValueError, match="remat"):
        hardware_flops_per_sequence(cfg, 1024, "selective")
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_sequence(cfg, 0)


@pytest.mark.parametrize(
    ("kind", "bf16"),
    [
        ("NVIDIA H100 80GB HBM3", 989.5e12),
        ("NVIDIA H100 PCIe", 756.5e12),
        ("NVIDIA H200", 989.5e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("TPU v4", 275e12),
        ("TPU v5 lite", 197e12),
        ("TPU v5e", 197e12),
        ("TPU v5", 459e12),
        ("TPU v5p", 459e12),
        ("TPU v6 lite", 918e12),
        ("TPU v6e", 918e12),
    ],
)
def test_peak_flops_bf16(kind, bf16):
    assert peak_flops(kind, "amp_bf16") == pytest.approx(bf16)
    assert peak_flops(kind, "pure_bf16") == pytest.approx(bf16)


def test_peak_flops_fp32_and_unknown():
    assert peak_flops(A100, "fp32") == 19.5e12
    assert peak_flops(H100, "fp32") == 67e12
    assert peak_flops("NVIDIA H100 PCIe", "fp32") == 51e12  # composer's h100-pcie fp32
    assert peak_flops("TPU v4", "fp32") is None
    for kind in ("cpu", "Tesla V100-SXM2-16GB", "NVIDIA H100 NVL", "TPU v3", "TPU v4 lite"):
        assert peak_flops(kind, "amp_bf16") is None, kind
    assert mfu(10.0, 1e12, 1, None) is None
    with pytest.raises(ValueError, match="precision"):
        peak_flops(H100, "amp_fp8")
    assert set(PEAK_FLOPS["h100-sxm"]) == {"bf16", "fp32"}


def test_device_peak_flops_is_none_on_cpu():
    assert metrics.local_device_kind() == "cpu"
    assert metrics.device_peak_flops("amp_bf16") is None
    assert metrics.device_peak_flops("amp_bf16", device_kind="TPU v4") == 275e12


def test_throughput_window():
    cfg = load_model_config("mpt-7b")
    meter = Throughput.from_config(
        cfg, 2048, n_devices=8, peak=989.5e12, remat="full", window_size=10
    )
    assert meter.compute() == {}
    meter.update(100.0, seqs=48, tokens=48 * 2048)  # a slow first (compiling) step
    for _ in range(10):
        meter.update(48 / 41.57, seqs=48, tokens=48 * 2048)
    out = meter.compute()  # the first step has left the 10-step window
    assert out["seqs_per_s"] == pytest.approx(41.57)
    assert out["tokens_per_s"] == pytest.approx(41.57 * 2048)
    assert out["tokens_per_s_per_device"] == pytest.approx(41.57 * 256)
    assert out["step_time_s"] == pytest.approx(48 / 41.57)
    assert out["tflops_per_device"] == pytest.approx(459.5, abs=0.5)
    assert out["mfu"] == pytest.approx(0.4644, abs=5e-4)
    assert out["hfu"] == pytest.approx(out["mfu"] * 4 / 3)
    meter.reset()
    assert meter.compute() == {}
    meter.update(2.0, seqs=4, tokens=400)
    meter.update(1.0, seqs=2, tokens=200)
    assert meter.compute()["tokens_per_s"] == pytest.approx(200.0)
    with pytest.raises(ValueError):
        meter.update(0.0, seqs=1, tokens=1)


def test_throughput_without_peak_has_no_mfu():
    meter = Throughput(flops_per_seq=1e12, n_devices=2)
    meter.update(1.0, seqs=4, tokens=4096)
    out = meter.compute()
    assert out["tflops_per_device"] == pytest.approx(2.0)
    assert "mfu" not in out and "hfu" not in out


def _read_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_logger_writes_jsonl_and_tensorboard(tmp_path):
    pytest.importorskip("tensorboardX")
    run_dir = tmp_path / "run"
    with MetricsLogger(run_dir) as logger:
        logger.log(10, {"loss": 2.5, "lr": 1e-4, "tokens_per_s": 1234.0, "tokens": 2048})
        # Flushed per call: readable before close.
        assert _read_lines(run_dir / "metrics.jsonl") == [
            {"step": 10, "loss": 2.5, "lr": 1e-4, "tokens_per_s": 1234.0, "tokens": 2048}
        ]
        logger.log(20, {"loss": 2.0, "lr": 2e-4})
    lines = _read_lines(run_dir / "metrics.jsonl")
    assert [line["step"] for line in lines] == [10, 20]
    # each value keeps its kind: counts are integers, the rest floats
    kinds = {k: type(v) for line in lines for k, v in line.items()}
    assert kinds == {"step": int, "tokens": int, "loss": float, "lr": float, "tokens_per_s": float}
    scalars = tensorboard_scalars(run_dir / "tensorboard")
    assert [s for s, _ in scalars["loss"]] == [10, 20]
    assert [v for _, v in scalars["loss"]] == pytest.approx([2.5, 2.0])
    assert scalars["tokens_per_s"] == [(10, 1234.0)]
    logger.close()  # idempotent


def test_logger_appends_on_resume(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(1, {"loss": 3.0})
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(2, {"loss": 2.0})
    assert [line["step"] for line in _read_lines(tmp_path / "metrics.jsonl")] == [1, 2]
    assert not (tmp_path / "tensorboard").exists()


def test_a_resumed_logger_hides_the_steps_an_earlier_attempt_logged_past_its_checkpoint(tmp_path):
    pytest.importorskip("tensorboardX")
    with MetricsLogger(tmp_path, resumed_at=0) as killed:  # killed after step 5
        for step in range(1, 6):
            killed.log(step, {"loss": 1.0})
    with MetricsLogger(tmp_path, resumed_at=3) as resumed:  # from the checkpoint of step 3
        for step in range(4, 8):
            resumed.log(step, {"loss": 2.0})
    expected = [(1, 1.0), (2, 1.0), (3, 1.0), (4, 2.0), (5, 2.0), (6, 2.0), (7, 2.0)]
    assert tensorboard_scalars(tmp_path / "tensorboard")["loss"] == expected
    with MetricsLogger(tmp_path, resumed_at=0) as fresh:  # no checkpoint: starts over
        fresh.log(1, {"loss": 3.0})
    assert tensorboard_scalars(tmp_path / "tensorboard")["loss"] == [(1, 3.0)]


def test_logger_nonfinite_values(tmp_path):
    with MetricsLogger(tmp_path, tensorboard=True) as logger:
        logger.log(5, {"loss": float("nan"), "grad_norm": float("inf"), "lr": 0.5})
        logger.log(6, {"loss": -math.inf})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text  # strict JSON
    first, second = _read_lines(tmp_path / "metrics.jsonl")
    assert first == {
        "step": 5,
        "loss": None,
        "grad_norm": None,
        "lr": 0.5,
        "nonfinite": {"loss": "nan", "grad_norm": "inf"},
    }
    assert second == {"step": 6, "loss": None, "nonfinite": {"loss": "-inf"}}
    if (tmp_path / "tensorboard").exists():  # TensorBoard keeps the raw non-finite floats
        scalars = tensorboard_scalars(tmp_path / "tensorboard")
        assert math.isnan(scalars["loss"][0][1]) and scalars["loss"][1] == (6, -math.inf)
        assert scalars["grad_norm"] == [(5, math.inf)]


def test_logger_accepts_numpy_writes_unknown_as_null_and_rejects_bad_values(tmp_path):
    np = pytest.importorskip("numpy")
    with MetricsLogger(tmp_path, tensorboard=False) as logger:
        logger.log(np.int64(3), {"loss": np.float32(1.5), "n": np.array(2), "mfu": None})
        with pytest.raises(TypeError, match="'loss'"):
            logger.log(4, {"loss": "1.0"})
        with pytest.raises(ValueError, match="reserved"):
            logger.log(4, {"step": 1.0})
    assert _read_lines(tmp_path / "metrics.jsonl") == [
        {"step": 3, "loss": 1.5, "n": 2, "mfu": None}
    ]
    # counts stay integers in the file: `2`, not `2.0`
    assert '"n": 2}' in (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(RuntimeError, match="closed"):
        logger.log(5, {"loss": 1.0})


def test_logger_disabled_is_a_noop(tmp_path):
    run_dir = tmp_path / "rank1"
    with MetricsLogger(run_dir, enabled=False, wandb_project="p") as logger:
        logger.log(1, {"loss": 1.0})
        logger.log(2, {"loss": "not even checked"})
    assert not run_dir.exists()


def test_logger_without_wandb_warns_and_goes_on(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # makes `import wandb` raise ImportError
    with pytest.warns(UserWarning, match="wandb is not installed"):
        logger = MetricsLogger(tmp_path, tensorboard=False, wandb_project="mpt", config={"a": 1})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logger.log(1, {"loss": 1.0})
        logger.close()
    assert _read_lines(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]


def test_logger_with_a_wandb_stand_in(tmp_path, monkeypatch):
    calls = []

    class Run:
        def log(self, values, step):
            calls.append(("log", values, step))

        def finish(self):
            calls.append(("finish",))

    class FakeWandb:
        @staticmethod
        def init(**kwargs):
            calls.append(("init", kwargs))
            return Run()

    monkeypatch.setitem(sys.modules, "wandb", FakeWandb)
    with MetricsLogger(tmp_path, tensorboard=False, wandb_project="mpt", config={"a": 1}) as lg:
        lg.log(7, {"loss": 1.25})
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    init = {"project": "mpt", "mode": "offline", "dir": str(tmp_path), "config": {"a": 1}}
    init |= {"id": run_id, "resume": "allow"}
    assert calls == [("init", init), ("log", {"loss": 1.25}, 7), ("finish",)]
    # the same folder again (a resumed run): the same W&B run, continued
    with MetricsLogger(tmp_path, tensorboard=False, wandb_project="mpt", config={"a": 1}) as lg:
        pass
    assert calls[-2] == ("init", init)


def test_format_metrics():
    line = format_metrics(
        {"step": 100, "loss": 2.34567, "lr": 1.2e-4, "tokens_per_s": 123456.7, "mfu": 0.4644}
    )
    assert line == "step 100 | loss 2.3457 | lr 1.200e-04 | 123,457 tok/s | mfu 46.4%"
    assert format_metrics({"loss": 3.0, "mfu": None}, step=5) == "step 5 | loss 3.0000"
    assert format_metrics({"loss": float("nan")}) == "loss nan"
    saved = {"checkpoint_step": 20.0, "checkpoint_blocked_s": 0.031, "checkpoint_save_s": 1.234}
    assert format_metrics(saved, step=20) == (
        "step 20 | checkpoint 20 saved | blocked 0.03 s | written in 1.23 s"
    )
    # per-step details stay in metrics.jsonl; a value without a format is shown as it is
    quiet = {"loss": 2.0, "tokens": 4096.0, "step_time": 0.5, "data_wait": 0.0, "new_key": 0.123456}
    assert format_metrics(quiet, step=3) == "step 3 | loss 2.0000 | new_key 0.1235"
    memory = {"loss": 2.0, "memory_gib": 60.0, "peak_memory_gib": 71.04}
    assert format_metrics(memory, step=4) == "step 4 | loss 2.0000 | peak 71.0 GiB"
    for seconds, shown in ((7505, "2h05m"), (724.4, "12m04s"), (45, "45s"), (0, "0s")):
        assert format_metrics({"remaining_s": seconds}) == f"{shown} left"


def test_metrics_module_does_not_import_jax():
    # Load mpt_jax.metrics under a bare package stub so mpt_jax/__init__ (which imports the
    # model, hence jax) does not run.
    package_dir = Path(metrics.__file__).parent
    code = (
        "import sys, types\n"
        f"pkg = types.ModuleType('mpt_jax'); pkg.__path__ = [{str(package_dir)!r}]\n"
        "sys.modules['mpt_jax'] = pkg\n"
        "import mpt_jax.metrics\n"
        "assert 'jax' not in sys.modules, 'jax imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_real_wandb_offline_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    with MetricsLogger(
        tmp_path,
        tensorboard=False,
        wandb_project="mpt-jax-test",
        wandb_mode="offline",
        config={"model": {"d_model": 64}},
    ) as logger:
        logger.log(1, {"loss": 2.0, "mfu": None})
        logger.log(2, {"loss": 1.5})
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    assert any(p.suffix == ".wandb" and p.stat().st_size > 0 for p in runs[0].iterdir())
    run_id = (tmp_path / "wandb_run_id").read_text().strip()
    assert runs[0].name.endswith(f"-{run_id}")  # the run folder's id is W&B's run id
