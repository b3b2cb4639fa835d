"""Per-GPU memory of JiT training, estimated on the meta device (no GPU, a few seconds).

    python bench/memory.py --model JiT-G/16 --img_size 256 --batch_size 32 --world_size 8 --fsdp --grad_checkpoint
    python bench/memory.py --table          # the README table (DDP / FSDP, with / without checkpointing)
    python bench/memory.py --table --compiled   # activations as torch.compile saves them (minutes)

Persistent state per parameter: float32 weights 4 B, gradients 4 B, AdamW moments 8 B, two EMA
copies 8 B: 24 B under DDP (plus DDP's gradient buckets, 4 B), divided by the world size under
FSDP, plus the units FSDP holds unsharded at a time (the root unit; the current and the prefetched
block's parameters; one block's unsharded gradients before the reduce-scatter).

Saved activations come from a trace, not a measurement: the denoiser's forward runs on the meta
device under `saved_tensors_hooks`, which add up the storage of every tensor autograd keeps for
backward (each storage once; parameters and buffers excluded). torch.autocast has no meta device,
so its bf16 semantics are emulated for the ops JiT uses that autocast runs in bf16 (linear, conv,
SDPA): their floating inputs are cast to bf16, everything else runs in the dtype it is given, as
under autocast. SDPA is counted as the CUDA flash / memory-efficient kernels save it (q, k, v, out
and a float32 logsumexp; no N×N matrix). With --grad_checkpoint only each block's input is kept,
plus, while one block is recomputed in backward, that block's activations. Eager autocast also
keeps a bf16 copy of every float32 matmul weight it cast until the forward ends (its weight
cache); without checkpointing those copies are saved for backward anyway and counted among the
saved tensors; with it they are counted separately; with FSDP bf16 parameters
(--mixed_precision) there are none. --compiled traces the denoiser through torch.compile
(AOTAutograd with inductor's min-cut partitioner, no code generation), which is what main_jit
runs on CUDA: it recomputes cheap elementwise ops (norms, modulation, casts) in backward instead
of saving them, about half the eager figure. Not counted: the CUDA context and allocator slack (a few
GB), transient backward buffers of about one block's activations, the data batch.
"""

import argparse
import contextlib
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402

from denoiser import Denoiser  # noqa: E402
from model_jit import JiT_models  # noqa: E402
from util.config import RunConfig, parse  # noqa: E402
from util.errors import BadValue, exit_code  # noqa: E402

GiB = 2**30
CAPACITY_GIB = {"80GB": 79.1, "141GB": 139.8}  # what torch reports as total memory on H100-80GB / H200
HEADROOM_GIB = 4.0  # CUDA context, cuBLAS / NCCL workspaces, allocator slack
TABLE = [  # (model, image size, batch per GPU) of the README table
    *[("JiT-B/16", 256, 128), ("JiT-L/16", 256, 128), ("JiT-H/16", 256, 128), ("JiT-G/16", 256, 32)],
    *[("JiT-B/32", 512, 128), ("JiT-L/32", 512, 128), ("JiT-H/32", 512, 128), ("JiT-G/32", 512, 32)],
]


def build_meta(model: str, img_size: int, num_classes: int = 1000, attn_drop: float = 0.0, proj_drop: float = 0.0):
    with torch.device("meta"):
        net = JiT_models[model](input_size=img_size, num_classes=num_classes, attn_drop=attn_drop, proj_drop=proj_drop)
        return Denoiser(net, num_classes)


def param_counts(denoiser) -> dict:
    """Parameter counts: all (the EMAs copy all), trainable (gradients, moments), the largest block
    (an FSDP unit), the root unit (everything outside the blocks), and the matmul weights and
    biases (what autocast casts to bf16)."""
    total = sum(p.numel() for p in denoiser.parameters())
    blocks = [sum(p.numel() for p in b.parameters()) for b in denoiser.net.blocks]
    matmul = sum(
        p.numel()
        for m in denoiser.modules()
        if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))
        for p in m.parameters()
    )
    return {
        "total": total,
        "trainable": sum(p.numel() for p in denoiser.parameters() if p.requires_grad),
        "block": max(blocks),
        "root": total - sum(blocks),
        "matmul": matmul,
    }


