"""Causal ALiBi attention on a GPU: correctness of ours against XLA, times, TFLOP/s and memory.

    python tools/bench_attention.py [--reps 20] [--out results.md] [--skip-memory]
    python tools/bench_attention.py --tune 128 64 [--tune-budget-s 300]
    python tools/bench_attention.py --tune-hopper 128 [--tune-budget-s 90]   # on a Hopper GPU
    python tools/bench_attention.py --once   # each fwd+bwd run once, for ncu
    ... --no-hopper   # leave out our Mosaic GPU kernels (pallas_mgpu) on a Hopper GPU

`--tune` sweeps our kernels' tilings instead (block sizes, Triton warps and stages, per kernel)
at batch 8, seq 2048, 16 heads of each head dim: the forward alone first, then dq and dk/dv
with the best forward, fwd+bwd timed. Each kernel's sweep starts from its default tiling and
gets an equal share of what is left of --tune-budget-s. It prints every candidate, checks the
winner against the XLA reference and times it beside the default at every benchmark shape of
that head dim. `--tune-hopper` does the same for our Mosaic GPU kernels (`HopperTiling`): the
forward's key block and ring depth, then the backward's ring depth and compute warpgroups.

Implementations: ours (`pallas_gpu`, ALiBi in-kernel), on a Hopper GPU also our Mosaic GPU
kernels (`pallas_mgpu`: wgmma and TMA; head dims 64 and 128, checked against XLA first), cuDNN
with a materialized ALiBi bias, cuDNN without ALiBi (the speed a free ALiBi would reach),
openxla tokamax through our `impl="tokamax"` when importable (ALiBi as the key-only fp32 bias
slope_h * j of shape (1, H, 1, S): under a causal mask it differs from -slope_h * |i - j| by a
per-row constant, which softmax removes; the row names the tokamax kernel that ran), and the XLA
reference.
TFLOP/s count causal work only: 2 * 2 * B * H * S^2 * K / 2 forward, 3.5x that for forward +
backward (FlashAttention's and anchor_bench's convention: the backward's five products are
2.5x the forward's two; tables before 2026-12-06's eighth session used 2.5x for both together).

Memory: temporary bytes of the compiled forward + backward (XLA's memory_analysis) against
sequence length at a fixed number of tokens, for ours, cuDNN with the bias, XLA and tokamax.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from mpt_jax.atomic_write import write_atomic
from mpt_jax.attention import alibi_slopes, attention
from mpt_jax.kernels.flash_attention import Tiling, Tilings, default_tilings, flash_attention
from mpt_jax.kernels.flash_attention_mgpu import HopperTiling, flash_attention_mgpu

try:
    import tokamax
except Exception:  # optional (its wheel is carried in); a broken dependency must not stop us
    tokamax = None

FWD_BWD_FLOPS = 3.5  # forward + backward FLOPs in forwards (2 products, then 5)
# (B, S, H, K). The last is MPT-30B's heads (64 of 112) at half its 8k context and batch 2, so
# that the XLA reference's fp32 (B, H, S, S) intermediates (8.6 GB each) fit an 80 GB card.
SHAPES = [(8, 2048, 16, 128), (2, 8192, 16, 128), (2, 4096, 64, 112)]
# peak-memory table: sequence lengths at a fixed 32k tokens per batch, 16 heads of 128
MEMORY_TOKENS, MEMORY_SEQS, MEMORY_HEADS = 32768, (1024, 2048, 4096, 8192, 16384, 32768), 16


def _time(fn, *args, reps: int) -> float:
    jax.block_until_ready(fn(*args))  # compile
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _inputs(B, S, H, K, G=None, seed=0):
    rng = np.random.default_rng(seed)
    G = G or H
    q = jnp.asarray(rng.standard_normal((B, S, H, K)), jnp.bfloat16)
    k = jnp.asarray(rng.standard_normal((B, S, G, K)), jnp.bfloat16)
    v = jnp.asarray(rng.standard_normal((B, S, G, K)), jnp.bfloat16)
    return q, k, v


# tiling candidates per kernel: (block_q, block_k) x num_warps x num_stages; blocks too large
# for shared memory fail to compile and are reported as such
TUNE_BLOCKS = {
    "fwd": [(64, 64), (128, 64), (128, 32), (64, 32), (128, 128), (64, 128)],
    "dq": [(64, 64), (128, 64), (128, 32), (64, 32), (32, 64), (128, 128)],
    "dkv": [(64, 64), (32, 64), (64, 128), (32, 128), (16, 64), (64, 32)],
}
TUNE_WARPS, TUNE_STAGES = (4, 8), (2, 3)
# timed first at head dim 128, after the default: the candidates whose machine code for an H200
# neither spills (255 registers and a stack) nor falls back to per-warp HMMA and whose warpgroup
# MMAs are at least 32 wide (tools/kernel_sass.py --sweep, jax 0.11.2, 2026-12-06; the table is
# in docs/benchmarks.md). The default dq and dk/dv tilings spill (8 and 80 bytes a thread).
TUNE_FIRST_128 = {
    "fwd": [Tiling(128, 128, 8, 2), Tiling(128, 128, 8, 3), Tiling(128, 64, 8, 3)],
    "dq": [Tiling(128, 128, 8, 2), Tiling(128, 64, 8, 3), Tiling(128, 32, 8, 3)],
    "dkv": [Tiling(64, 64, 8, 2), Tiling(32, 128, 8, 3), Tiling(32, 64, 4, 3)],
}


def tune_grid(
    blocks: list[tuple[int, int]], warps: tuple[int, ...] = TUNE_WARPS, stages=TUNE_STAGES
) -> list[Tiling]:
    """A kernel's tiling candidates: (block_q, block_k) x num_warps x num_stages, in order."""
    return [Tiling(bq, bk, w, st) for (bq, bk), w, st in itertools.product(blocks, warps, stages)]


