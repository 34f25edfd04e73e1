"""Qwen2.5-VL on `transformers`' `Qwen2_5_VLForConditionalGeneration` (models.md §4.2): Qwen2-VL's token formula,
placeholders, M-RoPE and prompt, with a windowed ViT (RMSNorm, SwiGLU; full attention only in
`fullatt_block_indexes`). Prompts: lmms-eval's `qwen2_5_vl` wrapper, the same system + user turns as `qwen2_vl`.

Inside the ViT the patches are permuted by window (4x4 tokens of 2x2 patches in the 7B); the tower restores raster
order only after the merger, so ViT-side signals map to tokens through the same window index (models.md trap 14).
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from harness.adapters.qwen2_vl import Qwen2VLAdapter


class Qwen25VLAdapter(Qwen2VLAdapter):
    family = "qwen2_5_vl"
    title = "Qwen2.5-VL"
    architectures = ("Qwen2_5_VLForConditionalGeneration",)

    def config_class(self):
        from transformers import Qwen2_5_VLConfig

        return Qwen2_5_VLConfig

    def classes(self):
        from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

        return Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    def tiny_vision_config(self, spec: DictConfig) -> dict:
        """Windows of 2x2 merged tokens (56 px), so the ViT's window permutation is not the identity; the last block
        attends over the whole image, as in the 7B."""
        width = spec.vision_hidden_size
        return dict(depth=spec.vision_layers, hidden_size=width, out_hidden_size=spec.hidden_size,
                    intermediate_size=2 * width, num_heads=4, patch_size=spec.patch_size,
                    spatial_merge_size=self.merge_size, window_size=4 * spec.patch_size,
                    fullatt_block_indexes=[spec.vision_layers - 1])

    def token_of_patch(self, model, grids: torch.Tensor) -> torch.Tensor:
        """The ViT's merge unit u (4 consecutive patches in window order) is raster token `window_index[u]`."""
        from transformers.vision_utils import get_vision_window_index

        visual = model.model.visual
        window_index, _ = get_vision_window_index(grids, spatial_merge_size=visual.spatial_merge_size,
                                                  window_size=visual.window_size, patch_size=visual.patch_size)
        return window_index.to(grids.device).repeat_interleave(self.merge_size ** 2)
