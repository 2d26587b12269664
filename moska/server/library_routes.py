"""Library management: build (a job of the build worker), list, show, delete.

Builds run on the build worker's threads (`server/build_worker.py`), beside the engine:
a build only writes its own KV pools, and the manager registers the finished library under
its lock. Every other call into `engine.libraries` runs on the engine thread, between
steps, so a delete never races a decode step that reads the library.
"""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from fastapi import APIRouter, Query, Response

from moska.server.build_worker import BuildJob, BuildQueueFullError, BuildWorker
from moska.server.errors import APIError, from_engine_error
from moska.server.library_protocol import (
    LibraryBuildRequest,
    LibraryDeleted,
    LibraryJob,
    LibraryList,
    LibraryObject,
)
from moska.server.protocol import LIBRARY_NAME_RE, ErrorResponse
from moska.server.state import ServerState, StateDep

router = APIRouter()
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 501, 503)
}


def _manager(state: ServerState) -> Any:
    manager = getattr(state.engine, "libraries", None)
    if manager is None:
        raise APIError(501, "this engine has no library manager", code="not_implemented")
    return manager


def _check_name(name: str) -> None:
    if not LIBRARY_NAME_RE.match(name):
        raise APIError(
            400,
            f"invalid library name {name!r}: use 1-64 characters of letters, digits, "
            "'.', '_' and '-', starting with a letter or digit",
            param="name",
            code="invalid_library_name",
        )


def to_object(info: Any) -> LibraryObject:
    if dataclasses.is_dataclass(info) and not isinstance(info, type):
        data = dataclasses.asdict(info)
    elif isinstance(info, dict):
        data = dict(info)
    else:
        data = dict(vars(info))
    data.pop("object", None)
    data.pop("path", None)  # the server's file system is none of the client's business
    if "model" not in data:
        for key in ("model_fingerprint", "fingerprint"):
            if key in data:
                data["model"] = str(data[key])
                break
    return LibraryObject(**data)


async def _call(state: ServerState, fn) -> Any:
    try:
        return await state.async_engine.call(fn)
    except APIError:
        raise
    except Exception as exc:
        raise from_engine_error(exc) from exc


def _builds(state: ServerState) -> BuildWorker:
    _manager(state)
    assert state.builds is not None  # created with the app when the engine has a manager
    return state.builds


def to_job(job: BuildJob) -> LibraryJob:
    return LibraryJob(
        id=job.id,
        name=job.name,
        status=job.status.value,
        created=job.created,
        finished=job.finished,
        error=job.error,
        library=None if job.info is None else to_object(job.info),
        prefilled_tokens=job.prefilled_tokens,
        total_tokens=job.total_tokens,
    )


@router.post(
    "/v1/libraries",
    status_code=202,
    response_model=LibraryJob,
    responses={**_ERRORS, 409: {"model": ErrorResponse}, 429: {"model": ErrorResponse}},
)
async def build_library(
    body: LibraryBuildRequest, response: Response, state: StateDep
) -> LibraryJob:
    """Queue a build; it runs beside the engine (streams go on) and is polled at
    `/v1/libraries/jobs/{id}`. A name that exists or is being built fails here, at once."""
    builds = _builds(state)
    _check_name(body.name)
    job = BuildJob(
        name=body.name,
        documents=[(d.name, d.text) for d in body.documents],
        chunk_size=body.chunk_size,
        mode=body.mode,
        kv_dtype=body.kv_dtype,
        routing_rank=body.routing_rank,
        boundary_repair=_check_repair(builds.manager, body),
    )
    _check_routing_rank(builds.manager, body.routing_rank)
    _check_kv_dtype(builds.manager, body.kv_dtype)
    await _check_fits_context(builds.manager, job)
    reserve = getattr(builds.manager, "reserve", None)
    if reserve is not None:
        try:
            job.reservation = await asyncio.to_thread(reserve, body.name)
        except Exception as exc:
            raise from_engine_error(exc) from exc
    try:
        builds.submit(job)
    except BuildQueueFullError as exc:
        if job.reservation is not None:
            job.reservation.release()
        raise APIError(
            429, str(exc), code="build_queue_full", headers={"Retry-After": "5"}
        ) from exc
    response.headers["Location"] = f"/v1/libraries/jobs/{job.id}"
    return to_job(job)


def _check_routing_rank(manager: Any, rank: int | None) -> None:
    """400 naming `routing_rank` at once for a rank the model's head_dim cannot hold (the
    build would fail after queueing)."""
    config = getattr(getattr(manager, "loaded_model", None), "config", None)
    head_dim = getattr(config, "head_dim", None)
    if rank is not None and head_dim is not None and rank > int(head_dim):
        raise APIError(
            400, f"routing_rank must be in [1, head_dim={head_dim}], got {rank}",
            param="routing_rank",
        )  # fmt: skip


def _check_kv_dtype(manager: Any, kv_dtype: str) -> None:
    """400 naming `kv_dtype` at once when the model cannot hold it (fp8_rotated: a
    power-of-two head_dim; library/fp8_rotated.check_build)."""
    from moska.library.errors import LibraryError
    from moska.library.fp8_rotated import build_format, check_build

    config = getattr(getattr(manager, "loaded_model", None), "config", None)
    head_dim = getattr(config, "head_dim", None)
    if head_dim is not None:
        try:
            check_build(build_format(kv_dtype)[1], int(head_dim))
        except LibraryError as e:
            raise APIError(400, str(e), param="kv_dtype") from None


