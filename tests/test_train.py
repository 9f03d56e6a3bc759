"""The training loop end to end on real shards, real Accelerate processes and offline W&B:
loss goes down, exact resume after SIGKILL, SIGUSR1 checkpoint-and-exit, two processes, and the
bad-input cases (unknown key, indivisible batch, empty shards, NaN loss, a rank that dies)."""

from __future__ import annotations

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

from selfsup.pretrain.run.rundir import latest_checkpoint, load_checkpoint

ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
SMALL = [
    "model.backbone=resnet_small", "model.stem=cifar_s2", "model.width=0.5", "method.simclr.proj_hidden=64",
    "method.simclr.proj_out=32", "data.batch_size=32", "data.workers=1", "optim.name=sgd", "optim.base_lr=0.2",
    "log.progress=false", "train.log_every=1", "augment.gray_p=0.0", "log.wandb=off",
]  # fmt: skip
# log.wandb=off: W&B's offline service costs a process 1.5-3 s to start and stop; the runs that
# check the W&B record turn it back on (log.wandb=offline)


def pretrain(run_dir: Path, shards: str, *overrides: str, resume: bool = False, nproc: int = 1,
             wait: bool = True, config: str | None = None) -> subprocess.Popen | subprocess.CompletedProcess:
    args = ["pretrain", *(["--config", config] if config else []), f"data.train={shards}", f"run_dir={run_dir}",
            *SMALL, *overrides, *(["--resume", "auto"] if resume else [])]  # fmt: skip
    if nproc == 1:
        cmd = [sys.executable, "-m", "selfsup.launch.cli", *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "selfsup.launch.cli", *args]  # fmt: skip
    if not wait:
        return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=600)


def final_model(run_dir: Path) -> dict[str, torch.Tensor]:
    path = latest_checkpoint(run_dir / "checkpoints")
    assert path is not None
    return load_checkpoint(path)["model"]


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(r) for r in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def test_short_simclr_run_lowers_loss_and_logs(tmp_path: Path, embedded_shards: dict) -> None:
    run = tmp_path / "run"
    r = pretrain(run, embedded_shards["train"], "data.batch_size=128", "train.max_steps=60",
                 "train.log_every=5", "model.width=1.0", "method.simclr.proj_hidden=256",
                 "method.simclr.proj_out=64", "optim.base_lr=0.5", "log.wandb=offline")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    rows = metrics(run)
    assert [row["step"] for row in rows] == list(range(5, 61, 5))
    first, last = np.mean([r["loss"] for r in rows[:2]]), np.mean([r["loss"] for r in rows[-2:]])
    assert last < first - 0.3, (first, last)
    # InfoNCE MI bound log(2N - 1) - L, N = 128 images: never above its ceiling, rising as it learns
    bound = [r["infonce_mi_bound"] for r in rows]
    assert all(b <= np.log(2 * 128 - 1) for b in bound) and np.mean(bound[-2:]) > np.mean(bound[:2]) + 0.3
    assert all(r["infonce_mi_bound"] == pytest.approx(np.log(255) - r["loss"], abs=1e-5) for r in rows)
    assert all(0 <= row["data_wait"] <= 1 and row["img_per_s"] > 0 and row["corrupt"] == 0 for row in rows)
    assert rows[-1]["lr"] < rows[0]["lr"]  # cosine has annealed
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))
    saved = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    assert saved["step"] == 60 and saved["wandb_id"] in offline[0].name
    assert (run / "config.yaml").is_file() and json.loads((run / "data_info.json").read_text())["channels"] == 1


def _wait_for_checkpoint(run: Path, proc: subprocess.Popen, min_step: int, timeout: float = 300) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            path = latest_checkpoint(run / "checkpoints")
        except Exception:  # noqa: BLE001 - pointer may be mid-replace; poll again
            path = None
        if path is not None and int(path.stem.split("-")[1]) >= min_step:
            return int(path.stem.split("-")[1])
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.05)
    raise AssertionError("no checkpoint in time")


ONE_PROC_RUN = ["train.max_steps=12", "train.checkpoint_every=3"]


