"""The training run: `train(cfg)` — student + head (+ occupancy decoder) on the cache's targets.

Read top to bottom: setup (cache check, model, optimiser, schedule, resume, data), then one plain
loop in sections (batch, forward, loss, step, log/checkpoint). Outputs in RUN_DIR: config.yaml
(resolved config, versions, git SHA, cache key), metrics.jsonl (one line per logged step),
checkpoint.pt (written atomically: temp file + os.replace) and, once the last step is done,
summary.json (what `ablate` and `bench` read).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

from trainer import distributed
from trainer.config import (
    CHECKPOINT,
    CONFIG,
    METRICS,
    RESUMABLE_CHANGES,
    SUMMARY,
    TrainConfig,
    config_changes,
)
from trainer.data import (
    RunBatchSampler,
    ScanDataset,
    collate,
    open_training_cache,
    usable_scans,
)
from trainer.heads import build_head
from trainer.loss import distill_loss
from trainer.minkowski import ME
from trainer.model import StudentConfig, build_student, load_checkpoint, make_field
from trainer.occupancy import OccupancyDecoder, occupancy_loss


class DistillModel(nn.Module):
    """Backbone + projection head (+ occupancy decoder when its weight is > 0)."""

    def __init__(self, cfg: TrainConfig, feature_dim: int) -> None:
        super().__init__()
        self.kernel_map_threads = cfg.kernel_map_threads
        self.backbone = build_student(StudentConfig(cfg.backbone, cfg.voxel_size))
        c = self.backbone.out_channels
        self.head = build_head(cfg.head, c, feature_dim, cfg.head_hidden)
        self.stride = cfg.occupancy_stride
        self.occupancy = (
            OccupancyDecoder(self.backbone.decoder_channels[self.stride])
            if cfg.occupancy_weight > 0
            else None
        )

    def forward(
        self, coords: torch.Tensor, feats: torch.Tensor, queries: torch.Tensor, paired: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(head output (P, D) of the paired points, occupancy logits (M,) per query or None).

        The head runs on the paired points only: the others carry no target, and on CPU the MLP
        over every point would cost more than the backbone."""
        field = make_field(coords, feats, feats.device, self.kernel_map_threads)
        point_feats, by_stride = self.backbone.forward_with_strides(field)  # (N, C)
        pred = self.head(point_feats[paired])  # (P, D)
        logits = None
        if self.occupancy is not None:
            logits = self.occupancy(by_stride[self.stride], queries)  # (M,)
        return pred, logits


@dataclass
class TrainResult:
    """What a run did (every process returns one; the rates are timed by this process)."""

    run_dir: Path
    steps: int
    final_loss: float  # the last step's, mean over the processes
    scans_per_s: float  # all processes together, first step (warm-up) left out
    data_wait_share: float  # share of step time spent waiting for the next batch
    model: DistillModel
    rank: int = 0  # of this process (torchrun); only rank 0 writes files


