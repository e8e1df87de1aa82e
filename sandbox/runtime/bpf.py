"""Classic BPF for seccomp: an interpreter of the programs libseccomp writes, and the
dispatcher that puts most of a program's decisions in front of it (see seccomp.py).

Why a dispatcher: the kernel translates and JIT-compiles a filter each time a process
loads it, at ~0.3 µs per instruction here, and every run's child loads one. libseccomp
spends one comparison per syscall it names (520 instructions for the default policy:
~110-170 µs per exec on this VM). The syscalls a profile gives one action whatever their
arguments take a few dozen ranges of numbers; a binary search over those ranges decides
them, and only the rest (other architectures, x32, the syscalls with argument conditions)
goes on to a libseccomp program of their rules alone. A syscall whose rules test one
argument's low 32 bits against masks (ioctl's: everything but two commands) is decided by
a few comparisons of its exceptions (word_decisions) instead of libseccomp's one or more
per rule (~100 instructions for ioctl's 32 rules).

Nothing is decided here that libseccomp did not decide: each range's action is read off
libseccomp's whole program by running it, and the result is used only when it answers as
that program does on every case tried (every syscall number up to past the profile's
newest, the boundaries, each deferred call with arguments around its rules' values).
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

_INSN = struct.Struct("=HBBI")   # struct sock_filter
INSN_SIZE = _INSN.size
_ARGS = 6
_DATA_WORDS = 16            # struct seccomp_data: nr, arch, ip (2 words), 6 args (2 each)
X32_SYSCALL_BIT = 0x40000000
MAX_INSNS = 4096            # BPF_MAXINSNS
_STEPS = 100_000            # no loops in classic BPF; a bound all the same

# Opcodes (class | size/op | mode/source).
LD_W_ABS = 0x20
JA = 0x05
JEQ_K = 0x15
JGT_K = 0x25
JGE_K = 0x35
RET_K = 0x06
AND_K = 0x54
WORD = 0xFFFFFFFF
_LD_IMM, _LD_MEM, _LDX_IMM, _LDX_MEM = 0x00, 0x60, 0x01, 0x61
_ST, _STX, _TAX, _TXA, _RET_A = 0x02, 0x03, 0x07, 0x87, 0x16


class BPFError(ValueError):
    """A program this interpreter does not follow (an opcode libseccomp does not write)."""


@dataclass(frozen=True)
class Case:
    """What the kernel shows a filter of one syscall: its number, architecture, arguments."""

    nr: int
    arch: int
    args: tuple[int, ...] = (0,) * _ARGS

    def words(self) -> list[int]:
        w = [self.nr & 0xFFFFFFFF, self.arch & 0xFFFFFFFF, 0, 0]
        for a in self.args:
            w += [a & 0xFFFFFFFF, (a >> 32) & 0xFFFFFFFF]
        return w


def insn(code: int, jt: int, jf: int, k: int) -> bytes:
    return _INSN.pack(code, jt, jf, k & 0xFFFFFFFF)


def length(prog: bytes) -> int:
    return len(prog) // _INSN.size


Code = Sequence[tuple[int, int, int, int]]


def decode(prog: bytes) -> Code:
    return [_INSN.unpack_from(prog, i) for i in range(0, len(prog) - _INSN.size + 1, _INSN.size)]


def run(code: Code, case: Case) -> int:
    """The return value of a decoded program for `case`, as the kernel computes it."""
    data = case.words()
    a = x = 0
    mem = [0] * 16
    pc = 0
    for _ in range(_STEPS):
        if not 0 <= pc < len(code):
            raise BPFError(f"jump past the program's end at {pc}")
        op, jt, jf, k = code[pc]
        pc += 1
        cls = op & 0x07
        if op == LD_W_ABS:
            if k % 4 or k // 4 >= _DATA_WORDS:
                raise BPFError(f"load of seccomp_data offset {k}")
            a = data[k // 4]
        elif op == RET_K:
            return k
        elif op == _RET_A:
            return a
        elif op == JA:
            pc += k
        elif cls == 0x05:                      # conditional jumps
            src = x if op & 0x08 else k
            test = op & 0xF0
            if test == 0x10:
                taken = a == src
            elif test == 0x20:
                taken = a > src
            elif test == 0x30:
                taken = a >= src
            elif test == 0x40:
                taken = bool(a & src)
            else:
                raise BPFError(f"opcode {op:#x}")
            pc += jt if taken else jf
        elif cls == 0x04:                      # ALU
            a = _alu(op, a, x if op & 0x08 else k)
        elif op == _LD_IMM:
            a = k
        elif op == _LDX_IMM:
            x = k
        elif op == _LD_MEM:
            a = mem[k & 15]
        elif op == _LDX_MEM:
            x = mem[k & 15]
        elif op == _ST:
            mem[k & 15] = a
        elif op == _STX:
            mem[k & 15] = x
        elif op == _TAX:
            x = a
        elif op == _TXA:
            a = x
        else:
            raise BPFError(f"opcode {op:#x}")
    raise BPFError("the program does not return")


def _alu(op: int, a: int, v: int) -> int:
    what = op & 0xF0
    if what == 0x00:
        r = a + v
    elif what == 0x10:
        r = a - v
    elif what == 0x20:
        r = a * v
    elif what == 0x40:
        r = a | v
    elif what == 0x50:
        r = a & v
    elif what == 0x60:
        r = a << v if v < 32 else 0
    elif what == 0x70:
        r = a >> v if v < 32 else 0
    elif what == 0x80:
        r = -a
    elif what == 0xA0:
        r = a ^ v
    else:
        raise BPFError(f"ALU opcode {op:#x}")
    return r & 0xFFFFFFFF


@dataclass(frozen=True)
class _Range:
    first: int
    action: int | None          # None: the rest of the program decides


def dispatched(whole: bytes, rest: bytes, *, arch: int, deferred: frozenset[int],
               newest: int, cases: Iterable[Case]) -> bytes | None:
    """`rest` behind a binary search over syscall numbers that answers, for `arch`, as
    `whole` does for each number up to 0x3fffffff not in `deferred`; the others, every
    other architecture and x32 numbers go on to `rest`. None when that is no shorter than
    `whole`, or would answer any of `cases` (besides those built here) differently."""
    reference = decode(whole)
    ranges: list[_Range] = []
    for nr in range(newest + 2):   # newest + 1 stands for every number above it
        action = None if nr in deferred else run(reference, Case(nr, arch))
        if not ranges or ranges[-1].action != action:
            ranges.append(_Range(nr, action))
    program = _prefix(ranges, arch) + rest
    if length(program) >= min(length(whole), MAX_INSNS):
        return None
    probes = [Case(nr, arch) for nr in range(newest + 64)]
    probes += [Case(nr, arch) for nr in (X32_SYSCALL_BIT - 1, X32_SYSCALL_BIT,
                                         X32_SYSCALL_BIT + 1, 0xFFFFFFFF)]
    code = decode(program)
    if any(run(code, c) != run(reference, c) for c in (*probes, *cases)):
        return None
    return program


def _prefix(ranges: Sequence[_Range], arch: int) -> bytes:
    """The search, jumping to the instruction after it (the rest) where it does not decide:
    load the arch, [jeq arch: skip] ja rest; load nr, [jge x32: ja rest]; then the tree."""
    body = _shared_returns(ranges) or _tree(ranges, 0, len(ranges) - 1)
    head: list[tuple[int, int, int, int | str]] = [
        (LD_W_ABS, 0, 0, 4), (JEQ_K, 1, 0, arch), (JA, 0, 0, "rest"),
        (LD_W_ABS, 0, 0, 0), (JGE_K, 0, 1, X32_SYSCALL_BIT), (JA, 0, 0, "rest")]
    code = head + body
    out = []
    for i, (op, jt, jf, k) in enumerate(code):
        out.append(insn(op, jt, jf, len(code) - i - 1 if k == "rest" else int(k)))
    return b"".join(out)


def _shared_returns(ranges: Sequence[_Range]) -> list[tuple[int, int, int, int | str]] | None:
    """The search as comparisons only, each jumping straight to the next comparison or to
    one return per action (after the comparisons; the rest after those): a range costs a
    comparison, not a comparison and a return of its own (311 -> 238 instructions for the
    default profile; the kernel converts and JIT-compiles each at every load). None when a
    jump would be longer than a conditional jump's 8-bit offset reaches, or for one range."""
    if len(ranges) < 2:
        return None
    actions = sorted({r.action for r in ranges if r.action is not None})
    nodes: list[tuple[int, tuple[str, int], tuple[str, int]]] = []

    def build(lo: int, hi: int) -> tuple[str, int]:
        """A search of ranges[lo..hi]: where it starts (a comparison, a return or the rest)."""
        if lo == hi:
            action = ranges[lo].action
            return ("rest", 0) if action is None else ("return", actions.index(action))
        i = len(nodes)
        nodes.append((0, ("rest", 0), ("rest", 0)))   # its place, before its subtrees'
        mid = (lo + hi + 1) // 2
        below, above = build(lo, mid - 1), build(mid, hi)
        nodes[i] = (ranges[mid].first, below, above)
        return ("node", i)

    build(0, len(ranges) - 1)

    def at(target: tuple[str, int]) -> int:
        kind, n = target
        return n if kind == "node" else len(nodes) + (n if kind == "return" else len(actions))

    code: list[tuple[int, int, int, int | str]] = []
    for i, (first, below, above) in enumerate(nodes):
        jt, jf = at(above) - i - 1, at(below) - i - 1
        if max(jt, jf) > 255:
            return None
        code.append((JGE_K, jt, jf, first))
    return code + [(RET_K, 0, 0, action) for action in actions]


