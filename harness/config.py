"""Configuration: the Hydra config groups, and every check that must fail before a model loads.

Each error names what would have been valid: the group's choices, the keys of the node, the method's options.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from methods import METHODS, Budget, ConfigError, TokenPruner

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("method", "model", "task")
CONVENTIONS = ("exact", "average")
FLOPS_SOURCES = ("projected", "counted", "fvcore")


class Refusal(ConfigError):
    """The method refuses this configuration on this model (a budget out of its reach, a batch size it cannot run).
    In a sweep the job leaves a record of it where its result would have gone (see `harness.run`)."""

    def __init__(self, reason: str, pruner: TokenPruner):
        super().__init__(reason)
        self.pruner = pruner


def group_choices(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def choices_message(group: str) -> str:
    """The valid choices of a config group; models grouped by family (LLaVA-1.5 first), so each family reads whole."""
    if group != "model":
        return ", ".join(group_choices(group))
    from harness.adapters import ADAPTERS, DEFAULT_FAMILY

    by_family: dict[str, list[str]] = {family: [] for family in ADAPTERS}
    for name in group_choices(group):
        by_family[OmegaConf.load(CONF_DIR / group / f"{name}.yaml").get("family") or DEFAULT_FAMILY].append(name)
    return "; ".join(f"{', '.join(names)} ({ADAPTERS[family].title})" for family, names in by_family.items() if names)


#: Method options left out of conf/method/*.yaml, so that every earlier run keeps its config key; given as
#: +method.KEY=VALUE.
ADDED_OPTIONS = {"generator_seed": "+method.generator_seed=N seeds every sample's draws with N (a record's "
                                   "generator_seed)"}


def method_options(cls: type[TokenPruner]) -> dict[str, dataclasses.Field]:
    """The options a method takes from its config (its dataclass fields; the budget comes from the budget group)."""
    return {f.name: f for f in dataclasses.fields(cls) if f.init and f.name != "budget"}


def valid_options(cls: type[TokenPruner]) -> str:
    options = method_options(cls)
    listed = ", ".join(sorted(key for key in options if key not in ADDED_OPTIONS))
    return f"valid options: {listed}" + "".join(f"; {hint}" for key, hint in ADDED_OPTIONS.items() if key in options)


def budget_of(cfg: DictConfig) -> Budget:
    tokens, convention, retain = cfg.budget, cfg.budget_convention, cfg.get("retain")
    per = cfg.get("budget_per") or "image"
    if convention not in CONVENTIONS:
        raise ConfigError(f"budget_convention must be one of {', '.join(CONVENTIONS)}, got {convention!r}")
    if per not in ("image", "view"):
        raise ConfigError(f"budget_per must be image or view (each crop of a LLaVA-NeXT image), got {per!r}")
    if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int)):
        raise ConfigError(f"budget must be a whole number of vision tokens (or null), got {tokens!r}")
    if retain is None:
        return Budget(tokens, convention, per=per)
    if tokens is not None:
        raise ConfigError(f"give budget (vision tokens) or retain (a fraction of them), not both: got budget={tokens} "
                          f"and retain={retain}")
    if isinstance(retain, bool) or not isinstance(retain, (int, float)) or not 0 < retain <= 1:
        raise ConfigError(f"retain must be a fraction of each image's vision tokens in (0, 1], got {retain!r}")
    from harness.adapters import adapter_of

    # Where every image has the same count, the fraction is a token count before loading (reference schedules).
    fixed = "model" in cfg and adapter_of(cfg.model).fixed_vision_tokens
    return Budget(round(retain * cfg.model.num_vision_tokens) if fixed else None, convention, float(retain), per)


def build_pruner(cfg: DictConfig) -> TokenPruner:
    """The configured method, its options checked by name and type."""
    options = OmegaConf.to_container(cfg.method, resolve=True)
    name = options.pop("name", None)
    options.pop("label", None)
    if name not in METHODS:
        raise ConfigError(f"unknown method {name!r}; valid choices: {', '.join(sorted(METHODS))}")
    cls = METHODS[name]
    fields = method_options(cls)
    for key, value in options.items():
        if key not in fields:
            raise ConfigError(f"unknown option {key!r} for method {name}; {valid_options(cls)}")
        default = fields[key].default
        if default not in (dataclasses.MISSING, None) and not _has_type(value, type(default)):
            raise ConfigError(f"method {name} option {key} must be {type(default).__name__}, got {value!r}")
    return cls(**options, budget=budget_of(cfg))


def _has_type(value, expected: type) -> bool:
    if isinstance(value, bool) and expected is not bool:
        return False
    if expected is tuple:  # list options (e.g. VisiPruner's mode) arrive from YAML as lists
        return isinstance(value, (list, tuple))
    return isinstance(value, (int, float) if expected is float else expected)


def validate(cfg: DictConfig) -> TokenPruner:
    """Everything that can be checked without loading a model; returns the configured pruner."""
    from harness import models
    from harness.adapters import adapter_of
    from harness.evaluate import check_task

    for group in GROUPS:
        if group not in cfg:
            raise ConfigError(f"config group {group!r} is missing; choices: {choices_message(group)}")
    if not isinstance(cfg.batch_size, int) or cfg.batch_size < 1:
        raise ConfigError(f"batch_size must be a positive whole number, got {cfg.batch_size!r}")
    if not isinstance(cfg.get("record_selections"), bool):
        raise ConfigError(f"record_selections must be true or false, got {cfg.get('record_selections')!r}")
    if cfg.get("flops") not in FLOPS_SOURCES:
        raise ConfigError(f"flops must be one of {', '.join(FLOPS_SOURCES)}, got {cfg.get('flops')!r}")
    if cfg.model.get("dtype") not in ("auto", "float32", "float16", "bfloat16"):
        raise ConfigError(f"model.dtype must be auto, float32, float16 or bfloat16, got {cfg.model.get('dtype')!r}")
    pruner = build_pruner(cfg)
    try:
        pruner.validate(num_vision=cfg.model.num_vision_tokens, num_layers=cfg.model.num_layers)
        if cfg.batch_size > 1 and not pruner.supports_batching:
            raise ConfigError(f"method {pruner.name} supports batch size 1 only (it decides per sample); "
                              f"set batch_size=1, got {cfg.batch_size}")
        adapter_of(cfg.model).check_method(pruner, cfg.batch_size)
        if cfg.batch_size > 1 and not adapter_of(cfg.model).fixed_vision_tokens and cfg.flops != "projected":
            # The counters see a batch whole: its mean is each sample's only where every row runs the same.
            raise ConfigError(f"flops={cfg.flops} counts a batch as a whole, whose rows may hold images of different "
                              f"sizes on {adapter_of(cfg.model).title}: set batch_size=1 or flops=projected")
    except ConfigError as error:
        raise Refusal(str(error), pruner) from None
    if cfg.model.source == "hf":
        models.checkpoint_dir(cfg.model)
    if type(pruner).check_model is not TokenPruner.check_model:
        pruner.check_model(models.model_config(cfg.model))
    check_task(cfg.task)
    return pruner


def compose(overrides: list[str]) -> DictConfig:
    """The configuration `python -m harness <overrides>` would run (for the lmms-eval entry point and tests)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose("config", overrides=overrides)


