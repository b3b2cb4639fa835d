"""What an exported folder tells its reader about its weights (weights.py writes the folder): the
sampler it recommends (the best point of the run's sweep), the FID / IS records it keeps, and its
README.md model card for the Hub. Pure functions of config.json's entries and metrics.jsonl records.
"""

import os
import string

from sampling import SamplerSettings, upgrade_schedule
from util.sweep import record_sampler

# The fields of a metrics.jsonl eval record kept in config.json.
RECORD_FIELDS = tuple(
    """checkpoint_epoch ema method steps schedule nfe cfg interval_min interval_max num_images fid inception_score
    inception_score_std fid_stats""".split()
)


def default_sampler() -> dict:
    s = SamplerSettings()
    return dict(method=s.method, steps=s.steps, cfg=s.cfg, interval_min=s.interval_min, interval_max=s.interval_max)


def records_of(records: list[dict], ema: int) -> list[dict]:
    """The records of EMA `ema` (a record without "ema" is EMA 1), compacted to RECORD_FIELDS."""
    out = []
    for r in records:
        if r.get("ema", 1) == ema:
            c = {k: r.get(k) for k in RECORD_FIELDS}
            c["ema"] = ema
            c["fid_stats"] = os.path.basename(r["fid_stats"]) if r.get("fid_stats") else None
            out.append(c)
    return out


def runnable(record: dict) -> bool:
    """Whether SamplerSettings accepts a sweep record's sampler today: a point of a sweep over an old
    schedule name may be a grid float32 cannot hold under the new name (edm:7 at 50 steps is power:7)."""
    try:
        SamplerSettings(**record_sampler(record))
    except ValueError:
        return False
    return True


def recommended_sampler(args: dict, records: list[dict], ema: int, epoch: int) -> dict:
    """The best point of the run's sweep (metrics.jsonl records from a sweep, which name their
    checkpoint) for these weights: EMA `ema`, the sweep of this epoch (else the latest one before),
    among its points the most numerous image count, the lowest FID. Else the training flags (the
    first value of a swept flag). Points whose sampler SamplerSettings refuses now are left out (see runnable)."""
    sweeps = [
        r
        for r in records
        if "checkpoint" in r and r.get("ema", 1) == ema and (r.get("checkpoint_epoch") or 0) <= epoch and runnable(r)
    ]
    if sweeps:
        last = max(r.get("checkpoint_epoch") or 0 for r in sweeps)
        sweeps = [r for r in sweeps if (r.get("checkpoint_epoch") or 0) == last]
        counts = {}
        for r in sweeps:
            counts[r["num_images"]] = counts.get(r["num_images"], 0) + 1
        n = max(counts, key=lambda k: (counts[k], k))
        best = min((r for r in sweeps if r["num_images"] == n), key=lambda r: r["fid"])
        return {
            **{k: best[k] for k in default_sampler()},
            "schedule": upgrade_schedule(best.get("schedule") or "uniform"),  # (a record may hold an old name)
            "chosen_by": f"the best of {counts[n]} sweep points at epoch {last}: FID {best['fid']:.4f} on {n} images",
        }
    defaults = default_sampler()
    flags = dict(
        method="sampling_method",
        steps="num_sampling_steps",
        cfg="cfg",
        interval_min="interval_min",
        interval_max="interval_max",
        schedule="sampling_schedule",
    )
    defaults = {**defaults, "schedule": SamplerSettings().schedule}
    out = {}
    for key, flag in flags.items():
        value = args.get(flag)
        out[key] = defaults[key] if value is None else (value[0] if isinstance(value, (list, tuple)) else value)
    out["schedule"] = upgrade_schedule(out["schedule"])
    return {**out, "chosen_by": "the training flags (no sweep in metrics.jsonl)"}


def _num(x, digits: int = 4) -> str:
    return "n/a" if x is None else (f"{x:.{digits}f}" if isinstance(x, float) else str(x))


