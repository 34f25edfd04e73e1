"""The files of a run's results directory: their names, and writing and reading them without losing a sample."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

RESULT, SAMPLES, STARTED = "result.json", "samples.jsonl", "config.json"
REFUSED = "refused.json"  # in place of result.json: the configuration the method refused, and why


def write_json_atomic(path: Path, data: dict) -> None:
    # One temporary file per process, so that two writers of one file never rename away each other's.
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_samples(path: Path, repair: bool = False) -> list[dict]:
    """Complete lines of a samples file; a line cut short by a killed run is dropped (and redone). `repair` rewrites
    the file without it, so that appends stay line-aligned (only for the file this process appends to)."""
    if not path.exists():
        return []
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break
    if repair:
        with open(path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    return records


def write_record(handle) -> Callable[[dict], None]:
    """A sink appending one JSON line per record and syncing it, so a killed run loses no finished sample."""

    def sink(record: dict) -> None:
        handle.write(json.dumps(record) + "\n")
        handle.flush()
        os.fsync(handle.fileno())

    return sink
