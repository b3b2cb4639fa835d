"""Run under torchrun (2 CPU processes, gloo) by tests/test_sharding.py.

    fsdp_script.py train DUMP       DDP vs FSDP2 training, checkpointing, accumulation, skips,
                                    checkpoints across the two; rank 0 writes DUMP/results.pt
    fsdp_script.py precision DUMP   bf16 autocast on CPU: DDP vs FSDP2 with float32 / bf16 gathers
    fsdp_script.py compile DUMP     torch.compile of the sharded denoiser against eager (a report)

Every run starts from the same perturbed JiT-XS/4 at 16 px with dropout, and every step of every
run sees the same micro-batches and the same random draws (seeded per step and rank).
"""
import contextlib
import copy
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from denoiser import EMA, Denoiser  # noqa: E402
from engine_jit import train_step  # noqa: E402
from main_jit import build_optimizer  # noqa: E402
from model_jit import JiT_models  # noqa: E402
from util import distributed as D  # noqa: E402
from util import sharding  # noqa: E402

STEPS, ACCUM, MICRO = 3, 2, 2  # optimiser steps, micro-batches per step, images per micro-batch
DECAYS = (0.9, 0.8)  # fast EMAs, so that their differences show after 3 steps
LR = 1e-3


def base_denoiser(grad_checkpoint=False):
    torch.manual_seed(0)
    net = JiT_models["JiT-XS/4"](input_size=16, num_classes=3, attn_drop=0.1, proj_drop=0.1, grad_checkpoint=grad_checkpoint)
    denoiser = Denoiser(net, num_classes=3)
    with torch.no_grad():  # make every layer matter (adaLN and output layers start at zero)
        for p in denoiser.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return denoiser


def batches(step, rank, accum=ACCUM, micro=MICRO):
    """The uint8 micro-batches of (images (B, 3, 16, 16), labels (B,)) this rank trains on at `step`."""
    g = torch.Generator().manual_seed(1000 * step + rank)
    return [(torch.randint(0, 256, (micro, 3, 16, 16), dtype=torch.uint8, generator=g),
             torch.randint(0, 3, (micro,), generator=g)) for _ in range(accum)]


def seed(step):
    torch.manual_seed(10_000 + 100 * step + dist.get_rank())  # label drop, t, noise, dropout


def build_ddp(denoiser):
    emas = [EMA(denoiser, d) for d in DECAYS]
    return torch.nn.parallel.DistributedDataParallel(denoiser), denoiser, build_optimizer(denoiser, LR, 0.01), emas


def build_fsdp(denoiser, mixed_precision=False):
    emas = [sharding.ShardedEMA(denoiser, d, mixed_precision=mixed_precision) for d in DECAYS]
    sharding.shard(denoiser, mixed_precision=mixed_precision)
    return denoiser, denoiser, build_optimizer(denoiser, LR, 0.01), emas


def fsdp_step(model, denoiser, optimizer, emas, micro, *, inject_inf=False, autocast=contextlib.nullcontext):
    """The FSDP steps of engine_jit.train_step spelled out (set_grad_sync instead of no_sync, the
    non-finite flag from local shards reduced over ranks, the EMA lerp on local shards), so that an
    inf can be put into one rank's gradient shard."""
    accum = len(micro)
    for j, (x, labels) in enumerate(micro):
        x = x.float().div_(255).mul_(2).sub_(1)
        sharding.set_grad_sync(model, j == accum - 1)
        with autocast():
            loss = model(x, labels)
        (loss / accum).backward()
    params = [p for p in denoiser.parameters() if p.requires_grad]
    if inject_inf and dist.get_rank() == 1:  # one element of one local shard, on one rank only
        next(g for g in sharding.local_tensors(p.grad for p in params) if g.numel())[0] = float("inf")
    skipped = sharding.nonfinite_flag(params)
    optimizer.found_inf = skipped
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    for ema in emas:
        ema.update(denoiser)
    return skipped


def ddp_step(run, step):
    seed(step)
    return train_step(*run, batches(step, dist.get_rank()), device=torch.device("cpu"), accum_iter=ACCUM)


def train(run, kind, steps):
    for s in steps:
        if kind == "ddp":
            ddp_step(run, s)
        elif kind == "engine":  # engine_jit.train_step on the sharded model
            seed(s)
            train_step(*run, batches(s, dist.get_rank()), device=torch.device("cpu"), accum_iter=ACCUM)
        else:
            seed(s)
            fsdp_step(*run, batches(s, dist.get_rank()))


def plain_state(run):
    """(model_sd, [ema_sds], optim_sd) of a DDP run, as its checkpoint holds them (a copy)."""
    _, denoiser, optimizer, emas = run
    return copy.deepcopy((denoiser.state_dict(), [e.state_dict() for e in emas], optimizer.state_dict()))


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
    return {"model": max_diff(m, m2), "ema1": max_diff(e[0], e2[0]), "ema2": max_diff(e[1], e2[1]),
            "exp_avg": max(max_diff(o["state"][i]["exp_avg"], o2["state"][i]["exp_avg"]) for i in o2["state"]),
            "exp_avg_sq": max(max_diff(o["state"][i]["exp_avg_sq"], o2["state"][i]["exp_avg_sq"]) for i in o2["state"]),
            "optim_all": max_diff(o, o2)}


