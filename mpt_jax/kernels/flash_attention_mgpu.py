"""Hopper (sm90) flash attention with in-kernel ALiBi: Pallas Mosaic GPU, wgmma and TMA.

Shapes as in `flash_attention`: q (B, S, H, K), k and v (B, S, G, K), ALiBi slopes (H,) float32.
The same math as the Triton kernels, laid out for Hopper's asynchronous tensor cores:
- forward (FlashAttention-3 style): a program owns 2 x block_q query rows of one head, one
  compute warpgroup per block_q rows; the two take turns on the tensor cores (one's softmax
  overlaps the other's products), and each runs its softmax while its own previous P V is in
  flight, while a third warpgroup streams key and value blocks with TMA into a ring of
  `stages` shared-memory buffers;
- dq: a program owns block_q query rows; one compute warpgroup, one streaming k and v;
- dk/dv: a program owns block_kv keys of one kv head and walks the query blocks of each of the
  R query heads that share it, so GQA's sum over heads happens in float32 registers; one compute
  warpgroup, one streaming q, dO and their softmax statistics;
- the backward's dq and dk/dv programs run in one launch (`HopperTiling.bwd_launches`), and
  each step computes its exponentials and dS while its next product is in flight.
Scores are in log2 units: s2 = scale log2(e) q.k + slope log2(e) (j - i) for causal attention
(equal to -slope |i - j| wherever a key is visible), -slope log2(e) |i - j| otherwise; the saved
log-sum-exp (B, H, S) float32 is in the same units. Causal ALiBi enters as a per-key and a
per-query vector (`_alibi_line`), never as a 2-D distance. `flash_attention_mgpu_qkv` reads the
heads in place from a fused (B, S, H + 2G, K) Wqkv output.

What it takes: bf16 or fp16, head dim 64 or 128, a sequence length that is a multiple of every
block, no segment ids (`unsupported_reason` says which of these an input misses); other inputs
need the Triton kernels (`impl="pallas_gpu"`). The suite checks that they lower for CUDA,
replays their block math and (jax 0.11) runs them in the Mosaic GPU interpreter
(`tests/test_flash_attention_mgpu.py`), and reads their machine code compiled for an H200
(`tests/test_sass.py`); `tests/test_gpu.py` checks their numbers on a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from mpt_jax.kernels.common import Heads, check_arrays

LOG2E = math.log2(math.e)
HEAD_DIMS = (64, 128)
DTYPES = (jnp.bfloat16, jnp.float16)

# registers per thread: compute warpgroups hold the accumulators, the streaming one only
# addresses; 24 is PTX's setmaxnreg floor (FlashAttention-3's producers take it too), and the
# streaming code compiles within it without a spill (the forward's SASS has no stack at all)
_MEMORY_REGISTERS = 24


# The kernels' register layouts are written for lane semantics, jax 0.10's default; jax 0.11
# made warpgroup semantics the default, whose layout inference rejects the backward kernels.
_COMPILER_PARAMS = plgpu.CompilerParams(
    approx_math=True, lowering_semantics=plgpu.LoweringSemantics.Lane
)


def _compute_registers(n_compute_warpgroups: int) -> int:
    """What each compute warpgroup may raise its registers to: the 64 Ki register file (512 per
    thread of one warpgroup) less the streaming warpgroup's, shared out, at most 256 (PTX's
    setmaxnreg bound), in multiples of 8: 240 for two compute warpgroups, 256 for one."""
    per_thread = min(256, (512 - _MEMORY_REGISTERS) // n_compute_warpgroups)
    return per_thread // 8 * 8


@dataclasses.dataclass(frozen=True)
class HopperTiling:
    """Block sizes: block_q rows per forward compute warpgroup (two per program), block_kv keys
    per forward step; the backward's query and key blocks per compute warpgroup, and
    bwd_warpgroups (1 or 2) compute warpgroups per backward program sharing one stream of
    blocks; `stages` buffers per streamed ring, `bwd_stages` in the backward's (None: `stages`;
    the backward's 64-row blocks leave room for more than the forward's 128-key ones);
    bwd_launches: the backward's dq and dk/dv programs in one kernel launch (1) or two."""

    block_q: int = 64
    block_kv: int = 128
    bwd_block_q: int = 64
    bwd_block_kv: int = 64
    stages: int = 2
    bwd_warpgroups: int = 1
    bwd_stages: int | None = None
    bwd_launches: int = 1

    def __post_init__(self):
        for name in ("bwd_warpgroups", "bwd_launches"):
            if getattr(self, name) not in (1, 2):
                raise ValueError(f"HopperTiling.{name}: must be 1 or 2")
        for name in ("block_q", "block_kv", "bwd_block_q", "bwd_block_kv"):
            if getattr(self, name) % 64:
                raise ValueError(f"HopperTiling.{name}: must be a multiple of 64 (wgmma tiles)")
        for name in ("stages", "bwd_stages"):
            value = getattr(self, name)
            if value is not None and value < 2:
                raise ValueError(f"HopperTiling.{name}: must be at least 2")
        if self.block_kv % self.block_q:
            # then every key block a query block visits starts at or before its first query,
            # so no row's first block is wholly masked (its running max stays finite)
            raise ValueError("HopperTiling.block_kv: must be a multiple of block_q")

    @property
    def backward_stages(self) -> int:
        """Buffers per streamed ring of the dq and dk/dv kernels."""
        return self.stages if self.bwd_stages is None else self.bwd_stages

    @property
    def sequence_multiple(self) -> int:
        """The sequence lengths these blocks tile exactly are the multiples of this."""
        W = self.bwd_warpgroups
        blocks = (2 * self.block_q, self.block_kv, W * self.bwd_block_q, W * self.bwd_block_kv)
        return math.lcm(*blocks)


