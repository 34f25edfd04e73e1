"""Qwen2-VL on `transformers`' `Qwen2VLForConditionalGeneration` (models.md §4.1).

- Dynamic resolution: an image becomes (H'/28)·(W'/28) vision tokens, H', W' rounded to multiples of 28 within the
  processor's [min_pixels, max_pixels]; the conf gives lmms-eval's bounds, since token counts (and so budgets) follow
  them. The vision tokens of an image are one run of `<|image_pad|>` between `<|vision_start|>`/`<|vision_end|>`
  (text tokens, never pruned), row-major over the merged grid.
- M-RoPE: three rows of position ids (t, h, w). The model computes them from the ids and `image_grid_thw`; the runtime
  gathers the model's own per-token cos/sin, never rebuilds RoPE from 1-D ids (trap 1).
- Prompts: lmms-eval's `qwen2_vl` wrapper (simple): a system turn "You are a helpful assistant.", then the user turn
  with the images first and the context (any literal `<image>` removed), rendered by the processor's chat template.
- The processors reject `video_processor=None` without torchvision (trap 18): `ImagesOnly` accepts it.
- No CLS in the ViT: pre-LLM methods rank by the attention each vision token's 2x2 patches receive in the last ViT
  block (the one the merger reads), and reduce each image's merger outputs, which keep their own M-RoPE positions.
  The ViT sequence packs every image of a batch, separated by `cu_seqlens`; 4 consecutive patches form one token.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import torch
from omegaconf import DictConfig

from harness.adapters.base import (
    Images,
    ModelAdapter,
    VisionAttentionCall,
    byte_vocab,
    random_text,
    reduces_before_llm,
    seeded_model,
)
from methods.base import ConfigError, TokenPruner

SYSTEM_PROMPT = "You are a helpful assistant."  # lmms-eval's `system_prompt` default for the Qwen wrappers
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                  "<|image_pad|>", "<|video_pad|>"]
# The ChatML rendering of the Qwen2-VL / Qwen2.5-VL checkpoints' template for images and text (a default system turn,
# each image as vision_start + image_pad + vision_end), for the tiny models, whose tokenizer is made in code.
DEFAULT_SYSTEM_TURN = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system{{ '\\n' }}You are a helpful assistant.<|im_end|>"
    "{{ '\\n' }}{% endif %}"
)
CHAT_TURNS = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}{{ '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>{{ '\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant{{ '\\n' }}{% endif %}"
)


def images_only(processor_class):
    """`processor_class` accepting `video_processor=None`: the video processor needs torchvision (trap 18)."""

    class ImagesOnly(processor_class):
        def check_argument_for_proper_class(self, name, arg):
            return None if arg is None else super().check_argument_for_proper_class(name, arg)

    ImagesOnly.__name__ = processor_class.__name__
    return ImagesOnly


def tiny_tokenizer():
    """The Qwen special tokens, then one token per byte; `<|im_end|>` ends an answer, no BOS (like Qwen's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab=byte_vocab(SPECIAL_TOKENS), merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIAL_TOKENS[1:])


class Qwen2VLAdapter(ModelAdapter):
    family = "qwen2_vl"
    title = "Qwen2-VL"
    architectures = ("Qwen2VLForConditionalGeneration",)
    position_rows = 3
    fixed_vision_tokens = False
    cls_token = False
    #: the tiny models' chat template (Qwen3-VL's checkpoints have no default system turn)
    tiny_chat_template: ClassVar[str] = DEFAULT_SYSTEM_TURN + CHAT_TURNS
    #: the image processor's merge of 2x2 ViT patches into one vision token
    merge_size: ClassVar[int] = 2

    def config_class(self):
        from transformers import Qwen2VLConfig

        return Qwen2VLConfig

    def classes(self):
        """(model class, processor class) of the family."""
        from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor

        return Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    def tiny_vision_config(self, spec: DictConfig) -> dict:
        width = spec.vision_hidden_size
        return dict(depth=spec.vision_layers, embed_dim=width, hidden_size=spec.hidden_size, num_heads=4,
                    mlp_ratio=2, patch_size=spec.patch_size, spatial_merge_size=self.merge_size)

    def tiny_text_config(self, spec: DictConfig, tokenizer) -> dict:
        return dict(
            vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
            num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
            num_key_value_heads=spec.num_kv_heads, max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                             "mrope_section": self.mrope_section(spec.hidden_size // spec.num_heads)},
            bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        )

    def mrope_section(self, head_dim: int) -> list[int]:
        """M-RoPE frequency sections (t, h, w) summing to head_dim / 2, in the 7B's 16:24:24 proportions."""
        half = head_dim // 2
        t = round(half * 16 / 64)
        h = (half - t) // 2
        return [t, h, half - t - h]

    def check_method(self, pruner: TokenPruner, batch_size: int = 1) -> None:
        super().check_method(pruner, batch_size)
        if pruner.positions == "compact" and not reduces_before_llm(pruner):
            # Renumbering a 2-D image grid is not defined, and no public Qwen port does it (models.md trap 3). A
            # pre-LLM reduction's "shorter input" is defined instead as the kept tokens at their own M-RoPE ids, as
            # the reference Qwen paths (HoloV-Qwen2.5-VL, LightCompress) feed them (see `PruningRuntime.compact`).
            raise ConfigError(f"method {pruner.name} with positions=compact is not defined on {self.title}'s M-RoPE "
                              f"(3-row image-grid positions): use method.positions=original")

    # ------------------------------------------------------------------ loading
    def image_processor(self, spec: DictConfig, path: Path | None = None):
        """The PIL image processor (no torchvision) with the conf's pixel bounds."""
        from transformers import Qwen2VLImageProcessorPil

        bounds = dict(min_pixels=spec.min_pixels, max_pixels=spec.max_pixels)
        if path is not None:
            return Qwen2VLImageProcessorPil.from_pretrained(path, **bounds)
        return Qwen2VLImageProcessorPil(**bounds, patch_size=spec.patch_size, merge_size=self.merge_size,
                                        temporal_patch_size=2)

    def from_pretrained(self, path: Path, spec: DictConfig, dtype: torch.dtype, device: torch.device):
        from transformers import AutoTokenizer

        model_class, processor_class = self.classes()
        model = model_class.from_pretrained(path, dtype=dtype, attn_implementation=spec.attn_implementation,
                                            device_map={"": device})
        processor = images_only(processor_class)(
            image_processor=self.image_processor(spec, path), tokenizer=AutoTokenizer.from_pretrained(path),
            video_processor=None, chat_template=_chat_template(path))
        return model, processor

    def build_tiny(self, spec: DictConfig, tokenizer=None):
        """The family's geometry (2x2 merge, M-RoPE sections in the 7B's proportions) with tiny widths."""
        tokenizer = tokenizer or tiny_tokenizer()
        model_class, processor_class = self.classes()
        processor = images_only(processor_class)(image_processor=self.image_processor(spec), tokenizer=tokenizer,
                                                 video_processor=None, chat_template=self.tiny_chat_template)
        ids = {name: tokenizer.convert_tokens_to_ids(token) for name, token in (
            ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
        config = self.config_class()(
            text_config=self.tiny_text_config(spec, tokenizer),
            vision_config=self.tiny_vision_config(spec),
            **ids,
        )
        model = seeded_model(model_class, config, spec, tokenizer.pad_token_id, tokenizer.eos_token_id)
        return model, processor

    # ------------------------------------------------------------------ prompts
    def prompts(self, processor, questions: list[str], images: Images) -> list[str]:
        prompts = []
        for row, question in enumerate(questions):
            content = [{"type": "image"} for _ in (images[row] if images is not None else [])]
            content.append({"type": "text", "text": question.replace("<image>", "")})
            messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": content}]
            prompts.append(processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
        return prompts

    def random_prompt(self, model, text_tokens: int, before: int, image_size: int,
                      generator: torch.Generator) -> dict[str, torch.Tensor]:
        """An `image_size`² image (a multiple of the patch size times the merge size): `<|vision_start|>`, one
        placeholder per merged token, `<|vision_end|>`, and its flattened patches as the processor gives them."""
        config = model.config
        vision = config.vision_config
        markers = [config.image_token_id, config.video_token_id, config.vision_start_token_id,
                   config.vision_end_token_id]
        text = random_text(config.text_config.vocab_size, text_tokens, markers, generator)
        side = image_size // vision.patch_size  # ViT patches per side
        if image_size % (vision.patch_size * self.merge_size):
            raise ConfigError(f"the image size must be a multiple of {vision.patch_size * self.merge_size} pixels on "
                              f"{self.title}, got {image_size}")
        placeholders = torch.full(((side // self.merge_size) ** 2,), config.image_token_id)
        ids = torch.cat([text[:before], torch.tensor([config.vision_start_token_id]), placeholders,
                         torch.tensor([config.vision_end_token_id]), text[before:]])[None]
        patch = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
                "mm_token_type_ids": (ids == config.image_token_id).long(),
                "pixel_values": torch.randn(side * side, patch, generator=generator),
                "image_grid_thw": torch.tensor([[1, side, side]])}

    # ------------------------------------------------------------------ where things are
    def token_grids(self, model, model_inputs: dict) -> list[tuple[int, int]] | None:
        """From `image_grid_thw` (ViT patches): one vision token per 2x2 patches, row-major. Under generate() the
        model call gets the image features and the (4, B, n) M-RoPE positions instead: an image's rows and columns
        are then the spread of its tokens' h and w positions."""
        grid_thw = model_inputs.get("image_grid_thw")
        if grid_thw is not None:
            return [(h // self.merge_size, w // self.merge_size) for _, h, w in grid_thw.tolist()]
        positions = model_inputs["position_ids"]
        return [(int(h.max() - h.min()) + 1, int(w.max() - w.min()) + 1)
                for row, spans in enumerate(self.image_spans(model, model_inputs["input_ids"]))
                for h, w in ((positions[-2, row, start:end], positions[-1, row, start:end]) for start, end in spans)]

    def vision_tower(self, model) -> torch.nn.Module:
        return model.model.visual

    def projector(self, model) -> torch.nn.Module:
        return model.model.visual.merger

    # ------------------------------------------------------------------ the ViT, for pre-LLM methods
    def tower_attention(self, model, layer: int | None) -> torch.nn.Module:
        """The merger reads the last block (in Qwen2.5-VL a full-attention one): that is the feature layer."""
        return model.model.visual.blocks[-1 if layer is None else layer].attn

    def vision_attention_call(self, module, args, kwargs) -> VisionAttentionCall:
        """The block's fused q/k projection and 2-D RoPE recomputed from its normed input, as its forward does."""
        from transformers.models.qwen2_vl.modeling_qwen2_vl import apply_rotary_pos_emb_vision

        hidden = args[0] if args else kwargs["hidden_states"]
        chunks = args[1] if len(args) > 1 else kwargs["cu_seqlens"]
        queries, keys, _ = module.qkv(hidden).reshape(hidden.shape[0], 3, module.num_heads, -1).unbind(1)
        cos, sin = kwargs["position_embeddings"]
        rotated_queries, rotated_keys = apply_rotary_pos_emb_vision(queries, keys, cos, sin)
        return VisionAttentionCall(rotated_queries, rotated_keys, keys, chunks, module.scaling)

    def image_grids(self, args, kwargs) -> torch.Tensor:
        return kwargs["grid_thw"] if "grid_thw" in kwargs else args[1]

    def tokens_per_image(self, model, grids: torch.Tensor) -> list[int]:
        return (grids.prod(-1) // self.merge_size ** 2).tolist()

    def token_of_patch(self, model, grids: torch.Tensor) -> torch.Tensor:
        """Every 4 consecutive patches form one token, images one after the other."""
        return torch.arange(int(grids.prod(-1).sum()), device=grids.device) // self.merge_size ** 2

    def image_embeddings(self, output) -> torch.Tensor:
        return output.pooler_output

    def set_image_embeddings(self, output, embeddings: torch.Tensor, own_slot: torch.Tensor) -> None:
        output.pooler_output = embeddings


def _chat_template(path: Path) -> str | None:
    """The checkpoint's processor chat template (chat_template.json or .jinja), else the tokenizer's."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        return json.loads((path / "chat_template.json").read_text())["chat_template"]
    return None