def state_bytes(counts: dict, *, world_size: int, fsdp: bool, mixed_precision: bool = False, phemas: int = 0) -> dict:
    """Persistent per-GPU bytes by kind. 'state' is the 24 B/parameter part (weights, gradients,
    AdamW moments, two EMAs) plus 4 B per parameter and power EMA (--phema_stds), divided by
    world_size under FSDP (shard padding ignored). 'build_peak': the most the EMAs' construction
    holds, before training: under FSDP the live weights still whole and one full copy being sharded
    (run_build.build_model shards each copy as it is made), with the shards made so far; before
    issue 28 item 3 the power EMAs were all copied before sharding (2 + P full copies)."""
    n, tr = counts["total"], counts["trainable"]
    state = {"weights": 4 * n, "grads": 4 * tr, "adamw": 8 * tr, "emas": 2 * 4 * n}
    if phemas:
        state["phemas"] = phemas * 4 * n
    out = {k: v / world_size for k, v in state.items()} if fsdp else dict(state)
    out["state"] = sum(out.values())
    copies = 2 + phemas  # EMA 1, EMA 2 and the power EMAs
    out["build_peak"] = 2 * 4 * n + copies * 4 * n / world_size if fsdp else (1 + copies) * 4 * n
    if fsdp:  # the power EMAs copied whole first, then each EMA copied and sharded
        out["build_peak_unsharded_copies"] = (2 + phemas) * 4 * n + 2 * 4 * n / world_size
    if fsdp:  # root unit stays gathered from forward to backward; two blocks gathered (current, prefetched)
        p_bytes, g_bytes = (2, 2 + 4) if mixed_precision else (4, 4)  # bf16 grads get a float32 copy to reduce
        out["fsdp_gathered"] = counts["root"] * (4 + 4) + 2 * counts["block"] * p_bytes + counts["block"] * g_bytes
    elif world_size > 1:
        out["ddp_buckets"] = 4 * tr  # DDP's flat gradient buckets (gradient_as_bucket_view=False, the default)
    return out


