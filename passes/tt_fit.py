"""Fitting a tensor-train table: shapes, TT-SVD, frequency-weighted ALS.

Row i has digits (i_1..i_K) in base (p_1..p_K) (row-major, i_1 most significant); column j has
digits (j_1..j_K) in base (q_1..q_K).  With cores G_k [p_k, r_{k-1}, q_k, r_k] (r_0 = r_K = 1)

    W[i, j] ≈ G_1[i_1][:, j_1, :] G_2[i_2][:, j_2, :] ... G_K[i_K][:, j_K, :]      (1×1)

TT-SVD (Oseledets 2011): the table, zero-padded to P = Πp rows and viewed as the tensor
[p_1 q_1, p_2 q_2, ...], is split by K-1 truncated SVDs; at full rank the product is exact, and
with truncation δ = ε‖W‖/sqrt(K-1) per step its error is <= ε‖W‖.

ALS then minimises the *frequency-weighted* error  Σ_i w_i ‖W_i - T_i‖²  (w = access counts,
padding rows weight 0), one core at a time.  With the other cores fixed, T_i is linear in core
k: for each slice y = i_k and column digit b = j_k, with L[x] [Q_<, r_{k-1}] the product of the
cores before k (row digits x) and R[z] [r_k, Q_>] the product after (digits z),

    min_X Σ_{x,z} w[x,y,z] ‖W[x,y,z][:, b, :] - L[x] X[:, b, :] R[z]‖²
    ⇒  (Σ w L[x]ᵀL[x] ⊗ R[z]R[z]ᵀ) vec X[:, b, :] = Σ w vec(L[x]ᵀ W[x,y,z][:, b, :] R[z]ᵀ),

one Gram matrix per slice y, shared by every b: a batched (r_{k-1} r_k)² solve.  Each update is
the exact minimiser given the others, so the weighted error never increases; the cores are
re-orthogonalised (QR) as the sweep moves, which keeps the Gram matrices well conditioned.
"""

from __future__ import annotations

import itertools
import math

import torch

Cores = list[torch.Tensor]      # each [p_k, r_{k-1}, q_k, r_k], float64
RIDGE = 1e-12                   # relative to the mean Gram diagonal: keeps empty slices solvable
CHUNK_ELEMENTS = 1 << 24        # float64 elements per intermediate block (128 MiB)


def factor_rows(rows: int, k: int = 3) -> tuple[int, ...]:
    """p_1..p_k with Πp >= rows, balanced: minimal Σp (then minimal Πp); the smallest factor in
    the middle, where the core is r_{k-1} × r_k wide (k = 3)."""
    best: tuple[int, int, tuple[int, ...]] | None = None
    top = math.ceil(rows ** (1.0 / k)) + 1
    for head in itertools.combinations_with_replacement(range(1, top + 1), k - 1):
        last = max(head[-1], math.ceil(rows / math.prod(head)))
        cand = (*head, last)
        key = (sum(cand), math.prod(cand), cand)
        if best is None or key < best:
            best = key
    p = sorted(best[2])
    return tuple([p[1], p[0], *p[2:]]) if k == 3 else tuple(p)


