"""What a compiled XLA program does, read from its optimized HLO text: FLOPs, bytes and launches.

    cost = hlo_cost.analyze(jitted.lower(*args).compile().as_text())
    print(hlo_cost.format_cost(cost))

Every kernel the program launches (a fusion, a custom call, a standalone op; a while loop's
body counted once per known trip) is put in one of `mpt_jax.profiling`'s categories by what it
contains, not by its name: a fusion or custom call holding a dot is `matmul` (its FLOPs are
2 x output elements x contracted size), our Pallas kernels are `attention` (their matmul FLOPs
worked out from their operand shapes, below), a fusion of nothing but data movement is a copy,
the rest is fused elementwise work.

Bytes are what a kernel must read and write at least, once each: its operands and outputs,
except that a fused operand read only through a (dynamic) slice counts the slice, and an output
written in place by a dynamic-update-slice counts the update (the buffer it updates is neither
read nor rewritten). Caches are not modelled; a reduction that reads its input twice counts it
once. On a GPU most non-matmul kernels are bound by these bytes, which is what
`predict_seconds` assumes.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import re
from collections.abc import Iterator

from mpt_jax import profiling

# mpt_jax.profiling's categories, in its order, so that a trace and a program compare row by row
ATTENTION, COLLECTIVES, MATMUL, COPIES, ELEMENTWISE = (name for name, _ in profiling.CATEGORIES)
CATEGORY_ORDER = (MATMUL, ATTENTION, COLLECTIVES, COPIES, ELEMENTWISE)

_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "bf16": 2,
    "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4, "f64": 8, "s64": 8, "u64": 8,
    "c64": 8, "c128": 16, "token": 0,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(ROOT )?%(\S+) = ")
_OPERAND = re.compile(r"%([\w.\-]+)")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_ATTENTION_KERNELS = re.compile(r"mpt_flash_(?:mgpu_)?(fwd|dq|dkdv|bwd)(?:_x\d+)?\b")
# our kernels' matmuls per (query, key) pair of head dim K, in units of 2 K FLOPs: the forward
# computes S = QK^T and O = PV, dq recomputes S and adds dP = dO V^T and dQ = dS K, dk/dv
# recomputes S and dP and adds dV = P^T dO and dK = dS^T Q; the Hopper backward's one launch
# (bwd) runs both
_ATTENTION_MATMULS = {"fwd": 2, "dq": 3, "dkdv": 4, "bwd": 7}

# ops that launch nothing (or whose work is counted where it is used)
_FREE = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
    "opt-barrier", "partition-id", "replica-id", "add-dependency", "domain", "fusion-done",
    "copy-done", "all-reduce-done", "all-gather-done", "collective-permute-done", "async-done",
    "send-done", "recv-done",
}  # fmt: skip
# ops that only move data
_MOVES = {
    "copy", "copy-start", "transpose", "dynamic-update-slice", "dynamic-slice", "slice",
    "concatenate", "pad", "broadcast", "reshape", "bitcast", "reverse", "iota", "parameter",
    "constant", "tuple", "get-tuple-element",
}  # fmt: skip
_COLLECTIVE_OPS = re.compile(
    r"^(all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute|collective-broadcast"
    r"|send|recv)(-start)?$"
)


class HloParseError(ValueError):
    """The text is not optimized HLO this module can read."""


def shape_bytes(shape: str) -> float:
    """Bytes of an HLO shape string, `f32[16,2048]{1,0}` or a tuple of them."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        count = math.prod(int(d) for d in dims.split(",") if d)
        total += count * _DTYPE_BYTES.get(dtype, 4)
    return total


def _dims(shape: str) -> list[int]:
    match = _ARRAY.search(shape)
    if match is None:
        raise HloParseError(f"no array shape in {shape!r}")
    return [int(d) for d in match.group(2).split(",") if d]


