"""Exported weights: one network in a folder that rebuilds and samples without our flags, and the
weights a fine-tuning run starts from.

Two layouts, each a folder with a README.md model card (see model_card):
- ours, "jit": model.safetensors (the JiT's state dict, names as model_jit.JiT's) and config.json
  {format: "jit", format_version, model (the preset), network (JiT's constructor keywords),
  denoiser (Denoiser's keywords, pred, loss), sampler (the recommended one), weights (which EMA,
  its decay, epoch, images seen, dtype), training (the run's flags), evaluations (FID/IS records)}.
- diffusers: diffusion_pytorch_model.safetensors and config.json as diffusers' JiTTransformer2DModel
  (huggingface/diffusers PR #13098) reads them; our other entries ride along under the key "_jit",
  which diffusers ignores (it drops config keys that start with "_").

Inside this repository weights are always the Denoiser's state dict (keys "net.*"); the files hold
the network's own names. Every error is one line: CheckpointError for files and weights, ValueError
for settings.
"""
import argparse
import inspect
import json
import math
import os
import re
from typing import NamedTuple

import safetensors.torch
import torch

from denoiser import Denoiser, SamplerSettings
from model_jit import JiT, JiT_models, RMSNorm
from util import checkpoint, files, phema, sweep
from util.checkpoint import CheckpointError
from util.errors import BadValue