def unsupported_reason(q_shape, k_shape, dtype, *, segment_ids=None, tiling=None) -> str | None:
    """Why these inputs need the Triton kernels instead, or None if the Hopper kernels take them."""
    tiling = tiling or HopperTiling()
    _, S, H, K = q_shape
    if jnp.dtype(dtype) not in map(jnp.dtype, DTYPES):
        return f"dtype {jnp.dtype(dtype).name} (needs bfloat16 or float16)"
    if K not in HEAD_DIMS:
        return f"head dim {K} (needs one of {HEAD_DIMS})"
    if S % tiling.sequence_multiple:
        return f"sequence length {S} (needs a multiple of {tiling.sequence_multiple})"
    if k_shape[1] != S:
        return "keys and queries of different lengths"
    if H % k_shape[2]:
        return f"{H} query heads not a multiple of {k_shape[2]} kv heads"
    if segment_ids is not None:
        return "segment ids"
    return None


@dataclasses.dataclass(frozen=True)
class _Static:
    scale2: float  # softmax scale times log2 e
    causal: bool
    alibi: bool


def _smem(shape, dtype):
    """A shared-memory tile that TMA fills and wgmma reads: 8 x 64 tiles, 128-byte swizzle."""
    transforms = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    return plgpu.SMEM(shape, dtype, transforms=transforms)


def _alibi_line(slope2, ids, offset, st: _Static):
    """slope2 * (ids + offset): causal ALiBi's per-key (or per-query) part, a vector; else None.

    Under the causal mask slope (j - i) splits into a key part and a query part, so a block
    needs two vectors broadcast instead of a 2-D distance; the forward leaves the query part
    out (the softmax removes it) and takes it off the log-sum-exp at the end.
    """
    if not (st.alibi and st.causal):
        return None
    return slope2 * (ids + offset).astype(jnp.float32)


def _minus(a, b):
    """a - b, b possibly None."""
    return a if b is None else a - b


def _lse_bias(lse, query_part):
    """-(lse + query_part), query_part possibly None: the backward's bias vector that turns
    scores into log2 probabilities (lse is of the true scores, the query part left out of them)."""
    return -lse if query_part is None else -(lse + query_part)


def _scores2(s, row_bias, col_bias, distance, slope2, st: _Static, *, masked: bool):
    """Log2-unit scores of raw products s (rows, cols), plus bias vectors along either axis.

    row_bias (rows,) and col_bias (cols,) or None; distance() -> (rows, cols) int j - i, built
    only where a 2-D term is unavoidable: masks and non-causal ALiBi (-slope |i - j|).
    """
    s2 = s * st.scale2
    if row_bias is not None:
        s2 = s2 + lax.broadcast_in_dim(row_bias, s.shape, [0])
    if col_bias is not None:
        s2 = s2 + lax.broadcast_in_dim(col_bias, s.shape, [1])
    if st.alibi and not st.causal:
        s2 = s2 - slope2 * jnp.abs(distance().astype(jnp.float32))
    if masked:
        s2 = jnp.where(distance() <= 0, s2, -jnp.inf)
    return s2


def _distance(shape, offset, *, keys_first: bool):
    """(rows, cols) int32 j - i of a block in WGMMA layout; offset: first key - first query."""
    rows = lax.broadcast_in_dim(_iota(shape[0], 0), shape, [0])
    cols = lax.broadcast_in_dim(_iota(shape[1], 1), shape, [1])
    return (rows - cols if keys_first else cols - rows) + offset


def _zeros(shape):
    """float32 zeros in the WGMMA register layout."""
    return plgpu.layout_cast(jnp.zeros(shape, jnp.float32), plgpu.Layout.WGMMA)


def _zero_acc(shape):
    """A fresh float32 wgmma accumulator holding zeros."""
    return plgpu.ACC.init(_zeros(shape))


def _iota(n: int, axis: int):
    """0..n-1 laid out along `axis` of a WGMMA tile (0: the rows, a column vector)."""
    return plgpu.broadcasted_iota(jnp.int32, (n,), 0, layout=plgpu.Layout.WGMMA.reduce(1 - axis))


def key_steps(q0, *, block_q, block_kv, n_kv, causal):
    """Key blocks (free_end, end) that query rows [q0, q0 + block_q) visit: blocks [0, end),
    the first free_end of them wholly visible (no mask needed)."""
    if not causal:
        return n_kv, n_kv
    return lax.div(q0, block_kv), pl.cdiv(q0 + block_q, block_kv)


def query_steps(k0, *, block_q, block_kv, n_q, causal):
    """Query blocks (first, free_first) that visit keys [k0, k0 + block_kv): blocks
    [first, n_q), those from free_first on seeing every one of those keys."""
    if not causal:
        return 0, 0
    free_first = jnp.minimum(pl.cdiv(k0 + block_kv - 1, block_q), n_q)
    return lax.div(k0, block_q), free_first


def _causal_loops(body, carry, *, free_end, end, causal, start=0):
    """fori_loop over steps [start, end): those before free_end without masks when causal."""
    if not causal:
        return lax.fori_loop(start, end, functools.partial(body, masked=False), carry)
    split = jnp.maximum(free_end, start)
    carry = lax.fori_loop(start, split, functools.partial(body, masked=False), carry)
    return lax.fori_loop(split, end, functools.partial(body, masked=True), carry)


