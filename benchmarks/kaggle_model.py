"""Write a Criteo-Kaggle-shaped DLRM once, for the performance benchmarks (not a test fixture).

    PYTHONPATH=. python benchmarks/kaggle_model.py /tmp/kaggle/model.safetensors

Shape (dlrm's Kaggle configuration): 26 plain fp32 tables with ``rewrite.core.synthetic.KAGGLE_ROWS``
rows and d = 16 (33.8 M rows, 2.16 GB), bottom MLP 13-512-256-64-16, dot interaction over
27 vectors (16 + 351 = 367 wide), top MLP 367-512-256-1: 2.16 GB in the native format.

Weights are random but scaled like a trained model, so that activations, the interaction's
range and int8/bf16 rounding behave as they would on a real checkpoint:
* table rows  ~ N(0, TABLE_STD²) i.i.d. (a trained table's rows have norms of order 0.1-1, not
  the ±sqrt(1/rows) of dlrm's initialiser, which for a 10 M-row table is ±3e-4);
* Linear W    ~ N(0, 2 / (fan_in + fan_out)), b ~ N(0, 1 / fan_out)  (dlrm's own initialiser).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

from rewrite.core.embedding import TableBag
from rewrite.core.model import ModelSpec, RecModel
from rewrite.core.synthetic import KAGGLE_ROWS

DIM = 16
BOTTOM = (512, 256, 64, DIM)
TOP = (512, 256, 1)
N_DENSE = 13
TABLE_STD = 0.1        # per-coordinate std of a row (a trained row's L2 norm ≈ 0.4 at d = 16)


def kaggle_spec(rows: tuple[int, ...] = KAGGLE_ROWS) -> ModelSpec:
    return ModelSpec(n_dense=N_DENSE, bottom=BOTTOM, top=TOP,
                     features=tuple((f"C{i + 1}", f"t{i}") for i in range(len(rows))),
                     provenance={"source": "benchmarks/kaggle_model.py", "weights": "random, trained-like scale"})


@torch.no_grad()
def kaggle_model(rows: tuple[int, ...] = KAGGLE_ROWS, seed: int = 0) -> RecModel:
    """The Kaggle-shaped model with seeded random weights (``rows`` smaller in tests)."""
    gen = torch.Generator().manual_seed(seed)
    tables = {}
    for i, r in enumerate(rows):
        w = torch.empty(r, DIM)
        w.normal_(0.0, TABLE_STD, generator=gen)
        tables[f"t{i}"] = TableBag(r, DIM, weight=w)
    model = RecModel(kaggle_spec(rows), tables)
    for layer in [*model.bottom, *model.top]:
        if isinstance(layer, torch.nn.Linear):
            fan_out, fan_in = layer.weight.shape
            layer.weight.normal_(0.0, float(np.sqrt(2.0 / (fan_in + fan_out))), generator=gen)
            layer.bias.normal_(0.0, float(np.sqrt(1.0 / fan_out)), generator=gen)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    from rewrite.core.model_file import save

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("output", type=Path, help="a .safetensors path outside the repository")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    model = kaggle_model(seed=args.seed)
    save(model, args.output)
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e9:.2f} GB, "
          f"{model.embedding_bytes() / 1e9:.2f} GB of tables)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
