"""The pruning runtime: runs a `TokenPruner` inside a Hugging Face vision-language model's forward, prefill and decode.

It reaches the model only through its adapter (`harness.adapters`: where the decoder layers, rotary embedding, vision
tower and projector are, which ids are vision tokens), so every supported family runs the same code.

`prune(model, pruner)` is a context manager that installs forward hooks (nothing is patched globally) and removes
them on exit. During prefill it:

- locates the vision tokens from the model's image token id (never from fixed offsets), and each image's tokens,
  through the adapter (LLaVA-NeXT/OneVision's image-newline slots share that id but are kept like text);
- lets a pre-LLM method reduce the vision features before the projector, or the projected embeddings after it (the
  freed placeholder slots are dropped before decoder layer 0, so the language model sees exactly the shorter
  sequence), where each family allows it: LLaVA-NeXT/OneVision each image's embeddings once `pack_image_features` has
  laid out its crops and newline slots; InternVL each image's projected tokens as layer 0 receives them; towers
  without CLS (Qwen) each image's tokens at the tower's output, ranked by the attention each token's patches receive
  (`received_attention`), each kept token in its own slot;
- before each decoder layer, applies the pruner's `Selection`: it physically gathers the hidden states, the
  4-D mask and the RoPE positions (kept original, or renumbered contiguously as a shorter input would get them),
  with as many position rows as the model's RoPE takes (M-RoPE: the (3, B, n) ids the model computed), and on
  Qwen3-VL the DeepStack features added after the first layers;
- records attention probes and applies post-softmax edits through one registered attention function, which
  delegates to the model's own backend (sdpa or eager) and computes explicit softmax rows only where asked.

With `record=True` the runtime's `recorder` follows which image patches each vision token stands for through the
pre-LLM reduction, every applied `Selection` and cache eviction (`harness.records`).

Each layer's KV cache keeps what that layer saw during prefill, so caches differ in length per layer. During decode
the runtime maps the model's full-length mask onto each layer's cache and, for compact positions, shifts the new
tokens' positions by the number of tokens that layer dropped. `generate()` works unchanged.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
import itertools
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward, repeat_kv

from harness.adapters import adapter_for
from harness.adapters.base import VisionAttentionCall
from harness.cost import decoding, forward_cache
from harness.records import SelectionRecorder
from methods.base import ConfigError, Probe, Selection, TokenPruner, handles_ragged_batches

SUPPORTED_BACKENDS = ("sdpa", "eager")
_ACTIVE: contextvars.ContextVar[PruningRuntime | None] = contextvars.ContextVar("prunebench_runtime", default=None)
_METHOD_WORK: contextvars.ContextVar[bool] = contextvars.ContextVar("prunebench_method_work", default=False)


def in_method_work() -> bool:
    """Whether the code running now is the method's own (selection, scoring, probes, edits): FLOP counters put it on
    its own line."""
    return _METHOD_WORK.get()


@dataclass
class ProbeResult:
    queries: torch.Tensor  # (B, q) current-sequence indices of the probed queries
    attention: torch.Tensor  # (B, H, q, keys) post-softmax probabilities, in the model's dtype
    values: torch.Tensor | None  # (B, H, keys, head_dim), key/value heads repeated to H
    output: torch.Tensor | None = None  # (B, q, H * head_dim): the layer's own attention output rows, before o_proj
    keys: torch.Tensor | None = None  # (B, kv_heads, keys, head_dim): the layer's keys after RoPE, as cached


@dataclass
class VisionProbe:
    """One vision-tower layer, for pre-LLM methods: the feature layer (the one LLaVA reads) unless the method's
    `vision_probe_layer` names another. Towers without CLS (Qwen: one image at a time) have no `hidden`,
    `cls_attention` or `cls_query`; they give `received` and keys per vision token (the tower's outputs)."""

    hidden: torch.Tensor | None  # (images, 1 + patches, d_vision): the layer's output, CLS first
    cls_attention: torch.Tensor | None  # (images, heads, 1 + patches): softmax attention of the CLS query
    keys: torch.Tensor  # (images, heads, 1 + patches, head_dim): the layer's keys (k_proj output, per head)
    cls_query: torch.Tensor | None = None  # (images, heads, 1, head_dim): the CLS query (q_proj output, unscaled)
    #: False where `hidden` is the image's projected tokens, which the CLS token never reaches (InternVL: see
    #: `ModelAdapter.image_probes`); the other fields keep their CLS entry first
    hidden_has_cls: bool = True
    #: (images, tokens) without CLS: the mean attention each vision token's patches receive (`received_attention`)
    received: torch.Tensor | None = None
    #: (images, 1 + tokens, d_vision) where `hidden` is the packed tokens (LLaVA-NeXT) and the method reads the CLIP
    #: states (CDPruner): the layer's output laid out like them, CLS first (the mean of the views' CLS states)
    tower_hidden: torch.Tensor | None = None


@dataclass
class PruneState:
    """Bookkeeping of one prefill; pruners read it, only the runtime writes it."""

    num_layers: int
    sample_ids: list
    hidden_states: torch.Tensor | None = None  # input of the current layer (B, n, d)
    orig_index: torch.Tensor | None = None  # (B, n) original sequence index (merged tokens: their image's last slot)
    is_vision: torch.Tensor | None = None  # (B, n)
    image_index: torch.Tensor | None = None  # (B, n) the image (0, 1, ...) a vision token shows in its row; -1: text
    valid: torch.Tensor | None = None  # (B, n) False for padding
    #: RoPE position ids, (B, n), or (rows, B, n) on M-RoPE models (Qwen: t, h, w); index tokens with [..., b, i]
    positions: torch.Tensor | None = None
    input_ids: torch.Tensor | None = None  # (B, N) the full prompt
    probes: dict[int, ProbeResult] = field(default_factory=dict)
    #: `attention_preview(queries)`: (B, H, q, n) softmax rows that the *current* layer would compute for `queries`,
    #: from its own input norm and q/k projections, before it runs (PDrop scores the next layer this way)
    attention_preview: Callable[[torch.Tensor], torch.Tensor] | None = None
    #: `rotary(positions)`: the model's RoPE (cos, sin), each (B, n, head_dim), at position ids shaped as `positions`
    rotary: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    #: `final_norm(hidden)`: the language model's last norm (the one before lm_head), e.g. for DART's duplication
    final_norm: Callable[[torch.Tensor], torch.Tensor] | None = None
    #: the model's family (`ModelAdapter.family`), for methods whose constants differ per family (VisiPruner)
    family: str = "llava"

    @property
    def batch_size(self) -> int:
        return self.is_vision.shape[0]

    @property
    def seq_len(self) -> int:
        return self.is_vision.shape[1]

    @property
    def vision_counts(self) -> torch.Tensor:
        """(B,) vision tokens of each row."""
        return self.is_vision.sum(1)

    @property
    def ragged(self) -> bool:
        """Whether the rows hold different numbers of vision tokens (a padded batch of images of different sizes on a
        dynamic-resolution model, or rows that kept different numbers)."""
        counts = self.vision_counts
        return bool((counts != counts[0]).any())

    @property
    def num_vision(self) -> int:
        """The vision tokens of every row; a ragged batch has no one count (read `vision_counts`), so a method that
        reads this never runs on one silently wrong."""
        if self.ragged:
            raise ValueError(f"the rows hold different numbers of vision tokens, {self.vision_counts.tolist()}: "
                             f"this method needs the same number in every row of a batch; set batch_size=1")
        return int(self.is_vision[0].sum())

    @property
    def vision_valid(self) -> torch.Tensor:
        """(B, V) False at the entries of `vision_index` that pad a ragged batch's shorter rows."""
        counts = self.vision_counts
        return torch.arange(int(counts.max()), device=counts.device) < counts[:, None]

    @property
    def vision_index(self) -> torch.Tensor:
        """(B, V) current-sequence indices of the vision tokens, ascending; on a ragged batch V is the largest row's
        count, and a shorter row ends in entries 0 (`vision_valid` says which)."""
        if not self.ragged:
            return self.is_vision.nonzero()[:, 1].view(self.batch_size, -1)
        n = self.seq_len
        slots = torch.where(self.is_vision, torch.arange(n, device=self.is_vision.device), n)
        index = slots.sort(dim=1).values[:, :int(self.vision_counts.max())]
        return index.masked_fill(index == n, 0)

    @property
    def vision_images(self) -> torch.Tensor:
        """(B, V) the image of each current vision token, in `vision_index` order, -1 at a ragged batch's padding
        entries (a state built without `image_index`: one image per row)."""
        if self.image_index is None:
            return torch.zeros_like(self.vision_index)
        return self.image_index.gather(1, self.vision_index).masked_fill(~self.vision_valid, -1)

    @property
    def last_query(self) -> torch.Tensor:
        """(B, 1) index of the last prompt token (left padding keeps it last in every row)."""
        return torch.full((self.batch_size, 1), self.seq_len - 1, device=self.is_vision.device)


@dataclass
class LayerRecord:
    orig_index: torch.Tensor  # (B, n_l) tokens entering the layer
    vision_tokens: torch.Tensor  # (B,) vision tokens entering the layer
    position_shift: torch.Tensor  # (B,) decode-position shift (compact positions only)
    changed: bool  # whether the layer's tokens differ from the model's own full sequence
    valid: torch.Tensor  # (B, n_l) False for padding, and for dropped tokens kept as padding slots (ragged batches)
    tokens: int  # tokens entering the layer in every row (padding and padding slots included)


class PruningRuntime:
    """Installed by `prune()`; holds the hooks and the per-prefill state."""

    def __init__(self, model, pruner: TokenPruner, sample_ids: list | None = None, record: bool = False,
                 questions: list[str] | None = None):
        self.model, self.pruner, self.sample_ids, self.questions = model, pruner, sample_ids, questions
        #: with `record`: the patches behind every vision token, wherever they change (`harness.records`)
        self.recorder = SelectionRecorder.for_model(model.config) if record else None
        self.adapter = adapter_for(model)
        self.multimodal = model.model  # embeds the image features into the sequence; its call starts a prefill
        self.lm = self.adapter.language_model(model)
        self.text_config = self.lm.config
        self.image_token_id = self.adapter.image_token_id(model)
        self.state: PruneState | None = None
        self.prompt_vision: torch.Tensor | None = None
        self.layers: list[LayerRecord] = []
        self.active = False  # pruning this prefill (False: no image tokens)
        self.selection_seconds = 0.0  # inside the method's own code, accumulated while installed
        self._reduced_slots: int | None = None  # vision slots per image kept by a pre-LLM feature reduction
        self._reduces_in_sequence = False  # pre-LLM reduction before layer 0, image by image (`_reduce_in_sequence`)
        self._image_slots = 0  # vision slots per image before that reduction
        #: the vision slots (every row's, in order) a pre-LLM reduction filled; the others are dropped before layer 0
        self._kept_slots: torch.Tensor | None = None
        self._image_grids: torch.Tensor | None = None  # towers without CLS: the images of the current tower call
        self._received: tuple[torch.Tensor, torch.Tensor] | None = None  # and their (received, keys) per token
        #: compact positions renumber a shorter input; M-RoPE models accept them only for pre-LLM reductions (the
        #: adapter refuses the rest), where a shorter input's image keeps its grid positions: the kept tokens' own
        self.compact = pruner.positions == "compact" and self.adapter.position_rows == 1
        self._vision_probe: dict[str, torch.Tensor] = {}
        self._full_len = 0
        self._full_valid: torch.Tensor | None = None
        self._decode_mask2d: torch.Tensor | None = None  # the 2-D attention mask of the current decode step
        self._pos_emb: tuple[torch.Tensor, torch.Tensor] | None = None  # set once the tokens differ from the input
        self._probe_request: tuple[int, Probe] | None = None
        self._edit = None
        self._handles: list = []
        self._ended = False  # the pruner's end() ran for this prefill

    # ------------------------------------------------------------------ install / remove
    def __enter__(self) -> PruningRuntime:
        self.adapter.check_method(self.pruner)  # what the family does not define (the harness refused it already)
        if self.pruner.needs_question and self.questions is None:
            raise ValueError(f"method {self.pruner.name} reads the question text: pass questions= to prune()")
        base = self.pruner.attention_backend or self.text_config._attn_implementation or "sdpa"
        if base not in SUPPORTED_BACKENDS:
            raise ConfigError(
                f"attention backend {base!r} is not supported by the pruning runtime; use one of {SUPPORTED_BACKENDS}"
            )
        self._base, self._model_backend = base, self.text_config._attn_implementation
        self.text_config._attn_implementation = _register_attention(base)
        self._token = _ACTIVE.set(self)
        self._handles.append(self.multimodal.register_forward_pre_hook(self._on_model_call, with_kwargs=True))
        self._handles.append(self.lm.register_forward_pre_hook(self._on_language_model_call, with_kwargs=True))
        reduces_features = type(self.pruner).reduce_image_features is not TokenPruner.reduce_image_features
        self._reduces_embeddings = type(self.pruner).reduce_image_embeddings is not TokenPruner.reduce_image_embeddings
        if (reduces_features or self._reduces_embeddings) and self.adapter.packs_features:
            # LLaVA-NeXT/OneVision lay out crops and newlines after the projector: reduce each packed image instead
            self.multimodal.pack_image_features = functools.partial(
                self._reduce_packed, type(self.multimodal).pack_image_features, self.multimodal)
            if self.pruner.needs_vision_probe:
                # per view, packed like the features; the layer's states only for a method that reads them (CDPruner)
                self._install_vision_probe(output=self.pruner.needs_clip_tower is not None)
        elif (reduces_features or self._reduces_embeddings) and not self.adapter.cls_token:
            self._install_tower_reduction()
        elif reduces_features or self._reduces_embeddings:
            if self.adapter.reduces_in_sequence:  # the projector's output cannot be split into images here
                self._reduces_in_sequence = True
            else:
                projector = self.adapter.projector(self.model)
                if reduces_features:
                    self._handles.append(projector.register_forward_pre_hook(self._reduce_features))
                self._handles.append(projector.register_forward_hook(self._reduce_embeddings))
            if self.pruner.needs_vision_probe:
                self._install_vision_probe(output=True)
        for layer in self.lm.layers:
            self._handles.append(layer.register_forward_pre_hook(self._before_layer, with_kwargs=True))
        if self.adapter.deepstack_layers(self.model):
            self.lm._deepstack_process = functools.partial(self._deepstack_process, type(self.lm)._deepstack_process,
                                                           self.lm)
        if type(self.pruner).end is not TokenPruner.end:
            self._handles.append(self.lm.layers[-1].register_forward_hook(self._after_last_layer))
        if type(self.pruner).cache_keep is not TokenPruner.cache_keep:
            for layer in self.lm.layers:
                self._handles.append(layer.register_forward_hook(self._evict_from_cache, with_kwargs=True))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        _ACTIVE.reset(self._token)
        self.text_config._attn_implementation = self._model_backend
        vars(self.lm).pop("_deepstack_process", None)  # the class's own again
        vars(self.multimodal).pop("pack_image_features", None)

    # ------------------------------------------------------------------ prefill start
    def _on_model_call(self, module, args, kwargs):
        if decoding(kwargs):  # keep the decode step's 2-D mask for `_decode_inputs`
            self._decode_mask2d = kwargs.get("attention_mask")
            return None
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            raise ValueError("the pruning runtime needs input_ids to locate the vision tokens")
        # the call's other inputs (image sizes) tell LLaVA-NeXT/OneVision's newline slots from prunable ones
        is_vision = self.adapter.vision_mask(self.model, input_ids, kwargs)
        counts = is_vision.sum(dim=1)
        self.layers, self._ended = [], False
        self.active = bool(counts.any())
        if self.active and not bool((counts == counts[0]).all()) and self.adapter.fixed_vision_tokens:
            raise ValueError(f"every sample of a batch needs the same number of vision tokens, got {counts.tolist()}")
        if self.active and not bool((counts == counts[0]).all()) and not handles_ragged_batches(type(self.pruner)):
            raise ValueError(f"method {self.pruner.name} needs the same number of vision tokens in every sample of a "
                             f"batch, got {counts.tolist()}; set batch_size=1")
        batch = input_ids.shape[0]
        if self.active and batch > 1 and not self.pruner.supports_batching:
            raise ValueError(f"method {self.pruner.name} supports batch size 1 only; set batch_size=1")
        mask2d = kwargs.get("attention_mask")
        valid = mask2d.bool() if mask2d is not None else torch.ones_like(is_vision)
        self._full_len, self._full_valid = input_ids.shape[1], valid
        self.prompt_vision = is_vision  # (B, N) the prompt's prunable vision slots (cost accounting reads them)
        self.state = PruneState(
            num_layers=len(self.lm.layers),
            sample_ids=list(self.sample_ids) if self.sample_ids is not None else list(range(batch)),
            orig_index=torch.arange(input_ids.shape[1], device=input_ids.device).expand(batch, -1),
            is_vision=is_vision,
            image_index=self.adapter.image_index(self.model, input_ids, kwargs),
            valid=valid,
            input_ids=input_ids,
            rotary=self._rotary,
            final_norm=self.lm.norm,
            family=self.adapter.family,
        )
        self._pos_emb = None
        if self.active and self.recorder is not None:
            model_inputs = {**kwargs, "input_ids": input_ids}  # images with several grids: `token_views`
            self.recorder.begin(is_vision, self.adapter.token_grids(self.model, model_inputs),
                                self.adapter.token_views(self.model, model_inputs))
        if self.active:
            self._timed(self.pruner.begin, self.state)
        return None

    def _on_language_model_call(self, module, args, kwargs):
        """The position ids the language model computes RoPE from: M-RoPE models build their (3, B, n) ids from the
        image grids inside the model call (under generate() with the text row first: (4, B, n)); 1-D models take the
        caller's (B, n) ids, or count from 0."""
        if not self.active or decoding(kwargs):
            return None
        positions = kwargs.get("position_ids")
        batch, n = self.state.is_vision.shape
        if positions is None:
            positions = torch.arange(n, device=self.state.is_vision.device)
        if self.adapter.position_rows > 1:
            positions = positions[-self.adapter.position_rows:] if positions.dim() == 3 else positions[None]
            self.state.positions = positions.expand(self.adapter.position_rows, batch, -1)
        else:
            self.state.positions = positions.expand(batch, -1)
        return None

    def _deepstack_process(self, add, lm, hidden: torch.Tensor, visual_pos_masks: torch.Tensor,
                           visual_embeds: torch.Tensor) -> torch.Tensor:
        """Qwen3-VL adds each vision slot's DeepStack feature after the first decoder layers: once tokens are
        dropped, the slots' mask and features follow the tokens that layer kept (merged tokens get their slot's)."""
        if self.active and self._pos_emb is not None:
            rank = visual_pos_masks.flatten().cumsum(0).view_as(visual_pos_masks) - 1  # (B, N): feature row per slot
            kept_mask = visual_pos_masks.gather(1, self.state.orig_index)
            visual_embeds = visual_embeds[rank.gather(1, self.state.orig_index)[kept_mask]]
            visual_pos_masks = kept_mask
        return add(lm, hidden, visual_pos_masks, visual_embeds)

    def _rotary(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lm.rotary_emb(self.lm.embed_tokens.weight[:1], position_ids=positions)

    def _timed(self, fn, *args):
        """Run the method's own code: its time goes to `selection_seconds`, and it is marked as method work."""
        start = time.perf_counter()
        token = _METHOD_WORK.set(True)
        try:
            return fn(*args)
        finally:
            _METHOD_WORK.reset(token)
            self.selection_seconds += time.perf_counter() - start

    # ------------------------------------------------------------------ pre-LLM feature reduction
    def _install_vision_probe(self, output: bool) -> None:
        """Probe the method's vision-tower layer (the feature layer unless it names another), every view of the
        call at once: its attention (CLS towers: the CLS row and keys; OneVision's SigLIP: the attention each patch
        receives), and with `output` the layer's output."""
        probed_layer = self.pruner.vision_probe_layer
        if probed_layer is None:
            probed_layer = self.model.config.vision_feature_layer
        if not isinstance(probed_layer, int):
            raise ConfigError("the vision probe needs a single vision_feature_layer")
        encoder_layer, attention = self.adapter.vision_attention(self.model, probed_layer)
        self._handles.append(attention.register_forward_pre_hook(self._probe_vision_attention, with_kwargs=True))
        if output:
            self._handles.append(encoder_layer.register_forward_hook(self._probe_vision_output))

    def _probe_vision_attention(self, module, args, kwargs):
        signal = _cls_attention_and_keys if self.adapter.cls_token else _received_attention_and_keys
        self._vision_probe = self._timed(signal, module, args[0] if args else kwargs["hidden_states"])

    def _probe_vision_output(self, module, args, output):
        self._vision_probe["hidden"] = output[0] if isinstance(output, tuple) else output

    def _vision(self) -> VisionProbe | None:
        # generate() may run the vision tower before the model call that starts the prefill: use no prefill state.
        return VisionProbe(**self._vision_probe) if self.pruner.needs_vision_probe else None

    def _reduced(self, slots_in: int, reduced: torch.Tensor) -> None:
        """Note a pre-LLM reduction from `slots_in` to `reduced.shape[1]` tokens per image; the slots of the
        model's <image> placeholders stay those before the first reduction of this prefill."""
        if self._reduced_slots is None:
            self._image_slots = slots_in
        self._reduced_slots = reduced.shape[1]
        if self.recorder is not None:
            self.recorder.reduce(self.pruner.sources, reduced.shape[1], reduced.shape[0])

    def _reduce_features(self, module, args):
        reduced = self._timed(self.pruner.reduce_image_features, args[0], self._vision())
        if reduced is None:
            return None
        self._reduced(args[0].shape[1], reduced)
        return (reduced, *args[1:])

    def _reduce_embeddings(self, module, args, output):
        if self._reduces_embeddings:
            reduced = self._timed(self.pruner.reduce_image_embeddings, output, self._vision(), self.questions)
            if reduced is not None:
                self._reduced(output.shape[1], reduced)
                output = reduced
        if self._reduced_slots is None:
            return None
        # The model scatters features into every <image> placeholder; fill the freed slots with zeros and drop
        # them before layer 0 (`_kept_slots`), so no layer ever sees them.
        pad = output.new_zeros(output.shape[0], self._image_slots - output.shape[1], output.shape[2])
        kept = torch.zeros(output.shape[0], self._image_slots, dtype=torch.bool, device=output.device)
        kept[:, :output.shape[1]] = True
        self._kept_slots = kept.flatten()
        return torch.cat([output, pad], dim=1)

    def _reduce_packed(self, pack, module, *args, **kwargs):
        """`pack_image_features`, then the method's pre-LLM reduction of each packed image's vision tokens (newline
        slots excluded, kept), with the image's own budget (`_reduce_image`; or each view's, `_budget_parts`). Each
        view's vision signal (the CLS row and keys, or the attention received) is laid out by the same packing, so a
        packed token is ranked by its own patch's (OneVision's shrunk grids: blended like the features). Each output
        token takes its first source's slot (`token_slots`); the freed slots are dropped before layer 0 (`_kept_slots`:
        the packed images are the batch's images in order, their vision tokens the rows' in order)."""
        call = inspect.signature(pack).bind(module, *args, **kwargs).arguments
        features, sizes = call["image_features"], call["image_sizes"]
        packed, lengths = pack(**call)
        first_view = [0, *itertools.accumulate(len(views) for views in features)]
        questions = self._image_questions(len(packed))
        reduced_images, kept_slots, recorded = [], [], []
        for index, (image, newlines) in enumerate(zip(packed, self.adapter.packed_newlines(self.model, packed),
                                                      strict=True)):
            slots = (~newlines).nonzero()[:, 0]  # the vision tokens
            tokens = image[slots][None]

            def lay_out(values: torch.Tensor, index: int = index) -> torch.Tensor:
                """(views, patches, C) values of this image's views -> (vision tokens, C) as packed."""
                return pack(**{**call, "image_features": [values], "image_sizes": sizes[index:index + 1],
                               "image_newline": None})[0][0]

            views = slice(first_view[index], first_view[index + 1])
            probe = self._timed(self._packed_probe, lay_out, views, tokens) if self.pruner.needs_vision_probe else None
            question = None if questions is None else questions[index:index + 1]
            outputs, sources = [], []
            for part, part_probe in self._budget_parts(lay_out, views, features[index].shape[1], probe, slots):
                reduced, part_sources = self._reduce_with_sources(tokens[:, part], part_probe, question)
                outputs.append(reduced)
                sources += [part[source].tolist() for source in part_sources]
            local = token_slots(sources, len(slots))[0]
            recorded.append((len(slots), list(zip(local, sources, strict=True))))
            placed = slots[torch.tensor(local, dtype=torch.long, device=image.device)]
            image = image.clone()
            image[slots] = 0  # freed slots: dropped before layer 0, never seen
            image[placed] = torch.cat(outputs, dim=1)[0].to(image.dtype)
            reduced_images.append(image)
            kept_slots.append(torch.zeros_like(newlines).index_fill_(0, placed, True)[slots])
        self._kept_slots = torch.cat(kept_slots)
        if self.recorder is not None:
            self.recorder.reduce_images(recorded)
        return reduced_images, lengths

    def _budget_parts(self, lay_out, views: slice, patches: int, probe: VisionProbe | None,
                      slots: torch.Tensor) -> list[tuple[torch.Tensor, VisionProbe | None]]:
        """What one budget applies to among a packed image's vision tokens (indices into its `slots`), with its probe:
        all of them, or under `budget_per=view` (LLaVA-NeXT, whose packing only moves and unpads tokens) each view's,
        with the view's own CLS entries, as the reference implementations reduce each crop with its own CLS row."""
        if self.pruner.budget.per == "image":
            return [(torch.arange(len(slots), device=slots.device), probe)]
        view_ids = torch.arange(views.stop - views.start, dtype=torch.float32, device=slots.device)
        view_of = lay_out(view_ids[:, None, None].expand(-1, patches, 1))[:, 0]
        parts = []
        for view in range(len(view_ids)):
            tokens = (view_of == view).nonzero()[:, 0]
            if probe is not None:
                own = {name: value[views.start + view] for name, value in self._vision_probe.items()}
                with_cls = torch.cat([tokens.new_zeros(1), tokens + 1])
                cls_attention, keys = probe.cls_attention[..., with_cls].clone(), probe.keys[:, :, with_cls].clone()
                cls_attention[..., 0], keys[:, :, 0] = own["cls_attention"][:, 0], own["keys"][:, 0]
                tower_hidden = None
                if probe.tower_hidden is not None:
                    tower_hidden = probe.tower_hidden[:, with_cls].clone()
                    tower_hidden[:, 0] = own["hidden"][0]
                parts.append((tokens, VisionProbe(hidden=probe.hidden[:, tokens], hidden_has_cls=False,
                                                  cls_attention=cls_attention, keys=keys,
                                                  cls_query=own["cls_query"][None], tower_hidden=tower_hidden)))
            else:
                parts.append((tokens, None))
        return parts

    def _packed_probe(self, lay_out, views: slice, tokens: torch.Tensor) -> VisionProbe:
        """One packed image's probe from its views' (`lay_out` packs per-view values like the features): with CLS, as
        InternVL's (`ModelAdapter.image_probes`): the packed tokens as `hidden`, and CLS entries (its own attention,
        key and query) that are means over the views, plus the layer's states where they were probed; without CLS, the
        attention each token's patch receives."""
        probe = {name: value[views] for name, value in self._vision_probe.items()}
        keys = probe["keys"]  # (views, heads, [1 +] patches, head_dim)
        heads, head_dim = keys.shape[1], keys.shape[3]

        def packed_keys(patch_keys: torch.Tensor) -> torch.Tensor:  # -> (heads, tokens, head_dim)
            return lay_out(patch_keys.transpose(1, 2).flatten(2)).view(-1, heads, head_dim).transpose(0, 1)

        if "received" in probe:
            return VisionProbe(hidden=None, cls_attention=None, keys=packed_keys(keys)[None],
                               received=lay_out(probe["received"][..., None])[:, 0][None])
        attention, hidden = probe["cls_attention"], probe.get("hidden")
        cls_attention = torch.cat([attention[:, :, :1].mean(0), lay_out(attention[:, :, 1:].transpose(1, 2)).T], -1)
        return VisionProbe(hidden=tokens, hidden_has_cls=False, cls_attention=cls_attention[None],
                           keys=torch.cat([keys[:, :, :1].mean(0), packed_keys(keys[:, :, 1:])], dim=1)[None],
                           cls_query=probe["cls_query"].mean(0, keepdim=True),
                           tower_hidden=None if hidden is None else torch.cat([hidden[:, :1].mean(0),
                                                                               lay_out(hidden[:, 1:])])[None])

    def _kept_slots_selection(self) -> Selection:
        """The kept slots of each row (the model scatters features row by row); the rows of a ragged batch hold and
        keep different numbers, the shorter ones padded with -1."""
        rows = self._kept_slots.split(self.state.vision_counts.tolist())
        return Selection(keep=pad_sequence([row.nonzero()[:, 0] for row in rows], batch_first=True, padding_value=-1))

    # ------------------------------------------------------------------ pre-LLM reduction, towers without CLS
    def _install_tower_reduction(self) -> None:
        """Towers without CLS pack every image of a call into one sequence: each image's vision tokens are reduced on
        their own at the tower's output (raster order), ranked by the attention their patches receive."""
        tower = self.adapter.vision_tower(self.model)
        self._handles.append(tower.register_forward_pre_hook(self._on_tower_call, with_kwargs=True))
        self._handles.append(tower.register_forward_hook(self._reduce_tower_output))
        if self.pruner.needs_vision_probe:
            attention = self.adapter.tower_attention(self.model, self.pruner.vision_probe_layer)
            self._handles.append(attention.register_forward_pre_hook(self._probe_tower_attention, with_kwargs=True))

    def _on_tower_call(self, module, args, kwargs):
        self._image_grids = self.adapter.image_grids(args, kwargs)

    def _probe_tower_attention(self, module, args, kwargs):
        def signal():
            call = self.adapter.vision_attention_call(module, args, kwargs)
            token_of_patch = self.adapter.token_of_patch(self.model, self._image_grids)
            received = received_attention(chunk_attention(call), token_of_patch)
            # in the tower's dtype, as the CLS attention of CLIP towers (methods' `score_dtype` converts it)
            return received.to(call.raw_keys.dtype), token_mean(call.raw_keys, token_of_patch)

        self._received = self._timed(signal)

    def _reduce_tower_output(self, module, args, output):
        embeddings = self.adapter.image_embeddings(output)
        counts = self.adapter.tokens_per_image(self.model, self._image_grids)
        placed = torch.zeros_like(embeddings)
        kept = torch.zeros(embeddings.shape[0], dtype=torch.bool, device=embeddings.device)
        own_slot = torch.zeros_like(kept)
        questions, sources, recorded = self._image_questions(len(counts)), [], []
        for image, (start, end) in enumerate(itertools.pairwise([0, *itertools.accumulate(counts)])):
            vision = None
            if self._received is not None:
                received, keys = self._received
                vision = VisionProbe(hidden=None, cls_attention=None, keys=keys[start:end].transpose(0, 1)[None],
                                     received=received[start:end][None])
            question = None if questions is None else questions[image:image + 1]
            reduced, image_sources = self._reduce_with_sources(embeddings[start:end][None], vision, question)
            sources.append(image_sources)
            slots, own = token_slots(image_sources, end - start)
            recorded.append((end - start, list(zip(slots, image_sources, strict=True))))
            slots = start + torch.tensor(slots, dtype=torch.long, device=kept.device)
            placed[slots] = reduced[0].to(placed.dtype)
            kept[slots] = True
            own_slot[slots] = torch.tensor(own, device=kept.device)
        self.adapter.set_image_embeddings(output, placed, own_slot)
        self.pruner.sources = sources  # every image's, as a method sets them for a batch of images
        if self.recorder is not None:
            self.recorder.reduce_images(recorded)
        self._kept_slots, self._received = kept, None
        return output

    def _image_questions(self, images: int) -> list[str] | None:
        """Each image's question, for methods that read it. generate() may run the tower before the prefill's model
        call, so nothing says which prompt an image belongs to: that needs one image per prompt."""
        if not self.pruner.needs_question:
            return None
        if len(self.questions) != images:
            raise ValueError(f"method {self.pruner.name} reads each image's question: it needs one image per prompt, "
                             f"got {images} images for {len(self.questions)} questions")
        return self.questions

    def _reduce_in_sequence(self) -> None:
        """Pre-LLM reduction where the projector's output mixes the tiles of every image (InternVL, whose tower
        generate() runs before the prompt, so before the images are known): each image's projected tokens, as layer 0
        receives them, are reduced on their own with the image's own budget, and each output token takes its first
        source's slot (`token_slots`); the other slots are dropped, so layer 0 sees exactly the shorter input."""
        state = self.state
        hidden = state.hidden_states.clone()
        probes = (self.adapter.image_probes(self.model, self._vision_probe, state.input_ids, hidden)
                  if self.pruner.needs_vision_probe else None)
        keep, recorded = [], []
        for row, spans in enumerate(self.adapter.image_spans(self.model, state.input_ids)):
            kept, offset = [], 0
            for image, (start, end) in enumerate(spans):
                probe = VisionProbe(**probes[row][image]) if probes is not None else None
                question = None if self.questions is None else [self.questions[row]]
                reduced, sources = self._reduce_with_sources(hidden[row:row + 1, start:end], probe, question)
                slots = token_slots(sources, end - start)[0]
                recorded.append((end - start, list(zip(slots, sources, strict=True))))
                slots = torch.tensor(slots, dtype=torch.long, device=hidden.device)
                hidden[row, start + slots] = reduced[0].to(hidden.dtype)
                kept.append(offset + slots.sort().values)
                offset += end - start
            keep.append(torch.cat(kept))
        state.hidden_states = hidden
        self._apply(Selection(keep=pad_sequence(keep, batch_first=True, padding_value=-1)))  # ragged rows: -1
        if self.recorder is not None:
            self.recorder.reduce_images(recorded)
            self.recorder.reduced()

    def _reduce_with_sources(self, tokens: torch.Tensor, probe: VisionProbe | None,
                             question: list[str] | None) -> tuple[torch.Tensor, list[list[int]]]:
        """One image's (or view's) (1, V, d) tokens through `_reduce_image`: the output tokens and each one's sources
        (indices into the V tokens); an image left alone gives its tokens, each its own source."""
        reduced = self._timed(self._reduce_image, tokens, probe, question)
        if reduced is None:
            return tokens, [[i] for i in range(tokens.shape[1])]
        return reduced, self.pruner.sources[0]

    def _reduce_image(self, tokens: torch.Tensor, probe: VisionProbe | None,
                      question: list[str] | None) -> torch.Tensor | None:
        """(1, V', d) from one image's (1, V, d) tokens (InternVL: projected; Qwen: the merger's outputs, which are both
        its features and its embeddings), through whichever pre-LLM hook the method has, with its budget resolved on
        this image (`retain=F`: a fraction of V; `budget=N`: N); None where the image is left alone (at most that many
        tokens, or the method returned None)."""
        budget, count = self.pruner.budget, tokens.shape[1]
        if budget.given:
            if budget.target(count) >= count:
                return None
            self.pruner.budget = dataclasses.replace(budget, tokens=budget.target(count))
        try:
            if type(self.pruner).reduce_image_features is not TokenPruner.reduce_image_features:
                reduced = self.pruner.reduce_image_features(tokens, probe)
            else:
                reduced = self.pruner.reduce_image_embeddings(tokens, probe, question)
        finally:
            self.pruner.budget = budget
        return reduced

    # ------------------------------------------------------------------ per layer
    def _before_layer(self, module, args, kwargs):
        layer = module.self_attn.layer_idx
        if not self.active:
            return None
        if decoding(kwargs, layer):
            return self._decode_inputs(layer, args, kwargs)

        state = self.state
        hidden = args[0] if args else kwargs.pop("hidden_states")
        state.hidden_states = hidden
        state.attention_preview = functools.partial(self._preview, module)
        changed = False
        if layer == 0 and self._reduces_in_sequence:
            self._reduce_in_sequence()
            changed = True
        if layer == 0 and self._kept_slots is not None:
            self._apply(self._kept_slots_selection())
            self._reduced_slots = self._kept_slots = None
            changed = True
            if self.recorder is not None:
                self.recorder.reduced()
        selection = self._timed(self.pruner.select, layer, state)
        if selection is not None:
            self._apply(selection)
            changed = True
            if self.recorder is not None:
                self.recorder.select(layer, selection)
        if changed:
            self._pos_emb = self.lm.rotary_emb(state.hidden_states, position_ids=state.positions)
        self._probe_request = (layer, p) if (p := self._timed(self.pruner.probe, layer, state)) else None
        self._edit = (layer, e) if (e := self._timed(self.pruner.attention_edit, layer, state)) else None

        shift = self._full_valid.sum(1) - state.valid.sum(1)
        if not self.compact:
            shift = torch.zeros_like(shift)
        self.layers.append(LayerRecord(state.orig_index, state.is_vision.sum(1), shift, self._pos_emb is not None,
                                       state.valid, state.seq_len))

        if self._pos_emb is None:
            return (state.hidden_states, *args[1:]), kwargs  # nothing changed yet: the model's own tensors
        kwargs["attention_mask"] = self._prefill_mask(kwargs.get("attention_mask"))
        kwargs["position_embeddings"] = self._pos_emb
        kwargs["position_ids"] = self._layer_position_ids(kwargs.get("position_ids"))
        return (state.hidden_states, *args[1:]), kwargs

    def _layer_position_ids(self, given: torch.Tensor | None) -> torch.Tensor | None:
        """The `position_ids` a layer receives: RoPE's own on 1-D models; on M-RoPE models RoPE comes only from
        `position_embeddings`, and the layer's ids (the text row, or None) just follow the kept tokens."""
        if self.adapter.position_rows == 1:
            return self.state.positions
        return None if given is None else given.gather(1, self.state.orig_index)

    def _preview(self, layer_module, queries: torch.Tensor) -> torch.Tensor:
        """Softmax rows of `queries` that `layer_module` would compute on the current tokens, in fp32 like PDrop's
        scoring: its input norm, q/k projections and RoPE at the current positions; causal and padding-masked."""
        return self._timed(self._preview_rows, layer_module, queries)

    def _preview_rows(self, layer_module, queries: torch.Tensor) -> torch.Tensor:
        state, attention = self.state, layer_module.self_attn
        normed = layer_module.input_layernorm(state.hidden_states)
        batch, n, _ = normed.shape
        rows = torch.arange(batch, device=normed.device)[:, None]
        query = attention.q_proj(normed[rows, queries]).view(batch, queries.shape[1], -1, attention.head_dim)
        key = attention.k_proj(normed).view(batch, n, -1, attention.head_dim)
        if hasattr(attention, "q_norm"):  # Qwen3: each head's query and key are RMS-normed before RoPE (trap 9)
            query, key = attention.q_norm(query), attention.k_norm(key)
        cos, sin = self.lm.rotary_emb(normed, position_ids=state.positions)
        query, _ = apply_rotary_pos_emb(query.transpose(1, 2), query.transpose(1, 2), cos[rows, queries],
                                        sin[rows, queries])
        _, key = apply_rotary_pos_emb(key.transpose(1, 2), key.transpose(1, 2), cos, sin)
        keys = repeat_kv(key, query.shape[1] // key.shape[1])
        scores = (query.float() @ keys.float().transpose(-1, -2)) * attention.scaling
        allowed = (torch.arange(n, device=normed.device)[None, None, :] <= queries[:, :, None]) & state.valid[:, None]
        return scores.masked_fill(~allowed[:, None], float("-inf")).softmax(dim=-1)

    def _after_last_layer(self, module, args, output):
        if self.active and len(self.layers) == len(self.lm.layers) and not self._ended:  # this prefill's last layer
            self._ended = True
            self._timed(self.pruner.end, self.state)

    def _evict_from_cache(self, module, args, kwargs, output):
        layer = module.self_attn.layer_idx
        cache = forward_cache(kwargs)
        if not self.active or cache is None or len(self.layers) != layer + 1:  # not this prefill's layer
            return None
        keep = self._timed(self.pruner.cache_keep, layer, self.state)
        if keep is None:
            return None
        if keep.shape[1] == 0:  # an empty cache would read as "prefill not run yet" at the next step
            raise ValueError(f"cache_keep must leave layer {layer} at least one token")
        if layer == 0 and not bool(self.state.valid.all()):  # the model sizes decode masks from layer 0's cache
            raise ValueError("evicting from layer 0's cache is supported only without padding (batch size 1)")
        cached = cache.layers[layer]
        rows = torch.arange(keep.shape[0], device=keep.device)[:, None]
        cached.keys = cached.keys.transpose(1, 2)[rows, keep].transpose(1, 2).contiguous()
        cached.values = cached.values.transpose(1, 2)[rows, keep].transpose(1, 2).contiguous()
        record = self.layers[layer]
        record.orig_index, record.valid = record.orig_index.gather(1, keep), record.valid.gather(1, keep)
        record.changed = True
        if self.recorder is not None:
            self.recorder.evict(layer, keep, self.state.is_vision)
        return None

    def _apply(self, selection: Selection) -> None:
        """Gather every per-token tensor of the state to the kept tokens (plus merged ones), in sequence order."""
        state = self.state
        keep = selection.keep
        if keep.dim() != 2 or keep.shape[0] != state.batch_size:
            raise ValueError(f"Selection.keep must be (batch, k), got {tuple(keep.shape)}")
        vision, n = state.vision_index, state.seq_len
        # Entries -1 pad the rows that keep fewer tokens; a spare last column takes them.
        kept_vision = torch.where(keep >= 0, vision.gather(1, keep.clamp(min=0)), n)
        retained = torch.cat([~state.is_vision, state.is_vision.new_zeros(state.batch_size, 1)], 1)
        retained = retained.scatter(1, kept_vision, torch.ones_like(kept_vision, dtype=torch.bool))[:, :n]
        # Rows must stay one length: a row that drops more than the row dropping least keeps the difference as
        # padding slots (its first dropped vision tokens, masked from every query).
        dropped = state.is_vision & ~retained
        extra = dropped.sum(1) - dropped.sum(1).min()
        masked = dropped & (dropped.long().cumsum(1) <= extra[:, None])
        index = (retained | masked).nonzero()[:, 1].view(state.batch_size, -1)
        hidden = state.hidden_states
        batch_rows = torch.arange(state.batch_size, device=hidden.device)[:, None]
        new_hidden = hidden[batch_rows, index]
        slot = masked[batch_rows, index]
        new = {
            "orig_index": state.orig_index[batch_rows, index],
            "is_vision": state.is_vision[batch_rows, index] & ~slot,
            "image_index": state.image_index[batch_rows, index].masked_fill(slot, -1),
            "valid": state.valid[batch_rows, index] & ~slot,
            "positions": state.positions[..., batch_rows, index],
        }
        if selection.merged is not None:
            if state.ragged or masked.any():
                raise ValueError("merged tokens need every row to keep the same number of vision tokens")
            merged = selection.merged.to(hidden.dtype)
            m = merged.shape[1]
            if selection.merged_positions is None and not self.compact:
                raise ValueError("merged tokens need merged_positions when positions are kept original")
            # Place merged tokens right after each row's last vision slot: their sort keys lie strictly between that
            # slot and the next token.
            offsets = (1 + torch.arange(m, device=hidden.device, dtype=torch.float64)) / (m + 1)
            keys = torch.cat([index.to(torch.float64), vision[:, -1:].to(torch.float64) + offsets], 1)
            order = keys.argsort(dim=1)
            last_slot = state.orig_index[batch_rows[:, 0], vision[:, -1]][:, None].expand(-1, m)
            merged_pos = (selection.merged_positions if selection.merged_positions is not None
                          else torch.zeros_like(last_slot))
            sources = {
                "orig_index": last_slot,
                "is_vision": torch.ones_like(last_slot, dtype=torch.bool),
                "image_index": state.image_index[batch_rows[:, 0], vision[:, -1]][:, None].expand(-1, m),
                "valid": torch.ones_like(last_slot, dtype=torch.bool),
                # one position on every M-RoPE row, as a text token has
                "positions": merged_pos.to(new["positions"].dtype).expand(*new["positions"].shape[:-1], -1),
            }
            new = {k: torch.cat([v, sources[k]], -1)[..., batch_rows, order] for k, v in new.items()}
            new_hidden = torch.cat([new_hidden, merged], 1)[batch_rows, order]
        if self.compact:
            new["positions"] = (new["valid"].long().cumsum(1) - 1).clamp(min=0)
        for key, value in new.items():
            setattr(state, key, value)
        state.hidden_states = new_hidden

    def _prefill_mask(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """The model's full-length 4-D mask gathered to the current tokens, with the padding slots of a ragged batch
        masked as keys; None (pure causal) stays None where there are none."""
        state = self.state
        index = state.orig_index
        batch, n = index.shape
        slots = self._full_valid.gather(1, index) & ~state.valid  # dropped tokens kept as padding slots
        if mask is None and not slots.any():
            return None
        causal = torch.ones(n, n, dtype=torch.bool, device=index.device).tril()
        if mask is None:
            return (causal & ~slots[:, None, :])[:, None]
        full = mask[:, 0].expand(batch, -1, -1)
        rows = full.gather(1, index[:, :, None].expand(-1, -1, full.shape[2]))
        gathered = rows.gather(2, index[:, None, :].expand(-1, n, -1))
        # Merged tokens share their image's last slot: re-impose causality in the current order.
        if gathered.dtype == torch.bool:
            gathered = gathered & causal & ~slots[:, None, :]
        else:
            gathered = gathered.masked_fill(~causal | slots[:, None, :], torch.finfo(gathered.dtype).min)
        return gathered[:, None]

    def _decode_inputs(self, layer: int, args, kwargs):
        record = self.layers[layer]
        mask = kwargs.get("attention_mask")
        hidden = args[0] if args else kwargs["hidden_states"]
        cached = forward_cache(kwargs).get_seq_length(layer)
        # The model sizes its decode mask from layer 0's cache: rebuild it for a changed layer, and for any layer
        # whose cache length it does not fit (after layer 0 itself was pruned or evicted).
        rebuild = mask is not None and (record.changed or mask.shape[-1] != cached + hidden.shape[1])
        if not rebuild and not record.position_shift.any():
            return None
        if rebuild:
            kwargs["attention_mask"] = self._decode_mask(record, mask, hidden, cached)
        if record.position_shift.any():
            positions = kwargs["position_ids"].expand(hidden.shape[0], -1) - record.position_shift[:, None]
            kwargs["position_ids"] = positions
            kwargs["position_embeddings"] = self.lm.rotary_emb(hidden, position_ids=positions)
        return args, kwargs

    def _decode_mask(self, record: LayerRecord, model_mask: torch.Tensor, hidden: torch.Tensor,
                     cached: int) -> torch.Tensor:
        """(B, 1, q, n_l + t) mask of a decode step over this layer's cache (`cached` entries before this step): its
        prefill tokens' padding validity (merged tokens share a valid slot), then the decoded tokens, causal among
        the q new ones. Without a 2-D mask from the caller every token is valid."""
        queries = hidden.shape[1]
        decoded = cached + queries - record.orig_index.shape[1]
        mask2d = self._decode_mask2d
        if mask2d is None:
            mask2d = torch.ones(hidden.shape[0], self._full_len + decoded, dtype=torch.bool, device=hidden.device)
        mask2d = mask2d.bool()
        cached = (mask2d.gather(1, record.orig_index) & record.valid)[:, None, None, :].expand(-1, 1, queries, -1)
        causal = torch.ones(queries, decoded, dtype=torch.bool, device=mask2d.device).tril(decoded - queries)
        allowed = torch.cat([cached, mask2d[:, None, None, self._full_len:] & causal], dim=-1)
        if model_mask.dtype == torch.bool:
            return allowed
        return torch.zeros(allowed.shape, dtype=model_mask.dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(model_mask.dtype).min)

    # ------------------------------------------------------------------ attention
    def attend(self, base: str, module, query, key, value, attention_mask, **kwargs):
        layer = getattr(module, "layer_idx", None)
        probe = self._probe_request[1] if self._probe_request and self._probe_request[0] == layer else None
        edit = self._edit[1] if self._edit and self._edit[0] == layer else None
        base_fn = _base_attention(base)
        if (probe is None and edit is None) or query.shape[2] != key.shape[2]:
            return base_fn(module, query, key, value, attention_mask, **kwargs)
        groups = query.shape[1] // key.shape[1]
        keys, values = repeat_kv(key, groups), repeat_kv(value, groups)  # no copy without KV groups
        scaling = kwargs.get("scaling", module.scaling)
        if edit is None:
            output, weights = base_fn(module, query, key, value, attention_mask, **kwargs)
            # Eager hands back its own probabilities: the probe reads them; sdpa does not: the probe computes them.
            self._timed(lambda: self._store_probe(layer, probe, None if probe.queries is None
                                                  else _rows(weights, probe.queries) if weights is not None
                                                  else _softmax_rows(query, keys, attention_mask, scaling,
                                                                     probe.queries), values, output, key))
            return output, weights
        # An edited layer is computed explicitly (eager arithmetic); every other layer keeps the model's backend.
        probs = self._timed(edit, _softmax_rows(query, keys, attention_mask, scaling, rows=None), self.state)
        output = (probs @ values).transpose(1, 2).contiguous()
        if probe is not None:
            rows = None if probe.queries is None else _rows(probs, probe.queries)
            self._store_probe(layer, probe, rows, values, output, key)
        return output, None

    def _store_probe(self, layer: int, probe: Probe, attention: torch.Tensor | None, values: torch.Tensor,
                     output: torch.Tensor, keys: torch.Tensor) -> None:
        batch = torch.arange(output.shape[0], device=output.device)[:, None]
        rows = None if probe.queries is None else output[batch, probe.queries].flatten(2)  # (B, q, H * head_dim)
        self.state.probes[layer] = ProbeResult(probe.queries, attention, values if probe.values else None, rows,
                                               keys if probe.keys else None)

    # ------------------------------------------------------------------ results
    def vision_tokens_per_layer(self) -> torch.Tensor:
        """(B, L) vision tokens entering each decoder layer in the last prefill."""
        return torch.stack([record.vision_tokens for record in self.layers], dim=1)

    def tokens_per_layer(self, mask: torch.Tensor) -> torch.Tensor:
        """(B, L) tokens of `mask` ((B, N) over the prompt, e.g. the newline slots) entering each decoder layer in the
        last prefill."""
        return torch.stack([mask.gather(1, record.orig_index).sum(1) for record in self.layers], dim=1)


def _cls_attention_and_keys(attention, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """A ViT attention layer's (CLIP, InternViT) softmax row of the CLS query, that query and its keys, from the
    layer's normed input."""
    shape = (*hidden.shape[:2], -1, attention.head_dim)
    queries, keys = attention.q_proj(hidden[:, :1]), attention.k_proj(hidden)
    if hasattr(attention, "q_norm"):  # InternViT: q/k norms over all heads (Identity in the 300M tower)
        queries, keys = attention.q_norm(queries), attention.k_norm(keys)
    queries = queries.view(hidden.shape[0], 1, -1, attention.head_dim).transpose(1, 2)
    keys = keys.view(shape).transpose(1, 2)
    scores = (queries @ keys.transpose(-1, -2)).float() * attention.scale
    return {"cls_attention": scores.softmax(-1).to(hidden.dtype)[:, :, 0], "keys": keys, "cls_query": queries}


def _received_attention_and_keys(attention, hidden: torch.Tensor) -> dict[str, torch.Tensor]:
    """A ViT attention layer without CLS whose views attend only among themselves (OneVision's SigLIP, all crops of a
    call at once): each view's patches' received attention (`received_attention`, a view per chunk) and the layer's
    keys, from the layer's normed input."""
    views, patches = hidden.shape[:2]
    shape = (views, patches, -1, attention.head_dim)
    queries = attention.q_proj(hidden).view(shape).transpose(1, 2)
    keys = attention.k_proj(hidden).view(shape).transpose(1, 2)
    chunks = (((query @ key.transpose(-1, -2)).float() * attention.scale).softmax(-1)
              for query, key in zip(queries, keys, strict=True))
    received = received_attention(chunks, torch.arange(views * patches, device=hidden.device))
    return {"received": received.view(views, patches).to(hidden.dtype), "keys": keys}


def chunk_attention(call: VisionAttentionCall) -> Iterator[torch.Tensor]:
    """Each chunk's (heads, n, n) softmax attention probabilities, in fp32, one chunk at a time."""
    for start, end in itertools.pairwise(call.chunks.tolist()):
        queries, keys = call.queries[start:end].transpose(0, 1), call.keys[start:end].transpose(0, 1)
        yield ((queries @ keys.transpose(1, 2)).float() * call.scaling).softmax(dim=-1)


def received_attention(attention: Iterable[torch.Tensor], token_of_patch: torch.Tensor) -> torch.Tensor:
    """(tokens,) the importance signal of vision towers without CLS (models.md §8.2): the attention each patch
    receives, averaged over the heads and the query rows of its chunk, then over the patches of each vision token.

    attention: each chunk's (heads, n, n) softmax probabilities (a chunk is an image, or a window of a windowed
        block), chunks in the tower's sequence order; token_of_patch: (P,) the vision token of each patch in that
        order (`ModelAdapter.token_of_patch`, which undoes Qwen2.5-VL's window permutation)."""
    return token_mean(torch.cat([chunk.mean(dim=(0, 1)) for chunk in attention]), token_of_patch)


def token_mean(values: torch.Tensor, token_of_patch: torch.Tensor) -> torch.Tensor:
    """(P, ...) per-patch values -> (tokens, ...) their mean over each vision token's patches."""
    tokens = int(token_of_patch.max()) + 1
    sums = values.new_zeros(tokens, *values.shape[1:]).index_add_(0, token_of_patch, values)
    counts = torch.bincount(token_of_patch, minlength=tokens).to(values.dtype)
    return sums / counts.view(-1, *[1] * (values.dim() - 1))


def token_slots(sources: list[list[int]], slots: int) -> tuple[list[int], list[bool]]:
    """Where a pre-LLM reduction's output tokens go among an image's `slots` vision slots, so that each keeps a slot's
    original position: a token takes its first source's slot (a kept token its own, a merged one its target's); a
    token of no source (zero padding) one of the last slots left. Also whether each is its slot's own token, kept
    as it is (side features of the slot, DeepStack's, apply only to those)."""
    anchors = [tokens[0] if tokens else None for tokens in sources]
    taken = {anchor for anchor in anchors if anchor is not None}
    if len(taken) != len(anchors) - anchors.count(None):
        raise ValueError("two tokens of a pre-LLM reduction share their first source; each needs a slot of its own")
    free = [slot for slot in range(slots) if slot not in taken]
    if anchors.count(None) > len(free):
        raise ValueError(f"a pre-LLM reduction returned more tokens than the image's {slots} vision slots")
    spare = iter(free[len(free) - anchors.count(None):])
    placed = [anchor if anchor is not None else next(spare) for anchor in anchors]
    return placed, [tokens == [slot] for tokens, slot in zip(sources, placed, strict=True)]


def _base_attention(base: str):
    return eager_attention_forward if base == "eager" else AttentionInterface._global_mapping[base]


def _rows(tensor: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Rows `queries` ((B, q)) of a (B, H, n, d) tensor: attention probabilities, queries or a mask."""
    return tensor.gather(2, queries[:, None, :, None].expand(-1, tensor.shape[1], -1, tensor.shape[3]))


def _softmax_rows(query, keys, mask, scaling, rows):
    """Post-softmax attention (B, H, q, keys) of query rows `rows` ((B, q) indices; None: all), computed in fp32 and
    cast to the query dtype as eager attention does. Prefill only: query i sits at key position i."""
    batch, _, n, _ = query.shape
    if rows is None:  # all rows as they are: gathering them would copy the query and the whole mask
        rows = torch.arange(n, device=query.device)[None]
    else:
        query = _rows(query, rows)
        if mask is not None:
            mask = _rows(mask.expand(batch, -1, -1, -1), rows)
    scores = (query @ keys.transpose(-1, -2)).float() * scaling
    if mask is None:
        allowed = torch.arange(n, device=query.device)[None, None, :] <= rows[:, :, None]  # (B, q, keys)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
    else:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return scores.softmax(dim=-1).to(query.dtype)


@functools.cache
def _register_attention(base: str) -> str:
    name = f"prunebench_{base}"

    def attention(module, query, key, value, attention_mask, **kwargs):
        runtime = _ACTIVE.get()
        if runtime is None or not runtime.active:
            return _base_attention(base)(module, query, key, value, attention_mask, **kwargs)
        return runtime.attend(base, module, query, key, value, attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    # Without a registered mask function, create_causal_mask hands layers no mask and padding is silently lost.
    AttentionMaskInterface.register(name, AttentionMaskInterface._global_mapping[base])
    return name


@contextlib.contextmanager
def prune(model, pruner: TokenPruner, sample_ids: list | None = None,
          record: bool = False, questions: list[str] | None = None) -> Iterator[PruningRuntime]:
    """Run `model` (any supported class) with `pruner` inside the block; with `record`, the runtime's `recorder`
    keeps each sample's selections. `questions`: each sample's question text, for methods that read it
    (`needs_question`)."""
    with PruningRuntime(model, pruner, sample_ids, record, questions) as runtime:
        yield runtime