def _stream(n_steps, max_steps: int, stages, buffers):
    """The memory warpgroup: TMA block `step` of each buffer into ring slot step % stages.

    buffers: (source(step) -> gmem ref view, smem ring, ready barriers, free barriers). A slot
    is refilled once the compute warpgroups have arrived on its free barrier. n_steps may be
    traced; max_steps, its static bound, keeps the prologue's static slices inside the arrays.
    """

    def issue(step, slot, wait_free):
        for source, ring, ready, free in buffers:
            if wait_free:
                plgpu.barrier_wait(free.at[slot])
            plgpu.copy_gmem_to_smem(source(step), ring.at[slot], ready.at[slot])

    for i in range(min(stages, max_steps)):
        pl.when(i < n_steps)(functools.partial(issue, i, i, False))

    @pl.loop(stages, jnp.maximum(n_steps, stages))
    def _(step):
        issue(step, lax.rem(step, stages), True)

    # wait out the last frees too, so that this warpgroup observes every phase of the barriers
    # it waits on, as the Mosaic GPU interpreter (tests/mosaic_gpu_interpreter.py) requires; on
    # the GPU it costs nothing, the warpgroup has no work left
    @pl.loop(jnp.maximum(n_steps - stages, 0), n_steps)
    def _(step):
        for _, _, _, free in buffers:
            plgpu.barrier_wait(free.at[lax.rem(step, stages)])


