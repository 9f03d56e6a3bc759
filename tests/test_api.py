"""The Python API runs the CLI's code paths in-process: pretrain -> evaluate -> export -> load."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import selfsup
from selfsup.api import make_config, settings_to_overrides
from selfsup.config import ConfigError, load_config

SMALL = dict(model__backbone="resnet_small", model__stem="cifar_s2", model__width=0.25,
             method__simclr__proj_hidden=32, method__simclr__proj_out=16, data__batch_size=32,
             data__workers=0, train__max_steps=4, log__wandb="off", log__progress=False,
             train__precision="fp32")  # fmt: skip


def test_keyword_settings_are_the_cli_overrides() -> None:
    assert settings_to_overrides({"train__max_steps": 3, "augment__scale": (0.3, 1.0),
                                  "log__wandb": "off", "log__progress": False}) == [
        "train.max_steps=3", "augment.scale=[0.3, 1.0]", "log.wandb='off'", "log.progress=false"]
    a = make_config(None, ["data.batch_size=64"], train__max_steps=3, augment__scale=(0.3, 1.0))
    b = load_config(None, ["data.batch_size=64", "train.max_steps=3", "augment.scale=[0.3, 1.0]"])
    assert a == b and make_config(a, log__wandb="off").log.wandb == "off"
    with pytest.raises(ConfigError, match="unknown config key 'train.bogus'"):
        make_config(None, train__bogus=1)


@pytest.mark.slow  # a real (tiny) pretraining, eval and export in this process: ~30 s
def test_pretrain_evaluate_export_round_trip(tmp_path: Path, small_shards: str) -> None:
    run = selfsup.pretrain(None, data__train=small_shards, data__test=small_shards,
                           run_dir=str(tmp_path / "run"), **SMALL)  # fmt: skip
    assert run == tmp_path / "run" and (run / "checkpoints" / "latest").is_file()
    report = selfsup.evaluate(run, protocols=("knn",), knn_k=(5,), baselines=("raw_pixels",))
    assert (run / "eval" / "report.json").is_file()
    assert set(report["models"]) == {"pretrained", "raw_pixels"}
    folder = selfsup.export(run)
    assert folder == run / "export" and (folder / "backbone.safetensors").is_file()
    model = selfsup.load_backbone(folder)
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 28, 28)).shape == (2, model.feature_dim)


@pytest.mark.slow  # a real tiny pretraining with W&B offline, then its eval: ~40 s
def test_eval_goes_into_the_pretraining_wandb_run(tmp_path: Path, small_shards: str, monkeypatch) -> None:
    """W&B holds the whole run: the eval reopens the pretraining's run (same id) and writes the
    summary metrics, the report table and the pictures; read back from the offline files."""
    from wandb_records import complete, records

    from selfsup.pretrain.run.rundir import latest_checkpoint, load_checkpoint

    monkeypatch.setenv("WANDB_MODE", "offline")
    settings = {**SMALL, "log__wandb": "offline"}
    run = selfsup.pretrain(None, data__train=small_shards, run_dir=str(tmp_path / "run"), **settings)
    wandb_id = load_checkpoint(latest_checkpoint(run / "checkpoints"))["wandb_id"]
    report = selfsup.evaluate(run, train_shards=small_shards, test_shards=small_shards,
                              protocols=("knn", "plot"), knn_k=(5,), baselines=("raw_pixels",))
    assert report["meta"]["wandb_run"] == wandb_id
    files = sorted((run / "wandb").glob(f"offline-run-*-{wandb_id}/run-{wandb_id}.wandb"))
    assert len(files) == 2  # pretraining, then the eval in the same run
    recs = records(complete(files[-1]))
    kinds = [r.WhichOneof("record_type") for r in recs]
    assert recs[kinds.index("run")].run.run_id == wandb_id
    summary = {i.key or i.nested_key[0] for r in recs if r.WhichOneof("record_type") == "summary"
               for i in r.summary.update}  # fmt: skip
    assert {"eval/pretrained/knn_top1_k5", "eval/raw_pixels/knn_top1_k5"} <= summary
    logged = {i.key or i.nested_key[0] for r in recs if r.WhichOneof("record_type") == "history"
              for i in r.history.item}  # media are nested: ("eval/report", "_type"), ...
    assert {"eval/report", "eval/embedding_pca"} <= logged
