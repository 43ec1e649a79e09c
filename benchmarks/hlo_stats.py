"""What an optimized XLA program does, read off its HLO text: kernels, bytes moved, 16-bit reductions.

`program_stats(compiled.as_text())` walks the entry computation the way the device runs it:
every instruction that launches work (a fusion, a library call such as cuBLAS, a copy, a
collective, any op left unfused) counts as one kernel; a `while` loop counts its body as often
as XLA knows it runs (`known_trip_count`), a `conditional` its largest branch, a `call` what it
calls. Bytes moved are, per kernel, its operands' and its result's sizes: an upper bound on HBM
traffic, except that a kernel reading slices of a buffer (a scan's stacked parameters or
residuals, also through a bitcast view of them) or updating one in place counts the slices.
16-bit reductions are `reduce` and `all-reduce` instructions anywhere in the module (fused or
not) whose result is bf16 or f16: sums carried out in 16 bits.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter

_DTYPE_BYTES = {
    "pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4,
    "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16,
    "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1, "f8e4m3b11fnuz": 1,
}  # fmt: skip
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([\d,]*)\]")
# Instructions that launch no kernel: bookkeeping, control flow (its bodies are counted), no-ops.
_NOT_KERNELS = {
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional", "call", "after-all",
    "partition-id", "replica-id", "copy-done", "all-reduce-done", "all-gather-done", "collective-permute-done",
    "send-done", "recv-done", "opt-barrier", "add-dependency", "domain", "async-done", "async-update",
    "fusion-done",  # an async fusion's end: its fusion-start is the kernel
}  # fmt: skip
_FUSIONS = ("fusion", "fusion-start")  # XLA from JAX 0.11 runs some fusions asynchronously: start ... done
_REDUCTIONS = ("reduce", "all-reduce", "all-reduce-start", "reduce-scatter")
_SIXTEEN_BIT = ("bf16", "f16")


@dataclasses.dataclass
class Instruction:
    name: str
    shape: str  # the result shape as printed, e.g. "bf16[64,32,768]{2,1,0}" or a tuple
    opcode: str
    operands: list[str]
    attributes: str  # everything after the operand list
    arguments: str = ""  # the operand list as printed (for parameter(N): the number)

    def called(self, key: str) -> list[str]:
        match = re.search(rf"\b{key}=%?([\w.\-]+)", self.attributes)
        return [match.group(1)] if match else []

    def branches(self) -> list[str]:
        match = re.search(r"branch_computations=\{([^}]*)\}", self.attributes)
        if match:
            return [b.strip().lstrip("%") for b in match.group(1).split(",") if b.strip()]
        return self.called("true_computation") + self.called("false_computation")

    def trip_count(self) -> int | None:
        match = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"(\d+)"', self.attributes)
        return int(match.group(1)) if match else None

    def op_name(self) -> str:
        match = re.search(r'op_name="([^"]*)"', self.attributes)
        return match.group(1) if match else ""


def shape_bytes(shape: str) -> float:
    """Bytes of an array or tuple shape as HLO prints it."""
    total = 0.0
    for dtype, dims in _ARRAY.findall(shape):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def _split_top(text: str, opener: str, closer: str) -> int:
    """Index just past the bracket that closes text[0] (which is `opener`)."""
    depth = 0
    for i, char in enumerate(text):
        if char == opener:
            depth += 1
        elif char == closer:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced {opener}{closer} in {text[:80]!r}")


def parse_instruction(line: str) -> Instruction | None:
    line = line.strip()
    line = line.removeprefix("ROOT ")
    if " = " not in line or line.startswith(("//", "}")):
        return None
    name, rest = line.split(" = ", 1)
    if rest.startswith("("):
        end = _split_top(rest, "(", ")")
        shape, rest = rest[:end], rest[end:].lstrip()
    else:
        shape, _, rest = rest.partition(" ")
    match = re.match(r"([\w\-]+)\(", rest)
    if not match:
        return None
    opcode = match.group(1)
    args_end = match.end() - 1 + _split_top(rest[match.end() - 1 :], "(", ")")
    arguments = rest[match.end() : args_end - 1]
    operands = re.findall(r"%([\w.\-]+)", arguments)
    return Instruction(name.lstrip("%"), shape, opcode, operands, rest[args_end:], arguments)


def parse_module(text: str) -> tuple[dict[str, list[Instruction]], str]:
    """{computation name: instructions} and the entry computation's name."""
    computations: dict[str, list[Instruction]] = {}
    entry, current = "", None
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line.startswith((" ", "\t")) and line.rstrip().endswith("{"):
            header = line.strip()
            is_entry = header.startswith("ENTRY ")
            current = header.removeprefix("ENTRY ").split(" ", 1)[0].lstrip("%")
            computations[current] = []
            entry = current if is_entry else entry
        elif line.startswith("}"):
            current = None
        elif current is not None:
            instruction = parse_instruction(line)
            if instruction is not None:
                computations[current].append(instruction)
    return computations, entry


@dataclasses.dataclass
class ProgramStats:
    kernels: int
    kernels_by_kind: dict[str, int]
    bytes_moved: float
    sixteen_bit_reductions: list[str]  # op names (from metadata) of bf16/f16 reductions
    top_kernels: list[tuple[str, float]]  # (op name, bytes per step) of the kernels that move the most