class _FlashLikeSDPA(torch.autograd.Function):
    """Shapes only: saves what the CUDA flash / efficient SDPA kernels save for backward."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty_like(q)
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)  # (B, H, N)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


class MetaAutocast(TorchFunctionMode):
    """bf16 autocast for the ops JiT runs in lower precision (linear, conv2d, SDPA), on any device.
    Records the storages of the bf16 copies made of parameters (autocast's weight casts)."""

    def __init__(self, params):
        super().__init__()
        self.params = {id(p) for p in params}
        self.weight_casts = {}  # storage id -> bytes
        self._keep = []  # casts stay alive for the trace, so that no later storage reuses their id

    def _cast(self, a):
        if isinstance(a, torch.Tensor) and a.dtype == torch.float32:
            b = a.to(torch.bfloat16)
            if id(a) in self.params:
                self.weight_casts[b.untyped_storage()._cdata] = b.untyped_storage().nbytes()
                self._keep.append(b)
            return b
        return a

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in (F.linear, F.conv2d):
            args = tuple(self._cast(a) for a in args)
        elif func is F.scaled_dot_product_attention:
            q, k, v = (self._cast(a) for a in args[:3])
            return _FlashLikeSDPA.apply(q, k, v)
        elif func is F.dropout and (kwargs.get("training", args[2] if len(args) > 2 else True)):
            p = kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            if p > 0:  # CUDA's native_dropout keeps a bool mask
                return torch.native_dropout(args[0], p, True)[0]
        return func(*args, **kwargs)


def activation_trace(denoiser, batch_size: int, *, bf16: bool = True) -> dict:
    """Run forward on the meta device and add up what autograd saves, by place: 'outside' the
    blocks, per block (a list), the bf16 weight casts among them, and each block's input bytes."""
    params = list(denoiser.parameters())
    skip = {p.untyped_storage()._cdata for p in params} | {b.untyped_storage()._cdata for b in denoiser.buffers()}
    where = {"block": None}
    seen = {}  # storage id -> (place, bytes)
    inputs = []

    def pre_hook(i):
        def hook(module, args):
            where["block"] = i
            inputs.append(args[0].untyped_storage().nbytes())

        return hook

    def post_hook(module, args, out):
        where["block"] = None

    handles = []
    for i, block in enumerate(denoiser.net.blocks):
        handles += [block.register_forward_pre_hook(pre_hook(i)), block.register_forward_hook(post_hook)]

    def pack(t):
        sid = t.untyped_storage()._cdata
        if sid not in skip and sid not in seen:
            seen[sid] = (where["block"], t.untyped_storage().nbytes())
        return t

    size = denoiser.net.input_size
    x = torch.empty(batch_size, 3, size, size, device="meta")
    labels = torch.zeros(batch_size, dtype=torch.long, device="meta")
    mode = MetaAutocast(params) if bf16 else contextlib.nullcontext()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mode:
            denoiser.train()(x, labels)
    finally:
        for h in handles:
            h.remove()
    casts = mode.weight_casts if bf16 else {}
    depth = len(denoiser.net.blocks)
    blocks, block_casts = [0] * depth, [0] * depth
    outside = outside_casts = 0
    for sid, (place, nbytes) in seen.items():
        cast = nbytes if sid in casts else 0
        if place is None:
            outside += nbytes - cast
            outside_casts += cast
        else:
            blocks[place] += nbytes - cast
            block_casts[place] += cast
    return {
        "outside": outside,
        "outside_casts": outside_casts,
        "blocks": blocks,
        "block_casts": block_casts,
        "block_inputs": inputs,
        "all_casts": sum(casts.values()),
    }


def _aot_backend(gm, example_inputs):
    """torch.compile's forward/backward split (AOTAutograd with inductor's min-cut partitioner,
    which recomputes cheap ops instead of saving them) without inductor's code generation."""
    from functorch.compile import make_boxed_func, min_cut_rematerialization_partition
    from torch._functorch.aot_autograd import aot_module_simplified

    def nop(g, _):
        return make_boxed_func(g.forward)

    return aot_module_simplified(
        gm, example_inputs, fw_compiler=nop, bw_compiler=nop, partition_fn=min_cut_rematerialization_partition
    )


def compiled_saved_bytes(denoiser, batch_size: int, *, grad_checkpoint: bool) -> int:
    """Bytes the compiled forward (torch.compile of the denoiser, as main_jit does on CUDA) saves
    for backward on the meta device, under the same bf16 emulation. Takes a compile: tens of
    seconds to minutes."""
    params = list(denoiser.parameters())
    skip = {p.untyped_storage()._cdata for p in params} | {b.untyped_storage()._cdata for b in denoiser.buffers()}
    seen, keep = {}, []

    @torch._dynamo.disable
    def pack(t):
        keep.append(t)
        seen.setdefault(t.untyped_storage()._cdata, t.untyped_storage().nbytes())
        return t

    size = denoiser.net.input_size
    x = torch.empty(batch_size, 3, size, size, device="meta")
    labels = torch.zeros(batch_size, dtype=torch.long, device="meta")
    denoiser.net.grad_checkpoint = grad_checkpoint
    torch._dynamo.reset()
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), MetaAutocast(params):
            torch.compile(denoiser.train(), backend=_aot_backend)(x, labels)
    finally:
        denoiser.net.grad_checkpoint = False
        torch._dynamo.reset()
    return sum(n for sid, n in seen.items() if sid not in skip)


def compiled_trace(denoiser, batch_size: int) -> dict:
    """Compiled saved bytes without and with checkpointing; with it, the peak adds one block's
    recomputed activations, taken as the average saving per block."""
    full = compiled_saved_bytes(denoiser, batch_size, grad_checkpoint=False)
    ckpt = compiled_saved_bytes(denoiser, batch_size, grad_checkpoint=True)
    return {"compiled": True, "saved": full, "saved_ckpt": ckpt + (full - ckpt) / len(denoiser.net.blocks)}


