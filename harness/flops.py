"""FLOPs: counted over what ran, projected from a config and token counts, and the papers' convention beside them.

**Unit.** FLOPs = 2 × multiply-adds, everywhere in prunebench: an (n×k)·(k×m) product is 2nkm FLOPs. Only matrix
products are counted (linear layers, the patch convolution, attention's QKᵀ and AV); element-wise work (norms,
activations, softmax, residual adds) is not, as in fvcore, torch's FlopCounterMode and every paper's formula.
Attention counts the whole n_q × n_k rectangle (no causal halving), as the sdpa kernels' formulas and the papers do.

**Breakdown** (`PhaseFlops`, one per phase: the prefill, and all decode steps together): vision encoder (the patch
convolution and every CLIP layer that runs: Hugging Face runs the whole tower although LLaVA reads layer -2),
projector, language model per decoder layer (q/k/v/o projections, SwiGLU MLP, attention, and within attention the
**vision-related** part: the query-key pairs where a vision token is the query or the key), lm_head, the method's own
work (probes, scoring, selection: whatever runs as the method's code, see `harness.runtime.in_method_work`), and
`other` (counted work outside these components; none in LLaVA-1.5, whose RoPE tables are element-wise).

**Counted** (`FlopCounter`): torch's `FlopCounterMode` sees every aten op as it is dispatched, through generate(), the
pruning runtime's hooks and the KV cache, on any device including `meta`. fvcore was the first candidate, and is not
used: its jit trace cannot follow generate(), the cache or the runtime's data-dependent hooks, and it drops dead code
(the CLIP layer LLaVA never reads still runs). FlopCounterMode has no formula for the CPU sdpa kernel
(`_scaled_dot_product_flash_attention_for_cpu`); all sdpa kernels get the one formula below. Each counted op is
attributed to the innermost component module running (forward hooks), or to the method while the runtime runs the
method's code. The vision-related part of each attention call is its count times the share of vision pairs, from the
tokens that call saw (the runtime's records: vision tokens entering the layer in prefill, and vision tokens left in
the layer's KV cache for decode steps, whose queries are text).

**Projected** (`project`): the same breakdown from an `Architecture` (read from a LLaVA config, so full-size models
need no weights) and a `Schedule` (tokens and vision tokens entering each layer, the KV caches, the decode steps).
Tests hold the projection to the counter on executed tiny models and on the 7B config on `meta`.

**The papers' convention** (`paper_vision_token_flops`, `paper_vision_attention`): FastV, SparseVLM and VisiPruner
report "FLOPs" of the language model's prefill over the vision tokens only, per layer 4nd² + 2n²d + 3ndm with n the
vision tokens entering the layer, in multiply-adds (half our unit). Dense LLaVA-1.5-7B: 3.82 T.

    python -m harness.flops model=llava7b method=random method.k=2 budget=128 [text_tokens=60] [decode_steps=0]
        [output=json]
    python -m harness.flops model=llava7b method=visipruner results_dir=results/llava7b/<task>/visipruner/none
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

from harness.cost import decoding, forward_cache
from harness.results import SAMPLES, read_samples
from harness.runtime import PruningRuntime, in_method_work
from methods.base import ConfigError, TokenPruner

UNIT = "FLOPs = 2 x multiply-adds"
DEFAULT_TEXT_TOKENS = 60  # a short VQA prompt (vicuna_v1 system prompt + question) with the LLaMA tokenizer: 636 total
COMPONENTS = ("vision", "projector", "projections", "mlp", "attention", "vision_attention", "language_model",
              "lm_head", "method", "other", "total")

_aten = torch.ops.aten
_SDPA_KERNELS = (_aten._scaled_dot_product_flash_attention_for_cpu, _aten._scaled_dot_product_flash_attention,
                 _aten._scaled_dot_product_efficient_attention, _aten._scaled_dot_product_cudnn_attention)


def _sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
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
class Architecture:
    """What the FLOPs of a LLaVA model depend on (CLIP vision tower, 2-layer MLP projector, LLaMA language model)."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    vision_layers: int
    vision_hidden: int
    vision_intermediate: int
    image_size: int
    patch_size: int
    channels: int
    image_features: int  # vision features per image entering the projector (= vision tokens in the prompt)

    @classmethod
    def from_config(cls, config) -> Architecture:
        text, vision = config.text_config, config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        return cls(
            layers=text.num_hidden_layers, hidden=text.hidden_size, intermediate=text.intermediate_size,
            heads=text.num_attention_heads, kv_heads=text.num_key_value_heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
            vocab=text.vocab_size, vision_layers=vision.num_hidden_layers, vision_hidden=vision.hidden_size,
            vision_intermediate=vision.intermediate_size, image_size=vision.image_size, patch_size=vision.patch_size,
            channels=vision.num_channels,
            image_features=patches + (config.vision_feature_select_strategy == "full"),
        )

    def vision_encoder(self) -> float:
        """One image: the patch convolution, then every CLIP layer on the patches plus CLS."""
        patches = (self.image_size // self.patch_size) ** 2
        n, d = patches + 1, self.vision_hidden
        layer = 2 * n * 4 * d * d + 2 * n * 2 * d * self.vision_intermediate + 4 * n * n * d
        return 2 * patches * self.channels * self.patch_size**2 * d + self.vision_layers * layer

    def projector(self, features: int) -> float:
        return 2 * features * (self.vision_hidden * self.hidden + self.hidden * self.hidden)

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
        projector=schedule.images * arch.projector(arch.image_features),
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
    """Counts every FLOP that runs inside the block on `model` (a `LlavaForConditionalGeneration`), split into
    `prefill` and `decode` `PhaseFlops` of the whole batch.

    A forward of the model whose KV cache already holds tokens is a decode step; everything else (including the
    vision tower, which generate() may run before the first forward) is prefill. The vision-related attention split
    needs to know which tokens are vision: it comes from `runtime` (the block's `prune()` runtime; without one the
    split is not made and `vision_attention` stays 0).
    """

    def __init__(self, model, runtime: PruningRuntime | None = None):
        super().__init__(display=False, custom_mapping=dict.fromkeys(_SDPA_KERNELS, _sdpa_flops))
        self.model, self.runtime = model, runtime
        num_layers = len(model.model.language_model.layers)
        self.prefill, self.decode = PhaseFlops.empty(num_layers), PhaseFlops.empty(num_layers)
        self._scopes: list = []  # innermost component running: a PhaseFlops field, or (layer, part[, pairs...])
        self._decoding = False
        self._cache_vision: dict[int, int] = {}
        self._handles: list = []

    def __enter__(self) -> FlopCounter:
        llava = self.model.model
        scopes: dict[torch.nn.Module, object] = {
            llava.vision_tower: "vision", llava.multi_modal_projector: "projector", self.model.lm_head: "lm_head"}
        for index, layer in enumerate(llava.language_model.layers):
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
            cached = runtime.state.input_ids[0, runtime.layers[index].orig_index[0]]
            self._cache_vision[index] = int((cached == runtime.image_token_id).sum())
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


def executed_schedule(runtime: PruningRuntime, decode_steps: int) -> Schedule:
    """What one sample of the runtime's last prefill processed (every row of a batch has the same shapes)."""
    input_ids = runtime.state.input_ids[0]
    if not runtime.active:
        # No image: the runtime recorded nothing, and every layer saw (and cached) the whole prompt.
        layers = len(runtime.lm.layers)
        return Schedule([input_ids.numel()] * layers, [0] * layers, images=0, decode_steps=decode_steps)
    text = int((input_ids != runtime.image_token_id).sum())
    vision = [int(record.vision_tokens[0]) for record in runtime.layers]
    cached = [input_ids[record.orig_index[0]] for record in runtime.layers]
    return Schedule(
        tokens=[text + v for v in vision], vision=vision,
        cache=[ids.numel() for ids in cached],
        cache_vision=[int((ids == runtime.image_token_id).sum()) for ids in cached],
        decode_steps=decode_steps,
    )


# ---------------------------------------------------------------------------------------------------- runs
@torch.no_grad()
def count_generation(model, pruner: TokenPruner, inputs: dict, sample_ids: list, questions: list[str] | None = None,
                     **generate_options) -> tuple[PhaseFlops, PhaseFlops]:
    """Replay a batch's generation (the timed run's `generate_options`) under the counter: (prefill, decode) FLOPs
    per sample."""
    from harness.runtime import prune

    with prune(model, pruner, sample_ids, questions) as runtime, FlopCounter(model, runtime) as counter:
        model.generate(**inputs, **generate_options)
    rows = inputs["input_ids"].shape[0]
    return counter.prefill.scaled(1 / rows), counter.decode.scaled(1 / rows)


def sample_record(prefill: PhaseFlops, decode: PhaseFlops, arch: Architecture, vision: list[int]) -> dict:
    """The `flops` field of a sample in samples.jsonl."""
    return {"prefill": prefill.summary(), "decode": decode.summary(),
            "paper_vision_token_flops": paper_vision_token_flops(arch, vision)}


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
        "flops_method": prefill["method"] + decode["method"] if source == "counted" else None,
        "flops_source": source,
        "paper_vision_token_flops": statistics.fmean(r["flops"]["paper_vision_token_flops"] for r in records),
        "flops": mean,
    }


