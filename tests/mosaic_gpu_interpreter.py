"""Runs the Hopper (Mosaic GPU) kernels on a CPU host in jax 0.11's Mosaic GPU interpreter.

The interpreter simulates the warpgroups as threads, shared memory, TMA copies and mbarriers
(it fails a kernel whose warpgroups skip a barrier phase or deadlock), but it lacks two things
every wgmma of ours uses: `pl.run_state` (an accumulator seeded from registers,
`plgpu.ACC.init`) and a left operand held in registers (p, dS), and it has no rule for a store
into an accumulator (`acc_ref[...] = x`, the forward's rescaling of O). `interpreted()` adds all
three for its duration: run_state's initial values go into interpreter buffers that its body
reads and wgmma updates, a register operand is staged through such a buffer for the product,
and a store writes the accumulator's buffer.

jax 0.10's interpreter lacks more (transposed wgmma operands, plgpu.load, layout casts):
`unavailable()` says so and the tests skip there; `make test-gpu-stack` runs them under the GPU
image's jax 0.11.2.
"""

import contextlib
import threading

import jax
from jax._src import core as jax_core

try:  # the interpreter's internals as of jax 0.11
    from jax._src.pallas.mosaic_gpu import core as mosaic_gpu_core
    from jax._src.pallas.mosaic_gpu import primitives as mosaic_gpu_primitives
    from jax._src.pallas.mosaic_gpu.interpret import (
        gpu_callbacks,
        jaxpr_interpret,
        params,
        shared_memory,
    )
    from jax._src.state import discharge
    from jax._src.state import types as state_types

    _INTERPRETER = jaxpr_interpret.JaxprInterpreter
    _IMPORT_ERROR = None
except ImportError as e:  # pragma: no cover - depends on the installed jax
    _IMPORT_ERROR = e


def unavailable() -> str | None:
    """Why this jax cannot interpret the kernels, or None."""
    if jax.__version_info__ < (0, 11) or _IMPORT_ERROR is not None:
        # 0.10's interpreter also lacks transposed wgmma operands, plgpu.load and layout casts
        return f"jax {jax.__version__}: its Mosaic GPU interpreter cannot run the kernels"
    return None


def _where(interp) -> dict:
    """The interpreter's arguments naming the running thread."""
    return dict(mesh_location=interp.mesh_location, thread=interp.thread)


def _registers_buffer(interp, token, value, source_info):
    """An interpreter buffer in register memory holding `value`: (token, allocation key)."""
    space = shared_memory.get_memory_space_idx(mosaic_gpu_core.MemorySpace.REGS)
    token, request = gpu_callbacks.call_make_allocation_request_array(
        token=token, compute_unit=interp.thread, memory_space_id=space
    )
    return gpu_callbacks.call_allocate_buffer(
        token=token,
        allocation_request_as_array=request,
        value=value,
        source_info=source_info,
        **_where(interp),
    )


def _read(interp, token, aval, key, source_info):
    return gpu_callbacks.call_get(
        token=token,
        result_shape_and_dtype=aval,
        allocation_key_as_array=key,
        transforms=(),
        source_info=source_info,
        **_where(interp),
    )


def _free(interp, token, key, source_info):
    return gpu_callbacks.call_deallocate_buffer(
        token=token, allocation_key_as_array=key, source_info=source_info, **_where(interp)
    )


def _run_state(interp, eqn, token, invals):
    """run_state: values seed buffers the body updates in place; refs pass through as refs."""
    refs, owned = [], []
    for var, value in zip(eqn.invars, invals, strict=True):
        if isinstance(var.aval, state_types.AbstractRef):
            refs.append(value)
            continue
        token, key = _registers_buffer(interp, token, value, eqn.source_info)
        owned.append(len(refs))
        refs.append(key)
    token, _ = interp.interpret(eqn.params["jaxpr"], token, *refs)
    outs = list(invals)
    for i in owned:
        token, outs[i] = _read(interp, token, eqn.outvars[i].aval, refs[i], eqn.source_info)
        token = _free(interp, token, refs[i], eqn.source_info)
    return token, outs


