"""The method contract: everything the training loop and evaluation may call on a method.

A method is one file: a ``Method`` subclass with its heads and loss, registered with
``@register_method(name, ConfigClass)`` (``selfsup.pretrain.methods.registry``). The registry builds
the pieces every method shares, once, and hands them in: the method's own sub-config
(``method.<name>``), the backbone (``selfsup.pretrain.models``) and the view recipe
(``selfsup.augment.views.Views``). The loop and eval call only what is declared here; every
optional hook has a default, so a minimal method implements ``forward`` alone.

``forward(images)`` takes a uint8 batch ``[B, C, H, W]`` already on the training device and
returns ``(loss, logs)``: a scalar loss tensor and a dict of 0-d tensors to log. Logs stay tensors
(no ``.item()``): the loop moves them to the host only on logging steps, so a GPU step has no
host sync beyond the one the loop needs for its own checks.

A method that logs ``collapse_std`` (``COLLAPSE_LOG``: the per-dimension standard deviation of its
L2-normalised outputs times sqrt(dim), about 1 when healthy, 0 when every image maps to the same
output) gets the collapse warning of ``pretrain/loop/runlog.py`` (``log.collapse_threshold``).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from selfsup.augment.views import Views
from selfsup.data_info import DataInfo
from selfsup.pretrain.models.weights import InitReport

Logs = dict[str, Tensor]
COLLAPSE_LOG = "collapse_std"  # the log key the run log watches for representation collapse


@dataclass
class StepContext:
    """What a method that owns its backward (``owns_backward``) gets from the loop instead of the
    launcher: the wrapped (DDP) module's call, the backward that keeps loss scaling and
    accumulation intact, and a context that skips the gradient all-reduce for one backward."""

    forward: Callable[..., Any]
    backward: Callable[[Tensor], None]
    no_sync: Callable[[], AbstractContextManager[None]]


class Method(nn.Module):
    """Base class of every method; see the module docstring for the contract."""

    name: ClassVar[str] = ""  # set by @register_method
    reconstructs: ClassVar[bool] = False  # True: ``reconstruct`` is implemented (autoencoders)
    anomaly_score_unit: ClassVar[str] = "mean squared error per pixel, [0, 1] units"
    owns_backward: bool = False  # True: the loop calls ``train_step`` instead of ``forward``
    # which network ``backbone.*`` is, for the export's model card (one line)
    exported: ClassVar[str] = "the backbone the method trains (`backbone.*` of the checkpoint)"
    # what a run of it needs from another run (empty: nothing); `demo --compare` of every method leaves it out
    needs: ClassVar[str] = ""
    init_report: InitReport | None = None  # what model.init loaded into the backbone (set by build)

    def __init__(self, cfg: Any, backbone: nn.Module, views: Views, info: DataInfo) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = backbone
        self.views = views
        self.info = info

    def forward(self, images: Tensor) -> tuple[Tensor, Logs]:
        raise NotImplementedError(f"{type(self).__name__} must implement forward(images)")

    def make_views(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """Two augmented views of a uint8 batch, made without a graph (the two-view methods)."""
        with torch.no_grad():
            v1, v2 = self.views(images, n_views=2)
        return v1, v2

    # ------------------------------------------------------------------ optional hooks
    def train_step(self, images: Tensor, ctx: StepContext) -> tuple[Tensor, Logs]:
        """Forward and backward of one micro-batch, no optimiser step (when ``owns_backward``)."""
        raise NotImplementedError(f"{type(self).__name__} does not own its backward")

    def after_step(self, step: int, total_steps: int) -> None:
        """Called after every optimiser step with the number of steps done so far (1-based) and the
        run's total; e.g. a momentum target network's update. Must depend only on its arguments
        and the model state, so a resumed run repeats it exactly."""

    def no_weight_decay(self) -> set[str]:
        """Parameter names (full or last component) the optimiser leaves undecayed; parameters
        with at most one dimension are never decayed anyway."""
        return set()

    def param_groups_options(self) -> dict[str, dict[str, Any]]:
        """Per-parameter optimiser options: a parameter-name prefix (e.g. ``"predictor."``) ->
        options for the parameters under it (keys: ``pretrain/loop/optim.py`` ``GROUP_OPTIONS``).
        ``{"fixed_lr": True}``: the schedule leaves that group at its initial learning rate."""
        return {}

    @torch.no_grad()
    def reconstruct(
        self, images: Tensor, generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        """``{"input", "corrupted", "reconstruction"}`` as float images in [0, 1], shown in the
        reconstruction grid (only when ``reconstructs``)."""
        raise NotImplementedError(f"{type(self).__name__} does not reconstruct")

    @torch.no_grad()
    def anomaly_score(self, images: Tensor) -> Tensor:
        """Per-image anomaly score ``[B]`` (higher = more anomalous); default: mean squared
        reconstruction error in [0, 1] pixel units (only when ``reconstructs``)."""
        out = self.reconstruct(images)
        err = (out["reconstruction"].float() - out["input"].float()).pow(2)
        return err.flatten(1).mean(1)

    @torch.no_grad()
    def pictures(self, images: Tensor, generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Named picture grids ``[rows, cols, C, H, W]`` (float, [0, 1]) made from a few uint8
        ``images`` at the end of a run and saved as ``<name>.png`` (``pretrain/hooks/pictures.py``);
        e.g. a VAE's samples from the prior. Default: none."""
        return {}

    @torch.no_grad()
    def latent(self, images: Tensor) -> Tensor | None:
        """The method's own code ``[B, k]`` of uint8 ``images`` when it has one beyond the
        backbone's features (an autoencoder's bottleneck, a VAE's posterior mean); a 2- or 3-dim
        code is drawn as a scatter plot at the end of a run. Default: None."""
        return None

    def to_unit(self, x: Tensor) -> Tensor:
        """Normalised float images back to [0, 1] (for pictures)."""
        return self.views.to_unit(x)
