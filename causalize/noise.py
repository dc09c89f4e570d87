"""The noise schedule and the x0 / ε / v conversions, shared by training and rollout (METHOD.md §6).

It lives outside ``causalize.training`` because inference must never import training code, yet
both have to use one definition of:

* the schedule: the "scaled_linear" betas of the base models, rescaled to zero terminal SNR
  (Lin et al.), stored as float64 ``alphas_cumprod``;
* the forward process with a noise level **per frame** (Diffusion Forcing): ``timesteps`` is
  always ``(B, T)`` and is broadcast along the frame axis of whatever layout the denoiser uses
  (``(B, T, ...)`` or diffusers' ``(B, C, T, H, W)``);
* the parameterisations: what a denoiser predicts ("v", "epsilon" or "sample", i.e. x0) and the
  one conversion between them (:func:`convert_prediction`, :meth:`NoiseSchedule.convert`).

With α = √ᾱ and σ = √(1−ᾱ) (so α² + σ² = 1): x_k = α·x0 + σ·ε and v = α·ε − σ·x0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "BETA_SCHEDULES",
    "PREDICTION_TYPES",
    "NoiseSchedule",
    "convert_prediction",
    "gaussian",
    "prediction_target",
    "rescale_zero_terminal_snr",
]

#: Valid ``prediction_type`` values. diffusers' name "v_prediction" is accepted as an alias of "v"
#: so that a scheduler config can be passed through unchanged.
PREDICTION_TYPES: tuple[str, ...] = ("v", "epsilon", "sample")
_PREDICTION_ALIASES = {"v_prediction": "v"}
BETA_SCHEDULES: tuple[str, ...] = ("scaled_linear", "linear")

Coefficient = torch.Tensor | float


# --------------------------------------------------------------------------------------------
# Conversions between parameterisations
# --------------------------------------------------------------------------------------------


def prediction_target(
    x0: torch.Tensor, noise: torch.Tensor, alpha: Coefficient, sigma: Coefficient, kind: str
) -> torch.Tensor:
    """What a denoiser of parameterisation ``kind`` should output for clean ``x0`` and ``noise``:
    v = α·ε − σ·x0, ε, or x0. The coefficients broadcast against the tensors (or are floats)."""
    kind = _prediction_type(kind)
    if kind == "v":
        return alpha * noise - sigma * x0
    return noise if kind == "epsilon" else x0


def convert_prediction(
    x_k: torch.Tensor,
    prediction: torch.Tensor,
    alpha: Coefficient,
    sigma: Coefficient,
    source: str,
    target: str,
    *,
    round_to: torch.dtype | None = None,
) -> torch.Tensor:
    """A ``source`` prediction at the noisy sample ``x_k`` as a ``target`` prediction
    (each of "v", "epsilon", "sample"; "v_prediction" = "v").

    x0 = α·x_k − σ·v = (x_k − σ·ε)/α;  ε = σ·x_k + α·v = (x_k − α·x0)/σ;  v = α·ε − σ·x0.
    From ε, x0 is undefined where α = 0 (the zero-SNR last step): the division gives inf/nan
    there, which is why v is the default. The tensors should share one (compute) dtype;
    ``round_to``: v from ε or x0 is composed from x0 and ε each rounded to this dtype first, the
    precision the caller's tensors carry.
    """
    source, target = _prediction_type(source), _prediction_type(target)
    if source == target:
        return prediction
    if target == "v":
        x0 = _round_through(convert_prediction(x_k, prediction, alpha, sigma, source, "sample"), round_to)
        eps = _round_through(convert_prediction(x_k, prediction, alpha, sigma, source, "epsilon"), round_to)
        return prediction_target(x0, eps, alpha, sigma, "v")
    if target == "sample":
        return alpha * x_k - sigma * prediction if source == "v" else (x_k - sigma * prediction) / alpha
    return sigma * x_k + alpha * prediction if source == "v" else (x_k - alpha * prediction) / sigma


def _round_through(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t if dtype is None else t.to(dtype).to(t.dtype)


# --------------------------------------------------------------------------------------------
# Schedule
# --------------------------------------------------------------------------------------------


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Rescale ᾱ so that the last step has zero SNR while the first step is unchanged (§6).

    √ᾱ'_k = (√ᾱ_k − √ᾱ_{K−1}) · √ᾱ_0 / (√ᾱ_0 − √ᾱ_{K−1}),  ᾱ'_k = (√ᾱ'_k)².

    Working on ᾱ directly (rather than round-tripping through β as diffusers does) keeps
    √ᾱ'_{K−1} exactly 0 and √ᾱ'_0 exactly √ᾱ_0 in float64. Why it matters: without it the base
    schedule ends at ᾱ ≈ 0.00466, so training never sees pure noise while sampling starts there.
    """
    ac = _as_float64_vector(alphas_cumprod, "alphas_cumprod")
    if ac.numel() < 2:
        raise ValueError(f"rescale_zero_terminal_snr needs at least 2 steps, got {ac.numel()}")
    sqrt_ac = ac.sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    if not bool(first > last):
        raise ValueError(f"rescale_zero_terminal_snr needs √ᾱ_0 > √ᾱ_{{K-1}}, got {first.item()} and {last.item()}")
    rescaled = (sqrt_ac - last) * (first / (first - last))
    rescaled[0] = first  # exact by construction; pin it against rounding
    rescaled[-1] = 0.0
    return rescaled.square()


