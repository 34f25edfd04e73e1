"""VisPruner (Zhang et al., ICCV 2025, arXiv 2412.01818, "Beyond Text-Visual Attention: Exploiting Visual Cues for
Effective Token Pruning in VLMs"), as its reference code (`Theia-4869/VisPruner@aefa01a`,
`LlavaMetaForCausalLM.encode_images`) behaves.

Pre-LLM and text-agnostic, on the vision tower's feature layer (the one LLaVA reads, index -2), per image, budget T:
1. **Important** tokens: the ⌊T·r⌋ patches the CLS query attends to most (softmax attention averaged over heads).
2. **Diverse** tokens from the rest, by duplicate removal: while more than T - ⌊T·r⌋ remain, split the remaining list
   into its even and odd places, score each even-place token by its best cosine match among the odd-place ones, and
   drop the (at most 8) best-matched; the survivors of the even places, most-matched first, then the odd places form
   the next list.
3. The projector sees exactly the T selected patch features, in raster order; the language model gets them at
   contiguous positions (a shorter input).

On towers without CLS (Qwen, OneVision; the reference has no such code) the important tokens are those whose patches
receive the most attention in the last ViT block (`VisionProbe.received`), and both steps run on the merger's outputs,
which keep their own M-RoPE positions; T is per image (`retain=F`: round(F·V) of each image's V).

Arithmetic: the reference sorts fp16 scores with an unstable sort, so ties and near-ties may order differently in
another dtype; `score_dtype="model"` (default) scores in the features' dtype (fp16 on GPU, like the reference),
`float32`/`float16` force one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from methods.base import ConfigError, TokenPruner

if TYPE_CHECKING:
    from harness.runtime import VisionProbe

DTYPES = {"float32": torch.float32, "float16": torch.float16}
DROP_STEP = 8  # duplicates removed per round (hard-coded in the reference)


@dataclass
class VisPruner(TokenPruner):
    """Options: `important_ratio` r (the reference's default 0.5: T/2 important, T/2 diverse), `score_dtype`
    (model|float32|float16), `positions` (compact: a shorter input)."""

    name: ClassVar[str] = "vispruner"
    uses_budget: ClassVar[bool] = True
    needs_vision_probe: ClassVar[bool] = True
    important_ratio: float = 0.5
    score_dtype: str = "model"
    positions: str = "compact"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.important_ratio <= 1:
            raise ConfigError(f"important_ratio must be in [0, 1], got {self.important_ratio}")
        if self.score_dtype not in ("model", *DTYPES):
            raise ConfigError(f"score_dtype must be one of model, {', '.join(DTYPES)}, got {self.score_dtype!r}")

    def vision_schedule(self, num_vision: int, num_layers: int) -> list[int]:
        return [self.budget.target(num_vision)] * num_layers

    def reduce_image_features(self, features: torch.Tensor, vision: VisionProbe | None) -> torch.Tensor:
        if vision.cls_attention is None:  # no CLS: the attention each token receives
            attention = vision.received
        else:
            attention = vision.cls_attention[:, :, 1:].mean(dim=1)  # (images, V): CLS row over the patches
        if self.score_dtype != "model":
            attention, normed = attention.to(DTYPES[self.score_dtype]), features.to(DTYPES[self.score_dtype])
        else:
            normed = features
        normed = normed / normed.norm(dim=-1, keepdim=True)
        total = self.budget.target(features.shape[1])
        kept = [self.select_tokens(a, f, total) for a, f in zip(attention, normed, strict=True)]
        self.sources = [[[i] for i in index.tolist()] for index in kept]
        return torch.stack([image[index] for image, index in zip(features, kept, strict=True)])

    def select_tokens(self, attention: torch.Tensor, normed: torch.Tensor, total: int) -> torch.Tensor:
        """Indices of the `total` (T) kept patches of one image, ascending, from its (V,) CLS attention and (V, d)
        unit features."""
        important = int(total * self.important_ratio)
        order = attention.argsort(descending=True)
        diverse = total - important
        residual = order[important:] if diverse else order[:0]  # r = 1: important tokens only
        while (drop := min(DROP_STEP, residual.numel() - diverse)) > 0:
            even, odd = residual[0::2], residual[1::2]
            best_match = (normed[even] @ normed[odd].T).max(dim=-1).values
            residual = torch.cat([even[best_match.argsort(descending=True)[drop:]], odd])
        return torch.cat([order[:important], residual]).sort().values
