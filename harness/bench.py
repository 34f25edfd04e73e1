"""`python -m harness.bench`: how much of each method's FLOPs saving shows up as prefill speed, on one model.

For every configuration (method × budget), in one process on one model and one prompt:

- **FLOPs ratio** vs dense: the whole prefill (vision tower, projector, language model, lm_head and the method's own
  work), counted once with `harness.flops.FlopCounter`, untimed;
- **time ratio** vs dense: median prefill time (`harness.cost.ForwardTimer`, device-synchronised on GPU) of repeated
  runs after a warm-up round; configurations are interleaved round-robin, rotated each round, so that drift in the
  machine's speed hits all of them alike;
- **realisation** = (1 − time ratio) / (1 − FLOPs ratio): 1 when time falls as much as FLOPs, below 1 when part of
  the saving is lost (to bookkeeping, to kernels that run fewer FLOP/s on fewer tokens, to the unpruned vision tower).
  The row `(vision + projector)` times the part no method prunes alone, to show its share of time against its share
  of FLOPs.

Models: `small` (the CPU default) is an 8-layer × 1024-wide LLaVA-1.5-geometry model (576 vision tokens, LLaMA-7B's MLP
ratio, a 2-layer 64-wide vision tower so that the language model dominates), random weights; `llava7b`/`llava13b`
(the GPU default: llava7b) are the shipped LLaVA-1.5 configs with random weights (fp16 on GPU), and so are the Qwen
confs (`qwen25vl7b`, `qwen2vl7b`, `qwen25vl3b`, `qwen3vl8b`; `tiny_*` confs build their tiny models). The prompt is
built from ids (`ModelAdapter.random_prompt`): `--text-tokens` random text tokens (35 of them before the image, like
vicuna_v1's system prompt and "USER:") around the image's tokens, random pixels (on Qwen an `--image-size`² image,
448 px: 256 vision tokens on Qwen2/2.5-VL); the prefill is generate()'s (KV cache on, logits of the last position
only). Configurations the family refuses (`ModelAdapter.check_method`: e.g. CDPruner on Qwen) are skipped with the
reason.

Methods: every one registered in `methods.METHODS`, as `conf/method/<name>.yaml` configures it, at each budget (exact
convention; a method that ignores the budget once); random at k=2 (FastV's pruning point) and at k=0 (before the
language model); VisiPruner on eager attention (the reference's, which it forces: the row says so) and on the model's
own. A configuration the method refuses on this model (a budget it has no schedule for, a depth too shallow for its
layers) is listed as skipped, with the method's reason. Besides the ratios, each row has the method's own time
(`method ms`: its selection, scoring and probes, wall clock) and FLOPs. On random weights, data-dependent methods
keep what random activations make them keep (VisiPruner may find no filtering layer and keep every token).

    python -m harness.bench [--model small|llava7b|llava13b|qwen25vl7b|... ...] [--budgets 192 128 64] [--repeats 7]
        [--output PATH.json] [--threads N] [--clock wall|process]
    bash benchmarks/gpu.sh  # llava7b and llava13b, fp16, on one GPU: results/bench/gpu.{json,md}

It prints a table per model and writes `{"runs": [one per model: its setup, "rows", "skipped"]}` as JSON, and the same
tables as Markdown beside it (`.md`).

On a CPU shared with other work, wall-clock ratios swing with the other processes' load (on the 2-core development
box, realisation read 0.5-0.85 in wall time and 0.97-0.99 in process CPU time on one thread): `--threads 1
--clock process` gives a stable CPU number.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from omegaconf import OmegaConf

from harness.adapters import adapter_for
from harness.config import CONF_DIR, build_pruner
from harness.cost import kv_cache_bytes, returned_cache
from harness.flops import FlopCounter
from harness.models import build_tiny, model_config, resolve_device
from harness.runtime import prune
from methods import METHODS, ConfigError, TokenPruner

# The question text a question-reading method (CDPruner) scores against; the prompt ids stay random.
QUESTION = "What is shown in the image?"
VISION_ONLY = "(vision + projector)"  # a timed row of its own: the part of every prefill that no method prunes
# Methods benchmarked in several configurations: random at FastV's pruning point and before the language model;
# VisiPruner on eager attention (the reference's, which it forces) and on the model's own (sdpa).
VARIANTS: dict[str, tuple[dict, ...]] = {"random": ({"k": 2}, {"k": 0}),
                                         "visipruner": ({"attention": "eager"}, {"attention": "model"})}
FORCES_EAGER = "forces eager attention"
SUMMARY = "medians; realisation = (1 - time ratio) / (1 - FLOPs ratio), whole prefill"
TEXT_BEFORE_IMAGE = 35  # vicuna_v1: the system prompt and "USER:" precede the image
IMAGE_SIZE = 448  # pixels per side of the prompt's image where the resolution is dynamic (Qwen: 256 vision tokens)
BENCH_FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")  # whose adapters build `random_prompt`s
SMALL = dict(name="small", source="tiny", num_layers=8, num_vision_tokens=576, image_size=336, patch_size=14,
             hidden_size=1024, intermediate_size=2752, num_heads=8, num_kv_heads=8, vision_hidden_size=64,
             vision_layers=2, seed=0, dtype="float32", attn_implementation="sdpa")


def random_model(config, device: torch.device, dtype: torch.dtype):
    """A model of `config` with random weights (seed 0), initialised directly on `device` in `dtype`."""
    from transformers import AutoModelForImageTextToText

    with torch.device(device), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(0)
        model = AutoModelForImageTextToText.from_config(config, dtype=dtype, attn_implementation="sdpa")
    return model.eval()


def model_names() -> list[str]:
    """`small`, and every conf/model entry of a family `harness.bench` builds prompts for (LLaVA-1.5, Qwen)."""
    names = [path.stem for path in sorted((CONF_DIR / "model").glob("*.yaml"))
             if OmegaConf.load(path).get("family", "llava") in BENCH_FAMILIES]
    return ["small", *names]


def build(name: str, device: torch.device, dtype: torch.dtype):
    """`small`, a tiny conf's own model, or a conf's shipped config with random weights."""
    spec = OmegaConf.create(SMALL) if name == "small" else OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
    if spec.source == "tiny":
        model, _ = build_tiny(spec)
        return model.to(device, dtype)
    return random_model(model_config(spec), device, dtype)


def prompt_inputs(model, text_tokens: int, image_size: int = IMAGE_SIZE) -> dict:
    """One prompt (`ModelAdapter.random_prompt`): `text_tokens` random text ids around one image's placeholders,
    35 of them before it, and random pixels (an `image_size`² image where the resolution is dynamic)."""
    inputs = adapter_for(model).random_prompt(model, text_tokens, min(TEXT_BEFORE_IMAGE, text_tokens), image_size,
                                              torch.Generator().manual_seed(0))
    return {key: value.to(model.device, model.dtype if value.is_floating_point() else None)
            for key, value in inputs.items()}


def method_pruner(name: str, options: dict, budget: int | None) -> TokenPruner:
    """Method `name` as `conf/method/<name>.yaml` configures it (the dataclass defaults where there is none), with
    `options` on top, at `budget` (exact convention)."""
    path = CONF_DIR / "method" / f"{name}.yaml"
    method = OmegaConf.merge(OmegaConf.load(path) if path.exists() else {"name": name}, options)
    return build_pruner(OmegaConf.create({"method": method, "budget": budget, "budget_convention": "exact"}))


def configurations(budgets: list[int], num_vision: int, num_layers: int, model_config=None,
                   adapter=None) -> tuple[dict[str, TokenPruner], dict[str, str]]:
    """Every registered method (`methods.METHODS`) with each of its `VARIANTS`, at each budget (a method that
    ignores the budget once), and the configurations skipped with the reason: those the method refuses on this model
    (e.g. a budget it has no reference schedule for), or, given the model's config and adapter, what it needs from
    the model (`check_model`: CDPruner's text tower) and what the family does not define (`check_method`)."""
    pruners: dict[str, TokenPruner] = {"none": TokenPruner()}
    skipped: dict[str, str] = {}
    for name in sorted(set(METHODS) - {"none"}):
        for options in VARIANTS.get(name, ({},)):
            label = " ".join([name, *(f"{key}={value}" for key, value in options.items())])
            for budget in budgets:
                row = label
                try:
                    pruner = method_pruner(name, options, budget)
                    if not pruner.uses_budget:
                        pruner = method_pruner(name, options, None)
                    row = f"{label} {budget}" if pruner.uses_budget else label
                    pruner.validate(num_vision, num_layers)
                    if adapter is not None:  # first: what the family refuses (CDPruner's CLIP on Qwen)
                        adapter.check_method(pruner)
                    if model_config is not None:
                        pruner.check_model(model_config)
                except ConfigError as error:
                    skipped[f"{label} {budget}"] = str(error)
                    continue
                pruners[row] = pruner
    return pruners, skipped


def _timed(device: torch.device, run, clock: Callable[[], float]) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = clock()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - start


def _prefill(model, inputs: dict):
    return model(**inputs, use_cache=True, logits_to_keep=1)


def counted(model, inputs: dict, pruner: TokenPruner) -> dict:
    """A configuration's counted FLOPs and token counts (one untimed prefill)."""
    with prune(model, pruner, sample_ids=[0], questions=[QUESTION]) as runtime, FlopCounter(model, runtime) as counter:
        output = _prefill(model, inputs)
    flops = counter.prefill
    attention = pruner.attention_backend or model.config.text_config._attn_implementation
    row = {"method": pruner.name, "k": getattr(pruner, "k", None),
           "budget": pruner.budget.tokens if pruner.uses_budget else None, "attention": attention,
           "mean_vision_tokens": statistics.fmean(runtime.vision_tokens_per_layer()[0].tolist()),
           "flops": flops.total, "method_flops": flops.method, "unpruned_flops": flops.vision + flops.projector,
           "kv_cache_bytes": kv_cache_bytes(returned_cache(output))}
    if attention != model.config.text_config._attn_implementation:
        row["note"] = FORCES_EAGER if attention == "eager" else f"runs {attention} attention"
    return row


def timed(model, inputs: dict, pruner: TokenPruner | None, clock: Callable[[], float]) -> tuple[float, float]:
    """(seconds, seconds inside the method's code) of one prefill; None: the vision tower and projector alone."""
    if pruner is None:
        vision = model.model.get_image_features
        images = {key: value for key, value in inputs.items() if key in ("pixel_values", "image_grid_thw")}
        return _timed(model.device, lambda: vision(**images), clock), 0
    with prune(model, pruner, sample_ids=[0], questions=[QUESTION]) as runtime:
        seconds = _timed(model.device, lambda: _prefill(model, inputs), clock)
    return seconds, runtime.selection_seconds


@torch.no_grad()
def measure(model, inputs: dict, pruners: dict[str, TokenPruner], repeats: int,
            clock: Callable[[], float] = time.perf_counter) -> dict[str, dict]:
    """Rows per configuration, plus `VISION_ONLY`: the part no method prunes, timed alone, to show its share. A
    configuration the runtime refuses on this model (`ConfigError`) gets a row with the reason, and is not timed."""
    rows: dict[str, dict] = {}
    for name, pruner in list(pruners.items()):
        try:
            rows[name] = counted(model, inputs, pruner)
        except ConfigError as error:
            rows[name] = {"method": pruner.name, "skipped": str(error)}
            pruners = {key: value for key, value in pruners.items() if key != name}
    dense = rows["none"]
    rows = {"none": dense, VISION_ONLY: {"flops": dense["unpruned_flops"]}, **rows}
    jobs: dict[str, TokenPruner | None] = {**pruners, VISION_ONLY: None}
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in jobs}
    names = list(jobs)
    for round_ in range(repeats + 1):  # round 0 warms up
        for name in names[round_ % len(names):] + names[: round_ % len(names)]:
            seconds = timed(model, inputs, jobs[name], clock)
            if round_:
                samples[name].append(seconds)
    dense_seconds = statistics.median(t for t, _ in samples["none"])
    for name, row in rows.items():
        if "skipped" in row:
            continue
        row["times"] = [t for t, _ in samples[name]]
        row["prefill_ms"] = 1e3 * statistics.median(row["times"])
        row["selection_ms"] = 1e3 * statistics.median(s for _, s in samples[name])
        row["flops_ratio"] = row["flops"] / dense["flops"]
        row["time_ratio"] = statistics.median(row["times"]) / dense_seconds
        saved = 1 - row["flops_ratio"]
        row["realisation"] = (1 - row["time_ratio"]) / saved if name != VISION_ONLY and saved > 0 else None
    return rows