def _rel(ours, ref) -> float:
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    if not np.isfinite(ours).all():
        return float("nan")
    return float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-6))


def check(
    B=2, S=1000, H=16, G=4, K=128, tilings: Tilings | None = None, interpret: bool = False
) -> list[str]:
    """Forward and gradients of ours against the XLA reference (bf16, GQA, segments, tail)."""
    q, k, v = _inputs(B, S, H, K, G)
    seg = jnp.asarray(np.sort(np.random.default_rng(1).integers(0, 4, (B, S)), axis=1))
    kw = dict(alibi_slopes=alibi_slopes(H), segment_ids=seg, causal=True)
    do = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.bfloat16)
    lines = []
    results = {}
    for impl in ("xla", "pallas_gpu"):

        def loss(q, k, v, impl=impl):
            if impl == "pallas_gpu" and tilings is not None:
                out = flash_attention(q, k, v, tilings=tilings, interpret=interpret, **kw)
            else:
                out = attention(q, k, v, impl=impl, **kw)
            return (out.astype(jnp.float32) * do.astype(jnp.float32)).sum(), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
            q, k, v
        )
        results[impl] = (out, *grads)
    for name, ref, ours in zip(
        ("out", "dq", "dk", "dv"), results["xla"], results["pallas_gpu"], strict=True
    ):
        rel = _rel(ours, ref)
        lines.append(f"check {name}: max rel err {rel:.2e} {'OK' if rel < 2e-2 else 'FAIL'}")
    return lines


def hopper() -> bool:
    """Whether the GPU is a Hopper (sm90), which our Mosaic GPU kernels are written for."""
    return str(getattr(jax.devices()[0], "compute_capability", "")).startswith("9")


# the Hopper kernels' variants the benchmark checks and times: the default tiling, and the
# two-warpgroup backward
HOPPER_VARIANTS = {
    "pallas_mgpu": HopperTiling(),
    "pallas_mgpu bwd x2": HopperTiling(bwd_warpgroups=2),
}


def check_hopper(B=2, S=1024, H=16, G=4, K=128, variants=HOPPER_VARIANTS) -> list[str]:
    """Our Mosaic GPU kernels (each tiling of `variants`) against the XLA reference: bf16, GQA,
    causal ALiBi, no segments."""
    q, k, v = _inputs(B, S, H, K, G)
    do = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.bfloat16)
    slopes = alibi_slopes(H)
    variants = {
        "xla": functools.partial(_attention, impl="xla", slopes=slopes),
        **{
            name: functools.partial(_hopper, slopes=slopes, tiling=tiling)
            for name, tiling in variants.items()
        },
    }
    results, lines = {}, []
    for name, attend in variants.items():

        def loss(q, k, v, attend=attend):
            out = attend(q, k, v)
            return (out.astype(jnp.float32) * do.astype(jnp.float32)).sum(), out

        grad = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)
        try:
            (_, out), grads = jax.jit(grad)(q, k, v)
        except Exception as e:  # the first run on a GPU: say how it failed, go on
            lines.append(f"check {name}: failed: {str(e).splitlines()[0][:120]}")
            continue
        results[name] = (out, *grads)
    for name in [n for n in results if n != "xla" and "xla" in results]:
        for part, ref, ours in zip(
            ("out", "dq", "dk", "dv"), results["xla"], results[name], strict=True
        ):
            rel = _rel(ours, ref)
            lines.append(
                f"check {name} {part}: max rel err {rel:.2e} {'OK' if rel < 2e-2 else 'FAIL'}"
            )
    return lines


