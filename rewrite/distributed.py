"""One command on N processes with torch.distributed (gloo on CPU): ranks, launch, exchange.

Two ways in, one code path (``Group``):

* ``torchrun --nproc-per-node N -m rewrite apply ...``: each process reads RANK, WORLD_SIZE,
  MASTER_ADDR and MASTER_PORT from the environment (``from_env``: ``init_process_group("gloo")``).
* ``rewrite apply --nproc N`` (``launch``): this process is rank 0.  It hosts the rendezvous
  ``TCPStore`` on 127.0.0.1 at a port the OS picks (port 0: no race for a "free" port) and starts
  ranks 1..N-1 with ``torch.multiprocessing`` (start method spawn), which connect to it.

Rank 0 reports and writes; every other rank works and returns.  Errors are shared: a rank that
raises inside a shared step hands its one-line message to every rank (``Group.agree``), so all
ranks raise the same ``RankError`` (the failing rank's exit code, ``rank k: message``), and
nothing is written.  A rank that dies outright breaks the gloo connections of the others; under
``--nproc`` rank 0 then reports the dead rank's own error (sent back through the store).

Test hook: ``REWRITE_DIST_FAIL_RANK=k`` makes rank k raise a ``RewriteError`` in its first
fitting step (``Group.injected_failure``), to prove that a failed rank fails the job.
"""

from __future__ import annotations

import datetime
import heapq
import io
import json
import os
import re
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist

from rewrite.core.errors import RewriteError

FAIL_RANK_ENV = "REWRITE_DIST_FAIL_RANK"   # the test hook above
HOST = "127.0.0.1"
STARTUP_TIMEOUT = 120.0     # s: ranks 1..N-1 of --nproc must connect within this (imports ~5 s)
POLL = 0.05                 # s: how often rank 0 checks its children while they start
READY = "rewrite/ready/"   # store key a started rank sets (then rank 0 joins the process group)
ERROR = "rewrite/error/"   # store key a failed rank sets: [one-line message, exit code]
TIMEOUT = datetime.timedelta(days=1)   # a collective: a rank may wait while another fits for hours
                                       # (gloo's default, 30 min, is too short); a dead peer fails it at once


class RankError(RewriteError):
    """A rank failed: ``rank k: message``, with the failing rank's exit code."""

    def __init__(self, rank: int, message: str, exit_code: int = 2):
        super().__init__(f"rank {rank}: {message}")
        self.rank, self.exit_code = rank, exit_code


@dataclass(frozen=True)
class Group:
    """This process's place in the job: ``rank`` of ``world`` (``world == 1``: no torch.distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def distributed(self) -> bool:
        return self.world > 1

    @property
    def writes(self) -> bool:
        """Whether this rank reports and writes the result (rank 0)."""
        return self.rank == 0

    def exchange(self, blob: bytes) -> list[bytes]:
        """Every rank's ``blob``, by rank (``all_gather`` of padded uint8 tensors: no pickling)."""
        if not self.distributed:
            return [blob]
        size = torch.tensor([len(blob)], dtype=torch.int64)
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(sizes, size)
        longest = max(int(s) for s in sizes)
        mine = torch.zeros(longest, dtype=torch.uint8)
        if blob:
            mine[:len(blob)] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        got = [torch.empty(longest, dtype=torch.uint8) for _ in range(self.world)]
        dist.all_gather(got, mine)
        return [g[:int(s)].numpy().tobytes() for g, s in zip(got, sizes)]

    def agree(self, error: BaseException | None = None) -> None:
        """Share each rank's outcome of a step (``error`` or None); raise the lowest failing
        rank's error on every rank as a ``RankError``."""
        mine = {} if error is None else {"message": one_line(error),
                                          "exit_code": getattr(error, "exit_code", 2)}
        outcomes = [json.loads(b) for b in self.exchange(json.dumps(mine).encode())]
        failed = [(r, o) for r, o in enumerate(outcomes) if o]
        if failed:
            rank, o = failed[0]
            raise RankError(rank, o["message"], o["exit_code"]) from error

    def all_reduce_sum(self, values: np.ndarray) -> np.ndarray:
        """Element-wise sum of ``values`` over the ranks (int64 / float64 stay exact as given)."""
        if not self.distributed:
            return values
        t = torch.from_numpy(np.ascontiguousarray(values))
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t.numpy()

    def injected_failure(self) -> None:
        """The test hook: raise when ``REWRITE_DIST_FAIL_RANK`` names this rank."""
        if os.environ.get(FAIL_RANK_ENV, "") == str(self.rank):
            raise RewriteError(f"injected failure ({FAIL_RANK_ENV}={self.rank})")


