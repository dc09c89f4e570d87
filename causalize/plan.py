"""Plans: what a model plugin declares for one diffusers class.

A plan is data first: the default pass pipeline, the targets of each pass, the frame layout,
a tiny random config for tests and demos, and a factory of example inputs for verification.
Adding a model = one plugin file registering one Plan.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from causalize.layout import FrameLayout

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from causalize.image_condition import ImageCondition


@dataclass(frozen=True)
class Targets:
    """Which modules a pass rewrites.

    owners: class names of ancestor modules (the module itself counts); empty = anywhere.
    paths: fnmatch patterns on the module path; empty = any path.
    time_axis: for convolutions, which spatial axis of the kernel is time (0 = first).
    conv_dims: which convolutions convolve over frames. Only Conv3d by default: a Conv2d or Conv1d
        is per-frame unless the plan says it runs over a (B, C, T, ...) layout (e.g. Sana's conv_temp).
    context, joint, mask_format: for block-causal attention sites, where context tokens sit in
        the joint sequence ("none" / "prefix" / "suffix"), whether the processor concatenates
        `encoder_hidden_states` itself, and the mask format its processor expects
        (see causalize.modules.block_attention).
    """

    owners: tuple[str, ...] = ()
    paths: tuple[str, ...] = ()
    time_axis: int = 0
    conv_dims: tuple[int, ...] = (3,)
    context: str = "none"
    joint: bool = False
    mask_format: str = "bool4d"

    def iter_modules(self, model: nn.Module, leaf: Callable[[nn.Module], bool]) -> Iterator[tuple[str, nn.Module]]:
        """(path, module) of every module accepted by `leaf` that lies under an owner and matches a path."""
        owner_paths: list[str] = []
        for path, mod in model.named_modules():
            if self.owners and type(mod).__name__ in self.owners:
                owner_paths.append(path)
            if not leaf(mod):
                continue
            if self.owners and not any(_under(path, o) for o in owner_paths):
                continue
            if self.paths and not any(fnmatch.fnmatchcase(path, p) for p in self.paths):
                continue
            yield path, mod


def _under(path: str, owner: str) -> bool:
    return owner == "" or path == owner or path.startswith(owner + ".")


@dataclass(frozen=True)
class Conditioning:
    """How per-frame timesteps (and action embeddings) reach a model (METHOD.md §6–§7).

    mode "delta" (the UNets): the model embeds one timestep per sample and repeats it per frame;
        a hook on `embedding` computes each frame's own embedding (through `time_proj`) plus its
        action embedding, and pre-hooks add the difference to the `temb` input of every
        `consumers` module. Frame t's embedding depends on k_t and a_{t-1} only.
    mode "per-token" (Wan, ...): the model takes a timestep per token natively; per-frame timesteps
        are repeated over each frame's tokens, and action embeddings are added, per token, to the
        output of `embedding` (the per-token timestep embedding).
    `modulation` (mode "delta", the per-sample DiTs: CogVideoX, ...): class names of modulation
        modules (AdaLN-Zero norms, norm_out) that broadcast one temb over all tokens; each is
        turned into its frame-modulated twin (causalize.modules.frame_modulation), which modulates
        frame t's video tokens with temb + delta_t (the delta hook's per-frame embedding) and the
        context/text tokens with the per-sample temb (frame 0's timestep, in every frame's past).
    """

    embedding: str
    mode: str = "delta"
    time_proj: str = ""
    consumers: tuple[str, ...] = ()
    sample_arg: str = "sample"
    timestep_arg: str = "timestep"
    # per-token mode: (model, sample, timesteps (B, T)) -> the timestep tensor the model's forward
    # takes; default: repeat each frame's timestep over its tokens, (B, T·P).
    model_timesteps: Callable[[nn.Module, Any, Any], Any] | None = None
    # extra model kwargs a per-frame call needs (e.g. {"enable_diffusion_forcing": True})
    extra_kwargs: tuple[tuple[str, Any], ...] = ()
    # delta mode: modulation module classes swapped for per-frame twins (frame_modulation.TWINS)
    modulation: tuple[str, ...] = ()
    # inputs the model's forward broadcasts over the batch itself (Cosmos' padding_mask is
    # repeated by batch_size inside the forward): callers keep them at batch 1
    unbatched: tuple[str, ...] = ()


@dataclass(frozen=True)
class Streaming:
    """What exact streaming rollout (causalize.rollout.streaming) needs beyond the causal mixers,
    which carry their own caches. A plan without it is rolled out by full recomputation only.

    rope: path of a rotary-embedding module whose forward reads only the *shape* of its first
        argument (frames on `rope_frame_axis`) and returns per-token tensors (or a tuple of them)
        with tokens on `rope_token_axis`, frame-major. Streaming offsets its frame positions by
        the number of frames already cached. Empty: the model has no rotary temporal positions.
    rope_frames_arg: when the rotary module takes the frame count as an argument (LTX:
        `rope(hidden_states, num_frames, height, width, ...)`), its position; the count is
        enlarged there instead of the first argument's shape.
    frame_index: "Owner.child" names: every `child` submodule of an `Owner`-class module takes
        frame indices 0..F−1 as its first argument (SVD's temporal `time_proj`); streaming adds
        the offset to them.
    pe_tables: class names of modules that add `self.pe[:, :F]` (a sinusoidal table, AnimateDiff's
        motion modules); streaming makes them read rows offset..offset+F−1.

    positions: more modules offset exactly like `rope` (each with its own axes), e.g. Cosmos'
        learnable absolute position embedding next to its RoPE. A path the model does not have
        (a config without that embedding) is skipped.
    caller_positions: forward arguments that carry positions the *caller* computed for the whole
        clip (CogVideoX's and Allegro's `image_rotary_emb`, built by their pipelines). Streaming
        cannot offset them, so a streaming call that passes one (not None) is refused.
    hooks: plugin functions `install(model, stream)` called once per model when streaming is
        installed, for model-specific position offsets (CogVideoX's sincos patch positions, Latte's
        frame table); the hooks they register find the call in progress through the module
        (`stream.attach(module)`, then `stream.state_of(module)` inside the hook: the stream is
        passed in, so a plugin imports nothing from the rollout runtime) and must be inert outside
        a streaming call.
    """

    rope: str = ""
    rope_frame_axis: int = 2
    rope_token_axis: int = 1
    rope_frames_arg: int | None = None
    frame_index: tuple[str, ...] = ()
    pe_tables: tuple[str, ...] = ()
    positions: tuple[OffsetPositions, ...] = ()
    caller_positions: tuple[str, ...] = ()
    hooks: tuple[Callable[[nn.Module, Any], None], ...] = ()


@dataclass(frozen=True)
class OffsetPositions:
    """A position module offset during streaming like `Streaming.rope`: its forward reads only the
    shape of its first argument (frames on `frame_axis`), or takes the frame count as argument
    `frames_arg`, and returns per-token tensors (or a tuple of them) with tokens on `token_axis`,
    frame-major."""

    path: str
    frame_axis: int = 2
    token_axis: int = 1
    frames_arg: int | None = None


InputsFactory = Callable[["nn.Module", int, "torch.Generator"], dict[str, Any]]


def default_forward(model: nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """Call the diffusers model's own forward and return its sample tensor."""
    out = model(**inputs, return_dict=False)
    return out[0] if isinstance(out, (tuple, list)) else out


@dataclass(frozen=True)
class Plan:
    """Everything causalize needs to know about one diffusers denoiser class."""

    name: str
    model_class: str
    family: str
    pipeline: str
    layout: FrameLayout
    targets: dict[str, Targets | tuple[Targets, ...]]
    tiny_config: dict[str, Any]
    make_inputs: InputsFactory
    forward: Callable[[nn.Module, dict[str, Any]], torch.Tensor] = default_forward
    description: str = ""
    notes: tuple[str, ...] = ()
    min_frames: int = 2
    tokens: Callable[[nn.Module, dict[str, Any]], Any] | None = None
    conditioning: Conditioning | None = None
    streaming: Streaming | None = None
    # For classes with several plans (CogVideoX 1.0 / 1.5): does this plan fit a given config?
    accepts: Callable[[dict[str, Any]], bool] | None = None
    # image-to-video configs: how the conditioning image reaches the model (None: not an I2V
    # config); see causalize.image_condition
    image_condition: Callable[[nn.Module], ImageCondition | None] | None = None
    source: str = field(default="", compare=False)

    def model_cls(self) -> type:
        import diffusers

        return getattr(diffusers, self.model_class)

    def build_tiny(self, seed: int = 0) -> nn.Module:
        """The tiny random-weight model of this plan (fp32, eval mode)."""
        import torch

        torch.manual_seed(seed)
        return self.model_cls()(**self.tiny_config).eval()

    def image_condition_of(self, model: nn.Module) -> ImageCondition | None:
        """How this model (its config) takes a conditioning image; None for a text-to-video config."""
        return None if self.image_condition is None else self.image_condition(model)

    def targets_for(self, pass_name: str) -> tuple[Targets, ...]:
        """The target specs of a pass (several when one model has differently shaped sites)."""
        spec = self.targets.get(pass_name, Targets())
        return spec if isinstance(spec, tuple) else (spec,)

    def iter_targets(self, pass_name: str, model: nn.Module, leaf: Callable[[nn.Module], bool]):
        """(path, module, spec) of every module a pass should rewrite, each path once."""
        seen = set()
        for spec in self.targets_for(pass_name):
            for path, mod in spec.iter_modules(model, leaf):
                if path not in seen:
                    seen.add(path)
                    yield path, mod, spec


@dataclass(frozen=True)
class Refusal:
    """A diffusers class causalize deliberately does not convert, and why (e.g. "no frame axis",
    "packed sequence without a frame map"); `nearest` names the plan closest to a port."""

    model_class: str
    reason: str
    nearest: str | None = None