FORMAT = "jit"
FORMAT_VERSION = 1
FORMATS = ("jit", "diffusers")
CONFIG = "config.json"
CARD = "README.md"
WEIGHTS = {"jit": "model.safetensors", "diffusers": "diffusion_pytorch_model.safetensors"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DIFFUSERS_CLASS = "JiTTransformer2DModel"

LABEL_KEY = "net.y_embedder.embedding_table.weight"  # (class_num + 1, D), the null class last
POS_KEY = "net.pos_embed"  # (1, N, D) fixed sin-cos table

# JiT constructor keywords that choose how to run, not what the weights are.
RUNTIME_KEYWORDS = ("attn_impl", "grad_checkpoint")
NETWORK_DEFAULTS = {k: p.default for k, p in inspect.signature(JiT).parameters.items() if k not in RUNTIME_KEYWORDS}
NORM_EPS = inspect.signature(RMSNorm).parameters["eps"].default
# Denoiser keywords kept in config.json, with their defaults (the fallback for a reference checkpoint
# whose args lack one); pred / loss: prediction target and loss space, "x" / "v" unless the
# Denoiser says otherwise.
DENOISER_DEFAULTS = {"P_mean": -0.8, "P_std": 0.8, "noise_scale": 1.0, "t_eps": 0.05, "label_drop_prob": 0.1,
                     "pred": "x", "loss": "v"}
DENOISER_DEFAULTS.update({k: p.default for k, p in inspect.signature(Denoiser).parameters.items() if k in DENOISER_DEFAULTS})

# Flags of main_jit.py / sample.py and where config.json keeps their values.
CONFIG_FLAGS = {
    "model": ("model",),
    "img_size": ("network", "input_size"),
    "class_num": ("network", "num_classes"),
    "bottleneck_dim": ("network", "bottleneck_dim"),
    "in_context_len": ("network", "in_context_len"),
    "in_context_start": ("network", "in_context_start"),
    "attn_dropout": ("network", "attn_drop"),
    "proj_dropout": ("network", "proj_drop"),
    **{k: ("denoiser", k) for k in DENOISER_DEFAULTS},
    "sampling_method": ("sampler", "method"),
    "num_sampling_steps": ("sampler", "steps"),
    "cfg": ("sampler", "cfg"),
    "interval_min": ("sampler", "interval_min"),
    "interval_max": ("sampler", "interval_max"),
    "sampling_schedule": ("sampler", "schedule"),  # optional: absent (uniform) in folders exported before it
}
SAMPLER_FLAGS = ("sampling_method", "num_sampling_steps", "cfg", "interval_min", "interval_max", "sampling_schedule")
# What the weights were trained as: a flag that disagrees with config.json is an error, not an override.
FIXED_FLAGS = ("model", "img_size", "class_num", "bottleneck_dim", "in_context_len", "in_context_start", "pred")
# The run's flags kept in config.json ("training") and shown in the model card, in this order.
TRAINING_FLAGS = ("model", "img_size", "class_num", "epochs", "warmup_epochs", "batch_size", "accum_iter", "world_size",
                  "lr", "blr", "min_lr", "lr_schedule", "weight_decay", "ema_decay1", "ema_decay2", "ema_decay3",
                  "P_mean", "P_std", "noise_scale", "t_eps", "label_drop_prob", "pred", "loss", "attn_dropout",
                  "proj_dropout", "bottleneck_dim", "in_context_len", "in_context_start", "seed", "init_from",
                  "init_ema", "init_origin")
# The fields of a metrics.jsonl eval record kept in config.json.
RECORD_FIELDS = ("checkpoint_epoch", "ema", "method", "steps", "schedule", "nfe", "cfg", "interval_min", "interval_max", "num_images",
                 "fid", "inception_score", "inception_score_std", "fid_stats")


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
DIFFUSERS_CONFIG = (("sample_size", "input_size"), ("patch_size", "patch_size"), ("in_channels", "in_channels"),
                    ("hidden_size", "hidden_size"), ("num_layers", "depth"), ("num_attention_heads", "num_heads"),
                    ("mlp_ratio", "mlp_ratio"), ("attention_dropout", "attn_drop"), ("dropout", "proj_drop"),
                    ("num_classes", "num_classes"), ("bottleneck_dim", "bottleneck_dim"),
                    ("in_context_len", "in_context_len"), ("in_context_start", "in_context_start"))
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
    raise CheckpointError(f"unknown tensor {name}: it is not in the diffusers name table of util/weights.py")


def strip_net(state_dict: dict) -> dict:
    """A Denoiser state dict ("net.*") -> the network's names."""
    bad = next((k for k in state_dict if not k.startswith("net.")), None)
    if bad is not None:
        raise CheckpointError(f"unknown tensor {bad}: a JiT denoiser's tensors are all named net.*")
    return {k[len("net."):]: v for k, v in state_dict.items()}


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
            pieces = groups.setdefault(key, {"names": [n.format(**fields) for n in names], "tensors": [None] * len(names)})
            pieces["tensors"][part] = tensor
    for key, pieces in groups.items():
        missing = [n for n, t in zip(pieces["names"], pieces["tensors"]) if t is None]
        if missing:
            raise CheckpointError(f"missing tensor {missing[0]} (the {key} of this model is {' + '.join(pieces['names'])})")
        out[key] = torch.cat(pieces["tensors"], dim=0)
    return add_net(out)


def diffusers_config(config: dict) -> dict:
    """Our config.json -> the port's: its constructor keys, _class_name, and our entries under _jit."""
    net = config["network"]
    return {"_class_name": DIFFUSERS_CLASS, **{d: net[o] for d, o in DIFFUSERS_CONFIG}, "norm_eps": NORM_EPS,
            "_jit": {k: v for k, v in config.items() if k not in ("network", "format")}}


def config_from_diffusers(raw: dict, where: str) -> dict:
    """The port's config.json -> ours (not yet checked: see read_config). Without a _jit entry (a
    folder made elsewhere) the denoiser and sampler are the defaults, and config["assumed"] says so."""
    missing = [d for d, _ in DIFFUSERS_CONFIG if d not in raw]
    if missing:
        raise CheckpointError(f"{where} lacks {', '.join(missing)} (a {DIFFUSERS_CLASS} config has them all)")
    if not math.isclose(raw.get("norm_eps", NORM_EPS), NORM_EPS, rel_tol=1e-9):
        raise CheckpointError(f"{where}: norm_eps {raw['norm_eps']} but model_jit's RMSNorm uses {NORM_EPS}")
    network = {o: raw[d] for d, o in DIFFUSERS_CONFIG}
    extra = raw.get("_jit")
    if extra is None:
        return {"format_version": FORMAT_VERSION, "model": preset_of(network), "network": network, "denoiser": {},
                "sampler": {**default_sampler(), "chosen_by": "the sampler's defaults"}, "assumed": ["denoiser", "sampler"]}
    if not isinstance(extra, dict):
        raise CheckpointError(f"{where}: its _jit entry is not a JSON object")
    return {**extra, "network": network}


def save_safetensors(path: str, tensors: dict):
    """Write `tensors` atomically (util.files.atomic_write: WriteError on failure)."""
    data = safetensors.torch.save({k: v.contiguous() for k, v in tensors.items()}, metadata={"format": "pt"})
    files.atomic_write(path, lambda f: f.write(data), needed=len(data))


def read_safetensors(path: str) -> dict:
    """The tensors of a safetensors file, on the CPU; CheckpointError if it is missing or unreadable."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{path} does not exist")
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except Exception as e:  # a truncated file, a bad header, not safetensors at all
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise CheckpointError(f"cannot read {path}: {type(e).__name__}: {first}") from None


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
        return dict(hidden_size=hidden, patch_size=patch, in_channels=proj1.shape[1], bottleneck_dim=proj1.shape[0],
                    depth=1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("net.blocks.")),
                    num_heads=hidden // state_dict["net.blocks.0.attn.q_norm.weight"].numel(),
                    num_classes=state_dict[LABEL_KEY].shape[0] - 1, input_size=math.isqrt(pos.shape[1]) * patch,
                    in_context_len=state_dict["net.in_context_posemb"].shape[1] if "net.in_context_posemb" in state_dict else 0)
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
            raise CheckpointError("the checkpoint names no --model and its tensor shapes match no preset of model_jit.JiT_models")
    if name not in JiT_models:
        raise CheckpointError(f"the checkpoint was trained with --model {name}, which model_jit.JiT_models does not have")
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
    for label, names in (("unknown tensor", [k for k in state_dict if k not in expected]),
                         ("missing tensor", [k for k in expected if k not in state_dict])):
        if names:
            more = f" (and {len(names) - 1} more)" if len(names) > 1 else ""
            raise CheckpointError(f"{where}: {label} {names[0]}{more} for {what}")
    for k, shape in expected.items():
        if state_dict[k].shape != shape:
            raise CheckpointError(f"{where}: {k} has shape {list(state_dict[k].shape)} but {what} needs {list(shape)}")


def denoiser_config(args: dict) -> dict:
    """The Denoiser's settings of a run (its defaults where args lack one, as in reference files)."""
    return {k: args[k] if args.get(k) is not None else v for k, v in DENOISER_DEFAULTS.items()}


def default_sampler() -> dict:
    s = SamplerSettings()
    return dict(method=s.method, steps=s.steps, cfg=s.cfg, interval_min=s.interval_min, interval_max=s.interval_max)


def records_of(records: list[dict], ema: int) -> list[dict]:
    """The records of EMA `ema` (a record without "ema" is EMA 1), compacted to RECORD_FIELDS."""
    out = []
    for r in records:
        if r.get("ema", 1) == ema:
            c = {k: r.get(k) for k in RECORD_FIELDS}
            c["ema"] = ema
            c["fid_stats"] = os.path.basename(r["fid_stats"]) if r.get("fid_stats") else None
            out.append(c)
    return out


def recommended_sampler(args: dict, records: list[dict], ema: int, epoch: int) -> dict:
    """The best point of the run's sweep (metrics.jsonl records from a sweep, which name their
    checkpoint) for these weights: EMA `ema`, the sweep of this epoch (else the latest one before),
    among its points the most numerous image count, the lowest FID. Else the training flags (the
    first value of a swept flag)."""
    sweeps = [r for r in records if "checkpoint" in r and r.get("ema", 1) == ema and (r.get("checkpoint_epoch") or 0) <= epoch]
    if sweeps:
        last = max(r.get("checkpoint_epoch") or 0 for r in sweeps)
        sweeps = [r for r in sweeps if (r.get("checkpoint_epoch") or 0) == last]
        counts = {}
        for r in sweeps:
            counts[r["num_images"]] = counts.get(r["num_images"], 0) + 1
        n = max(counts, key=lambda k: (counts[k], k))
        best = min((r for r in sweeps if r["num_images"] == n), key=lambda r: r["fid"])
        return {**{k: best[k] for k in default_sampler()}, "schedule": best.get("schedule") or "uniform",
                "chosen_by": f"the best of {counts[n]} sweep points at epoch {last}: FID {best['fid']:.4f} on {n} images"}
    defaults = default_sampler()
    flags = dict(method="sampling_method", steps="num_sampling_steps", cfg="cfg", interval_min="interval_min",
                 interval_max="interval_max", schedule="sampling_schedule")
    defaults = {**defaults, "schedule": SamplerSettings().schedule}
    out = {}
    for key, flag in flags.items():
        value = args.get(flag)
        out[key] = defaults[key] if value is None else (value[0] if isinstance(value, (list, tuple)) else value)
    return {**out, "chosen_by": "the training flags (no sweep in metrics.jsonl)"}


def optimizer_steps(state: checkpoint.TrainState) -> int | None:
    """Optimiser steps taken: AdamW's step counter (None without optimizer state)."""
    counters = [s["step"] for s in ((state.optimizer or {}).get("state") or {}).values() if "step" in s]
    return int(max(float(c) for c in counters)) if counters else None


def export_config(state: checkpoint.TrainState, which: str, *, dtype: str, source: str, records: list[dict]) -> dict:
    """config.json (ours) for the weights `which` ("model", "ema1", ...) of a checkpoint.

    state: the loaded checkpoint; source: its file (the name goes into config.json); records: its
    run's metrics.jsonl eval records (util.sweep.eval_records). Raises CheckpointError if the weights do
    not fit the network the checkpoint's args describe.
    """
    args = state.args
    try:
        state_dict = state.weights(which)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None
    name, network = network_config(args, state_dict)
    check_fits(network, state_dict, f"{source} ({which})")
    ema = 0 if which == "model" else int(which.removeprefix("ema"))
    world = state.world_size or args.get("world_size")
    global_batch = args["batch_size"] * (args.get("accum_iter") or 1) * world if args.get("batch_size") and world else None
    steps = optimizer_steps(state)
    weights = {
        "which": which, "ema_decay": args.get(f"ema_decay{ema}") if ema else None, "epoch": state.epoch,
        "optimizer_steps": steps, "images_seen": steps * global_batch if steps is not None and global_batch else None,
        "num_parameters": sum(v.numel() for k, v in state_dict.items() if k != POS_KEY), "dtype": dtype,
        "source": os.path.basename(source),
    }
    training = {k: args[k] for k in TRAINING_FLAGS if args.get(k) is not None}
    if world:
        training["world_size"] = world
    if global_batch:
        training["global_batch"] = global_batch
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "model": name, "network": network,
            "denoiser": denoiser_config(args), "sampler": recommended_sampler(args, records, ema, state.epoch),
            "weights": weights, "training": training, "evaluations": records_of(records, ema) if ema else []}


