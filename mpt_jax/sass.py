"""The machine code of compiled GPU kernels, read on any host (no GPU).

A program compiled for a compile-only GPU (`mpt_jax.aot`) carries its kernels as cubins; this
module finds them in the serialized executable and reads, per kernel, what NVIDIA's `cuobjdump`
and `nvdisasm` report (`TOOL_PACKAGES`, which `make nvidia-tools` installs into the venv's
`nvidia-tools` folder): registers and stack per thread (spills show as stack), shared memory,
and the matrix instructions (Hopper's warpgroup `HGMMA`, the per-warp `HMMA`).

XLA serializes a GPU executable as protos inside riegeli files whose records are
snappy-compressed (jax 0.10: one layer; jax 0.11: the GPU executable in a second, nested one).
The readers below undo exactly that: riegeli's 64 KiB block headers and simple chunks, and the
snappy block format. A layout they do not recognize is an error naming it, never a guess.
"""

from __future__ import annotations

import collections
import dataclasses
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_RIEGELI_BLOCK = 1 << 16
_RIEGELI_BLOCK_HEADER = 24
_RIEGELI_CHUNK_HEADER = 40
# a riegeli file opens with a block header: its hash, previous_chunk 0, next_chunk 64
_RIEGELI_START = re.compile(rb"(?s).{8}\x00{8}\x40\x00{7}")
_EM_CUDA = 190
# NVIDIA's wheels of the two programs; installed beside jax, their `nvidia.cu13` namespace would
# pass for a CUDA installation (jax's cuda_path), hence a folder of their own
TOOL_PACKAGES = "nvidia-cuda-cuobjdump>=13,<14 nvidia-cuda-nvdisasm>=13,<14"
TOOLS_FOLDER = Path(sys.prefix) / "nvidia-tools"


class SassError(RuntimeError):
    """The executable or the NVIDIA tools could not be read."""


@dataclasses.dataclass(frozen=True)
class KernelCode:
    """One kernel's resources per thread and its matrix instructions."""

    name: str
    registers: int
    stack_bytes: int  # nonzero: spilled registers (or a call stack)
    shared_bytes: int  # static shared memory (Triton's and Mosaic's is dynamic, at launch)
    local_bytes: int
    matrix_instructions: dict[str, int]  # e.g. {"HGMMA.64x128x16.F32.BF16": 4}
    # waits for the warpgroup MMAs in flight, by how many may stay in flight: {0: 4, 1: 2};
    # a wait above 0 lets the instructions after it run beside a product
    wgmma_waits: dict[int, int] = dataclasses.field(default_factory=dict)
    spill_accesses: int = 0  # local-memory loads and stores (LDL, STL) in the listing
    # exponentials (MUFU.EX2) placed while a warpgroup MMA may be in flight (after an HGMMA or a
    # wait that leaves some in flight, before a wait for all): the softmax overlapping products
    exponentials_in_flight: int = 0

    @property
    def warpgroup_mma(self) -> int:
        return sum(n for op, n in self.matrix_instructions.items() if op.startswith("HGMMA"))

    @property
    def warp_mma(self) -> int:
        return sum(n for op, n in self.matrix_instructions.items() if op.startswith("HMMA"))


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise SassError("snappy/riegeli: a varint runs past 64 bits")


def snappy_decompress(block: bytes) -> bytes:
    """The snappy block format: a varint length, then literals and back-references."""
    length, i = _varint(block, 0)
    out = bytearray()
    while i < len(block):
        tag = block[i]
        i += 1
        kind = tag & 3
        if kind == 0:
            n = tag >> 2
            if n >= 60:
                width = n - 59
                n = int.from_bytes(block[i : i + width], "little")
                i += width
            n += 1
            out += block[i : i + n]
            i += n
            continue
        if kind == 1:
            n, offset = ((tag >> 2) & 7) + 4, ((tag >> 5) << 8) | block[i]
            i += 1
        else:
            width = 2 if kind == 2 else 4
            n, offset = (tag >> 2) + 1, int.from_bytes(block[i : i + width], "little")
            i += width
        if not 0 < offset <= len(out):
            raise SassError(f"snappy: a back-reference {offset} bytes back from {len(out)}")
        start = len(out) - offset
        if offset >= n:
            out += out[start : start + n]
        else:  # overlapping: repeats the last `offset` bytes
            for k in range(n):
                out.append(out[start + k])
    if len(out) != length:
        raise SassError(f"snappy: {len(out)} bytes decoded where the header says {length}")
    return bytes(out)