def gathered_grads(denoiser):
    return {n: p.grad.full_tensor() if isinstance(p.grad, sharding.DTensor) else p.grad.clone()
            for n, p in denoiser.named_parameters() if p.grad is not None}


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


def skip_check(run):
    """One step with inf in one local gradient shard on rank 1 only: every rank must skip."""
    _, denoiser, optimizer, _ = run
    before = [t.clone() for t in sharding.local_tensors(denoiser.parameters())]
    moments = [s["exp_avg"].to_local().clone() for s in optimizer.state.values()]
    steps = [s["step"].clone() for s in optimizer.state.values()]
    seed(99)
    flag = fsdp_step(*run, batches(99, dist.get_rank()), inject_inf=True)
    same = all(torch.equal(a, b) for a, b in zip(before, sharding.local_tensors(denoiser.parameters())))
    same &= all(torch.equal(a, s["exp_avg"].to_local()) for a, s in zip(moments, optimizer.state.values()))
    same &= all(torch.equal(a, s["step"]) for a, s in zip(steps, optimizer.state.values()))
    flags = [None, None]
    dist.all_gather_object(flags, (flag.item(), same))
    return flags


def main_train(dump):
    rank = dist.get_rank()
    out = {}
    ddp = build_ddp(base_denoiser())
    train(ddp, "ddp", range(STEPS))
    ref = plain_state(ddp)

    fsdp = build_fsdp(base_denoiser())
    train(fsdp, "fsdp", range(STEPS))
    full = sharding.full_state(fsdp[1], fsdp[3], fsdp[2])

    ckpt = build_fsdp(base_denoiser(grad_checkpoint=True))
    train(ckpt, "fsdp", range(STEPS))
    full_ckpt = sharding.full_state(ckpt[1], ckpt[3], ckpt[2])

    eng = build_fsdp(base_denoiser())
    train(eng, "engine", range(STEPS))
    full_eng = sharding.full_state(eng[1], eng[3], eng[2])

    ddp_ckpt = build_ddp(base_denoiser(grad_checkpoint=True))
    train(ddp_ckpt, "ddp", range(STEPS))

    if rank == 0:
        out["fsdp_vs_ddp"] = compare(full, ref)
        out["ckpt_vs_fsdp"] = compare(full_ckpt, full)
        out["engine_vs_ddp"] = compare(full_eng, ref)
        out["ddp_ckpt_vs_ddp"] = compare(plain_state(ddp_ckpt), ref)
        out["same_param_groups"] = full[2]["param_groups"] == ref[2]["param_groups"]
        out["same_model_keys"] = list(full[0]) == list(ref[0]) and list(full[1][0]) == list(ref[1][0])
        out["optim_state_keys"] = (list(full[2]["state"]), list(ref[2]["state"]))
        torch.save({"model": full[0], "model_ema1": full[1][0], "model_ema2": full[1][1], "optimizer": full[2]},
                   os.path.join(dump, "fsdp_ckpt.pt"))
        torch.save({"model": ref[0], "model_ema1": ref[1][0], "model_ema2": ref[1][1], "optimizer": ref[2]},
                   os.path.join(dump, "ddp_ckpt.pt"))
    dist.barrier()

    # FSDP checkpoint -> plain Denoiser + AdamW (strict), one more step each, against FSDP's own.
    c = torch.load(os.path.join(dump, "fsdp_ckpt.pt"), weights_only=True)
    plain = build_ddp(base_denoiser())
    plain[1].load_state_dict(c["model"], strict=True)
    for ema, k in zip(plain[3], ("model_ema1", "model_ema2")):
        ema.load_state_dict(c[k])
    plain[2].load_state_dict(c["optimizer"])
    train(plain, "ddp", [STEPS])
    train(fsdp, "fsdp", [STEPS])
    fsdp_next = sharding.full_state(fsdp[1], fsdp[3], fsdp[2])

    # DDP checkpoint (rank 0 reads it) -> a fresh sharded run; one more step against DDP's own.
    c = torch.load(os.path.join(dump, "ddp_ckpt.pt"), weights_only=True) if rank == 0 else None
    fresh = build_fsdp(base_denoiser())
    torch.manual_seed(123)  # the fresh weights must not matter
    sharding.load_full_state(fresh[1], fresh[3], fresh[2], *((c["model"], [c["model_ema1"], c["model_ema2"]], c["optimizer"]) if c else (None, None, None)))
    fresh_loaded = sharding.full_state(fresh[1], fresh[3], fresh[2])
    train(fresh, "fsdp", [STEPS])
    fresh_next = sharding.full_state(fresh[1], fresh[3], fresh[2])
    train(ddp, "ddp", [STEPS])
    if rank == 0:
        out["fsdp_ckpt_to_plain"] = compare(plain_state(plain), fsdp_next)
        out["ddp_ckpt_to_fsdp_loaded"] = compare(fresh_loaded, ref)
        out["ddp_ckpt_to_fsdp"] = compare(fresh_next, plain_state(ddp))
        out["optim_groups_after_load"] = [{k: g[k] for k in ("fused", "foreach", "weight_decay")} for g in fresh[2].param_groups]

    plain_ema = sharding.unshard_into(base_denoiser(), fsdp[3][0].module)  # every rank: full EMA weights to sample from
    gathered = [None, None]
    dist.all_gather_object(gathered, plain_ema.state_dict())
    if rank == 0:
        out["unshard_into"] = max(max_diff(g, fsdp_next[1][0]) for g in gathered)

    bad = dict(c["model"]) if c else None  # a checkpoint that does not fit: every rank must raise
    if bad:
        bad.pop("net.final_layer.linear.bias")
        bad["net.extra"] = torch.zeros(1)
    try:
        sharding.load_full_state(fresh[1], [], None, bad, [], None)
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
    for name, kind, mp, ac in [("ddp_fp32", "ddp", None, contextlib.nullcontext), ("ddp_bf16", "ddp", None, bf16),
                               ("fsdp_gather_fp32", "fsdp", False, bf16), ("fsdp_gather_bf16", "fsdp", True, bf16)]:
        run = build_ddp(base_denoiser()) if kind == "ddp" else build_fsdp(base_denoiser(), mixed_precision=mp)
        seed(0)
        micro = batches(0, rank)
        losses = []
        for j, (x, labels) in enumerate(micro):
            x = x.float().div_(255).mul_(2).sub_(1)
            sharding.set_grad_sync(run[0], j == len(micro) - 1)
            with (contextlib.nullcontext() if kind == "fsdp" or j == len(micro) - 1 else run[0].no_sync()), ac():
                loss = run[0](x, labels)
            losses.append(loss.detach().float())
            (loss / len(micro)).backward()
        grads = gathered_grads(run[1])
        results[name] = (torch.stack(losses), grads)
    if rank == 0:
        base_loss, base_grads = results["ddp_bf16"]
        for name in ("ddp_fp32", "fsdp_gather_fp32", "fsdp_gather_bf16"):
            loss, grads = results[name]
            rel = max(((grads[k] - base_grads[k]).norm() / base_grads[k].norm().clamp_min(1e-30)).item() for k in grads)
            ref[name] = {"loss_diff": (loss - base_loss).abs().max().item(), "grad_max_abs": max_diff(grads, base_grads),
                         "grad_max_rel_l2": rel}
            print(name, "vs ddp_bf16:", ref[name], flush=True)
            if os.environ.get("PER_PARAM"):
                per = sorted((((grads[k] - base_grads[k]).norm() / base_grads[k].norm().clamp_min(1e-30)).item(), k) for k in grads)
                print("  largest relative differences:", [(k, f"{r:.2e}") for r, k in per[-8:]], flush=True)
        torch.save(ref, os.path.join(dump, "precision.pt"))


