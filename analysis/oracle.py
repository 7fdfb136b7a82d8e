"""The oracle upper bound at every depth: oracle@j = some prediction among ranks 1..j is correct.

Computed from each query's best correct rank, so all depths cost one pass.
"""

from __future__ import annotations

import numpy as np

from .consistency import QueryMetrics


def oracle_at_k(qm: QueryMetrics) -> np.ndarray:
    """Correct-query counts of oracle@j for j = 1..k (index j-1)."""
    k = qm.matrix.k
    hits = np.bincount(qm.first_correct_rank, minlength=k + 1)[1:k + 1]
    return np.cumsum(hits)
