"""The dispatcher in front of libseccomp's programs (sandbox/runtime/bpf.py): it decides as
libseccomp's whole program does, it is refused where it would not, and the kernel takes
what it builds (the policy's real syscalls under it: tests/unit/test_seccomp.py)."""

from __future__ import annotations

import errno
import random
from dataclasses import replace
from typing import Any

import pytest

from sandbox.runtime import bpf
from sandbox.runtime import seccomp as seccomp_mod
from sandbox.runtime.seccomp import (
    SeccompProfile,
    builtin_profile_path,
    compile_profile,
    load_profile,
)
from tests.unit.test_seccomp import MOBY_PROFILE, nr, syscall, value_in_child

NATIVE = int(seccomp_mod.seccomp.system_arch()) & 0xFFFFFFFF
I386 = 0x40000003          # AUDIT_ARCH_I386: another architecture
ALLOW = 0x7FFF0000
EPERM = 0x00050000 | errno.EPERM
EACCES = 0x00050000 | errno.EACCES


def compiled(profile: SeccompProfile, monkeypatch: pytest.MonkeyPatch,
             **kw: Any) -> tuple[bytes, bytes]:
    """The dispatched program and libseccomp's whole one, for the same profile."""
    dispatched = compile_profile(profile, **kw).bpf
    with monkeypatch.context() as m:
        m.setattr(seccomp_mod, "_dispatched", lambda *a: None)
        whole = compile_profile(profile, **kw).bpf
    return dispatched, whole


def cases() -> list[bpf.Case]:
    """Every number up to past any syscall, x32's, another architecture's, and the
    argument values the built-in and Docker's rules compare."""
    values = (0, 1, 2, 3, 4, 8, 10, 16, 17, 40, 0x5412, 0x541C, 0x80000000, 0xFFFFFFFF,
              0x7E020000, 0x10000, 2**64 - 1, 2**64 - 4, 1 << 32 | 0x5412,
              0xFFFFFFFF00000000 | 0x541C, 0x7E020000 | 0x11, 1 << 32 | 0x7E020000)
    out = [bpf.Case(n, NATIVE) for n in range(1100)]
    out += [bpf.Case(n, NATIVE) for n in (0x3FFFFFFF, 0x40000000, 0x40000027, 0xFFFFFFFF)]
    out += [bpf.Case(n, I386) for n in range(0, 450, 7)]
    for name in ("socket", "socketpair", "ioctl", "clone", "personality", "prlimit64",
                 "setpriority", "ioprio_set", "sched_setaffinity", "move_pages"):
        for i in range(6):
            for v in values:
                args = [0] * 6
                args[i] = v
                out.append(bpf.Case(nr(name), NATIVE, tuple(args)))
    return out


def assert_same_decisions(a: bytes, b: bytes) -> None:
    ca, cb = bpf.decode(a), bpf.decode(b)
    wrong = [c for c in cases() if bpf.run(ca, c) != bpf.run(cb, c)]
    assert not wrong, wrong[:5]


@pytest.mark.parametrize("own_process_only", [False, True])
def test_the_default_policy_is_dispatched_and_decides_as_libseccomp(
        monkeypatch: pytest.MonkeyPatch, own_process_only: bool) -> None:
    profile = load_profile(builtin_profile_path("default"))
    dispatched, whole = compiled(profile, monkeypatch, own_process_only=own_process_only)
    # What every exec's child saves: the kernel JIT-compiles each instruction at each load.
    assert bpf.length(dispatched) < 0.75 * bpf.length(whole)
    assert_same_decisions(dispatched, whole)


def test_dockers_profile_is_dispatched_and_decides_as_libseccomp(
        monkeypatch: pytest.MonkeyPatch) -> None:
    if not MOBY_PROFILE.is_file():
        pytest.skip(f"Docker's profile is not at {MOBY_PROFILE} (test data of the workspace)")
    # Its archMap adds i386 and x32 on x86_64, which keep libseccomp's whole program (see
    # test_a_profile_with_another_architecture_keeps_libseccomps_program): without them.
    native_only = replace(load_profile(MOBY_PROFILE), arch_map=(), architectures=())
    for caps in (frozenset(), frozenset({"CAP_SYS_ADMIN"})):
        dispatched, whole = compiled(native_only, monkeypatch, capabilities=caps)
        assert bpf.length(dispatched) < bpf.length(whole)
        assert_same_decisions(dispatched, whole)


