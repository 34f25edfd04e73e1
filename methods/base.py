"""The `TokenPruner` interface.

A pruner says *what* to score, *when*, and *what to keep*; the runtime (`harness.runtime`) owns every tensor of
bookkeeping: which tokens survive, their positions, the masks, the per-layer KV caches and the attention probes.

During one prefill the runtime calls, for each decoder layer `l` in order:

1. `select(l, state)`: a `Selection` to apply to the *input* of layer `l` (drop and/or merge vision tokens), or None;
2. `probe(l, state)`: a `Probe` (attention rows of chosen queries, optionally the values) to record in layer `l`;
3. `attention_edit(l, state)`: a function applied to layer `l`'s post-softmax attention probabilities, or None.

`begin(state)` opens each prefill and `end(state)` closes it (after the last layer). Pre-LLM methods may implement
`reduce_image_features`, called on the vision features before the projector, or `reduce_image_embeddings`, called on
the projected embeddings after it; a method may evict tokens from a layer's KV cache once that layer's prefill is
done (`cache_keep`), ask for a different attention backend (`attention_backend`), and declare the vision tokens
entering each layer when they do not depend on the data (`vision_schedule`, for FLOP projections). Nothing is called
during decoding: every method here prunes at prefill only (the KV-cache semantics of each reference fast path).
During a prefill, `state.attention_preview(queries)` gives the attention rows the current layer would compute before
it runs, and `state.rotary(positions)` the model's RoPE.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Literal

import torch

if TYPE_CHECKING:
    from harness.runtime import PruneState, VisionProbe

Positions = Literal["original", "compact"]
#: `score_dtype` options besides "model" (the model's own dtype: fp16 on GPU, like the reference implementations)
SCORE_DTYPES = {"float32": torch.float32, "float16": torch.float16}
Convention = Literal["exact", "average"]


class ConfigError(ValueError):
    """A bad configuration value, reported before any model is loaded."""


@dataclass(frozen=True)
class Budget:
    """`tokens` retained vision tokens, or the fraction `retain` of a prompt's vision tokens, under a `convention`.

    - `exact`: that many vision tokens enter every layer after the pruning point.
    - `average`: T̄_in, the number of vision tokens entering each decoder layer averaged over all layers, equals it
      (the convention of SparseVLM and PDrop).

    `retain` is resolved on each prompt's own vision tokens (dynamic-resolution models give each image its own
    count); where every image has the same count, `tokens` holds the resolved number too.

    `per`: what one budget applies to, each image (default) or, for pre-LLM methods on LLaVA-NeXT, each `view` of an
    image (its base view and each crop: the per-crop count of VisionZip's, VisPruner's and CDPruner's NeXT results).
    """

    tokens: int | None = None
    convention: Convention = "exact"
    retain: float | None = None
    per: Literal["image", "view"] = "image"

    @property
    def label(self) -> str:
        if self.tokens is None and self.retain is None:
            return "none"
        amount = f"retain{self.retain:g}" if self.retain is not None else str(self.tokens)
        amount = amount if self.per == "image" else f"{amount}-per-view"
        return amount if self.convention == "exact" else f"{amount}-average"

    @property
    def given(self) -> bool:
        return self.tokens is not None or self.retain is not None

    def target(self, num_vision: int) -> int:
        """The retained vision tokens (exact) or T̄_in (average) for a prompt of `num_vision` vision tokens (an image
        with fewer tokens than the budget, on dynamic-resolution models, keeps them all)."""
        return max(1, round(self.retain * num_vision)) if self.retain is not None else min(self.tokens, num_vision)

    def keep_after(self, layer: int, num_vision: int, num_layers: int) -> int:
        """Vision tokens to keep from decoder layer `layer` on (all layers before it see `num_vision`)."""
        if not self.given:
            raise ConfigError("this method needs a budget: pass budget=N (e.g. 64, 128, 192) or retain=F")
        target = self.target(num_vision)
        if self.convention == "exact" or layer == 0:
            return target
        # T̄_in = (layer * V + (L - layer) * keep) / L  =>  keep = (N L - layer V) / (L - layer)
        keep = round((target * num_layers - layer * num_vision) / (num_layers - layer))
        if not 0 <= keep <= num_vision:
            raise ConfigError(
                f"budget {self.label} under the average convention is unreachable when pruning at layer {layer} "
                f"of {num_layers} with {num_vision} vision tokens (it would keep {keep})"
            )
        return keep


@dataclass
class Selection:
    """What survives into a layer.

    keep: (B, k) indices into the *current* vision tokens (`state.vision_index`); a row that keeps fewer tokens than
        another ends in entries -1 (a ragged batch: `state.ragged`).
    merged: optional (B, m, d) new tokens placed right after the kept vision tokens of each row (they count as
        vision tokens); `merged_positions` (B, m) gives their RoPE positions, required when positions are kept
        original (in compact mode positions are renumbered anyway).
    merged_sources: per row, per merged token, the indices into the current vision tokens that it merges (for the
        selection record, `harness.records`; without it merged tokens are recorded with no sources).
    """

    keep: torch.Tensor
    merged: torch.Tensor | None = None
    merged_positions: torch.Tensor | None = None
    merged_sources: list[list[list[int]]] | None = None


@dataclass
class Probe:
    """Record softmax attention rows of `queries` ((B, q) indices into the current sequence) in one layer, averaged
    over nothing: the result is (B, heads, q, keys). `values=True` also records the layer's value vectors
    (B, heads, keys, head_dim), repeated over query-head groups; `keys=True` its keys after RoPE (B, kv_heads, keys,
    head_dim), as the KV cache holds them. `queries=None` records no attention rows (keys or values only)."""

    queries: torch.Tensor | None
    values: bool = False
    keys: bool = False


AttentionEdit = Callable[[torch.Tensor, "PruneState"], torch.Tensor]


@dataclass
class TokenPruner:
    """Base class: prunes nothing. Subclasses are dataclasses whose fields are the method's documented options."""

    name: ClassVar[str] = "none"
    #: whether the method reads `budget` (methods with data-dependent counts, like VisiPruner, do not)
    uses_budget: ClassVar[bool] = False
    #: whether a padded batch of several samples is supported (else the runtime refuses batch size > 1)
    supports_batching: ClassVar[bool] = True
    #: whether such a batch may hold different numbers of vision tokens per row (images of different sizes on a
    #: dynamic-resolution model): the method reads them through `vision_counts`, `vision_valid` and -1 in `keep`
    supports_ragged_batches: ClassVar[bool] = False
    #: whether `reduce_image_features` / `reduce_image_embeddings` need the vision tower's CLS attention and keys
    #: (`VisionProbe`)
    needs_vision_probe: ClassVar[bool] = False
    #: whether `reduce_image_embeddings` reads each sample's question text (the caller passes it to `prune()`)
    needs_question: ClassVar[bool] = False
    #: the vision-tower layer the `VisionProbe` records (None: the feature layer LLaVA reads; -1: the last layer)
    vision_probe_layer: ClassVar[int | None] = None
    #: why the method needs a CLIP vision tower (CLS token, CLIP's own projections), or None: it also runs on towers
    #: without CLS (Qwen's ViTs), whose `VisionProbe` gives the attention each token receives instead
    needs_clip_tower: ClassVar[str | None] = None
    #: per-sample numbers from `record()` whose means go into result.json (`method_stats`)
    record_keys: ClassVar[tuple[str, ...]] = ()
    #: RoPE positions of surviving tokens: kept original (FastV) or renumbered contiguously (SparseVLM, PDrop)
    positions: Positions = "original"

    budget: Budget = dataclasses.field(default_factory=Budget, repr=False)
    #: set by `reduce_image_features`: per image, per output token, the indices into the token axis of the features
    #: it was given that the token comes from ([i] kept, several merged, [] none of them: e.g. CLIP's CLS)
    sources: list[list[list[int]]] | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.positions not in ("original", "compact"):
            raise ConfigError(f"positions must be 'original' or 'compact', got {self.positions!r}")

    def validate(self, num_vision: int, num_layers: int) -> None:
        """Check options against a model's geometry, before it is loaded."""
        if self.uses_budget and not self.budget.given:
            raise ConfigError(f"method {self.name} needs a budget: pass budget=N (e.g. 64, 128, 192) or retain=F (a "
                              f"fraction of each image's vision tokens)")
        if self.budget.tokens is not None and not 0 < self.budget.tokens <= num_vision:
            raise ConfigError(
                f"budget must be in 1..{num_vision} (the model's vision tokens), got {self.budget.tokens}")

    def check_model(self, config) -> None:
        """Check what the method needs from the model beyond its geometry (e.g. weights of its own), from the model's
        `LlavaConfig` before the model is loaded. Called only for methods that override it."""

    @property
    def attention_backend(self) -> str | None:
        """The attention backend the method runs the language model with (None: the model's own)."""
        return None

    def vision_schedule(self, num_vision: int, num_layers: int) -> list[int] | None:
        """Vision tokens entering each decoder layer when that does not depend on the data (for FLOP projections
        of full-size models without weights); None for data-dependent methods."""
        return [num_vision] * num_layers if type(self) is TokenPruner else None

    def begin(self, state: PruneState) -> None:
        """Called at the start of each prefill, once the vision tokens are located."""

    def reduce_image_features(self, features: torch.Tensor, vision: VisionProbe | None) -> torch.Tensor | None:
        """Pre-LLM reduction of (images, V, d_vision) features before the projector, to (images, V', d_vision);
        None leaves them alone. The runtime drops the V - V' freed slots before decoder layer 0. `vision` holds the
        feature layer's CLS attention, keys and full output when `needs_vision_probe` is set. A method sets
        `self.sources` (see the field) so that its selection is on record."""
        return None

    def reduce_image_embeddings(self, embeddings: torch.Tensor, vision: VisionProbe | None,
                                questions: list[str] | None) -> torch.Tensor | None:
        """Pre-LLM reduction of the projector's output, (images, V, d_model) embeddings in the language model's input
        space, to (images, V', d_model); None leaves them alone. Freed slots are dropped as for
        `reduce_image_features`. `vision` as there; `questions`: each image's question text when `needs_question`.
        On LLaVA-NeXT/OneVision it is called once per image, (1, V_i, d_model), on the packed image's vision tokens
        (newline slots excluded), with `vision` None."""
        return None

    def select(self, layer: int, state: PruneState) -> Selection | None:
        return None

    def probe(self, layer: int, state: PruneState) -> Probe | None:
        return None

    def attention_edit(self, layer: int, state: PruneState) -> AttentionEdit | None:
        return None

    def end(self, state: PruneState) -> None:
        """Called once the last decoder layer has run its prefill (its probes are in `state.probes`)."""

    def cache_keep(self, layer: int, state: PruneState) -> torch.Tensor | None:
        """After layer `layer` ran its prefill: (B, k) indices of its current tokens whose K/V stay in that layer's
        cache (the layer's own output is unaffected; decoding no longer sees the others). None keeps them all."""
        return None

    def record(self, row: int) -> dict:
        """Extra per-sample fields for `samples.jsonl` (row = index in the batch)."""
        return {}


@dataclass
class ScorerPruner(TokenPruner):
    """Keep the top-scoring vision tokens once, at the input of layer `k` (k=0: before the language model).

    Subclasses write `score()`; the keep count comes from the run's budget (see `Budget.keep_after`), for each image
    of a prompt on its own vision tokens (an image with fewer tokens than the budget keeps them all).
    FastV, PDrop-style single drops and random are all this with different scores.
    """

    uses_budget: ClassVar[bool] = True
    supports_ragged_batches: ClassVar[bool] = True  # each row keeps each of its images' top tokens
    k: int = 0

    def validate(self, num_vision: int, num_layers: int) -> None:
        super().validate(num_vision, num_layers)
        if not 0 <= self.k < num_layers:
            raise ConfigError(f"k must be in 0..{num_layers - 1} (the model's decoder layers), got {self.k}")
        self.keep_count(num_vision, num_layers)

    def keep_count(self, num_vision: int, num_layers: int) -> int:
        """Vision tokens kept from layer k on."""
        return self.budget.keep_after(self.k, num_vision, num_layers)

    def vision_schedule(self, num_vision: int, num_layers: int) -> list[int]:
        return [num_vision] * self.k + [self.keep_count(num_vision, num_layers)] * (num_layers - self.k)

    def score(self, state: PruneState) -> torch.Tensor:
        """(B, V) importance of each current vision token; higher is kept."""
        raise NotImplementedError

    def select(self, layer: int, state: PruneState) -> Selection | None:
        if layer != self.k:
            return None
        scores, images = self.score(state), state.vision_images
        if not state.ragged:  # rows share their images' token counts
            return Selection(keep=self.top_per_image(scores, images[0], state.num_layers))
        rows = [self.top_per_image(scores[row:row + 1], images[row], state.num_layers)[0]
                for row in range(state.batch_size)]
        return Selection(keep=torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=-1))

    def top_per_image(self, scores: torch.Tensor, images: torch.Tensor, num_layers: int) -> torch.Tensor:
        """(b, k) indices of each image's top-scoring tokens, ascending: `scores` (b, V) of rows whose tokens show
        `images` (V,) (-1: no image)."""
        keep = []
        for image in range(int(images.max()) + 1):
            members = (images == image).nonzero()[:, 0]
            count = min(self.keep_count(members.numel(), num_layers), members.numel())
            keep.append(members[scores[:, members].topk(count, dim=-1).indices])
        return torch.cat(keep, dim=-1).sort(dim=-1).values


