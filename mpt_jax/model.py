"""MPT decoder in Flax NNX with llm-foundry's exact math.

Shape legend: B batch, S sequence, D d_model, H heads, G kv heads, N = H + 2G fused qkv heads,
K head dim, F FFN width, V vocab, L layers, T KV-cache slots.

Parameters carry logical axis names (`vocab`, `embed`, `heads`, `kv_heads`, `qkv_heads`, `kv`
(head dim), `mlp`, `layers`) as `out_sharding` metadata; [train] maps them onto a mesh.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.experimental import multihost_utils

from mpt_jax import attention as attention_lib
from mpt_jax import hf_checkpoint
from mpt_jax.config import InitConfig, ModelConfig, param_shapes
from mpt_jax.kernels.layer_norm import fused_norm
from mpt_jax.rounding import in_dtype, rounded, scaled
from mpt_jax.sharding import constrain, device_local

Initializer = Callable[[jax.Array, tuple[int, ...]], jax.Array]

# activation checkpointing per block: what the backward pass may keep instead of recomputing
REMAT_POLICIES: dict[str, Any] = {
    "none": None,
    # a biased projection's matmul is inside a custom_vjp, out of the dots policy's sight
    "dots_saveable": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
        jax.checkpoint_policies.save_only_these_names("biased_projection"),
    ),
    "full": jax.checkpoint_policies.nothing_saveable,
}


# ---------------------------------------------------------------------------------------------
# Initialization (llm-foundry's param_init_fns.py)


def _gain(init: InitConfig) -> float:
    if init.init_nonlinearity == "relu":
        return math.sqrt(2.0)
    if init.init_nonlinearity == "leaky_relu":
        return math.sqrt(2.0 / (1.0 + init.init_gain**2))
    return 1.0


def _residual_divisor(cfg: ModelConfig) -> float:
    init = cfg.init_config
    if init.name == "neox_init_":
        return cfg.n_layers / math.sqrt(10)
    if init.init_div_is_residual is True:
        return math.sqrt(2 * cfg.n_layers)
    if init.init_div_is_residual is False:
        return 1.0
    return float(init.init_div_is_residual)


def weight_init(
    cfg: ModelConfig, *, fan_in: int, fan_out: int, residual: bool = False
) -> Initializer:
    """Initializer for a matrix or embedding with torch fans `fan_in`, `fan_out`."""
    init = cfg.init_config
    divisor = _residual_divisor(cfg) if residual else 1.0

    def normal(std: float) -> Initializer:
        return lambda key, shape: (std / divisor) * jax.random.normal(key, shape, jnp.float32)

    if init.name in ("kaiming_normal_", "kaiming_uniform_"):
        fan = fan_in if init.fan_mode == "fan_in" else fan_out
        std = _gain(init) / math.sqrt(fan)
        if init.name == "kaiming_normal_":
            return normal(std)
        bound = math.sqrt(3.0) * std / divisor
        return lambda key, shape: jax.random.uniform(key, shape, jnp.float32, -bound, bound)
    if init.name == "baseline_":
        return normal(init.init_std)
    return normal(math.sqrt(2.0 / (5 * cfg.d_model)))  # small_init_, neox_init_


def embedding_init(cfg: ModelConfig, n_rows: int) -> Initializer:
    """llm-foundry's rule: emb_init_std, else emb_init_uniform_lim, else the weight init."""
    init = cfg.init_config
    if init.emb_init_std is not None:
        std = init.emb_init_std
        return lambda key, shape: std * jax.random.normal(key, shape, jnp.float32)
    lim = init.emb_init_uniform_lim
    if lim is not None:
        low, high = (-lim, lim) if isinstance(lim, int | float) else lim
        return lambda key, shape: jax.random.uniform(key, shape, jnp.float32, low, high)
    # torch's kaiming on an (n_rows, D) embedding: fan_in = D, fan_out = n_rows
    return weight_init(cfg, fan_in=cfg.d_model, fan_out=n_rows)


def _param(value: jax.Array, names: tuple[str | None, ...], dtype: Any) -> nnx.Param:
    return nnx.Param(value.astype(dtype), sharding_names=names, eager_sharding=False)


# ---------------------------------------------------------------------------------------------
# Layers


class Dense(nnx.Module):
    """y = x @ kernel (+ bias); kernel shape in_shape + out_shape, contracted over in_shape."""

    def __init__(
        self,
        in_shape: tuple[int, ...],
        out_shape: tuple[int, ...],
        names: tuple[str | None, ...],
        init: Initializer,
        *,
        use_bias: bool,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
    ):
        self.n_in = len(in_shape)
        self.dtype = dtype
        self.kernel = _param(init(rngs.params(), in_shape + out_shape), names, param_dtype)
        zeros = jnp.zeros(out_shape, jnp.float32)
        self.bias = _param(zeros, names[self.n_in :], param_dtype) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...].astype(self.dtype)
        contract = tuple(range(x.ndim - self.n_in, x.ndim)), tuple(range(self.n_in))
        dims = (contract, ((), ()))
        if self.bias is None:
            return jax.lax.dot_general(x.astype(self.dtype), kernel, dims)
        bias = self.bias[...].astype(self.dtype)
        y = _biased_dot(x.astype(self.dtype), kernel, bias, dims)
        return checkpoint_name(y, "biased_projection")


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _biased_dot(x, kernel, bias, dims):
    """x @ kernel + bias rounded once to x's dtype, as torch's addmm and cuBLASLt's bias epilogue
    do; its backward multiplies in x's dtype, where autodiff would feed a float32 gradient to
    mixed-dtype matmuls."""
    y = jax.lax.dot_general(x, kernel, dims, preferred_element_type=jnp.float32)
    return in_dtype(y + _leading_ones(bias.astype(jnp.float32), y.ndim), x.dtype)


