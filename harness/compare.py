"""`python -m harness.compare RUN_A RUN_B`: how much two runs' selections agree, sample by sample.

    python -m harness.compare results/tiny_trained/synthetic/fastv/64 results/tiny_trained/synthetic/random/64
    python -m harness.compare RUN_A/samples.jsonl RUN_B/samples.jsonl --per-sample

For each sample both runs finished, the Jaccard overlap |A ∩ B| / |A ∪ B| of the patches each kept as themselves
at its first pruning layer (the first layer whose vision tokens changed, from the record `harness.records` writes;
merged tokens are not counted as kept). A sample whose record shows no change kept every patch. The runs may be two
methods or two budgets of one; their first pruning layers need not be the same (each is printed).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass

from harness.records import first_pruning, recorded, samples_path, views_of
from methods.base import ConfigError


@dataclass
class Overlap:
    sample_id: str
    jaccard: float
    layers: tuple[int | None, int | None]  # each run's first pruning layer (None: nothing changed)
    kept: tuple[int, int]  # patches each run kept there


def kept_at_first_pruning(record: dict) -> tuple[set[int], int | None]:
    """The patches a sample kept as themselves at its first pruning layer, and that layer."""
    selections = record["selections"]
    entry = first_pruning(selections)
    if entry is None:
        patches = sum(rows * cols for rows, cols in (view["grid"] for view in views_of(selections)))
        return set(range(patches)), None
    return set(entry["kept"]), entry["layer"]


def compare(a: dict[str, dict], b: dict[str, dict]) -> list[Overlap]:
    shared = [sample_id for sample_id in a if sample_id in b]
    if not shared:
        raise ConfigError("the two runs share no sample with selections on record (different tasks or limits?)")
    overlaps = []
    for sample_id in shared:
        (kept_a, layer_a), (kept_b, layer_b) = kept_at_first_pruning(a[sample_id]), kept_at_first_pruning(b[sample_id])
        union = kept_a | kept_b
        jaccard = len(kept_a & kept_b) / len(union) if union else 1.0
        overlaps.append(Overlap(sample_id, jaccard, (layer_a, layer_b), (len(kept_a), len(kept_b))))
    return overlaps


def report(overlaps: list[Overlap], names: tuple[str, str], per_sample: bool) -> str:
    values = [o.jaccard for o in overlaps]
    lowest = min(overlaps, key=lambda o: o.jaccard)
    lines = [f"A = {names[0]}", f"B = {names[1]}",
             f"Jaccard of the patches kept at the first pruning layer, {len(overlaps)} shared samples:",
             f"  mean {statistics.fmean(values):.4f}  min {lowest.jaccard:.4f} ({lowest.sample_id})"]
    for run, side in (("A", 0), ("B", 1)):
        layers = sorted({o.layers[side] for o in overlaps}, key=lambda layer: (layer is None, layer))
        lines.append(f"  {run}'s first pruning layers: {', '.join('none' if x is None else str(x) for x in layers)}")
    if per_sample:
        lines.append("  sample  jaccard  layer A/B  kept A/B")
        lines += [f"  {o.sample_id}  {o.jaccard:.4f}  {o.layers[0]}/{o.layers[1]}  {o.kept[0]}/{o.kept[1]}"
                  for o in overlaps]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m harness.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_a", help="a run directory (results/<model>/<task>/<method>/<budget>) or samples.jsonl")
    parser.add_argument("run_b")
    parser.add_argument("--per-sample", action="store_true", help="list every shared sample")
    args = parser.parse_args(argv)
    try:
        a, b = samples_path(args.run_a), samples_path(args.run_b)
        print(report(compare(recorded(a), recorded(b)), (str(a.parent), str(b.parent)), args.per_sample))
    except ConfigError as error:
        sys.exit(f"prunebench.compare: error: {error}")


if __name__ == "__main__":
    main()
