"""Padded batches whose rows hold different numbers of vision tokens ("ragged"), beyond the Qwen family's tests in
tests/test_runtime_qwen.py: LLaVA-NeXT, LLaVA-OneVision and InternVL3 under the in-LLM methods, and PDrop and DART on
every family that has such batches. Each row of a ragged batch must give the logits and tokens it gives alone."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from harness.runtime import prune
from methods import DART, METHODS, Budget, ConfigError, DivPrune, FastV, PDrop, RandomPruner
from tests.conftest import noise_images, tiny_of
from tests.test_runtime import QUESTION
from tests.test_runtime_qwen import FEW, KeepEveryRow, NeedsOneCount, small

QUESTIONS = [QUESTION, "Describe the colours and the shapes you can see in this picture, please."]
# Per family: the two pictures' sizes, and per picture (prunable vision tokens, newline slots). NeXT: 336 px -> 16 base
# + 8x8 crops, 8 newlines; 100x60 -> 16 base + 2x1 crops unpadded to 4x8, 4 newlines. OneVision: 9 base + 9x9, 9
# newlines; 6x9, 6 newlines. InternVL: 128x64 -> 2x1 tiles + a thumbnail; 64x64 -> one tile (16 tokens a tile).
FAMILIES = {
    "tiny_next": ([(336, 336), (100, 60)], [(80, 8), (48, 4)]),
    "tiny_ov": ([(336, 336), (100, 60)], [(90, 9), (63, 6)]),
    "tiny_internvl": ([(128, 64), (64, 64)], [(48, 0), (16, 0)]),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return tiny_of(request.param)


def noise(width: int, height: int) -> Image.Image:
    return noise_images([(width, height)], seed=width * height)[0]


def generate(loaded, inputs):
    return loaded.model.generate(**inputs, max_new_tokens=FEW, min_new_tokens=FEW, do_sample=False,
                                 return_dict_in_generate=True, output_logits=True)


def assert_rows_equal_each_alone(loaded, pruner, pictures, batch_output, width):
    """Each row's new tokens and its logits at every step are those its prompt gets alone (tolerance as on Qwen)."""
    for row in range(2):
        alone = loaded.inputs([pictures[row]], QUESTIONS[row: row + 1])
        with prune(loaded.model, pruner, sample_ids=[["a", "b"][row]]):
            reference = generate(loaded, alone)
        assert torch.equal(batch_output.sequences[row, width:], reference.sequences[0, alone["input_ids"].shape[1]:])
        for step, logits in enumerate(batch_output.logits):
            assert (logits[row] - reference.logits[step][0]).abs().max() <= 1e-5, step


