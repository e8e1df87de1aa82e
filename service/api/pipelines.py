"""Pipelines through POST /v1/runs (and jobs): a run body with `processes` and `pipes` in
place of `cmd` (bodies.RunRequest), run by Engine.pipeline. runs.prepare_run and
runs.run_result hand such a body here; its answer is one JSON result (PIPELINE_RESULT), not a
stream."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from sandbox import PipelineOutcome, PipelineSpec, PipeSpec, PolicyError, RunSpec, check_pipeline
from service.api import State, image_of, platform_of, policy_of, ready, runbodies
from service.auth import Principal
from service.errors import ApiError, bad_request, blame
from service.netproxy import network_of
from service.streaming import OutputEncoder


@dataclass
class PreparedPipeline:
    """A pipeline to run: `start` runs it to its end."""

    start: Callable[[], Awaitable[PipelineOutcome]]
    spec: PipelineSpec
    encoding: str


def prepare(st: State, who: Principal, body: dict[str, Any]) -> PreparedPipeline:
    """A validated run body with `processes` as a pipeline of `who`'s, checked as a run's body
    is (image allowed, policy, limits, cached files) before anything runs. What a pipeline
    does not take (cmd, stdin, copy_out, repeat, tty...) its schema refuses: RunRequest."""
    eng = ready(st)
    who.allow_image(body["image"], "image")
    policy = policy_of(eng, body)
    processes = tuple(_process(st, who, body, i) for i in range(len(body["processes"])))
    spec = PipelineSpec(processes, tuple(PipeSpec(tuple(p["from"]), tuple(p["to"]),
                                                  p.get("capture_bytes", 0))
                                         for p in body.get("pipes", ())),
                        shared_container=body.get("container", "shared") == "shared")
    try:
        check_pipeline(spec)
    except PolicyError as e:
        # The engine names a pipe's ends src and dst; the API, from and to.
        message = str(e).replace(".src:", ".from:").replace(".dst:", ".to:")
        raise bad_request(message, message.split(":", 1)[0]) from None
    platform_of(body)  # a malformed platform is a 400 before anything runs
    network = network_of(st.config, who, body)

    async def start() -> PipelineOutcome:
        image = await image_of(st, who, body)
        # What only the image can tell (a process's user, cmd) is a processes[i] error.
        with blame("processes"):
            return await eng.pipeline(image, spec, tenant=who.tenant, policy=policy,
                                      network=network)

    return PreparedPipeline(start, spec, body.get("output_encoding", "utf-8"))


def _process(st: State, who: Principal, body: dict[str, Any], i: int) -> RunSpec:
    """Process i's run spec: its fields over the body's shared ones (env and limits key by
    key, files by path), with errors naming processes[i]."""
    own = body["processes"][i]
    merged: dict[str, Any] = {k: body[k] for k in ("cwd", "user") if k in body} | own
    for key in ("env", "limits"):
        if key in body or key in own:
            merged[key] = body.get(key, {}) | own.get(key, {})
    files = {f["path"]: f for f in body.get("files", ())} | {f["path"]: f
                                                            for f in own.get("files", ())}
    merged["files"] = list(files.values())
    try:
        spec, _ = runbodies.exec_spec(st, who, merged)
    except ApiError as e:
        where = f"processes[{i}]"
        field = f"{where}.{e.field}" if e.field else where
        raise ApiError(e.status, e.code, f"{where}.{e.message}", field, e.headers) from None
    return spec


async def result(st: State, who: Principal, job: PreparedPipeline) -> dict[str, Any]:
    """Run `job` in one of `who`'s admission slots (one for the whole pipeline), to its
    result as the API gives it."""
    async with st.admission.slot(who):
        outcome = await job.start()
    for p in outcome.processes:
        st.metrics.observe_run(str(p.result.status), p.result.setup_ms, p.result.wall_ms)
    # Each container's figures once (a shared container's processes show the same).
    for traffic in {id(p.network): p.network for p in outcome.processes
                    if p.network is not None}.values():
        st.metrics.observe_network(traffic)
    return result_json(outcome, job.spec, OutputEncoder(job.encoding))


def result_json(outcome: PipelineOutcome, spec: PipelineSpec,
                enc: OutputEncoder) -> dict[str, Any]:
    processes = [runbodies.result_json(o, p, enc)
                 for o, p in zip(outcome.processes, spec.processes, strict=True)]
    status = next((p["status"] for p in processes if p["status"] != "ok"), "ok")
    pipes = [{"captured": enc.whole(data) if pipe.capture_bytes else None,
              "truncated": truncated}
             for pipe, data, truncated in zip(spec.pipes, outcome.captured, outcome.truncated,
                                              strict=True)]
    image = outcome.processes[0].image if outcome.processes else ""
    return {"status": status, "processes": processes, "pipes": pipes, "image": image}
