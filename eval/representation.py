"""Which representation the feature protocols see: the backbone's pooled features, or the method's
own code (``Method.latent``: an autoencoder's bottleneck, a VAE's posterior mean).

``--representation latent`` needs a run directory (an export holds the backbone only) whose
method overrides ``latent``; anything else is an ``EvalError`` naming the method, raised by
``check_representation`` before any shard is read or feature extracted. The random-init column
is then the same method built with the evaluation seed (its encoder's code at initialisation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from selfsup.eval.features import _FrozenEval
from selfsup.eval.inputs import EvalError
from selfsup.pretrain.methods import METHODS, Method, method_entry
from selfsup.pretrain.run import rundir
from selfsup.pretrain.run.rundir import Resolved

REPRESENTATIONS = ("backbone", "latent")


def has_latent(cls: type[Method]) -> bool:
    """True when the method class overrides the contract's ``latent`` hook (default: None)."""
    return cls.latent is not Method.latent


def methods_with_latent() -> list[str]:
    return sorted(n for n in METHODS if has_latent(method_entry(n).cls))


def check_representation(where: Resolved, representation: str) -> str | None:
    """The run's method name when ``representation`` is ``latent`` and it can be used, else an
    EvalError naming the method (or the export folder); None for ``backbone``."""
    if representation not in REPRESENTATIONS:
        raise EvalError(f"--representation: '{representation}' is not one of "
                        f"{', '.join(REPRESENTATIONS)}")
    if representation == "backbone":
        return None
    hooked = ", ".join(methods_with_latent())
    if where.run_dir is None:
        raise EvalError(f"--representation latent needs a run directory: {where.path} is an export "
                        f"folder, which holds the backbone only (methods with a latent: {hooked})")
    name = rundir.read_config(where.run_dir).method.name
    if not has_latent(method_entry(name).cls):
        raise EvalError(f"--representation latent: method '{name}' has no latent hook (its "
                        f"representation is the backbone's features; use --representation "
                        f"backbone). Methods with a latent: {hooked}")
    return name


def load_run_method(where: Resolved, seed: int | None = None) -> Method:
    """The run's full method: its trained weights, or (``seed`` given) freshly built with that seed."""
    from selfsup.pretrain.build import build_method

    cfg = rundir.read_config(where.run_dir)
    info = rundir.read_data_info(where.run_dir)
    if seed is None:
        method = build_method(cfg, info)
        method.load_state_dict(rundir.load_checkpoint(where.checkpoint)["model"])
        return method.eval()
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build_method(cfg, info).eval()
    finally:
        torch.random.set_rng_state(state)


def latent_features(method: Method, images_uint8: torch.Tensor, batch_size: int = 512,
                    device: str | None = None) -> torch.Tensor:
    """``method.latent`` of every image, float32 ``[N, k]`` on the CPU (eval mode, no grad; every
    module's train flag restored)."""
    dev = torch.device(device or "cpu")
    method.to(dev)
    chunks = []
    with _FrozenEval(method), torch.inference_mode():
        for i in range(0, images_uint8.shape[0], batch_size):
            z = method.latent(images_uint8[i : i + batch_size].to(dev))
            if z is None or z.ndim != 2:
                raise EvalError(f"method '{method.name}': latent() returned "
                                f"{None if z is None else tuple(z.shape)}, expected [B, k]")
            chunks.append(z.float().cpu())
    return torch.cat(chunks)


def latent_fn(method: Method, mean: Sequence[float], std: Sequence[float],
              device: str | None = None):
    """Normalised images -> ``method.latent`` (for the invariance measure): the images go back to
    uint8 (rounded; at most half a grey level from the transformed image) since the hook takes what
    the loader gives."""
    m = torch.tensor(list(mean)).view(1, -1, 1, 1)
    s = torch.tensor(list(std)).view(1, -1, 1, 1)

    def fn(x: torch.Tensor) -> torch.Tensor:
        u8 = ((x.cpu() * s + m).clamp(0, 1) * 255).round().to(torch.uint8)
        return latent_features(method, u8, device=device)

    return fn


def describe(representation: str, method_name: str | None, dim: int) -> str:
    """The report's one line on what was measured."""
    if representation == "latent":
        return f"latent: {method_name}'s own code (Method.latent), {dim} dims"
    return f"backbone: pooled backbone features, {dim} dims"


def latent_columns(where: Resolved, train_images: torch.Tensor, test_images: torch.Tensor,
                   random_init: bool, seed: int, batch_size: int, device: str | None,
                   mean: Sequence[float], std: Sequence[float]) -> tuple[dict, dict]:
    """``({"pretrained": (train, test), "random_init": ...}, {name: feature_fn})`` of the run's
    latent code: the trained method, and (``random_init``) the method built with ``seed``."""
    methods = {"pretrained": load_run_method(where)}
    if random_init:
        methods["random_init"] = load_run_method(where, seed)
    feats = {n: (latent_features(m, train_images, batch_size, device),
                 latent_features(m, test_images, batch_size, device)) for n, m in methods.items()}
    return feats, {n: latent_fn(m, mean, std, device) for n, m in methods.items()}
