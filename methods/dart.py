"""DART (Wen et al., EMNLP 2025, arXiv 2502.11494, "Stop Looking for Important Tokens in Multimodal Language Models:
Duplication Matters More"), as its reference code behaves (`ZichenWen1/DART`, read in the vendored copy
`Chenfei-Liao/VTC-Bench@983e443` `external/DART/llava/model/language_model/modeling_llama_self.py`,
`DART.get_retained_image_token`; cross-checked with `ModelTC/LightCompress@9701d03`).

Inside the language model, once at prefill, at the input of decoder layer K (default 2), from what layer K-1 made:
1. **Pivots.** The L1 norm of each token's post-RoPE key in layer K-1 (all heads concatenated); the 4 image tokens
   and the 4 text tokens *after* the image with the largest norms are the pivots.
2. **Duplicates.** Layer K-1's output through the final norm (the one before lm_head) is each token's state. For each
   pivot in the iteration order of the Python set the reference builds, the T pool tokens least similar to it
   (lowest cosine) are kept and leave the pool; the pool starts as every image token but the image pivots.
3. Text pivots are removed again: the image keeps its 4 pivots plus 8·T tokens, T = ⌊B/8⌋ (the reference's
   `max_num_trunction // 8`): 196 / 132 / 68 for B = 192 / 128 / 64, four more than B. Kept tokens keep their
   original RoPE positions and order; layers >= K (and their KV caches) see only them.

The reference runs batch 1; here each row is selected alone, on its own vision tokens (rows whose images differ in
size keep different numbers: `supports_ragged_batches`), with the pivots' set order taken from indices into the row
without its left padding (the reference's unpadded indices). An image too small for T tokens per pivot keeps all.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from methods.base import ConfigError, Probe, ScorerPruner, Selection

if TYPE_CHECKING:
    from harness.runtime import PruneState

IMAGE_PIVOTS, TEXT_PIVOTS = 4, 4


@dataclass
class DART(ScorerPruner):
    """Options: `k` (K, the layer whose input is pruned, default 2 as the paper and the LLaVA scripts; layers
    0..K-1 see every token)."""

    name: ClassVar[str] = "dart"
    k: int = 2

    def validate(self, num_vision: int, num_layers: int) -> None:
        if self.k < 1:
            raise ConfigError(f"DART reads layer K-1's keys and states, so k must be at least 1, got {self.k}")
        super().validate(num_vision, num_layers)
        if self.keep_count(num_vision, num_layers) > num_vision:
            raise ConfigError(f"DART keeps 4 + 8*(budget//8) tokens: budget {self.budget.tokens} asks for more than "
                              f"the model's {num_vision} vision tokens")

    def keep_count(self, num_vision: int, num_layers: int) -> int:
        """4 image pivots + T tokens for each of the 8 pivots, T = budget // 8."""
        return IMAGE_PIVOTS + (IMAGE_PIVOTS + TEXT_PIVOTS) * self.per_pivot(num_vision, num_layers)

    def per_pivot(self, num_vision: int, num_layers: int) -> int:
        return super().keep_count(num_vision, num_layers) // (IMAGE_PIVOTS + TEXT_PIVOTS)

    def probe(self, layer: int, state: PruneState) -> Probe | None:
        return Probe(queries=None, keys=True) if layer == self.k - 1 else None

    def select(self, layer: int, state: PruneState) -> Selection | None:
        if layer != self.k:
            return None
        keys = state.probes[self.k - 1].keys  # (B, kv_heads, n, head_dim)
        key_norms = keys.transpose(1, 2).flatten(2).abs().sum(dim=-1)  # L1 over heads x head_dim
        states = state.final_norm(state.hidden_states)
        vision = state.vision_index  # a ragged batch's shorter rows end in padding entries: each row reads its own
        keep = [self.retained(key_norms[row], states[row], vision[row, :count], state.valid[row],
                              self.per_pivot(count, state.num_layers))
                for row, count in enumerate(state.vision_counts.tolist())]
        return Selection(keep=torch.nn.utils.rnn.pad_sequence(keep, batch_first=True, padding_value=-1))

    def retained(self, key_norms: torch.Tensor, states: torch.Tensor, vision: torch.Tensor, valid: torch.Tensor,
                 per_pivot: int) -> torch.Tensor:
        """Indices into `vision` (one row's image tokens, ascending: contiguous, except for LLaVA-NeXT/OneVision's
        newline slots, which are not among them) of the kept image tokens, ascending."""
        start, end = int(vision[0]), int(vision[-1]) + 1
        if key_norms.shape[0] - end < TEXT_PIVOTS:
            raise ValueError(f"DART needs at least {TEXT_PIVOTS} text tokens after the image for its text pivots")
        # Indices relative to the unpadded row: the reference's absolute indices, which fix the set order below.
        offset = int((~valid[:start]).sum())
        image_top = key_norms[vision].topk(IMAGE_PIVOTS).indices  # into the image
        image_pivots = (vision[image_top] - offset).tolist()
        text_pivots = (key_norms[end:].topk(TEXT_PIVOTS).indices + end - offset).tolist()
        pivots = list(set(image_pivots + text_pivots))  # iterated in CPython set order, as the reference does
        pool = torch.ones(len(vision), dtype=torch.bool, device=vision.device)
        pool[image_top] = False
        kept = ~pool
        for pivot in pivots:
            candidates = pool.nonzero()[:, 0]  # ascending, as the reference's set of indices iterates
            similarity = F.cosine_similarity(states[pivot + offset][None], states[vision[candidates]], dim=-1)
            picked = candidates[(-similarity).topk(min(per_pivot, len(candidates))).indices]
            kept[picked], pool[picked] = True, False
        return kept.nonzero()[:, 0]
