"""A runner call that reports its progress: run in a worker thread, each mask step's `runtime.runner.Progress`
handed to the event loop as it happens, the result last. Closing the stream before the result (a cancelled
video job, a client gone from an image stream: Ray Serve cancels the replica's generator) calls `leave`,
which sets the call's stop signal, so the runner stops within one mask step and is free for the next request."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any, AsyncIterator, Callable

from runtime.runner import Progress

_END = object()


async def with_progress(call: Callable[[Callable[[Progress], None]], Any], leave: Callable[[], None]
                        ) -> AsyncIterator[dict]:
    """`call(on_step)` in a worker thread. Yields {"progress": {frames_done, frames, mask_steps_done,
    mask_steps}} after every mask step, then {"result": what call returned}; re-raises what call raised."""
    loop, events = asyncio.get_running_loop(), asyncio.Queue()

    def report(progress: Progress) -> None:
        loop.call_soon_threadsafe(events.put_nowait, {"progress": dataclasses.asdict(progress)})

    def run() -> Any:
        try:
            return call(report)
        finally:
            loop.call_soon_threadsafe(events.put_nowait, _END)

    running = asyncio.ensure_future(asyncio.to_thread(run))
    running.add_done_callback(lambda done: done.cancelled() or done.exception())  # retrieved, also if abandoned
    try:
        while (event := await events.get()) is not _END:
            yield event
        yield {"result": await running}
    finally:
        leave()  # a no-op once the call has returned; else the stream was closed early: stop the runner
