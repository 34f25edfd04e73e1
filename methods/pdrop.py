"""PyramidDrop / PDrop (Xing et al., CVPR 2025, arXiv 2410.17247), as its reference code
(`Cooperx521/PyramidDrop`, `pdrop_forward` / `pdrop_rank_drop`) behaves.

Stage by stage, at the input of each layer in `layers`, rank the current vision tokens by the attention that the
**last instruction token** would pay them in *that* layer (its own input norm, q/k projections and RoPE on the
current hidden states; fp32 softmax, mean over heads) and keep `int(576 * ratio**s)` of them at stage s. Positions
are re-numbered contiguously after each drop (and decoding continues from the compacted positions).

Schedules: the published default is `layers=[8, 16, 24]` with `ratio=0.5` (T̄_in = 270 on LLaVA-1.5-7B). With a
budget, the author's recipe for small budgets (PyramidDrop issue #29: keep the geometric ratio, move the stages to
[2, 8, 16]) is used and `ratio` is solved so that T̄_in equals the budget (the published 64-token setting, ratio
0.19, is that solution); a pyramid cannot keep N tokens in every layer, so PDrop reads any budget as T̄_in = N (its
own definition), whatever `budget_convention` says. On models of another depth the stage layers are placed at the
same relative depth. Each row of a batch runs its own pyramid on its own vision tokens (rows whose images differ in
size keep different numbers: `supports_ragged_batches`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from methods.base import ConfigError, Selection, TokenPruner, scale_layers

if TYPE_CHECKING:
    from harness.runtime import PruneState

DEFAULT_LAYERS = (8, 16, 24)
BUDGET_LAYERS = (2, 8, 16)


@dataclass
class PDrop(TokenPruner):
    """Options: `layers` (stage boundaries, 0-based inputs; null: [8, 16, 24], or [2, 8, 16] with a budget),
    `ratio` (λ; null: 0.5, or solved from the budget), `positions` (compact, as the reference)."""

    name: ClassVar[str] = "pdrop"
    supports_ragged_batches: ClassVar[bool] = True  # each row ranks and keeps its own vision tokens
    layers: tuple[int, ...] | None = None
    ratio: float | None = None
    positions: str = "compact"

    @property
    def uses_budget(self) -> bool:  # an explicit ratio replaces the budget
        return self.ratio is None

    def validate(self, num_vision: int, num_layers: int) -> None:
        super().validate(num_vision, num_layers)
        self.schedule(num_vision, num_layers)

    def schedule(self, num_vision: int, num_layers: int) -> tuple[list[int], list[int]]:
        """(stage layers, vision tokens kept from each of them)."""
        budgeted = self.ratio is None and self.budget.given
        layers = scale_layers(list(self.layers or (BUDGET_LAYERS if budgeted else DEFAULT_LAYERS)), num_layers)
        if layers != sorted(set(layers)) or layers[0] < 1:
            raise ConfigError(f"layers must be increasing and >= 1, got {layers}")

        def counts(ratio: float) -> list[int]:
            return [int(num_vision * ratio**stage) for stage in range(1, len(layers) + 1)]

        if not budgeted:
            return layers, counts(self.ratio if self.ratio is not None else 0.5)
        # A pyramid cannot hold N tokens in every layer: PDrop's budgets are T̄_in = N whatever the convention.
        spans = [b - a for a, b in zip([0, *layers], [*layers, num_layers], strict=True)]

        def mean_tokens(ratio: float) -> float:
            return sum(n * span for n, span in zip([num_vision, *counts(ratio)], spans, strict=True)) / num_layers

        # `retain=F`: a fraction of these vision tokens; `budget=N` at most all of them (a smaller image keeps them all)
        target = self.budget.target(num_vision)
        low, high = 0.0, 1.0
        if not mean_tokens(low) <= target <= mean_tokens(high):
            given = f" (retain={self.budget.retain:g} of {num_vision})" if self.budget.retain is not None else ""
            raise ConfigError(f"budget {target}{given} is out of reach of PDrop stages {layers} "
                              f"(T̄_in from {mean_tokens(low):.1f} to {mean_tokens(high):.1f})")
        for _ in range(60):  # T̄_in grows with the ratio: bisect for the largest ratio within the budget
            middle = (low + high) / 2
            low, high = (middle, high) if mean_tokens(middle) <= target else (low, middle)
        return layers, counts(low)

    def vision_schedule(self, num_vision: int, num_layers: int) -> list[int]:
        layers, counts = self.schedule(num_vision, num_layers)
        return [([num_vision, *counts])[sum(layer >= start for start in layers)] for layer in range(num_layers)]

    def begin(self, state: PruneState) -> None:
        """Each row's schedule, on its own vision tokens: its stage layers do not depend on them, its counts do."""
        schedules = [self.schedule(count, state.num_layers) for count in state.vision_counts.tolist()]
        layers = schedules[0][0]
        self.stages = {layer: [counts[stage] for _, counts in schedules] for stage, layer in enumerate(layers)}

    def select(self, layer: int, state: PruneState) -> Selection | None:
        if layer not in self.stages:
            return None
        probs = state.attention_preview(state.last_query)  # (B, H, 1, n), this layer's own projections
        scores = probs[:, :, 0].mean(dim=1).gather(1, state.vision_index)
        # A ragged batch's shorter rows end in padding entries of `vision_index`: each row ranks its own tokens only.
        keep = [row_scores[:current].topk(min(stage, current)).indices.sort().values for row_scores, current, stage
                in zip(scores, state.vision_counts.tolist(), self.stages[layer], strict=True)]
        return Selection(keep=torch.nn.utils.rnn.pad_sequence(keep, batch_first=True, padding_value=-1))
