"""What the rest of the repository knows about model_jit.JiT, beside it (torchtitan's per-model
state_dict_adapter): its constructor keywords and presets read back from tensor shapes, whether a
state dict fits a network, the names of diffusers' JiTTransformer2DModel (its port of JiT) both
ways, and how another class count or image size adapts a state dict to start a run from.

State dicts here are the Denoiser's (keys "net.*"); errors are one line (CheckpointError).
"""

import inspect
import math
import re

import torch

from denoiser import Denoiser
from model_jit import JiT, JiT_models, RMSNorm
from sampling import check_denoiser
from util.checkpoint import CheckpointError
from util.errors import BadValue

DIFFUSERS_CLASS = "JiTTransformer2DModel"
LABEL_KEY = "net.y_embedder.embedding_table.weight"  # (class_num + 1, D), the null class last
POS_KEY = "net.pos_embed"  # (1, N, D) fixed sin-cos table

# JiT constructor keywords that choose how to run, not what the weights are.
RUNTIME_KEYWORDS = ("attn_impl", "grad_checkpoint")
NETWORK_DEFAULTS = {k: p.default for k, p in inspect.signature(JiT).parameters.items() if k not in RUNTIME_KEYWORDS}
NORM_EPS = inspect.signature(RMSNorm).parameters["eps"].default
# Our JiT names <-> the names of diffusers' JiTTransformer2DModel, one row per kind of tensor: "{i}"
# is a block index, "{j}" a layer index, "{p}" weight or bias. A tuple: our tensor is split along
# dim 0 into these (qkv rows are [q; k; v]). Every tensor of either side matches exactly one row.
DIFFUSERS_NAMES = (
    ("t_embedder.mlp.{j}.{p}", "t_embedder.mlp.{j}.{p}"),
    ("y_embedder.embedding_table.weight", "y_embedder.embedding_table.weight"),
    ("x_embedder.proj1.weight", "x_embedder.proj1.weight"),
    ("x_embedder.proj2.{p}", "x_embedder.proj2.{p}"),
    ("pos_embed", "pos_embed"),
    ("in_context_posemb", "in_context_posemb"),
    ("blocks.{i}.norm1.weight", "blocks.{i}.norm1.weight"),
    ("blocks.{i}.norm2.weight", "blocks.{i}.norm2.weight"),
    ("blocks.{i}.mlp.w12.{p}", "blocks.{i}.mlp.w12.{p}"),
    ("blocks.{i}.mlp.w3.{p}", "blocks.{i}.mlp.w3.{p}"),
    ("blocks.{i}.adaLN_modulation.1.{p}", "blocks.{i}.adaLN_modulation.{p}"),
    ("blocks.{i}.attn.qkv.{p}", ("blocks.{i}.attn.to_q.{p}", "blocks.{i}.attn.to_k.{p}", "blocks.{i}.attn.to_v.{p}")),
    ("blocks.{i}.attn.q_norm.weight", "blocks.{i}.attn.norm_q.weight"),
    ("blocks.{i}.attn.k_norm.weight", "blocks.{i}.attn.norm_k.weight"),
    ("blocks.{i}.attn.proj.{p}", "blocks.{i}.attn.to_out.0.{p}"),
    ("final_layer.norm_final.weight", "norm_final.weight"),
    ("final_layer.linear.{p}", "linear_final.{p}"),
    ("final_layer.adaLN_modulation.1.{p}", "adaLN_modulation_final.{p}"),
)
# diffusers config key <-> JiT constructor keyword (the port's norm_eps is fixed: NORM_EPS).
DIFFUSERS_CONFIG = (
    ("sample_size", "input_size"),
    ("patch_size", "patch_size"),
    ("in_channels", "in_channels"),
    ("hidden_size", "hidden_size"),
    ("num_layers", "depth"),
    ("num_attention_heads", "num_heads"),
    ("mlp_ratio", "mlp_ratio"),
    ("attention_dropout", "attn_drop"),
    ("dropout", "proj_drop"),
    ("num_classes", "num_classes"),
    ("bottleneck_dim", "bottleneck_dim"),
    ("in_context_len", "in_context_len"),
    ("in_context_start", "in_context_start"),
)
_FIELDS = {"i": r"\d+", "j": r"\d+", "p": "weight|bias"}


