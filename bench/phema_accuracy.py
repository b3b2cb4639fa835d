"""How accurate post-hoc EMA is (issue 21, item 5), and what its snapshots cost for ImageNet.

    python bench/phema_accuracy.py                 # about 2 minutes on one CPU core
    python bench/phema_accuracy.py --steps 1200    # a quicker, coarser run

1. A real training of the tiny preset on CPU: JiT-XS/4 (16 px, 3 classes) in a Denoiser, AdamW
   (lr 1e-3, betas 0.9 / 0.95), synthetic class-conditional images, batch 8, for --steps steps. Every
   step one fused lerp updates power EMAs of σ_rel 0.003, 0.006, 0.012 (the snapshot profiles) and
   0.0045, 0.009 (tracked only to compare with), and classic EMAs whose decays give at this run
   length the σ_rel that 0.9996 / 0.9998 / 0.9999 give at 600 ImageNet epochs (750,600 steps).
   From 90% of the run on, the snapshot profiles are kept at every step that is a multiple of the
   finest spacing; the coarser spacings take subsets. The run length in steps only sets how finely
   the profiles are resolved: σ_rel and the spacing are both fractions of the run, so a spacing of
   T/600 here stands for one ImageNet epoch of a 600-epoch run.
   Reported per target and spacing: ‖reconstructed − tracked‖ / ‖tracked − raw weights‖ over all
   parameters at the end of the run (reconstructed from float32 snapshots with float64 sums; one
   column from float16 snapshots), and the profile-space fit error that reconstruct_ema.py prints.
   (a) The tracked σ_rel 0.006 reconstructed from its own snapshots, through snapshot files and
   reconstruct_ema.py, against the tracked EMA.
2. The defaults for ImageNet 600 epochs at a global batch of 1024 (1251 steps per epoch): the fit
   error in profile space at full scale for the paper's EMA range, and the disk the snapshots take
   for JiT-B/16, L/16 and H/16 (parameter counts from models built on the meta device).
"""

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import reconstruct_ema  # noqa: E402
from denoiser import Denoiser  # noqa: E402
from model_jit import JiT_models  # noqa: E402
from util import checkpoint, phema, phema_files  # noqa: E402
from util.config import RunConfig, parse  # noqa: E402
from util.ema import EMA, PowerEMA, lerp_together_  # noqa: E402
from util.errors import BadValue, exit_code  # noqa: E402
from util.files import human_bytes, write_json  # noqa: E402

# ImageNet 600 epochs at a global batch of 1024, and the defaults chosen from this benchmark.
IMAGENET_STEPS_PER_EPOCH, IMAGENET_EPOCHS, IMAGENET_BATCH = 1251, 600, 1024
IMAGENET_STEPS = IMAGENET_STEPS_PER_EPOCH * IMAGENET_EPOCHS
PAPER_DECAYS = (0.9996, 0.9998, 0.9999)
SNAPSHOT_STDS = (0.003, 0.006, 0.012)
DEFAULT_EVERY, DEFAULT_FROM = phema_files.default_schedule(
    IMAGENET_STEPS
)  # 2502, 675540: every 2 epochs from epoch 540
SPACINGS_IN_EPOCHS = (0.5, 1, 2, 4)
DIRECT_STDS = (0.0045, 0.009)
TARGET_STDS = (0.003, 0.0045, 0.006, 0.009, 0.012)
BATCH = 8


def equivalent_decay(decay: float, steps: int) -> float:
    """The per-step decay that has, after `steps` steps, the σ_rel that `decay` has after a
    600-epoch ImageNet run: 1 − d scales inversely with the run length."""
    return 1 - (1 - decay) * IMAGENET_STEPS / steps


def synthetic_batch(g: torch.Generator, templates: torch.Tensor):
    """BATCH images in [-1, 1] (class template + noise) and their labels."""
    labels = torch.randint(0, templates.shape[0], (BATCH,), generator=g)
    x = (templates[labels] + 0.3 * torch.randn(BATCH, *templates.shape[1:], generator=g)).clamp(-1, 1)
    return x, labels


def flat(module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in module.parameters()]).clone()


