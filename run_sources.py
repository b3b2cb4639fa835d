"""Where a run's weights come from, and what they bring to its config: read once, by main_jit.resolve
(read_source), into a Source that main_jit.build loads.

- training: the checkpoint --resume names (its run identity carries over), else the weights
  --init_from starts a new run from (read here, adapted to the new network in build: adapt_init);
- --evaluate_gen: the checkpoint or exported folder --resume names, or the post-hoc EMA snapshots
  --phema names, with the flags it adopts from them (the flags the user typed override or
  contradict them: adopt_settings).

read_weights is the one reader of "a checkpoint or an exported folder" (sample.py and export.py
use it too); checkpoint files are read by util.checkpoint.load_checkpoint, exported folders by
weights.load_exported. What the network's shapes imply is model_jit_adapters.py. Every error is
one line (CheckpointError, BadValue).
"""

import os
from dataclasses import dataclass

from model_jit_adapters import adapt_for_init, describe_network, is_preset, preset_knob
from util import checkpoint, phema_run, sweep
from util.checkpoint import CheckpointError, TrainState
from util.checkpointer import check_objective
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


@dataclass(frozen=True)
class InitWeights:
    """--init_from's weights as read: the state dict ("net.*") of the source's network, where they
    came from (`origin`, a plain dict for the checkpoints' args) and a description for the log."""

    state_dict: dict
    origin: dict
    description: str


@dataclass(frozen=True)
class Source:
    """Where a run's weights come from, read once (read_source). state, path: the checkpoint resumed
    or evaluated (an exported folder or post-hoc EMA snapshots as a weights-only TrainState; under
    FSDP, on ranks other than 0, without its tensors), or None; init: --init_from's weights when no
    checkpoint is resumed (None: none); notes: what the run says of its flags and weights before it
    starts (main_jit.resolve), printed into its log by build."""

    state: TrainState | None = None
    path: str | None = None
    init: InitWeights | None = None
    notes: tuple[str, ...] = ()


def read_weights(path: str, log=print) -> tuple[TrainState, str, dict | None]:
    """(state, file, exported config or None) of the weights `path` names: an exported folder
    (weights.load_exported; its one network as a weights-only TrainState whose args are its flag
    values, and its config.json in our layout) or a checkpoint file or run folder (the newest
    readable checkpoint: util.checkpoint.load_checkpoint). CheckpointError if it names neither."""
    if is_exported(path):
        config, state_dict = load_exported(path)
        return as_train_state(config, state_dict), path, config
    state, file = checkpoint.load_checkpoint(path, log, required=False)
    if state is None:
        raise CheckpointError(f"{path} has no checkpoint-*.pth and no {CONFIG}")
    return state, file, None


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


def evaluation_source(flags, log=print) -> tuple[TrainState, str, object]:
    """--evaluate_gen: (weights, path, config) of what `flags.resume` names (a checkpoint or an exported
    folder), or of the snapshots `flags.phema` names (then config.phema_at is the step they are
    reconstructed at). `flags` is a util.config.RunConfig; the returned config is it with the values
    the weights were trained with for the flags the user did not type (adopt_settings); an exported
    folder also brings its recommended sampler, a checkpoint samples with the command line's.
    BadValue for a contradicting flag."""
    changes, exported = {}, None
    if flags.phema:
        state, changes["phema_at"] = phema_run.snapshot_state(flags.phema, flags.phema_at, flags.phema_run)
        path = os.path.abspath(flags.phema)
    else:
        state, path, exported = read_weights(flags.resume, log)
    if exported is not None and max(sweep.as_list(flags.ema)) > 1:
        raise BadValue(
            f"--ema {max(sweep.as_list(flags.ema))}: the exported folder {flags.resume} holds one network (--ema 1)"
        )
    if exported is None:
        exported = command_line_sampler(export_config(state, "model", dtype="float32", source=path, records=[]), flags)
    adopted, notes = adopt_settings(flags, exported, where=path)
    for note in notes:
        log(f"note: {note}")
    return state, path, flags.replace(**adopted, **changes)