def check_overrides(overrides: list[str]) -> None:
    """Check command-line overrides before Hydra runs: unknown group choices and unknown keys get a message naming
    the valid ones, then the composed config is validated. Sweeps (`-m a=1,2`) are checked per job instead."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    if any(o.is_sweep_override() for o in parsed):
        return
    groups = {}
    for override in parsed:
        key = override.key_or_group
        if key in GROUPS and not override.is_delete():
            value = override.value()
            if value not in group_choices(key):
                raise ConfigError(f"unknown {key} {value!r}; valid choices: {choices_message(key)}")
            groups[key] = value
    plain = [o for o in parsed if o.key_or_group not in GROUPS and not o.key_or_group.startswith("hydra")
             and not o.is_add() and not o.is_force_add() and not o.is_delete()]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = compose("config", overrides=[f"{k}={v}" for k, v in groups.items()])
        for override in plain:
            key = override.key_or_group
            parent, _, leaf = key.rpartition(".")
            node = OmegaConf.select(base, parent) if parent else base
            if not isinstance(node, DictConfig) or leaf not in node.keys():
                raise ConfigError(_unknown_key_message(key, parent, node, base))
        cfg = compose("config", overrides=overrides)
    validate(cfg)


def _unknown_key_message(key: str, parent: str, node, base: DictConfig) -> str:
    if parent == "method":
        method = base.method.name
        return f"unknown option {key.split('.')[-1]!r} for method {method}; {valid_options(METHODS[method])}"
    if isinstance(node, DictConfig):
        where = f"under {parent!r}" if parent else "at the top level"
        return f"unknown key {key!r}; valid keys {where}: {', '.join(sorted(str(k) for k in node))}"
    return f"unknown key {key!r}; valid top-level keys: {', '.join(sorted(str(k) for k in base))}"
