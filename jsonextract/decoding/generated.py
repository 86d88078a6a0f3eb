"""What a decoding call returns (`Generated`), and running totals over calls (`DecodeStats`)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Generated:
    tokens: list[list[int]]  # per row, the emitted tokens (eos last when the row ended)
    logprobs: list[list[float]]  # per emitted token, its log-probability under the masked distribution (at the temperature)
    forward_passes: int = 0  # model calls, prefix and prompt included
    drafted: int = 0  # tokens proposed by jump-forward
    accepted: int = 0  # drafted tokens the model confirmed: emitted without a forward pass of their own
    ended: int = 0  # tokens of forced endings (`forced_end`): emitted without any pass, the row done
    fed: int = 0  # positions the model computed (prompt and decode passes, padding included)
    padding: int = 0  # of which padding: no token (left padding, short chunks, finished rows kept by generate())
    raw_logprobs: list[list[float]] | None = None  # the same at temperature 1 (None: equal to logprobs)


@dataclass
class DecodeStats:
    """Running totals over generate calls (what bench/extract.py reports)."""
    calls: int = 0
    output_tokens: int = 0
    forward_passes: int = 0
    drafted: int = 0
    accepted: int = 0
    ended: int = 0
    fed: int = 0
    padding: int = 0

    def add(self, g: Generated) -> None:
        self.calls += 1
        self.output_tokens += sum(len(t) for t in g.tokens)
        self.forward_passes += g.forward_passes
        self.drafted += g.drafted
        self.accepted += g.accepted
        self.ended += g.ended
        self.fed += g.fed
        self.padding += g.padding

    def as_dict(self) -> dict:
        return {**self.__dict__, "forced_share": (self.accepted + self.ended) / max(self.output_tokens, 1)}
