"""A seeded, Criteo-shaped synthetic click log with a planted teacher.

Definition (every quality result in this project is measured on it):

* ids: feature f has ``rows[f]`` ids; the id of rank r (0 = most frequent) is drawn with
  P(r) ∝ (r + 1)^(-zipf) and mapped to a row by a fixed random permutation (hot rows are not
  the first rows, as in dlrm's preprocessing).
* dense: 13 count-like integers, x_j = floor(exp(N(mu_j, sigma_j))) - 1 (a few are -1, as in
  Criteo); the model sees log(max(x, 0) + 1).
* teacher: each (feature, id) has an independent scalar effect s_f[id] ~ N(0, 1) and a vector
  u_f[id] ~ N(0, I_k) (k = 4); features interact along a fixed random set of pairs P:
      logit = bias + a · Σ_f s_f[id_f] / sqrt(F) + b · Σ_{(f,g)∈P} <u_f, u_g> / sqrt(k |P|)
              + c · w · z(log1p(x)) + N(0, noise²)
  with z the standardised dense vector and w ~ N(0, I / 13).  label ~ Bernoulli(sigmoid(logit)).
  Per-id parameters are independent, so a table cannot be compressed without losing signal
  beyond what access skew allows.  Defaults give ≈ 27% positives and a teacher AUC ≈ 0.88
  (the ceiling with unlimited data); a table DLRM trained one epoch on 300k rows reaches
  ≈ 0.76 on a held-out day, because rare ids are seen too seldom to learn (see README).

``structure="lowrank"`` (the realistic option; the default ``"independent"`` above is kept, draw
for draw, for reproducibility) replaces the independent per-id parameters by ones that share
structure, as the rows of trained real tables do (low effective rank, effects that follow
popularity).  Per feature f, with rank r (``rank``), id i of popularity rank ρ_i:

      z_f[i] ~ N(0, I_r)                      a latent profile in a shared r-dim space
      p_f[i] = standardised −log(ρ_i + 1)     popularity (zero mean, unit variance over lookups)
      s_f[i] = √(1−η²) · (cos φ · ŵ_f·z_f[i] + sin φ · p_f[i]) + η · ε_f[i]
      u_f[i] = √(1−η²) · B_f z_f[i]          + η · ε'_f[i]
  with ŵ_f a random unit vector, B_f [k × r] random unit rows, ε, ε' ~ N(0, 1) the idiosyncratic part
  (η = ``idiosyncratic``, φ = ``popularity_angle``).  Every parameter keeps about unit variance
  as in the independent form, and p is centred under the Zipf lookup distribution (popular ids
  do click more, yet the mean effect per lookup stays zero), so the logit's scale and the
  positive rate stay comparable to the independent form's, but a
  table holding them is (up to the share η²) rank-(r + 1) in the teacher's coordinates: a
  compressed form can keep the signal, as on real tables.  The extra draws come from a stream of
  their own, so ids, dense features and the noise are those of the independent generator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from rewrite.core.batch import Batch

# Criteo Kaggle (Display Advertising Challenge) row counts per categorical feature, as counted
# by dlrm's preprocessing (dlrm README / data_utils.py); used to shape the demo at a scale.
KAGGLE_ROWS = (1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
               27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572)


def demo_rows(cap: int = 20_000) -> tuple[int, ...]:
    """Kaggle's 26 row counts with the big tables capped: the demo model's shape."""
    return tuple(min(r, cap) for r in KAGGLE_ROWS)


@dataclass(frozen=True)
class SyntheticConfig:
    rows: tuple[int, ...] = field(default_factory=demo_rows)
    n_dense: int = 13
    zipf: float = 1.05           # id popularity exponent
    k: int = 4                   # teacher vector width
    n_pairs: int = 40            # interacting feature pairs
    bias: float = -1.6
    id_weight: float = 1.3       # a
    pair_weight: float = 1.6     # b
    dense_weight: float = 0.6    # c
    noise: float = 0.5
    seed: int = 0
    structure: str = "independent"   # or "lowrank": per-id effects share structure (docstring)
    rank: int = 4                    # r: latent rank of the "lowrank" structure
    idiosyncratic: float = 0.2       # η: share (std) of each id's parameters that is its own
    popularity_angle: float = 0.5    # φ (radians): how much of s follows popularity


class Synthetic:
    """The generator: ``sample(n, seed)`` gives (X_int, X_cat, y) like a dlrm .npz."""

    def __init__(self, cfg: SyntheticConfig = SyntheticConfig()):
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        f = len(cfg.rows)
        self.perm = [rng.permutation(r) for r in cfg.rows]
        self.cdf = [np.cumsum((np.arange(r) + 1.0) ** -cfg.zipf) for r in cfg.rows]
        for c in self.cdf:
            c /= c[-1]
        self.s = [rng.standard_normal(r).astype(np.float32) for r in cfg.rows]
        self.u = [rng.standard_normal((r, cfg.k)).astype(np.float32) for r in cfg.rows]
        all_pairs = [(a, b) for a in range(f) for b in range(a + 1, f)]
        pick = rng.choice(len(all_pairs), size=min(cfg.n_pairs, len(all_pairs)), replace=False)
        self.pairs = [all_pairs[i] for i in sorted(pick)]
        self.dense_mu = rng.uniform(0.0, 4.0, cfg.n_dense)
        self.dense_sigma = rng.uniform(0.5, 1.5, cfg.n_dense)
        self.w = (rng.standard_normal(cfg.n_dense) / np.sqrt(cfg.n_dense)).astype(np.float32)
        if cfg.structure == "lowrank":
            self._lowrank()
        elif cfg.structure != "independent":
            raise ValueError(f"structure must be 'independent' or 'lowrank', got {cfg.structure!r}")

    def _lowrank(self) -> None:
        """Replace s and u by the low-rank, popularity-correlated form (module docstring)."""
        cfg = self.cfg
        rng = np.random.default_rng(np.random.SeedSequence(cfg.seed, spawn_key=(3,)))
        eta, phi = cfg.idiosyncratic, cfg.popularity_angle
        for f, rows in enumerate(cfg.rows):
            rank_of_row = np.empty(rows, np.int64)
            rank_of_row[self.perm[f]] = np.arange(rows)
            pop = -np.log(rank_of_row + 1.0)
            weight = np.diff(self.cdf[f], prepend=0.0)[rank_of_row]       # P(lookup of row)
            mean = float(weight @ pop)
            pop = (pop - mean) / (np.sqrt(float(weight @ (pop - mean) ** 2)) or 1.0)
            z = rng.standard_normal((rows, cfg.rank))
            w = rng.standard_normal(cfg.rank)
            w /= np.linalg.norm(w)
            b = rng.standard_normal((cfg.k, cfg.rank))
            b /= np.linalg.norm(b, axis=1, keepdims=True)
            shared = np.sqrt(1 - eta ** 2)
            self.s[f] = (shared * (np.cos(phi) * z @ w + np.sin(phi) * pop)
                         + eta * rng.standard_normal(rows)).astype(np.float32)
            self.u[f] = (shared * z @ b.T
                         + eta * rng.standard_normal((rows, cfg.k))).astype(np.float32)

    def ids(self, n: int, rng: np.random.Generator) -> np.ndarray:
        cols = [p[np.minimum(np.searchsorted(c, rng.random(n)), len(p) - 1)]
                for p, c in zip(self.perm, self.cdf)]
        return np.stack(cols, axis=1).astype(np.int64)

    def logits(self, x_int: np.ndarray, x_cat: np.ndarray) -> np.ndarray:
        cfg, f = self.cfg, x_cat.shape[1]
        s = sum(self.s[j][x_cat[:, j]] for j in range(f)) / np.sqrt(f)
        pair = sum((self.u[a][x_cat[:, a]] * self.u[b][x_cat[:, b]]).sum(1) for a, b in self.pairs)
        pair = pair / np.sqrt(cfg.k * len(self.pairs))
        z = np.log1p(np.maximum(x_int, 0))
        z = (z - np.log1p(np.exp(self.dense_mu))) / self.dense_sigma
        return cfg.bias + cfg.id_weight * s + cfg.pair_weight * pair + cfg.dense_weight * (z @ self.w)

    def sample(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        # a stream of its own: SeedSequence(0) and SeedSequence([0, 0]) are the same stream,
        # which once made profile sampling pick exactly the rows holding the hottest id
        rng = np.random.default_rng(np.random.SeedSequence([self.cfg.seed, seed], spawn_key=(1,)))
        x_cat = self.ids(n, rng)
        x_int = np.floor(np.exp(rng.normal(self.dense_mu, self.dense_sigma, (n, self.cfg.n_dense)))) - 1
        x_int = x_int.astype(np.int32)
        logit = self.logits(x_int, x_cat) + rng.normal(0, self.cfg.noise, n)
        y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int32)
        return x_int, x_cat.astype(np.int32), y

    def teacher_probability(self, x_int: np.ndarray, x_cat: np.ndarray) -> np.ndarray:
        """P(click) without the label noise term: the Bayes-ish ceiling for AUC."""
        return 1 / (1 + np.exp(-self.logits(x_int, x_cat.astype(np.int64))))


def write_npz(path, x_int: np.ndarray, x_cat: np.ndarray, y: np.ndarray) -> None:
    """Write a dlrm-processed day file (uncompressed, so readers can memory-map it)."""
    from rewrite.core.atomic import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, X_int=x_int, X_cat=x_cat, y=y)


def multi_hot_batch(rows: list[int], batch: int, n_dense: int, mean_len: float, seed: int,
                    empty_fraction: float = 0.1, include_max: bool = True) -> Batch:
    """A ragged test batch: Poisson bag lengths, some empty bags, every table's largest id used."""
    rng = np.random.default_rng(seed)
    lengths = rng.poisson(mean_len, (len(rows), batch))
    lengths[rng.random(lengths.shape) < empty_fraction] = 0
    ids = []
    for f, r in enumerate(rows):
        n = int(lengths[f].sum())
        v = rng.integers(0, r, n)
        if include_max and n:
            v[rng.integers(0, n)] = r - 1
        ids.append(v)
    offsets = np.concatenate([[0], np.cumsum(lengths.reshape(-1))])
    dense = rng.standard_normal((batch, n_dense)).astype(np.float32)
    return Batch(torch.from_numpy(dense), torch.from_numpy(np.concatenate(ids).astype(np.int64)),
                 torch.from_numpy(offsets.astype(np.int64)))
