"""The diffusion wrapper: loss, label dropout, generation against the reference release (the golden
Heun and Euler samples; the samplers' own tests are tests/test_sampling.py), EMA."""

import numpy as np
import pytest
import torch

from denoiser import Denoiser
from model_jit import JiT, JiT_models
from sampling import SamplerSettings, sample
from util.ema import EMA


def golden_denoiser(golden):
    net = JiT(**golden["config"])
    net.load_state_dict(golden["state_dict"])
    return Denoiser(net, num_classes=golden["config"]["num_classes"], noise_scale=1.0, t_eps=0.05).eval()


def test_loss_matches_reference_release(golden):
    d = golden_denoiser(golden)
    with torch.no_grad():
        loss = d(golden["x"], golden["loss_labels"], t=golden["t"], noise=golden["loss_noise"])
    torch.testing.assert_close(loss, golden["loss"], rtol=1e-6, atol=0)


@pytest.mark.parametrize("method", ["heun", "euler"])
def test_samples_match_reference_release(golden, method):
    d = golden_denoiser(golden)
    out = d.generate(
        golden["sample_labels"],
        SamplerSettings(method=method, steps=4, cfg=2.0, interval_min=0.1),
        noise=golden["sample_z0"],
    )
    torch.testing.assert_close(out, golden[f"sample_{method}"], rtol=0, atol=1e-4)


def naive_sample(net, z, labels, null, steps, method, cfg, lo, hi, t_eps):
    """SPEC's sampler written out literally: separate cond/uncond passes at every evaluation."""
    ts = torch.linspace(0, 1, steps + 1)

    def v(z, t):
        tb = t.expand(z.shape[0])
        vc = (net(z, tb, labels) - z) / (1 - t).clamp_min(t_eps)
        vu = (net(z, tb, torch.full_like(labels, null)) - z) / (1 - t).clamp_min(t_eps)
        s = cfg if (t < hi) and (lo == 0 or t > lo) else 1.0
        return vu + s * (vc - vu)

    for i in range(steps - 1):
        t, tn = ts[i], ts[i + 1]
        vt = v(z, t)
        if method == "heun":
            z = z + (tn - t) * (0.5 * (vt + v(z + (tn - t) * vt, tn)))
        else:
            z = z + (tn - t) * vt
    return z + (ts[-1] - ts[-2]) * v(z, ts[-2])


@pytest.mark.parametrize("interval", [(0.0, 1.0), (0.3, 0.7), (0.1, 1.0)])
def test_batched_and_skipping_sampler_equals_naive_sampler(golden, interval):
    d = golden_denoiser(golden)
    z0, labels = golden["sample_z0"], golden["sample_labels"]
    with torch.no_grad():
        fast = sample(
            d.net,
            z0,
            labels,
            SamplerSettings(steps=6, cfg=3.0, interval_min=interval[0], interval_max=interval[1]),
            null_label=3,
        )
        slow = naive_sample(d.net, z0, labels, 3, 6, "heun", 3.0, *interval, 0.05)
    torch.testing.assert_close(fast, slow, rtol=0, atol=2e-6)


def test_generate_uses_a_given_stand_in_net(golden):
    """A compiled module is passed as `net`; it must be used as is (not truth-tested)."""
    d = golden_denoiser(golden)

    class StandIn:
        def __bool__(self):
            raise TypeError("truth value of a module")

        def __call__(self, z, t, y):
            assert t.is_contiguous()  # no stride-0 expand: it would recompile a compiled net
            return torch.zeros_like(z)

    out = d.generate(
        golden["sample_labels"], SamplerSettings(method="euler", steps=1), noise=golden["sample_z0"], net=StandIn()
    )
    torch.testing.assert_close(out, torch.zeros_like(out))  # one Euler step from t = 0 with x̂ = 0


