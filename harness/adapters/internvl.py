"""InternVL3 (`-hf` checkpoints) on `transformers`' `InternVLForConditionalGeneration` (models.md §5).

- Tiles: the processor cuts an image into the `cols x rows` grid of 448 px tiles (cols·rows <= 12) whose aspect ratio
  is closest to the image's, and appends a 448 px thumbnail of the whole image when the grid has more than one tile.
  Each tile runs through InternViT (patch 14: 1024 patches + CLS), CLS is dropped, `pixel_shuffle(0.5)` merges each
  2x2 block of patches into one token, and the projector (`mlp1`: LayerNorm + 2 linears) maps it into the language
  model: 256 vision tokens per tile, row-major, the thumbnail's last. An image is `<img>` + 256·tiles `<IMG_CONTEXT>`
  + `</img>`; the markers are text tokens and are never pruned.
- 1-D RoPE (a Qwen2 language model): the LLaVA-1.5 path of the runtime is exact unchanged.
- Prompts: lmms-eval's `internvl_hf` wrapper (chat): one user turn, the images first, then the context as given,
  rendered by the checkpoint's chat template (no system turn); the processor at min_patches=1, max_patches=12.
- InternVL2.5 exists only as remote code (`InternVLChatModel`), which the runtime cannot hook the same way: the
  VisiPruner paper's InternVL2.5-8B row is approached with InternVL3-8B-hf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig

from harness.adapters.base import Images, ModelAdapter, TokenView, byte_vocab, reduces_before_llm, seeded_model
from harness.adapters.qwen2_vl import _chat_template, images_only
from methods.base import ConfigError, TokenPruner

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>", "<video>"]
# The tokenizer attributes InternVLProcessor reads (`tokenizer.context_image_token`, ...), as the -hf repos set them.
IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                "video_token": "<video>"}
# The -hf checkpoints' chat template (the processor's): ChatML, no default system turn, an image as `<IMG_CONTEXT>\n`
# (the processor expands it to <img> + 256·tiles <IMG_CONTEXT> + </img>). The tiny model's tokenizer is made in code.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}{% elif part['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}{{ '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
MAX_TILES = 12  # lmms-eval's internvl_hf: min_patches=1, max_patches=12


@dataclass(frozen=True)
class ImageTiles:
    """Where one image's vision tokens are in a row: `tiles` consecutive blocks of `tokens_per_tile` tokens from
    `start`, row-major within each tile, the thumbnail last when there are several tiles."""

    start: int
    tiles: int
    tokens_per_tile: int

    @property
    def end(self) -> int:
        return self.start + self.tiles * self.tokens_per_tile

    @property
    def has_thumbnail(self) -> bool:
        return self.tiles > 1


def tiny_tokenizer():
    """The InternVL special tokens, then one token per byte; `<|im_end|>` ends an answer, no BOS (like Qwen2.5's)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(vocab=byte_vocab(SPECIAL_TOKENS), merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    # Named special tokens (a dict) replace a list of additional ones: `<|im_start|>` joins them under a name.
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   extra_special_tokens={"im_start_token": "<|im_start|>", **IMAGE_TOKENS})


