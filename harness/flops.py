"""FLOPs: counted over what ran, projected from a config and token counts, and the papers' convention beside them.

**Unit.** FLOPs = 2 × multiply-adds, everywhere in prunebench: an (n×k)·(k×m) product is 2nkm FLOPs. Only matrix
products are counted (linear layers, the patch convolution, attention's QKᵀ and AV); element-wise work (norms,
activations, softmax, residual adds) is not, as in fvcore, torch's FlopCounterMode and every paper's formula.
Attention counts the whole n_q × n_k rectangle (no causal halving), as the sdpa kernels' formulas and the papers do.

**Breakdown** (`PhaseFlops`, one per phase: the prefill, and all decode steps together): vision encoder (the patch
convolution and every CLIP layer that runs: Hugging Face runs the whole tower although LLaVA reads layer -2; on Qwen
the ViT blocks and Qwen3-VL's DeepStack mergers), projector (Qwen: the merger), language model per decoder layer
(q/k/v/o projections, SwiGLU MLP, attention, and within attention the **vision-related** part: the query-key pairs
where a vision token is the query or the key), lm_head, the method's own work (probes, scoring, selection: whatever
runs as the method's code, see `harness.runtime.in_method_work`), and `other` (counted work outside these components;
none in LLaVA-1.5 or the Qwen models, whose RoPE tables are element-wise).

**Counted** (`FlopCounter`): torch's `FlopCounterMode` sees every aten op as it is dispatched, through generate(), the
pruning runtime's hooks and the KV cache, on any device including `meta`. fvcore (`harness.fvcore_flops`,
`flops=fvcore`) counts the prefill only: its jit trace cannot follow generate() or the cache, and it drops work whose
result is unused (the CLIP layer LLaVA never reads still runs). FlopCounterMode has no formula for the CPU sdpa kernel
(`_scaled_dot_product_flash_attention_for_cpu`); all sdpa kernels get the one formula below. Each counted op is
attributed to the innermost component module running (forward hooks), or to the method while the runtime runs the
method's code. The vision-related part of each attention call is its count times the share of vision pairs, from the
tokens that call saw (the runtime's records: vision tokens entering the layer in prefill, and vision tokens left in
the layer's KV cache for decode steps, whose queries are text).

**Projected** (`project`): the same breakdown from an `Architecture` (read from a LLaVA config, so full-size models
need no weights; `QwenArchitecture` for Qwen2-VL, Qwen2.5-VL and Qwen3-VL, whose vision tokens and tower FLOPs follow
the image size; `InternVLArchitecture` for InternVL3, whose follow the image's tiles) and a `Schedule` (tokens and
vision tokens entering each layer, the KV caches, the decode steps).
Tests hold the projection to the counter on executed tiny models and on the 7B configs on `meta`.

**The papers' convention** (`paper_vision_token_flops`, `paper_vision_attention`): FastV, SparseVLM and VisiPruner
report "FLOPs" of the language model's prefill over the vision tokens only, per layer 4nd² + 2n²d + 3ndm with n the
vision tokens entering the layer, in multiply-adds (half our unit). Dense LLaVA-1.5-7B: 3.82 T.

    python -m harness.flops model=llava7b method=random method.k=2 budget=128 [text_tokens=60] [decode_steps=0]
        [output=json]
    python -m harness.flops model=llava7b method=visipruner results_dir=results/llava7b/<task>/visipruner/none
    python -m harness.flops model=tiny_trained method=fastv budget=64 counter=fvcore  # one prompt, counted too
    python -m harness.flops model_config=Qwen2.5-VL-7B-Instruct method=none image=448x448 [min_pixels=] [max_pixels=]
    python -m harness.flops model=internvl3_8b method=random retain=0.25 image=640x480
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from harness.adapters import adapter_for
from harness.cost import decoding, forward_cache
from harness.results import SAMPLES, read_samples
from harness.runtime import PruningRuntime, in_method_work, prune
from methods.base import ConfigError, TokenPruner

UNIT = "FLOPs = 2 x multiply-adds"
DEFAULT_TEXT_TOKENS = 60  # a short VQA prompt (vicuna_v1 system prompt + question) with the LLaMA tokenizer: 636 total
COMPONENTS = ("vision", "projector", "projections", "mlp", "attention", "vision_attention", "language_model",
              "lm_head", "method", "other", "total")

_aten = torch.ops.aten
_SDPA_KERNELS = (_aten._scaled_dot_product_flash_attention_for_cpu, _aten._scaled_dot_product_flash_attention,
                 _aten._scaled_dot_product_efficient_attention, _aten._scaled_dot_product_cudnn_attention)


def sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """QKᵀ and AV over the full n_q × n_k rectangle, per query head (grouped K/V heads are broadcast)."""
    batch, heads, queries, dim = query_shape
    return 2 * batch * heads * queries * key_shape[-2] * (dim + value_shape[-1])


# ---------------------------------------------------------------------------------------------------- breakdown
@dataclass
class LayerFlops:
    projections: float = 0
    mlp: float = 0
    attention: float = 0  # QKᵀ and AV
    vision_attention: float = 0  # the part of `attention` whose query or key is a vision token

    @property
    def total(self) -> float:
        return self.projections + self.mlp + self.attention

    def __add__(self, other: LayerFlops) -> LayerFlops:
        return LayerFlops(*(a + b for a, b in zip(dataclasses.astuple(self), dataclasses.astuple(other), strict=True)))

    def scaled(self, factor: float) -> LayerFlops:
        return LayerFlops(*(value * factor for value in dataclasses.astuple(self)))


@dataclass
class PhaseFlops:
    """FLOPs of one phase (the prefill, or all decode steps) of one sample."""

    layers: list[LayerFlops]
    vision: float = 0
    projector: float = 0
    lm_head: float = 0
    method: float = 0
    other: float = 0

    @classmethod
    def empty(cls, num_layers: int) -> PhaseFlops:
        return cls([LayerFlops() for _ in range(num_layers)])

    @property
    def language_model(self) -> float:
        return sum(layer.total for layer in self.layers)

    @property
    def attention(self) -> float:
        return sum(layer.attention for layer in self.layers)

    @property
    def vision_attention(self) -> float:
        return sum(layer.vision_attention for layer in self.layers)

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.language_model + self.lm_head + self.method + self.other

    def summary(self) -> dict[str, float]:
        """Every component of `COMPONENTS`, the per-layer parts summed over layers."""
        parts = {name: sum(getattr(layer, name) for layer in self.layers)
                 for name in ("projections", "mlp", "attention", "vision_attention")}
        return {name: parts[name] if name in parts else getattr(self, name) for name in COMPONENTS}

    def scaled(self, factor: float) -> PhaseFlops:
        return PhaseFlops([layer.scaled(factor) for layer in self.layers], self.vision * factor,
                          self.projector * factor, self.lm_head * factor, self.method * factor, self.other * factor)

    @staticmethod
    def mean(phases: list[PhaseFlops]) -> PhaseFlops:
        total = phases[0]
        for phase in phases[1:]:
            total = PhaseFlops([a + b for a, b in zip(total.layers, phase.layers, strict=True)],
                               total.vision + phase.vision, total.projector + phase.projector,
                               total.lm_head + phase.lm_head, total.method + phase.method, total.other + phase.other)
        return total.scaled(1 / len(phases))


# ---------------------------------------------------------------------------------------------------- projection
@dataclass(frozen=True)
class LanguageModel:
    """What the FLOPs of a decoder-only language model depend on: every family here has q/k/v/o projections with
    grouped K/V heads, a SwiGLU MLP and an lm_head (biases, norms and Qwen3's q/k-norm are not matrix products)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int

    @staticmethod
    def fields(text) -> dict:
        """The `LanguageModel` fields of a text config."""
        return dict(
            layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=text.intermediate_size,
            heads=text.num_attention_heads, kv_heads=text.num_key_value_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            vocab=text.vocab_size)

    def layer(self, queries: int, pairs: int, text_pairs: int) -> LayerFlops:
        """One decoder layer over `queries` query tokens attending over `pairs` query-key pairs, of which
        `text_pairs` have a text query and a text key (linear in all three, so sums over calls add up)."""
        q_out, kv_out = self.heads * self.head_dim, self.kv_heads * self.head_dim
        per_pair = 4 * self.heads * self.head_dim
        return LayerFlops(
            projections=2 * queries * (2 * self.hidden * q_out + 2 * self.hidden * kv_out),
            mlp=2 * queries * 3 * self.hidden * self.intermediate,
            attention=per_pair * pairs,
            vision_attention=per_pair * (pairs - text_pairs),
        )

    def lm_head(self, positions: int) -> float:
        return 2 * positions * self.hidden * self.vocab

    def kv_cache_bytes(self, cache_tokens: list[int], element_size: int) -> int:
        return 2 * self.kv_heads * self.head_dim * sum(cache_tokens) * element_size


@dataclass(frozen=True)
class Architecture(LanguageModel):
    """What the FLOPs of a LLaVA model depend on (CLIP vision tower, 2-layer MLP projector, LLaMA language model)."""

    vision_layers: int
    vision_hidden: int
    vision_intermediate: int
    image_size: int
    patch_size: int
    channels: int
    image_features: int  # vision features per image entering the projector (= vision tokens in the prompt)
    unread_vision_layers: int = 0  # CLIP layers after the deepest one LLaVA reads: they run, their output is unused

    @classmethod
    def from_config(cls, config) -> Architecture:
        text, vision = config.text_config, config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        feature_layers = config.vision_feature_layer
        feature_layers = feature_layers if isinstance(feature_layers, list) else [feature_layers]
        read = max(layer % (vision.num_hidden_layers + 1) for layer in feature_layers)  # hidden state 0: embeddings
        return cls(
            **LanguageModel.fields(text),
            vision_layers=vision.num_hidden_layers, vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size, image_size=vision.image_size, patch_size=vision.patch_size,
            channels=vision.num_channels,
            image_features=patches + (config.vision_feature_select_strategy == "full"),
            unread_vision_layers=vision.num_hidden_layers - read,
        )

    def vision_encoder(self) -> float:
        """One image: the patch convolution, then every CLIP layer on the patches plus CLS."""
        patches = (self.image_size // self.patch_size) ** 2
        convolution = 2 * patches * self.channels * self.patch_size**2 * self.vision_hidden
        return convolution + self.vision_layers * self.vision_layer()

    def vision_layer(self) -> float:
        """One CLIP layer of one image (patches plus CLS)."""
        n, d = (self.image_size // self.patch_size) ** 2 + 1, self.vision_hidden
        return 2 * n * 4 * d * d + 2 * n * 2 * d * self.vision_intermediate + 4 * n * n * d

    def projector(self, features: int) -> float:
        return 2 * features * (self.vision_hidden * self.hidden + self.hidden * self.hidden)

    @property
    def projector_features(self) -> int:
        """Vision features entering the projector for one sample's images."""
        return self.image_features


ANYRES_MODEL_TYPES = ("llava_next", "llava_onevision")


@dataclass(frozen=True)
class AnyResArchitecture(Architecture):
    """LLaVA-NeXT and LLaVA-OneVision, for the images of one sample (a `Schedule` of it has `images=1`): the tower and
    the projector run on every view (base view and crops; CLS dropped on NeXT's CLIP, none in OneVision's SigLIP), and
    the packed prompt holds `image_features` prunable vision tokens and `newline_tokens` newline slots (text to the
    runtime). `harness.adapters.llava_next.AnyResLayout` gives the three numbers."""

    views: int = 1
    newline_tokens: int = 0
    cls_token: int = 1  # 1: the tower adds a CLS token (CLIP); 0: none (SigLIP)

    @classmethod
    def from_config(cls, config, layout) -> AnyResArchitecture:
        return cls(**{**dataclasses.asdict(Architecture.from_config(config)), "image_features": layout.vision_tokens},
                   views=layout.views, newline_tokens=layout.newline_tokens,
                   cls_token=int(config.vision_config.model_type == "clip_vision_model"))

    def vision_encoder(self) -> float:
        """Every view: the patch convolution, then every layer."""
        return self.views * super().vision_encoder()

    def vision_layer(self) -> float:
        n, d = (self.image_size // self.patch_size) ** 2 + self.cls_token, self.vision_hidden
        return 2 * n * 4 * d * d + 2 * n * 2 * d * self.vision_intermediate + 4 * n * n * d

    @property
    def projector_features(self) -> int:
        """Every view's patches (CLS dropped)."""
        return self.views * (self.image_size // self.patch_size) ** 2


QWEN_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# The pixel bounds of the checkpoints' own preprocessor_config.json (min, max), for a model conf that names none.
QWEN_PROCESSOR_PIXELS = {"qwen2_vl": (3136, 12845056), "qwen2_5_vl": (3136, 12845056), "qwen3_vl": (65536, 16777216)}


@dataclass(frozen=True)
class QwenArchitecture(LanguageModel):
    """What the FLOPs of Qwen2-VL, Qwen2.5-VL and Qwen3-VL depend on, for the images of one sample (dynamic resolution:
    the vision tokens follow each image's size; a `Schedule` of it has `images=1`). The ViT embeds each patch with a
    Conv3d over `temporal_patch_size` frames (a still image is one such pair), runs its blocks over each image's
    patches (Qwen2.5-VL: within windows, except in the full-attention blocks), and its merger maps each `merge_size`²
    patches to one LLM token; Qwen3-VL's DeepStack mergers do the same on the outputs of some blocks, for the first
    decoder layers."""

    vision_layers: int
    vision_hidden: int
    vision_intermediate: int
    vision_mlp_matrices: int  # 2 (fc1, fc2) or 3 (SwiGLU: gate, up, down)
    patch_size: int
    temporal_patch_size: int
    channels: int
    merge_size: int
    grids: tuple[tuple[int, int], ...]  # each image's patch rows and columns, after the processor's resize
    window: int = 0  # Qwen2.5-VL: the side of an attention window in LLM tokens (0: no windows)
    full_attention_blocks: tuple[int, ...] = ()  # Qwen2.5-VL: the blocks that attend over the whole image
    deepstack_mergers: int = 0  # Qwen3-VL

    @classmethod
    def from_config(cls, config, grids: list[tuple[int, int]]) -> QwenArchitecture:
        """`grids`: each image's patch rows and columns (a sample's `image_grid_thw[:, 1:]`, or `image_grid`)."""
        vision = config.vision_config
        qwen2 = config.model_type == "qwen2_vl"  # its ViT width is `embed_dim`; `hidden_size` is the merger's output
        width = vision.embed_dim if qwen2 else vision.hidden_size
        merge = vision.spatial_merge_size
        return cls(
            **LanguageModel.fields(config.text_config),
            vision_layers=vision.depth, vision_hidden=width,
            vision_intermediate=width * vision.mlp_ratio if qwen2 else vision.intermediate_size,
            vision_mlp_matrices=3 if config.model_type == "qwen2_5_vl" else 2,
            patch_size=vision.patch_size, temporal_patch_size=vision.temporal_patch_size,
            channels=vision.in_channels, merge_size=merge, grids=tuple((int(r), int(c)) for r, c in grids),
            window=getattr(vision, "window_size", 0) // merge // vision.patch_size,
            full_attention_blocks=tuple(getattr(vision, "fullatt_block_indexes", ())),
            deepstack_mergers=len(getattr(vision, "deepstack_visual_indexes", ())),
        )

    @property
    def patches(self) -> int:
        return sum(rows * columns for rows, columns in self.grids)

    @property
    def image_features(self) -> int:
        """Vision tokens of the images in the prompt."""
        return self.patches // self.merge_size**2

    def vision_encoder(self) -> float:
        """The images: the patch Conv3d, every ViT block, and the DeepStack mergers (all patches, whatever is
        pruned)."""
        d, patches = self.vision_hidden, self.patches
        convolution = 2 * patches * self.channels * self.temporal_patch_size * self.patch_size**2 * d
        linear = 2 * patches * (4 * d * d + self.vision_mlp_matrices * d * self.vision_intermediate)
        attention = sum(4 * d * sum(n * n for n in self.attention_groups(block)) for block in range(self.vision_layers))
        deepstack = self.deepstack_mergers * self.projector(self.image_features)
        return convolution + self.vision_layers * linear + attention + deepstack

    def attention_groups(self, block: int) -> list[int]:
        """Patches attending to each other in ViT block `block`: each image, or (Qwen2.5-VL's windowed blocks) each
        window of each image: windows of `window`² LLM tokens tile the merged grid from its top-left corner, cut at
        the bottom and right edges."""
        if not self.window or block in self.full_attention_blocks:
            return [rows * columns for rows, columns in self.grids]
        groups = []
        for grid in self.grids:
            rows, columns = (side // self.merge_size for side in grid)
            spans = [[min(self.window, side - start) for start in range(0, side, self.window)]
                     for side in (rows, columns)]
            groups += [r * c * self.merge_size**2 for r in spans[0] for c in spans[1]]
        return groups

    def projector(self, features: int) -> float:
        """The merger: the `merge_size`² patches of each LLM token concatenated, then two linear layers."""
        merged = self.merge_size**2 * self.vision_hidden
        return 2 * features * (merged * merged + merged * self.hidden)

    @property
    def projector_features(self) -> int:
        return self.image_features


@dataclass(frozen=True)
class InternVLArchitecture(Architecture):
    """What the FLOPs of InternVL3 depend on, for the tiles of one sample (a `Schedule` of it has `images=1`): each
    tile runs through every InternViT layer (patches + CLS: LLaVA's CLIP formula), pixel shuffle (no arithmetic)
    concatenates each `merge`² patches into one vision token, and the projector (LayerNorm, then two linear layers)
    maps those into the language model."""

    tiles: int = 1
    merge: int = 2

    @classmethod
    def from_config(cls, config, tiles: int) -> InternVLArchitecture:
        """`tiles`: all tiles of the sample's images (the processor's grid, plus a thumbnail where it has several)."""
        vision, merge = config.vision_config, round(1 / config.downsample_ratio)
        tile, patch = vision.image_size[0], vision.patch_size[0]
        return cls(
            **LanguageModel.fields(config.text_config),
            vision_layers=vision.num_hidden_layers, vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size, image_size=tile, patch_size=patch,
            channels=vision.num_channels, image_features=tiles * (tile // patch) ** 2 // merge**2, tiles=tiles,
            merge=merge)

    def vision_encoder(self) -> float:
        return self.tiles * super().vision_encoder()

    def projector(self, features: int) -> float:
        merged = self.merge**2 * self.vision_hidden
        return 2 * features * (merged * self.hidden + self.hidden * self.hidden)


def image_tiles(config, height: int, width: int) -> tuple[int, int]:
    """The (columns, rows) of tiles the InternVL processor cuts a `height`×`width` image into (at most 12, lmms-eval's
    `max_patches`; a thumbnail joins any grid of more than one tile)."""
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    from harness.adapters.internvl import MAX_TILES

    tile = config.vision_config.image_size
    return get_optimal_tiled_canvas((height, width), tuple(tile), 1, MAX_TILES)


def image_grid(config, height: int, width: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The patch rows and columns of a `height`×`width` image after the Qwen processor's `smart_resize`: each side
    rounded to a multiple of patch × merge, the area brought within [min_pixels, max_pixels]."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    vision = config.vision_config
    resized = smart_resize(height, width, vision.patch_size * vision.spatial_merge_size, min_pixels, max_pixels)
    return resized[0] // vision.patch_size, resized[1] // vision.patch_size


def model_architecture(config, grids: list[tuple[int, int]] | None = None,
                       tiles: int | None = None, layout=None) -> Architecture | QwenArchitecture:
    """The architecture of a LLaVA, LLaVA-NeXT/OneVision, Qwen or InternVL config; a Qwen one for a sample's images of
    `grids` patches, an InternVL one for a sample's images of `tiles` tiles in all, a NeXT/OneVision one for a sample's
    image `layout` (`ModelAdapter.prompt_layout`)."""
    if config.model_type == "internvl":
        if tiles is None:
            raise ConfigError("InternVL cuts each image into tiles by its size: its FLOPs need the image sizes")
        return InternVLArchitecture.from_config(config, tiles)
    if config.model_type in ANYRES_MODEL_TYPES:
        if layout is None:
            raise ConfigError(f"{config.model_type} crops each image by its size: its FLOPs need the image sizes")
        return AnyResArchitecture.from_config(config, layout)
    if config.model_type in QWEN_MODEL_TYPES:
        if grids is None:
            raise ConfigError(f"{config.model_type} has dynamic resolution: its FLOPs need the image sizes")
        return QwenArchitecture.from_config(config, grids)
    return Architecture.from_config(config)


@dataclass
class Schedule:
    """The token counts of one sample's generation."""

    tokens: list[int]  # tokens entering each decoder layer in prefill (a padded batch: padding included)
    vision: list[int]  # vision tokens among them
    cache: list[int] | None = None  # tokens in each layer's KV cache after prefill (None: = tokens)
    cache_vision: list[int] | None = None  # vision tokens among them (None: = vision)
    images: int = 1
    logits: int = 1  # positions through lm_head in prefill: generate() keeps the last only
    decode_steps: int = 0  # forwards after the prefill (generate() with N new tokens runs N - 1)


def project(arch: Architecture, schedule: Schedule) -> tuple[PhaseFlops, PhaseFlops]:
    """(prefill, decode) FLOPs of one sample; the method's own work cannot be projected and is 0."""
    if len(schedule.tokens) != arch.layers or len(schedule.vision) != arch.layers:
        raise ConfigError(f"the schedule has {len(schedule.tokens)} layers, the model {arch.layers}")
    prefill = PhaseFlops(
        [arch.layer(n, n * n, (n - v) ** 2) for n, v in zip(schedule.tokens, schedule.vision, strict=True)],
        vision=schedule.images * arch.vision_encoder(),
        projector=schedule.images * arch.projector(arch.projector_features),
        lm_head=arch.lm_head(schedule.logits),
    )
    # Decode step t (1..T) of a layer caching c tokens (cv vision): one text query over c + t keys.
    steps = schedule.decode_steps
    new_keys = steps * (steps + 1) // 2
    cache = schedule.cache if schedule.cache is not None else schedule.tokens
    cache_vision = schedule.cache_vision if schedule.cache_vision is not None else schedule.vision
    decode = PhaseFlops(
        [arch.layer(steps, steps * c + new_keys, steps * (c - cv) + new_keys)
         for c, cv in zip(cache, cache_vision, strict=True)],
        lm_head=arch.lm_head(steps),
    )
    return prefill, decode


def paper_vision_token_flops(arch: Architecture, vision: list[int]) -> float:
    """The papers' "FLOPs" (multiply-adds): Σ over layers of 4nd² + 2n²d + 3ndm, n = vision tokens entering it."""
    d, m = arch.hidden, arch.intermediate
    return sum(4 * n * d * d + 2 * n * n * d + 3 * n * d * m for n in vision)


def paper_vision_attention(arch: Architecture, vision: list[int], text: int) -> float:
    """VisiPruner's vision-related attention (App. M, multiply-adds): Σ over layers of 2(n_v²d + n_v·n_t·d)."""
    return sum(2 * (n * n + n * text) * arch.hidden for n in vision)


def static_vision_schedule(pruner: TokenPruner, num_vision: int, num_layers: int) -> list[int]:
    """Vision tokens entering each layer for a method whose counts do not depend on the data (its
    `vision_schedule`)."""
    schedule = pruner.vision_schedule(num_vision, num_layers)
    if schedule is None:
        raise ConfigError(f"method {pruner.name} keeps a data-dependent number of tokens; pass results_dir=<a run's "
                          f"results directory> to project the counts its samples recorded")
    return schedule


class FlopCounter(FlopCounterMode):
    """Counts every FLOP that runs inside the block on `model` (a LLaVA or Qwen-VL `...ForConditionalGeneration`), split
    into `prefill` and `decode` `PhaseFlops` of the whole batch.

    A forward of the model whose KV cache already holds tokens is a decode step; everything else (including the
    vision tower, which generate() may run before the first forward) is prefill. The vision-related attention split
    needs to know which tokens are vision: it comes from `runtime` (the block's `prune()` runtime; without one the
    split is not made and `vision_attention` stays 0).
    """

    def __init__(self, model, runtime: PruningRuntime | None = None):
        super().__init__(display=False, custom_mapping=dict.fromkeys(_SDPA_KERNELS, sdpa_flops))
        self.model, self.runtime = model, runtime
        num_layers = len(model.model.language_model.layers)
        self.prefill, self.decode = PhaseFlops.empty(num_layers), PhaseFlops.empty(num_layers)
        self._scopes: list = []  # innermost component running: a PhaseFlops field, or (layer, part[, pairs...])
        self._decoding = False
        self._cache_vision: dict[int, int] = {}
        self._handles: list = []

    def __enter__(self) -> FlopCounter:
        inner = self.model.model
        adapter = adapter_for(self.model)  # a Qwen merger runs inside its ViT: the innermost module counts
        scopes: dict[torch.nn.Module, object] = {
            adapter.vision_tower(self.model): "vision", adapter.projector(self.model): "projector",
            self.model.lm_head: "lm_head"}
        for index, layer in enumerate(inner.language_model.layers):
            attention = layer.self_attn
            for projection in (attention.q_proj, attention.k_proj, attention.v_proj, attention.o_proj):
                scopes[projection] = (index, "projections")
            scopes[layer.mlp] = (index, "mlp")
            self._handles += [
                attention.register_forward_pre_hook(self._attention_scope(index), with_kwargs=True),
                attention.register_forward_hook(self._leave)]
        for module, scope in scopes.items():
            self._handles += [module.register_forward_pre_hook(lambda *_, scope=scope: self._scopes.append(scope)),
                              module.register_forward_hook(self._leave)]
        self._handles += [self.model.register_forward_pre_hook(self._start_forward, with_kwargs=True),
                          self.model.register_forward_hook(self._end_forward)]
        return super().__enter__()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _leave(self, *_) -> None:
        self._scopes.pop()

    def _start_forward(self, module, args, kwargs) -> None:
        self._decoding = decoding(kwargs)
        if not self._decoding:
            self._cache_vision = {}

    def _end_forward(self, *_) -> None:
        self._decoding = False

    def _attention_scope(self, index: int):
        def enter(module, args, kwargs) -> None:
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            cache = forward_cache(kwargs)
            queries = hidden.shape[1]
            past = cache.get_seq_length(index) if cache is not None else 0
            keys = past + queries
            vision_keys = self._vision_keys(index, prefill=past == 0)
            text_queries = queries - vision_keys if past == 0 else queries  # decode queries are new text tokens
            pairs = queries * keys
            self._scopes.append((index, "attention", pairs, pairs - text_queries * (keys - vision_keys)))
        return enter

    def _vision_keys(self, index: int, prefill: bool) -> int:
        """Vision tokens entering layer `index` (prefill), or held in its KV cache (decode)."""
        runtime = self.runtime
        if runtime is None or not runtime.active:
            return 0
        if prefill:
            return int(runtime.layers[index].vision_tokens[0])
        if index not in self._cache_vision:
            self._cache_vision[index] = cached_vision(runtime, index, row=0)
        return self._cache_vision[index]

    def _count_flops(self, func_packet, out, args, kwargs):
        formula = self.flop_registry.get(func_packet)
        if formula is not None:
            self._add(formula(*args, **kwargs, out_val=out))
        return out

    def _add(self, flops: int) -> None:
        phase = self.decode if self._decoding else self.prefill
        scope = "method" if in_method_work() else (self._scopes[-1] if self._scopes else "other")
        if isinstance(scope, str):
            setattr(phase, scope, getattr(phase, scope) + flops)
            return
        layer = phase.layers[scope[0]]
        setattr(layer, scope[1], getattr(layer, scope[1]) + flops)
        if scope[1] == "attention":
            pairs, vision_pairs = scope[2:]
            layer.vision_attention += flops * vision_pairs // pairs


def cached_vision(runtime: PruningRuntime, layer: int, row: int) -> int:
    """Vision tokens of batch row `row` in `layer`'s KV cache after prefill (not a ragged batch's padding slots)."""
    record = runtime.layers[layer]
    # the prompt's prunable vision slots (LLaVA-NeXT/OneVision's newline slots are text)
    return int((runtime.prompt_vision[row, record.orig_index[row]] & record.valid[row]).sum())


def executed_schedule(runtime: PruningRuntime, decode_steps: int, row: int = 0) -> Schedule:
    """What sample `row` of the runtime's last prefill processed (every row of a batch runs the same number of
    tokens; on a ragged batch their vision tokens differ)."""
    if not runtime.active:
        # No image: the runtime recorded nothing, and every layer saw (and cached) the whole prompt.
        layers = len(runtime.lm.layers)
        return Schedule([runtime.state.input_ids.shape[1]] * layers, [0] * layers, images=0, decode_steps=decode_steps)
    return Schedule(
        tokens=[record.tokens for record in runtime.layers],
        vision=[int(record.vision_tokens[row]) for record in runtime.layers],
        cache=[record.orig_index.shape[1] for record in runtime.layers],
        cache_vision=[cached_vision(runtime, layer, row) for layer in range(len(runtime.layers))],
        decode_steps=decode_steps,
    )


# ---------------------------------------------------------------------------------------------------- runs
@torch.no_grad()
def count_generation(model, pruner: TokenPruner, inputs: dict, sample_ids: list, questions: list[str] | None = None,
                     **generate_options) -> tuple[PhaseFlops, PhaseFlops]:
    """Replay a batch's generation (the timed run's `generate_options`) under the counter: (prefill, decode) FLOPs
    per sample."""
    with prune(model, pruner, sample_ids, questions=questions) as runtime, FlopCounter(model, runtime) as counter:
        model.generate(**inputs, **generate_options)
    rows = inputs["input_ids"].shape[0]
    return counter.prefill.scaled(1 / rows), counter.decode.scaled(1 / rows)


def sample_record(prefill: PhaseFlops, decode: PhaseFlops, arch: Architecture, vision: list[int]) -> dict:
    """The `flops` field of a sample in samples.jsonl."""
    return {"prefill": prefill.summary(), "decode": decode.summary(),
            "paper_vision_token_flops": paper_vision_token_flops(arch, vision)}


COUNTED_METHOD_WORK = ("counted", "fvcore")  # the `flops` settings that count the method's own work (in prefill)
SOURCE_DESCRIPTIONS = {"fvcore": "fvcore prefill, projected decode"}  # result.json's flops_source, if not the setting


def cost_fields(records: list[dict], source: str) -> dict:
    """result.json `cost` FLOPs fields: means per sample of the samples' `flops` records."""
    if not records:
        return dict.fromkeys(("flops_total", "flops_attention", "flops_vision_attention", "flops_prefill",
                              "flops_decode", "flops_method", "paper_vision_token_flops", "flops"))
    mean = {phase: {key: statistics.fmean(r["flops"][phase][key] for r in records) for key in COMPONENTS}
            for phase in ("prefill", "decode")}
    prefill, decode = mean["prefill"], mean["decode"]
    return {
        "flops_total": prefill["total"] + decode["total"],
        "flops_attention": prefill["attention"] + decode["attention"],
        "flops_vision_attention": prefill["vision_attention"] + decode["vision_attention"],
        "flops_prefill": prefill["total"],
        "flops_decode": decode["total"],
        "flops_method": prefill["method"] + decode["method"] if source in COUNTED_METHOD_WORK else None,
        "flops_source": SOURCE_DESCRIPTIONS.get(source, source),
        "paper_vision_token_flops": statistics.fmean(r["flops"]["paper_vision_token_flops"] for r in records),
        "flops": mean,
    }


# ---------------------------------------------------------------------------------------------------- CLI
OPTIONS = {"text_tokens": DEFAULT_TEXT_TOKENS, "decode_steps": 0, "results_dir": None, "output": "table",
           "counter": None, "model_config": None, "image": None, "min_pixels": None, "max_pixels": None}
DEFAULT_IMAGE = "448x448"  # width x height of the image of a dynamic-resolution (Qwen, LLaVA-NeXT/OneVision) model
COUNTERS = ("fvcore",)


def projection(arch: Architecture, vision: list[list[int]], text_tokens: int, decode_steps: int) -> dict:
    """Mean projected FLOPs (and the papers' numbers) over samples with the given vision tokens per layer each."""
    phases = [project(arch, Schedule([text_tokens + n for n in v], v, decode_steps=decode_steps)) for v in vision]
    prefill, decode = PhaseFlops.mean([p for p, _ in phases]), PhaseFlops.mean([d for _, d in phases])
    return {
        "mean_vision_tokens": statistics.fmean(statistics.fmean(v) for v in vision),
        "vision_tokens_per_layer": [statistics.fmean(layer) for layer in zip(*vision, strict=True)],
        "prefill": prefill.summary(),
        "decode": decode.summary(),
        "prefill_per_layer": [dataclasses.asdict(layer) for layer in prefill.layers],
        "kv_cache_bytes_fp16": statistics.fmean(arch.kv_cache_bytes([text_tokens + n for n in v], 2) for v in vision),
        "paper_vision_token_flops": statistics.fmean(paper_vision_token_flops(arch, v) for v in vision),
        "paper_vision_attention": statistics.fmean(paper_vision_attention(arch, v, text_tokens) for v in vision),
    }


def recorded_vision(results_dir: Path, num_layers: int) -> list[list[int]]:
    """Each image sample's vision tokens entering each layer, from a run's samples.jsonl."""
    path = results_dir / SAMPLES
    if not path.exists():
        raise ConfigError(f"results_dir={results_dir} has no {SAMPLES}")
    counts = [r["vision_tokens_per_layer"] for r in read_samples(path) if r["pruned"]]
    if not counts:
        raise ConfigError(f"{path} records no pruned sample")
    if len(counts[0]) != num_layers:
        raise ConfigError(f"{path} records {len(counts[0])} layers; this model has {num_layers}")
    return counts


def parse_args(argv: list[str]) -> tuple[dict, list[str]]:
    """This command's own options (`OPTIONS`), and the Hydra overrides (model, method, budget, ...)."""
    options, overrides = dict(OPTIONS), []
    for arg in argv:
        key, _, value = arg.partition("=")
        if key in options:
            options[key] = value
        else:
            overrides.append(arg)
    if options["output"] not in ("table", "json"):
        raise ConfigError(f"output must be table or json, got {options['output']!r}")
    if options["counter"] not in (None, *COUNTERS):
        raise ConfigError(f"counter must be one of {', '.join(COUNTERS)}, got {options['counter']!r}")
    if options["counter"] and options["results_dir"]:
        raise ConfigError("counter counts one prompt of its own: pass counter or results_dir, not both")
    if options["counter"] and options["model_config"]:
        raise ConfigError("counter loads the model of a conf (model=...): pass counter or model_config, not both")
    for key in ("text_tokens", "decode_steps", "min_pixels", "max_pixels"):
        if options[key] is None:  # pixel bounds left to the model conf
            continue
        if not str(options[key]).isdigit():
            raise ConfigError(f"{key} must be a whole number, got {options[key]!r}")
        options[key] = int(options[key])
    if options["image"] is not None:
        width, _, height = options["image"].partition("x")
        if not (width.isdigit() and height.isdigit() and int(width) and int(height)):
            raise ConfigError(f"image must be WIDTHxHEIGHT in pixels (e.g. image={DEFAULT_IMAGE}), got "
                              f"{options['image']!r}")
    return options, overrides


def report(options: dict, overrides: list[str]) -> dict:
    """Dense and pruned projections of a full-size (or tiny) model config, side by side."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from harness.config import CONF_DIR, build_pruner
    from harness.models import model_config

    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
    except HydraException as error:
        raise ConfigError(f"{error} (this command's own options: {', '.join(OPTIONS)})") from error
    pruner = build_pruner(cfg)
    config = shipped_config(options["model_config"]) if options["model_config"] else model_config(cfg.model)
    name = Path(options["model_config"]).name.removesuffix(".json") if options["model_config"] else cfg.model.name
    image = projected_image(config, options, cfg.model)
    if image and (options["counter"] or options["results_dir"]):
        # Both would need each sample's own image size: runs do not record it yet, the counter loads LLaVA prompts.
        raise ConfigError(f"counter and results_dir project LLaVA-1.5 (fixed-size images); {name} is projected for "
                          f"one image size: pass image=WIDTHxHEIGHT (and the method's budget) instead")
    arch = image_architecture(config, image)
    pruner.validate(arch.image_features, arch.layers)
    results_dir, text, steps = options["results_dir"], options["text_tokens"], options["decode_steps"]
    newlines = arch.newline_tokens if isinstance(arch, AnyResArchitecture) else 0
    text += newlines  # LLaVA-NeXT/OneVision's newline slots: never pruned, text to the runtime
    counted = None
    if options["counter"]:
        counted = counted_prefill(cfg, pruner, text)
        vision = [counted.pop("vision_tokens_per_layer")]
    elif results_dir is not None:
        vision = recorded_vision(Path(results_dir), arch.layers)
    else:
        vision = [static_vision_schedule(pruner, arch.image_features, arch.layers)]
    source = (f"counts recorded by {len(vision)} samples in {results_dir}" if results_dir
              else "counts of the counted prompt" if counted else "fixed schedule")
    dense = projection(arch, [[arch.image_features] * arch.layers], text, steps)
    pruned = projection(arch, vision, text, steps)
    return {
        "unit": UNIT,
        "model": name,
        "method": cfg.method.get("label", cfg.method.name),
        "budget": {"tokens": pruner.budget.tokens, "convention": pruner.budget.convention,
                   "used": pruner.uses_budget},
        "source": source,
        "prompt": {"vision_tokens": arch.image_features, "text_tokens": text, "total": arch.image_features + text,
                   **({"newline_tokens": newlines} if newlines else {})},
        **({"image": image} if image else {}),
        "decode_steps": steps,
        "dense": dense,
        "pruned": pruned,
        "ratio": {phase: {key: _ratio(pruned[phase][key], value) for key, value in dense[phase].items()}
                  for phase in ("prefill", "decode")},
        "paper_convention": {
            "unit": "multiply-adds, which the papers call FLOPs",
            "scope": "language-model prefill over the vision tokens entering each layer",
            "vision_token_flops": _compared(dense["paper_vision_token_flops"], pruned["paper_vision_token_flops"]),
            "vision_attention": _compared(dense["paper_vision_attention"], pruned["paper_vision_attention"]),
        },
        **({"counted": counted} if counted else {}),
    }


def image_architecture(config, image: dict | None) -> Architecture | QwenArchitecture:
    """The architecture of `config` for the projected image (`projected_image`)."""
    if image is None:
        return model_architecture(config)
    if "layout" in image:
        from harness.adapters.llava_next import AnyResLayout

        return model_architecture(config, layout=AnyResLayout(**image["layout"]))
    if "tiles" in image:
        return model_architecture(config, tiles=image["tiles"])
    return model_architecture(config, [image["patch_grid"]])


def shipped_config(name: str):
    """`model_config=`: a config.json path, or the name of one shipped in harness/model_configs/ (no weights), read by
    the config class its `model_type` names."""
    from transformers import AutoConfig

    from harness.models import MODEL_CONFIGS

    path = Path(name) if name.endswith(".json") else MODEL_CONFIGS / f"{name}.json"
    if not path.is_file():
        shipped = ", ".join(sorted(p.stem for p in MODEL_CONFIGS.glob("*.json")))
        raise ConfigError(f"model_config={name}: no such config file; shipped: {shipped}, or a path to a config.json")
    return AutoConfig.from_pretrained(path)


def projected_image(config, options: dict, spec) -> dict | None:
    """The image of a dynamic-resolution model: its size, its size after the processor's resize within the pixel
    bounds (options, else the model conf's, else the checkpoint processor's), and its patch grid; None for a model
    that resizes every image to one size. InternVL: its size and its tiles; LLaVA-NeXT/OneVision: its size and its
    layout (neither has pixel bounds)."""
    width, height = (int(side) for side in (options["image"] or DEFAULT_IMAGE).split("x"))
    if config.model_type == "internvl":
        if any(options[key] is not None for key in ("min_pixels", "max_pixels")):
            raise ConfigError("min_pixels and max_pixels bound a Qwen image; InternVL cuts an image into at most 12 "
                              "tiles (and a thumbnail): set image=WIDTHxHEIGHT")
        columns, rows = image_tiles(config, height, width)
        return {"size": [width, height], "tile_grid": [columns, rows],
                "tiles": columns * rows + (columns * rows > 1), "tile_size": config.vision_config.image_size[0]}
    if config.model_type in ANYRES_MODEL_TYPES:  # crops chosen by the image size; no pixel bounds
        if any(options[key] is not None for key in ("min_pixels", "max_pixels")):
            raise ConfigError(f"min_pixels and max_pixels bound the image of a Qwen model; {config.model_type} picks "
                              f"its crops from image_grid_pinpoints")
        from harness.adapters import ADAPTERS

        layout = ADAPTERS[config.model_type].layout(config, torch.tensor([[height, width]]), [True])
        return {"size": [width, height], "layout": dataclasses.asdict(layout)}
    if config.model_type not in QWEN_MODEL_TYPES:
        if any(options[key] is not None for key in ("image", "min_pixels", "max_pixels")):
            raise ConfigError(f"image, min_pixels and max_pixels set the image of a dynamic-resolution model (Qwen, "
                              f"InternVL); {config.model_type} resizes every image to "
                              f"{config.vision_config.image_size} px")
        return None
    bounds = []
    for key, default in zip(("min_pixels", "max_pixels"), QWEN_PROCESSOR_PIXELS[config.model_type], strict=True):
        chosen = options[key] if options[key] is not None else spec.get(key)
        bounds.append(default if chosen is None else chosen)
    grid = image_grid(config, height, width, *bounds)
    patch = config.vision_config.patch_size
    return {"size": [width, height], "resized": [grid[1] * patch, grid[0] * patch], "patch_grid": list(grid),
            "pixel_bounds": bounds}


@torch.no_grad()
def counted_prefill(cfg, pruner: TokenPruner, text_tokens: int) -> dict:
    """One prompt (`harness.bench`'s: random ids around the image's tokens, random pixels) on the configured model:
    its prefill counted by fvcore and by the torch counter, fvcore's own table, and the vision tokens that ran."""
    from fvcore.nn import flop_count_table

    from harness import fvcore_flops, models
    from harness.bench import prompt_inputs

    model = models.load(cfg.model, cfg.device).model
    inputs = prompt_inputs(model, text_tokens)
    traced, prefill, runtime = fvcore_flops.analysis(model, pruner, inputs, sample_ids=[0])
    fvcore = fvcore_flops.prefill_flops(traced, prefill, runtime)
    with prune(model, pruner, sample_ids=[0]) as runtime, FlopCounter(model, runtime) as counter:
        model(**inputs, use_cache=False, logits_to_keep=1)
    arch = Architecture.from_config(model.config)
    return {
        "vision_tokens_per_layer": [int(record.vision_tokens[0]) for record in runtime.layers],
        "fvcore": fvcore.summary(),
        "torch": counter.prefill.summary(),
        "fvcore_per_layer": [layer.total for layer in fvcore.layers],
        "torch_per_layer": [layer.total for layer in counter.prefill.layers],
        "unread_vision_layers_flops": arch.unread_vision_layers * arch.vision_layer(),
        "fvcore_table": flop_count_table(traced, max_depth=5, show_param_shapes=False),
    }


def _ratio(value: float, reference: float) -> float | None:
    return value / reference if reference else None


def _compared(dense: float, pruned: float) -> dict:
    return {"dense": dense, "pruned": pruned, "ratio": _ratio(pruned, dense)}


def _si(value: float | None) -> str:
    if value is None:
        return "—"
    for factor, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3f} {suffix}"
    return f"{value:.0f}"


def _image_line(image: dict, prompt: dict) -> str:
    size = "x".join(map(str, image["size"]))
    if "layout" in image:  # LLaVA-NeXT/OneVision
        return (f"image {size} px: {image['layout']['views']} views (base and crops); {prompt['newline_tokens']} of "
                "the text tokens are image-newline slots")
    if "tiles" in image:  # InternVL
        columns, rows = image["tile_grid"]
        thumbnail = " + a thumbnail" if image["tiles"] > 1 else ""
        count = f"{image['tiles']} tile" + "s" * (image["tiles"] > 1)
        return f"image {size} px = {columns}x{rows} tiles{thumbnail} of {image['tile_size']} px: {count}"
    return (f"image {size} px, resized to {'x'.join(map(str, image['resized']))} (pixel bounds "
            f"{image['pixel_bounds'][0]}..{image['pixel_bounds'][1]}) = {image['patch_grid'][1]}x"
            f"{image['patch_grid'][0]} patches")


def format_table(report: dict) -> str:
    dense, pruned, ratio, prompt, budget = (report[k] for k in ("dense", "pruned", "ratio", "prompt", "budget"))
    method = report["method"]
    image = report.get("image")
    lines = [
        f"{report['model']}: {prompt['total']}-token prompt ({prompt['vision_tokens']} vision + {prompt['text_tokens']}"
        f" text); {method}" + (f" budget={budget['tokens']} ({budget['convention']})" if budget["used"] else "")
        + f"; {report['source']}; T̄_in = {pruned['mean_vision_tokens']:.1f}",
        *([_image_line(image, prompt)] if image else []),
        f"{UNIT}. Not projected: the method's own work (counted in runs and by harness.bench).",
        f"{'':36}{'dense':>13}{method:>13}{'ratio':>8}",
    ]

    def row(label: str, a: float, b: float, r: float | None) -> str:
        return f"{label:36}{_si(a):>13}{_si(b):>13}{'—' if r is None else f'{r:.3f}':>8}"

    labels = {"total": "prefill", "vision": "  vision encoder", "projector": "  projector",
              "language_model": "  language model", "projections": "    projections (q, k, v, o)",
              "mlp": "    MLP", "attention": "    attention (QKᵀ, AV)",
              "vision_attention": "    vision-related attention", "lm_head": "  lm_head (last position)"}
    for key, label in labels.items():
        lines.append(row(label, dense["prefill"][key], pruned["prefill"][key], ratio["prefill"][key]))
    if report["decode_steps"]:
        for key, label in (("total", f"decode ({report['decode_steps']} steps)"),
                           ("vision_attention", "  vision-related attention")):
            lines.append(row(label, dense["decode"][key], pruned["decode"][key], ratio["decode"][key]))
    kv = dense["kv_cache_bytes_fp16"], pruned["kv_cache_bytes_fp16"]
    lines.append(f"{'KV cache after prefill, fp16 (MiB)':36}{kv[0] / 2**20:>13.1f}{kv[1] / 2**20:>13.1f}"
                 f"{kv[1] / kv[0]:>8.3f}")
    paper = report["paper_convention"]
    lines.append(f"The papers' convention ({paper['unit']}; {paper['scope']}):")
    for key, label in (("vision_token_flops", "  vision-token FLOPs 4nd²+2n²d+3ndm"),
                       ("vision_attention", "  vision attention 2(n_v²d+n_v·n_t·d)")):
        value = paper[key]
        lines.append(row(label, value["dense"], value["pruned"], value["ratio"])
                     + f"  (reduction {100 * (1 - value['ratio']):.1f}%)")
    if "counted" in report:
        lines += ["", *_counted_table(report["counted"], pruned)]
    return "\n".join(lines)


def _counted_table(counted: dict, projected: dict) -> list[str]:
    fvcore, torch_counted = counted["fvcore"], counted["torch"]
    lines = [f"The prefill of this prompt counted ({UNIT}; fvcore's multiply-adds × 2):",
             f"{'':36}{'fvcore':>13}{'torch':>13}{'projected':>13}"]
    labels = {"total": "prefill", "vision": "  vision encoder", "projector": "  projector",
              "language_model": "  language model", "attention": "    attention (QKᵀ, AV)",
              "vision_attention": "    vision-related attention", "lm_head": "  lm_head (last position)",
              "method": "  the method's own work", "other": "  other"}
    for key, label in labels.items():
        lines.append(f"{label:36}{_si(fvcore[key]):>13}{_si(torch_counted[key]):>13}"
                     f"{_si(projected['prefill'][key]):>13}")
    for index, (a, b) in enumerate(zip(counted["fvcore_per_layer"], counted["torch_per_layer"], strict=True)):
        lines.append(f"{f'    decoder layer {index}':36}{_si(a):>13}{_si(b):>13}")
    unread = _si(counted["unread_vision_layers_flops"])
    lines += [f"fvcore's trace drops the CLIP layers after the one LLaVA reads ({unread} FLOPs: they run, unread); "
              "the projection does not see the method's own work.",
              "fvcore's own table (its unit: one multiply-add = one flop; norms and pooling not counted):",
              counted["fvcore_table"]]
    return lines


def main(argv: list[str]) -> None:
    try:
        options, overrides = parse_args(argv)
        result = report(options, overrides)
    except ConfigError as error:
        sys.exit(f"prunebench: error: {error}")
    print(json.dumps(result) if options["output"] == "json" else format_table(result))


if __name__ == "__main__":
    main(sys.argv[1:])