def _tree(ranges: Sequence[_Range], lo: int, hi: int) -> list[tuple[int, int, int, int | str]]:
    if lo == hi:
        action = ranges[lo].action
        return [(JA, 0, 0, "rest")] if action is None else [(RET_K, 0, 0, action)]
    mid = (lo + hi + 1) // 2
    left, right = _tree(ranges, lo, mid - 1), _tree(ranges, mid, hi)
    if len(left) <= 255:   # a conditional jump's offsets are 8 bits
        return [(JGE_K, len(left), 0, ranges[mid].first), *left, *right]
    return [(JGE_K, 0, 1, ranges[mid].first), (JA, 0, 0, len(left)), *left, *right]


Cube = tuple[int, int]      # (mask, value): the 32-bit words w with w & mask == value


def complement(cubes: Iterable[Cube], *, limit: int, budget: int = 4096) -> list[Cube] | None:
    """The 32-bit words no cube holds, as at most `limit` disjoint cubes (Shannon expansion
    on the bits the cubes fix); None when they take more, or the search more than `budget`
    steps."""
    out: list[Cube] = []
    steps = 0

    def split(mask: int, value: int, live: list[Cube]) -> bool:
        nonlocal steps
        steps += 1
        if steps > budget:
            return False
        if any(m & ~mask == 0 for m, _ in live):
            return True                     # a cube holds every word left here
        if not live:
            out.append((mask, value))
            return len(out) <= limit
        free = 0
        for m, _ in live:
            free |= m & ~mask
        bit = 1 << (free.bit_length() - 1)
        for v in (value, value | bit):
            if not split(mask | bit, v, [(m, c) for m, c in live if (c ^ v) & m & bit == 0]):
                return False
        return True

    return out if split(0, 0, [(m & WORD, v & m & WORD) for m, v in cubes]) else None


