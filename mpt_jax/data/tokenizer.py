"""Tokenizers for data preparation: built-in bytes, `tokenizers` JSON files, BPE training."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mpt_jax.data.errors import DataError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "[EOS]", "<|end_of_text|>")


class ByteTokenizer:
    """UTF-8 bytes 0..255 plus special tokens: 256 = <|endoftext|> (EOS), 257 = <|pad|>."""

    kind = "byte"
    vocab_size = 258
    eos_id = 256
    pad_id = 257

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        data = bytes(int(i) for i in ids if int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def spec(self) -> dict[str, Any]:
        return {"kind": "byte", "vocab_size": self.vocab_size, "eos_id": self.eos_id}


class JsonTokenizer:
    """A HuggingFace `tokenizers` tokenizer.json (also the one inside a transformers folder)."""

    kind = "tokenizer_json"

    def __init__(self, path: str | Path, eos_token: str | None = None):
        path = Path(path)
        if path.is_dir():
            if not (path / "tokenizer.json").is_file():
                raise DataError(
                    f"{path}: tokenizer folder has no tokenizer.json (a fast tokenizer is needed)"
                )
            # a transformers folder declares its EOS: the same folder gives the same EOS for
            # preparing data, training and generating
            eos_token = eos_token or declared_eos_token(path)
            path = path / "tokenizer.json"
        if not path.is_file():
            raise DataError(f"{path}: tokenizer file not found")
        self.path = path
        self.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
        try:
            self._tok = open_whole_text(path)
        except Exception as e:  # the Rust library raises plain Exceptions
            raise DataError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from e
        # ids need not be dense: the largest id, not the count, bounds the stored dtype
        ids_in_vocab = self._tok.get_vocab(with_added_tokens=True).values()
        self.vocab_size = max(
            self._tok.get_vocab_size(with_added_tokens=True), max(ids_in_vocab) + 1
        )
        candidates = (eos_token,) if eos_token else EOS_CANDIDATES
        ids = [self._tok.token_to_id(t) for t in candidates]
        found = [(t, i) for t, i in zip(candidates, ids, strict=True) if i is not None]
        if not found and eos_token:
            raise DataError(
                f"{path}: has no token {eos_token!r}, the end-of-text token named by --eos-token "
                "or declared by the tokenizer folder"
            )
        if not found:
            raise DataError(
                f"{path}: no end-of-text token found (tried {', '.join(candidates)}); "
                "name it with --eos-token"
            )
        self.eos_token, self.eos_id = found[0]

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.uint32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        encs = self._tok.encode_batch(list(texts), add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.uint32) for e in encs]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def spec(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "path": str(self.path),
            "sha256": self.sha256,
            "vocab_size": self.vocab_size,
            "eos_token": self.eos_token,
            "eos_id": self.eos_id,
        }


def declared_eos_token(folder: Path) -> str | None:
    """The eos_token a transformers tokenizer folder declares (a string or an AddedToken dict)."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        try:
            declared = json.loads((folder / name).read_text())
        except OSError:
            continue
        except ValueError as e:  # a wrong EOS would be picked silently otherwise
            raise DataError(f"{folder / name}: not valid JSON ({e})") from None
        if not isinstance(declared, dict):
            raise DataError(f"{folder / name}: expected a JSON object")
        eos = declared.get("eos_token")
        if isinstance(eos, dict):
            eos = eos.get("content")
        if isinstance(eos, str) and eos:
            return eos
    return None


def open_whole_text(path: str | Path) -> Tokenizer:
    """A tokenizer.json's Tokenizer with truncation and padding off: a file saved with them (a
    hub tokenizer's max_length, say) would cut or pad every document and prompt."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    tok.no_truncation()
    tok.no_padding()
    return tok


def load_tokenizer(name: str, eos_token: str | None = None) -> ByteTokenizer | JsonTokenizer:
    """'byte', a tokenizer.json path, or a transformers tokenizer folder."""
    if name == "byte":
        if eos_token is not None:  # ignored, it would let a mistaken EOS pass unseen
            raise DataError(
                "--eos-token: only with a --tokenizer file or folder (the byte tokenizer knows "
                "its EOS)"
            )
        return ByteTokenizer()
    return JsonTokenizer(name, eos_token)


def tokenizer_from_spec(spec: dict[str, Any], folder: Path | None = None):
    """Rebuild the tokenizer a dataset's meta.json describes (a relative path is under folder)."""
    if spec.get("kind") == "byte":
        return ByteTokenizer()
    path = Path(spec["path"])
    if not path.is_absolute() and folder is not None:
        path = folder / path
    return JsonTokenizer(path, spec.get("eos_token"))


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: Path) -> Path:
    """Train a byte-level BPE tokenizer.json with <|endoftext|> as its EOS."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    if vocab_size < 300:
        raise DataError(f"--train-bpe: vocab size {vocab_size} is too small (at least 300)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out_path.write_text(json.dumps(json.loads(tok.to_str()), indent=1, sort_keys=True))
    return out_path
