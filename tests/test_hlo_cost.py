"""mpt_jax.hlo_cost on programs XLA CPU compiled: FLOPs, bytes, trip counts, in-place updates."""

import jax
import jax.numpy as jnp
import pytest

from mpt_jax import hlo_cost


def _cost(fn, *args) -> hlo_cost.ProgramCost:
    return hlo_cost.analyze(jax.jit(fn).lower(*args).compile().as_text())


def test_a_matmul_counts_two_flops_per_multiply_add_and_its_operands_bytes():
    a, b = jnp.ones((64, 32)), jnp.ones((32, 16))
    cost = _cost(lambda a, b: jnp.tanh(a @ b), a, b)
    assert cost.total("flops", hlo_cost.MATMUL) == 2 * 64 * 32 * 16
    assert cost.launches(hlo_cost.MATMUL) == 1
    assert cost.total("bytes", hlo_cost.MATMUL) == 4 * (64 * 32 + 32 * 16 + 64 * 16)
    # the tanh reads and writes the (64, 16) product once, unless fused into the matmul
    tanh = cost.total("bytes") - cost.total("bytes", hlo_cost.MATMUL)
    assert tanh in (0, 2 * 4 * 64 * 16)


def test_a_loop_body_counts_once_per_trip():
    def body(x, _):
        return jnp.sin(x) * 2.0, None

    x = jnp.ones((4096,))
    cost5 = _cost(lambda x: jax.lax.scan(body, x, None, length=5)[0], x)
    cost9 = _cost(lambda x: jax.lax.scan(body, x, None, length=9)[0], x)
    moved5, moved9 = (c.total("bytes", hlo_cost.ELEMENTWISE) for c in (cost5, cost9))
    per_trip = (moved9 - moved5) / 4
    # the (4096,) carry read and written once per trip, beside the scalar trip counter's bytes
    assert per_trip == pytest.approx(2 * 4 * 4096, abs=64)
    assert cost9.launches(hlo_cost.ELEMENTWISE) > cost5.launches(hlo_cost.ELEMENTWISE)


def test_an_in_place_update_counts_the_update_not_the_buffer():
    rows, width = 256, 1024

    def fill(buffer, values):
        def body(i, buffer):
            return jax.lax.dynamic_update_slice(buffer, values[i][None] * 3.0, (i, 0))

        return jax.lax.fori_loop(0, rows, body, buffer)

    cost = _cost(fill, jnp.zeros((rows, width)), jnp.ones((rows, width)))
    moved = cost.total("bytes")
    # per row: a (1, width) slice of `values` read, scaled and written into the buffer in place;
    # counting the whole buffer per trip would be `rows` times more
    assert 2 * 4 * rows * width <= moved < 6 * 4 * rows * width


def test_a_read_modify_write_of_a_slice_counts_the_slice_not_the_buffer():
    layers, width = 24, 4096

    def accumulate(stack, g):  # as a scan over layers adds into its layer's slice
        def body(i, stack):
            row = jax.lax.dynamic_slice(stack, (i, 0), (1, width))
            return jax.lax.dynamic_update_slice(stack, row + g[None], (i, 0))

        return jax.lax.fori_loop(0, layers, body, stack)

    cost = _cost(accumulate, jnp.zeros((layers, width)), jnp.ones((width,)))
    moved = cost.total("bytes")
    # per layer: its slice read and written, g read: 3 rows; the whole stack each trip would
    # be `layers` times more
    assert 3 * 4 * layers * width <= moved < 6 * 4 * layers * width, moved


def test_a_conditional_counts_its_costliest_branch():
    x = jnp.ones((1 << 16,))

    def branches(p, x):
        return jax.lax.cond(p, lambda x: jnp.exp(x) * jnp.sin(x), lambda x: x, x)

    cost = _cost(branches, True, x)
    assert cost.total("bytes", hlo_cost.ELEMENTWISE) >= 2 * 4 * (1 << 16)


def test_shapes_and_instructions_parse():
    assert hlo_cost.shape_bytes("(f32[16,2048]{1,0}, bf16[8]{0}, s32[])") == 16 * 2048 * 4 + 16 + 4
    line = (
        "  ROOT %fusion.3 = (bf16[4,8]{1,0}, f32[4]{0}) fusion(%p.1, /*index=1*/%p.2), "
        'kind=kLoop, calls=%fused_computation.3, metadata={op_name="jit(step)/mul"}'
    )
    instruction = hlo_cost.Instruction.parse(line)
    assert (instruction.name, instruction.opcode, instruction.root) == ("fusion.3", "fusion", True)
    assert instruction.operands == ("p.1", "p.2")
    assert instruction.attribute("calls") == "fused_computation.3"
    assert instruction.op_name == "jit(step)/mul"


@pytest.mark.parametrize(
    "text", ["", "not hlo at all", "HloModule m\n\n%c (p: f32[]) -> f32[] {\n}"]
)
def test_text_that_is_not_an_optimized_module_is_refused(text):
    with pytest.raises(hlo_cost.HloParseError):
        hlo_cost.analyze(text)


