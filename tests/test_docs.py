"""The README stays a short guide that is true of the code: its size, its links, its commands and its method table.

No model loads here: commands are checked as `python -m harness` checks them before loading anything.
"""

from __future__ import annotations

import itertools
import re
import shlex
import textwrap
from pathlib import Path

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from harness.config import build_pruner, check_overrides, compose, group_choices
from methods import METHODS, ConfigError

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
README_BUDGET_BYTES = 20_000  # a guide, not a notebook: longer material goes to docs/
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]

FENCE = re.compile(r"^[ \t]*```.*?^[ \t]*```", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)|<img\s[^>]*src=\"([^\"]+)\"")


def prose(text: str) -> str:
    """The text without code, whose brackets are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def code_lines(text: str) -> list[str]:
    """Every line inside the fenced code blocks."""
    return [line.strip() for block in FENCE.findall(text) for line in block.splitlines()[1:-1]]


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", FENCE.sub("", page.read_text()), re.M)
    return {re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-") for heading in headings}


def test_readme_stays_within_its_budget():
    size = len(README.read_bytes())
    assert size <= README_BUDGET_BYTES, (
        f"README.md is {size} bytes (budget {README_BUDGET_BYTES}): move detail into docs/")


@pytest.mark.parametrize("page", PAGES, ids=lambda page: str(page.relative_to(ROOT)))
def test_relative_links_and_images_point_at_what_exists(page):
    broken = []
    for match in LINK.finditer(prose(page.read_text())):
        target = match.group(1) or match.group(2)
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not checked offline
            continue
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif fragment and linked.suffix == ".md" and fragment not in anchors(linked):
            broken.append(f"{target}: no heading #{fragment}")
    assert not broken, f"{page.name}: {broken}"


def test_readme_test_command_is_what_ci_runs():
    ci = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    ci_command = [line for line in ci if "pytest" in line and not line.startswith("#")]
    readme_commands = [line for line in code_lines(README.read_text()) if "-m pytest" in line]
    assert len(ci_command) == 1
    assert readme_commands == ci_command


def method_table_rows() -> list[list[str]]:
    """The cells of the README's method table: the first table whose header starts with `method`."""
    lines = README.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(r"\|\s*method\s*\|", line))
    rows = []
    for line in lines[start + 2:]:  # after the header and its |---| line
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_method_table_has_one_row_per_registered_method():
    rows = method_table_rows()
    named = [re.fullmatch(r"`method=(\w+)`", row[0]) for row in rows]
    assert all(named), f"each row starts with `method=<name>`: {[row[0] for row in rows]}"
    names = [match.group(1) for match in named]
    assert sorted(names) == sorted(METHODS), "the README's method table and methods.METHODS must list the same methods"
    mentioned = {name for row in rows for cell in row for name in re.findall(r"method=(\w+)", cell)}
    assert mentioned <= set(group_choices("method")), "every method= in the table is a conf/method choice"


def harness_jobs(line: str) -> tuple[bool, list[list[str]]]:
    """Whether a `python -m harness ...` line is a multirun, and the overrides of each job it runs (sweeps expanded as
    Hydra expands them; Hydra's own `hydra...` overrides left out)."""
    words = shlex.split(line.split(" #")[0])[3:]
    multirun = "-m" in words or "--multirun" in words
    parsed = OverridesParser.create().parse_overrides([w for w in words if w not in ("-m", "--multirun")])
    choices = [[f"{o.get_key_element()}={value}" for value in
                (o.sweep_string_iterator() if multirun and o.is_sweep_override() else [o.get_value_element_as_str()])]
               for o in parsed if not o.get_key_element().startswith("hydra")]
    return multirun, [list(job) for job in itertools.product(*choices)]


def test_readme_run_commands_pass_the_checks_made_before_loading():
    """A single run validates, or needs what is not on this machine and says how to download it. A multirun's jobs
    name valid groups, keys and method options; a budget one method refuses is reported by the sweep, which goes on."""
    lines = [line for line in code_lines(README.read_text()) if line.startswith("python -m harness ")]
    assert len(lines) >= 3
    for line in lines:
        multirun, jobs = harness_jobs(line)
        for job in jobs:
            if multirun:
                build_pruner(compose(job))
                continue
            try:
                check_overrides(job)
            except ConfigError as error:
                assert "download" in str(error), f"python -m harness {' '.join(job)}: {error}"


def test_readme_python_examples_run():
    blocks = re.findall(r"^[ \t]*```python\n(.*?)^[ \t]*```", README.read_text(), re.S | re.M)
    assert blocks
    for block in blocks:
        exec(compile(textwrap.dedent(block), "README.md", "exec"), {})
