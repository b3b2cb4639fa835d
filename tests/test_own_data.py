"""The public commands on data of one's own (docs/own_data.md): an ImageFolder tree through
prepare_data.py, prepare_ref.py, training with --online_eval and --evaluate_gen with precision /
recall, FD-DINOv2 and three noise seeds; and one-class runs (--class_num 1: training, grids, CFG,
evaluation, sample.py), the cases that make the reference crash (#7) or draw noise (#31)."""

import hashlib
import importlib.util
import math
import os
import re
import shlex

import numpy as np
import pytest
import scipy.linalg
import torch
import torch_fidelity
from helpers import make_image_folder, make_standin_dinov2_weights, read_metrics, run_script
from PIL import Image

from util.dinov2 import DINOv2

TINY_RUN = [
    "--model",
    "JiT-XS/4",
    "--img_size",
    16,
    "--batch_size",
    4,
    "--num_workers",
    0,
    "--device",
    "cpu",
    "--warmup_epochs",
    1,
    "--lr",
    1e-3,
    "--num_sampling_steps",
    2,
    "--gen_bsz",
    6,
]


def sha256(path) -> str:
    return hashlib.sha256(open(path, "rb").read()).hexdigest()


def pngs(folder) -> torch.Tensor:
    """The PNGs of a folder, in name order, as uint8 (N, 3, H, W)."""
    names = sorted(n for n in os.listdir(folder) if n.endswith(".png"))
    return torch.stack(
        [torch.from_numpy(np.array(Image.open(os.path.join(folder, n)))).permute(2, 0, 1) for n in names]
    )


def numpy_frechet(a: np.ndarray, b: np.ndarray) -> float:
    """The Fréchet distance of two feature sets' Gaussians in float64 numpy / scipy."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2).real
    return float(((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1 + s2) - 2 * np.trace(covmean))


@pytest.fixture(scope="module")
def dino_weights(tmp_path_factory) -> str:
    return make_standin_dinov2_weights(str(tmp_path_factory.mktemp("dino") / "dinov2_standin.pth"))


@pytest.mark.slow
def test_own_dataset_end_to_end_with_precision_recall_fd_dinov2_and_three_seeds(
    tmp_path, inception_weights, dino_weights
):
    """The sequence of docs/own_data.md, command by command. The training run's evaluation and the
    three seeds of --evaluate_gen hold precision, recall and FD-DINOv2 and the protocol (files and
    sha256); the seeds' summary is their mean and sample std; seed 0's precision / recall equal
    torch-fidelity's calculate_metrics on the saved PNGs against prepare_ref.py's PNGs, its FD-DINOv2 a
    float64 numpy Fréchet distance of those PNGs' DINOv2 features."""
    make_image_folder(tmp_path / "mydata", classes=2, per_class=8)
    store, ref, out = tmp_path / "store", tmp_path / "ref", tmp_path / "run"
    run_script("prepare_data.py", "--data_path", tmp_path / "mydata", "--img_size", 16, "--store", store,
               "--num_workers", 0)  # fmt: skip
    files = dict(stats=ref / "stats.npz", ref_features=ref / "features.npz", dinov2_stats=ref / "dinov2.npz")
    run_script(
        "prepare_ref.py", "--data_path", store, "--img_size", 16, "--png_dir", ref / "pngs",
        *[a for k, v in files.items() for a in (f"--{k}", v)], "--dinov2_weights", dino_weights,
        "--inception_weights", inception_weights, "--device", "cpu", "--batch_size", 8, "--num_workers", 0,
    )  # fmt: skip
    scoring = [
        "--fid_stats", files["stats"], "--inception_weights", inception_weights, "--ref_features",
        files["ref_features"], "--dinov2_weights", dino_weights, "--dinov2_stats", files["dinov2_stats"],
    ]  # fmt: skip
    common = [*TINY_RUN, "--class_num", 2, "--num_images", 12, "--output_dir", out, *scoring]
    p = run_script("main_jit.py", *common, "--data_path", store, "--epochs", 1, "--online_eval", "--ema_decay1", 0.5)
    assert "data: 16 images in 2 classes" in p.stdout and "note: EMA 1" not in p.stdout
    (trained,) = read_metrics(out, "eval")
    p = run_script("main_jit.py", *common, "--evaluate_gen", "--resume", out, "--eval_seeds", 3, "--save_images")
    per_seed, summary = read_metrics(out, "eval_seed"), read_metrics(out, "eval")[-1]
    assert [r["seed"] for r in per_seed] == [0, 1, 2] and summary["seeds"] == [0, 1, 2] and summary["seed"] == 0
    protocol = summary["protocol"]
    for key, path in [("fid_stats", files["stats"]), *((k, v) for k, v in files.items() if k != "stats")]:
        assert protocol[key] == str(path) and protocol[f"{key}_sha256"] == sha256(path)
    assert protocol["inception_weights_sha256"] == sha256(inception_weights) and trained["protocol"] == protocol
    for key in ("fid", "inception_score", "precision", "recall", "fd_dinov2"):
        values = [r[key] for r in per_seed]
        assert all(math.isfinite(v) for v in values) and math.isfinite(trained[key]), key
        assert summary[f"{key}_seeds"] == values and summary[key] == pytest.approx(np.mean(values), rel=1e-12)
        assert summary[f"{key}_seed_std"] == pytest.approx(np.std(values, ddof=1), rel=1e-9)
    assert len({r["fid"] for r in per_seed}) == 3  # the seeds' images differ
    assert f"3 seeds): FID {summary['fid']:.4f} ± {summary['fid_seed_std']:.4f}" in p.stdout

    seed0 = out / "heun-steps2-cfg1.0-interval0.0-1.0-image12-res16-seed0"
    tf = torch_fidelity.calculate_metrics(
        input1=str(seed0), input2=str(ref / "pngs"), prc=True, cuda=False, cache=False, verbose=False,
        save_cpu_ram=True, feature_extractor="inception-v3-compat", feature_layer_prc="2048",
        feature_extractor_weights_path=inception_weights,
    )  # fmt: skip
    assert per_seed[0]["precision"] == pytest.approx(tf[torch_fidelity.KEY_METRIC_PRECISION], rel=1e-6)
    assert per_seed[0]["recall"] == pytest.approx(tf[torch_fidelity.KEY_METRIC_RECALL], rel=1e-6)
    dino = DINOv2(dino_weights, torch.device("cpu"))
    fd = numpy_frechet(dino.features(pngs(seed0)).numpy(), dino.features(pngs(ref / "pngs")).numpy())
    assert per_seed[0]["fd_dinov2"] == pytest.approx(fd, rel=1e-6)


