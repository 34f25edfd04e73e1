"""prunebench as an lmms-eval model: any supported Hugging Face model with any pruner.

The harness hands `simple_evaluate` an instance (`Prunebench.for_run`), which appends each finished sample's record
(output, vision tokens per layer, latency, KV bytes, first-token distribution, and with `record_selections`
the patches behind the vision tokens wherever they change: `harness.records`) to the run's samples.jsonl and
returns stored outputs for samples a killed run already finished. lmms-eval's own CLI builds it from
`--model prunebench --model_args model=llava7b,method=fastv,budget=128` (any other `key=value` is a Hydra override,
e.g. `method.k=3`); the package declares the `lmms_eval.models` entry point for that (`harness.lmms_entry`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from tqdm import tqdm

from harness import flops, fvcore_flops, models
from harness.cost import ForwardTimer, peak_memory_bytes
from harness.runtime import prune
from methods.base import TokenPruner

FIRST_TOKEN_TOP_K = 64  # first-token log-probabilities kept per sample, for the loyalty KL


class Prunebench(lmms):
    is_simple = True

    def __init__(self, model: str = "tiny", method: str = "none", budget: Any = None,
                 budget_convention: str = "exact", device: str = "auto", batch_size: Any = 1, **overrides: Any):
        """The lmms-eval CLI entry: Hydra choices and overrides as keyword arguments."""
        from harness.config import compose, validate

        choices = [f"model={model}", f"method={method}", f"budget={budget if budget is not None else 'null'}",
                   f"budget_convention={budget_convention}", f"device={device}", f"batch_size={int(batch_size)}"]
        cfg = compose([*choices, *(f"{key}={value}" for key, value in overrides.items())])
        self._setup(cfg, validate(cfg), done={}, sink=None)

    @classmethod
    def for_run(cls, cfg, pruner: TokenPruner, done: dict[str, dict], sink: Callable[[dict], None]) -> Prunebench:
        """The harness's instance: `done` maps sample ids to finished records, `sink` stores new ones."""
        self = cls.__new__(cls)
        self._setup(cfg, pruner, done, sink)
        return self

    def _setup(self, cfg, pruner: TokenPruner, done: dict[str, dict], sink) -> None:
        super().__init__()
        self.cfg, self.pruner, self.records, self.sink = cfg, pruner, dict(done), sink
        self.loaded: models.LoadedModel | None = None  # loaded on the first sample that is not done yet
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # accelerate launch: lmms-eval shards requests by rank and
            from accelerate import Accelerator  # gathers them over the process group that Accelerator sets up

            accelerator = Accelerator()
            self._rank, self._world_size = accelerator.process_index, accelerator.num_processes

    def __repr__(self) -> str:  # deterministic: lmms-eval's response cache keys on it
        budget = self.pruner.budget.label if self.pruner.uses_budget else "none"
        return f"prunebench(model={self.cfg.model.name},method={self.cfg.method.get('label', self.pruner.name)}," \
               f"budget={budget})"

    # ------------------------------------------------------------------ lmms-eval API
    def generate_until(self, requests) -> list[GenerationResult]:
        outputs: dict[int, GenerationResult] = {}
        pending = []
        for index, request in enumerate(requests):
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args[:6]
            sample_id = f"{task}/{doc_id}"
            if sample_id in self.records:
                outputs[index] = _result(self.records[sample_id])
            else:
                pending.append((index, sample_id, context, gen_kwargs, doc_to_visual, self.task_dict[task][split],
                                doc_id))
        # Docs and their images are read as their batch forms, each once: a large task's images never sit in memory
        # together.
        batches = _batches((_with_visuals(*item) for item in pending), self.cfg.batch_size)
        with tqdm(total=len(pending), desc=repr(self), unit="sample", disable=not pending) as bar:
            for batch in batches:
                for (index, *_), record in zip(batch, self._generate(batch), strict=True):
                    self.records[record["id"]] = record
                    if self.sink is not None:
                        self.sink(record)
                    outputs[index] = _result(record)
                bar.update(len(batch))
        return [outputs[i] for i in range(len(requests))]

    def loglikelihood(self, requests):
        raise NotImplementedError("prunebench evaluates generation tasks (output_type: generate_until) only")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("prunebench evaluates single-round generation tasks only")

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def _generate(self, batch: list) -> list[dict]:
        if self.loaded is None:
            self.loaded = models.load(self.cfg.model, self.cfg.device)
            if self.loaded.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(self.loaded.device)
        loaded, pruner = self.loaded, self.pruner
        _, _, _, gen_kwargs, visuals, _ = batch[0]
        images = [list(visual) for *_, visual, _ in batch] if visuals else None  # the adapter says how many it takes
        questions = [context for _, _, context, *_ in batch]
        inputs = loaded.inputs(images, questions)
        sampling = bool(gen_kwargs.get("do_sample")) and gen_kwargs.get("temperature", 0) > 0
        options = {"max_new_tokens": gen_kwargs.get("max_new_tokens", 32), "do_sample": sampling}
        if sampling:
            options.update(temperature=gen_kwargs["temperature"], top_p=gen_kwargs.get("top_p") or 1.0)
        with prune(loaded.model, pruner, sample_ids=[sample_id for _, sample_id, *_ in batch],
                   record=self.cfg.record_selections,
                   questions=questions) as runtime, \
                ForwardTimer(loaded.model) as timer:
            out = loaded.model.generate(**inputs, **options, return_dict_in_generate=True, output_logits=True)
        method_fields = [pruner.record(row) if runtime.active else {} for row in range(len(batch))]
        rows = range(len(batch))
        schedules = [flops.executed_schedule(runtime, timer.decode_steps, row) for row in rows]
        # Dynamic-resolution models: the image sizes the processor chose, each row's images in turn.
        grids = [tuple(grid) for grid in inputs["image_grid_thw"][:, 1:].tolist()] if "image_grid_thw" in inputs else []
        counts = [len(visual) for visual in images] if images is not None else [0] * len(batch)
        # InternVL: each row's own tiles (a batch's images may differ in size)
        tiles = ([sum(image.tiles for image in row) for row in loaded.adapter.image_tiles(loaded.model,
                                                                                          inputs["input_ids"])]
                 if loaded.model.config.model_type == "internvl" else [0] * len(batch))
        architectures = [flops.model_architecture(
            loaded.model.config, grids[sum(counts[:row]):sum(counts[:row + 1])], tiles[row],
            loaded.adapter.prompt_layout(loaded.model, row_images(inputs, counts, row))) for row in rows]
        if self.cfg.flops == "counted":  # an untimed replay, after the timed run (whose method state is read above)
            costs = [flops.count_generation(loaded.model, pruner, inputs, [item[1] for item in batch], questions,
                                            **options)] * len(batch)
        else:
            costs = [flops.project(architecture, schedule) for architecture, schedule in zip(architectures, schedules,
                                                                                           strict=True)]
            if self.cfg.flops == "fvcore":  # an untimed traced prefill replaces the projected one
                prefill = fvcore_flops.count_prefill(loaded.model, pruner, inputs, [item[1] for item in batch])
                costs = [(prefill, decode) for _, decode in costs]
        prompt_len = inputs["input_ids"].shape[1]
        generated = out.sequences[:, prompt_len:]
        texts = [_cut(text, gen_kwargs.get("until")) for text in loaded.decode(generated)]
        first = out.logits[0].float().log_softmax(dim=-1).topk(min(FIRST_TOKEN_TOP_K, out.logits[0].shape[-1]))
        per_layer = runtime.vision_tokens_per_layer().tolist() if runtime.active else [[0] * loaded.num_layers] * len(
            batch)
        # The unpruned count: a pre-LLM reduction leaves the prompt's placeholders in place.
        unpruned = loaded.adapter.vision_mask(loaded.model, inputs["input_ids"], inputs).sum(1).tolist()
        # LLaVA-NeXT/OneVision's image-newline slots: never prunable, counted apart from the vision tokens
        newlines = loaded.adapter.newline_mask(loaded.model, inputs["input_ids"], inputs)
        newlines_per_layer = runtime.tokens_per_layer(newlines).tolist() if runtime.active and newlines.any() else None
        records = []
        for row, (_, sample_id, _, _, _, doc) in enumerate(batch):
            record = {
                "id": sample_id, "category": doc.get("category"), "output": texts[row],
                "output_tokens": int((generated[row] != loaded.processor.tokenizer.pad_token_id).sum()),
                "first_token_top": {"ids": first.indices[row].tolist(),
                                    "logprobs": [round(v, 5) for v in first.values[row].tolist()]},
                "pruned": runtime.active and pruner.name != "none",
                "vision_tokens_per_layer": per_layer[row],
                "tokens_per_layer": schedules[row].tokens,
                "mean_vision_tokens": sum(per_layer[row]) / len(per_layer[row]),
                "vision_tokens_unpruned": unpruned[row],
                "mean_vision_fraction": sum(per_layer[row]) / len(per_layer[row]) / unpruned[row] if unpruned[row]
                else None,
                "prefill_ms": 1e3 * timer.prefill_seconds,
                "decode_ms_per_token": 1e3 * timer.decode_seconds / timer.decode_steps if timer.decode_steps else None,
                "kv_cache_bytes": timer.kv_bytes // len(batch),
                "selection_ms": 1e3 * runtime.selection_seconds,
                "batch_size": len(batch),
                "decode_steps": timer.decode_steps,
                "flops": flops.sample_record(*costs[row], architectures[row], per_layer[row]),
                "input_tokens": int(inputs["attention_mask"][row].sum()),
                "peak_memory_bytes": peak_memory_bytes(loaded.device),
            }
            if newlines_per_layer is not None:
                record["newline_tokens_per_layer"] = newlines_per_layer[row]
            if not runtime.active:
                record["note"] = "no image tokens in the prompt: ran unpruned"
            elif pruner.budget.tokens is not None and not pruner.uses_budget:
                record["note"] = f"method {pruner.name} has no token budget: budget {pruner.budget.label} ignored"
            record.update(method_fields[row])
            if runtime.active and runtime.recorder is not None:
                record["selections"] = runtime.recorder.record(row)
            records.append(record)
        return records


