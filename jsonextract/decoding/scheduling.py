"""How a batch is cut into passes: prompt length groups, the width of each decode pass (`PassCost`, learnt from
the passes themselves), and which batch slots move when rows finish."""
from __future__ import annotations


class PassCost:
    """What one decode pass costs, learnt from the passes themselves: seconds = overhead + per_position x
    positions (a least-squares line over the passes timed so far). Jump-forward widens a pass to the longest
    draft and pads the other rows; where compute per position dominates (a CPU), a wide pass for a few drafts
    costs more than the passes it saves, so the loop picks the chunk width with the most tokens per second
    under this line. Until it has measured, it assumes `prior` positions' worth of overhead per pass."""

    def __init__(self, prior: float):
        self.prior = prior
        self.n = self.sx = self.sy = self.sxx = self.sxy = 0.0

    @classmethod
    def for_device(cls, device) -> "PassCost":
        # Until the line is learnt (8 passes): on a CPU a pass's fixed cost is small next to its compute per
        # position; on a GPU at these batch sizes a pass is nearly all fixed cost, so every pass goes full width.
        return cls(prior=2.0 if str(device).startswith("cpu") else 1e4)

    def add(self, positions: int, seconds: float) -> None:
        self.n += 1
        self.sx += positions
        self.sy += seconds
        self.sxx += positions * positions
        self.sxy += positions * seconds

    def overhead_positions(self) -> float:
        """The fixed cost of a pass, in positions' worth of compute."""
        var = self.n * self.sxx - self.sx * self.sx
        if self.n < 8 or var <= 0:
            return self.prior
        slope = (self.n * self.sxy - self.sx * self.sy) / var
        if slope <= 0:
            return 1e4  # no measurable cost per position: passes are all overhead (a GPU at small batch)
        return min(max((self.sy - slope * self.sx) / self.n / slope, 0.0), 1e4)

    def best_width(self, lengths: list[int]) -> int:
        """Chunk width maximising tokens advanced per unit of cost, for rows wanting `lengths` positions."""
        k0 = self.overhead_positions()
        return max(sorted(set(lengths)), key=lambda T: sum(min(n, T) for n in lengths) / (k0 + len(lengths) * T))


def length_groups(lengths: list[int], overhead: float) -> list[list[int]]:
    """Rows (indices into `lengths`) sorted by length and cut into contiguous groups minimising the positions
    computed, padding included, plus `overhead` positions per pass (an exact partition by dynamic programming)."""
    order = sorted(range(len(lengths)), key=lambda j: lengths[j])
    best = [0.0] + [float("inf")] * len(order)  # best[e]: cost of the first e rows
    cut = [0] * (len(order) + 1)
    for e in range(1, len(order) + 1):
        for b in range(e):  # group order[b:e], padded to its longest row, lengths[order[e - 1]]
            c = best[b] + overhead + (e - b) * lengths[order[e - 1]]
            if c < best[e]:
                best[e], cut[e] = c, b
    groups, e = [], len(order)
    while e:
        groups.append(order[cut[e]:e])
        e = cut[e]
    return groups[::-1]


def fill_holes(keep: list[int]) -> list[int]:
    """The batch slots to keep (ascending), in the order that moves the fewest rows: slots below len(keep) stay
    where they are and the last kept slots move into the holes the finished rows leave. [0, 2, 3, 5] -> [0, 5, 2, 3]:
    only row 5 moves, where keeping the order would move 2, 3 and 5."""
    n, kept = len(keep), set(keep)
    tail = iter(s for s in keep if s >= n)
    return [s if s in kept else next(tail) for s in range(n)]


def common_prefix(rows: list[list[int]]) -> int:
    first = rows[0]
    n = min(len(r) for r in rows)
    for r in rows[1:]:
        k = 0
        while k < n and r[k] == first[k]:
            k += 1
        n = k
    return n
