"""The interface every model family implements, and what the families share.

An adapter knows one family of `...ForConditionalGeneration` classes: how to load a checkpoint and its processor, how
to build a prompt exactly as lmms-eval's own wrapper for that family does, where the decoder layers, rotary embedding,
vision tower and projector are, which input ids are vision tokens, and how to build a tiny random-weight model of the
family offline. The runtime, the methods and the harness ask the adapter, never a family's attribute paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from omegaconf import DictConfig
from PIL import Image

from methods.base import ConfigError, TokenPruner, handles_ragged_batches, has_pre_llm_hook

Images = list[list[Image.Image]] | None  # the images of each prompt, in order (None: a text-only batch)


@dataclass
class VisionAttentionCall:
    """What one call of a vision-tower attention layer computes with, for the importance signal of towers without
    CLS: every patch of the call (all images of a batch) in the tower's own sequence order."""

    queries: torch.Tensor  # (P, heads, head_dim), as the layer's softmax sees them (after the tower's RoPE)
    keys: torch.Tensor  # (P, heads, head_dim), likewise
    raw_keys: torch.Tensor  # (P, heads, head_dim): the key projection before any RoPE (a position-free metric)
    chunks: torch.Tensor  # (c + 1,) boundaries of the runs of patches that attend only among themselves
    scaling: float


@dataclass(frozen=True)
class TokenView:
    """One grid of an image's vision tokens, on families whose images hold several (LLaVA-NeXT/OneVision's base view
    and crop grid, InternVL's tiles): `rows` x `columns` tokens, row-major, consecutive among the image's vision
    tokens (newline slots skipped)."""

    view: str  # "base", "crops" (the crops as one unpadded grid), "tile" or "thumbnail"
    rows: int
    columns: int
    tile: int | None = None  # a tile's place in the processor's order (row-major over its canvas of tiles)


