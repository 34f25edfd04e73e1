"""`python -m harness.analyze`: what one prompt does inside the model, layer by layer, as figures and numbers.

    python -m harness.analyze model=llava7b image=cat.jpg question="What is the cat doing?"
    python -m harness.analyze model=tiny sample=synthetic:12 method=fastv budget=64 layers=4,8,12

The analyses of the VisiPruner paper's notebooks (`../shared/reference/visipruner.md` §5), on the unpruned model,
for the last prompt token (the query every importance decision reads), without their bugs:

- logit lens: `lm_head(final_norm(h_l))` of each layer's output h_l, the final norm applied exactly once (HF's last
  `hidden_states` entry is already normed; the notebook normed it twice and left the one before it unnormed);
- value-output projection: the token's own value vector of each head through that head's slice of o_proj, then the
  final norm and lm_head, with the values taken from the prefill (the notebook read the cache after generation, so
  its last position was a generated token);
- attention to the image: the token's attention row over the vision grid, averaged over heads, and its total mass;
- sinks and value norms: each vision token's value L1 norm (per head over head_dim, summed over key/value heads)
  against the attention it receives; sinks = attention above the layer's 99th percentile and norm below its median;
- the three stages: per layer the vision attention mass, VisiPruner's largest single-token cosine drop
  1 - min_j cos(O - c_j, O), and, with `method=...`, the vision tokens entering each layer under that method;
- pruning explained (with `method=...`): the method's selection record (`harness.records`) on the image, one panel
  per layer where its vision tokens change: patches kept, merged into other tokens, dropped; pre-LLM methods too.

`from_run=RUN sample_id=ID` draws a finished run's recorded selections of one sample the same way, without a model.

Where an image's vision tokens form several grids (LLaVA-NeXT/OneVision: the base view and the unpadded crop grid;
InternVL: each tile and the thumbnail; `harness.records`' views), the attention and pruning maps draw one panel per
grid, over the part of the image it sees; image-newline slots are no vision tokens and are not drawn (the report
gives their number).

Attention rows and values come from the pruning runtime's probes: the model keeps its sdpa backend. Everything is
written to `<output_dir>/analysis/<model>/<name>/` (PNGs and analysis.json).
"""

from __future__ import annotations

import io
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from PIL import Image, ImageOps

from harness.adapters.internvl import tile_canvas
from harness.config import CONF_DIR, check_overrides, compose, validate
from harness.evaluate import ROOT
from harness.models import LoadedModel, load
from harness.records import recorded, samples_path, view_entries, views_of
from harness.results import STARTED
from harness.runtime import ProbeResult, prune
from methods import ConfigError, Probe, TokenPruner, VisiPruner

USAGE = """usage: python -m harness.analyze [model=...] [image=PATH question=TEXT | sample=TASK:INDEX [question=TEXT]]
                                  [method=... budget=N ...] [layers=L1,L2,...] [topk=K] [name=NAME]
       python -m harness.analyze from_run=RUN_DIR|SAMPLES_JSONL sample_id=ID [image=PATH] [output_dir=DIR]
With no image= or sample=, the first question of the configured task (by default synthetic:0, on the default model
and method, as `python -m harness` runs them). Any other key=value is a prunebench config override (model.*,
method.*, device, output_dir). With from_run= the recorded selections of one sample are drawn (pruning.png) without
loading a model; the image is read from the run's local task unless image= gives it."""
ANALYSIS_KEYS = ("image", "question", "sample", "layers", "topk", "name", "from_run", "sample_id")
RECORD_PATCH_PIXELS = 14  # a recorded grid is drawn at LLaVA-1.5's crop size (24 patches of 14 pixels: 336)
VIEW_PIXELS = 336  # the longer side of each view's part of the image, as drawn
SINK_ATTENTION_QUANTILE = 0.99  # a sink receives more attention than 99% of the layer's vision tokens ...
SINK_NORM_QUANTILE = 0.5  # ... while its value L1 norm is below the layer's median
SINK_RULE = "attention above the layer's 99th percentile of vision attention and value L1 norm below its median"


class LastTokenProbe(TokenPruner):
    """Prunes nothing; records, in every layer, the last prompt token's attention row and the layer's values."""

    def probe(self, layer: int, state) -> Probe:
        return Probe(queries=state.last_query, values=True)


@dataclass
class Request:
    image: Image.Image
    question: str
    source: str  # the image path or the task sample id
    name: str  # the output directory's name
    layers: list[int]  # layers of the value-output projection
    topk: int


