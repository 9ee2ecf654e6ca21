"""Few-shot fine-tuning protocol: backbone + linear classifier trained end to end on a subset.

The labelled subset of a ``fraction`` run is a deterministic function of the split's scan tokens
and a seed (:func:`select_subset`); it is written to ``<out>/subset.txt`` so every model of a
comparison trains on the same scans. Optimisation: AdamW, cosine decay, two learning rates: the
fresh classifier learns fast (``head_lr``), the pretrained backbone slowly (``backbone_lr``, 10×
lower) so that the first noisy steps of a random classifier do not wash out the pretrained
features. A random-initialised backbone (``--checkpoint none``) has nothing to protect: by default
it trains with the head's rate (see docs/evaluation.md). Augmentations: random rotation about z,
random flips of x and y, random scaling in [0.95, 1.05]. Loss: cross-entropy over labelled points.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from trainer.data import augment as augment_xyz
from trainer.evaluate.backbone import (
    EvalData,
    checkpoint_record,
    forward_points,
    load_model,
    needs_out,
    open_reader,
)
from trainer.evaluate.linear_probe import evaluate_head, results_dict, write_json_atomic
from trainer.evaluate.metrics import IGNORE_INDEX, iou_per_class, iou_table
from trainer.evaluate.probe import MaskClasses


def select_subset(tokens: list[str], fraction: float, seed: int = 0) -> list[str]:
    """The labelled scans of a ``fraction`` run: deterministic, nested, at least one scan.

    Every token is ranked by ``sha256(f"{seed}:{token}")``; the first ``max(1, round(fraction·n))``
    are kept, returned in their original order. The choice depends only on the token set and the
    seed (not on file order or the machine), and a smaller fraction is a subset of a larger one.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if not tokens:
        raise ValueError("no scans to choose from")
    n = max(1, round(fraction * len(tokens)))
    ranked = sorted(tokens, key=lambda t: hashlib.sha256(f"{seed}:{t}".encode()).hexdigest())
    chosen = set(ranked[:n])
    return [t for t in tokens if t in chosen]


def read_subset(path: Path, tokens: list[str], split: str) -> list[str]:
    """The scan tokens listed in ``path`` (one a line: a ``subset.txt`` of an earlier run, or a
    published list), in the split's order; every one must be a labelled scan of ``split``."""
    try:
        listed = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as e:
        raise ValueError(f"{path}: cannot read the subset file ({e})") from e
    if not listed:
        raise ValueError(f"{path}: the subset file lists no scan tokens")
    known = set(tokens)
    unknown = [t for t in dict.fromkeys(listed) if t not in known]
    if unknown:
        raise ValueError(
            f"{path}: {len(unknown)} of its {len(listed)} tokens are not labelled scans of split "
            f"{split!r} ({len(tokens)} are), first: {', '.join(unknown[:3])}"
        )
    chosen = set(listed)
    return [t for t in tokens if t in chosen]


