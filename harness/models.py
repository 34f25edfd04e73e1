"""Loading a model of any supported family (`harness.adapters`), its prompts and batched inputs.

Two sources:
- `hf`: a real checkpoint (e.g. `llava-hf/llava-1.5-7b-hf`, a local directory, or the Hub cache), or one that
  `python -m harness.train_tiny` wrote (a directory, absolute or relative to the repository root). Nothing is
  downloaded here: a missing checkpoint stops the run before anything loads, saying what to download or which path
  to set.
- `tiny`: a model of the family's geometry built offline from a config (tiny widths, random weights from a seed, a
  byte-level tokenizer made in code). Most tests run on them.

The LLaVA-1.5 names (`vicuna_v1_prompt`, `byte_tokenizer`, ...) live in `harness.adapters.llava`, re-exported here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image

from harness.adapters import SUPPORTED_MODELS, ModelAdapter, adapter_for, adapter_of
from harness.adapters.llava import (  # noqa: F401  (their historical home: callers import them from here)
    TOKENIZER_SPECIALS,
    VICUNA_V1_SYSTEM,
    byte_tokenizer,
    fast_tokenizer,
    vicuna_v1_prompt,
)
from harness.evaluate import ROOT
from methods.base import ConfigError

SUPPORTED_ARCHITECTURES = tuple(SUPPORTED_MODELS)
# What `AutoProcessor` reads from a checkpoint directory, by what it is: any one of the names will do.
PROCESSOR_FILES = {"a tokenizer": ("tokenizer.json", "tokenizer.model"),
                   "an image processor config": ("preprocessor_config.json", "processor_config.json")}
# The configs of supported Hub checkpoints (no weights), for FLOP projections and random-weight benchmarks.
MODEL_CONFIGS = ROOT / "harness" / "model_configs"


class ModelNotAvailable(ConfigError):
    """The checkpoint is not on this machine."""


@dataclass
class LoadedModel:
    name: str
    model: torch.nn.Module
    processor: object
    device: torch.device

    @property
    def adapter(self) -> ModelAdapter:
        return adapter_for(self.model)

    @property
    def num_layers(self) -> int:
        return self.model.config.text_config.num_hidden_layers

    def inputs(self, images: list[Image.Image] | list[list[Image.Image]] | None, questions: list[str]):
        """Processor inputs for a batch: one image per prompt, or a list of images per prompt (left padding keeps
        every prompt's last token last)."""
        per_prompt = None if images is None else [row if isinstance(row, list) else [row] for row in images]
        batch = self.adapter.inputs(self.processor, questions, per_prompt)
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
    """The model's config without its weights: a tiny model's own, the config.json of a local checkpoint
    directory, or the shipped copy of a Hub checkpoint's (`model_configs/<repo name>.json`)."""
    if spec.source == "tiny":
        return build_tiny(spec)[0].config
    path = Path(os.path.expanduser(spec.path))
    for candidate in (path / "config.json", MODEL_CONFIGS / f"{path.name}.json"):
        if candidate.is_file():
            return adapter_of(spec).config_class().from_json_file(candidate)
    shipped = ", ".join(sorted(p.stem for p in MODEL_CONFIGS.glob("*.json")))
    raise ModelNotAvailable(f"no config for model '{spec.name}' ({spec.path}): not a local checkpoint directory, and "
                            f"not one of the shipped configs ({shipped})")


def load(spec: DictConfig, device: str = "auto") -> LoadedModel:
    adapter = adapter_of(spec)
    dev = resolve_device(device)
    dtype = resolve_dtype(spec.dtype, dev)
    if spec.source == "tiny":
        model, processor = adapter.build_tiny(spec)
        model = model.to(dev)
        for parameter in model.parameters():  # weights only: RoPE frequencies stay fp32, as from_pretrained keeps them
            parameter.data = parameter.data.to(dtype)
    else:
        model, processor = adapter.from_pretrained(checkpoint_dir(spec), spec, dtype, dev)
    if type(model).__name__ not in adapter.architectures:
        raise ConfigError(f"{type(model).__name__} is not a {adapter.title} class (model.family={adapter.family}); "
                          f"supported: {SUPPORTED_ARCHITECTURES}")
    processor.tokenizer.padding_side = "left"
    return LoadedModel(spec.name, model.eval(), processor, dev)


def build_tiny(spec: DictConfig, tokenizer=None):
    """(model, processor): the tiny offline model of the spec's family (LLaVA-1.5 unless `spec.family` says)."""
    return adapter_of(spec).build_tiny(spec, tokenizer)
