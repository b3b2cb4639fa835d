"""Weights in and out: export.py, weights.py and model_jit_adapters.py. Checkpoint -> exported folder -> the same
network outputs and samples (float32 bit for bit, bfloat16 the rounded weights), the diffusers name
table both ways, reference checkpoints, starting a run from other weights (--init_from), and bad
inputs as one-line errors."""

import argparse
import json
import math
import os

import pytest
import safetensors.torch
import torch
from helpers import save_reference_checkpoint, tiny_denoiser

import export
import model_jit_adapters
import run_sources
import weights
from denoiser import Denoiser
from model_jit import JiT_models
from sampling import SamplerSettings
from util import checkpoint as ckpt_util
from util import files, phema_files
from util.config import parse
from util.grid import figure_classes
from util.pos_embed import sincos_2d_pos_embed

SAMPLER = SamplerSettings(method="heun", steps=3, cfg=2.0, interval_min=0.1)
# A sweep of EMA 1 at epoch 7 (4000 images; then its best point again on 8000), an older sweep, EMA 2.
SWEEP = [
    dict(checkpoint_epoch=7, ema=1, cfg=c, fid=f, num_images=4000) for c, f in ((1.0, 30.0), (2.0, 12.5), (3.0, 20.0))
] + [
    dict(checkpoint_epoch=7, ema=1, cfg=2.0, fid=11.0, num_images=8000),
    dict(checkpoint_epoch=3, ema=1, cfg=4.0, fid=5.0, num_images=4000),
    dict(checkpoint_epoch=7, ema=2, cfg=1.5, fid=1.0, num_images=4000),
]


