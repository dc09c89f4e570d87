"""Block-causal ReLU linear attention over frame-major tokens (Sana-Video's self-attention).

Sana-Video's `SanaLinearAttnProcessor3_0` computes, per head, with φ = ReLU and R the rotary
embedding applied after φ:

    out_n = (Σ_m v_m ⊗ R(φ(k_m))) · R(φ(q_n)) / (Σ_m φ(k_m) · φ(q_n) + eps)

The sums run over *all* tokens, so every frame sees every other one; an SDPA mask never reaches it
(BACKBONES.md pitfall 9). The block-causal form keeps the same kernel but restricts the sums to
the keys of the query's own and earlier frame blocks. Because the sums are additive it is a prefix
sum over frames of per-frame statistics:

    S_t = Σ_{m ∈ frame t} v_m ⊗ R(φ(k_m))      (C_v × C_k, fp32)
    z_t = Σ_{m ∈ frame t} φ(k_m)                 (C_k)
    Ŝ_t = Ŝ_{t−1} + S_t,  ẑ_t = ẑ_{t−1} + z_t    (running sums, fp32)
    a query of frame t reads the prefix up to the last frame of its block (b = block_size):
    out_n = Ŝ_e · R(φ(q_n)) / (ẑ_e · φ(q_n) + eps),  e = min((t // b + 1)·b, T) − 1

The running sums (Ŝ, ẑ) after a chunk are a `LinearAttnState`; passing it back in continues the
prefix, which is the recurrent form streaming uses (chunks must end on block boundaries).

Numerics follow the stock processor: the numerator in fp32, the normaliser `1 / (k̂·q + 1e-15)` in
the input dtype (the key sums are accumulated in fp32 and rounded to it once), the
result cast back to the input dtype. With one block covering every frame this is the stock
processor up to fp32 summation order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from causalize.context import FrameContext
from causalize.errors import CausalizeError
from causalize.layout import tile_history

EPS = 1e-15  # the stock processor's normaliser epsilon


@dataclass
class LinearAttnState:
    """Running sums of every key seen so far, per sample and head.

    kv: (B, H, C_v, C_k) fp32 Σ v ⊗ R(φ(k)); ksum: (B, H, C_k) fp32 Σ φ(k).
    """

    kv: torch.Tensor
    ksum: torch.Tensor


@dataclass
class LinearAttnFeatures:
    """Per-head features of one call, all (B, H, N, C): φ(q), φ(k), R(φ(q)), R(φ(k)), v."""

    q: torch.Tensor
    k: torch.Tensor
    q_rot: torch.Tensor
    k_rot: torch.Tensor
    v: torch.Tensor


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rotary embedding on (B, N, H, C) with (·, N, ·, C) tables (Wan-style RoPE).

    Pair (x[2i], x[2i+1]) is rotated by the angle whose cosine is cos[2i] and sine sin[2i+1]. The
    product is taken in the tables' dtype (fp64 for Sana) and rounded to x's dtype once.
    """
    even, odd = x[..., 0::2], x[..., 1::2]
    c, s = cos[..., 0::2], sin[..., 1::2]
    rotated = torch.stack((even * c - odd * s, even * s + odd * c), dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def features(
    attn,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LinearAttnFeatures:
    """Projections, qk-norm, the ReLU kernel and RoPE of a diffusers `Attention`, as (B, H, N, C)."""
    source = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    q, k, v = attn.to_q(hidden_states), attn.to_k(source), attn.to_v(source)
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    q, k, v = (x.unflatten(-1, (attn.heads, -1)) for x in (q, k, v))  # (B, N, H, C)
    q, k = F.relu(q), F.relu(k)
    if rotary_emb is not None:
        q_rot, k_rot = rotate(q, *rotary_emb), rotate(k, *rotary_emb)
    else:
        q_rot, k_rot = q, k
    q, k, q_rot, k_rot, v = (x.transpose(1, 2) for x in (q, k, q_rot, k_rot, v))
    return LinearAttnFeatures(q, k, q_rot, k_rot, v)


def group_sums(k: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group key statistics of (B, H, G·L, C) keys split into `groups` equal consecutive groups.

    Returns kv (B, H, G, C_v, C_k) = Σ v ⊗ R(φ(k)) and ksum (B, H, G, C_k) = Σ φ(k), both fp32.
    Each group's sums depend on that group's tokens only.
    """
    kr = k_rot.float().unflatten(2, (groups, -1))  # (B, H, G, L, C_k)
    vv = v.float().unflatten(2, (groups, -1))  # (B, H, G, L, C_v)
    kv = vv.transpose(-1, -2) @ kr  # (B, H, G, C_v, C_k)
    ksum = k.float().unflatten(2, (groups, -1)).sum(dim=3)
    return kv, ksum


def prefix_sums(
    kv: torch.Tensor, ksum: torch.Tensor, state: LinearAttnState | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive prefix sums over the group axis (2), continuing from `state` when given.

    Written as the recurrence s_g = s_{g-1} + x_g in fp32 rather than `torch.cumsum`, whose CPU
    kernel accumulates fp32 in fp64 and rounds each output (and whose CUDA scan order depends on
    the length): with the explicit recurrence a run split into chunks, each continuing from the
    previous chunk's state, performs the very same additions as one run, bit for bit, on any device.
    Prefix g reads only groups <= g, so later groups never touch earlier outputs.
    """
    run_kv = None if state is None else state.kv
    run_ks = None if state is None else state.ksum
    kvs, kss = [], []
    for g in range(kv.shape[2]):
        run_kv = kv[:, :, g] if run_kv is None else run_kv + kv[:, :, g]
        run_ks = ksum[:, :, g] if run_ks is None else run_ks + ksum[:, :, g]
        kvs.append(run_kv)
        kss.append(run_ks)
    return torch.stack(kvs, dim=2), torch.stack(kss, dim=2)


def read_out(q: torch.Tensor, q_rot: torch.Tensor, kv: torch.Tensor, ksum: torch.Tensor, groups: int) -> torch.Tensor:
    """Queries (B, H, G·L, C) of group g read group g's sums; returns (B, H, G·L, C_v) fp32.

    The numerator is fp32; the normaliser 1 / (ẑ·φ(q) + eps) is computed in q's dtype, as in the
    stock processor.
    """
    qg = q.unflatten(2, (groups, -1))  # (B, H, G, L, C_k)
    qr = q_rot.float().unflatten(2, (groups, -1))
    num = qr @ kv.transpose(-1, -2)  # (B, H, G, L, C_v)
    den = qg @ ksum.to(q.dtype).unsqueeze(-1)  # (B, H, G, L, 1)
    z = 1 / (den + EPS)
    return (num * z).flatten(2, 3)


def block_ends(frames: int, block_size: int, device=None) -> torch.Tensor:
    """Index of the last frame of each frame's block: min((t // b + 1)·b, T) − 1."""
    t = torch.arange(frames, device=device)
    return torch.clamp((t // block_size + 1) * block_size, max=frames) - 1


def block_causal_linear_attention(
    f: LinearAttnFeatures,
    frames: int,
    block_size: int = 1,
    state: LinearAttnState | None = None,
    sums: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, LinearAttnState]:
    """Block-causal linear attention over `frames` frame-major frames of equal token count
    (`sums`: their `group_sums`, when the caller needs them too).

    Returns the (B, H, N, C_v) fp32 output and the running sums after the last frame.
    """
    kv, ksum = prefix_sums(*(sums or group_sums(f.k, f.k_rot, f.v, frames)), state)
    final = LinearAttnState(kv[:, :, -1], ksum[:, :, -1])
    if block_size > 1:
        ends = block_ends(frames, block_size, kv.device)
        kv, ksum = kv.index_select(2, ends), ksum.index_select(2, ends)
    return read_out(f.q, f.q_rot, kv, ksum, frames), final


def global_linear_attention(f: LinearAttnFeatures) -> torch.Tensor:
    """Every query reads the sums of every key: the stock, non-causal form (keys may be context)."""
    kv, ksum = group_sums(f.k, f.k_rot, f.v, 1)
    return read_out(f.q, f.q_rot, kv, ksum, 1)


class BlockCausalLinearAttnProcessor:
    """Replaces `SanaLinearAttnProcessor3_0`: the same ReLU linear attention, block-causal over frames.

    Self-attention calls read the frame grid of the forward in progress from `context`; a query of
    frame t sees the keys of every frame whose block (frame // block_size) is <= t's block. A call
    with `encoder_hidden_states` attends to context tokens, not frames, and stays global. The
    stock processor ignores `attention_mask`, and so does this one.
    """

    def __init__(self, context: FrameContext, block_size: int = 1):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self.context = context
        self.block_size = block_size

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        dtype = hidden_states.dtype
        f = features(attn, hidden_states, encoder_hidden_states, rotary_emb)
        if encoder_hidden_states is not None:
            out = global_linear_attention(f)
        else:
            grid = self.context.current()
            if hidden_states.shape[1] != grid.video_tokens:
                raise CausalizeError(
                    f"linear attention over {hidden_states.shape[1]} tokens does not fit {grid.frames} frames x {grid.per_frame} tokens",
                    "the plan's token layout is wrong for this model: fix its `tokens` function",
                )
            out, _ = block_causal_linear_attention(f, grid.frames, self.block_size)
        out = out.transpose(1, 2).flatten(2).to(dtype)  # (B, N, H·C_v)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def __repr__(self) -> str:
        return f"BlockCausalLinearAttnProcessor(block_size={self.block_size})"


# --- streaming (METHOD.md §10): the running sums are the cache -----------------------------------


def _tiled_state(state: LinearAttnState, batch: int) -> LinearAttnState:
    """The cached sums for a call of `batch` samples: a multiple of the cache batch (both guidance
    branches batched in one call) sees the cache tiled."""
    what = "linear-attention cache"
    return LinearAttnState(tile_history(state.kv, batch, what), tile_history(state.ksum, batch, what))


class LinearAttnCache:
    """The streaming state of one linear-attention module: the running sums over every cached frame,
    held in buffers that each write overwrites in place (kept across `reset`). A rolling rollout
    also records each frame's own sums (`record`), so that `evict` can rebuild the running sums
    without the frames that left the window."""

    def __init__(self) -> None:
        self._kv: torch.Tensor | None = None
        self._ksum: torch.Tensor | None = None
        self.frames = 0  # frames written (global: a rolling cache keeps counting past evictions)
        self.recorded: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # (frame id, Σ v ⊗ R(φ(k)), Σ φ(k))
        self._recorded_total = 0  # frames ever recorded: all the written ones, or evict cannot rebuild

    @property
    def length(self) -> int:
        """Frames whose sums are held: the recorded ones in a rolling rollout, else every written one."""
        return len(self.recorded) if self._recorded_total else self.frames

    @property
    def state(self) -> LinearAttnState | None:
        """The sums over the cached frames, or None while no frame is cached."""
        return LinearAttnState(self._kv, self._ksum) if self.frames else None

    def store(self, state: LinearAttnState, frames: int) -> None:
        """The sums after `frames` more frames: copied into the buffers (which then hold nothing
        else: the state may be a view of a call's whole prefix stack)."""
        if self.frames and state.kv.shape[0] != self._kv.shape[0]:
            raise CausalizeError(
                f"history written with batch {state.kv.shape[0]}, the cache holds batch {self._kv.shape[0]}"
            )
        if _same_layout(self._kv, state.kv) and _same_layout(self._ksum, state.ksum):
            self._kv.copy_(state.kv)
            self._ksum.copy_(state.ksum)
        else:
            self._kv, self._ksum = state.kv.detach().clone(), state.ksum.detach().clone()
        self.frames += frames

    def record(self, kv: torch.Tensor, ksum: torch.Tensor, first: int) -> None:
        """Keep the per-frame sums (B, H, T, ·) of frames first .. first+T−1 (`group_sums`)."""
        for t in range(kv.shape[2]):
            self.recorded.append((first + t, kv[:, :, t].detach().clone(), ksum[:, :, t].detach().clone()))
        self._recorded_total += kv.shape[2]

    def evict(self, first: int, stop: int) -> None:
        """Drop frames first .. stop−1 (recorded ones): the running sums become those of the kept
        frames, added in order as `prefix_sums` adds them."""
        if self._recorded_total != self.frames:
            raise CausalizeError("linear attention cannot drop frames it did not record (a write outside rolling)")
        kept = [r for r in self.recorded if not first <= r[0] < stop]
        if len(kept) == len(self.recorded):
            return
        self.recorded = kept
        if not kept:
            self._kv.zero_()
            self._ksum.zero_()
            return
        self._kv.copy_(functools.reduce(torch.add, (kv for _, kv, _ in kept)))
        self._ksum.copy_(functools.reduce(torch.add, (ks for _, _, ks in kept)))

    def reset(self) -> None:
        self.frames = self._recorded_total = 0
        self.recorded = []

    def nbytes(self) -> int:
        tensors = [self._kv, self._ksum, *(t for _, kv, ks in self.recorded for t in (kv, ks))]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _same_layout(buffer: torch.Tensor | None, t: torch.Tensor) -> bool:
    return buffer is not None and buffer.shape == t.shape and buffer.dtype == t.dtype and buffer.device == t.device


class StreamingLinearAttnProcessor:
    """Wraps a BlockCausalLinearAttnProcessor: outside a streaming call it is that processor; inside
    one, the call's frames continue the prefix sums of the cached frames (`LinearAttnState`), so a
    query of the current frame reads exactly the sums a full-window call gives it. "write" calls
    (history) store the sums after their last frame; "read" calls (denoising steps) leave them.

    With block_size b > 1 a call must start on a block boundary (the cached frames a multiple of b):
    a block's queries read sums that include the block's later frames."""

    def __init__(self, causal: BlockCausalLinearAttnProcessor, context: FrameContext):
        if not isinstance(causal, BlockCausalLinearAttnProcessor):
            raise CausalizeError(f"cannot stream through {type(causal).__name__}")
        self.causal = causal
        self.context = context
        self.cache = LinearAttnCache()

    @property
    def block_size(self) -> int:
        return self.causal.block_size

    def __call__(
        self,
        attn,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        stream = self.context.stream
        if stream is None or encoder_hidden_states is not None:
            return self.causal(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        if stream.offset % self.block_size:
            raise CausalizeError(
                f"a streaming call starting at frame {stream.offset} splits a block of {self.block_size} frames"
            )
        if self.cache.frames != stream.offset:
            raise CausalizeError(
                f"linear attention has sums of {self.cache.frames} frames for a streaming call at frame {stream.offset}"
            )
        dtype = hidden_states.dtype
        f = features(attn, hidden_states, None, rotary_emb)
        grid = self.context.current()
        if hidden_states.shape[1] != grid.video_tokens:
            raise CausalizeError(
                f"linear attention over {hidden_states.shape[1]} tokens does not fit {grid.frames} frames x {grid.per_frame} tokens",
                "the plan's token layout is wrong for this model: fix its `tokens` function",
            )
        state = None if self.cache.state is None else _tiled_state(self.cache.state, hidden_states.shape[0])
        keep = stream.mode == "write" and stream.rolling  # each frame's own sums, to drop it later
        sums = group_sums(f.k, f.k_rot, f.v, grid.frames) if keep else None
        out, final = block_causal_linear_attention(f, grid.frames, self.block_size, state, sums)
        if stream.mode == "write":
            with torch.no_grad():
                if keep:
                    self.cache.record(*sums, first=stream.offset)
                self.cache.store(final, grid.frames)
        out = out.transpose(1, 2).flatten(2).to(dtype)
        out = attn.to_out[0](out)
        return attn.to_out[1](out)

    def __repr__(self) -> str:
        return f"StreamingLinearAttnProcessor({self.causal!r})"
