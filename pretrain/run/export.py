"""Export a run's backbone as a self-describing folder, and load a backbone back in one call.

An export folder is what a user downloads and keeps:

- ``backbone.safetensors``: the backbone's weights with torchvision (ResNet) / timm (ViT) parameter
  names, so it loads into ``torchvision.models.resnet18()`` or the matching timm ViT with
  ``strict=False`` (only the classifier head is missing). safetensors, not pickle: loading it runs
  no code.
- ``config.json``: everything needed to rebuild the module and feed it: architecture (the
  ``ModelConfig`` fields), input size, channels, normalisation mean/std, the method that trained it.
- ``README.md``: a model card (method, data, steps, evaluation figures when the run has them).
- ``backbone.onnx`` (optional): the same network for ONNX runtimes, checked against PyTorch.

``load_backbone`` reads either such a folder or a run directory (its latest checkpoint), so
evaluation and users need one call whatever they hold.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from selfsup._version import __version__
from selfsup.config import Config, ConfigError, ModelConfig, from_dict
from selfsup.data_info import DataInfo
from selfsup.pretrain.methods import METHODS, Method
from selfsup.pretrain.models.weights import arch_dict
from selfsup.pretrain.run import rundir
from selfsup.pretrain.run.interop import loading_snippet, param_naming, timm_spec
from selfsup.tables import markdown_table

FORMAT = "selfsup-backbone"
FORMAT_VERSION = 2  # 2: our architecture under "model"; "architecture" is timm's model name
READABLE_VERSIONS = (1, 2)
WEIGHTS_FILE = rundir.EXPORT_WEIGHTS
CONFIG_FILE = rundir.EXPORT_CONFIG
CARD_FILE = "README.md"
ONNX_FILE = "backbone.onnx"
BACKBONE_PREFIX = "backbone."
# Prefixes a wrapped module puts before its parameter names (DDP / Accelerate, torch.compile).
WRAPPER_PREFIXES = ("module.", "_orig_mod.")
ONNX_TOLERANCE = 1e-4  # max |onnx - torch| on unit-scale features; fp32 kernels differ ~1e-6


class ExportError(rundir.RunDirError):
    """A run or export folder cannot be read or written; the message names the file and why."""


@dataclass
class RunCheckpoint:
    """The pieces of a run that describe its backbone at one checkpoint."""

    run_dir: Path
    checkpoint: Path
    cfg: Config
    info: DataInfo
    backbone_state: dict[str, torch.Tensor]
    step: int
    init: dict[str, Any] | None = None  # model.init's source (path, sha256) when the run started from weights


def backbone_state_dict(
    model_state: dict[str, Any], source: str, prefix: str = BACKBONE_PREFIX
) -> dict[str, torch.Tensor]:
    """The backbone's entries of a method's state dict, with the ``backbone.`` prefix (or another
    network's, e.g. BYOL's ``target_backbone.``) removed."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model_state.items():
        name = key
        stripped = True
        while stripped:
            stripped = False
            for wrapper in WRAPPER_PREFIXES:
                if name.startswith(wrapper):
                    name, stripped = name[len(wrapper) :], True
        if name.startswith(prefix) and isinstance(value, torch.Tensor):
            out[name[len(prefix) :]] = value
    if not out:
        raise ExportError(f"{source}: the model state has no '{prefix}*' entries")
    return out


def read_run(path: str | Path, network: str = "backbone") -> RunCheckpoint:
    """Config, data info and backbone weights of a run (its latest checkpoint, or a given ``.pt``);
    ``network``: the state-dict prefix of the backbone to take (``target_backbone`` for BYOL's)."""
    try:
        where = rundir.resolve(path)
        if where.kind == "export":
            raise ExportError(f"{path}: an export folder, not a run directory or checkpoint")
        cfg = rundir.read_config(where.run_dir)
        info = rundir.read_data_info(where.run_dir)
        ckpt = rundir.load_checkpoint(where.checkpoint)
    except ExportError:
        raise
    except rundir.RunDirError as e:
        raise ExportError(str(e)) from e
    state = backbone_state_dict(ckpt["model"], str(where.checkpoint), f"{network}.")
    return RunCheckpoint(where.run_dir, where.checkpoint, cfg, info, state, int(ckpt.get("step", 0)),
                         ckpt.get("init"))


def _data_info_from_dict(raw: Any, source: str) -> DataInfo:
    try:
        return rundir.data_info_from_dict(raw, source)
    except rundir.RunDirError as e:
        raise ExportError(str(e)) from e


def _describe(model_cfg: ModelConfig, info: DataInfo) -> str:
    arch = ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(model_cfg).items())
    return f"model ({arch}) with {info.channels} channels at {info.image_size} px"