def _regex(template: str) -> re.Pattern:
    parts = re.split(r"\{(\w)\}", template)  # literal, field, literal, ...
    return re.compile("".join(re.escape(s) if k % 2 == 0 else f"(?P<{s}>{_FIELDS[s]})" for k, s in enumerate(parts)))


def _rows(side: int):
    """(regex, the other side's template(s), this name's index in a split, all names of the split)
    per name template on `side` (0: ours, 1: diffusers)."""
    for row in DIFFUSERS_NAMES:
        names = row[side] if isinstance(row[side], tuple) else (row[side],)
        for part, name in enumerate(names):
            yield _regex(name), row[1 - side], part, names


_OURS, _THEIRS = list(_rows(0)), list(_rows(1))


def _lookup(name: str, rows) -> tuple:
    for regex, target, part, parts in rows:
        m = regex.fullmatch(name)
        if m:
            return m.groupdict(), target, part, parts
    raise CheckpointError(f"unknown tensor {name}: it is not in the diffusers name table of model_jit_adapters.py")


def diffusers_refusal(network: dict) -> str | None:
    """Why diffusers' JiTTransformer2DModel cannot hold a network of these JiT keywords (None: it can).
    The port has only the bottleneck patch embedding (proj1, proj2), no plain one (bottleneck_dim 0)."""
    if network.get("bottleneck_dim") == 0:
        return (
            "--format diffusers: this model has no patch-embedding bottleneck (--bottleneck_dim 0), and diffusers' "
            f"{DIFFUSERS_CLASS} has only the bottleneck one: export it with --format jit"
        )
    return None


def strip_net(state_dict: dict) -> dict:
    """A Denoiser state dict ("net.*") -> the network's names."""
    bad = next((k for k in state_dict if not k.startswith("net.")), None)
    if bad is not None:
        raise CheckpointError(f"unknown tensor {bad}: a JiT denoiser's tensors are all named net.*")
    return {k[len("net.") :]: v for k, v in state_dict.items()}


def add_net(state_dict: dict) -> dict:
    return {f"net.{k}": v for k, v in state_dict.items()}


def to_diffusers(state_dict: dict) -> dict:
    """A Denoiser state dict ("net.*") -> the diffusers port's names; attn.qkv is split into
    to_q, to_k, to_v (copies, so that no two tensors share memory)."""
    out = {}
    for name, tensor in strip_net(state_dict).items():
        fields, target, _, _ = _lookup(name, _OURS)
        targets = target if isinstance(target, tuple) else (target,)
        pieces = tensor.chunk(len(targets), dim=0) if len(targets) > 1 else (tensor,)
        for template, piece in zip(targets, pieces):
            key = template.format(**fields)
            if key in out:
                raise CheckpointError(f"two tensors map to the diffusers name {key}")
            out[key] = piece.clone() if len(targets) > 1 else piece
    return out


def from_diffusers(state_dict: dict) -> dict:
    """Inverse of to_diffusers: the port's names -> a Denoiser state dict ("net.*"); to_q, to_k,
    to_v are concatenated back into attn.qkv (all three must be there)."""
    out, groups = {}, {}
    for name, tensor in state_dict.items():
        fields, target, part, names = _lookup(name, _THEIRS)
        key = target.format(**fields)
        if len(names) == 1:
            out[key] = tensor
        else:
            pieces = groups.setdefault(
                key, {"names": [n.format(**fields) for n in names], "tensors": [None] * len(names)}
            )
            pieces["tensors"][part] = tensor
    for key, pieces in groups.items():
        missing = [n for n, t in zip(pieces["names"], pieces["tensors"]) if t is None]
        if missing:
            raise CheckpointError(
                f"missing tensor {missing[0]} (the {key} of this model is {' + '.join(pieces['names'])})"
            )
        out[key] = torch.cat(pieces["tensors"], dim=0)
    return add_net(out)


