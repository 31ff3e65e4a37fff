"""Universal hashing shared by the hashed representations (DHE, hybrid, MEM-REC, ROBE).

    h_j(x) = ((a_j · (x mod p) + b_j) mod p) mod m,   p = 2^31 − 1 (a Mersenne prime),
    1 <= a_j < p,  0 <= b_j < p                        (Carter–Wegman family)

Overflow: x mod p < 2^31 and a_j < 2^31, so a_j · (x mod p) + b_j < 2^62 + 2^31 < 2^63 − 1:
int64 arithmetic is exact for every non-negative int64 id.  Only elementwise int64 mul / add /
``torch.remainder`` on non-negative operands are used, which ONNX (``Mul``/``Add``/``Mod``) and
TVM lower to the same integer arithmetic, so torch, ONNX Runtime and TVM agree bit for bit.
The coefficients are stored tensors (int64 [k]) drawn from a seed, so a saved model carries them.
"""

from __future__ import annotations

import numpy as np
import torch

PRIME = 2_147_483_647          # 2^31 - 1: a < p and x mod p < p keep a·x + b below 2^62 + 2^31


def hash_coefficients(k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(a [k], b [k]) int64 with 1 <= a < p, 0 <= b < p, from ``seed`` (numpy PCG64)."""
    if k < 1:
        raise ValueError(f"need at least one hash function, got k={k}")
    rng = np.random.default_rng(seed)
    a = rng.integers(1, PRIME, size=k, dtype=np.int64)
    b = rng.integers(0, PRIME, size=k, dtype=np.int64)
    return torch.from_numpy(a), torch.from_numpy(b)


def universal_hash(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, m: int) -> torch.Tensor:
    """x int64 [n] (non-negative) -> [n, k] int64 in [0, m): column j is h_j(x) mod m."""
    xr = torch.remainder(x, PRIME).unsqueeze(1)
    return torch.remainder(torch.remainder(xr * a.unsqueeze(0) + b.unsqueeze(0), PRIME), m)


def reference_hash(x: int, a: int, b: int, m: int) -> int:
    """Python big-integer h(x) (no overflow possible): the independent reference for tests."""
    return ((a * (x % PRIME) + b) % PRIME) % m


def hash_ops(k: int) -> int:
    """Integer ops per id for k hashes: remainder, mul, add, remainder, remainder each."""
    return 1 + 4 * k