def _accumulator_store(interp, eqn, token, invals):
    """acc_ref[...] = value: the value written into the accumulator's buffer."""
    key, value = invals
    token, _ = gpu_callbacks.call_swap(
        token=token,
        result_shape_and_dtype=eqn.invars[1].aval,
        allocation_key_as_array=key,
        transforms=(),
        val=value,
        mask=None,
        source_info=eqn.source_info,
        **_where(interp),
    )
    # the primitive's result (once state is discharged) is the accumulator: the same buffer
    return token, [key] * len(eqn.outvars)


def _patched(original_interpret, original_wgmma):
    handlers = {
        discharge.run_state_p: _run_state,
        mosaic_gpu_primitives.wgmma_accumulator_store_p: _accumulator_store,
    }

    def interpret(self, jaxpr, token, *args):
        """The interpreter's loop over `jaxpr`, with run_state equations run by _run_state and
        accumulator stores by _accumulator_store."""
        if not any(e.primitive in handlers for e in jaxpr.eqns):
            return original_interpret(self, jaxpr, token, *args)
        env = dict(zip(jaxpr.constvars + jaxpr.invars, args, strict=True))

        def read(var):
            return var.val if isinstance(var, jax_core.Literal) else env[var]

        def defined(eqns):
            return [v for e in eqns for v in e.outvars if not isinstance(v, jax_core.DropVar)]

        def run_segment(eqns, token):
            """The equations between two run_states, as a jaxpr of their own."""
            made, needed = set(defined(eqns)), []
            for e in eqns:
                for v in e.invars:
                    if isinstance(v, jax_core.Var) and v not in made and v not in needed:
                        needed.append(v)
            outs = defined(eqns)
            effects = jax_core.join_effects(*(e.effects for e in eqns))
            segment = jax_core.Jaxpr([], needed, outs, list(eqns), effects)
            token, values = original_interpret(self, segment, token, *(env[v] for v in needed))
            env.update(zip(outs, values, strict=True))
            return token

        pending = []
        for eqn in jaxpr.eqns:
            if eqn.primitive not in handlers:
                pending.append(eqn)
                continue
            if pending:
                token, pending = run_segment(pending, token), []
            handler = handlers[eqn.primitive]
            token, outs = handler(self, eqn, token, [read(v) for v in eqn.invars])
            env.update(
                (v, o)
                for v, o in zip(eqn.outvars, outs, strict=True)
                if not isinstance(v, jax_core.DropVar)
            )
        if pending:
            token = run_segment(pending, token)
        return token, [read(v) for v in jaxpr.outvars]

    def wgmma(self, eqn, token, get_invals):
        """wgmma, its left operand staged through a buffer when it is held in registers."""
        if isinstance(eqn.invars[1].aval, state_types.AbstractRef):
            return original_wgmma(self, eqn, token, get_invals)
        invals = list(get_invals())
        token, invals[1] = _registers_buffer(self, token, invals[1], eqn.source_info)
        token, outs = original_wgmma(self, eqn, token, lambda: invals)
        # the interpreter's wgmma is synchronous: the operand is read by now
        return _free(self, token, invals[1], eqn.source_info), outs

    return interpret, wgmma


def _fail_stuck_kernel(deadline_s: float):
    """What the interpreter does when a warpgroup fails: every waiter wakes up and raises."""
    memory = gpu_callbacks._shared_memory
    if memory is not None:
        stuck = TimeoutError(f"deadlock: the kernel was still waiting after {deadline_s} s")
        memory.set_failed(stuck, top_level=False)


@contextlib.contextmanager
def interpreted(deadline_s: float = 120.0):
    """Pallas Mosaic GPU kernels called inside run in the interpreter, on any host.

    The interpreter waits forever on a barrier that is never arrived at: after deadline_s the
    kernel running then fails instead.
    """
    reason = unavailable()
    if reason is not None:
        raise RuntimeError(reason)
    originals = _INTERPRETER.interpret, _INTERPRETER._interpret_wgmma_ref_p
    _INTERPRETER.interpret, _INTERPRETER._interpret_wgmma_ref_p = _patched(*originals)
    watchdog = threading.Timer(deadline_s, _fail_stuck_kernel, (deadline_s,))
    watchdog.start()
    try:
        with params.force_gpu_interpret_mode(params.InterpretGPUParams()):
            yield
    except BaseException:
        # the interpreter's documented step after a failed kernel, before it can run another
        gpu_callbacks.reset_gpu_interpret_mode_state()
        raise
    finally:
        watchdog.cancel()
        _INTERPRETER.interpret, _INTERPRETER._interpret_wgmma_ref_p = originals