@dataclass
class Insight:
    """The numbers of one prompt (batch row 0, float32 on the CPU)."""

    input_ids: torch.Tensor  # (n,)
    vision_start: int  # sequence index of the first vision token
    lens_probs: torch.Tensor  # (L, k) logit lens: top-k probabilities of the next token after each layer
    lens_ids: torch.Tensor  # (L, k)
    value_probs: torch.Tensor  # (len(layers), H, k) value-output projection per head
    value_ids: torch.Tensor
    vision_attention: torch.Tensor  # (L, V) the last token's attention on each vision token, mean over heads
    value_norms: torch.Tensor  # (L, V) L1 norm of each vision token's value vector
    sinks: list[torch.Tensor]  # per layer, the vision tokens (0..V-1) that are sinks
    cosine_drop: torch.Tensor  # (L,) 1 - min_j cos(O - c_j, O) over vision tokens j
    drop_token: torch.Tensor  # (L,) the vision token j of that minimum
    grid: tuple[int, int] | None  # the image's vision-token grid (rows, columns): V = rows * columns, row-major
    views: list[dict] | None = None  # instead of `grid`, where the image has several grids (`harness.records`' views)
    vision_tokens: list[int] | None = None  # with a method: vision tokens entering each layer
    selections: dict | None = None  # with a method: its selection record (`harness.records`)
    newline_slots: int = 0  # LLaVA-NeXT/OneVision's image-newline slots: no vision tokens, kept like text

    @property
    def grids(self) -> list[dict]:
        """The image's grids as `harness.records` lists views: the one grid, or each view."""
        return self.views or views_of({"grid": list(self.grid)})

    @property
    def kept_patches(self) -> dict[int, list[int]]:
        """Layer -> patches (0..V-1) kept as themselves, wherever the method changes the vision tokens."""
        return {e["layer"]: e["kept"] for e in self.selections["layers"] if not e.get("cache")}

    @property
    def vision_attention_mass(self) -> torch.Tensor:
        return self.vision_attention.sum(-1)


# ---------------------------------------------------------------------------------------------------- numbers
def dense_pass(loaded: LoadedModel, inputs: dict) -> tuple[tuple[torch.Tensor, ...], dict[int, ProbeResult]]:
    """One unpruned prefill: HF's hidden states and every layer's probe of the last prompt token."""
    with prune(loaded.model, LastTokenProbe()) as runtime:
        output = loaded.model(**inputs, output_hidden_states=True, logits_to_keep=1)
    return output.hidden_states, runtime.state.probes


def logit_lens(model, hidden_states: tuple[torch.Tensor, ...], topk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, k) top-k next-token probabilities and ids from each layer's output at the last prompt token."""
    outputs = torch.stack([h[0, -1] for h in hidden_states[1:]])  # index 0 holds the embeddings
    # HF's last entry is the model's final output, already normed: the final norm goes on every other layer, once.
    normed = torch.cat([model.model.language_model.norm(outputs[:-1]), outputs[-1:]])
    return model.lm_head(normed).float().softmax(-1).topk(topk)


def value_output(model, probes: dict[int, ProbeResult], layers: list[int], topk: int):
    """(len(layers), H, k) top-k tokens of each head's value of the last prompt token through its o_proj slice."""
    language_model = model.model.language_model
    probs, ids = [], []
    for layer in layers:
        values = probes[layer].values[0, :, -1]  # (H, D): the last prompt token's own value, per query head
        o_proj = language_model.layers[layer].self_attn.o_proj.weight  # (d, H*D), head h's slice at h*D:(h+1)*D
        per_head = torch.einsum("dhk,hk->hd", o_proj.view(o_proj.shape[0], *values.shape), values)
        top = model.lm_head(language_model.norm(per_head)).float().softmax(-1).topk(topk)
        probs.append(top.values)
        ids.append(top.indices)
    return torch.stack(probs), torch.stack(ids)


def vision_attention(probes: dict[int, ProbeResult], vision: torch.Tensor) -> torch.Tensor:
    """(L, V) the last prompt token's post-softmax attention on each vision token, averaged over heads."""
    return torch.stack([probes[layer].attention[0, :, -1, vision].float().mean(0) for layer in sorted(probes)])


