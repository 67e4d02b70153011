"""The engine on its own thread, with an asyncio face for the HTTP handlers.

The engine loop runs in one background thread: before every step it applies the requests added
and aborted since the last one (so a client that disconnects has its blocks released before the
next step), runs `LLMEngine.step()` and hands each request's output to the asyncio queue of the
handler waiting for it. The model's forward releases the GIL, so the event loop keeps serving
HTTP while a step runs.

Admission control: at most `max_waiting` requests may wait for a place in the batch; past that
`add` raises QueueFull (the server's 429). After `drain()` (SIGTERM) it raises Draining
(503) while the requests already in flight run to completion. An exception inside a step fails
the requests in flight with that error and the loop goes on.
"""

from __future__ import annotations

import asyncio
import logging
import threading

from dsv3.infer.engine import LLMEngine, RequestOutput
from dsv3.infer.sampling import SamplingParams

__all__ = ["AsyncEngine", "RequestStream", "QueueFull", "Draining", "EngineFailed"]

log = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """Too many requests wait already; retry after `retry_after` seconds."""

    def __init__(self, waiting: int, retry_after: int) -> None:
        super().__init__(f"the queue is full ({waiting} requests waiting); retry later")
        self.retry_after = retry_after


class Draining(RuntimeError):
    """The server is shutting down: it finishes what it has and takes nothing new."""


class EngineFailed(RuntimeError):
    """A step raised while this request was in flight."""


class RequestStream:
    """One request's outputs, after every step that advanced it; the last one is finished.
    `close()` before the end (a client that went away) aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str) -> None:
        self.engine, self.request_id = engine, request_id
        self.queue: asyncio.Queue = asyncio.Queue()
        self.done = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.done:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self.done = True
            self.engine._forget(self.request_id)
            raise item
        if item.finished:
            self.done = True
            self.engine._forget(self.request_id)
        return item

    def close(self) -> None:
        if not self.done:
            self.done = True
            self.engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, max_waiting: int = 512) -> None:
        self.engine, self.max_waiting = engine, max_waiting
        self.draining = False
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._adds: list[tuple[str, list[int], SamplingParams, bool]] = []  # ..., final_only
        self._aborts: list[str] = []
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="dsv3-engine", daemon=True)

    # --- lifecycle -----------------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def drain(self) -> None:
        """Stop taking requests; those in flight continue."""
        self.draining = True

    def stop(self) -> None:
        """Abort whatever is left and end the engine thread."""
        self._stopping = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    @property
    def num_waiting(self) -> int:
        return len(self._adds) + self.engine.num_waiting

    # --- requests --------------------------------------------------------------------------------
    def add(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, *, final_only: bool = False
    ) -> RequestStream:
        """Queue a request now (QueueFull, Draining or the engine's RequestError are raised here,
        before any response is sent); iterate the stream for its outputs (`final_only`: just the
        finished one, for a response that is not streamed)."""
        if self.draining:
            raise Draining("the server is shutting down")
        if self.num_waiting >= self.max_waiting:
            raise QueueFull(self.num_waiting, retry_after=1)
        self.engine.check(prompt_ids, params)
        stream = RequestStream(self, request_id)
        with self._lock:
            self._streams[request_id] = (asyncio.get_running_loop(), stream.queue)
            self._adds.append((request_id, prompt_ids, params, final_only))
        self._wake.set()
        return stream

    def abort(self, request_id: str) -> None:
        """Drop a request: the engine releases its blocks before its next step."""
        with self._lock:
            self._streams.pop(request_id, None)
            self._aborts.append(request_id)
        self._wake.set()

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)

    # --- the engine thread -------------------------------------------------------------------------
    def _deliver(self, request_id: str, item: RequestOutput | BaseException) -> None:
        with self._lock:
            target = self._streams.get(request_id)
        if target is not None:
            loop, queue = target
            loop.call_soon_threadsafe(queue.put_nowait, item)

    def _loop(self) -> None:
        engine = self.engine
        while True:
            self._wake.clear()
            with self._lock:
                adds, self._adds = self._adds, []
                aborts, self._aborts = self._aborts, []
            for request_id in aborts:
                engine.abort_request(request_id)
            for request_id, prompt_ids, params, final_only in adds:
                if request_id in aborts:
                    continue
                try:
                    engine.add_request(request_id, prompt_ids, params, final_only=final_only)
                except Exception as err:  # a request the engine refuses fails alone
                    self._deliver(request_id, err)
            if self._stopping:
                for request_id in list(engine.requests):
                    engine.abort_request(request_id)
                    self._deliver(request_id, Draining("the server stopped"))
                return
            if not engine.has_unfinished_requests():
                self._wake.wait(timeout=1.0)
                continue
            try:
                outputs = engine.step()
            except Exception as err:
                log.exception("engine step failed; failing the %d requests in flight", len(engine.requests))
                for request_id in list(engine.requests):
                    engine.abort_request(request_id)
                    self._deliver(request_id, EngineFailed(f"the engine failed: {err}"))
                continue
            for out in outputs:
                self._deliver(out.request_id, out)
