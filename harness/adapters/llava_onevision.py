"""LLaVA-OneVision on `transformers`' `LlavaOnevisionForConditionalGeneration` (models.md §6.2): LLaVA-NeXT's packing
with

- a SigLIP tower without CLS (`"full"` features of the last layer): 729 tokens per 384² view;
- crop grids up to 6x6, and a packed grid larger than 9 views' worth bilinearly shrunk to about that (`anyres_max_9`):
  640x480 -> 2,929 tokens; a 1x1 grid still adds its crop;
- several images in one prompt: no crops, one view and one newline each (730 tokens);
- a Qwen2 language model (1-D RoPE).
- Prompts: lmms-eval's `llava_onevision` wrapper (simple), conv template `qwen_1_5`: a ChatML system turn "You are a
  helpful assistant.", then the user turn with `<image>` tokens (space-joined) and a newline before the context.
- The processor rejects `video_processor=None` without torchvision (trap 18): `images_only` accepts it.
"""

from __future__ import annotations

from omegaconf import DictConfig

from harness.adapters.base import Images, byte_vocab
from harness.adapters.llava_next import IMAGE_TOKEN, LlavaNextAdapter, with_image_tokens
from harness.adapters.qwen2_vl import images_only

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", IMAGE_TOKEN, "<video>"]
QWEN_1_5_SYSTEM = "You are a helpful assistant."


def qwen_1_5_prompt(context: str) -> str:
    """LLaVA-NeXT's `conv_qwen_1_5` (SeparatorStyle.CHATML) with one user message and an open assistant turn."""
    return (f"<|im_start|>system\n{QWEN_1_5_SYSTEM}<|im_end|>\n<|im_start|>user\n{context}<|im_end|>\n"
            "<|im_start|>assistant\n")


class LlavaOnevisionAdapter(LlavaNextAdapter):
    family = "llava_onevision"
    title = "LLaVA-OneVision"
    architectures = ("LlavaOnevisionForConditionalGeneration",)
    pack_options = ("vision_aspect_ratio",)
    views_budget = False  # a shrunk grid blends the crops' tokens
    cls_token = False  # SigLIP: row 0 is an ordinary patch; pre-LLM methods rank by the attention patches receive

    def config_class(self):
        from transformers import LlavaOnevisionConfig

        return LlavaOnevisionConfig

    def classes(self):
        from transformers import (
            LlavaOnevisionForConditionalGeneration,
            LlavaOnevisionImageProcessorPil,
            LlavaOnevisionProcessor,
        )

        return LlavaOnevisionForConditionalGeneration, images_only(LlavaOnevisionProcessor), \
            LlavaOnevisionImageProcessorPil

    def packing_class(self):
        from transformers import LlavaOnevisionModel

        return LlavaOnevisionModel

    def processor(self, processor_class, image_processor, tokenizer, config):
        vision = config.vision_config
        return processor_class(image_processor=image_processor, tokenizer=tokenizer, video_processor=None,
                               num_image_tokens=(vision.image_size // vision.patch_size) ** 2,
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               vision_aspect_ratio=config.vision_aspect_ratio)

    def pinpoints(self, spec: DictConfig) -> list[list[int]]:
        """The checkpoints' grids: 1..6 x 1..6 views."""
        return [[spec.image_size * rows, spec.image_size * columns] for rows in range(1, 7) for columns in range(1, 7)]

    def tiny_image_processor(self, image_processor_class, spec: DictConfig):
        size = spec.image_size
        return image_processor_class(size={"height": size, "width": size}, image_grid_pinpoints=self.pinpoints(spec),
                                     image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])

    def tiny_vision_config(self, spec: DictConfig):
        from transformers import SiglipVisionConfig

        return SiglipVisionConfig(hidden_size=spec.vision_hidden_size, intermediate_size=2 * spec.vision_hidden_size,
                                  num_hidden_layers=spec.vision_layers, num_attention_heads=4,
                                  image_size=spec.image_size, patch_size=spec.patch_size, vision_use_head=False)

    def tiny_text_config(self, spec: DictConfig, tokenizer):
        from transformers import Qwen2Config

        return Qwen2Config(vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
                           intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                           num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                           max_position_embeddings=4096, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
                           pad_token_id=tokenizer.pad_token_id)

    def tiny_tokenizer(self):
        """The OneVision special tokens, then one token per byte; `<|im_end|>` ends an answer, no BOS (Qwen2's)."""
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        backend = Tokenizer(models.BPE(vocab=byte_vocab(SPECIAL_TOKENS), merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                       additional_special_tokens=SPECIAL_TOKENS[1:])

    def tiny_feature_options(self) -> dict:
        return dict(vision_feature_layer=-1, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")

    # ------------------------------------------------------------------ prompts and inputs
    def prompts(self, processor, questions: list[str], images: Images) -> list[str]:
        return [qwen_1_5_prompt(with_image_tokens(q, len(images[row]) if images is not None else 0))
                for row, q in enumerate(questions)]

    def inputs(self, processor, questions: list[str], images: Images):
        """The images nested per prompt: a prompt with several images gets one view each (no crops), as in the
        checkpoints' training."""
        return processor(images=images, text=self.prompts(processor, questions, images), padding=True,
                         return_tensors="pt")

    # ------------------------------------------------------------------ where things are
    def alone(self, inputs: dict) -> list[bool]:
        per_prompt = inputs.get("batch_num_images")
        if per_prompt is None:
            return super().alone(inputs)
        return [n == 1 for n in per_prompt.tolist() for _ in range(n)]

    def views(self, config, image_sizes, alone: list[bool]) -> list[int]:
        """Crops only for an image alone in its prompt, as `get_image_features` splits them."""
        return [n if single else 1 for n, single in zip(super().views(config, image_sizes, alone), alone, strict=True)]