def preset_of(network: dict) -> str | None:
    """The preset whose keywords all equal network's; else one with its depth, width, heads and
    patch (other knobs); else None."""
    for keys in (None, ("depth", "hidden_size", "num_heads", "patch_size")):
        for name, ctor in JiT_models.items():
            if all(network.get(k) == v for k, v in ctor.keywords.items() if keys is None or k in keys):
                return name
    return None


def network_from_shapes(state_dict: dict) -> dict:
    """What the tensor shapes of a Denoiser state dict say about its JiT (not in_context_start)."""
    try:
        pos, proj1 = state_dict[POS_KEY], state_dict["net.x_embedder.proj1.weight"]
        hidden, patch = pos.shape[-1], proj1.shape[-1]
        return dict(
            hidden_size=hidden,
            patch_size=patch,
            in_channels=proj1.shape[1],
            bottleneck_dim=proj1.shape[0],
            depth=1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("net.blocks.")),
            num_heads=hidden // state_dict["net.blocks.0.attn.q_norm.weight"].numel(),
            num_classes=state_dict[LABEL_KEY].shape[0] - 1,
            input_size=math.isqrt(pos.shape[1]) * patch,
            in_context_len=state_dict["net.in_context_posemb"].shape[1] if "net.in_context_posemb" in state_dict else 0,
        )
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"not a JiT state dict (no tensor {e})") from None


def network_config(args: dict, state_dict: dict) -> tuple[str, dict]:
    """(preset name, JiT constructor keywords) of a checkpoint: the preset of args["model"] with the
    run's img_size, class_num, dropouts and knobs. A reference checkpoint's args may lack any of
    them: the preset and sizes then come from the tensor shapes, the dropouts are 0."""
    shapes = None
    name = args.get("model")
    if name is None:
        shapes = network_from_shapes(state_dict)
        name = preset_of(shapes)
        if name is None:
            raise CheckpointError(
                "the checkpoint names no --model and its tensor shapes match no preset of model_jit.JiT_models"
            )
    if name not in JiT_models:
        raise CheckpointError(
            f"the checkpoint was trained with --model {name}, which model_jit.JiT_models does not have"
        )
    network = {**NETWORK_DEFAULTS, **JiT_models[name].keywords}
    for flag, key in (("img_size", "input_size"), ("class_num", "num_classes")):
        if args.get(flag) is None:
            shapes = shapes or network_from_shapes(state_dict)
        network[key] = args[flag] if args.get(flag) is not None else shapes[key]
    network["attn_drop"] = args.get("attn_dropout") or 0.0
    network["proj_drop"] = args.get("proj_dropout") or 0.0
    for knob in ("bottleneck_dim", "in_context_len", "in_context_start"):
        if args.get(knob) is not None:
            network[knob] = args[knob]
    return name, network


def describe_network(network: dict) -> str:
    return f"{preset_of(network) or 'JiT'} at {network['input_size']} px, {network['num_classes']} classes"


def check_fits(network: dict, state_dict: dict, where: str):
    """CheckpointError naming the first unknown or missing tensor, or the first shape that differs,
    between `state_dict` ("net.*") and the JiT that `network` builds (on the meta device: no memory)."""
    unknown = [k for k in network if k not in NETWORK_DEFAULTS]
    if unknown:
        raise CheckpointError(f"{where}: network entry '{unknown[0]}' is not a keyword of model_jit.JiT")
    try:
        with torch.device("meta"):
            expected = {f"net.{k}": v.shape for k, v in JiT(**network).state_dict().items()}
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{where}: cannot build its network: {e}") from None
    what = f"the network of its config ({describe_network(network)})"
    for label, names in (
        ("unknown tensor", [k for k in state_dict if k not in expected]),
        ("missing tensor", [k for k in expected if k not in state_dict]),
    ):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise CheckpointError(f"{where}: {label} {names[0]}{more} for {what}")
    for k, shape in expected.items():
        if state_dict[k].shape != shape:
            raise CheckpointError(f"{where}: {k} has shape {list(state_dict[k].shape)} but {what} needs {list(shape)}")


