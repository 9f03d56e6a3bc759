"""The autoencoder family on the method contract: every member builds, uses all its parameters,
reconstructs and reports its code; bad configs are errors naming the key; the sparse penalty lowers
activity; the beta-VAE's KL warm-up lives in the state dict; the VAE's logs are one ELBO."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from selfsup.config import ConfigError, load_config
from selfsup.data_info import DataInfo
from selfsup.pretrain.build import build_method

GRAY16 = DataInfo(channels=1, image_size=16, mean=(0.3,), std=(0.3,))
RGB12 = DataInfo(channels=3, image_size=12, mean=(0.5, 0.4, 0.3), std=(0.25, 0.2, 0.3))
FAMILY = ("ae", "sparse_ae", "cae", "vae", "beta_vae")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def cfg_for(name: str, *overrides: str):
    base = [f"method.name={name}", "model.backbone=resnet_small", "model.stem=cifar_s2",
            "model.width=0.25", "augment.recipe=none"]  # fmt: skip
    return load_config(None, [*base, *overrides])


def build(name: str, *overrides: str, info: DataInfo = GRAY16):
    return build_method(cfg_for(name, *overrides), info)


def images(info: DataInfo, n: int = 6, seed: int = 0) -> torch.Tensor:
    """Smooth random blobs (an autoencoder can learn them quickly), uint8."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, info.channels, 4, 4, generator=g)
    up = torch.nn.functional.interpolate(low, size=info.image_size, mode="bilinear")
    return (up * 255).round().to(torch.uint8)


@pytest.mark.parametrize("name", FAMILY)
@pytest.mark.parametrize("linear", [False, True], ids=["backbone", "linear"])
def test_every_member_trains_reconstructs_and_reports_its_code(name, linear):
    info = RGB12 if name in ("ae", "vae") else GRAY16
    method = build(name, f"method.{name}.linear={str(linear).lower()}", f"method.{name}.latent_dim=3",
                   info=info)  # fmt: skip
    x = images(info)
    loss, logs = method(x)
    assert loss.ndim == 0 and torch.isfinite(loss) and all(v.ndim == 0 for v in logs.values())
    loss.backward()
    trainable = {n for n, p in method.named_parameters() if p.requires_grad}
    assert {n for n in trainable if method.get_parameter(n).grad is None} == set()  # DDP needs all
    assert any(n.startswith("backbone.") for n in trainable) != linear  # linear: backbone frozen
    method.eval()
    out = method.reconstruct(x)
    for key in ("input", "corrupted", "reconstruction"):
        assert out[key].shape == x.shape and out[key].min() >= 0 and out[key].max() <= 1
    torch.testing.assert_close(out["input"], x.float() / 255, atol=1e-6, rtol=0)
    assert method.latent(x).shape == (6, 3)
    assert method.anomaly_score(x).shape == (6,)
    pics = method.pictures(x, torch.Generator().manual_seed(0))
    want = {"vae": {"samples", "interpolation"}, "beta_vae": {"samples", "interpolation", "traversal"}}
    assert set(pics) == want.get(name, set())
    for grid in pics.values():
        assert grid.dim() == 5 and grid.shape[2:] == x.shape[1:] and grid.min() >= 0 and grid.max() <= 1
    if "interpolation" in pics:  # first and last columns are the two images of each pair
        torch.testing.assert_close(pics["interpolation"][:, 0], out["input"][0::2], atol=1e-6, rtol=0)


@pytest.mark.parametrize(("overrides", "key"), [
    (["method.name=ae", "method.ae.latent_dim=0"], "method.ae.latent_dim"),
    (["method.name=vae", "method.vae.latent_dim=0"], "method.vae.latent_dim"),
    (["method.name=sparse_ae", "method.sparse_ae.lam=-0.1"], "method.sparse_ae.lam"),
    (["method.name=sparse_ae", "method.sparse_ae.kl_weight=1"], "method.sparse_ae.code_activation"),
    (["method.name=sparse_ae", "method.sparse_ae.rho=1.5"], "method.sparse_ae.rho"),
    (["method.name=cae", "method.cae.lam=-1"], "method.cae.lam"),
    (["method.name=cae", "method.cae.jacobian=exact"], "method.cae.linear"),
    (["method.name=cae", "method.cae.projections=0"], "method.cae.projections"),
    (["method.name=beta_vae", "method.beta_vae.beta=-1"], "method.beta_vae.beta"),
    (["method.name=beta_vae", "method.beta_vae.kl_warmup=2"], "method.beta_vae.kl_warmup"),
    (["method.name=vae", "method.vae.decoder=bernoulli", "method.vae.target=normalized"],
     "method.vae.target"),
    (["method.name=ae", "method.ae.loss=bce", "method.ae.target=normalized"], "method.ae.target"),
    (["method.name=ae", "method.ae.loss=l3"], "method.ae.loss"),
    (["method.name=vae", "method.vae.gaussian_std=-1"], "method.vae.gaussian_std"),
])  # fmt: skip
def test_bad_configs_are_errors_naming_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, overrides)


