"""VisionZip (Yang et al., CVPR 2025, arXiv 2412.04467), as its reference code (`dvlab-research/VisionZip`,
`CLIPVisionTower_VisionZip.forward`) behaves.

Pre-LLM and text-agnostic, on the vision tower's feature layer (the one LLaVA reads, index -2):
1. **Dominant** tokens: CLS plus the `dominant - 1` patches that the CLS query attends to most (softmax attention
   summed over heads), in their original order.
2. **Contextual** tokens: the remaining tokens' keys (averaged over heads, L2-normalised) pick `contextual` targets
   at a uniform stride; every other remaining token joins the target it is most similar to (cosine), and each
   contextual token is target + mean of the tokens that joined it.
The projector then sees exactly dominant + contextual tokens (CLS included), so the language model processes that
many image tokens in every layer, at contiguous positions. Budgets: 192 = 162+30, 128 = 108+20, 64 = 54+10 (the
reference's LLaVA-1.5 settings), 32 = 27+5 (its per-crop LLaVA-NeXT one, `budget_per=view`); other budgets need
explicit `dominant` and `contextual`. `retain=F` (per image) splits T = round(F·V) as these settings do, 27:5
(contextual = round(T·5/32)), with at least one of each.

On InternVL the tower's CLS never reaches the language model, and the method runs on each image's projected tokens
(`ModelAdapter.image_probes`: CLS attention summed over each token's 2x2 patches, keys averaged over them): the
dominant tokens are all patches. On towers without CLS (Qwen; models.md §8.2, as the public Qwen ports) the dominant
tokens are the `dominant` merged tokens whose patches receive the most attention in the last ViT block
(`VisionProbe.received`), the contextual merge uses that block's keys averaged over heads and over each token's
patches, and both act on the merger's outputs, per image; a dominant token keeps its own M-RoPE position, a contextual
token its target's. On LLaVA-NeXT/OneVision it acts on each packed image's tokens, like InternVL's, with each view's
signal (NeXT: CLS rows; OneVision's SigLIP: attention received) laid out like them (`PruningRuntime._packed_probe`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from methods.base import ConfigError, TokenPruner

if TYPE_CHECKING:
    from harness.runtime import VisionProbe

# LLaVA-1.5's settings, and 32 = 27+5, the smallest of its per-crop LLaVA-NeXT settings (108+20, 54+10, 27+5)
SETTINGS = {192: (162, 30), 128: (108, 20), 64: (54, 10), 32: (27, 5)}
CONTEXTUAL_SHARE = 5 / 32  # of every setting's budget: 30/192 = 20/128 = 10/64


@dataclass
class VisionZip(TokenPruner):
    """Options: `dominant` and `contextual` (null: from the budget), `positions` (compact: a shorter input)."""

    name: ClassVar[str] = "visionzip"
    needs_vision_probe: ClassVar[bool] = True
    dominant: int | None = None
    contextual: int | None = None
    positions: str = "compact"

    @property
    def uses_budget(self) -> bool:  # explicit counts replace the budget
        return self.dominant is None

    def counts(self, num_vision: int | None = None) -> tuple[int, int]:
        """(dominant, contextual); a `retain` budget on per-image token counts resolves on `num_vision`."""
        if self.dominant is not None and self.contextual is not None:
            return self.dominant, self.contextual
        if self.budget.retain is not None and num_vision is not None:  # a fraction of each image's own tokens
            total = max(self.budget.target(num_vision), 2)  # at least one of each
            contextual = max(round(total * CONTEXTUAL_SHARE), 1)
            return total - contextual, contextual
        tokens = self.budget.tokens
        if tokens not in SETTINGS:
            raise ConfigError(f"VisionZip settings exist for budgets {', '.join(map(str, SETTINGS))}; for budget "
                              f"{tokens} set method.dominant and method.contextual")
        return SETTINGS[tokens]

    def validate(self, num_vision: int, num_layers: int) -> None:
        super().validate(num_vision, num_layers)
        dominant, contextual = self.counts(num_vision)
        if dominant < 1 or contextual < 1 or dominant + contextual > num_vision:
            raise ConfigError(f"dominant ({dominant}) + contextual ({contextual}) must be positive and at most "
                              f"{num_vision}")

    def vision_schedule(self, num_vision: int, num_layers: int) -> list[int]:
        return [sum(self.counts(num_vision))] * num_layers

    def reduce_image_features(self, features: torch.Tensor, vision: VisionProbe | None) -> torch.Tensor:
        dominant, contextual = self.counts(features.shape[1])
        if dominant + contextual >= features.shape[1]:  # an image smaller than the budget: nothing to reduce
            return None
        keys = vision.keys.mean(dim=1)  # (images, N, head_dim)
        if vision.cls_attention is None:  # no CLS: the tokens are the features, ranked by the attention received
            hidden, scores, cls = features, vision.received, 0
        else:  # the patches ranked by the CLS query; CLS leads `hidden` and is always dominant on LLaVA, and is not
            # among InternVL's projected tokens (`hidden_has_cls`)
            cls = int(vision.hidden_has_cls)
            hidden, scores, keys = vision.hidden, vision.cls_attention[:, :, 1:].sum(dim=1), keys[:, 1 - cls:]
        images, n, _ = hidden.shape
        top = scores.topk(dominant - cls, dim=1).indices + cls
        is_dominant = torch.zeros(images, n, dtype=torch.bool, device=hidden.device)
        is_dominant[:, :cls] = True
        is_dominant.scatter_(1, top, 1)  # not True: the jit tracer (harness.fvcore_flops) rejects a bool value
        dominant_tokens = hidden[is_dominant].view(images, dominant, -1)
        rest = hidden[~is_dominant].view(images, n - dominant, -1)
        metric = keys[~is_dominant].view(images, n - dominant, -1)
        metric = metric / metric.norm(dim=-1, keepdim=True)

        step = max(1, metric.shape[1] // contextual)
        is_target = torch.zeros(metric.shape[1], dtype=torch.bool, device=hidden.device)
        is_target[torch.arange(0, metric.shape[1], step, device=hidden.device)[:contextual]] = True
        similarity = metric[:, ~is_target] @ metric[:, is_target].transpose(1, 2)
        joins = similarity.argmax(dim=2, keepdim=True)
        assign = torch.zeros_like(similarity, dtype=hidden.dtype).scatter_(2, joins, 1)
        counts = assign.sum(dim=1).clamp(min=1)[..., None]
        contextual_tokens = rest[:, is_target] + assign.transpose(1, 2) @ rest[:, ~is_target] / counts
        self.sources = self.token_sources(is_dominant, is_target, joins[..., 0], features.shape[1])
        return torch.cat([dominant_tokens, contextual_tokens], dim=1)

    @staticmethod
    def token_sources(is_dominant: torch.Tensor, is_target: torch.Tensor, joins: torch.Tensor,
                      feature_slots: int) -> list[list[list[int]]]:
        """Per image, the feature slots behind each output token: a dominant token its own, a contextual token its
        target's and those of the tokens that joined it. The feature layer holds CLS first, the projector's features
        hold it only under the `full` strategy (LLaVA's default drops it: then CLS comes from no slot)."""
        shift = is_dominant.shape[1] - feature_slots  # 1 when the features lack CLS

        def slots(tokens: list[int]) -> list[int]:
            return [token - shift for token in tokens if token >= shift]

        sources = []
        for dominant, rest, joined in zip(is_dominant, (~is_dominant).nonzero()[:, 1].view(len(is_dominant), -1),
                                          joins.tolist(), strict=True):
            targets, others = rest[is_target].tolist(), rest[~is_target].tolist()
            members = [[target] for target in targets]
            for other, target in zip(others, joined, strict=True):
                members[target].append(other)
            kept = [slots([token]) for token in dominant.nonzero()[:, 0].tolist()]
            sources.append(kept + [slots(m) for m in members])
        return sources