def activation_bytes(trace: dict, *, grad_checkpoint: bool, fp32_params: bool = True) -> dict:
    """Saved-activation bytes at the peak. fp32_params: the model holds float32 weights that
    autocast casts (False: FSDP gathers bf16 parameters, nothing is cast). A compiled trace keeps
    its casts inside the graph: what it saves is all counted as activations."""
    if trace.get("compiled"):
        return {"saved": trace["saved_ckpt" if grad_checkpoint else "saved"], "weight_casts": 0}
    casts_saved = trace["outside_casts"] + sum(trace["block_casts"]) if fp32_params else 0
    if not grad_checkpoint:
        return {"saved": trace["outside"] + sum(trace["blocks"]), "weight_casts": casts_saved}
    per_block = [a + (c if fp32_params else 0) for a, c in zip(trace["blocks"], trace["block_casts"])]
    return {
        "saved": trace["outside"] + sum(trace["block_inputs"]) + max(per_block),
        "weight_casts": trace["all_casts"] if fp32_params else 0,
    }  # eager autocast's cache, to the end of forward


def estimate(
    model: str,
    img_size: int,
    batch_size: int,
    *,
    world_size: int = 8,
    fsdp: bool = False,
    grad_checkpoint: bool = False,
    mixed_precision: bool = False,
    attn_drop: float = 0.0,
    proj_drop: float = 0.0,
    compiled: bool = False,
    trace: dict | None = None,
    phemas: int = 0,
) -> dict:
    """Per-GPU bytes by kind and their total. compiled: activations as torch.compile saves them
    (slow) instead of eager. `trace` (activation_trace / compiled_trace) may be reused."""
    denoiser = build_meta(model, img_size, attn_drop=attn_drop, proj_drop=proj_drop)
    counts = param_counts(denoiser)
    if trace is None:
        trace = compiled_trace(denoiser, batch_size) if compiled else activation_trace(denoiser, batch_size)
    out = {
        "params": counts["total"],
        **state_bytes(counts, world_size=world_size, fsdp=fsdp, mixed_precision=mixed_precision, phemas=phemas),
    }
    acts = activation_bytes(trace, grad_checkpoint=grad_checkpoint, fp32_params=not (fsdp and mixed_precision))
    out["activations"] = acts["saved"]
    out["weight_casts"] = acts["weight_casts"]
    extra = out.get("fsdp_gathered", 0) + out.get("ddp_buckets", 0)
    out["total"] = out["state"] + extra + out["activations"] + out["weight_casts"]
    out["fits"] = {k: out["total"] / GiB + HEADROOM_GIB <= cap for k, cap in CAPACITY_GIB.items()}
    return out


