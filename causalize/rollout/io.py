"""Files in and out of a rollout: context frames, actions, and the generated clip.

Observations travel as numpy arrays in the episode format (docs/EPISODES.md): pixels are uint8
(T, H, W, C), latents float32 (T, C, H, W). The model sees them in its native layout and in model
space (pixels x / 127.5 − 1, as the trainer feeds them; latents as stored).

Reading (`read_frames`, `read_actions`): episode `.npz` (key `frames` or `latents`), `.npy`, a
video or image through imageio (`.mp4`, `.gif`, `.png`, ...); actions from `.npy`, `.npz` (key
`actions`), `.json` (a list) or text (one action per line). Every problem is a UsageError that
names the file, so the CLI reports it in one line with exit code 2. Array sizes are checked from
the headers before data is read, and only the context frames asked for are read
(causalize.rollout.arrays).

Writing (`write_frames`): `.mp4` (imageio-ffmpeg), `.gif` or `.npz`, through a temporary file in
the destination directory that is renamed into place; an existing file is never replaced unless
`overwrite=True`.

`causalize.rollout.to_file.rollout_to_file` ties it together for `causalize rollout`. imageio is
imported only where a video or image is read or written.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np

from causalize import fs
from causalize.errors import UsageError
from causalize.rollout.arrays import MAX_ARRAY_BYTES, load_npy, npz_headers, read_rows, rows_within_bound, short_error

if TYPE_CHECKING:
    import torch

    from causalize.world_model import WorldModel

Kind = Literal["pixels", "latents"]
VIDEO_EXTS = (".mp4", ".gif", ".avi", ".mov", ".mkv", ".webm", ".webp")
IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
OUTPUT_EXTS = (".mp4", ".gif", ".npz")
DEFAULT_FPS = 8.0
INT64_MAX = 2**63 - 1


@dataclass
class Frames:
    """Observations as stored: pixels uint8 (T, H, W, C) or latents float32 (T, C, H, W)."""

    data: np.ndarray
    kind: Kind

    @property
    def count(self) -> int:
        return int(self.data.shape[0])

    @property
    def channels(self) -> int:
        return int(self.data.shape[3] if self.kind == "pixels" else self.data.shape[1])

    def first(self, k: int) -> Frames:
        return Frames(self.data[:k], self.kind)


# --------------------------------------------------------------------------------- observations


def as_frames(data: Any, kind: Kind, where: str = "context") -> Frames:
    """Validate an array of observations (or one observation) of `kind` into `Frames`.

    Pixels must be uint8 (never rescaled silently); latents any finite float (kept as float32)."""
    if kind not in ("pixels", "latents"):
        raise UsageError(f"observation kind must be 'pixels' or 'latents', got {kind!r}")
    arr = _numpy(data, where)
    if arr.ndim == 3:
        arr = arr[None]  # one frame
    layout = "(T, H, W, C)" if kind == "pixels" else "(T, C, H, W)"
    if arr.ndim != 4 or arr.shape[0] < 1:
        raise UsageError(
            f"{where}: {kind} must be {layout} or one frame, got shape {tuple(arr.shape)}",
            "pixels are uint8 (T, H, W, C); latents float (T, C, H, W)",
        )
    if min(arr.shape[1:]) < 1:
        raise UsageError(
            f"{where}: {kind} of shape {tuple(arr.shape)} {layout} have an empty dimension",
            "every frame needs a height, a width and channels of at least 1",
        )
    if kind == "pixels":
        if arr.dtype != np.uint8:
            raise UsageError(
                f"{where}: pixels must be uint8 0..255, got {arr.dtype}",
                "latents are float (T, C, H, W); pixels are never rescaled silently",
            )
        return Frames(np.ascontiguousarray(arr), kind)
    if arr.dtype.kind != "f":
        raise UsageError(f"{where}: latents must be floating point, got {arr.dtype}", "uint8 arrays are pixels")
    if not np.isfinite(arr).all():
        raise UsageError(f"{where}: latents contain NaN or inf")
    return Frames(np.ascontiguousarray(arr, dtype=np.float32), kind)


def _numpy(data: Any, where: str) -> np.ndarray:
    if hasattr(data, "detach") and hasattr(data, "cpu"):  # a torch tensor, without importing torch
        data = data.detach().cpu().numpy()
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError) as exc:
        raise UsageError(f"{where}: not an array: {exc}") from None
    if arr.dtype == object:
        raise UsageError(f"{where}: ragged or non-numeric data")
    return arr


def read_frames(path: str | os.PathLike, context_frames: int | None = None) -> Frames:
    """Context frames from an episode `.npz`, a `.npy` array or a video / image file; the first
    `context_frames` of them when given (an error if the file has fewer)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: context file not found" if not p.exists() else f"{p}: not a file")
    ext = p.suffix.lower()
    if context_frames is not None and (
        isinstance(context_frames, bool) or not isinstance(context_frames, int) or context_frames < 1
    ):
        raise UsageError(f"--context-frames must be an integer >= 1, got {context_frames!r}", "e.g. --context-frames 4")
    if ext == ".npz":
        frames = _frames_from_npz(p, context_frames)
    elif ext == ".npy":
        arr = load_npy(p, context_frames, "context frames")
        frames = as_frames(arr, "pixels" if arr.dtype == np.uint8 else "latents", str(p))
    elif ext in VIDEO_EXTS or ext in IMAGE_EXTS:
        frames = as_frames(_read_media(p, context_frames), "pixels", str(p))
    else:
        raise UsageError(
            f"{p}: unknown context format {ext or '(no extension)'!r}",
            "use an episode .npz, a .npy array, or a video / image (.mp4, .gif, .png, ...)",
        )
    if context_frames is not None:
        if frames.count < context_frames:
            raise UsageError(
                f"{p} has {frames.count} frame(s), fewer than the {context_frames} context frames asked for",
                f"pass --context-frames {frames.count} or fewer",
            )
        frames = frames.first(context_frames)
    return frames


