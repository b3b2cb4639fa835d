"""DINOv2 features for FD-DINOv2 (the Fréchet distance EDM2 reports beside FID), from local weights.

torch-fidelity's DINOv2 extractor (torch_fidelity/feature_extractor_dinov2.py) builds the network
only through torch.hub and raises NotImplementedError for a local weights file. Here the network is
timm's VisionTransformer, loaded from a local file of DINOv2's own release (`dinov2_vitl14_pretrain.pth`,
the file torch.hub downloads) or of timm's (`vit_large_patch14_dinov2.lvd142m`, .safetensors or .pth);
its shape (width, depth, patch, the position grid) is read from the file, so a small variant with
random weights (the tests) goes through the same path.

What an image goes through is torch-fidelity's extractor, step for step: uint8 (B, 3, H, W) -> float32
0..255 -> torch-fidelity's TF1-compatible bilinear resize to 224 × 224 -> normalised with 255 × the
ImageNet mean and std -> the network in float32 -> the class token after the final LayerNorm (the
hub model's output). The hub model (518 px, a 37 × 37 position grid) resizes its position embedding
to the 16 × 16 grid of a 224 px input on every call, bicubic with DINOv2's scale-factor offset of
0.1 and no antialiasing; `hub_pos_embed` does the same once, when the weights are loaded.
"""

import math
import os

import torch
import torch.nn.functional as F

from util.errors import BadValue, MissingFile

INPUT_SIZE = 224  # torch-fidelity's FeatureExtractorDinoV2.INPUT_IMAGE_SIZE
MEAN = (0.485, 0.456, 0.406)  # ImageNet, times 255 on 0..255 input as torch-fidelity
STD = (0.229, 0.224, 0.225)
HEAD_DIM = 64  # every DINOv2 ViT (S 384/6, B 768/12, L 1024/16, g 1536/24)
INTERPOLATE_OFFSET = 0.1  # DINOv2 hub models: interpolate_offset=0.1, interpolate_antialias=False
LARGE = dict(dim=1024, depth=24, patch=14)  # ViT-L/14, the network FD-DINOv2 is reported with


def load_tensors(path: str):
    """A .safetensors file, or a torch file memory-mapped where its format allows (reading the shapes
    then costs nothing; the weights are read once, into the network)."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # a file of torch's legacy format cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def read_state_dict(path: str) -> dict:
    """The tensors of a weights file (.safetensors, or a torch file holding a state dict, possibly under
    'model' / 'state_dict'). MissingFile / BadValue (one line) for a missing or unreadable file."""
    if not os.path.isfile(path):
        raise MissingFile(f"--dinov2_weights {path}: no such file")
    try:
        state = load_tensors(path)
    except Exception as e:  # truncated, not a weights file
        raise BadValue(f"--dinov2_weights {path}: cannot read it ({type(e).__name__}: {e})") from None
    for key in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or "cls_token" not in state or "pos_embed" not in state:
        raise BadValue(f"--dinov2_weights {path}: not a DINOv2 ViT state dict (no cls_token / pos_embed)")
    return state


def architecture(state: dict, path: str = "--dinov2_weights") -> dict:
    """{dim, depth, heads, patch, mlp_ratio, grid} of a DINOv2 ViT state dict (Meta's or timm's
    names). BadValue for the variants not built here: registers, SwiGLU (ViT-g)."""
    if "register_tokens" in state or "reg_token" in state:
        raise BadValue(f"{path}: a DINOv2 with registers; FD-DINOv2 uses the model without (dinov2_vitl14)")
    if any(".mlp.w12." in k for k in state):
        raise BadValue(f"{path}: a SwiGLU DINOv2 (ViT-g); FD-DINOv2 uses ViT-L/14 (dinov2_vitl14)")
    dim = state["cls_token"].shape[-1]
    tokens = state["pos_embed"].shape[1] - 1
    grid = math.isqrt(tokens)
    if grid * grid != tokens or dim % HEAD_DIM:
        raise BadValue(f"{path}: a position embedding of {tokens} tokens or a width of {dim} is not a DINOv2 ViT's")
    missing = [k for k in ("patch_embed.proj.weight", "blocks.0.mlp.fc1.weight") if k not in state]
    if missing:
        raise BadValue(f"{path}: not a DINOv2 ViT state dict (no {', '.join(missing)})")
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.") and k.endswith(".norm1.weight")})
    patch = state["patch_embed.proj.weight"].shape[-1]
    if INPUT_SIZE % patch:
        raise BadValue(f"{path}: patch size {patch} does not divide the {INPUT_SIZE} px input")
    return dict(
        dim=dim,
        depth=depth,
        heads=dim // HEAD_DIM,
        patch=patch,
        mlp_ratio=state["blocks.0.mlp.fc1.weight"].shape[0] / dim,
        grid=grid,
    )


def describe_architecture(arch: dict) -> str:
    """'ViT-L/14, 24 blocks, width 1024' (the name of the standard sizes)."""
    names = {384: "S", 768: "B", 1024: "L", 1536: "g"}
    return f"ViT-{names.get(arch['dim'], '?')}/{arch['patch']}, {arch['depth']} blocks, width {arch['dim']}"


def hub_pos_embed(pos_embed: torch.Tensor, grid: int) -> torch.Tensor:
    """(1, 1 + M², D) position embedding -> (1, 1 + grid², D) as DINOv2's interpolate_pos_encoding
    computes it: the patch part bicubic by scale factors (grid + 0.1) / M, no antialiasing, in float32."""
    pos = pos_embed.float()
    m = math.isqrt(pos.shape[1] - 1)
    if m == grid:
        return pos
    patch = pos[:, 1:].reshape(1, m, m, -1).permute(0, 3, 1, 2)  # (1, D, M, M)
    scale = (grid + INTERPOLATE_OFFSET) / m
    patch = F.interpolate(patch, scale_factor=(scale, scale), mode="bicubic", antialias=False)
    assert patch.shape[-2:] == (grid, grid), patch.shape
    return torch.cat([pos[:, :1], patch.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


def vision_transformer(arch: dict) -> torch.nn.Module:
    """timm's VisionTransformer of DINOv2 shape `arch` (architecture) for 224 px input, class token out
    (on the current default device: the meta device checks a file's names and shapes without memory)."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(
        img_size=INPUT_SIZE,
        patch_size=arch["patch"],
        embed_dim=arch["dim"],
        depth=arch["depth"],
        num_heads=arch["heads"],
        mlp_ratio=arch["mlp_ratio"],
        init_values=1.0,  # LayerScale present (its values come from the file)
        num_classes=0,
        global_pool="token",
    )