def program_stats(text: str) -> ProgramStats:
    computations, entry = parse_module(text)
    kinds: Counter[str] = Counter()
    bytes_moved = 0.0
    by_op: Counter[str] = Counter()

    def walk(name: str, times: int) -> None:
        nonlocal bytes_moved
        instructions = computations.get(name, [])
        shapes = {i.name: i.shape for i in instructions}
        for ins in instructions:
            if ins.opcode == "while":
                trips = ins.trip_count() or 1
                for body in ins.called("body"):
                    walk(body, times * trips)
                for condition in ins.called("condition"):
                    walk(condition, times * (trips + 1))
            elif ins.opcode == "conditional":
                branches = ins.branches()
                if branches:
                    largest = max(branches, key=lambda b: _kernel_count(computations, b))
                    walk(largest, times)
            elif ins.opcode == "call":
                for callee in ins.called("to_apply"):
                    walk(callee, times)
            elif ins.opcode not in _NOT_KERNELS:
                kinds[_kind(ins)] += times
                moved = _bytes_moved(ins, shapes, computations)
                bytes_moved += times * moved
                by_op[_short_op_name(ins.op_name() or ins.name)] += times * moved

    walk(entry, 1)
    reductions = [
        ins.op_name() or ins.name
        for instructions in computations.values()
        for ins in instructions
        if ins.opcode in _REDUCTIONS and _ARRAY.findall(ins.shape) and _ARRAY.findall(ins.shape)[0][0] in _SIXTEEN_BIT
    ]
    return ProgramStats(sum(kinds.values()), dict(sorted(kinds.items())), bytes_moved, reductions, by_op.most_common(15))


def _short_op_name(op_name: str) -> str:
    """An op name with layer numbers folded (layer_3 -> layer_*), so repeated layers add up."""
    return re.sub(r"layer_\d+", "layer_*", op_name)


def reduction_summary(op_names: list[str]) -> str:
    """The distinct 16-bit reductions, by op name with the jit/transpose wrappers and layer numbers
    folded away, each with its count."""
    counts = Counter(
        re.sub(r"^jit\([^)]*\)/(transpose\()?(jvp\()?(\w+\)+/)?", "", _short_op_name(name)) for name in op_names
    )
    return ", ".join(f"{name} ×{count}" for name, count in counts.most_common()) or "none"


def _bytes_moved(ins: Instruction, shapes: dict[str, str], computations: dict[str, list[Instruction]]) -> float:
    """HBM bytes a kernel reads and writes: its operands and result, except where it touches a
    slice only: a dynamic-slice reads its slice, a dynamic-update-slice (XLA's in-place update of a
    stacked buffer, as a scan's loop body does) reads and writes the update alone."""
    operand_bytes = [shape_bytes(shapes.get(o, "")) for o in ins.operands]
    if ins.opcode == "dynamic-slice":
        return 2 * shape_bytes(ins.shape)
    if ins.opcode == "dynamic-update-slice":
        return 2 * operand_bytes[1] if len(operand_bytes) > 1 else shape_bytes(ins.shape)
    fused = computations.get(next(iter(ins.called("calls")), ""), []) if ins.opcode in _FUSIONS else []
    if not fused:
        return shape_bytes(ins.shape) + sum(operand_bytes)
    inner = {i.name: i for i in fused}
    parameters = {int(m.group(1)): i.name for i in fused if (m := re.match(r"\s*(\d+)", i.arguments)) and i.opcode == "parameter"}
    users: dict[str, list[Instruction]] = {}
    for i in fused:
        for operand in i.operands:
            users.setdefault(operand, []).append(i)
    root = fused[-1]
    outputs = [inner[o] for o in root.operands] if root.opcode == "tuple" else [root]
    updated = {o.operands[0] for o in outputs if o.opcode == "dynamic-update-slice" and o.operands}
    written = sum(
        shape_bytes(inner[o.operands[1]].shape) if o.opcode == "dynamic-update-slice" and len(o.operands) > 1 else shape_bytes(o.shape)
        for o in outputs
    )
    read = 0.0
    for index, size in enumerate(operand_bytes):
        name = parameters.get(index)
        if name in updated:
            continue  # updated in place: only the written slice moves
        sliced = _sliced_read(name, users) if name else None
        read += size if sliced is None else sliced
    return read + written


def _sliced_read(name: str, users: dict[str, list[Instruction]]) -> float | None:
    """Bytes a fused parameter's uses read when every one of them is a (dynamic-)slice, seen
    through bitcasts (a stacked buffer viewed in another layout, then sliced); None otherwise."""
    uses = users.get(name, [])
    if not uses:
        return None
    total = 0.0
    for use in uses:
        if use.opcode in ("dynamic-slice", "slice") and use.operands[0] == name:
            total += shape_bytes(use.shape)
        elif use.opcode == "bitcast" and (inner := _sliced_read(use.name, users)) is not None:
            total += inner
        else:
            return None
    return total


def _kernel_count(computations: dict[str, list[Instruction]], name: str) -> int:
    return sum(1 for ins in computations.get(name, []) if ins.opcode not in _NOT_KERNELS)


def _kind(ins: Instruction) -> str:
    if ins.opcode == "custom-call":
        target = re.search(r'custom_call_target="([^"]*)"', ins.attributes)
        name = target.group(1) if target else "?"
        return "gemm" if "matmul" in name or "gemm" in name.lower() else f"custom-call:{name}"
    if ins.opcode in _FUSIONS:
        kind = re.search(r"kind=(k\w+)", ins.attributes)
        config = re.search(r'"fusion_backend_config"\s*:\s*\{\s*"kind"\s*:\s*"([^"]+)"', ins.attributes)
        if config and ("gemm" in config.group(1) or "triton" in config.group(1) or "cublas" in config.group(1)):
            return "gemm"
        return f"fusion:{kind.group(1) if kind else '?'}"
    return ins.opcode
