"""Every selection on record (`harness.records`): the recorded patches are the runtime's own selection, merges
included; a recorded seed replays a draw; `harness.compare` and `harness.analyze from_run=` read the records."""

from __future__ import annotations

import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from harness import analyze, compare
from harness import run as run_module
from harness.config import CONF_DIR, check_overrides, validate
from harness.lmms import Prunebench
from harness.runtime import prune
from methods import Budget, ConfigError, FastV, RandomPruner, SparseVLM, VisionZip, VisiPruner
from methods.random import sample_seed
from tests.conftest import noise_images, tiny_model

QUESTION = "What is in the image?"
V = 576


def vision_start(loaded, inputs, row: int = 0) -> int:
    return int((inputs["input_ids"][row] == loaded.model.config.image_token_id).nonzero()[0, 0])


def assert_record_is_the_runtime_selection(runtime, row: int, start: int) -> dict:
    """At every layer, the snapshot in force (the layer's cache eviction where there is one) lists exactly the vision
    tokens the runtime ran: the unmerged ones' original patches in order, then the merged ones (which the runtime
    places after them, at their image's last slot)."""
    record = runtime.recorder.record(row)
    assert record["grid"] == [24, 24]
    current = {"kept": list(range(V)), "merged": []}
    for layer, ran in enumerate(runtime.layers):
        entries = [e for e in record["layers"] if e["layer"] == layer]
        current = next((e for e in entries if not e.get("cache")), current)
        shown = next((e for e in entries if e.get("cache")), current)
        index = ran.orig_index[row]
        vision = index[(index >= start) & (index < start + V)].tolist()
        kept, merged = len(shown["kept"]), len(shown["merged"])
        assert len(vision) == kept + merged, layer
        assert [i - start for i in vision[:kept]] == shown["kept"], layer
        assert vision[kept:] == [start + V - 1] * merged, layer
        assert all(m == sorted(set(m)) and len(m) > 0 for m in shown["merged"])
    changes = [e["layer"] for e in record["layers"] if not e.get("cache")]
    counts = [int(ran.vision_tokens[row]) for ran in runtime.layers]
    assert changes == [layer for layer in range(len(counts)) if counts[layer] != (counts[layer - 1] if layer else V)]
    return record


@torch.no_grad()
def test_fastv_record_is_the_kept_set_of_each_row_with_its_score_margin(tiny, images):
    inputs = tiny.inputs(images, [QUESTION, "Which colour is it?"])
    pruner = FastV(k=2, budget=Budget(64))
    with prune(tiny.model, pruner, sample_ids=["a", "b"], record=True) as runtime:
        tiny.model(**inputs)
    for row in range(2):
        record = assert_record_is_the_runtime_selection(runtime, row, vision_start(tiny, inputs, row))
        assert [(e["layer"], len(e["kept"])) for e in record["layers"]] == [(2, 64)]
        ranked = pruner.scores[row].sort(descending=True).values
        assert pruner.record(row)["score_margin"] == pytest.approx(float(ranked[63] - ranked[64]), abs=0)
        assert pruner.record(row)["score_margin"] >= 0


@torch.no_grad()
def test_visipruner_record_follows_the_cache_the_filter_and_the_exit(images):
    deep_tiny = tiny_model(num_layers=8)
    inputs = deep_tiny.inputs(images[:1], [QUESTION])
    # thresholds inside the random model's range (as tests/test_visipruner.py): every stage fires
    pruner = VisiPruner(shallow_mid_layer=1, layer_threshold=0.999998, tokens_threshold=0.0019, exit_threshold=0.9999,
                        variant="paper")
    with prune(deep_tiny.model, pruner, sample_ids=["a"], record=True) as runtime:
        deep_tiny.model(**inputs, use_cache=True)
    record = assert_record_is_the_runtime_selection(runtime, 0, vision_start(deep_tiny, inputs))
    f, kept, exit_layer = pruner.filter_layer, pruner.kept, pruner.exit_layer
    assert (f, exit_layer) == (2, 5) and 0 < kept < V
    # S = 1: the paper variant takes layer 0's vision K/V out of its cache; f = 2 prunes layer 3's input; exit at 5
    assert [(e["layer"], bool(e.get("cache")), len(e["kept"])) for e in record["layers"]] == [
        (0, True, 0), (f + 1, False, kept), (exit_layer, False, 0)]
    checks = pruner.record(0)["layer_checks"]
    assert [c["layer"] for c in checks] == [2, 3, 4]
    assert checks[0]["cosine_drop"] > 1 - 0.999998 and "qualifies" not in checks[0]  # the middle stage's find
    assert [c["qualifies"] for c in checks[1:]] == [True, True]  # two qualifying deep layers: exit after layer 4
    assert all(c["cosine_drop"] <= 1 - 0.9999 for c in checks[1:])
    assert pruner.record(0)["generator_seed"] == sample_seed(0, "a")