def _stream_keys_and_values(k_ref, v_ref, rings, b, h, heads: Heads, bk, n_steps, stages):
    """The forward's and dq's memory warpgroup: key and value blocks [0, n_steps) of query head
    h's kv head into their rings ((smem, ready barriers, free barriers) each)."""
    max_steps = k_ref.shape[1] // bk
    plgpu.set_max_registers(_MEMORY_REGISTERS, action="decrease")
    g = lax.div(h, heads.H // heads.G)

    def rows(ref, first):
        return lambda step: ref.at[b, pl.ds(step * bk, bk), first + g]

    (k_smem, k_ready, k_free), (v_smem, v_ready, v_free) = rings
    _stream(
        n_steps,
        max_steps,
        stages,
        [
            (rows(k_ref, heads.k_first), k_smem, k_ready, k_free),
            (rows(v_ref, heads.v_first), v_smem, v_ready, v_free),
        ],
    )


def _forward(q, k, v, slopes, st: _Static, t: HopperTiling, heads: Heads):
    B, S, _, K = q.shape
    H = heads.H
    bq, bk, stages = t.block_q, t.block_kv, t.stages
    n_tiles, n_kv = S // (2 * bq), S // bk
    dtype = q.dtype

    def mpt_flash_mgpu_fwd(q_ref, k_ref, v_ref, slope_ref, o_ref, lse_ref, smem, ready, free, turn):
        qo_smem2, k_smem, v_smem, lse_smem2 = smem
        k_ready, v_ready, q_ready = ready
        k_free, v_free = free
        b, h, wg = lax.axis_index("b"), lax.axis_index("h"), lax.axis_index("wg")
        # causal: the last query tiles have the most keys; they start first
        tile = n_tiles - 1 - lax.axis_index("tile") if st.causal else lax.axis_index("tile")
        tile_end = (tile + 1) * (2 * bq)
        n_steps_tile = pl.cdiv(tile_end, bk) if st.causal else n_kv

        def take_turn():
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when(wg < 2)
        def _compute():
            plgpu.set_max_registers(_compute_registers(2), action="increase")
            qo_smem, lse_smem = qo_smem2.at[wg], lse_smem2.at[wg]
            q0 = tile * (2 * bq) + wg * bq
            free_end, n_steps = key_steps(q0, block_q=bq, block_kv=bk, n_kv=n_kv, causal=st.causal)
            plgpu.copy_gmem_to_smem(q_ref.at[b, pl.ds(q0, bq), h], qo_smem, q_ready.at[wg])
            slope2 = slope_ref[h] * LOG2E
            row_ids, col_ids = _iota(bq, 0), _iota(bk, 1)
            row_layout = plgpu.Layout.WGMMA.reduce(1)
            no_max = plgpu.layout_cast(jnp.full((bq,), -jnp.inf, jnp.float32), row_layout)
            no_sum = plgpu.layout_cast(jnp.zeros((bq,), jnp.float32), row_layout)
            plgpu.barrier_wait(q_ready.at[wg])
            plgpu.barrier_wait(k_ready.at[0])
            pl.when(wg == 1)(take_turn)

            def softmax(s, m, denom, step, *, masked):
                """One key block's online softmax: the new row max, the correction of what came
                before, P (float32) and the new denominator."""
                offset = step * bk - q0
                s2 = _scores2(
                    s,
                    None,
                    _alibi_line(slope2, col_ids, offset, st),
                    lambda: _distance((bq, bk), offset, keys_first=False),
                    slope2,
                    st,
                    masked=masked,
                )
                m_new = jnp.maximum(m, s2.max(axis=1))
                corr = jnp.exp2(m - m_new)
                p = jnp.exp2(s2 - lax.broadcast_in_dim(m_new, s2.shape, [0]))
                denom = denom * corr + p.sum(axis=1)
                # the softmax ends here: the caller hands the tensor cores on after it
                return lax.optimization_barrier((m_new, corr, p, denom))

            def attend(o_ref):
                """The key blocks in FlashAttention-3's order: each step issues its block's
                scores and the previous block's P V together and runs its softmax while P V
                is in flight (as well as while the other warpgroup's products are)."""

                def first_scores(s_ref):
                    plgpu.wgmma(s_ref, qo_smem, plgpu.transpose_ref(k_smem.at[0], (1, 0)))
                    take_turn()
                    return s_ref[...]

                s = pl.run_scoped(first_scores, plgpu.ACC((bq, bk), jnp.float32))
                plgpu.barrier_arrive(k_free.at[0])
                # masked when causal: a wholly visible first block keeps every score
                m0, _, p, denom0 = softmax(s, no_max, no_sum, 0, masked=st.causal)
                plgpu.barrier_arrive(turn)

                def step_body(step, carry, *, masked):
                    m, denom, p16 = carry
                    slot, previous = lax.rem(step, stages), lax.rem(step - 1, stages)
                    plgpu.barrier_wait(k_ready.at[slot])
                    plgpu.barrier_wait(v_ready.at[previous])
                    plgpu.barrier_wait(turn)

                    def products(s_ref):
                        plgpu.wgmma(s_ref, qo_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                        plgpu.wgmma(o_ref, p16, v_smem.at[previous])
                        take_turn()
                        return plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # P V may run on

                    s = pl.run_scoped(products, plgpu.ACC((bq, bk), jnp.float32))
                    plgpu.barrier_arrive(k_free.at[slot])
                    m_new, corr, p, denom = softmax(s, m, denom, step, masked=masked)
                    # a store the wait below cannot pass: without it ptxas moves the wait above
                    # the exponentials (they feed nothing else before it), and the softmax no
                    # longer runs beside P V (read from the SASS); the slot gets the LSE at the end
                    lse_smem[...] = denom
                    acc = plgpu.wgmma_accumulator_load(o_ref, wait_n=0)
                    plgpu.barrier_arrive(v_free.at[previous])
                    # P V done: only now may P's and O's registers change (a write into the
                    # operands of a product in flight makes ptxas serialize every wgmma)
                    o_ref[...] = acc * lax.broadcast_in_dim(corr, acc.shape, [0])
                    plgpu.barrier_arrive(turn)
                    return m_new, denom, p.astype(dtype)

                carry = _causal_loops(
                    step_body,
                    (m0, denom0, p.astype(dtype)),
                    free_end=free_end,
                    end=n_steps,
                    causal=st.causal,
                    start=1,
                )
                m, denom, p16 = carry
                last = lax.rem(n_steps - 1, stages)
                plgpu.barrier_wait(v_ready.at[last])
                plgpu.barrier_wait(turn)
                plgpu.wgmma(o_ref, p16, v_smem.at[last])
                # released before the blocks below, whose ring slots may come round to it
                acc = o_ref[...]
                plgpu.barrier_arrive(v_free.at[last])

                if st.causal:
                    # the blocks only the other warpgroup needs: wait for them too (a warpgroup
                    # observes every phase of the barriers it waits on), release them, and keep
                    # taking turns
                    @pl.loop(n_steps, n_steps_tile)
                    def _(step):
                        slot = lax.rem(step, stages)
                        plgpu.barrier_wait(k_ready.at[slot])
                        plgpu.barrier_wait(v_ready.at[slot])
                        plgpu.barrier_arrive(k_free.at[slot])
                        plgpu.barrier_arrive(v_free.at[slot])
                        take_turn()
                        take_turn()

                pl.when(wg == 0)(take_turn)
                qo_smem[...] = (acc / lax.broadcast_in_dim(denom, acc.shape, [0])).astype(dtype)
                # the log-sum-exp of the true scores: the query part of ALiBi restored
                lse = m + jnp.log(denom) * LOG2E
                lse_smem[...] = _minus(lse, _alibi_line(slope2, row_ids, 0, st))

            pl.run_scoped(attend, plgpu.ACC((bq, K), jnp.float32))
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(qo_smem, o_ref.at[b, pl.ds(q0, bq), h])
            plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, h, pl.ds(q0, bq)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _memory():
            rings = ((k_smem, k_ready, k_free), (v_smem, v_ready, v_free))
            _stream_keys_and_values(k_ref, v_ref, rings, b, h, heads, bk, n_steps_tile, stages)

    scratch = [
        (
            _smem((2, bq, K), dtype),
            _smem((stages, bk, K), dtype),
            _smem((stages, bk, K), dtype),
            plgpu.SMEM((2, bq), jnp.float32),
        ),
        (
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=stages),
            plgpu.Barrier(num_barriers=2),
        ),
        (plgpu.Barrier(num_arrivals=2, num_barriers=stages),) * 2,
        plgpu.Barrier(num_arrivals=2),
    ]
    return plgpu.kernel(
        mpt_flash_mgpu_fwd,
        out_type=[
            jax.ShapeDtypeStruct((B, S, H, K), dtype),
            jax.ShapeDtypeStruct((B, H, S), jnp.float32),
        ],
        scratch_types=scratch,
        grid=(n_tiles, H, B),
        grid_names=("tile", "h", "b"),
        num_threads=3,
        thread_name="wg",
        compiler_params=_COMPILER_PARAMS,
    )(q, k, v, slopes)


def _named(body, n_compute_warpgroups: int):
    """body, its kernel named for its compute warpgroups past one (`..._x2`): profiles and
    traces tell the backward's two variants apart by name."""
    if n_compute_warpgroups > 1:
        body.__name__ = body.__qualname__ = f"{body.__name__}_x{n_compute_warpgroups}"
    return body


def _release_unused(start, stop, stages, rings):
    """Stream steps [start, stop) that only the other compute warpgroup of a causal program
    needs: this one waits for each (a warpgroup observes every phase of the barriers it waits
    on) and releases it. rings: (ready barriers, free barriers) per streamed buffer."""

    @pl.loop(start, stop)
    def _(step):
        slot = lax.rem(step, stages)
        for ready, free in rings:
            plgpu.barrier_wait(ready.at[slot])
            plgpu.barrier_arrive(free.at[slot])


@dataclasses.dataclass(frozen=True)
class _Gradients:
    """Where the backward's programs write: into dq (B, S, H, K) and dk, dv (B, S, G, K)
    arrays (refs ending with whichever of them the launch makes), or into the heads of one
    fused (B, S, H + 2G, K) gradient (refs: that one array)."""

    refs: tuple
    heads: Heads
    one_array: bool

    def dq(self, b, rows, h):
        return self.refs[0].at[b, rows, h]

    def dk(self, b, keys, g):
        if self.one_array:
            return self.refs[0].at[b, keys, self.heads.H + g]
        return self.refs[-2].at[b, keys, g]

    def dv(self, b, keys, g):
        if self.one_array:
            return self.refs[0].at[b, keys, self.heads.H + self.heads.G + g]
        return self.refs[-1].at[b, keys, g]


def _dq_scratch(t: HopperTiling, K: int, dtype):
    """dq's shared memory and barriers: its W query, dO and statistics blocks, key and value
    rings."""
    W, bq, bk, stages = t.bwd_warpgroups, t.bwd_block_q, t.bwd_block_kv, t.backward_stages
    return (
        (
            _smem((W, bq, K), dtype),
            _smem((W, bq, K), dtype),
            plgpu.SMEM((W, bq), jnp.float32),
            plgpu.SMEM((W, bq), jnp.float32),
            _smem((stages, bk, K), dtype),
            _smem((stages, bk, K), dtype),
        ),
        (plgpu.Barrier(num_barriers=W),) * 4 + (plgpu.Barrier(num_barriers=stages),) * 2,
        (plgpu.Barrier(num_arrivals=W, num_barriers=stages),) * 2,
    )


def _dq_program(ins, grads: _Gradients, order, h, b, scratch, st: _Static, t, heads: Heads):
    """One dq program: W x bq query rows of query head h, the `order`-th of its head's tiles to
    start (causal: the last query tiles, which see the most keys, first)."""
    q_ref, k_ref, v_ref, slope_ref, do_ref, lse_ref, delta_ref = ins
    S, K = q_ref.shape[1], q_ref.shape[3]
    W = t.bwd_warpgroups
    bq, bk, stages = t.bwd_block_q, t.bwd_block_kv, t.backward_stages
    n_tiles, n_kv = S // (W * bq), S // bk
    dtype = q_ref.dtype
    smem, ready, free = scratch
    q_smem2, do_smem2, lse_smem2, delta_smem2, k_smem, v_smem = smem
    q_ready, do_ready, lse_ready, delta_ready, k_ready, v_ready = ready
    k_free, v_free = free
    wg = lax.axis_index("wg")
    tile = n_tiles - 1 - order if st.causal else order
    # W warpgroups of bq query rows each share the stream of key and value blocks
    _, n_streamed = key_steps(
        tile * W * bq, block_q=W * bq, block_kv=bk, n_kv=n_kv, causal=st.causal
    )

    @pl.when(wg < W)
    def _compute():
        plgpu.set_max_registers(_compute_registers(W), action="increase")
        q0 = tile * W * bq + wg * bq
        free_end, n_steps = key_steps(q0, block_q=bq, block_kv=bk, n_kv=n_kv, causal=st.causal)
        q_smem, do_smem = q_smem2.at[wg], do_smem2.at[wg]
        lse_smem, delta_smem = lse_smem2.at[wg], delta_smem2.at[wg]
        rows = pl.ds(q0, bq)
        plgpu.copy_gmem_to_smem(q_ref.at[b, rows, h], q_smem, q_ready.at[wg])
        plgpu.copy_gmem_to_smem(do_ref.at[b, rows, h], do_smem, do_ready.at[wg])
        plgpu.copy_gmem_to_smem(lse_ref.at[b, h, rows], lse_smem, lse_ready.at[wg])
        plgpu.copy_gmem_to_smem(delta_ref.at[b, h, rows], delta_smem, delta_ready.at[wg])
        slope2 = slope_ref[h] * LOG2E
        row_ids, col_ids = _iota(bq, 0), _iota(bk, 1)
        for barrier in (q_ready, do_ready, lse_ready, delta_ready):
            plgpu.barrier_wait(barrier.at[wg])
        row_layout = plgpu.Layout.WGMMA.reduce(1)
        # p = exp2(s2 - lse): the log-sum-exp (with ALiBi's query part) enters as a row bias
        lse = plgpu.load(lse_smem, (), layout=row_layout)
        neg_lse = _lse_bias(lse, _alibi_line(slope2, row_ids, 0, st))
        delta = plgpu.load(delta_smem, (), layout=row_layout)
        dq = _zeros((bq, K))

        def step_body(step, dq, *, masked):
            slot = lax.rem(step, stages)
            plgpu.barrier_wait(k_ready.at[slot])
            plgpu.barrier_wait(v_ready.at[slot])

            offset = step * bk - q0

            def products(s_ref, dp_ref):
                plgpu.wgmma(s_ref, q_smem, plgpu.transpose_ref(k_smem.at[slot], (1, 0)))
                plgpu.wgmma(dp_ref, do_smem, plgpu.transpose_ref(v_smem.at[slot], (1, 0)))
                s = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # P while dP runs
                p = jnp.exp2(
                    _scores2(
                        s,
                        neg_lse,
                        _alibi_line(slope2, col_ids, offset, st),
                        lambda: _distance((bq, bk), offset, keys_first=False),
                        slope2,
                        st,
                        masked=masked,
                    )
                )
                # a store the wait below cannot pass (the forward's reason); the slot's
                # statistics are in registers already
                lse_smem[...] = p.sum(axis=1)
                return p, dp_ref[...]

            scores = plgpu.ACC((bq, bk), jnp.float32)
            p, dp = pl.run_scoped(products, scores, scores)
            plgpu.barrier_arrive(v_free.at[slot])
            ds = p * (dp - lax.broadcast_in_dim(delta, p.shape, [0]))

            def dq_product(acc_ref):
                plgpu.wgmma(acc_ref, ds.astype(dtype), k_smem.at[slot])

            dq = pl.run_state(dq_product)(plgpu.ACC.init(dq))
            plgpu.barrier_arrive(k_free.at[slot])
            return dq

        dq = _causal_loops(step_body, dq, free_end=free_end, end=n_steps, causal=st.causal)
        if st.causal and W > 1:
            _release_unused(n_steps, n_streamed, stages, ((k_ready, k_free), (v_ready, v_free)))
        q_smem[...] = (dq * (st.scale2 / LOG2E)).astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(q_smem, grads.dq(b, rows, h))
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == W)
    def _memory():
        rings = ((k_smem, k_ready, k_free), (v_smem, v_ready, v_free))
        _stream_keys_and_values(k_ref, v_ref, rings, b, h, heads, bk, n_streamed, stages)


