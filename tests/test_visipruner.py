"""VisiPruner: each rule on hand-built tensors, and a whole run against its attention-mask reference."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from harness.cost import returned_cache
from harness.runtime import ProbeResult, PruneState, prune
from methods import ConfigError, VisiPruner
from methods.visipruner import FAMILY_RULES
from tests.conftest import noise_images, tiny_model, tiny_of
from tests.test_runtime import hide_keys_from

# ---------------------------------------------------------------------- hand-built tensors
N, V0, V1 = 10, 2, 6  # a 10-token sequence with vision tokens at 2..5 and text after them


def state(num_layers: int = 32) -> PruneState:
    is_vision = torch.zeros(1, N, dtype=torch.bool)
    is_vision[0, V0:V1] = True
    return PruneState(num_layers=num_layers, sample_ids=["s"], orig_index=torch.arange(N)[None], is_vision=is_vision,
                      valid=torch.ones(1, N, dtype=torch.bool), positions=torch.arange(N)[None])


def causal_probs(heads: int = 2) -> torch.Tensor:
    scores = torch.randn(1, heads, N, N, generator=torch.Generator().manual_seed(0))
    return scores.masked_fill(~torch.ones(N, N, dtype=torch.bool).tril(), float("-inf")).softmax(-1)


def begun(**options) -> tuple[VisiPruner, PruneState]:
    pruner, st = VisiPruner(**options), state()
    pruner.begin(st)
    return pruner, st


def test_layer0_7b_rule_moves_text_to_vision_mass_onto_the_first_patch():
    pruner, st = begun()
    probs = causal_probs()
    edited = pruner.attention_edit(0, st)(probs, st)
    text, vision = slice(V1, N), slice(V0, V1)
    assert torch.allclose(edited[:, :, text].sum(-1), probs[:, :, text].sum(-1))  # text rows keep their row sums
    assert torch.allclose(edited[:, :, text, V0], probs[:, :, text, vision].sum(-1))  # all of it on patch 0
    assert (edited[:, :, text, V0 + 1:V1] == 0).all()
    assert (edited[:, :, vision, vision] == 0).all()  # vision rows lose their vision mass, not renormalised
    assert torch.allclose(edited[:, :, vision].sum(-1), probs[:, :, vision, :V0].sum(-1))
    assert torch.equal(edited[:, :, :V0], probs[:, :, :V0])  # the system prompt is untouched


def test_layer0_13b_rule_and_later_shallow_layers():
    pruner, st = begun(layer0_rule="13b")
    probs = causal_probs()
    edited = pruner.attention_edit(0, st)(probs, st)
    half = V0 + (V1 - V0) // 2
    assert (edited[:, :, V0:V1, V0:V1] == 0).all()
    assert (edited[:, :, V1:, V0:half] == 0).all()
    assert torch.equal(edited[:, :, V1:, half:V1], probs[:, :, V1:, half:V1])  # no merge in the 13B rule

    later = pruner.attention_edit(3, st)(probs, st)
    assert (later[:, :, V1:, V0:V1] == 0).all()
    assert torch.equal(later[:, :, V0:V1, V0:V1], probs[:, :, V0:V1, V0:V1])  # code: vision self-attention kept
    assert pruner.attention_edit(6, st) is None  # layers >= shallow_mid_layer are not edited

    paper, st = begun(variant="paper")
    assert (paper.attention_edit(3, st)(probs, st)[:, :, V0:V1, V0:V1] == 0).all()  # paper: removed as well


def test_shallow_mid_layer_is_the_references_6_on_llava_depths_and_scaled_elsewhere():
    assert [VisiPruner().mid_layer(n) for n in (32, 40, 16, 8)] == [6, 6, 3, 2]
    assert VisiPruner(shallow_mid_layer=5).mid_layer(8) == 5  # a set S is used as set
    pruner, st = begun()
    assert pruner.shallow_end == 6 and pruner.attention_edit(5, st) is not None
    pruner.begin(state(8))
    assert pruner.shallow_end == 2 and pruner.attention_edit(1, st) is not None and pruner.attention_edit(2, st) is None
    with pytest.raises(ConfigError, match="shallow_mid_layer"):
        VisiPruner(shallow_mid_layer=8).validate(num_vision=576, num_layers=8)


def probe_with(contributions: torch.Tensor, rest: torch.Tensor) -> ProbeResult:
    """A last-query probe whose weight x value per vision token is `contributions` (V, D) for one head, with the
    non-vision keys contributing `rest` (D,) in total."""
    weights = torch.zeros(1, 1, 1, N)
    values = torch.zeros(1, 1, N, contributions.shape[1])
    weights[0, 0, 0, V0:V1] = 0.5
    values[0, 0, V0:V1] = contributions / 0.5
    weights[0, 0, 0, 0] = 1.0
    values[0, 0, 0] = rest
    output = (weights[:, :, 0] @ values)[:, None].flatten(2)  # the attention output row the layer would produce
    return ProbeResult(torch.tensor([[N - 1]]), weights, values, output)


def test_middle_stage_keeps_exactly_the_tokens_with_large_contributions():
    pruner, st = begun()
    small = torch.full((V1 - V0, 2), 0.01)
    big = small.clone()
    big[1] = torch.tensor([0.5, -0.3])  # vision token 1 (sequence index 3) matters
    big[3] = torch.tensor([0.0, 0.4])  # and vision token 3
    st.probes[7] = probe_with(big, torch.tensor([1.0, 1.0]))
    cosine, distance = pruner.contributions(st.probes[7], st.vision_index[0])
    assert torch.allclose(distance, big.norm(dim=-1), atol=1e-6)
    assert (cosine[[1, 3]] < 0.995).all() and (cosine[[0, 2]] > 0.995).all()
    selection = pruner.select(8, st)
    assert selection.keep.tolist() == [[1, 3]]
    assert (pruner.filter_layer, pruner.kept) == (7, 2)


def test_middle_stage_may_keep_no_token_or_find_no_layer():
    pruner, st = begun(tokens_threshold=0.9)
    big = torch.full((V1 - V0, 2), 0.01)
    big[0] = torch.tensor([0.5, -0.5])  # drops the cosine, but its norm 0.71 is under 0.9
    st.probes[7] = probe_with(big, torch.tensor([1.0, 1.0]))
    assert pruner.select(8, st).keep.shape == (1, 0)
    assert (pruner.filter_layer, pruner.kept) == (7, 0)

    pruner, st = begun()
    for layer in range(7, 31):  # every token negligible in every layer: no filtering layer
        st.probes[layer] = probe_with(torch.full((V1 - V0, 2), 1e-4), torch.tensor([1.0, 1.0]))
        assert pruner.select(layer + 1, st) is None
    assert pruner.filter_layer is None
    assert pruner.probe(6, st) is None and pruner.probe(7, st) is not None  # detection starts after S, strictly


@pytest.mark.parametrize(("variant", "exit_layer"), [("code", 12), ("paper", 13)])
def test_exit_counts_qualifying_layers_not_necessarily_consecutive(variant, exit_layer):
    pruner, st = begun(variant=variant)
    pruner.filter_layer, pruner.kept = 7, 4
    calm = torch.full((V1 - V0, 2), 1e-4)  # all cos >= 0.999: the layer qualifies
    loud = calm.clone()
    loud[0] = torch.tensor([0.3, -0.3])
    sequence = {8: calm, 9: loud, 10: loud, 11: calm, 12: calm}  # code: 8 and 11 -> exit at 12; paper: 11, 12 -> 13
    for layer in range(8, 13):
        st.probes[layer] = probe_with(sequence[layer], torch.tensor([1.0, 1.0]))
        selection = pruner.select(layer + 1, st)
        if layer + 1 == exit_layer:
            assert selection.keep.shape == (1, 0)
        else:
            assert selection is None
    assert pruner.exit_layer == exit_layer


@pytest.mark.parametrize(("options", "message"), [
    ({"mode": ["shallow", "late"]}, "mode must be a non-empty subset"),
    ({"layer_threshold": 1.5}, "layer_threshold must be in (0, 1)"),
    ({"variant": "blog"}, "variant must be one of code, paper"),
    ({"layer0_rule": "70b"}, "layer0_rule must be one of auto, 7b, 13b"),
])
def test_bad_options_are_refused(options, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        VisiPruner(**options)


# ---------------------------------------------------------------------- a whole run on the tiny model
# The random-weight tiny model spreads attention almost uniformly (cosines ~0.999996, contribution norms ~0.002),
# so the thresholds sit inside that range to make every stage fire: f = 2, about 60 tokens kept, exit at layer 5.
OPTIONS = dict(shallow_mid_layer=1, layer_threshold=0.999998, tokens_threshold=0.0019, exit_threshold=0.9999)


class MaskedVisiPruner(VisiPruner):
    """The same decisions, applied by hiding tokens from attention instead of dropping them."""

    def begin(self, state):
        super().begin(state)
        self.visible = state.is_vision.clone()  # vision tokens still visible
        self.hidden_at: dict[int, torch.Tensor] = {}  # layer -> (1, N) keys hidden in that layer

    def select(self, layer, state):
        view = dataclasses.replace(state, is_vision=self.visible)  # decide over the visible vision tokens only
        selection = super().select(layer, view)
        if selection is not None:
            visible = torch.zeros_like(self.visible)
            visible[0, view.vision_index[0, selection.keep[0]]] = True
            self.visible = visible
        self.hidden_at[layer] = state.is_vision & ~self.visible
        return None


@pytest.fixture(scope="module")
def deep_tiny():
    return tiny_model(num_layers=8)


@torch.no_grad()
def test_run_equals_its_attention_mask_reference(deep_tiny, images):
    model = deep_tiny.model
    inputs = deep_tiny.inputs(images[:1], ["What is in the image?"])
    n = inputs["input_ids"].shape[1]
    pruner = VisiPruner(**OPTIONS)
    with prune(model, pruner, sample_ids=["s"]) as runtime:
        out = model(**inputs, use_cache=True)
        tokens = model.generate(**inputs, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    f, kept, exit_layer = pruner.filter_layer, pruner.kept, pruner.exit_layer
    assert f == 2 and 0 < kept < 576 and exit_layer == 5, (f, kept, exit_layer)
    assert runtime.vision_tokens_per_layer()[0].tolist() == [576] * (f + 1) + [kept] * (exit_layer - f - 1) + [0] * 3
    lengths = [layer.keys.shape[2] for layer in returned_cache(out).layers]
    assert lengths == [n] * (f + 1) + [n - 576 + kept] * (exit_layer - f - 1) + [n - 576] * 3
    survivors = runtime.layers[-1].orig_index[0]

    reference_pruner = MaskedVisiPruner(**OPTIONS)
    with prune(model, reference_pruner, sample_ids=["s"]), hide_keys_from(
            model, lambda layer: reference_pruner.hidden_at.get(layer)):  # begin() makes a new dict per prefill
        reference = model(**inputs).logits
        reference_tokens = model.generate(**inputs, max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert (reference_pruner.filter_layer, reference_pruner.kept, reference_pruner.exit_layer) == (f, kept, exit_layer)
    assert (out.logits[0] - reference[0, survivors]).abs().max() <= 1e-4
    assert torch.equal(tokens, reference_tokens)


@torch.no_grad()
def test_end_records_a_filtering_layer_found_at_the_last_layer():
    pruner, st = begun()
    big = torch.full((V1 - V0, 2), 0.01)
    big[2] = torch.tensor([0.5, -0.3])
    st.probes[31] = probe_with(big, torch.tensor([1.0, 1.0]))
    pruner.end(st)
    assert (pruner.filter_layer, pruner.kept, pruner.exit_layer) == (31, 1, None)


@torch.no_grad()
def test_probes_carry_the_layers_own_attention_output(deep_tiny, images):
    """O is the layer's own output row (pre-o_proj), not a recomputation: scoring matches the reference bit for bit."""
    model = deep_tiny.model
    inputs = deep_tiny.inputs(images[:1], ["What is in the image?"])
    captured = {}
    o_proj = model.model.language_model.layers[3].self_attn.o_proj
    handle = o_proj.register_forward_pre_hook(lambda module, args: captured.setdefault("o_input", args[0]))
    pruner = VisiPruner(**{**OPTIONS, "mode": ("middle",), "layer_threshold": 1e-9})  # probes every layer > S
    try:
        with prune(model, pruner) as runtime:
            model(**inputs)
            assert model.config.text_config._attn_implementation == "prunebench_eager"
    finally:
        handle.remove()
    assert torch.equal(runtime.state.probes[3].output[0, -1], captured["o_input"][0, -1])
    assert model.config.text_config._attn_implementation == "sdpa"