def main_compile(dump):
    """torch.compile of the sharded denoiser (2 steps), with and without checkpointing, against
    eager. Compiled code draws other random numbers, so dropout and label drop are off and t and
    the noise are given."""
    rank = dist.get_rank()

    def run_steps(compiled, ckpt):
        d = base_denoiser(grad_checkpoint=ckpt)
        d.label_drop_prob = 0.0
        for m in d.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
            elif hasattr(m, "attn_drop"):
                m.attn_drop = 0.0
        model, denoiser, optimizer, emas = build_fsdp(d)
        if compiled:
            model = torch.compile(model)
        for s in range(2):
            g = torch.Generator().manual_seed(100 * s + rank)
            for j, (x, labels) in enumerate(batches(s, rank)):
                sharding.set_grad_sync(model, j == ACCUM - 1)
                t, e = torch.rand(MICRO, generator=g), torch.randn(MICRO, 3, 16, 16, generator=g)
                (model(x.float() / 127.5 - 1, labels, t=t, noise=e) / ACCUM).backward()
            optimizer.found_inf = sharding.nonfinite_flag([p for p in denoiser.parameters() if p.requires_grad])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            for ema in emas:
                ema.update(denoiser)
        return sharding.full_state(denoiser, emas, optimizer)

    ref = run_steps(False, False)
    out = {}
    for ckpt in (False, True):
        try:
            got = run_steps(True, ckpt)
            out[f"ckpt={ckpt}"] = compare(got, ref) if rank == 0 else None
        except Exception as e:  # noqa: BLE001  (a report, not a test)
            out[f"ckpt={ckpt}"] = f"{type(e).__name__}: {str(e)[:300]}"
    if rank == 0:
        print(out, flush=True)
        torch.save(out, os.path.join(dump, "compile.pt"))


if __name__ == "__main__":
    mode, dump = sys.argv[1], sys.argv[2]
    D.init("cpu")
    torch.set_num_threads(1)
    {"train": main_train, "precision": main_precision, "compile": main_compile}[mode](dump)
    D.shutdown()
