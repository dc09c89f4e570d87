"""`assert_causal` / `assert_leaks`: causality checks as test assertions.

Three ways to call them:

* a registered diffusers model: ``assert_causal(model)`` picks the plan by class and builds the
  plan's example inputs (``frames`` of them);
* any ``nn.Module`` with explicit inputs: ``assert_causal(m, {"x": x}, frame_axes={"x": 1},
  output_axis=1)``; the forward is ``m(**inputs)``, taking the tensor it returns (or the first
  element of a tuple / list / diffusers output);
* any of the above with an explicit ``forward(model, inputs) -> Tensor``.

``inputs`` may also be a callable ``inputs(frames) -> dict``, so that the frame count chosen by
the pytest plugin (``--causalize-frames``, ``@pytest.mark.causal(frames=...)``) reaches models
that are not registered.

On failure an ``AssertionError`` (``CausalityCheckFailed``, carrying ``.report``) is raised whose
message holds the verdict, the influence matrix and the leaking module: what pytest prints.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from causalize.layout import FrameLayout
    from causalize.plan import Plan
    from causalize.verify import CausalityReport

DEFAULT_FRAMES = 4

Inputs = Mapping[str, Any] | Callable[[int], Mapping[str, Any]] | None
Forward = Callable[["nn.Module", dict], "torch.Tensor"]

__all__ = ["CausalityCheckFailed", "assert_causal", "assert_leaks", "module_forward", "DEFAULT_FRAMES"]


class CausalityCheckFailed(AssertionError):
    """A causality assertion failed; `.report` is the CausalityReport it was judged on."""

    def __init__(self, message: str, report: CausalityReport | None = None):
        super().__init__(message)
        self.report = report


def module_forward(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """`model(**inputs)`, reduced to one tensor: the tensor itself, or the first element of a
    tuple / list / diffusers BaseOutput."""
    import torch

    out = model(**inputs)
    if hasattr(out, "to_tuple") and not torch.is_tensor(out):
        out = out.to_tuple()
    if isinstance(out, (tuple, list)):
        out = out[0]
    if not torch.is_tensor(out):
        raise TypeError(
            f"{type(model).__name__}(**inputs) returned {type(out).__name__}, not a tensor; "
            "pass forward=lambda model, inputs: <the output frames tensor>"
        )
    return out


def _resolve(
    model: nn.Module,
    inputs: Inputs,
    plan: str | Plan | None,
    layout: FrameLayout | None,
    frame_axes: Mapping[str, int] | None,
    output_axis: int | None,
    block_size: int | None,
    forward: Forward | None,
    frames: int,
    seed: int,
) -> tuple[dict[str, Any], FrameLayout, Forward]:
    """The concrete inputs, layout and forward of one check (see the module docstring)."""
    from dataclasses import replace

    from causalize.layout import FrameLayout

    if callable(inputs) and not isinstance(inputs, Mapping):
        inputs = inputs(frames)
    the_plan = None
    explicit_layout = layout is not None or frame_axes is not None
    if plan is not None or inputs is None or not explicit_layout:
        from causalize.api import example_inputs, plan_for
        from causalize.errors import NoPlanError

        try:
            the_plan = plan_for(model, plan)
        except NoPlanError as exc:
            if inputs is None:
                raise TypeError(
                    f"{type(model).__name__} has no registered causalize plan, so assert_causal cannot build "
                    "its inputs: pass inputs={name: tensor}, frame_axes={name: axis} and output_axis=axis "
                    f"(or plan=...). [{exc}]"
                ) from None
            raise TypeError(
                f"{type(model).__name__} has no registered causalize plan: say where the frames are with "
                "frame_axes={name: axis} and output_axis=axis (or layout=FrameLayout(...))"
            ) from None
        if inputs is None:
            least = max(2, the_plan.min_frames)
            if frames < least:
                raise ValueError(f"frames={frames}: plan '{the_plan.name}' needs at least {least} frames")
            inputs = example_inputs(model, the_plan, frames, seed)

    if layout is None:
        if frame_axes is not None:
            if output_axis is None:
                raise TypeError("frame_axes= needs output_axis= (the frame axis of the model's output)")
            layout = FrameLayout(inputs=dict(frame_axes), output_axis=output_axis, block_size=block_size or 1)
        else:
            layout = the_plan.layout  # type: ignore[union-attr]
    if output_axis is not None and output_axis != layout.output_axis:
        layout = replace(layout, output_axis=output_axis)
    if block_size is not None and block_size != layout.block_size:
        layout = replace(layout, block_size=block_size)
    if layout.block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {layout.block_size}")
    if forward is None:
        forward = the_plan.forward if the_plan is not None else module_forward
    inputs = dict(inputs)
    _check_inputs(inputs, layout)
    return inputs, layout, forward


def _check_inputs(inputs: dict[str, Any], layout: FrameLayout) -> None:
    import torch

    if not layout.inputs:
        raise ValueError("the layout names no per-frame input (frame_axes is empty)")
    counts = {}
    for name, axis in layout.inputs.items():
        if name not in inputs:
            raise KeyError(f"frame input '{name}' is not among the inputs {sorted(inputs)}")
        x = inputs[name]
        if not torch.is_tensor(x) or not x.is_floating_point():
            raise TypeError(f"frame input '{name}' must be a floating-point tensor, got {type(x).__name__}")
        if not -x.dim() <= axis < x.dim():
            raise ValueError(f"frame axis {axis} of '{name}' is out of range for shape {tuple(x.shape)}")
        counts[name] = int(x.shape[axis])
    if len(set(counts.values())) != 1:
        raise ValueError(f"frame inputs disagree on the number of frames: {counts}")
    if next(iter(counts.values())) < 2:
        raise ValueError(f"a causality check needs at least 2 frames, got {counts}")


def _check(
    model,
    inputs,
    *,
    plan,
    layout,
    frame_axes,
    output_axis,
    block_size,
    forward,
    frames,
    tolerance,
    seed,
    rerandomize,
    localize,
) -> CausalityReport:
    from causalize.verify import check_causality

    inputs, layout, forward = _resolve(
        model, inputs, plan, layout, frame_axes, output_axis, block_size, forward, frames, seed
    )
    return check_causality(
        model, inputs, layout, forward, tolerance=tolerance, seed=seed, rerandomize=rerandomize, localize=localize
    )


def _explain(report: CausalityReport, model: Any) -> str:
    """The body of a failure message: matrix with its legend, culprits, and what to do."""
    lines = [
        f"influence matrix of {type(model).__name__} (rows: output frames; columns: perturbed input frames; "
        f"'!' = violation; block size {report.block_size}, tolerance {report.tolerance:g}):",
        report.format_matrix(),
    ]
    if report.culprits:
        c = report.culprits[0]
        lines.append(
            f"culprit: {c['path']} ({c['class']}) - the first module whose past-frame output moved "
            "although its past-frame input did not"
        )
        for other in report.culprits[1:]:
            lines.append(f"  also leaking: {other['path']} ({other['class']})")
    elif report.violations and report.localization_note:
        lines.append(report.localization_note)
    if report.inert:
        lines.append(
            f"probe ineffective at frames {report.inert}: perturbing input frame j did not move output frame j, so "
            "the check proves nothing there (the output ignores that input, or frame_axes / output_axis are wrong)"
        )
    if report.rerandomized:
        lines.append(f"({report.rerandomized} all-zero parameters were re-randomised on the probe copy)")
    return "\n".join(lines)


def assert_causal(
    model: nn.Module,
    inputs: Inputs = None,
    *,
    plan: str | Plan | None = None,
    layout: FrameLayout | None = None,
    frame_axes: Mapping[str, int] | None = None,
    output_axis: int | None = None,
    block_size: int | None = None,
    forward: Forward | None = None,
    frames: int = DEFAULT_FRAMES,
    tolerance: float = 0.0,
    seed: int = 0,
    rerandomize: bool = True,
    localize: bool = True,
) -> CausalityReport:
    """Assert that no output frame of `model` depends on a later input frame; return the report.

    inputs: keyword arguments of the forward (or a callable frames -> dict); None = the plan's
        example inputs with `frames` frames (the model's class must have a registered plan).
    plan: plan name or Plan (default: the one registered for the model's class, if any).
    layout / frame_axes + output_axis: where the frames are; default: the plan's layout.
    block_size: frames that may see each other (None = the layout's, else 1).
    forward: forward(model, inputs) -> output tensor; default: the plan's, else `model(**inputs)`.
    tolerance: largest |Δ| still counted as no influence (0 = exact, for fp32 on CPU).
    The model is not modified: the check runs on an fp32 eval copy whose all-zero parameters are
    re-randomised (`rerandomize=False` to keep them).

    Raises CausalityCheckFailed (an AssertionError) on a leak or when the probe is ineffective.
    """
    __tracebackhide__ = True
    report = _check(
        model,
        inputs,
        plan=plan,
        layout=layout,
        frame_axes=frame_axes,
        output_axis=output_axis,
        block_size=block_size,
        forward=forward,
        frames=frames,
        tolerance=tolerance,
        seed=seed,
        rerandomize=rerandomize,
        localize=localize,
    )
    if not report.passed:
        raise CausalityCheckFailed(
            f"{type(model).__name__} is not causal: {report.summary()}\n{_explain(report, model)}", report
        )
    return report


def assert_leaks(
    model: nn.Module,
    inputs: Inputs = None,
    *,
    plan: str | Plan | None = None,
    layout: FrameLayout | None = None,
    frame_axes: Mapping[str, int] | None = None,
    output_axis: int | None = None,
    block_size: int | None = None,
    forward: Forward | None = None,
    frames: int = DEFAULT_FRAMES,
    tolerance: float = 0.0,
    seed: int = 0,
    rerandomize: bool = True,
    localize: bool = False,
) -> CausalityReport:
    """Negative control: assert that some output frame DOES depend on a later input frame.

    Same arguments as `assert_causal` (localisation is off by default: pass localize=True to get
    `report.culprit`). An ineffective probe alone is not a leak, nor is a non-finite one. Returns the report.
    """
    __tracebackhide__ = True
    report = _check(
        model,
        inputs,
        plan=plan,
        layout=layout,
        frame_axes=frame_axes,
        output_axis=output_axis,
        block_size=block_size,
        forward=forward,
        frames=frames,
        tolerance=tolerance,
        seed=seed,
        rerandomize=rerandomize,
        localize=localize,
    )
    if not report.violations or report.nonfinite:  # a NaN / inf probe proves no leak either
        why = (
            "no output frame depends on a later input frame"
            if not report.inert and not report.nonfinite
            else f"no leak found ({report.summary()})"
        )
        raise CausalityCheckFailed(
            f"expected {type(model).__name__} to leak, but {why}\n{_explain(report, model)}", report
        )
    return report