def value_norms(probes: dict[int, ProbeResult], vision: torch.Tensor, kv_groups: int) -> torch.Tensor:
    """(L, V) L1 norm of each vision token's value: per head over head_dim, summed over the key/value heads (the
    probe repeats each of them `kv_groups` times for the query heads; they are counted once)."""
    return torch.stack([probes[layer].values[0, ::kv_groups, vision].float().abs().sum(-1).sum(0)
                        for layer in sorted(probes)])


def find_sinks(attention: torch.Tensor, norms: torch.Tensor) -> list[torch.Tensor]:
    """Per layer, the vision tokens that draw attention without carrying value (`SINK_RULE`)."""
    high = attention > attention.quantile(SINK_ATTENTION_QUANTILE, dim=-1, keepdim=True)
    low = norms < norms.quantile(SINK_NORM_QUANTILE, dim=-1, keepdim=True)
    return [row.nonzero()[:, 0] for row in high & low]


def cosine_drops(probes: dict[int, ProbeResult], vision: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(L,) VisiPruner's largest single-token cosine drop of the last token's attention output, and its token.
    Computed in float64: where attention is spread thin the drops fall to ~1e-6, float32's resolution near 1 (the
    method itself computes in the model's dtype)."""
    scorer = VisiPruner()  # score_dtype "model": the probe's dtype
    cosines = []
    for layer in sorted(probes):
        probe = probes[layer]
        exact = ProbeResult(probe.queries, probe.attention.double(), probe.values.double(), probe.output.double())
        cosines.append(scorer.contributions(exact, vision)[0])
    lowest = torch.stack(cosines).min(dim=-1)
    return 1 - lowest.values, lowest.indices


def method_pass(loaded: LoadedModel, inputs: dict, pruner: TokenPruner, sample_id: str,
                question: str) -> tuple[list[int], dict]:
    """The method's prefill: vision tokens entering each layer, and its selection record (pre-LLM reductions and
    merges included)."""
    with prune(loaded.model, pruner, sample_ids=[sample_id], record=True, questions=[question]) as runtime:
        loaded.model(**inputs)
    return runtime.vision_tokens_per_layer()[0].tolist(), runtime.recorder.record(0)


@torch.no_grad()
def analyze(loaded: LoadedModel, request: Request, pruner: TokenPruner | None) -> Insight:
    inputs = loaded.inputs([request.image], [request.question])
    vision = loaded.adapter.vision_mask(loaded.model, inputs["input_ids"], inputs)[0].nonzero()[:, 0]
    hidden_states, probes = dense_pass(loaded, inputs)
    text_config = loaded.model.config.text_config
    lens = logit_lens(loaded.model, hidden_states, request.topk)
    value_probs, value_ids = value_output(loaded.model, probes, request.layers, request.topk)
    attention = vision_attention(probes, vision).cpu()
    norms = value_norms(probes, vision, text_config.num_attention_heads // text_config.num_key_value_heads).cpu()
    drop, drop_token = cosine_drops(probes, vision)
    views = loaded.adapter.token_views(loaded.model, inputs)
    side = math.isqrt(len(vision))  # a fixed-resolution model's square grid, else the image's own (Qwen)
    grid = None if views else (loaded.adapter.token_grids(loaded.model, inputs) or [(side, side)])[0]
    insight = Insight(
        input_ids=inputs["input_ids"][0].cpu(), vision_start=int(vision[0]), lens_probs=lens.values.cpu(),
        lens_ids=lens.indices.cpu(), value_probs=value_probs.cpu(), value_ids=value_ids.cpu(),
        vision_attention=attention, value_norms=norms, sinks=find_sinks(attention, norms),
        cosine_drop=drop.float().cpu(), drop_token=drop_token.cpu(), grid=grid,
        views=view_entries(views[0]) if views else None,
        newline_slots=int(loaded.adapter.newline_mask(loaded.model, inputs["input_ids"], inputs)[0].sum()),
    )
    if pruner is not None:
        insight.vision_tokens, insight.selections = method_pass(loaded, inputs, pruner, request.source,
                                                                  request.question)
    return insight


# ---------------------------------------------------------------------------------------------------- report
def token_text(tokenizer, token_id: int) -> str:
    return tokenizer.decode([token_id])


def top_tokens(tokenizer, probs: torch.Tensor, ids: torch.Tensor) -> list[dict]:
    return [{"token": token_text(tokenizer, int(i)), "id": int(i), "p": float(p)}
            for p, i in zip(probs, ids, strict=True)]


def report(insight: Insight, loaded: LoadedModel, request: Request, method: dict | None) -> dict:
    tokenizer = loaded.processor.tokenizer
    lens = zip(insight.lens_probs, insight.lens_ids, strict=True)
    values = zip(request.layers, insight.value_probs, insight.value_ids, strict=True)
    result = {
        "model": loaded.name,
        "input": {"source": request.source, "question": request.question,
                  "last_token": token_text(tokenizer, int(insight.input_ids[-1])),
                  "tokens": len(insight.input_ids), "vision_start": insight.vision_start,
                  "vision_tokens": insight.vision_attention.shape[1],
                  **({"views": insight.views} if insight.views else {"grid": list(insight.grid)}),
                  **({"newline_slots": insight.newline_slots} if insight.newline_slots else {})},
        "method": method,
        "logit_lens": [{"layer": layer, "top": top_tokens(tokenizer, p, i)} for layer, (p, i) in enumerate(lens)],
        "value_output": [{"layer": layer, "heads": [top_tokens(tokenizer, p, i) for p, i in zip(probs, ids,
                                                                                                   strict=True)]}
                         for layer, probs, ids in values],
        "vision_attention": {"mass": insight.vision_attention_mass.tolist(),
                             "tokens": insight.vision_attention.tolist()},
        "value_l1_norms": insight.value_norms.tolist(),
        "sinks": {"rule": SINK_RULE, "tokens": [s.tolist() for s in insight.sinks]},
        "cosine_drop": {"max": insight.cosine_drop.tolist(), "token": insight.drop_token.tolist(),
                        "visipruner_layer_threshold": VisiPruner.layer_threshold},
    }
    if method is not None:
        result["pruning"] = {"vision_tokens_per_layer": insight.vision_tokens, "kept_patches": insight.kept_patches,
                             "selections": insight.selections}
    return result


def lens_table(result: dict) -> str:
    lines = [f"logit lens of the last prompt token {result['input']['last_token']!r}: top next tokens after each "
             "layer (probability)"]
    for row in result["logit_lens"]:
        cells = "  ".join(f"{t['token']!r:>8} {t['p']:.3f}" for t in row["top"])
        lines.append(f"  layer {row['layer']:>2}  {cells}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panel_grid(count: int, width: float, height: float | None = None, cols: int | None = None):
    """A near-square grid of `count` panels (`cols` columns if given); the spare ones hidden."""
    cols = min(count, cols or math.ceil(math.sqrt(count)))
    rows = math.ceil(count / cols)
    fig, axes = _pyplot().subplots(rows, cols, figsize=(width * cols, (height or width) * rows + 0.5), squeeze=False,
                                   layout="constrained")
    for ax in axes.flat[count:]:
        ax.axis("off")
    return fig, axes.flat


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=100, bbox_inches="tight")
    _pyplot().close(fig)
    return path


def draw_token_table(ax, rows: list[list[dict]], labels: list[str], title: str) -> None:
    """Rows of top-k tokens: each cell the token, its shade the probability."""
    probs = [[t["p"] for t in row] for row in rows]
    ax.imshow(probs, cmap="Blues", vmin=0, vmax=1, aspect="auto")
    for r, row in enumerate(rows):
        for c, token in enumerate(row):
            ax.text(c, r, f"{token['token']!r}\n{token['p']:.3f}", ha="center", va="center", fontsize=7,
                    parse_math=False, color="white" if token["p"] > 0.6 else "black")
    ax.set_xticks(range(len(rows[0])), [f"top {c + 1}" for c in range(len(rows[0]))], fontsize=7)
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.set_title(title, fontsize=9)


def plot_logit_lens(result: dict, path: Path) -> Path:
    rows = [row["top"] for row in result["logit_lens"]]
    fig, ax = _pyplot().subplots(figsize=(1.1 * len(rows[0]) + 1, 0.35 * len(rows) + 1), layout="constrained")
    draw_token_table(ax, rows, [f"layer {r['layer']}" for r in result["logit_lens"]],
                     f"Logit lens: next token after each layer, at {result['input']['last_token']!r}")
    return _save(fig, path)


def plot_value_output(result: dict, path: Path) -> Path:
    layers = result["value_output"]
    heads = len(layers[0]["heads"])
    fig, axes = _panel_grid(len(layers), width=1.1 * len(layers[0]["heads"][0]) + 1, height=0.35 * heads + 0.6, cols=2)
    for ax, layer in zip(axes, layers, strict=False):
        draw_token_table(ax, layer["heads"], [f"head {h}" for h in range(heads)],
                         f"Layer {layer['layer']}: value of the last token through o_proj")
    return _save(fig, path)


def _overlay(ax, image: Image.Image, grid: torch.Tensor, **imshow) -> None:
    extent = (0, image.width, image.height, 0)
    ax.imshow(image, extent=extent)
    ax.imshow(grid, extent=extent, interpolation="nearest", **imshow)
    ax.set_xticks([])
    ax.set_yticks([])


def view_label(view: dict, views: list[dict]) -> str:
    """`base view`, `crops`, `tile 3`, `thumbnail`; with the image's number where a record holds several."""
    label = {"base": "base view", "tile": f"tile {view.get('tile')}"}.get(view["view"], view["view"])
    return label if views[-1]["image"] == 0 else f"image {view['image']} {label}"


def _view_panels(rows: int, views: list[dict], width: float):
    """`rows` x one panel per view (the `_panel_grid` of `rows` panels where there is one view), row by row."""
    return _panel_grid(rows * len(views), width=width, cols=len(views) if len(views) > 1 else None)


def plot_attention(insight: Insight, image: Image.Image, path: Path) -> Path:
    """Per layer, the attention map on each of the image's grids, coloured from the layer's min to max over all its
    vision tokens; `image`: as `processed_image` gives it."""
    views = insight.grids
    images = view_images(image, views)
    fig, axes = _view_panels(len(insight.vision_attention), views, width=1.6)
    axes = iter(axes)
    for layer, row in enumerate(insight.vision_attention.numpy()):
        for view, image in zip(views, images, strict=True):
            (rows, columns), first = view["grid"], view["first"]
            cells = row[first:first + rows * columns]
            ax = next(axes)
            _overlay(ax, image, cells.reshape(rows, columns), cmap="jet", alpha=0.55, vmin=row.min(), vmax=row.max())
            where = f"layer {layer}" if len(views) == 1 else f"layer {layer}, {view_label(view, views)}"
            ax.set_title(f"{where}: {cells.sum():.2f}", fontsize=8)
    mass = "total mass on the image" if len(views) == 1 else "mass on that grid"
    fig.suptitle(f"Last token's attention on the image, mean over heads\n(colour: each layer's min to max; "
                 f"title: {mass})", fontsize=9)
    return _save(fig, path)


def plot_sinks(insight: Insight, path: Path) -> Path:
    fig, axes = _panel_grid(len(insight.value_norms), width=2.0)
    for layer, ax in zip(range(len(insight.value_norms)), axes, strict=False):
        norms, attention = insight.value_norms[layer].numpy(), insight.vision_attention[layer].numpy()
        sinks = insight.sinks[layer].numpy()
        ax.scatter(norms, attention, s=3, c="0.6", linewidths=0)
        ax.scatter(norms[sinks], attention[sinks], s=12, c="red", linewidths=0)
        ax.axhline(np.quantile(attention, SINK_ATTENTION_QUANTILE), color="red", lw=0.5, ls="--")
        ax.axvline(np.quantile(norms, SINK_NORM_QUANTILE), color="red", lw=0.5, ls="--")
        ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        ax.locator_params(nbins=4)
        ax.tick_params(labelsize=6)
        ax.yaxis.get_offset_text().set_fontsize(6)
        ax.set_title(f"layer {layer}: {len(sinks)} sinks", fontsize=8)
    fig.supxlabel("value L1 norm of the vision token", fontsize=9)
    fig.supylabel("attention it receives from the last token", fontsize=9)
    fig.suptitle(f"Sinks (red): {SINK_RULE}", fontsize=9)
    return _save(fig, path)


def plot_stages(insight: Insight, method: dict | None, path: Path) -> Path:
    layers = range(len(insight.cosine_drop))
    panels = 3 if method is not None else 2
    fig, axes = _pyplot().subplots(panels, 1, figsize=(7, 1.9 * panels + 0.3), sharex=True, layout="constrained")
    axes[0].plot(layers, insight.vision_attention_mass.numpy(), marker="o", ms=3)
    axes[0].set_ylim(0, 1)
    axes[0].set_ylabel("attention mass\non vision", fontsize=8)
    axes[1].semilogy(layers, insight.cosine_drop.numpy(), marker="o", ms=3, color="tab:orange")
    axes[1].axhline(1 - VisiPruner.layer_threshold, color="0.4", ls="--", lw=0.8,
                    label=f"VisiPruner filter: 1 - {VisiPruner.layer_threshold}")
    axes[1].legend(fontsize=7, loc="best")
    axes[1].set_ylabel("max cosine drop\n1 - min_j cos(O - c_j, O)", fontsize=8)
    if method is not None:
        axes[2].step(layers, insight.vision_tokens, where="mid", color="tab:green", marker="o", ms=3)
        axes[2].set_ylim(0, insight.vision_attention.shape[1] * 1.05)
        axes[2].set_ylabel(f"vision tokens\nentering ({method['name']})", fontsize=8)
    axes[-1].set_xlabel("layer")
    axes[-1].set_xticks(list(layers))
    for ax in axes:
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle("The last prompt token, layer by layer", fontsize=10)
    return _save(fig, path)


@dataclass
class PruningPanel:
    where: str  # the layer, or before the LLM
    counts: str
    kept: list[int]  # patches kept as themselves: clear
    merged: list[int]  # patches that live on only inside merged tokens: half dark

    @property
    def title(self) -> str:
        return f"{self.where}: {self.counts}"


def pruning_panels(selections: dict) -> list[PruningPanel]:
    """One panel per snapshot of a selection record: each layer where the method changes the vision tokens."""
    panels = []
    for entry in selections["layers"]:
        where = "before the LLM" if entry.get("pre_llm") else f"layer {entry['layer']}"
        merged = sorted(set().union(*entry["merged"]) - set(entry["kept"]))
        counts = f"{len(entry['kept'])} kept" + (f", {len(entry['merged'])} merged" if entry["merged"] else "")
        if entry.get("unsourced"):
            counts += f", {entry['unsourced']} no patch"
        panels.append(PruningPanel(f"{where}{' (KV cache)' if entry.get('cache') else ''}", counts, entry["kept"],
                                   merged))
    return panels


def plot_pruning(selections: dict, image: Image.Image, title: str, path: Path) -> Path:
    """Per snapshot, each of the record's grids with its patches kept, merged and dropped; `image`: as
    `processed_image` gives it (a record of views: the image itself)."""
    views, panels = views_of(selections), pruning_panels(selections)
    images = view_images(image, views)
    fig, axes = _view_panels(len(panels), views, width=2.6)
    axes = iter(axes)
    for panel in panels:
        for view, image in zip(views, images, strict=True):
            (rows, columns), first = view["grid"], view["first"]
            dropped = np.ones(rows * columns)
            dropped[[p - first for p in panel.merged if first <= p < first + rows * columns]] = 0.5
            kept = [p - first for p in panel.kept if first <= p < first + rows * columns]
            dropped[kept] = 0
            dropped = dropped.reshape(rows, columns)
            ax = next(axes)
            _overlay(ax, image, dropped, cmap="gray_r", alpha=0.75 * dropped, vmin=0, vmax=1)
            ax.set_title(panel.title if len(views) == 1 else
                         f"{panel.where}, {view_label(view, views)}: {len(kept)}/{rows * columns} kept", fontsize=8)
    fig.suptitle(f"{title}: patches kept (clear), merged (half dark), dropped (dark)", fontsize=9)
    return _save(fig, path)


def view_images(image: Image.Image, views: list[dict]) -> list[Image.Image]:
    """What each grid of an image sees, at the grid's aspect ratio: a base view, the crop grid (unpadded to the
    image) and a thumbnail span the whole image; an InternVL tile its cell of the canvas the processor cut the image
    into (`tile_canvas`). An image of one grid (views "image") is drawn as given."""
    if [view["view"] for view in views] == ["image"]:
        return [image]
    tiles = sum(view["view"] in ("tile", "thumbnail") for view in views)
    columns, rows = tile_canvas(image.size, tiles) if tiles else (1, 1)
    parts = []
    for view in views:
        part = image
        if view["view"] == "tile":
            column, row = view["tile"] % columns, view["tile"] // columns
            part = image.crop((round(column * image.width / columns), round(row * image.height / rows),
                               round((column + 1) * image.width / columns), round((row + 1) * image.height / rows)))
        scale = VIEW_PIXELS / max(view["grid"])
        parts.append(part.resize((round(view["grid"][1] * scale), round(view["grid"][0] * scale))))
    return parts


def processed_image(loaded: LoadedModel, image: Image.Image) -> Image.Image:
    """What the vision grid covers: the image as LLaVA's processor crops it (shortest-edge resize, centre crop), or
    as Qwen's resizes it whole to its own grid (no crop)."""
    processor = loaded.processor.image_processor
    if getattr(processor, "crop_size", None) is not None:
        return ImageOps.fit(image, (processor.crop_size["width"], processor.crop_size["height"]))
    rows, columns = loaded.adapter.token_grids(loaded.model, processor(images=[image], return_tensors="pt"))[0]
    pixels = processor.patch_size * processor.merge_size
    return image.resize((columns * pixels, rows * pixels))


# ---------------------------------------------------------------------------------------------------- command line
def parse(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """Split `key=value` arguments into the analysis's own keys and config overrides."""
    own, overrides = {}, []
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep:
            raise ConfigError(f"expected key=value, got {arg!r}\n{USAGE}")
        if key in ANALYSIS_KEYS:
            own[key] = value
        else:
            overrides.append(arg)
    return own, overrides


def sample_overrides(own: dict[str, str]) -> list[str]:
    """`sample=TASK:INDEX` selects the task config (so Hydra names the valid tasks)."""
    if "sample" not in own:
        return []
    task, sep, index = own["sample"].partition(":")
    if not sep or not index.isdigit():
        raise ConfigError(f"sample must be TASK:INDEX, e.g. sample=synthetic:0; got {own['sample']!r}")
    spec = CONF_DIR / "task" / f"{task}.yaml"
    if spec.is_file() and OmegaConf.load(spec).get("source") != "local":  # before the task check looks for its data
        raise ConfigError(f"sample= reads local tasks only (their data ships in tasks/); {task} is a hub task")
    return [f"task={task}"]


def read_sample(task: DictConfig, index: int) -> tuple[Image.Image, str, str]:
    """The image, question and id of question `index` of a local task's data file."""
    import pyarrow.parquet as pq

    table = pq.read_table(ROOT / task.data)
    if not 0 <= index < table.num_rows:
        raise ConfigError(f"task {task.name} has questions 0..{table.num_rows - 1}; got index {index}")
    row = table.slice(index, 1).to_pylist()[0]
    return Image.open(io.BytesIO(row["image"]["bytes"])).convert("RGB"), row["question"], row["question_id"]


def method_of(cfg: DictConfig, pruner: TokenPruner) -> dict | None:
    """The configured method's name and budget label (`none` where it reads no budget); None without a method."""
    if pruner.name == "none":
        return None
    return {"name": cfg.method.get("label", pruner.name),
            "budget": pruner.budget.label if pruner.uses_budget else "none"}


def request_of(own: dict[str, str], cfg: DictConfig, method: dict | None) -> Request:
    if not own.keys() & {"image", "sample", "question"}:  # nothing named: the configured task's first question
        own = {**own, "sample": f"{cfg.task.name}:0"}
        sample_overrides(own)  # the same check as a given sample=: a local task
    if ("image" in own) == ("sample" in own):
        raise ConfigError(f"give either image=PATH (with question=TEXT) or sample=TASK:INDEX\n{USAGE}")
    if "image" in own:
        path = Path(own["image"]).expanduser()
        if not path.is_file():
            raise ConfigError(f"image {path} does not exist")
        if not own.get("question"):
            raise ConfigError("image= needs question=TEXT")
        image, question, source, name = Image.open(path).convert("RGB"), own["question"], str(path), path.stem
    else:
        index = int(own["sample"].partition(":")[2])
        image, question, source = read_sample(cfg.task, index)
        question, name = own.get("question") or question, f"{cfg.task.name}-{index}"
    if method is not None:
        name += f"_{method['name']}" + (f"-{method['budget']}" if method["budget"] != "none" else "")
    num_layers = cfg.model.num_layers
    try:
        layers = [int(x) for x in own["layers"].split(",")] if "layers" in own else sorted(
            {num_layers // 4, num_layers // 2, 3 * num_layers // 4, num_layers - 1})
        topk = int(own.get("topk", 5))
    except ValueError as error:
        raise ConfigError(f"layers must be comma-separated layer numbers and topk a number: {error}") from None
    if not all(0 <= layer < num_layers for layer in layers):
        raise ConfigError(f"layers must be in 0..{num_layers - 1}, got {own['layers']}")
    if topk < 1:
        raise ConfigError(f"topk must be at least 1, got {topk}")
    return Request(image, question, source, own.get("name", name), layers, topk)


def run_from_record(own: dict[str, str], overrides: list[str]) -> Path:
    """Draw one sample's recorded selections (`from_run=`, `sample_id=`) on its image; no model is loaded."""
    extra = [arg for arg in overrides if not arg.startswith("output_dir=")] + sorted(
        set(own) - {"from_run", "sample_id", "image", "name"})
    if extra:
        raise ConfigError(f"from_run= takes sample_id=, image=, name= and output_dir= only, got {' '.join(extra)}")
    path = samples_path(own["from_run"])
    records = recorded(path)
    sample_id = own.get("sample_id")
    if sample_id not in records:
        some = ", ".join(list(records)[:5])
        raise ConfigError(f"sample_id={sample_id} has no selections on record in {path}; it holds {len(records)} "
                          f"samples, e.g. {some}")
    started = path.parent / STARTED
    config = json.loads(started.read_text())["config"] if started.is_file() else {}
    if "image" in own:
        image = Image.open(Path(own["image"]).expanduser()).convert("RGB")
    elif config.get("task", {}).get("source") == "local":
        image = read_sample(OmegaConf.create(config["task"]), int(sample_id.rpartition("/")[2]))[0]
    else:
        raise ConfigError(f"{path.parent} has no local task to read the image of {sample_id} from: give image=PATH")
    selections = records[sample_id]["selections"]
    label = "_".join(path.parent.parts[-2:])  # <method>_<budget> in results/<model>/<task>/<method>/<budget>
    output_dir = next((arg.partition("=")[2] for arg in overrides), "results")
    out = Path(output_dir) / "analysis" / config.get("model", {}).get("name", "from_run") / own.get(
        "name", f"{sample_id.replace('/', '-')}_{label}_recorded")
    panels = pruning_panels(selections)
    for panel in panels:
        print(panel.title)
    if not panels:
        print(f"the record of {sample_id} shows no change: every patch entered every layer; nothing drawn")
        return out
    views = views_of(selections)
    if views[-1]["image"] > 0:
        raise ConfigError(f"{sample_id} holds {views[-1]['image'] + 1} images; from_run= draws one-image records")
    out.mkdir(parents=True, exist_ok=True)
    if "views" not in selections:  # LLaVA-1.5's centre crop, Qwen's whole image: the grid's aspect ratio
        rows, cols = selections["grid"]
        image = ImageOps.fit(image, (cols * RECORD_PATCH_PIXELS, rows * RECORD_PATCH_PIXELS))
    print(f"wrote {plot_pruning(selections, image, f'{label} on {sample_id}, as recorded', out / 'pruning.png')}")
    return out


def run(argv: list[str]) -> Path:
    own, overrides = parse(argv)
    if "from_run" in own:
        return run_from_record(own, overrides)
    overrides += sample_overrides(own)
    check_overrides(overrides)
    cfg = compose(overrides)
    pruner = validate(cfg)
    method = method_of(cfg, pruner)
    request = request_of(own, cfg, method)
    out = Path(cfg.output_dir) / "analysis" / cfg.model.name / request.name
    loaded = load(cfg.model, cfg.device)
    insight = analyze(loaded, request, pruner if method is not None else None)
    result = report(insight, loaded, request, method)
    out.mkdir(parents=True, exist_ok=True)
    # an image of several grids is drawn whole: `view_images` cuts each grid's part
    image = request.image if insight.views else processed_image(loaded, request.image)
    figures = [plot_logit_lens(result, out / "logit_lens.png"),
               plot_value_output(result, out / "value_output.png"),
               plot_attention(insight, image, out / "attention_to_image.png"),
               plot_sinks(insight, out / "sinks.png"),
               plot_stages(insight, method, out / "stages.png")]
    if method is not None and insight.selections["layers"]:
        figures.append(plot_pruning(insight.selections, image, method["name"], out / "pruning.png"))
    elif method is not None:
        result["pruning"]["note"] = "the method kept every vision token"
    result["figures"] = [p.name for p in figures]
    (out / "analysis.json").write_text(json.dumps(result, indent=1))
    print(lens_table(result))
    if "note" in result.get("pruning", {}):
        print(result["pruning"]["note"])
    print(f"wrote {', '.join(result['figures'])} and analysis.json to {out}")
    return out


def main() -> None:
    argv = sys.argv[1:]
    if any(arg in ("-h", "--help") for arg in argv):
        print(USAGE)
        return
    try:
        run(argv)
    except ConfigError as error:
        sys.exit(f"prunebench.analyze: error: {error}")


if __name__ == "__main__":
    main()