def _dkdv_scratch(t: HopperTiling, K: int, dtype):
    """dk/dv's shared memory and barriers: its W key and value blocks, the query, dO and
    statistics rings."""
    W, bq, bk, stages = t.bwd_warpgroups, t.bwd_block_q, t.bwd_block_kv, t.backward_stages
    return (
        (
            _smem((W, bk, K), dtype),
            _smem((W, bk, K), dtype),
            _smem((stages, bq, K), dtype),
            _smem((stages, bq, K), dtype),
            plgpu.SMEM((stages, bq), jnp.float32),
            plgpu.SMEM((stages, bq), jnp.float32),
        ),
        (plgpu.Barrier(num_barriers=W),) * 2 + (plgpu.Barrier(num_barriers=stages),) * 4,
        (plgpu.Barrier(num_arrivals=W, num_barriers=stages),) * 4,
    )


def _dkdv_program(ins, grads: _Gradients, tile, g, b, scratch, st: _Static, t, heads: Heads):
    """One dk/dv program: W x bk keys of kv head g, through the query blocks of each of the R
    query heads that share it (causal: the first key tiles, seen by the most queries, first)."""
    q_ref, k_ref, v_ref, slope_ref, do_ref, lse_ref, delta_ref = ins
    S, K = q_ref.shape[1], q_ref.shape[3]
    R, W = heads.H // heads.G, t.bwd_warpgroups
    bq, bk, stages = t.bwd_block_q, t.bwd_block_kv, t.backward_stages
    n_q = S // bq
    dtype = q_ref.dtype
    smem, ready, free = scratch
    k_smem2, v_smem2, q_smem, do_smem, lse_smem, delta_smem = smem
    k_ready, v_ready, q_ready, do_ready, lse_ready, delta_ready = ready
    q_free, do_free, lse_free, delta_free = free
    wg = lax.axis_index("wg")
    # W warpgroups of bk keys each share the stream of query blocks, from the first block
    # that sees the tile's first key
    first, _ = query_steps(tile * W * bk, block_q=bq, block_kv=bk, n_q=n_q, causal=st.causal)
    n_per_head = n_q - first
    n_steps = R * n_per_head
    rings = (
        (q_ready, q_free),
        (do_ready, do_free),
        (lse_ready, lse_free),
        (delta_ready, delta_free),
    )

    @pl.when(wg < W)
    def _compute():
        plgpu.set_max_registers(_compute_registers(W), action="increase")
        k0 = tile * W * bk + wg * bk
        own_first, free_first = query_steps(k0, block_q=bq, block_kv=bk, n_q=n_q, causal=st.causal)
        k_smem, v_smem = k_smem2.at[wg], v_smem2.at[wg]
        keys = pl.ds(k0, bk)
        plgpu.copy_gmem_to_smem(k_ref.at[b, keys, heads.k_first + g], k_smem, k_ready.at[wg])
        plgpu.copy_gmem_to_smem(v_ref.at[b, keys, heads.v_first + g], v_smem, v_ready.at[wg])
        # keys along rows: blocks are (bk, bq), j - i = row - column + k0 - q0
        row_ids, col_ids = _iota(bk, 0), _iota(bq, 1)
        column_layout = plgpu.Layout.WGMMA.reduce(0)
        plgpu.barrier_wait(k_ready.at[wg])
        plgpu.barrier_wait(v_ready.at[wg])

        def head_body(r, carry):
            slope2 = slope_ref[g * R + r] * LOG2E
            key_part = _alibi_line(slope2, row_ids, 0, st)

            def step_body(qb, carry, *, masked):
                dk, dv = carry
                slot = lax.rem(r * n_per_head + qb - first, stages)
                # keys along rows: j - i = (row + k0) - (column + q0)
                offset = k0 - qb * bq
                plgpu.barrier_wait(q_ready.at[slot])
                plgpu.barrier_wait(do_ready.at[slot])

                def products(refs):
                    # FlashAttention-3's order: each elementwise stage runs while the tensor
                    # cores work on the next product (S^T then dP^T issued together, P^T
                    # computed during dP^T, dS^T during dV)
                    s_ref, dp_ref, dv_ref, dk_ref = refs
                    plgpu.wgmma(s_ref, k_smem, plgpu.transpose_ref(q_smem.at[slot], (1, 0)))
                    plgpu.wgmma(dp_ref, v_smem, plgpu.transpose_ref(do_smem.at[slot], (1, 0)))
                    plgpu.barrier_wait(lse_ready.at[slot])
                    lse = plgpu.load(lse_smem.at[slot], (), layout=column_layout)
                    plgpu.barrier_arrive(lse_free.at[slot])
                    s_t = plgpu.wgmma_accumulator_load(s_ref, wait_n=1)  # dP^T may still run
                    p_t = jnp.exp2(
                        _scores2(
                            s_t,
                            key_part,
                            _lse_bias(lse, _alibi_line(slope2, col_ids, -offset, st)),
                            lambda: _distance((bk, bq), offset, keys_first=True),
                            slope2,
                            st,
                            masked=masked,
                        )
                    )
                    plgpu.wgmma(dv_ref, p_t.astype(dtype), do_smem.at[slot])
                    plgpu.barrier_wait(delta_ready.at[slot])
                    delta = plgpu.load(delta_smem.at[slot], (), layout=column_layout)
                    plgpu.barrier_arrive(delta_free.at[slot])
                    dp_t = plgpu.wgmma_accumulator_load(dp_ref, wait_n=1)  # dV may still run
                    ds_t = p_t * (dp_t - lax.broadcast_in_dim(delta, (bk, bq), [1]))
                    plgpu.wgmma(dk_ref, ds_t.astype(dtype), q_smem.at[slot])

                scores = (_zero_acc((bk, bq)), _zero_acc((bk, bq)))
                accumulators = (plgpu.ACC.init(dv), plgpu.ACC.init(dk))
                _, _, dv, dk = pl.run_state(products)((*scores, *accumulators))
                plgpu.barrier_arrive(do_free.at[slot])
                plgpu.barrier_arrive(q_free.at[slot])
                return dk, dv

            if not st.causal:
                return lax.fori_loop(0, n_q, functools.partial(step_body, masked=False), carry)
            if W > 1:  # the query blocks only an earlier warpgroup's keys see
                head_start = r * n_per_head  # the stream's step of block `first`
                _release_unused(head_start, head_start + own_first - first, stages, rings)
            masked_body = functools.partial(step_body, masked=True)
            carry = lax.fori_loop(own_first, free_first, masked_body, carry)
            free_body = functools.partial(step_body, masked=False)
            return lax.fori_loop(free_first, n_q, free_body, carry)

        dk, dv = lax.fori_loop(0, R, head_body, (_zeros((bk, K)), _zeros((bk, K))))
        k_smem[...] = (dk * (st.scale2 / LOG2E)).astype(dtype)
        v_smem[...] = dv.astype(dtype)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(k_smem, grads.dk(b, keys, g), commit_group=False)
        plgpu.copy_smem_to_gmem(v_smem, grads.dv(b, keys, g), commit_group=False)
        plgpu.commit_smem_to_gmem_group()
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == W)
    def _memory():
        plgpu.set_max_registers(_MEMORY_REGISTERS, action="decrease")

        def head_and_rows(step):
            head = g * R + lax.div(step, n_per_head)
            return head, pl.ds((first + lax.rem(step, n_per_head)) * bq, bq)

        def block(ref):
            def source(step):
                head, rows = head_and_rows(step)
                return ref.at[b, rows, head]

            return source

        def stats(ref):
            def source(step):
                head, rows = head_and_rows(step)
                return ref.at[b, head, rows]

            return source

        _stream(
            n_steps,
            R * n_q,
            stages,
            [
                (block(q_ref), q_smem, q_ready, q_free),
                (block(do_ref), do_smem, do_ready, do_free),
                (stats(lse_ref), lse_smem, lse_ready, lse_free),
                (stats(delta_ref), delta_smem, delta_ready, delta_free),
            ],
        )


