"""What `docker commit --change` takes: Dockerfile instructions that change the new image's
config (CMD, ENTRYPOINT, ENV, EXPOSE, LABEL, ONBUILD, STOPSIGNAL, USER, VOLUME, WORKDIR),
one per entry, applied in order to the base image's config."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from sandbox.errors import ImageError
from sandbox.images.instructions import CONFIG_INSTRUCTIONS, ConfigState, Instruction, parse

_ACCEPTED = ", ".join(sorted(CONFIG_INSTRUCTIONS))
# BuildKit's parser (a Go extension) holds the GIL, the event loop with it, for ~40 µs a
# call and ~2.5 µs a byte: these bounds keep a commit's parsing under ~0.2 s.
MAX_CHANGES = 256
MAX_CHANGE_BYTES = 16 << 10
MAX_CHANGES_BYTES = 64 << 10


def parse_changes(changes: Sequence[str], field: str = "changes") -> tuple[Instruction, ...]:
    """Each entry parsed as one instruction; errors name `field[i]` and say what it takes."""
    if isinstance(changes, str):
        raise ImageError(f"{field}: expected a list of instructions, such as "
                         "['CMD [\"sh\"]', 'ENV A=1'], not one string")
    if len(changes) > MAX_CHANGES:
        raise ImageError(f"{field}: {len(changes)} changes, over the {MAX_CHANGES} allowed: "
                         "join several ENV or LABEL pairs into one change")
    total = 0
    for i, text in enumerate(changes):  # all checked before any is parsed
        where = f"{field}[{i}]"
        if not isinstance(text, str) or not text.strip():
            raise ImageError(f"{where}: expected an instruction such as 'CMD [\"sh\"]' or "
                             f"'ENV KEY=value' (one of {_ACCEPTED})")
        size = len(text.encode("utf-8", "surrogatepass"))
        total += size
        if size > MAX_CHANGE_BYTES or total > MAX_CHANGES_BYTES:
            raise ImageError(f"{where}: the changes are too long ({size} bytes here, {total} "
                             f"so far; at most {MAX_CHANGE_BYTES} each, {MAX_CHANGES_BYTES} in "
                             "all): put large data in files of the image instead")
    out = []
    for i, text in enumerate(changes):
        where = f"{field}[{i}]"
        found = parse(text, where)
        if len(found) != 1:
            raise ImageError(f"{where}: holds {len(found)} instructions; give each its own "
                             "entry")
        if found[0].keyword not in CONFIG_INSTRUCTIONS:
            raise ImageError(f"{where}: {found[0].keyword} cannot be a commit change, which "
                             f"only sets the config: use one of {_ACCEPTED} (files change "
                             "in the container, or in a Dockerfile build)")
        out.append(found[0])
    return tuple(out)


def apply_changes(run: Mapping[str, Any] | None,
                  changes: Sequence[Instruction]) -> dict[str, Any]:
    """A base image's "config" object (left as it is) with `changes` applied in order."""
    state = ConfigState.of(run)
    for ins in changes:
        state.apply(ins)
    return state.run
