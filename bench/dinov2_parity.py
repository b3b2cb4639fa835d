"""FD-DINOv2's network (util/dinov2.py: timm's VisionTransformer, the position embedding resized once)
against DINOv2's own implementation as torch.hub builds it, fed by torch-fidelity's extractor.

    git clone https://github.com/facebookresearch/dinov2 /tmp/dinov2      # its code only, no weights
    python bench/dinov2_parity.py --dinov2_repo /tmp/dinov2                # random weights, ViT-S/14 shape
    python bench/dinov2_parity.py --dinov2_repo /tmp/dinov2 --weights dinov2_vitl14_pretrain.pth

The reference path is torch-fidelity's FeatureExtractorDinoV2.forward (its resize and normalisation)
with, as its `model`, DINOv2's DinoVisionTransformer built with the hub's settings (518 px, patch 14,
LayerScale, MLP blocks, no registers, interpolate_offset 0.1, no antialiasing) and the weights loaded
strictly. Without --weights, that model's own random initialisation is saved in the release's format
and read back by util/dinov2.py, so the conversion of the release's files is exercised too. Prints the
largest absolute and relative feature differences (float32, CPU) over --images random uint8 images.
"""

import argparse
import os
import sys
from functools import partial

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

from util.dinov2 import HEAD_DIM, DINOv2, architecture, read_state_dict  # noqa: E402


def hub_model(repo: str, arch: dict):
    """DINOv2's DinoVisionTransformer of `arch`, with the settings of its torch.hub models."""
    sys.path.insert(0, repo)
    from dinov2.layers import MemEffAttention, NestedTensorBlock
    from dinov2.models.vision_transformer import DinoVisionTransformer

    return DinoVisionTransformer(
        img_size=14 * arch["grid"],
        patch_size=arch["patch"],
        embed_dim=arch["dim"],
        depth=arch["depth"],
        num_heads=arch["dim"] // HEAD_DIM,
        mlp_ratio=arch["mlp_ratio"],
        init_values=1.0,
        ffn_layer="mlp",
        block_chunks=0,
        num_register_tokens=0,
        interpolate_antialias=False,
        interpolate_offset=0.1,
        block_fn=partial(NestedTensorBlock, attn_class=MemEffAttention),
    ).eval()


def torch_fidelity_features(model, images: torch.Tensor) -> torch.Tensor:
    """torch-fidelity's FeatureExtractorDinoV2.forward with `model` in place of the torch.hub download."""
    from torch_fidelity.feature_extractor_base import FeatureExtractorBase
    from torch_fidelity.feature_extractor_dinov2 import FeatureExtractorDinoV2

    extractor = FeatureExtractorDinoV2.__new__(FeatureExtractorDinoV2)
    FeatureExtractorBase.__init__(extractor, "dinov2-vit-l-14", ["dinov2"])
    extractor.feature_extractor_internal_dtype = torch.float32
    extractor.model = model
    with torch.no_grad():
        return extractor(images)[0]


def get_args_parser():
    p = argparse.ArgumentParser("util/dinov2.py against DINOv2's torch.hub implementation")
    p.add_argument("--dinov2_repo", required=True, help="a checkout of github.com/facebookresearch/dinov2")
    p.add_argument("--weights", default=None, help="a DINOv2 release file (default: random weights, see --dim)")
    p.add_argument("--dim", default=384, type=int, help="width of the random model (384: ViT-S/14)")
    p.add_argument("--depth", default=12, type=int, help="blocks of the random model")
    p.add_argument("--images", default=8, type=int)
    p.add_argument("--size", default=256, type=int, help="side of the random uint8 images (pixels)")
    p.add_argument("--out", default="/tmp/dinov2_parity_weights.pth", help="where the random weights go")
    return p


def main():
    args = get_args_parser().parse_args()
    torch.manual_seed(0)
    if args.weights is None:
        arch = dict(dim=args.dim, depth=args.depth, patch=14, mlp_ratio=4.0, grid=37)
        model = hub_model(args.dinov2_repo, arch)
        torch.save(model.state_dict(), args.out)
        args.weights = args.out
    else:
        arch = architecture(read_state_dict(args.weights), args.weights)
        model = hub_model(args.dinov2_repo, arch)
        model.load_state_dict(read_state_dict(args.weights), strict=True)
    images = torch.randint(0, 256, (args.images, 3, args.size, args.size), dtype=torch.uint8)
    theirs = torch_fidelity_features(model, images)
    ours = DINOv2(args.weights, torch.device("cpu")).features(images)
    diff = (ours - theirs).abs()
    print(
        f"{args.weights}: {tuple(ours.shape)} features; max |ours - hub| {diff.max():.3e}, "
        f"relative {(diff.max() / theirs.abs().max()):.3e} (largest |feature| {theirs.abs().max():.3f})"
    )


if __name__ == "__main__":
    main()
