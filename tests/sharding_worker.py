"""Run under torchrun (2 CPU processes, gloo) by tests/test_sharding.py.

    sharding_worker.py train DUMP       DDP vs FSDP2 training with engine_jit.train_step,
                                        checkpointing, accumulation, skips, checkpoints across the
                                        two; rank 0 writes DUMP/results.pt
    sharding_worker.py precision DUMP   bf16 autocast on CPU: DDP vs FSDP2 with float32 / bf16 gathers

Every run starts from the same perturbed JiT-XS/4 at 16 px with dropout, and every step of every
run sees the same micro-batches and the same random draws (seeded per step and rank).
"""

import contextlib
import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from denoiser import Denoiser  # noqa: E402
from engine_eval import EMAWeights  # noqa: E402
from engine_jit import StepParts, build_optimizer, train_step  # noqa: E402
from model_jit import JiT_models  # noqa: E402
from util import (
    distributed,  # noqa: E402
    sharding,  # noqa: E402
)
from util.ema import EMA  # noqa: E402

STEPS, ACCUM, MICRO = 3, 2, 2  # optimiser steps, micro-batches per step, images per micro-batch
DECAYS = (0.9, 0.8)  # fast EMAs, so that their differences show after 3 steps
LR = 1e-3


def skeleton():
    """The network of base_denoiser, unperturbed: what evaluation builds on the meta device (no seed)."""
    return Denoiser(JiT_models["JiT-XS/4"](input_size=16, num_classes=3, attn_drop=0.1, proj_drop=0.1), num_classes=3)


class RandomOps(TorchDispatchMode):
    """Counts random ops (uniform_, normal_, randn, ...) on tensors that are not on the meta device."""

    def __enter__(self):
        self.count = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        random = any(w in func.__name__ for w in ("uniform", "normal", "rand", "bernoulli"))
        if random and isinstance(result, torch.Tensor) and not result.is_meta:
            self.count += 1
        return result


def base_denoiser(grad_checkpoint=False):
    torch.manual_seed(0)
    net = JiT_models["JiT-XS/4"](
        input_size=16, num_classes=3, attn_drop=0.1, proj_drop=0.1, grad_checkpoint=grad_checkpoint
    )
    denoiser = Denoiser(net, num_classes=3)
    with torch.no_grad():  # make every layer matter (adaLN and output layers start at zero)
        for p in denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return denoiser


