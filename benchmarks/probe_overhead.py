"""Share of prefill time spent on attention probes (sdpa kept everywhere), on a random-weight CPU model.

    python benchmarks/probe_overhead.py [--layers 8] [--hidden 1024] [--repeats 7]

Times the prefill of a LLaVA-1.5-geometry model (576 vision tokens) with no probe, with the last prompt token's
attention row probed in one layer (what FastV needs), and in every layer (what VisiPruner's middle stage may need).
Prints medians and the probes' share; a measurement, not a test.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from omegaconf import OmegaConf
from PIL import Image

from harness.models import LoadedModel, build_tiny
from harness.runtime import prune
from methods import Probe, TokenPruner


class ProbeLayers(TokenPruner):
    def __init__(self, layers: set[int]):
        super().__init__()
        self.layers = layers

    def probe(self, layer, state):
        return Probe(queries=state.last_query, values=True) if layer in self.layers else None


def prefill_medians(model, inputs, pruners: dict[str, TokenPruner], repeats: int) -> dict[str, tuple[float, float]]:
    """Median (prefill seconds, seconds inside the probes) per pruner; configurations are interleaved round by round
    so that drift in the machine's speed hits all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in pruners}
    inside: dict[str, list[float]] = {name: [] for name in pruners}
    names = list(pruners)
    with torch.no_grad():
        for round_ in range(repeats + 1):  # round 0 is warm-up
            for name in names[round_ % len(names):] + names[: round_ % len(names)]:
                with prune(model, pruners[name]) as runtime:
                    start = time.perf_counter()
                    model(**inputs)
                    elapsed = time.perf_counter() - start
                if round_:
                    times[name].append(elapsed)
                    inside[name].append(runtime.selection_seconds)
    return {name: (statistics.median(times[name]), statistics.median(inside[name])) for name in pruners}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    spec = OmegaConf.create(dict(
        name="bench", source="tiny", num_layers=args.layers, num_vision_tokens=576, image_size=336, patch_size=14,
        hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.6875), num_heads=args.hidden // 128,
        num_kv_heads=args.hidden // 128, vision_hidden_size=64, vision_layers=2, seed=0, dtype="float32",
        attn_implementation="sdpa"))
    model, processor = build_tiny(spec)
    loaded = LoadedModel("bench", model, processor, torch.device("cpu"))
    inputs = loaded.inputs([Image.new("RGB", (336, 336), (120, 60, 30))], ["What is in the image? " * 3])
    tokens = inputs["input_ids"].shape[1]
    pruners = {"none": TokenPruner(), "1 layer": ProbeLayers({1}),
               f"all {args.layers} layers": ProbeLayers(set(range(args.layers)))}
    medians = prefill_medians(model, inputs, pruners, args.repeats)
    base, _ = medians.pop("none")
    print(f"{args.layers} layers x {args.hidden} wide, {tokens} prompt tokens (576 vision), torch threads "
          f"{torch.get_num_threads()}: prefill without probes {1e3 * base:.1f} ms (median of {args.repeats})")
    for label, (probed, probe_time) in medians.items():
        print(f"  last-token probe in {label:>14}: prefill {1e3 * probed:.1f} ms ({100 * (probed - base) / base:+.2f}% "
              f"end to end, noise included); time inside the probes {1e3 * probe_time:.2f} ms = "
              f"{100 * probe_time / probed:.2f}% of prefill")

if __name__ == "__main__":
    main()