def _num(x, digits: int = 4) -> str:
    return "n/a" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


def model_card(config: dict, fmt: str = FORMAT) -> str:
    """README.md: front matter for the Hub (library, tags; the license is left to fill in), what the
    network is, how it was trained, its FID/IS records and how to load and upload the folder."""
    net, den, smp, w, tr = config["network"], config["denoiser"], config["sampler"], config["weights"], config["training"]
    model = config.get("model") or "JiT"
    which = w.get("which", "model")
    who = "the raw (non-EMA) weights" if which == "model" else f"EMA {which.removeprefix('ema')}" + (
        f" (decay {w['ema_decay']})" if w.get("ema_decay") else "")
    seen = f", {w['images_seen']:,} images seen" if w.get("images_seen") else ""
    params = f"{w['num_parameters'] / 1e6:.1f}M parameters, " if w.get("num_parameters") else ""
    lines = [
        "---",
        f"library_name: {'diffusers' if fmt == 'diffusers' else 'jit'}",
        "license:  # fill in the license of these weights (e.g. mit, apache-2.0, cc-by-nc-4.0)",
        "tags:",
        *[f"- {t}" for t in ("jit", "pixel-diffusion", "flow-matching", "class-conditional-image-generation", "image-generation")],
        "---",
        "",
        f"# {model}, {net['input_size']}×{net['input_size']} px, {net['num_classes']} classes",
        "",
        "A JiT (Just image Transformer; Li & He, *Back to Basics: Let Denoising Generative Models Denoise*, "
        "[arXiv 2511.13720](https://arxiv.org/abs/2511.13720)): class-conditional diffusion directly on pixels. "
        f"The ViT sees the noisy image z_t = t·x + (1 − t)·e (t in [0, 1], t = 1 is the clean image x in [−1, 1], "
        f"e ~ N(0, {den['noise_scale']}²)) and predicts {'the clean image x̂' if den['pred'] == 'x' else repr(den['pred']) + ' (its prediction target)'}; "
        f"class {net['num_classes']} is \"no class\" (classifier-free guidance).",
        "",
        "## Weights",
        "",
        f"- {who} after epoch {w.get('epoch', 'n/a')}{seen}; {params}{w.get('dtype', 'float32')}"
        + (f"; exported from `{w['source']}`" if w.get("source") else ""),
        f"- network: depth {net['depth']}, hidden size {net['hidden_size']}, {net['num_heads']} heads, "
        f"{net['patch_size']}×{net['patch_size']} patches through a {net['bottleneck_dim']}-d bottleneck, "
        f"{net['in_context_len']} in-context class tokens from block {net['in_context_start']}, "
        f"dropout {net['attn_drop']} / {net['proj_drop']}",
        f"- denoiser: noise_scale {den['noise_scale']}, t_eps {den['t_eps']}, training times logit-normal "
        f"({den['P_mean']}, {den['P_std']}), label drop {den['label_drop_prob']}, prediction {den['pred']}, loss on {den['loss']}",
        f"- files: `{WEIGHTS[fmt]}` ({'the layout of diffusers JiTTransformer2DModel' if fmt == 'diffusers' else 'names as model_jit.JiT'}), "
        "`config.json` (everything above, the recommended sampler and the records below)",
        "",
    ]
    if any(k in config.get("assumed", ()) for k in ("denoiser", "sampler")):
        lines += ["The denoiser and sampler settings are the defaults: the folder these weights came from did not record them.", ""]
    if tr:
        lines += ["## Training", "", "| setting | value |", "|---|---|", *[f"| `{k}` | {v} |" for k, v in tr.items()], ""]
        if tr.get("global_batch"):
            lines += [f"Global batch {tr['global_batch']} (batch_size × accum_iter × processes)"
                      + (f", {tr['epochs']} epochs planned." if tr.get("epochs") else "."), ""]
    lines += ["## Sampling and evaluation", "",
              f"Recommended sampler: {smp['method']}, {smp['steps']} steps, {smp.get('schedule') or 'uniform'} schedule, CFG {smp['cfg']} for t in "
              f"({smp['interval_min']}, {smp['interval_max']}), chosen by {smp.get('chosen_by', 'the training flags')}.", ""]
    records = config.get("evaluations") or []
    if records:
        lines += ["FID / Inception Score of these weights' EMA in the run's `metrics.jsonl` (best first):", "",
                  "| epoch | method | steps | CFG | interval | images | FID | IS | reference stats |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(records, key=lambda r: (-(r.get("checkpoint_epoch") or 0), r["fid"])):
            lines.append(f"| {_num(r.get('checkpoint_epoch'))} | {r.get('method')} | {r.get('steps')} | {r.get('cfg')} | "
                         f"({r.get('interval_min')}, {r.get('interval_max')}) | {r.get('num_images')} | {_num(r['fid'])} | "
                         f"{_num(r.get('inception_score'), 2)} ± {_num(r.get('inception_score_std'), 2)} | {r.get('fid_stats') or ''} |")
        lines.append("")
    else:
        lines += ["No FID / IS records of these weights were found in the run's `metrics.jsonl`.", ""]
    lines += [
        "## Use", "",
        "With the JiT repository this folder came from (`--resume` takes the folder; the model, sampler and class count come from `config.json`):",
        "```",
        "python sample.py --resume FOLDER --classes 0 1 2 --per_class 8 --output grid.png",
        "python main_jit.py --resume FOLDER --evaluate_gen --num_images 50000 --output_dir eval",
        "python main_jit.py --init_from FOLDER --class_num N --data_path DATA --output_dir finetune  # fine-tune",
        "```",
        "or in Python:",
        "```python",
        "import torch",
        "from util.weights import load_denoiser",
        "model, sampler, config, notes = load_denoiser(\"FOLDER\")",
        "images = model.generate(torch.tensor([0, 1, 2]), sampler)  # (3, 3, H, W), about [-1, 1]",
        "```",
    ]
    if fmt == "diffusers":
        lines += ["With diffusers, once its JiT port (huggingface/diffusers PR #13098) is merged:", "```python",
                  "from diffusers import JiTTransformer2DModel",
                  "model = JiTTransformer2DModel.from_pretrained(\"USER/REPO\")  # or the local folder",
                  "x_hat = model(hidden_states=z, timestep=t, class_labels=y).sample  # t: flow time in [0, 1]",
                  "```"]
    else:
        lines += ["For diffusers (its JiT port, huggingface/diffusers PR #13098), export with `python export.py ... --format diffusers`."]
    lines += ["", "## Upload", "", "With the Hub's own CLI (`pip install huggingface_hub`):", "```",
              "hf auth login                       # once (older versions: huggingface-cli login)",
              "hf upload USER/REPO FOLDER .        # (older versions: huggingface-cli upload USER/REPO FOLDER .)", "```", ""]
    return "\n".join(lines)


def cast(state_dict: dict, dtype: str) -> dict:
    """Floating tensors in `dtype` ("float32" or "bfloat16"; round to nearest)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v for k, v in state_dict.items()}


def write_export(folder: str, config: dict, state_dict: dict, fmt: str = FORMAT) -> list[str]:
    """Write the folder: weights, README.md, then config.json (last, so that a folder with a
    config.json is complete). state_dict: "net.*", already in the dtype config names. Returns the
    paths written; WriteError if one cannot be."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    config = {**config, "format": fmt}
    if fmt == "diffusers":
        tensors, config_json = to_diffusers(state_dict), diffusers_config(config)
    else:
        tensors, config_json = strip_net(state_dict), config
    paths = [os.path.join(folder, n) for n in (WEIGHTS[fmt], CARD, CONFIG)]
    save_safetensors(paths[0], tensors)
    files.atomic_write(paths[1], lambda f: f.write(model_card(config, fmt).encode()))
    files.atomic_write(paths[2], lambda f: f.write((json.dumps(config_json, indent=2) + "\n").encode()))
    return paths


def is_exported(path: str) -> bool:
    """A folder with a config.json (what export.py writes, in either layout)."""
    return bool(path) and os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG))


