"""The benchmark scripts: a few CPU steps on the tiny preset give sane numbers and complete JSON."""

import json
import os
import sys

import pytest
import torch
from helpers import ROOT, run_script
from torch.utils.flop_counter import FlopCounterMode

from model_jit import JiT_models
from sampling import SamplerSettings, sample

sys.path.insert(0, os.path.join(ROOT, "bench"))
import bench_data  # noqa: E402

import bench  # noqa: E402
from util.data import ResumableSampler  # noqa: E402


@pytest.mark.slow
def test_bench_reports_training_sampling_and_parity(tmp_path):
    path = tmp_path / "out" / "bench.json"
    run_script(
        "bench/bench.py",
        "--model",
        "JiT-XS/4",
        "--img_size",
        16,
        "--batch_size",
        4,
        "--warmup",
        1,
        "--steps",
        2,
        "--sample_batch",
        4,
        "--sample_steps",
        2,
        "--parity",
        "--parity_steps",
        2,
        "--device",
        "cpu",
        "--json",
        path,
    )
    out = json.loads(path.read_text())
    assert out["env"]["torch"] == torch.__version__ and out["env"]["date"]
    assert out["config"]["compile"] is False and out["config"]["peak_tflops"] is None
    train, sample, parity = out["train"], out["sample"], out["parity"]
    assert train["img_per_s"] > 0 and train["step_ms"] > 0 and train["tflops"] > 0 and train["loss"] > 0
    assert train["peak_mem_gb"] is None and train["mfu"] is None  # CPU: no device memory, no known peak
    assert sample["img_per_s"] > 0 and sample["batch_s"] > 0
    assert sample["net_passes_per_image"] == 5  # t = 0 unguided, t = 0.5 guided (twice: Euler and Heun)
    assert out["model"]["train_gflops_per_image"] == pytest.approx(3 * out["model"]["fwd_gflops_per_image"])
    # on the CPU both paths are float32: SDPA and the reference attention agree to rounding
    assert parity["loss_rel_diff"] < 1e-5 and parity["sample_rel_l2"] < 1e-5 and parity["uint8_max_diff"] <= 1


def test_model_size_counts_attention_and_all_parameters():
    args = bench.get_args_parser().parse_args(["--model", "JiT-XS/4", "--img_size", "16"])
    params, flops = bench.model_size(args)
    net = JiT_models["JiT-XS/4"](input_size=16, num_classes=1000, attn_impl="reference")  # plain matmuls
    x, t, y = torch.zeros(1, 3, 16, 16), torch.zeros(1), torch.zeros(1, dtype=torch.long)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        net(x, t, y)
    assert flops == counter.get_total_flops()
    assert params == sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("method", ["heun", "euler"])
@pytest.mark.parametrize("cfg", [2.9, 1.0])
def test_net_passes_match_the_sampler(cfg, method):
    settings = SamplerSettings(method=method, steps=50, cfg=cfg, interval_min=0.1)
    batches = []

    def net(z, t, y):
        batches.append(z.shape[0])
        return torch.zeros_like(z)

    sample(net, torch.zeros(1, 3, 2, 2), torch.zeros(1, dtype=torch.long), settings, null_label=1)
    assert settings.net_passes() == sum(batches)
    assert (
        settings.net_passes()
        == {("heun", 2.9): 187, ("heun", 1.0): 99, ("euler", 2.9): 94, ("euler", 1.0): 50}[method, cfg]
    )


def test_epoch_stream_runs_epochs_back_to_back():
    sampler = ResumableSampler(5, seed=1)
    items = list(bench_data.EpochStream(sampler, 12))
    assert len(items) == 12
    sampler.set_epoch(0)
    first = list(sampler)
    sampler.set_epoch(1)
    assert items[:10] == first + list(sampler)


@pytest.mark.slow
def test_bench_data_reports_jpeg_and_store_throughput(tmp_path):
    path = tmp_path / "data.json"
    run_script(
        "bench/bench_data.py",
        "--num_images",
        16,
        "--img_size",
        32,
        48,
        "--batch_size",
        4,
        "--batches",
        2,
        "--workers",
        0,
        "--store",
        "--device",
        "cpu",
        "--json",
        path,
    )
    out = json.loads(path.read_text())
    assert out["images"] == 16 and out["mean_file_kb"] > 10 and set(out["sizes"]) == {"32", "48"}
    for size in out["sizes"].values():
        (jpeg,), (store,) = size["jpeg"]["results"], size["store"]["results"]
        assert jpeg["workers"] == store["workers"] == 0 and jpeg["img_per_s"] == jpeg["img_per_s_per_process"] > 0
        assert size["jpeg"]["workers_needed"] == jpeg["workers_for_target"] >= 1
        assert size["conversion_img_per_s_per_process"] > 0
        assert size["store_vs_jpeg_per_process"]["0"] == pytest.approx(store["img_per_s"] / jpeg["img_per_s"])


