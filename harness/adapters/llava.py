"""LLaVA-1.5 on `transformers`' `LlavaForConditionalGeneration`: loading, the vicuna_v1 prompt, the tiny model.

- A real checkpoint (`llava-hf/llava-1.5-7b-hf`, a local directory, or the Hub cache), or one that
  `python -m harness.train_tiny` wrote, loads with `from_pretrained`.
- `tiny`: a LLaVA-1.5-geometry model built offline from a config (336 px / patch 14 -> 576 vision tokens, tiny
  widths, random weights from a seed, a byte-level tokenizer made in code). Most tests run on it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig

from harness.adapters.base import Images, ModelAdapter, byte_vocab, random_text, seeded_model

VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TOKENIZER_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]  # ids 0-4 in every tiny tokenizer


def vicuna_v1_prompt(question: str, with_image: bool = True) -> str:
    """The LLaVA-1.5 evaluation prompt (conv_mode vicuna_v1, `<image>` first in the user turn)."""
    image = "<image>\n" if with_image else ""
    return f"{VICUNA_V1_SYSTEM} USER: {image}{question} ASSISTANT:"


def byte_tokenizer():
    """One token per byte, no merges: a tokenizer that needs no training (the random-weight tiny model's)."""
    from tokenizers import Tokenizer, models

    return fast_tokenizer(Tokenizer(models.BPE(vocab=byte_vocab(TOKENIZER_SPECIALS), merges=[], unk_token="<unk>")))


def fast_tokenizer(backend):
    """A byte-level `tokenizers` model wrapped as a LLaMA-style tokenizer: `<s>` first, `</s>` ends an answer."""
    from tokenizers import decoders, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        additional_special_tokens=["<image>"],
    )


class LlavaAdapter(ModelAdapter):
    family = "llava"
    title = "LLaVA-1.5"
    architectures = ("LlavaForConditionalGeneration",)

    def config_class(self):
        from transformers import LlavaConfig

        return LlavaConfig

    def from_pretrained(self, path: Path, spec: DictConfig, dtype: torch.dtype, device: torch.device):
        from transformers import AutoProcessor, LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=spec.attn_implementation, device_map={"": device}
        )
        return model, AutoProcessor.from_pretrained(path)

    def build_tiny(self, spec: DictConfig, tokenizer=None):
        """A LLaVA-1.5-geometry model with tiny widths, random weights from `spec.seed`, and `tokenizer` (default: the
        byte tokenizer)."""
        from transformers import (
            CLIPImageProcessorPil,
            CLIPVisionConfig,
            LlamaConfig,
            LlavaConfig,
            LlavaForConditionalGeneration,
            LlavaProcessor,
        )

        tokenizer = tokenizer or byte_tokenizer()
        size = spec.image_size
        image_processor = CLIPImageProcessorPil(  # the PIL backend: no torchvision
            size={"shortest_edge": size}, crop_size={"height": size, "width": size},
            image_mean=[0.481, 0.458, 0.408], image_std=[0.269, 0.261, 0.276],
        )
        processor = LlavaProcessor(
            image_processor=image_processor, tokenizer=tokenizer, patch_size=spec.patch_size,
            vision_feature_select_strategy="default", num_additional_image_tokens=1,
        )
        config = LlavaConfig(
            vision_config=CLIPVisionConfig(
                hidden_size=spec.vision_hidden_size, intermediate_size=2 * spec.vision_hidden_size,
                num_hidden_layers=spec.vision_layers, num_attention_heads=4, image_size=size,
                patch_size=spec.patch_size,
            ),
            text_config=LlamaConfig(
                vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                num_key_value_heads=spec.num_kv_heads, max_position_embeddings=4096,
                bos_token_id=1, eos_token_id=2, pad_token_id=3,
            ),
            image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
        )
        model = seeded_model(LlavaForConditionalGeneration, config, spec, 3)
        return model, processor

    def prompts(self, processor, questions: list[str], images: Images) -> list[str]:
        if images is not None and any(len(row) != 1 for row in images):
            raise NotImplementedError("LLaVA-1.5 takes exactly one image per prompt")
        return [vicuna_v1_prompt(q, with_image=images is not None) for q in questions]

    def random_prompt(self, model, text_tokens: int, before: int, image_size: int,
                      generator: torch.Generator) -> dict[str, torch.Tensor]:
        """The tower's fixed image size (`image_size` does not apply): one placeholder per patch."""
        config = model.config
        vision = config.vision_config
        text = random_text(config.text_config.vocab_size, text_tokens, [config.image_token_id], generator)
        patches = (vision.image_size // vision.patch_size) ** 2
        ids = torch.cat([text[:before], torch.full((patches,), config.image_token_id), text[before:]])[None]
        pixels = torch.randn(1, vision.num_channels, vision.image_size, vision.image_size, generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": pixels}

    def vision_tower(self, model) -> torch.nn.Module:
        return model.model.vision_tower

    def projector(self, model) -> torch.nn.Module:
        return model.model.multi_modal_projector