def _biased_dot_fwd(x, kernel, bias, dims):
    return _biased_dot(x, kernel, bias, dims), (x, kernel, bias)


def _biased_dot_bwd(dims, residuals, g):
    x, kernel, bias = residuals
    g = g.astype(x.dtype)
    (dx,) = jax.linear_transpose(lambda x: jax.lax.dot_general(x, kernel, dims), x)(g)
    (d_kernel,) = jax.linear_transpose(lambda k: jax.lax.dot_general(x, k, dims), kernel)(g)
    rows = tuple(range(g.ndim - bias.ndim))
    return dx, d_kernel, jnp.sum(g, axis=rows, dtype=jnp.float32).astype(bias.dtype)


_biased_dot.defvjp(_biased_dot_fwd, _biased_dot_bwd)


def _leading_ones(p: jax.Array, ndim: int) -> jax.Array:
    """Reshape a trailing-axes parameter to rank `ndim` (explicit broadcasting)."""
    return p.reshape((1,) * (ndim - p.ndim) + p.shape)


def _stream_add(x: jax.Array, h: jax.Array | None) -> jax.Array:
    """x + h (h None: x) in the residual stream's dtype: rounded to a bf16 stream even where XLA
    fuses the sum into a norm's float32 statistics (torch's add rounds)."""
    if h is None:
        return x
    dtype = jnp.result_type(x, h)
    return in_dtype(x.astype(jnp.float32) + h.astype(jnp.float32), dtype)


class Norm(nnx.Module):
    """LayerNorm / RMSNorm over the last axis; `low_precision_*` runs in the compute dtype.

    The plain variants compute and return float32, as torch autocast does; the low-precision
    ones cast input and parameters to the compute dtype and round where torch does
    (`_norm_forward`).
    """

    def __init__(self, width: int, cfg: ModelConfig, *, names, dtype: Any, param_dtype: Any):
        self.rms = cfg.norm_type.endswith("rmsnorm")
        self.eps = cfg.norm_eps
        self.impl = "xla" if cfg.norm_impl == "auto" else cfg.norm_impl  # auto: not yet timed
        self.dtype = dtype if cfg.norm_type.startswith("low_precision") else jnp.float32
        self.scale = _param(jnp.ones((width,), jnp.float32), names, param_dtype)
        has_bias = not cfg.no_bias and not self.rms
        zeros = jnp.zeros((width,), jnp.float32)
        self.bias = _param(zeros, names, param_dtype) if has_bias else None

    def __call__(self, x: jax.Array, h: jax.Array | None = None) -> jax.Array:
        """The norm of x + h: h is a block's output not yet added to the stream x (None: none)."""
        if self.impl == "pallas_gpu":
            return self._fused(x, h, skip=False)
        x = _stream_add(x, h)
        bias = None if self.bias is None else self.bias[...]
        # cast outside the custom_vjp: in amp the backward then keeps a bf16 x, not the fp32
        # residual stream
        return _norm(x.astype(self.dtype), self.scale[...], bias, self.eps, self.rms, self.dtype)

    def with_skip(self, x: jax.Array, h: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(s, its norm), s = x + h, for a pre-LN block's two paths. With `pallas_gpu` one kernel
        adds, normalizes and, backward, sums both paths' gradients."""
        if self.impl == "pallas_gpu":
            return self._fused(x, h, skip=True)
        x = _stream_add(x, h)
        return x, self(x)

    def _fused(self, x: jax.Array, h: jax.Array | None, *, skip: bool):
        bias = None if self.bias is None else self.bias[...]
        interpret = attention_lib.backend() != "gpu"  # elsewhere the same kernel, interpreted
        kw = dict(eps=self.eps, rms=self.rms, dtype=self.dtype, skip=skip, interpret=interpret)

        def local(x, h, scale, bias):
            return fused_norm(x, scale, bias, h=h, **kw)

        rows = ("batch", *(None,) * (x.ndim - 1))
        out = (rows, rows) if skip else rows
        return device_local(local, (x, h, self.scale[...], bias), (rows, rows, None, None), out)


def _centred(x: jax.Array, rms: bool) -> jax.Array:
    """x less its mean over the last axis (LayerNorm), or x itself (RMSNorm)."""
    return x if rms else x - jnp.mean(x, axis=-1, keepdims=True)


def _rstd(xc: jax.Array, eps: float, rms: bool, dtype) -> jax.Array:
    """1/σ (..., 1) float32 of a centred (LayerNorm) or raw (RMSNorm) float32 x.

    LayerNorm's statistics are float32, as in torch's fused kernel. llm-foundry's RMSNorm is
    separate torch ops (x.pow(2), mean, + eps, rsqrt), each rounding to the norm's dtype.
    """
    if not rms:
        return jax.lax.rsqrt(jnp.mean(jnp.square(xc), axis=-1, keepdims=True) + eps)
    mean_square = rounded(jnp.mean(rounded(jnp.square(xc), dtype), axis=-1, keepdims=True), dtype)
    return rounded(jax.lax.rsqrt(rounded(mean_square + eps, dtype)), dtype)


def _norm_forward(x, scale, bias, eps, rms, dtype):
    """(y, 1/σ (..., 1) float32): the normalization of x, returned in dtype.

    LayerNorm rounds once, as torch's `F.layer_norm` on bf16 tensors does (x̂ · scale + bias in
    float32); RMSNorm rounds x̂ and then x̂ · scale, as llm-foundry's `rms_norm` ops do.
    """
    xc = _centred(x.astype(jnp.float32), rms)
    rstd = _rstd(xc, eps, rms, dtype)
    scale_1D = _leading_ones(rounded(scale, dtype), x.ndim)
    if rms:
        return in_dtype(rounded(xc * rstd, dtype) * scale_1D, dtype), rstd
    y = xc * rstd * scale_1D
    if bias is not None:
        y = y + _leading_ones(rounded(bias, dtype), x.ndim)
    return in_dtype(y, dtype), rstd


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _norm(x, scale, bias, eps, rms, dtype):
    """LayerNorm / RMSNorm of the last axis in `dtype`; the backward keeps only x and 1/σ.

    Autodiff would keep float32 copies of the centred and normalized input, two (..., D)
    float32 arrays per norm; here x̂ is recomputed from x in the backward's fused pass.
    """
    return _norm_forward(x, scale, bias, eps, rms, dtype)[0]


def _norm_fwd(x, scale, bias, eps, rms, dtype):
    y, rstd = _norm_forward(x, scale, bias, eps, rms, dtype)
    return y, (x, scale, bias, rstd)


def _norm_bwd(eps, rms, dtype, residuals, g):
    x, scale, bias, rstd = residuals
    xhat = _centred(x.astype(jnp.float32), rms) * rstd
    g32 = g.astype(jnp.float32)
    rows = tuple(range(x.ndim - 1))
    # RMSNorm's forward multiplies x̂ rounded to dtype by the scale; LayerNorm's, x̂ itself
    d_scale = jnp.sum(g32 * (rounded(xhat, dtype) if rms else xhat), axis=rows)
    d_bias = None if bias is None else jnp.sum(g32, axis=rows).astype(bias.dtype)
    d_xhat = g32 * _leading_ones(rounded(scale, dtype), x.ndim)
    proj = jnp.mean(d_xhat * xhat, axis=-1, keepdims=True)
    dx = rstd * (_centred(d_xhat, rms) - xhat * proj)
    return dx.astype(x.dtype), d_scale.astype(scale.dtype), d_bias


_norm.defvjp(_norm_fwd, _norm_bwd)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None) -> jax.Array:
    if not rate or key is None:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


