"""Batched, length-bucketed, mesh-sharded forward passes: continuation scores and greedy tokens.

Sequences are right-padded to a bucket length (16, 24, 32, 48, 64, 96, ... up to the model's
max_seq_len: at most a third of each row is padding) and a fixed number of rows, so a task
compiles one program per bucket it touches, not one per example. A causal model's outputs at
real positions do not depend on right padding, so scores equal unpadded ones.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from mpt_jax import sharding
from mpt_jax.model import MPTForCausalLM
from mpt_jax.rounding import scaled

MIN_BUCKET = 16


def bucket_lengths(max_len: int) -> list[int]:
    """16, 24, 32, 48, 64, 96, ... below max_len, then max_len itself."""
    out, n = [], MIN_BUCKET
    while n < max_len:
        out.append(n)
        if n * 3 // 2 < max_len:
            out.append(n * 3 // 2)
        n *= 2
    return [*sorted(set(out)), max_len]


def bucket_for(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds `length` tokens."""
    for b in buckets:
        if b >= length:
            return b
    raise ValueError(f"sequence of {length} tokens exceeds the largest bucket {buckets[-1]}")


def token_losses(logits_BSV: jax.Array, targets_BS: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Per-token cross-entropy (float32) and whether the argmax equals the target."""
    logits_BSV = logits_BSV.astype(jnp.float32)
    logz_BS = jax.nn.logsumexp(logits_BSV, axis=-1)
    target_BS = jnp.take_along_axis(logits_BSV, targets_BS[..., None], axis=-1)[..., 0]
    # argmax ties resolve to the lowest id, as torch.argmax does
    correct_BS = jnp.argmax(logits_BSV, axis=-1) == targets_BS
    return logz_BS - target_BS, correct_BS


def param_dtype(state: Any) -> Any:
    """The dtype of the first parameter (all MPT parameters share one)."""
    return jax.tree.leaves(state)[0].dtype


@dataclasses.dataclass
class ScoreResult:
    """Per sequence: summed continuation cross-entropy, token count, all tokens argmax-correct."""

    ce_sum: np.ndarray
    n_tokens: np.ndarray
    all_correct: np.ndarray

    @property
    def mean_ce(self) -> np.ndarray:
        return self.ce_sum / np.maximum(self.n_tokens, 1)


class Scorer:
    """A model's parameters placed on a mesh plus jitted scoring and next-token programs."""

    def __init__(
        self, model: MPTForCausalLM, mesh: Mesh, *, batch_size: int, loss_chunk: int | None = None
    ):
        """`loss_chunk`: continuations are scored that many positions at a time, never holding
        a batch's whole (B, S, V) logits (as train.loss_chunk does for the loss)."""
        self.mesh = mesh
        self.loss_chunk = loss_chunk
        self.config = model.config
        self.dtype = model.dtype
        self.remat = model.remat
        # rows go over data x fsdp: a batch is a whole number of rows per shard
        self.batch_size = self.rows(batch_size)
        graphdef, state = nnx.split(model)
        self.param_shardings = sharding.state_shardings(state, mesh)
        self.state = jax.device_put(state, self.param_shardings)
        self.param_dtype = param_dtype(self.state)
        self.row_sharding = sharding.batch_sharding(mesh)
        self.shapes: set[tuple[int, int]] = set()  # (batch, length) of every program run
        self._graphdefs: dict[int, Any] = {model.config.max_seq_len: graphdef}
        self._fns: dict[tuple[str, int], Callable] = {}

    def use_params(self, state: Any) -> None:
        """Score with other values of the same parameters (a later training step's); None
        lets go of the ones held."""
        self.state = None if state is None else jax.device_put(state, self.param_shardings)

    # -- programs ----------------------------------------------------------------------------

    def graphdef(self, max_len: int) -> Any:
        """The model's graph with max_seq_len raised to `max_len` (ALiBi extrapolation)."""
        if max_len not in self._graphdefs:
            cfg = dataclasses.replace(self.config, max_seq_len=max_len)
            abstract = nnx.eval_shape(
                lambda: MPTForCausalLM(
                    cfg,
                    rngs=nnx.Rngs(0),
                    dtype=self.dtype,
                    param_dtype=self.param_dtype,
                    remat=self.remat,
                )
            )
            self._graphdefs[max_len] = nnx.graphdef(abstract)
        return self._graphdefs[max_len]

    def _jit(self, kind: str, max_len: int, body: Callable, n_arrays: int) -> Callable:
        """jit(body(model, *arrays)) with the parameters and (B, ...) arrays sharded."""
        key = (kind, max_len)
        if key not in self._fns:
            graphdef = self.graphdef(max_len)

            def fn(state, *arrays):
                return body(nnx.merge(graphdef, state), *arrays)

            self._fns[key] = jax.jit(
                sharding.traced_on(self.mesh, fn),
                in_shardings=(self.param_shardings, *([self.row_sharding] * n_arrays)),
                out_shardings=sharding.replicated(self.mesh),
            )
        return self._fns[key]

    def _put(self, *arrays: np.ndarray) -> list[jax.Array]:
        self.shapes.add(arrays[0].shape)
        return [jax.device_put(a, self.row_sharding) for a in arrays]

    # -- continuation scores -----------------------------------------------------------------

    def rows(self, batch_size: int | None = None) -> int:
        """`batch_size` (default the scorer's) rounded up to a multiple of the row shards."""
        shards = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        return max(shards, -(-(batch_size or self.batch_size) // shards) * shards)

    def score(
        self,
        sequences: Sequence[tuple[np.ndarray, int]],
        *,
        batch_size: int | None = None,
        on_batch: Callable | None = None,
    ) -> ScoreResult:
        """Score (tokens, continuation start) pairs: every token from `start` on is a target."""
        B = self.rows(batch_size)
        n = len(sequences)
        ce, count, correct = np.zeros(n), np.zeros(n, np.int64), np.zeros(n, bool)
        body = _score_body if self.loss_chunk is None else _chunked_score_body(self.loss_chunk)
        fn = self._jit("score", self.config.max_seq_len, body, 3)
        buckets = bucket_lengths(self.config.max_seq_len)
        for idx, length in self._batches([len(t) for t, _ in sequences], buckets, B):
            ids, targets, mask = (np.zeros((B, length), np.int32) for _ in range(3))
            for row, i in enumerate(idx):
                tokens, start = sequences[i]
                ids[row, : len(tokens)] = tokens
                # logits at position t predict token t + 1
                targets[row, start - 1 : len(tokens) - 1] = tokens[start:]
                mask[row, start - 1 : len(tokens) - 1] = 1
            out = jax.device_get(fn(self.state, *self._put(ids, targets, mask)))
            rows = np.arange(len(idx))
            ce[idx], count[idx], correct[idx] = (o[rows] for o in out)
            if on_batch is not None:
                on_batch(len(idx))
        return ScoreResult(ce, count, correct)

    def _batches(self, lengths: Sequence[int], buckets: Sequence[int], rows: int) -> Iterator:
        """(indices, bucket length) batches, shortest first, each within one bucket."""
        order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
        by_bucket: dict[int, list[int]] = {}
        for i in order:
            by_bucket.setdefault(bucket_for(lengths[i], buckets), []).append(i)
        for length, idx in sorted(by_bucket.items()):
            for s in range(0, len(idx), rows):
                yield np.asarray(idx[s : s + rows]), length

    # -- greedy decoding ---------------------------------------------------------------------

    def greedy(
        self,
        prompts: Sequence[np.ndarray],
        *,
        max_new_tokens: int,
        eos_id: int,
        stop: Callable[[list[int]], bool] | None = None,
        batch_size: int | None = None,
        on_batch: Callable | None = None,
    ) -> list[list[int]]:
        """Greedy continuations (EOS excluded) by full forward passes, no cache, bucketed."""
        fn = self._jit("next", self.config.max_seq_len, _next_token_body, 2)
        buckets = bucket_lengths(self.config.max_seq_len)
        B = self.rows(batch_size)
        outputs: list[list[int]] = [[] for _ in prompts]
        for idx, _ in self._batches([len(p) for p in prompts], buckets, B):
            seqs = [list(prompts[i]) for i in idx]
            done = [False] * len(idx)
            for _ in range(max_new_tokens):
                length = bucket_for(max(len(s) for s in seqs), buckets)
                ids = np.zeros((B, length), np.int32)
                last = np.zeros((B, 1), np.int32)
                for row, s in enumerate(seqs):
                    ids[row, : len(s)] = s
                    last[row, 0] = len(s) - 1
                nxt = jax.device_get(fn(self.state, *self._put(ids, last)))
                for row, i in enumerate(idx):
                    if done[row]:
                        continue
                    token = int(nxt[row])
                    if token == eos_id:
                        done[row] = True
                        continue
                    seqs[row].append(token)
                    outputs[i].append(token)
                    if stop is not None and stop(outputs[i]):
                        done[row] = True
                if all(done) or max(len(s) for s in seqs) >= self.config.max_seq_len:
                    break
            if on_batch is not None:
                on_batch(len(idx))
        return outputs

    # -- perplexity --------------------------------------------------------------------------

    def position_losses(
        self, ids: np.ndarray, segment_ids: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Next-token losses of full rows (B, S): (B, S-1) float32 and argmax-correct."""
        length = ids.shape[1]
        max_len = max(length, self.config.max_seq_len)
        if segment_ids is None:
            fn = self._jit("rows", max_len, _row_losses_body, 1)
            out = fn(self.state, *self._put(ids))
        else:
            fn = self._jit("rows_seg", max_len, _row_losses_seg_body, 2)
            out = fn(self.state, *self._put(ids, segment_ids))
        losses, correct = jax.device_get(out)
        return np.asarray(losses), np.asarray(correct)


def _score_body(model, ids_BS, targets_BS, mask_BS):
    losses_BS, correct_BS = token_losses(model(ids_BS), targets_BS)
    mask_BS = mask_BS.astype(bool)
    ce_B = jnp.where(mask_BS, losses_BS, 0.0).sum(axis=1)
    return ce_B, mask_BS.sum(axis=1), jnp.all(correct_BS | ~mask_BS, axis=1)


def _chunked_score_body(chunk: int) -> Callable:
    """_score_body over `chunk` positions at a time: one (B, chunk, V) block of logits alive."""

    def body(model, ids_BS, targets_BS, mask_BS):
        h_BSD = model.final_hidden(ids_BS)
        w_DV, scale = model.output_weight()
        B, S, D = h_BSD.shape
        n = -(-S // chunk)
        pad = ((0, 0), (0, n * chunk - S))  # padded positions are masked out
        h_NBCD = jnp.pad(h_BSD, (*pad, (0, 0))).reshape(B, n, chunk, D).swapaxes(0, 1)
        targets_NBC, mask_NBC = (
            jnp.pad(x, pad).reshape(B, n, chunk).swapaxes(0, 1) for x in (targets_BS, mask_BS)
        )

        def one(xs):
            h_BCD, targets_BC, mask_BC = xs
            logits_BCV = jnp.einsum("bcd,dv->bcv", h_BCD, w_DV)
            if scale is not None:
                logits_BCV = scaled(logits_BCV, scale)
            losses_BC, correct_BC = token_losses(logits_BCV, targets_BC)
            mask_BC = mask_BC.astype(bool)
            ce_B = jnp.where(mask_BC, losses_BC, 0.0).sum(axis=1)
            return ce_B, mask_BC.sum(axis=1), jnp.all(correct_BC | ~mask_BC, axis=1)

        ce_NB, count_NB, correct_NB = jax.lax.map(one, (h_NBCD, targets_NBC, mask_NBC))
        return ce_NB.sum(axis=0), count_NB.sum(axis=0), jnp.all(correct_NB, axis=0)

    return body


def _next_token_body(model, ids_BS, last_B1):
    return jnp.argmax(last_logits(model, ids_BS, last_B1).astype(jnp.float32), axis=-1)


def last_logits(model, ids_BS: jax.Array, last_B1: jax.Array) -> jax.Array:
    """The logits (B, V) at position last_B1 of each row, as model(ids) has them, projecting
    only those positions: no (B, S, V) logits."""
    h_BSD = model.final_hidden(ids_BS)
    last_B1D = jnp.take_along_axis(h_BSD, last_B1[..., None], axis=1)
    w_DV, scale = model.output_weight()
    # the same (B, S, D) x (D, V) product as the model's head: as a 2-D dot XLA dropped the
    # rounding to bf16 before the logit scale, and greedy picks moved (bf16, logit_scale)
    last_B1V = jnp.einsum("bsd,dv->bsv", last_B1D, w_DV)
    if scale is not None:
        last_B1V = scaled(last_B1V, scale)
    return last_B1V[:, 0]


def _row_losses_body(model, ids_BS):
    return token_losses(model(ids_BS)[:, :-1], ids_BS[:, 1:])


def _row_losses_seg_body(model, ids_BS, segment_ids_BS):
    logits_BSV = model(ids_BS, segment_ids=segment_ids_BS)
    return token_losses(logits_BSV[:, :-1], ids_BS[:, 1:])
