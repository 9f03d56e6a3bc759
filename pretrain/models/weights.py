"""Weights from a local file or folder into a backbone: ``model.init`` (start a run from them) and
the distillation teacher. Nothing is downloaded: every weight comes from a path the user names.

What ``model.init`` accepts (``read_source``):

- an export folder of this project (``backbone.safetensors`` + ``config.json``);
- a ``.safetensors`` file, or a state-dict ``.pt``/``.pth``/``.bin`` file read with
  ``torch.load(weights_only=True)`` (a pickle payload that needs code to load is refused), with
  torchvision (ResNet) or timm (ResNet, ViT) parameter names: the names this project's backbones
  already use, so no renaming table is needed. A checkpoint dict that nests the state dict under
  ``state_dict``/``model``/``module`` is opened, and wrapper prefixes (``module.``, ``_orig_mod.``,
  ``backbone.``) are stripped;
- ``timm:<name>:<file>``: the same file, with timm's model name checked against the recipe
  (``timm:resnet50:/w/resnet50.safetensors`` needs ``model.backbone=resnet50 model.stem=imagenet``).

Matching (``match_state``), against the recipe's freshly built backbone:

- classifier tensors (``fc.*``, ``head.*``, ``classifier.*``) are dropped and reported;
- the input conv (``conv1.weight``, ``patch_embed.proj.weight``) of another channel count follows
  timm's ``adapt_input_conv``: 1 channel = the sum over the 3 RGB filters; C != 3 = the RGB filters
  repeated to C and scaled by 3/C (so a C-channel copy of a grey or RGB image keeps its response);
- a ViT ``pos_embed`` of another grid is resampled bicubically (timm's ``resample_abs_pos_embed``);
- every other difference is a missing / unexpected key or a shape mismatch: an error naming the
  tensor, unless ``model.init_strict=false`` (then those tensors keep their random initialisation
  and the report lists them). BatchNorm's ``num_batches_tracked`` missing from old torchvision
  files is reported, never an error (it is a counter, not a weight).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

from selfsup.data_info import DataInfo
from selfsup.pretrain.models.backbones import ModelConfig

EXPORT_WEIGHTS, EXPORT_CONFIG, EXPORT_FORMAT = "backbone.safetensors", "config.json", "selfsup-backbone"
ARCH_FIELDS = ("backbone", "stem", "width", "patch_size")  # ModelConfig's architecture (not init)
CLASSIFIER = ("fc.", "head.", "classifier.")
PREFIXES = ("module.", "_orig_mod.", "backbone.")
NESTED = ("state_dict", "model", "module")
INPUT_CONVS = ("conv1.weight", "patch_embed.proj.weight")
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
TIMM_RESNET = re.compile(r"^(resnet(?:18|34|50))(?:\.\w+)?$")
TIMM_VIT = re.compile(r"^vit_(tiny|small|base)_patch(\d+)_(\d+)(?:\.\w+)?$")


class WeightsError(ValueError):
    """A weights file or folder cannot be used; the message names the key, the file and why."""


@dataclass
class Source:
    """A state dict read from ``path`` (``kind``: export, safetensors, torch), the sha256 of the
    weights file, and for an export folder the architecture and data it was trained with."""

    path: Path
    kind: str
    sha256: str
    state: dict[str, Tensor]
    arch: ModelConfig | None = None
    info: DataInfo | None = None


@dataclass
class InitReport:
    """What loading did, key by key; ``lines()`` is what the run prints."""

    source: str
    kind: str
    sha256: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    shape: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def lines(self) -> list[str]:
        def some(items: list[str]) -> str:
            return ", ".join(items[:6]) + (f" (+{len(items) - 6} more)" if len(items) > 6 else "")

        out = [f"model.init: {self.source} ({self.kind}, sha256 {self.sha256[:12]}): "
               f"{len(self.loaded)} tensors loaded"]  # fmt: skip
        for label, items in (("adapted", self.adapted), ("dropped (classifier)", self.dropped),
                             ("missing (kept at random init)", self.missing), ("unexpected (ignored)", self.unexpected),
                             ("shape mismatch (kept at random init)", self.shape)):  # fmt: skip
            if items:
                out.append(f"  {label}: {some(items)}")
        return out + [f"  note: {n}" for n in self.notes]


def file_sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def arch_dict(cfg: ModelConfig) -> dict[str, Any]:
    """The architecture fields of a ``ModelConfig`` (what an export's ``model`` records)."""
    return {k: getattr(cfg, k) for k in ARCH_FIELDS}


def arch_from_dict(raw: Any, source: str) -> ModelConfig:
    """A ``ModelConfig`` from an export's ``model`` entry, every field type-checked."""
    if not isinstance(raw, dict):
        raise WeightsError(f"{source}: 'model' is not a mapping")
    types = {f.name: f.type for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(raw) - set(types))
    if unknown:
        raise WeightsError(f"{source}: 'model' has unknown fields {unknown}")
    for k, v in raw.items():
        want = {"str": str, "int": int, "float": (int, float), "bool": bool}[types[k]]
        if not isinstance(v, want) or (isinstance(v, bool) and types[k] != "bool"):
            raise WeightsError(f"{source}: model.{k} = {v!r} is not a {types[k]}")
    cfg = ModelConfig(**raw)
    try:
        cfg.check()
    except ValueError as e:
        raise WeightsError(f"{source}: {e}") from e
    return cfg


def read_export(folder: Path, key: str) -> Source:
    """An export folder: its ``config.json`` (architecture, data) and its weights."""
    weights, meta_path = folder / EXPORT_WEIGHTS, folder / EXPORT_CONFIG
    if not weights.is_file():
        hint = (f"; {folder} is a run directory: export it first with selfsup export --run {folder} --out FOLDER"
                if (folder / "config.yaml").is_file() else "")  # fmt: skip
        raise WeightsError(f"{key}: {folder} holds no {EXPORT_WEIGHTS} (not an export folder{hint})")
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise WeightsError(f"{key}: cannot read {meta_path} ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT or meta.get("format_version") != 2:
        raise WeightsError(f"{key}: {meta_path} is not a {EXPORT_FORMAT} config of format_version 2")
    arch = arch_from_dict({k: v for k, v in (meta.get("model") or {}).items() if k in ARCH_FIELDS},
                          f"{key}: {meta_path}")  # fmt: skip
    try:
        info = DataInfo(int(meta["channels"]), int(meta["image_size"]),
                        tuple(map(float, meta["mean"])), tuple(map(float, meta["std"])))  # fmt: skip
    except (KeyError, TypeError, ValueError) as e:
        raise WeightsError(f"{key}: {meta_path}: channels/image_size/mean/std unreadable ({e})") from e
    return Source(weights, "selfsup export", file_sha256(weights), _safetensors(weights, key), arch, info)


def _safetensors(path: Path, key: str) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise WeightsError(f"{key}: {path} is not a readable safetensors file ({e})") from e


def _torch_state(path: Path, key: str) -> dict[str, Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # an UnpicklingError for code payloads; others for damaged files
        raise WeightsError(
            f"{key}: {path} cannot be loaded with torch.load(weights_only=True) ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''}); a file that needs pickle to run code is refused: "
            "save a plain state dict (torch.save(model.state_dict(), f)) or a .safetensors file"
        ) from e
    for _ in range(3):  # {"state_dict": {...}}, {"model": {...}}: the state dict inside
        if isinstance(obj, dict) and not any(isinstance(v, Tensor) for v in obj.values()):
            inner = next((obj[n] for n in NESTED if isinstance(obj.get(n), dict)), None)
            if inner is None:
                break
            obj = inner
    if not isinstance(obj, dict) or not any(isinstance(v, Tensor) for v in obj.values()):
        raise WeightsError(f"{key}: {path} holds no state dict (a dict of tensors, or one under "
                           f"{'/'.join(NESTED)})")  # fmt: skip
    return {k: v for k, v in obj.items() if isinstance(v, Tensor)}


def check_timm_name(name: str, cfg: ModelConfig, key: str) -> None:
    """``timm:<name>`` must describe the recipe's architecture; the error names the key to change."""
    if m := TIMM_RESNET.match(name):
        if cfg.backbone != m[1]:
            raise WeightsError(f"{key}: timm model {name} is a {m[1]}, but model.backbone={cfg.backbone}")
        if cfg.stem != "imagenet" or cfg.width != 1.0:
            raise WeightsError(f"{key}: timm model {name} has the ImageNet stem at width 1: set "
                               f"model.stem=imagenet model.width=1.0 (now {cfg.stem}, {cfg.width})")  # fmt: skip
        return
    if m := TIMM_VIT.match(name):
        if cfg.backbone != f"vit_{m[1]}" or cfg.patch_size != int(m[2]):
            raise WeightsError(f"{key}: timm model {name} is vit_{m[1]} with patch {m[2]}, but the recipe has "
                               f"model.backbone={cfg.backbone} model.patch_size={cfg.patch_size}")  # fmt: skip
        return
    raise WeightsError(f"{key}: timm model '{name}' is not one this project builds (resnet18/34/50, "
                       "vit_{tiny,small,base}_patch<P>_<size>, with an optional .<tag>)")  # fmt: skip


def read_source(spec: str, cfg: ModelConfig | None = None, key: str = "model.init") -> Source:
    """The weights ``spec`` names (see the module docstring); errors name ``key`` and the file."""
    timm_name = None
    if spec.startswith("timm:"):
        parts = spec.split(":", 2)
        if len(parts) < 3 or not parts[1] or not parts[2]:
            raise WeightsError(f"{key}: '{spec}': give timm's name AND a local file, timm:<name>:<path> "
                               "(no hub is reached at run time)")  # fmt: skip
        timm_name, spec = parts[1], parts[2]
        if cfg is not None:
            check_timm_name(timm_name, cfg, key)
    path = Path(spec).expanduser()
    if not path.exists():
        raise WeightsError(f"{key}: {path} does not exist")
    if path.is_dir():
        if timm_name:
            raise WeightsError(f"{key}: timm:{timm_name}:{path} must name a weights file, not a folder")
        return read_export(path, key)
    if path.suffix == ".safetensors":
        state, kind = _safetensors(path, key), "safetensors"
    elif path.suffix in TORCH_SUFFIXES:
        state, kind = _torch_state(path, key), "torch state dict"
    else:
        raise WeightsError(f"{key}: {path}: not a weights file this project reads (an export folder, "
                           f".safetensors, or a state dict {'/'.join(TORCH_SUFFIXES)})")  # fmt: skip
    state = _strip_prefixes(state)
    return Source(path, f"timm {timm_name}, {kind}" if timm_name else kind, file_sha256(path), state)


def _strip_prefixes(state: dict[str, Tensor]) -> dict[str, Tensor]:
    for prefix in PREFIXES:  # only when every key has it (a backbone.* entry beside a head.* one stays)
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def adapt_input_conv(in_chans: int, weight: Tensor) -> Tensor:
    """timm's rule for a first conv trained on RGB used with ``in_chans`` channels: 1 channel sums
    the three filters; C channels repeat them to C and scale by 3/C."""
    out_c, rgb = weight.shape[:2]
    w = weight.float()
    if in_chans == 1:
        w = w.reshape(out_c, rgb // 3, 3, *w.shape[2:]).sum(2) if rgb > 3 else w.sum(1, keepdim=True)
    elif rgb != 3:
        raise WeightsError(f"adapt_input_conv: the file's first conv has {rgb} input channels; only 3 "
                           f"(RGB) adapts to {in_chans}")  # fmt: skip
    else:
        w = w.repeat(1, math.ceil(in_chans / 3), 1, 1)[:, :in_chans] * (3 / in_chans)
    return w.to(weight.dtype)


def resample_pos_embed(pos: Tensor, tokens: int, prefix: int = 1) -> Tensor:
    """``[1, prefix + g*g, D]`` -> ``[1, tokens, D]``: the patch grid resampled bicubically (with
    antialiasing, as timm's ``resample_abs_pos_embed``), the class token's entry kept."""
    old, new = math.isqrt(pos.shape[1] - prefix), math.isqrt(tokens - prefix)
    grid = pos[:, prefix:].float().reshape(1, old, old, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", antialias=True, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new * new, -1)
    return torch.cat([pos[:, :prefix].float(), grid], 1).to(pos.dtype)


def match_state(state: dict[str, Tensor], model: nn.Module, report: InitReport) -> dict[str, Tensor]:
    """The entries of ``state`` that go into ``model`` (adapted where a rule applies); fills ``report``."""
    want = model.state_dict()
    out: dict[str, Tensor] = {}
    for k, v in state.items():
        if k not in want:
            (report.dropped if k.startswith(CLASSIFIER) else report.unexpected).append(k)
            continue
        target = want[k].shape
        if v.shape != target and k in INPUT_CONVS and v.shape[0] == target[0] and v.shape[2:] == target[2:]:
            v = adapt_input_conv(target[1], v)
            report.adapted.append(f"{k}: {state[k].shape[1]} -> {target[1]} input "
                                  "channels (timm's adapt_input_conv)")  # fmt: skip
        elif v.shape != target and k == "pos_embed" and v.ndim == 3 and v.shape[2] == target[2]:
            v = resample_pos_embed(v, target[1])
            report.adapted.append(f"pos_embed: {tuple(state[k].shape)} -> {tuple(target)} (bicubic resample "
                                  "of the patch grid, timm's resample_abs_pos_embed)")  # fmt: skip
        if v.shape != target:
            report.shape.append(f"{k}: file {tuple(v.shape)} vs model {tuple(target)}")
            continue
        out[k] = v.to(want[k].dtype)
        report.loaded.append(k)
    report.missing = [k for k in want if k not in state]
    report.dropped.sort()
    report.unexpected.sort()
    return out


def load_into(backbone: nn.Module, cfg: ModelConfig, key: str = "model.init") -> InitReport:
    """Load ``cfg.init`` into ``backbone`` (in place) and say what happened; with
    ``cfg.init_strict`` any missing, unexpected or mis-shaped backbone tensor is an error naming it."""
    src = read_source(cfg.init, cfg, key)
    report = InitReport(str(src.path), src.kind, src.sha256)
    if src.arch is not None and arch_dict(src.arch) != arch_dict(cfg):
        report.notes.append(f"the export was trained as {arch_dict(src.arch)}; this run builds {arch_dict(cfg)}")
    if src.info is not None:
        report.notes.append(f"the export's input: {src.info.channels} channel(s) at {src.info.image_size} px, "
                            f"mean {list(src.info.mean)}, std {list(src.info.std)}")  # fmt: skip
    matched = match_state(src.state, backbone, report)
    counters = [k for k in report.missing if k.endswith("num_batches_tracked")]
    bad = [*(k for k in report.missing if k not in counters), *report.unexpected, *report.shape]
    if bad and cfg.init_strict:
        raise WeightsError(f"{key}: {src.path} does not fit model.backbone={cfg.backbone}: "
                           + "; ".join(bad[:6]) + (f" (+{len(bad) - 6} more)" if len(bad) > 6 else "")
                           + ". Set model.init_strict=false to load what fits and keep the rest at random init")  # fmt: skip
    backbone.load_state_dict(matched, strict=False)
    return report