_rescale_zero_terminal_snr = rescale_zero_terminal_snr  # from_config's flag shadows the name


def _as_float64_vector(values: Any, name: str) -> torch.Tensor:
    """A 1-D float64 CPU tensor from a tensor, numpy array or sequence (schedules are tiny)."""
    t = torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float64).clone()
    if t.ndim != 1:
        raise ValueError(f"{name} must be 1-D (one entry per training step), got shape {tuple(t.shape)}")
    return t


def _betas(num_train_timesteps: int, beta_start: float, beta_end: float, beta_schedule: str) -> torch.Tensor:
    """β_k in float64: "scaled_linear" squares a linspace of √β, "linear" is the plain linspace."""
    if beta_schedule == "scaled_linear":
        return torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    if beta_schedule == "linear":
        return torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    raise ValueError(f"unknown beta_schedule {beta_schedule!r}; valid: {', '.join(BETA_SCHEDULES)}")


@dataclass(frozen=True, eq=False)
class NoiseSchedule:
    """Discrete variance-preserving schedule ᾱ_0..ᾱ_{K−1}, plus the per-frame forward process.

    ``alphas_cumprod`` is held in float64 on the CPU; each call gathers the entries it needs for
    the given per-frame ``timesteps`` and casts them to the compute dtype on the data's device.
    """

    alphas_cumprod: torch.Tensor

    def __post_init__(self) -> None:
        ac = _as_float64_vector(self.alphas_cumprod, "alphas_cumprod")
        if ac.numel() == 0:
            raise ValueError("alphas_cumprod must have at least one entry")
        if not bool(torch.isfinite(ac).all()) or bool((ac < 0).any()) or bool((ac > 1).any()):
            raise ValueError("alphas_cumprod must be finite and lie in [0, 1]")
        object.__setattr__(self, "alphas_cumprod", ac)

    def __repr__(self) -> str:
        ac = self.alphas_cumprod
        return f"NoiseSchedule(K={ac.numel()}, alphas_cumprod[0]={ac[0].item():.6g}, alphas_cumprod[-1]={ac[-1].item():.6g})"

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_config(
        cls,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        rescale_zero_terminal_snr: bool = True,
    ) -> NoiseSchedule:
        """The Vid2World schedule by default (§6): β_k = linspace(√0.00085, √0.012, 1000)_k², then
        zero terminal SNR. "scaled_linear" is what the paper and DynamiCrafter call "linear";
        ``beta_schedule="linear"`` is the plain linspace(β_start, β_end)."""
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int):
            raise ValueError(  # noqa: TRY004
                f"num_train_timesteps must be an int, got {num_train_timesteps!r}"
            )
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}")
        if not (0.0 < beta_start < 1.0 and 0.0 < beta_end < 1.0):
            raise ValueError(f"beta_start and beta_end must lie in (0, 1), got {beta_start} and {beta_end}")
        betas = _betas(num_train_timesteps, beta_start, beta_end, beta_schedule)
        alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        if rescale_zero_terminal_snr:
            alphas_cumprod = _rescale_zero_terminal_snr(alphas_cumprod)
        return cls(alphas_cumprod)

    @classmethod
    def from_diffusers(cls, scheduler: Any) -> NoiseSchedule:
        """Adopt the ᾱ of any diffusers scheduler (DDIM, DDPM, Euler, ...) so training uses exactly
        the schedule the sampler will. Duck-typed: nothing from diffusers is imported."""
        ac = getattr(scheduler, "alphas_cumprod", None)
        if ac is None:
            raise ValueError(
                f"{type(scheduler).__name__} has no `alphas_cumprod`; pass a discrete diffusers "
                "scheduler (e.g. DDIMScheduler) or use NoiseSchedule.from_config"
            )
        return cls(ac)

    # ---- derived quantities ------------------------------------------------------------

    @property
    def num_train_timesteps(self) -> int:
        """K, the number of discrete training steps; valid timesteps are 0..K−1."""
        return int(self.alphas_cumprod.numel())

    @property
    def sqrt_alphas_cumprod(self) -> torch.Tensor:
        """√ᾱ_k (float64), the signal coefficient."""
        return self.alphas_cumprod.sqrt()

    @property
    def sqrt_one_minus_alphas_cumprod(self) -> torch.Tensor:
        """√(1−ᾱ_k) (float64), the noise coefficient; computed in float64 because 1−ᾱ_0 ≈ 8.5e-4."""
        return (1.0 - self.alphas_cumprod).sqrt()

    @property
    def betas(self) -> torch.Tensor:
        """β_k = 1 − ᾱ_k/ᾱ_{k−1} (β_0 = 1 − ᾱ_0), for samplers that want them."""
        ac = self.alphas_cumprod
        prev = torch.cat([ac.new_ones(1), ac[:-1]])
        return 1.0 - ac / prev

    @property
    def snr(self) -> torch.Tensor:
        """ᾱ/(1−ᾱ) per step (float64); 0 at the last step after the zero-terminal-SNR rescale."""
        return self.alphas_cumprod / (1.0 - self.alphas_cumprod)

    # ---- per-frame coefficients ---------------------------------------------------------

    def coefficients(
        self,
        timesteps: torch.Tensor,
        like: torch.Tensor,
        frame_axis: int = 1,
        dtype: torch.dtype | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(√ᾱ_{k_t}, √(1−ᾱ_{k_t})) for per-frame ``timesteps`` (B, T), shaped to broadcast against
        ``like`` (batch on axis 0, frames on ``frame_axis``), in ``dtype`` (default: float64 if
        ``like`` is float64, else float32)."""
        axis = frame_axis_index(like, frame_axis)
        self._check_timesteps(timesteps, like, axis)
        dtype = compute_dtype(like) if dtype is None else dtype
        idx = timesteps.to(device=like.device, dtype=torch.long)
        shape = [1] * like.ndim
        shape[0], shape[axis] = like.shape[0], like.shape[axis]
        a = self.sqrt_alphas_cumprod.to(device=like.device, dtype=dtype)[idx].reshape(shape)
        s = self.sqrt_one_minus_alphas_cumprod.to(device=like.device, dtype=dtype)[idx].reshape(shape)
        return a, s

    def _check_timesteps(self, timesteps: torch.Tensor, like: torch.Tensor, axis: int) -> None:
        """Timesteps index the schedule: integer (B, T) matching the data, within [0, K)."""
        if not isinstance(timesteps, torch.Tensor):
            raise ValueError(  # noqa: TRY004
                f"timesteps must be a torch.Tensor of shape (B, T), got {type(timesteps).__name__}"
            )
        if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool:
            raise ValueError(
                f"timesteps must be an integer tensor (they index the {self.num_train_timesteps}-step "
                f"schedule), got dtype {timesteps.dtype}"
            )
        expected = (like.shape[0], like.shape[axis])
        if timesteps.ndim != 2 or tuple(timesteps.shape) != expected:
            raise ValueError(
                f"timesteps must have shape (B, T) = {expected} to match data of shape {tuple(like.shape)} "
                f"with frame_axis={axis}, got timesteps of shape {tuple(timesteps.shape)}"
            )
        if timesteps.numel():
            lo, hi = int(timesteps.min()), int(timesteps.max())
            if lo < 0 or hi >= self.num_train_timesteps:
                raise ValueError(
                    f"timesteps out of range: got values in [{lo}, {hi}], valid range is "
                    f"[0, {self.num_train_timesteps - 1}]"
                )

    # ---- forward process and parameterisations ------------------------------------------

    def q_sample(
        self,
        x0: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        frame_axis: int = 1,
    ) -> torch.Tensor:
        """x_k = √ᾱ_{k_t}·x0 + √(1−ᾱ_{k_t})·ε, each frame t at its own level k_t (Diffusion Forcing).

        Computed in float32 (float64 if an input is float64); returned in the inputs' dtype."""
        check_same_shape(x0, noise, "x0", "noise")
        a, s = self.coefficients(timesteps, x0, frame_axis, compute_dtype(x0, noise))
        dtype = a.dtype
        out = a * x0.to(dtype) + s * noise.to(dtype)
        return out.to(_result_dtype(x0, noise))

    def target(
        self,
        x0: torch.Tensor,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        prediction_type: str = "v",
        frame_axis: int = 1,
    ) -> torch.Tensor:
        """Regression target for the parameterisation: v = √ᾱ·ε − √(1−ᾱ)·x0 (default), ε, or x0
        (see :func:`prediction_target`)."""
        kind = _prediction_type(prediction_type)
        check_same_shape(x0, noise, "x0", "noise")
        a, s = self.coefficients(timesteps, x0, frame_axis, compute_dtype(x0, noise))
        out = prediction_target(x0.to(a.dtype), noise.to(a.dtype), a, s, kind)
        return out.to(_result_dtype(x0, noise))

    def convert(
        self,
        x_k: torch.Tensor,
        model_out: torch.Tensor,
        timesteps: torch.Tensor,
        source: str = "v",
        target: str = "sample",
        frame_axis: int = 1,
    ) -> torch.Tensor:
        """The ``source`` prediction ``model_out`` at the noisy ``x_k`` (per-frame ``timesteps``)
        as a ``target`` prediction: e.g. x̂0 from v (the defaults), or v from ε for guidance.

        Computed in float32 (float64 if an input is float64); returned in the inputs' dtype.
        See :func:`convert_prediction` for the formulas."""
        source, target = _prediction_type(source), _prediction_type(target)
        check_same_shape(x_k, model_out, "x_k", "model_out")
        a, s = self.coefficients(timesteps, x_k, frame_axis, compute_dtype(x_k, model_out))
        out_dtype = _result_dtype(x_k, model_out)
        x, m = x_k.to(a.dtype), model_out.to(a.dtype)
        return convert_prediction(x, m, a, s, source, target, round_to=out_dtype).to(out_dtype)


# --------------------------------------------------------------------------------------------
# Validation and dtype helpers (also used by the training objective)
# --------------------------------------------------------------------------------------------


def _prediction_type(prediction_type: str) -> str:
    kind = _PREDICTION_ALIASES.get(prediction_type, prediction_type)
    if kind not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)} "
            "(diffusers' 'v_prediction' is accepted for 'v')"
        )
    return kind


