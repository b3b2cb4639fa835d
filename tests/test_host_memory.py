"""Host memory that loading a checkpoint and evaluating during training leave behind (CPU, one process):
a resumed run holds nothing of the checkpoint file but the AdamW moments it continues with, and an
online evaluation of a sharded (FSDP) run frees the full EMA copies it gathered."""

import ctypes
import gc
import os

import pytest
import torch
from helpers import TINY_MODEL, tiny_denoiser

from denoiser import Denoiser
from engine_jit import build_optimizer
from model_jit import JiT_models
from util import checkpointer
from util.ema import EMA


def rss_anon() -> int:
    """Bytes of this process's anonymous resident memory, after returning freed heap to the system."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("RssAnon:"))


def live_tensor_bytes() -> int:
    """Bytes of the storages of every tensor the Python heap reaches (each storage once)."""
    gc.collect()
    seen = {}
    for obj in gc.get_objects():
        try:
            if issubclass(type(obj), torch.Tensor) and not obj.is_meta:
                storage = obj.untyped_storage()
                seen[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, ReferenceError):
            continue
    return sum(seen.values())


def tiny_network() -> Denoiser:
    """The tiny preset's Denoiser as the run builds it (what evaluation builds on the meta device)."""
    net = JiT_models[TINY_MODEL["model"]](input_size=TINY_MODEL["img_size"], num_classes=TINY_MODEL["class_num"])
    return Denoiser(net, TINY_MODEL["class_num"])


def trained_parts(steps: int):
    denoiser = tiny_denoiser().train()
    emas = [EMA(denoiser, 0.99), EMA(denoiser, 0.9)]
    optimizer = build_optimizer(denoiser, 1e-3, 0.0)
    for _ in range(steps):
        denoiser(torch.rand(2, 3, 16, 16) * 2 - 1, torch.tensor([0, 1])).backward()
        optimizer.step()
        optimizer.zero_grad()
    return denoiser, emas, optimizer


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads /proc (Linux)")
def test_a_resume_holds_only_the_adamw_moments_of_the_checkpoint(tmp_path):
    """bench/resume_memory.py measures this on 2 processes; here one process and the tiny model with a
    wide hidden layer, so that the file (tens of MB) stands out of the allocator's noise."""
    torch.manual_seed(0)
    denoiser, emas, optimizer = trained_parts(steps=1)
    ckpt = checkpointer.Checkpointer(str(tmp_path), torch.device("cpu"), denoiser, emas, optimizer, {"model": "tiny"})
    padding = torch.nn.Parameter(torch.randn(3_000_000))  # 12 MB more per copy: model, EMAs, moments
    denoiser.register_parameter("padding", padding)
    for e in emas:
        e.module.register_parameter("padding", torch.nn.Parameter(padding.detach().clone(), requires_grad=False))
    optimizer.add_param_group({"params": [padding]})
    padding.grad = torch.ones_like(padding)
    optimizer.step()
    ckpt.save(0, 1, 1)
    path = str(tmp_path / "checkpoint-last.pth")
    size = os.path.getsize(path)
    moments = sum(v.numel() * v.element_size() for s in optimizer.state.values() for k, v in s.items() if k != "step")
    del denoiser, emas, optimizer, ckpt, padding

    fresh, fresh_emas, fresh_opt = trained_parts(steps=0)
    fresh.register_parameter("padding", torch.nn.Parameter(torch.zeros(3_000_000)))
    for e in fresh_emas:
        e.module.register_parameter("padding", torch.nn.Parameter(torch.zeros(3_000_000), requires_grad=False))
    fresh_opt.add_param_group({"params": [fresh.padding]})
    loader = checkpointer.Checkpointer(str(tmp_path / "new"), torch.device("cpu"), fresh, fresh_emas, fresh_opt, {})
    before = rss_anon()
    state, found = loader.load(str(tmp_path))  # the folder: its newest checkpoint
    loader.restore(state, found)
    held = rss_anon() - before  # with the state (the whole file's tensors) still referenced
    assert found == path and size > 60e6
    assert held < moments + 0.25 * size, (held / size, moments / size)
    assert torch.equal(fresh.padding.detach(), torch.load(path, weights_only=True)["model"]["padding"])
    assert all(float(s["step"]) == 1.0 for s in fresh_opt.state.values())


class StandinScorer:
    """What score_images asks of a Scorer (util.scorer), without Inception: features are the images' pixel means."""

    fid_stats = "standin"
    protocol = {"fid_stats": "standin"}
    device = torch.device("cpu")
    feature_dim = 2048 + 1008

    @staticmethod
    def features(images):
        return images.float().mean(dim=(1, 2, 3))[:, None].expand(-1, 2048 + 1008).contiguous()

    @staticmethod
    def scores(features):
        return dict(fid=1.0, inception_score=1.0, inception_score_std=0.0)


class NoLog:
    metrics_path = os.devnull

    def scalars(self, *args):
        pass

    def record(self, *args):
        pass

    def flush(self):
        pass


def test_an_evaluation_during_training_frees_the_gathered_copies_of_sharded_emas(tmp_path):
    """--fsdp --online_eval: every rank gathers a full copy of each evaluated EMA (EMAWeights.refresh);
    after the evaluation the live tensors are back to what they were before it (one process group of
    1, gloo). An evaluation outside training (--evaluate_gen) keeps its copy, and shows that the count
    sees it."""
    import torch.distributed as dist

    from engine_eval import EMAWeights, Evaluation, evaluate
    from sampling import SamplerSettings
    from util import sharding
    from util.evaluation import GenerationSpec
    from util.sweep import Point

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        denoiser = tiny_denoiser()
        emas = [EMA(denoiser, 0.99, sharded=True)]
        sharding.shard(denoiser, mixed_precision=False)
        net_bytes = sum(p.numel() * 4 for p in tiny_denoiser().parameters())
        spec = GenerationSpec(
            num_images=3,
            class_num=TINY_MODEL["class_num"],
            img_size=TINY_MODEL["img_size"],
            sampler=SamplerSettings(steps=2, cfg=2.0),
            gen_bsz=3,
        )
        held = {}
        for during_training in (True, False):
            samplers = EMAWeights(emas, torch.device("cpu"), make_denoiser=tiny_network, compile_net=False)
            ev = Evaluation(
                samplers,
                [Point(1, spec.sampler, spec.num_images)],
                spec,
                StandinScorer(),
                NoLog(),
                str(tmp_path),
                during_training=during_training,
            )
            before = live_tensor_bytes()
            record = evaluate(ev, epoch=0, weights_epoch=0)
            held[during_training] = live_tensor_bytes() - before
            assert record["num_images"] == 3
            del samplers, ev
    finally:
        dist.destroy_process_group()
    assert held[False] >= net_bytes  # the copy, kept for --evaluate_gen's next point
    assert abs(held[True]) < 0.05 * net_bytes, (held, net_bytes)
