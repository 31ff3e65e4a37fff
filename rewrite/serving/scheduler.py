"""Dynamic batching: a request queue, merged batches, worker threads, answers split back.

Contract (everything but the ``predict`` call runs on the event loop thread):

* ``await submit(batch)`` queues one validated canonical batch and returns its probabilities
  (float32 [B]).  It raises ``QueueTimeout`` when the request has not *started* computing within
  ``queue_timeout_s`` of its arrival (a started request is always answered), ``Unavailable`` once
  ``close()`` began, and re-raises what ``predict`` raised.
* ``run()`` (a task) forms batches: it waits for an idle worker, then for the first request,
  then until the queue holds ``max_batch`` samples or the oldest request has waited
  ``max_delay_s``, whichever is first; it takes requests in arrival order up to ``max_batch``
  samples (never splitting a request; requests larger than ``max_batch`` are refused by the
  server), asks the dispatch policy for a path (by the batch's size and the queue's state),
  and runs ``merge -> predict -> split`` on a worker thread.  Under load, batches form while
  the workers are busy, so they grow with the load without any added delay.
* A batch whose estimated compute (``Decision.compute_s``) is below ``inline_below_s`` runs on the
  event loop thread instead, with the idle worker's ``Predictor`` (owned by this batch while it
  is out of the idle list, so never used by two threads at once): handing it to a worker and
  back costs ~75 us here (two thread wake-ups), more than such a batch computes (batch 1 on
  torch-fast: ~15 us), and blocking the loop for under ``inline_below_s`` delays no request by more.
  The estimate is the policy's (compile-time latency table times the online correction).
* Each worker thread owns one ``Predictor`` (loaded and warmed by the caller): no runner is
  shared between threads; the engines release the GIL inside ``predict``.
* ``close()`` stops taking new requests, lets every queued and running batch finish, then ends.
"""

from __future__ import annotations

import asyncio
import collections
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from rewrite.serving.batching import Batch, merge, split
from rewrite.serving.dispatch import Policy
from rewrite.serving.metrics import Metrics

INLINE_BELOW_S = 1e-4    # batches estimated shorter than this compute on the event loop thread


class QueueTimeout(Exception):
    pass


class Unavailable(Exception):
    pass


@dataclass
class _Pending:
    batch: Batch
    samples: int
    arrival: float
    future: asyncio.Future
    started: bool = False
    dropped: bool = False
    info: dict = field(default_factory=dict)