def read_config(folder: str) -> tuple[dict, str]:
    """(config.json in our layout, the folder's layout "jit" or "diffusers")."""
    path = os.path.join(folder, CONFIG)
    if not os.path.isdir(folder):
        raise CheckpointError(f"{folder}: no such folder")
    if not os.path.isfile(path):
        raise CheckpointError(f"{folder} has no {CONFIG}: not an exported folder (export.py writes one)")
    try:
        with open(path) as f:
            raw = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    if raw.get("_class_name") == DIFFUSERS_CLASS:
        fmt, config = "diffusers", config_from_diffusers(raw, path)
    elif raw.get("format") == FORMAT:
        fmt, config = FORMAT, raw
    else:
        raise CheckpointError(f"{path} is neither a JiT export (\"format\": \"jit\") nor a diffusers {DIFFUSERS_CLASS} config")
    if not isinstance(config.get("format_version", 0), int) or config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(f"{path} has format_version {config['format_version']}; this code reads up to {FORMAT_VERSION}")
    for key in ("network", "denoiser", "sampler"):
        if not isinstance(config.get(key), dict):
            raise CheckpointError(f"{path} has no '{key}' entry")
    missing = [k for k in default_sampler() if k not in config["sampler"]]
    if missing:
        raise CheckpointError(f"{path}: its sampler lacks {', '.join(missing)}")
    config = {"weights": {}, "training": {}, "evaluations": [], **config, "format": fmt}
    config["network"] = {**NETWORK_DEFAULTS, **config["network"]}
    config["denoiser"] = {**DENOISER_DEFAULTS, **config["denoiser"]}
    return config, fmt


