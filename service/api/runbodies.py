"""Run bodies and results: a validated run body as the engine's RunSpec (its files, stdin,
limits and terminal) and a run's outcome as the API's result. Runs, pipelines, batches and
container execs share them."""

from __future__ import annotations

import base64
import binascii
import os
from dataclasses import asdict
from typing import Any

import msgspec

from sandbox import CopiedOut, FileSpec, Limits, RunOutcome, RunSpec, TtySize
from service.api import State, ready
from service.api.files import about
from service.auth import Principal
from service.errors import bad_request, blame
from service.logs import current_request_id
from service.results import ENGINE_FIGURES, FIRST_RUN_FIGURES, engine_figures
from service.streaming import OutputEncoder


def b64(text: str, field: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{field}: not valid base64", field) from None


def _files(st: State, who: Principal, body: dict[str, Any]) -> tuple[FileSpec, ...]:
    """The body's files: contents given inline, or files of the caller's cache, bound
    read-only (no copy) unless the entry asks for a `copy`, which is read here.
    `limits.files_bytes` bounds the contents together (what one request holds in memory)."""
    caps = st.config.limits
    files = []
    total = 0
    if len(body.get("files", ())) > caps.files_count:
        raise bad_request(f"files: more than {caps.files_count} files (limits.files_count)",
                          "files")
    for i, f in enumerate(body.get("files", ())):
        mode = f.get("mode", 0o644)
        if "file_id" in f and not f.get("copy"):
            with about(f"files[{i}].file_id"):  # one lookup (and one use recorded)
                cached = ready(st).files.get(who.tenant, f["file_id"])
            files.append(FileSpec(f["path"], mode=mode, cached=cached))
            continue
        if "file_id" in f:
            content = _cached(st, who, f["file_id"], f"files[{i}].file_id",
                              caps.files_bytes - total)
        elif "content" in f:
            content = f["content"].encode()
        else:
            content = b64(f["content_base64"], f"files[{i}].content_base64")
        total += len(content)
        if total > caps.files_bytes:
            raise bad_request(f"files: over {caps.files_bytes} bytes in all "
                              "(limits.files_bytes); copy large files in with PUT "
                              "/v1/containers/{id}/files", f"files[{i}]")
        files.append(FileSpec(f["path"], content, mode))
    return tuple(files)


def _cached(st: State, who: Principal, file_id: str, field: str, room: int) -> bytes:
    """A copy of a file of the caller's cache, checked against the room left before it is
    read."""
    with about(field):  # one lookup (and one use recorded) per file
        f = ready(st).files.open(who.tenant, file_id)
    with f:
        size = os.fstat(f.fileno()).st_size
        if size > room:
            cap = st.config.limits.files_bytes
            raise bad_request(f"{field}: this cached file ({size} bytes) takes the run's "
                              f"files over {cap} bytes in all (limits.files_bytes); give "
                              "fewer or smaller files, bind it (leave out copy), or ask the "
                              "operator to raise it", field)
        return f.read()


def stdin_of(body: dict[str, Any]) -> bytes | None:
    """A validated run body's stdin (or a batch case's), its bytes."""
    if "stdin" in body:
        return body["stdin"].encode()
    if "stdin_base64" in body:
        return b64(body["stdin_base64"], "stdin_base64")
    return None


def exec_spec(st: State, who: Principal, body: dict[str, Any]) -> tuple[RunSpec, str]:
    """A validated run body as the engine's RunSpec, and the output encoding asked for."""
    stdin = stdin_of(body)
    limits = None
    if "limits" in body:
        with blame("limits"):
            limits = Limits.from_dict(body["limits"], "limits")
    # Each path once, in the order given: the result holds them by path.
    spec = RunSpec(cmd=body.get("cmd"), env=body.get("env"), cwd=body.get("cwd"), stdin=stdin,
                   files=_files(st, who, body), limits=limits, user=body.get("user"),
                   copy_out=tuple(dict.fromkeys(body.get("copy_out", ()))),
                   copy_out_cached=tuple(dict.fromkeys(body.get("copy_out_cached", ()))),
                   repeat=body.get("repeat", 1),
                   rerun_near_limit=body.get("rerun_near_limit", False), tty=tty_of(body))
    return spec, body.get("output_encoding", "utf-8")


def tty_of(body: dict[str, Any]) -> TtySize | None:
    """A validated body's terminal (`tty`, `tty_size`), or None."""
    if not body.get("tty"):
        if "tty_size" in body:
            raise bad_request("tty_size: only with tty: true", "tty_size")
        return None
    size = body.get("tty_size")
    return TtySize(size["rows"], size["cols"]) if size else TtySize()


def result_json(outcome: RunOutcome, spec: RunSpec, enc: OutputEncoder,
                output: bool = True) -> dict[str, Any]:
    """The API's result (service/results.py's RunResult); without stdout and stderr when
    not `output` (the exit event)."""
    result = outcome.result
    out: dict[str, Any] = dict(zip(ENGINE_FIGURES, engine_figures(result), strict=True))
    out.update(status=str(result.status), image=outcome.image, pool_hit=outcome.pool_hit,
               request_id=current_request_id())
    if output:
        out["stdout"] = enc.whole(result.stdout)
        out["stderr"] = enc.whole(result.stderr)
    if outcome.network is not None:
        out["network"] = asdict(outcome.network)
    return out | _copied_json(outcome.copied, spec, enc) | _timing_json(outcome)


def _timing_json(outcome: RunOutcome) -> dict[str, Any]:
    """`repeats` and `rerun`, each only when the run was repeated or rerun."""
    out: dict[str, Any] = {}
    if (rep := outcome.repeats) is not None:
        out["repeats"] = msgspec.to_builtins(rep)  # the engine's Repeats is the API's
    if (first := outcome.rerun) is not None:
        out["rerun"] = {"first": msgspec.to_builtins(
            {name: getattr(first, name) for name in FIRST_RUN_FIGURES})}
    return out


def _copied_json(copied: CopiedOut, spec: RunSpec, enc: OutputEncoder) -> dict[str, Any]:
    """copy_out's and copy_out_cached's results, each only when the run asked for it."""
    out: dict[str, Any] = {}
    if spec.copy_out:
        out["files"] = {path: enc.whole(data) for path, data in copied.files.items()}
    if spec.copy_out_cached:
        out["file_ids"] = {path: {"id": f.id, "size": f.size}
                           for path, f in copied.cached.items()}
    if spec.copy_out or spec.copy_out_cached:
        out["file_errors"] = dict(copied.errors)
    return out
