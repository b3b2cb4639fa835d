"""The training entry point: checkpoints, resume, DDP, LR schedule, fail-fast input checks."""

import os

import pytest
import torch
from helpers import REF_KEYS, TINY, load_last, read_metrics, run_script, save_reference_checkpoint, tiny_denoiser

import main_jit
from denoiser import Denoiser
from engine_jit import StepParts, build_optimizer, param_groups, train_step
from model_jit import JiT_models
from util import checkpoint as ckpt_util
from util.data import ResumableSampler
from util.lr_sched import lr_at


@pytest.mark.slow
def test_one_epoch_writes_a_reference_format_checkpoint(data, tmp_path):
    out = tmp_path / "out"
    p = run_script("main_jit.py", *TINY, "--epochs", "1", "--log_freq", "4", "--data_path", data, "--output_dir", out)
    assert all(f"Epoch [0] [{i}/6]" in p.stdout for i in range(1, 7))  # --print_freq 1
    assert "eta 0:00:" in p.stdout and "(run 0:00:" in p.stdout  # ETA of the epoch and of the whole run
    log_txt = (out / "log.txt").read_text()  # the console, also in the output folder
    assert "Epoch [0] [6/6]" in log_txt and "saved" in log_txt and "training done" in log_txt
    ckpt = load_last(out)  # plain data only
    assert REF_KEYS <= set(ckpt)
    assert ckpt["epoch"] == 0 and isinstance(ckpt["args"], dict) and ckpt["args"]["model"] == "JiT-XS/4"
    fresh = tiny_denoiser()
    fresh.load_state_dict(ckpt["model"], strict=True)
    fresh.load_state_dict(ckpt["model_ema1"], strict=True)
    assert not torch.equal(
        ckpt["model"]["net.final_layer.linear.weight"], ckpt["model_ema1"]["net.final_layer.linear.weight"]
    )
    assert [r["step"] for r in read_metrics(out, "train")] == [4, 6]  # every --log_freq steps and the last
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(out))


@pytest.mark.slow
def test_lr_is_set_every_iteration_with_warmup(data, tmp_path):
    out = tmp_path / "out"
    run_script(
        "main_jit.py",
        *TINY,
        "--epochs",
        "2",
        "--warmup_epochs",
        "1",
        "--lr",
        "0.002",
        "--data_path",
        data,
        "--output_dir",
        out,
    )
    lrs = [r["lr"] for r in read_metrics(out)]
    expected = [lr_at(e + s / 6, lr=0.002, warmup_epochs=1) for e in range(2) for s in range(6)]
    assert lrs == pytest.approx(expected)


def test_sampler_splits_ranks_and_resumes_mid_epoch():
    full = list(ResumableSampler(10, seed=3))
    assert sorted(i for i, _ in full) == list(range(10))
    assert 0 < sum(f for _, f in full) < 10  # flips are drawn too
    ranks = [ResumableSampler(10, rank=r, world_size=3, seed=3) for r in range(3)]
    shares = [list(s) for s in ranks]
    assert all(len(s) == 4 for s in shares)  # padded to 12 like DistributedSampler
    assert {i for s in shares for i, _ in s} == set(range(10))
    ranks[1].set_position(epoch=0, start=2)
    assert list(ranks[1]) == shares[1][2:] and len(ranks[1]) == 2
    s = ResumableSampler(10, seed=3)
    s.set_epoch(1)
    assert list(s) != full  # a new order each epoch


def test_lr_schedule_values():
    kw = dict(lr=1e-3, warmup_epochs=5, epochs=100, min_lr=1e-5)
    assert lr_at(0, **kw) == 0.0
    assert lr_at(2.5, **kw) == pytest.approx(5e-4)
    assert lr_at(5, **kw) == pytest.approx(1e-3)  # warmup end
    assert lr_at(60, **kw) == pytest.approx(1e-3)  # constant after
    assert lr_at(5, schedule="cosine", **kw) == pytest.approx(1e-3)
    assert lr_at(52.5, schedule="cosine", **kw) == pytest.approx((1e-3 + 1e-5) / 2)
    assert lr_at(100, schedule="cosine", **kw) == pytest.approx(1e-5)


def test_default_lr_is_blr_times_global_batch_over_256(data, tmp_path):
    args = main_jit.parse_args(
        [
            *TINY[:-2],
            "--blr",
            "1e-4",
            "--accum_iter",
            "2",
            "--data_path",
            data,
            "--output_dir",
            str(tmp_path),
            "--dry_run",
        ]
    )
    run = main_jit.setup(args)
    run.close()
    assert args.lr is None  # the flags stay as given; the derived value lives in the run's config
    assert run.config.lr == pytest.approx(1e-4 * 4 * 2 / 256)
    assert run.parts.optimizer.param_groups[0]["lr"] == pytest.approx(run.config.lr)


