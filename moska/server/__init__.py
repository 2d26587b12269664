"""OpenAI-compatible HTTP server: `create_app(engine, settings)`, `serve(...)`."""

from moska.server.serve import serve  # light: serve() imports FastAPI and the engine inside
from moska.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "serve"]


def __getattr__(name: str):
    # create_app is imported on first use: `moska serve` binds its port and checks its flags
    # before it pays for FastAPI, the engine and torch (a busy port fails at once).
    if name == "create_app":
        from moska.server.app import create_app

        return create_app
    raise AttributeError(name)
