"""Causality checker: influence matrices of output frames over input frames, and leak localisation."""

from causalize.verify.influence import CausalityReport, check_causality, influence_matrix, rerandomize_zero_params

__all__ = ["CausalityReport", "check_causality", "influence_matrix", "rerandomize_zero_params"]