class Attention(nnx.Module):
    """Fused-QKV attention (MHA / MQA / GQA) with clip_qkv, qk_ln and ALiBi."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.cfg = cfg
        D, H, G, K = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.head_dim
        N = H + 2 * G
        common = dict(use_bias=not cfg.no_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # fan_out is per head: llm-foundry initializes the fused Wqkv head slice by head slice
        self.Wqkv = Dense(
            (D,),
            (N, K),
            ("embed", "qkv_heads", "kv"),
            weight_init(cfg, fan_in=D, fan_out=K),
            **common,
        )
        norm = dict(dtype=dtype, param_dtype=param_dtype, names=(None,))
        self.q_ln = Norm(H * K, cfg, **norm) if cfg.qk_ln else None
        self.k_ln = Norm(G * K, cfg, **norm) if cfg.qk_ln else None
        self.out_proj = Dense(
            (H, K),
            (D,),
            ("heads", "kv", "embed"),
            weight_init(cfg, fan_in=H * K, fan_out=D, residual=True),
            **common,
        )
        self.dtype = dtype
        # static python floats: constants of the compiled step, not parameters
        self.slopes = (
            tuple(attention_lib.alibi_slopes(H, cfg.alibi_bias_max).tolist()) if cfg.alibi else None
        )

    def _fused_qkv(self, x_BSD: jax.Array) -> jax.Array:
        """Fused projection and clip_qkv: (B, S, H + 2G, K), the query heads then k's and v's."""
        qkv_BSNK = self.Wqkv(x_BSD)
        if self.cfg.clip_qkv is not None:
            qkv_BSNK = jnp.clip(qkv_BSNK, -self.cfg.clip_qkv, self.cfg.clip_qkv)
        return qkv_BSNK

    def _qkv(self, x_BSD: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Fused projection, clip_qkv, split and qk_ln: q (B, S, H, K), k and v (B, S, G, K)."""
        cfg = self.cfg
        B, S, _ = x_BSD.shape
        H, G, K = cfg.n_heads, cfg.num_kv_heads, cfg.head_dim
        q_BSHK, k_BSGK, v_BSGK = jnp.split(self._fused_qkv(x_BSD), [H, H + G], axis=2)
        if self.q_ln is not None:
            q_BSHK = self.q_ln(q_BSHK.reshape(B, S, H * K)).astype(self.dtype).reshape(B, S, H, K)
            k_BSGK = self.k_ln(k_BSGK.reshape(B, S, G * K)).astype(self.dtype).reshape(B, S, G, K)
        return q_BSHK, k_BSGK, v_BSGK

    def _slopes(self) -> np.ndarray | None:
        return None if self.slopes is None else np.asarray(self.slopes, np.float32)

    def __call__(
        self, x_BSD: jax.Array, segment_ids: jax.Array | None, key: jax.Array | None
    ) -> jax.Array:
        cfg = self.cfg
        kw = dict(
            alibi_slopes=self._slopes(),
            segment_ids=segment_ids if cfg.attn_uses_sequence_id else None,
            causal=True,
            impl=cfg.attn_impl,
            softmax_scale=cfg.resolved_softmax_scale,
            dropout_rate=cfg.attn_pdrop if key is not None else 0.0,
            dropout_key=key,
        )
        if self.q_ln is None:  # q, k and v stay in the fused array, which kernels read in place
            qkv_BSNK = self._fused_qkv(x_BSD)
            out_BSHK = attention_lib.attention_qkv(qkv_BSNK, n_kv_heads=cfg.num_kv_heads, **kw)
        else:
            out_BSHK = attention_lib.attention(*self._qkv(x_BSD), **kw)
        return self.out_proj(out_BSHK)

    def decode(
        self,
        x_BSD: jax.Array,
        k_cache_BTGK: jax.Array,
        v_cache_BTGK: jax.Array,
        start_B: jax.Array,
        end: jax.Array,
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Attend from cache slots [end, end + S) to slots [start_B, end + S); new k and v too."""
        S = x_BSD.shape[1]
        T = k_cache_BTGK.shape[1]
        q_BSHK, k_BSGK, v_BSGK = self._qkv(x_BSD)
        k_BSGK = k_BSGK.astype(k_cache_BTGK.dtype)
        v_BSGK = v_BSGK.astype(v_cache_BTGK.dtype)
        k_all_BTGK = jax.lax.dynamic_update_slice(k_cache_BTGK, k_BSGK, (0, end, 0, 0))
        v_all_BTGK = jax.lax.dynamic_update_slice(v_cache_BTGK, v_BSGK, (0, end, 0, 0))
        # slots before a row's start are its left padding; slots from end + S are unwritten
        slot_1T = jnp.arange(T)[None, :]
        kv_mask_BT = (slot_1T >= start_B[:, None]) & (slot_1T < end + S)
        # ALiBi depends on slot distances only, so left padding shifts nothing
        out_BSHK = attention_lib.attention(
            q_BSHK,
            k_all_BTGK,
            v_all_BTGK,
            alibi_slopes=self._slopes(),
            causal=True,
            impl="xla",
            softmax_scale=self.cfg.resolved_softmax_scale,
            query_offset=end,
            kv_mask=kv_mask_BT,
        )
        return self.out_proj(out_BSHK), k_BSGK, v_BSGK


# The activations compute in float32 and round once to x's dtype, as torch's CUDA kernels do
# under autocast; their backward passes keep only x.


@jax.custom_vjp
def _gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU.

    Autodiff of jax.nn.gelu keeps x and two of its intermediates, each the size of the MLP's
    (..., F) activation; the derivative Φ(x) + x φ(x) is recomputed in the backward instead.
    """
    return in_dtype(jax.nn.gelu(x.astype(jnp.float32), approximate=False), x.dtype)


def _gelu_fwd(x):
    return _gelu(x), x


def _gelu_bwd(x, g):
    x32 = x.astype(jnp.float32)
    cdf = 0.5 * (1.0 + jax.lax.erf(x32 * (1.0 / math.sqrt(2.0))))
    pdf = jnp.exp(-0.5 * x32 * x32) * (1.0 / math.sqrt(2.0 * math.pi))
    return ((g.astype(jnp.float32) * (cdf + x32 * pdf)).astype(x.dtype),)


_gelu.defvjp(_gelu_fwd, _gelu_bwd)


@jax.custom_vjp
def _silu(x: jax.Array) -> jax.Array:
    """SiLU, x σ(x); autodiff would keep σ(x) in float32 beside x."""
    return in_dtype(jax.nn.silu(x.astype(jnp.float32)), x.dtype)


def _silu_fwd(x):
    return _silu(x), x


def _silu_bwd(x, g):
    x32 = x.astype(jnp.float32)
    sigmoid = jax.nn.sigmoid(x32)
    return ((g.astype(jnp.float32) * sigmoid * (1.0 + x32 * (1.0 - sigmoid))).astype(x.dtype),)


_silu.defvjp(_silu_fwd, _silu_bwd)

_ACTIVATIONS = {
    "gelu": _gelu,
    "silu": _silu,
    "relu": jax.nn.relu,
}


class FFN(nnx.Module):
    """mptmlp: down(act(up(x))); mptglu: down(act(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        D, F = cfg.d_model, cfg.ffn_hidden
        common = dict(use_bias=not cfg.no_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        up_init = weight_init(cfg, fan_in=D, fan_out=F)
        self.up_proj = Dense((D,), (F,), ("embed", "mlp"), up_init, **common)
        glu = cfg.ffn_type == "mptglu"
        self.gate_proj = Dense((D,), (F,), ("embed", "mlp"), up_init, **common) if glu else None
        down_init = weight_init(cfg, fan_in=F, fan_out=D, residual=True)
        self.down_proj = Dense((F,), (D,), ("mlp", "embed"), down_init, **common)
        self.act = cfg.ffn_act_fn

    def __call__(self, x_BSD: jax.Array) -> jax.Array:
        act = _ACTIVATIONS[self.act]
        if self.gate_proj is None:
            return self.down_proj(act(self.up_proj(x_BSD)))
        return self.down_proj(act(self.gate_proj(x_BSD)) * self.up_proj(x_BSD))


class Block(nnx.Module):
    """Pre-LN transformer block."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype: Any,
        param_dtype: Any,
        rngs: nnx.Rngs,
        defers_add: bool = False,
    ):
        norm = dict(names=("embed",), dtype=dtype, param_dtype=param_dtype)
        self.norm_1 = Norm(cfg.d_model, cfg, **norm)
        self.attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm_2 = Norm(cfg.d_model, cfg, **norm)
        self.ffn = FFN(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resid_pdrop = cfg.resid_pdrop
        self.defers_add = defers_add

    def __call__(
        self,
        x_BSD: jax.Array,
        h_BSD: jax.Array | None,
        segment_ids: jax.Array | None,
        key: jax.Array | None,
    ) -> tuple[jax.Array, jax.Array | None]:
        """(x, h) -> (x', h'): the residual stream and the last block's output, not yet added to
        it (None: nothing to add). `defers_add` (the Pallas norms, no remat): the next norm's
        kernel adds it; else the block adds its own output (h' None), which XLA fuses with its
        neighbours, and a checkpointed block keeps one input, not two."""
        k_attn, k_resid_attn, k_resid_ffn = (
            jax.random.split(key, 3) if key is not None else [None] * 3
        )
        x_BSD, y_BSD = self.norm_1.with_skip(x_BSD, h_BSD)
        h_BSD = _dropout(self.attn(y_BSD, segment_ids, k_attn), self.resid_pdrop, k_resid_attn)
        x_BSD, y_BSD = self.norm_2.with_skip(x_BSD, h_BSD)
        h_BSD = _dropout(self.ffn(y_BSD), self.resid_pdrop, k_resid_ffn)
        return (x_BSD, h_BSD) if self.defers_add else (_stream_add(x_BSD, h_BSD), None)

    def decode(self, x_BSD, k_cache_BTGK, v_cache_BTGK, start_B, end):
        """The block on new tokens against a KV cache (no dropout): x, new k, new v."""
        h_BSD, k_BSGK, v_BSGK = self.attn.decode(
            self.norm_1(x_BSD), k_cache_BTGK, v_cache_BTGK, start_B, end
        )
        x_BSD = _stream_add(x_BSD, h_BSD)
        return _stream_add(x_BSD, self.ffn(self.norm_2(x_BSD))), k_BSGK, v_BSGK


class Embedding(nnx.Module):
    """A lookup table (rows, D); also the tied output projection."""

    def __init__(
        self, rows: int, width: int, init: Initializer, *, names, param_dtype: Any, rngs: nnx.Rngs
    ):
        self.embedding = _param(init(rngs.params(), (rows, width)), names, param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["k_LBTGK", "v_LBTGK", "start_B", "end"],
    meta_fields=[],
)
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for decoding, a pytree passed through jit.

    Slots [0, end) are written; row b's tokens start at slot start_B[b] (left padding before).
    """

    k_LBTGK: jax.Array
    v_LBTGK: jax.Array
    start_B: jax.Array  # int32 (B,)
    end: jax.Array  # int32 scalar

    @property
    def max_length(self) -> int:
        return self.k_LBTGK.shape[2]


class MPTForCausalLM(nnx.Module):
    """MPT decoder with its LM head: `model(input_ids)` -> logits (B, S, V)."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        rngs: nnx.Rngs,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        remat: str = "none",
    ):
        cfg = self.config = config
        if remat not in REMAT_POLICIES:
            raise ValueError(f"remat: must be one of {', '.join(REMAT_POLICIES)}, got {remat!r}")
        self.remat = remat
        self.dtype = dtype
        # the Pallas norms add each block's output to the stream; a block under remat would
        # keep both for its backward, so there the block adds its own
        self.defers_add = cfg.norm_impl == "pallas_gpu" and remat == "none"
        D = cfg.d_model
        V, S_max = cfg.vocab_size, cfg.max_seq_len
        self.wte = Embedding(
            V,
            D,
            embedding_init(cfg, V),
            names=("vocab", "embed"),
            param_dtype=param_dtype,
            rngs=rngs,
        )
        self.wpe = (
            Embedding(
                S_max,
                D,
                embedding_init(cfg, S_max),
                names=(None, "embed"),
                param_dtype=param_dtype,
                rngs=rngs,
            )
            if cfg.learned_pos_emb
            else None
        )
        block_keys = jax.random.split(rngs.params(), cfg.n_layers)

        def make_block(key: jax.Array) -> Block:
            return Block(
                cfg,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=nnx.Rngs(params=key),
                defers_add=self.defers_add,
            )

        if cfg.scan_layers:
            stack = nnx.vmap(
                make_block, in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"}
            )
            self.blocks = stack(block_keys)
        else:
            self.blocks = nnx.List([make_block(block_keys[i]) for i in range(cfg.n_layers)])
        self.norm_f = Norm(D, cfg, names=("embed",), dtype=dtype, param_dtype=param_dtype)
        self.lm_head = (
            Dense(
                (D,),
                (V,),
                ("embed", "vocab"),
                weight_init(cfg, fan_in=D, fan_out=V),
                use_bias=False,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )
            if not cfg.tie_word_embeddings
            else None
        )

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """input_ids (B, S) ints -> logits (B, S, V) in the compute dtype.

        segment_ids (B, S) masks attention across packed documents when the config has
        attn_uses_sequence_id; dropout runs only when dropout_key is given.
        """
        h_BSD = self.final_hidden(input_ids, segment_ids=segment_ids, dropout_key=dropout_key)
        return self._project(h_BSD)

    def final_hidden(
        self,
        input_ids: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array:
        """input_ids (B, S) -> the normed last hidden states (B, S, D) that the head projects."""
        cfg = self.config
        S = input_ids.shape[1]
        if cfg.max_seq_len < S:
            raise ValueError(
                f"input_ids: sequence length {S} exceeds model.max_seq_len ({cfg.max_seq_len})"
            )
        pos_emb_1SD = None if self.wpe is None else self.wpe.embedding[:S][None]
        emb_key = block_key = None
        if dropout_key is not None:
            emb_key, block_key = jax.random.split(dropout_key)
        # rows over the batch devices from here on, not wherever the embedding table leads
        x_BSD = constrain(self._embed(input_ids, pos_emb_1SD, emb_key), ("batch", None, None))
        x_BSD, h_BSD = self._blocks(x_BSD, segment_ids, block_key)
        return self._final_norm(x_BSD, h_BSD)

    def _final_norm(self, x_BSD, h_BSD=None):
        return self.norm_f(x_BSD, h_BSD).astype(self.dtype)

    def _embed(self, input_ids, pos_emb_BSD, key):
        x_BSD = _stream_add(self.wte(input_ids), pos_emb_BSD)
        if self.config.embedding_fraction < 1.0:
            f, dtype = self.config.embedding_fraction, x_BSD.dtype
            x32 = x_BSD.astype(jnp.float32)
            # GLM-130B's trick, each torch op rounded (with a bf16 stream the sum is not x)
            part = rounded(x32 * f, dtype)
            rest = rounded(jax.lax.stop_gradient(x32) * (1.0 - f), dtype)
            x_BSD = in_dtype(part + rest, dtype)
        return _dropout(x_BSD, self.config.emb_pdrop, key)

    def _head(self, x_BSD):
        return self._project(self._final_norm(x_BSD))

    def _project(self, h_BSD):
        w_DV, scale = self.output_weight()
        logits_BSV = jnp.einsum("bsd,dv->bsv", h_BSD, w_DV)
        return logits_BSV if scale is None else scaled(logits_BSV, scale)

    def output_weight(self) -> tuple[jax.Array, float | None]:
        """(W (D, V) in the compute dtype, logit scale or None): logits = final_hidden @ W * scale.

        The tied head is wte transposed; a loss can project a chunk of positions at a time.
        """
        if self.lm_head is None:
            w_DV = self.wte.embedding[...].astype(self.dtype).T
        else:
            w_DV = self.lm_head.kernel[...].astype(self.dtype)
        return w_DV, self.config.resolved_logit_scale

    # -- decoding with a KV cache ---------------------------------------------------------------

    def init_cache(self, batch_size: int, max_length: int, *, pad_lengths: Any = None) -> KVCache:
        """An empty cache of `max_length` slots; row b's first pad_lengths[b] slots are padding."""
        cfg = self.config
        shape = (cfg.n_layers, batch_size, max_length, cfg.num_kv_heads, cfg.head_dim)
        start_B = (
            jnp.zeros((batch_size,), jnp.int32)
            if pad_lengths is None
            else jnp.asarray(pad_lengths, jnp.int32).reshape(batch_size)
        )
        # two buffers: jit may donate (update in place) each of them
        k_LBTGK, v_LBTGK = jnp.zeros(shape, self.dtype), jnp.zeros(shape, self.dtype)
        return KVCache(k_LBTGK, v_LBTGK, start_B, jnp.zeros((), jnp.int32))

    def decode(
        self, input_ids: jax.Array, cache: KVCache, *, last_only: bool = False
    ) -> tuple[jax.Array, KVCache]:
        """input_ids (B, S) written at cache slots [end, end + S) -> logits and the new cache.

        Logits are (B, S, V), or (B, 1, V) for the last position with last_only (prefill).
        The caller keeps end + S <= cache.max_length (a traced end cannot be checked here).
        Row b's tokens have positions slot - start_B[b] (learned position embeddings); with
        ALiBi only slot distances matter. No dropout, no segment ids: one document per row.
        """
        S = input_ids.shape[1]
        try:
            end = int(cache.end)
        except jax.errors.ConcretizationTypeError:
            end = None  # traced (under jit): the caller sized the cache
        if end is not None and end + S > cache.max_length:
            raise ValueError(
                f"decode: {S} tokens after slot {end} overflow the KV cache "
                f"({cache.max_length} slots)"
            )
        pos_emb_BSD = None
        if self.wpe is not None:
            # padding slots get position 0; nothing attends to them
            pos_BS = cache.end + jnp.arange(S)[None, :] - cache.start_B[:, None]
            pos_emb_BSD = self.wpe(jnp.maximum(pos_BS, 0))
        x_BSD = self._embed(input_ids, pos_emb_BSD, None)
        x_BSD, k_LBSGK, v_LBSGK = self._decode_blocks(x_BSD, cache)
        if last_only:
            x_BSD = x_BSD[:, -1:]
        at = (0, 0, cache.end, 0, 0)
        new_cache = KVCache(
            jax.lax.dynamic_update_slice(cache.k_LBTGK, k_LBSGK, at),
            jax.lax.dynamic_update_slice(cache.v_LBTGK, v_LBSGK, at),
            cache.start_B,
            cache.end + S,
        )
        return self._head(x_BSD), new_cache

    def _decode_blocks(self, x_BSD, cache: KVCache):
        """All blocks against the cache: x and the new tokens' k, v stacked over layers."""
        start_B, end = cache.start_B, cache.end
        if not self.config.scan_layers:
            ks, vs = [], []
            for i, block in enumerate(self.blocks):
                x_BSD, k_BSGK, v_BSGK = block.decode(
                    x_BSD, cache.k_LBTGK[i], cache.v_LBTGK[i], start_B, end
                )
                ks.append(k_BSGK)
                vs.append(v_BSGK)
            return x_BSD, jnp.stack(ks), jnp.stack(vs)
        graphdef, stacked = nnx.split(self.blocks)

        def body(x, xs):
            layer_state, k_cache_BTGK, v_cache_BTGK = xs
            block = nnx.merge(graphdef, layer_state)
            x, k_BSGK, v_BSGK = block.decode(x, k_cache_BTGK, v_cache_BTGK, start_B, end)
            return x, (k_BSGK, v_BSGK)

        x_BSD, (k_LBSGK, v_LBSGK) = jax.lax.scan(
            body, x_BSD, (stacked, cache.k_LBTGK, cache.v_LBTGK)
        )
        return x_BSD, k_LBSGK, v_LBSGK

    def _blocks(self, x_BSD, segment_ids, key):
        """The stream after the blocks, and the last block's output, not yet added to it."""

        def layer_key(i):
            return None if key is None else jax.random.fold_in(key, i)

        def apply(graphdef, layer_state, x, h, i):
            return nnx.merge(graphdef, layer_state)(x, h, segment_ids, layer_key(i))

        if self.remat != "none":
            policy = REMAT_POLICIES[self.remat]
            apply = jax.checkpoint(apply, policy=policy, static_argnums=(0,))
        if not self.config.scan_layers:
            h_BSD = None
            for i, block in enumerate(self.blocks):
                graphdef, layer_state = nnx.split(block)
                x_BSD, h_BSD = apply(graphdef, layer_state, x_BSD, h_BSD, i)
            return x_BSD, h_BSD
        graphdef, stacked = nnx.split(self.blocks)

        def body(carry, xs):
            layer_state, i = xs
            return apply(graphdef, layer_state, *carry, i), None

        # a scan's carry keeps one structure: with a deferred add the first block adds zeros
        h_BSD = jnp.zeros(x_BSD.shape, self.dtype) if self.defers_add else None
        carry = (x_BSD, h_BSD)
        (x_BSD, h_BSD), _ = jax.lax.scan(body, carry, (stacked, jnp.arange(self.config.n_layers)))
        return x_BSD, h_BSD

    # -- HF checkpoints -------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        allow_pickle: bool = False,
        **config_overrides: Any,
    ) -> MPTForCausalLM:
        """Load an HF MPT folder (transformers' or llm-foundry's config keys), tensor by tensor."""
        config = hf_checkpoint.read_config(path, **config_overrides)
        with hf_checkpoint.CheckpointReader(path, allow_pickle=allow_pickle) as reader:
            hf_checkpoint.check_tensors(config, reader)
            abstract = nnx.eval_shape(
                lambda: cls(config, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype)
            )
            graphdef, state = nnx.split(abstract)
            flat = dict(nnx.to_flat_state(state))
            layout = hf_layout(config)
            for path_key, names in _group_by_param(layout).items():
                var = flat[path_key]
                var.set_value(_load_param(reader, names, layout, var, param_dtype))
        return nnx.merge(graphdef, nnx.from_flat_state(flat))

    def save_pretrained(
        self,
        out_dir: str | Path,
        *,
        dtype: str | None = None,
        max_shard_size: int | str = "5GB",
        overwrite: bool = False,
        token_ids: Mapping[str, int] | None = None,
    ) -> Path:
        """Write an HF MPT folder (config.json + safetensors), streaming one tensor at a time.

        dtype: 'float32', 'bfloat16' or 'float16' for the stored weights (default: as held).
        token_ids: `eos_token_id` and friends for config.json (transformers' generate() stops
        at the EOS); `hf_checkpoint.read_token_ids(folder)` reads an HF folder's.
        """
        entries, fetch = self._hf_export()
        return hf_checkpoint.write_folder(
            self.config,
            entries,
            fetch,
            out_dir,
            dtype=dtype,
            max_shard_size=max_shard_size,
            overwrite=overwrite,
            token_ids=token_ids,
        )

    def hf_tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, array) pairs in llm-foundry's state-dict names and torch layout, one at a time."""
        entries, fetch = self._hf_export()
        for name, _, _ in entries:
            yield name, fetch(name)

    def _hf_export(self) -> tuple[list[tuple[str, tuple[int, ...], np.dtype]], Callable]:
        """(name, shape, dtype) entries and a fetch(name) giving that tensor in torch layout."""
        flat = dict(nnx.to_flat_state(nnx.state(self, nnx.Param)))
        layout = hf_layout(self.config)
        shapes = param_shapes(self.config)
        entries = [
            (name, shape, np.dtype(flat[layout[name][0]].get_value().dtype))
            for name, shape in shapes.items()
        ]

        def fetch(name: str) -> np.ndarray:
            path_key, layer, n_in = layout[name]
            value = flat[path_key].get_value()
            value = value if layer is None else value[layer]
            if not (value.is_fully_addressable or value.is_fully_replicated):
                # sharded across processes (fsdp over hosts): a collective, so every process
                # must fetch the same tensors in the same order (see hf_tensors)
                value = multihost_utils.process_allgather(value, tiled=True)
            return _to_hf(np.asarray(jax.device_get(value)), n_in, shapes[name])

        return entries, fetch


