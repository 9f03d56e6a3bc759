"""Masked autoencoder: ViT names/shapes, masking, patchify, masked-only loss, method wiring."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfsup.config import load_config
from selfsup.data_info import DataInfo
from selfsup.pretrain.build import build_method
from selfsup.pretrain.loop.optim import split_decay
from selfsup.pretrain.methods.mae import (
    gather_tokens,
    masked_patch_loss,
    num_visible,
    patch_targets,
    patchify,
    random_masking,
    unpatchify,
)
from selfsup.pretrain.models.vit import build_vit

GRAY28 = DataInfo(channels=1, image_size=28, mean=(0.29,), std=(0.35,))


def model_cfg(backbone: str, patch_size: int = 4):
    return load_config(None, [f"model.backbone={backbone}", f"model.patch_size={patch_size}"]).model


def mae_cfg(*overrides: str):
    base = [
        "method.name=mae",
        "model.backbone=vit_micro",
        "model.patch_size=7",
        "augment.recipe=mae",
    ]
    return load_config(None, base + list(overrides))


def expected_vit_shapes(dim: int, depth: int, chans: int, patch: int, tokens: int) -> dict:
    """timm VisionTransformer(num_classes=0) state-dict keys and shapes, written out by hand."""
    keys = {
        "cls_token": (1, 1, dim),
        "pos_embed": (1, tokens, dim),
        "patch_embed.proj.weight": (dim, chans, patch, patch),
        "patch_embed.proj.bias": (dim,),
        "norm.weight": (dim,),
        "norm.bias": (dim,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        keys.update(
            {
                b + "norm1.weight": (dim,),
                b + "norm1.bias": (dim,),
                b + "attn.qkv.weight": (3 * dim, dim),
                b + "attn.qkv.bias": (3 * dim,),
                b + "attn.proj.weight": (dim, dim),
                b + "attn.proj.bias": (dim,),
                b + "norm2.weight": (dim,),
                b + "norm2.bias": (dim,),
                b + "mlp.fc1.weight": (4 * dim, dim),
                b + "mlp.fc1.bias": (4 * dim,),
                b + "mlp.fc2.weight": (dim, 4 * dim),
                b + "mlp.fc2.bias": (dim,),
            }
        )
    return keys


@pytest.mark.parametrize(
    ("name", "dim", "depth", "heads", "chans", "size", "patch"),
    [
        ("vit_tiny", 192, 12, 3, 1, 28, 4),
        ("vit_small", 384, 12, 6, 3, 32, 8),
        ("vit_micro", 128, 4, 4, 3, 32, 4),
    ],
)
def test_vit_names_and_shapes_match_timm(name, dim, depth, heads, chans, size, patch):
    vit = build_vit(model_cfg(name, patch), chans, size)
    tokens = 1 + (size // patch) ** 2
    got = {k: tuple(v.shape) for k, v in vit.state_dict().items()}
    assert got == expected_vit_shapes(dim, depth, chans, patch, tokens)
    assert vit.feature_dim == dim
    assert all(b.attn.num_heads == heads for b in vit.blocks)
    x = torch.randn(2, chans, size, size)
    feats = vit.forward_features(x)
    assert feats.shape == (2, tokens, dim)
    torch.testing.assert_close(vit(x), feats[:, 0])


def test_vit_base_preset_width():
    vit = build_vit(model_cfg("vit_base", 16), 3, 32)
    assert vit.feature_dim == 768 and len(vit.blocks) == 12 and vit.blocks[0].attn.num_heads == 12


def test_pos_embed_is_fixed_2d_sincos():
    vit = build_vit(model_cfg("vit_micro", 4), 1, 28)
    pe = vit.pos_embed.detach().numpy()[0]
    assert not vit.pos_embed.requires_grad
    dim, grid = 128, 7
    quarter = dim // 4
    np.testing.assert_allclose(pe[0], 0.0)  # class token
    for r, c in [(0, 0), (2, 5), (6, 1)]:
        tok = pe[1 + r * grid + c]
        freqs = 1.0 / 10000 ** (np.arange(quarter) / quarter)
        # first half: column (width) coordinate, second half: row coordinate (MAE's layout)
        want = np.concatenate(
            [np.sin(c * freqs), np.cos(c * freqs), np.sin(r * freqs), np.cos(r * freqs)]
        )
        np.testing.assert_allclose(tok, want, atol=1e-6)


def test_vit_bad_patch_size_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by model.patch_size=5"):
        build_vit(model_cfg("vit_micro", 5), 1, 28)
    with pytest.raises(ValueError, match="unknown ViT 'vit_huge'"):
        build_vit(model_cfg("vit_huge", 4), 1, 28)
    vit = build_vit(model_cfg("vit_micro", 4), 1, 28)
    with pytest.raises(ValueError, match="28x28"):
        vit(torch.randn(1, 1, 32, 32))


def test_patchify_matches_slicing_and_round_trips():
    x = torch.randn(3, 3, 12, 12)
    p = 4
    patches = patchify(x, p)
    assert patches.shape == (3, 9, p * p * 3)
    for i in range(3):
        for j in range(3):
            want = x[:, :, i * p : (i + 1) * p, j * p : (j + 1) * p].permute(0, 2, 3, 1)
            assert torch.equal(patches[:, i * 3 + j], want.reshape(3, -1))
    assert torch.equal(unpatchify(patches, p, 3), x)
    with pytest.raises(ValueError, match="not divisible"):
        patchify(torch.randn(1, 1, 10, 10), 4)
    with pytest.raises(ValueError, match="cannot unpatchify"):
        unpatchify(torch.randn(1, 8, 16), 4, 1)


def test_masking_counts_differ_per_sample_and_unshuffle_restores():
    g = torch.Generator().manual_seed(0)
    b, n, ratio = 16, 49, 0.75
    m = random_masking(b, n, ratio, generator=g)
    keep = int(n * (1 - ratio))
    assert keep == 12
    assert m.mask.shape == (b, n) and m.ids_keep.shape == (b, keep)
    assert torch.equal(m.mask.sum(1), torch.full((b,), float(n - keep)))
    # the kept indices are exactly the unmasked positions, each sample its own set
    for i in range(b):
        assert set(m.ids_keep[i].tolist()) == set(torch.nonzero(m.mask[i] == 0).flatten().tolist())
    assert len({tuple(row.tolist()) for row in m.mask}) == b
    # shuffling tokens (visible first) then gathering with ids_restore gives the original order
    tokens = torch.randn(b, n, 5)
    ids_shuffle = torch.argsort(m.ids_restore, dim=1)
    shuffled = gather_tokens(tokens, ids_shuffle)
    assert torch.equal(shuffled[:, :keep], gather_tokens(tokens, m.ids_keep))
    assert torch.equal(gather_tokens(shuffled, m.ids_restore), tokens)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5])
def test_mask_ratio_outside_open_interval_is_an_error(ratio):
    with pytest.raises(ValueError, match="mask_ratio must be in"):
        num_visible(49, ratio)


def test_mask_ratio_leaving_nothing_visible_is_an_error():
    with pytest.raises(ValueError, match="leaves 0 visible"):
        num_visible(4, 0.9)


def test_loss_counts_only_masked_patches():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(4, 1, 8, 8, generator=g)
    m = random_masking(4, 4, 0.5, generator=g)
    pred = torch.randn(4, 4, 16, generator=g)
    loss = masked_patch_loss(pred, images, m.mask, 4, norm_pix=False)
    target = patchify(images, 4)
    errs = [
        ((pred[b, i] - target[b, i]) ** 2).mean()
        for b in range(4)
        for i in range(4)
        if m.mask[b, i] == 1
    ]
    torch.testing.assert_close(loss, torch.stack(errs).mean())
    visible = (1 - m.mask).bool()
    changed = pred.clone()
    changed[visible] += 100.0
    torch.testing.assert_close(masked_patch_loss(changed, images, m.mask, 4, False), loss)
    changed = pred.clone()
    changed[m.mask.bool()] += 1.0
    assert masked_patch_loss(changed, images, m.mask, 4, False) > loss + 0.5


def test_norm_pix_targets_are_standardised_per_patch():
    t = patch_targets(torch.rand(2, 3, 8, 8) * 5 + 2, 4, norm_pix=True)
    torch.testing.assert_close(t.mean(-1), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(t.var(-1), torch.ones(2, 4), atol=1e-3, rtol=0)


def test_mae_encoder_sees_only_visible_patches_and_all_params_learn():
    torch.manual_seed(0)
    mae = build_method(mae_cfg(), GRAY28)
    seen = []
    mae.backbone.blocks[0].register_forward_pre_hook(lambda _m, a: seen.append(a[0].shape[1]))
    decoder_seen = []
    mae.decoder.blocks[0].register_forward_pre_hook(
        lambda _m, a: decoder_seen.append(a[0].shape[1])
    )
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    loss, logs = mae(images)
    assert seen == [1 + 4]  # 16 patches of 7x7, 25% visible, plus the class token
    assert decoder_seen == [1 + 16]
    assert logs == {}
    loss.backward()
    # DDP without find_unused_parameters needs every trainable parameter in the graph
    missing = [n for n, p in mae.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []


def test_learned_tokens_get_no_weight_decay():
    mae = build_method(mae_cfg(), GRAY28)
    _, no_decay = split_decay(mae, mae.no_weight_decay())
    ids = {id(p) for p in no_decay}
    assert id(mae.backbone.cls_token) in ids and id(mae.decoder.mask_token) in ids
    assert id(mae.backbone.blocks[0].attn.qkv.weight) not in ids


def test_mae_reconstruct_pastes_prediction_into_hidden_patches_only():
    mae = build_method(mae_cfg(), GRAY28)
    images = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    out = mae.reconstruct(images, generator=torch.Generator().manual_seed(0))
    inp = out["input"]
    torch.testing.assert_close(inp, images.float() / 255, atol=1e-6, rtol=0)
    grey = out["corrupted"] == 0.5
    hidden_patches = patchify(grey.float(), 7).mean(-1)
    # whole patches are hidden, 12 of 16 per image
    assert set(hidden_patches.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(hidden_patches.sum(1), torch.tensor([12.0, 12.0]))
    visible = ~grey
    torch.testing.assert_close(out["reconstruction"][visible], inp[visible])
    for v in out.values():
        assert v.shape == (2, 1, 28, 28) and v.min() >= 0 and v.max() <= 1


def test_mae_rejects_bad_config_before_training():
    with pytest.raises(ValueError, match="mask_ratio"):
        build_method(mae_cfg("method.mae.mask_ratio=1.0"), GRAY28)
    with pytest.raises(ValueError, match="not divisible by model.patch_size=5"):
        build_method(mae_cfg("model.patch_size=5"), GRAY28)


def test_mae_short_optimisation_lowers_loss(one_thread):
    """A few AdamW steps on a fixed batch of structured images reduce the masked loss."""
    torch.manual_seed(0)
    cfg = mae_cfg("augment.recipe=none", "method.mae.decoder_dim=64", "method.mae.decoder_depth=1")
    mae = build_method(cfg, GRAY28)
    yy, xx = torch.meshgrid(torch.arange(28), torch.arange(28), indexing="ij")
    phase = torch.arange(8).view(-1, 1, 1)
    images = (127.5 + 127 * torch.sin((xx + yy + phase) / 4.0)).to(torch.uint8).unsqueeze(1)
    opt = torch.optim.AdamW(mae.parameters(), lr=2e-3)

    def eval_loss() -> float:
        with torch.no_grad():
            x = mae.plain_views(images, n_views=1)[0]
            return mae.loss(x, torch.Generator().manual_seed(123)).item()

    before = eval_loss()
    for _ in range(20):
        loss, _ = mae(images)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert eval_loss() < 0.5 * before