def train_tiny(steps: int, finest: int, start: int, log=print) -> dict:
    """Train the tiny preset for `steps` steps, tracking the EMAs; keep the snapshot profiles
    (flattened float32 weights) at each multiple of `finest` from `start` on."""
    torch.manual_seed(0)
    net = JiT_models["JiT-XS/4"](input_size=16, num_classes=3)
    model = Denoiser(net, num_classes=3).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
    power = {s: PowerEMA(model, s) for s in SNAPSHOT_STDS + DIRECT_STDS}
    decays = [equivalent_decay(d, steps) for d in PAPER_DECAYS]
    classic = {d: EMA(model, d) for d in decays}
    g = torch.Generator().manual_seed(0)
    templates = torch.randn(3, 3, 16, 16, generator=g).tanh()
    snapshots = {s: {} for s in SNAPSHOT_STDS}  # σ_rel -> {step: weights}
    t0 = time.time()
    for step in range(1, steps + 1):
        x, labels = synthetic_batch(g, templates)
        model(x, labels).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        images = step * BATCH
        targets = [e.tensors() for e in power.values()] + [list(e.module.parameters()) for e in classic.values()]
        weights = [e.weight(images, BATCH) for e in power.values()] + [1 - d for d in decays]
        lerp_together_(targets, list(model.parameters()), weights)
        if step >= start and step % finest == 0:
            for s in SNAPSHOT_STDS:
                snapshots[s][step] = flat(power[s].module)
        if step % 500 == 0:
            log(f"  step {step}/{steps} ({time.time() - t0:.0f} s)")
    return {
        "raw": flat(model),
        "power": power,
        "classic": classic,
        "decays": decays,
        "snapshots": snapshots,
        "train_s": time.time() - t0,
    }


def reconstruct_from_run(run: dict, stds, steps: int, spacing: int, start: int, target, dtype=torch.float32):
    """(weights (P,) float64, Fit) of `target` (('std', σ) or ('decay', d)) at the end of the run
    from the snapshots of profiles `stds` every `spacing` steps from `start` on, stored as `dtype`."""
    keys = [(s, k) for k in range(start, steps + 1) if k % spacing == 0 for s in stds]
    images = np.array([k * BATCH for _, k in keys], dtype=np.float64)
    gammas = np.array([phema.gamma_from_sigma_rel(s) for s, _ in keys])
    kind, value = target
    if kind == "std":
        fit = phema.fit_power(images, gammas, steps * BATCH, value)
    else:
        fit = phema.fit_decay(images, gammas, steps * BATCH, value, BATCH)
    total = torch.zeros_like(run["raw"], dtype=torch.float64)
    for (s, k), w in zip(keys, fit.weights):
        total += w * run["snapshots"][s][k].to(dtype).double()
    return total, fit


def relative_error(reconstructed, tracked, raw) -> float:
    """‖reconstructed − tracked‖ / ‖tracked − raw‖ (float64)."""
    tracked, raw = tracked.double(), raw.double()
    return float((reconstructed - tracked).norm() / (tracked - raw).norm())


def accuracy_rows(run: dict, steps: int, start: int) -> list[dict]:
    """One row per (target, snapshot profiles): errors at each spacing, in weights and in profile space."""
    cases = [("std", 0.006, (0.003, 0.012), run["power"][0.006])]  # (b) literally: the middle one from the other two
    cases += [("std", s, SNAPSHOT_STDS, run["power"][s]) for s in DIRECT_STDS]
    cases += [("decay", d, SNAPSHOT_STDS, run["classic"][d]) for d in run["decays"]]
    rows = []
    for kind, value, stds, ema in cases:
        row = {"target": kind, "value": value, "from": list(stds), "spacing": {}}
        if kind == "decay":
            row["imagenet_decay"] = PAPER_DECAYS[run["decays"].index(value)]
            row["sigma_rel"] = phema.sigma_rel_of_decay(value, steps)
        for epochs in SPACINGS_IN_EPOCHS:
            spacing = round(steps * epochs / IMAGENET_EPOCHS)
            rec, fit = reconstruct_from_run(run, stds, steps, spacing, start, (kind, value))
            cell = {
                "steps": spacing,
                "error": relative_error(rec, flat(ema.module), run["raw"]),
                "fit_error": fit.fit_error,
                "gain": fit.gain,
            }
            if epochs * IMAGENET_STEPS_PER_EPOCH == DEFAULT_EVERY:
                rec16, _ = reconstruct_from_run(run, stds, steps, spacing, start, (kind, value), torch.float16)
                row["error_float16"] = relative_error(rec16, flat(ema.module), run["raw"])
                row["error_float16_of_weights"] = float(
                    (rec16 - flat(ema.module).double()).norm() / flat(ema.module).norm()
                )
            row["spacing"][str(epochs)] = cell
        rows.append(row)
    return rows