# README.md of an exported folder: fixed text with $fields (model_card fills them in).
CARD_TEMPLATE = string.Template("""---
library_name: $library
license:  # fill in the license of these weights (e.g. mit, apache-2.0, cc-by-nc-4.0)
tags:
- jit
- pixel-diffusion
- flow-matching
- class-conditional-image-generation
- image-generation
---

# $model, $size×$size px, $classes classes

A JiT (Just image Transformer; Li & He, *Back to Basics: Let Denoising Generative Models Denoise*, \
[arXiv 2511.13720](https://arxiv.org/abs/2511.13720)): class-conditional diffusion directly on pixels. \
The ViT sees the noisy image z_t = t·x + (1 − t)·e (t in [0, 1], t = 1 is the clean image x in [−1, 1], \
e ~ N(0, $noise_scale²)) and predicts $prediction; class $classes is "no class" (classifier-free guidance).

## Weights

- $weights
- network: depth $depth, hidden size $hidden_size, $num_heads heads, $patch×$patch patches through a \
$bottleneck_dim-d bottleneck, $in_context_len in-context class tokens from block $in_context_start, \
dropout $attn_drop / $proj_drop
- denoiser: noise_scale $noise_scale, t_eps $t_eps, training times logit-normal ($P_mean, $P_std), \
label drop $label_drop_prob, prediction $pred, loss on $loss
- files: `$weights_file` ($layout), `config.json` (everything above, the recommended sampler and the records below)

$assumed$training## Sampling and evaluation

Recommended sampler: $method, $steps steps, $schedule schedule, CFG $cfg for t in ($interval_min, $interval_max), \
chosen by $chosen_by.

$records## Use

With the JiT repository this folder came from (`--resume` takes the folder; the model, sampler and class count \
come from `config.json`):
```
python sample.py --resume FOLDER --classes 0 1 2 --per_class 8 --output grid.png
python main_jit.py --resume FOLDER --evaluate_gen --num_images 50000 --output_dir eval
python main_jit.py --init_from FOLDER --class_num N --data_path DATA --output_dir finetune  # fine-tune
```
or in Python:
```python
import torch
from weights import load_denoiser
model, sampler, config, notes = load_denoiser("FOLDER")
images = model.generate(torch.tensor([0, 1, 2]), sampler)  # (3, 3, H, W), about [-1, 1]
```
$diffusers

## Upload

With the Hub's own CLI (`pip install huggingface_hub`):
```
hf auth login                       # once (older versions: huggingface-cli login)
hf upload USER/REPO FOLDER .        # (older versions: huggingface-cli upload USER/REPO FOLDER .)
```
""")
CARD_DIFFUSERS = """With diffusers, once its JiT port (huggingface/diffusers PR #13098) is merged:
```python
from diffusers import JiTTransformer2DModel
model = JiTTransformer2DModel.from_pretrained("USER/REPO")  # or the local folder
x_hat = model(hidden_states=z, timestep=t, class_labels=y).sample  # t: flow time in [0, 1]
```"""
CARD_JIT = (
    "For diffusers (its JiT port, huggingface/diffusers PR #13098), export with "
    "`python export.py ... --format diffusers`."
)


def training_text(tr: dict) -> str:
    """The card's training table (config.json's "training"), or nothing."""
    if not tr:
        return ""
    text = (
        "## Training\n\n| setting | value |\n|---|---|\n" + "".join(f"| `{k}` | {v} |\n" for k, v in tr.items()) + "\n"
    )
    if tr.get("global_batch"):
        planned = f", {tr['epochs']} epochs planned." if tr.get("epochs") else "."
        text += f"Global batch {tr['global_batch']} (batch_size × accum_iter × processes){planned}\n\n"
    return text