SINGLE = Group()


def one_line(error: BaseException) -> str:
    """A RewriteError's message, or ``Type: message`` for anything else, on one line."""
    text = str(error) if isinstance(error, RewriteError) else f"{type(error).__name__}: {error}"
    return " ".join(text.split()) or type(error).__name__


def place(costs: dict[str, float], world: int) -> dict[str, int]:
    """Greedy longest-processing-time placement: items by falling cost (ties: by name), each to
    the least-loaded rank (ties: the lowest).  Makespan <= 4/3 of the optimum (Graham, 1969)."""
    loads = [(0.0, r) for r in range(world)]
    owner = {}
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        load, r = heapq.heappop(loads)
        owner[name] = r
        heapq.heappush(loads, (load + costs[name], r))
    return owner


class RankPrefixed(io.TextIOBase):
    """A text stream that starts every line (after ``\\n`` or tqdm's ``\\r``) with ``prefix``."""

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self._start = stream, prefix, True

    def write(self, s: str) -> int:
        out = []
        for piece in re.split(r"([\r\n])", s):
            if piece in ("\r", "\n"):
                self._start = True
                out.append(piece)
            elif piece:
                if self._start:
                    out.append(self.prefix)
                    self._start = False
                out.append(piece)
        self.stream.write("".join(out))
        return len(s)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return self.stream.isatty()

    def fileno(self) -> int:
        return self.stream.fileno()

    @property
    def encoding(self) -> str:
        return getattr(self.stream, "encoding", "utf-8")


@contextmanager
def rank_stderr(group: Group) -> Iterator[None]:
    """Prefix this process's stderr with ``[rank k] `` while the job runs (N > 1 only)."""
    if not group.distributed:
        yield
        return
    old = sys.stderr
    sys.stderr = RankPrefixed(old, f"[rank {group.rank}] ")
    try:
        yield
    finally:
        sys.stderr = old