def own_profile_through_files(run: dict, steps: int, start: int) -> dict:
    """(a): write the snapshots at the default spacing as files, reconstruct σ_rel 0.006 at the end
    with reconstruct_ema.py, and compare with the tracked EMA."""
    spacing = round(steps * DEFAULT_EVERY / IMAGENET_STEPS)
    template = run["power"][0.006].module.state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "phema")
        for s in SNAPSHOT_STDS:
            for k, vector in run["snapshots"][s].items():
                if k % spacing == 0:
                    phema_files.write_snapshot(
                        folder,
                        unflatten(vector, template),
                        sigma_rel=s,
                        step=k,
                        images_seen=k * BATCH,
                        epoch=0,
                        args={"model": "JiT-XS/4", "img_size": 16, "class_num": 3},
                    )
        code = reconstruct_ema.cli(["--snapshots", folder, "--std", "0.006", "--output_dir", tmp])
        assert code == 0
        state = checkpoint.load_checkpoint(os.path.join(tmp, f"ema-std0.006-step{steps:010d}.pth"))[0].weights("ema1")
    got = torch.cat([state[n].reshape(-1) for n in template])
    tracked = flat(run["power"][0.006].module)
    return {
        "spacing_steps": spacing,
        "max_abs_diff": float((got - tracked).abs().max()),
        "error": relative_error(got.double(), tracked, run["raw"]),
    }


def unflatten(vector: torch.Tensor, template: dict) -> dict:
    out, i = {}, 0
    for name, value in template.items():
        out[name] = vector[i : i + value.numel()].reshape(value.shape)
        i += value.numel()
    return out


def imagenet_fits() -> list[dict]:
    """Profile-space fit errors at full ImageNet scale with the default snapshots, for the paper's
    EMA range, at each spacing."""
    rows = []
    for kind, value in [("std", s) for s in TARGET_STDS] + [("decay", d) for d in PAPER_DECAYS]:
        row = {"target": kind, "value": value, "spacing": {}}
        for epochs in SPACINGS_IN_EPOCHS:
            every = round(epochs * IMAGENET_STEPS_PER_EPOCH)
            steps = [
                k
                for k in range(1, IMAGENET_STEPS + 1)
                if phema_files.snapshot_due(k, every=every, start=DEFAULT_FROM, total=IMAGENET_STEPS)
            ]
            images = np.array([k * IMAGENET_BATCH for k in steps for _ in SNAPSHOT_STDS], dtype=np.float64)
            gammas = np.array([phema.gamma_from_sigma_rel(s) for _ in steps for s in SNAPSHOT_STDS])
            end = IMAGENET_STEPS * IMAGENET_BATCH
            fit = (
                phema.fit_power(images, gammas, end, value)
                if kind == "std"
                else phema.fit_decay(images, gammas, end, value, IMAGENET_BATCH)
            )
            row["spacing"][str(epochs)] = {"fit_error": fit.fit_error, "gain": fit.gain, "cond": fit.cond}
        rows.append(row)
    return rows


def disk_costs() -> list[dict]:
    """Snapshot files and bytes for the default schedule, per model and dtype."""
    rows = []
    for name in ("JiT-B/16", "JiT-L/16", "JiT-H/16"):
        with torch.device("meta"):
            model = Denoiser(JiT_models[name](input_size=256, num_classes=1000), 1000)
        state, keep = model.state_dict(), phema_files.frozen_names(model)
        row = {"model": name, "params": sum(v.numel() for v in state.values())}
        for dtype in ("float16", "float32"):
            one = phema_files.snapshot_file_bytes(state, dtype, keep)
            files, total = phema_files.snapshot_cost(
                one, len(SNAPSHOT_STDS), every=DEFAULT_EVERY, start=DEFAULT_FROM, total=IMAGENET_STEPS
            )
            row[dtype] = {"file_bytes": one, "files": files, "bytes": total}
        rows.append(row)
    return rows