COLUMNS = ("configuration", "T̄_in", "GFLOPs", "FLOPs ratio", "prefill ms", "time ratio", "realisation", "method ms",
           "method GFLOPs", "note")


def table_cells(rows: dict[str, dict], skipped: dict[str, str]) -> list[list[str]]:
    """One list of `COLUMNS` cells per row; configurations skipped before or by the runtime last, with the reason."""
    cells, refused = [], dict(skipped)
    for name, row in rows.items():
        if "skipped" in row:
            refused[name] = row["skipped"]
            continue
        tokens = f"{row['mean_vision_tokens']:.1f}" if "mean_vision_tokens" in row else "—"
        realisation = "—" if row["realisation"] is None else f"{row['realisation']:.2f}"
        method_flops = f"{row['method_flops'] / 1e9:.3f}" if "method_flops" in row else "—"
        cells.append([name, tokens, f"{row['flops'] / 1e9:.1f}", f"{row['flops_ratio']:.3f}",
                      f"{row['prefill_ms']:.1f}", f"{row['time_ratio']:.3f}", realisation,
                      f"{row['selection_ms']:.2f}", method_flops, row.get("note", "")])
    cells += [[name, *["—"] * (len(COLUMNS) - 2), f"skipped: {reason}"] for name, reason in refused.items()]
    return cells


