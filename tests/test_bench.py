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
