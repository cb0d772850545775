"""Block partials -> per-group totals, in a fixed order, for every backend.

A backend returns, per reduction group, the float64 loss sums and valid
counts of that group's blocks. A group's loss is the math.fsum of all its
block partials: fsum rounds their exact sum once, so the result does not
depend on the order the partials arrive in. That is what lets a call split
into parts (`_groups`) or a map fed chunk by chunk (`Accumulator`) return
what one call over the whole map returns.
"""
import math

import numpy as np


class Partials:
    """Per group (rows), its blocks' loss sums and valid counts; the count and
    first flat index (in the part's walk) of bad targets."""

    __slots__ = ("loss", "count", "bad", "first_bad")

    def __init__(self, loss, count, bad, first_bad):
        self.loss, self.count, self.bad, self.first_bad = loss, count, bad, first_bad


def block_arrays(n_blocks):
    """What a fast kernel fills per block: loss sums, valid counts, bad-target
    counts and first bad index (-1: none)."""
    ints = np.zeros((3, n_blocks), np.int64)
    ints[2] = -1
    return np.zeros(n_blocks), ints[0], ints[1], ints[2]


def from_blocks(part_loss, part_count, part_bad, part_first, n_groups):
    """Partials of a fast kernel's per-block arrays (blocks never cross a group)."""
    per = part_loss.size // n_groups if n_groups else 0
    # (np.count_nonzero costs a third of a sum, and most calls have no bad target)
    bad = int(part_bad.sum()) if np.count_nonzero(part_bad) else 0
    first = int(part_first[np.flatnonzero(part_bad)[0]]) if bad else -1
    return Partials(part_loss.reshape(n_groups, per), part_count.reshape(n_groups, per),
                    bad, first)


class GroupSums:
    """Collects partials of groups identified by result indices (none kept when
    there is one group); exact per-group sums."""

    def __init__(self, size):
        self.size = size
        self.ids, self.loss, self.count = [], [], []

    def add(self, ids, partials):
        """Take in partials of the groups `ids` (result indices; unused, and
        may be None, when there is one group)."""
        per = partials.loss.shape[1]
        if self.size > 1:
            self.ids.append(np.repeat(np.asarray(ids, np.int64), per))
        self.loss.append(partials.loss.ravel())
        self.count.append(partials.count.ravel())

    def merge(self, other):
        """Take in another collection's partials (of the same groups)."""
        self.ids += other.ids
        self.loss += other.loss
        self.count += other.count

    def total(self):
        """(loss, count) of the one group of a full reduction, as a Python float
        and int: all partials are its own."""
        if not self.loss:
            return 0.0, 0
        return (math.fsum(np.concatenate(self.loss).tolist()),
                int(np.add.reduce(np.concatenate(self.count))))

    def totals(self):
        """(loss, count) per result index: fsum of its partials, and their count."""
        loss = np.zeros(self.size)
        count = np.zeros(self.size, np.int64)
        if self.size == 1:
            loss[0], count[0] = self.total()
            return loss, count
        if not self.loss:
            return loss, count
        ids = np.concatenate(self.ids)
        vals = np.concatenate(self.loss)
        np.add.at(count, ids, np.concatenate(self.count))
        order = np.argsort(ids, kind="stable")
        ids, vals = ids[order], vals[order]
        starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
        if starts.size == ids.size:      # one partial per group: its own sum
            loss[ids] = vals
        else:
            for a, b in zip(starts, np.r_[starts[1:], ids.size]):
                loss[ids[a]] = math.fsum(vals[a:b])
        return loss, count
