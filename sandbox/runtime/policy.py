"""Policies: a profile name resolved once into what runs need (the Profile and its compiled
seccomp program), kept by the runtime's registry and passed down from there (engine, pools,
containers, runs), so that nothing on a run's path looks a profile up by name again."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from sandbox.kept import Kept
from sandbox.runtime import seccomp
from sandbox.runtime.profiles import UNCONFINED, Limits, Profile, load_profile


@dataclass(frozen=True)
class RunLimits(Limits):
    """The limits of one run as its policy resolved them (Policy.limits): within the maxima,
    the defaults filled in. A run given these is not checked again."""


@dataclass(frozen=True)
class Policy:
    profile: Profile
    program: seccomp.SeccompProgram   # the ready BPF every exec child loads (none: unconfined)

    @property
    def name(self) -> str:
        return self.profile.name

    _resolved: Kept[Limits | None, RunLimits] = field(   # see limits
        default_factory=Kept, init=False, repr=False, compare=False)

    def limits(self, asked: Limits | None) -> RunLimits:
        """The limits of one run: what was asked, within the maxima, defaults for the rest
        (PolicyError naming the field above its maximum). A judge asks the same limits for
        every case, and most runs none: each ask is resolved once (~10-15 µs each time on
        a run's path), the last kept.KEPT of them kept; a refused one is not."""
        if isinstance(asked, RunLimits):
            return asked
        if (known := self._resolved.get(asked)) is not None:
            return known
        return self._resolved.keep(asked, self._resolve(asked))

    def _resolve(self, asked: Limits | None) -> RunLimits:
        resolved = self.profile.resolve(asked)
        return RunLimits(**{f.name: getattr(resolved, f.name) for f in fields(Limits)})


class PolicyRegistry:
    """The runtime's policies by profile name: the built-in profiles (policies/profiles/),
    loaded on first use, and those registered beside them (e.g. from the config)."""

    def __init__(self, *, own_process_only: bool) -> None:
        # Runs that share init's id (a single-id map) must not reach init's limits and
        # scheduling through the calls that name another process.
        self._own_process_only = own_process_only
        self._profiles: dict[str, Profile] = {}
        self._programs: dict[str, seccomp.SeccompProgram] = {}   # by seccomp policy name
        self._policies: dict[str, Policy] = {}

    def register(self, profile: Profile) -> None:
        """Add (or replace) a profile beside the built-in ones."""
        self._profiles[profile.name] = profile
        self._policies.pop(profile.name, None)

    def profile(self, name: str) -> Profile:
        """The profile `name` alone, its filter not compiled (PolicyError naming the known
        ones when there is none)."""
        if name not in self._profiles:
            self._profiles[name] = load_profile(name)
        return self._profiles[name]

    def get(self, name: str) -> Policy:
        """The policy `name`, resolved and compiled the first time it is asked for."""
        policy = self._policies.get(name)
        if policy is None:
            profile = self.profile(name)
            policy = self._policies[name] = Policy(profile, self._program(profile.seccomp))
        return policy

    def _program(self, name: str) -> seccomp.SeccompProgram:
        """Each seccomp policy is compiled once, whichever profiles name it."""
        if name not in self._programs:
            self._programs[name] = (
                seccomp.SeccompProgram(name, b"", ()) if name == UNCONFINED else
                seccomp.compile_profile(
                    seccomp.load_profile(seccomp.builtin_profile_path(name), name=name),
                    own_process_only=self._own_process_only))
        return self._programs[name]