def batches(step, rank, accum=ACCUM, micro=MICRO):
    """The uint8 micro-batches of (images (B, 3, 16, 16), labels (B,)) this rank trains on at `step`."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [
        (
            torch.randint(0, 256, (micro, 3, 16, 16), dtype=torch.uint8, generator=g),
            torch.randint(0, 3, (micro,), generator=g),
        )
        for _ in range(accum)
    ]


def seed(step):
    torch.manual_seed(10_000 + 100 * step + dist.get_rank())  # label drop, t, noise, dropout


def build_ddp(denoiser) -> StepParts:
    emas = [EMA(denoiser, d) for d in DECAYS]
    return StepParts(
        torch.nn.parallel.DistributedDataParallel(denoiser),
        denoiser,
        build_optimizer(denoiser, LR, 0.01),
        emas,
        torch.device("cpu"),
    )


def build_fsdp(denoiser, mixed_precision=False) -> StepParts:
    emas = [EMA(denoiser, d, sharded=True, mixed_precision=mixed_precision) for d in DECAYS]
    sharding.shard(denoiser, mixed_precision=mixed_precision)
    return StepParts(denoiser, denoiser, build_optimizer(denoiser, LR, 0.01), emas, torch.device("cpu"))


def train(parts: StepParts, steps):
    """engine_jit.train_step at each of `steps` (DDP or sharded alike)."""
    for s in steps:
        seed(s)
        train_step(parts, batches(s, dist.get_rank()))


@contextlib.contextmanager
def inf_in_one_shard_on_rank_1():
    """Within: train_step's sharded non-finite check first puts an inf into one element of one local
    gradient shard on rank 1 only (after the reduce-scatter, where no other rank can see it)."""
    real = sharding.nonfinite_flag

    def injected(params, group=None):
        params = list(params)
        if dist.get_rank() == 1:
            next(g for g in sharding.local_tensors(p.grad for p in params) if g.numel())[0] = float("inf")
        return real(params, group)

    sharding.nonfinite_flag = injected
    try:
        yield
    finally:
        sharding.nonfinite_flag = real


def plain_state(parts: StepParts):
    """(model_sd, [ema_sds], optim_sd) of a DDP run, as its checkpoint holds them (a copy)."""
    return copy.deepcopy(
        (parts.denoiser.state_dict(), [e.state_dict() for e in parts.emas], parts.optimizer.state_dict())
    )


def full_state(parts: StepParts):
    """(model_sd, [ema_sds], optim_sd) of a sharded run, gathered on rank 0 (collective)."""
    return sharding.full_state(parts.denoiser, parts.emas, parts.optimizer)


def max_diff(a, b):
    """Largest |a - b| over matching nested dicts / lists of tensors; raises on mismatched keys."""
    if isinstance(a, torch.Tensor):
        return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0
    if isinstance(a, dict):
        assert list(a) == list(b), (list(a)[:5], list(b)[:5])
        return max([max_diff(a[k], b[k]) for k in a] + [0.0])
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        return max([max_diff(x, y) for x, y in zip(a, b)] + [0.0])
    assert a == b, (a, b)
    return 0.0


def compare(full, ref):
    """Per part max abs diffs of two (model_sd, [ema_sds], optim_sd) triples."""
    m, e, o = full
    m2, e2, o2 = ref
    return {
        "model": max_diff(m, m2),
        "ema1": max_diff(e[0], e2[0]),
        "ema2": max_diff(e[1], e2[1]),
        "exp_avg": max(max_diff(o["state"][i]["exp_avg"], o2["state"][i]["exp_avg"]) for i in o2["state"]),
        "exp_avg_sq": max(max_diff(o["state"][i]["exp_avg_sq"], o2["state"][i]["exp_avg_sq"]) for i in o2["state"]),
        "optim_all": max_diff(o, o2),
    }


def gathered_grads(denoiser):
    from torch.distributed.tensor import DTensor

    return {
        n: p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad.clone()
        for n, p in denoiser.named_parameters()
        if p.grad is not None
    }


def accumulation_vs_one_batch():
    """FSDP gradients of two micro-batches with sync only on the last, against one batch of both."""
    rank = dist.get_rank()
    g = torch.Generator().manual_seed(7 + rank)
    x, y = torch.rand(4, 3, 16, 16, generator=g) * 2 - 1, torch.randint(0, 3, (4,), generator=g)
    t, e = torch.rand(4, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    grads = []
    for accum in (1, 2):
        d = base_denoiser()
        d.label_drop_prob = 0.0
        d.net.blocks.apply(lambda m: setattr(m, "p", 0.0) if isinstance(m, torch.nn.Dropout) else None)
        for b in d.net.blocks:
            b.attn.attn_drop = 0.0
        sharding.shard(d, mixed_precision=False)
        for j, part in enumerate(torch.arange(4).chunk(accum)):
            sharding.set_grad_sync(d, j == accum - 1)
            # the loss is a mean over the batch: micro-batch losses are weighted by their share
            (d(x[part], y[part], t=t[part], noise=e[part]) * len(part) / 4).backward()
        grads.append(gathered_grads(d))
    return max_diff(grads[0], grads[1])


def skip_check(parts: StepParts):
    """One step of train_step with inf in one local gradient shard on rank 1 only: every rank must skip."""
    denoiser, optimizer = parts.denoiser, parts.optimizer
    before = [t.clone() for t in sharding.local_tensors(denoiser.parameters())]
    moments = [s["exp_avg"].to_local().clone() for s in optimizer.state.values()]
    steps = [s["step"].clone() for s in optimizer.state.values()]
    seed(99)
    with inf_in_one_shard_on_rank_1():
        _, flag = train_step(parts, batches(99, dist.get_rank()))
    same = all(torch.equal(a, b) for a, b in zip(before, sharding.local_tensors(denoiser.parameters())))
    same &= all(torch.equal(a, s["exp_avg"].to_local()) for a, s in zip(moments, optimizer.state.values()))
    same &= all(torch.equal(a, s["step"]) for a, s in zip(steps, optimizer.state.values()))
    flags = [None, None]
    dist.all_gather_object(flags, (flag.item(), same))
    return flags


def evaluation_copy(fsdp: StepParts):
    """EMA 1 of a sharded run in evaluation's copy (engine_eval.EMAWeights: built on the meta device,
    materialised uninitialised, filled by unshard_into). Returns (every rank's copy's state dict, every
    rank's [random ops drawn, RNG untouched, buffers as built, a copy of its own, the devices])."""
    samplers = EMAWeights(fsdp.emas, torch.device("cpu"), make_denoiser=skeleton, compile_net=False)
    rng = torch.get_rng_state()
    with RandomOps() as drawn:
        samplers.refresh([1])
    rng_same = torch.equal(rng, torch.get_rng_state())
    plain_ema = samplers(1)[0]
    built = dict(base_denoiser().named_buffers())
    buffers_equal = all(torch.equal(b, built[n]) for n, b in plain_ema.named_buffers())
    checks = [drawn.count, rng_same, buffers_equal, plain_ema is not fsdp.emas[0].module]
    checks.append({t.device.type for t in [*plain_ema.parameters(), *plain_ema.buffers()]})
    gathered, everyone = [None, None], [None, None]
    dist.all_gather_object(gathered, plain_ema.state_dict())
    dist.all_gather_object(everyone, checks)
    return gathered, everyone


def main_train(dump):
    rank = dist.get_rank()
    out = {}
    ddp = build_ddp(base_denoiser())
    train(ddp, range(STEPS))
    ref = plain_state(ddp)

    fsdp = build_fsdp(base_denoiser())
    train(fsdp, range(STEPS))
    full = full_state(fsdp)

    ckpt = build_fsdp(base_denoiser(grad_checkpoint=True))
    train(ckpt, range(STEPS))
    full_ckpt = full_state(ckpt)

    ddp_ckpt = build_ddp(base_denoiser(grad_checkpoint=True))
    train(ddp_ckpt, range(STEPS))

    if rank == 0:
        out["fsdp_vs_ddp"] = compare(full, ref)
        out["ckpt_vs_fsdp"] = compare(full_ckpt, full)
        out["ddp_ckpt_vs_ddp"] = compare(plain_state(ddp_ckpt), ref)
        out["same_param_groups"] = full[2]["param_groups"] == ref[2]["param_groups"]
        out["same_model_keys"] = list(full[0]) == list(ref[0]) and list(full[1][0]) == list(ref[1][0])
        out["optim_state_keys"] = (list(full[2]["state"]), list(ref[2]["state"]))
        torch.save(
            {"model": full[0], "model_ema1": full[1][0], "model_ema2": full[1][1], "optimizer": full[2]},
            os.path.join(dump, "fsdp_ckpt.pt"),
        )
        torch.save(
            {"model": ref[0], "model_ema1": ref[1][0], "model_ema2": ref[1][1], "optimizer": ref[2]},
            os.path.join(dump, "ddp_ckpt.pt"),
        )
    dist.barrier()

    # FSDP checkpoint -> plain Denoiser + AdamW (strict), one more step each, against FSDP's own.
    c = torch.load(os.path.join(dump, "fsdp_ckpt.pt"), weights_only=True)
    plain = build_ddp(base_denoiser())
    plain.denoiser.load_state_dict(c["model"], strict=True)
    for ema, k in zip(plain.emas, ("model_ema1", "model_ema2")):
        ema.load_state_dict(c[k])
    plain.optimizer.load_state_dict(c["optimizer"])
    train(plain, [STEPS])
    train(fsdp, [STEPS])
    fsdp_next = full_state(fsdp)

    # DDP checkpoint (rank 0 reads it) -> a fresh sharded run; one more step against DDP's own.
    c = torch.load(os.path.join(dump, "ddp_ckpt.pt"), weights_only=True) if rank == 0 else None
    fresh = build_fsdp(base_denoiser())
    torch.manual_seed(123)  # the fresh weights must not matter
    sharding.load_full_state(
        fresh.denoiser,
        fresh.emas,
        fresh.optimizer,
        *((c["model"], [c["model_ema1"], c["model_ema2"]], c["optimizer"]) if c else (None, None, None)),
    )
    fresh_loaded = full_state(fresh)
    train(fresh, [STEPS])
    fresh_next = full_state(fresh)
    train(ddp, [STEPS])
    if rank == 0:
        out["fsdp_ckpt_to_plain"] = compare(plain_state(plain), fsdp_next)
        out["ddp_ckpt_to_fsdp_loaded"] = compare(fresh_loaded, ref)
        out["ddp_ckpt_to_fsdp"] = compare(fresh_next, plain_state(ddp))
        out["optim_groups_after_load"] = [
            {k: g[k] for k in ("fused", "foreach", "weight_decay")} for g in fresh.optimizer.param_groups
        ]

    gathered, out["eval_copy"] = evaluation_copy(fsdp)  # every rank: the full EMA weights to sample from
    if rank == 0:
        out["unshard_into"] = max(max_diff(g, fsdp_next[1][0]) for g in gathered)

    bad = dict(c["model"]) if c else None  # a checkpoint that does not fit: every rank must raise
    if bad:
        bad.pop("net.final_layer.linear.bias")
        bad["net.extra"] = torch.zeros(1)
    try:
        sharding.load_full_state(fresh.denoiser, [], None, bad, [], None)
        raised = "nothing"
    except RuntimeError as e:
        raised = str(e)
    messages = [None, None]
    dist.all_gather_object(messages, raised)
    out["bad_checkpoint"] = messages

    out["accum_vs_one_batch"] = accumulation_vs_one_batch()
    out["skip"] = skip_check(fsdp)
    if rank == 0:
        torch.save(out, os.path.join(dump, "results.pt"))
        for k, v in out.items():
            print(k, v, flush=True)


def main_precision(dump):
    """bf16 CPU autocast: how far FSDP's two precision plans are from DDP under the same autocast,
    next to how far bf16 autocast itself is from float32 (one step each; gathered weights)."""
    rank = dist.get_rank()
    bf16 = lambda: torch.autocast("cpu", dtype=torch.bfloat16)  # noqa: E731
    results = {}
    ref = {}
    for name, kind, mp, ac in [
        ("ddp_fp32", "ddp", None, contextlib.nullcontext),
        ("ddp_bf16", "ddp", None, bf16),
        ("fsdp_gather_fp32", "fsdp", False, bf16),
        ("fsdp_gather_bf16", "fsdp", True, bf16),
    ]:
        run = build_ddp(base_denoiser()) if kind == "ddp" else build_fsdp(base_denoiser(), mixed_precision=mp)
        seed(0)
        micro = batches(0, rank)
        losses = []
        for j, (x, labels) in enumerate(micro):  # forward and backward only: no optimiser step
            x = x.float().div_(255).mul_(2).sub_(1)
            sharding.set_grad_sync(run.model, j == len(micro) - 1)
            with contextlib.nullcontext() if kind == "fsdp" or j == len(micro) - 1 else run.model.no_sync(), ac():
                loss = run.model(x, labels)
            losses.append(loss.detach().float())
            (loss / len(micro)).backward()
        grads = gathered_grads(run.denoiser)
        results[name] = (torch.stack(losses), grads)
    if rank == 0:
        base_loss, base_grads = results["ddp_bf16"]
        for name in ("ddp_fp32", "fsdp_gather_fp32", "fsdp_gather_bf16"):
            loss, grads = results[name]
            rel = max(((grads[k] - base_grads[k]).norm() / base_grads[k].norm().clamp_min(1e-30)).item() for k in grads)
            ref[name] = {
                "loss_diff": (loss - base_loss).abs().max().item(),
                "grad_max_abs": max_diff(grads, base_grads),
                "grad_max_rel_l2": rel,
            }
            print(name, "vs ddp_bf16:", ref[name], flush=True)
            if os.environ.get("PER_PARAM"):
                per = sorted(
                    (((grads[k] - base_grads[k]).norm() / base_grads[k].norm().clamp_min(1e-30)).item(), k)
                    for k in grads
                )
                print("  largest relative differences:", [(k, f"{r:.2e}") for r, k in per[-8:]], flush=True)
        torch.save(ref, os.path.join(dump, "precision.pt"))


if __name__ == "__main__":
    mode, dump = sys.argv[1], sys.argv[2]
    distributed.init("cpu")
    torch.set_num_threads(1)
    {"train": main_train, "precision": main_precision}[mode](dump)
    distributed.shutdown()