def records_text(records: list[dict]) -> str:
    """The card's FID / IS table of config.json's "evaluations", best first."""
    if not records:
        return "No FID / IS records of these weights were found in the run's `metrics.jsonl`.\n\n"
    rows = [
        f"| {_num(r.get('checkpoint_epoch'))} | {r.get('method')} | {r.get('steps')} | {r.get('cfg')} | "
        f"({r.get('interval_min')}, {r.get('interval_max')}) | {r.get('num_images')} | {_num(r['fid'])} | "
        f"{_num(r.get('inception_score'), 2)} ± {_num(r.get('inception_score_std'), 2)} | "
        f"{r.get('fid_stats') or ''} |"
        for r in sorted(records, key=lambda r: (-(r.get("checkpoint_epoch") or 0), r["fid"]))
    ]
    return (
        "FID / Inception Score of these weights' EMA in the run's `metrics.jsonl` (best first):\n\n"
        "| epoch | method | steps | CFG | interval | images | FID | IS | reference stats "
        "|\n|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n\n"
    )


def model_card(config: dict, fmt: str, weights_file: str) -> str:
    """README.md (CARD_TEMPLATE) of an exported folder of format `fmt` ("jit" or "diffusers") holding
    `weights_file`: front matter for the Hub (library, tags; the license is left to fill in), what the
    network is, how it was trained, its FID/IS records and how to load and upload the folder."""
    net, den, smp, w, tr = (
        config["network"],
        config["denoiser"],
        config["sampler"],
        config["weights"],
        config["training"],
    )
    which = w.get("which", "model")
    who = (
        "the raw (non-EMA) weights"
        if which == "model"
        else f"EMA {which.removeprefix('ema')}" + (f" (decay {w['ema_decay']})" if w.get("ema_decay") else "")
    )
    seen = f", {w['images_seen']:,} images seen" if w.get("images_seen") else ""
    params = f"{w['num_parameters'] / 1e6:.1f}M parameters, " if w.get("num_parameters") else ""
    assumed = (
        "The denoiser and sampler settings are the defaults: the folder these weights came from did not record "
        "them.\n\n"
        if any(k in config.get("assumed", ()) for k in ("denoiser", "sampler"))
        else ""
    )
    return CARD_TEMPLATE.substitute(
        library="diffusers" if fmt == "diffusers" else "jit",
        model=config.get("model") or "JiT",
        size=net["input_size"],
        classes=net["num_classes"],
        noise_scale=den["noise_scale"],
        prediction="the clean image x̂" if den["pred"] == "x" else repr(den["pred"]) + " (its prediction target)",
        weights=f"{who} after epoch {w.get('epoch', 'n/a')}{seen}; {params}{w.get('dtype', 'float32')}"
        + (f"; exported from `{w['source']}`" if w.get("source") else ""),
        depth=net["depth"],
        hidden_size=net["hidden_size"],
        num_heads=net["num_heads"],
        patch=net["patch_size"],
        bottleneck_dim=net["bottleneck_dim"],
        in_context_len=net["in_context_len"],
        in_context_start=net["in_context_start"],
        attn_drop=net["attn_drop"],
        proj_drop=net["proj_drop"],
        t_eps=den["t_eps"],
        P_mean=den["P_mean"],
        P_std=den["P_std"],
        label_drop_prob=den["label_drop_prob"],
        pred=den["pred"],
        loss=den["loss"],
        weights_file=weights_file,
        layout="the layout of diffusers JiTTransformer2DModel" if fmt == "diffusers" else "names as model_jit.JiT",
        assumed=assumed,
        training=training_text(tr),
        method=smp["method"],
        steps=smp["steps"],
        schedule=smp.get("schedule") or "uniform",
        cfg=smp["cfg"],
        interval_min=smp["interval_min"],
        interval_max=smp["interval_max"],
        chosen_by=smp.get("chosen_by", "the training flags"),
        records=records_text(config.get("evaluations") or []),
        diffusers=CARD_DIFFUSERS if fmt == "diffusers" else CARD_JIT,
    )
