"""DivPrune (Alvar et al., CVPR 2025, arXiv 2503.02175), as its reference code (`vbdi/divprune@799e2d9`,
`llava_arch.py` l.146-171) behaves.

Pre-LLM and text-agnostic, on the projected image embeddings (the language model's input space), per image:
1. Cosine distances D = 1 - X̂ X̂ᵀ between the V embeddings (X̂ = X / ||X||).
2. Greedy max-min diversity, exactly B picks: the first is the token farthest from its nearest neighbour (the
   2nd-smallest entry of its column of D, the smallest being its own ~0); each next one maximises the distance to
   the nearest token already picked. `argmax` takes the first maximal index.
3. The picked tokens enter the language model in raster order, at contiguous positions (a shorter input).

Budget mapping: B tokens exactly (the reference's `round(ratio * V)` with ratio = B / V), per image; `retain=F` keeps
round(F·V) of each image's V. On Qwen the embeddings are the merger's outputs, and the kept tokens keep their own
M-RoPE positions (as LightCompress's Qwen2.5-VL port of DivPrune). The reference computes the
distances in the model's dtype (fp16); ties and near-ties can flip in another dtype: `score_dtype="model"` (default)
uses the model's dtype (fp16 on GPU like the reference, fp32 on CPU), `float32` / `float16` force one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from methods.base import SCORE_DTYPES, ConfigError, TokenPruner

if TYPE_CHECKING:
    from harness.runtime import VisionProbe


def max_min_diverse(features: torch.Tensor, count: int) -> torch.Tensor:
    """(count,) indices picked greedily by max-min cosine distance among the (V, d) `features`, in pick order."""
    normed = features / features.norm(dim=-1, keepdim=True)
    distance = 1.0 - normed @ normed.T
    picked = torch.empty(count, dtype=torch.long, device=features.device)
    nearest = distance.topk(2, dim=0, largest=False).values[1]  # each token's distance to its nearest neighbour
    for i in range(count):
        picked[i] = nearest.argmax()
        # min over the picked rows, kept as a running minimum (the same values: min is exact)
        row = distance[picked[i]]
        nearest = row if i == 0 else torch.minimum(nearest, row)
    return picked


@dataclass
class DivPrune(TokenPruner):
    """Options: `score_dtype` (model|float32|float16: the dtype of the distances), `positions` (compact: a shorter
    input, as the reference)."""

    name: ClassVar[str] = "divprune"
    uses_budget: ClassVar[bool] = True
    score_dtype: str = "model"
    positions: str = "compact"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score_dtype not in ("model", *SCORE_DTYPES):
            raise ConfigError(f"score_dtype must be one of model, {', '.join(SCORE_DTYPES)}, got {self.score_dtype!r}")

    def vision_schedule(self, num_vision: int, num_layers: int) -> list[int]:
        return [self.budget.target(num_vision)] * num_layers

    def reduce_image_embeddings(self, embeddings: torch.Tensor, vision: VisionProbe | None,
                                questions: list[str] | None) -> torch.Tensor:
        scored = embeddings if self.score_dtype == "model" else embeddings.to(SCORE_DTYPES[self.score_dtype])
        # retain=F on images of their own size (LLaVA-NeXT/OneVision) resolves on each image's tokens
        count = self.budget.target(embeddings.shape[1])
        keep = torch.stack([max_min_diverse(image, count).sort().values for image in scored])
        self.sources = [[[int(i)] for i in row] for row in keep]
        return embeddings.gather(1, keep[..., None].expand(-1, -1, embeddings.shape[-1]))