def load_exported(folder: str) -> tuple[dict, dict]:
    """(config in our layout, the weights as a Denoiser state dict "net.*") of an exported folder
    in either layout, checked name by name and shape by shape against the network config.json
    describes. CheckpointError (one line) for anything missing, unknown or of another shape."""
    config, fmt = read_config(folder)
    path = os.path.join(folder, WEIGHTS[fmt])
    tensors = read_safetensors(path)
    try:
        state_dict = from_diffusers(tensors) if fmt == "diffusers" else add_net(tensors)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    check_fits(config["network"], state_dict, path)
    return config, state_dict


def flag_values(config: dict) -> dict:
    """{flag name: value} of config.json, for every flag in CONFIG_FLAGS."""
    out = {}
    for flag, path in CONFIG_FLAGS.items():
        value = config
        for key in path:
            value = value.get(key) if isinstance(value, dict) else None
        out[flag] = value
    return out


def _single(value):
    return value[0] if isinstance(value, (list, tuple)) and len(value) == 1 else value


def _agrees(flag: str, value, config: dict, values: dict) -> bool:
    if flag == "model" and values["model"] is None:  # a network of no preset: the preset's keywords must fit
        return value in JiT_models and all(config["network"].get(k) == v for k, v in JiT_models[value].keywords.items()
                                           if k not in ("bottleneck_dim", "in_context_len", "in_context_start"))
    return value == values[flag]