def write_subset(path: Path, tokens: list[str]) -> Path:
    """One token a line, written atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(f"{t}\n" for t in tokens))
    tmp.replace(path)
    return path


def augment(points: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """(N, 4) → (N, 4): the training augmentation (`trainer.data.augment`: rotation about z,
    x/y flips) with a scale in [0.95, 1.05]; intensities unchanged."""
    out = points.copy()
    out[:, :3] = augment_xyz(points[:, :3], (0.95, 1.05), rng)
    return out


@dataclass(frozen=True)
class FinetuneConfig:
    """A fine-tuning run."""

    checkpoint: str
    """Run folder of the pretrained student, or "none" for random initialisation."""
    data: EvalData
    """Dataset, splits and scan limits."""
    fraction: float = 0.01
    """Share of the labelled training scans used (protocol: 0.01, 0.05, 0.1, 0.25, 1.0)."""
    out: Path | None = None
    """Output folder; default RUN_DIR/eval/finetune_<percent>pct (required with "none")."""
    like: Path | None = None
    """With checkpoint "none": architecture from this run folder."""
    epochs: int = 30
    """Passes over the subset."""
    batch_scans: int = 4
    """Scans per optimisation step."""
    backbone_lr: float | None = None
    """AdamW rate of the backbone; None = head_lr / 10 when pretrained, head_lr when "none"."""
    head_lr: float = 1e-2
    """AdamW rate of the fresh linear classifier."""
    weight_decay: float = 1e-4
    """AdamW weight decay."""
    subset_seed: int = 0
    """Seed of the subset choice (keep fixed across compared models)."""
    subset_file: Path | None = None
    """Scan tokens to fine-tune on, one a line, instead of ``fraction``'s choice (an earlier run's
    subset.txt, or the list a published result used)."""
    device: str = "cpu"
    """torch device."""
    seed: int = 0
    """Seed of initialisation, shuffling and augmentation."""

    def __post_init__(self) -> None:
        if not 0 < self.fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction}")
        if self.epochs < 1 or self.batch_scans < 1 or self.head_lr <= 0:
            raise ValueError("epochs, batch_scans and head_lr must be positive")
        if self.out is None and (why := needs_out(self.checkpoint)):
            raise ValueError(why)

    def out_dir(self) -> Path:
        if self.out is not None:
            return Path(self.out)
        if self.subset_file is not None:
            return Path(self.checkpoint) / "eval" / f"finetune_{Path(self.subset_file).stem}"
        return Path(self.checkpoint) / "eval" / f"finetune_{100 * self.fraction:g}pct"

    def resolved_backbone_lr(self) -> float:
        if self.backbone_lr is not None:
            return self.backbone_lr
        return self.head_lr if self.checkpoint == "none" else self.head_lr / 10


def run_finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune, evaluate on val; writes ``finetune.json`` and ``subset.txt`` into the output."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = load_model(cfg.checkpoint, cfg.like, cfg.device, cfg.seed, cfg.data.dataset)
    trained = checkpoint_record(cfg.checkpoint)  # warns on an unfinished run
    reader = open_reader(cfg.data)
    names = list(reader.class_names)
    train = cfg.data.train_scans(reader)
    tokens = [s.token for s in train]
    if cfg.subset_file is not None:
        chosen = set(read_subset(cfg.subset_file, tokens, cfg.data.train_split))
    else:
        chosen = set(select_subset(tokens, cfg.fraction, cfg.subset_seed))
    subset = [s for s in train if s.token in chosen]
    out = cfg.out_dir()
    write_subset(out / "subset.txt", [s.token for s in subset])

    # Classes absent from the subset's labels cannot be learned: never predict them (as the probe).
    # Scans are read per batch, not held: 100 % of nuScenes' train split is ~16 GB of points.
    seen = np.zeros(len(names), dtype=bool)
    for s in subset:
        y = reader.load_labels(s)
        seen[np.unique(y[y != IGNORE_INDEX])] = True
    head = torch.nn.Sequential(
        torch.nn.Linear(model.out_channels, len(names)), MaskClasses(torch.from_numpy(seen))
    ).to(cfg.device)
    opt = torch.optim.AdamW(
        [
            {"params": model.parameters(), "lr": cfg.resolved_backbone_lr()},
            {"params": head.parameters(), "lr": cfg.head_lr},
        ],
        weight_decay=cfg.weight_decay,
    )
    steps = cfg.epochs * math.ceil(len(subset) / cfg.batch_scans)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    model.train()
    head.train()
    losses = []
    bar = tqdm(total=steps, desc=f"finetune {100 * cfg.fraction:g}%", unit="step")
    for _ in range(cfg.epochs):
        order = rng.permutation(len(subset))
        for start in range(0, len(order), cfg.batch_scans):
            scans = [subset[i] for i in order[start : start + cfg.batch_scans]]
            batch = [(reader.load_points(s), reader.load_labels(s)) for s in scans]
            feats = forward_points(model, [augment(p, rng) for p, _ in batch], cfg.device)
            logits = head(torch.cat(feats))  # (N, C)
            target = torch.from_numpy(np.concatenate([y for _, y in batch]).astype(np.int64))
            loss = torch.nn.functional.cross_entropy(
                logits, target.to(cfg.device), ignore_index=IGNORE_INDEX
            )
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update()
    bar.close()
    model.eval()
    head.eval()
    val = cfg.data.val_scans(reader)
    conf = evaluate_head(model, head, reader, val, len(names), cfg.device)
    result = results_dict(
        conf,
        names,
        protocol="finetune",
        **trained,
        fraction=len(subset) / len(train) if cfg.subset_file is not None else cfg.fraction,
        subset_scans=len(subset),
        subset_file=str(out / "subset.txt"),
        val_scans=len(val),
        backbone_lr=cfg.resolved_backbone_lr(),
        losses=losses,
        config=asdict(cfg),
    )
    write_json_atomic(out / "finetune.json", result)
    title = f"finetune {100 * result['fraction']:.3g}% ({len(subset)} scans): {cfg.checkpoint}"
    print(iou_table(names, iou_per_class(conf), result["miou"], title=title))
    return result
