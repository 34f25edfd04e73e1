"""SparseVLM (Zhang et al., ICML 2025, arXiv 2410.04417), as its reference code (`Gumpest/SparseVLMs`) behaves.

Version 1.5 (the ICML camera-ready code, default):
1. **Raters**, once per prefill from the input embeddings: with V the vision and T all post-image embeddings,
   r = mean over vision tokens of softmax_T(V·Tᵀ); the raters are the post-image tokens with r above its mean.
2. At each pruning layer ℓ (2, 6, 15), layer ℓ runs on every token; its attention probabilities from the raters to
   the current vision tokens, averaged over heads and then over raters, score them, and the top
   min(schedule[ℓ], V−1) survive into layer ℓ+1 (the layer's own KV cache keeps every token).
3. **Recycling**: of the deleted tokens, the top int(0.3·n_deleted)+1 by score are clustered by density peaks
   (DPC-kNN, k = number of clusters = int(n/10)+1) on layer ℓ's output and each cluster is replaced by the mean of its
   members; the merged tokens go right after the kept vision tokens and are scored like any vision token later.
4. Positions are re-numbered contiguously (decoding continues from the compacted positions).

Version 2.0 (SparseVLM+): attention divided element-wise by a RoPE-only bias (Q = K = ones, RoPE applied, QKᵀ/√d),
the top-14 heads by rater→vision mass before averaging, no recycling, original positions, its own schedules.

Budgets map to the reference schedules (keep at layers 2/6/15): v1.5 192→300/200/110, 128→303/110/36,
96→238/48/26, 64→66/30/17; v2.0 192→300/200/118, 128→238/108/60, 96→246/54/28, 64→66/34/20. The reference's
counter (vision tokens *after* each layer, averaged) reads the budget; T̄_in, which counts what each layer really
processes, is higher (206.5 for the v1.5 192 schedule): each sample records both. DPC's tie-breaking noise
(unseeded in the reference) is seeded per sample. On models of another depth the pruning layers are placed at the
same relative depth.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch

from methods.base import ConfigError, Probe, Selection, TokenPruner, scale_layers
from methods.random import generator_seed

if TYPE_CHECKING:
    from harness.runtime import PruneState

SCHEDULES = {
    "1.5": {192: (300, 200, 110), 128: (303, 110, 36), 96: (238, 48, 26), 64: (66, 30, 17)},
    "2.0": {192: (300, 200, 118), 128: (238, 108, 60), 96: (246, 54, 28), 64: (66, 34, 20)},
}
PRUNING_LAYERS = (2, 6, 15)
HEADS_V2 = 14
RECYCLED_FRACTION = 0.3


def density_peak_merge(tokens: torch.Tensor, clusters: int, generator: torch.Generator) -> torch.Tensor:
    """DPC-kNN clustering of (n, d) tokens into `clusters` means, as SparseVLM's `cluster_and_merge` computes it."""
    return cluster_means(tokens, density_peak_clusters(tokens, clusters, generator), clusters)


def density_peak_clusters(tokens: torch.Tensor, clusters: int, generator: torch.Generator) -> torch.Tensor:
    """(n,) cluster of each of (n, d) tokens under DPC-kNN: distance L2/√d; density exp(−mean squared distance to
    the k = `clusters` nearest, self included) plus 1e-6 noise; centres = top `clusters` by density × distance to the
    nearest denser token; each token joins its nearest centre."""
    n, dim = tokens.shape
    distance = (tokens[:, None] - tokens[None]).norm(dim=-1) / dim**0.5  # as the reference: no cdist shortcut
    nearest = distance.topk(clusters, dim=-1, largest=False).values
    density = (-(nearest**2).mean(dim=-1)).exp()
    density = density + torch.rand(n, generator=generator).to(density) * 1e-6
    denser = (density[None, :] > density[:, None]).to(tokens.dtype)
    parent_distance = (distance * denser + distance.max() * (1 - denser)).min(dim=-1).values
    centres = (parent_distance * density).topk(clusters).indices
    assignment = distance[centres].argmin(dim=0)
    assignment[centres] = torch.arange(clusters, device=tokens.device)
    return assignment


def cluster_means(tokens: torch.Tensor, assignment: torch.Tensor, clusters: int) -> torch.Tensor:
    """(clusters, d): each cluster's sum / (size + 1e-6), as the reference merges."""
    n, dim = tokens.shape
    sizes = torch.zeros(clusters, dtype=tokens.dtype, device=tokens.device).index_add_(
        0, assignment, torch.ones(n, dtype=tokens.dtype, device=tokens.device)) + 1e-6
    return torch.zeros(clusters, dim, dtype=tokens.dtype, device=tokens.device).index_add_(
        0, assignment, tokens / sizes[assignment, None])