def _closing(text: str, start: int) -> int:
    """Index of the bracket that closes the one at `start`."""
    opening, closing = text[start], {"(": ")", "{": "}"}[text[start]]
    depth = 0
    for i in range(start, len(text)):
        if text[i] == opening:
            depth += 1
        elif text[i] == closing:
            depth -= 1
            if depth == 0:
                return i
    raise HloParseError(f"unbalanced {opening!r} in {text[:120]!r}")


@dataclasses.dataclass(frozen=True)
class Instruction:
    name: str
    shape: str
    opcode: str
    operands: tuple[str, ...]
    attributes: str
    root: bool

    @classmethod
    def parse(cls, line: str) -> Instruction:
        match = _INSTRUCTION.match(line)
        if match is None:
            raise HloParseError(f"not an instruction: {line[:120]!r}")
        rest = line[match.end() :]
        if rest.startswith("("):  # a tuple shape
            end = _closing(rest, 0)
            shape, rest = rest[: end + 1], rest[end + 1 :].lstrip()
        else:
            shape, _, rest = rest.partition(" ")
        paren = rest.find("(")
        if paren <= 0:
            raise HloParseError(f"no opcode in {line[:120]!r}")
        end = _closing(rest, paren)
        return cls(
            name=match.group(2),
            shape=shape,
            opcode=rest[:paren],
            operands=tuple(_OPERAND.findall(rest[paren : end + 1])),
            attributes=rest[end + 1 :],
            root=bool(match.group(1)),
        )

    def attribute(self, key: str) -> str | None:
        match = re.search(rf"\b{key}=%?([\w.\-$]+)", self.attributes)
        return match.group(1) if match else None

    @property
    def op_name(self) -> str:
        match = _OP_NAME.search(self.attributes)
        return match.group(1) if match else ""


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """({computation name: its instructions}, entry computation name) of an HLO module's text."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = None, None
    for line in text.splitlines():
        if current is None:
            match = _COMPUTATION.match(line)
            if match:
                current = match.group(2)
                computations[current] = []
                entry = current if match.group(1) else entry
            continue
        if line.startswith("}"):
            current = None
        elif _INSTRUCTION.match(line):
            computations[current].append(Instruction.parse(line))
    if entry is None:
        raise HloParseError("no ENTRY computation: not an HLO module's text")
    return computations, entry


@dataclasses.dataclass(frozen=True)
class Kernel:
    """One launch site: `launches` is how often it runs per program execution."""

    category: str
    name: str
    op_name: str
    bytes: float
    flops: float
    launches: int


@dataclasses.dataclass
class ProgramCost:
    kernels: list[Kernel]

    def total(self, field: str, category: str | None = None) -> float:
        """Sum of bytes or flops (per program execution), over one category or all."""
        return sum(
            getattr(k, field) * k.launches
            for k in self.kernels
            if category is None or k.category == category
        )

    def launches(self, category: str | None = None) -> int:
        return sum(k.launches for k in self.kernels if category is None or k.category == category)

    def top(self, n: int, categories: tuple[str, ...] = (COPIES, ELEMENTWISE)) -> list[Kernel]:
        """The n launch sites that move the most bytes per program execution."""
        chosen = [k for k in self.kernels if k.category in categories]
        return sorted(chosen, key=lambda k: -k.bytes * k.launches)[:n]


def _matmul_flops(product: Instruction, table: dict[str, Instruction], contracting: str) -> float:
    """2 x output elements x contracted size; `contracting` finds the lhs contracting dims'
    list in the attributes (none found: nothing contracted)."""
    lhs = _dims(table[product.operands[0]].shape)
    match = re.search(contracting, product.attributes)
    dims = re.findall(r"\d+", match.group(1)) if match else []
    return 2.0 * math.prod(_dims(product.shape)) * math.prod(lhs[int(i)] for i in dims)


def _dot_flops(dot: Instruction, table: dict[str, Instruction]) -> float:
    """FLOPs of a `dot`."""
    return _matmul_flops(dot, table, r"lhs_contracting_dims=\{([0-9,]*)\}")


def _custom_gemm_flops(call: Instruction, table: dict[str, Instruction]) -> float:
    """FLOPs of a cuBLAS custom call, from its backend config's dot dimension numbers."""
    return _matmul_flops(call, table, r'"lhs_contracting_dimensions":\[([^\]]*)\]')