def network_weights(state: dict, arch: dict) -> dict:
    """The file's tensors under timm's names (Meta's are timm's, but for `mask_token`), the position
    embedding resized as the hub model does (hub_pos_embed)."""
    weights = {k: v for k, v in state.items() if k != "mask_token"}
    weights["pos_embed"] = hub_pos_embed(state["pos_embed"], INPUT_SIZE // arch["patch"])
    return weights


def check_loads(state: dict, arch: dict, path: str = "--dinov2_weights"):
    """BadValue (one line) unless the file's tensors are exactly those of the network of `arch`, name for
    name and shape for shape (e.g. a plain timm ViT: no LayerScale, a classifier head), checked on the
    meta device: no memory, no weights read."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in vision_transformer(arch).state_dict().items()}
    found = {k: tuple(v.shape) for k, v in network_weights(state, arch).items()}
    problems = [f"missing {k}" for k in expected if k not in found]
    problems += [f"unexpected {k}" for k in found if k not in expected]
    problems += [f"{k} is {found[k]}, not {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
    if problems:
        more = f" and {len(problems) - 3} more" if len(problems) > 3 else ""
        raise BadValue(
            f"{path}: does not load into a DINOv2 {describe_architecture(arch)} ({'; '.join(problems[:3])}{more})"
        )


def build_dinov2(state: dict, path: str = "--dinov2_weights") -> torch.nn.Module:
    """timm's VisionTransformer of the state dict's shape for 224 px input, with its weights (float32,
    eval, no gradients); the position embedding resized as the hub model does (hub_pos_embed)."""
    arch = architecture(state, path)
    check_loads(state, arch, path)
    net = vision_transformer(arch)
    net.load_state_dict(network_weights(state, arch), strict=True)
    return net.float().eval().requires_grad_(False)


def preprocess(images: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 (B, 3, 224, 224), as torch-fidelity's FeatureExtractorDinoV2.forward."""
    import torchvision
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    x = images.to(torch.float32)
    x = interpolate_bilinear_2d_like_tensorflow1x(x, size=(INPUT_SIZE, INPUT_SIZE), align_corners=False)
    return torchvision.transforms.functional.normalize(
        x, tuple(255 * m for m in MEAN), tuple(255 * s for s in STD), inplace=False
    )


class DINOv2:
    """The DINOv2 feature extractor of `weights` on `device`: the file is read and checked at
    construction, names and shapes included (fail fast, before any image is generated), the network
    built at the first batch."""

    def __init__(self, weights: str, device: torch.device):
        self.weights, self.device = weights, device
        state = read_state_dict(weights)
        self.arch = architecture(state, weights)
        check_loads(state, self.arch, weights)
        self._net = None

    @property
    def dim(self) -> int:
        return self.arch["dim"]

    def is_large(self) -> bool:
        """Whether this is ViT-L/14, the network FD-DINOv2 is reported with."""
        return all(self.arch[k] == v for k, v in LARGE.items())

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images (B, 3, H, W) -> (B, dim) float32 on the CPU; float32 throughout (no autocast)."""
        if self._net is None:
            self._net = build_dinov2(read_state_dict(self.weights), self.weights).to(self.device)
        with torch.autocast(device_type=self.device.type, enabled=False):
            return self._net(preprocess(images.to(self.device))).float().cpu()