def _tokamax_kernel(q, k, v) -> str:
    """Which tokamax kernel `impl="tokamax"` runs for these inputs (from the lowered HLO)."""
    if tokamax is None:
        return "not installed"
    slopes = alibi_slopes(q.shape[2])
    fn = functools.partial(_attention, impl="tokamax", slopes=slopes)
    try:
        text = jax.jit(fn).lower(q, k, v).as_text()
    except Exception as e:  # no tokamax kernel takes this input
        return f"failed: {str(e).splitlines()[0][:60]}"
    return "mosaic_gpu" if "mosaic_gpu" in text else "triton" if "triton" in text else "xla"


# the benchmark's name for our Hopper kernels with the two-warpgroup backward
HOPPER_X2 = "pallas_mgpu_x2"


def _hopper(q, k, v, *, slopes, tiling):
    return flash_attention_mgpu(q, k, v, alibi_slopes=slopes, causal=True, tiling=tiling)


def _attention(q, k, v, *, impl, slopes):
    if impl == HOPPER_X2:
        return _hopper(q, k, v, slopes=slopes, tiling=HOPPER_VARIANTS["pallas_mgpu bwd x2"])
    return attention(q, k, v, alibi_slopes=slopes, causal=True, impl=impl)


# the [kernels] issue's fwd+bwd targets (H200, bf16, causal ALiBi): shape -> seconds at most;
# at the first also at least 1.6x faster than cuDNN with the bias and within 10% of cuDNN
# without ALiBi, measured in the same run
KERNEL_TARGETS = {(8, 2048, 16, 128): 1.9e-3, (2, 8192, 16, 128): 4.7e-3}
CUDNN_BIAS, CUDNN_PLAIN = "cuDNN + materialized ALiBi bias", "cuDNN, no ALiBi"


def target_lines(fwd_bwd: dict[tuple, dict[str, float]]) -> list[str]:
    """Each of our implementations against the [kernels] targets, from fwd+bwd seconds per shape
    and label: the time bound, the two ratios to cuDNN (first target shape) and tokamax."""

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    lines = []
    for shape, bound in KERNEL_TARGETS.items():
        times = fwd_bwd.get(shape, {})
        tokamax_t = next((t for label, t in times.items() if label.startswith("tokamax")), None)
        for label, t in times.items():
            if not label.startswith("ours"):
                continue
            parts = [f"{t * 1e3:.2f} ms (at most {bound * 1e3:.1f}: {verdict(t <= bound)})"]
            if shape == next(iter(KERNEL_TARGETS)):
                if CUDNN_BIAS in times:
                    speedup = times[CUDNN_BIAS] / t
                    parts.append(
                        f"{speedup:.2f}x cuDNN with the bias (1.6x: {verdict(speedup >= 1.6)})"
                    )
                if CUDNN_PLAIN in times:
                    ratio = t / times[CUDNN_PLAIN]
                    parts.append(
                        f"{ratio:.2f}x cuDNN without ALiBi's time (1.10x: {verdict(ratio <= 1.1)})"
                    )
            if tokamax_t is not None:
                parts.append(f"tokamax {tokamax_t * 1e3:.2f} ms ({verdict(t <= tokamax_t)})")
            lines.append(f"target {shape}, {label}: " + "; ".join(parts))
    return lines


