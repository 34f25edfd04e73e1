import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from harness.models import LoadedModel, build_tiny

torch.set_num_threads(2)
TINY = dict(name="tiny", source="tiny", num_layers=4, num_vision_tokens=576, image_size=336, patch_size=14,
            hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, vision_hidden_size=32,
            vision_layers=2, seed=0, dtype="float32", attn_implementation="sdpa")


def tiny_model(**overrides) -> LoadedModel:
    spec = OmegaConf.create({**TINY, **overrides})
    model, processor = build_tiny(spec)
    processor.tokenizer.padding_side = "left"
    return LoadedModel("tiny", model, processor, torch.device("cpu"))


@pytest.fixture(scope="session")
def tiny() -> LoadedModel:
    return tiny_model()


def noise_images(sizes: list[tuple[int, int]], seed: int) -> list[Image.Image]:
    """Random-pixel images of (width, height) `sizes`, drawn one after another from one generator seeded `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(h, w, 3, generator=generator) * 255).to(torch.uint8).numpy())
            for w, h in sizes]


@pytest.fixture(scope="session")
def picture() -> Image.Image:
    """A 336 px random-pixel picture (seed 1): every method on a family runs on it."""
    return noise_images([(336, 336)], seed=1)[0]


@pytest.fixture(scope="session")
def images() -> list[Image.Image]:
    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(2, 336, 336, 3, generator=generator) * 255).to(torch.uint8).numpy()
    return [Image.fromarray(p) for p in pixels]


def tiny_of(conf_name: str, **overrides) -> LoadedModel:
    """The tiny offline model of `conf/model/<conf_name>.yaml` (any family), fp32 on the CPU."""
    from harness.config import CONF_DIR
    from harness.models import load

    spec = OmegaConf.merge(OmegaConf.load(CONF_DIR / "model" / f"{conf_name}.yaml"), {"dtype": "float32", **overrides})
    return load(spec, "cpu")