def frame_axis_index(x: torch.Tensor, frame_axis: int) -> int:
    """Normalise a (possibly negative) frame axis; axis 0 is the batch and cannot hold frames."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}")  # noqa: TRY004
    if x.ndim < 2:
        raise ValueError(f"data must have a batch and a frame axis (ndim >= 2), got shape {tuple(x.shape)}")
    if isinstance(frame_axis, bool) or not isinstance(frame_axis, int) or not -x.ndim <= frame_axis < x.ndim:
        raise ValueError(f"frame_axis={frame_axis!r} is out of range for data of shape {tuple(x.shape)}")
    axis = frame_axis % x.ndim
    if axis == 0:
        raise ValueError(
            f"frame_axis={frame_axis} points at the batch axis of shape {tuple(x.shape)}; unfold a "
            "(B·T, ...) layout to (B, T, ...) first"
        )
    return axis


def check_same_shape(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    for name, t in ((name_a, a), (name_b, b)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")  # noqa: TRY004
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: {name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}")


def gaussian(
    shape: tuple[int, ...] | list[int] | torch.Size,
    generator: torch.Generator | None,
    device: torch.device | str | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """Standard normal noise drawn in float32 (float64 for float64) and cast to ``dtype``.

    torch draws half-precision normals from another stream than float32 ones, and which depends
    on the version (on the CPU, torch 2.11's bf16 draws differ from its float32 draws at 16
    values and more, 2.13's only past a multiple of 16): drawn in bf16, a bf16 rollout would
    start from other noise than the fp32 one of the same seed, and not be comparable to it.
    """
    if not dtype.is_floating_point:
        raise ValueError(f"Gaussian noise needs a floating-point dtype, got {dtype}")
    draw = torch.float64 if dtype == torch.float64 else torch.float32
    return torch.randn(shape, generator=generator, device=device, dtype=draw).to(dtype)


def compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: half-precision coefficients near ᾱ ≈ 1 or 0
    lose the small terms that distinguish low-noise frames."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _result_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    return torch.promote_types(a.dtype, b.dtype)
