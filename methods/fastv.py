"""FastV (Chen et al., ECCV 2024, arXiv 2403.06764), as its reference code (`pkunlp-icler/FastV`) behaves.

At the input of layer K, keep the vision tokens that the **last prompt token** attended to most in layer K-1
(post-softmax, averaged over heads, restricted to the vision keys); the others are dropped for good, surviving tokens
keep their original RoPE positions, and the KV caches of layers >= K hold only the kept tokens (the inplace / KV-cache
path: one pruning event at prefill, none during decoding).

The paper scores by the attention a token receives from *all* tokens; every reference implementation uses the last
query only (FastV issues #14, #44), and so does this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from methods.base import ConfigError, Probe, ScorerPruner, Selection

if TYPE_CHECKING:
    from harness.runtime import PruneState


@dataclass
class FastV(ScorerPruner):
    """Options: `k` (K, default 2), `ratio` (fraction of vision tokens pruned, as the llava-hf path's `fastv_r`;
    null: the run's budget decides, under its convention)."""

    name: ClassVar[str] = "fastv"
    k: int = 2
    ratio: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ratio is not None and not 0 <= self.ratio < 1:
            raise ConfigError(f"ratio (fraction pruned) must be in [0, 1), got {self.ratio}")

    @property
    def uses_budget(self) -> bool:  # a ratio replaces the budget
        return self.ratio is None

    def validate(self, num_vision: int, num_layers: int) -> None:
        if self.k < 1:
            raise ConfigError(f"FastV scores with layer K-1's attention, so k must be at least 1, got {self.k}")
        super().validate(num_vision, num_layers)

    def keep_count(self, num_vision: int, num_layers: int) -> int:
        if self.ratio is not None:
            return round(num_vision * (1 - self.ratio))
        return super().keep_count(num_vision, num_layers)

    def probe(self, layer: int, state: PruneState) -> Probe | None:
        return Probe(queries=state.last_query) if layer == self.k - 1 else None

    def score(self, state: PruneState) -> torch.Tensor:
        attention = state.probes[self.k - 1].attention[:, :, -1]  # (B, H, keys): the last prompt token's row
        vision = state.vision_index
        self.scores = attention.mean(dim=1).gather(1, vision).masked_fill(~state.vision_valid, float("-inf"))
        return self.scores

    def select(self, layer: int, state: PruneState) -> Selection | None:
        selection = super().select(layer, state)
        if selection is not None:  # how close the cut was: the last kept score minus the first dropped one
            kept, available = (selection.keep >= 0).sum(1).tolist(), state.vision_counts.tolist()
            ranked = self.scores.sort(dim=-1, descending=True).values.float()
            self.margins = [float(ranked[row, k - 1] - ranked[row, k]) if k < v else None
                            for row, (k, v) in enumerate(zip(kept, available, strict=True))]
        return selection

    def record(self, row: int) -> dict:
        return {"score_margin": self.margins[row] if self.margins is not None else None}