@torch.no_grad()
@pytest.mark.parametrize(("pruner", "vision"), [
    (KeepEveryRow(), lambda v: [[v[0]] * 4, [v[1]] * 4]),
    (RandomPruner(k=1, budget=Budget(8)), lambda v: [[v[0]] + [8] * 3, [v[1]] + [8] * 3]),
    (FastV(k=2, budget=Budget(retain=0.25)), lambda v: [[v[0]] * 2 + [round(v[0] / 4)] * 2,
                                                        [v[1]] * 2 + [round(v[1] / 4)] * 2]),
    (PDrop(ratio=0.5), lambda v: [[count // 2**stage for stage in range(4)] for count in v]),  # compact positions
    (DART(budget=Budget(16)), lambda v: [[count] * 2 + [min(count, 20)] * 2 for count in v]),  # 4 + 8·2 or all
    # pre-LLM: each image reduced on its own (NeXT/OneVision: packed; InternVL: in the sequence)
    (DivPrune(budget=Budget(retain=0.25)), lambda v: [[round(count / 4)] * 4 for count in v]),
    (METHODS["visionzip"](budget=Budget(retain=0.25)), lambda v: [[round(count / 4)] * 4 for count in v]),
], ids=["keep-all", "random-8", "fastv-retain0.25", "pdrop-ratio0.5", "dart-16", "divprune-retain0.25",
        "visionzip-retain0.25"])
def test_a_padded_batch_of_images_of_different_sizes_equals_each_alone(family, pruner, vision):
    """Two prompts whose images differ in size (NeXT/OneVision: crops and newline slots; InternVL: tiles) in one
    left-padded batch: the row that drops more keeps the difference as masked padding slots, every newline slot is
    kept in every layer, and each row gives what it gives alone."""
    sizes, layout = FAMILIES[family.name]
    pictures = [noise(*size) for size in sizes]
    batch = family.inputs([[picture] for picture in pictures], QUESTIONS)
    assert (batch["attention_mask"] == 0).any(), "the batch must be padded"
    newlines = family.adapter.newline_mask(family.model, batch["input_ids"], batch)
    with prune(family.model, pruner, sample_ids=["a", "b"]) as runtime:
        out = generate(family, batch)
    assert runtime.vision_tokens_per_layer().tolist() == vision([count for count, _ in layout])
    assert runtime.tokens_per_layer(newlines).tolist() == [[count] * 4 for _, count in layout]
    assert_rows_equal_each_alone(family, pruner, pictures, out, batch["input_ids"].shape[1])


@pytest.fixture(scope="module", params=["tiny_qwen2vl", "tiny_qwen25vl", "tiny_qwen3vl"])
def qwen(request):
    return tiny_of(request.param)


@torch.no_grad()
@pytest.mark.parametrize(("pruner", "vision"), [
    (PDrop(ratio=0.5, positions="original"), lambda v: [[count // 2**stage for stage in range(4)] for count in v]),
    # T̄_in = half of each row's own tokens: 32 (Qwen3-VL's 9 tokens: round(4.5) = 4)
    (PDrop(budget=Budget(retain=0.5), positions="original"),
     lambda v: [[64, 35, 19, 10], {12: [12, 6, 4, 2], 9: [9, 4, 2, 1]}[v[1]]]),
    (DART(budget=Budget(16)), lambda v: [[count] * 2 + [min(count, 20)] * 2 for count in v]),
], ids=["pdrop-ratio0.5", "pdrop-retain0.5", "dart-16"])
def test_pdrop_and_dart_on_a_ragged_qwen_batch_equal_each_row_alone(qwen, pruner, vision):
    """A 336 px and a 100x90 px image (64 and 12 vision tokens; Qwen3-VL: 9), M-RoPE positions kept original: each
    row runs its own PDrop pyramid (its own T̄_in under `retain`) and its own DART pivots, as it does alone."""
    pictures = [noise(336, 336), noise(100, 90)]
    batch = qwen.inputs([[picture] for picture in pictures], QUESTIONS)
    with prune(qwen.model, pruner, sample_ids=["a", "b"]) as runtime:
        out = generate(qwen, batch)
    assert runtime.vision_tokens_per_layer().tolist() == vision([64, small(qwen)])
    assert_rows_equal_each_alone(qwen, pruner, pictures, out, batch["input_ids"].shape[1])


@torch.no_grad()
def test_a_ragged_batch_gives_each_sample_its_own_record(tmp_path):
    """`batch_size=2` through the lmms-eval model on tiny LLaVA-NeXT, OneVision and InternVL3 with images of different
    sizes: each sample's output, vision and newline tokens per layer and vision-tower and projector FLOPs (its own
    crops or tiles, not the batch's) are those it gets alone; both rows ran the same tokens per layer (the first keeps
    padding slots)."""
    from harness.config import compose, validate
    from harness.lmms import Prunebench

    for name in FAMILIES:
        cfg = compose([f"model={name}", "method=fastv", "retain=0.25", "batch_size=2", f"output_dir={tmp_path}"])
        model = Prunebench.for_run(cfg, validate(cfg), {}, None)
        model.loaded = tiny_of(name)
        sizes, layout = FAMILIES[name]
        requests = [(row, f"t/{row}", QUESTIONS[row], {"max_new_tokens": 3}, [noise(*size)], {})
                    for row, size in enumerate(sizes)]
        batch = model._generate(requests)
        alone = [model._generate([request])[0] for request in requests]
        assert [r["vision_tokens_unpruned"] for r in batch] == [vision for vision, _ in layout]
        assert batch[0]["tokens_per_layer"] == batch[1]["tokens_per_layer"]
        for together, single in zip(batch, alone, strict=True):
            for key in ("output", "vision_tokens_per_layer", "vision_tokens_unpruned", "newline_tokens_per_layer"):
                assert together.get(key) == single.get(key), (name, key)
            assert together["first_token_top"]["ids"] == single["first_token_top"]["ids"]
            for part in ("vision", "projector"):
                assert together["flops"]["prefill"][part] == single["flops"]["prefill"][part] > 0, (name, part)


def test_methods_that_need_one_count_per_batch_are_refused_before_loading():
    """A method without `supports_ragged_batches` that prunes inside the language model keeps batch_size=1 on the
    families whose images differ in tokens; the message names the methods that take such batches (every registered
    one that batches at all)."""
    from harness.adapters import adapter_of
    from harness.config import check_overrides
    from harness.config import compose as composed

    able = ", ".join(name for name, method in METHODS.items() if method.supports_batching)
    for name in (*FAMILIES, "tiny_qwen25vl"):
        adapter = adapter_of(composed([f"model={name}"]).model)
        with pytest.raises(ConfigError, match=rf"^{adapter.title} gives images of different sizes different numbers "
                                              rf"of vision tokens, and method needs_one_count needs the same number "
                                              rf"in every row of a batch: set batch_size=1 \(methods that take such "
                                              rf"batches: {able}\)$"):
            adapter.check_method(NeedsOneCount(budget=Budget(8)), batch_size=2)
        check_overrides([f"model={name}", "method=fastv", "retain=0.25", "batch_size=2"])
        check_overrides([f"model={name}", "method=divprune", "retain=0.25", "batch_size=2"])
        for method in ("sparsevlm", "visipruner"):  # they decide per sample, as their reference code: batch 1 only
            with pytest.raises(ConfigError, match=rf"^method {method} supports batch size 1 only"):
                check_overrides([f"model={name}", f"method={method}", "budget=64", "batch_size=2"])


def test_pdrop_reads_retain_as_a_fraction_of_each_images_tokens():
    """T̄_in = F·V over a 4-layer model with stages at layers 1, 2, 3 (V in layer 0): 48 -> (48 + 26 + 14 + 8) / 4 = 24;
    on LLaVA-1.5, retain=0.25 is budget 144 (round(576 / 4)), the same schedule; a budget above an image's tokens
    keeps them all (an image smaller than the budget, as every budgeted method)."""
    assert PDrop(budget=Budget(retain=0.5)).vision_schedule(48, 4) == [48, 26, 14, 8]
    assert PDrop(budget=Budget(retain=0.5)).vision_schedule(80, 4) == [80, 43, 24, 13]
    assert PDrop(budget=Budget(144, retain=0.25)).schedule(576, 32) == PDrop(budget=Budget(144)).schedule(576, 32)
    assert PDrop(budget=Budget(40)).vision_schedule(30, 4) == [30] * 4
    with pytest.raises(ConfigError, match=r"^budget 6 \(retain=0.125 of 48\) is out of reach of PDrop stages "
                                          r"\[1, 2, 3\] \(T̄_in from 12.0 to 48.0\)$"):
        PDrop(budget=Budget(retain=0.125)).schedule(48, 4)
