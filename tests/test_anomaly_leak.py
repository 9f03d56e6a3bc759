"""The MAE reconstruction anomaly score must not see the answer. With ``norm_pix_loss`` the
decoder predicts each hidden patch's *standardised* pixels; undoing that with the hidden patch's
own mean and variance (what the picture and the score used to do) reads the ground truth of the
very patch being scored. The test makes two images whose hidden patches differ only by an affine
change of their pixels (same standardised content, different statistics): nothing the model can
know distinguishes them, so an honest score and an honest picture must be identical for both."""

from __future__ import annotations

import torch

from selfsup.config import load_config
from selfsup.data_info import DataInfo
from selfsup.eval.anomaly import reconstruction_scores
from selfsup.pretrain.build import build_method
from selfsup.pretrain.methods.mae import MAE, patchify, unpatchify

GRAY28 = DataInfo(channels=1, image_size=28, mean=(0.29,), std=(0.35,))


def _mae(norm_pix: bool) -> MAE:
    cfg = load_config(None, ["method.name=mae", "model.backbone=vit_micro", "model.patch_size=7",
                             "augment.recipe=mae", f"method.mae.norm_pix_loss={str(norm_pix).lower()}"])  # fmt: skip
    torch.manual_seed(0)
    return build_method(cfg, GRAY28).eval()


def _twins(mae: MAE) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Two uint8 images equal on the visible patches of the seed-0 mask; hidden patches of the
    second are 2 * first + 20 (pixel for pixel). Returns (a, b, hidden mask [1, N])."""
    g = torch.Generator().manual_seed(1)
    a = torch.randint(50, 101, (1, 1, 28, 28), generator=g, dtype=torch.uint8)
    torch.manual_seed(0)  # reconstruction_scores seeds the global RNG with 0 before each call
    with torch.no_grad():
        _, masking = mae.predict(mae.plain_views(a, n_views=1)[0])
    hidden = unpatchify(masking.mask.unsqueeze(-1).expand(-1, -1, 49).float(), 7, 1).bool()
    b = torch.where(hidden, a * 2 + 20, a)
    return a, b, masking.mask


def test_score_and_picture_do_not_read_the_hidden_patches_statistics() -> None:
    mae = _mae(norm_pix=True)
    a, b, mask = _twins(mae)
    assert 0 < int(mask.sum()) < mask.shape[1]
    s_a = reconstruction_scores(mae, a, seed=0)
    s_b = reconstruction_scores(mae, b, seed=0)
    # the standardised targets are equal (up to the 1e-6 in the variance), so must the scores be
    torch.testing.assert_close(torch.from_numpy(s_b), torch.from_numpy(s_a), rtol=1e-3, atol=0)
    torch.manual_seed(0)
    r_a = mae.reconstruct(a)["reconstruction"]
    torch.manual_seed(0)
    r_b = mae.reconstruct(b)["reconstruction"]
    hidden = patchify(r_a, 7)[mask.bool()], patchify(r_b, 7)[mask.bool()]
    assert torch.equal(*hidden), "the picture's hidden patches depend on what they hide"
    assert "visible patches" in mae.reconstruction_caption  # the picture says how it was drawn


def test_score_is_the_masked_patch_error_in_the_training_target_space() -> None:
    """Without norm_pix the score is the plain masked-patch MSE; with it, the MSE against the
    standardised targets, i.e. exactly the per-image training loss (same mask)."""
    from selfsup.pretrain.methods.mae import masked_patch_loss

    for norm_pix in (False, True):
        mae = _mae(norm_pix)
        a, b, _ = _twins(mae)
        x = torch.cat([a, b])
        scores = reconstruction_scores(mae, x, batch_size=1, seed=0)
        torch.manual_seed(0)  # one seed, then one mask per call in order, as the scorer does
        for i in range(2):
            xi = mae.plain_views(x[i : i + 1], n_views=1)[0]
            with torch.no_grad():
                pred, masking = mae.predict(xi)
                want = masked_patch_loss(pred, xi, masking.mask, 7, norm_pix)
            assert abs(float(scores[i]) - float(want)) <= 1e-6 * max(1.0, float(want))


def test_reconstruction_picture_says_what_it_shows(tmp_path) -> None:
    from PIL import Image

    from selfsup.pretrain.hooks.recon import save_reconstruction_grid

    mae = _mae(norm_pix=True)
    path = save_reconstruction_grid(mae, torch.randint(0, 256, (4, 1, 28, 28), dtype=torch.uint8), tmp_path / "r.png")
    with Image.open(path) as im:
        assert "visible patches" in im.info["Description"]
        assert im.height > 3 * 96  # the caption strip below the three rows
