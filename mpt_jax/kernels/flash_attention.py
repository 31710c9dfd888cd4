"""FlashAttention-2 style Pallas kernels with ALiBi computed in-kernel, forward and backward.

Shapes: B batch, S sequence (queries and keys), H query heads, G kv heads (H % G == 0),
K head dim. Inputs q (B, S, H, K), k and v (B, S, G, K); ALiBi slopes (H,) float32 add
-slope_h * |i - j| to the scores from iotas (no bias tensor, no bias gradient); segment ids
(B, S) restrict attention to equal ids; causal blocks above the diagonal are skipped.
A sequence length that is not a multiple of the block sizes is padded and the tail masked; a
head dim that is not a power of two (80, 96, 112) is zero-padded.
Scores, softmax statistics and accumulators are float32 whatever the input dtype.

Per element of a score block the kernels do as little as the math allows, since past the two
matmuls the exponentials and masks bound FlashAttention on Hopper:
- scores are kept in log2 units (the scale carries log2 e), so the softmax is one exp2;
- causal ALiBi enters as the key-only row slope * (j - a), a = q0 + bq // 2 the block's middle
  query: it differs from -slope * |i - j| by the per-row constant slope * (i - a), which the
  softmax removes; the log-sum-exp leaves the kernel with that constant restored, so kernels
  with other tilings agree on it. The middle, not the first query, halves the scores' size near
  the diagonal (up to slope * bq / 2), and with it their float32 rounding, which reaches the
  gradients (MPT-30B's slopes at 128-query blocks: 1.3e-5 relative from the first query);
- causal blocks wholly below the diagonal are computed without masks (only segment ids, when
  given, still mask): a padded key there implies a padded query, whose output is dropped and
  whose zero output gradient adds nothing to dk and dv;
- dk/dv computes its blocks keys-first, (bk, bq) = k q^T, so p^T and ds^T feed its products
  dv += p^T dO and dk += ds^T q as computed: the only transposes are of tiles it loads.

Programs launch one group of heads at a time (`_Order`), all blocks of a few heads side by side,
so the sequence-long operand each program streams (keys and values; queries and output
gradients for dk/dv) is read from HBM about once per head and then from L2, and the costliest
causal blocks start first.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mpt_jax.kernels.common import MASKED, NT_DIMS, Heads, check_arrays, pad_axis, poison

LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Tiling:
    """Block sizes of one kernel and its Triton launch parameters (None: Triton's default)."""

    block_q: int = 64
    block_k: int = 64
    num_warps: int | None = None
    num_stages: int | None = None

    def compiler_params(self) -> plgpu.CompilerParams:
        return plgpu.CompilerParams(num_warps=self.num_warps, num_stages=self.num_stages)


@dataclasses.dataclass(frozen=True)
class Tilings:
    """One Tiling per kernel: the forward, dq (query blocks) and dk/dv (key blocks)."""

    fwd: Tiling = Tiling()
    dq: Tiling = Tiling()
    dkv: Tiling = Tiling()

    @classmethod
    def uniform(cls, block_q: int, block_k: int) -> Tilings:
        t = Tiling(block_q, block_k)
        return cls(t, t, t)

    def padded_length(self, seq_len: int) -> int:
        """seq_len rounded up to a multiple of every block size."""
        blocks = (self.fwd, self.dq, self.dkv)
        multiple = math.lcm(*(b for t in blocks for b in (t.block_q, t.block_k)))
        return multiple * pl.cdiv(seq_len, multiple)


# the per-kernel winners of `tools/bench_attention.py --tune 128` on an H200 (2026-11-28,
# docs/benchmarks.md): fwd+bwd 2.05 ms against 2.49 for uniform 64 x 64 blocks with Triton's
# defaults at (8, 2048, 16, 128), 6.04 against 6.75 ms at (2, 8192, 16, 128)
TUNED_HEAD_DIM_128 = Tilings(
    fwd=Tiling(128, 32, num_warps=8, num_stages=3),
    dq=Tiling(128, 32, num_warps=4, num_stages=3),
    dkv=Tiling(64, 64, num_warps=4, num_stages=2),
)


def default_tilings(head_dim: int) -> Tilings:
    """The tilings `flash_attention` uses for a (power-of-two padded) head dim.

    Up to head dim 128 the H200 sweep's winners at 128 (smaller head dims hold fewer bytes per
    block). Above 128 uniform blocks shrink so that no block holds more bytes than a 64 x 128
    one: in the first H200 sweep uniform blocks with twice those bytes (128 x 64 at head dim
    128, Triton's default stages) overflowed shared memory; 32 x 32 at 256 passed the GPU tests.
    """
    if head_dim <= 128:
        return TUNED_HEAD_DIM_128
    block = 64 * 128 // head_dim
    return Tilings.uniform(block, block)


# the bytes of sequence-long operands that one group of heads may stream side by side: well
# inside an H100's or H200's 50 MB L2, which the group's programs then share
L2_GROUP_BYTES = 16 << 20
# GQA's dk/dv sums each kv head's query heads in one program when that makes at least this many
# programs: four waves of an H100's or H200's 132 SMs, so that causal programs of unequal length
# still balance (MQA at batch 8, seq 2048 would otherwise make 256 programs of 16 heads each)
_MIN_GROUPED_PROGRAMS = 4 * 132


@dataclasses.dataclass(frozen=True)
class _Order:
    """Launch order of one kernel's programs over grid (n_blocks * group, H // group, B).

    Triton launches grid axis 0 fastest, so programs run one group of `group` heads at a time,
    every block of the group's heads together, and the operand they all stream along the
    sequence stays in L2. (A grid (B, H, blocks) launches batch and head fastest: each program
    of a wave reads a different head, and every head's keys and values come from HBM again for
    each of its query blocks.) Within a group the costliest causal blocks go first (query
    blocks from the last, key blocks from the first), so the last programs to start are short.
    """

    n_blocks: int
    group: int
    last_block_first: bool

    @classmethod
    def build(cls, n_blocks: int, H: int, streamed_bytes_per_head: int, *, last_block_first):
        """The largest group (a divisor of H) whose heads stream at most L2_GROUP_BYTES."""
        fits = max(1, L2_GROUP_BYTES // max(streamed_bytes_per_head, 1))
        group = max(g for g in range(1, H + 1) if H % g == 0 and g <= fits)
        return cls(n_blocks, group, last_block_first)

    def grid(self, H: int, B: int) -> tuple[int, int, int]:
        return (self.n_blocks * self.group, H // self.group, B)

    def block(self, t):
        """The query (or key) block of program t along grid axis 0."""
        i = lax.div(t, self.group)
        return self.n_blocks - 1 - i if self.last_block_first else i

    def head(self, t, group_index):
        """The query head of program (t, group_index)."""
        return group_index * self.group + lax.rem(t, self.group)


def _n_key_blocks(qi, *, bq, bk, n_k, causal):
    """Key blocks a query block needs: all of them, or up to the diagonal when causal."""
    if not causal:
        return n_k
    return jnp.minimum(lax.div((qi + 1) * bq + bk - 1, bk), n_k)


def _n_unmasked_key_blocks(qi, *, bq, bk, causal):
    """Leading key blocks with every key at or before every query of query block qi."""
    return lax.div(qi * bq + 1, bk) if causal else 0


def _first_unmasked_query_block(ki, *, bq, bk, n_q, causal):
    """First query block whose every query is at or after every key of key block ki."""
    if not causal:
        return n_q
    return jnp.minimum(lax.div(ki * bk + bk - 1 + bq - 1, bq), n_q)


def _split_refs(refs, n_inputs: int, has_seg: bool, n_outputs: int):
    """(input refs, query-segment ref, key-segment ref, output refs) of a kernel's refs.

    Poison buffers (tests), if any, sit between the inputs and the outputs and are unused.
    """
    n_seg = 2 if has_seg else 0
    q_seg, k_seg = refs[n_inputs : n_inputs + n_seg] if has_seg else (None, None)
    return refs[:n_inputs], q_seg, k_seg, refs[len(refs) - n_outputs :]


@dataclasses.dataclass(frozen=True)
class _Block:
    """Static facts every kernel's score computation needs."""

    scale2: float  # softmax scale times log2 e
    causal: bool
    alibi: bool
    seq_len: int


def _scores2(qk, q_pos, k_pos, anchor, q_seg, k_seg, slope2, blk: _Block, *, masked: bool):
    """Scores in log2 units from the raw product qk, ALiBi relative to query `anchor` (the
    block's middle, `_anchor`), masks if `masked`.

    qk is q k^T (bq, bk) with query positions and segment ids a column and keys' a row, or its
    transpose k q^T (bk, bq) with them the other way round: every term broadcasts either way.
    """
    s = qk * blk.scale2
    if blk.alibi and blk.causal:
        s = s + slope2 * (k_pos - anchor).astype(jnp.float32)
    elif blk.alibi:
        s = s - slope2 * jnp.abs(q_pos - k_pos).astype(jnp.float32)
    keep = None
    if masked:
        keep = k_pos < blk.seq_len
        if blk.causal:
            keep &= q_pos >= k_pos
    if q_seg is not None:
        same = q_seg == k_seg
        keep = same if keep is None else keep & same
    return s if keep is None else jnp.where(keep, s, MASKED)


def _backward_block2(
    q, k, v, do, lse2, delta, q_pos, k_pos, anchor, q_seg, k_seg, slope2, blk, *, masked, keys_first
):
    """Probabilities p and score gradients ds: common.backward_block in log2 units.

    (bq, bk) with lse2, delta, q_pos and q_seg columns; keys_first: their transposes (bk, bq),
    computed as such (k q^T and v do^T) with those four rows, so that dk/dv's products
    p^T do and ds^T q take them as they are, with no transpose of a register tile.
    """
    if keys_first:
        qk = lax.dot_general(k, q, NT_DIMS, preferred_element_type=jnp.float32)
        dp = lax.dot_general(v, do, NT_DIMS, preferred_element_type=jnp.float32)
    else:
        qk = lax.dot_general(q, k, NT_DIMS, preferred_element_type=jnp.float32)
        dp = lax.dot_general(do, v, NT_DIMS, preferred_element_type=jnp.float32)
    s = _scores2(qk, q_pos, k_pos, anchor, q_seg, k_seg, slope2, blk, masked=masked)
    p = jnp.exp2(s - lse2)
    return p, p * (dp - delta)


def _anchor(q0, bq):
    """The query the key-only causal ALiBi of a block starting at q0 is relative to."""
    return q0 + bq // 2


def _row_shift2(shape, slope2, blk: _Block, *, axis=0):
    """Log2-unit offset, per query of a block, of true -slope * |i - j| scores from _scores2's.

    shape: (bq,), (bq, 1) or, with axis 1, (1, bq): queries along `axis`; the offset is
    -slope * (i - anchor).
    """
    if not (blk.alibi and blk.causal):
        return jnp.zeros(shape, jnp.float32)
    rows = lax.broadcasted_iota(jnp.int32, shape, axis) - _anchor(0, shape[axis])
    return -slope2 * rows.astype(jnp.float32)


def _fwd_kernel(*refs, blk: _Block, order: _Order, bq, bk, n_k, has_seg):
    (q_ref, k_ref, v_ref, slope_ref), qs_ref, ks_ref, (o_ref, lse_ref) = _split_refs(
        refs, 4, has_seg, 2
    )
    qi = order.block(pl.program_id(0))
    q = q_ref[...]
    slope2 = slope_ref[0] * LOG2E
    q0 = qi * bq
    q_pos = q0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    q_seg = qs_ref[...][:, None] if has_seg else None

    def body(kb, carry, *, masked):
        acc, m, denom = carry
        ks = pl.ds(pl.multiple_of(kb * bk, bk), bk)
        k_pos = kb * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        k_seg = ks_ref[ks][None, :] if has_seg else None
        qk = lax.dot_general(q, k_ref[ks, :], NT_DIMS, preferred_element_type=jnp.float32)
        s = _scores2(qk, q_pos, k_pos, _anchor(q0, bq), q_seg, k_seg, slope2, blk, masked=masked)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp2(s - m_new[:, None])
        corr = jnp.exp2(m - m_new)
        v = v_ref[ks, :]
        acc = corr[:, None] * acc + jnp.dot(
            p.astype(v.dtype), v, preferred_element_type=jnp.float32
        )
        return acc, m_new, corr * denom + p.sum(axis=-1)

    K = q.shape[-1]
    carry = (
        jnp.zeros((bq, K), jnp.float32),
        jnp.full((bq,), MASKED, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
    )
    n_free = _n_unmasked_key_blocks(qi, bq=bq, bk=bk, causal=blk.causal)
    n_end = _n_key_blocks(qi, bq=bq, bk=bk, n_k=n_k, causal=blk.causal)
    carry = lax.fori_loop(0, n_free, functools.partial(body, masked=False), carry)
    acc, m, denom = lax.fori_loop(n_free, n_end, functools.partial(body, masked=True), carry)
    denom = jnp.maximum(denom, 1e-30)
    o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)
    lse2 = m + jnp.log2(denom)
    lse_ref[...] = lse2 + _row_shift2((bq,), slope2, blk)


def _dq_kernel(*refs, blk: _Block, order: _Order, bq, bk, n_k, has_seg):
    inputs, qs_ref, ks_ref, (dq_ref, d_ref) = _split_refs(refs, 7, has_seg, 2)
    q_ref, k_ref, v_ref, slope_ref, do_ref, lse_ref, o_ref = inputs
    qi = order.block(pl.program_id(0))
    q, do = q_ref[...], do_ref[...]
    slope2 = slope_ref[0] * LOG2E
    q0 = qi * bq
    q_pos = q0 + lax.broadcasted_iota(jnp.int32, (bq, 1), 0)
    lse2 = lse_ref[...][:, None] - _row_shift2((bq, 1), slope2, blk)
    # D_i = rowsum(dO_i * O_i), the softmax-gradient correction, from the dO block in hand;
    # written out for the dk/dv kernel, which runs after this one
    delta = jnp.sum(do.astype(jnp.float32) * o_ref[...].astype(jnp.float32), axis=-1)
    d_ref[...] = delta
    delta = delta[:, None]
    q_seg = qs_ref[...][:, None] if has_seg else None

    def body(kb, dq, *, masked):
        ks = pl.ds(pl.multiple_of(kb * bk, bk), bk)
        k_pos = kb * bk + lax.broadcasted_iota(jnp.int32, (1, bk), 1)
        k, v = k_ref[ks, :], v_ref[ks, :]
        k_seg = ks_ref[ks][None, :] if has_seg else None
        _, ds = _backward_block2(
            *(q, k, v, do, lse2, delta, q_pos, k_pos, _anchor(q0, bq), q_seg, k_seg, slope2, blk),
            masked=masked,
            keys_first=False,
        )
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    K = q.shape[-1]
    n_free = _n_unmasked_key_blocks(qi, bq=bq, bk=bk, causal=blk.causal)
    n_end = _n_key_blocks(qi, bq=bq, bk=bk, n_k=n_k, causal=blk.causal)
    dq = jnp.zeros((bq, K), jnp.float32)
    dq = lax.fori_loop(0, n_free, functools.partial(body, masked=False), dq)
    dq = lax.fori_loop(n_free, n_end, functools.partial(body, masked=True), dq)
    dq_ref[...] = (dq * (blk.scale2 / LOG2E)).astype(dq_ref.dtype)


def _dkdv_kernel(
    *refs, blk: _Block, order: _Order, bq, bk, n_q, has_seg, into: Heads | None, R: int = 1
):
    """dk and dv of one key block, summed over the program's R query heads: R > 1, a kv head's
    (grouped GQA: their q, do, statistics and slopes come as (Sp, R, ...) blocks); R = 1, one
    query head's (MHA, or GQA per query head).

    `into`: written into the kv head's place in the fused (B, Sp, N, K) gradient whose q heads
    the dq kernel wrote, else into arrays of their own, one head per program.
    """
    inputs, qs_ref, ks_ref, outs = _split_refs(refs, 7, has_seg, 1 if into else 2)
    q_ref, k_ref, v_ref, slope_ref, do_ref, lse_ref, d_ref = inputs
    ki = order.block(pl.program_id(0))
    k, v = k_ref[...], v_ref[...]
    # keys along the first axis: blocks are (bk, bq), the transpose of the other kernels'
    k_pos = ki * bk + lax.broadcasted_iota(jnp.int32, (bk, 1), 0)
    k_seg = ks_ref[...][:, None] if has_seg else None

    def body(qb, carry, *, masked, r):
        dk, dv = carry
        qs = pl.ds(pl.multiple_of(qb * bq, bq), bq)
        q0 = qb * bq
        q_pos = q0 + lax.broadcasted_iota(jnp.int32, (1, bq), 1)
        if R == 1:
            q, do, slope = q_ref[qs, :], do_ref[qs, :], slope_ref[0]
            lse, delta = lse_ref[qs], d_ref[qs]
        else:
            q, do, slope = q_ref[qs, r, :], do_ref[qs, r, :], slope_ref[r]
            lse, delta = lse_ref[r, qs], d_ref[r, qs]
        slope2 = slope * LOG2E
        q_seg = qs_ref[qs][None, :] if has_seg else None
        lse2 = lse[None, :] - _row_shift2((1, bq), slope2, blk, axis=1)
        p_t, ds_t = _backward_block2(
            *(q, k, v, do, lse2, delta[None, :], q_pos, k_pos, _anchor(q0, bq), q_seg, k_seg),
            *(slope2, blk),
            masked=masked,
            keys_first=True,
        )
        dv = dv + jnp.dot(p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dk = dk + jnp.dot(ds_t.astype(q.dtype), q, preferred_element_type=jnp.float32)
        return dk, dv

    # causal: query blocks before this key block see none of it
    first = lax.div(ki * bk, bq) if blk.causal else 0
    first_free = _first_unmasked_query_block(ki, bq=bq, bk=bk, n_q=n_q, causal=blk.causal)

    def over_heads(start, stop, *, masked):
        """Query blocks [start, stop) of each of the R heads. GQA: one flat loop over (head,
        block) pairs; as two nested loops Triton spills twice as much (kernel_sass)."""
        if R == 1:
            block = functools.partial(body, masked=masked, r=0)
            return lambda carry: lax.fori_loop(start, stop, block, carry)
        n = stop - start

        def step(j, carry):
            return body(start + lax.rem(j, n), carry, masked=masked, r=lax.div(j, n))

        return lambda carry: lax.fori_loop(0, R * n, step, carry)

    zeros = jnp.zeros((bk, k.shape[-1]), jnp.float32)
    # the group's query heads summed in registers (no per-query-head arrays)
    carry = over_heads(first, first_free, masked=True)((zeros, zeros))
    dk, dv = over_heads(first_free, n_q, masked=False)(carry)
    dk = dk * (blk.scale2 / LOG2E)
    if into is None:
        dk_ref, dv_ref = outs
        dk_ref[...] = dk.astype(dk_ref.dtype)
        dv_ref[...] = dv.astype(dv_ref.dtype)
        return
    (dqkv_ref,) = outs
    b, g = pl.program_id(2), order.head(pl.program_id(0), pl.program_id(1))
    rows = pl.ds(pl.multiple_of(ki * bk, bk), bk)
    dqkv_ref[b, rows, into.k_first + g, :] = dk.astype(dqkv_ref.dtype)
    dqkv_ref[b, rows, into.v_first + g, :] = dv.astype(dqkv_ref.dtype)


def _specs(order: _Order, heads: Heads, Sp, K, bq, has_seg):
    """BlockSpecs of forward and dq program (t, g, b) in order.grid, blocked along the queries of
    query head h: (q, k, v, row, slope, segment) specs; the q spec also serves the (B, Sp, H, K)
    outputs."""
    R = heads.H // heads.G
    i, h = order.block, order.head

    def kv_spec(first):
        """k or v (first: the array's first k or v head) of query head h, every key."""
        return pl.BlockSpec(
            (None, Sp, None, K), lambda t, g, b: (b, 0, first + lax.div(h(t, g), R), 0)
        )

    q_spec = pl.BlockSpec((None, bq, None, K), lambda t, g, b: (b, i(t), h(t, g), 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda t, g, b: (b, h(t, g), i(t)))
    qs_spec = pl.BlockSpec((None, bq), lambda t, g, b: (b, i(t)))
    ks_spec = pl.BlockSpec((None, Sp), lambda t, g, b: (b, 0))
    slope_spec = pl.BlockSpec((1,), lambda t, g, b: (h(t, g),))
    seg_specs = [qs_spec, ks_spec] if has_seg else []
    k_spec, v_spec = kv_spec(heads.k_first), kv_spec(heads.v_first)
    return q_spec, k_spec, v_spec, row_spec, slope_spec, seg_specs


def _dkdv_specs(order: _Order, heads: Heads, Sp, K, bk, has_seg, *, per_program: int):
    """BlockSpecs of dk/dv program (t, g, b): a key block of the kv head g (per_program = R, its
    R query heads' q, do, rows and slopes as (Sp, R, K), (R, Sp) and (R,) blocks) or of the query
    head g (per_program = 1, squeezed; the kv head g // R). (q, k, v, row, slope, segment)
    specs; the q spec also serves do."""
    R = heads.H // heads.G
    i, g = order.block, order.head
    k_spec, v_spec = (
        pl.BlockSpec(
            (None, bk, None, K),
            lambda t, gi, b, f=first: (b, i(t), f + lax.div(g(t, gi) * per_program, R), 0),
        )
        for first in (heads.k_first, heads.v_first)
    )
    heads_dim = None if per_program == 1 else per_program
    q_spec = pl.BlockSpec((None, Sp, heads_dim, K), lambda t, gi, b: (b, 0, g(t, gi), 0))
    row_spec = pl.BlockSpec((None, heads_dim, Sp), lambda t, gi, b: (b, g(t, gi), 0))
    slope_spec = pl.BlockSpec((per_program,), lambda t, gi, b: (g(t, gi),))
    qs_spec = pl.BlockSpec((None, Sp), lambda t, gi, b: (b, 0))
    ks_spec = pl.BlockSpec((None, bk), lambda t, gi, b: (b, i(t)))
    seg_specs = [qs_spec, ks_spec] if has_seg else []
    return q_spec, k_spec, v_spec, row_spec, slope_spec, seg_specs


def _order(H, Sp, K, itemsize, t: Tiling, *, over_keys: bool, causal: bool) -> _Order:
    """The launch order of a kernel: per head it streams two (Sp, K) operands."""
    n_blocks = Sp // (t.block_k if over_keys else t.block_q)
    # causal work grows with the query block and shrinks with the key block
    last_first = causal and not over_keys
    return _Order.build(n_blocks, H, 2 * Sp * K * itemsize, last_block_first=last_first)


def _launch(
    kernel,
    *,
    blk,
    order,
    t: Tiling,
    grid,
    has_seg,
    args,
    in_specs,
    out_specs,
    out_shape,
    name,
    interpret,
    poison_outputs,
    aliases=None,
):
    """pallas_call of one kernel (bound to the statics all three take), outputs NaN if poisoned;
    `aliases`: {input index: output index} of outputs updated in place (never poisoned)."""
    bufs, buf_specs, poisoned = poison(out_shape, out_specs, len(args), poison_outputs)
    aliases = aliases or poisoned
    bound = functools.partial(
        kernel, blk=blk, order=order, bq=t.block_q, bk=t.block_k, has_seg=has_seg
    )
    return pl.pallas_call(
        bound,
        grid=grid,
        in_specs=[*in_specs, *buf_specs],
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        interpret=interpret,
        compiler_params=t.compiler_params(),
        name=name,
    )(*args, *bufs)


def _sources(q, k, v, Sp: int):
    """The arrays q, k and v heads are read from, padded to Sp rows: (q, k, v), or the fused one
    (k and v None) three times."""
    if k is None:
        fused = pad_axis(q, Sp, 1)
        return fused, fused, fused
    return tuple(pad_axis(x, Sp, 1) for x in (q, k, v))


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8, 9))
def _flash(q, k, v, slopes, segment_ids, blk, tilings, heads, interpret, poison_outputs):
    args = (q, k, v, slopes, segment_ids, blk, tilings, heads, interpret, poison_outputs)
    return _forward(*args)[0]


def _forward(q, k, v, slopes, segment_ids, blk, tilings, heads: Heads, interpret, poison_outputs):
    B, S, _, K = q.shape
    H = heads.H
    Sp = tilings.padded_length(S)
    t = tilings.fwd
    has_seg = segment_ids is not None
    qp, kp, vp = _sources(q, k, v, Sp)
    order = _order(H, Sp, K, q.dtype.itemsize, t, over_keys=False, causal=blk.causal)
    specs = _specs(order, heads, Sp, K, t.block_q, has_seg)
    q_spec, k_spec, v_spec, row_spec, slope_spec, seg_specs = specs
    segs = [pad_axis(segment_ids, Sp, 1)] * 2 if has_seg else []
    launch = dict(blk=blk, order=order, t=t, grid=order.grid(H, B), has_seg=has_seg)
    o, lse2 = _launch(
        functools.partial(_fwd_kernel, n_k=Sp // t.block_k),
        **launch,
        args=[qp, kp, vp, slopes, *segs],
        in_specs=[q_spec, k_spec, v_spec, slope_spec, *seg_specs],
        out_specs=[q_spec, row_spec],
        out_shape=[
            jax.ShapeDtypeStruct((B, Sp, H, K), q.dtype),
            jax.ShapeDtypeStruct((B, H, Sp), jnp.float32),
        ],
        name="mpt_flash_fwd",
        interpret=interpret,
        poison_outputs=poison_outputs,
    )
    return o[:, :S], (q, k, v, slopes, segment_ids, o, lse2)


def _flash_fwd(q, k, v, slopes, segment_ids, blk, tilings, heads, interpret, poison_outputs):
    return _forward(q, k, v, slopes, segment_ids, blk, tilings, heads, interpret, poison_outputs)


def _flash_bwd(blk, tilings, heads: Heads, interpret, poison_outputs, residuals, do):
    q, k, v, slopes, segment_ids, o_padded, lse2 = residuals
    B, S, _, K = q.shape
    H, G = heads.H, heads.G
    R = H // G
    Sp = o_padded.shape[1]
    has_seg = segment_ids is not None
    qp, kp, vp = _sources(q, k, v, Sp)
    dop = pad_axis(do, Sp, 1)
    segs = [pad_axis(segment_ids, Sp, 1)] * 2 if has_seg else []

    # dk/dv: one program per key block of each kv head, summing its R query heads in registers;
    # GQA with fewer such programs than _MIN_GROUPED_PROGRAMS takes one per query head instead
    # (float32 dk and dv per query head, summed below), for enough programs to balance
    grouped = R == 1 or G * B * (Sp // tilings.dkv.block_k) >= _MIN_GROUPED_PROGRAMS
    # grouped on the fused qkv, dq, dk and dv land in one (B, Sp, N, K) array, the gradient of
    # qkv: dq's heads by the dq kernel, then dk's and dv's by the dk/dv kernel in place
    into = heads if heads.fused and grouped else None
    t = tilings.dq
    order = _order(H, Sp, K, q.dtype.itemsize, t, over_keys=False, causal=blk.causal)
    specs = _specs(order, heads, Sp, K, t.block_q, has_seg)
    q_spec, k_spec, v_spec, row_spec, slope_spec, seg_specs = specs
    launch = dict(blk=blk, order=order, t=t, grid=order.grid(H, B), has_seg=has_seg)
    dq, delta = _launch(
        functools.partial(_dq_kernel, n_k=Sp // t.block_k),
        **launch,
        args=[qp, kp, vp, slopes, dop, lse2, o_padded, *segs],
        in_specs=[q_spec, k_spec, v_spec, slope_spec, q_spec, row_spec, q_spec, *seg_specs],
        out_specs=[q_spec, row_spec],
        out_shape=[
            jax.ShapeDtypeStruct((B, Sp, q.shape[2] if into else H, K), q.dtype),
            jax.ShapeDtypeStruct((B, H, Sp), jnp.float32),
        ],
        name="mpt_flash_dq",
        interpret=interpret,
        poison_outputs=poison_outputs,
    )

    t = tilings.dkv
    per_program, n_programs_heads = (R, G) if grouped else (1, H)
    itemsize = q.dtype.itemsize * per_program  # each program streams per_program heads' q, do
    order = _order(n_programs_heads, Sp, K, itemsize, t, over_keys=True, causal=blk.causal)
    q_spec, k_spec, v_spec, row_spec, slope_spec, seg_specs = _dkdv_specs(
        order, heads, Sp, K, t.block_k, has_seg, per_program=per_program
    )
    out_spec = pl.BlockSpec(
        (None, t.block_k, None, K), lambda i, g, b: (b, order.block(i), order.head(i, g), 0)
    )
    k_dtype, v_dtype = (q.dtype, q.dtype) if heads.fused else (k.dtype, v.dtype)
    grid = order.grid(n_programs_heads, B)
    launch = dict(blk=blk, order=order, t=t, grid=grid, has_seg=has_seg)
    kernel = functools.partial(_dkdv_kernel, n_q=Sp // t.block_q, into=into, R=per_program)
    args = [qp, kp, vp, slopes, dop, lse2, delta, *segs]
    in_specs = [q_spec, k_spec, v_spec, slope_spec, q_spec, row_spec, row_spec, *seg_specs]
    seg_grad = None if segment_ids is None else jnp.zeros(segment_ids.shape, jax.dtypes.float0)
    if into is not None:
        whole = pl.BlockSpec(dq.shape, lambda t, g, b: (0, 0, 0, 0))  # the kernel indexes it
        (dqkv,) = _launch(
            kernel,
            **launch,
            args=[*args, dq],
            in_specs=[*in_specs, whole],
            out_specs=[whole],
            out_shape=[jax.ShapeDtypeStruct(dq.shape, dq.dtype)],
            name="mpt_flash_dkdv",
            interpret=interpret,
            poison_outputs=False,  # dq's poisoned output comes in: an unwritten head stays NaN
            aliases={len(args): 0},
        )
        return dqkv[:, :S], None, None, jnp.zeros_like(slopes), seg_grad
    dk, dv = _launch(
        kernel,
        **launch,
        args=args,
        in_specs=in_specs,
        out_specs=[out_spec, out_spec],
        out_shape=[
            jax.ShapeDtypeStruct((B, Sp, n_programs_heads, K), k_dtype if grouped else jnp.float32),
            jax.ShapeDtypeStruct((B, Sp, n_programs_heads, K), v_dtype if grouped else jnp.float32),
        ],
        name="mpt_flash_dkdv",
        interpret=interpret,
        poison_outputs=poison_outputs,
    )
    dq, dk, dv = dq[:, :S], dk[:, :S], dv[:, :S]
    if not grouped:
        dk = dk.reshape(B, S, G, R, K).sum(axis=3).astype(k_dtype)
        dv = dv.reshape(B, S, G, R, K).sum(axis=3).astype(v_dtype)
    if heads.fused:  # ungrouped GQA only: grouped, the kernel wrote into dq's array
        return jnp.concatenate([dq, dk, dv], axis=2), None, None, jnp.zeros_like(slopes), seg_grad
    return dq, dk, dv, jnp.zeros_like(slopes), seg_grad


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(
    q_BSHK: jax.Array,
    k_BSGK: jax.Array,
    v_BSGK: jax.Array,
    *,
    alibi_slopes: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    tilings: Tilings | None = None,
    interpret: bool = False,
    _poison_outputs: bool = False,
) -> jax.Array:
    """Fused attention (B, S, H, K) with in-kernel ALiBi; differentiable in q, k and v.

    block_q/block_k give all three kernels one block size; tilings sets each kernel's blocks,
    warps and stages; neither: default_tilings(head dim).
    _poison_outputs (tests only): kernel outputs start as NaN, so unwritten elements show.
    """
    _, S, H, _ = q_BSHK.shape
    if k_BSGK.shape[1] != S:
        raise ValueError("flash_attention: queries and keys must have the same length")
    if H % k_BSGK.shape[2]:
        raise ValueError(f"flash_attention: {H} heads are not a multiple of {k_BSGK.shape[2]}")
    heads = Heads(H, k_BSGK.shape[2], fused=False)
    check_arrays("flash_attention", q_BSHK, k_BSGK, v_BSGK, alibi_slopes, segment_ids, heads)
    return _attend(
        heads,
        (q_BSHK, k_BSGK, v_BSGK),
        alibi_slopes=alibi_slopes,
        segment_ids=segment_ids,
        causal=causal,
        softmax_scale=softmax_scale,
        block_q=block_q,
        block_k=block_k,
        tilings=tilings,
        interpret=interpret,
        poison_outputs=_poison_outputs,
    )


def flash_attention_qkv(
    qkv_BSNK: jax.Array,
    *,
    n_kv_heads: int,
    alibi_slopes: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    causal: bool = True,
    softmax_scale: float | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    tilings: Tilings | None = None,
    interpret: bool = False,
    _poison_outputs: bool = False,
) -> jax.Array:
    """flash_attention of q, k, v = split(qkv_BSNK, [H, H + G], axis=2), N = H + 2G.

    The kernels read the three from the fused array in place, where slices of it would be
    copied before the call, and its gradient is one (B, S, N, K) array. Returns (B, S, H, K).
    """
    N, G = qkv_BSNK.shape[2], n_kv_heads
    H = N - 2 * G
    if G < 1 or H < 1 or H % G:
        raise ValueError(
            f"flash_attention_qkv: {N} fused heads are not H query heads, a multiple of "
            f"n_kv_heads={n_kv_heads}, plus 2 x {n_kv_heads} kv heads"
        )
    heads = Heads(H, G, fused=True)
    check_arrays("flash_attention_qkv", qkv_BSNK, None, None, alibi_slopes, segment_ids, heads)
    return _attend(
        heads,
        (qkv_BSNK, None, None),
        alibi_slopes=alibi_slopes,
        segment_ids=segment_ids,
        causal=causal,
        softmax_scale=softmax_scale,
        block_q=block_q,
        block_k=block_k,
        tilings=tilings,
        interpret=interpret,
        poison_outputs=_poison_outputs,
    )


def _attend(
    heads: Heads,
    arrays,
    *,
    alibi_slopes,
    segment_ids,
    causal,
    softmax_scale,
    block_q,
    block_k,
    tilings,
    interpret,
    poison_outputs,
) -> jax.Array:
    """What flash_attention and flash_attention_qkv share: arrays (q, k, v) or (qkv, None, None)."""
    S, K = arrays[0].shape[1], arrays[0].shape[3]
    if (block_q is None) != (block_k is None) or (block_q is not None and tilings is not None):
        raise ValueError("flash_attention: give block_q and block_k together, or tilings")
    scale = 1.0 / math.sqrt(K) if softmax_scale is None else float(softmax_scale)
    alibi = alibi_slopes is not None
    H = heads.H
    slopes = jnp.asarray(alibi_slopes, jnp.float32) if alibi else jnp.zeros((H,), jnp.float32)
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    # Triton tiles need power-of-two widths: zero columns change neither q.k nor p.v (MPT-30B: 112)
    K_pad = pl.next_power_of_2(K)
    if block_q is not None:
        tilings = Tilings.uniform(block_q, block_k)
    tilings = tilings or default_tilings(K_pad)
    q, k, v = (None if x is None else pad_axis(x, K_pad, 3) for x in arrays)
    blk = _Block(scale2=scale * LOG2E, causal=causal, alibi=alibi, seq_len=S)
    out = _flash(q, k, v, slopes, seg, blk, tilings, heads, interpret, poison_outputs)
    return out[..., :K]
