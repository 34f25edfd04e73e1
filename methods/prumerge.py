"""LLaVA-PruMerge and PruMerge+ (Shang et al., ICCV 2025, arXiv 2403.15388, "LLaVA-PruMerge: Adaptive Token Reduction
for Efficient Large Multimodal Models"), as the reference code (`42Shawn/LLaVA-PruMerge@097c041`,
`CLIPVisionTower.token_prune_merge_advanced` and `token_prune_merge_advanced_plus`) behaves.

Pre-LLM, on the V patch features LLaVA reads (feature layer -2), per image:
1. **Attention.** A single-head attention of the CLS query over all tokens, from the *last* ViT layer's raw q_proj /
   k_proj outputs over the full width d: softmax(q·Kᵀ/√d); a = its row over the patches.
2. **Adaptive selection.** The patches with a > Q3 + 1.5·IQR of a (numpy percentiles) are kept, by attention
   descending. PruMerge+ adds the patches 0, s, 2s, ... < V-1 that are not kept yet, ascending, with
   s = ⌊⌊1/ratio⌋/3⌋ and ratio = outliers / V.
3. **Merge** (not a weighted average): each kept token becomes x_i + Σ a_j·x_j over the 32 tokens whose unit keys are
   most similar to its own, among *all* other patches (kept ones included), with the un-merged features; one extra
   token Σ a_j·x_j sums every non-kept patch.
The projector sees the kept tokens in that order (outliers, samples, extra token: not raster), at contiguous
positions. The count is the image's own (outliers + 1, plus the samples for PruMerge+): the budget is not used.

On towers without CLS (Qwen, OneVision; the reference has none, models.md §8.2) a is the attention each merged token's
patches receive in the last ViT block (`VisionProbe.received`), normalised to sum to 1 over the image like a CLS row,
and the keys are that block's per-head keys averaged over each token's patches, heads concatenated; the tokens merged
are the merger's outputs. Each token keeps its own M-RoPE position (a merged token its centre's, the extra token that of
the first token it sums), and an image of at most `neighbours` tokens merges all the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from methods.base import ConfigError, TokenPruner

if TYPE_CHECKING:
    from harness.runtime import VisionProbe

VARIANTS = ("plus", "prumerge")
IQR_FACTOR = 1.5


def iqr_outliers(attention: torch.Tensor) -> int:
    """How many values lie above Q3 + 1.5·IQR, computed as the reference does (numpy, float32, linear percentiles)."""
    values = attention.float().cpu().numpy()
    q1, q3 = np.percentile(values, 25), np.percentile(values, 75)
    return int((values > q3 + IQR_FACTOR * (q3 - q1)).sum())


@dataclass
class PruMerge(TokenPruner):
    """Options: `variant` (plus: PruMerge+, the reference's default forward; prumerge: outliers only),
    `neighbours` (keys merged into each kept token, the reference's 32), `positions` (compact: a shorter input)."""

    name: ClassVar[str] = "prumerge"
    supports_batching: ClassVar[bool] = False  # the count differs per image
    needs_vision_probe: ClassVar[bool] = True
    vision_probe_layer: ClassVar[int | None] = -1  # the last ViT layer's q/k, not the feature layer's
    record_keys: ClassVar[tuple[str, ...]] = ("outliers",)
    variant: str = "plus"
    neighbours: int = 32
    positions: str = "compact"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.neighbours < 1:
            raise ConfigError(f"neighbours must be at least 1, got {self.neighbours}")
        self.outliers: int | None = None  # of the last image reduced

    def validate(self, num_vision: int, num_layers: int) -> None:
        super().validate(num_vision, num_layers)
        if self.neighbours >= num_vision:
            raise ConfigError(f"neighbours must be below the {num_vision} vision tokens, got {self.neighbours}")

    def record(self, row: int) -> dict:
        return {"outliers": self.outliers}

    def reduce_image_features(self, features: torch.Tensor, vision: VisionProbe | None) -> torch.Tensor:
        keys = vision.keys.transpose(1, 2).flatten(2)  # (images, [1 +] V, d): heads concatenated
        if vision.cls_query is None:  # no CLS: the attention each token receives, a distribution like a CLS row
            attention = vision.received / vision.received.sum(dim=-1, keepdim=True)
        else:
            query = vision.cls_query.transpose(1, 2).flatten(2)  # (images, 1, d): heads concatenated, unscaled
            attention = ((query @ keys.transpose(1, 2)) * keys.shape[-1] ** -0.5).softmax(dim=-1)[:, 0, 1:]
            keys = keys[:, 1:]
        outputs, self.sources = [], []
        for image, image_keys, image_attention in zip(features, keys, attention, strict=True):
            kept = self.select_tokens(image_attention)
            merged, sources = self.merge(image, F.normalize(image_keys, dim=-1), image_attention, kept)
            outputs.append(merged)
            self.sources.append(sources)
        return torch.stack(outputs)

    def select_tokens(self, attention: torch.Tensor) -> torch.Tensor:
        """The kept patches of one image, in the reference's order: IQR outliers by attention descending, then (plus)
        the uniform samples not already kept, ascending."""
        num_vision = attention.shape[0]
        self.outliers = iqr_outliers(attention)
        ratio = self.outliers / num_vision
        kept = attention.topk(int(num_vision * ratio)).indices
        if self.variant == "plus" and ratio > 0:  # the reference divides by zero without outliers
            stride = int(int(1 / ratio) / 3)
            samples = torch.arange(0, num_vision - 1, stride, device=attention.device)  # the reference's 575 = V-1
            kept = torch.cat([kept, samples[~torch.isin(samples, kept)]])
        return kept

    def merge(self, features: torch.Tensor, unit_keys: torch.Tensor, attention: torch.Tensor,
              kept: torch.Tensor) -> tuple[torch.Tensor, list[list[int]]]:
        """(kept + 1, d) merged tokens and, per token, the patches it comes from (its own first)."""
        is_kept = torch.zeros(features.shape[0], dtype=torch.bool, device=features.device)
        is_kept[kept] = True
        pruned = (~is_kept).nonzero()[:, 0]  # ascending
        candidates = torch.cat([kept, pruned])  # the reference's "rest" order, with the token itself masked below
        similarity = unit_keys[kept] @ unit_keys[candidates].T  # (kept, V)
        similarity[torch.arange(kept.numel()), torch.arange(kept.numel())] = float("-inf")
        count = min(self.neighbours, features.shape[0] - 1)  # small images (Qwen) have fewer others
        neighbours = candidates[similarity.topk(count, dim=-1).indices]  # (kept, neighbours)
        centres = features[kept] + (features[neighbours] * attention[neighbours][..., None]).sum(dim=1)
        extra = (features[pruned] * attention[pruned][:, None]).sum(dim=0, keepdim=True)
        sources = [[i, *row] for i, row in zip(kept.tolist(), neighbours.tolist(), strict=True)] + [pruned.tolist()]
        return torch.cat([centres, extra]), sources