def _backward(q, k, v, slopes, do, lse2, delta, st: _Static, t: HopperTiling, heads: Heads, parts):
    """The backward's programs in one launch: parts ("dkdv", "dq"), or one of them.

    The grid is (programs, G, B): per kv head, first the dk/dv programs (W x bk keys each),
    then the dq programs of its R query heads (W x bq query rows of one head each, the heads of
    a query tile side by side). Both parts in one launch write every gradient into its final
    array: the fused (B, S, H + 2G, K) one in place, where two launches concatenate, and dq's
    programs fill the SMs that dk/dv's last, unequal causal programs leave idle. Each part
    allocates its shared memory and barriers for its own programs (`pl.run_scoped`), so the
    launch needs the larger part's, not both.
    """
    B, S, _, K = q.shape
    H, G, W = heads.H, heads.G, t.bwd_warpgroups
    R = H // G
    n_kv_tiles = S // (W * t.bwd_block_kv) if "dkdv" in parts else 0
    n_dq_programs = R * (S // (W * t.bwd_block_q)) if "dq" in parts else 0
    dtype = q.dtype
    one_array = heads.fused and len(parts) == 2
    if one_array:
        out_type = [jax.ShapeDtypeStruct((B, S, H + 2 * G, K), dtype)]
    else:
        kv_type = jax.ShapeDtypeStruct((B, S, G, K), dtype)
        out_type = [jax.ShapeDtypeStruct((B, S, H, K), dtype)] if "dq" in parts else []
        out_type += [kv_type, kv_type] if "dkdv" in parts else []

    def program(*refs):
        grads = _Gradients(refs[7:], heads, one_array)
        tile, g, b = lax.axis_index("tile"), lax.axis_index("g"), lax.axis_index("b")
        run = dict(st=st, t=t, heads=heads)

        def dkdv(scratch):
            _dkdv_program(refs[:7], grads, tile, g, b, scratch, **run)

        def dq(scratch):
            order, r = lax.div(tile - n_kv_tiles, R), lax.rem(tile - n_kv_tiles, R)
            _dq_program(refs[:7], grads, order, g * R + r, b, scratch, **run)

        for part, body, scratch, start, stop in (
            ("dkdv", dkdv, _dkdv_scratch, 0, n_kv_tiles),
            ("dq", dq, _dq_scratch, n_kv_tiles, n_kv_tiles + n_dq_programs),
        ):
            if part not in parts:
                continue
            types = scratch(t, K, dtype)
            scoped = functools.partial(pl.run_scoped, body, types, collective_axes="wg")
            if len(parts) == 1:
                scoped()
            else:
                pl.when((tile >= start) & (tile < stop))(scoped)

    program.__name__ = "mpt_flash_mgpu_" + ("bwd" if len(parts) == 2 else parts[0])
    return plgpu.kernel(
        _named(program, W),
        out_type=out_type,
        grid=(n_kv_tiles + n_dq_programs, G, B),
        grid_names=("tile", "g", "b"),
        num_threads=W + 1,
        thread_name="wg",
        compiler_params=_COMPILER_PARAMS,
    )(q, k, v, slopes, do, lse2, delta)


def _sources(q, k, v):
    """The arrays the kernels read q, k and v heads from: (q, k, v), or the fused one thrice."""
    return (q, q, q) if k is None else (q, k, v)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, slopes, st: _Static, tiling: HopperTiling, heads: Heads):
    return _forward(*_sources(q, k, v), slopes, st, tiling, heads)[0]


