"""A generation request's `library`: its name (or a composition's names) checked before
any work, then what is known of it, looked up once per request off the event loop (a load
elsewhere holds the manager's lock). Used by server/generate.py."""

from __future__ import annotations

import asyncio
from typing import Any

from moska.library.composition import CompositionError, library_names, summarize
from moska.server.errors import APIError, from_engine_error
from moska.server.protocol import LIBRARY_NAME_RE
from moska.server.state import ServerState


def check_library(state: ServerState, library: str | list[str] | None) -> None:
    """`library`: a name, or a list of names (a composition, library/composition.py)."""
    try:
        names = library_names(library)
    except CompositionError as exc:
        raise APIError(400, str(exc), param="library", code="invalid_composition") from exc
    for name in names:
        if not LIBRARY_NAME_RE.match(name):
            raise APIError(
                400,
                f"invalid library name {name!r}: use 1-64 characters of letters, digits, "
                "'.', '_' and '-', starting with a letter or digit",
                param="library",
                code="invalid_library_name",
            )
        if getattr(state.engine, "libraries", None) is None:
            raise APIError(
                404, f"library {name!r} not found", param="library", code="library_not_found"
            )


async def lookup_library(state: ServerState, name: str | list[str] | None) -> tuple[Any, bool]:
    """(what is known of library `name`, whether it is loaded): its loaded build when it is
    (no disk read), else its manifest's info; (None, True) without one. Looked up once per
    request, off the event loop (a load elsewhere holds the manager's lock). A missing
    library is a 404 here. A list of several names: their CompositionSummary, a 400 naming
    `library` when they do not compose."""
    if isinstance(name, list):
        if len(name) != 1:
            return await _lookup_composition(state, name)
        name = name[0]
    manager = getattr(state.engine, "libraries", None)
    if name is None or manager is None:
        return None, True

    def find() -> tuple[Any, bool]:
        loaded = not hasattr(manager, "loaded_names") or name in manager.loaded_names()
        return (manager.get(name) if loaded else manager.info(name)), loaded

    try:
        return await asyncio.to_thread(find)
    except Exception as exc:
        raise from_engine_error(exc) from exc


async def _lookup_composition(state: ServerState, names: list[str]) -> tuple[Any, bool]:
    parts, loaded = [], True
    for name in names:
        try:
            part, was_loaded = await lookup_library(state, name)
        except APIError as exc:
            exc.param = exc.param or "library"
            raise
        if part is None:  # no library manager: check_library answered already
            return None, True
        parts.append(part)
        loaded = loaded and was_loaded
    try:
        return summarize(parts), loaded
    except CompositionError as exc:
        raise APIError(400, str(exc), param="library", code="invalid_composition") from exc