def _frames_from_npz(p: Path, context_frames: int | None) -> Frames:
    headers = npz_headers(p)
    keys = [k for k in ("frames", "latents") if k in headers]
    if not keys:
        raise UsageError(
            f"{p}: no 'frames' or 'latents' array (keys: {', '.join(sorted(headers)) or 'none'})",
            "an episode .npz holds frames uint8 (T, H, W, C) or latents float32 (T, C, H, W)",
        )
    if len(keys) == 2:
        raise UsageError(f"{p}: holds both 'frames' and 'latents'; keep one", "write the context with one of them")
    kind: Kind = "pixels" if keys[0] == "frames" else "latents"
    header = headers[keys[0]]
    if len(header.shape) != 4:
        raise UsageError(
            f"{p}: '{keys[0]}' must be 4-D, got shape {tuple(header.shape)}",
            "frames are (T, H, W, C) uint8; latents (T, C, H, W) float32",
        )
    rows = rows_within_bound(p, keys[0], header.shape, header.dtype, context_frames, "context frames")
    return as_frames(read_rows(p, keys[0], header, rows), kind, str(p))


def _read_media(p: Path, wanted: int | None = None) -> np.ndarray:
    """The frames of a video / GIF (the first `wanted` of them), or one image, as (T, H, W, C)
    uint8. Decoded frame by frame and refused past MAX_ARRAY_BYTES, so a small, highly compressed
    file cannot fill the memory."""
    try:
        import imageio.v3 as iio
    except ImportError:
        raise UsageError(
            f"{p}: reading videos and images needs imageio", "pip install imageio imageio-ffmpeg"
        ) from None
    try:
        with warnings.catch_warnings():  # on a bad file imageio probes every plugin, some deprecated
            warnings.simplefilter("ignore", DeprecationWarning)
            arr = _decode_bounded(iio, p, wanted)
    except UsageError:
        raise
    except Exception as exc:  # imageio raises many types (OSError, ValueError, struct.error, ...)
        raise UsageError(f"{p}: cannot read as {p.suffix.lower()}: {short_error(exc)}") from None
    single = p.suffix.lower() in IMAGE_EXTS
    if arr.ndim == 2 or (arr.ndim == 3 and not single):  # grayscale image / grayscale frames
        arr = arr[..., None]
    if arr.ndim == 3:
        arr = arr[None]
    if arr.dtype != np.uint8:
        raise UsageError(
            f"{p}: {arr.dtype} pixels are not supported, only 8-bit", "convert the file to 8 bits per channel"
        )
    return arr


