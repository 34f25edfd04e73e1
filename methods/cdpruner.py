"""CDPruner (Zhang et al., NeurIPS 2025, arXiv 2506.10967, "Beyond Attention or Similarity: Maximizing Conditional
Diversity for Token Pruning in MLLMs"), as its reference code (`Theia-4869/CDPruner@9541616`, `llava_arch.py`
l.140-187, `clip_encoder.py` l.38-99) behaves.

Pre-LLM and instruction-conditioned, per image of N tokens and budget T:
1. Similarity S = ÊÊᵀ of the projected embeddings E (normalised in the model's dtype, then fp32).
2. Relevance of each patch to the question: CLIP image embeddings I (the vision tower's `post_layernorm` and
   `visual_projection` on the feature layer's patches, fp32) against the CLIP *text* embedding of the question (77-token
   segments, averaged over segments): rel = **-**cos(I, T). The code negates the paper's cosine (the authors: a CLIP
   phenomenon); `variant="paper"` uses +cos. Then min-max normalised: r = (rel - min + 1e-6) / (max - min).
3. Kernel L = diag(r) S diag(r); fast greedy DPP MAP (Chen et al. 2018), exactly T steps: pick argmax d²,
   e = (L[j] - Σ c[u, j] c[u]) / sqrt(d²[j]), d² -= e², d²[j] = -inf.
4. The T picked tokens enter the language model in raster order, at contiguous positions (a shorter input).

The question is the benchmark's user text with its answer-format instruction removed, as the reference's loaders do.
The CLIP text tower is not part of LLaVA checkpoints: `text_tower` names the CLIP checkpoint matching the vision tower
(from the Hugging Face cache or a local directory, never downloaded by a run; a missing one stops the run before the
model loads, with the command that fetches it), or `tiny`: random CLIP text and projection weights from a seed, a
stand-in whose relevance signal is meaningless. `auto` (default) reads the model's config before loading: CLIP
ViT-L/14-336's geometry (LLaVA-1.5) gives openai/clip-vit-large-patch14-336, a tower narrower than any CLIP (the tiny
models, never CLIP) gives `tiny`, anything else is refused. On models whose vision tower is no CLIP (Qwen, OneVision,
InternVL) the method is refused before loading (`needs_clip_tower`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from methods.base import ConfigError, TokenPruner

if TYPE_CHECKING:
    from harness.runtime import VisionProbe

# The answer-format instructions the reference's loaders strip from the question before the text tower sees it.
FORMAT_INSTRUCTIONS = ("\nAnswer the question using a single word or phrase.",
                       "\nAnswer with the option's letter from the given choices directly.")
AUTO, TINY_TOWER = "auto", "tiny"
VARIANTS = ("code", "paper")
# CLIP checkpoints by their vision tower's geometry (width, layers, image size, patch): `text_tower=auto` picks the one
# the model's vision tower came from.
CLIP_CHECKPOINTS = {(1024, 24, 336, 14): "openai/clip-vit-large-patch14-336"}
NARROWEST_CLIP = 768  # ViT-B: a narrower vision tower is a toy one (the tiny models), never a CLIP checkpoint


def text_tower_for(vision_config) -> str:
    """`text_tower=auto`: the CLIP checkpoint of the model's vision tower; `tiny` for a toy tower."""
    geometry = (vision_config.hidden_size, vision_config.num_hidden_layers, vision_config.image_size,
                vision_config.patch_size)
    if geometry in CLIP_CHECKPOINTS:
        return CLIP_CHECKPOINTS[geometry]
    if vision_config.hidden_size < NARROWEST_CLIP:
        return TINY_TOWER
    raise ConfigError(f"no known CLIP checkpoint has this vision tower (width, layers, image, patch = {geometry}): set "
                      f"method.text_tower to the CLIP checkpoint it came from, or {TINY_TOWER} (random weights)")


def question_text(prompt: str) -> str:
    """The text CDPruner scores against: the user's question without the answer-format instruction."""
    for instruction in FORMAT_INSTRUCTIONS:
        prompt = prompt.replace(instruction, "")
    return prompt


def dpp_map(kernel: torch.Tensor, count: int) -> torch.Tensor:
    """(count,) indices of the fast greedy MAP of a DPP with (N, N) `kernel`, in pick order (no early stop)."""
    gains = kernel.diagonal().clone()  # d²: each candidate's marginal gain
    rows = kernel.new_zeros(count, kernel.shape[0])  # c: the incremental Cholesky rows
    picked = torch.empty(count, dtype=torch.long, device=kernel.device)
    tiny = torch.finfo(kernel.dtype).tiny
    for t in range(count):
        j = gains.argmax()
        picked[t] = j
        # Once the kernel's rank is spent (count > embedding width, toy models only) the gains are rounding noise
        # and the reference's sqrt turns NaN (then re-picks token 0): a non-positive gain adds a zero row instead.
        gain = gains[j]
        rows[t] = torch.where(gain > 0, (kernel[j] - rows[:t, j] @ rows[:t]) / gain.clamp(min=tiny).sqrt(), 0.0)
        gains -= rows[t] ** 2
        gains[j] = -float("inf")
    return picked


def conditional_dpp(embeddings: torch.Tensor, image_embeds: torch.Tensor, text_embeds: torch.Tensor, count: int,
                    sign: float = -1.0) -> torch.Tensor:
    """(count,) ascending indices CDPruner keeps of one image: (N, d) projected embeddings, (N, c) CLIP image
    embeddings, (M, c) CLIP text embeddings of the question's segments; `sign` -1 as the code, +1 as the paper."""
    normed = (embeddings / embeddings.norm(dim=-1, keepdim=True)).float()
    similarity = normed @ normed.T
    image = image_embeds / image_embeds.norm(dim=-1, keepdim=True)
    text = text_embeds / text_embeds.norm(dim=-1, keepdim=True)
    relevance = (sign * (image @ text.T)).mean(dim=-1)
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    kernel = relevance[:, None] * similarity * relevance[None, :]
    return dpp_map(kernel, count).sort().values