def is_preset(name) -> bool:
    return name in JiT_models


def fits_preset(name: str, network: dict) -> bool:
    """Whether preset `name` builds `network`'s depth, width, heads and patch (its knobs aside)."""
    return name in JiT_models and all(
        network.get(k) == v
        for k, v in JiT_models[name].keywords.items()
        if k not in ("bottleneck_dim", "in_context_len", "in_context_start")
    )


def preset_knob(name: str, knob: str):
    """The value of an architecture knob (bottleneck_dim, in_context_len, in_context_start) in preset `name`."""
    return JiT_models[name].keywords[knob]


def build_denoiser(network: dict, denoiser: dict, runtime: dict) -> Denoiser:
    """A freshly initialised Denoiser of JiT keywords `network` (config.json's), Denoiser keywords
    `denoiser` and how to run (`runtime`: attn_impl, grad_checkpoint). BadValue (one line), before the
    network is built, for a noise_scale or t_eps no sampler can run (sampling.check_denoiser)."""
    empty = [k for k in ("noise_scale", "t_eps", "pred") if k in denoiser and denoiser[k] is None]
    if empty:
        raise BadValue(f"the denoiser's {', '.join(empty)} must be given, got None")
    try:
        check_denoiser(denoiser.get("noise_scale"), denoiser.get("t_eps"), denoiser.get("pred"))
    except ValueError as e:
        raise BadValue(str(e)) from None
    return Denoiser(JiT(**network, **runtime), network["num_classes"], **denoiser)


def adapt_for_init(source_sd: dict, target, where: str = "--init_from") -> tuple[dict, list[str]]:
    """The state dict (keys "net.*") that starts `target` (a freshly initialised Denoiser) from
    `source_sd`: every tensor of the source, except
    - the label embedding when the class count differs: the target's fresh one (a custom dataset);
    - the fixed sin-cos position embedding when the patch grid (img_size) differs: the target's,
      built for its grid (the RoPE tables are not in state dicts: they follow the target anyway).
    Any other difference raises CheckpointError. Returns (state dict, notes for the log). A sharded
    (FSDP) target is gathered for the two tensors: then call it on every rank."""
    target_sd = target.state_dict()
    for label, names in (
        ("unknown tensor", [k for k in source_sd if k not in target_sd]),
        ("missing tensor", [k for k in target_sd if k not in source_sd]),
    ):
        if names:
            raise CheckpointError(f"{where}: {label} {names[0]} for this model (check --model and its knobs)")
    out, notes = {}, []
    for k, fresh in target_sd.items():
        src = source_sd[k]
        if src.shape == fresh.shape:
            out[k] = src
            continue
        if k == LABEL_KEY:
            notes.append(
                f"{where}: the label embedding is freshly initialised: {src.shape[0] - 1} classes there, "
                f"--class_num {fresh.shape[0] - 1} here (every other tensor is kept)"
            )
        elif k == POS_KEY and src.shape[-1] == fresh.shape[-1]:
            net = getattr(target, "net", target)
            old, new = math.isqrt(src.shape[1]), math.isqrt(fresh.shape[1])
            notes.append(
                f"{where}: the fixed sin-cos position embedding and the RoPE tables are rebuilt for "
                f"{new}×{new} patches (--img_size {new * net.patch_size}; the weights were trained at "
                f"{old * net.patch_size})"
            )
        else:
            raise CheckpointError(
                f"{where}: {k} has shape {list(src.shape)} there but {list(fresh.shape)} in this model; "
                "only --class_num and --img_size may differ (check --model and its knobs)"
            )
        out[k] = (fresh.full_tensor() if hasattr(fresh, "full_tensor") else fresh).detach().clone()
    return out, notes