# ---------------------------------------------------------------------------------------------
# Mapping between our parameters and llm-foundry's state-dict names

ParamPath = tuple[Any, ...]


def hf_layout(cfg: ModelConfig) -> dict[str, tuple[ParamPath, int | None, int | None]]:
    """HF name -> (our param path, layer index into a stacked param or None, n_in).

    n_in is the number of leading input axes of a kernel (HF stores its transpose, flattened);
    None means the tensor is the same up to a reshape.
    """
    layout: dict[str, tuple[ParamPath, int | None, int | None]] = {
        "transformer.wte.weight": (("wte", "embedding"), None, None),
        "transformer.wpe.weight": (("wpe", "embedding"), None, None),
        "transformer.norm_f.weight": (("norm_f", "scale"), None, None),
        "transformer.norm_f.bias": (("norm_f", "bias"), None, None),
        "lm_head.weight": (("lm_head", "kernel"), None, 1),
    }
    block_params = {
        "norm_1.weight": (("norm_1", "scale"), None),
        "norm_1.bias": (("norm_1", "bias"), None),
        "attn.Wqkv.weight": (("attn", "Wqkv", "kernel"), 1),
        "attn.Wqkv.bias": (("attn", "Wqkv", "bias"), None),
        "attn.q_ln.weight": (("attn", "q_ln", "scale"), None),
        "attn.q_ln.bias": (("attn", "q_ln", "bias"), None),
        "attn.k_ln.weight": (("attn", "k_ln", "scale"), None),
        "attn.k_ln.bias": (("attn", "k_ln", "bias"), None),
        "attn.out_proj.weight": (("attn", "out_proj", "kernel"), 2),
        "attn.out_proj.bias": (("attn", "out_proj", "bias"), None),
        "norm_2.weight": (("norm_2", "scale"), None),
        "norm_2.bias": (("norm_2", "bias"), None),
        "ffn.up_proj.weight": (("ffn", "up_proj", "kernel"), 1),
        "ffn.up_proj.bias": (("ffn", "up_proj", "bias"), None),
        "ffn.gate_proj.weight": (("ffn", "gate_proj", "kernel"), 1),
        "ffn.gate_proj.bias": (("ffn", "gate_proj", "bias"), None),
        "ffn.down_proj.weight": (("ffn", "down_proj", "kernel"), 1),
        "ffn.down_proj.bias": (("ffn", "down_proj", "bias"), None),
    }
    for i in range(cfg.n_layers):
        for suffix, (sub_path, n_in) in block_params.items():
            if cfg.scan_layers:
                layout[f"transformer.blocks.{i}.{suffix}"] = (("blocks", *sub_path), i, n_in)
            else:
                layout[f"transformer.blocks.{i}.{suffix}"] = (("blocks", i, *sub_path), None, n_in)
    shapes = param_shapes(cfg)
    return {name: layout[name] for name in shapes}