def _with_visuals(index: int, sample_id: str, context: str, gen_kwargs: dict, doc_to_visual, docs, doc_id) -> tuple:
    """A pending request as `_generate` takes it: (index, sample id, context, gen_kwargs, visuals, doc)."""
    doc = docs[doc_id]
    return index, sample_id, context, gen_kwargs, doc_to_visual(doc), doc


def _batches(items: Iterator[tuple], size: int) -> Iterator[list]:
    """Consecutive runs of at most `size` items that can share one forward: the same generation options, all with an
    image (a prompt without an image always runs alone). A batch is handed out as soon as it is complete."""
    batch: list = []
    for item in items:
        if batch and not (batch[0][4] and item[4] and item[3] == batch[0][3]):
            yield batch
            batch = []
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def row_images(inputs: dict, counts: list[int], row: int) -> dict:
    """The image inputs of batch row `row` alone (the processor stacks every row's images in order, `counts` per
    row), for the layout of its own images (LLaVA-NeXT/OneVision: `ModelAdapter.prompt_layout`)."""
    first = sum(counts[:row])
    own = {"image_sizes": slice(first, first + counts[row]), "batch_num_images": slice(row, row + 1)}
    return {key: inputs[key][part] for key, part in own.items() if key in inputs}


def _cut(text: str, until) -> str:
    for stop in [until] if isinstance(until, str) else (until or []):
        if stop:
            text = text.split(stop)[0]
    return text.strip()


def _result(record: dict) -> GenerationResult:
    return GenerationResult(text=record["output"], token_counts=TokenCounts(
        input_tokens=record.get("input_tokens"), output_tokens=record.get("output_tokens")))

