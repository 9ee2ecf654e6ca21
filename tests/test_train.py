"""Training: loss goes down, resume after kill -9, atomic checkpoints, DDP, cache checks, config."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from cache import CacheKeyMismatch, IncompleteCacheError
from trainer.config import TrainConfig, load_config
from trainer.data import RunBatchSampler
from trainer.loop import lr_schedule, save_checkpoint, train
from trainer.model import load_backbone, point_features

REPO = Path(__file__).resolve().parent.parent
# tiny backbone, 2 scans a step; 8 scans → 4 steps an epoch
SMALL = dict(
    backbone="tiny", batch_size=2, lr=3e-3, warmup=0.1, progress=False, workers=0, threads=1
)


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """train(threads=1) sets torch's thread count for the process: give the others theirs back."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _cfg(train_cache, out: Path, **kw) -> TrainConfig:
    return load_config(cache=train_cache.cache, data=train_cache.data, out=out, **{**SMALL, **kw})


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _cli(*args: str) -> list[str]:
    return [sys.executable, str(REPO / "cli.py"), "train", *args]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("head", "occupancy_weight"), [("mlp", 0.5), ("mlp", 0.0), ("linear", 0.5), ("linear", 0.0)]
)
def test_loss_decreases(train_cache, tmp_path, head, occupancy_weight) -> None:
    cfg = _cfg(
        train_cache, tmp_path / "run", head=head, occupancy_weight=occupancy_weight, epochs=3
    )
    result = train(cfg)
    m = _metrics(cfg.out)
    assert [r["step"] for r in m] == list(range(1, 13)) and result.steps == 12
    first = np.mean([r["loss"] for r in m[:2]])
    last = np.mean([r["loss"] for r in m[-3:]])
    assert last < 0.75 * first, (first, last)
    distill_first = np.mean([r["distill"] for r in m[:2]])
    assert np.mean([r["distill"] for r in m[-3:]]) < 0.75 * distill_first
    if occupancy_weight > 0:
        assert all(r["occupancy"] > 0 for r in m)
        assert m[-1]["loss"] == pytest.approx(m[-1]["distill"] + 0.5 * m[-1]["occupancy"], rel=1e-5)
    else:
        assert all(r["occupancy"] == 0 for r in m) and result.model.occupancy is None
    assert 0 <= m[-1]["data_wait"] < 1 and m[-1]["scans_per_s"] > 0
    # the run folder: resolved config, versions, git SHA, cache key; the backbone loads back
    record = yaml.safe_load((cfg.out / "config.yaml").read_text())
    assert record["config"]["head"] == head and record["config"]["cache"] == str(cfg.cache)
    assert {"torch", "MinkowskiEngine", "zarr"} <= set(record["versions"])
    assert record["git_sha"] and record["cache"]["key"]["split"] == "train"
    backbone, student_cfg = load_backbone(cfg.out)
    assert student_cfg.backbone == "tiny"
    pts = np.random.default_rng(0).uniform(-10, 10, (300, 4)).astype(np.float32)
    with torch.no_grad():
        ours = point_features(result.model.backbone.eval(), [pts], "cpu")[0]
        loaded = point_features(backbone, [pts], "cpu")[0]
    torch.testing.assert_close(ours, loaded)


