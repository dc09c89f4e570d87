"""Executing block-causal attention: one home for the three executions and the choice between them.

Block-causal attention is SDPA in which a query token may attend to a key token only if the key's
frame block is not after the query's (`block = frame // block_size`); context tokens (text, image:
frame id −1) are block −1, so context rows see only context and video rows see the context plus
their own and earlier blocks. Every execution gives the same result up to float rounding, and
all are exactly causal (a masked key contributes exactly zero, or is not in the computation):

- "dense": a boolean (Lq, Lk) mask through `F.scaled_dot_product_attention`. Fine for small
  sequences; at Wan-1.3B size the mask alone is 600 MiB per call.
- "chunked": the queries of each block against the keys of the context and of blocks <= theirs,
  one SDPA call per block, no mask tensor (a mask of the model's own is sliced to the chunk).
- "flex": `flex_attention` compiled once per process, with a BlockMask built at tile level (so
  the (Lq, Lk) mask is never materialised) and cached. The eager flex function is never called:
  it materialises the full score matrix (7 s and 94 GiB for one Wan-1.3B forward).

Selection: `CAUSALIZE_ATTENTION=auto|flex|chunked|dense`, overridden by `set_attention_backend`
or the `attention_backend(...)` context manager. "auto" is flex on CUDA (chunked when flex cannot
run there or the sequence is short), dense on CPU (chunked for long sequences). `describe()` says
which path is in use and why.
"""

from __future__ import annotations

import functools
import math
import os
import threading
import warnings
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F

from causalize.errors import CausalizeError, UsageError

ENV_VAR = "CAUSALIZE_ATTENTION"
BACKENDS = ("auto", "flex", "chunked", "dense")
DENSE_MAX_TOKENS = 4096  # auto on CPU: a dense mask up to this many query (key) tokens, chunked above
FLEX_MIN_TOKENS = 1024  # auto on CUDA: below this a flex compile is not worth it, chunked instead
TILE = 128  # BlockMask tile (flex's default sparse block size)
_SEES_ALL = 2**30  # block id of a query row that may see every key (context rows when context_sees_video)

_Sdpa = Callable[..., torch.Tensor]


# --- selection -----------------------------------------------------------------------------------


class _Selection:
    lock = threading.Lock()
    override: str | None = None  # set_attention_backend / attention_backend(...)
    compiled: dict[str, Any] = {}  # device type -> torch.compile(flex_attention), created on first use
    flex_broken: str | None = None  # why flex failed at run time (auto then stays on chunked)
    executions: Counter = Counter()  # path -> calls, for describe()


def _validated(name: str, source: str) -> str:
    value = name.strip().lower()
    if value not in BACKENDS:
        raise UsageError(f"{source}={name!r} is not an attention backend: use one of {', '.join(BACKENDS)}")
    return value


def set_attention_backend(name: str | None) -> None:
    """Force a backend for this process ("auto", "flex", "chunked", "dense"); None: back to the
    environment variable / auto."""
    _Selection.override = None if name is None else _validated(name, "set_attention_backend")


@contextmanager
def attention_backend(name: str) -> Iterator[None]:
    """Use `name` inside the block, process-wide (the previous choice comes back on exit, also on error)."""
    previous = _Selection.override
    set_attention_backend(name)
    try:
        yield
    finally:
        _Selection.override = previous


def requested_backend() -> tuple[str, str]:
    """(name, where it came from): the API override, else the environment variable, else auto."""
    if _Selection.override is not None:
        return _Selection.override, "set_attention_backend"
    env = environment_backend()
    return (env, f"environment variable {ENV_VAR}") if env else ("auto", "default")


def environment_backend() -> str | None:
    """$CAUSALIZE_ATTENTION, checked (None: unset), for a launcher that passes it to a child."""
    env = os.environ.get(ENV_VAR, "").strip()
    return _validated(env, ENV_VAR) if env else None


def flex_status(device: torch.device | str) -> tuple[bool, str]:
    """Can compiled flex attention run on this device type, and if not, why."""
    if _Selection.flex_broken:
        return False, _Selection.flex_broken
    return _flex_platform(torch.device(device).type)