@dataclass(frozen=True)
class WordDecision:
    """A syscall that one argument's low 32 bits decide: `action` when the word is in one
    of `cubes`, else `otherwise`."""

    nr: int
    index: int
    cubes: tuple[Cube, ...]
    action: int
    otherwise: int


def _low_word_offset(index: int) -> int:
    """Where seccomp_data holds argument `index`'s low 32 bits (args are native u64s)."""
    return 16 + 8 * index + (4 if sys.byteorder == "big" else 0)


def word_decisions(arch: int, decisions: Sequence[WordDecision]) -> bytes:
    """Instructions put in front of a rest program: each of `decisions` for `arch`; every
    other syscall, architecture and x32 number falls through to the rest."""
    blocks = []
    for d in decisions:
        body: list[tuple[int, int, int, int]] = []
        loaded = False
        for mask, value in d.cubes:
            if not loaded:
                body.append((LD_W_ABS, 0, 0, _low_word_offset(d.index)))
            loaded = mask == WORD
            if not loaded:
                body.append((AND_K, 0, 0, mask))
            body.append((JEQ_K, -1, 0, value))      # -1: to the block's return of action
        body += [(RET_K, 0, 0, d.otherwise), (RET_K, 0, 0, d.action)]
        last = len(body) - 1
        code = [(op, last - i - 1 if jt == -1 else jt, jf, k)
                for i, (op, jt, jf, k) in enumerate(body)]
        if len(code) > 255:
            raise BPFError(f"syscall {d.nr}: {len(d.cubes)} cubes outreach a jump")
        blocks.append([(JEQ_K, 0, len(code), d.nr), *code])   # another number: skip it
    code = [(LD_W_ABS, 0, 0, 0), *(c for block in blocks for c in block)]
    if len(code) > 255:
        raise BPFError(f"{len(decisions)} word decisions outreach a jump")
    head = [(LD_W_ABS, 0, 0, 4), (JEQ_K, 0, len(code), arch)]
    return b"".join(insn(*c) for c in (*head, *code))