@dataclass
class ClipRelevance:
    """The CLIP pieces CDPruner's relevance needs beside LLaVA: the text tower with its tokenizer, and the image side's
    `post_layernorm` + `visual_projection` (the vision tower of the same checkpoint, frozen in LLaVA-1.5)."""

    clip: torch.nn.Module  # a `CLIPModel`
    tokenizer: object

    @classmethod
    def load(cls, path: str) -> ClipRelevance:
        from transformers import AutoTokenizer, CLIPModel

        return cls(CLIPModel.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path))

    @classmethod
    def tiny(cls, vision_width: int, seed: int = 0) -> ClipRelevance:
        """Random CLIP weights at a tiny vision tower's width, with the byte tokenizer of the tiny models."""
        from transformers import CLIPConfig, CLIPModel

        from harness.models import byte_tokenizer

        tokenizer = byte_tokenizer()
        config = CLIPConfig(
            text_config={"vocab_size": len(tokenizer), "hidden_size": 32, "intermediate_size": 64,
                         "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 77,
                         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3},
            vision_config={"hidden_size": vision_width, "intermediate_size": vision_width, "num_hidden_layers": 1,
                           "num_attention_heads": 1, "image_size": 14, "patch_size": 14},
            projection_dim=16,
        )
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return cls(CLIPModel(config).eval(), tokenizer)

    def image_embeds(self, hidden: torch.Tensor) -> torch.Tensor:
        """(images, patches, c) from the feature layer's output (CLS first), in fp32 as the reference."""
        clip = self.clip.to(hidden.device)
        return clip.visual_projection(clip.vision_model.post_layernorm(hidden[:, 1:].float()))

    def text_embeds(self, question: str, device: torch.device) -> torch.Tensor:
        """(segments, c): the question tokenised whole, zero-padded to a multiple of the tower's context and encoded
        segment by segment (attention mask 0 on the padding)."""
        context = self.clip.config.text_config.max_position_embeddings
        tokens = self.tokenizer(question, return_tensors="pt")
        length = tokens["input_ids"].shape[1]
        padding = -length % context
        inputs = {key: torch.cat([value, value.new_zeros(1, padding)], dim=1).view(-1, context).to(device)
                  for key, value in tokens.items() if key in ("input_ids", "attention_mask")}
        return self.clip.to(device).get_text_features(**inputs).pooler_output


@dataclass
class CDPruner(TokenPruner):
    """Options: `text_tower` (auto | a CLIP checkpoint: a Hub id in the local cache or a local directory | tiny),
    `variant` (code: negated relevance, as the reference | paper: the paper's cosine), `positions` (compact: a
    shorter input, as the reference)."""

    name: ClassVar[str] = "cdpruner"
    uses_budget: ClassVar[bool] = True
    needs_vision_probe: ClassVar[bool] = True
    needs_question: ClassVar[bool] = True
    needs_clip_tower: ClassVar[str | None] = (
        "its relevance compares the patches' CLIP image embeddings (the tower's post_layernorm and visual_projection) "
        "with the question's CLIP text embedding; the paper's fallback without a text tower (the mean of the language "
        "model's input embeddings of the question) is not implemented: use divprune (the same diversity selection on "
        "the projected embeddings, without the question)")
    text_tower: str = AUTO
    variant: str = "code"
    positions: str = "compact"
    _relevance: ClipRelevance | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")

    def check_model(self, config) -> None:
        self.text_tower = text_tower_for(config.vision_config) if self.text_tower == AUTO else self.text_tower
        self.text_tower_dir()

    def text_tower_dir(self) -> str | None:
        """The local directory of the text tower's checkpoint (None for `tiny`); ConfigError saying how to get it."""
        from omegaconf import OmegaConf

        from harness.models import checkpoint_dir

        if self.text_tower == AUTO:
            raise ConfigError("text_tower=auto is resolved from the model's config (harness.config.validate); "
                              "name the CLIP checkpoint or tiny")
        if self.text_tower == TINY_TOWER:
            return None
        spec = OmegaConf.create({"name": "cdpruner's CLIP text tower", "path": self.text_tower})
        return str(checkpoint_dir(spec, option="method.text_tower"))

    def vision_schedule(self, num_vision: int, num_layers: int) -> list[int]:
        return [self.budget.target(num_vision)] * num_layers

    def relevance_model(self, vision_width: int) -> ClipRelevance:
        if self._relevance is None:
            path = self.text_tower_dir()
            self._relevance = ClipRelevance.tiny(vision_width) if path is None else ClipRelevance.load(path)
        return self._relevance

    def reduce_image_embeddings(self, embeddings: torch.Tensor, vision: VisionProbe | None,
                                questions: list[str] | None) -> torch.Tensor:
        hidden = vision.hidden if vision.tower_hidden is None else vision.tower_hidden  # packed (NeXT): laid out
        clip = self.relevance_model(hidden.shape[-1])
        image_embeds = clip.image_embeds(hidden)
        sign = -1.0 if self.variant == "code" else 1.0
        keep = torch.stack([
            conditional_dpp(image, image_clip, clip.text_embeds(question_text(question), embeddings.device),
                            self.budget.tokens, sign)
            for image, image_clip, question in zip(embeddings, image_embeds, questions, strict=True)])
        self.sources = [[[int(i)] for i in row] for row in keep]
        return embeddings.gather(1, keep[..., None].expand(-1, -1, embeddings.shape[-1]))