@pytest.mark.slow
def test_fsdp_blocks_compile_without_graph_breaks_or_recompiles():
    """--fsdp --compile compiles block by block (engine_jit.compile_fsdp_blocks): on 2 CPU processes
    dynamo captures 2 graphs (the blocks before and after the in-context tokens), breaks none, and
    captures nothing new after the first two steps (bench/fsdp_compile.py; aot_eager, no codegen)."""
    p = run_script("bench/fsdp_compile.py", "--mode", "blocks", "--steps", 4, nproc=2)
    assert (
        "mode blocks, grad_checkpoint False: 2 graphs (0 with dynamic shapes), 0 graph breaks, 0 graphs after step 2"
        in p.stdout
    ), p.stdout


@pytest.mark.parametrize("smoke", ["0", "1"])
def test_gpu_check_commands_parse_with_each_scripts_flags(smoke):
    """Every command bench/gpu_check.sh runs (PRINT=1 lists them), the GPU ones and SMOKE=1's, is
    accepted by the argument parser of the script it runs, so the check cannot fail on a renamed flag."""
    import shlex
    import subprocess

    import fsdp_compile

    import main_jit

    listed = subprocess.run(
        ["bash", os.path.join(ROOT, "bench", "gpu_check.sh")],
        env={**os.environ, "PRINT": "1", "SMOKE": smoke},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    parsers = {
        "main_jit.py": main_jit.parse_args,
        "bench/bench.py": bench.get_args_parser().parse_args,
        "bench/fsdp_compile.py": fsdp_compile.get_args_parser().parse_args,
        "bench/reference_resume.py": lambda argv: main_jit.parse_args(argv[2:]),
    }  # CHECKPOINT OUT MAIN_JIT_FLAGS
    seen = set()
    for line in listed:
        argv = shlex.split(line)
        if argv[0] != "python":
            continue
        script = next(a for a in argv if a.endswith(".py"))
        args = argv[argv.index(script) + 1 :]
        try:
            parsers[script](args)
        except SystemExit:
            raise AssertionError(f"gpu_check.sh runs {script} with flags it does not take: {line}") from None
        seen.add(script)
    assert seen == set(parsers)


def test_solver_error_tables_on_the_mixture(tmp_path, capsys):
    """bench/solver_error.py --problem mixture (in process): the error of each sampler against the
    converged solution falls with NFE, Heun at 20 NFE is a row, amplification and the inversion's
    round trip are measured, and the JSON holds it all."""
    import solver_error

    torch.set_num_threads(1)  # 2-D points: a second thread only adds synchronisation
    path = tmp_path / "mixture.json"
    argv = ["--problem", "mixture", "--num_images", 100, "--ref_steps", 200, "--methods", "heun", "unipc2", "ab3"]
    argv += ["--schedules", "uniform", "logit:3", "--nfe", 6, 10, 20, "--extra", "heun:uniform:20", "--amplification"]
    argv += ["--inversion", "unipc2:logit:3", "--inversion_steps", 10, 40, "--json", path]
    assert solver_error.cli([str(a) for a in argv]) == 0
    out = json.loads(path.read_text())
    assert out["units"] == "data units" and out["reference"]["nfe"] == 200 and out["reference"]["half_steps"] < 1e-3
    rows = {(r["method"], r["schedule"], r["nfe"]): r for r in out["rows"]}
    assert set(rows) >= {("heun", "uniform", 5), ("heun", "uniform", 19), ("unipc2", "logit:3", 10)}
    for m, s in (("unipc2", "logit:3"), ("ab3", "uniform")):
        errs = [rows[m, s, n]["rmse"] for n in (6, 10, 20)]
        assert errs[0] > errs[1] > errs[2], errs
    assert rows["unipc2", "logit:3", 10]["rmse"] < rows["heun", "uniform", 9]["rmse"]
    assert all(r["amplification"] > 0.5 for r in out["rows"])
    assert [r["steps"] for r in out["extra"]] == [20] and out["extra"][0]["nfe"] == 39
    (a, b) = out["inversion"]
    assert b["noise_rmse"] < a["noise_rmse"] and b["image_rmse"] < a["image_rmse"]
    printed = capsys.readouterr().out
    assert "| `unipc2` | `logit:3` |" in printed and "heun uniform 20 steps (39 NFE)" in printed


@pytest.mark.parametrize(
    "script,argv,message",
    [
        ("solver_error", ["--problem", "model"], "--problem model needs --resume"),
        ("solver_error", ["--problem", "mixture", "--schedules", "edm:2"], "renamed: use power:2"),
        ("solver_error", ["--problem", "mixture", "--extra", "heun:uniform:x"], "want METHOD:SCHEDULE:STEPS"),
        ("solver_error", ["--problem", "mixture", "--fd", "heun:uniform:5"], "--fd needs a model"),
        ("solver_error", ["--problem", "mixture", "--num_images", "0"], "--num_images must be at least 1"),
        ("solver_error", ["--problem", "mixture", "--nfe", "6", "0"], "--nfe must be at least 1, got 6 0"),
        ("solver_error", ["--problem", "mixture", "--ref_steps", "5000"], "the sampler takes 1 to 1000 steps"),
        ("solver_error", ["--problem", "mixture", "--inversion", "heun", "--inversion_steps", "0"], "at least 1"),
        (
            "solver_error",
            ["--problem", "mixture", "--inversion", "unipc2:power:7", "--inversion_steps", "50"],
            "float32",
        ),
        ("digits_data", ["--out", "OUT", "--size", "4"], "--size must be >= 8"),
    ],
)
def test_solver_bench_scripts_exit_2_with_one_line(script, argv, message, tmp_path, capsys):
    module = __import__(script)
    assert module.cli([str(tmp_path / "o") if a == "OUT" else a for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and message in err, err


def test_solver_error_on_a_model_checkpoint(tmp_path):
    """--resume: the same tables on a (tiny) trained model's quantised images, in uint8 levels."""
    import solver_error
    from helpers import save_reference_checkpoint, tiny_denoiser

    torch.set_num_threads(1)
    ckpt = tmp_path / "checkpoint-last.pth"
    save_reference_checkpoint(ckpt, tiny_denoiser(seed=1))
    path = tmp_path / "model.json"
    argv = ["--resume", ckpt, "--num_images", 6, "--batch", 4, "--ref_steps", 12, "--methods", "unipc2", "heun"]
    argv += ["--schedules", "uniform", "--nfe", 3, 6, "--extra", "--inversion", "unipc2", "--inversion_steps", 3, 9]
    assert solver_error.cli([str(a) for a in argv + ["--json", path]]) == 0
    out = json.loads(path.read_text())
    assert out["units"] == "uint8 levels" and [(r["method"], r["nfe"]) for r in out["rows"]] == [
        ("unipc2", 3),
        ("unipc2", 6),
        ("heun", 3),
        ("heun", 5),
    ]
    assert (
        out["rows"][1]["rmse"] <= out["rows"][0]["rmse"]
        and out["inversion"][1]["noise_rmse"] < out["inversion"][0]["noise_rmse"]
    )


def test_the_commands_of_docs_sampling_parse_with_their_scripts_flags():
    """Every `python SCRIPT ...` line (with its continuations) in docs/sampling.md is accepted by the
    argument parser of the script it runs."""
    import shlex

    import digits_data
    import solver_error

    import invert
    import main_jit
    import sample

    parsers = {
        "bench/solver_error.py": solver_error.parse_args,
        "bench/digits_data.py": digits_data.parse_args,
        "invert.py": invert.get_args_parser().parse_args,
        "sample.py": sample.get_args_parser().parse_args,
        "main_jit.py": main_jit.parse_args,
    }
    text = open(os.path.join(ROOT, "docs", "sampling.md")).read().replace("\\\n", " ")
    commands = [line.split("#")[0] for line in text.splitlines() if line.strip().startswith("python ")]
    seen = set()
    for line in commands:
        argv = shlex.split(line)
        script = argv[1]
        try:
            parsers[script](argv[2:])
        except SystemExit:
            raise AssertionError(f"docs/sampling.md runs {script} with flags it does not take: {line}") from None
        seen.add(script)
    assert {"bench/solver_error.py", "bench/digits_data.py", "invert.py", "sample.py", "main_jit.py"} <= seen


def test_solver_error_census_counts_refused_and_non_finite_settings(monkeypatch, tmp_path):
    """--census on a small grid: the old NaN cases (power:7 = the former edm:7 at 30 steps, an interval
    float32 cannot hold) are refused, everything else samples to finite values."""
    import solver_error

    torch.set_num_threads(1)
    small = dict(schedules=["uniform", "power:7"], steps=[2, 30], intervals=[(0.1, 1.0), (0.5, 0.50000001)])
    monkeypatch.setattr(solver_error, "CENSUS", small)
    monkeypatch.setattr(solver_error, "METHODS", ("heun", "dpm++2m"))
    path = tmp_path / "census.json"
    assert solver_error.cli(["--census", "--cfg", "2.0", "--json", str(path)]) == 0
    counts = json.loads(path.read_text())["census"]
    assert counts["settings"] == 2 * 2 * 2 * 2 * 2 and counts["non_finite"] == 0
    # refused: the narrow interval (16), power:7 at 30 steps with the good interval (2 methods × 2 t_eps)
    assert counts["refused: interval"] == 16 and counts["refused: grid"] == 4
    assert counts["sampled"] == counts["settings"] - counts["refused"] == 12