def test_paper_variant_removes_shallow_vision_from_the_cache(deep_tiny, images):
    model = deep_tiny.model
    inputs = deep_tiny.inputs(images[:1], ["What is in the image?"])
    n = inputs["input_ids"].shape[1]
    pruner = VisiPruner(**OPTIONS, variant="paper")
    with prune(model, pruner, sample_ids=["s"]):
        out = model(**inputs, use_cache=True)
        generated = model.generate(**inputs, max_new_tokens=5, min_new_tokens=5, do_sample=False,
                                   return_dict_in_generate=True)
    assert returned_cache(out).layers[0].keys.shape[2] == n - 576  # shallow layer 0 (S=1): no vision K/V
    assert returned_cache(out).layers[1].keys.shape[2] == n
    assert generated.sequences.shape[1] == n + 5


# ---------------------------------------------------------------------- Qwen (docs/models-qwen-rest.md)
def test_the_qwen_rule_places_s_at_qwen2_vl_7bs_depth():
    """S = 5 of Qwen2-VL-7B's 28 layers (LLaVA-7B's 6 of 32), scaled from 28 on other depths: 14 layers give 2
    where LLaVA's rule gives 3; every Qwen family uses it; the layer-0 rule is the 7B one at every depth."""
    assert [VisiPruner().mid_layer(n, "qwen2_vl") for n in (28, 14, 36, 4)] == [5, 2, 6, 1]
    assert VisiPruner().mid_layer(14) == 3 and FAMILY_RULES["llava"].layer0_rule(40) == "13b"
    assert FAMILY_RULES["qwen2_vl"] is FAMILY_RULES["qwen2_5_vl"] is FAMILY_RULES["qwen3_vl"]
    assert FAMILY_RULES["qwen2_vl"].layer0_rule(40) == "7b"


