"""Flow-matching diffusion around a JiT network: the training loss and image generation.

Conventions (Li & He, arXiv 2511.13720): time t in [0, 1] with t = 1 the clean image,
z_t = t·x + (1 - t)·e with e ~ N(0, noise_scale²), images x in [-1, 1], velocity v = x - e.
By default the network predicts x̂ and the loss is taken on velocities v̂ = (x̂ - z)/(1 - t) (the
paper's method); the paper's ablations (Table 2) predict e or v and take the loss on x or e instead
(see CONVERSIONS). The samplers (the reference's Heun and Euler with the CFG interval, the multistep
solvers, time schedules) are sampling.py; the weight averages util/ema.py.
"""

import torch
import torch.nn as nn


def velocity(x_pred, z, t, t_eps: float):
    """v̂ = (x̂ - z) / max(1 - t, t_eps). x_pred, z: (B, C, H, W); t broadcastable to them."""
    return (x_pred - z) / (1.0 - t).clamp_min(t_eps)


def identity(out, z, t, t_eps: float):
    """The network's output is already in the wanted space."""
    return out


def x_to_eps(x_pred, z, t, t_eps: float):
    """ê = (z - t·x̂) / max(1 - t, t_eps)."""
    return (z - t * x_pred) / (1.0 - t).clamp_min(t_eps)


def eps_to_x(eps_pred, z, t, t_eps: float):
    """x̂ = (z - (1 - t)·ê) / max(t, t_eps)."""
    return (z - (1.0 - t) * eps_pred) / t.clamp_min(t_eps)


def eps_to_v(eps_pred, z, t, t_eps: float):
    """v̂ = (z - ê) / max(t, t_eps)."""
    return (z - eps_pred) / t.clamp_min(t_eps)


def v_to_x(v_pred, z, t, t_eps: float):
    """x̂ = (1 - t)·v̂ + z."""
    return (1.0 - t) * v_pred + z


def v_to_eps(v_pred, z, t, t_eps: float):
    """ê = z - t·v̂."""
    return z - t * v_pred


# CONVERSIONS[pred][space](out, z, t, t_eps): the network output `out` of parameterisation `pred`
# ("x", "eps" or "v": what the network predicts) expressed in `space`, from z = t·x + (1 - t)·e and
# v = x - e. Every division by 1 - t or by t is by max(·, t_eps): the paper clips 1 - t; clipping t
# (e- and v-prediction only) is our choice. out, z: (B, ...); t broadcastable to them.
CONVERSIONS = {
    "x": {"x": identity, "eps": x_to_eps, "v": velocity},
    "eps": {"x": eps_to_x, "eps": identity, "v": eps_to_v},
    "v": {"x": v_to_x, "eps": v_to_eps, "v": identity},
}


# TRUTHS[pred](x, e): the exact value of what a `pred` network predicts, for data x and noise e.
TRUTHS = {"x": lambda x, e: x, "eps": lambda x, e: e, "v": lambda x, e: x - e}


class Denoiser(nn.Module):
    """Owns the network `net(z, t, y)` and the diffusion objective.

    The network predicts `pred` ("x": x̂, the paper's method; "eps": ê; "v": v̂) and the loss is the
    mean squared error in the space `loss` ("x", "eps" or "v"; the paper's: "v") between the
    network's output and the exact value of its target, both converted by CONVERSIONS[pred][loss].
    Where no clip is active this is the pred-space error weighted by the squared conversion factor,
    e.g. for x-prediction 1, t²/(1 - t)², 1/(1 - t)² for the x-, e- and v-loss (paper, footnote 4).

    forward(x, labels, t=None, noise=None) returns the scalar training loss; `t` (B,) and `noise`
    (like x, already scaled by noise_scale) may be given to make it deterministic. Labels are
    replaced by the null class `num_classes` with probability `label_drop_prob` in training mode.
    With per_sample=True it returns (loss, per-sample losses (B,), t (B,)), the loss being the mean of
    the very same per-sample values (what the training monitor bins by noise level).
    """

    def __init__(
        self,
        net,
        num_classes: int,
        P_mean=-0.8,
        P_std=0.8,
        noise_scale=1.0,
        t_eps=0.05,
        label_drop_prob=0.1,
        pred="x",
        loss="v",
    ):
        super().__init__()
        for name, value in (("pred", pred), ("loss", loss)):
            if value not in CONVERSIONS:
                raise ValueError(f"{name} must be one of {', '.join(CONVERSIONS)}, got {value!r}")
        self.net = net
        self.pred = pred
        self.loss = loss
        self.num_classes = num_classes
        self.P_mean = P_mean
        self.P_std = P_std
        self.noise_scale = noise_scale
        self.t_eps = t_eps
        self.label_drop_prob = label_drop_prob

    def sample_t(self, n: int, device):
        """Logit-normal training times: t = sigmoid(n), n ~ N(P_mean, P_std²). Returns (n,)."""
        return torch.sigmoid(torch.randn(n, device=device) * self.P_std + self.P_mean)

    def drop_labels(self, labels):
        drop = torch.rand(labels.shape[0], device=labels.device) < self.label_drop_prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, x, labels, t=None, noise=None, per_sample: bool = False):
        if self.training and self.label_drop_prob > 0:
            labels = self.drop_labels(labels)
        if t is None:
            t = self.sample_t(x.shape[0], x.device)
        if noise is None:
            noise = torch.randn_like(x) * self.noise_scale
        t = t.view(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
        z = t * x + (1 - t) * noise
        to_loss_space = CONVERSIONS[self.pred][self.loss]
        target = to_loss_space(
            TRUTHS[self.pred](x, noise), z, t, self.t_eps
        )  # x-pred, v-loss: (x - z)/max(1 - t, t_eps)
        out = to_loss_space(self.net(z, t.flatten(), labels), z, t, self.t_eps)
        losses = ((target - out) ** 2).mean(dim=tuple(range(1, x.ndim)))  # (B,)
        if per_sample:
            return losses.mean(), losses.detach(), t.detach().flatten()
        return losses.mean()

    @torch.no_grad()
    def generate(self, labels, settings, *, noise=None, net=None):
        """Sample images (B, C, H, W) in about [-1, 1] for `labels` (B,) with this denoiser's net and
        the sampling.SamplerSettings `settings`.

        noise: the initial z₀ (B, C, H, W), already scaled; default noise_scale·N(0, I) at the
        net's resolution. net: a stand-in for self.net with the same weights (a compiled one).
        """
        from sampling import sample  # here, not at the top: sampling.py imports this module's CONVERSIONS

        if noise is None:
            size = self.net.input_size
            shape = (labels.shape[0], self.net.in_channels, size, size)
            noise = torch.randn(shape, device=labels.device) * self.noise_scale
        return sample(
            self.net if net is None else net,
            noise,
            labels,
            settings,
            null_label=self.num_classes,
            t_eps=self.t_eps,
            pred=self.pred,
        )
