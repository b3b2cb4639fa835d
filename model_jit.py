"""JiT: a plain ViT on pixel patches that predicts the clean image (Li & He, arXiv 2511.13720).

Module and parameter names follow the reference release, so its state dicts load with strict=True.
"""

import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from util.pos_embed import apply_rope, rope_2d_tables, sincos_2d_pos_embed

ATTN_IMPLS = ("sdpa", "reference")

# The architecture knobs of the paper's ablations (Fig. 4, Table 4): keywords every preset accepts
# as overrides of its own values.
ARCH_KNOBS = ("bottleneck_dim", "in_context_len", "in_context_start")


def modulate(x, shift, scale):
    """adaLN modulation. x: (B, N, D); shift, scale: (B, D)."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, cast back to the input dtype, then scaled by a learnable weight."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class TimestepEmbedder(nn.Module):
    """t in (0, 1) -> (B, D): 256-d sinusoidal features [cos, sin] -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim: int, max_period: float = 10000.0):
        """(B,) -> (B, dim) float32 sinusoidal embedding, cos first (DiT / GLIDE)."""
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class label -> (B, D). Row `num_classes` is the "no class" embedding used for CFG."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels):
        return self.embedding_table(labels)


class PatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D): one p×p patch conv with bias, i.e. one Linear per patch (ViT's,
    DiT's `x_embedder.proj`). The paper's "no bottleneck" ablation (Fig. 4); not in the reference code."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size, bias=True)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class BottleneckPatchEmbed(nn.Module):
    """(B, C, H, W) -> (B, N, D): p×p patch conv to a low-rank bottleneck (no bias), then 1×1 conv."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, bottleneck_dim: int, embed_dim: int):
        super().__init__()
        self.num_patches = (img_size // patch_size) ** 2
        self.proj1 = nn.Conv2d(in_chans, bottleneck_dim, kernel_size=patch_size, stride=patch_size, bias=False)
        self.proj2 = nn.Conv2d(bottleneck_dim, embed_dim, kernel_size=1, stride=1, bias=True)

    def forward(self, x):
        return self.proj2(self.proj1(x)).flatten(2).transpose(1, 2)


def reference_attention(q, k, v, dropout_p: float = 0.0):
    """The reference's attention: logits and softmax in float32 (autocast off), N×N materialised.

    q, k, v: (B, H, N, head_dim) -> (B, H, N, head_dim). Kept for exactness studies and tests.
    """
    with torch.autocast(device_type=q.device.type, enabled=False):
        attn = q.float() @ k.float().transpose(-2, -1) * (1.0 / math.sqrt(q.size(-1)))
    attn = torch.softmax(attn, dim=-1)
    if dropout_p > 0:
        attn = torch.dropout(attn, dropout_p, train=True)
    return attn.to(v.dtype) @ v


class Attention(nn.Module):
    """Multi-head self-attention with qk RMSNorm and 2D RoPE."""

    def __init__(
        self, dim: int, num_heads: int, attn_drop: float = 0.0, proj_drop: float = 0.0, attn_impl: str = "sdpa"
    ):
        super().__init__()
        if attn_impl not in ATTN_IMPLS:
            raise ValueError(f"attn_impl must be one of {ATTN_IMPLS}, got {attn_impl!r}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.q_norm = RMSNorm(head_dim)
        self.k_norm = RMSNorm(head_dim)
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_impl = attn_impl

    def forward(self, x, rope_cos, rope_sin):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, N, head_dim)
        q = apply_rope(self.q_norm(q), rope_cos, rope_sin)
        k = apply_rope(self.k_norm(k), rope_cos, rope_sin)
        dropout_p = self.attn_drop if self.training else 0.0
        if self.attn_impl == "sdpa":
            # RoPE promotes q, k to float32; SDPA takes them in v's dtype (what autocast does too).
            x = F.scaled_dot_product_attention(q.to(v.dtype), k.to(v.dtype), v, dropout_p=dropout_p)
        else:
            x = reference_attention(q, k, v, dropout_p)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class SwiGLUFFN(nn.Module):
    """SwiGLU MLP: d -> 2h (gate, value) -> h -> d, with h = int(hidden_dim · 2/3)."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0):
        super().__init__()
        hidden_dim = int(hidden_dim * 2 / 3)
        self.w12 = nn.Linear(dim, 2 * hidden_dim)
        self.w3 = nn.Linear(hidden_dim, dim)
        self.ffn_dropout = nn.Dropout(drop)

    def forward(self, x):
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(self.ffn_dropout(F.silu(x1) * x2))


class JiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-Zero conditioning."""

    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0, attn_drop=0.0, proj_drop=0.0, attn_impl="sdpa"):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.attn = Attention(hidden_size, num_heads, attn_drop=attn_drop, proj_drop=proj_drop, attn_impl=attn_impl)
        self.norm2 = RMSNorm(hidden_size)
        self.mlp = SwiGLUFFN(hidden_size, int(hidden_size * mlp_ratio), drop=proj_drop)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x, c, rope_cos, rope_sin):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope_cos, rope_sin)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """RMSNorm -> adaLN modulation -> Linear to p·p·C pixels per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = RMSNorm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class JiT(nn.Module):
    """forward(x, t, y): x (B, C, H, W) noisy image, t (B,) in [0, 1], y (B,) int labels
    (num_classes = unconditional) -> (B, C, H, W) the prediction: the clean image x̂ (the paper's
    method; the denoiser's `pred` says what it is).

    bottleneck_dim: width of the low-rank patch embedding (x_embedder.proj1, proj2); 0 = one plain
    linear patch embedding (x_embedder.proj, with bias; initialised like the bottleneck's convs).
    in_context_len: class tokens prepended at block in_context_start; 0 = none (no in_context_posemb).

    grad_checkpoint: in training with gradients on, each block keeps only its input and recomputes
    its activations in the backward pass (non-reentrant torch.utils.checkpoint; dropout masks are
    replayed from the saved RNG state, so gradients equal those without). An attribute that may be
    set after construction; it changes no parameter or state-dict entry.
    """

    def __init__(
        self,
        input_size=256,
        patch_size=16,
        in_channels=3,
        hidden_size=1024,
        depth=24,
        num_heads=16,
        mlp_ratio=4.0,
        attn_drop=0.0,
        proj_drop=0.0,
        num_classes=1000,
        bottleneck_dim=128,
        in_context_len=32,
        in_context_start=8,
        attn_impl="sdpa",
        grad_checkpoint=False,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"image size {input_size} is not divisible by the patch size {patch_size}")
        if hidden_size % num_heads or (hidden_size // num_heads) % 4:
            raise ValueError(f"hidden_size/num_heads must be an integer divisible by 4, got {hidden_size}/{num_heads}")
        if bottleneck_dim < 0 or in_context_len < 0:
            raise ValueError(f"bottleneck_dim and in_context_len must be >= 0, got {bottleneck_dim}, {in_context_len}")
        if in_context_len > 0 and not 0 <= in_context_start < depth:
            raise ValueError(f"in_context_start must lie in [0, depth={depth}), got {in_context_start}")
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.in_context_len = in_context_len
        self.in_context_start = in_context_start
        self.grad_checkpoint = grad_checkpoint

        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        if bottleneck_dim > 0:
            self.x_embedder = BottleneckPatchEmbed(input_size, patch_size, in_channels, bottleneck_dim, hidden_size)
        else:
            self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        if in_context_len > 0:
            self.in_context_posemb = nn.Parameter(torch.zeros(1, in_context_len, hidden_size))

        # RoPE tables: buffers that follow .to(device) and stay out of the state dict. The first
        # `in_context_len` rows (identity rotation) serve the in-context tokens once they are added.
        cos, sin = rope_2d_tables(hidden_size // num_heads, input_size // patch_size, num_prefix=in_context_len)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

        lo, hi = depth // 4, depth // 4 * 3  # dropout only in the middle half of the blocks
        self.blocks = nn.ModuleList(
            [
                JiTBlock(
                    hidden_size,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    attn_drop=attn_drop if lo <= i < hi else 0.0,
                    proj_drop=proj_drop if lo <= i < hi else 0.0,
                    attn_impl=attn_impl,
                )
                for i in range(depth)
            ]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @torch.no_grad()
    def initialize_weights(self):
        def _basic_init(module):
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        if self.pos_embed.device.type != "meta":
            grid = int(self.x_embedder.num_patches**0.5)
            self.pos_embed.copy_(sincos_2d_pos_embed(self.pos_embed.shape[-1], grid).unsqueeze(0))
        for conv in self.x_embedder.children():  # like a Linear on the flattened kernel
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
            if conv.bias is not None:
                nn.init.constant_(conv.bias, 0)
        if self.in_context_len > 0:
            nn.init.normal_(self.in_context_posemb, std=0.02)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for layer in [b.adaLN_modulation[-1] for b in self.blocks] + [
            self.final_layer.adaLN_modulation[-1],
            self.final_layer.linear,
        ]:
            nn.init.constant_(layer.weight, 0)
            nn.init.constant_(layer.bias, 0)

    def unpatchify(self, x):
        """(B, N, p·p·C) -> (B, C, H, W); channels are the fastest axis within a patch."""
        p, c = self.patch_size, self.out_channels
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, x, t, y):
        y_emb = self.y_embedder(y)  # (B, D)
        c = self.t_embedder(t) + y_emb  # (B, D)
        x = self.x_embedder(x)  # (B, N, D)
        x += self.pos_embed
        n_ctx = self.in_context_len
        recompute = self.grad_checkpoint and self.training and torch.is_grad_enabled()
        for i, block in enumerate(self.blocks):
            if n_ctx > 0 and i == self.in_context_start:
                ctx = y_emb.unsqueeze(1).repeat(1, n_ctx, 1)  # (B, n_ctx, D)
                ctx += self.in_context_posemb
                x = torch.cat([ctx, x], dim=1)  # (B, n_ctx + N, D)
            skip = n_ctx if (n_ctx > 0 and i < self.in_context_start) else 0
            if recompute:
                x = checkpoint(block, x, c, self.rope_cos[skip:], self.rope_sin[skip:], use_reentrant=False)
            else:
                x = block(x, c, self.rope_cos[skip:], self.rope_sin[skip:])
        x = self.final_layer(x[:, n_ctx:], c)  # (B, N, p·p·C)
        return self.unpatchify(x)


def _preset(**arch):
    """A JiT constructor with the architecture fixed; it takes input_size, num_classes, attn_drop,
    proj_drop, attn_impl, ... as keywords, and the ARCH_KNOBS as overrides of the preset's values."""
    return partial(JiT, **arch)


JiT_models = {
    "JiT-B/16": _preset(
        depth=12,
        hidden_size=768,
        num_heads=12,
        bottleneck_dim=128,
        in_context_len=32,
        in_context_start=4,
        patch_size=16,
    ),
    "JiT-B/32": _preset(
        depth=12,
        hidden_size=768,
        num_heads=12,
        bottleneck_dim=128,
        in_context_len=32,
        in_context_start=4,
        patch_size=32,
    ),
    # The paper's 64 px ablations (Table 2b); not in the reference code: B's settings with p = 4.
    "JiT-B/4": _preset(
        depth=12, hidden_size=768, num_heads=12, bottleneck_dim=128, in_context_len=32, in_context_start=4, patch_size=4
    ),
    "JiT-L/16": _preset(
        depth=24,
        hidden_size=1024,
        num_heads=16,
        bottleneck_dim=128,
        in_context_len=32,
        in_context_start=8,
        patch_size=16,
    ),
    "JiT-L/32": _preset(
        depth=24,
        hidden_size=1024,
        num_heads=16,
        bottleneck_dim=128,
        in_context_len=32,
        in_context_start=8,
        patch_size=32,
    ),
    "JiT-H/16": _preset(
        depth=32,
        hidden_size=1280,
        num_heads=16,
        bottleneck_dim=256,
        in_context_len=32,
        in_context_start=10,
        patch_size=16,
    ),
    "JiT-H/32": _preset(
        depth=32,
        hidden_size=1280,
        num_heads=16,
        bottleneck_dim=256,
        in_context_len=32,
        in_context_start=10,
        patch_size=32,
    ),
    # The paper's G (not in the reference code).
    "JiT-G/16": _preset(
        depth=40,
        hidden_size=1664,
        num_heads=16,
        bottleneck_dim=256,
        in_context_len=32,
        in_context_start=10,
        patch_size=16,
    ),
    "JiT-G/32": _preset(
        depth=40,
        hidden_size=1664,
        num_heads=16,
        bottleneck_dim=256,
        in_context_len=32,
        in_context_start=10,
        patch_size=32,
    ),
    # Tiny presets for tests and the CPU demo (not in the paper).
    "JiT-T/4": _preset(
        depth=6, hidden_size=192, num_heads=4, bottleneck_dim=32, in_context_len=8, in_context_start=2, patch_size=4
    ),
    "JiT-XS/4": _preset(
        depth=4, hidden_size=64, num_heads=4, bottleneck_dim=16, in_context_len=4, in_context_start=2, patch_size=4
    ),
}


def preset_patch_size(name: str) -> int:
    """Patch size (pixels) of the preset `name`."""
    return JiT_models[name].keywords["patch_size"]
