"""Write one self-contained HTML page about training runs (util.report): config, loss curve, loss by
noise level, sample grids over epochs, FID / IS history, sweeps, throughput and ETA, checkpoints and
warnings. Training writes OUTPUT_DIR/report.html at each checkpoint; this rewrites it, or overlays
several runs' curves and FID histories on one page.

    python report.py ${OUTPUT_DIR}                      # -> ${OUTPUT_DIR}/report.html
    python report.py runs/a runs/b --output compare.html
"""

import argparse
import os
import sys

from util.cli import HelpFormatter
from util.config import RunConfig, parse
from util.errors import MissingFile, exit_code
from util.report import NAME, write_report


def get_args_parser():
    parser = argparse.ArgumentParser("JiT run report", formatter_class=HelpFormatter)
    parser.add_argument("output_dirs", nargs="+", metavar="OUTPUT_DIR", help="run folders (main_jit.py --output_dir)")
    parser.add_argument("--output", default=None, help=f"the page to write (default: the first OUTPUT_DIR's {NAME})")
    return parser


def main(args) -> int:
    for folder in args.output_dirs:
        if not os.path.isdir(folder):
            raise MissingFile(f"{folder}: no such folder")
    path = write_report(args.output_dirs, args.output)
    print(f"wrote {path}")
    return 0


def parse_args(argv=None) -> RunConfig:
    """The flags as given (util.config.RunConfig), as every script's."""
    return parse(get_args_parser(), argv)


def cli(argv=None) -> int:
    """Exit status as util.errors: 2 for a folder that does not exist (one line on stderr)."""
    return exit_code(main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