@pytest.fixture(scope="module")
def uninterrupted(small_shards: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference both interruption tests end equal to: ONE_PROC_RUN straight through."""
    ref = tmp_path_factory.mktemp("uninterrupted") / "ref"
    r = pretrain(ref, small_shards, *ONE_PROC_RUN)
    assert r.returncode == 0, r.stdout + r.stderr
    return ref


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Path, small_shards: str, uninterrupted: Path) -> None:
    run = tmp_path / "killed"
    proc = pretrain(run, small_shards, *ONE_PROC_RUN, wait=False)
    kill_after = int(np.random.default_rng().integers(3, 10))
    at = _wait_for_checkpoint(run, proc, kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert at < 12
    r = pretrain(run, small_shards, *ONE_PROC_RUN, resume=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stdout
    assert_same_params(final_model(uninterrupted), final_model(run))
    # the metrics history reads as one run: each step once, in order
    assert [m["step"] for m in metrics(run)] == list(range(1, 13))
    assert [m["loss"] for m in metrics(run)] == [m["loss"] for m in metrics(uninterrupted)]


@pytest.mark.slow
def test_sigusr1_checkpoints_and_exits_then_resumes(tmp_path: Path, small_shards: str, uninterrupted: Path) -> None:
    run = tmp_path / "sig"
    proc = pretrain(run, small_shards, *ONE_PROC_RUN, wait=False)
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() or len(metrics(run)) < 4:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    saved = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    assert 4 <= saved["step"] < 12 and saved["reason"] == "signal SIGUSR1"
    r = pretrain(run, small_shards, *ONE_PROC_RUN, resume=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_params(final_model(uninterrupted), final_model(run))
    assert [m["loss"] for m in metrics(run)] == [m["loss"] for m in metrics(uninterrupted)]


@pytest.mark.slow
def test_two_processes_run_and_resume_exactly(tmp_path: Path, small_shards: str) -> None:
    steps = ["train.max_steps=8", "train.checkpoint_every=4"]
    ref = tmp_path / "ref"
    r = pretrain(ref, small_shards, *steps, nproc=2)
    assert r.returncode == 0, r.stdout + r.stderr
    saved = load_checkpoint(latest_checkpoint(ref / "checkpoints"))
    assert saved["world_size"] == 2 and len(saved["rng"]) == 2 and saved["step"] == 8
    # rank RNG states differ: each rank draws its own augmentations
    assert not torch.equal(saved["rng"][0]["torch"], saved["rng"][1]["torch"])
    # resume from the middle checkpoint of a copy of the run -> same final parameters
    run = tmp_path / "resumed"
    (run / "checkpoints").mkdir(parents=True)
    mid = ref / "checkpoints" / "step-00000004.pt"
    (run / "checkpoints" / mid.name).write_bytes(mid.read_bytes())
    (run / "checkpoints" / "latest").write_text(mid.name)
    r = pretrain(run, small_shards, *steps, nproc=2, resume=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert_same_params(final_model(ref), final_model(run))


def test_config_errors_name_the_key(tmp_path: Path, small_shards: str, capsys) -> None:
    from selfsup.launch.cli.main import main as cli_main

    def in_process(run: str, *overrides: str) -> int:  # stops at the config: no process start needed
        return cli_main(["pretrain", f"data.train={small_shards}", f"run_dir={tmp_path / run}", *overrides])

    assert in_process("a", "train.bogus=1") == 2
    assert "unknown config key 'train.bogus'" in capsys.readouterr().out
    assert in_process("b", "data.batch_size=ten") == 2
    assert "data.batch_size: expected an integer" in capsys.readouterr().out
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    r = pretrain(tmp_path / "c", small_shards, "data.batch_size=33", "train.accumulate=2", "train.max_steps=1")
    assert r.returncode == 2 and "divisible" in r.stdout
    r = pretrain(tmp_path / "d", str(tmp_path / "nothing"), "train.max_steps=1")
    assert r.returncode == 1 and "shard set not found" in r.stdout
    r = pretrain(tmp_path / "e", small_shards, "data.batch_size=2048", "train.max_steps=1")
    assert r.returncode == 2 and "larger than the 1024 samples" in r.stdout


def test_existing_run_is_not_overwritten_without_resume(tmp_path: Path, small_shards: str) -> None:
    run = tmp_path / "run"
    assert pretrain(run, small_shards, "train.max_steps=2").returncode == 0
    r = pretrain(run, small_shards, "train.max_steps=2")
    assert r.returncode == 1 and "--resume auto" in r.stdout


def test_nan_loss_stops_with_checkpoint_or_is_skipped(tmp_path: Path, small_shards: str) -> None:
    # an absurd learning rate makes the weights overflow after the first update: a genuine NaN
    blow_up = ["optim.base_lr=1e30", "train.precision=fp32", "train.max_steps=6"]
    r = pretrain(tmp_path / "stop", small_shards, *blow_up)
    assert r.returncode == 1 and "non-finite loss at step 1" in r.stdout, r.stdout + r.stderr
    saved = load_checkpoint(latest_checkpoint(tmp_path / "stop" / "checkpoints"))
    assert saved["step"] == 1 and saved["reason"] == "non-finite loss"
    assert all(torch.isfinite(v).all() for v in saved["model"].values() if v.is_floating_point())
    r = pretrain(tmp_path / "skip", small_shards, *blow_up, "train.nan_policy=skip", "train.max_nan_skips=2")
    assert r.returncode == 1 and "3 steps with non-finite loss" in r.stdout, r.stdout + r.stderr
    assert [m["nan_skips"] for m in metrics(tmp_path / "skip")] == [0, 1, 2]


@pytest.mark.slow
def test_a_dead_rank_ends_the_job_instead_of_hanging(tmp_path: Path, small_shards: str) -> None:
    import psutil

    run = tmp_path / "run"
    proc = pretrain(run, small_shards, "train.max_steps=100000", "train.dist_timeout_s=30", nproc=2, wait=False)
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    workers = psutil.Process(proc.pid).children()  # the two ranks torchrun started
    assert len(workers) == 2
    workers[1].kill()
    t0 = time.time()
    proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 90
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in workers)


def test_periodic_knn_eval_is_logged(tmp_path: Path, small_shards: str) -> None:
    run = tmp_path / "run"
    r = pretrain(run, small_shards, "train.max_steps=32", "eval.every_epochs=1", f"data.test={small_shards}",
                 "eval.knn_k=[5]", "log.wandb=off")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    rows = [m for m in metrics(run) if "eval/knn_top1_k5" in m]
    assert len(rows) == 1 and rows[0]["step"] == 32
    assert 10.0 < rows[0]["eval/knn_top1_k5"] <= 100.0  # 10 classes: better than chance