def _decode_bounded(iio, p: Path, wanted: int | None) -> np.ndarray:
    if p.suffix.lower() in IMAGE_EXTS:
        arrays, total = [np.asarray(iio.imread(p))], 0
        total = arrays[0].nbytes
    else:
        arrays, total = [], 0
        for frame in iio.imiter(p):
            arrays.append(np.asarray(frame))
            total += arrays[-1].nbytes
            if wanted is not None and len(arrays) >= wanted:
                break
            if total > MAX_ARRAY_BYTES:
                break
    if total > MAX_ARRAY_BYTES:
        raise UsageError(
            f"{p}: the decoded frames take more than the {MAX_ARRAY_BYTES / 2**30:.3g} GiB allowed for context frames",
            "pass --context-frames N to read only the first N frames, or a shorter / smaller video",
        )
    return arrays[0] if len(arrays) == 1 and p.suffix.lower() in IMAGE_EXTS else np.stack(arrays)


def frames_to_model(
    frames: Frames,
    frame_axis: int,
    channels: int | None = None,
    where: str = "context",
    channel_axis: int | None = None,
) -> torch.Tensor:
    """(1, ...) tensor in the model's native layout (frames on `frame_axis`, channels on
    `channel_axis`: see layout.to_native), in model space.

    RGBA pixels lose their alpha channel when the model takes 3 channels."""
    import torch

    frames = fit_channels(frames, channels)
    data = frames.data
    if channels is not None and frames.channels != channels:
        hint = (
            "this model works on latents: pass latents (.npz key 'latents', or a float .npy)"
            if frames.kind == "pixels"
            else "pass frames with the model's channel count"
        )
        raise UsageError(
            f"{where}: {frames.kind} have {frames.channels} channels, the model's sample has {channels}", hint
        )
    x = torch.from_numpy(np.ascontiguousarray(data))
    if frames.kind == "pixels":
        x = (x.float() / 127.5 - 1.0).permute(0, 3, 1, 2)  # (T, C, H, W)
    from causalize.layout import to_native

    return to_native(x[None], frame_axis, channel_axis).contiguous()


def fit_channels(frames: Frames, channels: int | None) -> Frames:
    """RGBA pixels become RGB for a 3-channel model (the alpha channel is dropped)."""
    if frames.kind == "pixels" and channels == 3 and frames.channels == 4:
        return Frames(np.ascontiguousarray(frames.data[..., :3]), "pixels")
    return frames


