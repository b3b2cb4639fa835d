"""Run under torchrun by tests/test_train.py.

ddp_script.py train DUMP_DIR MAIN_ARGS...   train with main_jit, then every rank dumps its state
ddp_script.py grad DUMP_DIR                  DDP gradient of half batches vs one-process full batch
"""

import copy
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import main_jit  # noqa: E402
from denoiser import Denoiser  # noqa: E402
from model_jit import JiT_models  # noqa: E402
from util import distributed  # noqa: E402


def dump_training_state(dump, argv):
    run = main_jit.setup(main_jit.parse_args(argv))
    code = main_jit.train(run)
    run.close()
    state = {
        "code": code,
        "model": run.parts.denoiser.state_dict(),
        "ema1": run.parts.emas[0].state_dict(),
        "ema2": run.parts.emas[1].state_dict(),
        "optimizer": run.parts.optimizer.state_dict()["state"],
        "sync_buffers": getattr(run.parts.model, "forward_sync_buffers", None) or run.parts.model.broadcast_buffers,
    }
    torch.save(state, os.path.join(dump, f"rank{distributed.get_rank()}.pt"))


def dump_gradients(dump):
    distributed.init("cpu")
    rank, world = distributed.get_rank(), distributed.get_world_size()
    torch.manual_seed(0)
    denoiser = Denoiser(JiT_models["JiT-XS/4"](input_size=16, num_classes=3), num_classes=3, label_drop_prob=0.0)
    with torch.no_grad():  # make every layer matter (adaLN and output layers start at zero)
        for p in denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    single = copy.deepcopy(denoiser)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1
    y = torch.randint(0, 3, (8,), generator=g)
    t = torch.rand(8, generator=g)
    e = torch.randn(8, 3, 16, 16, generator=g)
    model = torch.nn.parallel.DistributedDataParallel(denoiser)
    part = slice(rank * 8 // world, (rank + 1) * 8 // world)
    model(x[part], y[part], t=t[part], noise=e[part]).backward()
    out = {"ddp": {n: p.grad for n, p in denoiser.named_parameters() if p.requires_grad}}
    if rank == 0:
        single(x, y, t=t, noise=e).backward()
        out["single"] = {n: p.grad for n, p in single.named_parameters() if p.requires_grad}
    torch.save(out, os.path.join(dump, f"grad{rank}.pt"))


if __name__ == "__main__":
    mode, dump = sys.argv[1], sys.argv[2]
    if mode == "train":
        dump_training_state(dump, sys.argv[3:])
    else:
        dump_gradients(dump)
    distributed.shutdown()