def _attention_flops(kernel: str, call: Instruction, table: dict[str, Instruction]) -> float:
    """Matmul FLOPs of one of our causal attention kernels: B, H (query heads) and S from the
    float32 (B, H, S) softmax statistics it writes (forward, dq) or reads (dk/dv), K from its
    first output, (B, S, heads, K) (all N heads of a fused qkv gradient written in place)."""
    shapes = [call.shape, *(table[o].shape for o in call.operands if o in table)]
    stats = [m for s in shapes for m in _ARRAY.findall(s) if m[0] == "f32" and m[1].count(",") == 2]
    if not stats:
        raise HloParseError(f"{call.name}: no float32 (B, H, S) statistics among its arrays")
    B, H, S = (int(d) for d in stats[0][1].split(","))
    K = _dims(call.shape)[3]
    pairs = B * H * S * (S + 1) / 2  # causal
    return _ATTENTION_MATMULS[kernel] * 2.0 * K * pairs


def _fusion(fusion: Instruction, computations: dict[str, list[Instruction]]) -> Kernel:
    """A fusion's category, bytes and FLOPs from its fused computation."""
    body = computations[fusion.attribute("calls")]
    table = {i.name: i for i in body}
    users: dict[str, list[Instruction]] = collections.defaultdict(list)
    for instruction in body:
        for operand in instruction.operands:
            users[operand].append(instruction)
    root = next(i for i in body if i.root)
    outputs = [table[o] for o in root.operands] if root.opcode == "tuple" else [root]
    written = 0.0
    for out in outputs:  # in place: only the update is written
        if out.opcode == "dynamic-update-slice":
            written += shape_bytes(table[out.operands[1]].shape)
        else:
            written += shape_bytes(out.shape)
    read = 0.0
    sliced = ("dynamic-slice", "slice", "gather")
    for param in (i for i in body if i.opcode == "parameter"):
        uses = users[param.name]
        # the buffer an output updates in place is not read, beyond the slices read from it
        # (a read-modify-write of one layer's slice of a stacked buffer)
        rest = [
            u
            for u in uses
            if not (
                u.opcode == "dynamic-update-slice" and u.operands[0] == param.name and u in outputs
            )
        ]
        if uses and not rest:
            continue
        if all(u.opcode in sliced and u.operands[0] == param.name for u in rest):
            read += sum(shape_bytes(u.shape) for u in rest)
        else:
            read += shape_bytes(param.shape)
    flops = sum(_dot_flops(i, table) for i in body if i.opcode == "dot")
    # a custom call XLA fused with the slicing of its operands (a kernel inside a scan)
    kernels = [
        (match.group(1), i)
        for i in body
        if i.opcode == "custom-call" and (match := _ATTENTION_KERNELS.search(i.op_name))
    ]
    if kernels:
        category = ATTENTION
        flops = sum(_attention_flops(name, call, table) for name, call in kernels)
    elif flops:
        category = MATMUL
    elif _only_moves_data(body):
        category = COPIES
    else:
        category = ELEMENTWISE
    return Kernel(category, fusion.name, fusion.op_name, read + written, flops, 1)


def _only_moves_data(body: list[Instruction]) -> bool:
    """Every array instruction only moves data (scalar index arithmetic aside)."""
    arrays = [i for i in body if re.search(r"\[\d", i.shape)]
    return bool(arrays) and all(i.opcode in _MOVES for i in arrays)