def _check_repair(manager: Any, body: LibraryBuildRequest) -> tuple[int, int] | None:
    """The build's boundary repair, (tokens, layers) or None; a 400 naming the field at
    once for one alone, on a prefix library, or past the model's KV layers."""
    from moska.library.boundary_repair import BoundaryRepairError, check_repair

    tokens, layers = body.repair_tokens, body.repair_layers
    if tokens is None and layers is None:
        return None
    if tokens is None or layers is None:
        field = "repair_tokens" if tokens is None else "repair_layers"
        raise APIError(400, f"boundary repair needs both repair_tokens and repair_layers: "
                       f"add {field}", param=field)  # fmt: skip
    config = getattr(getattr(manager, "loaded_model", None), "config", None)
    kv_layers = next(
        (getattr(config, n) for n in ("num_kv_layers", "num_layers") if getattr(config, n, None)),
        None,
    )
    try:
        check_repair((tokens, layers), body.mode, None if kv_layers is None else int(kv_layers))
    except BoundaryRepairError as exc:
        raise APIError(400, str(exc), param=exc.field) from exc
    return tokens, layers


async def _check_fits_context(manager: Any, job: BuildJob) -> None:
    """400 naming the field at once for a library that cannot fit the model's context (a
    prefix library past it: build it `independent`), before a job is queued."""
    from moska.library.positions import LibraryTooLongError, check_documents_fit

    model = getattr(manager, "loaded_model", None)
    if model is None:
        return
    chunk_size = job.chunk_size  # None: the build's default, which scales with the library
    try:
        await asyncio.to_thread(check_documents_fit, model, job.documents, job.mode, chunk_size)
    except LibraryTooLongError as exc:
        raise APIError(400, str(exc), param=exc.field) from exc
    except ValueError:
        return  # other input errors (an empty document...): the build job reports them


def _job(state: ServerState, job_id: str) -> BuildJob:
    job = _builds(state).get(job_id)
    if job is None:
        raise APIError(404, f"library job {job_id!r} not found", code="job_not_found")
    return job


@router.get("/v1/libraries/jobs/{job_id}", response_model=LibraryJob, responses=_ERRORS)
async def get_job(job_id: str, state: StateDep) -> LibraryJob:
    return to_job(_job(state, job_id))


@router.post("/v1/libraries/jobs/{job_id}/cancel", response_model=LibraryJob, responses=_ERRORS)
async def cancel_job(job_id: str, state: StateDep) -> LibraryJob:
    """Cancel a build: a queued one is `cancelled` at once; a running one stops at its next
    prefill piece (poll the job for `cancelled`) and writes nothing. A finished job is
    returned as it is."""
    _job(state, job_id)  # 404 for an unknown id
    job = _builds(state).cancel(job_id)
    assert job is not None
    return to_job(job)


@router.delete("/v1/libraries/jobs/{job_id}", response_model=LibraryJob, responses=_ERRORS)
async def delete_job(job_id: str, state: StateDep) -> LibraryJob:
    """The same as `POST /v1/libraries/jobs/{id}/cancel`."""
    return await cancel_job(job_id, state)


@router.get("/v1/libraries", response_model=LibraryList, responses=_ERRORS)
async def list_libraries(state: StateDep) -> LibraryList:
    manager = _manager(state)
    infos = await _call(state, manager.list)
    return LibraryList(data=[to_object(i) for i in infos])


@router.get("/v1/libraries/{name}", response_model=LibraryObject, responses=_ERRORS)
async def get_library(name: str, state: StateDep) -> LibraryObject:
    manager = _manager(state)
    _check_name(name)
    return to_object(await _call(state, lambda: manager.info(name)))


_DELETE_ERRORS = {**_ERRORS, 409: {"model": ErrorResponse}}


@router.delete("/v1/libraries/{name}", response_model=LibraryDeleted, responses=_DELETE_ERRORS)
async def delete_library(
    name: str,
    state: StateDep,
    wait: bool = Query(False, description="wait for the requests reading it to finish"),
    timeout: float = Query(300.0, ge=0.0, le=3600.0, description="seconds to wait at most"),
) -> LibraryDeleted:
    """Delete a library. Requests in flight hold the build they read: while any does, the
    answer is 409 (naming how many), or with `wait=true` the delete waits for them (new
    requests for it are refused meanwhile) up to `timeout` seconds. Never disturbs them."""
    manager = _manager(state)
    _check_name(name)
    jobs = tuple(_builds(state).jobs.values())
    building = [j for j in jobs if j.name == name and not j.status.done]
    if building:  # not a library yet: a 404 "build it" would mislead
        job = building[0].id
        raise APIError(
            409,
            f"library {name!r} is being built (job {job}): cancel it with "
            f"POST /v1/libraries/jobs/{job}/cancel, or delete the library once it is built",
            code="library_busy_error",
        )
    wait_s = timeout if wait else 0.0
    try:  # off the engine thread: a waiting delete must not stop the steps it waits for
        await asyncio.to_thread(manager.delete, name, wait_s)
    except APIError:
        raise
    except Exception as exc:
        raise from_engine_error(exc) from exc
    return LibraryDeleted(name=name)