@functools.cache
def _flex_platform(device_type: str) -> tuple[bool, str]:
    try:
        from torch.nn.attention.flex_attention import BlockMask, flex_attention  # noqa: F401
    except ImportError:
        return False, f"torch {torch.__version__} has no flex_attention"
    if device_type == "cuda":
        try:
            from torch.utils._triton import has_triton
        except ImportError:
            return False, "cannot tell whether triton is installed"
        return (True, "compiled flex kernel (triton)") if has_triton() else (False, "triton is not installed")
    if device_type == "cpu":
        try:
            from torch._inductor.kernel.flex.flex_cpu import check_cpu_supported
        except ImportError:
            return False, "this torch build has no CPU flex kernel"
        ok = check_cpu_supported()
        return (True, "compiled flex kernel (C++)") if ok else (False, "this CPU has no AVX2 flex kernel")
    return False, f"flex is not wired for device type {device_type}"


def _resolve(device: torch.device | str, length: int | None = None) -> tuple[str, str]:
    name, source = requested_backend()
    device = torch.device(device)
    if name != "auto":
        return name, f"requested ({source})"
    if device.type == "cuda":
        ok, why = flex_status(device)
        if not ok:
            return "chunked", f"auto on CUDA: flex unavailable ({why})"
        if length is not None and length < FLEX_MIN_TOKENS:
            return "chunked", f"auto on CUDA: {length} tokens < {FLEX_MIN_TOKENS}, not worth a flex compile"
        return "flex", f"auto on CUDA: compiled flex, chunked below {FLEX_MIN_TOKENS} tokens"
    if length is not None and length > DENSE_MAX_TOKENS:
        return "chunked", f"auto on {device.type}: {length} tokens > {DENSE_MAX_TOKENS}, no dense mask"
    return "dense", f"auto on {device.type}: dense mask up to {DENSE_MAX_TOKENS} tokens, chunked above"


def active_backend(device: torch.device | str, length: int | None = None) -> str:
    """The execution a call of `length` query tokens on `device` gets ("flex", "chunked" or "dense").
    Per call, flex still falls back to chunked for inputs it cannot take (see `flex_unsupported`)."""
    return _resolve(device, length)[0]


def describe(device: torch.device | str | None = None) -> dict[str, Any]:
    """Which block-causal attention path is in use on `device` (default: CUDA if present) and why."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    requested, source = requested_backend()
    backend, reason = _resolve(device)
    flex_ok, flex_why = flex_status(device)
    return {
        "device": device.type,
        "requested": requested,
        "source": source,
        "backend": backend,
        "reason": reason,
        "flex_available": flex_ok,
        "flex_note": flex_why,
        "flex_compiled": device.type in _Selection.compiled,
        "executions": dict(_Selection.executions),
    }


# --- the layout of one call: query runs and key prefixes -------------------------------------------


def block_ids(
    frames: torch.Tensor, block_size: int = 1, *, queries: bool = False, context_sees_video: bool = False
) -> torch.Tensor:
    """Frame ids -> the block ids the rule compares (key block <= query block). Context is −1;
    context query rows that may see video (the deliberately leaky option) see every block."""
    blk = torch.div(frames, block_size, rounding_mode="floor")
    fill = _SEES_ALL if queries and context_sees_video else -1
    return torch.where(frames < 0, torch.full_like(blk, fill), blk)


class _Layout:
    """One (query ids, key ids, rule): the contiguous query runs of equal block, the key order that
    puts keys by block (context first), and for each run how many keys (in that order) it sees."""

    def __init__(self, q_blocks: torch.Tensor, k_blocks: torch.Tensor):
        q_blocks, k_blocks = q_blocks.cpu(), k_blocks.cpu()
        self.lq, self.lk = q_blocks.numel(), k_blocks.numel()
        self.q_blocks, self.k_blocks = q_blocks, k_blocks
        sorted_k, order = torch.sort(k_blocks, stable=True)
        self.order = None if bool((order == torch.arange(self.lk)).all()) else order
        values, counts = torch.unique_consecutive(q_blocks, return_counts=True)
        ends = torch.cumsum(counts, 0)
        visible = torch.searchsorted(sorted_k.contiguous(), values, right=True)
        self.runs = tuple(zip((ends - counts).tolist(), ends.tolist(), visible.tolist()))
        self._on: dict[str, dict[str, torch.Tensor]] = {}

    def on(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The layout's tensors on `device` (moved once)."""
        key = str(device)
        if key not in self._on:
            moved = {name: getattr(self, name).to(device, torch.int32) for name in ("q_blocks", "k_blocks")}
            if self.order is not None:
                moved["order"] = self.order.to(device)
            self._on[key] = moved
        return self._on[key]

    def allowed(self, device: torch.device) -> torch.Tensor:
        t = self.on(device)
        return t["k_blocks"][None, :] <= t["q_blocks"][:, None]


