"""What every backbone declares: its feature size, and (once loaded from a run or an export) the
data it expects."""

from __future__ import annotations

from torch import nn

from selfsup.data_info import DataInfo


class Backbone(nn.Module):
    """Maps a normalised float batch ``[B, C, H, W]`` to pooled features ``[B, feature_dim]``;
    ``forward_features`` gives the last feature map (ResNet) or all tokens (ViT).

    ``data_info`` is None for a freshly built backbone; ``selfsup.load_backbone`` sets it to the
    channels, size and normalisation the weights were trained with.
    """

    feature_dim: int
    data_info: DataInfo | None = None
