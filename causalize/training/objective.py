"""The Diffusion Forcing training objective of Vid2World (METHOD.md §6, §7, §11).

Everything here is pure torch and independent of any diffusers model class, so the trainer, the
benchmark and the tests share one definition of:

* the noise schedule: the "scaled_linear" betas of the base models, rescaled to zero terminal SNR
  (Lin et al.), stored as float64 ``alphas_cumprod``;
* the forward process and the parameterisations, with a noise level **per frame** rather than per
  clip (Diffusion Forcing): ``timesteps`` is always ``(B, T)`` and is broadcast along the frame
  axis of whatever layout the denoiser uses (``(B, T, ...)`` or diffusers' ``(B, C, T, H, W)``);
* timestep sampling (independent per frame, or shared over frames for the plain-diffusion
  baseline), per-frame action dropout, and the loss reduction (mean over C·H·W per frame, then
  uniform over frames and batch; no loss mask, no VLB term).

The toolkit default parameterisation is v (§11 row 1): with zero terminal SNR, x_k = ε at the last
step, so an ε-target there says nothing about x0.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Literal, overload

import torch

__all__ = [
    "BETA_SCHEDULES",
    "DROPOUT_MODES",
    "PREDICTION_TYPES",
    "TIMESTEP_MODES",
    "NoiseSchedule",
    "action_keep_mask",
    "diffusion_forcing_loss",
    "rescale_zero_terminal_snr",
    "sample_frame_timesteps",
]

#: Valid ``prediction_type`` values. diffusers' name "v_prediction" is accepted as an alias of "v"
#: so that a scheduler config can be passed through unchanged.
PREDICTION_TYPES: tuple[str, ...] = ("v", "epsilon", "sample")
_PREDICTION_ALIASES = {"v_prediction": "v"}
TIMESTEP_MODES: tuple[str, ...] = ("independent", "shared")
DROPOUT_MODES: tuple[str, ...] = ("per-frame", "per-sequence")
BETA_SCHEDULES: tuple[str, ...] = ("scaled_linear", "linear")


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
        raise ValueError(
            f"rescale_zero_terminal_snr needs at least 2 steps, got {ac.numel()}"
        )
    sqrt_ac = ac.sqrt()
    first, last = sqrt_ac[0].clone(), sqrt_ac[-1].clone()
    if not bool(first > last):
        raise ValueError(
            f"rescale_zero_terminal_snr needs √ᾱ_0 > √ᾱ_{{K-1}}, got {first.item()} and {last.item()}"
        )
    rescaled = (sqrt_ac - last) * (first / (first - last))
    rescaled[0] = first  # exact by construction; pin it against rounding
    rescaled[-1] = 0.0
    return rescaled.square()


_rescale_zero_terminal_snr = (
    rescale_zero_terminal_snr  # from_config's flag shadows the name
)


def _as_float64_vector(values: Any, name: str) -> torch.Tensor:
    """A 1-D float64 CPU tensor from a tensor, numpy array or sequence (schedules are tiny)."""
    t = torch.as_tensor(values).detach().to(device="cpu", dtype=torch.float64).clone()
    if t.ndim != 1:
        raise ValueError(
            f"{name} must be 1-D (one entry per training step), got shape {tuple(t.shape)}"
        )
    return t


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
        if (
            not bool(torch.isfinite(ac).all())
            or bool((ac < 0).any())
            or bool((ac > 1).any())
        ):
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
        if isinstance(num_train_timesteps, bool) or not isinstance(
            num_train_timesteps, int
        ):
            raise ValueError(  # noqa: TRY004
                f"num_train_timesteps must be an int, got {num_train_timesteps!r}"
            )
        if num_train_timesteps < 2:
            raise ValueError(
                f"num_train_timesteps must be >= 2, got {num_train_timesteps}"
            )
        if not (0.0 < beta_start < 1.0 and 0.0 < beta_end < 1.0):
            raise ValueError(
                f"beta_start and beta_end must lie in (0, 1), got {beta_start} and {beta_end}"
            )
        if beta_schedule == "scaled_linear":
            betas = (
                torch.linspace(
                    beta_start**0.5,
                    beta_end**0.5,
                    num_train_timesteps,
                    dtype=torch.float64,
                )
                ** 2
            )
        elif beta_schedule == "linear":
            betas = torch.linspace(
                beta_start, beta_end, num_train_timesteps, dtype=torch.float64
            )
        else:
            raise ValueError(
                f"unknown beta_schedule {beta_schedule!r}; valid: {', '.join(BETA_SCHEDULES)}"
            )
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
        axis = _frame_axis(like, frame_axis)
        self._check_timesteps(timesteps, like, axis)
        dtype = _compute_dtype(like) if dtype is None else dtype
        idx = timesteps.to(device=like.device, dtype=torch.long)
        shape = [1] * like.ndim
        shape[0], shape[axis] = like.shape[0], like.shape[axis]
        a = self.sqrt_alphas_cumprod.to(device=like.device, dtype=dtype)[idx].reshape(
            shape
        )
        s = self.sqrt_one_minus_alphas_cumprod.to(device=like.device, dtype=dtype)[
            idx
        ].reshape(shape)
        return a, s

    def _check_timesteps(
        self, timesteps: torch.Tensor, like: torch.Tensor, axis: int
    ) -> None:
        """Timesteps index the schedule: integer (B, T) matching the data, within [0, K)."""
        if not isinstance(timesteps, torch.Tensor):
            raise ValueError(  # noqa: TRY004
                f"timesteps must be a torch.Tensor of shape (B, T), got {type(timesteps).__name__}"
            )
        if (
            timesteps.is_floating_point()
            or timesteps.is_complex()
            or timesteps.dtype == torch.bool
        ):
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
        _check_same_shape(x0, noise, "x0", "noise")
        a, s = self.coefficients(timesteps, x0, frame_axis, _compute_dtype(x0, noise))
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
        """Regression target for the parameterisation: v = √ᾱ·ε − √(1−ᾱ)·x0 (default), ε, or x0."""
        kind = _prediction_type(prediction_type)
        _check_same_shape(x0, noise, "x0", "noise")
        out_dtype = _result_dtype(x0, noise)
        if kind == "epsilon":
            self.coefficients(
                timesteps, x0, frame_axis
            )  # validate like the other branches
            return noise.to(out_dtype)
        if kind == "sample":
            self.coefficients(timesteps, x0, frame_axis, _compute_dtype(x0, noise))
            return x0.to(out_dtype)
        a, s = self.coefficients(timesteps, x0, frame_axis, _compute_dtype(x0, noise))
        dtype = a.dtype
        return (a * noise.to(dtype) - s * x0.to(dtype)).to(out_dtype)

    def predicted_x0(
        self,
        x_k: torch.Tensor,
        model_out: torch.Tensor,
        timesteps: torch.Tensor,
        prediction_type: str = "v",
        frame_axis: int = 1,
    ) -> torch.Tensor:
        """x̂0 from the model output: v: √ᾱ·x_k − √(1−ᾱ)·v̂; ε: (x_k − √(1−ᾱ)·ε̂)/√ᾱ; sample: x̂0.

        With ε-prediction x̂0 is undefined where ᾱ = 0 (the zero-SNR last step): the division
        yields inf/nan there, which is why v is the default."""
        kind = _prediction_type(prediction_type)
        _check_same_shape(x_k, model_out, "x_k", "model_out")
        a, s = self.coefficients(
            timesteps, x_k, frame_axis, _compute_dtype(x_k, model_out)
        )
        dtype, out_dtype = a.dtype, _result_dtype(x_k, model_out)
        x, m = x_k.to(dtype), model_out.to(dtype)
        if kind == "v":
            out = a * x - s * m
        elif kind == "epsilon":
            out = (x - s * m) / a
        else:
            out = m
        return out.to(out_dtype)

    def predicted_eps(
        self,
        x_k: torch.Tensor,
        model_out: torch.Tensor,
        timesteps: torch.Tensor,
        prediction_type: str = "v",
        frame_axis: int = 1,
    ) -> torch.Tensor:
        """ε̂ from the model output: v: √(1−ᾱ)·x_k + √ᾱ·v̂; ε: ε̂; sample: (x_k − √ᾱ·x̂0)/√(1−ᾱ)."""
        kind = _prediction_type(prediction_type)
        _check_same_shape(x_k, model_out, "x_k", "model_out")
        a, s = self.coefficients(
            timesteps, x_k, frame_axis, _compute_dtype(x_k, model_out)
        )
        dtype, out_dtype = a.dtype, _result_dtype(x_k, model_out)
        x, m = x_k.to(dtype), model_out.to(dtype)
        if kind == "v":
            out = s * x + a * m
        elif kind == "epsilon":
            out = m
        else:
            out = (x - a * m) / s
        return out.to(out_dtype)

    def predicted_v(
        self,
        x_k: torch.Tensor,
        model_out: torch.Tensor,
        timesteps: torch.Tensor,
        prediction_type: str = "v",
        frame_axis: int = 1,
    ) -> torch.Tensor:
        """v̂ = √ᾱ·ε̂ − √(1−ᾱ)·x̂0 from any parameterisation (guidance rescale acts on v, §8)."""
        kind = _prediction_type(prediction_type)
        if kind == "v":
            _check_same_shape(x_k, model_out, "x_k", "model_out")
            self.coefficients(
                timesteps, x_k, frame_axis, _compute_dtype(x_k, model_out)
            )
            return model_out.to(_result_dtype(x_k, model_out))
        x0 = self.predicted_x0(x_k, model_out, timesteps, kind, frame_axis)
        eps = self.predicted_eps(x_k, model_out, timesteps, kind, frame_axis)
        a, s = self.coefficients(
            timesteps, x_k, frame_axis, _compute_dtype(x_k, model_out)
        )
        return (a * eps.to(a.dtype) - s * x0.to(a.dtype)).to(
            _result_dtype(x_k, model_out)
        )


# --------------------------------------------------------------------------------------------
# Sampling timesteps and action dropout
# --------------------------------------------------------------------------------------------


def sample_frame_timesteps(
    batch: int,
    frames: int,
    num_train_timesteps: int = 1000,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    mode: str = "independent",
) -> torch.Tensor:
    """Per-frame noise levels k, (B, T) long in [0, K).

    "independent" (Diffusion Forcing, the method): k_t iid uniform per sample and frame, exactly
    like the reference's ``randint(0, 1000, (B, T))`` (so k = 0, i.e. clean context, is possible).
    "shared": one k per sample repeated over its frames, the plain video-diffusion baseline.
    """
    if mode not in TIMESTEP_MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(TIMESTEP_MODES)}")
    _check_positive_int(batch, "batch")
    _check_positive_int(frames, "frames")
    _check_positive_int(num_train_timesteps, "num_train_timesteps")
    device = _resolve_device(device, generator)
    cols = frames if mode == "independent" else 1
    k = torch.randint(
        0,
        num_train_timesteps,
        (batch, cols),
        generator=generator,
        device=device,
        dtype=torch.long,
    )
    return k if mode == "independent" else k.expand(batch, frames).contiguous()


def action_keep_mask(
    batch: int,
    frames: int,
    drop_prob: float = 0.2,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
    mode: str = "per-frame",
) -> torch.Tensor:
    """Action-dropout mask m, bool (B, T): True keeps frame t's action, False substitutes ∅ (§7).

    "per-frame" (default, the reference's ``action_random_drop_btw_timestep``): m_t ~ Bernoulli(1−p)
    independently per sample and frame, which is what trains the newest-frame-only unconditional
    branch of causal action guidance (§8). "per-sequence": one draw per sample, whole rows dropped.
    """
    if mode not in DROPOUT_MODES:
        raise ValueError(f"unknown mode {mode!r}; valid: {', '.join(DROPOUT_MODES)}")
    _check_positive_int(batch, "batch")
    _check_positive_int(frames, "frames")
    if (
        isinstance(drop_prob, bool)
        or not isinstance(drop_prob, numbers.Real)
        or not (0.0 <= float(drop_prob) < 1.0)
    ):
        raise ValueError(f"drop_prob must be a number in [0, 1), got {drop_prob!r}")
    device = _resolve_device(device, generator)
    cols = frames if mode == "per-frame" else 1
    # u ~ U[0, 1): P(u >= p) = 1 − p exactly, and p = 0 keeps everything.
    keep = torch.rand((batch, cols), generator=generator, device=device) >= drop_prob
    return keep if mode == "per-frame" else keep.expand(batch, frames).contiguous()


# --------------------------------------------------------------------------------------------
# Loss
# --------------------------------------------------------------------------------------------


@overload
def diffusion_forcing_loss(
    model_out: torch.Tensor,
    target: torch.Tensor,
    frame_axis: int = ...,
    *,
    return_per_frame: Literal[False] = ...,
) -> torch.Tensor: ...


@overload
def diffusion_forcing_loss(
    model_out: torch.Tensor,
    target: torch.Tensor,
    frame_axis: int = ...,
    *,
    return_per_frame: Literal[True],
) -> tuple[torch.Tensor, torch.Tensor]: ...


def diffusion_forcing_loss(
    model_out: torch.Tensor,
    target: torch.Tensor,
    frame_axis: int = 1,
    *,
    return_per_frame: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """ℒ = mean_b (1/T) Σ_t mean_{C,H,W} (target − f)² (§6): the squared error is averaged over
    every axis except batch and frame, then uniformly over frames and batch. No low-noise mask and
    no VLB term. Computed in float32 (float64 if an input is float64) whatever the model dtype.

    With ``return_per_frame=True`` also returns the (B, T) per-frame losses (still attached to the
    graph; detach before logging), whose mean is the scalar loss.
    """
    _check_same_shape(model_out, target, "model_out", "target")
    axis = _frame_axis(model_out, frame_axis)
    if model_out.numel() == 0:
        raise ValueError(
            f"cannot compute a loss over an empty tensor of shape {tuple(model_out.shape)}"
        )
    dtype = _compute_dtype(model_out, target)
    sq = (model_out.to(dtype) - target.to(dtype)).square()
    b, t = sq.shape[0], sq.shape[axis]
    per_frame = sq.movedim(axis, 1).reshape(b, t, -1).mean(dim=-1)
    loss = per_frame.mean()
    return (loss, per_frame) if return_per_frame else loss


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _prediction_type(prediction_type: str) -> str:
    kind = _PREDICTION_ALIASES.get(prediction_type, prediction_type)
    if kind not in PREDICTION_TYPES:
        raise ValueError(
            f"unknown prediction_type {prediction_type!r}; valid: {', '.join(PREDICTION_TYPES)} "
            "(diffusers' 'v_prediction' is accepted for 'v')"
        )
    return kind


def _frame_axis(x: torch.Tensor, frame_axis: int) -> int:
    """Normalise a (possibly negative) frame axis; axis 0 is the batch and cannot hold frames."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"expected a torch.Tensor, got {type(x).__name__}")  # noqa: TRY004
    if x.ndim < 2:
        raise ValueError(
            f"data must have a batch and a frame axis (ndim >= 2), got shape {tuple(x.shape)}"
        )
    if (
        isinstance(frame_axis, bool)
        or not isinstance(frame_axis, int)
        or not -x.ndim <= frame_axis < x.ndim
    ):
        raise ValueError(
            f"frame_axis={frame_axis!r} is out of range for data of shape {tuple(x.shape)}"
        )
    axis = frame_axis % x.ndim
    if axis == 0:
        raise ValueError(
            f"frame_axis={frame_axis} points at the batch axis of shape {tuple(x.shape)}; unfold a "
            "(B·T, ...) layout to (B, T, ...) first"
        )
    return axis


def _check_same_shape(
    a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str
) -> None:
    for name, t in ((name_a, a), (name_b, b)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")  # noqa: TRY004
        if not t.is_floating_point():
            raise ValueError(
                f"{name} must be a floating-point tensor, got dtype {t.dtype}"
            )
    if a.shape != b.shape:
        raise ValueError(
            f"shape mismatch: {name_a} has shape {tuple(a.shape)} but {name_b} has shape {tuple(b.shape)}"
        )


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: half-precision coefficients near ᾱ ≈ 1 or 0
    lose the small terms that distinguish low-noise frames."""
    return (
        torch.float64
        if any(t.dtype == torch.float64 for t in tensors)
        else torch.float32
    )


def _result_dtype(a: torch.Tensor, b: torch.Tensor) -> torch.dtype:
    return torch.promote_types(a.dtype, b.dtype)


def _check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def _resolve_device(
    device: torch.device | str | None, generator: torch.Generator | None
) -> torch.device:
    """Default to the generator's device so a CUDA generator works without repeating the device."""
    if device is not None:
        return torch.device(device)
    return generator.device if generator is not None else torch.device("cpu")