@torch.no_grad()
def test_the_qwen_rule_is_what_runs_on_tiny_qwen2vl():
    """On an 8-layer tiny_qwen2vl, with two images of different sizes in one prompt: S = 1 (5 of 28 scaled; LLaVA's
    rule would give 2), the 7B rule, and one sink per image, its first patch; layer 0 merges each image's text mass
    onto its own sink, and shallow layers leave the vision_start/end markers and the other image's vision rows
    alone."""
    qwen = tiny_of("tiny_qwen2vl", num_layers=8)
    pictures = noise_images([(100, 90), (168, 112)], seed=0)  # 12 and 24 vision tokens
    inputs = qwen.inputs([pictures], ["Which picture is brighter?"])
    pruner = VisiPruner()
    with prune(qwen.model, pruner, sample_ids=["s"]) as runtime:
        qwen.model(**inputs)
    (a0, a1), (b0, b1) = spans = qwen.adapter.image_spans(qwen.model, inputs["input_ids"])[0]
    assert (a1 - a0, b1 - b0) == (12, 24) and b0 > a1 + 1  # markers and text between the images
    assert (pruner.spans, pruner.sinks, pruner.shallow_end, pruner.rule) == (spans, [0, 0], 1, "7b")
    assert pruner.filter_layer is None or pruner.filter_layer > 1
    assert runtime.vision_tokens_per_layer()[0, :3].tolist() == [36] * 3  # nothing drops before detection starts

    n = inputs["input_ids"].shape[1]
    scores = torch.randn(1, 2, n, n, generator=torch.Generator().manual_seed(0))
    probs = scores.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf")).softmax(-1)
    edited = pruner._shallow_edit(0, probs)
    between, after = slice(a1, b0), slice(b1, n)  # text rows after the first image, and after the second
    for rows in (between, after):
        assert torch.allclose(edited[:, :, rows, a0], probs[:, :, rows, a0:a1].sum(-1))
        assert (edited[:, :, rows, a0 + 1:a1] == 0).all()
    assert torch.allclose(edited[:, :, after, b0], probs[:, :, after, b0:b1].sum(-1))
    assert (edited[:, :, b0:b1, a0:a1] == 0).all()  # vision rows lose every vision key at layer 0
    for marker in (a0 - 1, a1, b0 - 1, b1):  # vision_start / vision_end: text keys, untouched
        assert torch.equal(edited[..., marker], probs[..., marker])
    later = pruner._shallow_edit(1, probs)
    assert (later[:, :, between, a0:a1] == 0).all() and (later[:, :, after, a0:a1] == 0).all()
    assert (later[:, :, after, b0:b1] == 0).all()
    assert torch.equal(later[:, :, b0:b1, a0:a1], probs[:, :, b0:b1, a0:a1])  # code: vision rows keep vision keys
