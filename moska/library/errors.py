"""Typed errors of the shared KV library. Every message says what to do next.

Messages name the library (and a file by its name inside the library), never a path on
the machine that holds the store: the server returns them to clients as they are.
"""

from __future__ import annotations

import os


class LibraryError(ValueError):
    """Base class of every library error (a ValueError: it is about user input)."""


class InvalidLibraryNameError(LibraryError):
    def __init__(self, name: object) -> None:
        super().__init__(
            f"invalid library name {name!r}: use 1-64 characters from letters, digits, "
            "'.', '_' and '-', starting with a letter or digit (no path separators)"
        )
        self.name = name


class LibraryNotFoundError(LibraryError):
    """``root`` is kept as an attribute for local callers (the CLI); it is not in the
    message."""

    def __init__(self, name: str, root: object = None) -> None:
        super().__init__(
            f"no library named {name!r}: list the libraries with `moska library ls` "
            "(GET /v1/libraries), or build it with `moska library build`"
        )
        self.name = name
        self.root = root


class LibraryExistsError(LibraryError):
    def __init__(self, name: str, root: object = None) -> None:
        super().__init__(
            f"a library named {name!r} already exists: choose another name, "
            "or delete it first with `moska library rm`"
        )
        self.name = name
        self.root = root


class LibraryBusyError(LibraryError):
    """Another build of the same name is running (in this process or another one)."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"a library named {name!r} is being built right now: wait for that build to "
            "finish (or cancel it), or choose another name"
        )
        self.name = name


class DocumentError(LibraryError):
    """A document could not be read (missing, unreadable, empty, malformed)."""


class FingerprintMismatchError(LibraryError):
    def __init__(self, name: str, built_for: str, loaded: str, fields: list[str]) -> None:
        super().__init__(
            f"library {name!r} was built for model [{built_for}] but the loaded model is "
            f"[{loaded}] (differs in: {', '.join(fields)}): serve the model it was built for, "
            "or rebuild the library with this model"
        )
        self.name = name
        self.fields = fields


class CorruptLibraryError(LibraryError):
    """A library file is missing, malformed or inconsistent with its manifest. ``file`` is
    a name inside the library's folder (an absolute path is cut to its last part)."""

    def __init__(self, name: str, file: str, reason: str) -> None:
        file = os.path.basename(file) if os.path.isabs(file) else file
        super().__init__(
            f"library {name!r} is damaged: {file}: {reason}; delete it with "
            "`moska library rm` and build it again"
        )
        self.name = name
        self.file = file
        self.reason = reason


class ChecksumMismatchError(CorruptLibraryError):
    """A file's sha256 differs from the one recorded in the manifest (truncated or altered)."""


class LibraryInUseError(LibraryError):
    """A delete (or rebuild) of a library that requests are reading, or that another
    process (a running server) has loaded. ``num_requests`` is None for another process."""

    def __init__(self, name: str, num_requests: int | None) -> None:
        if num_requests is None:
            what = "is loaded by another moska process (a running server)"
            todo = "delete it through that server (DELETE /v1/libraries/{name}) or stop it"
        else:
            what = f"is in use by {num_requests} running request(s)"
            todo = "retry when they have finished, or delete with ?wait=true to wait for them"
        super().__init__(f"library {name!r} {what}: {todo.replace('{name}', name)}")
        self.name = name
        self.num_requests = num_requests


class LibraryDeletingError(LibraryError):
    """A request named a library whose delete is waiting for its last users."""

    def __init__(self, name: str) -> None:
        super().__init__(
            f"library {name!r} is being deleted: it takes no new requests; build it again "
            "under this name once the delete has finished, or use another library"
        )
        self.name = name
