"""The influence matrix M[i, j] = max |Δ output frame i| when only what belongs to input frame j moves.

A model is causal iff M[i, j] == 0 whenever j's causal block lies after i's (exactly: masked keys
and causal conv taps contribute exact zeros in fp32 and in bf16, on CPU and GPU). The diagonal
must move, or the probe proves nothing. Every output must be finite: NaN compares False with
everything, so a NaN matrix would pass both tests; a non-finite probe fails on its own account.
Zero-initialised layers hide leaks, so structural checks re-randomise all-zero parameters. The
probe runs on the model itself, in its own dtype and on its own device, and gives it back
unchanged (zeros restored, modes restored): a 14B model needs no second copy.
"""

from __future__ import annotations

import copy
import math
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
    return _influence(model, inputs, layout, forward, seed)[0]


def _nonfinite_frames(x: torch.Tensor, axis: int) -> set[int]:
    bad = ~torch.isfinite(x.detach()).movedim(axis, 0).reshape(x.shape[axis], -1).all(dim=1)
    return {int(i) for i in bad.nonzero().flatten()}


@torch.no_grad()
def _influence(
    model: nn.Module, inputs: dict[str, Any], layout: FrameLayout, forward: Forward, seed: int = 0
) -> tuple[torch.Tensor, set[int], set[int]]:
    """The influence matrix, the output frames that are non-finite without perturbation, and those
    non-finite in some perturbed forward. Differences are taken in float64, so two finite outputs
    never give a non-finite (or rounded-away) difference in fp16 / bf16."""
    inputs = as_model_inputs(model, inputs)
    base = forward(model, inputs)
    axis = layout.output_axis
    base_bad, bad = _nonfinite_frames(base, axis), set()
    base64 = base.double()
    frames = layout.num_frames(inputs)
    cols = []
    for j in range(frames):
        gen = torch.Generator().manual_seed(seed * 1000 + j + 1)
        out = forward(model, perturb_frame(inputs, layout, j, gen))
        bad |= _nonfinite_frames(out, axis)
        cols.append(per_frame_max_abs(out.double() - base64, axis))
    return torch.stack(cols, dim=1), base_bad, bad - base_bad


@dataclass
class NonFinite:
    """Where the probe met NaN or infinity. Such a probe proves nothing (every comparison with NaN is
    False, so a NaN matrix would pass both the leak test and the "did the probe move" test), so it
    fails; the weights are named when they hold the non-finite values, since that is the usual cause."""

    #: probe inputs (from the plan, cast to the model's dtype) holding NaN or infinity
    inputs: list[str] = field(default_factory=list)
    #: output frames non-finite in the unperturbed forward
    base_frames: list[int] = field(default_factory=list)
    #: further output frames that became non-finite when some input frame was perturbed
    frames: list[int] = field(default_factory=list)
    #: parameters / buffers of the probed model holding non-finite values (the first few), and their count
    params: list[str] = field(default_factory=list)
    params_total: int = 0

    def __bool__(self) -> bool:
        return bool(self.inputs or self.base_frames or self.frames)

    def describe(self) -> str:
        parts = []
        if self.inputs:
            parts.append(f"NON-FINITE probe inputs {', '.join(self.inputs)}")
        if self.base_frames:
            parts.append(
                f"NON-FINITE: the base output (nothing perturbed) is NaN or inf at output frames {self.base_frames}"
            )
        if self.frames:
            parts.append(f"NON-FINITE: output frames {self.frames} become NaN or inf when an input frame is perturbed")
        if self.params:
            more = f" and {self.params_total - 1} more tensors" if self.params_total > 1 else ""
            parts.append(f"the model's weights hold non-finite values: {self.params[0]}{more}")
        elif self.inputs:
            parts.append("the model's weights are all finite")
        else:
            parts.append("the model's weights are all finite (the forward overflows: try fp32, or check the inputs)")
        return "; ".join(parts) + "; a non-finite probe proves nothing"

    def to_json(self) -> dict[str, Any]:
        return {
            "inputs": self.inputs,
            "base_output_frames": self.base_frames,
            "perturbed_output_frames": self.frames,
            "weights": self.params,
            "weights_total": self.params_total,
        }