def bench(reps: int, with_hopper: bool = False) -> list[str]:
    fwd_bwd: dict[tuple, dict[str, float]] = {}
    rows = [
        "| shape (B,S,H,K) | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s "
        "| out vs ours |",
        "|---|---|---|---|---|---|---|",
    ]
    for B, S, H, K in SHAPES:
        q, k, v = _inputs(B, S, H, K)
        flops = 2 * 2 * B * H * S * S * K / 2
        slopes = alibi_slopes(H)

        impls = {
            "ours (pallas_gpu, ALiBi in-kernel)": functools.partial(
                _attention, impl="pallas_gpu", slopes=slopes
            ),
            **(
                {
                    "ours Hopper (pallas_mgpu, wgmma)": functools.partial(
                        _attention, impl="pallas_mgpu", slopes=slopes
                    ),
                    "ours Hopper, 2-warpgroup backward": functools.partial(
                        _attention, impl=HOPPER_X2, slopes=slopes
                    ),
                }
                if with_hopper
                else {}
            ),
            CUDNN_BIAS: functools.partial(_attention, impl="cudnn", slopes=slopes),
            CUDNN_PLAIN: functools.partial(_attention, impl="cudnn", slopes=None),
            "XLA reference + ALiBi": functools.partial(_attention, impl="xla", slopes=slopes),
        }
        tok_kernel = _tokamax_kernel(q, k, v)
        if tokamax is not None:
            impls[f"tokamax ({tok_kernel}), key-only fp32 ALiBi bias"] = functools.partial(
                _attention, impl="tokamax", slopes=slopes
            )
        ours_out = None
        for label, fn in impls.items():
            fwd = jax.jit(fn)
            grad = _grad_fn(fn)
            try:
                t_f = _time(fwd, q, k, v, reps=reps)
                t_b = _time(grad, q, k, v, reps=reps)
                out = fwd(q, k, v)
            except Exception as e:  # an implementation may not support a shape or fit memory
                rows.append(
                    f"| {B},{S},{H},{K} | {label} | failed: {str(e).splitlines()[0][:80]} | | | | |"
                )
                continue
            if label.startswith("ours (pallas_gpu"):
                ours_out, versus = out, "-"
            elif ours_out is None or "no ALiBi" in label:  # the latter computes another function
                versus = "n/a"
            else:
                versus = f"{_rel(out, ours_out):.1e}"
            rows.append(
                f"| {B},{S},{H},{K} | {label} | {t_f * 1e3:.2f} | {flops / t_f / 1e12:.0f} "
                f"| {t_b * 1e3:.2f} | {FWD_BWD_FLOPS * flops / t_b / 1e12:.0f} | {versus} |"
            )
            fwd_bwd.setdefault((B, S, H, K), {})[label] = t_b
            # as it goes, to stderr: a run cut off by a time limit keeps the rows it timed
            print(rows[-1], file=sys.stderr, flush=True)
        if tokamax is None:
            rows.append(f"| {B},{S},{H},{K} | tokamax | {tok_kernel} | | | | |")
    verdicts = target_lines(fwd_bwd)
    # to stderr too, before the memory table: a run cut off there keeps the verdicts
    print("\n".join(verdicts), file=sys.stderr, flush=True)
    return rows + verdicts


def _ours(q, k, v, tilings, interpret=False):
    H = q.shape[2]
    slopes = alibi_slopes(H)
    return flash_attention(
        q, k, v, alibi_slopes=slopes, causal=True, tilings=tilings, interpret=interpret
    )


def _grad_fn(fn):
    """Jitted (dq, dk, dv) of sum(fn(q, k, v)): forward + backward, what training runs."""
    return jax.jit(jax.grad(lambda q, k, v: fn(q, k, v).astype(jnp.float32).sum(), (0, 1, 2)))


def _fwd_bwd(tilings, interpret=False):
    return _grad_fn(functools.partial(_ours, tilings=tilings, interpret=interpret))


def _try_time(fn, args, reps) -> float | str:
    try:
        return _time(fn, *args, reps=reps)
    except Exception as e:  # shared memory exceeded, a lowering failure: the candidate is out
        return f"failed: {str(e).splitlines()[0][:60]}"


def _ms(t: float | str, digits: int = 3) -> str:
    return t if isinstance(t, str) else f"{t * 1e3:.{digits}f}"


def _sweep_phase(candidates, measure, deadline):
    """Times candidates in order (the first always: the current best, so a phase never makes
    things worse) until the deadline: [(candidate, seconds or "failed: ..."), ...] and the
    fastest candidate (None if every one failed)."""
    timed, best, best_s = [], None, float("inf")
    for i, cand in enumerate(candidates):
        if i and time.perf_counter() > deadline:
            break
        t = measure(cand)
        timed.append((cand, t))
        if not isinstance(t, str) and t < best_s:
            best, best_s = cand, t
    return timed, best