def model_to_frames(
    x: torch.Tensor, frame_axis: int, kind: Kind, batch_index: int = 0, channel_axis: int | None = None
) -> Frames:
    """The inverse of `frames_to_model` for one sample: pixels are clamped to [−1, 1] and rounded."""
    import torch

    from causalize.layout import from_native

    t = from_native(x.detach().float().cpu(), frame_axis, channel_axis)[batch_index]  # (T, C, H, W)
    if kind == "latents":
        return Frames(t.numpy().copy(), kind)
    pixels = ((t.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    return Frames(pixels.contiguous().numpy().copy(), kind)


# ---------------------------------------------------------------------------------------- actions


_SPLIT = re.compile(r"[\s,;]+")
ACTIONS_HINT = "discrete adapters take integer indices (one per line); continuous ones rows of A numbers"


def read_actions(path: str | os.PathLike) -> np.ndarray:
    """The actions of a file, as an array: (n,) indices or (n, A) rows. Not yet checked against a
    model (see `actions_to_tensor`)."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{p}: actions file not found" if not p.exists() else f"{p}: not a file")
    ext = p.suffix.lower()
    if ext == ".npy":
        arr = load_npy(p)
    elif ext == ".npz":
        headers = npz_headers(p)
        if "actions" not in headers:
            raise UsageError(
                f"{p}: no 'actions' array (keys: {', '.join(sorted(headers)) or 'none'})",
                "store the actions under the key 'actions'",
            )
        h = headers["actions"]
        arr = read_rows(p, "actions", h, rows_within_bound(p, "actions", h.shape, h.dtype, None, "actions"))
    elif ext == ".json":
        arr = _actions_from_json(p)
    else:
        arr = _actions_from_text(p)
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise UsageError(f"{p}: actions must be numbers, got {arr.dtype}", ACTIONS_HINT)
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise UsageError(f"{p}: no actions: nothing to generate", "give one action per frame to generate")
    return arr


def _actions_from_json(p: Path) -> np.ndarray:
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{p}: not valid JSON: {short_error(exc)}") from None
    if isinstance(doc, dict) and "actions" in doc:
        doc = doc["actions"]
    if not isinstance(doc, list):
        raise UsageError(f"{p}: expected a JSON list of actions (or an object with an 'actions' list)")
    big = _first_huge_int(doc)
    if big is not None:
        raise UsageError(f"{p}: {big} does not fit in a 64-bit integer", ACTIONS_HINT)
    try:
        arr = np.asarray(doc)
    except (ValueError, OverflowError):
        raise UsageError(f"{p}: actions must all have the same length", ACTIONS_HINT) from None
    if arr.dtype == object or arr.dtype.kind not in "biuf":
        raise UsageError(f"{p}: actions must be numbers or lists of numbers of one length", ACTIONS_HINT)
    return arr


def _first_huge_int(doc: Any) -> int | None:
    """An integer of a parsed JSON document beyond int64 (numpy would make an object array or
    overflow), or None."""
    stack = [doc]
    while stack:
        x = stack.pop()
        if isinstance(x, list):
            stack.extend(x)
        elif isinstance(x, int) and not isinstance(x, bool) and not -INT64_MAX - 1 <= x <= INT64_MAX:
            return x
    return None


def _actions_from_text(p: Path) -> np.ndarray:
    """One action per line: an index, or numbers separated by spaces or commas; # comments."""
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{p}: cannot read as text: {short_error(exc)}") from None
    rows: list[list[int | float]] = []
    width = None
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        row = [_number(tok, p, lineno) for tok in _SPLIT.split(line) if tok]
        if width is not None and len(row) != width:
            raise UsageError(f"{p}: line {lineno} has {len(row)} values, earlier lines {width}", ACTIONS_HINT)
        width = len(row)
        rows.append(row)
    if not rows:
        raise UsageError(f"{p}: no actions: nothing to generate", "give one action per frame to generate")
    if all(isinstance(v, int) for row in rows for v in row):
        arr = np.asarray(rows, dtype=np.int64)
    else:
        arr = np.asarray(rows, dtype=np.float64)
    return arr[:, 0] if width == 1 else arr


def _number(tok: str, p: Path, lineno: int) -> int | float:
    try:
        value = int(tok)
    except ValueError:
        pass
    else:
        if not -INT64_MAX - 1 <= value <= INT64_MAX:  # numpy could not hold it (OverflowError)
            raise UsageError(f"{p}: line {lineno}: {tok} does not fit in a 64-bit integer", ACTIONS_HINT)
        return value
    try:
        return float(tok)
    except ValueError:
        raise UsageError(f"{p}: line {lineno}: {tok!r} is not a number", ACTIONS_HINT) from None


def actions_to_tensor(actions: Any, action_type: str, action_dim: int, where: str = "actions") -> torch.Tensor:
    """Checked actions as the sampler takes them at batch 1.

    discrete: (n,) integer indices in [0, N) -> (1, n) int64, or (n, N) 0/1 multi-hot rows ->
    (1, n, N) float; continuous: (n, A) (or (n,) when A = 1) finite numbers -> (1, n, A) float32."""
    import torch

    arr = _numpy(actions, where)
    discrete_hint = (
        f"this checkpoint's adapter is discrete: one integer index in [0, {action_dim}) per line, "
        f"or rows of {action_dim} 0/1 values (multi-hot)"
    )
    continuous_hint = f"this checkpoint's adapter is continuous: one row of {action_dim} numbers per action"
    hint = discrete_hint if action_type == "discrete" else continuous_hint
    if arr.dtype.kind not in "biuf":
        raise UsageError(f"{where}: actions must be numbers, got {arr.dtype}", hint)
    if arr.ndim == 0 or arr.shape[0] == 0:
        raise UsageError(f"{where}: no actions: nothing to generate", "give one action per frame to generate")
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise UsageError(f"{where}: actions contain NaN or inf", hint)
    if action_type == "discrete":
        if arr.dtype.kind == "f":
            raise UsageError(
                f"{where}: the action adapter is discrete ({action_dim} actions): actions must be integer indices, got {arr.dtype}",
                discrete_hint,
            )
        if arr.ndim == 1:
            if arr.dtype.kind == "b":
                raise UsageError(f"{where}: discrete actions are integer indices, got booleans", discrete_hint)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < 0 or hi >= action_dim:
                raise UsageError(
                    f"{where}: action indices must lie in [0, {action_dim}), got values in [{lo}, {hi}]", discrete_hint
                )
            return torch.from_numpy(arr.astype(np.int64))[None]
        if arr.ndim == 2 and arr.shape[1] == action_dim:
            if not np.isin(arr, (0, 1)).all():
                raise UsageError(f"{where}: multi-hot actions must be 0 or 1", discrete_hint)
            return torch.from_numpy(arr.astype(np.float32))[None]
        raise UsageError(
            f"{where}: discrete actions are (n,) indices or (n, {action_dim}) multi-hot rows, got shape {tuple(arr.shape)}",
            discrete_hint,
        )
    if action_type != "continuous":
        raise UsageError(f"unknown action type {action_type!r}", "action adapters are 'discrete' or 'continuous'")
    if arr.dtype.kind == "b":
        raise UsageError(f"{where}: continuous actions must be numbers, got booleans", continuous_hint)
    if arr.ndim == 1 and action_dim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[1] != action_dim:
        got = f"dimension {arr.shape[1]}" if arr.ndim == 2 else f"shape {tuple(arr.shape)}"
        raise UsageError(
            f"{where}: the action adapter expects {action_dim}-dimensional continuous actions (n, {action_dim}), got {got}",
            continuous_hint,
        )
    return torch.from_numpy(arr.astype(np.float32))[None]


# ---------------------------------------------------------------------------------------- writing


def check_output(
    path: str | os.PathLike, kind: Kind = "pixels", overwrite: bool = False, channels: int | None = None
) -> Path:
    """Fail before any work if `path` cannot be written: unknown extension, latents (or pixels
    with other than 1, 3 or 4 channels) to a video, an existing file without `overwrite`, a
    directory in the way."""
    p = Path(path)
    ext = p.suffix.lower()
    if ext not in OUTPUT_EXTS:
        raise UsageError(f"{p}: unknown output format {ext or '(no extension)'!r}", "write .mp4, .gif or .npz")
    if kind == "latents" and ext != ".npz":
        raise UsageError(f"{p}: latent frames cannot be written as {ext} (no VAE to decode them)", "write .npz")
    if channels is not None and ext != ".npz" and channels not in (1, 3, 4):
        raise UsageError(f"{p}: {channels}-channel frames cannot be written as {ext}", "write .npz")
    if p.is_dir():
        raise UsageError(f"{p} is a directory", "give a file name ending in .mp4, .gif or .npz")
    if p.exists() and not overwrite:
        raise UsageError(f"{p} exists", "pass --overwrite to replace it, or choose another OUT")
    if p.parent.exists() and not p.parent.is_dir():
        raise UsageError(f"{p.parent} is not a directory", "choose an output path inside a directory")
    check_writer(ext)
    return p


def check_writer(ext: str) -> None:
    """The packages a video output needs are installed: found (not imported, so the check costs
    nothing) before any frame is generated rather than when the clip is written."""
    ext = ext.lower()
    if ext not in (".mp4", ".gif"):
        return
    if not _installed("imageio"):
        raise UsageError(
            f"writing {ext} needs imageio, which is not installed",
            "pip install imageio" + (" imageio-ffmpeg" if ext == ".mp4" else "") + ", or write .npz",
        )
    if ext == ".mp4" and not (_installed("imageio_ffmpeg") or _installed("av")):
        raise UsageError(
            "writing .mp4 needs an ffmpeg backend for imageio (imageio-ffmpeg or PyAV), and neither is installed",
            "pip install imageio-ffmpeg, or write .gif / .npz",
        )


def _installed(module: str) -> bool:
    if module in sys.modules:  # imported already, or blocked (None)
        return sys.modules[module] is not None
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def check_fps(fps: float) -> None:
    if isinstance(fps, bool) or not (isinstance(fps, (int, float)) and math.isfinite(fps) and fps > 0):
        raise UsageError(f"fps must be a positive number, got {fps!r}")


def write_frames(
    path: str | os.PathLike,
    frames: Frames,
    *,
    fps: float = DEFAULT_FPS,
    actions: np.ndarray | None = None,
    meta: dict[str, Any] | None = None,
    context_frames: int = 0,
    overwrite: bool = False,
    extra: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write frames atomically as `.mp4`, `.gif` or `.npz`.

    `.npz`: `frames` uint8 (T, H, W, C) or `latents` float32 (T, C, H, W), `actions` (when given),
    `context_frames` (how many leading frames were given, not generated) and `rollout` (`meta` as a
    JSON string), and `extra` arrays (a decoded rollout keeps its `latents`). Videos: odd sizes are padded by repeating the last row / column (H.264 needs
    even sizes); GIF encoders merge identical consecutive frames (their durations add up)."""
    p = check_output(path, frames.kind, overwrite, frames.channels)
    check_fps(fps)
    ext = p.suffix.lower()
    p.parent.mkdir(parents=True, exist_ok=True)
    # fs.new_file: the temporary keeps the extension (imageio picks the format by it), and the
    # final rename never replaces a file that appeared meanwhile unless `overwrite`.
    try:
        with fs.new_file(p, overwrite=overwrite) as tmp:
            if ext == ".npz":
                _write_npz(tmp, frames, actions, meta, context_frames, extra)
            else:
                _write_media(tmp, frames.data, ext, fps)
    except FileExistsError:
        raise UsageError(f"{p} exists", "pass --overwrite to replace it, or choose another OUT") from None
    return p


def _write_npz(
    tmp: Path,
    frames: Frames,
    actions: np.ndarray | None,
    meta: dict[str, Any] | None,
    context_frames: int,
    extra: dict[str, np.ndarray] | None = None,
) -> None:
    arrays: dict[str, np.ndarray] = {
        **(extra or {}),
        "frames" if frames.kind == "pixels" else "latents": frames.data,
        "context_frames": np.asarray(context_frames, dtype=np.int64),
    }
    if actions is not None:
        arrays["actions"] = np.asarray(actions)
    if meta is not None:
        arrays["rollout"] = np.asarray(json.dumps(meta, default=str))
    with open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
        fh.flush()
        os.fsync(fh.fileno())


def _write_media(tmp: Path, data: np.ndarray, ext: str, fps: float) -> None:
    try:
        import imageio.v3 as iio
    except ImportError:
        raise UsageError(
            f"writing {ext} needs imageio (and imageio-ffmpeg for .mp4)",
            "pip install imageio imageio-ffmpeg, or write .npz",
        ) from None
    if data.shape[-1] == 1:
        data = data[..., 0]
    if ext == ".mp4":
        if data.shape[-1] == 4 and data.ndim == 4:
            data = data[..., :3]
        pad = [(0, 0), (0, data.shape[1] % 2), (0, data.shape[2] % 2)] + [(0, 0)] * (data.ndim - 3)
        data = np.pad(data, pad, mode="edge")
        try:
            iio.imwrite(tmp, data, fps=fps, codec="libx264", macro_block_size=1)
        except Exception as exc:
            raise UsageError(
                f"cannot write .mp4: {short_error(exc)}", "install imageio-ffmpeg, or write .gif / .npz"
            ) from None
    else:
        iio.imwrite(tmp, data, duration=1000.0 / fps, loop=0)


def sample_geometry(wm: WorldModel) -> tuple[int, int | None]:
    """(frame axis, channels) of the model's sample; channels None when the sample is not a 5-D
    video tensor (packed tokens), which file rollouts do not support."""
    axis = wm.plan.layout.inputs[wm.plan.conditioning.sample_arg]
    sample = wm.example_sample(wm.plan.layout.block_size)
    if sample.ndim != 5:
        return axis, None
    from causalize.layout import from_native

    return axis, int(from_native(sample, axis, wm.plan.layout.channel_axis).shape[2])


__all__ = [
    "Frames",
    "actions_to_tensor",
    "as_frames",
    "check_fps",
    "check_output",
    "check_writer",
    "fit_channels",
    "frames_to_model",
    "model_to_frames",
    "read_actions",
    "read_frames",
    "sample_geometry",
    "write_frames",
]