class ModelAdapter:
    """One model family. Subclasses set the class variables and implement the loading and prompt methods."""

    #: `model.family` in conf/model (LLaVA-1.5 is the default when a conf has none)
    family: ClassVar[str]
    #: a name for messages and tables
    title: ClassVar[str]
    #: the `transformers` classes this adapter supports (kvpress's SUPPORTED_MODELS idea)
    architectures: ClassVar[tuple[str, ...]]
    #: rows of RoPE position ids the language model takes: 1 (1-D RoPE) or 3 (M-RoPE: t, h, w)
    position_rows: ClassVar[int] = 1
    #: whether every image gives the same number of vision tokens (then every row of a batch must hold as many); else
    #: a batch's rows may hold different numbers, for the methods that handle that (`handles_ragged_batches`)
    fixed_vision_tokens: ClassVar[bool] = True
    #: whether pre-LLM methods reduce each image's projected tokens in the sequence before decoder layer 0 (and with a
    #: probe from `image_probes`), because the projector's output cannot be split into images where it runs
    reduces_in_sequence: ClassVar[bool] = False
    #: whether the model lays the projected features of each image out afterwards (`pack_image_features`: crops and
    #: newline slots; LLaVA-NeXT/OneVision), so that pre-LLM embedding reductions act on the packed images
    packs_features: ClassVar[bool] = False
    #: whether `budget_per=view` is defined: pre-LLM budgets per view of an image (LLaVA-NeXT's base view and crops)
    views_budget: ClassVar[bool] = False
    #: whether the vision tower has a CLS token whose attention ranks the patches (CLIP). Towers without one hand
    #: pre-LLM methods the attention each vision token's patches receive instead (models.md §8.2); the runtime
    #: then reduces each image's tokens at the tower's output, through the methods below marked "CLS-less"
    cls_token: ClassVar[bool] = True

    def check_method(self, pruner: TokenPruner, batch_size: int = 1) -> None:
        """Refuse, before anything loads, what the runtime does not define on this family; the message names why and
        what would work."""
        if pruner.budget.per == "view" and not (self.views_budget and reduces_before_llm(pruner)):
            raise ConfigError(f"budget_per=view (a budget per crop) is defined for pre-LLM methods on LLaVA-NeXT, not "
                              f"for method {pruner.name} on {self.title}: use budget_per=null (per image)")
        if pruner.needs_clip_tower and not self.cls_token:
            raise ConfigError(f"method {pruner.name} does not run on {self.title}, whose vision tower is no CLIP: "
                              f"{pruner.needs_clip_tower}")
        if batch_size > 1 and not self.fixed_vision_tokens and not handles_ragged_batches(type(pruner)):
            from methods import METHODS

            able = ", ".join(name for name, cls in METHODS.items()
                             if handles_ragged_batches(cls) and cls.supports_batching)
            raise ConfigError(f"{self.title} gives images of different sizes different numbers of vision tokens, and "
                              f"method {pruner.name} needs the same number in every row of a batch: set batch_size=1 "
                              f"(methods that take such batches: {able})")

    # ------------------------------------------------------------------ loading
    def config_class(self):
        """The `PretrainedConfig` subclass of the family (for reading shipped or local config.json files)."""
        raise NotImplementedError

    def from_pretrained(self, path: Path, spec: DictConfig, dtype: torch.dtype, device: torch.device):
        """(model, processor) from a local checkpoint directory."""
        raise NotImplementedError

    def build_tiny(self, spec: DictConfig, tokenizer=None):
        """(model, processor): the family's geometry with tiny widths and random weights from `spec.seed`."""
        raise NotImplementedError

    # ------------------------------------------------------------------ prompts and inputs
    def prompts(self, processor, questions: list[str], images: Images) -> list[str]:
        """The prompt strings lmms-eval's own wrapper for this family builds for these contexts."""
        raise NotImplementedError

    def inputs(self, processor, questions: list[str], images: Images) -> dict[str, torch.Tensor]:
        """Processor inputs for a batch; left padding keeps every prompt's last token last."""
        flat = [image for row in images for image in row] if images is not None else None
        return processor(images=flat, text=self.prompts(processor, questions, images), padding=True,
                         return_tensors="pt")

    # ------------------------------------------------------------------ where things are
    def language_model(self, model) -> torch.nn.Module:
        """The decoder stack: `.layers`, `.rotary_emb`, `.embed_tokens`, `.config` (the text config)."""
        return model.model.language_model

    def decoder_layers(self, model) -> torch.nn.ModuleList:
        return self.language_model(model).layers

    def rotary_embedding(self, model) -> torch.nn.Module:
        return self.language_model(model).rotary_emb

    def vision_tower(self, model) -> torch.nn.Module:
        raise NotImplementedError

    def projector(self, model) -> torch.nn.Module:
        """The module whose output is the language model's vision tokens (LLaVA's projector, Qwen's merger)."""
        raise NotImplementedError

    def vision_attention(self, model, layer: int) -> tuple[torch.nn.Module, torch.nn.Module]:
        """(encoder layer `layer` of the vision tower, its self-attention), for the vision probe (CLIP's layout)."""
        tower = self.vision_tower(model)
        encoder_layer = getattr(tower, "vision_model", tower).encoder.layers[layer]
        return encoder_layer, encoder_layer.self_attn

    def image_probes(self, model, probe: dict[str, torch.Tensor], input_ids: torch.Tensor,
                     embeddings: torch.Tensor) -> list[list[dict[str, torch.Tensor]]]:
        """Per row, per image: the `VisionProbe` fields of that image on its projected tokens, from the probe the
        vision tower recorded for the whole batch, the prompt and the embeddings layer 0 receives (families with
        `reduces_in_sequence`)."""
        raise NotImplementedError

    def deepstack_layers(self, model) -> int:
        """How many first decoder layers get visual features added after they run (Qwen3-VL's DeepStack); 0: none."""
        return 0

    def packed_newlines(self, model, packed: list[torch.Tensor]) -> list[torch.Tensor]:
        """Families that pack features (`packs_features`): per packed image, True at its newline rows."""
        raise NotImplementedError

    def random_prompt(self, model, text_tokens: int, before: int, image_size: int,
                      generator: torch.Generator) -> dict[str, torch.Tensor]:
        """One prompt of random content as the model call takes it (`harness.bench`): `text_tokens` random text ids
        (`random_text`), the first `before` of them before one image's placeholders, and random pixels for an image
        of `image_size` pixels square where the family's resolution is dynamic."""
        raise ConfigError(f"harness.bench builds no prompt for {self.title} yet: use a LLaVA-1.5 or Qwen model")

    def prompt_layout(self, model, inputs: dict):
        """How one prompt's images are laid out, where the FLOPs depend on more than the vision tokens (LLaVA-NeXT/
        OneVision: `AnyResLayout`); None elsewhere."""
        return None
    # ------------------------------------------------------------------ towers without CLS (pre-LLM methods)
    def tower_attention(self, model, layer: int | None) -> torch.nn.Module:
        """CLS-less: the attention module of vision-tower block `layer` (None: the feature layer, whose output the
        projector reads), whose calls give the importance signal (`vision_attention_call`)."""
        raise NotImplementedError

    def vision_attention_call(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> VisionAttentionCall:
        """CLS-less: the queries and keys of one call of `tower_attention`'s module, from its inputs."""
        raise NotImplementedError

    def image_grids(self, args: tuple, kwargs: dict) -> torch.Tensor:
        """CLS-less: each image's patch grid, from the arguments of a call of the vision tower."""
        raise NotImplementedError

    def tokens_per_image(self, model, grids: torch.Tensor) -> list[int]:
        """CLS-less: the vision tokens (the tower's outputs) of each image."""
        raise NotImplementedError

    def token_of_patch(self, model, grids: torch.Tensor) -> torch.Tensor:
        """CLS-less: (P,) for each patch of a tower call, in the tower's sequence order, the vision token (index into
        all images' tokens in output order) it becomes part of."""
        raise NotImplementedError

    def image_embeddings(self, output) -> torch.Tensor:
        """CLS-less: (Σ tokens, d_model) the tower's vision tokens, every image's in order (raster within one)."""
        raise NotImplementedError

    def set_image_embeddings(self, output, embeddings: torch.Tensor, own_slot: torch.Tensor) -> None:
        """CLS-less: replace the tower's vision tokens in `output`; `own_slot` (Σ tokens,) is False where a reduction
        put a token that is not the slot's own (per-slot side features, e.g. DeepStack's, no longer apply)."""
        raise NotImplementedError

    def image_token_id(self, model) -> int:
        return model.config.image_token_id

    def vision_mask(self, model, input_ids: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
        """(B, N) True at the slots that carry vision features (the prunable tokens). `inputs`: the model call's other
        inputs (e.g. image sizes), for families whose slots are not all prunable (LLaVA-NeXT's newlines)."""
        return input_ids == self.image_token_id(model)

    def newline_mask(self, model, input_ids: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
        """(B, N) True at slots that carry an image's layout (LLaVA-NeXT/OneVision's image-newline embeddings): never
        prunable, kept like text."""
        return torch.zeros_like(input_ids, dtype=torch.bool)

    def image_index(self, model, input_ids: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
        """(B, N) the image (0, 1, ... within its row) of each vision slot, -1 elsewhere: an image is a run of vision
        slots (see `image_spans`)."""
        is_vision = self.vision_mask(model, input_ids, inputs)
        starts = is_vision & ~torch.nn.functional.pad(is_vision, (1, 0))[:, :-1]
        return torch.where(is_vision, starts.long().cumsum(1) - 1, -1)

    def token_grids(self, model, model_inputs: dict) -> list[tuple[int, int]] | None:
        """Each image's vision-token grid (rows, columns), the batch's images in order, from the model call's inputs;
        None where every image has the model's one fixed grid."""
        return None

    def token_views(self, model, model_inputs: dict) -> list[list[TokenView]] | None:
        """Per image (the batch's images in order), its vision-token grids in sequence order, from the model call's
        inputs; None on families where each image is one grid (`token_grids`)."""
        return None

    def image_spans(self, model, input_ids: torch.Tensor, inputs: dict | None = None) -> list[list[tuple[int, int]]]:
        """Per row, each image's vision tokens as a half-open [start, end) range of sequence indices: every family here
        separates consecutive images by at least one text token, so an image is a maximal run of vision slots."""
        spans = []
        for row in self.vision_mask(model, input_ids, inputs):
            padded = torch.cat([row.new_zeros(1), row, row.new_zeros(1)]).int()
            edges = (padded[1:] - padded[:-1]).nonzero()[:, 0].tolist()
            spans.append(list(zip(edges[0::2], edges[1::2], strict=True)))
        return spans


def seeded_model(model_class, config, spec: DictConfig, pad_token_id: int, eos_token_id: int | None = None):
    """A tiny model of `config` in eval mode, its weights drawn from `spec.seed` (the global RNG left as it was), the
    language model on `spec.attn_implementation` and the vision tower on sdpa."""
    config.text_config._attn_implementation = spec.attn_implementation
    config.vision_config._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        model = model_class(config)
    model.generation_config.pad_token_id = pad_token_id
    if eos_token_id is not None:
        model.generation_config.eos_token_id = eos_token_id
    return model.eval()


def random_text(vocab_size: int, count: int, excluded: list[int], generator: torch.Generator) -> torch.Tensor:
    """`count` random token ids below `vocab_size`, none of them `excluded` (the image's and the family's markers)."""
    text = torch.randint(0, vocab_size - len(excluded), (count,), generator=generator)
    for token in sorted(excluded):  # an id at or above an excluded one moves up past it
        text[text >= token] += 1
    return text


def reduces_before_llm(pruner: TokenPruner) -> bool:
    """Whether the method reduces the vision features before the language model (around LLaVA-1.5's projector)."""
    return pruner.needs_vision_probe or has_pre_llm_hook(type(pruner))


def byte_vocab(specials: list[str]) -> dict[str, int]:
    """A tiny tokenizer's vocabulary: the family's special tokens first, then one token per byte (no merges, so it
    needs no training)."""
    from tokenizers import pre_tokenizers

    vocab = {token: i for i, token in enumerate(specials)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    return vocab


