"""FSDP2 (`fully_shard`) for JiT: sharding plan, sharded EMA, non-finite skip, full checkpoints.

One FSDP unit per JiT block plus the root (the Denoiser: embedders, final layer, pos_embed). Every
parameter becomes a DTensor sharded on dim 0; `named_parameters()` keeps the reference's names and
order, so `engine_jit.build_optimizer` builds the same two AdamW groups (fused AdamW accepts DTensor
parameters). The EMA copies are sharded with the same plan, so every rank updates its own shards
with one fused `_foreach_lerp_` and no communication. Checkpoints are gathered to the format of an
unsharded run (full `net.*` state dicts, the optimizer state keyed by parameter index), so FSDP and
DDP runs resume from each other's files.

Precision. A DDP run has float32 parameters and bf16 autocast on CUDA. `shard(..., mixed_precision=False)`
keeps exactly that math: float32 parameters are all-gathered, the forward runs under the same
autocast, float32 gradients are reduce-scattered (the sum order of the reduction is the only
difference from DDP's all-reduce). `mixed_precision=True` all-gathers the block parameters in bf16
(half the traffic, and the autocast bf16 weight copies no longer stay alive from forward to
backward) with float32 gradient reduction, and leaves the root unit and the inputs in float32; the
matmuls are then bit-identical to autocast, and what differs is listed in `block_policy`.

torch's FSDP and distributed-checkpoint modules are imported at first use (about half a second):
runs that do not shard never pay for them.
"""

import pickle
import sys

import torch
import torch.distributed as dist
import torch.nn as nn

FSDP_MODULES = ("torch.distributed.fsdp", "torch.distributed._composable.fsdp")  # public since torch 2.6; before


def fsdp():
    """torch's FSDP2 module (FSDPModule, MixedPrecisionPolicy, fully_shard), imported now."""
    try:
        import torch.distributed.fsdp as module
        from torch.distributed.fsdp import FSDPModule  # noqa: F401
    except ImportError:  # pragma: no cover
        import torch.distributed._composable.fsdp as module
    return module


def block_policy(mixed_precision: bool):
    """The precision of the block units.

    False: float32 parameters gathered and float32 gradients reduced; run the forward under
    util.distributed.autocast as DDP does (identical math).
    True: bf16 parameters gathered, float32 gradient reduction, inputs not cast (the residual
    stream keeps the dtype autocast gives it). Under autocast every Linear sees the same bf16
    weight and bias (both are round-to-nearest casts of the float32 master), so the matmuls are
    unchanged. What differs from DDP: (1) the RMSNorm weights (norm1, norm2, q_norm, k_norm) are
    rounded to bf16 before they multiply; (2) RMSNorm(x)·weight is computed in bf16 wherever x is
    bf16: q and k (every block; the output goes to RoPE in bf16 instead of float32) and the
    residual stream of the blocks before `in_context_start` (autocast leaves it bf16 until the
    float32 in-context tokens are concatenated), where modulate then runs in bf16 too; (3) those
    RMSNorm weight gradients are rounded to bf16 before the float32 reduction (Linear weight
    gradients are bf16 products in both). Softmax / SDPA run in bf16 in both (q, k are cast to v's
    dtype). Measured on CPU (tests/sharding_worker.py precision): the gradients then differ from
    DDP's by up to 1.2% (relative L2, q/k-norm weights), as much as bf16 autocast differs from
    float32; float32 gathers reproduce DDP's loss and gradients bit for bit.
    """
    if mixed_precision:
        return fsdp().MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, cast_forward_inputs=False
        )
    return fsdp().MixedPrecisionPolicy()


