"""frame-conditioning: per-frame timesteps, and optionally a frame-level action adapter.

The model keeps its own forward. What diffusers forwards have no argument for (a timestep per
frame, an action per frame) travels in the frame context that `causalize.WorldModel` sets for each
call; hooks installed here read it (METHOD.md §6–§7).

Per-sample DiTs (mode "delta" with `modulation`): the modulation modules become per-frame twins
(causalize.modules.frame_modulation). Which instances, and where their context tokens sit, come
from the plan's "frame-conditioning" targets (e.g. HunyuanVideo: the video stream's `norm1`, not
the text stream's `norm1_context` of the same class; its single-stream norm with a text suffix);
without targets, every instance of the named classes.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn as nn

from causalize import state
from causalize.context import MODULE_CONTEXT, FrameContext, install_context
from causalize.errors import CausalizeError, PassError
from causalize.modules.action_encoder import ADAPTER_ATTR, ActionEncoder, embedding_width
from causalize.modules.frame_modulation import make_frame_modulated
from causalize.passes.base import Pass, PassContext, Record, Site, option
from causalize.plan import Conditioning, Plan
from causalize.precision import model_device, model_dtype


def _out_features(module: nn.Module) -> int:
    try:
        return embedding_width(module)
    except ValueError as exc:
        raise PassError(str(exc)) from None


# Hooks are module-level functions that find their state on the hooked module (a plain attribute
# set through causalize.state.set_attribute, so nothing is registered as a submodule): a deepcopy
# of the model (the causality probe runs on one) then drives its own copied context and modules.
CTX = MODULE_CONTEXT
TIME_PROJ = "_causalize_time_proj"


def _on_delta_embedding(module, args, output):
    """Per-frame embedding minus the per-sample one repeated per frame, plus the action embedding."""
    ctx: FrameContext = getattr(module, CTX)
    if ctx.timesteps is None or ctx.busy:
        return None
    if len(args) > 1 and args[1] is not None:  # TimestepEmbedding(sample, condition)
        raise CausalizeError(
            "per-frame timesteps with a timestep condition (e.g. timestep_cond) are not supported",
            "call the world model without it",
        )
    batch, frames = ctx.timesteps.shape
    ctx.busy = True
    proj = getattr(module, TIME_PROJ)
    try:
        # no time_proj: the embedding takes raw timesteps and projects them itself (Kandinsky 5)
        flat = ctx.timesteps.reshape(-1)
        per_frame = module(flat if proj is None else proj(flat).to(output.dtype))
    finally:
        ctx.busy = False
    delta = per_frame - output.repeat_interleave(frames, dim=0)
    if ctx.action_emb is not None:
        delta = delta + ctx.action_emb.reshape(batch * frames, -1).to(delta.dtype)
    ctx.temb_delta = delta
    return None


def _on_consumer(module, args, kwargs):
    delta = getattr(module, CTX).temb_delta
    if delta is None:
        return None
    if kwargs.get("temb") is not None:
        kwargs = {**kwargs, "temb": _add(kwargs["temb"], delta, module)}
    elif len(args) > 1 and torch.is_tensor(args[1]):
        args = (args[0], _add(args[1], delta, module), *args[2:])
    return args, kwargs


def _add(temb: torch.Tensor, delta: torch.Tensor, module: nn.Module) -> torch.Tensor:
    if temb.shape != delta.shape:
        raise CausalizeError(
            f"{type(module).__name__} received a timestep embedding of shape {tuple(temb.shape)}, "
            f"per-frame conditioning has {tuple(delta.shape)}",
            "the plan's conditioning consumers are wrong for this model",
        )
    return temb + delta.to(temb.dtype)


def _on_token_embedding(module, args, output):
    """Per-token or per-frame timestep embedding (native DiTs) plus each frame's action embedding.

    Per token, (B, T·P, D) or (B·T·P, D): frame t's action is repeated over its P tokens.
    Per frame, (B, T, D) or (B·T, D) (SkyReels-V2 diffusion forcing, Cosmos): added as is.
    The two coincide only when P = 1, where they mean the same thing.
    """
    ctx: FrameContext = getattr(module, CTX)
    if ctx.action_emb is None or ctx.grid is None:
        return None
    emb = ctx.action_emb.to(output.dtype)
    batch, frames, width = emb.shape
    if tuple(output.shape) not in ((batch, frames, width), (batch * frames, width)):
        emb = emb.repeat_interleave(ctx.grid.per_frame, dim=1)
    if output.dim() == 2:
        emb = emb.reshape(-1, width)
    if emb.shape != output.shape:
        raise CausalizeError(
            f"timestep embedding {tuple(output.shape)} is neither per token nor per frame for the actions' "
            f"{tuple(ctx.action_emb.shape)} ({ctx.grid.per_frame} tokens per frame)"
        )
    return output + emb


def _submodule(model: nn.Module, path: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise PassError(
            f"this {type(model).__name__} has no {what} '{path}'",
            "per-frame conditioning does not support this configuration of the model",
        ) from None


def _modulation_sites(model: nn.Module, plan: Plan) -> list[tuple[str, nn.Module, str]]:
    """(path, module, context position) of the modulation modules to make per-frame: instances of
    the Conditioning's `modulation` classes, restricted to the plan's "frame-conditioning" targets
    (paths, context position) when it has them. A targeted path that holds another class is an
    error: that modulation would silently stay per sample."""
    names = plan.conditioning.modulation
    sites = []
    for path, mod, spec in plan.iter_targets("frame-conditioning", model, lambda m: True):
        if any(path.startswith(p + ".") for p, _, _ in sites):
            continue  # inside a modulation module (fnmatch's * also matches dots)
        if type(mod).__name__ in names:
            sites.append((path, mod, spec.context))
        elif spec.paths:
            raise PassError(
                f"{path} is a {type(mod).__name__}, which frame-conditioning cannot modulate per frame "
                f"(supported here: {', '.join(names)})",
                "per-frame conditioning does not support this configuration of the model",
            )
    return sites


def _install_hooks(model: nn.Module, plan: Plan, ctx: FrameContext) -> int:
    """Hooks, their state and the per-frame twins, each recorded in the model's registry
    (causalize.state) with its handle, so that `unconvert` takes them off again."""
    cond = plan.conditioning
    _submodule(model, cond.embedding, "timestep embedding")
    state.set_attribute(model, cond.embedding, CTX, ctx)
    if cond.mode == "per-token":
        state.register_hook(model, cond.embedding, _on_token_embedding)
        return 1
    proj = _submodule(model, cond.time_proj, "timestep projection") if cond.time_proj else None
    state.set_attribute(model, cond.embedding, TIME_PROJ, proj)
    state.register_hook(model, cond.embedding, _on_delta_embedding)
    n = 0
    for path, mod in list(model.named_modules()):
        if type(mod).__name__ in cond.consumers:
            state.set_attribute(model, path, CTX, ctx)
            state.register_hook(model, path, _on_consumer, pre=True, with_kwargs=True)
            n += 1
    # per-sample DiTs: modulation modules become per-frame twins that read ctx.temb_delta
    for path, mod, context in _modulation_sites(model, plan):
        make_frame_modulated(mod, ctx, context, model=model, path=path)
        n += 1
    return n


class FrameConditioning(Pass):
    name = "frame-conditioning"
    version = 1
    summary = "per-frame timesteps (B, T); with action_dim > 0 also a frame-level action adapter added to each frame's timestep embedding"

    @dataclass(frozen=True)
    class Options:
        action_dim: int = option(0, "dimension of the actions; 0 adds per-frame timesteps only, no action adapter")
        action_type: Literal["continuous", "discrete"] = option(
            "continuous", "continuous: an MLP on action vectors; discrete: a sum of embeddings of the active entries"
        )

    def _conditioning(self, ctx: PassContext) -> Conditioning:
        cond = ctx.plan.conditioning
        if cond is None:
            raise PassError(
                f"plan '{ctx.plan.name}' does not declare how timesteps enter the model (Plan.conditioning)",
                "per-frame conditioning is not supported for this family yet",
            )
        return cond

    def find_sites(self, model: nn.Module, ctx: PassContext) -> list[Site]:
        cond = self._conditioning(ctx)
        embedding = _submodule(model, cond.embedding, "timestep embedding")
        sites = [Site(cond.embedding, type(embedding).__name__, f"timestep embedding ({cond.mode})")]
        sites += [
            Site(p, type(m).__name__, "receives the per-frame embedding")
            for p, m in model.named_modules()
            if type(m).__name__ in cond.consumers
        ]
        if cond.mode == "delta":
            sites += [
                Site(p, type(m).__name__, "per-frame modulation of the video tokens")
                for p, m, _ in _modulation_sites(model, ctx.plan)
            ]
        return sites

    def apply(self, model: nn.Module, ctx: PassContext) -> list[Record]:
        cond = self._conditioning(ctx)
        frame_ctx = install_context(model, ctx.plan.tokens)
        hooks = _install_hooks(model, ctx.plan, frame_ctx)
        if hooks == 0:
            raise PassError(
                f"frame-conditioning found no consumer of the timestep embedding ({', '.join(cond.consumers + cond.modulation)})"
            )
        records = [
            Record(self.name, cond.embedding, "per-sample timestep", f"per-frame timestep ({cond.mode}, {hooks} sites)")
        ]
        if ctx.options.action_dim > 0:
            width = _out_features(_submodule(model, cond.embedding, "timestep embedding"))
            device = model_device(model)
            # on a meta model (causalize.load replays the recipe before reading weights) the encoder
            # is built on meta too: an action_dim from an untrusted manifest allocates nothing
            # until its shapes are checked against the checkpoint
            with torch.device("meta") if device.type == "meta" else contextlib.nullcontext():
                encoder = ActionEncoder(ctx.options.action_dim, width, ctx.options.action_type)
            encoder.to(device=device, dtype=model_dtype(model))
            state.add_module(model, ADAPTER_ATTR, encoder)
            records.append(
                Record(
                    self.name,
                    ADAPTER_ATTR,
                    "-",
                    f"ActionEncoder({ctx.options.action_type}, {ctx.options.action_dim} -> {width})",
                )
            )
        return records