class Scheduler:
    def __init__(self, predictors: list, policy: Policy, metrics: Metrics, n_features: int,
                 max_batch: int = 2048, max_delay_s: float = 0.0005, queue_timeout_s: float = 1.0,
                 batching: bool = True, inline_below_s: float = INLINE_BELOW_S):
        self.policy, self.metrics, self.n_features = policy, metrics, n_features
        self.max_batch, self.max_delay_s, self.queue_timeout_s = max_batch, max_delay_s, queue_timeout_s
        self.batching = batching             # False: one request per predict (the no-batching baseline)
        self.inline_below_s = inline_below_s   # 0: every batch goes to a worker thread
        self._idle = list(predictors)
        self._executor = ThreadPoolExecutor(len(predictors), thread_name_prefix="rewrite-worker")
        self._queue: collections.deque[_Pending] = collections.deque()
        self._queued_samples = 0
        self._running = 0
        self._closing = False
        self._wakeup: asyncio.Event | None = None
        self._worker_free: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    # -- the caller's side ------------------------------------------------------------------
    def start(self) -> None:
        self._wakeup, self._worker_free = asyncio.Event(), asyncio.Event()
        self._worker_free.set()
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def submit(self, batch: Batch) -> tuple[np.ndarray, dict]:
        if self._closing:
            raise Unavailable("the server is shutting down")
        loop = asyncio.get_running_loop()
        p = _Pending(batch, int(batch[0].shape[0]), time.monotonic(), loop.create_future())
        self._queue.append(p)
        self._queued_samples += p.samples
        self.metrics.set_queued(self._queued_samples)
        self._wakeup.set()
        timer = loop.call_later(self.queue_timeout_s, self._expire, p)
        try:
            return await p.future
        finally:
            timer.cancel()

    def _expire(self, p: _Pending) -> None:
        """The queue timeout: a request not started by now is dropped with QueueTimeout."""
        if not p.started and not p.future.done():
            p.dropped = True
            p.future.set_exception(QueueTimeout(
                f"request waited {1e3 * self.queue_timeout_s:.0f} ms in the queue without starting "
                f"(--queue-timeout); the server is overloaded"))

    async def close(self) -> None:
        """Finish everything queued and running, then stop the batching task and the workers."""
        self._closing = True
        if self._task is None:
            return
        while self._queue or self._running:
            self._wakeup.set()
            await asyncio.sleep(0.005)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._executor.shutdown(wait=True)

    @property
    def queued_samples(self) -> int:
        return self._queued_samples

    # -- the batching task ----------------------------------------------------------------
    async def run(self) -> None:
        while True:
            while not self._idle:
                self._worker_free.clear()
                await self._worker_free.wait()
            while not self._queue:
                self._wakeup.clear()
                await self._wakeup.wait()
            deadline = self._queue[0].arrival + self.max_delay_s
            while self.batching and self._queued_samples < self.max_batch and not self._closing:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._wakeup.clear()
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except TimeoutError:
                    break
            items = self._take()
            if items:
                self._launch(items)

    def _take(self) -> list[_Pending]:
        items, total = [], 0
        while self._queue:
            p = self._queue[0]
            if p.dropped or p.future.done():
                self._queue.popleft()
                self._queued_samples -= p.samples
                continue
            if items and (total + p.samples > self.max_batch or not self.batching):
                break
            self._queue.popleft()
            self._queued_samples -= p.samples
            p.started = True
            items.append(p)
            total += p.samples
        self.metrics.set_queued(self._queued_samples)
        return items

    def _launch(self, items: list[_Pending]) -> None:
        now = time.monotonic()
        samples = sum(p.samples for p in items)
        decision = self.policy.choose(samples, self._queued_samples, now - items[0].arrival)
        predictor = self._idle.pop()
        self._running += 1
        loop = asyncio.get_running_loop()
        batches = [p.batch for p in items]
        if decision.compute_s < self.inline_below_s:
            fut = loop.create_future()
            try:
                fut.set_result(_compute(predictor, batches, self.n_features, decision.path))
            except Exception as e:     # answered like a worker's failure: the server stays up
                fut.set_exception(e)
            self._finish(fut, items, predictor, decision, now)
            return
        fut = loop.run_in_executor(self._executor, _compute, predictor, batches, self.n_features, decision.path)
        fut.add_done_callback(lambda f: self._finish(f, items, predictor, decision, now))

    def _finish(self, fut: asyncio.Future, items: list[_Pending], predictor, decision, started: float) -> None:
        self._idle.append(predictor)
        self._running -= 1
        self._worker_free.set()
        if fut.exception() is not None:
            for p in items:
                if not p.future.done():
                    p.future.set_exception(fut.exception())
            return
        probs, sizes, seconds = fut.result()
        samples = sum(sizes)
        self.policy.observe(decision.path, samples, seconds)
        done = time.monotonic()
        for p in items:
            self.policy.observe_request(done - p.arrival)
        self.metrics.batch_done(decision.path, samples, seconds, [started - p.arrival for p in items],
                                decision.level)
        for p, out in zip(items, split(probs, sizes)):
            if not p.future.done():
                p.future.set_result((out, {"path": decision.path, "batch": samples,
                                           "queue_s": started - p.arrival, "compute_s": seconds}))


def _compute(predictor, batches: list[Batch], n_features: int, path: str):
    """On a worker thread: merge, one ``predict`` on ``path``, (probs, sizes, seconds)."""
    (dense, indices, offsets), sizes = merge(batches, n_features)
    t0 = time.perf_counter()
    probs = predictor.predict(dense, indices, offsets, path=path, validate=False)
    return probs, sizes, time.perf_counter() - t0