def _flash_fwd(q, k, v, slopes, st, tiling, heads):
    o, lse2 = _forward(*_sources(q, k, v), slopes, st, tiling, heads)
    return o, (q, k, v, slopes, o, lse2)


def _flash_bwd(st, tiling, heads: Heads, residuals, do):
    q, k, v, slopes, o, lse2 = residuals
    # D_i = rowsum(dO_i * O_i), the softmax-gradient correction, (B, H, S) float32
    # a product and a sum, one fusion: as an einsum it was a batched dot_general of K-long
    # vectors, which XLA GPU may hand to a matmul library
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1).transpose(0, 2, 1)
    args = (*_sources(q, k, v), slopes, do.astype(q.dtype), lse2, delta, st, tiling, heads)
    no_slope_grad = jnp.zeros_like(slopes)
    if tiling.bwd_launches == 1:
        grads = _backward(*args, parts=("dkdv", "dq"))
        if heads.fused:  # the fused array's gradient, written in place
            return grads[0], None, None, no_slope_grad
        return (*grads, no_slope_grad)
    (dq,) = _backward(*args, parts=("dq",))
    dk, dv = _backward(*args, parts=("dkdv",))
    if heads.fused:  # one gradient for the fused array
        return jnp.concatenate([dq, dk, dv], axis=2), None, None, no_slope_grad
    return dq, dk, dv, no_slope_grad


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention_mgpu(
    q_BSHK: jax.Array,
    k_BSGK: jax.Array,
    v_BSGK: jax.Array,
    *,
    alibi_slopes: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    tiling: HopperTiling | None = None,
) -> jax.Array:
    """Fused attention (B, S, H, K) with in-kernel ALiBi on Hopper; differentiable in q, k, v."""
    if k_BSGK.dtype != q_BSHK.dtype or v_BSGK.dtype != q_BSHK.dtype:
        raise ValueError("flash_attention_mgpu: q, k and v must have one dtype")
    heads = Heads(q_BSHK.shape[2], k_BSGK.shape[2], fused=False)
    arrays = (q_BSHK, k_BSGK, v_BSGK)
    check_arrays("flash_attention_mgpu", *arrays, alibi_slopes, segment_ids, heads)
    return _attend(
        heads, arrays, k_BSGK.shape, alibi_slopes, segment_ids, causal, softmax_scale, tiling
    )


