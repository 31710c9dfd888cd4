"""Causal ALiBi attention on a GPU: correctness of ours against XLA, then times and TFLOP/s.

    python tools/bench_attention.py [--reps 20] [--out results.md]

Implementations: ours (`pallas_gpu`, ALiBi in-kernel), cuDNN with a materialized ALiBi bias,
cuDNN without ALiBi (the speed a free ALiBi would reach), and the XLA reference. TFLOP/s count
causal work only: 2 * 2 * B * H * S^2 * K / 2 forward, 2.5x that for forward + backward.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mpt_jax.attention import alibi_slopes, attention

SHAPES = [(8, 2048, 16, 128), (2, 8192, 16, 128)]


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


def check(B=2, S=1000, H=16, G=4, K=128) -> list[str]:
    """Forward and gradients of ours against the XLA reference (bf16, GQA, segments, tail)."""
    q, k, v = _inputs(B, S, H, K, G)
    seg = jnp.asarray(np.sort(np.random.default_rng(1).integers(0, 4, (B, S)), axis=1))
    kw = dict(alibi_slopes=alibi_slopes(H), segment_ids=seg, causal=True)
    do = jnp.asarray(np.random.default_rng(2).standard_normal(q.shape), jnp.bfloat16)
    lines = []
    results = {}
    for impl in ("xla", "pallas_gpu"):

        def loss(q, k, v, impl=impl):
            out = attention(q, k, v, impl=impl, **kw)
            return (out.astype(jnp.float32) * do.astype(jnp.float32)).sum(), out

        (_, out), grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(
            q, k, v
        )
        results[impl] = (out, *grads)
    for name, ref, ours in zip(
        ("out", "dq", "dk", "dv"), results["xla"], results["pallas_gpu"], strict=True
    ):
        ref, ours = np.asarray(ref, np.float32), np.asarray(ours, np.float32)
        rel = float(np.abs(ours - ref).max() / max(np.abs(ref).max(), 1e-6))
        finite = bool(np.isfinite(ours).all())
        lines.append(
            f"check {name}: max rel err {rel:.2e} finite {finite} "
            f"{'OK' if rel < 2e-2 and finite else 'FAIL'}"
        )
    return lines


def bench(reps: int) -> list[str]:
    rows = [
        "| shape (B,S,H,K) | impl | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s |",
        "|---|---|---|---|---|---|",
    ]
    for B, S, H, K in SHAPES:
        q, k, v = _inputs(B, S, H, K)
        flops = 2 * 2 * B * H * S * S * K / 2
        slopes = alibi_slopes(H)
        impls = {
            "ours (pallas_gpu, ALiBi in-kernel)": ("pallas_gpu", slopes),
            "cuDNN + materialized ALiBi bias": ("cudnn", slopes),
            "cuDNN, no ALiBi": ("cudnn", None),
            "XLA reference + ALiBi": ("xla", slopes),
        }
        for label, (impl, sl) in impls.items():
            fwd = jax.jit(
                lambda q, k, v, impl=impl, sl=sl: attention(
                    q, k, v, alibi_slopes=sl, causal=True, impl=impl
                )
            )
            grad = jax.jit(
                jax.grad(
                    lambda q, k, v, impl=impl, sl=sl: (
                        attention(q, k, v, alibi_slopes=sl, causal=True, impl=impl)
                        .astype(jnp.float32)
                        .sum()
                    ),
                    argnums=(0, 1, 2),
                )
            )
            try:
                t_f = _time(fwd, q, k, v, reps=reps)
                t_b = _time(grad, q, k, v, reps=reps)
            except Exception as e:  # an implementation may not support a shape
                rows.append(
                    f"| {B},{S},{H},{K} | {label} | failed: {str(e).splitlines()[0][:80]} | | | |"
                )
                continue
            rows.append(
                f"| {B},{S},{H},{K} | {label} | {t_f * 1e3:.2f} | {flops / t_f / 1e12:.0f} "
                f"| {t_b * 1e3:.2f} | {2.5 * flops / t_b / 1e12:.0f} |"
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default=None, help="also write the lines to this file")
    args = parser.parse_args(argv)
    if jax.default_backend() != "gpu":
        print("error: needs a GPU (jax.default_backend() is not 'gpu')", file=sys.stderr)
        return 2
    lines = [f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}"]
    lines += check()
    lines += bench(args.reps)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
