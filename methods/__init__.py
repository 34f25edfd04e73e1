"""Token-pruning methods: one small file each, all on the `TokenPruner` interface of `methods.base`."""

from methods.base import Budget, ConfigError, Probe, ScorerPruner, Selection, TokenPruner
from methods.cdpruner import CDPruner
from methods.dart import DART
from methods.divprune import DivPrune
from methods.fastv import FastV
from methods.holov import HoloV
from methods.pdrop import PDrop
from methods.prumerge import PruMerge
from methods.random import RandomPruner
from methods.sparsevlm import SparseVLM
from methods.visionzip import VisionZip
from methods.visipruner import VisiPruner
from methods.vispruner import VisPruner

METHODS: dict[str, type[TokenPruner]] = {
    cls.name: cls for cls in (TokenPruner, RandomPruner, FastV, SparseVLM, PDrop, VisionZip, VisiPruner, DART,
                              DivPrune, VisPruner, HoloV, PruMerge, CDPruner)
}

__all__ = ["DART", "METHODS", "Budget", "CDPruner", "ConfigError", "DivPrune", "FastV", "HoloV", "PDrop", "Probe",
           "PruMerge", "RandomPruner", "ScorerPruner", "Selection", "SparseVLM", "TokenPruner", "VisPruner",
           "VisiPruner", "VisionZip"]