def _deadline(start: float, budget_s: float, sweeps_left: int) -> float:
    """An equal share of what is left of the budget: a slow early sweep cannot starve the later
    ones."""
    now = time.perf_counter()
    return now + (budget_s - (now - start)) / sweeps_left


def _benchmark_shapes(K: int, shape: tuple[int, int, int]) -> list[tuple[int, int, int, int]]:
    """The benchmark's shapes of head dim K, else the tuning shape with it."""
    return [x for x in SHAPES if x[3] == K] or [(*shape, K)]


def _default_vs_tuned(fwd_bwd_of, tilings, shapes, reps, label) -> list[str]:
    """A line per shape: fwd+bwd with the default and the tuned tiling (fwd_bwd_of(tiling,
    shape) -> the jitted program)."""
    lines = []
    for full in shapes:
        args = _inputs(*full)
        t_default, t_tuned = (_try_time(fwd_bwd_of(t, full), args, reps) for t in tilings)
        lines.append(f"{label} {full}: default {_ms(t_default, 2)} ms, tuned {_ms(t_tuned, 2)} ms")
    return lines


def tune(
    head_dims: list[int],
    reps: int,
    budget_s: float,
    *,
    shape: tuple[int, int, int] = (8, 2048, 16),
    blocks: dict[str, list[tuple[int, int]]] = TUNE_BLOCKS,
    warps: tuple[int, ...] = TUNE_WARPS,
    stages: tuple[int, ...] = TUNE_STAGES,
    interpret: bool = False,
) -> tuple[list[str], dict[int, Tilings]]:
    """Per-kernel tiling sweep at (B, S, H) = shape for each head dim.

    Returns the lines to print (every candidate, then per head dim the winner, its check against
    the XLA reference and fwd+bwd times of default and winner) and the winners.
    """
    rows = [
        "| head dim | kernel | blocks (q x k) | warps | stages | ms (fwd; fwd+bwd for dq, dkv) |",
        "|---|---|---|---|---|---|",
    ]
    summary, winners = [], {}
    start = time.perf_counter()
    kernels = ("fwd", "dq", "dkv")
    sweeps_left = len(head_dims) * len(kernels)
    for K in head_dims:
        args = _inputs(*shape, K)
        default = best = default_tilings(pl.next_power_of_2(K))
        for kernel in kernels:
            deadline = _deadline(start, budget_s, sweeps_left)
            sweeps_left -= 1
            grid = tune_grid(blocks[kernel], warps, stages)
            first = getattr(default, kernel)

            def measure(cand, kernel=kernel, best=best, args=args):
                tilings = dataclasses.replace(best, **{kernel: cand})
                if kernel == "fwd":
                    fn = jax.jit(functools.partial(_ours, tilings=tilings, interpret=interpret))
                else:
                    fn = _fwd_bwd(tilings, interpret)
                return _try_time(fn, args, reps)

            ahead = [t for t in TUNE_FIRST_128[kernel] if t in grid] if K == 128 else []
            candidates = list(dict.fromkeys([first, *ahead, *grid]))
            timed, best_t = _sweep_phase(candidates, measure, deadline)
            for cand, t in timed:
                w, st = cand.num_warps or "Triton's", cand.num_stages or "Triton's"  # None: default
                rows.append(
                    f"| {K} | {kernel} | {cand.block_q} x {cand.block_k} | {w} | {st} | {_ms(t)} |"
                )
                print(rows[-1], file=sys.stderr, flush=True)  # kept if a time limit cuts the run
            if best_t is not None:
                best = dataclasses.replace(best, **{kernel: best_t})
        winners[K] = best
        summary.append(f"best tilings, head dim {K}: {best!r}")
        # ragged, about half the tuning length: 1000 at 2048
        S_check = max(shape[1] // 2 - 24, shape[1] // 2 + 3)
        G = max(shape[2] // 4, 1)
        summary += check(B=2, S=S_check, H=shape[2], G=G, K=K, tilings=best, interpret=interpret)
        summary += _default_vs_tuned(
            lambda tilings, _: _fwd_bwd(tilings, interpret),
            (default, best),
            [(*shape, K)] if interpret else _benchmark_shapes(K, shape),
            reps,
            "fwd+bwd",
        )
    summary.append(f"tuning took {time.perf_counter() - start:.0f} s (budget {budget_s:.0f} s)")
    return rows + summary, winners


# the Hopper sweep's phases: the forward's key block and ring depth (128-key rings of 3 slots
# exceed shared memory at head dim 128), then the backward's ring depth and compute warpgroups,
# and its dq and dk/dv programs in two launches instead of one
HOPPER_TUNE = {
    "fwd": [dict(block_kv=bk, stages=st) for bk, st in ((128, 2), (64, 2), (64, 3), (64, 4))],
    "bwd": [dict(bwd_stages=st, bwd_warpgroups=w) for w, st in itertools.product((1, 2), (2, 3, 4))]
    + [dict(bwd_launches=2)],
}


def _hopper_label(t: HopperTiling) -> str:
    return (
        f"{t.block_q} x {t.block_kv}, {t.stages} stages; bwd {t.bwd_block_q} x {t.bwd_block_kv}, "
        f"{t.backward_stages} stages, {t.bwd_warpgroups} warpgroup(s), {t.bwd_launches} launch(es)"
    )


def tune_hopper(
    head_dims: list[int],
    reps: int,
    budget_s: float,
    *,
    shape: tuple[int, int, int] = (8, 2048, 16),
    phases: dict[str, list[dict]] = HOPPER_TUNE,
    full_shapes: bool = True,
) -> tuple[list[str], dict[int, HopperTiling]]:
    """Our Hopper kernels' tiling sweep at (B, S, H) = shape for each head dim: the forward
    timed alone, then the backward (fwd+bwd) with the best forward, each phase from the default
    tiling on and with an equal share of what is left of the budget; the winner checked against
    the XLA reference and timed beside the default at the benchmark shapes of its head dim
    (full_shapes) or at `shape`. Returns the lines to print and the winners."""
    rows = ["| head dim | phase | Hopper tiling | ms (fwd; fwd+bwd for bwd) |", "|---|---|---|---|"]
    summary, winners = [], {}
    start = time.perf_counter()
    sweeps_left = len(head_dims) * len(phases)
    for K in head_dims:
        args = _inputs(*shape, K)
        slopes = alibi_slopes(shape[2])
        default = best = HopperTiling()
        for phase, overrides in phases.items():
            deadline = _deadline(start, budget_s, sweeps_left)
            sweeps_left -= 1

            def measure(tiling, phase=phase, args=args, slopes=slopes):
                fn = functools.partial(_hopper, slopes=slopes, tiling=tiling)
                return _try_time(jax.jit(fn) if phase == "fwd" else _grad_fn(fn), args, reps)

            candidates = [best]
            for fields in overrides:
                try:
                    candidates.append(dataclasses.replace(best, **fields))
                except ValueError as e:  # a tiling HopperTiling refuses
                    rows.append(f"| {K} | {phase} | {fields} | failed: {e} |")
            candidates = list(dict.fromkeys(candidates))  # the current best once, first
            timed, fastest = _sweep_phase(candidates, measure, deadline)
            for tiling, t in timed:
                rows.append(f"| {K} | {phase} | {_hopper_label(tiling)} | {_ms(t)} |")
                print(rows[-1], file=sys.stderr, flush=True)  # kept if a time limit cuts the run
            best = fastest or best
        winners[K] = best
        summary.append(f"best Hopper tiling, head dim {K}: {best!r}")
        _, S, H = shape
        summary += check_hopper(B=2, S=S // 2, H=H, G=max(H // 4, 1), K=K, variants={"tuned": best})
        summary += _default_vs_tuned(
            lambda tiling, full: _grad_fn(
                functools.partial(_hopper, slopes=alibi_slopes(full[2]), tiling=tiling)
            ),
            (default, best),
            _benchmark_shapes(K, shape) if full_shapes else [(*shape, K)],
            reps,
            "Hopper fwd+bwd",
        )
    summary.append(
        f"Hopper tuning took {time.perf_counter() - start:.0f} s (budget {budget_s:.0f} s)"
    )
    return rows + summary, winners


def memory() -> list[str]:
    """Temporary memory of the compiled fwd+bwd against S at fixed tokens (no execution)."""
    H, K = MEMORY_HEADS, 128
    labels = {"pallas_gpu": "ours", "cudnn": "cuDNN + bias", "xla": "XLA"}
    if tokamax is not None:  # its GPU backward writes the bias gradient (B, H, S, S) densely
        labels["tokamax"] = "tokamax"
    rows = [
        f"peak temporary memory, fwd+bwd, {MEMORY_TOKENS} tokens, {H} heads of {K}, bf16, "
        "causal ALiBi (GiB, XLA memory_analysis of the compiled program)",
        "| B x S | " + " | ".join(labels.values()) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for S in MEMORY_SEQS:
        B = MEMORY_TOKENS // S
        q = jax.ShapeDtypeStruct((B, S, H, K), jnp.bfloat16)
        cells = []
        for impl in labels:

            def loss(q, k, v, impl=impl):
                out = attention(q, k, v, alibi_slopes=alibi_slopes(H), causal=True, impl=impl)
                return out.astype(jnp.float32).sum()

            try:
                compiled = jax.jit(jax.grad(loss, (0, 1, 2))).lower(q, q, q).compile()
                cells.append(f"{compiled.memory_analysis().temp_size_in_bytes / 2**30:.2f}")
            except Exception as e:
                cells.append(f"failed: {str(e).splitlines()[0][:40]}")
        rows.append(f"| {B} x {S} | " + " | ".join(cells) + " |")
    return rows


# (label, impl, ALiBi) of the fwd+bwd programs `--once` runs for a profiler
ONCE_IMPLS = (
    ("ours", "pallas_gpu", True),
    ("cuDNN + bias", "cudnn", True),
    ("cuDNN, no ALiBi", "cudnn", False),
)


def run_once(shape=(8, 2048, 16, 128), impls=ONCE_IMPLS) -> list[str]:
    """Each implementation's fwd+bwd compiled, then run exactly once: for a profiler (ncu)."""
    B, S, H, K = shape
    q, k, v = _inputs(B, S, H, K)
    lines = []
    for label, impl, alibi in impls:
        fn = functools.partial(_attention, impl=impl, slopes=alibi_slopes(H) if alibi else None)
        compiled = _grad_fn(fn).lower(q, k, v).compile()
        grads = jax.block_until_ready(compiled(q, k, v))
        finite = all(bool(jnp.isfinite(g).all()) for g in grads)
        lines.append(f"ran once: {label} fwd+bwd at {shape}, gradients finite: {finite}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=None, help="also write the lines to this file")
    parser.add_argument("--skip-memory", action="store_true", help="no memory table")
    parser.add_argument(
        "--tune", type=int, nargs="+", metavar="HEAD_DIM", help="sweep our tilings instead"
    )
    parser.add_argument("--tune-budget-s", type=float, default=300, help="stop sweeping after")
    parser.add_argument(
        "--tune-hopper",
        type=int,
        nargs="+",
        metavar="HEAD_DIM",
        help="sweep our Hopper kernels' tilings instead (a Hopper GPU)",
    )
    parser.add_argument(
        "--once", action="store_true", help="run each fwd+bwd once, untimed (under ncu)"
    )
    parser.add_argument(
        "--no-hopper", action="store_true", help="leave out our Mosaic GPU kernels (pallas_mgpu)"
    )
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        print("error: needs a GPU (jax.default_backend() is not 'gpu')", file=sys.stderr)
        return 2
    tok = "absent" if tokamax is None else getattr(tokamax, "__version__", "present")
    lines = [f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}, tokamax {tok}"]
    with_hopper = hopper() and not args.no_hopper
    if args.once:
        hopper_row = (
            (("ours Hopper", "pallas_mgpu", True), ("ours Hopper x2", HOPPER_X2, True))
            if with_hopper
            else ()
        )
        lines += run_once(impls=ONCE_IMPLS + hopper_row)
    elif args.tune:
        lines += tune(args.tune, args.reps, args.tune_budget_s)[0]
    elif args.tune_hopper:
        if not hopper():
            print("error: --tune-hopper needs a Hopper GPU (sm90)", file=sys.stderr)
            return 2
        lines += tune_hopper(args.tune_hopper, args.reps, args.tune_budget_s)[0]
    else:
        lines += check()
        if with_hopper:
            lines += check_hopper()
        lines += bench(args.reps, with_hopper)
    if not (args.skip_memory or args.tune or args.tune_hopper or args.once):
        lines += memory()
    text = "\n".join(lines)
    print(text)
    if args.out:
        write_atomic(args.out, text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
