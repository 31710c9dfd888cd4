"""Shared test fixtures: random llm-foundry state dicts and HF folders made from them."""

import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import yaml
from flax import nnx

from mpt_jax import aot, hf_checkpoint
from mpt_jax.config import ModelConfig, param_shapes, run_config_from_dict


def lower_for_cuda(jitted, *args, mesh=None) -> jax.stages.Lowered:
    """`jitted(*args)` traced and lowered as a GPU host lowers it (an H200's), on any host.

    `mesh`: the `jax.sharding.Mesh` that `jitted`'s shardings name, if any."""
    mesh = mesh or jax.sharding.AbstractMesh((1,), ("gpu",))
    with aot.lowering_for(mesh, device_kind=aot.card("h200").device_kind):
        return jitted.trace(*args).lower(lowering_platforms=("cuda",))


def random_hf_tensors(cfg: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights in torch layout; norms around 1, biases and matrices non-trivial."""
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, shape in param_shapes(cfg).items():
        if "norm" in name or "_ln." in name:
            base = 1.0 if name.endswith(".weight") else 0.0
            value = base + 0.3 * rng.standard_normal(shape)
        elif name.endswith(".bias"):
            value = 0.3 * rng.standard_normal(shape)
        elif name.startswith(("transformer.wte", "transformer.wpe")):
            value = rng.standard_normal(shape)
        else:
            value = rng.standard_normal(shape) / np.sqrt(shape[-1])
        tensors[name] = value.astype(np.float32)
    return tensors


def write_hf_folder(cfg: ModelConfig, tensors: dict[str, np.ndarray], path: Path, **kw) -> Path:
    """An HF MPT folder holding `tensors`, written by mpt_jax's own writer."""
    entries = [(n, t.shape, t.dtype) for n, t in tensors.items()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return hf_checkpoint.write_folder(cfg, entries, tensors.__getitem__, path, **kw)


def packed_segments(batch: int, seq: int, seed: int = 0) -> np.ndarray:
    """Segment ids of randomly cut packed documents, (batch, seq)."""
    rng = np.random.default_rng(seed)
    out = np.zeros((batch, seq), np.int32)
    for b in range(batch):
        cuts = np.sort(rng.choice(np.arange(1, seq), size=3, replace=False))
        for c in cuts:
            out[b, c:] += 1
    return out


def relative_error(ours, ref) -> float:
    """max |ours - ref| / max |ref| in float64; both must be finite (NaN never passes)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    assert np.isfinite(ref).all()
    assert np.isfinite(ours).all()  # also catches outputs a kernel left poisoned (NaN)
    return np.abs(ours - ref).max() / np.abs(ref).max()


def out_and_grads_fn(attend, do, compiler_options=None):
    """Jitted (q, k, v) -> (output, (dq, dk, dv)) for the loss sum(attend(q, k, v) * do).

    Any number of arrays: (qkv,) -> (output, (dqkv,)) for a fused attend(qkv).
    """

    def loss(*arrays):
        out = attend(*arrays)
        return (out.astype(jnp.float32) * do).sum(), out

    def out_and_grads(*arrays):
        argnums = tuple(range(len(arrays)))
        (_, out), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(*arrays)
        return out, grads

    return jax.jit(out_and_grads, compiler_options=compiler_options)


@nnx.jit
def _forward(model, ids, segment_ids):
    return model(ids, segment_ids=segment_ids)


def forward(model, ids, segment_ids=None) -> np.ndarray:
    """Jitted logits as NumPy (eager NNX forward passes dispatch op by op and are slow)."""
    seg = None if segment_ids is None else jnp.asarray(segment_ids)
    return np.asarray(_forward(model, jnp.asarray(ids), seg))


TINY_MODEL = dict(
    d_model=64,
    n_heads=4,
    n_layers=2,
    max_seq_len=32,
    vocab_size=258,
    alibi=True,
    learned_pos_emb=False,
    no_bias=True,
)


def config(tmp_path, **sections):
    """A validated RunConfig for TINY_MODEL; see raw_config."""
    return run_config_from_dict(raw_config(tmp_path, **sections))


def write_config(path, tmp_path, **sections):
    """raw_config(tmp_path, **sections) written as YAML to `path`, for `mpt-jax train`."""
    path.write_text(yaml.safe_dump(raw_config(tmp_path, **sections)))
    return path


def raw_config(tmp_path, **sections):
    """The run config mapping of a tiny fp32 run; mapping sections merge into the defaults."""
    raw = {
        "model": dict(TINY_MODEL),
        "data": {"path": str(tmp_path / "ds")},
        "optim": {"lr": 1e-3},
        "schedule": {"t_warmup": "2ba"},
        "train": {"global_batch": 8, "steps": 5, "precision": "fp32", "progress": False},
        "run_dir": str(tmp_path / "run"),
    }
    for key, value in sections.items():
        merge = isinstance(value, dict) and key != "model"
        raw[key] = {**raw.get(key, {}), **value} if merge else value
    return raw


def tensorboard_scalars(tb_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Each tag's (step, value) points as TensorBoard shows them: the TFRecord-framed Event
    protos of every event file under tb_dir, oldest file first, where a SessionLog START at
    step N hides the points at N and later logged before it (its purge of a resumed run)."""
    import struct

    from tensorboardX.proto import event_pb2

    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(tb_dir.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        pos = 0
        while pos < len(data):
            (length,) = struct.unpack_from("<Q", data, pos)
            record = data[pos + 12 : pos + 12 + length]  # skip length + its crc
            pos += 12 + length + 4  # and the data crc
            event = event_pb2.Event.FromString(record)
            if event.HasField("session_log") and event.session_log.status == 1:  # START
                for tag, points in scalars.items():
                    scalars[tag] = [(step, v) for step, v in points if step < event.step]
            for value in event.summary.value:
                scalars.setdefault(value.tag, []).append((event.step, value.simple_value))
    return scalars
