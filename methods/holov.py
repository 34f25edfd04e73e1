"""HoloV (Zou et al., NeurIPS 2025, arXiv 2510.02912, "Don't Just Chase 'Highlighted Tokens' in MLLMs"), as its
reference code (`obananas/HoloV@1d2e65e`, `llava/model/utils.py` l.22-151) behaves.

Pre-LLM, on the projected image embeddings, with the vision tower's CLS attention of the feature layer (averaged over
heads), per image of V tokens and budget K:
1. **Crops**: the raster sequence cut into C contiguous 1-D chunks (the first V mod C one token longer).
2. **Crop score** s_c = mean_i(A_i + 0.09 γ_c V_i): A = 1000 · attention, V_i the variance of token i's cosine
   similarities to the other tokens of its chunk (diagonal zeroed but counted), γ_c = mean|A| / (mean|V| + 1e-6).
   A chunk of one token scores its raw attention.
3. **Allocation**: q_c = floor(K s_c / (Σ s + 1e-6)), then +1 to the chunks of the largest weights until K.
4. **Selection**: a chunk with q_c >= its length is kept whole (raster order; the surplus is lost, not
   redistributed); otherwise its q_c tokens of highest raw attention, in descending attention order.
5. Chunks in order; if fewer than K tokens came out, **zero vectors** fill up to K: they enter the language model
   as image tokens (so T̄_in is K, and a zero embedding is what the model attends to in those slots).

The language model sees the K tokens at contiguous positions, in that (not raster) order. Crops: the LLaVA code
hard-codes 16 at K = 64; its Qwen2.5-VL code sets C = max(1, int(1024 / 576 · V / K)), which gives the same 16 at 64
(and 8 at 128, 5 at 192): `chunks: null` uses that rule. Arithmetic as the reference: similarities in the model's
dtype, the rest in fp32.

On Qwen (and OneVision's SigLIP, per view), the reference's own Qwen2.5-VL path (`qwen-model-HoloV`): the attention each
merged token's 2x2 patches receive in the last ViT block (`VisionProbe.received`) instead of CLS attention, on the
merger's outputs, with the kept tokens' own M-RoPE positions; K per image (`retain=F`: round(F·V), where the reference
floors). Its two bugs are not reproduced: the scores are mapped from the ViT's window order back to raster order (the
reference leaves them permuted), and the pruned span is the image's tokens (the reference's is shifted by one). Each
kept token stays in its own slot, so the language model sees them in raster order; zero padding takes the image's last
free slots (the reference gives it the position of the image's last token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from methods.base import ConfigError, TokenPruner

if TYPE_CHECKING:
    from harness.runtime import VisionProbe

ATTENTION_SCALE = 1e3
VARIANCE_WEIGHT = 0.09  # the code's `alpha`
EPS = 1e-6


def chunk_bounds(num_tokens: int, chunks: int) -> list[tuple[int, int]]:
    """[start, end) of `chunks` contiguous chunks; the first num_tokens % chunks get one extra token."""
    size, extra = divmod(num_tokens, chunks)
    bounds, start = [], 0
    for c in range(chunks):
        end = start + size + (c < extra)
        if end > start:
            bounds.append((start, end))
        start = end
    return bounds


def crop_score(tokens: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
    """s_c: the mean holistic score of one chunk ((M, d) tokens, (M,) fp32 attention)."""
    m = tokens.shape[0]
    if m <= 1:
        return attention.mean()
    normed = tokens / (tokens.norm(dim=1, keepdim=True) + EPS)
    similarity = (normed @ normed.T).float() * (1 - torch.eye(m, device=tokens.device))
    mean = similarity.sum(dim=1) / (m - 1)
    variance = ((similarity - mean[:, None]) ** 2).sum(dim=1) / (m - 1)  # the zeroed diagonal counts too
    scaled = attention * ATTENTION_SCALE
    gamma = scaled.abs().mean() / (variance.abs().mean() + EPS)
    return (scaled + VARIANCE_WEIGHT * gamma * variance).mean()


def allocate(scores: torch.Tensor, budget: int) -> torch.Tensor:
    """Tokens per chunk: floor of the budget's share by score, the remainder to the largest weights."""
    weights = scores / (scores.sum() + EPS)
    quota = (weights * budget).floor().long()
    remaining = budget - int(quota.sum())
    if remaining > 0:
        quota[weights.topk(min(remaining, len(weights))).indices] += 1
    return quota


def holov_keep(tokens: torch.Tensor, attention: torch.Tensor, chunks: int, budget: int) -> list[int]:
    """Indices of the kept tokens of one image, in HoloV's order (at most `budget`; fewer when quota overflowed)."""
    bounds = chunk_bounds(tokens.shape[0], chunks)
    scores = torch.stack([crop_score(tokens[s:e], attention[s:e]) for s, e in bounds])
    kept: list[int] = []
    for (start, end), quota in zip(bounds, allocate(scores, budget).tolist(), strict=True):
        if quota >= end - start:
            kept.extend(range(start, end))
        elif quota > 0:
            kept.extend((start + attention[start:end].topk(quota).indices).tolist())
    return kept


@dataclass
class HoloV(TokenPruner):
    """Options: `chunks` (C; null: the reference's rule from the budget), `positions` (compact: a shorter input, as
    the reference)."""

    name: ClassVar[str] = "holov"
    uses_budget: ClassVar[bool] = True
    needs_vision_probe: ClassVar[bool] = True
    record_keys: ClassVar[tuple[str, ...]] = ("padding_tokens",)  # zero vectors among the budget's image tokens
    chunks: int | None = None
    positions: str = "compact"

    def validate(self, num_vision: int, num_layers: int) -> None:
        super().validate(num_vision, num_layers)
        if self.chunks is not None and not 1 <= self.chunks <= num_vision:
            raise ConfigError(f"chunks must be null or in 1..{num_vision}, got {self.chunks}")

    def num_chunks(self, num_vision: int) -> int:
        if self.chunks is not None:
            return self.chunks
        return max(1, int(1024 / 576 * num_vision / self.budget.target(num_vision)))

    def vision_schedule(self, num_vision: int, num_layers: int) -> list[int]:
        return [self.budget.target(num_vision)] * num_layers  # zero padding fills any shortfall

    def reduce_image_embeddings(self, embeddings: torch.Tensor, vision: VisionProbe | None,
                                questions: list[str] | None) -> torch.Tensor:
        if vision.cls_attention is None:  # no CLS (Qwen): the attention each token receives, as HoloV-Qwen
            attention = vision.received.float()
        else:
            attention = vision.cls_attention[:, :, 1:].mean(dim=1).float()  # CLS row over the patches, head mean
        budget = self.budget.target(embeddings.shape[1])
        chunks = self.num_chunks(embeddings.shape[1])
        reduced = embeddings.new_zeros(embeddings.shape[0], budget, embeddings.shape[2])
        self.sources = []
        for image, (tokens, scores) in enumerate(zip(embeddings, attention, strict=True)):
            kept = holov_keep(tokens, scores, chunks, budget)
            reduced[image, :len(kept)] = tokens[kept]
            self.sources.append([[i] for i in kept] + [[] for _ in range(budget - len(kept))])  # [] = zero padding
        return reduced

    def record(self, row: int) -> dict:
        return {"padding_tokens": sum(not source for source in self.sources[row])}