def test_a_profile_with_another_architecture_keeps_libseccomps_program(
        monkeypatch: pytest.MonkeyPatch) -> None:
    raw = {"defaultAction": "SCMP_ACT_ERRNO", "architectures": ["SCMP_ARCH_X86"],
           "syscalls": [{"names": ["getpid", "read", "write"], "action": "SCMP_ACT_ALLOW"}]}
    profile = seccomp_mod._parse_profile(raw, "two-arches")
    dispatched, whole = compiled(profile, monkeypatch)
    assert dispatched == whole


def chain(actions: list[int], default: int) -> bytes:
    """A linear program: syscall n gets actions[n] (other architectures: EACCES)."""
    code = [bpf.insn(bpf.LD_W_ABS, 0, 0, 4), bpf.insn(bpf.JEQ_K, 1, 0, NATIVE),
            bpf.insn(bpf.RET_K, 0, 0, EACCES), bpf.insn(bpf.LD_W_ABS, 0, 0, 0)]
    for n, action in enumerate(actions):
        code += [bpf.insn(bpf.JEQ_K, 0, 1, n), bpf.insn(bpf.RET_K, 0, 0, action)]
    return b"".join([*code, bpf.insn(bpf.RET_K, 0, 0, default)])


def test_a_rest_that_would_decide_otherwise_is_refused() -> None:
    # socket (deferred) is allowed for every argument by the whole program; a rest that
    # denies it would change a decision the dispatcher does not make itself.
    whole = chain([ALLOW] * 100, EPERM)
    socket_only = chain([EPERM] * nr("socket") + [ALLOW], EPERM)
    deny_all = chain([], EPERM)
    args = [bpf.Case(nr("socket"), NATIVE, (v, 0, 0, 0, 0, 0)) for v in (1, 2, 40)]
    kept = bpf.dispatched(whole, socket_only, arch=NATIVE,
                          deferred=frozenset({nr("socket")}), newest=99, cases=args)
    assert kept is not None
    assert bpf.dispatched(whole, deny_all, arch=NATIVE, deferred=frozenset({nr("socket")}),
                          newest=99, cases=args) is None