def nonfinite_tensors(model: nn.Module, limit: int = 5) -> tuple[list[str], int]:
    """Names of the model's floating parameters and buffers holding NaN or infinity (the first
    `limit`), and how many there are."""
    names, total = [], 0
    tensors = list(model.named_parameters()) + list(model.named_buffers())
    with torch.no_grad():
        for name, t in tensors:
            if t.is_floating_point() and not t.is_meta and not bool(torch.isfinite(t).all()):
                total += 1
                if len(names) < limit:
                    names.append(name)
    return names, total


def _nonfinite_inputs(inputs: dict[str, Any]) -> list[str]:
    return [
        k
        for k, v in inputs.items()
        if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())
    ]


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
    #: NaN / infinity met by the probe (empty: all finite)
    nonfinite: NonFinite = field(default_factory=NonFinite)

    @property
    def passed(self) -> bool:
        return not self.violations and not self.inert and not self.nonfinite

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
        parts = [self.nonfinite.describe()] if self.nonfinite else []
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
        """Rows: output frames; columns: perturbed input frames. '!' marks a violation; NaN and
        infinity print as nan / inf."""
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
            "matrix": [[_json_number(float(v)) for v in row] for row in self.matrix],
            "violations": [{"output_frame": i, "input_frame": j, "max_abs": v} for i, j, v in self.violations],
            "inert_frames": self.inert,
            "culprit": self.culprit,
            "culprits": self.culprits,
            "localization_note": self.localization_note,
            "nonfinite": self.nonfinite.to_json() if self.nonfinite else None,
            "rerandomized_zero_params": self.rerandomized,
            "subject": self.subject,
            "summary": self.summary(),
        }


def _json_number(v: float) -> float | str:
    """Strict JSON has no NaN or infinity: those entries become the strings "nan" / "inf"."""
    return v if math.isfinite(v) else str(v)


def judge(matrix: torch.Tensor, block_size: int, tolerance: float) -> tuple[list[tuple[int, int, float]], list[int]]:
    """Violations (i, j, value) with j's block after i's and value > tolerance; inert diagonal frames.

    Non-finite entries are neither (they are reported by `NonFinite`, which fails the check)."""
    violations, inert = [], []
    t_out, t_in = matrix.shape
    for i in range(t_out):
        for j in range(t_in):
            v = float(matrix[i, j])
            if j // block_size > i // block_size and math.isfinite(v) and v > tolerance:
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
    if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
        from causalize.errors import UsageError

        raise UsageError(f"tolerance must be a finite number >= 0, got {tolerance!r}")  # NaN would pass anything
    dtype = parse_dtype(dtype)
    probe = model
    if dtype is not None and dtype != model_dtype(model):
        probe = to_precision(copy.deepcopy(model), dtype)
    with probing(probe, rerandomize=rerandomize, seed=seed) as n_rand:
        matrix, base_bad, bad = _influence(probe, inputs, layout, forward, seed=seed)
        violations, inert = judge(matrix, layout.block_size, tolerance)
        report = CausalityReport(matrix, layout.block_size, tolerance, violations, inert, rerandomized=n_rand)
        report.nonfinite = NonFinite(_nonfinite_inputs(as_model_inputs(probe, inputs)), sorted(base_bad), sorted(bad))
        if report.nonfinite:
            report.nonfinite.params, report.nonfinite.params_total = nonfinite_tensors(probe)
        elif violations and localize:
            j = max(j for _, j, _ in violations)
            report.culprits, report.localization_note = localize_leak(
                probe, as_model_inputs(probe, inputs), layout, forward, j, seed=seed
            )
    return report
