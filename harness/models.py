"""LLaVA-1.5 on `transformers`' `LlavaForConditionalGeneration`: loading, the vicuna_v1 prompt, batched inputs.

Two sources:
- `hf`: a real checkpoint (`llava-hf/llava-1.5-7b-hf`, a local directory, or the Hub cache), or one that
  `python -m harness.train_tiny` wrote (a directory, absolute or relative to the repository root). Nothing is
  downloaded here: a missing checkpoint stops the run before anything loads, saying what to download or which path
  to set.
- `tiny`: a LLaVA-1.5-geometry model built offline from a config (336 px / patch 14 -> 576 vision tokens, tiny
  widths, random weights from a seed, a byte-level tokenizer made in code). Most tests run on it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image

from harness.evaluate import ROOT
from methods.base import ConfigError

SUPPORTED_ARCHITECTURES = ("LlavaForConditionalGeneration",)
# What `AutoProcessor` reads from a checkpoint directory, by what it is: any one of the names will do.
PROCESSOR_FILES = {"a tokenizer": ("tokenizer.json", "tokenizer.model"),
                   "an image processor config": ("preprocessor_config.json", "processor_config.json")}
# The llava-hf configs of LLaVA-1.5-7B/13B (no weights), for FLOP projections and random-weight benchmarks.
MODEL_CONFIGS = ROOT / "harness" / "model_configs"
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def vicuna_v1_prompt(question: str, with_image: bool = True) -> str:
    """The LLaVA-1.5 evaluation prompt (conv_mode vicuna_v1, `<image>` first in the user turn)."""
    image = "<image>\n" if with_image else ""
    return f"{VICUNA_V1_SYSTEM} USER: {image}{question} ASSISTANT:"


class ModelNotAvailable(ConfigError):
    """The checkpoint is not on this machine."""


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    processor: object
    device: torch.device

    @property
    def num_layers(self) -> int:
        return self.model.config.text_config.num_hidden_layers

    def inputs(self, images: list[Image.Image] | None, questions: list[str]):
        """Processor inputs for a batch (left padding keeps every prompt's last token last)."""
        prompts = [vicuna_v1_prompt(q, with_image=images is not None) for q in questions]
        batch = self.processor(images=images, text=prompts, padding=True, return_tensors="pt")
        dtype = self.model.dtype
        return {k: (v.to(self.device, dtype) if k == "pixel_values" else v.to(self.device)) for k, v in batch.items()}

    def decode(self, token_ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.processor.batch_decode(token_ids, skip_special_tokens=True)]


def resolve_device(name: str) -> torch.device:
    """`auto`: this process's GPU (LOCAL_RANK under `accelerate launch`), else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return torch.device("cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":  # the reference implementations run fp16 on GPU; CPU kernels want fp32
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def checkpoint_dir(spec: DictConfig, option: str = "model.path") -> Path:
    """The local directory of an `hf` model's checkpoint, or ModelNotAvailable saying how to get it (`option`: the
    setting that points to it)."""
    path = os.path.expanduser(spec.path)
    if (ROOT / path).is_dir():  # a directory under the repository root, whatever the working directory
        path = str(ROOT / path)
    if path.startswith((os.sep, ".")) and not os.path.isdir(path):
        made_by = f" Make it with: {spec.made_by}, or point" if spec.get("made_by") else " Point"
        raise ModelNotAvailable(f"{option}={path} does not exist; the weights of model '{spec.name}' are not on "
                                f"this machine.{made_by} {option} at a local checkpoint directory.")
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ModelNotAvailable(f"{option}={path} has no config.json: it is not a Hugging Face checkpoint")
        missing = [f"{what} ({' or '.join(names)})" for what, names in PROCESSOR_FILES.items()
                   if not any(os.path.isfile(os.path.join(path, name)) for name in names)]
        if missing:  # converted checkpoints often ship weights and config only; AutoProcessor would fail after them
            raise ModelNotAvailable(
                f"{option}={path} has no processor files: {', '.join(missing)} missing. Save the processor of "
                f"the checkpoint it was converted from into it, e.g.:\n  python -c \"from transformers import "
                f"AutoProcessor; AutoProcessor.from_pretrained('llava-hf/llava-1.5-7b-hf').save_pretrained('{path}')\"")
        return Path(path)
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo_id=path, filename="config.json")
    if isinstance(cached, str):
        return Path(cached).parent
    raise ModelNotAvailable(
        f"the weights of model '{spec.name}' ({path}) are not on this machine, and runs never download them.\n"
        f"  Download them once with:  hf download {path}\n"
        f"  or point to a local copy:  {option}=/path/to/checkpoint  (a directory with config.json and weights)"
    )


def model_config(spec: DictConfig):
    """The model's `LlavaConfig` without its weights: a tiny model's own, the config.json of a local checkpoint
    directory, or the shipped copy of a Hub checkpoint's (`model_configs/<repo name>.json`)."""
    from transformers import LlavaConfig

    if spec.source == "tiny":
        return build_tiny(spec)[0].config
    path = Path(os.path.expanduser(spec.path))
    for candidate in (path / "config.json", MODEL_CONFIGS / f"{path.name}.json"):
        if candidate.is_file():
            return LlavaConfig.from_json_file(candidate)
    shipped = ", ".join(sorted(p.stem for p in MODEL_CONFIGS.glob("*.json")))
    raise ModelNotAvailable(f"no config for model '{spec.name}' ({spec.path}): not a local checkpoint directory, and "
                            f"not one of the shipped configs ({shipped})")


def load(spec: DictConfig, device: str = "auto") -> LoadedModel:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    dev = resolve_device(device)
    dtype = resolve_dtype(spec.dtype, dev)
    if spec.source == "tiny":
        model, processor = build_tiny(spec)
        model = model.to(dev)
        for parameter in model.parameters():  # weights only: RoPE frequencies stay fp32, as from_pretrained keeps them
            parameter.data = parameter.data.to(dtype)
    else:
        path = checkpoint_dir(spec)
        model = LlavaForConditionalGeneration.from_pretrained(
            path, dtype=dtype, attn_implementation=spec.attn_implementation, device_map={"": dev}
        )
        processor = AutoProcessor.from_pretrained(path)
    if type(model).__name__ not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"{type(model).__name__} is not supported; supported: {SUPPORTED_ARCHITECTURES}")
    processor.tokenizer.padding_side = "left"
    return LoadedModel(spec.name, model.eval(), processor, dev)


TOKENIZER_SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]  # ids 0-4 in every tiny tokenizer


def byte_tokenizer():
    """One token per byte, no merges: a tokenizer that needs no training (the random-weight tiny model's)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {token: i for i, token in enumerate(TOKENIZER_SPECIALS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    return fast_tokenizer(Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>")))


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


def build_tiny(spec: DictConfig, tokenizer=None):
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
            num_hidden_layers=spec.vision_layers, num_attention_heads=4, image_size=size, patch_size=spec.patch_size,
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
    config.text_config._attn_implementation = spec.attn_implementation
    config.vision_config._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(spec.seed)
        model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = 3
    return model.eval(), processor
