"""Loss, perplexity and bits per byte on a prepared dataset split, at one or more lengths.

A split's rows are consecutive pieces of one packed token stream, so windows longer than the
prepared seq_len are cut from the concatenated rows (ALiBi extrapolation beyond the training
max_seq_len). The loss is the token-mean next-token cross-entropy, as in training; bits per byte
is the summed loss in bits over the UTF-8 bytes the predicted tokens stand for (EOS: 0 bytes).
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from mpt_jax.data import check_tokenizer, open_dataset, sequence_ids, tokenizer_from_spec
from mpt_jax.data.loader import RowSource
from mpt_jax.data.tokenizer import ByteTokenizer, JsonTokenizer
from mpt_jax.evaluation.errors import EvalError
from mpt_jax.evaluation.scoring import Scorer


def token_bytes(tokenizer: ByteTokenizer | JsonTokenizer) -> tuple[np.ndarray, bool]:
    """UTF-8 bytes each token id stands for, and whether the table is exact.

    Byte tokens are 1 byte, special tokens 0. Byte-level BPE tokens (a `ByteLevel` decoder)
    map each character of the token string to one byte, which is exact; other tokenizers are
    measured by decoding each token alone (approximate where a character spans tokens).
    """
    table = np.zeros(tokenizer.vocab_size, np.int64)
    if isinstance(tokenizer, ByteTokenizer):
        table[:256] = 1
        return table, True
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer.path))
    spec = json.loads(Path(tokenizer.path).read_text())
    special = {t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    decoder = (spec.get("decoder") or {}).get("type")
    exact = decoder == "ByteLevel"
    for i in range(tokenizer.vocab_size):
        piece = tok.id_to_token(i)
        if piece is None or i in special:
            continue
        table[i] = len(piece) if exact else len(tok.decode([i]).encode("utf-8"))
    return table, exact


def _windows(source: RowSource, length: int, count: int) -> Iterator[np.ndarray]:
    """`count` consecutive windows of `length` tokens from the split's row stream."""
    buffer: list[np.ndarray] = []
    held = 0
    row = 0
    for _ in range(count):
        while held < length:
            buffer.append(np.asarray(source[row], np.int32))
            held += buffer[-1].size
            row += 1
        stream = np.concatenate(buffer)
        yield stream[:length]
        buffer, held = [stream[length:]], stream.size - length


def evaluate_perplexity(
    scorer: Scorer,
    dataset: str | Path,
    *,
    split: str = "val",
    seq_lens: Sequence[int] | None = None,
    max_tokens: int | None = None,
    position_buckets: int = 8,
    progress: bool = False,
    tokenizer: ByteTokenizer | JsonTokenizer | None = None,
) -> list[dict[str, Any]]:
    """One result per sequence length: loss, perplexity, bits per byte, loss by position.

    `tokenizer`, the model's, refuses a dataset prepared with another (as training does).
    """
    from tqdm import tqdm

    if max_tokens is not None and max_tokens < 1:
        raise EvalError(f"--max-tokens: must be >= 1, got {max_tokens}")
    meta = open_dataset(dataset)
    cfg = scorer.config
    if meta.vocab_size > cfg.vocab_size:
        raise EvalError(
            f"{meta.folder}: tokenizer vocabulary {meta.vocab_size} exceeds the model's "
            f"vocab_size {cfg.vocab_size}"
        )
    if tokenizer is not None:
        # the model would read the ids as other text: a perplexity that means nothing
        check_tokenizer(
            meta,
            tokenizer,
            named=f"the model's tokenizer {getattr(tokenizer, 'path', 'byte')}",
            remedy="prepare it with the model's tokenizer, or name that one (--tokenizer)",
        )
    source = RowSource(meta, split)
    total = len(source) * meta.seq_len
    table, exact = token_bytes(tokenizer_from_spec(meta.tokenizer, meta.folder))
    results = []
    for length in seq_lens or [cfg.max_seq_len]:
        if length < 2:
            raise EvalError(f"--seq-lens: {length} is too short (at least 2)")
        if length > cfg.max_seq_len and (cfg.learned_pos_emb or not cfg.alibi):
            raise EvalError(
                f"--seq-lens: {length} exceeds the model's max_seq_len {cfg.max_seq_len}, and "
                "only ALiBi models without learned positions can run longer"
            )
        budget = total if max_tokens is None else min(total, max_tokens)
        count = budget // length
        if count == 0:
            raise EvalError(
                f"{meta.folder} split {split!r}: {budget} tokens, fewer than one window of {length}"
            )
        B = scorer.batch_size
        loss_sum = np.zeros(length - 1)
        tokens_at = np.zeros(length - 1, np.int64)
        n_bytes = n_correct = 0
        bar = tqdm(
            total=count, desc=f"perplexity {split} @{length}", disable=not progress, leave=False
        )
        windows = _windows(source, length, count)
        for start in range(0, count, B):
            n = min(B, count - start)
            ids = np.zeros((B, length), np.int32)
            for r in range(n):
                ids[r] = next(windows)
            segs = None
            if cfg.attn_uses_sequence_id:
                segs = np.stack([sequence_ids(row, meta.eos_id) for row in ids])
            losses, correct = scorer.position_losses(ids, segs)
            loss_sum += losses[:n].astype(np.float64).sum(axis=0)
            tokens_at += n
            n_correct += int(correct[:n].sum())
            n_bytes += int(table[ids[:n, 1:]].sum())
            bar.update(n)
        bar.close()
        n_tokens = int(tokens_at.sum())
        loss = float(loss_sum.sum() / n_tokens)
        # equal slices of the window by the position of the predicted token (1 .. length-1),
        # so a training length that divides the window falls on a bucket edge
        edges = np.linspace(0, length, min(position_buckets, length - 1) + 1).round().astype(int)
        buckets = []
        for a, b in itertools.pairwise(edges):
            lo, hi = max(int(a), 1), int(b)  # predicted positions [lo, hi): losses [lo-1, hi-1)
            if hi > lo:
                loss_at = loss_sum[lo - 1 : hi - 1].sum() / tokens_at[lo - 1 : hi - 1].sum()
                buckets.append({"start": lo, "end": hi, "loss": float(loss_at)})
        results.append(
            {
                "dataset": str(meta.folder),
                "split": split,
                "seq_len": length,
                "extrapolated": length > cfg.max_seq_len,
                "windows": count,
                "tokens": n_tokens,
                "loss": loss,
                "perplexity": math.exp(min(loss, 700.0)),
                "accuracy": n_correct / n_tokens,
                "bytes": n_bytes,
                "bytes_per_token": n_bytes / n_tokens,
                "bits_per_byte": float(loss_sum.sum() / math.log(2.0) / n_bytes)
                if n_bytes
                else None,
                "bytes_exact": exact,
                "position_buckets": buckets,
            }
        )
    return results
