"""Cross-request dynamic batching, after Hugging Face TEI's queue: requests wait
in a bounded queue; one batcher task takes them in arrival order while the
batch's padded tokens stay within a budget and runs ONNX Runtime on a single
inference thread, off the event loop; each request's future gets its rows.

There is no timer beyond an optional short wait for company: a batch leaves as
soon as the inference thread is free, so a lone request is never held back and
under load batches grow by themselves. Written here because no maintained
library batches across requests for an in-process onnxruntime session."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from serving.model import OnnxClassifier


class QueueFull(Exception):
    """More texts are waiting than the queue holds: the caller should come back later."""


class ShuttingDown(Exception):
    """The server is stopping and takes no new work."""


@dataclass
class _Job:
    model: OnnxClassifier
    ids: list[list[int]]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)

    @property
    def longest(self) -> int:
        return max(map(len, self.ids))


@dataclass(frozen=True)
class BatchStats:
    """What one batch did, for the metrics."""

    texts: int
    padded_tokens: int
    queue_seconds: list[float]
    inference_seconds: float


class Batcher:
    def __init__(self, max_batch_tokens: int, max_queue_texts: int, max_wait_s: float = 0.0,
                 on_batch: Callable[[BatchStats], None] | None = None):
        self.max_batch_tokens = max_batch_tokens
        self.max_queue_texts = max_queue_texts
        self.max_wait_s = max_wait_s
        self.on_batch = on_batch
        self._queue: deque[_Job] = deque()
        self._queued_texts = 0
        self._wakeup = asyncio.Event()
        self._closing = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="finsent-inference")
        self._task: asyncio.Task | None = None

    @property
    def queued_texts(self) -> int:
        return self._queued_texts

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="finsent-batcher")

    async def submit(self, model: OnnxClassifier, ids: list[list[int]]) -> np.ndarray:
        """Logits of ``ids`` (one row per text, in order) once batches have run them.
        Raises QueueFull at once when the queue cannot take them all. A request
        over the token budget is queued as several jobs of similar lengths."""
        if self._closing:
            raise ShuttingDown()
        if self._queued_texts + len(ids) > self.max_queue_texts:
            raise QueueFull()
        loop = asyncio.get_running_loop()
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        chunks: list[list[int]] = [[]]
        for i in order:  # ascending lengths: the text being added is the chunk's longest
            if chunks[-1] and len(ids[i]) * (len(chunks[-1]) + 1) > self.max_batch_tokens:
                chunks.append([])
            chunks[-1].append(i)
        jobs = [_Job(model, [ids[i] for i in chunk], loop.create_future()) for chunk in chunks]
        self._queue.extend(jobs)
        self._queued_texts += len(ids)
        self._wakeup.set()
        try:
            parts = await asyncio.gather(*(job.future for job in jobs))
        except BaseException:
            for job in jobs:
                job.future.cancel()  # the caller is gone: what is still queued is dropped
            raise
        logits = np.empty((len(ids), parts[0].shape[1]), dtype=parts[0].dtype)
        for chunk, part in zip(chunks, parts):
            logits[chunk] = part
        return logits

    def _next_batch(self) -> list[_Job]:
        """Jobs in arrival order, sharing the first one's model, within the token
        budget (one job alone may exceed it: it runs by itself). Jobs whose caller
        has gone (future cancelled) are dropped here, before any inference."""
        batch: list[_Job] = []
        texts = longest = 0
        skipped: list[_Job] = []
        while self._queue:
            job = self._queue[0]
            if job.future.done():
                self._queue.popleft()
                self._queued_texts -= len(job.ids)
                continue
            if batch and job.model is not batch[0].model:
                skipped.append(self._queue.popleft())
                continue
            width = max(longest, job.longest)
            if batch and width * (texts + len(job.ids)) > self.max_batch_tokens:
                break
            batch.append(self._queue.popleft())
            self._queued_texts -= len(job.ids)
            texts, longest = texts + len(job.ids), width
        self._queue.extendleft(reversed(skipped))
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                if self._closing:
                    return
                self._wakeup.clear()
                await self._wakeup.wait()
                if self.max_wait_s and not self._closing:
                    await asyncio.sleep(self.max_wait_s)
            batch = self._next_batch()
            if not batch:
                continue
            model = batch[0].model
            ids = [tokens for job in batch for tokens in job.ids]
            started = time.perf_counter()
            try:
                logits = await loop.run_in_executor(self._executor, model.run_sorted, ids)
            except Exception as err:  # one bad batch answers its own requests, the batcher goes on
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(err)
                continue
            finished = time.perf_counter()
            offset = 0
            for job in batch:
                if not job.future.done():
                    job.future.set_result(logits[offset : offset + len(job.ids)])
                offset += len(job.ids)
            if self.on_batch:
                self.on_batch(BatchStats(len(ids), len(ids) * max(map(len, ids)),
                                         [started - job.enqueued for job in batch], finished - started))

    async def close(self) -> None:
        """Takes no new work, runs what is queued, then stops."""
        self._closing = True
        self._wakeup.set()
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)