def build_and_load(
    model_cfg: ModelConfig, info: DataInfo, state: dict[str, torch.Tensor], source: str
) -> nn.Module:
    """Build the backbone ``model_cfg`` describes and load ``state`` strictly, in eval mode.

    Mismatches are reported as names and shapes (not torch's long dump), so a wrong config or a
    file from another architecture is obvious.
    """
    from selfsup.pretrain.models.backbones import (
        build_backbone,  # heavy; only when a model is built
    )

    try:
        backbone = build_backbone(model_cfg, info.channels, info.image_size)
    except (ValueError, KeyError) as e:
        raise ExportError(f"{source}: cannot build {_describe(model_cfg, info)}: {e}") from e
    expected = backbone.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or shapes:
        parts = []
        for label, items in (("missing", missing), ("unexpected", unexpected), ("shape", shapes)):
            if items:
                more = f" (+{len(items) - 5} more)" if len(items) > 5 else ""
                parts.append(f"{label}: {'; '.join(items[:5])}{more}")
        raise ExportError(
            f"{source}: weights do not match {_describe(model_cfg, info)}: " + " | ".join(parts)
        )
    backbone.load_state_dict(state, strict=True)
    backbone.eval()
    backbone.data_info = info
    return backbone


def read_export_config(out_dir: Path) -> tuple[ModelConfig, DataInfo, dict[str, Any]]:
    path = out_dir / CONFIG_FILE
    try:
        meta = rundir.read_json(path, f"{out_dir}: no {CONFIG_FILE} (not an export folder?)")
    except rundir.RunDirError as e:
        raise ExportError(str(e)) from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ExportError(f"{path}: not a {FORMAT} config (missing \"format\": \"{FORMAT}\")")
    version = meta.get("format_version")
    if version not in READABLE_VERSIONS:
        raise ExportError(
            f"{path}: format_version {version} is not one of {READABLE_VERSIONS}"
        )
    key = "architecture" if version == 1 else "model"
    try:
        model_cfg = from_dict(ModelConfig, meta.get(key) or {}, key)
    except ConfigError as e:
        raise ExportError(f"{path}: {e}") from e
    info = _data_info_from_dict(
        {
            "channels": meta.get("channels"),
            "image_size": meta.get("image_size"),
            "mean": meta.get("mean"),
            "std": meta.get("std"),
        },
        str(path),
    )
    return model_cfg, info, meta


def load_backbone(path: str | Path) -> nn.Module:
    """A ready backbone (eval mode, ``.data_info`` set) from an export folder or a run directory.

    ``path`` may be an export folder (``backbone.safetensors`` + ``config.json``), a run directory
    (its ``checkpoints/latest``), or one ``.pt`` checkpoint inside a run's ``checkpoints/``.
    The backbone expects float input normalised with ``data_info.mean``/``std``
    (``selfsup.augment.views.normalize``) and returns pooled features ``[B, feature_dim]``.
    """
    path = Path(path)
    if path.is_dir() and (path / WEIGHTS_FILE).exists():
        model_cfg, info, _ = read_export_config(path)
        weights = path / WEIGHTS_FILE
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError) as e:
            raise ExportError(f"{weights}: cannot read safetensors file ({e})") from e
        return build_and_load(model_cfg, info, state, str(weights))
    if path.is_dir() and (path / CONFIG_FILE).exists() and not (path / "config.yaml").exists():
        raise ExportError(f"{path}: export folder without {WEIGHTS_FILE}")
    run = read_run(path)
    return build_and_load(run.cfg.model, run.info, run.backbone_state, str(run.checkpoint))


