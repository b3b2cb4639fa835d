"""Fixed position encodings of JiT: 2D sin-cos absolute embeddings and 2D RoPE tables.

Both follow the reference release exactly (MAE/DiT sin-cos layout; EVA-style "lang" RoPE on
interleaved channel pairs), so that released checkpoints and their outputs carry over unchanged.
"""

import torch


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim): [sin(pos·ω), cos(pos·ω)], ω_i = 1/10000^(2i/dim), in float64."""
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None]  # (M, dim/2)
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d_pos_embed(dim: int, grid_size: int) -> torch.Tensor:
    """(grid_size², dim) float32 table; token r·grid_size + c. First half of the channels encodes
    the column index, the second half the row index (the MAE layout)."""
    coords = torch.arange(grid_size, dtype=torch.float32)
    col = coords.repeat(grid_size)  # varies fastest, like np.meshgrid(w, h)[0]
    row = coords.repeat_interleave(grid_size)
    return torch.cat([sincos_1d(dim // 2, col), sincos_1d(dim // 2, row)], dim=1).float()


def rope_2d_tables(head_dim: int, grid_size: int, num_prefix: int = 0, theta: float = 10000.0):
    """cos and sin tables, each (num_prefix + grid_size², head_dim) float32, for 2D RoPE.

    The first head_dim/2 channels rotate with the row index, the rest with the column index; each
    half uses head_dim/4 frequencies 1/theta^(2i/(head_dim/2)), each shared by an interleaved
    channel pair. The `num_prefix` leading (in-context) tokens get the identity rotation.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    freqs = 1.0 / theta ** (torch.arange(0, half, 2)[: half // 2].float() / half)  # (head_dim/4,)
    pos = torch.arange(grid_size) / grid_size * grid_size  # the reference's float positions
    freqs = torch.outer(pos, freqs).repeat_interleave(2, dim=-1)  # (G, half), pairs share a freq
    rows = freqs[:, None, :].expand(grid_size, grid_size, half)
    cols = freqs[None, :, :].expand(grid_size, grid_size, half)
    angles = torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, head_dim)
    cos = torch.cat([torch.ones(num_prefix, head_dim), angles.cos()])
    sin = torch.cat([torch.zeros(num_prefix, head_dim), angles.sin()])
    return cos, sin


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs: (x0, x1) -> (x0·cos - x1·sin, x1·cos + x0·sin).

    x: (B, H, N, head_dim); cos, sin: (N, head_dim). The result takes the promoted dtype of x and
    the tables (float32 under autocast, as in the reference).
    """
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
    return x * cos + rotated * sin
