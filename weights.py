"""Exported weights: one network in a folder that rebuilds and samples without our flags, and the
weights a fine-tuning run starts from.

Two layouts, each a folder with a README.md model card (model_card.py):
- ours, "jit": model.safetensors (the JiT's state dict, names as model_jit.JiT's) and config.json
  {format: "jit", format_version, model (the preset), network (JiT's constructor keywords),
  denoiser (Denoiser's keywords, pred, loss), sampler (the recommended one), weights (which EMA,
  its decay, epoch, images seen, dtype), training (the run's flags), evaluations (FID/IS records)}.
- diffusers: diffusion_pytorch_model.safetensors and config.json as diffusers' JiTTransformer2DModel
  (huggingface/diffusers PR #13098) reads them; our other entries ride along under the key "_jit",
  which diffusers ignores (it drops config keys that start with "_").

Inside this repository weights are always the Denoiser's state dict (keys "net.*"); the files hold
the network's own names. Every error is one line: CheckpointError for files and weights, ValueError
for settings. What this module knows of the network (its keywords from tensor shapes, the diffusers
name table, adapting a state dict to another class count or image size) is model_jit_adapters.py;
checkpoints are read by util.checkpoint; what a run takes from weights (--evaluate_gen's source and
the flags it adopts, --init_from) is run_sources.py. The flags config.json keeps (CONFIG_FLAGS) and
their merging with the typed ones (merge_flags, by util.config.merge) are here.
"""

import inspect
import json
import math
import os
from typing import NamedTuple

import safetensors.torch
import torch

from denoiser import Denoiser
from model_card import default_sampler, model_card, recommended_sampler, records_of
from model_jit_adapters import (
    DIFFUSERS_CLASS,
    DIFFUSERS_CONFIG,
    NETWORK_DEFAULTS,
    NORM_EPS,
    POS_KEY,
    RUNTIME_KEYWORDS,
    add_net,
    build_denoiser,
    check_fits,
    diffusers_refusal,
    fits_preset,
    from_diffusers,
    network_config,
    preset_of,
    strip_net,
    to_diffusers,
)
from sampling import SamplerSettings, upgrade_schedule
from util import checkpoint, files
from util import config as run_config
from util.checkpoint import CheckpointError
from util.errors import BadValue

FORMAT = "jit"
FORMAT_VERSION = 1
FORMATS = ("jit", "diffusers")
CONFIG = "config.json"
CARD = "README.md"
WEIGHTS = {"jit": "model.safetensors", "diffusers": "diffusion_pytorch_model.safetensors"}
EXPORT_DTYPES = ("float32", "bfloat16")  # names in util.checkpoint.DTYPES
# Denoiser keywords kept in config.json, with their defaults (the fallback for a reference checkpoint
# whose args lack one); pred / loss: prediction target and loss space, "x" / "v" unless the
# Denoiser says otherwise.
DENOISER_DEFAULTS = {
    k: p.default
    for k, p in inspect.signature(Denoiser).parameters.items()
    if k in ("P_mean", "P_std", "noise_scale", "t_eps", "label_drop_prob", "pred", "loss")
}

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
TRAINING_FLAGS = tuple(
    """model img_size class_num epochs warmup_epochs batch_size accum_iter world_size lr blr min_lr lr_schedule
    weight_decay ema_decay1 ema_decay2 ema_decay3 P_mean P_std noise_scale t_eps label_drop_prob pred loss
    attn_dropout proj_dropout bottleneck_dim in_context_len in_context_start seed init_from init_ema
    init_origin""".split()
)


def diffusers_config(config: dict) -> dict:
    """Our config.json -> the port's: its constructor keys, _class_name, and our entries under _jit."""
    net = config["network"]
    return {
        "_class_name": DIFFUSERS_CLASS,
        **{d: net[o] for d, o in DIFFUSERS_CONFIG},
        "norm_eps": NORM_EPS,
        "_jit": {k: v for k, v in config.items() if k not in ("network", "format")},
    }


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
        return {
            "format_version": FORMAT_VERSION,
            "model": preset_of(network),
            "network": network,
            "denoiser": {},
            "sampler": {**default_sampler(), "chosen_by": "the sampler's defaults"},
            "assumed": ["denoiser", "sampler"],
        }
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


