"""Every selection on record: which original image patches each vision token stands for, layer by layer.

`SelectionRecorder` follows the vision tokens of each batch row through one prefill. Every vision token carries its
*sources*: the patches of the image's grid (row-major indices 0..h*w-1) it comes from, one for a patch kept as it
is, several for a merged token, none for a token that is no patch (CLIP's CLS, which VisionZip keeps as a dominant
token). Wherever the set of vision tokens changes, the recorder writes a snapshot of that layer's vision tokens:

    {"layer": 2, "kept": [patch, ...], "merged": [[patch, ...], ...]}

`kept` holds the patches that enter the layer as themselves (sorted), `merged` the sources of each merged token (in
sequence order; a pre-LLM output token counts as merged where it has several sources), `unsourced` (only where
non-zero) how many tokens are no patch. A pre-LLM reduction is recorded as
layer 0 with `"pre_llm": true`; a cache eviction as `"cache": true` (the vision tokens whose K/V stay in that
layer's cache; the layer itself saw them all). A sample's record is `{"grid": [h, w], "layers": [...]}`.

On dynamic-resolution models (Qwen) a patch is one vision token, a 2x2 group of ViT patches, on the image's own
merged grid (the processor's `image_grid_thw` rows and columns halved). A prompt with several images is recorded as
`{"grids": [[h, w], ...], "layers": [...]}`: the patches of image i are numbered after those of the images before it.

On families whose images hold several grids (LLaVA-NeXT/OneVision: a base view and the crops as one unpadded grid;
InternVL: tiles and a thumbnail; `ModelAdapter.token_views`) a patch is one vision token of one grid, and a record is
`{"views": [{"image": 0, "view": "base", "grid": [h, w], "first": 0}, ...], "layers": [...]}`: grid after grid in
sequence order, each numbering its cells row-major from `first` (an InternVL tile adds its place, `"tile": k`).
Image-newline slots are no vision tokens and have no number.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from harness.adapters.base import TokenView
from harness.results import SAMPLES, read_samples
from methods.base import ConfigError, Selection


class Token(NamedTuple):
    sources: tuple[int, ...]  # the patches it comes from
    merged: bool = False  # a merged token, whatever its number of sources


@dataclass
class SelectionRecorder:
    grid: tuple[int, int] | None  # the vision tower's patch grid (rows, columns); None: each image has its own
    slots: int  # <image> placeholders per image: the patches, plus CLS under LLaVA's `full` feature strategy
    tokens: list[list[Token]] = field(default_factory=list)  # per row, the current vision tokens' sources
    layers: list[list[dict]] = field(default_factory=list)  # per row, the snapshots of this prefill
    reduction: list[list[Token]] | None = None  # per image, a pre-LLM reduction's sources, until layer 0 applies it
    #: per image (the batch's, in order), a pre-LLM reduction that keeps each output token at a slot of its image
    #: (`reduce_images`), until layer 0 applies it
    image_reduction: list[tuple[int, list[tuple[int, list[int]]]]] | None = None
    grids: list[list[tuple[int, int]]] = field(default_factory=list)  # per row, its images' grids (dynamic only)
    views: list[list[dict]] | None = None  # per row, its images' grids as recorded (families with `token_views`)

    @classmethod
    def for_model(cls, config) -> SelectionRecorder:
        """A fixed grid from the vision config (LLaVA); a vision config without one square `image_size` (dynamic
        resolution, InternVL's tiles) takes each prefill's image grids. Each prefill's views (`begin`) replace
        either."""
        vision = config.vision_config
        if not isinstance(getattr(vision, "image_size", None), int):
            return cls(grid=None, slots=0)
        side = vision.image_size // vision.patch_size
        return cls(grid=(side, side), slots=side * side + (config.vision_feature_select_strategy == "full"))

    def _patches(self, slot: int) -> tuple[int, ...]:
        """The patch of one slot of an image's features: under the `full` strategy slot 0 is CLS, no patch."""
        cls_slots = self.slots - self.grid[0] * self.grid[1]
        return (slot - cls_slots,) if slot >= cls_slots else ()

    def begin(self, is_vision: torch.Tensor, grids: list[tuple[int, int]] | None = None,
              views: list[list[TokenView]] | None = None) -> None:
        """A new prefill; `views` gives each image's grids where it has several, else on a fixed grid every row holds
        one image (LLaVA-1.5's single-image prompts), else `grids` gives each image's vision-token grid, the batch's
        images in order (each row's run of vision tokens per image)."""
        if views is not None:
            self._begin_views(is_vision, views)
            return
        if self.grid is None:
            images = (is_vision & ~torch.nn.functional.pad(is_vision, (1, 0))[:, :-1]).sum(1).tolist()
            self.grids = [grids[sum(images[:row]):sum(images[:row + 1])] for row in range(len(images))]
            for row, row_grids in enumerate(self.grids):
                if sum(h * w for h, w in row_grids) != int(is_vision[row].sum()):
                    raise ValueError(f"the image grids {row_grids} do not hold row {row}'s "
                                     f"{int(is_vision[row].sum())} vision tokens")
            self.tokens = [[Token((patch,)) for patch in range(int(count))] for count in is_vision.sum(1)]
            self.layers = [[] for _ in self.grids]
            return
        if int(is_vision[0].sum()) != self.slots:
            raise ValueError(f"selections are recorded for one image per sample ({self.slots} vision tokens), got "
                             f"{int(is_vision[0].sum())}; set record_selections=false")
        self.tokens = [[Token(self._patches(slot)) for slot in range(self.slots)] for _ in range(is_vision.shape[0])]
        self.layers = [[] for _ in range(is_vision.shape[0])]

    def _begin_views(self, is_vision: torch.Tensor, views: list[list[TokenView]]) -> None:
        """Each row takes the next images until they hold its vision tokens (an image's need not be one run: newline
        slots split them)."""
        images = iter(views)
        self.views = []
        for row, count in enumerate(is_vision.sum(1).tolist()):
            entries, patches, number = [], 0, 0
            while patches < count and (image := next(images, None)) is not None:
                entries += view_entries(image, number, patches)
                patches += sum(view.rows * view.columns for view in image)
                number += 1
            if patches != count:
                raise ValueError(f"the image views {entries} do not hold row {row}'s {count} vision tokens")
            self.views.append(entries)
        self.tokens = [[Token((patch,)) for patch in range(count)] for count in is_vision.sum(1).tolist()]
        self.layers = [[] for _ in self.views]

    def reduce(self, sources: list[list[list[int]]] | None, reduced_slots: int, images: int) -> None:
        """A pre-LLM method's `sources` (per image, per output token, indices into its features' token axis);
        None when the method does not expose them: its tokens are then recorded as unsourced."""
        if sources is None:
            self.reduction = [[Token(())] * reduced_slots for _ in range(images)]
            return
        self.reduction = [[Token(patches, merged=len(patches) > 1) for patches in
                           (tuple(sorted({p for slot in token for p in self._patches(slot)})) for token in image)]
                          for image in sources]

    def reduce_images(self, images: list[tuple[int, list[tuple[int, list[int]]]]]) -> None:
        """A pre-LLM reduction that leaves each output token at a slot of its image (Qwen, LLaVA-NeXT/OneVision,
        InternVL): per image, the batch's in order, its vision tokens and, for each output token, (its slot, its
        sources), indices into the image's vision tokens in sequence order."""
        self.image_reduction = images

    def reduced(self) -> None:
        """The reduction reaches decoder layer 0: LLaVA-1.5's (one image per row: image i is row i), or per row its
        images' (`reduce_images`), their output tokens in slot order, as the sequence holds them."""
        if self.image_reduction is None:
            for row, image in enumerate(self.reduction):
                self._enter(row, 0, list(image), pre_llm=True)
            self.reduction = None
            return
        images = iter(self.image_reduction)
        for row, current in enumerate(self.tokens):
            tokens, offset = [], 0
            while offset < len(current):
                count, outputs = next(images)
                tokens += [Token(tuple(sorted(p for source in sources for p in current[offset + source].sources)),
                                 merged=len(sources) > 1) for _, sources in sorted(outputs)]
                offset += count
            self._enter(row, 0, tokens, pre_llm=True)
        self.image_reduction = None

    def select(self, layer: int, selection: Selection) -> None:
        """A `Selection` applied to the input of `layer`: merged tokens join in sequence order after the kept ones
        (as `PruningRuntime._apply` places them), their sources the union of the merged current tokens'."""
        for row, current in enumerate(self.tokens):
            tokens = [current[i] for i in selection.keep[row].tolist() if i >= 0]  # -1: a ragged batch's padding
            if selection.merged is not None:
                merged = (selection.merged_sources[row] if selection.merged_sources is not None
                          else [[] for _ in range(selection.merged.shape[1])])
                tokens += [Token(tuple(sorted({p for i in members for p in current[i].sources})), merged=True)
                           for members in merged]
            self._enter(row, layer, tokens)

    def evict(self, layer: int, keep: torch.Tensor, is_vision: torch.Tensor) -> None:
        """`cache_keep` left `keep` ((B, k) current-sequence indices) in `layer`'s cache."""
        ordinal = is_vision.long().cumsum(1) - 1  # sequence index -> index among the current vision tokens
        for row, current in enumerate(self.tokens):
            kept = [current[int(ordinal[row, i])] for i in keep[row].tolist() if is_vision[row, i]]
            if len(kept) != len(current):
                self.layers[row].append(snapshot(layer, kept, cache=True))

    def _enter(self, row: int, layer: int, tokens: list[Token], **flags) -> None:
        if tokens != self.tokens[row]:
            self.layers[row].append(snapshot(layer, tokens, **flags))
            self.tokens[row] = tokens

    def record(self, row: int) -> dict:
        if self.views is not None:
            return {"views": self.views[row], "layers": self.layers[row]}
        if self.grid is not None:
            return {"grid": list(self.grid), "layers": self.layers[row]}
        grids = [list(grid) for grid in self.grids[row]]
        return {"grid": grids[0], "layers": self.layers[row]} if len(grids) == 1 else {"grids": grids,
                                                                                       "layers": self.layers[row]}


def snapshot(layer: int, tokens: list[Token], **flags) -> dict:
    entry = {"layer": layer, **flags, "kept": sorted(t.sources[0] for t in tokens if not t.merged and t.sources),
             "merged": [list(t.sources) for t in tokens if t.merged]}
    unsourced = sum(not t.merged and not t.sources for t in tokens)
    if unsourced:
        entry["unsourced"] = unsourced
    return entry


def view_entries(views: list[TokenView], image: int = 0, first: int = 0) -> list[dict]:
    """One image's grids as a record lists them: the image's number in its row, each grid and its first patch."""
    entries = []
    for view in views:
        tile = {"tile": view.tile} if view.tile is not None else {}
        entries.append({"image": image, "view": view.view, "grid": [view.rows, view.columns], "first": first, **tile})
        first += view.rows * view.columns
    return entries


def views_of(selections: dict) -> list[dict]:
    """Every grid of a record as its views: a record of one grid per image (`grid`, `grids`) as views "image"."""
    if "views" in selections:
        return selections["views"]
    grids = selections.get("grids") or [selections["grid"]]
    firsts = [sum(h * w for h, w in grids[:image]) for image in range(len(grids))]
    return [{"image": image, "view": "image", "grid": list(grid), "first": first}
            for image, (grid, first) in enumerate(zip(grids, firsts, strict=True))]


def first_pruning(selections: dict) -> dict | None:
    """The snapshot of the first layer whose vision tokens changed (cache evictions aside); None if none did."""
    return next((entry for entry in selections["layers"] if not entry.get("cache")), None)


def represented(entry: dict) -> set[int]:
    """Every patch a snapshot's tokens stand for, kept or merged."""
    return set(entry["kept"]).union(*entry["merged"])


def samples_path(run: str | Path) -> Path:
    """A run's samples file, from the run's directory or the file itself."""
    path = Path(run)
    path = path / SAMPLES if path.is_dir() else path
    if not path.is_file():
        raise ConfigError(f"{run} is neither a run directory holding {SAMPLES} nor a samples file")
    return path


def recorded(path: Path) -> dict[str, dict]:
    """The samples of a run that have selections on record, by id."""
    records = {r["id"]: r for r in read_samples(path) if "selections" in r}
    if not records:
        raise ConfigError(f"{path} has no selections on record: rerun it with record_selections=true")
    return records
