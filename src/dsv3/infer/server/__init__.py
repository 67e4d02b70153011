"""The OpenAI-compatible server: protocol (request and response JSON), async_engine (the engine on
its thread), metrics (Prometheus), app (FastAPI routes, uvicorn with SIGTERM drain)."""

from dsv3.infer.server.app import build_app, serve
from dsv3.infer.server.async_engine import AsyncEngine

__all__ = ["AsyncEngine", "build_app", "serve"]
