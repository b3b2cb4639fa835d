"""The network: parity with the reference release, presets, state-dict names, attention, RoPE."""

import math

import pytest
import torch

from model_jit import Attention, JiT, JiT_models
from util.pos_embed import apply_rope, rope_2d_tables, sincos_2d_pos_embed


def build_golden(golden, **kw):
    net = JiT(**golden["config"], **kw)
    net.load_state_dict(golden["state_dict"], strict=True)
    return net.eval()


@pytest.mark.parametrize("attn_impl", ["sdpa", "reference"])
def test_output_matches_reference_release(golden, attn_impl):
    net = build_golden(golden, attn_impl=attn_impl)
    with torch.no_grad():
        out = net(golden["x"], golden["t"], golden["y"])
    torch.testing.assert_close(out, golden["out"], rtol=0, atol=1e-5)


def test_state_dict_names_and_shapes_are_the_reference(golden):
    ours = JiT(**golden["config"]).state_dict()
    ref = golden["state_dict"]
    assert list(ours) == list(ref)  # same names, same order (the optimizer state maps by order)
    assert all(ours[k].shape == ref[k].shape for k in ref)
    assert not any("rope" in k for k in ours)


def test_parameter_order_matches_reference_state_dict(golden):
    # AdamW state is stored by parameter position: our order must be the reference's.
    net = JiT(**golden["config"])
    assert [n for n, _ in net.named_parameters()] == list(golden["state_dict"])


@pytest.mark.parametrize(
    "name,millions", [("JiT-B/16", 131.3), ("JiT-L/16", 459.1), ("JiT-H/16", 952.8), ("JiT-G/16", 2007.6)]
)
def test_preset_parameter_counts_at_256(name, millions):
    with torch.device("meta"):
        net = JiT_models[name](input_size=256, num_classes=1000, attn_drop=0.0, proj_drop=0.0)
    assert round(sum(p.numel() for p in net.parameters()) / 1e6, 1) == millions


@pytest.mark.parametrize("size", ["B", "L", "H", "G"])
def test_p32_presets_differ_only_in_patch_layers(size):
    """/32 at 512 px has the same token grid as /16 at 256 px; only the patch embedding and the
    final projection grow with p² (3·p²·bottleneck and hidden·p²·3 + p²·3)."""
    with torch.device("meta"):
        n16 = JiT_models[f"JiT-{size}/16"](input_size=256)
        n32 = JiT_models[f"JiT-{size}/32"](input_size=512)
    hidden, bottleneck = n16.pos_embed.shape[-1], n16.x_embedder.proj1.out_channels
    extra = 3 * (32**2 - 16**2) * bottleneck + (hidden + 1) * 3 * (32**2 - 16**2)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(n32) - count(n16) == extra


def test_presets_accept_reference_keywords():
    net = JiT_models["JiT-XS/4"](input_size=16, in_channels=3, num_classes=10, attn_drop=0.1, proj_drop=0.2)
    drops = [b.mlp.ffn_dropout.p for b in net.blocks]
    assert drops == [0.0, 0.2, 0.2, 0.0]  # only depth//4 <= i < 3·depth//4
    assert [b.attn.attn_drop for b in net.blocks] == [0.0, 0.1, 0.1, 0.0]


def test_bad_configuration_is_a_clear_error():
    with pytest.raises(ValueError, match="not divisible by the patch size"):
        JiT_models["JiT-B/16"](input_size=250)


def test_rope_tables_are_buffers_that_follow_the_module(golden):
    net = JiT(**golden["config"])
    buffers = dict(net.named_buffers())
    assert set(buffers) == {"rope_cos", "rope_sin"}
    net = net.to(torch.float64)
    assert net.rope_cos.dtype == torch.float64
    assert "rope_cos" not in net.state_dict()


def reference_attention_by_hand(x, qkv_w, qkv_b, proj_w, proj_b, qn_w, kn_w, heads, cos, sin):
    """Attention written out in float64 for the test: qkv, per-head RMSNorm, RoPE, softmax, proj."""
    B, N, C = x.shape
    d = C // heads
    qkv = (x @ qkv_w.T + qkv_b).reshape(B, N, 3, heads, d).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    rms = lambda t, w: t / torch.sqrt((t**2).mean(-1, keepdim=True) + 1e-6) * w  # noqa: E731
    q, k = rms(q, qn_w), rms(k, kn_w)

    def rope(t):
        out = t.clone()
        out[..., 0::2] = t[..., 0::2] * cos[:, 0::2] - t[..., 1::2] * sin[:, 0::2]
        out[..., 1::2] = t[..., 1::2] * cos[:, 1::2] + t[..., 0::2] * sin[:, 1::2]
        return out

    q, k = rope(q), rope(k)
    attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
    y = (attn @ v).transpose(1, 2).reshape(B, N, C)
    return y @ proj_w.T + proj_b


