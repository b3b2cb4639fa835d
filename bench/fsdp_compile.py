"""How torch.compile meets FSDP2 (--fsdp): dynamo's counters for two ways to compile a sharded JiT.

    torchrun --nproc_per_node=2 bench/fsdp_compile.py --mode root     # torch.compile of the whole denoiser
    torchrun --nproc_per_node=2 bench/fsdp_compile.py --mode blocks   # each block's forward, the root eager
    torchrun --nproc_per_node=1 bench/fsdp_compile.py --mode blocks --device cuda --backend inductor --json out.json

Trains --steps optimiser steps of the tiny preset (CPU: gloo; CUDA: NCCL, bf16 autocast) through
engine_jit.train_step and prints, on rank 0: the graphs dynamo captured, how many of them have
dynamic (symbolic) shapes, its graph breaks (with reasons), and the graphs captured after the first
two steps (recompiles). The counts are dynamo's, the same for any backend: --backend aot_eager
(default) skips code generation, inductor is what main_jit uses on CUDA.
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from denoiser import Denoiser  # noqa: E402
from engine_jit import StepParts, build_optimizer, compile_fsdp_blocks, train_step  # noqa: E402
from model_jit import JiT_models  # noqa: E402
from util import distributed, sharding  # noqa: E402
from util.config import RunConfig, parse  # noqa: E402
from util.errors import BadValue, exit_code  # noqa: E402
from util.files import write_json  # noqa: E402


def get_args_parser():
    p = argparse.ArgumentParser(__doc__.splitlines()[0])
    p.add_argument("--mode", choices=("root", "blocks"), required=True)
    p.add_argument("--grad_checkpoint", action="store_true")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--backend", default="aot_eager")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None, help="also write the counts here (rank 0)")
    return p


def parse_args(argv=None) -> RunConfig:
    """The flags as given (util.config.RunConfig), as every script's."""
    return parse(get_args_parser(), argv)


def main(args: RunConfig):
    """Train, count and print (rank 0); BadValue for --steps below 3 (see cli)."""
    if args.steps < 3:
        raise BadValue(
            f"--steps must be at least 3 (2 to warm up, then the steps whose graphs are counted), got {args.steps}"
        )
    device = distributed.init(args.device)
    from torch._dynamo import lookup_backend
    from torch._dynamo.utils import counters

    inner, dynamic = lookup_backend(args.backend), []

    def backend(gm, example_inputs):  # notes whether dynamo handed the graph symbolic sizes
        dynamic.append(
            any(
                isinstance(x, torch.SymInt)
                or (isinstance(x, torch.Tensor) and any(isinstance(d, torch.SymInt) for d in x.shape))
                for x in example_inputs
            )
        )
        return inner(gm, example_inputs)

    torch.manual_seed(0)
    net = JiT_models["JiT-XS/4"](input_size=16, num_classes=3, grad_checkpoint=args.grad_checkpoint)
    denoiser = sharding.shard(Denoiser(net, 3).to(device), mixed_precision=False)
    if args.mode == "root":
        model = torch.compile(denoiser, backend=backend)
    else:
        model = compile_fsdp_blocks(denoiser, backend=backend)
    parts = StepParts(model, denoiser, build_optimizer(denoiser, 1e-3, 0.0), [], device)
    g = torch.Generator().manual_seed(distributed.get_rank())
    after_warmup = 0
    for step in range(args.steps):
        micro = [
            (
                torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8, generator=g),
                torch.randint(0, 3, (4,), generator=g),
            )
            for _ in range(2)
        ]
        train_step(parts, micro)
        if step == 1:
            after_warmup = counters["stats"]["unique_graphs"]
    breaks, graphs = dict(counters["graph_break"]), counters["stats"]["unique_graphs"]
    distributed.print0(
        f"mode {args.mode}, grad_checkpoint {args.grad_checkpoint}: {graphs} graphs ({sum(dynamic)} with dynamic "
        "shapes), "
        f"{sum(breaks.values())} graph breaks, {graphs - after_warmup} graphs after step 2"
    )
    for reason, n in sorted(breaks.items(), key=lambda kv: -kv[1])[:5]:
        distributed.print0(f"  {n}× {reason[:160]}")
    if args.json and distributed.is_main_process():
        counts = {"graphs": graphs, "dynamic_graphs": sum(dynamic), "graph_breaks": sum(breaks.values())}
        run = {"mode": args.mode, "grad_checkpoint": args.grad_checkpoint, "backend": args.backend}
        where = {"device": str(device), "world_size": distributed.get_world_size()}
        write_json(args.json, {**run, **where, **counts, "graphs_after_step_2": graphs - after_warmup})


def cli(argv=None) -> int:
    """Exit status as util.errors: 2 for bad input (one line on stderr)."""
    code = exit_code(main, parse_args(argv))
    distributed.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(cli())