def merge_flags(config: dict, given: dict, where: str = CONFIG) -> tuple[dict, list[str]]:
    """config.json's flag values with the flags the user gave (`given`: {flag: value}; None and
    unknown names are skipped). Returns (values, notes for the log). A given flag of FIXED_FLAGS
    that disagrees with config.json raises ValueError; others override it, and a note says so."""
    values = flag_values(config)
    notes = []
    for flag, value in given.items():
        value = _single(value)
        if flag not in values or value is None or _agrees(flag, value, config, values):
            continue
        if flag in FIXED_FLAGS:
            raise BadValue(f"--{flag} {value} disagrees with {where} ({values[flag]}), the settings these weights "
                             "were trained with: drop the flag")
        notes.append(f"--{flag} {value} overrides {values[flag]} of {where}")
        values[flag] = value
    taken = [f for f in ("model", "img_size", "class_num", "noise_scale", "t_eps", "pred", "loss")
             if f not in given or given[f] is None]
    smp = config.get("sampler", {})
    sampler_taken = any(given.get(f) is None for f in SAMPLER_FLAGS)
    notes.insert(0, f"from {where}: " + " ".join(f"--{f} {values[f]}" for f in taken) + (
        f"; sampler {smp.get('method')}, {smp.get('steps')} steps, CFG {smp.get('cfg')} in "
        f"({smp.get('interval_min')}, {smp.get('interval_max')}), {smp.get('chosen_by', '')}" if sampler_taken else ""))
    if "assumed" in config:
        notes.append(f"{where} records no denoiser or sampler settings (a diffusers folder made elsewhere): "
                     f"their defaults are used (noise_scale {values['noise_scale']}, t_eps {values['t_eps']})")
    return values, notes


def sampler_from(values: dict) -> SamplerSettings:
    """The SamplerSettings of merged flag values (ValueError for an invalid one)."""
    return SamplerSettings(method=values["sampling_method"], steps=int(values["num_sampling_steps"]), cfg=float(values["cfg"]),
                           interval_min=float(values["interval_min"]), interval_max=float(values["interval_max"]),
                           schedule=values.get("sampling_schedule") or "uniform")


def _denoiser_keywords(values: dict) -> dict:
    accepted = inspect.signature(Denoiser).parameters
    out = {}
    for k, default in DENOISER_DEFAULTS.items():
        if k in accepted:
            out[k] = values[k]
        elif values[k] != default:
            raise BadValue(f"these weights were trained with {k}={values[k]!r}, which denoiser.Denoiser does not support")
    return out


def _build(config: dict, values: dict, runtime: dict) -> Denoiser:
    network = {**config["network"], "attn_drop": values["attn_dropout"], "proj_drop": values["proj_dropout"]}
    net = JiT(**network, **runtime)
    return Denoiser(net, network["num_classes"], **_denoiser_keywords(values))


def build_from_config(config: dict, overrides: dict | None = None, where: str = CONFIG) -> tuple[Denoiser, list[str]]:
    """A freshly initialised Denoiser of config.json's network and settings (see merge_flags for
    `overrides`, {flag: value}; "attn_impl" and "grad_checkpoint" choose how the network runs).
    Returns (denoiser, notes for the log)."""
    overrides = overrides or {}
    values, notes = merge_flags(config, overrides, where)
    runtime = {k: overrides[k] for k in RUNTIME_KEYWORDS if overrides.get(k) is not None}
    return _build(config, values, runtime), notes


class Loaded(NamedTuple):
    denoiser: Denoiser  # in eval mode, on the CPU
    sampler: SamplerSettings  # config.json's recommended sampler, with the overrides
    config: dict  # config.json in our layout
    notes: list  # what came from config.json and what the overrides changed