def flash_attention_mgpu_qkv(
    qkv_BSNK: jax.Array,
    *,
    n_kv_heads: int,
    alibi_slopes: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    tiling: HopperTiling | None = None,
) -> jax.Array:
    """flash_attention_mgpu of split(qkv_BSNK, [H, H + G], axis=2), N = H + 2G, read in place.

    TMA loads each head's blocks straight from the fused (B, S, N, K) Wqkv output, where slices
    would be copied first; the gradient is one (B, S, N, K) array. Returns (B, S, H, K).
    """
    B, S, N, K = qkv_BSNK.shape
    G = n_kv_heads
    H = N - 2 * G
    if G < 1 or H < 1 or H % G:
        raise ValueError(
            f"flash_attention_mgpu_qkv: {N} fused heads are not H query heads, a multiple of "
            f"n_kv_heads={n_kv_heads}, plus 2 x {n_kv_heads} kv heads"
        )
    heads = Heads(H, G, fused=True)
    check_arrays("flash_attention_mgpu_qkv", qkv_BSNK, None, None, alibi_slopes, segment_ids, heads)
    return _attend(
        heads,
        (qkv_BSNK, None, None),
        (B, S, G, K),
        alibi_slopes,
        segment_ids,
        causal,
        softmax_scale,
        tiling,
    )


def _attend(heads: Heads, arrays, kv_shape, alibi_slopes, segment_ids, causal, scale, tiling):
    """What both entry points share: arrays (q, k, v) or (qkv, None, None)."""
    tiling = tiling or HopperTiling()
    B, S, _, K = arrays[0].shape
    q_shape = (B, S, heads.H, K)
    dtype = arrays[0].dtype
    reason = unsupported_reason(q_shape, kv_shape, dtype, segment_ids=segment_ids, tiling=tiling)
    if reason is not None:
        raise ValueError(f"flash_attention_mgpu: unsupported input: {reason}")
    scale = 1.0 / math.sqrt(K) if scale is None else float(scale)
    alibi = alibi_slopes is not None
    H = heads.H
    slopes = jnp.asarray(alibi_slopes, jnp.float32) if alibi else jnp.zeros((H,), jnp.float32)
    st = _Static(scale2=scale * LOG2E, causal=causal, alibi=alibi)
    return _flash(*arrays, slopes, st, tiling, heads)
