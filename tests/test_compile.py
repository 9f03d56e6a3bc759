"""train.compile=true: backbone and heads compiled in place (nn.Module.compile), so state-dict names,
checkpoints and resume are those of the eager model; the compiled forward computes the same."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
import torch
from test_train import _wait_for_checkpoint, final_model, pretrain

from selfsup.config import load_config
from selfsup.data_info import DataInfo
from selfsup.pretrain.build import build_method
from selfsup.pretrain.loop.setup import compile_parts

INFO = DataInfo(3, 16, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
TINY = ["model.width=0.25", "augment.size=16"]


def tiny_method():
    torch.manual_seed(0)
    return build_method(load_config(None, TINY), INFO)


@pytest.mark.slow  # inductor's first compile on 2 busy cores: ~10-30 s
def test_compiled_parts_keep_state_dict_and_compute_the_same():
    eager, compiled = tiny_method(), tiny_method()
    keys = list(eager.state_dict())
    names = compile_parts(compiled)
    assert "backbone" in names and "views" not in names  # views have no parameters: eager
    assert list(compiled.state_dict()) == keys  # no "_orig_mod." anywhere
    x = torch.rand(4, 3, 16, 16)
    eager.eval(), compiled.eval()
    with torch.no_grad():
        a, b = eager.backbone(x), compiled.backbone(x)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    # negative control: torch.compile's wrapper (not in place) renames every key
    wrapped = torch.compile(tiny_method().backbone)
    assert set(wrapped.state_dict()) != set(eager.backbone.state_dict())
    # a compiled model's state loads strictly into an eager one and back
    eager.load_state_dict(compiled.state_dict(), strict=True)
    compiled.load_state_dict(eager.state_dict(), strict=True)


def test_compile_key_is_a_typed_config_entry():
    assert load_config(None, ["train.compile=true"]).train.compile is True
    with pytest.raises(ValueError, match="train.compile"):
        load_config(None, ["train.compile=maybe"])


@pytest.mark.slow
def test_compiled_run_checkpoints_eager_names_and_resumes(tmp_path: Path, small_shards: str):
    # 40 steps: the kill must land mid-run (with 4, a fast machine finished before the first poll)
    steps = ["train.max_steps=40", "train.checkpoint_every=2", "data.batch_size=16",
             "train.compile=true", "log.wandb=off", *TINY]  # fmt: skip
    run = tmp_path / "run"
    proc = pretrain(run, small_shards, *steps, wait=False)
    at = _wait_for_checkpoint(run, proc, 2, timeout=400)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    r = pretrain(run, small_shards, *steps, resume=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "resumed from" in r.stdout and at < 40
    state = final_model(run)
    cfg = load_config(None, TINY)
    assert list(state) == list(build_method(cfg, INFO).state_dict())
