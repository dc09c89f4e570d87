"""Weight transfer from a symmetric "same" temporal kernel to a causal one (METHOD.md §4.2).

A pretrained kernel of size k = 2m+1 reads offsets -m..m (index κ reads offset κ-m). The causal
kernel keeps the same shape but, after left padding by 2m·d, index κ reads lag 2m-κ. A strategy
says what the causal taps w'_{-j} (j = lag) are:

- ``shift``:          w'_{-j} = w_{m-j}, i.e. the tensor is unchanged (whole kernel delayed m·d);
- ``masked``:         w'_{-j} = w_{-j} for j <= m, 0 otherwise (future taps dropped);
- ``extrapolative``:  future inputs are predicted by an OLS line through the last p inputs and
  their taps folded onto the past: w'_{-j} = 1[j<=m]·w_{-j} + 1[j<=p-1]·Σ_i γ_{i,j}·w_{+i}.

The bias never changes (β_i = 0 for OLS).
"""

from __future__ import annotations

import operator

import torch

__all__ = ["TRANSFERS", "ols_coefficients", "transfer_kernel", "transfer_matrix"]

TRANSFERS: tuple[str, ...] = ("shift", "masked", "extrapolative")


def _as_int(value: object, name: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    return operator.index(value)


def ols_coefficients(m: int, p: int) -> torch.Tensor:
    """γ of shape (m, p), float64: γ[i-1, j] weights z_{t-j·d} in the prediction of z_{t+i·d}.

    The OLS line through the last p points, evaluated i steps ahead, is a linear combination of
    those points; its weights sum to 1 so the intercept β_i vanishes. p == 1 holds the last frame.
    """
    m, p = _as_int(m, "m"), _as_int(p, "p")
    if m < 0:
        raise ValueError(f"half-width m must be >= 0, got m={m}")
    if not 1 <= p <= 2 * m + 1:
        raise ValueError(
            f"extrapolation window p={p} is out of range for half-width m={m}: need "
            f"1 <= p <= 2m+1 = {2 * m + 1} (the p past taps must fit in the causal kernel)"
        )
    if p == 1:
        return torch.ones(m, 1, dtype=torch.float64)
    i = torch.arange(1, m + 1, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(p, dtype=torch.float64).unsqueeze(0)
    centre = (p - 1) / 2
    spread = p * (p * p - 1) / 12  # S = Σ_j (τ_j − μ)²
    return 1.0 / p + (i + centre) * (centre - j) / spread


def transfer_matrix(k: int, strategy: str, p: int = 2) -> torch.Tensor:
    """Float64 (k, k) matrix A with w'[κ'] = Σ_κ A[κ', κ]·w[κ] along the temporal kernel axis.

    Rows are causal indices (lag 2m-κ'), columns original indices (offset κ-m). Writing the
    transfer as a matrix keeps it data-independent, so it also works on meta tensors.
    """
    k = _as_int(k, "kernel size")
    if k < 1 or k % 2 == 0:
        raise ValueError(f"temporal kernel size must be odd (k = 2m+1) for a symmetric 'same' kernel, got k={k}")
    if strategy not in TRANSFERS:
        raise ValueError(f"unknown weight transfer {strategy!r}; valid: {', '.join(TRANSFERS)}")
    m = (k - 1) // 2
    if strategy == "shift":
        return torch.eye(k, dtype=torch.float64)
    matrix = torch.zeros(k, k, dtype=torch.float64)
    for lag in range(m + 1):  # past and present taps keep their lag
        matrix[2 * m - lag, m - lag] = 1.0
    if strategy == "extrapolative" and m > 0:
        gamma = ols_coefficients(m, p)
        for i in range(1, m + 1):
            for lag in range(gamma.shape[1]):
                matrix[2 * m - lag, m + i] += gamma[i - 1, lag]
    return matrix


def transfer_kernel(weight: torch.Tensor, axis: int, strategy: str, p: int = 2) -> torch.Tensor:
    """Return a new tensor like ``weight`` whose kernel axis ``axis`` is remapped to causal taps.

    Computed in float64 and cast back, so that folding taps loses no precision before the final
    rounding. A size-1 kernel has no future taps and is returned unchanged (p is not checked).
    """
    if strategy not in TRANSFERS:
        raise ValueError(f"unknown weight transfer {strategy!r}; valid: {', '.join(TRANSFERS)}")
    axis = _as_int(axis, "axis")
    if not -weight.ndim <= axis < weight.ndim:
        raise ValueError(f"axis {axis} out of range for a weight with {weight.ndim} dims")
    axis %= weight.ndim
    k = weight.shape[axis]
    matrix = transfer_matrix(k, strategy, p if k > 1 else 1)
    if strategy == "shift" or k == 1:  # the identity: copied, so the kernel stays bit for bit (-0.0, inf)
        return torch.empty_like(weight).copy_(weight)
    # float64 is unsupported on MPS; compute on the CPU there.
    device = torch.device("cpu") if weight.device.type == "mps" else weight.device
    moved = weight.movedim(axis, -1).to(device=device, dtype=torch.float64)
    result = (moved @ matrix.to(device).T).to(weight.dtype).movedim(-1, axis)
    return torch.empty_like(weight).copy_(result)
