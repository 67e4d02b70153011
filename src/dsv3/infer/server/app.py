"""The OpenAI-compatible HTTP server: FastAPI routes over the AsyncEngine, run by uvicorn.

    POST /v1/completions        text or token-id prompts (one or several), SSE with "stream": true
    POST /v1/chat/completions   messages rendered with the tokenizer's chat template
    GET  /v1/models             the one model served
    POST /tokenize, /detokenize and GET /tokenizer_info (vLLM's: lm-eval's remote tokenizer uses them)
    GET  /health                200 while serving, 503 while draining
    GET  /metrics               Prometheus text (metrics.py)

Errors are OpenAI's shape, {"error": {"message", "type", "param", "code"}}: malformed JSON or a
bad field → 400 naming the field; an unknown model → 404; a full queue → 429 with Retry-After;
draining → 503; a failed step → 500 for the requests it carried. The server itself stays up.
A streaming client that disconnects has its request aborted at once (its cache blocks are released
before the next step); a non-streaming one is checked every 0.25 s. SIGTERM stops admitting,
lets the requests in flight finish, then exits (`serve`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dsv3.infer.engine import RequestError, RequestOutput
from dsv3.infer.server import protocol as api
from dsv3.infer.server.async_engine import AsyncEngine, Draining, EngineFailed, QueueFull, RequestStream
from dsv3.infer.server.metrics import CONTENT_TYPE, ServerMetrics
from dsv3.infer.tokenizer import TextTokenizer

__all__ = ["build_app", "serve", "APIError"]

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25


class APIError(Exception):
    def __init__(
        self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _api_error(err: Exception, prompt_field: str = "prompt") -> APIError:
    """The HTTP error for an exception raised while taking or running a request."""
    if isinstance(err, APIError):
        return err
    if isinstance(err, RequestError):
        field = prompt_field if err.field == "prompt" else err.field
        message = str(err) if err.field == field else f"{field}: {str(err).split(': ', 1)[1]}"
        return APIError(400, message, param=field)
    if isinstance(err, QueueFull):
        return APIError(
            429,
            str(err),
            "rate_limit_error",
            code="queue_full",
            headers={"Retry-After": str(err.retry_after)},
        )
    if isinstance(err, Draining):
        return APIError(503, str(err), "service_unavailable", code="draining")
    if isinstance(err, EngineFailed):
        return APIError(500, str(err), "server_error")
    log.exception("request failed")
    return APIError(500, f"internal error: {type(err).__name__}: {err}", "server_error")


def _validation_error(err: RequestValidationError) -> APIError:
    first = err.errors()[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    if first.get("type") == "json_invalid":
        return APIError(400, f"malformed JSON body: {first.get('ctx', {}).get('error', first['msg'])}")
    field = loc[0] if loc and loc[0] in ("prompt", "messages") else ".".join(loc)
    return APIError(400, f"{field or 'body'}: {first['msg']}", param=field or None)


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) from several streams as they come."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
        except Exception as err:
            await queue.put((i, err))
        await queue.put((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        live = len(tasks)
        while live:
            i, item = await queue.get()
            if item is None:
                live -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def _until_disconnected(request: Request) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_S)


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def build_app(engine: AsyncEngine, model_name: str, tokenizer: TextTokenizer) -> FastAPI:
    """The FastAPI app serving `engine` as `model_name`; the lifespan starts and stops its thread."""
    metrics = ServerMetrics(engine)
    max_model_len = engine.engine.config.max_model_len

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="dsv3", lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics

    @app.exception_handler(APIError)
    async def _on_api_error(request: Request, err: APIError) -> JSONResponse:
        return err.response()

    @app.exception_handler(RequestValidationError)
    async def _on_validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return _validation_error(err).response()

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(
                404,
                f"The model `{name}` does not exist (this server has `{model_name}`).",
                param="model",
                code="model_not_found",
            )

    def submit(body: api.CompletionRequest | api.ChatRequest, prefix: str) -> tuple[str, list[RequestStream]]:
        """Check a request and queue its prompts: (request id, one stream per prompt); errors name the
        field ("messages" for a chat's prompt)."""
        check_model(body.model)
        prompt_field = "messages" if isinstance(body, api.ChatRequest) else "prompt"
        request_id, streams = api.new_id(prefix), []
        try:
            body.check()
            params = api.sampling_params(body)
            for i, ids in enumerate(body.prompts(tokenizer)):
                streams.append(engine.add(f"{request_id}-{i}", ids, params, final_only=not body.stream))
        except Exception as err:
            for s in streams:
                s.close()
            raise _api_error(err, prompt_field) from None
        return request_id, streams

    async def collect(streams: list[RequestStream], request: Request) -> list[RequestOutput]:
        """Every stream's final output; aborts them all if the client goes away first."""
        finals: dict[int, RequestOutput] = {}

        async def run() -> None:
            async for i, out in _merge(streams):
                if out.finished:
                    finals[i] = out
                    metrics.observe(out)

        work, watch = asyncio.create_task(run()), asyncio.create_task(_until_disconnected(request))
        try:
            done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
            if work not in done:
                raise APIError(499, "client disconnected")
            work.result()
        except Exception as err:
            raise _api_error(err) from None
        finally:
            for task in (work, watch):
                task.cancel()
            for s in streams:
                s.close()
        return [finals[i] for i in range(len(streams))]

    async def stream_events(
        streams: list[RequestStream], n: int, chunk, final_usage: bool, after_prompt: bool = False,
        generated: bool = True,
    ) -> AsyncIterator[str]:
        """SSE: one chunk per choice and step (`chunk(index, out, completion, text, start, first)`),
        then [DONE]. `after_prompt`: a choice's first chunk waits for its first token (`echo`: the
        prompt's logprobs are complete by then)."""
        sent: dict[int, tuple[int, int]] = {}  # choice → (characters, tokens) already sent
        finals: dict[int, RequestOutput] = {}
        try:
            async for i, out in _merge(streams):
                for c in out.outputs:
                    index = i * n + c.index
                    if after_prompt and not c.token_ids and c.finish_reason is None:
                        continue
                    chars, toks = sent.get(index, (0, 0))
                    if len(c.text) > chars or c.finish_reason is not None or index not in sent:
                        yield _sse(chunk(index, out, c, c.text[chars:], toks, index not in sent))
                        sent[index] = (len(c.text), len(c.token_ids))
                if out.finished:
                    finals[i] = out
                    metrics.observe(out)
            if final_usage:
                yield _sse(
                    {
                        **chunk(None, None, None, "", 0, False),
                        "choices": [],
                        "usage": api.usage(list(finals.values()), generated),
                    }
                )
            yield _sse("[DONE]")
        except Exception as err:  # the status is sent already: the error goes in the stream
            yield _sse(_api_error(err).body())
        finally:
            for s in streams:
                s.close()

    # --- routes ------------------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        if engine.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        card = {
            "id": model_name,
            "object": "model",
            "created": api.created(),
            "owned_by": "dsv3",
            "root": model_name,
            "max_model_len": max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/tokenize")
    async def tokenize(body: api.TokenizeRequest) -> dict:
        check_model(body.model)
        try:
            ids = body.ids(tokenizer)
        except Exception as err:
            raise _api_error(err) from None
        return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}

    @app.post("/detokenize")
    async def detokenize(body: api.DetokenizeRequest) -> dict:
        check_model(body.model)
        try:
            return {"prompt": body.text(tokenizer, engine.engine.model.config.vocab_size)}
        except Exception as err:
            raise _api_error(err) from None

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict:
        return api.tokenizer_info(tokenizer, max_model_len)

    @app.post("/v1/completions")
    async def completions(body: api.CompletionRequest, request: Request) -> Response:
        request_id, streams = submit(body, "cmpl")
        head = {"id": request_id, "object": "text_completion", "created": api.created(), "model": model_name}
        echoed = body.echoed(tokenizer) if body.echo else None

        def choice(index: int, out: RequestOutput, c, text: str, start: int, first: bool) -> dict:
            """A choice's `text` (the completion's from token `start` on), after the prompt's with
            `echo` in the choice's first chunk (or its whole answer)."""
            if body.prompt_only:
                c, text = api.without_completion(c), ""
            logprobs = api.completion_logprobs(tokenizer, c, start, len(c.text) - len(text))
            if echoed is not None and first:
                text, logprobs = api.echoed_choice(tokenizer, echoed[index // body.n], out, text, logprobs,
                                                   body.logprobs or 0)  # fmt: skip
            answer = api.completion_choice(index, text, c, logprobs)
            if body.prompt_logprobs is not None:  # never streamed (`check`)
                answer["prompt_logprobs"] = api.vllm_prompt_logprobs(tokenizer, out, body.prompt_logprobs)
            return answer

        if body.stream:

            def chunk(index, out, c, text, start, first):
                return head if c is None else {**head, "choices": [choice(index, out, c, text, start, first)]}

            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                stream_events(streams, body.n, chunk, usage, after_prompt=body.echo,
                              generated=not body.prompt_only),  # fmt: skip
                media_type="text/event-stream",
            )
        outs = await collect(streams, request)
        choices = [
            choice(i * body.n + c.index, out, c, c.text, 0, True)
            for i, out in enumerate(outs)
            for c in out.outputs
        ]
        return JSONResponse({**head, "choices": choices, "usage": api.usage(outs, not body.prompt_only)})

    @app.post("/v1/chat/completions")
    async def chat(body: api.ChatRequest, request: Request) -> Response:
        request_id, streams = submit(body, "chatcmpl")
        head = {"id": request_id, "created": api.created(), "model": model_name}

        if body.stream:

            def chunk(index, out, c, text, start, first):  # noqa: ARG001
                if c is None:
                    return {**head, "object": "chat.completion.chunk"}
                delta = {"role": "assistant", "content": text} if first else {"content": text}
                choice = {
                    "index": index,
                    "delta": delta,
                    "logprobs": api.chat_logprobs(tokenizer, c, start),
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
                return {**head, "object": "chat.completion.chunk", "choices": [choice]}

            usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(
                stream_events(streams, body.n, chunk, usage), media_type="text/event-stream"
            )
        outs = await collect(streams, request)
        choices = [api.chat_choice(c.index, c, api.chat_logprobs(tokenizer, c, 0)) for c in outs[0].outputs]
        answer = {**head, "object": "chat.completion", "choices": choices, "usage": api.usage(outs)}
        if body.prompt_logprobs is not None:
            answer["prompt_logprobs"] = api.vllm_prompt_logprobs(tokenizer, outs[0], body.prompt_logprobs)
        return JSONResponse(answer)

    return app


class _DrainingServer(uvicorn.Server):
    """uvicorn, which on SIGTERM/SIGINT also stops the engine from taking new requests; uvicorn then
    closes the listening socket and waits for the requests in flight before shutting down."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig, frame) -> None:
        if not self.engine.draining:
            log.info("draining: %d requests in flight, no new ones", self.engine.in_flight)
        self.engine.drain()
        super().handle_exit(sig, frame)


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the app until SIGTERM/SIGINT, then drain."""
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False)
    _DrainingServer(config, app.state.engine).run()
