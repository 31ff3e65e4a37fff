"""What the passes that share one stored row among several ids (``hash``, ``qr``) have in common:
the collisions knob (or ``compression``, which picks it per table), dlrm's 200-row threshold,
and the fit's error gate."""

from __future__ import annotations

from dataclasses import dataclass

from rewrite.core.pass_contract import Selection, option

DLRM_THRESHOLD = 200     # rows; dlrm_s_pytorch.py --qr-threshold / --md-threshold: only larger tables


@dataclass(frozen=True)
class BucketOptions(Selection):
    min_rows: int = option(DLRM_THRESHOLD + 1, "leave tables with fewer rows alone (dlrm's --qr-threshold: "
                           "only tables with more than 200 rows)")
    collisions: int = option(4, "ids per stored row on average (qr: W_r has c rows, W_q ceil(rows / c); "
                             "hash: ceil(rows / c) buckets)")
    compression: float | None = option(None, "bytes ratio; when given it replaces collisions, chosen per "
                                             "table (hash: rows / compression buckets; qr: the fewest "
                                             "collisions whose two tables fit)")
    max_error: float = option(0.9, "fail when ||Δe|| / ||e|| over the sample bags exceeds this "
                                   "(1 = no better than zeros)")

    def __post_init__(self):
        if self.collisions < 2:
            raise ValueError(f"collisions must be >= 2, got {self.collisions}")
        if self.compression is not None and not self.compression > 1:
            raise ValueError(f"compression must be > 1, got {self.compression}")
        if not self.max_error > 0:
            raise ValueError(f"max_error must be > 0, got {self.max_error}")