@pytest.mark.slow
def test_one_class_runs_train_draw_grids_guide_and_evaluate(tmp_path, inception_weights, fid_ref_stats):
    """--class_num 1: training with guidance, a grid (4 rows of 8, not a 1 × 32 strip) and an online
    evaluation; an --evaluate_gen sweep over the CFG scale (guided: the 'no class' pass runs); sample.py.
    The causes found for the reference's crash and noise get one-line answers: a tree of several class
    folders is refused before any work (exit 2, what to do); guidance without a trained 'no class'
    label and an EMA that is still mostly its initialisation are named in notes, which the
    unconditional recipe (#7: --label_drop_prob 0 --cfg 1.0) and a short EMA do not get."""
    one, three, out = tmp_path / "one", tmp_path / "three", tmp_path / "run"
    make_image_folder(one, classes=1, per_class=8)
    make_image_folder(three, classes=3, per_class=2)
    scoring = ["--fid_stats", fid_ref_stats, "--inception_weights", inception_weights, "--num_images", 10]
    common = [*TINY_RUN, "--class_num", 1, "--data_path", one, "--label_drop_prob", 0, *scoring]
    p = run_script("main_jit.py", *common, "--output_dir", out, "--epochs", 1, "--online_eval", "--cfg", 2.0,
                   "--sample_every", 1)  # fmt: skip
    assert "data: 8 images in 1 classes" in p.stdout and "sample grids: 1 classes × 32" in p.stdout
    assert "note: --cfg 2.0 guides away from the 'no class' label, which --label_drop_prob 0 never trains" in p.stdout
    assert "note: EMA 1 (--ema_decay1 0.9999), EMA 2 (--ema_decay2 0.9996) still hold 100%, 100% of the" in p.stdout
    assert Image.open(out / "samples" / "epoch-0000.png").size == (8 * 18 + 2, 4 * 18 + 2)
    (record,) = read_metrics(out, "eval")
    assert record["class_num"] == 1 and record["cfg"] == 2.0 and math.isfinite(record["fid"])

    run_script("main_jit.py", *common, "--output_dir", out, "--evaluate_gen", "--resume", out, "--cfg", 1.0, 3.0)
    sweep = read_metrics(out, "eval")[1:]
    assert [r["cfg"] for r in sweep] == [1.0, 3.0] and all(math.isfinite(r["fid"]) for r in sweep)
    assert [r["net_passes"] for r in sweep] == [3, 6]  # guided: the 'no class' pass too, on every Heun evaluation
    assert (out / "sweep.csv").is_file()
    run_script("sample.py", "--resume", out, "--classes", 0, "--per_class", 3, "--num_sampling_steps", 2,
               "--device", "cpu", "--output", tmp_path / "grid.png")  # fmt: skip
    assert Image.open(tmp_path / "grid.png").size == (3 * 18 + 2, 18 + 2)

    p = run_script("main_jit.py", *common, "--data_path", three, "--output_dir", tmp_path / "r3", check=False)
    assert p.returncode == 2 and p.stdout.count("\n") == 1 and "has 3 classes but --class_num is 1" in p.stdout
    assert "for one class put all images in one sub-folder" in p.stdout and not (tmp_path / "r3").exists()
    p = run_script("main_jit.py", *common, "--output_dir", tmp_path / "dry", "--dry_run", "--ema_decay1", 0.3,
                   "--ema_decay2", 0.3)  # fmt: skip
    assert "dry run" in p.stdout and "note:" not in p.stdout


def doc_commands(path: str) -> list[list[str]]:
    """The `python X.py ...` / `torchrun ... X.py ...` commands of a Markdown file's code blocks, with
    backslash continuations joined and each ${VAR} replaced by 1: [script, args...] each."""
    commands, block, text = [], False, open(path).read().replace("\\\n", " ")
    for line in text.splitlines():
        if line.startswith("```"):
            block = not block
            continue
        if not (block and line.startswith(("python ", "torchrun "))):
            continue
        words = shlex.split(re.sub(r"\$\{\w+\}", "1", line.split(" # ")[0]))
        if words:
            at = next(i for i, w in enumerate(words) if w.endswith(".py"))
            commands.append(words[at:])
    return commands


@pytest.mark.parametrize("doc", ["docs/evaluation.md", "docs/own_data.md"])
def test_the_commands_of_the_docs_parse_with_each_scripts_flags(doc):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    commands = doc_commands(os.path.join(root, doc))
    assert len(commands) >= 4
    for script, *args in commands:
        spec = importlib.util.spec_from_file_location(script.replace("/", "_")[:-3], os.path.join(root, script))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.get_args_parser().parse_args(args)  # SystemExit (exit status 2) for a flag it does not know