def has_pre_llm_hook(method: type[TokenPruner]) -> bool:
    """Whether a method reduces the vision features before the language model (`reduce_image_features` or
    `reduce_image_embeddings`)."""
    return any(getattr(method, hook) is not getattr(TokenPruner, hook)
               for hook in ("reduce_image_features", "reduce_image_embeddings"))


def handles_ragged_batches(method: type[TokenPruner]) -> bool:
    """Whether a method runs on a padded batch whose rows hold different numbers of vision tokens: it says so, it is
    the dense baseline (which prunes nothing), or it prunes only before the language model, where the runtime reduces
    each image on its own."""
    pre_llm_only = has_pre_llm_hook(method) and method.select is TokenPruner.select
    return method.supports_ragged_batches or method is TokenPruner or pre_llm_only


def scale_layers(layers: list[int], num_layers: int, reference_layers: int = 32) -> list[int]:
    """A schedule published for a `reference_layers`-deep model (LLaVA-1.5-7B), placed at the same relative depth of
    a `num_layers`-deep one: identity at 32 layers; at other depths rounded, at least 1, strictly increasing."""
    if num_layers == reference_layers:
        return list(layers)
    scaled: list[int] = []
    for layer in layers:
        scaled.append(max(round(layer * num_layers / reference_layers), 1, scaled[-1] + 1 if scaled else 1))
    if scaled[-1] >= num_layers:
        raise ConfigError(f"schedule {layers} does not fit a {num_layers}-layer model")
    return scaled
