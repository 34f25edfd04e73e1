"""Random pruning: a uniformly random subset of the vision tokens, kept from layer `k` on.

The control every pruning method must beat (Wen et al., ACL'25 Findings, arXiv 2502.11501, find it often does not).
As in LightCompress's `RandomPrune`, tokens are physically dropped with their original RoPE positions; unlike FastV's
built-in random mode (unseeded Python `random`), each sample's subset comes from its own generator, seeded from
`seed` and the sample id, so reruns and batch composition never change it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from methods.base import ScorerPruner

if TYPE_CHECKING:
    from harness.runtime import PruneState


def sample_seed(seed: int, sample_id) -> int:
    """A stable 63-bit seed for one sample (Python's hash() is salted per process)."""
    digest = hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass
class RandomPruner(ScorerPruner):
    """Options: `k` (layer whose input is pruned; 0 = before the language model), `seed`, `positions`."""

    name: ClassVar[str] = "random"
    seed: int = 0

    def score(self, state: PruneState) -> torch.Tensor:
        device = state.is_vision.device
        rows = []
        for sample_id in state.sample_ids:
            generator = torch.Generator().manual_seed(sample_seed(self.seed, sample_id))
            rows.append(torch.rand(state.num_vision, generator=generator))
        return torch.stack(rows).to(device)
