"""Convert a sharded checkpoint (the folder checkpoint-NAME.dcp an FSDP run writes, every rank its
shards) into the single file the reference reads and writes, checkpoint-NAME.pth: the same keys as
an unsharded run's (model, model_ema1, model_ema2, optimizer, epoch, args, and ours), the tensors
full and bit for bit those of the folder, the AdamW state numbered as an unsharded run numbers it.

    python convert_checkpoint.py output_dir/checkpoint-last.dcp output_dir/checkpoint-last.pth
    python convert_checkpoint.py output_dir converted/checkpoint-last.pth   # a run folder: its newest

One process, no GPU, no process group; it holds the whole checkpoint in memory while it writes the
file (atomically). The other way is not needed: an FSDP run resumes from a file directly (rank 0
reads it memory-mapped and broadcasts each tensor). torch's own converter
(torch.distributed.checkpoint.format_utils.dcp_to_torch_save) writes DCP's nested dict, not this format.
Exit status: 0 done, 2 bad input (one line on stderr), 1 the file could not be written.
"""

import argparse
import os
import sys

from util import checkpoint, checkpoint_dcp, files
from util.cli import HelpFormatter
from util.config import RunConfig, parse
from util.errors import BadValue, MissingFile, exit_code


def get_args_parser():
    p = argparse.ArgumentParser("JiT checkpoint conversion", formatter_class=HelpFormatter)
    a = p.add_argument
    a("source", help="a sharded checkpoint folder (checkpoint-NAME.dcp), or a run folder: its newest checkpoint")
    a("output", help="the single-file checkpoint to write (e.g. checkpoint-last.pth)")
    a("--overwrite", action="store_true", help="replace an existing output file")
    return p


def parse_args(argv=None) -> RunConfig:
    """The flags as given (util.config.RunConfig; `given`: the flags typed)."""
    return parse(get_args_parser(), argv)


def main(args) -> str:
    """Convert; BadInput for bad input, WriteError for a file that could not be written (see cli).
    Returns the path written."""
    if not os.path.exists(args.source):
        raise MissingFile(f"{args.source}: no such file or folder")
    if os.path.isdir(args.output):
        raise BadValue(f"output {args.output} is a folder: name the file to write (e.g. checkpoint-last.pth)")
    if os.path.exists(args.output) and not args.overwrite:
        raise BadValue(f"output {args.output} exists (pass --overwrite to replace it)")
    if not os.path.isdir(parent := os.path.dirname(os.path.abspath(args.output))):
        raise MissingFile(f"output {args.output}: its folder {parent} does not exist")
    state, path = checkpoint.load_checkpoint(args.source, log=lambda msg: print(msg, file=sys.stderr))
    if state.folder is None:
        raise BadValue(
            f"{path} is a single-file checkpoint already: nothing to convert (name a .dcp folder to convert it)"
        )
    if os.path.commonpath([os.path.realpath(path), os.path.realpath(parent)]) == os.path.realpath(path):
        raise BadValue(f"output {args.output} is inside the checkpoint it converts: write it beside {path}")
    checkpoint.save_atomic(checkpoint_dcp.plain(checkpoint.to_dict(state)), args.output)
    print(
        f"converted {path} (epoch {state.epoch}, resume at epoch {state.start['epoch']}, step {state.start['step']}, "
        f"written by {state.world_size} processes) to {args.output} ({files.human_bytes(os.path.getsize(args.output))})"
    )
    return args.output


def cli(argv=None) -> int:
    """Exit status as util.errors: 2 for bad input (one line on stderr), 1 for a failed write."""
    return exit_code(main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