def eval_record(**kw) -> dict:
    return {
        "kind": "eval",
        "epoch": kw["checkpoint_epoch"],
        "inception_score": 50.0,
        "inception_score_std": 1.0,
        "method": "heun",
        "steps": 50,
        "interval_min": 0.1,
        "interval_max": 1.0,
        "fid_stats": "/x/jit_in16_stats.npz",
        "checkpoint": "/x/checkpoint-last.pth",
        **kw,
    }


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder: our checkpoint of the tiny JiT (model, EMA 1, EMA 2 all different; 2 AdamW
    steps) and a metrics.jsonl with sweep records. Returns (folder, TrainState)."""
    folder = tmp_path_factory.mktemp("run")
    ref = folder / "ref.pth"
    save_reference_checkpoint(ref, tiny_denoiser(0), tiny_denoiser(1), tiny_denoiser(2), epoch=7, steps=2)
    state = ckpt_util.load_checkpoint(str(ref))[0]
    os.remove(ref)
    state.args = {
        **state.args,
        "accum_iter": 2,
        "ema_decay1": 0.9999,
        "ema_decay2": 0.9996,
        "cfg": [1.0, 2.0],
        "interval_min": 0.1,
        "label_drop_prob": 0.2,
    }
    state.world_size = 3
    ckpt_util.save(state, str(folder / "checkpoint-last.pth"))
    with open(folder / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"kind": "train", "epoch": 7, "loss": 0.5}) + "\n")
        for r in SWEEP:
            f.write(json.dumps(eval_record(**r)) + "\n")
        f.write(
            json.dumps(eval_record(checkpoint_epoch=7, ema=1, cfg=9.0, fid=0.5, num_images=4000))[:40]
        )  # cut by a kill
    return str(folder), state


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("exported") / "jit")
    assert export.cli([run[0], out]) == 0
    return out


def denoiser_with(state_dict) -> Denoiser:
    d = tiny_denoiser()
    d.load_state_dict(state_dict)
    return d.eval()


def outputs(d: Denoiser):
    g = torch.Generator().manual_seed(1)
    z, t, y = torch.randn(6, 3, 16, 16, generator=g), torch.rand(6, generator=g), torch.tensor([0, 1, 2, 3, 0, 1])
    with torch.no_grad():
        return d.net(z, t, y)


def samples(d: Denoiser):
    noise = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    return d.generate(torch.tensor([0, 1, 2]), SAMPLER, noise=noise)


def one_line_error(capsys, code: int, expected_code: int = 2) -> str:
    err = capsys.readouterr().err
    assert code == expected_code, err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_round_trip_gives_bit_identical_outputs_and_samples(run, exported):
    folder, state = run
    loaded = weights.load_denoiser(exported)
    ema1 = denoiser_with(state.emas[0])
    assert torch.equal(outputs(loaded.denoiser), outputs(ema1))
    assert torch.equal(samples(loaded.denoiser), samples(ema1))
    assert not torch.equal(outputs(ema1), outputs(denoiser_with(state.model)))  # EMA 1 really is not the model

    config = loaded.config
    assert (
        config["model"] == "JiT-XS/4"
        and config["network"]["input_size"] == 16
        and config["network"]["num_classes"] == 3
    )
    assert config["network"]["in_context_start"] == 2 and config["denoiser"]["label_drop_prob"] == 0.2
    assert config["denoiser"]["pred"] == "x" and config["denoiser"]["loss"] == "v"
    w = config["weights"]
    assert (w["which"], w["ema_decay"], w["epoch"], w["dtype"], w["source"]) == (
        "ema1",
        0.9999,
        7,
        "float32",
        "checkpoint-last.pth",
    )
    assert w["optimizer_steps"] == 2 and w["images_seen"] == 2 * 4 * 2 * 3  # steps × batch × accum_iter × processes
    assert config["training"]["global_batch"] == 24
    # The best point of the newest sweep of EMA 1 (not the 8000-image rerun, the older sweep or EMA 2).
    s = config["sampler"]
    assert (s["method"], s["steps"], s["cfg"], s["interval_min"]) == ("heun", 50, 2.0, 0.1) and "FID 12.5000" in s[
        "chosen_by"
    ]
    assert loaded.sampler == SamplerSettings("heun", 50, 2.0, 0.1, 1.0)
    assert len(config["evaluations"]) == 5 and {r["ema"] for r in config["evaluations"]} == {1}

    card = open(os.path.join(exported, "README.md")).read()
    assert card.startswith("---\nlibrary_name: jit\nlicense:") and "\n---\n" in card
    assert "| 7 | heun | 50 | 2.0 | (0.1, 1.0) | 4000 | 12.5000 | 50.00 ± 1.00 | jit_in16_stats.npz |" in card
    assert (
        "hf upload" in card
        and "Global batch 24" in card
        and "EMA 1 (decay 0.9999) after epoch 7, 48 images seen" in card
    )
    assert sorted(os.listdir(exported)) == ["README.md", "config.json", "model.safetensors"]


def test_ema_choice_and_bfloat16_export(run, tmp_path):
    folder, state = run
    assert export.cli([folder, str(tmp_path / "raw"), "--ema", "0"]) == 0
    config, sd = weights.load_exported(str(tmp_path / "raw"))
    assert config["weights"]["which"] == "model" and config["weights"]["ema_decay"] is None
    assert config["evaluations"] == [] and "training flags" in config["sampler"]["chosen_by"]
    assert config["sampler"]["cfg"] == 1.0  # the first of the run's swept --cfg values
    assert all(torch.equal(sd[k], v) for k, v in state.model.items())

    assert export.cli([folder, str(tmp_path / "bf16"), "--ema", "2", "--dtype", "bfloat16"]) == 0
    raw = safetensors.torch.load_file(str(tmp_path / "bf16" / "model.safetensors"))
    assert {v.dtype for v in raw.values()} == {torch.bfloat16}
    config, sd = weights.load_exported(str(tmp_path / "bf16"))
    assert config["weights"]["dtype"] == "bfloat16" and set(sd) == set(state.emas[1])
    for k, v in state.emas[1].items():
        assert torch.equal(sd[k], v.to(torch.bfloat16)), k  # round to nearest, nothing else
    loaded = weights.load_denoiser(str(tmp_path / "bf16")).denoiser
    assert next(loaded.parameters()).dtype == torch.float32
    ref = outputs(denoiser_with(state.emas[1]))
    err = (outputs(loaded) - ref).norm() / ref.norm()
    assert 0 < err < 1e-2


def diffusers_names(depth: int) -> set:
    """The tensor names of diffusers' JiTTransformer2DModel (PR #13098) with in-context tokens."""
    names = {
        "t_embedder.mlp.0.weight",
        "t_embedder.mlp.0.bias",
        "t_embedder.mlp.2.weight",
        "t_embedder.mlp.2.bias",
        "y_embedder.embedding_table.weight",
        "x_embedder.proj1.weight",
        "x_embedder.proj2.weight",
        "x_embedder.proj2.bias",
        "pos_embed",
        "in_context_posemb",
        "norm_final.weight",
        "linear_final.weight",
        "linear_final.bias",
        "adaLN_modulation_final.weight",
        "adaLN_modulation_final.bias",
    }
    for i in range(depth):
        names |= {
            f"blocks.{i}.{n}" for n in ("norm1.weight", "norm2.weight", "attn.norm_q.weight", "attn.norm_k.weight")
        }
        for layer in ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "mlp.w12", "mlp.w3", "adaLN_modulation"):
            names |= {f"blocks.{i}.{layer}.weight", f"blocks.{i}.{layer}.bias"}
    return names


