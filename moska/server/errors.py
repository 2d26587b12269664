"""OpenAI-style JSON errors: {"error": {"message", "type", "param", "code"}}.

Every failure the server answers goes through `error_response`, so clients (and the
official `openai` client's exception classes) see one shape for every status.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from moska.library.errors import CorruptLibraryError, LibraryExistsError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    501: "not_implemented_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error with an HTTP status that handlers raise and the app turns into JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None):
    err_type = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": err_type, "param": param, "code": code}}


def error_response(
    status: int,
    message: str,
    *,
    param: str | None = None,
    code: str | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status, headers=headers)


def from_engine_error(exc: Exception) -> APIError:
    """Map an exception raised by `engine.add_request` (or the library manager) to an
    APIError: '*NotFound*' / 'Unknown*' classes and KeyError are 404; a damaged library, a
    name taken or being built and a library in use are 409; other ValueErrors 400. No
    message carries a server path (library errors name the library; OSErrors lose theirs)."""
    name = type(exc).__name__
    if name == "RankFailedError":  # a tensor-parallel rank died: the engine is gone
        return APIError(503, str(exc), code="rank_failed")
    if isinstance(exc, CorruptLibraryError):  # ChecksumMismatchError too
        return APIError(409, str(exc), code="library_damaged")
    if isinstance(exc, LibraryExistsError):
        return APIError(409, str(exc), code="library_exists")
    if name in ("LibraryInUseError", "LibraryBusyError", "LibraryDeletingError"):
        return APIError(409, str(exc), code=_snake(name))
    if "NotFound" in name or name.startswith("Unknown") or isinstance(exc, KeyError):
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
        return APIError(404, str(msg), code="not_found")
    if isinstance(exc, ValueError):
        return APIError(400, str(exc), code=_snake(name))
    if isinstance(exc, OSError):  # its text names server paths
        return APIError(500, f"internal error: {name}: {exc.strerror}", code="internal_error")
    return APIError(500, f"internal error: {name}: {exc}", code="internal_error")


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


def _validation_message(errors: list[dict[str, Any]]) -> tuple[str, str | None]:
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    param = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    msg = first.get("msg", "invalid value")
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(
            exc.status, exc.message, param=exc.param, code=exc.code, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(list(exc.errors()))
        return error_response(400, message, param=param, code="invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(exc.status_code, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return error_response(500, f"internal error: {type(exc).__name__}", code="internal_error")
