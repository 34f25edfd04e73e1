"""VisiPruner (Fan et al., EMNLP 2025, arXiv 2510.17205), as its reference code (`EIT-NLP/VisiPruner`) behaves.

Three stages over the decoder layers of one prefill (layer indices 0-based, S = `shallow_mid_layer`: the reference's 6
on LLaVA-1.5-7B/13B, the same relative depth on other depths, e.g. 2 on an 8-layer model):

1. **Shallow** (layers < S): post-softmax edits, no renormalisation. Layer 0, 7B rule: each text query's attention
   mass on the image moves onto the first image patch (the sink) and all attention to vision keys from the image
   onward is zeroed; 13B rule: vision->vision zeroed and text->first half of the image zeroed. Layers 1..S-1:
   text->vision zeroed. (The code still computes full attention here: these edits change results, not cost.)
2. **Middle** (layers > S, until found): for the last prompt token, the contribution of vision token j to the
   attention output is c_j = concat_h(a_hj * v_hj) (pre-o_proj), O = sum over all keys. The first layer where some
   cos(O - c_j, O) < `layer_threshold` is the filtering layer f; the tokens with ||(O - c_j) - O|| >
   `tokens_threshold` are kept (possibly none) and the rest dropped from layer f+1, original positions kept.
3. **Deep**: on each layer after f, if every kept token leaves cos >= `exit_threshold`, the layer counts; when the
   count reaches `exit_after` (not necessarily consecutive), all vision tokens are dropped from the next layer on.

KV caches stay as the reference leaves them: layers <= f hold all vision K/V (shallow ones included), layers f+1 ..
exit-1 the kept ones, later layers none. Nothing is edited during decoding.

`variant="paper"` applies the paper's text where the code differs (docs/methods.md, `visipruner`): a random sink patch
(seeded per sample), exit after `exit_after` *consecutive* qualifying layers, vision self-attention removed in every
shallow layer, and shallow layers' vision K/V removed from the cache after prefill.

Arithmetic: the reference computes contributions, cosines and norms in fp16. Cosines within ~1e-3 of 0.995/0.999
and norms near 0.2 can flip with the dtype, which changes f, the kept set and the exit layer; `score_dtype="model"`
(default) computes in the model's dtype (fp16 on GPU, like the reference), `float32`/`float16` force one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F

from methods.base import SCORE_DTYPES, AttentionEdit, ConfigError, Probe, Selection, TokenPruner, scale_layers
from methods.random import generator_seed

if TYPE_CHECKING:
    from harness.runtime import ProbeResult, PruneState

STAGES = ("shallow", "middle", "deep")


@dataclass(frozen=True)
class FamilyRule:
    """What VisiPruner fixes per model family: S (`shallow_mid_layer`) at the depth it was set for (placed at the same
    relative depth on others), and the layer-0 rule by depth."""

    depth: int
    shallow_mid_layer: int
    layer0_rules: dict[int, str]  # depth -> rule where not "7b"
    same_s_at: tuple[int, ...] = ()  # other depths that keep S as it is

    def mid_layer(self, num_layers: int) -> int:
        if num_layers == self.depth or num_layers in self.same_s_at:
            return self.shallow_mid_layer
        return scale_layers([self.shallow_mid_layer], num_layers, reference_layers=self.depth)[0]

    def layer0_rule(self, num_layers: int) -> str:
        return self.layer0_rules.get(num_layers, "7b")


#: The reference code's LLaVA-1.5 constants (S = 6 on the 7B and the 13B, the 13B's own layer-0 rule). The paper's
#: Qwen2-VL-7B row has no public code: S = 5 is LLaVA-7B's relative depth (6 of 32) on its 28 layers, and its layer 0
#: merges each image onto that image's first patch (the 7B rule); Qwen2.5-VL and Qwen3-VL take the same rule.
#: docs/models-qwen-rest.md says why, and that no real weights checked it.
QWEN_RULE = FamilyRule(depth=28, shallow_mid_layer=5, layer0_rules={})
FAMILY_RULES = {"llava": FamilyRule(depth=32, shallow_mid_layer=6, layer0_rules={40: "13b"}, same_s_at=(40,)),
                "qwen2_vl": QWEN_RULE, "qwen2_5_vl": QWEN_RULE, "qwen3_vl": QWEN_RULE}


def family_rule(family: str) -> FamilyRule:
    """The family's rule; LLaVA-1.5's where a family has none of its own (LLaVA-NeXT/OneVision and InternVL, whose
    VisiPruner settings nobody published: the reference's constants at the same relative depth)."""
    return FAMILY_RULES.get(family, FAMILY_RULES["llava"])


@dataclass
class VisiPruner(TokenPruner):
    """Options: `mode` (subset of shallow/middle/deep), `shallow_mid_layer` S, `layer_threshold`,
    `tokens_threshold`, `exit_threshold` (the code's hidden 0.999), `exit_after` (its hidden 2), `layer0_rule`
    (`auto`: 13b for a 40-layer model, else 7b), `variant` (code|paper), `score_dtype` (model|float32|float16),
    `attention` (eager, as the reference, or the model's own backend), `seed` (paper variant's random sink, per sample
    from the seed and the sample id), `generator_seed` (null; set: the sink generator's seed for every sample)."""

    name: ClassVar[str] = "visipruner"
    supports_batching: ClassVar[bool] = False  # f, the kept set and the exit layer differ per sample
    record_keys: ClassVar[tuple[str, ...]] = ("filter_layer", "kept_tokens", "exit_layer")

    mode: tuple[str, ...] = STAGES
    shallow_mid_layer: int | None = None
    layer_threshold: float = 0.995
    tokens_threshold: float = 0.2
    exit_threshold: float = 0.999
    exit_after: int = 2
    layer0_rule: str = "auto"
    variant: str = "code"
    score_dtype: str = "model"
    attention: str = "eager"
    seed: int = 0
    generator_seed: int | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.mode = tuple(self.mode)
        if not self.mode or not set(self.mode) <= set(STAGES):
            raise ConfigError(f"mode must be a non-empty subset of {', '.join(STAGES)}, got {list(self.mode)}")
        for key in ("layer_threshold", "tokens_threshold", "exit_threshold"):  # the reference's validation
            if not 0 < getattr(self, key) < 1:
                raise ConfigError(f"{key} must be in (0, 1), got {getattr(self, key)}")
        choices = {"layer0_rule": ("auto", "7b", "13b"), "variant": ("code", "paper"),
                   "score_dtype": ("model", *SCORE_DTYPES), "attention": ("eager", "model")}
        for key, valid in choices.items():
            if getattr(self, key) not in valid:
                raise ConfigError(f"{key} must be one of {', '.join(valid)}, got {getattr(self, key)!r}")
        if self.exit_after < 1:
            raise ConfigError(f"exit_after must be at least 1, got {self.exit_after}")

    def validate(self, num_vision: int, num_layers: int) -> None:
        super().validate(num_vision, num_layers)
        layer = self.shallow_mid_layer
        if layer is not None and (not isinstance(layer, int) or not 1 <= layer < num_layers):
            raise ConfigError(f"shallow_mid_layer must be null or in 1..{num_layers - 1}, got {layer!r}")
        self.mid_layer(num_layers)  # a depth that has no room for S stops here

    def mid_layer(self, num_layers: int, family: str = "llava") -> int:
        """S: as set, else the family's (`FAMILY_RULES`): the reference's 6 on LLaVA-1.5-7B/13B (32/40 layers),
        placed at the same relative depth of 32 layers on other depths (the reference has no other depth; S = 6 would
        leave an 8-layer model two layers that see the image); 5 on Qwen's 28."""
        if self.shallow_mid_layer is not None:
            return self.shallow_mid_layer
        return family_rule(family).mid_layer(num_layers)

    @property
    def attention_backend(self) -> str | None:
        return "eager" if self.attention == "eager" else None

    # ------------------------------------------------------------------ per prefill
    def begin(self, state: PruneState) -> None:
        vision, images = state.vision_index[0], state.vision_images[0]
        # Each image's run of vision tokens (Qwen: the <|image_pad|> slots between its vision_start/end markers).
        self.spans = [(int(vision[images == i][0]), int(vision[images == i][-1]) + 1)
                      for i in range(int(images.max()) + 1)]
        self.shallow_end = self.mid_layer(state.num_layers, state.family)
        rule = family_rule(state.family).layer0_rule(state.num_layers)
        self.rule = self.layer0_rule if self.layer0_rule != "auto" else rule
        self.drawn_seed = None
        if self.variant == "paper":  # the paper's random sink patch of each image, reproducible per sample
            self.drawn_seed = generator_seed(self.seed, state.sample_ids[0], self.generator_seed)
            generator = torch.Generator().manual_seed(self.drawn_seed)
            self.sinks = [int(torch.randint(end - start, (1,), generator=generator)) for start, end in self.spans]
        else:
            self.sinks = [0] * len(self.spans)  # the code always merges onto the first patch
        self.filter_layer: int | None = None
        self.kept: int | None = None
        self.exit_layer: int | None = None
        self.exit_count = 0
        self.checks: list[dict] = []

    def record(self, row: int) -> dict:
        """Besides f, the kept count and the exit layer: each tested layer's largest single-token cosine drop
        1 - min_j cos(O - c_j, O) (None: no vision token left), and in the deep stage whether it qualified."""
        seed = {} if self.drawn_seed is None else {"generator_seed": self.drawn_seed}
        return {"filter_layer": self.filter_layer, "kept_tokens": self.kept, "exit_layer": self.exit_layer,
                "layer_checks": self.checks, **seed}

    def end(self, state: PruneState) -> None:
        """The reference also tests the last layer: a filtering layer found there is recorded (nothing is left to
        prune); an exit needs a following layer, so none is recorded."""
        if self.filter_layer is None:
            self.select(state.num_layers, state)

    # ------------------------------------------------------------------ stage 1: shallow edits
    def attention_edit(self, layer: int, state: PruneState) -> AttentionEdit | None:
        if "shallow" not in self.mode or layer >= self.shallow_end:
            return None
        return lambda probs, state: self._shallow_edit(layer, probs)

    def _shallow_edit(self, layer: int, probs: torch.Tensor) -> torch.Tensor:
        """The reference's edits of its one image, on each image of the prompt: its keys [v0, v1), the text queries
        after it (the runs between later images, and after the last)."""
        probs = probs.clone()
        for image, ((v0, v1), sink) in enumerate(zip(self.spans, self.sinks, strict=True)):
            text = [slice(end, start) for end, start in
                    zip([end for _, end in self.spans[image:]], [start for start, _ in self.spans[image + 1:]] + [None],
                        strict=True)]
            if layer == 0 and (self.rule == "7b" or self.variant == "paper"):
                mass = [probs[:, :, rows, v0:v1].sum(dim=-1) for rows in text]  # each text query's mass on the image
                probs[:, :, v0:, v0:v1] = 0  # vision and text queries lose all attention to its vision keys ...
                for rows, moved in zip(text, mass, strict=True):
                    probs[:, :, rows, v0 + sink] = moved  # ... and text queries put that mass on the sink patch
            elif layer == 0:  # 13B rule
                probs[:, :, v0:v1, v0:v1] = 0
                for rows in text:
                    probs[:, :, rows, v0:v0 + (v1 - v0) // 2] = 0
            else:
                for rows in text:
                    probs[:, :, rows, v0:v1] = 0
                if self.variant == "paper":
                    probs[:, :, v0:v1, v0:v1] = 0
        return probs

    # ------------------------------------------------------------------ stages 2 and 3: probes and drops
    def probe(self, layer: int, state: PruneState) -> Probe | None:
        middle = "middle" in self.mode and self.filter_layer is None and layer > self.shallow_end
        deep = "deep" in self.mode and self.filter_layer is not None and self.exit_layer is None
        return Probe(queries=state.last_query, values=True) if middle or deep else None

    def select(self, layer: int, state: PruneState) -> Selection | None:
        probe = state.probes.get(layer - 1)
        if probe is None or self.exit_layer is not None:
            return None
        vision = state.vision_index[0]
        cosine, distance = self.contributions(probe, vision)
        self.checks.append({"layer": layer - 1, "cosine_drop": 1 - float(cosine.min()) if cosine.numel() else None})
        if self.filter_layer is None:
            if not (cosine < self.layer_threshold).any():
                return None
            self.filter_layer = layer - 1
            keep = (distance > self.tokens_threshold).nonzero()[:, 0]
            self.kept = keep.numel()
            return Selection(keep=keep[None])
        qualifies = bool((cosine >= self.exit_threshold).all())  # no kept token: trivially true, as in the code
        self.checks[-1]["qualifies"] = qualifies
        self.exit_count = self.exit_count + 1 if qualifies else (0 if self.variant == "paper" else self.exit_count)
        if self.exit_count < self.exit_after:
            return None
        self.exit_layer = layer
        return Selection(keep=vision.new_zeros(1, 0))

    def contributions(self, probe: ProbeResult, vision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos(O - c_j, O) and ||(O - c_j) - O|| for each vision token j, for the last prompt token (batch row 0)."""
        weights, values = probe.attention[0, :, -1], probe.values[0]  # (H, n), (H, n, D)
        output = probe.output[0, -1]  # O: the layer's own output row, heads concatenated, before o_proj
        if self.score_dtype != "model":
            dtype = SCORE_DTYPES[self.score_dtype]
            weights, values, output = weights.to(dtype), values.to(dtype), output.to(dtype)
        contribution = (weights[:, vision, None] * values[:, vision]).transpose(0, 1).flatten(1)  # (V, H*D)
        without = output[None] - contribution
        return F.cosine_similarity(without, output[None], dim=-1), (without - output[None]).norm(dim=-1)

    def cache_keep(self, layer: int, state: PruneState) -> torch.Tensor | None:
        if self.variant != "paper" or "shallow" not in self.mode or layer >= self.shallow_end:
            return None
        return (~state.is_vision[0]).nonzero()[:, 0][None]  # the paper excludes shallow vision K/V from the cache