def test_diffusers_names_map_every_tensor_exactly_once_and_back():
    sd = tiny_denoiser().state_dict()
    theirs = model_jit_adapters.to_diffusers(sd)
    assert set(theirs) == diffusers_names(4)
    assert sum(v.numel() for v in theirs.values()) == sum(v.numel() for v in sd.values())  # nothing twice, nothing lost
    for p in ("weight", "bias"):
        q, k, v = (theirs[f"blocks.3.attn.to_{x}.{p}"] for x in "qkv")
        assert torch.equal(torch.cat([q, k, v]), sd[f"net.blocks.3.attn.qkv.{p}"]) and q.shape[0] == 64
    assert torch.equal(theirs["blocks.1.adaLN_modulation.weight"], sd["net.blocks.1.adaLN_modulation.1.weight"])
    assert torch.equal(theirs["linear_final.bias"], sd["net.final_layer.linear.bias"])
    back = model_jit_adapters.from_diffusers(theirs)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) and back[k].dtype == sd[k].dtype for k in sd)

    with pytest.raises(ckpt_util.CheckpointError, match=r"unknown tensor blocks\.0\.attn\.to_x\.weight"):
        model_jit_adapters.from_diffusers({**theirs, "blocks.0.attn.to_x.weight": torch.zeros(1)})
    with pytest.raises(ckpt_util.CheckpointError, match=r"missing tensor blocks\.2\.attn\.to_v\.bias"):
        model_jit_adapters.from_diffusers({k: v for k, v in theirs.items() if k != "blocks.2.attn.to_v.bias"})
    with pytest.raises(ckpt_util.CheckpointError, match="net"):
        model_jit_adapters.to_diffusers({"pos_embed": torch.zeros(1)})