class _LRU(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_or(self, key: Hashable, make: Callable[[], Any]) -> Any:
        if key in self:
            self.move_to_end(key)
            return self[key]
        value = self[key] = make()
        while len(self) > self.size:
            self.popitem(last=False)
        return value


_LAYOUTS = _LRU(32)
_DENSE = _LRU(2)
_BLOCK_MASKS = _LRU(8)
_CACHE_LOCK = threading.Lock()


def _layout(
    q_frames: torch.Tensor, k_frames: torch.Tensor, block_size: int, context_sees_video: bool, key: Hashable | None
) -> tuple[_Layout, tuple]:
    """The layout and its cache key: the caller's name for these ids, or else their content (one
    read-back from the device)."""
    if key is None:
        key = ("ids", q_frames.cpu().numpy().tobytes(), k_frames.cpu().numpy().tobytes())
    full_key = (key, block_size, context_sees_video)
    with _CACHE_LOCK:
        layout = _LAYOUTS.get_or(
            full_key,
            lambda: _Layout(
                block_ids(q_frames, block_size, queries=True, context_sees_video=context_sees_video),
                block_ids(k_frames, block_size),
            ),
        )
    return layout, full_key


# --- the three executions ------------------------------------------------------------------------


def combine_masks(attn_mask: torch.Tensor | None, allowed: torch.Tensor) -> torch.Tensor:
    """A call's own mask and the block-causal one: boolean AND, or −inf added to an additive mask."""
    if attn_mask is None:
        return allowed
    if attn_mask.dtype == torch.bool:
        return attn_mask & allowed
    bias = torch.zeros(allowed.shape, dtype=attn_mask.dtype, device=attn_mask.device).masked_fill(
        ~allowed, float("-inf")
    )
    return attn_mask + bias


def _sdpa_extra(scale: float | None, enable_gqa: bool) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if scale is not None:
        extra["scale"] = scale
    if enable_gqa:
        extra["enable_gqa"] = True
    return extra


def _dense(sdpa: _Sdpa, query, key, value, layout: _Layout, cache_key, attn_mask, dropout_p, is_causal, extra):
    device = query.device
    with _CACHE_LOCK:
        allowed = _DENSE.get_or((cache_key, str(device)), lambda: layout.allowed(device))
    if is_causal:  # SDPA forbids a mask together with is_causal: fold its top-left tril in
        allowed = allowed & torch.ones(layout.lq, layout.lk, dtype=torch.bool, device=device).tril()
    return sdpa(query, key, value, combine_masks(attn_mask, allowed), dropout_p, False, **extra)


def _slice_rows(mask: torch.Tensor, start: int, end: int) -> torch.Tensor:
    return mask if mask.ndim < 2 or mask.shape[-2] == 1 else mask[..., start:end, :]


def _chunked(sdpa: _Sdpa, query, key, value, layout: _Layout, attn_mask, extra) -> torch.Tensor:
    """One SDPA call per query run, against the key prefix it may see (keys put in block order)."""
    if layout.order is not None:
        order = layout.on(query.device)["order"]
        key, value = key.index_select(-2, order), value.index_select(-2, order)
        if attn_mask is not None and attn_mask.shape[-1] != 1:
            attn_mask = attn_mask.index_select(-1, order)
    outs = []
    for start, end, visible in layout.runs:
        mask = None
        if attn_mask is not None:
            mask = _slice_rows(attn_mask, start, end)
            mask = mask if mask.shape[-1] == 1 else mask[..., :visible]
        outs.append(
            sdpa(query[..., start:end, :], key[..., :visible, :], value[..., :visible, :], mask, 0.0, False, **extra)
        )
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def _key_mask(attn_mask: torch.Tensor | None, query: torch.Tensor, lk: int) -> tuple[bool, torch.Tensor | None]:
    """(is it None or a pure key mask, the mask as (Bm, Hm, Lk) with Bm in {1, B}, Hm in {1, H})."""
    if attn_mask is None:
        return True, None
    if attn_mask.ndim > 4 or attn_mask.shape[-1] != lk or (attn_mask.ndim >= 2 and attn_mask.shape[-2] != 1):
        return False, None
    mask = attn_mask.reshape((1,) * (4 - attn_mask.ndim) + tuple(attn_mask.shape))
    if any(m not in (1, q) for m, q in zip(mask.shape[:2], query.shape[:2])):
        return False, None
    return True, mask[:, :, 0, :]


def flex_unsupported(query, key, value, attn_mask: torch.Tensor | None) -> str | None:
    """Why compiled flex cannot take this call (then chunked runs it), or None."""
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        return "flex needs 4-D (B, H, L, d) inputs"
    if not (query.dtype == key.dtype == value.dtype):
        return "flex needs q, k, v of one dtype"
    if query.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"flex does not take {query.dtype}"
    if query.device.type == "cuda" and min(query.shape[-1], value.shape[-1]) < 16:
        return "flex on CUDA needs a head dim of at least 16"
    if query.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
        return "flex has no backward on CPU"
    if not _key_mask(attn_mask, query, key.shape[-2])[0]:
        return "the model's own mask is not a key mask"
    if attn_mask is not None and attn_mask.requires_grad:
        return "a mask that needs a gradient"
    return None


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense (B, H, nq, nk) tile flags -> (count per row, indices of the set tiles first)."""
    num = tiles.sum(-1, dtype=torch.int32)
    idx = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return num, idx


def _tile_range(ids: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per tile of `ids`: (min, max) over the valid entries."""
    n = math.ceil(ids.numel() / tile) * tile
    pad = n - ids.numel()
    lo = torch.cat([ids, ids.new_full((pad,), _SEES_ALL + 1)]).view(-1, tile).amin(-1)
    hi = torch.cat([ids, ids.new_full((pad,), -2)]).view(-1, tile).amax(-1)
    return lo, hi


def _tile_keep(k_blocks: torch.Tensor, keep: torch.Tensor, tile: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per key tile of a (Bm, Hm, Lk) keep mask: (smallest block among the kept keys, all kept)."""
    pad = math.ceil(keep.shape[-1] / tile) * tile - keep.shape[-1]
    kept_blocks = torch.where(keep, k_blocks, torch.full_like(k_blocks, _SEES_ALL + 1))
    lo = F.pad(kept_blocks, (0, pad), value=_SEES_ALL + 1).view(*keep.shape[:2], -1, tile).amin(-1)
    return lo, F.pad(keep, (0, pad), value=True).view(*keep.shape[:2], -1, tile).all(-1)


def _mask_mod(q_blocks: torch.Tensor, k_blocks: torch.Tensor, keep: torch.Tensor | None) -> Callable:
    """The element rule: key block <= query block, and the key kept by the model's key mask."""
    if keep is None:

        def mask_mod(b, h, q_idx, kv_idx):
            return k_blocks[kv_idx] <= q_blocks[q_idx]
    elif keep.shape[0] == 1 and keep.shape[1] == 1:
        keep_k = keep[0, 0]

        def mask_mod(b, h, q_idx, kv_idx):
            return (k_blocks[kv_idx] <= q_blocks[q_idx]) & keep_k[kv_idx]
    else:
        per_b, per_h = keep.shape[0] > 1, keep.shape[1] > 1

        def mask_mod(b, h, q_idx, kv_idx):
            return (k_blocks[kv_idx] <= q_blocks[q_idx]) & keep[b if per_b else 0, h if per_h else 0, kv_idx]

    return mask_mod


def build_block_mask(
    q_blocks: torch.Tensor, k_blocks: torch.Tensor, keep: torch.Tensor | None = None, tile: int = TILE
):
    """The BlockMask of the rule, computed per tile from block-id ranges (no (Lq, Lk) tensor).

    A tile pair is full when its largest key block is <= its smallest query block and every key is
    kept, empty when the smallest block among its kept keys is after its largest query block;
    tiles that run past the end are never full, like `create_block_mask`'s (same BlockMask).
    """
    from torch.nn.attention.flex_attention import BlockMask

    lq, lk = q_blocks.numel(), k_blocks.numel()
    q_lo, q_hi = _tile_range(q_blocks, tile)
    k_lo, k_hi = _tile_range(k_blocks, tile)
    full = k_hi[None, :] <= q_lo[:, None]  # (nq, nk): the rule allows every pair of the tile
    if lq % tile:
        full[-1, :] = False
    if lk % tile:
        full[:, -1] = False
    if keep is None:
        any_, full = (k_lo[None, :] <= q_hi[:, None])[None, None], full[None, None]
    else:  # (Bm, Hm, nq, nk): the smallest block among the kept keys decides whether a tile has a pair
        kept_lo, kept_all = _tile_keep(k_blocks, keep, tile)
        any_ = kept_lo[:, :, None, :] <= q_hi[:, None]
        full = full & kept_all[:, :, None, :]
    partial = any_ & ~full
    return BlockMask.from_kv_blocks(
        *_ordered(partial),
        *_ordered(full),
        BLOCK_SIZE=tile,
        mask_mod=_mask_mod(q_blocks, k_blocks, keep),
        seq_lengths=(lq, lk),
    )


def _tensor_identity(t: torch.Tensor) -> tuple:
    """Identity of a tensor's contents while a reference to it is held (the cache holds one)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype, t._version)


def _cached_block_mask(layout: _Layout, cache_key, device: torch.device, keep: torch.Tensor | None):
    ident = None if keep is None else _tensor_identity(keep)
    key = (cache_key, str(device), ident)
    with _CACHE_LOCK:
        entry = _BLOCK_MASKS.get_or(
            key, lambda: (keep, build_block_mask(layout.on(device)["q_blocks"], layout.on(device)["k_blocks"], keep))
        )
    return entry[1]


def _bias_score_mod(bias: torch.Tensor) -> Callable:
    """score + the model's additive key mask (Bm, Hm, Lk)."""
    per_b, per_h = bias.shape[0] > 1, bias.shape[1] > 1

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b if per_b else 0, h if per_h else 0, kv_idx]

    return score_mod


def compiled_flex(device_type: str = "cuda") -> Callable:
    """`flex_attention` under torch.compile, created once per process and device type (never the
    eager function, which materialises the whole score matrix). On CUDA a second sequence length
    compiles one dynamic-shape kernel; on CPU every length gets a static one (torch 2.13's CPU
    template does not compile with dynamic shapes)."""
    compiled = _Selection.compiled.get(device_type)
    if compiled is None:
        with _Selection.lock:
            compiled = _Selection.compiled.get(device_type)
            if compiled is None:
                from torch.nn.attention.flex_attention import flex_attention

                compiled = torch.compile(flex_attention, dynamic=False if device_type == "cpu" else None)
                _Selection.compiled[device_type] = compiled
    return compiled


def _flex(query, key, value, layout: _Layout, cache_key, attn_mask, scale, enable_gqa) -> torch.Tensor:
    _, mask = _key_mask(attn_mask, query, key.shape[-2])
    keep = mask if mask is not None and mask.dtype == torch.bool else None
    block_mask = _cached_block_mask(layout, cache_key, query.device, keep)
    score_mod = _bias_score_mod(mask) if mask is not None and keep is None else None
    flex = compiled_flex(query.device.type)
    # past dynamo's recompile limit the compiled function would silently run the eager one
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        return flex(query, key, value, score_mod=score_mod, block_mask=block_mask, scale=scale, enable_gqa=enable_gqa)


def _run_flex(explicit: bool, *args) -> torch.Tensor | None:
    """Compiled flex, or None for chunked: past dynamo's recompile limit (that call), or when the
    kernel failed to compile under "auto" (flex is then off for this process). Under an explicit
    "flex" a compile failure is an error."""
    try:
        return _flex(*args)
    except torch.OutOfMemoryError:
        raise
    except torch._dynamo.exc.FailOnRecompileLimitHit:
        _warn_once(
            "causalize: flex attention met more shapes than torch._dynamo.config.recompile_limit; "
            "calls past it run chunked SDPA"
        )
        return None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        if explicit:
            raise CausalizeError(
                f"compiled flex attention failed: {type(exc).__name__}: {first}", f"set {ENV_VAR}=chunked"
            ) from exc
        _Selection.flex_broken = f"compiled flex failed here ({type(exc).__name__}: {first})"
        _warn_once(f"causalize: compiled flex attention failed ({type(exc).__name__}: {first}); using chunked SDPA")
        return None


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def sdpa_options(args: tuple, kwargs: dict) -> dict | None:
    """SDPA's `scale` and `enable_gqa` from the extra arguments of an intercepted
    `scaled_dot_product_attention` call, as `block_causal_attention` takes them; None when the call
    has any other argument (it is then run as it came)."""
    names = ("scale", "enable_gqa")
    if len(args) > len(names) or set(kwargs) - set(names[len(args) :]):
        return None
    return {**dict(zip(names, args)), **kwargs}


def block_causal_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_frames: torch.Tensor,
    k_frames: torch.Tensor | None = None,
    *,
    block_size: int = 1,
    context_sees_video: bool = False,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    backend: str | None = None,
    sdpa: _Sdpa | None = None,
    layout_key: Hashable | None = None,
) -> torch.Tensor:
    """Block-causal attention over q, k, v (…, L, d) as SDPA takes them.

    q_frames / k_frames: frame id of each query / key token (−1: context); k_frames defaults to
    q_frames. attn_mask: the model's own mask (bool or additive, any SDPA-broadcastable shape),
    combined with the rule. backend: "flex" / "chunked" / "dense", None for the current selection.
    sdpa: the SDPA function to call (the unrouted one inside an SDPA scope). layout_key: a hashable
    naming the frame ids, so that their layout is cached without reading them back from the device.

    dropout_p > 0 and is_causal run dense; flex runs chunked for inputs it cannot take.
    """
    sdpa = sdpa or F.scaled_dot_product_attention
    k_frames = q_frames if k_frames is None else k_frames
    if q_frames.numel() != query.shape[-2] or k_frames.numel() != key.shape[-2]:
        raise CausalizeError(
            f"frame ids for {q_frames.numel()} queries / {k_frames.numel()} keys, "
            f"attention over {query.shape[-2]} / {key.shape[-2]} tokens"
        )
    path = _path(backend, query, key, value, attn_mask, dropout_p, is_causal)
    layout, cache_key = _layout(q_frames, k_frames, block_size, context_sees_video, layout_key)
    if path == "flex":
        explicit = (backend or requested_backend()[0]) == "flex"
        out = _run_flex(explicit, query, key, value, layout, cache_key, attn_mask, scale, enable_gqa)
        if out is not None:
            _Selection.executions["flex"] += 1
            return out
        path = "chunked"
    _Selection.executions[path] += 1
    extra = _sdpa_extra(scale, enable_gqa)
    if path == "chunked":
        return _chunked(sdpa, query, key, value, layout, attn_mask, extra)
    return _dense(sdpa, query, key, value, layout, cache_key, attn_mask, dropout_p, is_causal, extra)