class InternVLAdapter(ModelAdapter):
    family = "internvl"
    title = "InternVL3"
    architectures = ("InternVLForConditionalGeneration",)
    fixed_vision_tokens = False  # 1 to 13 tiles per image, by its aspect ratio and size
    # generate() runs the tower and the projector on the tiles of every image before the prompt is seen, so the
    # tiles cannot be grouped into images there: pre-LLM methods reduce each image's projected tokens before layer 0.
    reduces_in_sequence = True

    def check_method(self, pruner: TokenPruner, batch_size: int = 1) -> None:
        super().check_method(pruner, batch_size)
        if not reduces_before_llm(pruner):
            return
        if pruner.name == "cdpruner":
            raise ConfigError(f"method cdpruner scores relevance with the CLIP text tower of the model's vision tower; "
                              f"{self.title}'s InternViT has no text tower: use divprune (the same diversity without "
                              f"the question) or an in-LLM method")
        if pruner.name == "prumerge":
            raise ConfigError(f"method prumerge recomputes each ViT patch's CLS attention from the last layer's query "
                              f"and keys and merges patches by key similarity; {self.title}'s pixel shuffle "
                              f"concatenates 2x2 patches into one vision token, for which that rule is not defined "
                              f"here: use visionzip or vispruner (CLS attention summed per token)")

    def config_class(self):
        from transformers import InternVLConfig

        return InternVLConfig

    # ------------------------------------------------------------------ loading
    def processor(self, image_processor, tokenizer, image_seq_length: int, chat_template: str | None):
        """The InternVL processor without its video processor (it needs torchvision, trap 18)."""
        from transformers import InternVLProcessor

        return images_only(InternVLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                              video_processor=None, image_seq_length=image_seq_length,
                                              chat_template=chat_template)

    def from_pretrained(self, path: Path, spec: DictConfig, dtype: torch.dtype, device: torch.device):
        from transformers import AutoTokenizer, GotOcr2ImageProcessorPil, InternVLForConditionalGeneration

        model = InternVLForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation={"text_config": spec.attn_implementation, "vision_config": "sdpa"},
            device_map={"": device})
        image_processor = GotOcr2ImageProcessorPil.from_pretrained(path, crop_to_patches=True, min_patches=1,
                                                                   max_patches=MAX_TILES)
        processor = self.processor(image_processor, AutoTokenizer.from_pretrained(path),
                                   model.config.image_seq_length, _chat_template(path))
        return model, processor

    def build_tiny(self, spec: DictConfig, tokenizer=None):
        """InternVL3's geometry with tiny widths: square tiles of `image_size` px, `patch_size` px patches, CLS,
        pixel shuffle 0.5 ((image_size / patch_size / 2)² tokens per tile), up to 12 tiles + a thumbnail."""
        from transformers import (
            GotOcr2ImageProcessorPil,
            InternVLConfig,
            InternVLForConditionalGeneration,
            InternVLVisionConfig,
            Qwen2Config,
        )

        tokenizer = tokenizer or tiny_tokenizer()
        size = spec.image_size
        tokens_per_tile = (size // spec.patch_size // 2) ** 2
        image_processor = GotOcr2ImageProcessorPil(  # the PIL backend: no torchvision
            size={"height": size, "width": size}, crop_to_patches=True, min_patches=1, max_patches=MAX_TILES,
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
        processor = self.processor(image_processor, tokenizer, tokens_per_tile, CHAT_TEMPLATE)
        config = InternVLConfig(
            vision_config=InternVLVisionConfig(
                hidden_size=spec.vision_hidden_size, intermediate_size=2 * spec.vision_hidden_size,
                num_hidden_layers=spec.vision_layers, num_attention_heads=4, image_size=size,
                patch_size=spec.patch_size),
            text_config=Qwen2Config(
                vocab_size=len(tokenizer), hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
                num_hidden_layers=spec.num_layers, num_attention_heads=spec.num_heads,
                num_key_value_heads=spec.num_kv_heads, max_position_embeddings=4096,
                bos_token_id=None, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
            image_token_id=tokenizer.convert_tokens_to_ids("<IMG_CONTEXT>"),
            image_seq_length=tokens_per_tile,
        )
        return seeded_model(InternVLForConditionalGeneration, config, spec, tokenizer.pad_token_id,
                            tokenizer.eos_token_id), processor

    # ------------------------------------------------------------------ prompts
    def prompts(self, processor, questions: list[str], images: Images) -> list[str]:
        prompts = []
        for row, question in enumerate(questions):
            content = [{"type": "image"} for _ in (images[row] if images is not None else [])]
            content.append({"type": "text", "text": question})
            prompts.append(processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                         add_generation_prompt=True))
        return prompts

    # ------------------------------------------------------------------ where things are
    def vision_tower(self, model) -> torch.nn.Module:
        return model.model.vision_tower

    def projector(self, model) -> torch.nn.Module:
        """`mlp1`: it sees (tiles of every image of the batch, tokens per tile, 4·d_vision) pixel-shuffled features."""
        return model.model.multi_modal_projector

    def vision_attention(self, model, layer: int) -> tuple[torch.nn.Module, torch.nn.Module]:
        encoder_layer = self.vision_tower(model).encoder.layer[layer]
        return encoder_layer, encoder_layer.attention

    def image_probes(self, model, probe: dict[str, torch.Tensor], input_ids: torch.Tensor,
                     embeddings: torch.Tensor) -> list[list[dict[str, torch.Tensor]]]:
        """The probe (taken per tile, CLS first, at the ViT layer the projector reads) on each image's vision tokens:
        a token's CLS attention is the sum of its tile's CLS attention over the token's 2x2 patches (each tile's CLS
        row sums to 1 over its patches and itself, so scores compare across an image's tiles, thumbnail included),
        its key the mean of the patches' keys; the CLS entries (its own attention, key and query) are means over
        the image's tiles. `hidden` is the image's projected tokens: CLS never reaches the language model."""
        tiles, probes = 0, []
        for row, images in enumerate(self.image_tiles(model, input_ids)):
            probes.append([])
            for image in images:
                part = slice(tiles, tiles + image.tiles)
                tiles += image.tiles
                attention, keys = probe["cls_attention"][part], probe["keys"][part]
                probes[-1].append(dict(
                    hidden=embeddings[row:row + 1, image.start:image.end], hidden_has_cls=False,
                    cls_attention=torch.cat([attention[:, :, :1].mean(0), pool_patches(attention[:, :, 1:],
                                                                                       torch.sum)], dim=-1)[None],
                    keys=torch.cat([keys[:, :, :1].mean(0), pool_patches(keys[:, :, 1:], torch.mean)], dim=1)[None],
                    cls_query=probe["cls_query"][part].mean(0, keepdim=True)))
        return probes

    def image_tiles(self, model, input_ids: torch.Tensor) -> list[list[ImageTiles]]:
        """Per row, each image's tiles: its run of vision tokens is `tiles` blocks of `image_seq_length` tokens."""
        per_tile = model.config.image_seq_length
        return [[ImageTiles(start, (end - start) // per_tile, per_tile) for start, end in row]
                for row in self.image_spans(model, input_ids)]

    def token_views(self, model, model_inputs: dict) -> list[list[TokenView]] | None:
        """Per image, each tile's (side x side) grid of pixel-shuffled tokens, the thumbnail last."""
        side = math.isqrt(model.config.image_seq_length)
        views = []
        for row in self.image_tiles(model, model_inputs["input_ids"]):
            for image in row:
                tiles = [TokenView("tile", side, side, tile) for tile in range(image.tiles - image.has_thumbnail)]
                views.append(tiles + [TokenView("thumbnail", side, side)] * image.has_thumbnail)
        return views

    def tile_index(self, model, input_ids: torch.Tensor) -> torch.Tensor:
        """(B, N) the tile of its image each vision token comes from (0, 1, ...; the thumbnail is the image's last
        tile when it has several); -1 for text."""
        index = torch.full_like(input_ids, -1)
        for row, images in enumerate(self.image_tiles(model, input_ids)):
            for image in images:
                index[row, image.start:image.end] = torch.arange(image.tiles).repeat_interleave(image.tokens_per_tile)
        return index


def tile_canvas(image_size: tuple[int, int], tiles: int) -> tuple[int, int]:
    """(columns, rows) of the canvas the processor cut an image of `image_size` (width, height) into `tiles` tiles
    (thumbnail included): of the arrangements with that many tiles, the one whose aspect ratio is closest to the
    image's, as `get_optimal_tiled_canvas` picks among all of them."""
    blocks = tiles - 1 if tiles > 1 else 1
    width, height = image_size
    return min(((columns, blocks // columns) for columns in range(1, blocks + 1) if blocks % columns == 0),
               key=lambda canvas: abs(width / height - canvas[0] / canvas[1]))


def pool_patches(patches: torch.Tensor, pool) -> torch.Tensor:
    """(tiles, heads, patches, ...) per-patch values -> (heads, tiles · tokens per tile, ...): each vision token's 2x2
    patches pooled by `pool` (torch.sum, torch.mean), with pixel shuffle's grouping (token (i, j) of a tile holds
    patch rows 2i, 2i+1 and columns 2j, 2j+1), the tiles' tokens one after another."""
    tiles, heads, count = patches.shape[:3]
    side = math.isqrt(count)
    grid = patches.reshape(tiles, heads, side // 2, 2, side // 2, 2, *patches.shape[3:])
    return pool(grid, dim=(3, 5)).flatten(2, 3).transpose(0, 1).flatten(1, 2)