def factor_dim(dim: int, k: int = 3) -> tuple[int, ...]:
    """q_1..q_k with Πq = dim exactly, as balanced as dim's divisors allow (smallest in the middle)."""
    best = None
    divs = [a for a in range(1, dim + 1) if dim % a == 0]
    for head in itertools.product(divs, repeat=k - 1):
        if dim % math.prod(head):
            continue
        cand = sorted((*head, dim // math.prod(head)))
        key = (cand[-1] - cand[0], cand)
        if best is None or key < best:
            best = key
    q = best[1]
    return tuple([q[1], q[0], *q[2:]]) if k == 3 else tuple(q)


def max_ranks(p: tuple[int, ...], q: tuple[int, ...]) -> tuple[int, ...]:
    """The ranks at which TT-SVD is exact: r_k = min(Π_{<=k} p q, Π_{>k} p q)."""
    n = [a * b for a, b in zip(p, q)]
    return tuple(min(math.prod(n[:k + 1]), math.prod(n[k + 1:])) for k in range(len(p) - 1))


def valid_ranks(p: tuple[int, ...], q: tuple[int, ...], ranks: tuple[int, ...]) -> tuple[int, ...]:
    """Clip ranks to max_ranks and make neighbours consistent (r_k <= r_{k±1} p q)."""
    r = [1, *(max(1, min(a, b)) for a, b in zip(ranks, max_ranks(p, q))), 1]
    for k in range(1, len(r) - 1):
        r[k] = min(r[k], r[k - 1] * p[k - 1] * q[k - 1])
    for k in range(len(r) - 2, 0, -1):
        r[k] = min(r[k], r[k + 1] * p[k] * q[k])
    return tuple(r[1:-1])


def core_shapes(p, q, ranks) -> list[tuple[int, int, int, int]]:
    r = [1, *ranks, 1]
    return [(p[k], r[k], q[k], r[k + 1]) for k in range(len(p))]


def pad_rows(table: torch.Tensor, padded: int) -> torch.Tensor:
    out = table.new_zeros((padded, table.shape[1]))
    out[:table.shape[0]] = table
    return out


def tt_svd(table: torch.Tensor, p, q, ranks: tuple[int, ...] | None = None,
           eps: float | None = None) -> Cores:
    """TT-SVD of ``table`` [rows, d] (zero-padded to Πp rows): fixed ``ranks`` or tolerance ``eps``."""
    k = len(p)
    w = pad_rows(table.to(torch.float64), math.prod(p))
    t = w.reshape(*p, *q).permute(*[a for i in range(k) for a in (i, k + i)])
    delta = None if eps is None else eps * float(torch.linalg.norm(w)) / math.sqrt(max(1, k - 1))
    cores, r, rest = [], 1, t.reshape(-1)
    for i in range(k - 1):
        u, s, vh = torch.linalg.svd(rest.reshape(r * p[i] * q[i], -1), full_matrices=False)
        if ranks is not None:
            rk = min(ranks[i], s.numel())
        else:
            tail = torch.sqrt(torch.flip(torch.cumsum(torch.flip(s ** 2, [0]), 0), [0]))
            # tail[j] = error when keeping j singular values; keep the fewest with tail <= delta
            within = (torch.cat([tail[1:], tail.new_zeros(1)]) <= delta).nonzero()
            rk = int(within[0]) + 1 if within.numel() else s.numel()
        cores.append(u[:, :rk].reshape(r, p[i], q[i], rk).permute(1, 0, 2, 3).contiguous())
        rest, r = s[:rk, None] * vh[:rk], rk
    cores.append(rest.reshape(r, p[-1], q[-1], 1).permute(1, 0, 2, 3).contiguous())
    return cores


def left_product(cores: Cores, k: int) -> torch.Tensor:
    """Product of cores[:k] as [P_<, Q_<, r_{k-1}] (row digits and column digits merged)."""
    left = cores[0].new_ones((1, 1, 1))
    for g in cores[:k]:
        left = torch.einsum("xas,isbt->xiabt", left, g).reshape(
            left.shape[0] * g.shape[0], left.shape[1] * g.shape[2], g.shape[3])
    return left


def right_product(cores: Cores, k: int) -> torch.Tensor:
    """Product of cores[k+1:] as [P_>, r_k, Q_>]."""
    right = cores[0].new_ones((1, 1, 1))
    for g in reversed(cores[k + 1:]):
        right = torch.einsum("isbt,ztc->izsbc", g, right).reshape(
            g.shape[0] * right.shape[0], g.shape[1], g.shape[2] * right.shape[2])
    return right


def reconstruct(cores: Cores) -> torch.Tensor:
    """The full padded table [Πp, Πq]."""
    full = left_product(cores, len(cores))
    return full.reshape(full.shape[0], full.shape[1])


def weighted_error(table: torch.Tensor, weights: torch.Tensor, cores: Cores) -> float:
    """sqrt(Σ w_i ‖W_i - T_i‖² / Σ w_i ‖W_i‖²) over the table's real rows."""
    t = reconstruct(cores)[:table.shape[0]]
    w = table.to(torch.float64)
    num = (weights * ((w - t) ** 2).sum(1)).sum()
    den = (weights * (w ** 2).sum(1)).sum()
    return float(torch.sqrt(num / den)) if den > 0 else 0.0


def _update(cores: Cores, k: int, w6: torch.Tensor, wt: torch.Tensor) -> None:
    """Replace core k by the weighted least-squares optimum given the others (module doc)."""
    p, r0, q, r1 = cores[k].shape
    left, right = left_product(cores, k), right_product(cores, k)
    a = torch.einsum("xas,xaS->xsS", left, left)              # [P<, r0, r0]
    b = torch.einsum("ztc,zTc->ztT", right, right)            # [P>, r1, r1]
    gram = torch.einsum("xsS,xytT->ystST", a, torch.einsum("xyz,ztT->xytT", wt, b))
    gram = gram.reshape(p, r0 * r1, r0 * r1)
    per_y = w6.shape[0] * w6.shape[2] * w6.shape[3] * q * max(w6.shape[5], r1)
    step = max(1, CHUNK_ELEMENTS // max(1, per_y))
    rhs = []
    for lo in range(0, p, step):
        m = torch.einsum("xyzabc,ztc->xyzabt", w6[:, lo:lo + step], right)
        m = m * wt[:, lo:lo + step, :, None, None, None]
        rhs.append(torch.einsum("xas,xyzabt->ystb", left, m))   # [y, r0, r1, q]
    rhs = torch.cat(rhs).reshape(p, r0 * r1, q)
    diag = gram.diagonal(dim1=1, dim2=2).mean().clamp(min=1e-300)
    eye = torch.eye(r0 * r1, dtype=gram.dtype)
    x = torch.linalg.solve(gram + RIDGE * diag * eye, rhs)      # [p, r0*r1, q]
    cores[k] = x.reshape(p, r0, r1, q).permute(0, 1, 3, 2).contiguous()


def _orth_left(cores: Cores, k: int) -> None:
    """Make core k left-orthogonal; its R factor moves into core k+1 (product unchanged)."""
    p, r0, q, r1 = cores[k].shape
    qm, rm = torch.linalg.qr(cores[k].permute(1, 0, 2, 3).reshape(r0 * p * q, r1))
    cores[k] = qm.reshape(r0, p, q, -1).permute(1, 0, 2, 3).contiguous()
    cores[k + 1] = torch.einsum("st,itbu->isbu", rm, cores[k + 1])


def _orth_right(cores: Cores, k: int) -> None:
    """Make core k right-orthogonal; its factor moves into core k-1."""
    p, r0, q, r1 = cores[k].shape
    qm, rm = torch.linalg.qr(cores[k].permute(1, 0, 2, 3).reshape(r0, p * q * r1).T)
    cores[k] = qm.T.reshape(-1, p, q, r1).permute(1, 0, 2, 3).contiguous()
    cores[k - 1] = torch.einsum("isbt,ut->isbu", cores[k - 1], rm)


def als(table: torch.Tensor, weights: torch.Tensor, cores: Cores, sweeps: int) -> Cores:
    """Refine ``cores`` by ``sweeps`` back-and-forth ALS sweeps on the weighted error.
    ``weights`` [rows] >= 0; padding rows get weight 0."""
    cores = [c.clone() for c in cores]
    k_all = len(cores)
    if sweeps == 0 or k_all < 2:
        return cores
    p = [c.shape[0] for c in cores]
    q = [c.shape[2] for c in cores]
    w = pad_rows(table.to(torch.float64), math.prod(p))
    wpad = torch.zeros(math.prod(p), dtype=torch.float64)
    wpad[:table.shape[0]] = weights.to(torch.float64)
    views = []
    for k in range(k_all):
        pl, pr = math.prod(p[:k]), math.prod(p[k + 1:])
        ql, qr = math.prod(q[:k]), math.prod(q[k + 1:])
        views.append((w.reshape(pl, p[k], pr, ql, q[k], qr), wpad.reshape(pl, p[k], pr)))
    for _ in range(sweeps):
        for k in range(k_all - 1, 0, -1):
            _update(cores, k, *views[k])
            _orth_right(cores, k)
        for k in range(k_all - 1):
            _update(cores, k, *views[k])
            _orth_left(cores, k)
    _update(cores, k_all - 1, *views[k_all - 1])
    return cores
