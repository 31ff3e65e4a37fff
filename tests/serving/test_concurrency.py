"""Every path of a bundle called from several threads at once answers as it does alone.

tvm-llvm's VM is not reentrant: 4 threads on one runner segfaulted (the issue) or corrupted
its register file; ``rewrite.runtime`` serializes each runner's calls."""

from __future__ import annotations

import threading

import numpy as np

from rewrite.runtime import load
from tests.serving.conftest import ragged, serving_targets
from tests.tolerances import allclose

THREADS, CALLS = 4, 25


def test_every_path_from_several_threads_matches_the_reference(bundle_dir):
    pred = load(bundle_dir)
    batches = [ragged(b, seed=b) for b in (1, 3, 17, 64)]
    reference = {p: [pred.predict(*x, path=p) for x in batches] for p in pred.paths}
    failures: list[str] = []

    def work(t: int) -> None:
        try:
            for k in range(CALLS):
                for p in pred.paths:
                    i = (t + k) % len(batches)
                    out = pred.predict(*batches[i], path=p)
                    if not allclose(out, reference[p][i], "probability-rebatched"):
                        failures.append(f"thread {t} call {k} path {p}")
        except Exception as e:              # noqa: BLE001  (reported below)
            failures.append(f"thread {t}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:5]
    assert sorted(pred.paths) == sorted(serving_targets())


def test_first_loads_race_to_one_runner(bundle_dir):
    pred = load(bundle_dir)
    got: list[object] = []
    threads = [threading.Thread(target=lambda: got.append(pred.runner(pred.paths[-1]))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(r) for r in got}) == 1
