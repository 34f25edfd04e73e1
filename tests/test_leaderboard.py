"""The leaderboard compares like for like: one results tree per board, each run against a dense run over the same
questions, refused and unfinished configurations listed with a note; the first-comparison preset."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import OmegaConf

from harness import leaderboard
from harness import run as run_module
from harness.config import CONF_DIR, Refusal, compose, group_choices
from harness.results import REFUSED, RESULT

TINY = ("model=tiny", "model.num_layers=4")  # the random-weight tiny model, cut to 4 layers for speed


def run(tree: Path, *overrides: str) -> Path:
    """One job in-process on the 4-layer tiny model."""
    return run_module.run(compose([f"output_dir={tree}", *TINY, *overrides]))


def board(tree: Path) -> tuple[dict[tuple[str, str], dict], list[str]]:
    rows, _, warnings = leaderboard.build(leaderboard.load_runs(tree))
    return {(row["method"], row["budget"]): row for row in rows}, warnings


def test_a_run_is_compared_only_with_a_dense_run_over_the_same_questions(tmp_path):
    run(tmp_path, "method=random", "budget=64", "task.limit=3")
    run(tmp_path, "method=random", "budget=128", "task.limit=2")
    rows, warnings = board(tmp_path)
    command = "python -m harness method=none model=tiny task=synthetic task.limit={} output_dir=" + str(tmp_path)
    assert warnings == [f"no dense run of tiny / synthetic to compare with: {command.format(2)}",
                        f"no dense run of tiny / synthetic to compare with: {command.format(3)}"]
    assert all(row[key] is None for row in rows.values() for key in ("flops_ratio", "agreement", "first_token_kl"))
    (panel,) = leaderboard.pareto_panels(list(rows.values()))
    assert panel.lines == {} and panel.dense is None  # no dense point without a dense run

    run_module.run(compose([*command.format(3).split()[3:], *TINY]))  # the command the warning gives
    rows, warnings = board(tmp_path)
    assert warnings == ["random / 128 on tiny / synthetic answered other questions than the dense run (task.limit=2 "
                        "against the dense run's task.limit=3): not compared; rerun one of them with the other's "
                        "task.limit (force=true replaces a finished run)"]
    dense, same, other = rows[("none", "none")], rows[("random", "64")], rows[("random", "128")]
    assert (dense["flops_ratio"], dense["agreement"], dense["note"]) == (1.0, 1.0, None)
    assert 0 < same["flops_ratio"] < 1 and 0 <= same["agreement"] <= 1 and same["note"] is None
    result = json.loads((tmp_path / "tiny" / "synthetic" / "random" / "128" / RESULT).read_text())
    assert other["synthetic"] == result["metrics"]["exact_match"] and other["mean_vision_tokens"] == 128.0
    assert other["flops_ratio"] is other["agreement"] is other["first_token_kl"] is None
    assert other["note"] == "not compared: 2 questions, the dense run 3"
    (panel,) = leaderboard.pareto_panels(list(rows.values()))
    assert list(panel.lines) == ["random"] and [p[2] for p in panel.lines["random"]] == ["64"]
    assert panel.dense == (1.0, 1.0)  # the random-weight model answers nothing right: agreement, not accuracy


def test_refused_configurations_are_listed_with_the_reason(tmp_path):
    reason = "budget 64 is out of reach of PDrop stages [1, 2, 4] (T̄_in from 72.0 to 576.0)"
    with pytest.raises(Refusal, match=r"out of reach of PDrop"):  # 8 layers: refused by validation, nothing loads
        run_module.run(compose([f"output_dir={tmp_path}", "model=tiny_trained", "method=pdrop", "budget=64"]))
    record = json.loads((tmp_path / "tiny_trained" / "synthetic" / "pdrop" / "64" / REFUSED).read_text())
    assert (record["method"], record["reason"], record["config"]["budget"]) == ("pdrop", reason, 64)

    with pytest.raises(Refusal, match="method visipruner supports batch size 1 only"):
        run(tmp_path, "method=visipruner", "batch_size=4", "task.limit=2")
    rows, _ = board(tmp_path)
    assert rows[("pdrop", "64")]["note"] == f"refused: {reason}"
    assert rows[("visipruner", "none")]["note"].startswith("refused: method visipruner supports batch size 1 only")
    assert all(rows[("pdrop", "64")][key] is None for key in leaderboard.COLUMNS)
    md, _ = leaderboard.write_tables(list(rows.values()), ["synthetic"], tmp_path)
    assert f"| tiny_trained | pdrop | 64 | — | {'— | ' * len(leaderboard.COLUMNS)}refused: {reason} |" in md.read_text()

    out = run(tmp_path, "method=visipruner", "task.limit=2")  # the configuration it refused, now runnable
    assert (out / RESULT).is_file() and not (out / REFUSED).exists()
    rows, _ = board(tmp_path)
    assert rows[("visipruner", "none")]["note"] is None and rows[("visipruner", "none")]["synthetic"] is not None


def test_one_board_reads_one_results_tree(tmp_path, monkeypatch, capsys):
    # A tree nested in another (e.g. results/first_comparison in results) holds runs of the same configurations: the
    # outer board must neither merge them into its rows nor list them twice.
    nested = tmp_path / "first_comparison"
    for tree, limit in ((tmp_path, 2), (nested, 3)):
        for budget in (64, 128):  # a budget-free method in a sweep over budgets: one run, one row
            run(tree, "method=none", f"budget={budget}", f"task.limit={limit}")
    killed = run(tmp_path, "method=random", "budget=64", "task.limit=2")
    (killed / RESULT).unlink()  # as a run killed after its last sample leaves it
    rows, warnings = board(tmp_path)
    assert list(rows) == [("none", "none"), ("random", "64")] and warnings == []
    assert rows[("random", "64")]["note"] == "unfinished (2 questions done): rerun its command to resume"
    assert leaderboard.other_trees(tmp_path) == [nested]
    assert [run["ids"] for run in leaderboard.load_runs(nested)] == [frozenset(f"synthetic_vqa/{i}" for i in range(3))]

    monkeypatch.setattr(sys, "argv", ["harness.leaderboard", str(tmp_path)])
    leaderboard.main()
    printed = capsys.readouterr().out
    assert f"have leaderboards of their own:\n  python -m harness.leaderboard {nested}" in printed
    assert len((tmp_path / "leaderboard.md").read_text().splitlines()) == 2 + 2


def test_the_first_comparison_preset_compares_every_method_on_the_trained_model():
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=["+experiment=first_comparison"], return_hydra_config=True)
    assert (cfg.model.name, cfg.task.name, cfg.task.limit) == ("tiny_trained", "synthetic", 200)
    assert cfg.output_dir == "results/first_comparison"  # a tree of its own: never mixed with other runs
    params = cfg.hydra.sweeper.params
    assert params.budget == "192,128,64"
    # Every method's own config (not the ablation variants, whose name is another method's)
    methods = [m for m in group_choices("method") if OmegaConf.load(CONF_DIR / "method" / f"{m}.yaml").name == m]
    # ... and PruMerge+, a variant with a name of its own in the papers' tables
    assert sorted(params.method.split(",")) == sorted([*methods, "prumerge_plus"]) and params.method.startswith("none,")
