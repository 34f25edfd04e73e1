"""The shipped tiny trained model (`model=tiny_trained`, `checkpoints/tiny_trained/`) on the shipped task."""

from __future__ import annotations

import json

from harness import run as run_module
from harness.config import compose

SLICE = 100  # the first questions of tasks/synthetic_vqa/test.parquet, 20 of each category
# Measured with method=none on this slice when the checkpoint was trained (docs/tiny-model.md, "The shipped model"); the
# margin allows for last-digit arithmetic differences between machines flipping a few near-tied answers.
MEASURED_ACCURACY = 0.83
MARGIN = 0.03


def test_the_shipped_checkpoint_answers_the_shipped_task_as_measured(tmp_path):
    cfg = compose(["model=tiny_trained", "method=none", f"task.limit={SLICE}", f"output_dir={tmp_path}"])
    result = json.loads((run_module.run(cfg) / "result.json").read_text())
    assert result["n_samples"] == SLICE
    assert result["metrics"]["exact_match"] >= MEASURED_ACCURACY - MARGIN