def denoiser_config(args: dict) -> dict:
    """The Denoiser's settings of a run (its defaults where args lack one, as in reference files)."""
    return {k: args[k] if args.get(k) is not None else v for k, v in DENOISER_DEFAULTS.items()}


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
    global_batch = (
        args["batch_size"] * (args.get("accum_iter") or 1) * world if args.get("batch_size") and world else None
    )
    steps = optimizer_steps(state)
    weights = {
        "which": which,
        "ema_decay": args.get(f"ema_decay{ema}") if ema else None,
        "epoch": state.epoch,
        "optimizer_steps": steps,
        "images_seen": steps * global_batch if steps is not None and global_batch else None,
        "num_parameters": sum(v.numel() for k, v in state_dict.items() if k != POS_KEY),
        "dtype": dtype,
        "source": os.path.basename(source),
    }
    training = {k: args[k] for k in TRAINING_FLAGS if args.get(k) is not None}
    if world:
        training["world_size"] = world
    if global_batch:
        training["global_batch"] = global_batch
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": name,
        "network": network,
        "denoiser": denoiser_config(args),
        "sampler": recommended_sampler(args, records, ema, state.epoch),
        "weights": weights,
        "training": training,
        "evaluations": records_of(records, ema) if ema else [],
    }


def cast(state_dict: dict, dtype: str) -> dict:
    """Floating tensors in `dtype` ("float32" or "bfloat16"; round to nearest)."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    return {k: v.to(checkpoint.DTYPES[dtype]) if v.is_floating_point() else v for k, v in state_dict.items()}


def write_export(folder: str, config: dict, state_dict: dict, fmt: str = FORMAT) -> list[str]:
    """Write the folder: weights, README.md, then config.json (last, so that a folder with a
    config.json is complete). state_dict: "net.*", already in the dtype config names. Returns the
    paths written; WriteError if one cannot be."""
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    config = {**config, "format": fmt}
    if fmt == "diffusers" and (why := diffusers_refusal(config["network"])):
        raise BadValue(why)
    if fmt == "diffusers":
        tensors, config_json = to_diffusers(state_dict), diffusers_config(config)
    else:
        tensors, config_json = strip_net(state_dict), config
    paths = [os.path.join(folder, n) for n in (WEIGHTS[fmt], CARD, CONFIG)]
    save_safetensors(paths[0], tensors)
    files.atomic_write(paths[1], lambda f: f.write(model_card(config, fmt, WEIGHTS[fmt]).encode()))
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
        raise CheckpointError(
            f'{path} is neither a JiT export ("format": "jit") nor a diffusers {DIFFUSERS_CLASS} config'
        )
    if not isinstance(config.get("format_version", 0), int) or config.get("format_version", 0) > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {config['format_version']}; this code reads up to {FORMAT_VERSION}"
        )
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
    if isinstance(out["sampling_schedule"], str):  # a folder exported before a schedule was renamed
        out["sampling_schedule"] = upgrade_schedule(out["sampling_schedule"])
    return out


def merge_flags(config: dict, given: dict, where: str = CONFIG) -> tuple[dict, list[str]]:
    """config.json's flag values with the flags the user gave (`given`: {flag: value}): see
    util.config.merge; FIXED_FLAGS disagree (BadValue), the others override. Returns (values, notes
    for the log), the first note saying what came from config.json."""

    def agrees(flag, value, values):
        if flag == "model" and values["model"] is None:  # a network of no preset: the preset's keywords must fit
            return fits_preset(value, config["network"])
        return value == values[flag]

    values, notes = run_config.merge(flag_values(config), given, fixed=FIXED_FLAGS, where=where, agrees=agrees)
    taken = [
        f
        for f in ("model", "img_size", "class_num", "noise_scale", "t_eps", "pred", "loss")
        if f not in given or given[f] is None
    ]
    smp = config.get("sampler", {})
    sampler_taken = any(given.get(f) is None for f in SAMPLER_FLAGS)
    notes.insert(
        0,
        f"from {where}: "
        + " ".join(f"--{f} {values[f]}" for f in taken)
        + (
            f"; sampler {smp.get('method')}, {smp.get('steps')} steps, CFG {smp.get('cfg')} in "
            f"({smp.get('interval_min')}, {smp.get('interval_max')}), {smp.get('chosen_by', '')}"
            if sampler_taken
            else ""
        ),
    )
    if "assumed" in config:
        notes.append(
            f"{where} records no denoiser or sampler settings (a diffusers folder made elsewhere): "
            f"their defaults are used (noise_scale {values['noise_scale']}, t_eps {values['t_eps']})"
        )
    return values, notes


def sampler_from(values: dict) -> SamplerSettings:
    """The SamplerSettings of merged flag values (ValueError for an invalid one)."""
    return SamplerSettings(
        method=values["sampling_method"],
        steps=int(values["num_sampling_steps"]),
        cfg=float(values["cfg"]),
        interval_min=float(values["interval_min"]),
        interval_max=float(values["interval_max"]),
        schedule=values.get("sampling_schedule") or "uniform",
    )


def _denoiser_keywords(values: dict) -> dict:
    accepted = inspect.signature(Denoiser).parameters
    out = {}
    for k, default in DENOISER_DEFAULTS.items():
        if k in accepted:
            out[k] = values[k]
        elif values[k] != default:
            raise BadValue(
                f"these weights were trained with {k}={values[k]!r}, which denoiser.Denoiser does not support"
            )
    return out


def _build(config: dict, values: dict, runtime: dict) -> Denoiser:
    network = {**config["network"], "attn_drop": values["attn_dropout"], "proj_drop": values["proj_dropout"]}
    return build_denoiser(network, _denoiser_keywords(values), runtime)


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
    try:
        sampler = sampler_from(values)
    except ValueError as e:  # an old or edited recommendation (e.g. edm:7 at 50 steps, power:7 now)
        raise BadValue(f"the sampler of {where}: {e} (choose one with the sampler flags)") from None
    runtime = {k: overrides[k] for k in RUNTIME_KEYWORDS if overrides.get(k) is not None}
    with torch.random.fork_rng(devices=[]):  # the fresh initialisation is overwritten: leave the RNG as it was
        model = _build(config, values, runtime)
    checkpoint.load_module(model, state_dict, where, values)
    return Loaded(model.eval(), sampler, config, notes)


def command_line_sampler(config: dict, flags) -> dict:
    """config.json with the sampler of the flags (--sampling_method, --num_sampling_steps, --cfg,
    --interval_min, --interval_max of `flags`) in place of its own: a checkpoint samples with the
    command line's, an exported folder with its recommendation."""
    sampler = {
        "method": flags.sampling_method,
        "steps": flags.num_sampling_steps,
        "cfg": flags.cfg,
        "interval_min": flags.interval_min,
        "interval_max": flags.interval_max,
        "schedule": getattr(flags, "sampling_schedule", None) or "uniform",
        "chosen_by": "the command line's",
    }
    return {**config, "sampler": sampler}


def as_train_state(config: dict, state_dict: dict) -> checkpoint.TrainState:
    """An exported folder as a weights-only TrainState: `model` and EMA 1 are its one network (the
    other EMAs then start from it, see TrainState.ema_states), no optimizer, `epoch` its epoch."""
    epoch = config.get("weights", {}).get("epoch")
    epoch = -1 if epoch is None else epoch
    return checkpoint.TrainState.weights_only(state_dict, epoch=epoch, args=flag_values(config))
