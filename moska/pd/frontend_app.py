"""The front end's HTTP app: the OpenAI routes `FrontEnd` answers, /health (every role
has a live instance) and /pd/stats (requests, prefix hits, transfers, rejections)."""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from moska.pd.frontend import FrontEnd, error_response


def create_frontend_app(front: FrontEnd) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await front.start()
        try:
            yield
        finally:
            await front.stop()

    app = FastAPI(title="moska router", lifespan=lifespan)
    app.state.front = front

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await front.handle("completions", request)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await front.handle("chat", request)

    @app.get("/v1/models")
    async def models() -> Response:
        client = front.client
        assert client is not None  # the lifespan started the front end before any route
        for inst in [i for i in front.instances if i.alive]:
            try:
                r = await client.get(f"{inst.url}/v1/models", timeout=5.0)
                return Response(r.content, r.status_code, media_type="application/json")
            except httpx.HTTPError:
                continue
        return error_response(503, "no live instance; restart them")

    @app.get("/health")
    async def health() -> JSONResponse:
        roles = {i.role for i in front.instances if i.alive}
        ok = roles >= {"prefill", "decode"} if front.scheduler else "both" in roles
        body: dict[str, Any] = {"status": "ok" if ok else "unavailable"}
        body["instances"] = {i.name: {"role": i.role, "alive": i.alive} for i in front.instances}
        return JSONResponse(body, 200 if ok else 503)

    @app.get("/pd/stats")
    async def stats() -> JSONResponse:
        s = front.stats
        body = dict(vars(s))
        body["hit_rate"] = s.cached_tokens / s.prompt_tokens if s.prompt_tokens else None
        if s.staged:
            body["mean_prefill_stage_s"] = s.prefill_stage_s / s.staged
            body["mean_first_token_s"] = s.first_token_s / s.staged
        if front.scheduler is not None:
            body["rejected_by_scheduler"] = dict(front.scheduler.rejections)
            body["probes"] = front.scheduler.ttft.probes
            now = time.monotonic()
            body["stage_fits"] = {  # seconds = a + b * step-fit seconds, and the spread
                f"{stage}/{name}": [*fit.coef(now), fit.spread(now)]
                for (stage, name), fit in front.scheduler.ttft.fits.items()
            }
            body["slowdown"] = {k: front.scheduler.slowdown(k, now) for k in ("prefill", "decode")}
            body["tpot_factor"] = {
                i.name: front.scheduler.tpot_factor(i, now) for i in front.scheduler.live("decode")
            }
        return JSONResponse(body)

    return app
