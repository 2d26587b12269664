"""OpenAI-compatible HTTP server: `create_app(engine, settings)`, `serve(...)`."""

from moska.server.app import create_app
from moska.server.serve import serve
from moska.server.settings import ServerSettings

__all__ = ["ServerSettings", "create_app", "serve"]