@dataclass
class SparseVLM(TokenPruner):
    """Options: `version` (1.5 | 2.0), `layers` (pruning layers, default 2/6/15), `recycle` (null: on for 1.5, off for
    2.0), `positions` (auto: compact for 1.5, original for 2.0), `seed` (DPC tie-break noise, per sample from the seed
    and the sample id), `generator_seed` (null; set: that noise generator's seed for every sample, as recorded)."""

    name: ClassVar[str] = "sparsevlm"
    uses_budget: ClassVar[bool] = True
    supports_batching: ClassVar[bool] = False  # raters differ in number per sample, as in the reference
    record_keys: ClassVar[tuple[str, ...]] = ("counter_mean_vision_tokens",)

    version: str = "1.5"
    layers: tuple[int, ...] = PRUNING_LAYERS
    recycle: bool | None = None
    positions: str = "auto"
    seed: int = 0
    generator_seed: int | None = None

    def __post_init__(self) -> None:
        if self.version not in SCHEDULES:
            raise ConfigError(f"version must be one of {', '.join(SCHEDULES)}, got {self.version!r}")
        if self.positions == "auto":
            self.positions = "compact" if self.version == "1.5" else "original"
        if self.recycle is None:
            self.recycle = self.version == "1.5"
        self.layers = tuple(self.layers)
        super().__post_init__()

    def validate(self, num_vision: int, num_layers: int) -> None:
        super().validate(num_vision, num_layers)
        if self.budget.tokens not in SCHEDULES[self.version]:
            budgets = ", ".join(str(b) for b in SCHEDULES[self.version])
            raise ConfigError(f"SparseVLM {self.version} has reference schedules for budgets {budgets} only, "
                              f"got {self.budget.tokens}")
        if len(self.layers) != 3:
            raise ConfigError(f"the reference schedules have 3 pruning layers, got {list(self.layers)}")
        scale_layers(list(self.layers), num_layers)

    def vision_schedule(self, num_vision: int, num_layers: int) -> list[int]:
        """The counts are fixed by the schedule (the recycled cluster count depends only on how many were deleted)."""
        entering, current = [], num_vision
        after = dict(zip(scale_layers(list(self.layers), num_layers), SCHEDULES[self.version][self.budget.tokens],
                         strict=True))
        for layer in range(num_layers):
            entering.append(current)
            if layer in after:
                kept = min(after[layer], current - 1)
                recycled = int((current - kept) * RECYCLED_FRACTION) + 1
                current = kept + (int(recycled / 10) + 1 if self.recycle and current > kept else 0)
        return entering

    # ------------------------------------------------------------------ per prefill
    def begin(self, state: PruneState) -> None:
        pruning = scale_layers(list(self.layers), state.num_layers)
        self.schedule = dict(zip(pruning, SCHEDULES[self.version][self.budget.tokens], strict=True))
        self.drawn_seed = generator_seed(self.seed, state.sample_ids[0], self.generator_seed)
        self.generator = torch.Generator().manual_seed(self.drawn_seed)
        self.entering: list[int] = []

    def record(self, row: int) -> dict:
        # The reference counter appends each layer's vision count after that layer's pruning.
        after = [*self.entering[1:], self.entering[-1]]
        return {"counter_mean_vision_tokens": sum(after) / len(after), "raters": self.raters.tolist(),
                "generator_seed": self.drawn_seed}

    def select(self, layer: int, state: PruneState) -> Selection | None:
        if layer == 0:
            self.raters = self.choose_raters(state)
        selection = self.prune(layer - 1, state) if layer - 1 in self.schedule else None
        kept = state.num_vision if selection is None else selection.keep.shape[1] + (
            selection.merged.shape[1] if selection.merged is not None else 0)
        self.entering.append(kept)
        return selection

    def choose_raters(self, state: PruneState) -> torch.Tensor:
        """Original indices of the text raters, from the input embeddings."""
        hidden, vision = state.hidden_states[0], state.vision_index[0]
        after_image = torch.arange(int(vision[-1]) + 1, state.seq_len, device=hidden.device)
        relevance = (hidden[vision] @ hidden[after_image].T).softmax(dim=-1).mean(dim=0)
        return state.orig_index[0, after_image[relevance > relevance.mean()]]

    def probe(self, layer: int, state: PruneState) -> Probe | None:
        if layer not in self.schedule:
            return None
        return Probe(queries=torch.searchsorted(state.orig_index[0], self.raters)[None])

    def prune(self, layer: int, state: PruneState) -> Selection:
        """Scores from layer `layer`'s rater attention; applied to the input of the next layer."""
        probe = state.probes[layer]
        vision = state.vision_index[0]
        attention = probe.attention[0]  # (H, raters, n)
        if self.version == "2.0":
            attention = attention / self.rope_bias(state, probe.queries[0])
            mass = attention[:, :, vision].sum(dim=(1, 2))
            attention = attention[mass.topk(min(HEADS_V2, attention.shape[0])).indices]
        scores = attention.mean(dim=0)[:, vision].mean(dim=0)
        keep = scores.topk(min(self.schedule[layer], vision.numel() - 1)).indices.sort().values
        deleted = torch.ones_like(scores, dtype=torch.bool)
        deleted[keep] = False
        if not self.recycle or not deleted.any():
            return Selection(keep=keep[None])
        dropped = deleted.nonzero()[:, 0]
        recycled = dropped[scores[dropped].topk(int(dropped.numel() * RECYCLED_FRACTION) + 1).indices]
        clusters = int(recycled.numel() / 10) + 1
        tokens = state.hidden_states[0, vision[recycled]]
        assignment = density_peak_clusters(tokens, clusters, self.generator)
        members = [recycled[assignment == cluster].tolist() for cluster in range(clusters)]
        return Selection(keep=keep[None], merged=cluster_means(tokens, assignment, clusters)[None],
                         merged_sources=[members])

    @staticmethod
    def rope_bias(state: PruneState, queries: torch.Tensor) -> torch.Tensor:
        """SparseVLM+'s "attention gravity": QKᵀ/√d of all-ones queries and keys after RoPE, (1, raters, n)."""
        cos, sin = state.rotary(state.positions[..., :1, :])  # batch row 0 (all M-RoPE rows)
        ones = torch.ones_like(cos)
        rotated = ones * cos + torch.cat([-ones[..., ones.shape[-1] // 2:], ones[..., : ones.shape[-1] // 2]], -1) * sin
        return (rotated[0, queries] @ rotated[0].T / cos.shape[-1] ** 0.5)[None]