def test_diffusers_export_loads_back_and_converts_bit_for_bit(run, exported, tmp_path):
    folder, state = run
    out = str(tmp_path / "diffusers")
    assert export.cli([folder, out, "--format", "diffusers"]) == 0
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "diffusion_pytorch_model.safetensors"]
    raw = json.load(open(os.path.join(out, "config.json")))
    assert raw["_class_name"] == "JiTTransformer2DModel"
    assert set(raw) - {"_class_name", "_jit"} == {
        "sample_size",
        "patch_size",
        "in_channels",
        "hidden_size",
        "num_layers",
        "num_attention_heads",
        "mlp_ratio",
        "attention_dropout",
        "dropout",
        "num_classes",
        "bottleneck_dim",
        "in_context_len",
        "in_context_start",
        "norm_eps",
    }
    assert (raw["sample_size"], raw["num_layers"], raw["num_attention_heads"], raw["num_classes"]) == (16, 4, 4, 3)
    assert set(
        safetensors.torch.load_file(os.path.join(out, "diffusion_pytorch_model.safetensors"))
    ) == diffusers_names(4)
    assert open(os.path.join(out, "README.md")).read().startswith("---\nlibrary_name: diffusers\n")

    loaded = weights.load_denoiser(out)
    assert torch.equal(outputs(loaded.denoiser), outputs(denoiser_with(state.emas[0])))
    assert loaded.sampler.cfg == 2.0 and loaded.config["weights"]["epoch"] == 7
    # diffusers -> ours again: the very tensors of the direct export
    assert export.cli([out, str(tmp_path / "back")]) == 0
    a = safetensors.torch.load_file(os.path.join(exported, "model.safetensors"))
    b = safetensors.torch.load_file(str(tmp_path / "back" / "model.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    # A diffusers folder made elsewhere (no _jit entry): the defaults, and a note that says so.
    json.dump({k: v for k, v in raw.items() if k != "_jit"}, open(os.path.join(out, "config.json"), "w"))
    loaded = weights.load_denoiser(out)
    assert loaded.config["model"] == "JiT-XS/4" and loaded.denoiser.noise_scale == 1.0
    assert any("records no denoiser or sampler settings" in n for n in loaded.notes)


def test_reference_checkpoints_export(tmp_path):
    """The reference's files: args as a Namespace lacking most of our keys (and here even the model)."""
    model = tiny_denoiser(3)
    ref = str(tmp_path / "checkpoint-last.pth")
    save_reference_checkpoint(ref, model, epoch=4)
    assert export.cli([str(tmp_path), str(tmp_path / "a")]) == 0
    config, sd = weights.load_exported(str(tmp_path / "a"))
    assert config["denoiser"]["label_drop_prob"] == 0.1 and config["weights"]["ema_decay"] is None
    assert (
        config["weights"]["epoch"] == 4 and config["weights"]["images_seen"] is None
    )  # no optimizer step, no world size
    assert torch.equal(outputs(weights.load_denoiser(str(tmp_path / "a")).denoiser), outputs(model))

    torch.save({"model": model.state_dict(), "epoch": 4, "args": argparse.Namespace(epochs=9)}, ref)
    assert export.cli([ref, str(tmp_path / "b")]) == 0
    config, _ = weights.load_exported(str(tmp_path / "b"))
    assert (
        config["model"] == "JiT-XS/4"
        and config["network"]["input_size"] == 16
        and config["network"]["num_classes"] == 3
    )


def tiny_target(class_num: int = 3, img_size: int = 16, model: str = "JiT-XS/4", seed: int = 9) -> Denoiser:
    torch.manual_seed(seed)
    return Denoiser(JiT_models[model](input_size=img_size, num_classes=class_num), class_num)


def test_init_with_another_class_count_keeps_every_other_tensor_and_trains():
    source = tiny_denoiser(0).state_dict()
    target = tiny_target(class_num=5)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    sd, notes = model_jit_adapters.adapt_for_init(source, target)
    target.load_state_dict(sd)
    after = target.state_dict()
    assert torch.equal(after[model_jit_adapters.LABEL_KEY], fresh[model_jit_adapters.LABEL_KEY]) and after[
        model_jit_adapters.LABEL_KEY
    ].shape == (6, 64)
    assert all(torch.equal(after[k], source[k]) for k in source if k != model_jit_adapters.LABEL_KEY)
    assert len(notes) == 1 and "label embedding is freshly initialised: 3 classes there, --class_num 5" in notes[0]
    opt = torch.optim.AdamW(target.parameters(), lr=1e-3)
    loss = target.train()(torch.rand(4, 3, 16, 16) * 2 - 1, torch.tensor([0, 1, 3, 4]))
    loss.backward()
    opt.step()
    assert math.isfinite(loss.item()) and not torch.equal(
        target.state_dict()[model_jit_adapters.LABEL_KEY], fresh[model_jit_adapters.LABEL_KEY]
    )


def test_init_with_another_img_size_rebuilds_the_position_tables():
    source = tiny_denoiser(0).state_dict()
    target = tiny_target(img_size=32)
    sd, notes = model_jit_adapters.adapt_for_init(source, target)
    target.load_state_dict(sd)
    assert torch.equal(target.net.pos_embed[0], sincos_2d_pos_embed(64, 8))
    assert target.net.rope_cos.shape == (4 + 64, 16)
    assert all(torch.equal(target.state_dict()[k], source[k]) for k in source if k != model_jit_adapters.POS_KEY)
    assert len(notes) == 1 and "rebuilt for 8×8 patches (--img_size 32; the weights were trained at 16)" in notes[0]
    assert target.eval()(torch.rand(2, 3, 32, 32), torch.tensor([0, 1])).isfinite()


def test_init_with_another_network_is_a_one_line_error():
    source = tiny_denoiser(0).state_dict()
    with pytest.raises(ckpt_util.CheckpointError) as e:
        model_jit_adapters.adapt_for_init(source, tiny_target(model="JiT-T/4"))
    assert "\n" not in str(e.value) and "--model" in str(e.value)
    cut = {k: v for k, v in source.items() if k != "net.in_context_posemb"}
    with pytest.raises(ckpt_util.CheckpointError, match="missing tensor net.in_context_posemb"):
        model_jit_adapters.adapt_for_init(cut, tiny_target())


def init_from(path, ema, target):
    """(state dict, notes, origin) of --init_from PATH --init_ema EMA for `target`, as a run reads and adapts them."""
    init = run_sources.read_init(path, ema)
    state, notes = run_sources.adapt_init(init, target, where=path)
    return state.model, notes, init.origin


def test_init_from_checkpoint_file_run_folder_and_exported_folder(run, exported):
    folder, state = run
    sd, notes, origin = init_from(folder, 2, tiny_target(class_num=5))
    assert all(torch.equal(sd[k], state.emas[1][k]) for k in sd if k != model_jit_adapters.LABEL_KEY)
    assert origin["weights"] == "ema2" and origin["epoch"] == 7 and origin["path"].endswith("checkpoint-last.pth")
    assert (
        notes[0].startswith("--init_from: the model and every EMA start from the ema2 weights of") and len(notes) == 2
    )
    sd, _, origin = init_from(os.path.join(folder, "checkpoint-last.pth"), 0, tiny_target())
    assert all(torch.equal(sd[k], state.model[k]) for k in sd) and origin["weights"] == "model"
    sd, notes, origin = init_from(exported, 1, tiny_target())
    assert all(torch.equal(sd[k], state.emas[0][k]) for k in sd) and origin["weights"] == "ema1" and len(notes) == 1
    with pytest.raises(ckpt_util.CheckpointError, match=r"^--init_from .*no model_ema3"):
        run_sources.read_init(folder, 3)


def test_config_flags_override_or_disagree(exported):
    config, sd = weights.load_exported(exported)
    loaded = weights.load_denoiser(
        exported, {"cfg": 3.5, "noise_scale": 2.0, "class_num": 3, "attn_impl": "reference", "seed": 1}
    )
    assert loaded.sampler.cfg == 3.5 and loaded.denoiser.noise_scale == 2.0
    assert loaded.denoiser.net.blocks[0].attn.attn_impl == "reference"
    assert notes_with(loaded.notes, "--cfg 3.5 overrides 2.0") and notes_with(
        loaded.notes, "--noise_scale 2.0 overrides 1.0"
    )
    assert loaded.notes[0].startswith(f"from {exported}/config.json: --model JiT-XS/4 --img_size 16 --t_eps 0.05")
    for flag, value in (("class_num", 5), ("img_size", 32), ("model", "JiT-T/4"), ("pred", "v")):
        with pytest.raises(ValueError, match=f"--{flag} {value} disagrees with"):
            weights.merge_flags(config, {flag: value})

    parser = argparse.ArgumentParser()
    parser.add_argument("--resume", required=True)
    parser.add_argument("--cfg", default=[1.0], type=float, nargs="+")
    parser.add_argument("--img_size", default=256, type=int)
    parser.add_argument("--noise_scale", default=1.0, type=float)
    parser.add_argument("--num_sampling_steps", default=50, type=int)
    flags = parse(parser, ["--resume", exported, "--cfg", "1.0"])  # the parser's default, typed out
    assert flags.given == {"resume", "cfg"}  # seam bug 7: a default typed out is typed, and beats config.json's 2.0
    adopted, notes = run_sources.adopt_settings(flags, config)
    assert adopted == {"img_size": 16, "noise_scale": 1.0, "num_sampling_steps": 50}  # the rest comes from config.json
    new = flags.replace(**adopted)
    assert (new.img_size, new.cfg, flags.img_size) == (16, [1.0], 256)
    assert notes_with(notes, "--cfg 1.0 overrides 2.0")
    state = weights.as_train_state(config, sd)
    assert state.weights("ema1") is sd and state.epoch == 7 and state.start == {"epoch": 8, "step": 0}


def notes_with(notes, text) -> bool:
    return any(text in n for n in notes)


def test_bad_inputs_are_one_line_errors(run, exported, tmp_path, capsys):
    folder, _ = run
    err = one_line_error(capsys, export.cli([str(tmp_path / "nothing"), str(tmp_path / "o1")]))
    assert "no such file or folder" in err
    os.makedirs(tmp_path / "empty")
    err = one_line_error(capsys, export.cli([str(tmp_path / "empty"), str(tmp_path / "o2")]))
    assert "has no checkpoint-*.pth and no config.json" in err
    err = one_line_error(capsys, export.cli([folder, str(tmp_path / "o3"), "--ema", "3"]))
    assert "checkpoint-last.pth: the checkpoint has no model_ema3" in err
    err = one_line_error(capsys, export.cli([folder, folder, "--overwrite"]))
    assert "holds checkpoints" in err
    err = one_line_error(capsys, export.cli([folder, exported]))
    assert "is not empty" in err
    with pytest.raises(SystemExit) as e:
        export.cli([folder, str(tmp_path / "o4"), "--dtype", "float16"])
    assert e.value.code == 2  # argparse's own usage error
    capsys.readouterr()

    def copy_of_export(name) -> str:
        out = str(tmp_path / name)
        assert export.cli([exported, out]) == 0
        return out

    with pytest.raises(ckpt_util.CheckpointError, match="has no config.json"):
        weights.load_exported(str(tmp_path / "empty"))
    broken = copy_of_export("truncated")
    path = os.path.join(broken, "model.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    errors = [capture(lambda: weights.load_exported(broken))]
    one_line_error(capsys, export.cli([broken, str(tmp_path / "o5")]))

    tensors = safetensors.torch.load_file(os.path.join(exported, "model.safetensors"))
    for name, change in (
        ("unknown", {**tensors, "blocks.0.attn.qkv.scale": torch.ones(1)}),
        ("missing", {k: v for k, v in tensors.items() if k != "final_layer.linear.bias"}),
    ):
        bad = copy_of_export(name)
        safetensors.torch.save_file(change, os.path.join(bad, "model.safetensors"))
        errors.append(capture(lambda bad=bad: weights.load_exported(bad)))
    bad = copy_of_export("shape")
    config = json.load(open(os.path.join(bad, "config.json")))
    config["network"]["num_classes"] = 4
    json.dump(config, open(os.path.join(bad, "config.json"), "w"))
    errors.append(capture(lambda: weights.load_exported(bad)))
    open(os.path.join(bad, "config.json"), "w").write("{not json")
    errors.append(capture(lambda: weights.load_exported(bad)))
    assert all("\n" not in e for e in errors), errors
    assert "cannot read" in errors[0] and "model.safetensors" in errors[0]
    assert (
        "unknown tensor net.blocks.0.attn.qkv.scale" in errors[1]
        and "missing tensor net.final_layer.linear.bias" in errors[2]
    )
    assert (
        "net.y_embedder.embedding_table.weight has shape [4, 64] but the network of its config (JiT-XS/4 at 16 px, 4 "
        "classes) needs [5, 64]" in errors[3]
    )
    assert "cannot read" in errors[4] and "config.json" in errors[4]


def capture(fn) -> str:
    with pytest.raises(ckpt_util.CheckpointError) as e:
        fn()
    return str(e.value)


def test_a_failed_write_exits_1_and_leaves_no_config(run, tmp_path, capsys, monkeypatch):
    def full_disk(path, write, *, needed=None):
        raise files.WriteError(f"could not write {path}: No space left on device (needs about 1.3 MB, 0 B free)")

    monkeypatch.setattr(files, "atomic_write", full_disk)
    out = tmp_path / "out"
    err = one_line_error(capsys, export.cli([run[0], str(out)]), expected_code=1)
    assert "model.safetensors: No space left on device" in err
    assert not weights.is_exported(str(out))


def evaluate_gen(source, out, *extra, inception_weights, fid_ref_stats) -> dict:
    """main_jit.py --evaluate_gen --resume SOURCE in this process (12 images, 2 Heun steps, CFG 2 from 0.1):
    its one metrics.jsonl record."""
    from helpers import read_metrics

    import main_jit

    args = main_jit.parse_args(
        [
            str(a)
            for a in (
                "--evaluate_gen",
                "--resume",
                source,
                "--output_dir",
                out,
                "--num_images",
                12,
                "--gen_bsz",
                6,
                "--num_sampling_steps",
                2,
                "--cfg",
                2.0,
                "--interval_min",
                0.1,
                "--device",
                "cpu",
                "--fid_stats",
                fid_ref_stats,
                "--inception_weights",
                inception_weights,
                *extra,
            )
        ]
    )
    assert main_jit.main(args) == 0
    (record,) = read_metrics(out, "eval")
    return record


@pytest.mark.slow
def test_evaluate_gen_and_sample_read_an_exported_folder(
    run, exported, tmp_path, inception_weights, fid_ref_stats, capsys
):
    """The model, image size and classes come from the weights (no --model flags given): the
    checkpoint and its export evaluate to the same FID and sample the same grid, bit for bit."""
    import sample

    kw = dict(inception_weights=inception_weights, fid_ref_stats=fid_ref_stats)
    a = evaluate_gen(run[0], tmp_path / "a", **kw)
    b = evaluate_gen(exported, tmp_path / "b", **kw)
    assert (a["fid"], a["inception_score"]) == (b["fid"], b["inception_score"]) and a["img_size"] == 16
    assert f"note: from {exported}: --model JiT-XS/4 --img_size 16 --class_num 3" in capsys.readouterr().out
    grids = []
    for source in (run[0], exported):
        path = tmp_path / f"grid{len(grids)}.png"
        argv = [
            "--resume",
            source,
            "--classes",
            0,
            2,
            "--per_class",
            2,
            "--output",
            path,
            "--device",
            "cpu",
            *(["--num_sampling_steps", 50, "--cfg", 2.0, "--interval_min", 0.1] if source == run[0] else []),
        ]
        assert sample.main(sample.parse_args([str(x) for x in argv])) == 0
        grids.append(path.read_bytes())
    assert grids[0] == grids[1]  # the exported folder's recommended sampler is the sweep's best: CFG 2.0 from 0.1
    with pytest.raises(ValueError, match="--model JiT-T/4 disagrees with"):  # util.errors.BadValue: exit status 2
        evaluate_gen(exported, tmp_path / "c", "--model", "JiT-T/4", **kw)
    with pytest.raises(ValueError, match="holds one network"):
        evaluate_gen(exported, tmp_path / "d", "--ema", 2, **kw)


@pytest.mark.slow
def test_init_from_with_another_class_count_trains_and_resumes_exactly(run, data, tmp_path, capsys):
    """--init_from a 3-class checkpoint for a 2-class dataset: at step 0 every tensor but the label
    embedding is the source's; a run stopped after epoch 1 and rerun (its checkpoint wins over
    --init_from) ends equal to an uninterrupted one."""
    from helpers import TINY, assert_same_state, load_last

    import main_jit

    two = str(tmp_path / "two")
    for c in ("c0", "c1"):
        os.makedirs(os.path.join(two, "train", c))
        for name in os.listdir(os.path.join(data, "train", c)):
            os.symlink(os.path.join(data, "train", c, name), os.path.join(two, "train", c, name))
    flags = [
        *TINY[: TINY.index("--class_num")],
        *TINY[TINY.index("--class_num") + 2 :],
        "--class_num",
        "2",
        "--data_path",
        two,
        "--init_from",
        run[0],
        "--init_ema",
        "1",
    ]
    source = run[1].weights("ema1")
    setup = main_jit.setup(main_jit.parse_args([*flags, "--output_dir", str(tmp_path / "dry"), "--dry_run"]))
    setup.close()
    for module in (setup.parts.denoiser, *(e.module for e in setup.parts.emas)):
        for k, v in module.state_dict().items():
            assert torch.equal(v, source[k]) != (k == model_jit_adapters.LABEL_KEY), k
    assert "the label embedding is freshly initialised" in capsys.readouterr().out

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main_jit.main(main_jit.parse_args([*flags, "--epochs", "2", "--output_dir", str(straight)])) == 0
    assert main_jit.main(main_jit.parse_args([*flags, "--epochs", "1", "--output_dir", str(resumed)])) == 0
    assert (
        main_jit.main(
            main_jit.parse_args([*flags, "--epochs", "2", "--output_dir", str(resumed), "--resume", str(resumed)])
        )
        == 0
    )
    assert "it continues that run, --init_from" in capsys.readouterr().out
    assert_same_state(load_last(resumed), load_last(straight))
    assert load_last(straight)["args"]["init_origin"]["path"] == os.path.abspath(
        os.path.join(run[0], "checkpoint-last.pth")
    )


KNOBS = [
    dict(bottleneck_dim=0, pred="eps", loss="x"),
    dict(bottleneck_dim=8, in_context_len=0, loss="eps"),
    dict(in_context_len=2, in_context_start=0, pred="v"),
]


@pytest.mark.parametrize("knobs", KNOBS, ids=lambda k: "-".join(f"{a}{b}" for a, b in k.items()))
def test_every_ablation_knob_exports_in_both_formats_or_is_refused_up_front(knobs, tmp_path, capsys):
    """Seam bug 2: a checkpoint of each ablation knob exports as jit and loads back to the same
    outputs with its knobs; as diffusers the same, except --bottleneck_dim 0 (no plain patch
    embedding in diffusers' class): one line in the user's terms, nothing written."""
    arch = {k: v for k, v in knobs.items() if k not in ("pred", "loss")}
    torch.manual_seed(0)
    net = JiT_models["JiT-XS/4"](input_size=16, num_classes=3, **arch)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p), alpha=0.05)
    model = Denoiser(net, 3, pred=knobs.get("pred", "x"), loss=knobs.get("loss", "v")).eval()
    sd = model.state_dict()
    args = {"model": "JiT-XS/4", "img_size": 16, "class_num": 3, **knobs}
    state = ckpt_util.TrainState(
        model=sd, emas=[sd, sd], optimizer=None, epoch=0, args=args, start={"epoch": 1, "step": 0}
    )
    ckpt = str(tmp_path / "checkpoint-last.pth")
    ckpt_util.save(state, ckpt)
    for fmt in weights.FORMATS:
        out = tmp_path / fmt
        code = export.cli([ckpt, str(out), "--format", fmt])
        if fmt == "diffusers" and knobs.get("bottleneck_dim") == 0:
            err = one_line_error(capsys, code)
            assert "--bottleneck_dim 0" in err and "--format jit" in err and "x_embedder" not in err
            assert not out.exists()
            continue
        assert code == 0, capsys.readouterr().err
        loaded = weights.load_denoiser(str(out))
        assert (loaded.denoiser.pred, loaded.denoiser.loss) == (model.pred, model.loss)
        assert all(loaded.config["network"][k] == v for k, v in arch.items())
        assert torch.equal(outputs(loaded.denoiser), outputs(model))


def test_sample_without_classes_draws_the_weights_own_classes(exported, tmp_path, capsys):
    """Seam bug 3: sample.py of weights with fewer than 1000 classes and no --classes draws a row of
    each of their classes (the reference's ImageNet rows only where the weights have them)."""
    from PIL import Image

    import sample

    grid = tmp_path / "grid.png"
    argv = [
        "--resume",
        exported,
        "--per_class",
        "2",
        "--num_sampling_steps",
        "1",
        "--device",
        "cpu",
        "--output",
        str(grid),
    ]
    assert sample.main(sample.parse_args(argv)) == 0
    assert "wrote 3×2 grid" in capsys.readouterr().out
    assert Image.open(grid).size[1] > Image.open(grid).size[0]  # 3 rows of 2 images
    assert figure_classes(3) == [0, 1, 2] and figure_classes(1000) == [207, 360, 387, 974, 88, 979, 417, 279]
    assert figure_classes(100) == list(range(8))


@pytest.mark.slow
def test_init_from_an_export_with_power_emas_evaluates_alike_on_one_and_two_processes(
    exported, data, tmp_path, inception_weights, fid_ref_stats
):
    """The combination: --init_from an exported folder for another class count, with --phema_stds;
    then --evaluate_gen --phema of that run, no model flags, on 1 and on 2 processes: the same FID.
    The snapshots' args record where the weights came from (the config is final before any write)."""
    from helpers import TINY, read_metrics, run_script

    import main_jit

    two = str(tmp_path / "two")
    for c in ("c0", "c1"):
        os.makedirs(os.path.join(two, "train", c))
        for name in os.listdir(os.path.join(data, "train", c)):
            os.symlink(os.path.join(data, "train", c, name), os.path.join(two, "train", c, name))
    out = tmp_path / "run"
    flags = [
        *TINY[: TINY.index("--class_num")],
        *TINY[TINY.index("--class_num") + 2 :],
        "--class_num",
        "2",
        "--data_path",
        two,
        "--init_from",
        exported,
        "--epochs",
        "2",
        "--output_dir",
        str(out),
        "--phema_stds",
        "0.05",
        "0.1",
        "--phema_every",
        "2",
        "--phema_from",
        "1",
    ]
    assert main_jit.main(main_jit.parse_args(flags)) == 0
    snaps = phema_files.list_snapshots(str(out / "phema"))
    assert len(snaps) == 8 and len({s.run for s in snaps}) == 1
    assert phema_files.read_snapshot(snaps[0].path)[1]["args"]["init_origin"]["path"] == os.path.abspath(exported)

    evaluate = [
        "--evaluate_gen",
        "--phema",
        out / "phema",
        "--ema_std",
        0.07,
        "--num_images",
        6,
        "--gen_bsz",
        3,
        "--num_sampling_steps",
        2,
        "--device",
        "cpu",
        "--fid_stats",
        fid_ref_stats,
        "--inception_weights",
        inception_weights,
    ]
    assert main_jit.main(main_jit.parse_args([str(a) for a in (*evaluate, "--output_dir", tmp_path / "one")])) == 0
    run_script("main_jit.py", *evaluate, "--output_dir", tmp_path / "two_procs", nproc=2)
    (one,), (both,) = read_metrics(tmp_path / "one", "eval"), read_metrics(tmp_path / "two_procs", "eval")
    assert one["class_num"] == both["class_num"] == 2 and one["ema_std"] == both["ema_std"] == 0.07
    assert one["fid"] == pytest.approx(both["fid"], rel=1e-5)
