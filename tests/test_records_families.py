"""Selection records and `harness.analyze` on the families whose images hold several grids (tiny LLaVA-NeXT,
LLaVA-OneVision, InternVL3): the recorded cells of each view are the runtime's kept tokens, placed by sequence
position alone; newline slots are never cells; analyze draws one panel per grid."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir
from PIL import Image

from harness import analyze
from harness import run as run_module
from harness.adapters.internvl import tile_canvas
from harness.config import CONF_DIR, validate
from harness.lmms import Prunebench
from harness.records import views_of
from harness.runtime import prune
from methods import Budget, DivPrune, FastV, RandomPruner, VisionZip
from tests.conftest import tiny_of
from tests.test_records import assert_pre_llm_record, layer0_patches
from tests.test_runtime_next_ov import embeddings_entering_the_language_model

QUESTION = "What is in the image?"
FAMILIES = ("tiny_next", "tiny_ov", "tiny_internvl")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    return tiny_of(request.param)


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    generator = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(height, width, 3, generator=generator) * 255).to(torch.uint8).numpy())


def spans(is_slot: torch.Tensor) -> list[tuple[int, int]]:
    """The runs of True in a (N,) mask, as [start, end)."""
    edges = torch.nn.functional.pad(is_slot.int(), (1, 1)).diff().nonzero()[:, 0].tolist()
    return list(zip(edges[0::2], edges[1::2], strict=True))


@torch.no_grad()
def layout_by_position(loaded, inputs, row: int) -> tuple[dict[int, tuple], list[int]]:
    """Every vision slot of `row` -> (image, view, tile, cell row, cell column), worked out from sequence positions,
    and the newline slots. NeXT/OneVision: an image is a run of `<image>` slots, the base view's side² tokens first,
    then grid rows each closed by a slot whose embedding the model sets to `image_newline`. InternVL: an image is a
    run of `<IMG_CONTEXT>` slots, tiles of `image_seq_length` tokens, the thumbnail last where there are several."""
    ids = inputs["input_ids"][row]
    config = loaded.model.config
    layout, newline_slots = {}, []
    if loaded.adapter.family == "internvl":
        per_tile = config.image_seq_length
        side = int(per_tile ** 0.5)
        for image, (start, end) in enumerate(spans(ids == config.image_token_id)):
            tiles = (end - start) // per_tile
            for slot in range(start, end):
                tile, cell = divmod(slot - start, per_tile)
                thumbnail = tiles > 1 and tile == tiles - 1
                layout[slot] = (image, "thumbnail" if thumbnail else "tile", None if thumbnail else tile,
                                *divmod(cell, side))
        return layout, newline_slots
    embeds = embeddings_entering_the_language_model(loaded, inputs)[row]
    is_newline = (embeds == loaded.model.model.image_newline).all(-1)
    side = config.vision_config.image_size // config.vision_config.patch_size
    for image, (start, end) in enumerate(spans(ids == loaded.adapter.image_token_id(loaded.model))):
        grid_row, column = 0, 0
        for slot in range(start, end):
            offset = slot - start
            if is_newline[slot]:
                newline_slots.append(slot)
                grid_row, column = grid_row + 1, 0
            elif offset < side * side:
                layout[slot] = (image, "base", None, *divmod(offset, side))
            else:
                layout[slot] = (image, "crops", None, grid_row, column)
                column += 1
    return layout, newline_slots


def cell(views: list[dict], patch: int) -> tuple:
    """A recorded patch's (image, view, tile, cell row, cell column), through the record's views."""
    view = next(v for v in views if v["first"] <= patch < v["first"] + v["grid"][0] * v["grid"][1])
    return (view["image"], view["view"], view.get("tile"), *divmod(patch - view["first"], view["grid"][1]))


def assert_record_places_the_runtimes_tokens(loaded, inputs, runtime, row: int) -> dict:
    """The record's views hold exactly the row's vision slots (newlines none of them); at every layer the snapshot in
    force lists the runtime's kept vision tokens, each at the cell its sequence position gives; every newline slot
    enters every layer."""
    record = runtime.recorder.record(row)
    views = record["views"]
    layout, newlines = layout_by_position(loaded, inputs, row)
    prompt_vision = runtime.prompt_vision[row]
    assert sorted(layout) == prompt_vision.nonzero()[:, 0].tolist()
    assert not any(prompt_vision[newlines])
    patches = sum(v["grid"][0] * v["grid"][1] for v in views)
    assert [cell(views, p) for p in range(patches)] == [layout[slot] for slot in sorted(layout)]
    kept = list(range(patches))
    for layer, ran in enumerate(runtime.layers):
        kept = next((e["kept"] for e in record["layers"] if e["layer"] == layer and not e.get("cache")), kept)
        slots = [int(i) for i, valid in zip(ran.orig_index[row], ran.valid[row], strict=True)
                 if valid and prompt_vision[i]]
        assert [cell(views, p) for p in kept] == [layout[slot] for slot in slots], layer
        assert set(newlines) <= set(ran.orig_index[row].tolist()), layer
    assert all(e["merged"] == [] for e in record["layers"])
    return record


@torch.no_grad()
@pytest.mark.parametrize("size", [(336, 336), (100, 60)])
@pytest.mark.parametrize("method", [FastV(k=2, budget=Budget(8)), RandomPruner(k=1, budget=Budget(8))],
                         ids=["fastv", "random"])
def test_recorded_cells_are_the_runtimes_kept_tokens(family, size, method):
    inputs = family.inputs([picture(*size)], [QUESTION])
    with prune(family.model, method, sample_ids=["a"], record=True) as runtime:
        family.model(**inputs)
    record = assert_record_places_the_runtimes_tokens(family, inputs, runtime, 0)
    assert [(e["layer"], len(e["kept"])) for e in record["layers"]] == [(method.k, 8)]
    kinds = [v["view"] for v in record["views"]]
    if family.name == "tiny_internvl":  # 336 px: a 3x3 canvas; 100x60: 3x2 (closest to 5:3 within 12 tiles)
        tiles = 9 if size == (336, 336) else 6
        assert kinds == ["tile"] * tiles + ["thumbnail"]
        assert [v.get("tile") for v in record["views"]] == [*range(tiles), None]
    else:
        crops = {("tiny_next", (336, 336)): [8, 8], ("tiny_next", (100, 60)): [4, 8],
                 ("tiny_ov", (336, 336)): [9, 9], ("tiny_ov", (100, 60)): [6, 9]}[family.name, size]
        assert kinds == ["base", "crops"] and record["views"][1]["grid"] == crops


@torch.no_grad()
def test_two_images_in_a_prompt_and_two_prompts_in_a_batch(family):
    """Each image's views are numbered within its row; OneVision gives an image of a several-image prompt its base
    view alone (and one newline)."""
    inputs = family.inputs([[picture(100, 60), picture(336, 336)]], ["Which one is brighter?"])
    with prune(family.model, RandomPruner(k=1, budget=Budget(4)), sample_ids=["two"], record=True) as runtime:
        family.model(**inputs)
    record = assert_record_places_the_runtimes_tokens(family, inputs, runtime, 0)
    assert {v["image"] for v in record["views"]} == {0, 1}
    if family.name == "tiny_ov":
        assert [(v["image"], v["view"], v["grid"]) for v in record["views"]] == [(0, "base", [3, 3]),
                                                                                 (1, "base", [3, 3])]
    batch = family.inputs([picture(336, 336), picture(336, 336, seed=1)], [QUESTION, "Which colour is it?"])
    with prune(family.model, RandomPruner(k=1, budget=Budget(4)), sample_ids=["a", "b"], record=True) as runtime:
        family.model(**batch)
    for row in range(2):
        record = assert_record_places_the_runtimes_tokens(family, batch, runtime, row)
        assert {v["image"] for v in record["views"]} == {0}


@torch.no_grad()
def test_pre_llm_reductions_are_recorded(family):
    """The packed (NeXT/OneVision) and in-sequence (InternVL) pre-LLM reductions are recorded at layer 0: DivPrune's
    kept tokens on their cells as their sequence positions give them; VisionZip's kept patches and contextual merges,
    each merge standing at the slot of one of its patches, exactly the tokens layer 0 runs; analyze draws them."""
    inputs = family.inputs([picture(100, 60)], [QUESTION])
    with prune(family.model, DivPrune(budget=Budget(8)), sample_ids=["a"], record=True) as runtime:
        family.model(**inputs)
    record = assert_record_places_the_runtimes_tokens(family, inputs, runtime, 0)
    assert [(e["layer"], e["pre_llm"], len(e["kept"])) for e in record["layers"]] == [(0, True, 8)]
    with prune(family.model, VisionZip(budget=Budget(retain=0.25)), sample_ids=["a"], record=True) as runtime:
        family.model(**inputs)
    (entry,) = runtime.recorder.record(0)["layers"]
    is_vision = runtime.prompt_vision
    assert_pre_llm_record(entry, layer0_patches(runtime, is_vision, 0), int(is_vision[0].sum()))
    counts, selections = analyze.method_pass(family, inputs, DivPrune(budget=Budget(8)), "a", QUESTION)
    assert counts == [8] * 4 and selections["layers"] == record["layers"]


def test_tile_canvas_is_the_processors_for_its_number_of_tiles():
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import get_optimal_tiled_canvas

    for width, height in ((336, 336), (100, 60), (640, 480), (1280, 720), (200, 1400), (60, 100), (1000, 90)):
        for tile in (64, 448):
            canvas = get_optimal_tiled_canvas((height, width), (tile, tile), 1, 12)
            tiles = canvas[0] * canvas[1] + (canvas[0] * canvas[1] > 1)
            assert tile_canvas((width, height), tiles) == canvas, (width, height, tile)


def drawn_panels(monkeypatch) -> dict[str, list[tuple[str, tuple]]]:
    """Figure name -> per visible panel, its title and the shape of the grid drawn over the image."""
    figures = {}
    save = analyze._save

    def spy(fig, path):
        figures[path.name] = [(ax.get_title(), ax.images[-1].get_array().shape) for ax in fig.axes
                              if ax.axison and len(ax.images) == 2]
        return save(fig, path)

    monkeypatch.setattr(analyze, "_save", spy)
    return figures


@pytest.mark.parametrize("name", FAMILIES)
def test_analyze_draws_one_panel_per_grid(name, tmp_path, monkeypatch):
    """A 100x60 picture: NeXT's base view (4x4) and 4x8 crop grid, OneVision's 3x3 and 6x9, InternVL's six 4x4 tiles
    and thumbnail; one panel per grid for each layer's attention and for FastV's snapshot."""
    picture(100, 60).save(tmp_path / "picture.png")
    figures = drawn_panels(monkeypatch)
    out = analyze.run([f"model={name}", f"image={tmp_path / 'picture.png'}", "question=What is this?",
                       "method=fastv", "budget=8", "layers=0", "topk=2", f"output_dir={tmp_path}"])
    result = json.loads((out / "analysis.json").read_text())
    grids = {"tiny_next": [(4, 4), (4, 8)], "tiny_ov": [(3, 3), (6, 9)], "tiny_internvl": [(4, 4)] * 7}[name]
    views = result["input"]["views"]
    assert [tuple(v["grid"]) for v in views] == grids
    assert result["input"]["vision_tokens"] == sum(h * w for h, w in grids)
    assert result["input"].get("newline_slots", 0) == {"tiny_next": 4, "tiny_ov": 6, "tiny_internvl": 0}[name]
    assert result["figures"][-1] == "pruning.png" and all((out / f).is_file() for f in result["figures"])
    assert [shape for _, shape in figures["attention_to_image.png"]] == grids * 4  # 4 layers
    assert [shape for _, shape in figures["pruning.png"]] == grids  # FastV's one snapshot, at layer 2
    titles = [title for title, _ in figures["pruning.png"]]
    assert sum(int(title.rpartition(": ")[2].split("/")[0]) for title in titles) == 8  # kept, per grid
    assert result["pruning"]["vision_tokens_per_layer"] == [sum(h * w for h, w in grids)] * 2 + [8, 8]
    assert views_of(result["pruning"]["selections"]) == views


def test_runs_record_views_and_analyze_draws_them_from_the_run(tmp_path, monkeypatch, capsys):
    """A tiny_next run keeps every sample's views and newline counts; `from_run=` draws them without a model; a
    pre-LLM method's reduction is on record too."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={tmp_path}", "model=tiny_next", "task.limit=1",
                                           "method=random", "budget=8", "method.k=1"])
    run = run_module.run(cfg)
    (sample,) = map(json.loads, (run / "samples.jsonl").read_text().splitlines())
    views = sample["selections"]["views"]
    assert [(v["view"], v["grid"]) for v in views] == [("base", [4, 4]), ("crops", [8, 8])]
    assert sample["newline_tokens_per_layer"] == [8] * 4 and sample["vision_tokens_per_layer"] == [80, 8, 8, 8]
    figures = drawn_panels(monkeypatch)
    monkeypatch.setattr(analyze, "load", lambda *a: pytest.fail("from_run= must not load a model"))
    out = analyze.run([f"from_run={run}", f"sample_id={sample['id']}", f"output_dir={tmp_path}"])
    assert (out / "pruning.png").is_file()
    assert [shape for _, shape in figures["pruning.png"]] == [(4, 4), (8, 8)]
    assert "layer 1: 8 kept" in capsys.readouterr().out

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={tmp_path}", "model=tiny_next", "method=divprune", "budget=8"])
    model = Prunebench.for_run(cfg, validate(cfg), {}, None)
    model.loaded = tiny_of("tiny_next")
    (record,) = model._generate([(0, "t/0", QUESTION, {"max_new_tokens": 2}, [picture(336, 336)], {})])
    assert record["vision_tokens_per_layer"] == [8] * 4
    assert [(e["layer"], e["pre_llm"], len(e["kept"])) for e in record["selections"]["layers"]] == [(0, True, 8)]