def _kernels(
    computations: dict[str, list[Instruction]], name: str, launches: int
) -> Iterator[Kernel]:
    body = computations[name]
    table = {i.name: i for i in body}
    for instruction in body:
        op = instruction.opcode
        if op in _FREE:
            continue
        if op == "while":
            trips = _TRIP_COUNT.search(instruction.attributes)
            n = int(trips.group(1)) if trips else 1
            yield from _kernels(computations, instruction.attribute("body"), launches * n)
        elif op == "conditional":  # the costliest branch: a step runs one
            branches = re.search(r"branch_computations=\{([^}]*)\}", instruction.attributes)
            if branches:
                names = _OPERAND.findall(branches.group(1))
            else:
                names = [instruction.attribute(f"{b}_computation") for b in ("true", "false")]
            costs = [list(_kernels(computations, b, launches)) for b in names if b]
            yield from max(costs, key=lambda ks: sum(k.bytes * k.launches for k in ks))
        elif op in ("call", "async-start"):
            callee = instruction.attribute("to_apply") or instruction.attribute("calls")
            yield from _kernels(computations, callee, launches)
        elif op in ("fusion", "fusion-start"):
            kernel = _fusion(instruction, computations)
            yield dataclasses.replace(kernel, launches=launches)
        else:
            moved = shape_bytes(instruction.shape) + sum(
                shape_bytes(table[o].shape) for o in instruction.operands if o in table
            )
            flops = 0.0
            attention = _ATTENTION_KERNELS.search(instruction.op_name)
            if op == "custom-call" and attention:
                category = ATTENTION
                flops = _attention_flops(attention.group(1), instruction, table)
            elif op == "custom-call" and "cublas" in str(_TARGET.findall(instruction.attributes)):
                category, flops = MATMUL, _custom_gemm_flops(instruction, table)
            elif op == "dot":
                category, flops = MATMUL, _dot_flops(instruction, table)
            elif _COLLECTIVE_OPS.match(op):
                category = COLLECTIVES
            elif op == "dynamic-update-slice":  # in place: the update is read and written
                category, moved = COPIES, 2 * shape_bytes(table[instruction.operands[1]].shape)
            elif op in _MOVES:
                category = COPIES
            else:
                category = ELEMENTWISE
            yield Kernel(category, instruction.name, instruction.op_name, moved, flops, launches)


def analyze(text: str) -> ProgramCost:
    """The launches of an optimized HLO module (`compiled.as_text()`), with bytes and FLOPs."""
    computations, entry = parse_module(text)
    return ProgramCost(list(_kernels(computations, entry, 1)))


@dataclasses.dataclass(frozen=True)
class Rates:
    """What one device sustains: matmul and attention-kernel FLOP/s, memory-bound bytes/s."""

    matmul_flops: float
    attention_flops: float
    memory_bytes: float


def predict_seconds(cost: ProgramCost, rates: Rates) -> dict[str, float]:
    """Seconds per program execution by category: FLOPs at the matmul and attention rates,
    bytes at the memory rate for the rest (no overlap between kernels)."""
    seconds = {
        MATMUL: cost.total("flops", MATMUL) / rates.matmul_flops,
        ATTENTION: cost.total("flops", ATTENTION) / rates.attention_flops,
    }
    for category in (COLLECTIVES, COPIES, ELEMENTWISE):
        seconds[category] = cost.total("bytes", category) / rates.memory_bytes
    seconds["total"] = sum(seconds.values())
    return seconds


def format_cost(cost: ProgramCost, top: int = 10) -> str:
    """A Markdown table per category, then the top memory-bound launch sites."""
    lines = ["| category | launches | TFLOP | GB moved |", "|---|---|---|---|"]
    for category in CATEGORY_ORDER:
        n = cost.launches(category)
        if n:
            tflop = cost.total("flops", category) / 1e12
            gb = cost.total("bytes", category) / 1e9
            lines.append(f"| {category} | {n} | {tflop:.1f} | {gb:.1f} |")
    if top:
        lines += ["", "| memory-bound launch site | op | x | GB each | GB in all |"]
        lines.append("|---|---|---|---|---|")
        for k in cost.top(top):
            op = k.op_name.removeprefix("jit(step)/")[-70:] or "-"
            lines.append(
                f"| {k.name} ({k.category}) | {op} | {k.launches} | {k.bytes / 1e9:.2f}"
                f" | {k.bytes * k.launches / 1e9:.1f} |"
            )
    return "\n".join(lines)