@pytest.mark.slow
def test_reference_format_checkpoint_loads_and_resumes(data, tmp_path):
    path = tmp_path / "ref.pth"
    save_reference_checkpoint(path, tiny_denoiser().train(), epoch=0, steps=1)
    state = ckpt_util.load_checkpoint(str(path))[0]  # weights_only loading of an argparse.Namespace
    assert state.args["model"] == "JiT-XS/4" and state.start == {"epoch": 1, "step": 0}
    out = tmp_path / "out"
    p = run_script("main_jit.py", *TINY, "--epochs", "2", "--resume", path, "--data_path", data, "--output_dir", out)
    assert "resumed from" in p.stdout and "epoch 1, step 0" in p.stdout
    assert "Epoch [0]" not in p.stdout and "Epoch [1] [6/6]" in p.stdout
    new = load_last(out)
    assert new["epoch"] == 1
    steps = {float(s["step"]) for s in new["optimizer"]["state"].values()}
    assert steps == {7.0}  # 1 step in the reference checkpoint + 6 here: the optimizer state was loaded


def test_loaded_adamw_steps_are_float32_on_the_parameters_device(tmp_path):
    """The reference saves AdamW's `step` counters as CPU tensors (fused=None); fused AdamW on CUDA
    refuses them, so loading puts each one on its parameter's device as float32. The parameters
    are on the meta device here, so that a step left on the CPU would show."""
    path = tmp_path / "ref.pth"
    save_reference_checkpoint(path, tiny_denoiser().train(), steps=2)
    state = ckpt_util.load_checkpoint(str(path))[0]
    first = next(iter(state.optimizer["state"].values()))
    assert first["step"].device.type == "cpu" and float(first["step"]) == 2.0
    first["step"] = first["step"].double()  # any dtype is made float32
    with torch.device("meta"):
        d = Denoiser(JiT_models["JiT-XS/4"](input_size=16, num_classes=3), num_classes=3)
    opt = torch.optim.AdamW(param_groups(d, weight_decay=0.0), lr=1e-3)  # fused AdamW has no meta kernels
    ckpt_util.load_optimizer(opt, state.optimizer)
    assert all(g["fused"] for g in opt.param_groups)
    steps = [opt.state[p]["step"] for g in opt.param_groups for p in g["params"]]
    assert len(steps) == sum(1 for p in d.parameters() if p.requires_grad)
    assert all(s.device.type == "meta" and s.dtype == torch.float32 for s in steps)


def test_help_groups_every_flag_with_a_help_line():
    parser = main_jit.get_args_parser()
    titles = [g.title for g in parser._action_groups]
    assert titles[2:] == ["model", "training", "sampling and evaluation", "data and output", "distributed"]
    assert all(a.help for a in parser._actions), [a.dest for a in parser._actions if not a.help]
    text = " ".join(parser.format_help().split())  # unwrapped
    assert "(default: JiT-B/16)" in text and "(default: 0.9999)" in text and "set by the launcher" in text
    for action in parser._actions:  # each flag names its default at most once, and never as None / a switch's
        line = " ".join(parser._get_formatter()._format_action(action).split())
        assert line.count("default") <= 1 and "(default: None)" not in line, line
        if action.nargs == 0:
            assert "(default: True)" not in line and "(default: False)" not in line, line


@pytest.mark.slow
def test_checkpoint_of_another_model_is_a_clear_error(data, tmp_path):
    path = tmp_path / "ref.pth"
    save_reference_checkpoint(path, tiny_denoiser())
    p = run_script(
        "main_jit.py",
        *TINY,
        "--model",
        "JiT-T/4",
        "--epochs",
        "1",
        "--resume",
        path,
        "--data_path",
        data,
        "--output_dir",
        tmp_path / "out",
        "--dry_run",
        check=False,
    )
    assert p.returncode == 2 and "does not fit this model" in p.stdout and "--model JiT-XS/4" in p.stdout
    assert "Traceback" not in p.stdout


@pytest.mark.slow
def test_resume_from_an_empty_folder_trains_from_scratch(data, tmp_path):
    out = tmp_path / "out"
    p = run_script("main_jit.py", *TINY, "--epochs", "1", "--resume", out, "--output_dir", out, "--data_path", data)
    assert "training from scratch" in p.stdout and (out / "checkpoint-last.pth").exists()
    p = run_script("main_jit.py", *TINY, "--epochs", "2", "--resume", out, "--output_dir", out, "--data_path", data)
    assert "epoch 1, step 0" in p.stdout and "Epoch [0]" not in p.stdout