@torch.no_grad()
def test_sparsevlm_record_holds_each_merged_tokens_sources(tiny, images):
    inputs = tiny.inputs(images[:1], [QUESTION])
    start = vision_start(tiny, inputs)
    pruner = SparseVLM(budget=Budget(64))
    prunes = []
    original = pruner.prune

    def spy(layer, state):
        selection = original(layer, state)
        prunes.append((state.hidden_states[0].clone(), state.orig_index[0].clone(), selection))
        return selection

    pruner.prune = spy
    with prune(tiny.model, pruner, sample_ids=["a"], record=True) as runtime:
        tiny.model(**inputs)
    record = assert_record_is_the_runtime_selection(runtime, 0, start)
    first = record["layers"][0]
    hidden, orig_index, selection = prunes[0]
    assert len(first["merged"]) == selection.merged.shape[1] > 1
    for sources, merged in zip(first["merged"], selection.merged[0], strict=True):
        rows = torch.isin(orig_index, torch.tensor(sources) + start)
        assert int(rows.sum()) == len(sources)
        torch.testing.assert_close(hidden[rows].sum(0) / (len(sources) + 1e-6), merged, rtol=0, atol=1e-6)
    dropped = set(range(V)) - set(first["kept"])
    assert set().union(*map(set, first["merged"])) <= dropped  # recycled from the deleted tokens
    assert len(record["layers"]) == 2 and record["layers"][1]["merged"]  # the second pruning merges again
    fields = pruner.record(0)
    assert fields["generator_seed"] == sample_seed(0, "a")
    assert fields["raters"] == pruner.raters.tolist() and all(r > start + V for r in fields["raters"])


