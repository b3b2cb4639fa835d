"""bench/memory.py: the per-GPU memory estimate (meta device, no GPU)."""

import os
import sys

import pytest
from helpers import ROOT

sys.path.insert(0, os.path.join(ROOT, "bench"))
import memory  # noqa: E402


def test_parameter_state_is_24_bytes_per_parameter_and_sharded_by_fsdp():
    d = memory.build_meta("JiT-B/16", 256)
    counts = memory.param_counts(d)
    n = sum(p.numel() for p in d.parameters())
    frozen = sum(p.numel() for p in d.parameters() if not p.requires_grad)  # pos_embed: no gradient, no moments
    assert counts["total"] == n and counts["trainable"] == n - frozen
    ddp = memory.state_bytes(counts, world_size=8, fsdp=False)
    assert ddp["state"] == 24 * n - 12 * frozen
    assert ddp["state"] == pytest.approx(24 * n, rel=1e-3)
    assert ddp["ddp_buckets"] == 4 * (n - frozen)
    fsdp = memory.state_bytes(counts, world_size=8, fsdp=True)
    assert fsdp["state"] == pytest.approx(ddp["state"] / 8)
    block = sum(p.numel() for p in d.net.blocks[0].parameters())
    assert counts["block"] == block and counts["root"] == n - 12 * block
    assert fsdp["fsdp_gathered"] == 8 * counts["root"] + 12 * block


def test_activation_trace_counts_saved_tensors_in_bf16_and_checkpointing_reduces_them():
    d = memory.build_meta("JiT-XS/4", 16)
    trace = memory.activation_trace(d, 8)
    assert len(trace["blocks"]) == len(trace["block_inputs"]) == 4
    assert all(b > 0 for b in trace["blocks"]) and trace["outside"] > 0
    # blocks before in_context_start carry 16 tokens (bf16 residual), after it 4 + 16 (float32)
    assert trace["block_inputs"] == [8 * 16 * 64 * 2] * 2 + [8 * 20 * 64 * 4] * 2
    assert trace["all_casts"] > 0  # autocast's bf16 weight copies are seen
    full = memory.activation_bytes(trace, grad_checkpoint=False)
    ckpt = memory.activation_bytes(trace, grad_checkpoint=True)
    assert ckpt["saved"] < full["saved"]
    assert ckpt["saved"] == trace["outside"] + sum(trace["block_inputs"]) + max(
        a + c for a, c in zip(trace["blocks"], trace["block_casts"])
    )
    fp32 = memory.activation_trace(d, 8, bf16=False)
    assert fp32["outside"] + sum(fp32["blocks"]) > full["saved"] + full["weight_casts"]


def test_estimate_fsdp_and_checkpointing_lower_the_total():
    trace = memory.activation_trace(memory.build_meta("JiT-XS/4", 16), 8)
    totals = {
        (f, c): memory.estimate("JiT-XS/4", 16, 8, world_size=8, fsdp=f, grad_checkpoint=c, trace=trace)["total"]
        for f in (False, True)
        for c in (False, True)
    }
    assert totals[True, True] < totals[True, False] < totals[False, False]
    assert totals[False, True] < totals[False, False]


def test_cli_prints_a_breakdown(capsys):
    memory.cli(
        [
            "--model",
            "JiT-XS/4",
            "--img_size",
            "16",
            "--batch_size",
            "4",
            "--world_size",
            "2",
            "--fsdp",
            "--grad_checkpoint",
        ]
    )
    out = capsys.readouterr().out
    assert "FSDP gathered units" in out and "total" in out and "fits a 80GB GPU" in out


@pytest.mark.slow
def test_compiled_trace_saves_less_than_eager():
    d = memory.build_meta("JiT-XS/4", 16)
    eager = memory.activation_trace(d, 8)
    compiled = memory.compiled_trace(d, 8)
    assert 0 < compiled["saved_ckpt"] < compiled["saved"] < eager["outside"] + sum(eager["blocks"]) + eager["all_casts"]
