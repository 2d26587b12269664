"""Library management: build (a background job on the engine thread), list, show, delete.

Every call into `engine.libraries` runs on the engine thread, between steps, so a build or
delete never races a decode step that reads the library.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any

from fastapi import APIRouter, Response

from moska.server.errors import APIError, from_engine_error
from moska.server.protocol import (
    LIBRARY_NAME_RE,
    ErrorResponse,
    LibraryBuildRequest,
    LibraryDeleted,
    LibraryJob,
    LibraryList,
    LibraryObject,
)
from moska.server.state import ServerState, StateDep

router = APIRouter()
_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 404, 501, 503)
}
_MAX_JOBS = 1000  # finished jobs beyond this are forgotten, oldest first
_tasks: set[asyncio.Task] = set()  # keep background tasks alive until done


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


@router.post("/v1/libraries", status_code=202, response_model=LibraryJob, responses=_ERRORS)
async def build_library(
    body: LibraryBuildRequest, response: Response, state: StateDep
) -> LibraryJob:
    manager = _manager(state)
    _check_name(body.name)
    job = LibraryJob(
        id=f"libjob-{uuid.uuid4().hex}",
        name=body.name,
        status="queued",
        created=int(time.time()),
    )
    state.jobs[job.id] = job
    _forget_old_jobs(state)
    documents = [(d.name, d.text) for d in body.documents]

    def run() -> Any:
        job.status = "running"
        return manager.build(body.name, documents, body.chunk_size, body.mode)

    async def watch() -> None:
        try:
            info = await state.async_engine.call(run)
            job.library = to_object(info)
            job.status = "succeeded"
        except Exception as exc:  # noqa: BLE001 - reported through the job
            job.error = f"{type(exc).__name__}: {exc}"
            job.status = "failed"
        job.finished = int(time.time())

    task = asyncio.create_task(watch())
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)
    response.headers["Location"] = f"/v1/libraries/jobs/{job.id}"
    return job


def _forget_old_jobs(state: ServerState) -> None:
    done = [k for k, j in state.jobs.items() if j.status in ("succeeded", "failed")]
    for key in done[: max(0, len(state.jobs) - _MAX_JOBS)]:
        del state.jobs[key]


@router.get("/v1/libraries/jobs/{job_id}", response_model=LibraryJob, responses=_ERRORS)
async def get_job(job_id: str, state: StateDep) -> LibraryJob:
    job = state.jobs.get(job_id)
    if job is None:
        raise APIError(404, f"library job {job_id!r} not found", code="job_not_found")
    return job


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


@router.delete("/v1/libraries/{name}", response_model=LibraryDeleted, responses=_ERRORS)
async def delete_library(name: str, state: StateDep) -> LibraryDeleted:
    manager = _manager(state)
    _check_name(name)
    await _call(state, lambda: manager.delete(name))
    return LibraryDeleted(name=name)