def shard(denoiser: nn.Module, *, mixed_precision: bool, reshard_after_forward: bool = True, mesh=None) -> nn.Module:
    """Shard `denoiser` (a Denoiser holding a JiT as `.net`) in place: one FSDP unit per block,
    then the root unit (everything else, always float32). Returns the same object, now an
    FSDPModule. Call after `.to(device)` and after copying any EMA (`util.ema.EMA(..., sharded=True)`); the process
    group must be initialised (the default mesh spans all ranks)."""
    policy, api = block_policy(mixed_precision), fsdp()
    for block in denoiser.net.blocks:
        api.fully_shard(block, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    api.fully_shard(
        denoiser, mesh=mesh, mp_policy=api.MixedPrecisionPolicy(), reshard_after_forward=reshard_after_forward
    )
    return denoiser


def is_sharded(module) -> bool:
    """Whether `module` (or the module torch.compile wraps) is an FSDP2 module; while FSDP has not
    been imported, nothing can be."""
    module = getattr(module, "_orig_mod", module)
    return any(isinstance(module, getattr(sys.modules[m], "FSDPModule", ())) for m in FSDP_MODULES if m in sys.modules)


def local_tensors(tensors) -> list[torch.Tensor]:
    """This rank's shard of each DTensor (a view: writing to it writes the parameter); plain
    tensors pass through. Detached. Imports nothing: before torch.distributed.tensor is imported, no
    tensor can be a DTensor."""
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", ())
    return [(t.to_local() if isinstance(t, dtensor) else t).detach() for t in tensors]


def nonfinite_flag(params, group=None) -> torch.Tensor:
    """0-dim float tensor: 1.0 if any gradient holds inf/NaN (or their norms overflow), else 0.0; no
    host sync. Sharded gradients (DTensors) are checked shard by shard and the flag all-reduced (max,
    one number over `group`), so it is the same on every rank; plain gradients (one process, or DDP's,
    equal on every rank) need no communication. Set it as `optimizer.found_inf` before `step()` so
    that fused AdamW skips the step on all ranks."""
    grads = [p.grad for p in params if p.grad is not None]
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", ())
    flag = (~torch.isfinite(torch.stack(torch._foreach_norm(local_tensors(grads))).sum())).float()
    if any(isinstance(g, dtensor) for g in grads):
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return flag


def set_grad_sync(model, enabled: bool):
    """Gradient accumulation under FSDP2: call with False before the forward of every micro-batch
    but the last and with True before the last (the flag is read during backward, so it must stay
    set until backward is done; a context manager around the forward only, like DDP's no_sync, is
    not enough). Without sync each rank accumulates the unsharded gradients of all units (4 B per
    parameter); with sync every micro-batch, the reduce-scatters add into the sharded gradients.
    No-op for modules that are not sharded."""
    if is_sharded(model):
        model.set_requires_gradient_sync(enabled)


# Full (unsharded) checkpoints in the format of a one-process / DDP run.


def full_options(**kw):
    """torch.distributed.checkpoint's StateDictOptions for full (unsharded) state dicts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def optimizer_param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The name of each optimizer parameter in the order torch numbers them in
    `optimizer.state_dict()`: group by group (no-decay, then decay), in model order within."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for g in optimizer.param_groups for p in g["params"]]


def optim_state_by_index(named: dict, names: list[str]) -> dict:
    """Name-keyed optimizer state (torch.distributed.checkpoint's format) -> index-keyed (what
    `torch.optim.Optimizer.state_dict()` of an unsharded model gives)."""
    index = {n: i for i, n in enumerate(names)}
    state = dict(sorted((index[n], s) for n, s in named["state"].items()))
    groups = [dict(g, params=[index[n] for n in g["params"]]) for g in named["param_groups"]]
    return {"state": state, "param_groups": groups}


def optim_state_by_name(indexed: dict, names: list[str]) -> dict:
    """The inverse of `optim_state_by_index`."""
    state = {names[i]: s for i, s in indexed["state"].items()}
    groups = [dict(g, params=[names[i] for i in g["params"]]) for g in indexed["param_groups"]]
    return {"state": state, "param_groups": groups}


def full_state_dict(module: nn.Module) -> dict | None:
    """Collective when `module` is sharded. Its full state dict on the CPU on rank 0 (gathered: a
    snapshot that later steps do not change), None on the other ranks. An unsharded module gives
    rank 0 its own tensors, moved to the CPU (the same tensors when they are there)."""
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    if is_sharded(module):
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        state = get_model_state_dict(module, options=full_options(cpu_offload=True))
    else:
        state = {k: v.cpu() for k, v in module.state_dict().items()} if rank0 else None
    return state if rank0 else None


def full_state(denoiser: nn.Module, emas, optimizer=None):
    """Collective. Gather everything to full CPU state dicts on rank 0.

    Returns (model_sd, [ema_sd, ...], optim_sd) on rank 0, (None, None, None) elsewhere, a
    snapshot (later steps do not change it):
    model_sd / ema_sd as `Denoiser.state_dict()` (keys `net.*`), optim_sd as
    `torch.optim.AdamW.state_dict()` of an unsharded model (None without an optimizer).
    """
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    model_sd = full_state_dict(denoiser)
    ema_sds = [full_state_dict(ema.module) for ema in emas]
    optim_sd = None
    if optimizer is not None:
        named = get_optimizer_state_dict(denoiser, optimizer, options=full_options(cpu_offload=True))
        if named:  # the gathered moments are new tensors, but `step` is the live one: copy it
            named["state"] = {
                n: {k: v.clone() if isinstance(v, torch.Tensor) and v.dim() == 0 else v for k, v in s.items()}
                for n, s in named["state"].items()
            }
            optim_sd = optim_state_by_index(named, optimizer_param_names(denoiser, optimizer))
    if dist.get_rank() != 0:
        return None, None, None
    return model_sd, ema_sds, optim_sd


def shapes_of(state_dict) -> dict:
    """{key: shape} of a state dict's tensors (DTensors report the full shape)."""
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def mismatch(module: nn.Module, got: dict) -> str | None:
    """What keeps tensors of the shapes `got` ({key: shape}, shapes_of) from loading strictly into
    `module` (sharded or not), in load_state_dict's words, or None."""
    want = shapes_of(module.state_dict())
    parts = []
    if missing := [k for k in want if k not in got]:
        parts.append(f"Missing key(s) in state_dict: {', '.join(missing)}.")
    if unexpected := [k for k in got if k not in want]:
        parts.append(f"Unexpected key(s) in state_dict: {', '.join(unexpected)}.")
    parts += [
        f"size mismatch for {k}: copying a param with shape {got[k]}, the model has {want[k]}."
        for k in want
        if k in got and got[k] != want[k]
    ]
    return " ".join(parts) or None


def load_full_state(denoiser: nn.Module, emas, optimizer, model_sd, ema_sds, optim_sd):
    """Collective. Load full state dicts (the format `full_state` writes, or a DDP / one-process
    checkpoint) held by rank 0 into the sharded model, EMAs and optimizer; the values given on
    other ranks are ignored (pass None). Each tensor is broadcast from rank 0 and every rank keeps
    its shard. optimizer None, or optim_sd None on rank 0: weights only. Strict: missing or
    unexpected keys and wrong shapes raise RuntimeError on every rank, before anything is loaded.
    The optimizer keeps its own fused / foreach choice."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    rank0 = dist.get_rank() == 0
    modules = [denoiser] + [e.module for e in emas]
    verdict = [None, None]  # (error message, has optimizer state), decided on rank 0
    if rank0:
        errors = [mismatch(m, shapes_of(sd)) for m, sd in zip(modules, [model_sd, *ema_sds])]
        verdict = [" ".join(e for e in errors if e) or None, optim_sd is not None]
    dist.broadcast_object_list(verdict, src=0)
    error, has_optim = verdict
    if error:  # every rank raises, none is left waiting in a broadcast
        raise RuntimeError(f"Error(s) in loading state_dict: {error}")
    opts = full_options(broadcast_from_rank0=True, strict=True)
    # Each module gets its own dict: torch puts the module's sharded tensors into the dict it is given,
    # and the next module given the same dict (an EMA starting from the model's weights) would fail.
    for module, sd in zip(modules, [model_sd, *(ema_sds or [None] * len(emas))]):
        set_model_state_dict(module, dict(sd) if rank0 else {}, options=opts)
    if optimizer is not None and has_optim:
        named = optim_state_by_name(optim_sd, optimizer_param_names(denoiser, optimizer)) if rank0 else {}
        load_optimizer_keeping_impl(denoiser, optimizer, named, opts)


def load_optimizer_keeping_impl(denoiser: nn.Module, optimizer, named: dict, options):
    """set_optimizer_state_dict of a name-keyed state; the optimizer keeps its own fused / foreach choice."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    impl = [{k: g.get(k) for k in ("fused", "foreach")} for g in optimizer.param_groups]
    set_optimizer_state_dict(denoiser, optimizer, named, options=options)
    for g, kw in zip(optimizer.param_groups, impl):
        g.update(kw)


def unshard_into(plain: nn.Module, sharded: nn.Module) -> nn.Module:
    """Collective. Copy a sharded module's full weights and its buffers into an unsharded module of the
    same architecture on every rank (the EMA net for sampling: evaluation code then runs as in a DDP
    run, each rank on its own share of the images), one parameter at a time: the full module copy plus
    one gathered parameter, nothing more. Every parameter and buffer of `plain` is written, so it may
    hold uninitialised memory (built on the meta device, then `to_empty`)."""
    from torch.distributed.tensor import DTensor

    params, buffers = dict(plain.named_parameters()), dict(plain.named_buffers())
    with torch.no_grad():
        for name, p in sharded.named_parameters():
            params[name].copy_(p.full_tensor() if isinstance(p, DTensor) else p)
        for name, b in sharded.named_buffers():
            buffers[name].copy_(b)
    return plain


# Sharded checkpoints (util/checkpoint_dcp.py): each rank writes and reads its own shards.


def sharded_state(denoiser: nn.Module, parts: dict, optimizer=None):
    """What a sharded checkpoint holds of the live objects, gathered nowhere: (tensors, param_groups,
    steps). parts: {part (a tuple, e.g. ("model",), ("model_phema", "0")): sharded module}; tensors:
    the nest DCP writes, each part's sharded state dict at its place and, with an optimizer, "optimizer":
    {parameter name: {"exp_avg", "exp_avg_sq"}} (this rank's shards); param_groups: AdamW's groups
    with parameters by name; steps: {parameter name: step counter (a CPU copy)}; both None without an
    optimizer."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    tensors = {}
    for part, module in parts.items():
        _set_nested(tensors, part, get_model_state_dict(module))
    if optimizer is None:
        return tensors, None, None
    named = get_optimizer_state_dict(denoiser, optimizer)
    tensors["optimizer"] = {n: {k: v for k, v in s.items() if k != "step"} for n, s in named["state"].items()}
    steps = {n: s["step"].detach().cpu().clone() for n, s in named["state"].items()}
    return tensors, named["param_groups"], steps


def _set_nested(root: dict, path: tuple, value):
    for key in path[:-1]:
        root = root.setdefault(key, {})
    root[path[-1]] = value


def load_sharded(folder: str, denoiser: nn.Module, sources: list, optimizer=None, optimizer_state=None):
    """Collective. Load the sharded checkpoint `folder` (util/checkpoint_dcp.py) into a sharded run:
    each (module, part) of `sources` from that part (several modules may start from one part: an EMA
    added on resume from the model's), and with `optimizer` and optimizer_state (param_groups, steps
    of its train_state) the AdamW state. Each rank reads what its shards need, at any world size (DCP
    reshards). Strict: a part whose keys or shapes differ from its module's raises RuntimeError, a
    folder some rank cannot read OSError, on every rank before anything is loaded. The optimizer keeps
    its own fused / foreach choice."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    from util import checkpoint_dcp, distributed

    try:
        metadata = checkpoint_dcp.read_metadata(folder)
        mismatches = " ".join(e for e in (mismatch(m, checkpoint_dcp.shapes(metadata, p)) for m, p in sources) if e)
        error = ("mismatch", f"Error(s) in loading state_dict: {mismatches}") if mismatches else None
    except (OSError, RuntimeError, pickle.UnpicklingError) as e:
        error = ("unreadable", f"cannot read {folder} on rank {distributed.get_rank()}: {type(e).__name__}: {e}")
    errors = [e for e in distributed.all_gather_object(error) if e]
    if errors:  # every rank raises, none is left waiting in DCP's collectives
        kind, message = errors[0]
        raise (RuntimeError if kind == "mismatch" else OSError)(message)
    rounds = []  # each part at most once per dcp.load
    for module, part in sources:
        free = next((r for r in rounds if part not in r), None)
        if free is None:
            free = {}
            rounds.append(free)
        free[part] = module
    for i, parts in enumerate(rounds):
        template, named = {}, None
        for part, module in parts.items():
            _set_nested(template, part, get_model_state_dict(module))  # the live shards: loaded in place
        if i == 0 and optimizer is not None and optimizer_state is not None:
            named = get_optimizer_state_dict(denoiser, optimizer)
            template["optimizer"] = {n: {k: v for k, v in s.items() if k != "step"} for n, s in named["state"].items()}
        with checkpoint_dcp.reading(folder):
            checkpoint_dcp.dcp().load(
                template, storage_reader=checkpoint_dcp.safe_reader(folder), process_group=distributed.control_group()
            )
        if named is not None:
            groups, steps = optimizer_state
            state = {n: {**s, "step": steps[n]} for n, s in template["optimizer"].items()}
            load_optimizer_keeping_impl(denoiser, optimizer, {"state": state, "param_groups": groups}, None)