def set_threads(threads: int | None, world: int) -> int:
    """torch threads per rank: ``threads``, else (N > 1) the cores shared out, at least 1; one
    process without ``threads`` keeps torch's default.  Returns the count in force."""
    if threads is None and world == 1:
        return torch.get_num_threads()
    n = threads or max(1, (os.cpu_count() or 1) // world)
    torch.set_num_threads(n)
    return n


def run(nproc: int, threads: int | None, work: Callable[..., Any], args: tuple) -> tuple[bool, Any]:
    """``work(group, *args)`` on this job's ranks: under torchrun, this process's rank (``nproc``
    must then be 1); else ``launch(nproc)``.  Returns (whether this rank reports and writes, its
    result)."""
    group = from_env()
    if not group.distributed:
        return True, launch(nproc, work, args, threads)
    try:
        if nproc != 1:
            raise RewriteError("--nproc inside a torch.distributed job (torchrun): give one or the other")
        if threads is not None:
            set_threads(threads, group.world)
        with rank_stderr(group):
            return group.writes, work(group, *args)
    finally:
        dist.destroy_process_group()


def from_env() -> Group:
    """The group torchrun describes (RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT), joined
    with gloo; ``SINGLE`` when WORLD_SIZE is unset or 1."""
    if dist.is_initialized():
        return Group(dist.get_rank(), dist.get_world_size())
    try:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:
        raise RewriteError(f"RANK={os.environ.get('RANK')!r} / WORLD_SIZE={os.environ.get('WORLD_SIZE')!r}: "
                           f"not integers") from None
    if world <= 1:
        return SINGLE
    missing = [k for k in ("MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise RewriteError(f"WORLD_SIZE={world} but {' and '.join(missing)} unset: start the job with torchrun")
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=TIMEOUT)
    return Group(rank, world)


def _child(index: int, port: int, world: int, threads: int | None, work: Callable, args: tuple) -> None:
    """Rank ``index + 1`` of a ``launch``: join rank 0's store, run ``work``, and report a failure
    through the store (``ERROR`` key; the ``check`` round trip makes sure rank 0 has it)."""
    rank = index + 1
    group = Group(rank, world)
    store = None
    try:
        set_threads(threads, world)
        store = dist.TCPStore(HOST, port, world, is_master=False, timeout=TIMEOUT)
        store.set(f"{READY}{rank}", "1")
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world, timeout=TIMEOUT)
        with rank_stderr(group):
            work(group, *args)
    except BaseException as e:   # noqa: BLE001 (the parent reports it; a traceback helps no user)
        code = getattr(e, "exit_code", 2)
        if store is not None and not isinstance(e, RankError):   # a shared error: rank 0 has it
            store.set(f"{ERROR}{rank}", json.dumps([one_line(e), code]))
            store.check([f"{ERROR}{rank}"])
        sys.exit(code)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def launch(nproc: int, work: Callable[..., Any], args: tuple, threads: int | None = None) -> Any:
    """Run ``work(group, *args)`` on ``nproc`` ranks, this process being rank 0; return rank 0's
    result.  ``work`` and ``args`` must be picklable (a module-level function, plain values).
    Any rank's failure before ``work``'s last collective raises here as a ``RankError``, after
    every child has exited; a child that dies after it (when rank 0 has its result) is a warning."""
    if nproc < 1:
        raise RewriteError(f"--nproc must be >= 1, got {nproc}")
    if nproc == 1:
        set_threads(threads, 1)
        return work(SINGLE, *args)
    import torch.multiprocessing as mp

    set_threads(threads, nproc)
    store = dist.TCPStore(HOST, 0, nproc, is_master=True, timeout=TIMEOUT, wait_for_workers=False)
    ctx = mp.start_processes(_child, args=(store.port, nproc, threads, work, args),
                             nprocs=nproc - 1, join=False, start_method="spawn")
    group = Group(0, nproc)
    try:
        _await_children(store, ctx, nproc)
        dist.init_process_group("gloo", store=store, rank=0, world_size=nproc, timeout=TIMEOUT)
        with rank_stderr(group):
            result = work(group, *args)
    except BaseException as e:
        _leave()                  # closes the connections: a child waiting in a collective fails now
        child = _finish(ctx, store, grace=30.0)
        if isinstance(e, RewriteError):     # shared (RankError) or rank 0's own, one line already
            raise
        if child is not None:     # a child died first; rank 0's error is only the broken connection
            raise RankError(*child) from None
        raise RankError(0, one_line(e)) from e
    _leave()
    child = _finish(ctx, store, grace=None)
    if child is not None:    # every rank passed work's last collective: the result stands (once,
                             # under load, a finished rank aborted in its teardown: SIGABRT)
        print(f"warning: rank {child[0]} {child[1]} after the job finished; the result is complete",
              file=sys.stderr)
    return result


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _await_children(store, ctx, nproc: int) -> None:
    """Wait until ranks 1..N-1 have connected to the store; fail at once if one exits first."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    keys = [f"{READY}{r}" for r in range(1, nproc)]
    while not store.check(keys):
        if any(p.exitcode is not None for p in ctx.processes):
            child = _finish(ctx, store, grace=5.0)
            raise RankError(*child) if child else RewriteError("a rank exited before joining the job")
        if time.monotonic() > deadline:
            _finish(ctx, store, grace=0.0)
            raise RewriteError(f"ranks did not start within {STARTUP_TIMEOUT:.0f} s")
        time.sleep(POLL)


def _finish(ctx, store, grace: float | None) -> tuple[int, str, int] | None:
    """Wait for every child (``grace`` seconds, then terminate it; None: no limit).  Return the
    lowest (rank, message, exit code) a child reported, else one for a child that exited non-zero
    on its own (not one terminated here), else None."""
    deadline = None if grace is None else time.monotonic() + grace
    for p in ctx.processes:
        p.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    own = {i + 1: p.exitcode for i, p in enumerate(ctx.processes) if p.exitcode}
    for p in ctx.processes:
        if p.exitcode is None:
            p.terminate()
            p.join()
    for rank in range(1, len(ctx.processes) + 1):
        if store.check([f"{ERROR}{rank}"]):
            message, code = json.loads(store.get(f"{ERROR}{rank}"))
            return rank, message, code
    for rank, code in sorted(own.items()):
        return (rank, f"exited with code {code}" if code > 0 else f"killed by signal {-code}", 2)
    return None
