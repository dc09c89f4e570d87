"""The study's stages (:class:`Study`) and its identity on disk (``study.json``, the recordings' link).

Each stage writes under the output directory and is skipped when its completion marker is there,
so an interrupted study resumes where it stopped. The driver that calls them in order is
``benchmarks.atari.study``.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.atari import data as atari_data
from benchmarks.atari import evaluate as ev
from benchmarks.atari import patches
from benchmarks.atari import pretrain as pt
from benchmarks.atari.backbones import backbone_of
from benchmarks.atari.emulator import RecordSettings
from benchmarks.atari.runtime import StageProgress, log_stderr, read_json, write_json
from benchmarks.atari.scales import (
    AUTOENCODER,
    BASELINE,
    BASELINE_AE,
    CONTEXT_LEVELS,
    DENOISE_LEVELS,
    FINETUNE_DEFAULTS,
    STUDY_ONLY,
    StudyError,
    check_episodes,
    normalised_identity,
    variant_pipeline,
)

__all__ = [
    "DATA_LINK",
    "Study",
    "episode_subset",
    "linked_data",
    "read_identity",
]

Log = Callable[[str], None]

#: Where a study run with ``--data DIR`` finds its recordings (the tools that open a finished study
#: read it; absent when they are in OUT/data).
DATA_LINK = "data.json"


def linked_data(out: Path) -> Path | None:
    """The recordings' directory a study at ``out`` recorded in its :data:`DATA_LINK`, if any."""
    link = out / DATA_LINK
    return Path(read_json(link)["data"]) if link.is_file() else None


def read_identity(out: str | os.PathLike) -> dict[str, Any]:
    """The study.json of the study at ``out`` (scale, seed, resolved configuration), with settings
    added since it was recorded filled in at their old values."""
    path = Path(out) / "study.json"
    if not path.is_file():
        raise StudyError(f"{out} holds no study (no study.json)")
    return normalised_identity(read_json(path))


def episode_subset(root: Path, episodes: int | None) -> dict[str, Any]:
    """TrainConfig fields that fine-tune on ``episodes`` of the dataset's episodes (None: all).

    Why: does pretraining pay when action-labelled data is scarce? The trainer's split
    (``causalize.episodes.split_episodes``, split seed 0 whatever the training seed) puts exactly
    round(fraction · n) episodes, chosen by a hash of their indices, on its "test" side; the study
    trains on that side, so every variant and training seed sees the same ``episodes``."""
    from causalize.episodes import list_episodes, split_episodes

    if episodes is None:
        return {"split": None}
    n = len(list_episodes(root))
    check_episodes(episodes, n)
    if episodes == n:
        return {"split": None}
    fraction = episodes / n
    chosen = split_episodes(root, fraction)[1]
    if len(chosen) != episodes:  # the split rounds; it must not change the count
        raise StudyError(f"finetune.episodes={episodes}: the split picks {len(chosen)} of {n} episodes")
    return {"split": "test", "test_fraction": fraction}


