"""Where a run's weights come from, and what they bring to its config: the checkpoint or exported
folder (or post-hoc EMA snapshots) that --evaluate_gen scores, with the flags it adopts from them
(the flags the user typed override or contradict them), and the weights --init_from starts a new
run from. main_jit.py's build_run is the one user; sample.py and export.py read checkpoints through
load_checkpoint. The folder format and the flags config.json keeps are weights.py; what the
network's shapes imply is model_jit_adapters.py. Every error is one line (CheckpointError, BadValue).
"""

import os

from model_jit_adapters import adapt_for_init, describe_network, is_preset, preset_knob
from util import checkpoint, phema_run, sweep
from util.checkpoint import CheckpointError
from util.errors import BadValue
from weights import (
    CONFIG,
    DENOISER_DEFAULTS,
    as_train_state,
    command_line_sampler,
    export_config,
    is_exported,
    load_exported,
    merge_flags,
)


def load_checkpoint(path: str, log=print) -> tuple[checkpoint.TrainState, str]:
    """A checkpoint file, or the newest readable checkpoint-*.pth of a run folder
    (checkpoint.load_checkpoint). CheckpointError if there is none."""
    state, file = checkpoint.load_checkpoint(path, log, required=False)
    if state is None:
        raise CheckpointError(f"{path} has no checkpoint-*.pth and no {CONFIG}")
    return state, file


def weights_name(ema: int) -> str:
    """--ema / --init_ema K -> "ema{K}", 0 -> "model" (the raw weights)."""
    if ema not in (0, 1, 2, 3):
        raise BadValue(f"the EMA must be 0 (the raw model), 1, 2 or 3, got {ema}")
    return "model" if ema == 0 else f"ema{ema}"


def adopt_settings(flags, config: dict, where: str = CONFIG) -> tuple[dict, list[str]]:
    """The values config.json gives the flags the user did not type (`flags.given`); typed ones
    override it, or contradict it (BadValue, see merge_flags). A FIXED_FLAGS value the script has no
    flag for must equal what the script builds (the preset's knob, x-prediction), else BadValue.
    Returns ({flag: value} to adopt, notes for the log): `flags.replace(**values)` is the new config."""
    values, notes = merge_flags(config, {k: getattr(flags, k) for k in flags.given if k in flags}, where)
    if not is_preset(values["model"]):
        raise BadValue(
            f"{where}: its network ({describe_network(config['network'])}) matches no preset of model_jit.JiT_models"
        )
    adopted = {}
    for flag, value in values.items():
        if flag in flags:
            if flag not in flags.given:
                adopted[flag] = value
        elif flag in ("bottleneck_dim", "in_context_len", "in_context_start", "pred"):
            built = DENOISER_DEFAULTS[flag] if flag == "pred" else preset_knob(values["model"], flag)
            if value != built:
                raise BadValue(
                    f"{where} has {flag} {value}, but this script has no --{flag} flag and would build {built}"
                )
    return adopted, notes


def evaluation_source(flags, log=print) -> tuple[checkpoint.TrainState, str, object]:
    """--evaluate_gen: (weights, path, config) of what `flags.resume` names (a checkpoint or an exported
    folder), or of the snapshots `flags.phema` names (then config.phema_at is the step they are
    reconstructed at). `flags` is a util.config.RunConfig; the returned config is it with the values
    the weights were trained with for the flags the user did not type (adopt_settings); an exported
    folder also brings its recommended sampler, a checkpoint samples with the command line's.
    BadValue for a contradicting flag."""
    changes = {}
    if is_exported(flags.resume):
        exported, state_dict = load_exported(flags.resume)
        if max(sweep.as_list(flags.ema)) > 1:
            raise BadValue(
                f"--ema {max(sweep.as_list(flags.ema))}: the exported folder {flags.resume} holds one network (--ema 1)"
            )
        state, path = as_train_state(exported, state_dict), flags.resume
    else:
        if flags.phema:
            (state, changes["phema_at"]), path = (
                phema_run.snapshot_state(flags.phema, flags.phema_at, flags.phema_run),
                os.path.abspath(flags.phema),
            )
        else:
            state, path = load_checkpoint(flags.resume, log=log)
        exported = command_line_sampler(export_config(state, "model", dtype="float32", source=path, records=[]), flags)
    adopted, notes = adopt_settings(flags, exported, where=path)
    for note in notes:
        log(f"note: {note}")
    return state, path, flags.replace(**adopted, **changes)


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
        origin = {
            "path": os.path.abspath(path),
            "weights": w.get("which"),
            "epoch": w.get("epoch"),
            "model": config.get("model"),
            "img_size": config["network"]["input_size"],
            "class_num": config["network"]["num_classes"],
        }
        return (
            state_dict,
            origin,
            f"the exported {origin['weights'] or 'weights'} of {path}"
            + (" (--init_ema does not apply: the folder holds one network)" if ema != 1 else ""),
        )
    state, file = load_checkpoint(path, log)
    which = weights_name(ema)
    try:
        state_dict = state.weights(which)
    except CheckpointError as e:
        raise CheckpointError(f"{file}: {e}") from None
    origin = {
        "path": os.path.abspath(file),
        "weights": which,
        "epoch": state.epoch,
        "model": state.args.get("model"),
        "img_size": state.args.get("img_size"),
        "class_num": state.args.get("class_num"),
    }
    return state_dict, origin, f"the {which} weights of {file} (epoch {state.epoch})"


def initial_state(path: str, ema: int, target, log=print) -> tuple[checkpoint.TrainState, dict]:
    """--init_from PATH --init_ema K: (the weights that start a new run as a weights-only TrainState
    for Checkpointer.initialise, origin: where they came from, for the run's args). See init_from."""
    state_dict, notes, origin = init_from(path, ema, target, log=log)
    for note in notes:
        log(f"note: {note}")
    return checkpoint.TrainState.weights_only(state_dict), origin
