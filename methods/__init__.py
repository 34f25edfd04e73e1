"""Token-pruning methods: one small file each, all on the `TokenPruner` interface of `methods.base`."""

from methods.base import Budget, ConfigError, Probe, ScorerPruner, Selection, TokenPruner
from methods.cdpruner import CDPruner
from methods.divprune import DivPrune
from methods.fastv import FastV
from methods.holov import HoloV
from methods.pdrop import PDrop
from methods.random import RandomPruner
from methods.sparsevlm import SparseVLM
from methods.visionzip import VisionZip
from methods.visipruner import VisiPruner

METHODS: dict[str, type[TokenPruner]] = {
    cls.name: cls for cls in (TokenPruner, RandomPruner, FastV, SparseVLM, PDrop, VisionZip, VisiPruner, DivPrune,
                              HoloV, CDPruner)
}

__all__ = ["METHODS", "Budget", "CDPruner", "ConfigError", "DivPrune", "FastV", "HoloV", "PDrop", "Probe",
           "RandomPruner", "ScorerPruner", "Selection", "SparseVLM", "TokenPruner", "VisiPruner", "VisionZip"]