def load_denoiser(source, overrides: dict | None = None, where: str | None = None) -> Loaded:
    """An exported folder (either layout), or (config in our layout, state dict "net.*"), as a
    Denoiser with its weights and the sampler to use. CheckpointError / BadValue (one line) for a
    folder or flag that does not fit."""
    config, state_dict = load_exported(source) if isinstance(source, str) else source
    overrides = overrides or {}
    where = where or os.path.join(source, CONFIG)
    values, notes = merge_flags(config, overrides, where)
    runtime = {k: overrides[k] for k in RUNTIME_KEYWORDS if overrides.get(k) is not None}
    with torch.random.fork_rng(devices=[]):  # the fresh initialisation is overwritten: leave the RNG as it was
        model = _build(config, values, runtime)
    checkpoint.load_module(model, state_dict, where, values)
    return Loaded(model.eval(), sampler_from(values), config, notes)


def command_line_sampler(config: dict, flags) -> dict:
    """config.json with the sampler of the flags (--sampling_method, --num_sampling_steps, --cfg,
    --interval_min, --interval_max of `flags`) in place of its own: a checkpoint samples with the
    command line's, an exported folder with its recommendation."""
    sampler = {"method": flags.sampling_method, "steps": flags.num_sampling_steps, "cfg": flags.cfg,
               "interval_min": flags.interval_min, "interval_max": flags.interval_max,
               "schedule": getattr(flags, "sampling_schedule", None) or "uniform", "chosen_by": "the command line's"}
    return {**config, "sampler": sampler}


def changed_flags(parser: argparse.ArgumentParser, args: argparse.Namespace) -> set[str]:
    """The flags of `args` whose values differ from the parser's defaults: what the user chose. A flag
    left at (or set to) its default takes the weights' value (apply_config)."""
    return {k for k, v in vars(args).items() if v != parser.get_default(k)}


def apply_config(args: argparse.Namespace, config: dict, given: set, where: str = CONFIG) -> list[str]:
    """Set the flags of `args` that the user did not give (`given`, see given_flags) from config.json;
    given ones override it (merge_flags). A FIXED_FLAGS value the script has no flag for must
    equal what the script builds (the preset's knob, x-prediction), else ValueError. Returns the notes."""
    values, notes = merge_flags(config, {k: getattr(args, k) for k in given if hasattr(args, k)}, where)
    if values["model"] not in JiT_models:
        raise BadValue(f"{where}: its network ({describe_network(config['network'])}) matches no preset of model_jit.JiT_models")
    for flag, value in values.items():
        if hasattr(args, flag):
            if flag not in given:
                setattr(args, flag, value)
        elif flag in ("bottleneck_dim", "in_context_len", "in_context_start", "pred"):
            built = DENOISER_DEFAULTS[flag] if flag == "pred" else JiT_models[values["model"]].keywords[flag]
            if value != built:
                raise BadValue(f"{where} has {flag} {value}, but this script has no --{flag} flag and would build {built}")
    return notes


def as_train_state(config: dict, state_dict: dict) -> checkpoint.TrainState:
    """An exported folder as a weights-only TrainState: `model` and EMA 1 are its one network (the
    other EMAs then start from it, see TrainState.ema_states), no optimizer, `epoch` its epoch."""
    epoch = config.get("weights", {}).get("epoch")
    epoch = -1 if epoch is None else epoch
    return checkpoint.TrainState(model=state_dict, emas=[state_dict], optimizer=None, epoch=epoch, args=flag_values(config),
                                 start={"epoch": epoch + 1, "step": 0})


def load_checkpoint(path: str, log=print) -> tuple[checkpoint.TrainState, str]:
    """A checkpoint file, or the newest readable checkpoint-*.pth of a run folder
    (checkpoint.find_checkpoint). CheckpointError if there is none."""
    state, file = checkpoint.find_checkpoint(path, log)
    if state is None:
        raise CheckpointError(f"{path} has no checkpoint-*.pth and no {CONFIG}")
    return state, file


def weights_name(ema: int) -> str:
    """--ema / --init_ema K -> "ema{K}", 0 -> "model" (the raw weights)."""
    if ema not in (0, 1, 2, 3):
        raise BadValue(f"the EMA must be 0 (the raw model), 1, 2 or 3, got {ema}")
    return "model" if ema == 0 else f"ema{ema}"