@torch.no_grad()
def test_visionzip_record_holds_its_dominant_patches_and_contextual_merges(tiny, images, tmp_path):
    inputs = tiny.inputs(images[:1], [QUESTION])
    pruner = VisionZip(budget=Budget(64))  # 54 dominant (CLS included) + 10 contextual
    captured = {}
    original = pruner.reduce_image_features

    def spy(features, vision):
        captured.update(vision=vision, output=original(features, vision))
        return captured["output"]

    pruner.reduce_image_features = spy
    with prune(tiny.model, pruner, sample_ids=["a"], record=True) as runtime:
        tiny.model(**inputs)
    record = runtime.recorder.record(0)
    [entry] = record["layers"]
    assert entry["layer"] == 0 and entry["pre_llm"] and entry["unsourced"] == 1  # CLS: dropped from the features
    vision, output = captured["vision"], captured["output"][0]
    dominant = vision.cls_attention[0, :, 1:].sum(0).topk(53).indices.sort().values.tolist()  # patch = slot - 1
    assert set(dominant) <= set(entry["kept"])
    assert len(entry["kept"]) - 53 + len(entry["merged"]) == 10  # contextual tokens (one with no joiner is kept)
    assert sorted(entry["kept"] + [p for m in entry["merged"] for p in m]) == list(range(V))  # a partition
    hidden = vision.hidden[0]
    contextual = output[54:]
    for sources in entry["merged"]:  # each is a target plus the mean of the patches that joined it
        candidates = [hidden[t + 1] + hidden[[o + 1 for o in sources if o != t]].mean(0) for t in sources]
        assert any(torch.allclose(c, token, atol=1e-5) for c in candidates for token in contextual), sources
    assert int(runtime.layers[0].vision_tokens[0]) == 64
    counts, selections = analyze.method_pass(tiny, inputs, VisionZip(budget=Budget(64)), "a", "q")  # analyze's overlay
    assert counts == [64] * 4 and selections == record
    path = analyze.plot_pruning(selections, images[0], "visionzip", tmp_path / "pruning.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@torch.no_grad()
def test_a_recorded_seed_replays_the_draw_on_any_sample(tiny, images):
    inputs = tiny.inputs(images[:1], [QUESTION])
    runs = {}
    for sample_id, explicit in (("a", None), ("b", sample_seed(0, "a")), ("b", None)):
        pruner = SparseVLM(budget=Budget(64), generator_seed=explicit)
        with prune(tiny.model, pruner, sample_ids=[sample_id], record=True) as runtime:
            logits = tiny.model(**inputs).logits
        runs[sample_id, explicit] = pruner.record(0)["generator_seed"], runtime.recorder.record(0), logits
    seed, record, logits = runs["a", None]
    assert runs["b", seed][0] == seed != runs["b", None][0]
    assert runs["b", seed][1] == record and torch.equal(runs["b", seed][2], logits)

    drawn = {}
    for sample_id, explicit in (("a", None), ("b", seed), ("b", None)):
        pruner = RandomPruner(budget=Budget(64), generator_seed=explicit)
        with prune(tiny.model, pruner, sample_ids=[sample_id], record=True) as runtime:
            tiny.model(**inputs)
        drawn[sample_id, explicit] = pruner.record(0)["generator_seed"], runtime.recorder.record(0)["layers"]
    assert drawn["a", None] == drawn["b", seed] and drawn["b", None][1] != drawn["a", None][1]


# ---------------------------------------------------------------------------------------------------- runs on disk
def run_config(tmp_path, *overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose("config", overrides=[f"output_dir={tmp_path}", "model=tiny", "model.num_layers=4",
                                            "task.limit=2", "budget=64", *overrides])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    return run_module.run(run_config(out, "method=fastv")), run_module.run(run_config(out, "method=random",
                                                                                        "method.k=2"))


def test_runs_write_selections_and_compare_reports_their_jaccard(two_runs, capsys):
    fastv, random = two_runs
    records = {run: {r["id"]: r for r in map(json.loads, (run / "samples.jsonl").read_text().splitlines())}
               for run in two_runs}
    assert list(records[fastv]) == ["synthetic_vqa/0", "synthetic_vqa/1"]
    expected = []
    for sample_id, record in records[fastv].items():
        [entry] = record["selections"]["layers"]
        fastv_kept = set(entry["kept"])
        generator = torch.Generator().manual_seed(sample_seed(0, sample_id))  # random's draw, by hand
        random_kept = set(torch.rand(V, generator=generator).topk(64).indices.tolist())
        assert records[random][sample_id]["selections"]["layers"][0]["kept"] == sorted(random_kept)
        expected.append(len(fastv_kept & random_kept) / len(fastv_kept | random_kept))
    overlaps = compare.compare(*(compare.recorded(run / "samples.jsonl") for run in two_runs))
    assert [o.jaccard for o in overlaps] == expected and all(o.layers == (2, 2) for o in overlaps)
    compare.main([str(fastv), str(random), "--per-sample"])
    printed = capsys.readouterr().out
    assert f"mean {sum(expected) / 2:.4f}  min {min(expected):.4f}" in printed
    assert f"synthetic_vqa/1  {expected[1]:.4f}  2/2  64/64" in printed


def samples_file(path, records: list[dict]):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_compare_by_hand_and_its_messages(tmp_path, capsys):
    grid = [2, 2]
    a = samples_file(tmp_path / "a.jsonl", [
        {"id": "t/0", "selections": {"grid": grid, "layers": [{"layer": 1, "kept": [0, 1, 2, 3], "merged": []}]}},
        {"id": "t/1", "selections": {"grid": grid, "layers": [{"layer": 0, "cache": True, "kept": [], "merged": []},
                                                              {"layer": 2, "kept": [0], "merged": [[1, 2]]}]}},
        {"id": "t/9", "selections": {"grid": grid, "layers": []}}])
    b = samples_file(tmp_path / "b.jsonl", [
        {"id": "t/1", "selections": {"grid": grid, "layers": []}},  # nothing changed: every patch kept
        {"id": "t/0", "selections": {"grid": grid, "layers": [{"layer": 0, "kept": [2, 3, 1], "merged": []},
                                                              {"layer": 2, "kept": [3], "merged": []}]}}])
    overlaps = compare.compare(compare.recorded(a), compare.recorded(b))
    assert [(o.sample_id, o.jaccard, o.layers, o.kept) for o in overlaps] == [
        ("t/0", 3 / 4, (1, 0), (4, 3)), ("t/1", 1 / 4, (2, None), (1, 4))]
    compare.main([str(a), str(b)])
    assert "mean 0.5000  min 0.2500 (t/1)" in capsys.readouterr().out

    c = samples_file(tmp_path / "c.jsonl", [{"id": "u/0", "selections": {"grid": grid, "layers": []}}])
    with pytest.raises(SystemExit, match="the two runs share no sample"):
        compare.main([str(a), str(c)])
    bare = samples_file(tmp_path / "bare.jsonl", [{"id": "t/0", "output": "x"}])
    with pytest.raises(SystemExit, match="has no selections on record: rerun it with record_selections=true"):
        compare.main([str(a), str(bare)])
    with pytest.raises(SystemExit, match="is neither a run directory"):
        compare.main([str(a), str(tmp_path / "nope")])


def test_analyze_from_run_draws_the_recorded_selection_without_a_model(two_runs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(analyze, "load", lambda *a: pytest.fail("from_run= must not load a model"))
    fastv, _ = two_runs
    out = analyze.run([f"from_run={fastv}", "sample_id=synthetic_vqa/1", f"output_dir={tmp_path}"])
    assert out == tmp_path / "analysis" / "tiny" / "synthetic_vqa-1_fastv_64_recorded"
    assert (out / "pruning.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "layer 2: 64 kept" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="sample_id=synthetic_vqa/7 has no selections on record"):
        analyze.run([f"from_run={fastv}", "sample_id=synthetic_vqa/7"])
    with pytest.raises(ConfigError, match="from_run= takes sample_id=, image=, name= and output_dir= only"):
        analyze.run([f"from_run={fastv}", "sample_id=synthetic_vqa/1", "method=fastv"])


@torch.no_grad()
def test_record_selections_false_leaves_them_out(tiny, images, tmp_path):
    cfg = run_config(tmp_path, "method=random", "record_selections=false")
    model = Prunebench.for_run(cfg, validate(cfg), {}, None)
    model.loaded = tiny
    (record,) = model._generate([(0, "t/0", QUESTION, {"max_new_tokens": 2}, [images[0]], {})])
    assert record["pruned"] and record["generator_seed"] == sample_seed(0, "t/0") and "selections" not in record


def test_the_options_are_checked_before_loading_and_keep_earlier_config_keys(tmp_path):
    with pytest.raises(ConfigError, match="record_selections must be true or false, got 'yes'"):
        validate(run_config(tmp_path, "method=random", "record_selections=yes"))
    assert run_module.config_key({"a": 1, "record_selections": False}) == run_module.config_key({"a": 1})
    with pytest.raises(ConfigError, match=r"valid options: k, positions, seed; \+method.generator_seed=N seeds"):
        check_overrides(["model=tiny", "method=random", "budget=64", "method.generator_seed=5"])
    check_overrides(["model=tiny", "method=sparsevlm", "budget=64", "+method.generator_seed=5"])
    assert validate(run_config(tmp_path, "method=sparsevlm", "+method.generator_seed=5")).generator_seed == 5
    assert "generator_seed" not in run_config(tmp_path, "method=sparsevlm").method  # default configs: keys unchanged


def noise(width: int, height: int):
    return noise_images([(width, height)], seed=width)[0]


@torch.no_grad()
def test_qwen_records_each_images_own_grid_in_a_ragged_batch():
    """tiny_qwen25vl: a prompt with a 100x90 image (3x4 vision tokens) and a 336 px one (8x8) beside a prompt with
    only the small one. Each recorded patch is the kept token's place on its image's own merged grid: its M-RoPE
    (h, w) positions minus the image's t position are the patch's row and column."""
    from tests.conftest import tiny_of

    qwen = tiny_of("tiny_qwen25vl")
    small, big = noise(100, 90), noise(336, 336)
    inputs = qwen.inputs([[small, big], [small]], [QUESTION, "Which one?"])
    with prune(qwen.model, RandomPruner(k=1, budget=Budget(5)), sample_ids=["two", "one"], record=True) as runtime:
        qwen.model(**inputs)
    first, second = runtime.recorder.record(0), runtime.recorder.record(1)
    assert first["grids"] == [[3, 4], [8, 8]] and second["grid"] == [3, 4] and "grids" not in second
    kept, valid = runtime.layers[1].orig_index, runtime.layers[1].valid  # the first row keeps padding slots
    for row, record, grids in ((0, first, [(3, 4), (8, 8)]), (1, second, [(3, 4)])):
        (entry,) = record["layers"]
        assert entry["layer"] == 1 and entry["merged"] == []
        is_image = inputs["input_ids"][row] == qwen.model.config.image_token_id
        ordinal = is_image.long().cumsum(0) - 1  # sequence index -> vision token (= patch) number
        tokens = [int(i) for i, real in zip(kept[row], valid[row], strict=True) if is_image[i] and real]
        assert entry["kept"] == [int(ordinal[i]) for i in tokens]
        offsets = [sum(h * w for h, w in grids[:image]) for image in range(len(grids))]
        assert [sum(o <= p < o + h * w for p in entry["kept"]) for o, (h, w) in zip(offsets, grids, strict=True)] == \
            [5] * len(grids)  # each image keeps its budget
        positions = runtime.state.positions[:, row]  # (3, n) of the kept tokens, after layer 1's drop
        current = runtime.state.orig_index[row].tolist()
        for patch, index in zip(entry["kept"], tokens, strict=True):
            image = max(i for i, o in enumerate(offsets) if o <= patch)
            t, h, w = positions[:, current.index(index)].tolist()
            assert (h - t, w - t) == divmod(patch - offsets[image], grids[image][1])


@torch.no_grad()
def test_a_ragged_qwen_batch_gives_each_sample_its_own_record(tmp_path):
    """`batch_size=2` on tiny_qwen25vl with a 336 px and a 100x90 px image: each sample's output, vision tokens per
    layer, selection record and vision-tower FLOPs are those it gets alone; both rows ran the same tokens per layer
    (the first keeps padding slots), of which each counts its own vision tokens."""
    from harness.config import compose as compose_run
    from tests.conftest import tiny_of

    cfg = compose_run(["model=tiny_qwen25vl", "method=fastv", "retain=0.25", "batch_size=2", f"output_dir={tmp_path}"])
    model = Prunebench.for_run(cfg, validate(cfg), {}, None)
    model.loaded = tiny_of("tiny_qwen25vl")
    requests = [(0, "t/0", QUESTION, {"max_new_tokens": 3}, [noise(336, 336)], {}),
                (1, "t/1", "Describe it.", {"max_new_tokens": 3}, [noise(100, 90)], {})]
    batch = model._generate(requests)
    alone = [model._generate([request])[0] for request in requests]
    assert [r["vision_tokens_per_layer"] for r in batch] == [[64, 64, 16, 16], [12, 12, 3, 3]]
    assert [r["selections"]["grid"] for r in batch] == [[8, 8], [3, 4]]
    assert batch[0]["tokens_per_layer"] == batch[1]["tokens_per_layer"]
    for together, single in zip(batch, alone, strict=True):
        for key in ("output", "vision_tokens_per_layer", "vision_tokens_unpruned", "selections"):
            assert together[key] == single[key], key
        assert together["first_token_top"]["ids"] == single["first_token_top"]["ids"]
        assert together["flops"]["prefill"]["vision"] == single["flops"]["prefill"]["vision"] > 0
    assert batch[0]["flops"]["prefill"]["vision"] > batch[1]["flops"]["prefill"]["vision"]


def assert_pre_llm_record(entry: dict, kept_patches: list[int], patches: int) -> None:
    """A pre-LLM snapshot of a reduction that keeps or merges each patch (VisionZip): its kept patches and, of each
    merged token, the one patch whose slot it takes are the tokens layer 0 runs (`kept_patches`), and together they
    stand for every one of the row's `patches`."""
    assert entry["layer"] == 0 and entry["pre_llm"] and entry["merged"]
    anchors = [set(merged) & set(kept_patches) for merged in entry["merged"]]
    assert all(len(anchor) == 1 for anchor in anchors)
    assert sorted(entry["kept"] + [anchor.pop() for anchor in anchors]) == kept_patches
    assert set(entry["kept"]).union(*map(set, entry["merged"])) == set(range(patches))


def layer0_patches(runtime, is_vision: torch.Tensor, row: int) -> list[int]:
    """The vision tokens layer 0 runs in `row`, as patch numbers (their order among the row's vision slots)."""
    ordinal = is_vision[row].long().cumsum(0) - 1
    ran = runtime.layers[0]
    return sorted(int(ordinal[i]) for i, real in zip(ran.orig_index[row], ran.valid[row], strict=True)
                  if real and is_vision[row, i])


@torch.no_grad()
def test_qwen_records_a_pre_llm_reduction_of_each_image_in_a_ragged_batch():
    """VisionZip at retain=0.25 on tiny_qwen25vl (the merger's outputs, ranked by the attention received): a prompt
    with a 3x4- and an 8x8-token image beside one with the small image only. Each row's record says, at layer 0, which
    patches stay as they are and which merge into each contextual token, exactly the tokens layer 0 runs."""
    from tests.conftest import tiny_of

    qwen = tiny_of("tiny_qwen25vl")
    small, big = noise(100, 90), noise(336, 336)
    inputs = qwen.inputs([[small, big], [small]], [QUESTION, "Which one?"])
    pruner = VisionZip(budget=Budget(retain=0.25))
    with prune(qwen.model, pruner, sample_ids=["two", "one"], record=True) as runtime:
        qwen.model(**inputs)
    is_vision = inputs["input_ids"] == qwen.model.config.image_token_id
    for row, patches in ((0, 12 + 64), (1, 12)):
        (entry,) = runtime.recorder.record(row)["layers"]
        kept = layer0_patches(runtime, is_vision, row)
        assert len(kept) == (3 + 16 if row == 0 else 3)  # round(V / 4) of each image
        assert_pre_llm_record(entry, kept, patches)
