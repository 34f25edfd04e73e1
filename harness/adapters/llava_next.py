"""LLaVA-NeXT (v1.6) on `transformers`' `LlavaNextForConditionalGeneration` (models.md §6.1): vicuna and mistral.

- AnyRes: the processor picks the best grid among `image_grid_pinpoints` and returns a base view plus the grid's
  crops; CLIP encodes every view (layer -2, CLS dropped), the projector maps all of them, then
  `pack_image_features` lays out one image as the base view's tokens (576 at 336 px), then the crops as one grid
  unpadded to the image's aspect ratio, with the learned `image_newline` after every grid row. 336² -> 1,176 tokens,
  448² -> 2,928.
- Every slot, newlines included, carries `<image>`'s id. Newline slots are not prunable vision tokens: the adapter
  finds them by packing an indicator through the model's own `pack_image_features` (so the layout is the model's, for
  any image size), and the runtime keeps them as it keeps text.
- Prompts: lmms-eval's `llava_hf` wrapper (simple): `<image>` tokens (space-joined, one per image) and a newline
  before the context unless it has one, a single user turn rendered by the *tokenizer's* chat template, or, when the
  tokenizer has none, lmms-eval's Vicuna template (`A chat between ... USER: ... ASSISTANT:`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar

import torch
from omegaconf import DictConfig

from harness.adapters.base import Images, ModelAdapter, TokenView, seeded_model
from harness.adapters.llava import byte_tokenizer

IMAGE_TOKEN = "<image>"
# lmms-eval `llava_hf.VICUNA_CHAT_TEMPLATE`, used when the checkpoint's tokenizer has no chat template.
VICUNA_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.index0 == 0 %}A chat between a curious user and an artificial "
    "intelligence assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. "
    "USER: {{ message['content'] }} {% elif message['role'] == 'user' %}USER: {{ message['content'] }} {% else %} "
    "ASSISTANT: {{ message['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


@dataclass(frozen=True)
class AnyResLayout:
    """The images of one prompt as the model lays them out (harness.flops reads it)."""

    views: int  # base views and crops the vision tower encodes
    vision_tokens: int  # prunable vision tokens in the prompt
    newline_tokens: int  # image-newline slots in the prompt (kept like text)


def with_image_tokens(context: str, images: int) -> str:
    """lmms-eval's LLaVA wrappers put one `<image>` per image (space-joined) and a newline before a context that has
    none."""
    if images and IMAGE_TOKEN not in context:
        return " ".join([IMAGE_TOKEN] * images) + "\n" + context
    return context


class LlavaNextAdapter(ModelAdapter):
    family = "llava_next"
    title = "LLaVA-NeXT"
    architectures = ("LlavaNextForConditionalGeneration",)
    fixed_vision_tokens = False
    packs_features = True
    views_budget = True
    #: the keyword `pack_image_features` takes besides the features, sizes and newline (NeXT: the CLS strategy)
    pack_options: ClassVar[tuple[str, ...]] = ("vision_feature_select_strategy",)

    def config_class(self):
        from transformers import LlavaNextConfig

        return LlavaNextConfig

    def classes(self):
        """(model class, processor class, PIL image processor class) of the family."""
        from transformers import LlavaNextForConditionalGeneration, LlavaNextImageProcessorPil, LlavaNextProcessor

        return LlavaNextForConditionalGeneration, LlavaNextProcessor, LlavaNextImageProcessorPil

    def packing_class(self):
        """The class whose `pack_image_features` lays out the crops and newlines."""
        from transformers import LlavaNextModel

        return LlavaNextModel

    # ------------------------------------------------------------------ loading
    def from_pretrained(self, path: Path, spec: DictConfig, dtype: torch.dtype, device: torch.device):
        from transformers import AutoTokenizer

        model_class, processor_class, image_processor_class = self.classes()
        model = model_class.from_pretrained(path, dtype=dtype, attn_implementation=spec.attn_implementation,
                                            device_map={"": device})
        processor = self.processor(processor_class, image_processor_class.from_pretrained(path),
                                   AutoTokenizer.from_pretrained(path), model.config)
        return model, processor

    def processor(self, processor_class, image_processor, tokenizer, config):
        return processor_class(image_processor=image_processor, tokenizer=tokenizer,
                               patch_size=config.vision_config.patch_size,
                               vision_feature_select_strategy=config.vision_feature_select_strategy,
                               num_additional_image_tokens=1)

    def pinpoints(self, spec: DictConfig) -> list[list[int]]:
        """The checkpoints' grids (1x2, 2x1, 2x2, 3x1, 1x3 views) at the tiny model's view size."""
        return [[spec.image_size * rows, spec.image_size * columns] for rows, columns in
                ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]

    def tiny_image_processor(self, image_processor_class, spec: DictConfig):
        size = spec.image_size
        return image_processor_class(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                     image_grid_pinpoints=self.pinpoints(spec),
                                     image_mean=[0.481, 0.458, 0.408], image_std=[0.269, 0.261, 0.276])

    def tiny_vision_config(self, spec: DictConfig):
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(hidden_size=spec.vision_hidden_size, intermediate_size=2 * spec.vision_hidden_size,
                                num_hidden_layers=spec.vision_layers, num_attention_heads=4,
                                image_size=spec.image_size, patch_size=spec.patch_size)

    def tiny_text_config(self, spec: DictConfig, tokenizer):
        from transformers import LlamaConfig

        return LlamaConfig(vocab_size=len(tokenizer), hidden_size=spec.hidden_size,
                           intermediate_size=spec.intermediate_size, num_hidden_layers=spec.num_layers,
                           num_attention_heads=spec.num_heads, num_key_value_heads=spec.num_kv_heads,
                           max_position_embeddings=4096, bos_token_id=1, eos_token_id=2, pad_token_id=3)

    def tiny_tokenizer(self):
        return byte_tokenizer()

    def build_tiny(self, spec: DictConfig, tokenizer=None):
        """The family's geometry (CLIP views, the checkpoints' crop grids at the conf's view size, CLS dropped,
        feature layer -2) with tiny widths and random weights from `spec.seed`."""
        tokenizer = tokenizer or self.tiny_tokenizer()
        model_class, processor_class, image_processor_class = self.classes()
        config = self.config_class()(
            vision_config=self.tiny_vision_config(spec), text_config=self.tiny_text_config(spec, tokenizer),
            image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), image_grid_pinpoints=self.pinpoints(spec),
            **self.tiny_feature_options())
        model = seeded_model(model_class, config, spec, tokenizer.pad_token_id, tokenizer.eos_token_id)
        processor = self.processor(processor_class, self.tiny_image_processor(image_processor_class, spec), tokenizer,
                                   config)
        return model, processor

    def tiny_feature_options(self) -> dict:
        return dict(vision_feature_layer=-2, vision_feature_select_strategy="default")

    # ------------------------------------------------------------------ prompts
    def prompts(self, processor, questions: list[str], images: Images) -> list[str]:
        tokenizer = processor.tokenizer
        template = tokenizer.chat_template or VICUNA_CHAT_TEMPLATE
        return [tokenizer.apply_chat_template(
            [{"role": "user", "content": with_image_tokens(q, len(images[row]) if images is not None else 0)}],
            chat_template=template, tokenize=False, add_generation_prompt=True) for row, q in enumerate(questions)]

    # ------------------------------------------------------------------ where things are
    def vision_tower(self, model) -> torch.nn.Module:
        return model.model.vision_tower

    def projector(self, model) -> torch.nn.Module:
        return model.model.multi_modal_projector

    def image_token_id(self, model) -> int:
        return model.config.image_token_index

    def image_slots(self, model, inputs: dict) -> list[torch.Tensor] | None:
        """Per image, in the order the model scatters them: (N_i,) bool, True at its image-newline slots; None without
        images. `generate()` encodes the images before the model call: the newline rows of the packed features are
        `image_newline` itself. Otherwise the layout follows from the image sizes (`newline_slots`)."""
        encoded = (inputs.get("mm_encoder_outputs") or {}).get("image")
        if encoded is not None:
            return self.packed_newlines(model, encoded.pooler_output)
        if inputs.get("image_sizes") is None:
            return None
        return self.newline_slots(model.config, inputs["image_sizes"], self.alone(inputs))

    def token_views(self, model, model_inputs: dict) -> list[list[TokenView]] | None:
        """Per image, the base view (side x side tokens), then, where it has crops, their unpadded (and on OneVision
        possibly shrunk) grid: h' rows of w' tokens, each row followed by its newline slot. An image without crops
        (OneVision's several per prompt) is its base view and one newline."""
        slots = self.image_slots(model, model_inputs)
        if slots is None:
            return None
        vision = model.config.vision_config
        side = vision.image_size // vision.patch_size
        views = []
        for newlines in slots:
            rows = int(newlines.sum())
            columns = (len(newlines) - side * side - rows) // rows
            # the layout `pack_image_features` gives: a newline after the base view or after every grid row
            ends = [side * side + (row + 1) * (columns + 1) - 1 for row in range(rows)]
            if newlines.nonzero()[:, 0].tolist() != ends:
                raise ValueError(f"{self.title}: an image of {len(newlines)} slots has its newlines at "
                                 f"{newlines.nonzero()[:, 0].tolist()}, not after a {side}x{side} base view and a "
                                 f"grid's rows")
            base = TokenView("base", side, side)
            views.append([base] if columns == 0 else [base, TokenView("crops", rows, columns)])
        return views

    def packed_newlines(self, model, packed: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per packed image ((N_i, d) features): True at its newline rows, which hold `image_newline` itself."""
        newline = model.model.image_newline
        return [(features == newline.to(features)).all(-1) for features in packed]

    def alone(self, inputs: dict) -> list[bool]:
        """Per image, whether it is its prompt's only image (OneVision crops only those)."""
        return [True] * len(inputs["image_sizes"])

    def views(self, config, image_sizes: torch.Tensor, alone: list[bool]) -> list[int]:
        """The base view plus the crops of each image, as the model splits the vision tower's output."""
        from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

        return [image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size)
                for size in image_sizes.tolist()]

    def newline_slots(self, config, image_sizes: torch.Tensor, alone: list[bool]) -> list[torch.Tensor]:
        """Per image, (N_i,) True at its newline slots: an indicator (0 for every view token, 1 for the newline) goes
        through the model class's own `pack_image_features`, which reads nothing but the config (so no weights are
        needed, and the layout is the model's for any image size)."""
        tokens = (config.vision_config.image_size // config.vision_config.patch_size) ** 2
        indicator = [torch.zeros(n, tokens, 1) for n in self.views(config, image_sizes, alone)]
        packer = SimpleNamespace(config=config)
        packed, _ = self.packing_class().pack_image_features(
            packer, indicator, image_sizes.cpu(), image_newline=torch.ones(1),
            **{option: getattr(config, option) for option in self.pack_options})
        return [image[:, 0] == 1 for image in packed]

    def layout(self, config, image_sizes: torch.Tensor, alone: list[bool]) -> AnyResLayout:
        """What the images of one prompt cost: views encoded, prunable vision tokens and newline slots."""
        slots = torch.cat(self.newline_slots(config, image_sizes, alone))
        return AnyResLayout(views=sum(self.views(config, image_sizes, alone)), vision_tokens=int((~slots).sum()),
                            newline_tokens=int(slots.sum()))

    def prompt_layout(self, model, inputs: dict) -> AnyResLayout:
        if inputs.get("image_sizes") is None:  # a text-only prompt
            return AnyResLayout(views=0, vision_tokens=0, newline_tokens=0)
        return self.layout(model.config, inputs["image_sizes"], self.alone(inputs))

    def image_layout(self, model, input_ids: torch.Tensor, inputs: dict | None) -> tuple[torch.Tensor, torch.Tensor]:
        """((B, N) the image of each `<image>` slot, -1 elsewhere; (B, N) True at newline slots), from the packed
        lengths: the model fills the slots row by row, image after image."""
        placeholders = input_ids == self.image_token_id(model)
        image = torch.full_like(input_ids, -1)
        newline = torch.zeros_like(placeholders)
        slots = self.image_slots(model, inputs) if inputs is not None and placeholders.any() else None
        if slots is None:
            return image, newline
        image[placeholders] = torch.cat([torch.full((len(s),), i, device=input_ids.device)
                                         for i, s in enumerate(slots)])
        newline[placeholders] = torch.cat(slots).to(input_ids.device)
        # images are numbered within their row, as the runtime counts them
        first = image.masked_fill(~placeholders, len(slots)).min(dim=1, keepdim=True).values
        return torch.where(placeholders, image - first, image), newline

    def vision_mask(self, model, input_ids: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
        """`<image>` slots except the image-newline ones (which need `inputs`' image sizes to be told apart)."""
        placeholders = input_ids == self.image_token_id(model)
        return placeholders & ~self.image_layout(model, input_ids, inputs)[1]

    def image_index(self, model, input_ids: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
        image, newline = self.image_layout(model, input_ids, inputs)
        return torch.where(newline, -1, image)

    def newline_mask(self, model, input_ids: torch.Tensor, inputs: dict | None = None) -> torch.Tensor:
        return self.image_layout(model, input_ids, inputs)[1]

    def image_spans(self, model, input_ids: torch.Tensor, inputs: dict | None = None) -> list[list[tuple[int, int]]]:
        """Per row, each image's slots, newlines included, as [start, end)."""
        image, _ = self.image_layout(model, input_ids, inputs)
        spans = []
        for row in image:
            slots = [(row == i).nonzero()[:, 0] for i in range(int(row.max()) + 1)]
            spans.append([(int(s[0]), int(s[-1]) + 1) for s in slots])
        return spans
