"""One background thread that calls `Engine.step()` while there is work: what a server runs.

    loop = EngineLoop(engine)
    stream = loop.submit(Request(ids, 64))      # from any thread; joins the next step
    for out in stream:                          # RequestOutputs as the steps make them
        print(out.new_tokens)
    loop.abort(stream)                          # e.g. the client went away: its blocks go back
    loop.close()                                # the model gets its own attention back

Only the loop's thread touches the engine: `submit` and `abort` hand their work over through a
queue, so a request arriving mid-step waits for that step to end, never for the batch.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future

from permkv.cache import paged_attention
from permkv.engine.engine import Engine
from permkv.engine.sequence import Request, RequestOutput, Result

_CLOSED = object()  # the stream ends without a result (aborted)


class Stream:
    """What one submitted request gives back: an iterator of `RequestOutput`s, the last one finished."""

    def __init__(self, request: Request):
        self.request = request
        self.id: int | None = None  # the engine's request id, once the loop added it
        self.aborted = False
        self.result: Result | None = None
        self._queue: queue.SimpleQueue = queue.SimpleQueue()

    def put(self, item) -> None:
        self._queue.put(item)

    def get(self, timeout: float | None = None) -> RequestOutput | None:
        """The next output (blocking); None once the stream ended. Raises what failed the request."""
        item = self._queue.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        if item is _CLOSED:
            self._queue.put(_CLOSED)  # later calls see the end too
            return None
        if item.finished:
            self.result = item.result
            self._queue.put(_CLOSED)
        return item

    def __iter__(self) -> Iterator[RequestOutput]:
        while (out := self.get()) is not None:
            yield out

    def wait(self) -> Result:
        """Block until the request finished; its result."""
        for _ in self:
            pass
        if self.result is None:
            raise RuntimeError(f"request {self.id} was aborted")
        return self.result


class EngineLoop:
    """Drives `engine.step()` in one daemon thread; `submit` / `abort` from any thread."""

    def __init__(self, engine: Engine):
        self.engine = engine
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[int, Stream] = {}
        self.error: BaseException | None = None  # the last step failure (every request then in flight got it)
        self._thread = threading.Thread(target=self._run, name="permkv-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, request: Request) -> Stream:
        """Queue `request` for the next step. Raises ValueError now if it could never run."""
        self.engine.check(request)
        stream = Stream(request)
        self._inbox.put(("add", stream, lambda e: e.add_request(request)))
        return stream

    def submit_context(self, ids: list[int], ratio: float = 1.0) -> Stream:
        """Queue a context to read and compress (`Engine.add_context`); the stream finishes when it is ready."""
        self.engine.check(Request(list(ids), 1, ratio))
        stream = Stream(Request(list(ids), 1, ratio))
        self._inbox.put(("add", stream, lambda e: e.add_context(ids, ratio)))
        return stream

    def call(self, fn: Callable[[Engine], object]) -> object:
        """Run `fn(engine)` in the loop's thread between two steps; its result (or what it raised)."""
        done: Future = Future()
        self._inbox.put(("call", done, fn))
        return done.result()

    def abort(self, stream: Stream) -> None:
        """Stop the request of `stream` (its blocks go back to the pool); its iterator ends."""
        stream.aborted = True
        self._inbox.put(("abort", stream, None))

    def close(self) -> None:
        """Stop the loop (requests in flight are aborted) and give the model back its own attention."""
        if self.alive:
            self._inbox.put(("close", None, None))
            self._thread.join()

    def _run(self) -> None:
        with paged_attention(self.engine.model):  # the engine owns the model while the loop runs
            self._serve()

    def _serve(self) -> None:
        while True:
            if not self._take(block=not self.engine.has_unfinished()):
                for rid, stream in list(self._streams.items()):
                    self.engine.abort(rid)
                    stream.put(_CLOSED)
                self._streams.clear()
                return
            if not self.engine.has_unfinished():
                continue
            try:
                outputs = self.engine.step()
            except Exception as err:  # every request in flight gets the error; the loop goes on
                self.error = err
                for rid, stream in list(self._streams.items()):
                    self.engine.abort(rid)
                    stream.put(err)
                self._streams.clear()
                continue
            for out in outputs:
                stream = self._streams.get(out.id)
                if stream is None:
                    continue
                stream.put(out)
                if out.finished:
                    del self._streams[out.id]

    def _take(self, block: bool) -> bool:
        """Apply queued submissions and aborts (waiting for one when `block`); False once asked to close."""
        while True:
            try:
                kind, stream, fn = self._inbox.get(block=block)
            except queue.Empty:
                return True
            block = False
            if kind == "close":
                return False
            if kind == "call":
                try:
                    stream.set_result(fn(self.engine))
                except Exception as err:  # the caller gets it
                    stream.set_exception(err)
            elif kind == "add" and not stream.aborted:
                try:
                    stream.id = fn(self.engine)
                except ValueError as err:
                    stream.put(err)
                    continue
                self._streams[stream.id] = stream
            elif kind == "abort" and stream.id is not None and stream.id in self._streams:
                self.engine.abort(stream.id)
                del self._streams[stream.id]
                stream.put(_CLOSED)
            elif kind == "abort":
                stream.put(_CLOSED)
