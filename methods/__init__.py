"""Token-pruning methods: one small file each, all on the `TokenPruner` interface of `methods.base`."""

from methods.base import Budget, ConfigError, Probe, ScorerPruner, Selection, TokenPruner
from methods.random import RandomPruner
from methods.visipruner import VisiPruner

METHODS: dict[str, type[TokenPruner]] = {cls.name: cls for cls in (TokenPruner, RandomPruner, VisiPruner)}

__all__ = ["METHODS", "Budget", "ConfigError", "Probe", "RandomPruner", "ScorerPruner", "Selection", "TokenPruner",
           "VisiPruner"]