class Study:
    """The stages, sharing the output directory, the configuration and the seed."""

    def __init__(
        self,
        out: Path,
        cfg: dict[str, Any],
        seed: int,
        *,
        scale: str,
        data_dir: Path | None = None,
        device: str = "cpu",
        log: Log = log_stderr,
        replicate: int = 0,
        record_workers: int = 1,
    ):
        #: ``root`` holds the shared stages (data, autoencoder, latents, pretraining, scratch init);
        #: ``out`` the replicate's (conversion, fine-tuning, evaluation): ``root`` itself for
        #: replicate 0, ``root/seed<S>`` for the others (training seed S = seed + replicate).
        self.root, self.cfg, self.seed, self.scale = out, cfg, seed, scale
        self.train_seed = seed + replicate
        self.out = out if replicate == 0 else out / f"seed{self.train_seed}"
        self.data_root = data_dir or out / "data"
        self.device, self.log = device, log
        #: processes that record: the clips one game each, the held-out datasets one each (the same
        #: recordings for any number)
        self.record_workers = record_workers
        self.backbone = backbone_of(cfg)
        self.space = cfg.get("space", "pixel")
        self.latent = self.space == "latent"  # the study's autoencoder
        self.patched = self.space == "patch"
        #: the world models see latents or patches, decoded to pixels for scoring
        self.encoded = self.space in ("latent", "patch")
        #: the paddle metric knows Pong only
        self.paddle = cfg["data"]["heldout"] == "Pong"
        self.executed: list[str] = []  # stages run (not skipped) by this invocation
        self._vae: tuple[Any, Any] | None = None

    def replica(self, replicate: int) -> Study:
        """The same study with another training seed: shared stages, its own conversion,
        fine-tuning and evaluation (same test segments, sampler noise and random actions)."""
        other = Study(
            self.root, self.cfg, self.seed, scale=self.scale, device=self.device, log=self.log, replicate=replicate
        )
        other.data_root, other.executed, other._vae = self.data_root, self.executed, self._vae
        return other

    # ---- bookkeeping -------------------------------------------------------------------------

    def check_identity(self) -> None:
        """Write study.json, or refuse a DIR that holds another study."""
        ident = {"scale": self.scale, "seed": self.seed, "config": self.cfg}
        path = self.root / "study.json"
        if path.is_file():
            old = normalised_identity(read_json(path))
            if old != json.loads(json.dumps(ident)):
                raise StudyError(
                    f"{self.root} holds a study with another scale, seed or configuration ({path}); "
                    "use another --out, or delete it"
                )
        else:
            write_json(path, ident)
        link = self.root / DATA_LINK
        if self.data_root.resolve() != (self.root / "data").resolve():
            write_json(link, {"data": str(self.data_root.resolve())})  # where --data put them, this time
        elif link.is_file():
            link.unlink()

    def named(self, what: str) -> str:
        """A stage's name in the log and in ``stages_run_now``: a replicate's names its training seed."""
        return what if self.train_seed == self.seed else f"{what} (seed {self.train_seed})"

    def _skip(self, marker: Path, what: str) -> bool:
        what = self.named(what)
        if marker.is_file():
            self.log(
                f"[{what}] done already ({marker.relative_to(self.root) if marker.is_relative_to(self.root) else marker}), skipped"
            )
            return True
        self.log(f"[{what}] running")
        self.executed.append(what)
        return False

    # ---- 1. data -----------------------------------------------------------------------------

    def data(self) -> dict[str, Any]:
        d = self.cfg["data"]
        settings = RecordSettings(warmup=tuple(d["warmup"]), size=int(d["size"]))
        request = {**d, "seed": self.seed, "settings": settings.to_json()}
        d = {k: v for k, v in d.items() if k not in ("warmup", "size")}
        marker = self.data_root / "summary.json"
        if marker.is_file():
            found = read_json(marker)
            if found.get("request") != json.loads(json.dumps(request)):
                raise StudyError(
                    f"{self.data_root} holds recordings made with other settings than this study's; "
                    "use another --data / --out"
                )
        if self._skip(marker, "data"):
            return read_json(marker)
        t0 = time.perf_counter()
        summary = atari_data.record_default(
            self.data_root,
            seed=self.seed,
            games=d["games"],
            heldout=d["heldout"],
            clips_per_game=d["clips_per_game"],
            clip_len=d["clip_len"],
            train_episodes=d["train_episodes"],
            test_episodes=d["test_episodes"],
            episode_len=d["episode_len"],
            overwrite=self.data_root == self.root / "data",
            settings=settings,
            log=lambda m: self.log(f"[data] {m}"),
            workers=self.record_workers,
        )
        doc = {"request": request, "summary": summary, "seconds": time.perf_counter() - t0}
        write_json(marker, doc)
        return doc

    def pixel_dataset(self, key: str) -> Path:
        return self.data_root / atari_data.DATASETS[key]

    def dataset(self, key: str) -> Path:
        """The dataset the world models train on: pixels, or their latents or patches."""
        if self.encoded:
            return self.root / self.space / atari_data.DATASETS[key]
        return self.pixel_dataset(key)

    # ---- 1b. the autoencoder and the latent datasets (latent studies) ---------------------------

    def autoencoder(self) -> dict[str, Any] | None:
        from benchmarks.atari import autoencoder as ae

        if not self.latent:
            return None
        out = self.root / "autoencoder"
        marker = out / ae.SUMMARY_FILE
        if self._skip(marker, "autoencoder"):
            return read_json(marker)
        stale = self.root / "latent"
        if stale.exists():  # encoded by an autoencoder whose marker is gone: not this one's latents
            self.log(f"[autoencoder] removing {stale}: latents of an earlier autoencoder")
            shutil.rmtree(stale)
        a = self.cfg["latent"]
        roots = [self.pixel_dataset("pretrain")] + ([self.pixel_dataset("train")] if a["heldout_train_frames"] else [])
        doc = ae.train_autoencoder(
            roots,
            self.pixel_dataset("test"),
            out,
            a,
            self.seed,
            device=self.device,
            progress=StageProgress(self.log, "[autoencoder]"),
        )
        rec = doc["reconstruction"]
        self.log(
            f"[autoencoder] test reconstruction {rec['psnr']:.2f} dB; paddle found in "
            f"{100 * rec['paddle_found']:.1f}% of the real frames showing it, {rec['paddle_error_px']} px off"
        )
        write_json(marker, doc)
        return doc

    def vae_dir(self) -> Path:
        from benchmarks.atari.autoencoder import MODEL_DIR

        return self.root / "autoencoder" / MODEL_DIR

    def encode(self) -> dict[str, Any] | None:
        """Every dataset through ``causalize.latents.encode_episodes`` (what ``causalize encode`` runs)."""
        if not self.encoded:
            return None
        marker = self.root / self.space / "summary.json"
        if self._skip(marker, "encode"):
            return read_json(marker)
        doc: dict[str, Any] = {}
        marker.parent.mkdir(parents=True, exist_ok=True)
        norm = patches.measure_norm(self.pixel_dataset("pretrain"), self.cfg["patch"]["size"]) if self.patched else None
        for key in atari_data.DATASETS:
            if self.dataset(key).is_dir():
                continue  # encoded by an interrupted run (a dataset appears by one rename when complete)
            doc[key] = self._encode_one(key, norm)
            self.log(f"[encode] {key}: {doc[key]['episodes']} episodes, {doc[key]['latent_frames']} latent frames")
        doc["seconds"] = sum(d["seconds"] for d in doc.values())
        write_json(marker, doc)
        return doc

    def _encode_one(self, key: str, norm: dict[str, Any] | None) -> dict[str, Any]:
        """One dataset through the autoencoder (``causalize.latents``, what ``causalize encode``
        runs) or into patches (the per-colour normalisation measured on the pretraining clips)."""
        from causalize.latents.encode import encode_episodes

        t0 = time.perf_counter()
        if norm is not None:
            done = patches.encode_dataset(self.pixel_dataset(key), self.dataset(key), norm)
            return {"episodes": done["episodes"], "latent_frames": done["frames"], "seconds": time.perf_counter() - t0}
        report = encode_episodes(
            self.pixel_dataset(key), self.dataset(key), self.vae_dir(), batch_size=256, device=self.device
        )
        return {"episodes": report.episodes, "latent_frames": report.latent_frames, "seconds": report.seconds}

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents or patches (N, C, T, h, w) → pixels (N, 3, T, H, W) in [-1, 1]: through the
        study's autoencoder, or the exact inverse of the patch transform."""
        from causalize.latents.vae import decode_clip, load_vae

        if self.patched:
            return patches.decode(latents, patches.read_norm(self.dataset("test")))

        if self._vae is None:
            self._vae = load_vae(self.vae_dir(), device=self.device)
        vae, spec = self._vae
        with torch.no_grad():
            return torch.cat([decode_clip(vae, spec, z) for z in latents.split(32)]).cpu()

    # ---- 2. pretraining and the scratch initialisation ----------------------------------------

    def pretrain(self) -> dict[str, Any]:
        out = self.root / "pretrain"
        marker = out / pt.SUMMARY_FILE
        if self._skip(marker, "pretrain"):
            return read_json(marker)
        config = pt.PretrainConfig(
            data=str(self.dataset("pretrain")),
            output_dir=str(out),
            model=self.cfg["model"],
            backbone=self.backbone.name,
            seed=self.seed,
            **self.cfg["pretrain"],
        )
        return pt.pretrain(config, progress=StageProgress(self.log, "[pretrain]"), device=self.device)

    def scratch_init(self) -> dict[str, Any]:
        """The pretraining architecture at its random initialisation (the same seed), saved like
        the pretrained model: the "trained from scratch" baseline starts here."""
        out = self.root / "scratch_init"
        marker = out / "init.json"
        if self._skip(marker, "scratch-init"):
            return read_json(marker)
        from causalize.episodes import read_info

        info = read_info(self.dataset("pretrain"))
        model = pt.build_model(self.cfg["model"], info.channels, info.frame_shape_chw[1], self.seed, self.backbone.name)
        pt.save_model(model, out / pt.MODEL_DIR)
        doc = {
            "seed": self.seed,
            "parameters": sum(p.numel() for p in model.parameters()),
            "note": "the initial weights of pretraining (same architecture and seed), never trained",
        }
        write_json(marker, doc)
        return doc

    # ---- 3. conversion ------------------------------------------------------------------------

    def convert(self, variant: str) -> dict[str, Any]:
        from causalize.api import convert
        from causalize.episodes import read_info

        marker = self.out / "convert" / f"{variant}.json"
        if self._skip(marker, f"convert {variant}"):
            return read_json(marker)
        spec = self.backbone.variants[variant]
        src = self.root / ("pretrain" if spec["init"] == "pretrained" else "scratch_init") / pt.MODEL_DIR
        space = read_info(self.dataset("train")).action_space
        pipeline = variant_pipeline(variant, self.backbone.name)
        torch.manual_seed(self.train_seed)  # the action adapter's initialisation
        report = convert(
            src,
            self.out / "convert" / variant,
            pipeline=pipeline,
            action_dim=space.num_actions,
            action_type="discrete",
            verify=True,
            allow_leak=not spec["causal"],
            overwrite=True,
        )
        ver = report.verification or {}
        doc = {
            "variant": variant,
            **spec,
            "src": str(src),
            "pipeline": report.pipeline,
            "parameters": report.parameters,
            "verification": {k: ver.get(k) for k in ("passed", "max_leak", "culprit", "summary")},
            "written": report.written,
            "seconds": report.seconds,
        }
        if not report.written:
            raise StudyError(f"conversion of {variant} wrote nothing: {ver.get('summary')}")
        self.log(
            f"[{self.named(f'convert {variant}')}] {report.pipeline}: verification {'passed' if ver.get('passed') else 'FAILED'} "
            f"(max leak {ver.get('max_leak')})"
        )
        write_json(marker, doc)
        return doc

    # ---- 4. fine-tuning -----------------------------------------------------------------------

    def finetune(self, variant: str) -> dict[str, Any]:
        from causalize.modules.attention_exec import requested_backend
        from causalize.training.trainer import TrainConfig, train

        marker = self.out / "finetune" / f"{variant}.json"
        if self._skip(marker, f"finetune {variant}"):
            return read_json(marker)
        f = self.cfg["finetune"]
        config = TrainConfig(
            model=str(self.out / "convert" / variant),
            data=str(self.dataset("train")),
            output_dir=str(self.out / "finetune" / variant),
            window=f["window"],
            batch_size=f["batch_size"],
            steps=f["steps"],
            lr=f["lr"],
            **{k: f.get(k, v) for k, v in FINETUNE_DEFAULTS.items() if k not in STUDY_ONLY},
            **episode_subset(self.dataset("train"), f.get("episodes")),
            seed=self.train_seed,
            log_every=f["log_every"],
            checkpoint_every=f["checkpoint_every"],
            keep_checkpoints=1,
            resume=True,
        )
        summary = train(config, progress=StageProgress(self.log, f"[{self.named(f'finetune {variant}')}]"))
        summary["config"] = config.to_json()
        summary["attention"] = requested_backend()[0]  # this run's, whichever process a resume ends in
        write_json(marker, summary)
        return summary

    # ---- 5. evaluation ------------------------------------------------------------------------

    def segments(self) -> ev.Segments:
        e = self.cfg["eval"]
        seg = ev.load_segments(self.pixel_dataset("test"), e["context"], e["horizon"], e["segments_per_episode"])
        if self.encoded:
            seg.latents = ev.load_latent_frames(self.dataset("test"), seg.index, seg.frames.shape[1])
        return seg

    def rollout_config(self, variant: str, guidance: float) -> Any:
        from causalize.rollout.loading import resolve_config

        e = self.cfg["eval"]
        config, _ = resolve_config(
            self.out / "finetune" / variant / "final",
            steps=e["steps"],
            window=e["window"],
            guidance_scale=guidance,
            guidance_rescale=e["guidance_rescale"],
            eta=e["eta"],
            history_noise=e["history_noise"],
            seed=self.seed,
            # Streaming caches are exact only for a causal model; the time-spanning-norm ablation
            # recomputes the whole window at every step (the reference strategy).
            cache=self.backbone.variants[variant]["causal"],
        )
        return config

    def evaluate(self, run: dict[str, Any], segments: ev.Segments) -> dict[str, Any]:
        from causalize.rollout.loading import load_world_model

        marker = self.out / "eval" / f"{run['name']}.json"
        if self._skip(marker, f"eval {run['name']}"):
            return self._add_new_metrics(read_json(marker), marker, segments)
        wm, path = load_world_model(self.out / "finetune" / run["variant"] / "final", device=self.device)
        config = self.rollout_config(run["variant"], run["guidance"])
        actions = segments.actions if run["actions"] == "real" else ev.random_actions(segments, self.seed)
        pred, timing = self.rollout(wm, segments, actions, config)
        marker.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(self.out / "eval" / f"{run['name']}.npz", frames=ev.to_uint8(pred), actions=actions)
        doc = {
            **run,
            "metrics": ev.score(pred, segments.real_future, paddle=self.paddle),
            "timing": timing,
            "rollout_config": config.to_json(),
            "checkpoint": str(path),
        }
        write_json(marker, doc)
        self.log(
            f"[eval {run['name']}] PSNR {doc['metrics']['psnr']['overall']:.2f} dB, "
            f"SSIM {doc['metrics']['ssim']['overall']:.4f} ({timing['seconds']:.1f}s)"
        )
        return doc

    def rollout(self, wm: Any, segments: ev.Segments, actions: np.ndarray, config: Any) -> tuple[torch.Tensor, dict]:
        """The world model rolled out on the segments from ``actions``: pixels in [-1, 1] (decoded
        in a latent or patch study) and the timing facts."""
        pred, timing = ev.rollout_segments(wm, segments, actions, config, batch_size=self.cfg["eval"]["batch_size"])
        return (self.decode(pred) if self.encoded else pred), timing

    def _add_new_metrics(self, doc: dict[str, Any], marker: Path, segments: ev.Segments) -> dict[str, Any]:
        """A run evaluated before the per-frame values and the paddle metric existed gets them from
        its stored frames (uint8, as saved), without rolling out again; its existing numbers stay."""
        m = doc["metrics"]
        lacks = [k for k in ("psnr", "ssim") if "values" not in m[k]] + (
            ["paddle"] if self.paddle and "paddle" not in m else []
        )
        frames = marker.with_suffix(".npz")
        if not lacks or not frames.is_file():
            return doc
        with np.load(frames) as z:
            pred = ev.model_space(z["frames"])
        new = ev.score(pred, segments.real_future, paddle=self.paddle)
        for k in lacks:
            if k == "paddle":
                m["paddle"] = new["paddle"]
            else:
                m[k]["values"] = new[k]["values"]
        doc["added_from_stored_frames"] = lacks
        write_json(marker, doc)
        self.log(f"[eval {doc['name']}] added {', '.join(lacks)} from {frames.name}")
        return doc

    def _one_step_check(self, kind: str, variant: str, compute: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        """A cached per-variant check of the fine-tuned model (``eval/<kind>_<variant>.json``):
        ``compute(world_model)`` gives its levels."""
        from causalize.rollout.loading import load_world_model

        marker = self.out / "eval" / f"{kind}_{variant}.json"
        if self._skip(marker, f"{kind} {variant}"):
            return read_json(marker)
        wm, _ = load_world_model(self.out / "finetune" / variant / "final", device=self.device)
        doc = {"variant": variant, "levels": compute(wm)}
        write_json(marker, doc)
        return doc

    def decoder(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """Model space → pixels (None: the models work on pixels)."""
        return self.decode if self.encoded else None

    def denoise(self, variant: str, segments: ev.Segments) -> dict[str, Any]:
        """One-step x0 prediction quality of the fine-tuned variant at DENOISE_LEVELS."""

        def compute(wm: Any) -> dict[str, Any]:
            levels = ev.denoising_psnr(
                wm,
                segments,
                list(DENOISE_LEVELS),
                self.seed,
                batch_size=self.cfg["eval"]["batch_size"],
                decode=self.decoder(),
            )
            self.log(
                f"[denoise {variant}] x0 PSNR by level: "
                + ", ".join(f"{k}: {d['x0']:.1f} dB (input {d['input']:.1f})" for k, d in levels.items())
            )
            return levels

        return self._one_step_check("denoise", variant, compute)

    def context(self, variant: str, segments: ev.Segments) -> dict[str, Any]:
        """Does the fine-tuned variant use its past (``evaluate.context_check``)?"""
        return self._first_frame_check("context", ev.context_check, variant, segments)

    def action(self, variant: str, segments: ev.Segments) -> dict[str, Any]:
        """Does the fine-tuned variant's next frame depend on its action (``evaluate.action_check``)?"""
        return self._first_frame_check("action", ev.action_check, variant, segments)

    def _first_frame_check(
        self, kind: str, check: Callable[..., dict[str, Any]], variant: str, segments: ev.Segments
    ) -> dict[str, Any]:
        """A cached one-step check of the first generated frame at CONTEXT_LEVELS."""
        return self._one_step_check(
            kind,
            variant,
            lambda wm: check(
                wm,
                segments,
                list(CONTEXT_LEVELS),
                self.seed,
                decode=self.decoder(),
                batch_size=self.cfg["eval"]["batch_size"],
                paddle=self.paddle,
            ),
        )

    def _reference(self, name: str, pred: torch.Tensor, segments: ev.Segments) -> dict[str, Any]:
        """A run of no model (a baseline or a reference), scored like every rollout."""
        metrics = ev.score(pred, segments.real_future, paddle=self.paddle)
        return {"name": name, "variant": name, "guidance": None, "actions": "none", "metrics": metrics}

    def baseline(self, segments: ev.Segments) -> dict[str, Any]:
        return self._reference(BASELINE, ev.copy_last_baseline(segments), segments)

    def baseline_autoencoded(self, segments: ev.Segments) -> dict[str, Any]:
        assert segments.latents is not None
        c = segments.context
        last = self.decode(segments.model_frames(c - 1, c))
        return self._reference(BASELINE_AE, last.expand(-1, -1, segments.horizon, -1, -1), segments)

    def autoencoder_reference(self, segments: ev.Segments) -> dict[str, Any]:
        """The real future frames through the autoencoder: what predicting the encoder's latents exactly scores."""
        assert segments.latents is not None
        return self._reference(AUTOENCODER, self.decode(segments.model_frames(segments.context)), segments)