def test_compare_counts_every_views_patches_where_a_record_shows_no_change(tmp_path):
    from harness import compare

    views = [{"image": 0, "view": "base", "grid": [2, 2], "first": 0},
             {"image": 0, "view": "crops", "grid": [2, 3], "first": 4}]
    runs = []
    for name, layers in (("a", [{"layer": 1, "kept": [0, 5, 9], "merged": []}]), ("b", [])):
        runs.append(tmp_path / f"{name}.jsonl")
        runs[-1].write_text(json.dumps({"id": "t/0", "selections": {"views": views, "layers": layers}}) + "\n")
    (overlap,) = compare.compare(*(compare.recorded(run) for run in runs))
    assert (overlap.jaccard, overlap.kept, overlap.layers) == (3 / 10, (3, 10), (1, None))


@pytest.mark.parametrize("name", ["tiny_ov", "tiny_internvl"])
def test_generation_records_the_views_of_each_image_of_a_prompt(name, tmp_path):
    """Under `generate()` (images encoded before the model call) a two-image prompt's record lists each image's views:
    OneVision's base views alone, InternVL's tiles and thumbnails (100x60: 3x2 tiles, 336 px: 3x3)."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"output_dir={tmp_path}", f"model={name}", "method=fastv", "budget=8"])
    model = Prunebench.for_run(cfg, validate(cfg), {}, None)
    model.loaded = tiny_of(name)
    (record,) = model._generate([(0, "t/0", QUESTION, {"max_new_tokens": 2}, [picture(100, 60), picture(336, 336)],
                                  {})])
    views = [(v["image"], v["view"]) for v in record["selections"]["views"]]
    if name == "tiny_ov":
        assert views == [(0, "base"), (1, "base")] and record["newline_tokens_per_layer"] == [2] * 4
    else:
        assert views == [(0, "tile")] * 6 + [(0, "thumbnail")] + [(1, "tile")] * 9 + [(1, "thumbnail")]
    assert [(e["layer"], len(e["kept"])) for e in record["selections"]["layers"]] == [(2, 16)]  # 8 per image
