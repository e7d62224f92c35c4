"""Running one HTTP request's choices concurrently, and stopping them when the client goes away.

    choice 0: conductor.generate() ── pump task ──┐
    choice 1: conductor.generate() ── pump task ──┼─► queue ─► merge_streams() ─► (i, Delta)
    ...                                           ┘

Closing the merged stream (aclose, or cancelling the task that iterates it) cancels every pump, and
each pump closes its conductor generator: that is what aborts the request in the workers, so every
path out of a request must end in it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable
from typing import TypeVar

import anyio
from starlette.requests import Request

from splitserve.disagg.messages import Delta

T = TypeVar("T")

# Bound on waiting for the conductor to abort a request's generators; abort only sends messages.
CLOSE_TIMEOUT_S = 5.0
DISCONNECT_POLL_S = 0.2


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


async def merge_streams(streams: list[AsyncIterator[Delta]]) -> AsyncGenerator[tuple[int, Delta]]:
    """Yield (index of the stream, delta) as they arrive until every stream has ended. The first
    exception of any stream is raised here (the other streams are then closed)."""
    queue: asyncio.Queue = asyncio.Queue()
    _END = object()

    async def pump(i: int, stream: AsyncIterator[Delta]) -> None:
        try:
            async for delta in stream:
                queue.put_nowait((i, delta))
            queue.put_nowait((i, _END))
        except Exception as e:
            queue.put_nowait((i, e))
        finally:
            # Cancellation lands inside the generator (it sees it and aborts); a generator that was
            # suspended at a yield instead is closed here.
            await stream.aclose()

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        running = len(tasks)
        while running:
            i, item = await queue.get()
            if item is _END:
                running -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        # Shielded: under Starlette a disconnect cancels this task's scope again at every await.
        with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
            await asyncio.gather(*tasks, return_exceptions=True)


async def close_quietly(agen: AsyncGenerator) -> None:
    """aclose() that completes even inside a cancelled scope."""
    with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
        await agen.aclose()


async def until_disconnected(request: Request, work: Awaitable[T],
                             poll_s: float = DISCONNECT_POLL_S) -> T:
    """Await `work`, checking every `poll_s` whether the client is still there. If it left, the
    work is cancelled (and awaited, so its cleanup has run) and ClientGone is raised.

    Needed wherever nothing is being sent: Starlette notices a disconnect only while a streaming
    response is running, and a non-streaming request would otherwise generate to the end."""
    task = asyncio.ensure_future(work)
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=poll_s)
            if not task.done() and await request.is_disconnected():
                raise ClientGone()
        return task.result()
    finally:
        if not task.done():
            task.cancel()
            with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await asyncio.wait({task})
            if task.done() and not task.cancelled():
                task.exception()  # retrieved: an error after the client left is nobody's to see