def test_the_only_buffers_are_constants():
    """DDP runs with broadcast_buffers=False: every buffer must be a constant that each rank builds
    alike, outside the state dict (the RoPE tables)."""
    d = tiny_denoiser()
    assert [n for n, _ in d.named_buffers()] == ["net.rope_cos", "net.rope_sin"]
    assert not any(k.endswith(("rope_cos", "rope_sin")) for k in d.state_dict())
    assert torch.equal(d.net.rope_cos, tiny_denoiser(seed=5).net.rope_cos)  # not initialised from the RNG


def test_gradient_accumulation_matches_one_big_batch():
    """Two micro-batches of 4 with accum_iter 2 take the same step as one batch of 8 (the loss has
    no randomness here: fixed t with P_std 0, noise_scale 0, no label dropout)."""

    def make():
        torch.manual_seed(0)
        d = Denoiser(
            JiT_models["JiT-XS/4"](input_size=16, num_classes=3),
            num_classes=3,
            P_std=0.0,
            noise_scale=0.0,
            label_drop_prob=0.0,
        )
        with torch.no_grad():
            for p in d.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        return d, build_optimizer(d, 1e-3, 0.0)

    (d1, o1), (d2, o2) = make(), make()
    x = torch.randint(0, 256, (8, 3, 16, 16), dtype=torch.uint8)
    y = torch.randint(0, 3, (8,))
    cpu = torch.device("cpu")
    train_step(StepParts(d1, d1, o1, [], cpu), [(x, y)])
    train_step(StepParts(d2, d2, o2, [], cpu), [(x[:4], y[:4]), (x[4:], y[4:])])
    moved = False
    for (n, a), b, c in zip(d1.named_parameters(), d2.parameters(), make()[0].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=n)
        moved |= not torch.equal(a, c)
    assert moved


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra,message",
    [
        (["--model", "JiT-Q/16"], "invalid choice"),
        (["--img_size", "18"], "not divisible by the patch size"),
        (["--data_path", "/nonexistent/imagenet"], "/nonexistent/imagenet"),
        (["--resume", "/nonexistent/ckpt.pth"], "no such file or folder"),
        (["--evaluate_gen"], "--evaluate_gen needs trained weights"),
        (["--class_num", "2"], "has 3 classes but --class_num is 2"),
    ],
)
def test_bad_input_fails_fast_with_a_clear_message(data, tmp_path, extra, message):
    out = tmp_path / "out"
    args = [*TINY, "--epochs", "1", "--data_path", data, "--output_dir", out]
    p = run_script("main_jit.py", *args, *extra, check=False, timeout=60)
    assert p.returncode == 2 and message in p.stdout, p.stdout
    assert "Traceback" not in p.stdout
    assert not (out / "checkpoint-last.pth").exists()


@pytest.mark.slow
def test_two_process_ddp_keeps_ranks_identical(data, tmp_path):
    out, dump = tmp_path / "out", tmp_path / "dump"
    dump.mkdir()
    run_script(
        "tests/ddp_script.py", "train", dump, *TINY, "--epochs", "1", "--data_path", data, "--output_dir", out, nproc=2
    )
    r0, r1 = torch.load(dump / "rank0.pt"), torch.load(dump / "rank1.pt")
    assert r0["code"] == 0 and r1["code"] == 0
    assert r0["sync_buffers"] is False  # the RoPE tables are constants (test_the_only_buffers_are_constants)
    for key in ("model", "ema1", "ema2"):
        for name in r0[key]:
            assert torch.equal(r0[key][name], r1[key][name]), (key, name)
    for i in r0["optimizer"]:
        assert torch.equal(r0["optimizer"][i]["exp_avg"], r1["optimizer"][i]["exp_avg"])
    ckpt = load_last(out)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"])  # seed + rank per process


@pytest.mark.slow
def test_ddp_gradient_equals_single_process_gradient_of_the_union(tmp_path):
    run_script("tests/ddp_script.py", "grad", tmp_path, nproc=2)
    g0, g1 = torch.load(tmp_path / "grad0.pt"), torch.load(tmp_path / "grad1.pt")
    for name, single in g0["single"].items():
        torch.testing.assert_close(g0["ddp"][name], single, rtol=1e-4, atol=1e-6, msg=name)
        assert torch.equal(g0["ddp"][name], g1["ddp"][name])
    assert any(g.abs().sum() > 0 for g in g0["single"].values())