def _path(backend: str | None, query, key, value, attn_mask, dropout_p: float, is_causal: bool) -> str:
    """The execution of one call: the selection, then what the call's inputs allow."""
    name = backend or active_backend(query.device, query.shape[-2])
    if name not in BACKENDS[1:]:
        raise UsageError(f"unknown attention backend {name!r}: use one of {', '.join(BACKENDS[1:])}")
    if dropout_p != 0.0 or is_causal:
        return "dense"
    if name != "flex":
        return name
    ok, why = flex_status(query.device)
    if not ok:
        if (backend or requested_backend()[0]) == "flex":
            raise CausalizeError(
                f"flex attention was requested but cannot run on {query.device.type}: {why}", f"set {ENV_VAR}=chunked"
            )
        return "chunked"
    return "flex" if flex_unsupported(query, key, value, attn_mask) is None else "chunked"


def record_execution(path: str) -> None:
    """Count a call some caller executed itself (the processor's dense mask hand-over) for describe()."""
    _Selection.executions[path] += 1


def _reset_caches() -> None:
    """Forget the cached layouts, masks and BlockMasks (tests)."""
    with _CACHE_LOCK:
        _LAYOUTS.clear()
        _DENSE.clear()
        _BLOCK_MASKS.clear()


__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "active_backend",
    "attention_backend",
    "block_causal_attention",
    "block_ids",
    "build_block_mask",
    "combine_masks",
    "compiled_flex",
    "describe",
    "flex_status",
    "flex_unsupported",
    "record_execution",
    "requested_backend",
    "set_attention_backend",
]