def format_table(rows: dict[str, dict], skipped: dict[str, str] | None = None) -> str:
    cells = [list(COLUMNS), *table_cells(rows, skipped or {})]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS) - 1)]
    return "\n".join("  ".join([line[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(line[1:-1], widths[1:],
                                                                                         strict=True)), line[-1]])
                     .rstrip() for line in cells)


def format_markdown(runs: list[dict]) -> str:
    """Each run (one model) as a heading with its setup and a Markdown table."""
    parts = []
    for run in runs:
        setup = ", ".join(f"{key}={value}" for key, value in run.items() if key not in ("rows", "skipped"))
        cells = table_cells(run["rows"], run["skipped"])
        parts += [f"### {run['model']} on {run['device']}", "", f"{setup}; {SUMMARY}", "",
                  "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS),
                  *("| " + " | ".join(line) + " |" for line in cells), ""]
    return "\n".join(parts)


def run(name: str, device: torch.device, args: argparse.Namespace) -> dict:
    """One model's setup, rows and skipped configurations."""
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    model = build(name, device, dtype)
    inputs = prompt_inputs(model, args.text_tokens, args.image_size)
    clock = time.process_time if args.clock == "process" else time.perf_counter
    text = model.config.text_config
    pruners, skipped = configurations(args.budgets, int((inputs["input_ids"] == model.config.image_token_id).sum()),
                                      text.num_hidden_layers, model.config, adapter_for(model))
    rows = measure(model, inputs, pruners, args.repeats, clock)
    return {"model": name, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "dtype": str(dtype).removeprefix("torch."), "attention": text._attn_implementation,
            "torch_threads": torch.get_num_threads(), "layers": text.num_hidden_layers, "hidden": text.hidden_size,
            "prompt_tokens": inputs["input_ids"].shape[1], "repeats": args.repeats, "clock": args.clock,
            "rows": rows, "skipped": skipped}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=model_names(), nargs="+", default=None, metavar="MODEL",
                        help="small, or a conf/model name of LLaVA-1.5 or Qwen (random weights), one or more, run one "
                             "after the other; default: llava7b on a GPU, small on CPU")
    parser.add_argument("--image-size", type=int, default=IMAGE_SIZE,
                        help="pixels per side of the image where the resolution is dynamic (Qwen)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--budgets", type=int, nargs="+", default=[192, 128, 64])
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds after the warm-up round")
    parser.add_argument("--text-tokens", type=int, default=60)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (CPU); default: torch's")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="process: this process's CPU time instead of wall time for the prefills, for a CPU "
                             "shared with other work (less sensitive to it; not a latency; the method's own time "
                             "stays wall-clock, as the runtime measures it)")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON; the Markdown tables go beside it (.md). Default: results/bench/<models>-<device>")
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.clock == "process" and device.type == "cuda":
        parser.error("--clock process measures CPU time; GPU kernels run asynchronously, use wall time")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.model or ["llava7b" if device.type == "cuda" else "small"]
    output = args.output or Path("results") / "bench" / f"{'-'.join(names)}-{device.type}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    runs = []
    for name in names:
        runs.append(run(name, device, args))
        setup = ", ".join(f"{key}={value}" for key, value in runs[-1].items() if key not in ("rows", "skipped"))
        print(f"{setup}; {SUMMARY}\n{format_table(runs[-1]['rows'], runs[-1]['skipped'])}", flush=True)
        # Written after each model, so that a run cut short keeps the models it finished.
        output.write_text(json.dumps({"runs": runs}, indent=2))
        output.with_suffix(".md").write_text(format_markdown(runs))
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(f"-> {output}, {output.with_suffix('.md')}")


if __name__ == "__main__":
    main()