def lr_schedule(total_steps: int, cfg: TrainConfig) -> np.ndarray:
    """(total_steps,) learning rate per step: linear warm-up, then cosine to lr * min_lr_ratio."""
    warmup = min(int(round(cfg.warmup * total_steps)), total_steps)
    steps = np.arange(total_steps, dtype=np.float64)
    ramp = (steps + 1) / max(warmup, 1)
    progress = (steps - warmup) / max(total_steps - warmup, 1)
    floor = cfg.lr * cfg.min_lr_ratio
    cosine = floor + (cfg.lr - floor) * 0.5 * (1 + np.cos(math.pi * np.clip(progress, 0, 1)))
    return np.where(steps < warmup, cfg.lr * ramp, cosine)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """torch.save to a temp file in the same folder, fsync, then os.replace: the final name only
    ever holds a complete checkpoint."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def _git_sha() -> str:
    repo = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo, capture_output=True, text=True, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def _versions() -> dict[str, str]:
    import zarr

    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "MinkowskiEngine": str(ME.__version__),
        "zarr": str(zarr.__version__),
        "numpy": str(np.__version__),
    }


def _rng_state() -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


def _scans_digest(scans: list[int]) -> str:
    """sha256 of the indices of the scans a run trains on (the samples are indexed into them)."""
    return hashlib.sha256(np.asarray(scans, np.int64).tobytes()).hexdigest()


def _schedule_record(sampler: RunBatchSampler, scans: list[int], world: int) -> dict[str, Any]:
    """What the global step means: the checkpoint's step indexes the learning-rate table and the
    sampler's batches, both functions of these (with the config's batch size and epochs)."""
    return {
        "world_size": world,
        "scans": len(scans),
        "scans_digest": _scans_digest(scans),
        "steps_per_epoch": sampler.steps_per_epoch,
        "total_steps": sampler.total_steps,
    }


def _check_schedule(path: Path, saved: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """Refuse a resume whose step would mean another epoch, batch and learning rate."""
    if saved is None:  # a checkpoint from before these were recorded: nothing to compare
        return
    if saved["world_size"] != now["world_size"]:
        raise ValueError(
            f"{path}: was written by a run of {saved['world_size']} process(es), this one has "
            f"{now['world_size']}; steps per epoch ({saved['steps_per_epoch']} vs "
            f"{now['steps_per_epoch']}), the total steps and the learning-rate schedule depend "
            f"on it. Resume with {saved['world_size']} process(es), or start a new run (--out)"
        )
    if saved["scans"] != now["scans"] or saved["scans_digest"] != now["scans_digest"]:
        what = (
            f"{saved['scans']} usable scans, this one finds {now['scans']}"
            if saved["scans"] != now["scans"]
            else f"{saved['scans']} usable scans, this one finds as many but not the same ones"
        )
        raise ValueError(
            f"{path}: was trained on {what} (a unit of the cache became unreadable, or "
            "--verify-cache / a repaired cache changed what --skip-bad-scans leaves out); steps "
            f"per epoch ({saved['steps_per_epoch']} vs {now['steps_per_epoch']}), the total "
            "steps and the learning-rate schedule depend on them. Restore the cache, or start "
            "a new run (--out)"
        )


def _restore(
    path: Path,
    model: DistillModel,
    optimizer: torch.optim.Optimizer,
    cfg: TrainConfig,
    digest: str,
    schedule: dict[str, Any],
) -> tuple[int, float | None]:
    """Load a checkpoint written by this config, cache, process count and scan set; returns
    (its step, the loss of that step, None if the checkpoint predates recording it)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: --resume given but there is no checkpoint")
    state = load_checkpoint(path)
    saved = state["config"]  # its own fields only: one added since is not a change
    changed = config_changes(saved, cfg.to_dict(), only=tuple(saved), ignore=RESUMABLE_CHANGES)
    if changed:
        raise ValueError(
            f"{path}: cannot resume with a different config; changed field(s): "
            + ", ".join(f"{k} ({old!r} -> {new!r})" for k, old, new in changed)
        )
    if state["cache_digest"] != digest:
        raise ValueError(f"{path}: was trained on cache {state['cache_digest']}, not {digest}")
    _check_schedule(path, state.get("schedule"), schedule)
    model.backbone.load_state_dict(state["model"]["backbone"])
    model.head.load_state_dict(state["model"]["head"])
    if model.occupancy is not None:
        model.occupancy.load_state_dict(state["model"]["occupancy"])
    optimizer.load_state_dict(state["optimizer"])
    _set_rng_state(state["rng"])
    return int(state["step"]), state.get("loss")


def _torchrun(world: int) -> str:
    """The torchrun command line of a run of ``world`` processes (several nodes: torchrun's
    LOCAL_WORLD_SIZE processes on each)."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if local >= world or world % local:
        return f"torchrun --nproc_per_node {world}"
    return f"torchrun --nnodes {world // local} --nproc_per_node {local} (on each node, as started)"


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metrics lines up to ``step`` (a killed run may have logged past its checkpoint)."""
    if path.exists():
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        kept = [ln for ln in lines if json.loads(ln)["step"] <= step]
        _write_text_atomic(path, "".join(ln + "\n" for ln in kept))