def test_a_search_of_few_ranges_shares_one_return_per_action_and_loads() -> None:
    # Blocks of ten syscalls allowed, denied with EPERM, with EACCES in turn (the child's
    # own calls allowed): each range costs one comparison, each action one return.
    keep = {nr(n) for n in ("exit", "exit_group", "write", "getpid", "rt_sigreturn",
                            "close", "brk", "mmap", "munmap", "futex")}
    actions = [ALLOW if n in keep else (ALLOW, EPERM, EACCES)[n // 10 % 3] for n in range(450)]
    rest = chain([], EPERM)
    program = bpf.dispatched(chain(actions, EPERM), rest, arch=NATIVE, deferred=frozenset(),
                             newest=449, cases=[])
    assert program is not None
    ranges = 1 + sum(a != b for a, b in zip([*actions, EPERM], [*actions[1:], EPERM, EPERM],
                                            strict=True))
    assert bpf.length(program) == 6 + (ranges - 1) + 3 + bpf.length(rest)
    eperm = next(n for n in range(10, 450, 30) if n not in keep)
    eacces = next(n for n in range(20, 450, 30) if n not in keep)
    assert value_in_child(program, lambda: syscall("getpid")) > 0
    assert value_in_child(program, lambda: syscall(eperm, 0, 0, 0)) == -errno.EPERM
    assert value_in_child(program, lambda: syscall(eacces, 0, 0, 0)) == -errno.EACCES
    assert value_in_child(program, lambda: syscall(1000, 0, 0, 0)) == -errno.EPERM


def test_a_tree_of_many_ranges_takes_long_jumps_and_loads() -> None:
    # Every third syscall denied: ~300 ranges, whose tree's halves are more than an 8-bit
    # conditional jump spans. The child's own calls stay allowed.
    keep = {nr(n) for n in ("exit", "exit_group", "write", "getpid", "rt_sigreturn",
                            "close", "brk", "mmap", "munmap", "futex")}
    actions = [EPERM if n % 3 == 0 and n not in keep else ALLOW for n in range(450)]
    whole = chain(actions, EPERM)
    program = bpf.dispatched(whole, chain([], EPERM), arch=NATIVE, deferred=frozenset(),
                             newest=449, cases=[])
    assert program is not None
    assert any(op == bpf.JA and k > 255 for op, _, _, k in bpf.decode(program))
    # The kernel takes it, and it decides as the chain does.
    denied = next(n for n in range(240, 450, 3) if n not in keep)
    assert value_in_child(program, lambda: syscall("getpid")) > 0
    assert value_in_child(program, lambda: syscall(denied, 0, 0, 0)) == -errno.EPERM
    assert value_in_child(program, lambda: syscall(1000, 0, 0, 0)) == -errno.EPERM


def in_cubes(word: int, cubes: list[bpf.Cube]) -> bool:
    return any(word & m == v for m, v in cubes)


IOCTL_RULES = [(1 << b, (0x5410 ^ 1 << b) & 1 << b) for b in range(4, 32)] + [
    (0xF, v) for v in range(16) if v not in (0x2, 0xC)]


def test_the_complement_of_cubes_is_the_words_none_of_them_holds() -> None:
    # The default policy's ioctl rules (one per bit that differs from 0x5410, then the low
    # nibbles): all that is left is TIOCSTI and TIOCLINUX.
    assert bpf.complement(IOCTL_RULES, limit=8) == [(0xFFFFFFFF, 0x5412), (0xFFFFFFFF, 0x541C)]
    assert bpf.complement([(0, 0)], limit=8) == []            # a cube of every word
    assert bpf.complement([], limit=8) == [(0, 0)]            # no cube: every word is left
    assert bpf.complement([(1, 1)], limit=8) == [(1, 0)]
    # The words two one-bit cubes leave take one cube; the bits' other three, none.
    assert bpf.complement([(0x10, 0), (0x1, 1)], limit=8) == [(0x11, 0x10)]
    seven_points = [(0x7, v) for v in range(8) if v != 5]
    assert bpf.complement(seven_points, limit=8) == [(0x7, 5)]
    # More than the limit allows (the 16 odd-parity 5-bit words, no two of them neighbours,
    # take 16 cubes), or a search past its budget: none.
    even = [(0x1F, v) for v in range(32) if v.bit_count() % 2 == 0]
    assert len(bpf.complement(even, limit=16) or ()) == 16
    assert bpf.complement(even, limit=8) is None
    assert bpf.complement(IOCTL_RULES, limit=8, budget=10) is None
    # A word is in the complement exactly when no cube holds it: random sets of cubes that
    # fix bits among the low 12 and bit 31, checked on every word those bits make.
    rng = random.Random(7)
    for _ in range(40):
        cubes = [(m, rng.getrandbits(32) & m) for m in
                 (rng.getrandbits(12) & rng.getrandbits(12) | rng.getrandbits(1) << 31
                  for _ in range(rng.randint(1, 12)))]
        left = bpf.complement(cubes, limit=10_000, budget=1_000_000)
        assert left is not None
        for word in (w | top for w in range(4096) for top in (0, 1 << 31)):
            assert in_cubes(word, cubes) != in_cubes(word, left), (cubes, hex(word))


def ioctl_cost(profile: SeccompProfile, *, rules: bool) -> int:
    """Instructions of the profile as compiled, with ioctl's rules or ioctl allowed."""
    kept = [r for r in profile.syscalls if "ioctl" not in r.names or rules]
    if not rules:
        kept.append(replace(profile.syscalls[0], names=("ioctl",), action="SCMP_ACT_ALLOW",
                            args=()))
    return bpf.length(compile_profile(replace(profile, syscalls=tuple(kept))).bpf)


def test_ioctls_rules_cost_a_few_comparisons_not_one_per_rule() -> None:
    # libseccomp spends ~3 instructions on each of ioctl's 32 rules (~100 loaded per exec);
    # their two exceptions, tested on the low word, take a handful.
    profile = load_profile(builtin_profile_path("default"))
    assert ioctl_cost(profile, rules=True) - ioctl_cost(profile, rules=False) < 12


@pytest.mark.parametrize("wrong", [[(0xFFFFFFFF, 0x5413)], [(0xFFFF0000, 0x10000)]])
def test_a_word_decision_that_would_decide_otherwise_is_refused(
        monkeypatch: pytest.MonkeyPatch, wrong: list[bpf.Cube]) -> None:
    # Exceptions that hold words the rules allow (computed wrong): checked against
    # libseccomp's whole program at each of them, the program is refused, and libseccomp's
    # rest decides ioctl. (Exceptions that miss a word only complement's correctness
    # guards: tests above.)
    profile = load_profile(builtin_profile_path("default"))
    right = compile_profile(profile).bpf
    real = bpf.complement

    def complement(cubes: list[bpf.Cube], **kw: Any) -> list[bpf.Cube] | None:
        left = real(cubes, **kw)
        return wrong if left == [(0xFFFFFFFF, 0x5412), (0xFFFFFFFF, 0x541C)] else left

    monkeypatch.setattr(bpf, "complement", complement)
    dispatched, whole = compiled(profile, monkeypatch)
    assert bpf.length(dispatched) > bpf.length(right)
    assert_same_decisions(dispatched, whole)


def test_a_word_decision_of_many_rules_is_tested_as_the_rules(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # clone's one rule (no namespace flag) leaves seven cubes: tested as the rule instead.
    # The first 200 syscalls allowed besides: one range, where the dispatcher pays.
    names = [seccomp_mod.seccomp.resolve_syscall(NATIVE, n).decode() for n in range(200)
             if n not in (nr("clone"), nr("ioctl"))]
    raw = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [
        {"names": names, "action": "SCMP_ACT_ALLOW"},
        {"names": ["clone"], "action": "SCMP_ACT_ALLOW",
         "args": [{"index": 0, "value": 0x7E020000, "valueTwo": 0, "op": "SCMP_CMP_MASKED_EQ"}]},
        {"names": ["ioctl"], "action": "SCMP_ACT_ERRNO", "errnoRet": 13,
         "args": [{"index": 1, "value": 0xFFFFFFFF, "valueTwo": 0x5412,
                   "op": "SCMP_CMP_MASKED_EQ"}]}]}
    profile = seccomp_mod._parse_profile(raw, "words")
    dispatched, whole = compiled(profile, monkeypatch)
    assert_same_decisions(dispatched, whole)
    code = bpf.decode(dispatched)
    assert bpf.length(dispatched) < bpf.length(whole)
    # clone: its low word masked, then one comparison; ioctl: one comparison of its word.
    low = [i for i, c in enumerate(code) if c[0] == bpf.LD_W_ABS and c[3] in (0x10, 0x18)]
    assert [code[i + 1][::3] for i in low] == [(bpf.AND_K, 0x7E020000), (bpf.JEQ_K, 0x5412)]
    ioctl = lambda cmd: lambda: syscall("ioctl", 0, cmd, 0)  # noqa: E731
    assert value_in_child(dispatched, ioctl(1 << 32 | 0x5412)) == -errno.EACCES
    assert value_in_child(dispatched, ioctl(0x5413)) == -errno.EPERM


def test_the_interpreter_refuses_what_it_does_not_know() -> None:
    with pytest.raises(bpf.BPFError):
        bpf.run(bpf.decode(bpf.insn(0xC6, 0, 0, 0)), bpf.Case(0, NATIVE))
    with pytest.raises(bpf.BPFError):
        bpf.run(bpf.decode(bpf.insn(bpf.LD_W_ABS, 0, 0, 64)), bpf.Case(0, NATIVE))


def test_a_program_the_interpreter_cannot_follow_is_loaded_as_libseccomp_wrote_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    profile = load_profile(builtin_profile_path("default"))

    def unknown(code: bpf.Code, case: bpf.Case) -> int:
        raise bpf.BPFError("opcode 0x94")

    dispatched, whole = compiled(profile, monkeypatch)
    monkeypatch.setattr(bpf, "run", unknown)
    assert compile_profile(profile).bpf == whole != dispatched
