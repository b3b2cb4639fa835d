"""FSDP2 (util/sharding.py) on 2 CPU processes (gloo) against DDP: training, grad checkpointing,
accumulation, the non-finite skip, and checkpoints that move between FSDP and plain runs.

One torchrun per mode (tests/sharding_worker.py); the tests read what rank 0 wrote.
"""

import pytest
import torch
from helpers import run_script

SCRIPT = "tests/sharding_worker.py"
ROUNDING = 1e-6  # float32 rounding of values of order 1 (weights, EMAs); moments are far smaller


@pytest.fixture(scope="module")
def train_results(tmp_path_factory):
    dump = tmp_path_factory.mktemp("fsdp")
    run_script(SCRIPT, "train", dump, nproc=2, timeout=600)
    return torch.load(dump / "results.pt", weights_only=True)


@pytest.fixture(scope="module")
def precision_results(tmp_path_factory):
    dump = tmp_path_factory.mktemp("precision")
    run_script(SCRIPT, "precision", dump, nproc=2, timeout=600)
    return torch.load(dump / "precision.pt", weights_only=True)


def within(diffs, tol=ROUNDING):
    return all(v <= tol for v in diffs.values())


@pytest.mark.slow
def test_fsdp_training_equals_ddp(train_results):
    """engine_jit.train_step, 3 steps of 2 micro-batches, two EMAs, dropout: weights, EMAs and AdamW
    moments gathered from FSDP (sync on the last micro-batch, the non-finite flag reduced over ranks)
    equal DDP's (on CPU bit-identical weights and EMAs; moments to an ulp)."""
    r = train_results
    assert within(r["fsdp_vs_ddp"]), r["fsdp_vs_ddp"]
    assert r["same_model_keys"] and r["same_param_groups"]
    got, ref = r["optim_state_keys"]
    assert got == ref == list(range(len(ref)))  # indexed like torch.optim's own state_dict


@pytest.mark.slow
def test_grad_checkpointing_changes_nothing_under_fsdp_and_ddp(train_results):
    assert max(train_results["ckpt_vs_fsdp"].values()) == 0.0
    assert max(train_results["ddp_ckpt_vs_ddp"].values()) == 0.0


@pytest.mark.slow
def test_accumulation_without_sync_equals_one_batch(train_results):
    assert train_results["accum_vs_one_batch"] < ROUNDING


@pytest.mark.slow
def test_nonfinite_gradient_on_one_rank_skips_the_step_on_all(train_results):
    """train_step with an inf put into one element of rank 1's local gradient shard: both ranks skip."""
    assert train_results["skip"] == [(1.0, True), (1.0, True)]


@pytest.mark.slow
def test_checkpoints_move_between_fsdp_and_plain_runs(train_results):
    r = train_results
    assert within(r["fsdp_ckpt_to_plain"]), r[
        "fsdp_ckpt_to_plain"
    ]  # FSDP file -> plain Denoiser + AdamW, one more step
    assert max(r["ddp_ckpt_to_fsdp_loaded"].values()) == 0.0  # plain file -> FSDP: loaded exactly
    assert within(r["ddp_ckpt_to_fsdp"]), r["ddp_ckpt_to_fsdp"]  # ... and one more step
    assert [g["fused"] for g in r["optim_groups_after_load"]] == [True, True]
    assert [g["weight_decay"] for g in r["optim_groups_after_load"]] == [0.0, 0.01]
    assert r["unshard_into"] == 0.0  # a sharded EMA gathered into a plain module on every rank


@pytest.mark.slow
def test_the_evaluation_copy_of_a_sharded_ema_has_no_cpu_copy_or_random_init(train_results):
    """engine_eval.EMAWeights builds its copy on the meta device, materialises it on the run's device
    uninitialised and fills it (sharding.unshard_into; its weights: `unshard_into` above): no random
    draw, the RNG untouched, the network's buffers (RoPE tables) as built, on every rank."""
    for count, rng_same, buffers_equal, separate, devices in train_results["eval_copy"]:
        assert count == 0 and rng_same and buffers_equal and separate and devices == {"cpu"}


@pytest.mark.slow
def test_a_checkpoint_that_does_not_fit_raises_on_every_rank(train_results):
    for message in train_results["bad_checkpoint"]:
        assert "Missing key(s) in state_dict: net.final_layer.linear.bias." in message
        assert "Unexpected key(s) in state_dict: net.extra." in message


@pytest.mark.slow
def test_fp32_gathers_under_autocast_reproduce_ddp_exactly(precision_results):
    """The recommended plan (mixed_precision=False + autocast) is DDP's math; bf16 gathers
    move the gradients about as far from it as autocast itself is from float32."""
    r = precision_results
    assert r["fsdp_gather_fp32"]["loss_diff"] == 0.0 and r["fsdp_gather_fp32"]["grad_max_abs"] == 0.0
    assert 0 < r["fsdp_gather_bf16"]["grad_max_rel_l2"] < 0.05
    assert r["ddp_fp32"]["grad_max_rel_l2"] > 0  # bf16 autocast did take effect on the CPU
