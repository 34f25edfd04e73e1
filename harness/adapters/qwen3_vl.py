"""Qwen3-VL on `transformers`' `Qwen3VLForConditionalGeneration` (models.md §4.3): Qwen2-VL's placeholders and 3-row
positions with

- ViT patch 16 and a 2x2 merge: 32 px per vision token; a learned position embedding; no CLS;
- interleaved M-RoPE frequencies (THWTHW...), sections 24:20:20 in the 8B; q/k RMSNorm before RoPE in the LM;
- DeepStack: the hidden states of some ViT blocks, each through its own merger, are added to the vision tokens after
  the first decoder layers (`deepstack_visual_indexes`; 8B: 8, 16, 24 -> after LM layers 0, 1, 2).
- Prompts: lmms-eval's `qwen3_vl` wrapper inserts the system turn "You are a helpful assistant." itself (the
  checkpoints' template has no default one), then the user turn with the images first.
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from harness.adapters.qwen2_vl import CHAT_TURNS, Qwen2VLAdapter


class Qwen3VLAdapter(Qwen2VLAdapter):
    family = "qwen3_vl"
    title = "Qwen3-VL"
    architectures = ("Qwen3VLForConditionalGeneration",)
    tiny_chat_template = CHAT_TURNS

    def config_class(self):
        from transformers import Qwen3VLConfig

        return Qwen3VLConfig

    def classes(self):
        from transformers import Qwen3VLForConditionalGeneration, Qwen3VLProcessor

        return Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    def tiny_text_config(self, spec: DictConfig, tokenizer) -> dict:
        return {**super().tiny_text_config(spec, tokenizer), "head_dim": spec.hidden_size // spec.num_heads}

    def mrope_section(self, head_dim: int) -> list[int]:
        """Interleaved sections (t, h, w), h = w, in the 8B's 24:20:20 proportions: THW repeated h times, then T."""
        half = head_dim // 2
        h = round(half * 20 / 64)
        return [half - 2 * h, h, h]

    def tiny_vision_config(self, spec: DictConfig) -> dict:
        """DeepStack from every ViT block but the last, so it feeds the first `vision_layers - 1` decoder layers."""
        width = spec.vision_hidden_size
        return dict(depth=spec.vision_layers, hidden_size=width, out_hidden_size=spec.hidden_size,
                    intermediate_size=2 * width, num_heads=4, patch_size=spec.patch_size,
                    spatial_merge_size=self.merge_size, num_position_embeddings=64,
                    deepstack_visual_indexes=list(range(spec.vision_layers - 1)))

    def deepstack_layers(self, model) -> int:
        return len(model.config.vision_config.deepstack_visual_indexes)

    def set_image_embeddings(self, output, embeddings: torch.Tensor, own_slot: torch.Tensor) -> None:
        """DeepStack features belong to their slot's own token: a token put into another's slot (a merged summary,
        zero padding) gets none."""
        output.pooler_output = embeddings
        output.deepstack_features = [features * own_slot[:, None].to(features.dtype)
                                     for features in output.deepstack_features]