def _riegeli_records(data: bytes) -> list[bytes]:
    """The records of the riegeli file at the start of `data` (simple chunks, snappy or none)."""
    # block headers interrupt the stream every 64 KiB; chunks are contiguous without them
    stream = b"".join(
        data[p + _RIEGELI_BLOCK_HEADER : p + _RIEGELI_BLOCK]
        for p in range(0, len(data), _RIEGELI_BLOCK)
    )
    records: list[bytes] = []
    p = 0
    while p + _RIEGELI_CHUNK_HEADER <= len(stream):
        _, size, _, type_and_count, decoded = struct.unpack_from("<QQQQQ", stream, p)
        kind, count = chr(type_and_count & 0xFF), type_and_count >> 8
        body = stream[p + _RIEGELI_CHUNK_HEADER : p + _RIEGELI_CHUNK_HEADER + size]
        if kind not in "smpr" or len(body) != size:
            break  # past the file's end (the bytes around it belong to the enclosing proto)
        if kind == "r" and size:
            records += _simple_chunk(body, count, decoded)
        p += _RIEGELI_CHUNK_HEADER + size
    if not records:
        raise SassError("riegeli: no simple chunk with records found")
    return records


def _simple_chunk(body: bytes, count: int, decoded: int) -> list[bytes]:
    compression = body[0]
    sizes_length, i = _varint(body, 1)
    blocks = (body[i : i + sizes_length], body[i + sizes_length :])
    if compression == 0:
        sizes_block, values = blocks
    elif compression == ord("s"):
        # each block: a varint of its decoded size, then the snappy block (its own varint)
        sizes_block, values = (snappy_decompress(b[_varint(b, 0)[1] :]) for b in blocks)
    else:
        raise SassError(f"riegeli: compression {chr(compression)!r} is not read here")
    if len(values) != decoded:
        raise SassError(f"riegeli: a chunk decodes to {len(values)} bytes, not {decoded}")
    records, j, start = [], 0, 0
    for _ in range(count):
        size, j = _varint(sizes_block, j)
        records.append(values[start : start + size])
        start += size
    return records


def _elf_images(data: bytes) -> Iterator[bytes]:
    """The CUDA ELF images (cubins) found whole in `data`."""
    for match in re.finditer(rb"\x7fELF\x02\x01", data):
        o = match.start()
        if len(data) < o + 64 or struct.unpack_from("<H", data, o + 18)[0] != _EM_CUDA:
            continue
        phoff, shoff = struct.unpack_from("<QQ", data, o + 0x20)
        phentsize, phnum, shentsize, shnum = struct.unpack_from("<HHHH", data, o + 0x36)
        end = o + max(shoff + shnum * shentsize, phoff + phnum * phentsize)
        if end <= len(data):
            yield data[o:end]


def cubins(data: bytes) -> list[bytes]:
    """The cubins inside serialized executable bytes, through nested riegeli files."""
    found = list(_elf_images(data))
    if found:
        return found
    for match in _RIEGELI_START.finditer(data):
        try:
            records = _riegeli_records(data[match.start() :])
        except (SassError, IndexError, struct.error):
            continue
        found = [image for record in records for image in cubins(record)]
        if found:
            return found
    return []


def executable_cubins(compiled: Any) -> list[bytes]:
    """The cubins of a compiled jax program (`jit(...).lower(...).compile()`), GPU-targeted."""
    import jax
    from jax.experimental import serialize_executable

    payload, _, _ = serialize_executable.serialize(compiled)
    # the pickle holds the XLA executable's bytes whole; no need to unpickle (that would load)
    found = cubins(payload)
    if not found:
        raise SassError(
            "no cubin in the serialized executable: not compiled for a CUDA GPU, or a layout"
            f" this reader does not know (jax {jax.__version__})"
        )
    return found


