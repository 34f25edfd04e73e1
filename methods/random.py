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


def generator_seed(seed: int, sample_id, explicit: int | None) -> int:
    """The seed of a method's generator for one sample: `explicit` where the user set one (to replay a recorded
    draw), else derived from the method's `seed` and the sample id."""
    return explicit if explicit is not None else sample_seed(seed, sample_id)


@dataclass
class RandomPruner(ScorerPruner):
    """Options: `k` (layer whose input is pruned; 0 = before the language model), `seed`, `generator_seed` (null;
    set: every sample's generator seed, as recorded), `positions`."""

    name: ClassVar[str] = "random"
    seed: int = 0
    generator_seed: int | None = None

    def score(self, state: PruneState) -> torch.Tensor:
        device = state.is_vision.device
        self.drawn_seeds = [generator_seed(self.seed, sample_id, self.generator_seed)
                            for sample_id in state.sample_ids]
        # Each row draws its own count, as it would alone (a ragged batch pads the shorter rows).
        rows = [torch.rand(count, generator=torch.Generator().manual_seed(seed))
                for count, seed in zip(state.vision_counts.tolist(), self.drawn_seeds, strict=True)]
        return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=float("-inf")).to(device)

    def record(self, row: int) -> dict:
        return {"generator_seed": self.drawn_seeds[row]}
