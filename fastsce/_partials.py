"""Block partials -> totals, in a fixed order, for both fast backends."""
import math

import numpy as np

from ._reference import Totals


def combine(part_loss, part_count, part_bad, part_first):
    """Totals of per-block partials.

    math.fsum rounds the exact sum of the float64 block partials once, so the
    total does not depend on any combination order at all.
    """
    hit = np.flatnonzero(part_bad)
    return Totals(
        loss=math.fsum(part_loss),
        count=int(part_count.sum()),
        bad=int(part_bad.sum()),
        first_bad=int(part_first[hit[0]]) if hit.size else -1,
    )