def train(cfg: TrainConfig) -> TrainResult:
    """Train the student on the cache's targets; see the module docstring for the outputs."""
    rt = distributed.setup(cfg.device)
    try:
        return _train(cfg, rt)
    finally:
        distributed.cleanup(rt)


def _train(cfg: TrainConfig, rt: distributed.Runtime) -> TrainResult:
    # ---------------------------------------------------------------- setup
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)
    reader = open_training_cache(cfg)  # refuses incomplete / mismatched caches
    # refuses a damaged cache unless skip_bad_scans; under DDP each process checks a share
    scans, problems = usable_scans(reader, cfg, rt.rank, rt.world)
    skipped = len(reader) - len(scans)
    if skipped and rt.is_main:
        print(
            f"warning: skipping {skipped} of {len(reader)} scans of cache {reader.path} "
            f"({len(problems)} problem(s), first: {problems[0]})",
            file=sys.stderr,
        )
    digest = reader.key.digest()
    torch.manual_seed(cfg.seed)  # same initialisation on every process
    model = DistillModel(cfg, reader.feature_dim).to(rt.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sampler = RunBatchSampler(len(scans), cfg.batch_size, cfg.epochs, cfg.seed, rt.rank, rt.world)
    total = sampler.total_steps
    schedule = lr_schedule(total, cfg)  # (total,)
    run_dir, ckpt_path, metrics_path = cfg.out, cfg.out / CHECKPOINT, cfg.out / METRICS
    summary_path = run_dir / SUMMARY
    schedule_record = _schedule_record(sampler, scans, rt.world)
    step, last_loss = 0, None
    if cfg.resume:
        step, last_loss = _restore(ckpt_path, model, optimizer, cfg, digest, schedule_record)
    elif ckpt_path.exists():
        raise FileExistsError(f"{ckpt_path} exists: pass --resume to continue, or another --out")
    elif old := [p for p in (summary_path, run_dir / "eval") if p.exists()]:
        raise FileExistsError(
            f"{run_dir} holds results of an earlier run ({', '.join(p.name for p in old)}) but "
            "no checkpoint: a new run there would sit next to them. Use another --out, or "
            "delete them"
        )
    if step >= total:  # resuming a finished run: nothing to train, nothing to rewrite
        return _finished(run_dir, summary_path, step, last_loss, model, rt)
    sampler.start_step = step
    if rt.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        record = {
            "config": cfg.to_dict(),
            "versions": _versions(),
            "git_sha": _git_sha(),
            "from_step": step,  # this process's segment of the run; earlier ones below
            "earlier_segments": _earlier_segments(run_dir / CONFIG) if cfg.resume else [],
            "cache": {
                "path": str(reader.path),
                "digest": digest,
                "key": reader.key.to_dict(),
                "scans": len(scans),
                "skipped_scans": skipped,
            },
            "feature_dim": reader.feature_dim,
            "world_size": rt.world,
            "steps": total,
        }
        _write_text_atomic(run_dir / CONFIG, yaml.safe_dump(record, sort_keys=False))
        if cfg.resume:
            _truncate_metrics(metrics_path, step)
        else:
            metrics_path.unlink(missing_ok=True)
    net = DistributedDataParallel(model) if rt.distributed else model
    loader = DataLoader(
        ScanDataset(reader, cfg, scans),
        batch_sampler=sampler,
        collate_fn=collate,
        num_workers=cfg.workers,
        persistent_workers=cfg.workers > 0,
        pin_memory=rt.device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),  # leaves the global RNG untouched
    )
    amp = cfg.amp and rt.device.type == "cuda"
    dev = rt.device
    bar = tqdm(total=total, initial=step, disable=not (rt.is_main and cfg.progress), unit="step")
    metrics = open(metrics_path, "a") if rt.is_main else None
    timed_scans, timed_seconds, waited = 0, 0.0, 0.0
    loss_value = float("nan")  # the last step's loss (mean over the processes)
    saved_step = step if cfg.resume else None  # the step RUN_DIR/checkpoint.pt holds
    model.train()
    batches = iter(loader)
    try:
        while step < total:
            # ---------------------------------------------------------------- batch
            t0 = time.perf_counter()
            batch = next(batches)
            t_data = time.perf_counter() - t0
            for group in optimizer.param_groups:
                group["lr"] = float(schedule[step])
            # ---------------------------------------------------------------- forward
            with torch.autocast(device_type=dev.type, dtype=torch.bfloat16, enabled=amp):
                paired = batch["paired"].to(dev)  # (N,)
                pred, logits = net(
                    batch["coords"].to(dev),
                    batch["feats"].to(dev),
                    batch["queries"].to(dev),
                    paired,
                )  # (P, D), (M,) | None
            # ---------------------------------------------------------------- loss
            target = batch["target"].to(dev)[paired]  # (P, D)
            distill = distill_loss(pred, target)
            occupancy = torch.zeros((), device=dev)
            if logits is not None:
                occupancy = occupancy_loss(logits, batch["occ_labels"].to(dev))
            loss = distill + cfg.occupancy_weight * occupancy
            # ---------------------------------------------------------------- step
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                grad_norm = float(nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip))
            else:  # measured all the same: logged, and a NaN gradient of a finite loss stops
                grads = [p.grad for p in model.parameters() if p.grad is not None]
                grad_norm = float(nn.utils.get_total_norm(grads))
            optimizer.step()
            step += 1
            # ---------------------------------------------------------------- log / checkpoint
            terms = torch.stack([t.detach().float() for t in (loss, distill, occupancy)])  # (3,)
            if rt.distributed:  # the mean over the processes: every one logs and judges the same
                torch.distributed.all_reduce(terms)
                terms /= rt.world
            # (.tolist() waits for the device: the step time below is complete)
            loss_value, distill_value, occupancy_value = terms.tolist()
            dt = time.perf_counter() - t0
            scans_per_s = batch["scans"] * rt.world / dt
            if step > sampler.start_step + 1:  # the first step pays worker start-up and warm-up
                timed_scans += batch["scans"]
                timed_seconds += dt
                waited += t_data
            # a non-finite loss (or gradient) stops the run before it is logged or checkpointed;
            # under DDP every process sees the same mean (and gradient norm): all stop here
            if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
                raise FloatingPointError(
                    f"step {step} (epoch {step / sampler.steps_per_epoch:.2f}): the loss or its gradient "
                    f"is not finite "
                    f"(loss {loss_value}, distill {distill_value}, occupancy {occupancy_value}, "
                    f"grad norm {grad_norm}"
                    + (f"; losses are the mean over {rt.world} processes" if rt.distributed else "")
                    + "); training stopped. "
                    + (
                        f"{ckpt_path} holds step {saved_step}, from before. "
                        if saved_step is not None
                        else "No checkpoint was written. "
                    )
                    + "Lower --lr (or raise warmup, set grad_clip), or check the cache's targets "
                    "(python cli.py cache verify)"
                )
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", scans_s=f"{scans_per_s:.2f}")
            if metrics is not None and (step % cfg.log_every == 0 or step == total):
                line = {
                    "step": step,
                    "epoch": step / sampler.steps_per_epoch,
                    "loss": loss_value,
                    "distill": distill_value,
                    "occupancy": occupancy_value,
                    "lr": float(schedule[step - 1]),
                    "grad_norm": grad_norm,
                    "scans_per_s": scans_per_s,
                    "data_wait": t_data / dt,
                }
                metrics.write(json.dumps(line) + "\n")
                metrics.flush()
            if step % cfg.checkpoint_every == 0 or step == total:
                if rt.is_main:
                    state = {
                        "model": {
                            "backbone": model.backbone.state_dict(),
                            "head": model.head.state_dict(),
                            "occupancy": None
                            if model.occupancy is None
                            else model.occupancy.state_dict(),
                        },
                        "optimizer": optimizer.state_dict(),
                        "step": step,
                        "rng": _rng_state(),
                        "config": cfg.to_dict(),
                        "cache_digest": digest,
                        "feature_dim": reader.feature_dim,
                        "schedule": schedule_record,
                        "loss": loss_value,
                    }
                    save_checkpoint(ckpt_path, state)
                saved_step = step  # on every process: their messages name the same step
    except KeyboardInterrupt:  # Ctrl-C: say what is kept and how to go on
        if saved_step is None:
            kept = f"no checkpoint yet (the first is at step {min(cfg.checkpoint_every, total)})"
        else:  # a run resumes only with its process count (`_check_schedule`)
            how = f" {rt.world} processes in all, as this run: {_torchrun(rt.world)}"
            if not rt.distributed:
                how = ": python"
            kept = (
                f"{ckpt_path} holds step {saved_step}; go on with{how} cli.py train "
                f"--out {run_dir} --resume"
            )
        raise KeyboardInterrupt(f"interrupted at step {step} of {total}: {kept}") from None
    finally:  # however the loop ends (finished, non-finite loss, Ctrl-C, a failed batch)
        bar.close()
        if metrics is not None:
            metrics.close()
    if rt.distributed:  # DDP copies rank 0's buffers before each forward; the last step's too
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, src=0)
    result = TrainResult(
        run_dir=run_dir,
        steps=step,
        final_loss=loss_value,
        scans_per_s=timed_scans * rt.world / timed_seconds if timed_seconds else float("nan"),
        data_wait_share=waited / timed_seconds if timed_seconds else float("nan"),
        model=model,
        rank=rt.rank,
    )
    if rt.is_main:
        _write_summary(summary_path, result)
    return result