def read_init(path: str, ema: int, log=print) -> InitWeights:
    """--init_from PATH --init_ema K: the weights a new run starts from, out of a checkpoint file,
    run folder or exported folder (its one network; K is then not used). CheckpointError, naming
    --init_from, if there are none."""
    try:
        state, file, exported = read_weights(path, log)
        if exported is not None:
            return _exported_init(path, state, exported, ema)
        which = weights_name(ema)
        try:
            state_dict = state.weights(which)
        except CheckpointError as e:
            raise CheckpointError(f"{file}: {e}") from None
    except CheckpointError as e:
        raise CheckpointError(f"--init_from {e}") from None
    origin = {
        "path": os.path.abspath(file),
        "weights": which,
        "epoch": state.epoch,
        "model": state.args.get("model"),
        "img_size": state.args.get("img_size"),
        "class_num": state.args.get("class_num"),
    }
    return InitWeights(state_dict, origin, f"the {which} weights of {file} (epoch {state.epoch})")


def _exported_init(path: str, state: TrainState, config: dict, ema: int) -> InitWeights:
    w = config.get("weights", {})
    origin = {
        "path": os.path.abspath(path),
        "weights": w.get("which"),
        "epoch": w.get("epoch"),
        "model": config.get("model"),
        "img_size": config["network"]["input_size"],
        "class_num": config["network"]["num_classes"],
    }
    got = f"the exported {origin['weights'] or 'weights'} of {path}" + (
        " (--init_ema does not apply: the folder holds one network)" if ema != 1 else ""
    )
    return InitWeights(state.model, origin, got)


def adapt_init(init: InitWeights, target, where: str) -> tuple[TrainState, list[str]]:
    """(the weights that start `target`, a freshly initialised Denoiser, from `init` as a weights-only
    TrainState for Checkpointer.initialise, notes for the log): model_jit_adapters.adapt_for_init."""
    state_dict, notes = adapt_for_init(init.state_dict, target, where=f"--init_from {where}")
    notes.insert(0, f"--init_from: the model and every EMA start from {init.description}; a fresh optimizer, epoch 0")
    return TrainState.weights_only(state_dict), notes


def own_folder_to_come(resume: str, output_dir: str) -> bool:
    """Whether --resume names the run's own --output_dir, which does not exist yet (util.runlock.take
    makes it): a first run of the command that resumes from its own folder (`--resume DIR
    --output_dir DIR`, what a requeued job reruns), with nothing to resume yet."""
    return bool(resume) and not os.path.exists(resume) and os.path.abspath(resume) == os.path.abspath(output_dir)


def read_source(config, log=print) -> tuple[object, Source]:
    """(config, Source) of a run: `config` (a util.config.RunConfig, derived values included) with
    what its weights bring, and the weights. --evaluate_gen: evaluation_source. Training: the
    checkpoint --resume names (rank 0 alone reads it under FSDP: collective), checked against the
    flags (the same --pred / --loss, --phema_stds: CheckpointError), whose run identity (init_origin,
    run_id) the config takes; else --init_from's weights (read_init; config.init_origin). Every
    message (notes, unreadable checkpoints skipped) goes to `log`."""
    if config.evaluate_gen:
        state, path, config = evaluation_source(config, log)
        return config, Source(state, path)
    if own_folder_to_come(config.resume, config.output_dir):  # a first run resumes from its own folder
        state, path = None, None
    else:
        state, path = checkpoint.load_checkpoint(config.resume, log, required=False, main_only=config.fsdp)
    if state is not None:
        check_objective(state, path, config.pred, config.loss)
        phema_run.check_resume_stds(state, path, config.phema_stds)
        if config.init_from:
            log(f"note: --resume found {path}: it continues that run, --init_from {config.init_from} is not used")
        identity = {k: state.args[k] for k in ("init_origin", "run_id") if k in state.args}
        return config.replace(**identity), Source(state, path)
    if config.resume:
        log(f"no checkpoint in {config.resume}: training from scratch")
    if not config.init_from:
        return config, Source()
    init = read_init(config.init_from, config.init_ema, log)
    return config.replace(init_origin=init.origin), Source(init=init)