def test_loss_matches_hand_computation():
    net = lambda z, t, y: 0.5 * z + 0.1 * y.view(-1, 1, 1, 1)  # noqa: E731
    d = Denoiser(net, num_classes=10, t_eps=0.05, label_drop_prob=0.5).eval()  # eval: labels kept
    x = torch.rand(3, 3, 4, 4) * 2 - 1
    t = torch.tensor([0.2, 0.6, 0.99])  # the last one hits the t_eps clamp
    e = torch.randn(3, 3, 4, 4)
    y = torch.tensor([1, 2, 3])
    loss = d(x, y, t=t, noise=e)
    xn, tn, en, yn = x.double().numpy(), t.double().numpy()[:, None, None, None], e.double().numpy(), y.numpy()
    z = tn * xn + (1 - tn) * en
    denom = np.maximum(1 - tn, 0.05)
    v = (xn - z) / denom
    v_hat = (0.5 * z + 0.1 * yn[:, None, None, None] - z) / denom
    expected = ((v - v_hat) ** 2).reshape(3, -1).mean(axis=1).mean()
    assert loss.item() == pytest.approx(expected, rel=1e-5)


class CaptureNet:
    def __call__(self, z, t, y):
        self.z, self.t, self.y = z, t, y
        return z


def test_label_dropout_only_in_training():
    net = CaptureNet()
    d = Denoiser(net, num_classes=7, label_drop_prob=1.0)
    x, y = torch.zeros(64, 3, 2, 2), torch.arange(64) % 7
    d.train()(x, y)
    assert (net.y == 7).all()
    d.eval()(x, y)
    assert torch.equal(net.y, y)
    d = Denoiser(net, num_classes=7, label_drop_prob=0.1).train()
    d(torch.zeros(20000, 1, 1, 1), torch.zeros(20000, dtype=torch.long))
    assert abs((net.y == 7).float().mean().item() - 0.1) < 0.01


def test_training_time_and_noise_distribution():
    net = CaptureNet()
    d = Denoiser(net, num_classes=2, P_mean=-0.8, P_std=0.8, noise_scale=2.0).eval()
    x = torch.zeros(40000, 1, 1, 1)
    d(x, torch.zeros(40000, dtype=torch.long))
    t = net.t
    logit = torch.log(t / (1 - t))
    assert abs(logit.mean().item() + 0.8) < 0.02 and abs(logit.std().item() - 0.8) < 0.02
    noise = net.z.flatten() / (1 - t)  # x = 0, so z = (1 - t)·e
    assert abs(noise.std().item() - 2.0) < 0.03


def test_ema_update_arithmetic_and_independence():
    model = torch.nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = {k: v.clone() for k, v in ema.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    expected = 0.9 * start["weight"] + 0.1 * model.weight.detach()
    torch.testing.assert_close(ema.state_dict()["weight"], expected, rtol=0, atol=1e-7)
    torch.testing.assert_close(ema.state_dict()["bias"], start["bias"], rtol=0, atol=0)
    assert not any(p.requires_grad for p in ema.module.parameters())
    assert ema.module.weight.data_ptr() != model.weight.data_ptr()


def test_ema_state_dict_is_a_full_denoiser_state_dict():
    d = Denoiser(JiT_models["JiT-XS/4"](input_size=16, num_classes=3), num_classes=3)
    ema = EMA(d, 0.999)
    assert list(ema.state_dict()) == list(d.state_dict())
    assert all(k.startswith("net.") for k in ema.state_dict())


def test_a_few_optimiser_steps_reduce_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    d = Denoiser(JiT_models["JiT-XS/4"](input_size=16, num_classes=3), num_classes=3).eval()
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    y = torch.randint(0, 3, (8,))
    t, e = torch.rand(8) * 0.9, torch.randn(8, 3, 16, 16)
    opt = torch.optim.AdamW(d.parameters(), lr=1e-3, betas=(0.9, 0.95))
    first = d(x, y, t=t, noise=e)
    assert torch.isfinite(first)
    for _ in range(10):
        opt.zero_grad()
        d(x, y, t=t, noise=e).backward()
        opt.step()
    assert d(x, y, t=t, noise=e).item() < 0.8 * first.item()