def export_onnx(backbone: nn.Module, info: DataInfo, path: Path, batch: int = 4) -> float:
    """Write ``backbone`` as ONNX (dynamic batch) and return max |onnxruntime - torch| on a batch.

    Raises ExportError when onnx/onnxruntime are missing or the outputs differ by more than
    ONNX_TOLERANCE, so a broken graph is never shipped silently.
    """
    try:
        import onnxruntime as ort
    except ImportError as e:
        raise ExportError(
            "ONNX export needs onnx and onnxruntime: pip install 'selfsup[onnx]'"
        ) from e
    gen = torch.Generator().manual_seed(0)
    size = info.image_size
    x = torch.randn(batch, info.channels, size, size, generator=gen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but needs no onnxscript
        torch.onnx.export(
            backbone,
            (x[:2],),
            str(path),
            input_names=["images"],
            output_names=["features"],
            dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
            dynamo=False,
        )
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
    with torch.no_grad():
        want = backbone(x).float()
    diff = float((got - want).abs().max())
    if not math.isfinite(diff) or diff > ONNX_TOLERANCE:
        raise ExportError(f"{path}: ONNX output differs from PyTorch by {diff:.3g}")
    return diff


def _eval_section(run_dir: Path) -> str:
    """The run's evaluation table (metrics x pretrained/baselines) from ``eval/report.json``."""
    report_path = run_dir / rundir.EVAL_DIR / "report.json"
    if not report_path.is_file():
        return "No evaluation report was found in the run directory (`selfsup eval` writes one).\n"
    try:
        models = json.loads(report_path.read_text()).get("models")
    except (OSError, json.JSONDecodeError, AttributeError) as e:
        return f"The evaluation report could not be read ({e}).\n"
    if not isinstance(models, dict) or not models:
        return "The evaluation report has no results table.\n"
    return f"From `eval/report.json` of the run:\n\n{markdown_table(models)}\n"


def _exported_network(method: str, network: str) -> str:
    """The method's one-line note on which of its networks ``backbone.*`` is."""
    if network != "backbone":
        return f"`{network}.*` of the checkpoint (chosen with `selfsup export --network {network}`)"
    entry = METHODS.get(method)
    return entry.cls.exported if entry is not None else Method.exported


def model_card(run: RunCheckpoint, meta: dict[str, Any]) -> str:
    """The README.md of an export: what it is, how it was trained, how well, how to load it."""
    cfg, info = run.cfg, run.info
    arch = ", ".join(f"{k}={v}" for k, v in meta["model"].items())
    return f"""# {cfg.model.backbone} pretrained with {cfg.method.name.upper()} (selfsup {__version__})

Backbone only (no projection head, no classifier): it maps an image to a
{meta["feature_dim"]}-dimensional feature vector.

## Architecture
- {arch}
- Parameter names: {meta["param_naming"]}
- Input: {info.channels} channel(s), {info.image_size}x{info.image_size} px, float, normalised per
  channel as `(x / 255 - mean) / std` with mean = {list(info.mean)}, std = {list(info.std)}

## Training
- Method: {cfg.method.name} ({json.dumps(dataclasses.asdict(getattr(cfg.method, cfg.method.name)))})
- Exported network: {_exported_network(cfg.method.name, meta.get("network", "backbone"))}
- Data: `{cfg.data.train or "(not recorded)"}`
- Steps: {run.step} optimiser steps (recipe: {cfg.train.epochs} epochs, max_steps {cfg.train.max_steps}),
  global batch {cfg.data.batch_size}, optimiser {cfg.optim.name} (base lr {cfg.optim.base_lr},
  weight decay {cfg.optim.weight_decay}), precision {cfg.train.precision}
- Checkpoint: `{run.checkpoint.name}` of run `{run.run_dir.name}`
- Initialised from: {f"`{run.init['path']}` ({run.init['kind']}, sha256 `{run.init['sha256']}`)" if run.init else "random weights"}

## Evaluation
{_eval_section(run.run_dir)}
## Loading
```python
import selfsup
model = selfsup.load_backbone("path/to/this/folder")   # eval mode, model.data_info has mean/std
```
or, without selfsup:
```python
{loading_snippet(cfg.model, info, WEIGHTS_FILE)}```

## Files
- `{WEIGHTS_FILE}`: weights (safetensors, no pickle)
- `{CONFIG_FILE}`: architecture, input size, channels, normalisation, method
{f"- `{ONNX_FILE}`: ONNX graph (dynamic batch), max |ONNX - PyTorch| = {meta['onnx_max_abs_diff']:.2g}" if "onnx_max_abs_diff" in meta else ""}
"""


def export_run(
    run_path: str | Path, out_dir: str | Path, onnx: bool = False, network: str = "backbone"
) -> dict[str, Path]:
    """Write the export folder for a run's latest checkpoint; returns the paths written.
    ``network`` picks another backbone of the checkpoint by prefix (``target_backbone``: BYOL's
    EMA target).

    The weights are rebuilt into a backbone first, so a checkpoint that does not match its config
    fails here, not on the user's machine.
    """
    run = read_run(run_path, network)
    out = Path(out_dir)
    backbone = build_and_load(run.cfg.model, run.info, run.backbone_state, str(run.checkpoint))
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in backbone.state_dict().items()}
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "selfsup_version": __version__,
        "model": arch_dict(run.cfg.model),
        "init": run.init,
        "param_naming": param_naming(run.cfg.model, run.info),
        "feature_dim": int(backbone.feature_dim),
        "channels": run.info.channels,
        "image_size": run.info.image_size,
        "mean": list(run.info.mean),
        "std": list(run.info.std),
        "method": run.cfg.method.name,
        "network": network,
        "step": run.step,
        "source_checkpoint": str(run.checkpoint),
        # timm's fields (architecture, model_args, pretrained_cfg): timm.create_model('local-dir:...')
        **(timm_spec(run.cfg.model, run.info) or {}),
    }
    paths = {"weights": out / WEIGHTS_FILE, "config": out / CONFIG_FILE, "card": out / CARD_FILE}
    save_file(state, str(paths["weights"]), metadata={"format": "pt", "selfsup": FORMAT})
    if onnx:
        paths["onnx"] = out / ONNX_FILE
        meta["onnx_max_abs_diff"] = export_onnx(backbone, run.info, paths["onnx"])
    paths["config"].write_text(json.dumps(meta, indent=2) + "\n")
    paths["card"].write_text(model_card(run, meta))
    return paths