# ---------------------------------------------------------------------------------------------------- CLI
OPTIONS = {"text_tokens": DEFAULT_TEXT_TOKENS, "decode_steps": 0, "results_dir": None, "output": "table"}


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
    for key in ("text_tokens", "decode_steps"):
        if not str(options[key]).isdigit():
            raise ConfigError(f"{key} must be a whole number, got {options[key]!r}")
        options[key] = int(options[key])
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
    arch = Architecture.from_config(model_config(cfg.model))
    pruner.validate(arch.image_features, arch.layers)
    results_dir = options["results_dir"]
    if results_dir is not None:
        vision = recorded_vision(Path(results_dir), arch.layers)
    else:
        vision = [static_vision_schedule(pruner, arch.image_features, arch.layers)]
    text, steps = options["text_tokens"], options["decode_steps"]
    dense = projection(arch, [[arch.image_features] * arch.layers], text, steps)
    pruned = projection(arch, vision, text, steps)
    return {
        "unit": UNIT,
        "model": cfg.model.name,
        "method": cfg.method.get("label", cfg.method.name),
        "budget": {"tokens": pruner.budget.tokens, "convention": pruner.budget.convention,
                   "used": pruner.uses_budget},
        "source": f"counts recorded by {len(vision)} samples in {results_dir}" if results_dir else "fixed schedule",
        "prompt": {"vision_tokens": arch.image_features, "text_tokens": text, "total": arch.image_features + text},
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


def format_table(report: dict) -> str:
    dense, pruned, ratio, prompt, budget = (report[k] for k in ("dense", "pruned", "ratio", "prompt", "budget"))
    method = report["method"]
    lines = [
        f"{report['model']}: {prompt['total']}-token prompt ({prompt['vision_tokens']} vision + {prompt['text_tokens']}"
        f" text); {method}" + (f" budget={budget['tokens']} ({budget['convention']})" if budget["used"] else "")
        + f"; {report['source']}; T̄_in = {pruned['mean_vision_tokens']:.1f}",
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
    return "\n".join(lines)


def main(argv: list[str]) -> None:
    try:
        options, overrides = parse_args(argv)
        result = report(options, overrides)
    except ConfigError as error:
        sys.exit(f"prunebench: error: {error}")
    print(json.dumps(result) if options["output"] == "json" else format_table(result))


if __name__ == "__main__":
    main(sys.argv[1:])
