"""The autoencoder family through the real loop (``selfsup pretrain`` in a subprocess): a VAE run logs
one ELBO in nats and writes its pictures and the latent scatter; a beta-VAE with KL warm-up resumes
bitwise; the contractive penalty's double backward runs under two gloo processes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from selfsup.pretrain.run.rundir import LATEST, latest_checkpoint, list_checkpoints, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "ACCELERATE_USE_CPU": "1",
       "OMP_NUM_THREADS": "1"}  # fmt: skip
SMALL = ["data.batch_size=64", "data.workers=0", "train.epochs=0", "train.log_every=1",
         "log.progress=false", "model.width=0.5"]  # fmt: skip


def pretrain(method: str, run: Path, shards: str, *overrides: str, nproc: int = 1):
    args = ["pretrain", "--config", str(ROOT / "configs" / f"{method}_demo.yaml"),
            f"data.train={shards}", f"data.test={shards}", f"run_dir={run}", *SMALL, *overrides]  # fmt: skip
    launch = [sys.executable]
    if nproc > 1:
        launch += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    r = subprocess.run([*launch, "-m", "selfsup.launch.cli", *args], env=ENV, capture_output=True,
                       text=True, timeout=900)  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def rows(run: Path) -> list[dict]:
    return [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_vae_run_logs_the_elbo_in_nats_and_writes_its_pictures(tmp_path: Path, small_shards: str):
    run = tmp_path / "vae"
    pretrain("vae", run, small_shards, "train.max_steps=12", "method.vae.latent_dim=2")
    log = rows(run)
    assert len(log) == 12
    for r in log:  # one ELBO: reconstruction and KL in nats per image, bits/dim from it
        assert r["elbo"] == pytest.approx(-(r["recon_nll"] + r["kl"]), rel=1e-5, abs=1e-3)
        assert r["loss"] == pytest.approx(-r["elbo"], rel=1e-5, abs=1e-3)  # kl_weight 1
        assert r["bits_per_dim"] == pytest.approx(-r["elbo"] / (784 * np.log(2)) + 8, rel=1e-5)
        assert r["kl"] >= 0 and r["sigma_x"] > 0
    assert np.mean([r["elbo"] for r in log[-3:]]) > np.mean([r["elbo"] for r in log[:2]])
    for name, rows_ in (("samples", 2), ("interpolation", 4), ("reconstructions", 3)):
        png = np.asarray(Image.open(run / f"{name}.png"))
        assert png.shape[0] > rows_ * 96 and png.std() > 0, name  # rows of enlarged 28 px images
    scatter = np.asarray(Image.open(run / "latent_scatter.png"))
    assert scatter.shape[0] > 300 and scatter.std() > 0
    offline = list((run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))


@pytest.mark.slow
def test_beta_vae_with_kl_warmup_resumes_bitwise(tmp_path: Path, small_shards: str):
    ref = tmp_path / "ref"
    pretrain("beta_vae", ref, small_shards, "train.max_steps=6", "train.checkpoint_every=3",
             "train.keep_checkpoints=0", "method.beta_vae.kl_warmup=0.5", "log.wandb=off")  # fmt: skip
    weights = [r["kl_weight"] for r in rows(ref)]
    np.testing.assert_allclose(weights, [0, 4 / 3, 8 / 3, 4, 4, 4], rtol=1e-6)  # beta 4 over 3 steps
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    step3, step6 = list_checkpoints(run / "checkpoints")
    step6.unlink()
    (run / "checkpoints" / LATEST).write_text(step3.name)
    r = pretrain("beta_vae", run, small_shards, "train.max_steps=6", "train.checkpoint_every=3",
                 "train.keep_checkpoints=0", "method.beta_vae.kl_warmup=0.5", "log.wandb=off",
                 "--resume", "auto")  # fmt: skip
    assert "resumed from" in r.stdout
    a = load_checkpoint(latest_checkpoint(ref / "checkpoints"))["model"]
    b = load_checkpoint(latest_checkpoint(run / "checkpoints"))["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for key in ("loss", "elbo", "kl", "kl_weight", "sigma_x"):  # metrics.jsonl reads as one run
        assert [x[key] for x in rows(run)] == [x[key] for x in rows(ref)], key
    assert (run / "traversal.png").is_file()


@pytest.mark.slow
def test_contractive_penalty_runs_under_two_processes(tmp_path: Path, small_shards: str):
    run = tmp_path / "cae"
    pretrain("cae", run, small_shards, "data.batch_size=32", "train.max_steps=4", "log.wandb=off",
             nproc=2)  # fmt: skip
    saved = load_checkpoint(latest_checkpoint(run / "checkpoints"))
    assert saved["world_size"] == 2 and saved["step"] == 4
    assert all(np.isfinite(r["jacobian_frob2"]) and r["jacobian_frob2"] > 0 for r in rows(run))