@pytest.mark.parametrize("attn_impl", ["sdpa", "reference"])
def test_attention_matches_hand_computation(attn_impl):
    torch.manual_seed(1)
    dim, heads, grid, n_ctx = 32, 2, 4, 3
    attn = Attention(dim, heads, attn_impl=attn_impl).eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    cos, sin = rope_2d_tables(dim // heads, grid, num_prefix=n_ctx)
    x = torch.randn(2, n_ctx + grid * grid, dim)
    with torch.no_grad():
        out = attn(x, cos, sin)
    p = {k: v.double() for k, v in attn.state_dict().items()}
    ref = reference_attention_by_hand(
        x.double(),
        p["qkv.weight"],
        p["qkv.bias"],
        p["proj.weight"],
        p["proj.bias"],
        p["q_norm.weight"],
        p["k_norm.weight"],
        heads,
        cos.double(),
        sin.double(),
    )
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


def test_sdpa_and_reference_attention_agree_in_float32(golden):
    a, b = build_golden(golden, attn_impl="sdpa"), build_golden(golden, attn_impl="reference")
    x = torch.randn(3, 3, 16, 16)
    t, y = torch.rand(3), torch.tensor([0, 1, 3])
    with torch.no_grad():
        torch.testing.assert_close(a(x, t, y), b(x, t, y), rtol=0, atol=1e-5)


def test_rope_is_a_rotation_by_relative_position():
    head_dim, grid = 16, 5
    cos, sin = rope_2d_tables(head_dim, grid)
    q, k = torch.randn(head_dim, dtype=torch.float64), torch.randn(head_dim, dtype=torch.float64)
    rot = lambda v, i: apply_rope(v.expand(grid * grid, head_dim), cos.double(), sin.double())[i]  # noqa: E731
    # norm preserved
    torch.testing.assert_close(rot(q, 7).norm(), q.norm())
    # <R_a q, R_b k> depends only on (row_a - row_b, col_a - col_b): (0,0)-(1,2) vs (2,1)-(3,3)
    dot = lambda a, b: torch.dot(rot(q, a), rot(k, b))  # noqa: E731
    torch.testing.assert_close(dot(0 * grid + 0, 1 * grid + 2), dot(2 * grid + 1, 3 * grid + 3))
    assert not torch.allclose(dot(0, 1 * grid + 2), dot(0, 2 * grid + 1))


def test_in_context_tokens_get_identity_rotation():
    cos, sin = rope_2d_tables(8, 3, num_prefix=2)
    assert torch.equal(cos[:2], torch.ones(2, 8)) and torch.equal(sin[:2], torch.zeros(2, 8))
    torch.testing.assert_close(cos[2:], rope_2d_tables(8, 3)[0])


def test_sincos_pos_embed_layout():
    """MAE layout: first half of the channels encodes the column, second half the row."""
    dim, g = 8, 3
    emb = sincos_2d_pos_embed(dim, g)
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    r, c = 2, 1
    col = torch.cat([torch.sin(c * omega), torch.cos(c * omega)])
    row = torch.cat([torch.sin(r * omega), torch.cos(r * omega)])
    torch.testing.assert_close(emb[r * g + c].double(), torch.cat([col, row]), rtol=0, atol=1e-7)


def test_initialisation_zeroes_the_adaln_and_output_layers():
    net = JiT_models["JiT-XS/4"](input_size=16, num_classes=3)
    for layer in [b.adaLN_modulation[-1] for b in net.blocks] + [
        net.final_layer.linear,
        net.final_layer.adaLN_modulation[-1],
    ]:
        assert not layer.weight.any() and not layer.bias.any()
    out = net(torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 3]))
    assert not out.any()  # zero output projection: x̂ = 0 at init
    assert 0.015 < net.y_embedder.embedding_table.weight.std() < 0.025
    assert net.x_embedder.proj1.bias is None


def perturbed_denoiser(drop):
    from denoiser import Denoiser

    torch.manual_seed(0)
    d = Denoiser(JiT_models["JiT-XS/4"](input_size=16, num_classes=3, attn_drop=drop, proj_drop=drop), num_classes=3)
    with torch.no_grad():  # make every layer matter (adaLN and output layers start at zero)
        for p in d.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return d


@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_grad_checkpointing_gives_the_same_loss_and_gradients(drop):
    """Bit-identical on CPU float32, dropout included (checkpoint replays the saved RNG state)."""
    x, y = torch.rand(6, 3, 16, 16) * 2 - 1, torch.tensor([0, 1, 2, 0, 1, 3])
    runs = []
    for ckpt in (False, True):
        d = perturbed_denoiser(drop)
        d.net.grad_checkpoint = ckpt
        torch.manual_seed(5)  # label drop, t, noise and dropout masks
        loss = d(x, y)
        loss.backward()
        runs.append((loss.detach(), {n: p.grad for n, p in d.named_parameters() if p.requires_grad}))
    (l0, g0), (l1, g1) = runs
    assert torch.equal(l0, l1)
    assert list(g0) == list(g1) and all(torch.equal(g0[k], g1[k]) for k in g0)
    if drop:  # the masks did matter: another seed gives another loss
        d = perturbed_denoiser(drop)
        torch.manual_seed(6)
        assert not torch.equal(d(x, y), l0)


def test_grad_checkpointing_only_in_training_with_grad(monkeypatch):
    import model_jit

    calls = []
    monkeypatch.setattr(model_jit, "checkpoint", lambda fn, *a, **kw: calls.append(kw) or fn(*a))
    net = JiT_models["JiT-XS/4"](input_size=16, num_classes=3, grad_checkpoint=True)
    x, t, y = torch.randn(2, 3, 16, 16), torch.rand(2), torch.tensor([0, 1])
    with torch.no_grad():
        net(x, t, y)
    net.eval()(x, t, y)
    assert calls == []
    net.train()(x, t, y)
    assert calls == [{"use_reentrant": False}] * len(net.blocks)
    assert list(net.state_dict()) == list(JiT_models["JiT-XS/4"](input_size=16, num_classes=3).state_dict())