def readme_table(world_size: int = 8, mixed_precision: bool = False, compiled: bool = False) -> str:
    """The README table: per-GPU GiB for TABLE's models, DDP and FSDP, without and with checkpointing."""
    act = "compiled" if compiled else "eager"
    rows = [
        f"| model | px | batch/GPU | params | state DDP | state FSDP | activations {act} (ckpt) | DDP | DDP + ckpt | "
        "FSDP | FSDP + ckpt |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for model, size, batch in TABLE:
        d = build_meta(model, size)
        trace = compiled_trace(d, batch) if compiled else activation_trace(d, batch)
        e = {
            (fsdp, ckpt): estimate(
                model,
                size,
                batch,
                world_size=world_size,
                fsdp=fsdp,
                grad_checkpoint=ckpt,
                mixed_precision=mixed_precision,
                trace=trace,
            )
            for fsdp in (False, True)
            for ckpt in (False, True)
        }
        ddp, fsdp = e[False, False], e[True, False]
        acts = [e[False, c]["activations"] + e[False, c]["weight_casts"] for c in (False, True)]
        cells = [
            f"{x['total'] / GiB:.0f} ({'80' if x['fits']['80GB'] else '141' if x['fits']['141GB'] else 'no'})"
            for x in e.values()
        ]
        rows.append(
            f"| {model} | {size} | {batch} | {ddp['params'] / 1e6:.1f}M | "
            f"{(ddp['state'] + ddp.get('ddp_buckets', 0)) / GiB:.1f} | "
            f"{(fsdp['state'] + fsdp['fsdp_gathered']) / GiB:.1f} | {acts[0] / GiB:.1f} ({acts[1] / GiB:.1f}) | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(rows)


def get_args_parser():
    p = argparse.ArgumentParser("Per-GPU memory estimate of JiT training (meta device)")
    a = p.add_argument
    a("--model", default="JiT-B/16", choices=sorted(JiT_models), metavar="MODEL")
    a("--img_size", default=256, type=int)
    a("--batch_size", default=128, type=int, help="per GPU")
    a("--world_size", default=8, type=int)
    a("--fsdp", action="store_true")
    a("--grad_checkpoint", action="store_true")
    a("--mixed_precision", action="store_true", help="FSDP gathers bf16 block parameters (util.sharding.shard)")
    a("--attn_dropout", default=0.0, type=float)
    a("--proj_dropout", default=0.0, type=float)
    a("--compiled", action="store_true", help="activations as torch.compile saves them (main_jit's CUDA default); slow")
    a(
        "--phema_stds",
        default=[],
        type=float,
        nargs="+",
        help="post-hoc EMA: the σ_rel main_jit.py tracks (their count matters)",
    )
    a("--table", action="store_true", help="print the README table instead")
    return p


def parse_args(argv=None) -> RunConfig:
    """The flags as given (util.config.RunConfig), as every script's."""
    return parse(get_args_parser(), argv)


def print_breakdown(args: RunConfig, e: dict):
    """The estimate `e` of `args`'s run, one line per kind of memory."""
    mode = ("FSDP" if args.fsdp else "DDP") + (" + grad checkpointing" if args.grad_checkpoint else "")
    print(
        f"{args.model} at {args.img_size}px, batch {args.batch_size}/GPU, {args.world_size} GPUs, {mode}: "
        f"{e['params'] / 1e6:.1f}M parameters"
    )
    lines = [
        ("weights (fp32)", "weights"),
        ("gradients (fp32)", "grads"),
        ("AdamW moments", "adamw"),
        ("two EMAs", "emas"),
        (f"{len(args.phema_stds)} power EMAs (--phema_stds)", "phemas"),
        ("DDP gradient buckets", "ddp_buckets"),
        ("FSDP gathered units", "fsdp_gathered"),
        (f"saved activations ({'compiled' if args.compiled else 'eager'}, bf16)", "activations"),
        ("autocast bf16 weight copies", "weight_casts"),
    ]
    for label, key in lines:
        if key in e:
            print(f"  {label:36s} {e[key] / GiB:8.2f} GiB")
    print(f"  {'total':36s} {e['total'] / GiB:8.2f} GiB  (+ ~{HEADROOM_GIB:.0f} GiB context / workspaces)")
    print(
        f"  {'peak while building the EMAs':36s} {e['build_peak'] / GiB:8.2f} GiB  (before training; each copy "
        "sharded as it is made)"
    )
    if "build_peak_unsharded_copies" in e and args.phema_stds:
        print(
            f"  {'  with the power EMAs copied whole':36s} {e['build_peak_unsharded_copies'] / GiB:8.2f} GiB  (how "
            "main_jit built them before)"
        )
    for k, ok in e["fits"].items():
        print(f"  fits a {k} GPU ({CAPACITY_GIB[k]} GiB): {'yes' if ok else 'no'}")


def main(args: RunConfig):
    """Print the estimate (or --table); BadValue for sizes that cannot work (see cli)."""
    for name in ("img_size", "batch_size", "world_size"):
        if getattr(args, name) < 1:
            raise BadValue(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.table:
        print(readme_table(args.world_size, args.mixed_precision, args.compiled))
        return
    same = {k: getattr(args, k) for k in ("world_size", "fsdp", "grad_checkpoint", "mixed_precision", "compiled")}
    drop = {"attn_drop": args.attn_dropout, "proj_drop": args.proj_dropout}
    e = estimate(args.model, args.img_size, args.batch_size, **same, **drop, phemas=len(args.phema_stds))
    print_breakdown(args, e)


def cli(argv=None) -> int:
    """Exit status as util.errors: 2 for bad input (one line on stderr)."""
    return exit_code(main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