def _earlier_segments(config_path: Path) -> list[dict[str, Any]]:
    """The code and library versions of each earlier process of a resumed run (from_step, git_sha,
    versions), from the config.yaml it is about to replace: a resume keeps that record."""
    try:
        old = yaml.safe_load(config_path.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return []
    if not isinstance(old, dict):
        return []
    last = {"from_step": old.get("from_step", 0)}
    last.update({k: old.get(k) for k in ("git_sha", "versions")})
    return [*old.get("earlier_segments", []), last]


def _write_summary(path: Path, result: TrainResult) -> None:
    """summary.json, strict JSON: a figure that was not measured (NaN: a run of one step has no
    timed step) is null."""
    summary = {
        k: None if isinstance(v, float) and math.isnan(v) else v
        for k, v in vars(result).items()
        if k not in ("model", "run_dir", "rank")
    }
    _write_text_atomic(path, json.dumps(summary, indent=1, allow_nan=False))


def _finished(
    run_dir: Path,
    summary_path: Path,
    step: int,
    last_loss: float | None,
    model: DistillModel,
    rt: distributed.Runtime,
) -> TrainResult:
    """The result of resuming a run whose checkpoint is at its last step. Its files are left as
    they are; only a missing summary.json (the run was killed between its last checkpoint and
    its summary) is written, with the checkpoint's loss and no throughput figures."""
    nan = float("nan")
    if summary_path.is_file():
        summary = {
            k: nan if v is None else v for k, v in json.loads(summary_path.read_text()).items()
        }
        result = TrainResult(
            run_dir, summary["steps"], summary["final_loss"], summary["scans_per_s"],
            summary["data_wait_share"], model, rt.rank,
        )  # fmt: skip
        note = f"{summary_path} left as it is"
    else:
        loss = nan if last_loss is None else float(last_loss)
        result = TrainResult(run_dir, step, loss, nan, nan, model, rt.rank)
        note = f"wrote the missing {summary_path} from the checkpoint"
        if rt.is_main:
            _write_summary(summary_path, result)
    if rt.is_main:
        print(
            f"{run_dir}: already finished (step {step}), nothing to train; {note}", file=sys.stderr
        )
    return result