def _group_by_param(layout) -> dict[ParamPath, list[str]]:
    groups: dict[ParamPath, list[str]] = {}
    for name, (path_key, _, _) in layout.items():
        groups.setdefault(path_key, []).append(name)
    return groups


def _to_hf(value: np.ndarray, n_in: int | None, hf_shape: tuple[int, ...]) -> np.ndarray:
    if n_in is None:
        return value.reshape(hf_shape)
    return np.ascontiguousarray(value.reshape(math.prod(value.shape[:n_in]), -1).T)


def _from_hf(value: np.ndarray, n_in: int | None, shape: tuple[int, ...]) -> np.ndarray:
    if n_in is None:
        return value.reshape(shape)
    return value.T.reshape(shape)


def _load_param(reader, names: list[str], layout, var, param_dtype) -> jax.Array:
    """Assemble one parameter (stacked over layers when scanning) from its HF tensors."""
    abstract = var.get_value()
    if len(names) == 1 and layout[names[0]][1] is None:
        _, _, n_in = layout[names[0]]
        value = _from_hf(reader.read(names[0]), n_in, abstract.shape)
        return jnp.asarray(value, dtype=param_dtype)
    # stacked: fill layer by layer so only one layer's tensor is converted at a time
    out = np.empty(abstract.shape, dtype=jnp.dtype(param_dtype))
    for name in names:
        _, layer, n_in = layout[name]
        out[layer] = _from_hf(reader.read(name), n_in, abstract.shape[1:])
    return jnp.asarray(out)


def from_pretrained(path: str | Path, **kwargs: Any) -> MPTForCausalLM:
    """Load an HF MPT folder into an MPTForCausalLM (see MPTForCausalLM.from_pretrained)."""
    return MPTForCausalLM.from_pretrained(path, **kwargs)