def test_bernoulli_and_bce_model_unit_pixels():
    vae = build("vae", "method.vae.decoder=bernoulli")
    ae = build("ae", "method.ae.loss=bce")
    assert vae.unit_target and ae.unit_target and vae.logits and ae.logits
    x = images(GRAY16)
    torch.testing.assert_close(ae.target(ae.views(x, n_views=1)[0]), x.float() / 255, atol=1e-6, rtol=0)
    assert not build("vae").unit_target  # a Gaussian decoder models the normalised image


def train_steps(method, x: torch.Tensor, steps: int, lr: float = 3e-3) -> list[dict[str, float]]:
    opt = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], lr=lr)
    logs = []
    for _ in range(steps):
        loss, log = method(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        logs.append({"loss": loss.item(), **{k: v.item() for k, v in log.items()}})
    return logs


def test_raising_the_l1_weight_lowers_activity():
    x = images(GRAY16, n=16)
    active = {}
    for lam in (0.0, 1.0):
        torch.manual_seed(0)
        method = build("sparse_ae", f"method.sparse_ae.lam={lam}", "method.sparse_ae.latent_dim=64")
        logs = train_steps(method, x, 25)
        active[lam] = np.mean([r["active_frac"] for r in logs[-5:]])
        assert np.mean([r["recon"] for r in logs[-3:]]) < logs[0]["recon"]
    assert active[1.0] < 0.5 * active[0.0], active


def test_kl_sparsity_target_matches_ngs_formula():
    from selfsup.pretrain.methods.sparse_ae import kl_sparsity

    rho_hat = torch.tensor([0.05, 0.2, 0.9])
    rho = 0.05
    want = sum(rho * np.log(rho / r) + (1 - rho) * np.log((1 - rho) / (1 - r)) for r in rho_hat.tolist())
    assert kl_sparsity(rho, rho_hat).item() == pytest.approx(want, rel=1e-5)
    assert kl_sparsity(rho, torch.full((4,), rho)).item() == pytest.approx(0.0, abs=1e-6)


def test_vae_logs_one_elbo_and_scores_its_negative():
    vae = build("vae")
    x = images(GRAY16)
    torch.manual_seed(1)
    _, logs = vae(x)
    torch.testing.assert_close(logs["elbo"], -(logs["recon_nll"] + logs["kl"]))
    pixels = 16 * 16
    assert logs["bits_per_dim"].item() == pytest.approx(-logs["elbo"].item() / (pixels * np.log(2)) + 8, rel=1e-5)
    vae.eval()
    vae.cfg.score_samples = 3
    torch.manual_seed(2)
    score = vae.anomaly_score(x)
    torch.manual_seed(2)
    plain = vae.plain_views(x, n_views=1)[0]
    mu, logvar = vae.posterior(plain)
    ll = sum(vae.log_likelihood(vae.decoder(mu + (0.5 * logvar).exp() * torch.randn_like(mu)),
                                vae.target(plain)) for _ in range(3)) / 3  # fmt: skip
    kl = 0.5 * (mu**2 + logvar.exp() - logvar - 1).sum(1)
    torch.testing.assert_close(score, kl - ll)  # the negative ELBO, 3 draws of z


def test_beta_vae_warm_up_lives_in_the_state_dict():
    cfg = ("method.beta_vae.beta=4", "method.beta_vae.kl_warmup=0.1")
    a = build("beta_vae", *cfg)
    assert a.kl_weight().item() == 0.0  # before the first step
    a.after_step(5, 100)  # warm-up spans 10 steps: half-way
    assert a.kl_weight().item() == pytest.approx(2.0)
    b = build("beta_vae", *cfg)
    b.load_state_dict(a.state_dict())  # what a resumed run does
    assert b.kl_weight().item() == pytest.approx(2.0)
    a.after_step(50, 100)
    assert a.kl_weight().item() == pytest.approx(4.0)
    assert build("beta_vae", "method.beta_vae.beta=1").kl_weight().item() == 1.0  # the VAE
    _, logs = a(images(GRAY16))
    assert logs["kl_weight"].item() == pytest.approx(4.0)


def test_beta_vae_traversal_varies_one_dimension_per_row():
    vae = build("beta_vae", "method.beta_vae.latent_dim=4").eval()
    seen = []
    vae.decode_pixels = lambda z: (seen.append(z.clone()), torch.zeros(z.shape[0], 1, 16, 16))[1]
    vae.pictures(images(GRAY16), torch.Generator().manual_seed(0))
    z = seen[-1].view(4, 9, 4)  # rows x values x latent dims
    mu = vae.posterior(vae.plain_views(images(GRAY16), n_views=1)[0])[0][0]
    for row in range(4):
        changed = (z[row] != mu).any(0)
        assert changed.sum() == 1  # exactly one dimension moves in each row
        d = int(changed.nonzero())
        torch.testing.assert_close(z[row, :, d], torch.linspace(-3, 3, 9))


def test_cli_rejects_a_bad_config_before_reading_data(tmp_path, capsys):
    from selfsup.launch.cli.main import main as cli

    missing = tmp_path / "no-such-shards"
    assert cli(["pretrain", f"data.train={missing}", "method.name=beta_vae", "method.beta_vae.beta=-1"]) == 2
    assert "method.beta_vae.beta must be >= 0" in capsys.readouterr().out
    assert not missing.exists()