def test_prediction_adds_each_category_at_its_rate():
    kernels = [
        hlo_cost.Kernel(hlo_cost.MATMUL, "gemm", "", 1e9, 2e12, 3),
        hlo_cost.Kernel(hlo_cost.ATTENTION, "fwd", "", 1e9, 1e12, 2),
        hlo_cost.Kernel(hlo_cost.ELEMENTWISE, "add", "", 4e9, 0, 5),
        hlo_cost.Kernel(hlo_cost.COPIES, "copy", "", 1e9, 0, 1),
    ]
    rates = hlo_cost.Rates(matmul_flops=600e12, attention_flops=200e12, memory_bytes=3e12)
    seconds = hlo_cost.predict_seconds(hlo_cost.ProgramCost(kernels), rates)
    assert seconds[hlo_cost.MATMUL] == pytest.approx(6e12 / 600e12)
    assert seconds[hlo_cost.ATTENTION] == pytest.approx(2e12 / 200e12)
    assert seconds[hlo_cost.ELEMENTWISE] == pytest.approx(20e9 / 3e12)
    assert seconds["total"] == pytest.approx(0.01 + 0.01 + 20e9 / 3e12 + 1e9 / 3e12)


# a scan body as XLA GPU compiles it: a Mosaic GPU kernel fused with the slicing of its operand
# out of the stacked layers (dynamic-slice fusion), its two-warpgroup dq by name, and a one-launch
# backward writing the fused gradient
_SCANNED_KERNELS = """HloModule m

%dsf (p0: bf16[24,8,256,6,128], p1: s32[]) -> (bf16[8,256,2,128], f32[8,2,256]) {
  %p0 = bf16[24,8,256,6,128]{4,3,2,1,0} parameter(0)
  %p1 = s32[] parameter(1)
  %z = s32[] constant(0)
  %slice = bf16[1,8,256,6,128]{4,3,2,1,0} dynamic-slice(%p0, %p1, %z, %z, %z, %z), dynamic_slice_sizes={1,8,256,6,128}
  %b = bf16[8,256,6,128]{3,2,1,0} bitcast(%slice)
  ROOT %k = (bf16[8,256,2,128]{3,2,1,0}, f32[8,2,256]{2,1,0}) custom-call(%b, %b, %b), custom_call_target="mosaic_gpu_v2", metadata={op_name="jit(step)/jvp()/while/body/mpt_flash_mgpu_fwd/mpmd_map"}
}

%body (t: (s32[], bf16[24,8,256,6,128])) -> (s32[], bf16[24,8,256,6,128]) {
  %t = (s32[], bf16[24,8,256,6,128]{4,3,2,1,0}) parameter(0)
  %i = s32[] get-tuple-element(%t), index=0
  %x = bf16[24,8,256,6,128]{4,3,2,1,0} get-tuple-element(%t), index=1
  %f = (bf16[8,256,2,128]{3,2,1,0}, f32[8,2,256]{2,1,0}) fusion(%x, %i), kind=kCustom, calls=%dsf
  %o = bf16[8,256,2,128]{3,2,1,0} get-tuple-element(%f), index=0
  %lse = f32[8,2,256]{2,1,0} get-tuple-element(%f), index=1
  %dq = bf16[8,256,2,128]{3,2,1,0} custom-call(%o, %lse), custom_call_target="mosaic_gpu_v2", metadata={op_name="jit(step)/transpose(jvp())/mpt_flash_mgpu_dq_x2/mpmd_map"}
  %dqkv = bf16[8,256,6,128]{3,2,1,0} custom-call(%o, %lse), custom_call_target="mosaic_gpu_v2", metadata={op_name="jit(step)/transpose(jvp())/mpt_flash_mgpu_bwd/mpmd_map"}
  ROOT %r = (s32[], bf16[24,8,256,6,128]{4,3,2,1,0}) tuple(%i, %x)
}

%cond (c: (s32[], bf16[24,8,256,6,128])) -> pred[] {
  %c = (s32[], bf16[24,8,256,6,128]{4,3,2,1,0}) parameter(0)
  ROOT %p = pred[] constant(true)
}

ENTRY %main (a: (s32[], bf16[24,8,256,6,128])) -> (s32[], bf16[24,8,256,6,128]) {
  %a = (s32[], bf16[24,8,256,6,128]{4,3,2,1,0}) parameter(0)
  ROOT %w = (s32[], bf16[24,8,256,6,128]{4,3,2,1,0}) while(%a), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"24"}}
}
"""  # noqa: E501


def test_kernels_fused_with_their_operand_slices_and_two_warpgroup_kernels_count_as_attention():
    cost = hlo_cost.analyze(_SCANNED_KERNELS)
    assert cost.launches(hlo_cost.ATTENTION) == 3 * 24
    B, S, H, K = 8, 256, 2, 128
    pairs = B * H * S * (S + 1) / 2
    # forward 2 products per (query, key) pair, dq 3, the one-launch backward 3 + 4
    assert cost.total("flops", hlo_cost.ATTENTION) == 24 * (2 + 3 + 7) * 2 * K * pairs
    # the fused forward reads one layer's slice of the stacked (24, ...) projections, not all
    (fused,) = [k for k in cost.kernels if k.name == "f"]
    # (and the s32 index and the float32 log-sum-exp it writes)
    assert fused.bytes == 2 * (B * S * 6 * 128 + B * S * H * K) + 4 + 4 * B * H * S