def print_tables(result: dict):
    steps = result["steps"]
    heads = " | ".join(f"{e} ep ({result['rows'][0]['spacing'][str(e)]['steps']} steps)" for e in SPACINGS_IN_EPOCHS)
    print(
        f"\nTiny preset, {steps} steps; ‖reconstructed − tracked‖ / ‖tracked − raw‖ (profile-space fit error); "
        f"spacing in ImageNet epochs (and steps here); snapshots from step {result['start']}"
    )
    print(f"| target | from snapshots of | {heads} | float16 snapshots, 2 ep |")
    print("|---" * (3 + len(SPACINGS_IN_EPOCHS)) + "|")
    for row in result["rows"]:
        name = (
            f"σ_rel {row['value']:g}"
            if row["target"] == "std"
            else f"decay {row['imagenet_decay']} (here {row['value']:.5f}, σ_rel {row['sigma_rel']:.4f})"
        )
        cells = " | ".join(f"{c['error']:.1e} ({c['fit_error']:.0e})" for c in row["spacing"].values())
        print(
            f"| {name} | {', '.join(f'{s:g}' for s in row['from'])} | {cells} | {row['error_float16']:.1e} "
            f"({row['error_float16_of_weights']:.0e} of ‖w‖) |"
        )
    a = result["own_profile"]
    print(
        f"\n(a) σ_rel 0.006 from its own snapshots (files, reconstruct_ema.py, every {a['spacing_steps']} steps): "
        f"max |Δw| {a['max_abs_diff']:.1e}, relative error {a['error']:.1e}"
    )
    print(
        f"\nImageNet 600 epochs, snapshots of σ_rel {', '.join(map(str, SNAPSHOT_STDS))} from step {DEFAULT_FROM}: "
        "profile-space fit error (Σ|w|)"
    )
    print("| target | " + " | ".join(f"every {e} ep" for e in SPACINGS_IN_EPOCHS) + " |")
    print("|---" * (1 + len(SPACINGS_IN_EPOCHS)) + "|")
    for row in result["imagenet"]:
        name = f"σ_rel {row['value']:g}" if row["target"] == "std" else f"decay {row['value']}"
        print(
            f"| {name} | "
            + " | ".join(f"{c['fit_error']:.0e} ({c['gain']:.1f})" for c in row["spacing"].values())
            + " |"
        )
    print(
        f"\nDisk, every {DEFAULT_EVERY} steps from step {DEFAULT_FROM} to {IMAGENET_STEPS} ({len(SNAPSHOT_STDS)} "
        "profiles)"
    )
    print("| model | parameters | files | float16 | float32 |")
    print("|---|---|---|---|---|")
    for row in result["disk"]:
        print(
            f"| {row['model']} | {row['params'] / 1e6:.1f}M | {row['float16']['files']} | "
            + " | ".join(
                f"{human_bytes(row[d]['bytes'])} ({human_bytes(row[d]['file_bytes'])} each)"
                for d in ("float16", "float32")
            )
            + " |"
        )


def get_args_parser():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--steps", default=3600, type=int, help="training steps (a multiple of 1200, so that every spacing is whole)"
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    return parser


def parse_args(argv=None) -> RunConfig:
    """The flags as given (util.config.RunConfig), as every script's."""
    return parse(get_args_parser(), argv)


def main(args: RunConfig) -> dict:
    """Train, reconstruct and print the tables; BadValue for --steps that is no positive multiple of 1200."""
    if args.steps < 1 or args.steps % 1200:
        raise BadValue(f"--steps must be a positive multiple of 1200, got {args.steps}")
    torch.set_num_threads(1)  # a 0.3M-parameter model: more threads only contend (10x slower on a busy 2-core VM)
    t0 = time.time()
    steps = args.steps
    start = phema_files.default_schedule(steps)[1]
    finest = round(steps * min(SPACINGS_IN_EPOCHS) / IMAGENET_EPOCHS)
    print(f"training JiT-XS/4 for {steps} steps (snapshots every {finest} steps from step {start})")
    run = train_tiny(steps, finest, start)
    result = {
        "steps": steps,
        "start": start,
        "train_s": run["train_s"],
        "rows": accuracy_rows(run, steps, start),
        "own_profile": own_profile_through_files(run, steps, start),
        "imagenet": imagenet_fits(),
        "disk": disk_costs(),
    }
    result["wall_s"] = time.time() - t0
    print_tables(result)
    print(f"\nwall time {result['wall_s']:.0f} s (training {result['train_s']:.0f} s)")
    if args.json:
        write_json(args.json, result)
    return result


def cli(argv=None) -> int:
    """Exit status as util.errors: 2 for bad input (one line on stderr)."""
    return exit_code(main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