def adapt_for_init(source_sd: dict, target, where: str = "--init_from") -> tuple[dict, list[str]]:
    """The state dict (keys "net.*") that starts `target` (a freshly initialised Denoiser) from
    `source_sd`: every tensor of the source, except
    - the label embedding when the class count differs: the target's fresh one (a custom dataset);
    - the fixed sin-cos position embedding when the patch grid (img_size) differs: the target's,
      built for its grid (the RoPE tables are not in state dicts: they follow the target anyway).
    Any other difference raises CheckpointError. Returns (state dict, notes for the log). A sharded
    (FSDP) target is gathered for the two tensors: then call it on every rank."""
    target_sd = target.state_dict()
    for label, names in (("unknown tensor", [k for k in source_sd if k not in target_sd]),
                         ("missing tensor", [k for k in target_sd if k not in source_sd])):
        if names:
            raise CheckpointError(f"{where}: {label} {names[0]} for this model (check --model and its knobs)")
    out, notes = {}, []
    for k, fresh in target_sd.items():
        src = source_sd[k]
        if src.shape == fresh.shape:
            out[k] = src
            continue
        if k == LABEL_KEY:
            notes.append(f"{where}: the label embedding is freshly initialised: {src.shape[0] - 1} classes there, "
                         f"--class_num {fresh.shape[0] - 1} here (every other tensor is kept)")
        elif k == POS_KEY and src.shape[-1] == fresh.shape[-1]:
            net = getattr(target, "net", target)
            old, new = math.isqrt(src.shape[1]), math.isqrt(fresh.shape[1])
            notes.append(f"{where}: the fixed sin-cos position embedding and the RoPE tables are rebuilt for "
                         f"{new}×{new} patches (--img_size {new * net.patch_size}; the weights were trained at "
                         f"{old * net.patch_size})")
        else:
            raise CheckpointError(f"{where}: {k} has shape {list(src.shape)} there but {list(fresh.shape)} in this model; "
                                  "only --class_num and --img_size may differ (check --model and its knobs)")
        out[k] = (fresh.full_tensor() if hasattr(fresh, "full_tensor") else fresh).detach().clone()
    return out, notes


def init_from(path: str, ema: int, target, log=print) -> tuple[dict, list[str], dict]:
    """--init_from PATH --init_ema K: the weights that start `target` (a freshly initialised Denoiser)
    from a checkpoint file, run folder or exported folder (its one network; K is then not used).
    Returns (state dict "net.*" for the model and every EMA, notes for the log, origin: a plain
    dict of where the weights came from, for the checkpoints' args)."""
    try:
        source_sd, origin, got = _init_source(path, ema, log)
    except CheckpointError as e:
        raise CheckpointError(f"--init_from {e}") from None
    state_dict, notes = adapt_for_init(source_sd, target, where=f"--init_from {path}")
    notes.insert(0, f"--init_from: the model and every EMA start from {got}; a fresh optimizer, epoch 0")
    return state_dict, notes, origin


def _init_source(path: str, ema: int, log) -> tuple[dict, dict, str]:
    """(state dict, origin, a description) of --init_from's weights."""
    if is_exported(path):
        config, state_dict = load_exported(path)
        w = config.get("weights", {})
        origin = {"path": os.path.abspath(path), "weights": w.get("which"), "epoch": w.get("epoch"),
                  "model": config.get("model"), "img_size": config["network"]["input_size"],
                  "class_num": config["network"]["num_classes"]}
        return state_dict, origin, f"the exported {origin['weights'] or 'weights'} of {path}" + (
            " (--init_ema does not apply: the folder holds one network)" if ema != 1 else "")
    state, file = load_checkpoint(path, log)
    which = weights_name(ema)
    try:
        state_dict = state.weights(which)
    except CheckpointError as e:
        raise CheckpointError(f"{file}: {e}") from None
    origin = {"path": os.path.abspath(file), "weights": which, "epoch": state.epoch, "model": state.args.get("model"),
              "img_size": state.args.get("img_size"), "class_num": state.args.get("class_num")}
    return state_dict, origin, f"the {which} weights of {file} (epoch {state.epoch})"


def evaluation_source(flags: argparse.Namespace, changed: set, log=print) -> tuple[checkpoint.TrainState, str]:
    """--evaluate_gen: (weights, path) of what `flags.resume` names (a checkpoint or an exported
    folder), or of the snapshots `flags.phema` names (then flags.phema_at is set to the step they are
    reconstructed at). The flags the user left at their defaults (not in `changed`) take the values
    the weights were trained with (apply_config); an exported folder also brings its recommended
    sampler, a checkpoint samples with the command line's. BadValue for a contradicting flag."""
    if is_exported(flags.resume):
        exported, state_dict = load_exported(flags.resume)
        if max(sweep.as_list(flags.ema)) > 1:
            raise BadValue(f"--ema {max(sweep.as_list(flags.ema))}: the exported folder {flags.resume} holds one network (--ema 1)")
        state, path = as_train_state(exported, state_dict), flags.resume
    else:
        if flags.phema:
            (state, flags.phema_at), path = phema.snapshot_state(flags.phema, flags.phema_at), os.path.abspath(flags.phema)
        else:
            state, path = load_checkpoint(flags.resume, log=log)
        exported = command_line_sampler(export_config(state, "model", dtype="float32", source=path, records=[]), flags)
    for note in apply_config(flags, exported, changed, where=path):
        log(f"note: {note}")
    return state, path


def initial_state(path: str, ema: int, target, log=print) -> tuple[checkpoint.TrainState, dict]:
    """--init_from PATH --init_ema K: (the weights that start a new run as a weights-only TrainState
    for Checkpointer.initialise, origin: where they came from, for the run's args). See init_from."""
    state_dict, notes, origin = init_from(path, ema, target, log=log)
    for note in notes:
        log(f"note: {note}")
    return checkpoint.TrainState(model=state_dict, emas=[state_dict], optimizer=None, epoch=-1, args={},
                                 start={"epoch": 0, "step": 0}), origin