def nvidia_tool(name: str) -> str:
    """Path of `cuobjdump` or `nvdisasm`: the nvidia-cuda-* wheel's (in TOOLS_FOLDER or on
    sys.path), else one on PATH."""
    for root in [TOOLS_FOLDER, *map(Path, sys.path)]:
        # nvidia/cu13/bin (CUDA 13 wheels) or nvidia/cuda_<tool>/bin (CUDA 12 wheels)
        candidates = [*root.glob(f"nvidia/cu*/bin/{name}"), root / f"nvidia/cuda_{name}/bin/{name}"]
        for candidate in candidates:
            if candidate.is_file():
                if not os.access(candidate, os.X_OK):
                    candidate.chmod(candidate.stat().st_mode | 0o111)  # the wheels drop the bit
                return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise SassError(
            f"{name} not found: make nvidia-tools (pip install --target {TOOLS_FOLDER}"
            f" {TOOL_PACKAGES})"
        )
    return found


def read_kernels(images: list[bytes]) -> list[KernelCode]:
    """Each function of each cubin: cuobjdump's resource usage, nvdisasm's matrix opcodes."""
    kernels = []
    cuobjdump, nvdisasm = nvidia_tool("cuobjdump"), nvidia_tool("nvdisasm")
    with tempfile.TemporaryDirectory() as tmp:
        for n, image in enumerate(images):
            path = Path(tmp) / f"k{n}.cubin"
            path.write_bytes(image)
            usage = _run([cuobjdump, "-res-usage", str(path)])
            sass = _run([nvdisasm, str(path)])
            listing = _listing_counts(sass)
            for name, fields in _resource_usage(usage).items():
                kernels.append(
                    KernelCode(
                        name=name,
                        registers=fields.get("REG", 0),
                        stack_bytes=fields.get("STACK", 0),
                        shared_bytes=fields.get("SHARED", 0),
                        local_bytes=fields.get("LOCAL", 0),
                        matrix_instructions=dict(listing[name].matrix),
                        wgmma_waits=dict(listing[name].waits),
                        spill_accesses=listing[name].spills,
                        exponentials_in_flight=listing[name].exponentials_in_flight,
                    )
                )
    return kernels


def _run(argv: list[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, check=False)
    if result.returncode:
        raise SassError(f"{Path(argv[0]).name} failed: {result.stderr.strip()[:300]}")
    return result.stdout


def _resource_usage(text: str) -> dict[str, dict[str, int]]:
    """cuobjdump -res-usage: ` Function NAME:` then `REG:126 STACK:0 SHARED:1024 ...`."""
    usage: dict[str, dict[str, int]] = {}
    name = None
    for line in text.splitlines():
        header = re.match(r"\s*Function (\S+?):?\s*$", line)
        if header:
            name = header.group(1)
        elif name and "REG:" in line:
            usage[name] = {k: int(v) for k, v in re.findall(r"(\w+)(?:\[\d+\])?:(\d+)", line)}
            name = None
    return usage


@dataclasses.dataclass
class _Listing:
    matrix: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    waits: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    spills: int = 0
    exponentials_in_flight: int = 0
    in_flight: bool = False


def _listing_counts(sass: str) -> dict[str, _Listing]:
    """nvdisasm's listing, per .text section: the HGMMA/HMMA opcodes (with their shapes), the
    wgmma waits (`WARPGROUP.DEPBAR.LE gsb0, 0xN`) by N, the LDL/STL count, and the MUFU.EX2
    placed while an HGMMA may be in flight (in listing order; loops are not followed)."""
    counts: dict[str, _Listing] = collections.defaultdict(_Listing)
    function = None
    for line in sass.splitlines():
        section = re.match(r"\s*\.section\s+\.text\.(\w+)", line)
        if section:
            function = section.group(1)
            continue
        instruction = re.search(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z][\w.]*)(.*)", line)
        if not (function and instruction):
            continue
        op, operands = instruction.groups()
        kernel = counts[function]
        if re.match(r"H[G]?MMA\.", op):
            kernel.matrix[op] += 1
            kernel.in_flight = kernel.in_flight or op.startswith("HGMMA")
        elif op == "WARPGROUP.DEPBAR.LE":
            wait = re.search(r"gsb0,\s*0x([0-9a-f]+)", operands)
            if wait:
                left = int(wait.group(1), 16)
                kernel.waits[left] += 1
                kernel.in_flight = left > 0
        elif re.match(r"(LDL|STL)\b", op):
            kernel.spills += 1
        elif op == "MUFU.EX2" and kernel.in_flight:
            kernel.exponentials_in_flight += 1
    return counts