@pytest.mark.slow
def test_kill_9_then_resume_continues_the_same_trajectory(train_cache, tmp_path) -> None:
    def cli_args(out: Path) -> list[str]:
        return [
            "--cache", str(train_cache.cache), "--data", str(train_cache.data), "--out", str(out),
            "--backbone", "tiny", "--batch-size", "2", "--lr", "3e-3", "--epochs", "2",
            "--checkpoint-every", "3", "--occupancy-weight", "0.5", "--no-progress",
            "--config", str(tmp_path / "extra.yaml"),
        ]  # fmt: skip

    (tmp_path / "extra.yaml").write_text("warmup: 0.1\nworkers: 1\nthreads: 1\n")
    # The reference runs in a fresh process too: the same code path as the killed run, free of
    # the thread/BLAS state that earlier tests leave in this pytest process.
    ref = subprocess.run(
        _cli(*cli_args(tmp_path / "reference")), cwd=REPO, capture_output=True, text=True
    )
    assert ref.returncode == 0, ref.stderr[-2000:]
    expected = _metrics(tmp_path / "reference")

    run = tmp_path / "killed"
    args = cli_args(run)
    proc = subprocess.Popen(_cli(*args), cwd=REPO, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while not (run / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "no checkpoint written"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    killed_at = torch.load(run / "checkpoint.pt", weights_only=False)["step"]
    assert killed_at in (3, 6)
    assert len(_metrics(run)) < len(expected)  # really interrupted
    first = yaml.safe_load((run / "config.yaml").read_text())

    # another --checkpoint-every does not change the trajectory: accepted on resume
    resume = [*args, "--resume", "--checkpoint-every", "4"]
    done = subprocess.run(_cli(*resume), cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    record = yaml.safe_load((run / "config.yaml").read_text())
    assert record["from_step"] == killed_at  # the first process's record is kept
    assert record["earlier_segments"] == [
        {"from_step": 0, "git_sha": first["git_sha"], "versions": first["versions"]}
    ]
    got = _metrics(run)
    assert [r["step"] for r in got] == [r["step"] for r in expected]
    for a, b in zip(got, expected, strict=True):
        for k in ("loss", "distill", "occupancy", "lr"):
            assert a[k] == pytest.approx(b[k], abs=1e-6), (a["step"], k, a[k], b[k])
    # resuming with another trajectory-changing setting is refused, naming the field
    bad = subprocess.run(
        _cli(*args, "--resume", "--lr", "1e-2"), cwd=REPO, capture_output=True, text=True
    )
    assert bad.returncode == 1 and "lr" in bad.stderr and "changed field" in bad.stderr


@pytest.mark.slow
def test_ctrl_c_names_the_checkpoint_and_how_to_resume(train_cache, tmp_path) -> None:
    run = tmp_path / "run"
    args = [
        "--cache", str(train_cache.cache), "--data", str(train_cache.data), "--out", str(run),
        "--backbone", "tiny", "--batch-size", "2", "--epochs", "50", "--checkpoint-every", "2",
        "--no-progress", "--threads", "1",
    ]  # fmt: skip
    # a terminal's Ctrl-C: SIGINT to the process group (the DataLoader workers too)
    proc = subprocess.Popen(
        _cli(*args), cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    deadline = time.time() + 240
    while not (run / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "no checkpoint written"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    err = proc.stderr.read()
    (message,) = [line for line in err.splitlines() if line.startswith("interrupted at")] or [err]
    saved = torch.load(run / "checkpoint.pt", weights_only=False)["step"]
    assert saved < 200  # interrupted: 50 epochs of 4 steps
    assert message.startswith("interrupted at step ") and message.endswith(
        f"of 200: {run / 'checkpoint.pt'} holds step {saved}; go on with: python cli.py train "
        f"--out {run} --resume"
    ), message


@pytest.mark.slow
def test_ctrl_c_under_torchrun_names_the_torchrun_command(train_cache, tmp_path) -> None:
    """A run of 2 processes resumes only with 2 (a plain `python cli.py train --resume` is
    refused): Ctrl-C under torchrun says so, on every rank, naming the same checkpoint step."""
    run = tmp_path / "run"
    args = [
        "--cache", str(train_cache.cache), "--data", str(train_cache.data), "--out", str(run),
        "--backbone", "tiny", "--batch-size", "2", "--epochs", "200", "--checkpoint-every", "2",
        "--no-progress", "--threads", "1", "--workers", "0",
    ]  # fmt: skip
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    proc = subprocess.Popen(
        [*torchrun, "--master_port", str(_free_port()), str(REPO / "cli.py"), "train", *args],
        cwd=REPO, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    deadline = time.time() + 240
    while not (run / "checkpoint.pt").exists():
        assert proc.poll() is None, proc.stderr.read()[-2000:]
        assert time.time() < deadline, "no checkpoint written"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)  # a terminal's Ctrl-C: torchrun and both ranks
    proc.wait(timeout=120)
    err = proc.stderr.read()
    messages = [line for line in err.splitlines() if line.startswith("interrupted at")]
    saved = torch.load(run / "checkpoint.pt", weights_only=False)["step"]
    assert len(messages) == 2 and messages[0] == messages[1], err[-3000:]
    assert saved < 400 and messages[0].endswith(
        f"of 400: {run / 'checkpoint.pt'} holds step {saved}; go on with 2 processes in all, as "
        f"this run: torchrun --nproc_per_node 2 cli.py train --out {run} --resume"
    ), messages[0]


def test_the_resume_line_of_a_multi_node_run_names_nodes_and_processes_per_node(
    monkeypatch,
) -> None:
    """2 nodes x 8 processes resume with --nnodes 2 --nproc_per_node 8, not --nproc_per_node 16."""
    from trainer.loop import _torchrun

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert _torchrun(16).startswith("torchrun --nnodes 2 --nproc_per_node 8 ")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert _torchrun(2) == "torchrun --nproc_per_node 2"
    monkeypatch.delenv("LOCAL_WORLD_SIZE")  # not started by torchrun: one node
    assert _torchrun(4) == "torchrun --nproc_per_node 4"


def test_checkpoint_is_never_half_written(tmp_path) -> None:
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 1, "w": torch.arange(3)})
    with pytest.raises(Exception, match="pickle|lambda"):
        save_checkpoint(path, {"step": 2, "w": torch.arange(1000), "bad": lambda: 0})
    assert torch.load(path, weights_only=False)["step"] == 1  # the old one is intact
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temp file left


def _ddp_worker(rank: int, world: int, port: int, cfg: TrainConfig, out: Path) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    result = train(cfg)
    torch.save(
        {k: v.detach().clone() for k, v in result.model.state_dict().items()},
        out / f"rank{rank}.pt",
    )


@pytest.mark.slow
def test_ddp_two_cpu_processes_keep_identical_parameters(train_cache, tmp_path) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = _cfg(train_cache, tmp_path / "run", epochs=2, occupancy_weight=0.5)
    mp.spawn(_ddp_worker, args=(2, port, cfg, tmp_path), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    m = _metrics(cfg.out)
    assert len(m) == 4  # 8 scans / (2 processes x 2 scans) = 2 steps an epoch
    assert yaml.safe_load((cfg.out / "config.yaml").read_text())["world_size"] == 2
    init = torch.load(cfg.out / "checkpoint.pt", weights_only=False)["model"]["head"]
    assert init.keys() and all(torch.equal(init[k], a[f"head.{k}"]) for k in init)


def _ddp_outcome(rank: int, world: int, port: int, cfg: TrainConfig, out: Path) -> None:
    """One torchrun-like process: train, and write what it ended with to out/rank{rank}.json."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    try:
        result = train(cfg)
        outcome = {"steps": result.steps, "final_loss": result.final_loss}
    except FloatingPointError as e:
        outcome = {"error": str(e)}
    (out / f"rank{rank}.json").write_text(json.dumps(outcome))


def _spawn_ddp(cfg: TrainConfig, out: Path, world: int = 2) -> list[dict]:
    import torch.multiprocessing as mp

    mp.spawn(_ddp_outcome, args=(world, _free_port(), cfg, out), nprocs=world, join=True)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(world)]


def _ddp_in_callers_group(rank: int, world: int, port: int, cfg: TrainConfig, out: Path) -> None:
    """A script that sets up its own process group, trains, then uses the group again."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    steps = train(cfg).steps
    still = dist.is_initialized()
    total = torch.tensor([steps])
    dist.all_reduce(total)  # the caller's group still works after train()
    dist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps({"kept": still, "sum": int(total)}))


@pytest.mark.slow
def test_train_leaves_a_process_group_the_caller_set_up(train_cache, tmp_path) -> None:
    """train() joins a process group only when none exists, and leaves only the one it joined:
    a script's own group survives it (it used to be destroyed under the script)."""
    import torch.multiprocessing as mp

    cfg = _cfg(train_cache, tmp_path / "run", epochs=1)
    mp.spawn(_ddp_in_callers_group, args=(2, _free_port(), cfg, tmp_path), nprocs=2, join=True)
    outcomes = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert outcomes == [{"kept": True, "sum": 4}] * 2  # 8 scans / (2 x 2): 2 steps on each


@pytest.mark.slow
def test_ddp_a_non_finite_loss_on_one_rank_stops_every_rank(train_cache, tmp_path) -> None:
    """Scan 0 has NaN targets; it is in rank 1's second batch (8 scans, 2 processes x 2 scans).
    Without clipping (grad norm 0) only the mean loss over the ranks shows it: every rank stops
    at step 2 with the same line, and rank 0's checkpoint stays step 1's, finite."""
    from conftest import write_train_cache

    rank1 = RunBatchSampler(8, 2, 1, 0, rank=1, world=2).epoch_batches(0)
    assert [i for _, i in rank1[1]] == [0, 7]
    cache = write_train_cache(tmp_path / "cache", train_cache.data, nan_scans=(0,))
    cfg = _cfg(
        train_cache._replace(cache=cache), tmp_path / "run", epochs=1, grad_clip=0.0,
        checkpoint_every=1, occupancy_weight=0.5,
    )  # fmt: skip
    outcomes = _spawn_ddp(cfg, tmp_path)
    assert outcomes[0] == outcomes[1] and "error" in outcomes[0], outcomes
    message = outcomes[0]["error"]
    assert message.startswith("step 2 (epoch 1.00): the loss or its gradient is not finite")
    assert "(loss nan, distill nan" in message and "mean over 2 processes" in message
    assert f"{cfg.out / 'checkpoint.pt'} holds step 1, from before" in message
    ckpt = torch.load(cfg.out / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 1 and np.isfinite(ckpt["loss"])
    weights = [t for sd in ckpt["model"].values() if sd for t in sd.values()]
    assert all(bool(torch.isfinite(t.float()).all()) for t in weights)
    assert [r["step"] for r in _metrics(cfg.out)] == [1]
    assert not (cfg.out / "summary.json").exists()


def _first_step_losses(cfg: TrainConfig, scans: list[int]) -> tuple[float, float, float]:
    """(loss, distill, occupancy) of the initial model on epoch 0's scans ``scans``, in train
    mode (batch statistics), as the loop's first step computes them."""
    from trainer.data import ScanDataset, collate, open_training_cache
    from trainer.loop import DistillModel
    from trainer.loss import distill_loss
    from trainer.occupancy import occupancy_loss

    reader = open_training_cache(cfg)
    torch.manual_seed(cfg.seed)
    model = DistillModel(cfg, reader.feature_dim).train()
    batch = collate([ScanDataset(reader, cfg)[(0, i)] for i in scans])
    paired = batch["paired"]
    with torch.no_grad():
        pred, logits = model(batch["coords"], batch["feats"], batch["queries"], paired)
        distill = distill_loss(pred, batch["target"][paired])
        occupancy = occupancy_loss(logits, batch["occ_labels"])
    d, o = float(distill), float(occupancy)
    return d + cfg.occupancy_weight * o, d, o


@pytest.mark.slow
def test_ddp_metrics_and_summary_are_the_mean_over_ranks(train_cache, tmp_path) -> None:
    """metrics.jsonl's loss terms (and summary.json's final loss) are the mean of the ranks'
    losses, not rank 0's: step 1 checked against each rank's first batch computed by hand."""
    cfg = _cfg(train_cache, tmp_path / "run", epochs=1, occupancy_weight=0.5)
    outcomes = _spawn_ddp(cfg, tmp_path)
    m = _metrics(cfg.out)
    assert [r["step"] for r in m] == [1, 2]
    first_batches = [RunBatchSampler(8, 2, 1, 0, r, 2).epoch_batches(0)[0] for r in (0, 1)]
    by_rank = [_first_step_losses(cfg, [i for _, i in b]) for b in first_batches]
    for k, name in enumerate(("loss", "distill", "occupancy")):
        mean = (by_rank[0][k] + by_rank[1][k]) / 2
        assert m[0][name] == pytest.approx(mean, rel=1e-5, abs=1e-6), name
        assert abs(by_rank[0][k] - mean) > 1e-4, name  # rank 0's own value would fail the above
    summary = json.loads((cfg.out / "summary.json").read_text())
    assert summary["final_loss"] == m[-1]["loss"]
    assert outcomes[0]["final_loss"] == outcomes[1]["final_loss"] == m[-1]["loss"]


def test_train_never_imports_the_teacher(train_cache, tmp_path) -> None:
    from conftest import run_cli_without_teacher

    argv = _cli(
        "--cache", str(train_cache.cache), "--data", str(train_cache.data),
        "--out", str(tmp_path / "run"), "--backbone", "tiny", "--batch-size", "4",
        "--epochs", "1", "--workers", "1", "--no-progress",
    )[2:]  # fmt: skip
    run_cli_without_teacher(argv)
    assert len(_metrics(tmp_path / "run")) == 2


def test_cache_for_another_split_or_dataset_or_incomplete_is_refused(train_cache, tmp_path) -> None:
    from conftest import write_nuscenes_tables, write_train_cache

    with pytest.raises(CacheKeyMismatch, match="'split' is 'train' in the cache but 'val'"):
        train(_cfg(train_cache, tmp_path / "a", split="val"))
    other = write_nuscenes_tables(tmp_path / "other", tag="another dataset")
    with pytest.raises(CacheKeyMismatch, match="not extracted from the dataset.*changed: scene"):
        train(load_config(cache=train_cache.cache, data=other, out=tmp_path / "b", **SMALL))
    incomplete = write_train_cache(tmp_path / "partial", train_cache.data, scans=8, finalize=False)
    with pytest.raises(IncompleteCacheError, match="incomplete: 1 of 2 units missing"):
        train(_cfg(train_cache._replace(cache=incomplete), tmp_path / "c"))
    # through the CLI: exit 1, one clear line
    done = subprocess.run(
        _cli("--cache", str(incomplete), "--data", str(train_cache.data), "--out", str(tmp_path / "d")),
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert (
        done.returncode == 1
        and done.stderr.startswith("error: cache")
        and "incomplete" in done.stderr
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "d").exists()


def test_other_tables_keep_the_cache_a_changed_table_is_named(train_cache, tmp_path) -> None:
    """The fingerprint covers the tables the reader reads: adding nuScenes-panoptic's table
    keeps the cache; an edited table is named; a cache fingerprinted over every table (made
    before 2026-11-26) is still accepted."""
    import shutil

    from conftest import write_train_cache

    from cache import dataset_fingerprint
    from pipeline.datasets.nuscenes import NuScenesReader
    from trainer.data import open_training_cache

    data = tmp_path / "data"
    shutil.copytree(train_cache.data, data)
    cache = write_train_cache(tmp_path / "cache", data, scans=4)
    version_dir = data / "v1.0-test"
    (version_dir / "panoptic.json").write_text("[]")
    (version_dir / "map.json").write_text("[]")
    cfg = load_config(cache=cache, data=data, out=tmp_path / "run", **SMALL)
    assert open_training_cache(cfg).path == cache
    (version_dir / "sample_data.json").write_text('[{"token": "edited"}]')
    with pytest.raises(CacheKeyMismatch, match=r"\(v1.0-test\): changed: sample_data.json;"):
        open_training_cache(cfg)
    legacy = NuScenesReader(data).legacy_metadata_files()
    assert {p.name for p in legacy} >= {"panoptic.json", "map.json"}
    old = write_train_cache(
        tmp_path / "old", data, scans=4, fingerprint=dataset_fingerprint(legacy)
    )
    assert open_training_cache(dataclasses.replace(cfg, cache=old)).path == old


def test_resume_takes_the_run_folders_own_config(train_cache, tmp_path) -> None:
    """`train --out RUN --resume` continues with RUN/config.yaml's settings; options given win
    (and a changed setting is refused by the resume check)."""
    from typer.testing import CliRunner

    from cli import app

    run = tmp_path / "run"
    train(_cfg(train_cache, run, epochs=1, head="linear"))
    assert load_config(run / "config.yaml") == _cfg(train_cache, run, epochs=1, head="linear")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    result = CliRunner().invoke(app, ["train", "--out", str(run), "--resume"])
    assert result.exit_code == 0, result.output  # before: "config needs ['cache', 'data']"
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    result = CliRunner().invoke(app, ["train", "--out", str(run), "--resume", "--head", "mlp"])
    assert result.exit_code == 1 and "head ('linear' -> 'mlp')" in result.output


def test_a_resumed_runs_config_yaml_starts_a_new_run_elsewhere(tmp_path) -> None:
    """A resumed run records `resume: true`; `--config RUN/config.yaml --out NEW` reruns it (it
    used to fail: "--resume given but there is no checkpoint"); `--resume` still resumes."""
    cfg = load_config(cache="c", data="d", out=tmp_path / "run", resume=True, lr=0.02)
    record = {"config": cfg.to_dict(), "versions": {"torch": "x"}, "steps": 8}
    path = tmp_path / "run" / "config.yaml"
    path.parent.mkdir()
    path.write_text(yaml.safe_dump(record, sort_keys=False))
    again = load_config(path, out=tmp_path / "new")
    assert again == dataclasses.replace(cfg, out=tmp_path / "new", resume=False)
    assert load_config(path, resume=True) == cfg


def test_config_yaml_keys_are_the_fields(tmp_path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("lr: 0.01\nhead: linear\nocupancy_weight: 1\n")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['ocupancy_weight'\]"):
        load_config(path, cache="c", data="d", out="o")
    path.write_text("lr: 0.01\nhead: linear\nscale_range: [0.9, 1.1]\n")
    cfg = load_config(path, cache="c", data="d", out="o", lr=0.02)
    assert (cfg.lr, cfg.head, cfg.scale_range) == (0.02, "linear", (0.9, 1.1))  # CLI wins
    with pytest.raises(ValueError, match="head must be one of"):
        load_config(None, cache="c", data="d", out="o", head="conv")


def test_config_yaml_values_of_the_wrong_type_are_refused_naming_key_and_file(tmp_path) -> None:
    """`lr: 1e-3` is a number (PyYAML alone reads it as a string); a value of the wrong type is
    refused naming the field and the file, not run with (`epochs: true` was 1 epoch) or failed on
    later with a bare TypeError."""
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1e-3\nmin_lr_ratio: 2e-2\noccupancy_weight: 1\n")
    cfg = load_config(path, cache="c", data="d", out="o")
    assert (cfg.lr, cfg.min_lr_ratio, cfg.occupancy_weight) == (1e-3, 2e-2, 1.0)
    assert isinstance(cfg.occupancy_weight, float)
    for text, message in [
        ("epochs: true", "epochs must be an integer, got True"),
        ("batch_size: 2.5", "batch_size must be an integer, got 2.5"),
        ("lr: 'fast'", "lr must be a number, got 'fast'"),
        ("amp: 'off'", "amp must be true or false, got 'off'"),
        ("head: 1", "head must be a string, got 1"),
        ("scale_range: 1.0", "scale_range must be a list of two numbers"),
    ]:
        path.write_text(text + "\n")
        with pytest.raises(ValueError, match=f"^{path}: {message}"):
            load_config(path, cache="c", data="d", out="o")


def test_run_files_that_are_not_what_they_should_be_are_named(tmp_path) -> None:
    """read_yaml, read_run_record and load_checkpoint refuse a file that is not what it should
    be in one line naming it and the problem (the CLI prints it after `error:`)."""
    from trainer.config import read_run_record, read_yaml
    from trainer.model import load_checkpoint

    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: 2\nlr: [1, 2\nhead: mlp\n")
    with pytest.raises(ValueError) as error:
        read_yaml(bad, "config")
    assert str(error.value) == (
        f"{bad}: not valid YAML, cannot read the config (line 3, column 5: expected ',' or ']', "
        "but got ':' (while parsing a flow sequence))"
    )
    bad.write_bytes(b"lr: \xff\n")
    with pytest.raises(ValueError, match=f"^{bad}: cannot read the config: not text"):
        read_yaml(bad, "config")
    with pytest.raises(ValueError, match=r": cannot read the config \(No such file or directory\)"):
        read_yaml(tmp_path / "none.yaml", "config")

    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(FileNotFoundError, match=r"not a training run folder \(no config.yaml\)"):
        read_run_record(run)
    for text in ("- 1\n", "config: 3\n", "steps: 4\n"):
        (run / "config.yaml").write_text(text)
        with pytest.raises(ValueError) as error:
            read_run_record(run)
        assert str(error.value) == (
            f"{run / 'config.yaml'}: not a training run's config (no `config:` mapping)"
        ), text
    (run / "config.yaml").write_text("config: {lr: 1e-3}\nsteps: 4\n")
    assert read_run_record(run) == {"config": {"lr": 0.001}, "steps": 4}

    path = run / "checkpoint.pt"
    with pytest.raises(FileNotFoundError, match="no checkpoint in this run folder"):
        load_checkpoint(path)
    path.write_text('{"step": 1}\n')  # another file under the name
    with pytest.raises(ValueError) as error:
        load_checkpoint(path)
    assert str(error.value).startswith(
        f"{path}: not a readable checkpoint (UnpicklingError: invalid load key"
    )
    for state, what in (
        ([1, 2], "no model weights"),
        ({"model": [], "step": 1}, "no model weights"),
        ({"model": {}, "step": "4"}, "no step"),
    ):
        torch.save(state, path)
        with pytest.raises(ValueError) as error:
            load_checkpoint(path)
        assert str(error.value) == f"{path}: not a checkpoint of `cli.py train` ({what})", state
    torch.save({"model": {}, "step": 4}, path)
    assert load_checkpoint(path) == {"model": {}, "step": 4}


def test_sampler_epochs_are_seeded_permutations_sharded_and_resumable() -> None:
    full = RunBatchSampler(10, 2, epochs=3, seed=5)
    batches = list(full)
    assert len(batches) == full.total_steps == 15
    epoch0 = [i for b in batches[:5] for e, i in b]
    assert sorted(epoch0) == list(range(10)) and all(e == 0 for b in batches[:5] for e, _ in b)
    assert epoch0 != [i for b in batches[5:10] for _, i in b]  # a new order each epoch
    assert list(RunBatchSampler(10, 2, epochs=3, seed=5, start_step=7)) == batches[7:]
    r0 = [i for b in RunBatchSampler(10, 2, 1, 5, rank=0, world=2) for _, i in b]
    r1 = [i for b in RunBatchSampler(10, 2, 1, 5, rank=1, world=2) for _, i in b]
    assert len(r0) == len(r1) == 4 and not set(r0) & set(r1)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        RunBatchSampler(3, 2, 1, 0, world=4)


def _item_and_scan(train_cache, tmp_path: Path, epoch: int, i: int, **kw):
    from trainer.data import ScanDataset, open_training_cache

    cfg = _cfg(train_cache, tmp_path / "unused", **kw)
    dataset = ScanDataset(open_training_cache(cfg), cfg)
    return cfg, dataset[(epoch, i)], dataset.reader.read_scan(i)


def test_scan_item_rows_are_the_kept_points_and_their_targets(train_cache, tmp_path) -> None:
    """Without augmentation, an item's rows are the points of the blocks left in the input
    (whole blocks of stride * mask_block voxels), each with its own target row, pairing and
    intensity; occupancy queries are in voxel units, positives are cells of dropped points only."""
    cfg, item, scan = _item_and_scan(
        train_cache, tmp_path, 0, 2, augment=False, occupancy_weight=1.0
    )
    voxels = np.floor(scan.points[:, :3].astype(np.float64) / cfg.voxel_size).astype(np.int64)
    side = cfg.occupancy_stride * cfg.mask_block
    kept_blocks = {tuple(b) for b in np.floor_divide(item["coords"], side).tolist()}
    keep = np.array([tuple(b) in kept_blocks for b in np.floor_divide(voxels, side).tolist()])
    assert 0 < keep.sum() < len(keep)  # some blocks masked out
    np.testing.assert_array_equal(item["coords"], voxels[keep])
    np.testing.assert_array_equal(item["target"], scan.target[keep])
    np.testing.assert_array_equal(item["paired"], scan.camera[keep] >= 0)
    np.testing.assert_allclose(item["feats"][:, 1], scan.points[keep, 3] / 255.0, rtol=1e-6)
    cells = item["occ_cells"]
    assert len(cells) and not (cells % cfg.occupancy_stride).any()
    positive = {tuple(c) for c in (cells[item["occ_labels"] == 1] // cfg.occupancy_stride).tolist()}
    point_cells = [tuple(c) for c in np.floor_divide(voxels, cfg.occupancy_stride).tolist()]
    dropped_cells = {c for c, k in zip(point_cells, keep, strict=True) if not k}
    kept_cells = {c for c, k in zip(point_cells, keep, strict=True) if k}
    assert positive and positive <= dropped_cells and not positive & kept_cells
    # a batch of two scans: ME batch index 0 then 1 in front of each scan's rows, in order
    from trainer.data import collate

    other = _item_and_scan(train_cache, tmp_path, 0, 5, augment=False, occupancy_weight=1.0)[1]
    batch = collate([item, other])
    for key, name in (("coords", "coords"), ("queries", "occ_cells")):
        a, b = item[name], other[name]
        np.testing.assert_array_equal(batch[key][:, 0].numpy(), np.repeat([0, 1], [len(a), len(b)]))
        np.testing.assert_array_equal(batch[key][:, 1:].numpy(), np.concatenate([a, b]))
    for key in ("target", "occ_labels", "paired"):
        np.testing.assert_array_equal(batch[key].numpy(), np.concatenate([item[key], other[key]]))


def test_scan_item_augmentation_moves_the_voxels_rigidly_and_not_the_targets(
    train_cache, tmp_path
) -> None:
    """With augmentation (rotation about z, flips, scale in [0.95, 1.05]) and no masking, the
    voxels are those of the transformed points (ranges and heights scaled by one factor, a new
    pose each epoch) while target, pairing and intensity rows stay those of the points."""
    coords = []
    for epoch in (0, 1):
        cfg, item, scan = _item_and_scan(train_cache, tmp_path, epoch, 3, occupancy_weight=0.0)
        np.testing.assert_array_equal(item["target"], scan.target)
        np.testing.assert_array_equal(item["paired"], scan.camera >= 0)
        np.testing.assert_allclose(item["feats"][:, 1], scan.points[:, 3] / 255.0, rtol=1e-6)
        xyz = scan.points[:, :3].astype(np.float64)
        centres = (item["coords"] + 0.5) * cfg.voxel_size  # within half a voxel diagonal
        far = np.linalg.norm(xyz, axis=1) > 5.0
        scale = np.median(np.linalg.norm(centres[far], axis=1) / np.linalg.norm(xyz[far], axis=1))
        assert 0.95 - 1e-3 <= scale <= 1.05 + 1e-3
        tol = cfg.voxel_size * (np.sqrt(3) / 2) + 2e-3 * np.linalg.norm(xyz, axis=1)
        assert (
            np.abs(np.linalg.norm(centres, axis=1) - scale * np.linalg.norm(xyz, axis=1)) <= tol
        ).all()
        assert (
            np.abs(centres[:, 2] - scale * xyz[:, 2])
            <= cfg.voxel_size / 2 + 2e-3 * np.abs(xyz[:, 2]) + 1e-9
        ).all()
        coords.append(item["coords"])
    raw = np.floor(xyz / cfg.voxel_size).astype(np.int32)
    assert not np.array_equal(coords[0], raw) and not np.array_equal(coords[0], coords[1])


def test_augment_scales_by_one_factor_drawn_from_the_range() -> None:
    """Rotation about z and flips keep every range; the scale is one factor a scan, drawn over
    the whole of ``scale_range`` (both ends reached within a few draws)."""
    from trainer.data import augment

    xyz = np.array([[3.0, 4.0, 1.0], [0.0, 2.0, -1.0], [-6.0, 1.0, 0.5]], np.float32)
    scales = []
    for seed in range(20):
        out = augment(xyz, (0.5, 2.0), np.random.default_rng(seed))
        s = np.linalg.norm(out, axis=1) / np.linalg.norm(xyz, axis=1)
        assert s == pytest.approx(np.full(3, s[0]), rel=1e-5)
        assert out[:, 2] == pytest.approx(s[0] * xyz[:, 2], rel=1e-5)
        scales.append(float(s[0]))
    assert 0.5 <= min(scales) < 0.8 and 1.7 < max(scales) <= 2.0, scales


def test_lr_schedule_warms_up_then_decays() -> None:
    cfg = load_config(cache="c", data="d", out="o", lr=1.0, warmup=0.1, min_lr_ratio=0.01)
    lr = lr_schedule(100, cfg)
    assert lr[0] == pytest.approx(0.1) and lr[9] == pytest.approx(1.0)
    assert np.all(np.diff(lr[10:]) <= 0) and lr[-1] == pytest.approx(0.01, abs=1e-3)


def test_forward_backward_under_bfloat16_autocast_keeps_the_sparse_parts_float32() -> None:
    """amp (bfloat16 autocast, on CUDA in the loop; CPU autocast here): ME needs features and
    kernels of one dtype, so the backbone and the occupancy decoder's sparse convolutions run in
    float32 (a 1x1 conv is an F.mm that autocast would make bfloat16) and the head in bfloat16."""
    from trainer.loop import DistillModel
    from trainer.loss import distill_loss
    from trainer.minkowski import ME
    from trainer.model import StudentConfig, input_features, voxel_coordinates
    from trainer.occupancy import occupancy_loss

    cfg = load_config(cache="c", data="d", out="o", backbone="tiny", occupancy_weight=0.5)
    rng = np.random.default_rng(0)
    pts = np.concatenate([rng.uniform(-6, 6, (3000, 3)), rng.uniform(0, 255, (3000, 1))], 1)
    pts = pts.astype(np.float32)
    vox = voxel_coordinates(pts[:, :3], cfg.voxel_size)  # (N, 3)
    coords = ME.utils.batched_coordinates([vox], dtype=torch.float32)
    feats = input_features(torch.from_numpy(pts), StudentConfig("tiny"))
    cells = np.unique(np.floor_divide(vox.numpy(), cfg.occupancy_stride), axis=0)[:200]
    queries = ME.utils.batched_coordinates(
        [torch.from_numpy((cells * cfg.occupancy_stride).astype(np.int32))], dtype=torch.int32
    )
    labels = torch.from_numpy((rng.uniform(size=len(queries)) > 0.5).astype(np.float32))
    paired = torch.from_numpy(pts[:, 0] > 0)
    torch.manual_seed(0)
    model = DistillModel(cfg, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred, logits = model(coords, feats, queries, paired)
    assert pred.dtype == torch.bfloat16  # the head did run under autocast
    target = torch.randn(int(paired.sum()), 16)
    loss = distill_loss(pred, target)
    loss = loss + 0.5 * occupancy_loss(logits, labels)
    loss.backward()
    assert torch.isfinite(loss)
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all(g is not None and g.dtype == torch.float32 for g in grads.values())
    assert all(bool(torch.isfinite(g).all()) for g in grads.values())


def test_resuming_a_finished_run_rewrites_nothing(train_cache, tmp_path) -> None:
    """A finished run resumed trains nothing and leaves its files (summary: final loss, rates)
    as they were."""
    cfg = _cfg(train_cache, tmp_path / "run", epochs=1)
    first = train(cfg)
    names = ("summary.json", "config.yaml", "metrics.jsonl", "checkpoint.pt")
    files = {n: (cfg.out / n).read_bytes() for n in names}
    again = train(dataclasses.replace(cfg, resume=True))
    assert {n: (cfg.out / n).read_bytes() for n in names} == files
    assert again.steps == first.steps == 4 and again.final_loss == first.final_loss > 0
    # killed between its last checkpoint and its summary: the summary comes from the checkpoint
    (cfg.out / "summary.json").unlink()
    train(dataclasses.replace(cfg, resume=True))
    summary = json.loads((cfg.out / "summary.json").read_text(), parse_constant=_not_json)
    assert summary["steps"] == 4 and summary["final_loss"] == pytest.approx(first.final_loss)
    assert summary["scans_per_s"] is None  # not measured: null (strict JSON), not NaN
    # its checkpoint deleted: a new run there would sit next to the old results
    (cfg.out / "checkpoint.pt").unlink()
    with pytest.raises(FileExistsError, match=r"holds results of an earlier run \(summary.json\)"):
        train(cfg)
    assert json.loads((cfg.out / "summary.json").read_text()) == summary


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not JSON")


def test_a_one_step_run_writes_strict_json(train_cache, tmp_path) -> None:
    """One step has no timed step (the first is warm-up): its rates are null, and the command
    says n/a."""
    from typer.testing import CliRunner

    from cli import app

    run = tmp_path / "run"
    args = ["train", "--cache", str(train_cache.cache), "--data", str(train_cache.data)]
    args += ["--out", str(run), "--backbone", "tiny", "--batch-size", "8", "--epochs", "1"]
    result = CliRunner().invoke(app, [*args, "--workers", "0", "--threads", "1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "trained 1 steps" in result.output and "n/a scans/s, data wait n/a" in result.output
    summary = json.loads((run / "summary.json").read_text(), parse_constant=_not_json)
    assert summary["steps"] == 1 and summary["scans_per_s"] is None


def test_resume_with_other_usable_scans_or_process_count_is_refused(train_cache, tmp_path) -> None:
    """The checkpoint's step means an epoch, a batch and a learning rate only for the usable
    scans and the process count it was written with: another of either is refused, naming both."""
    import shutil

    cache = shutil.copytree(train_cache.cache, tmp_path / "cache" / train_cache.cache.name)
    cfg = _cfg(train_cache._replace(cache=cache), tmp_path / "run", epochs=1, skip_bad_scans=True)
    train(cfg)
    ckpt = torch.load(cfg.out / "checkpoint.pt", weights_only=False)
    shutil.rmtree(cache / "units" / "u00001")  # its 4 scans are now skipped
    with pytest.raises(ValueError, match="trained on 8 usable scans, this one finds 4"):
        train(dataclasses.replace(cfg, resume=True))
    shutil.rmtree(cache)
    shutil.copytree(train_cache.cache, cache)
    other = dict(ckpt, schedule=dict(ckpt["schedule"], world_size=2, steps_per_epoch=2))
    save_checkpoint(cfg.out / "checkpoint.pt", other)  # as if written by a 2-process run
    with pytest.raises(ValueError, match=r"run of 2 process\(es\), this one has 1"):
        train(dataclasses.replace(cfg, resume=True))
    save_checkpoint(cfg.out / "checkpoint.pt", ckpt)
    train(dataclasses.replace(cfg, resume=True))  # the same schedule resumes


def test_resume_compares_the_checkpoints_own_fields_and_names_each_change(
    train_cache, tmp_path
) -> None:
    """A checkpoint written before a config field existed resumes (a field added since is no
    change), as does one resumed with another setting that keeps the trajectory
    (RESUMABLE_CHANGES); a changed trajectory setting is refused naming it (saved -> asked)."""
    cfg = _cfg(train_cache, tmp_path / "run", epochs=1)
    train(cfg)
    ckpt = torch.load(cfg.out / "checkpoint.pt", weights_only=False)
    older = dict(ckpt, config={k: v for k, v in ckpt["config"].items() if k != "grad_clip"})
    save_checkpoint(cfg.out / "checkpoint.pt", older)  # as written before grad_clip existed
    again = train(dataclasses.replace(cfg, resume=True, checkpoint_every=3, log_every=2))
    assert again.steps == 4
    with pytest.raises(ValueError) as error:
        train(dataclasses.replace(cfg, resume=True, lr=0.01, checkpoint_every=3))
    assert str(error.value).endswith(
        "cannot resume with a different config; changed field(s): lr (0.003 -> 0.01)"
    ), str(error.value)


def test_config_changes_compares_json_forms_by_dotted_key() -> None:
    """The one comparison rule (resume, ablate, robustness baselines): JSON forms (a path and
    its string, a tuple and its list are equal), nested keys dotted, an empty mapping a value,
    a key one side lacks ABSENT (not None); ``ignore`` drops top-level keys with their nested
    ones, ``only`` compares the keys named, in their order."""
    from trainer.config import ABSENT, config_changes
    from trainer.evaluate.ablate import differing_keys

    saved = {"a": 1, "p": Path("/x"), "t": (1, 2), "d": {"x": 1, "y": {}}, "gone": None}
    saved["io"] = {"k": 1}
    wanted = {"a": 1, "p": "/x", "t": [1, 2], "d": {"x": 2, "y": {"z": 1}}, "io": {"k": 2}}
    wanted["new"] = 3
    assert config_changes(saved, wanted) == [
        ("d.x", 1, 2),
        ("d.y", {}, ABSENT),
        ("gone", None, ABSENT),
        ("io.k", 1, 2),
        ("d.y.z", ABSENT, 1),
        ("new", ABSENT, 3),
    ]
    assert config_changes(saved, wanted, ignore=("d", "gone")) == [
        ("io.k", 1, 2),
        ("new", ABSENT, 3),
    ]
    assert config_changes(saved, wanted, only=("new", "a", "io.k")) == [
        ("new", ABSENT, 3),
        ("io.k", 1, 2),
    ]
    assert differing_keys(saved, wanted, ignore=("d", "gone", "new")) == ["io.k (1 -> 2)"]


def test_without_clipping_the_gradient_norm_is_still_measured(train_cache, tmp_path) -> None:
    """grad_clip 0 logs the same gradient norms as a clip too large to act (1e9), on the same
    trajectory: the norm is measured (a NaN gradient of a finite loss is caught), not left 0."""
    runs = [_cfg(train_cache, tmp_path / f"clip{c}", epochs=1, grad_clip=c) for c in (0.0, 1e9)]
    free, huge = (_metrics(train(cfg).run_dir) for cfg in runs)
    assert [m["grad_norm"] for m in free] == pytest.approx([m["grad_norm"] for m in huge], rel=1e-6)
    assert all(m["grad_norm"] > 0 for m in free)
    assert [m["loss"] for m in free] == [m["loss"] for m in huge]


def test_a_non_finite_loss_stops_the_run_and_keeps_its_checkpoint(train_cache, tmp_path) -> None:
    """A diverging run (here lr 1e30) stops at the first non-finite loss with one clear line
    (exit 1): no NaN in metrics.jsonl, and the checkpoint on disk is the last finite step's."""
    from typer.testing import CliRunner

    from cli import app

    run = tmp_path / "run"
    args = ["train", "--cache", str(train_cache.cache), "--data", str(train_cache.data)]
    args += ["--out", str(run), "--backbone", "tiny", "--batch-size", "2", "--epochs", "1"]
    args += ["--lr", "1e30", "--checkpoint-every", "1", "--workers", "0", "--threads", "1"]
    result = CliRunner().invoke(app, [*args, "--no-progress"])
    assert result.exit_code == 1, result.output
    assert "error: step " in result.output and "is not finite" in result.output
    logged = (run / "metrics.jsonl").read_text().splitlines()
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == len(logged) < 4 and f"holds step {ckpt['step']}" in result.output
    lines = [json.loads(line, parse_constant=_not_json) for line in logged]  # strict JSON
    assert all(np.isfinite(r["loss"]) for r in lines)
    weights = [t for sd in ckpt["model"].values() if sd for t in sd.values()]
    assert all(bool(torch.isfinite(t.float()).all()) for t in weights)
    assert not (run / "summary.json").exists()


def test_resume_on_another_cache_is_refused_a_moved_copy_is_not(train_cache, tmp_path) -> None:
    """`cache` may change on --resume (a moved cache folder): the checkpoint's cache digest is
    what stops a run from resuming on other targets. Two caches of the same dataset and split
    with other digests (the current and the legacy fingerprint, both accepted by train)."""
    import shutil

    from conftest import write_train_cache

    from cache import dataset_fingerprint
    from pipeline.datasets.nuscenes import NuScenesReader

    data = shutil.copytree(train_cache.data, tmp_path / "data")
    (data / "v1.0-test" / "map.json").write_text("[]")  # only the legacy fingerprint covers it
    legacy = dataset_fingerprint(NuScenesReader(data).legacy_metadata_files())
    first = write_train_cache(tmp_path / "a", data, scans=4)
    other = write_train_cache(tmp_path / "b", data, scans=4, fingerprint=legacy)
    assert first.name != other.name
    cfg = load_config(cache=first, data=data, out=tmp_path / "run", epochs=1, **SMALL)
    train(cfg)
    with pytest.raises(ValueError, match=f"was trained on cache {first.name}, not {other.name}"):
        train(dataclasses.replace(cfg, cache=other, resume=True))
    moved = shutil.copytree(first, tmp_path / "moved" / first.name)
    assert train(dataclasses.replace(cfg, cache=moved, resume=True)).steps == 2
