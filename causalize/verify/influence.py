"""The influence matrix M[i, j] = max |Δ output frame i| when only what belongs to input frame j moves.

A model is causal iff M[i, j] == 0 whenever j's causal block lies after i's (exactly: masked keys
and causal conv taps contribute exact zeros in fp32 and in bf16, on CPU and GPU). The diagonal
must move, or the probe proves nothing. Zero-initialised layers hide leaks, so structural checks
re-randomise all-zero parameters. The probe runs on the model itself, in its own dtype and on its
own device, and gives it back unchanged (zeros restored, modes restored): a 14B model needs no
second copy.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from causalize.layout import FrameLayout, per_frame_max_abs
from causalize.verify.localize import localize_leak
from causalize.verify.probe import Forward, as_model_inputs, perturb_frame, rerandomize_zero_params


@contextmanager
def probing(model: nn.Module, *, rerandomize: bool = True, seed: int = 0) -> Iterator[int]:
    """The model as a probe, in place: eval mode, all-zero parameters re-randomised (their count is
    yielded); on exit the zeros and every module's training flag are restored exactly."""
    modes = [(m, m.training) for m in model.modules()]
    names: list[str] = []
    try:
        model.eval()
        names = rerandomize_zero_params(model, seed=seed) if rerandomize else []
        yield len(names)
    finally:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name in names:
                params[name].zero_()
        for m, training in modes:
            m.training = training


@torch.no_grad()
def influence_matrix(
    model: nn.Module, inputs: dict[str, Any], layout: FrameLayout, forward: Forward, seed: int = 0
) -> torch.Tensor:
    """(T_out, T_in) float64 matrix of max |Δ output frame i| after perturbing input frame j."""
    inputs = as_model_inputs(model, inputs)
    base = forward(model, inputs)
    frames = layout.num_frames(inputs)
    cols = []
    for j in range(frames):
        gen = torch.Generator().manual_seed(seed * 1000 + j + 1)
        out = forward(model, perturb_frame(inputs, layout, j, gen))
        cols.append(per_frame_max_abs(out - base, layout.output_axis))
    return torch.stack(cols, dim=1)


@dataclass
class CausalityReport:
    """The result of one causality check, as data (for the CLI, the pytest plugin and JSON)."""

    matrix: torch.Tensor
    block_size: int
    tolerance: float
    violations: list[tuple[int, int, float]]
    inert: list[int]
    culprits: list[dict[str, Any]] = field(default_factory=list)
    localization_note: str = ""
    rerandomized: int = 0
    #: what was probed: "model" (the weights given), or "shrunken copy" (same class and config
    #: flags, the plan's tiny sizes, random weights: a proof for the structure, not the weights)
    subject: str = "model"

    @property
    def passed(self) -> bool:
        return not self.violations and not self.inert

    @property
    def max_leak(self) -> float:
        return max((v for _, _, v in self.violations), default=0.0)

    @property
    def culprit(self) -> dict[str, Any] | None:
        return self.culprits[0] if self.culprits else None

    def summary(self) -> str:
        text = self._verdict()
        return text if self.subject == "model" else f"{text} [probed on a {self.subject}]"

    def _verdict(self) -> str:
        if self.passed and self.block_size > 1:
            return (
                f"block-causal: no output frame depends on an input frame of a later block of {self.block_size} frames "
                f"(max leak 0); frames inside a block see each other, so frame-level causality is not claimed"
            )
        if self.passed:
            return "causal: no output frame depends on a later input frame (max leak 0)"
        parts = []
        if self.violations:
            i, j, v = max(self.violations, key=lambda x: x[2])
            parts.append(f"LEAK: output frame {i} moves by {v:.3g} when input frame {j} changes")
        if self.inert:
            parts.append(f"probe ineffective: perturbing frames {self.inert} did not move their own output")
        if self.culprit:
            parts.append(f"first leaking module: {self.culprit['path']} ({self.culprit['class']})")
        elif self.localization_note:
            parts.append(self.localization_note)
        return "; ".join(parts)

    def format_matrix(self) -> str:
        """Rows: output frames; columns: perturbed input frames. '!' marks a violation."""
        bad = {(i, j) for i, j, _ in self.violations}
        t_out, t_in = self.matrix.shape
        head = "out\\in " + " ".join(f"{j:>9d}" for j in range(t_in))
        lines = [head]
        for i in range(t_out):
            cells = []
            for j in range(t_in):
                v = float(self.matrix[i, j])
                s = "0" if v == 0 else f"{v:.2e}"
                cells.append(f"{s + ('!' if (i, j) in bad else ''):>9s}")
            lines.append(f"{i:>7d} " + " ".join(cells))
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "block_size": self.block_size,
            "tolerance": self.tolerance,
            "max_leak": self.max_leak,
            "matrix": [[float(v) for v in row] for row in self.matrix],
            "violations": [{"output_frame": i, "input_frame": j, "max_abs": v} for i, j, v in self.violations],
            "inert_frames": self.inert,
            "culprit": self.culprit,
            "culprits": self.culprits,
            "localization_note": self.localization_note,
            "rerandomized_zero_params": self.rerandomized,
            "subject": self.subject,
            "summary": self.summary(),
        }


def judge(matrix: torch.Tensor, block_size: int, tolerance: float) -> tuple[list[tuple[int, int, float]], list[int]]:
    """Violations (i, j, value) with j's block after i's and value > tolerance; inert diagonal frames."""
    violations, inert = [], []
    t_out, t_in = matrix.shape
    for i in range(t_out):
        for j in range(t_in):
            v = float(matrix[i, j])
            if j // block_size > i // block_size and v > tolerance:
                violations.append((i, j, v))
    for j in range(min(t_out, t_in)):
        if float(matrix[j, j]) <= tolerance:
            inert.append(j)
    return violations, inert


def check_causality(
    model: nn.Module,
    inputs: dict[str, Any],
    layout: FrameLayout,
    forward: Forward | None = None,
    *,
    tolerance: float = 0.0,
    seed: int = 0,
    rerandomize: bool = True,
    localize: bool = True,
    dtype: torch.dtype | str | None = None,
) -> CausalityReport:
    """Measure whether future frames influence past outputs; name the first leaking module if so.

    Runs in the model's own dtype on its own device, in eval mode, with zero parameters
    re-randomised unless `rerandomize=False`; the model is given back unchanged. `dtype` probes
    in another dtype: on a cast copy (the model itself is never cast).
    """
    from causalize.plan import default_forward
    from causalize.precision import model_dtype, parse_dtype, to_precision

    forward = forward or default_forward
    dtype = parse_dtype(dtype)
    probe = model
    if dtype is not None and dtype != model_dtype(model):
        probe = to_precision(copy.deepcopy(model), dtype)
    with probing(probe, rerandomize=rerandomize, seed=seed) as n_rand:
        matrix = influence_matrix(probe, inputs, layout, forward, seed=seed)
        violations, inert = judge(matrix, layout.block_size, tolerance)
        report = CausalityReport(matrix, layout.block_size, tolerance, violations, inert, rerandomized=n_rand)
        if violations and localize:
            j = max(j for _, j, _ in violations)
            report.culprits, report.localization_note = localize_leak(
                probe, as_model_inputs(probe, inputs), layout, forward, j, seed=seed
            )
    return report
