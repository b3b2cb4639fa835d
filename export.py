"""Export one network of a checkpoint (ours or the reference's) as a folder to share: its weights in
safetensors (no optimizer, no pickle), config.json (everything needed to rebuild and sample it) and
a README.md model card. The formats are described in weights.py.

    python export.py output_dir/checkpoint-last.pth exported/jit-b16                 # EMA 1, float32
    python export.py output_dir exported/jit-b16-bf16 --ema 2 --dtype bfloat16       # a run folder: newest checkpoint
    python export.py output_dir exported/jit-b16-diffusers --format diffusers        # diffusers' JiTTransformer2DModel
    python export.py exported/jit-b16 exported/jit-b16-diffusers --format diffusers  # convert an exported folder

The recommended sampler in config.json is the best point of the run's sweep when metrics.jsonl
(beside the checkpoint, or --metrics) has one, else the training flags. Exit status: 0 done, 2 bad
input (one line on stderr), 1 a file could not be written.
"""

import argparse
import os
import sys

import run_sources
import weights
from util import checkpoint_dcp, files, sweep
from util.cli import HelpFormatter
from util.config import RunConfig, parse
from util.errors import BadValue, exit_code


def get_args_parser():
    p = argparse.ArgumentParser("JiT export", formatter_class=HelpFormatter)
    a = p.add_argument
    a("source", help="checkpoint file, run folder (its newest readable checkpoint-*.pth) or exported folder")
    a("output", help="folder to write (new or empty; --overwrite replaces an export there)")
    a(
        "--ema",
        default=1,
        type=int,
        choices=(0, 1, 2, 3),
        help="which weights: EMA 1, 2, 3 (--ema_decay3 runs), 0 the raw model",
    )
    a("--dtype", default="float32", choices=weights.EXPORT_DTYPES, help="dtype of the weights written")
    a(
        "--format",
        default=weights.FORMAT,
        choices=weights.FORMATS,
        help="jit: model.safetensors, names as model_jit.JiT; "
        "diffusers: the layout of diffusers' JiTTransformer2DModel",
    )
    a("--metrics", default=None, help="the run's metrics.jsonl (default: the one beside the checkpoint)")
    a("--overwrite", action="store_true", help="replace the export in a non-empty output folder")
    return p


def parse_args(argv=None) -> RunConfig:
    """The flags as given (util.config.RunConfig; `given`: the flags typed)."""
    return parse(get_args_parser(), argv)


def check_output(folder: str, overwrite: bool):
    """The output must be a new or empty folder, or hold an export and --overwrite be given; never a
    run folder (its checkpoints would be shadowed: a folder with config.json loads as an export)."""
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise BadValue(f"output {folder} is a file, not a folder")
    present = os.listdir(folder) if os.path.isdir(folder) else []
    if any(n.startswith("checkpoint-") and n.endswith((".pth", ".dcp")) for n in present):
        raise BadValue(f"output {folder} holds checkpoints (a run folder): export to another folder")
    if checkpoint_dcp.is_dcp(folder):
        raise BadValue(f"output {folder} is a sharded checkpoint: export to another folder")
    if present and not overwrite:
        raise BadValue(f"output {folder} is not empty (pass --overwrite to replace an export there)")


def prepare_output(folder: str):
    """Create the folder; remove an earlier export's files (config.json first, so that a folder
    left half-written is not taken for an export)."""
    try:
        os.makedirs(folder, exist_ok=True)
        for name in (weights.CONFIG, *weights.WEIGHTS.values(), weights.CARD):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                os.remove(path)
    except OSError as e:
        raise files.write_error(folder, e) from e


def source_weights(args) -> tuple[dict, dict, str]:
    """(config, state dict "net.*", a description) of what to export."""
    state, path, exported = run_sources.read_weights(args.source, log=lambda msg: print(msg, file=sys.stderr))
    if exported is not None:
        if args.ema != 1:
            print(f"note: {args.source} is an exported folder holding one network; --ema {args.ema} does not apply")
        return exported, state.model, f"the exported {exported.get('weights', {}).get('which') or 'weights'} of {path}"
    which = run_sources.weights_name(args.ema)
    metrics = args.metrics or os.path.join(os.path.dirname(os.path.abspath(path)), "metrics.jsonl")
    config = weights.export_config(state, which, dtype=args.dtype, source=path, records=sweep.eval_records(metrics))
    return config, state.weights(which), f"{which} of {path} (epoch {state.epoch})"


def main(args) -> list[str]:
    """Export; BadInput for bad input, WriteError for a file that could not be written (see cli)."""
    check_output(args.output, args.overwrite)
    config, state_dict, what = source_weights(args)
    if args.format == "diffusers" and (why := weights.diffusers_refusal(config["network"])):
        raise BadValue(why)  # before the output folder is touched
    config = {**config, "weights": {**config.get("weights", {}), "dtype": args.dtype}}
    prepare_output(args.output)
    paths = weights.write_export(args.output, config, weights.cast(state_dict, args.dtype), args.format)
    size = files.human_bytes(os.path.getsize(paths[0]))
    print(
        f"exported {what} as {args.format}, {args.dtype} ({size}) to {args.output}: "
        + ", ".join(os.path.basename(p) for p in paths)
    )
    smp = config["sampler"]
    print(
        f"recommended sampler: {smp['method']}, {smp['steps']} steps, {smp.get('schedule') or 'uniform'} schedule, "
        f"CFG {smp['cfg']} in "
        f"({smp['interval_min']}, {smp['interval_max']}), {smp.get('chosen_by', '')}"
    )
    return paths


def cli(argv=None) -> int:
    """Exit status as util.errors: 2 for bad input (one line on stderr), 1 for a failed write."""
    return exit_code(main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
