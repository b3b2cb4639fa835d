"""Watching a run: sample grids (util.grid; the same after SIGTERM + rerun, the same as sample.py's), the
loss by noise level, gradient norm and update size (engine_jit.StepMonitor, no change to the training
math), and the report page (util.report, report.py), opened in headless Chromium. The training runs
are in this process (tiny JiT, 2 epochs of 6 steps, 2-step sampler)."""

import copy
import json
import os
import re
import shutil
import signal
import subprocess
import time

import numpy as np
import pytest
import torch
from helpers import TINY, assert_same_state, load_last, read_metrics, tiny_denoiser
from PIL import Image

import engine_jit
import main_jit
import report
import sample
from engine_jit import StepMonitor, StepParts, build_optimizer, t_bin_edges, train_step
from sampling import SamplerSettings
from util import checkpoint as ckpt_util
from util import grid
from util import report as R
from util.errors import BadValue, exit_code
from util.svg_plot import smooth

SAMPLER = ["--num_sampling_steps", "2", "--cfg", "2.0", "--interval_min", "0.1"]
GRIDS = ["--sample_every", "1", *SAMPLER]


def train_args(data, out, *extra) -> list[str]:
    return [*TINY, "--epochs", "2", "--data_path", data, "--output_dir", str(out), "--resume", str(out), *GRIDS, *extra]


def grid_files(out) -> dict:
    folder = os.path.join(out, "samples")
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))}


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory):
    """An uninterrupted run with a grid after each epoch, moved aside so that a run of the same command
    (the same output_dir) can be compared with it file for file."""
    base = tmp_path_factory.mktemp("monitor_runs")
    assert main_jit.main(main_jit.parse_args(train_args(data, base / "run"))) == 0
    os.rename(base / "run", base / "straight")
    return base


@pytest.mark.slow
def test_a_run_records_noise_levels_norms_grids_and_its_report(straight, capsys):
    out = straight / "straight"
    records = read_metrics(out, "train")
    assert [r["global_step"] for r in records] == list(range(1, 13))
    edges = t_bin_edges(-0.8, 0.8)
    for r in records:  # one record per step (--log_freq 1): 4 samples in 8 bins
        assert r["t_edges"] == edges and len(r["loss_by_t"]) == 8
        filled = [v for v in r["loss_by_t"] if v is not None]
        assert 1 <= len(filled) <= 4 and all(v > 0 for v in filled)
        assert 0 < r["grad_norm"] < 100 and 0 <= r["update_ratio"] < 0.1, r
        assert (r["update_ratio"] > 0) == (r["lr"] > 0), r  # the warmup's first step has lr 0: no update
    assert sorted(grid_files(out)) == ["epoch-0000.png", "epoch-0001.png"]  # no temporary file left
    picture = np.asarray(Image.open(out / "samples" / "epoch-0001.png"))
    assert picture.shape == (3 * 18 + 2, 10 * 18 + 2, 3)  # 3 classes × 10 (32 // 3) of 16 px, 2 px apart
    assert grid_files(out)["epoch-0000.png"] != grid_files(out)["epoch-0001.png"]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out), size_guidance={"images": 0}).Reload()
    assert [e.step for e in events.Images("samples")] == [1000, 2000]
    assert {"grad_norm", "update_ratio", f"loss_t/{edges[3]:.3f}-{edges[4]:.3f}"} <= set(events.Tags()["scalars"])

    page = (out / "report.html").read_text()
    assert "samples/epoch-0001.png" in page and "Loss by noise level" in page and "finished" in page

    # sample.py from the run's checkpoint, with the grid's classes, sampler and seed: the same bytes
    png = straight / "sample.png"
    args = sample.parse_args(
        [
            "--resume",
            str(out),
            "--classes",
            "0",
            "1",
            "2",
            "--per_class",
            "10",
            *SAMPLER,
            "--device",
            "cpu",
            "--output",
            str(png),
        ]
    )
    assert sample.main(args) == 0
    assert png.read_bytes() == grid_files(out)["epoch-0001.png"]


@pytest.mark.slow
@pytest.mark.parametrize("stop_at", [3, 6])  # mid-epoch; the last step of epoch 0 (saved before its grid was made)
def test_sigterm_and_rerun_give_the_same_grids_and_records(straight, data, stop_at, tmp_path, capsys):
    out = tmp_path / "run"
    calls = []
    real_step = engine_jit.train_step

    def sigterm(parts, *args):
        calls.append(1)
        if len(calls) == stop_at:
            os.kill(os.getpid(), signal.SIGTERM)  # StopSignal's handler: the loop saves after this step and stops
        return real_step(parts, *args)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(engine_jit, "train_step", sigterm)
        assert main_jit.main(main_jit.parse_args(train_args(data, out))) == 0
    assert "stop requested (signal)" in capsys.readouterr().out
    assert not os.path.exists(out / "samples")  # no grid yet: epoch 0 did not end (or ended with the stop)
    assert main_jit.main(main_jit.parse_args(train_args(data, out))) == 0
    second = capsys.readouterr().out
    assert "resumed from" in second and second.count("sample grid of epoch") == 1  # the cost, printed once

    reference = straight / "straight"
    assert grid_files(out) == grid_files(reference)  # byte for byte
    assert_same_state(load_last(out), load_last(reference))
    resumed = {r["global_step"]: r for r in read_metrics(out, "train")}  # the rerun's records replace the stopped run's
    for r in read_metrics(reference, "train"):
        for key in ("loss", "loss_by_t", "grad_norm", "update_ratio"):
            assert resumed[r["global_step"]][key] == r[key], (r["global_step"], key)


def test_per_sample_losses_come_from_the_same_forward_and_leave_the_loss_unchanged():
    d = tiny_denoiser().train()
    x, y = torch.rand(6, 3, 16, 16) * 2 - 1, torch.arange(6) % 3
    t, noise = torch.rand(6), torch.randn(6, 3, 16, 16)
    torch.manual_seed(1)
    plain = d(x, y, t=t, noise=noise)
    torch.manual_seed(1)  # the same label dropout
    loss, per_sample, times = d(x, y, t=t, noise=noise, per_sample=True)
    assert torch.equal(loss, plain) and torch.equal(times, t) and per_sample.shape == (6,)
    assert torch.equal(per_sample.mean(), loss)


def test_the_monitor_bins_losses_by_t_without_skipped_steps():
    edges = [0.0, 0.2, 0.5, 0.9, 1.0]
    m = StepMonitor(torch.device("cpu"), edges)
    rng = np.random.default_rng(0)
    kept_t, kept_loss = [], []
    for skipped in (0.0, 1.0, 0.0):
        t, losses = rng.random(7).astype(np.float32), rng.random(7).astype(np.float32)
        t[:2] = [0.2, 0.5]  # on an edge: the lower bin (e_k < t <= e_k+1)
        m.add_samples(torch.from_numpy(losses), torch.from_numpy(t))
        m.end_step(torch.tensor(skipped), [], None, sharded=False)
        m.add(torch.tensor(1.0), torch.tensor(skipped))
        if not skipped:
            kept_t.append(t), kept_loss.append(losses)
    *_, detail = m.read(bins=True)
    t, losses = np.concatenate(kept_t), np.concatenate(kept_loss)
    k = np.digitize(t, np.float32(edges[1:-1]), right=True)  # compared in float32, as on the device
    expected = [float(losses[k == b].mean()) if (k == b).any() else None for b in range(4)]
    assert detail["loss_by_t"] == pytest.approx(expected, rel=1e-6) and detail["t_edges"] == edges
    assert np.isnan(detail["grad_norm"])  # nothing measured
    *_, detail = m.read(bins=True)
    assert detail["loss_by_t"] == [None] * 4  # the window restarted


def test_t_bin_edges_split_the_training_times_evenly():
    edges = t_bin_edges(-0.8, 0.8)
    assert len(edges) == 9 and edges[0] == 0 and edges[-1] == 1 and edges == sorted(edges)
    t = tiny_denoiser().sample_t(400_000, "cpu").numpy()
    counts = np.histogram(t, bins=edges)[0] / len(t)
    np.testing.assert_allclose(counts, 1 / 8, atol=0.003)


def test_the_measured_gradient_norm_and_update_ratio_and_no_change_to_the_step():
    torch.manual_seed(0)
    d1 = tiny_denoiser().train()
    d2 = copy.deepcopy(d1)
    o1, o2 = build_optimizer(d1, 1e-3, 0.0), build_optimizer(d2, 1e-3, 0.0)
    x, y = torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8), torch.arange(4) % 3
    seen = {}
    real = o1.step

    def step_recording(*a, **k):  # the gradient and weights as the optimiser sees them
        seen["grad"] = torch.cat([p.grad.flatten() for p in d1.parameters() if p.grad is not None]).norm()
        seen["before"] = torch.cat([p.detach().flatten() for p in d1.parameters() if p.requires_grad]).clone()
        return real(*a, **k)

    o1.step = step_recording
    monitor = StepMonitor(torch.device("cpu"), t_bin_edges(-0.8, 0.8))
    for k in range(2):
        monitor.measure_next = k == 1
        torch.manual_seed(k)
        train_step(StepParts(d1, d1, o1, [], torch.device("cpu"), probe=monitor), [(x, y)])
        torch.manual_seed(k)
        train_step(StepParts(d2, d2, o2, [], torch.device("cpu")), [(x, y)])
    for a, b in zip(d1.parameters(), d2.parameters()):
        assert torch.equal(a, b)  # probing changes nothing
    after = torch.cat([p.detach().flatten() for p in d1.parameters() if p.requires_grad])
    *_, detail = monitor.read(bins=True)
    assert detail["grad_norm"] == pytest.approx(float(seen["grad"]), rel=1e-5)
    assert detail["update_ratio"] == pytest.approx(float((after - seen["before"]).norm() / after.norm()), rel=1e-4)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--sample_classes", "0", "3"], "--sample_classes 3: outside [0, 3)"),
        (["--sample_every", "-1"], "--sample_every must be >= 0"),
        (["--sample_per_class", "0"], "--sample_per_class must be at least 1"),
    ],
)
def test_bad_grid_flags_are_rejected_before_any_work(extra, message, tmp_path):
    with pytest.raises(BadValue, match=re.escape(message)):
        main_jit.check_args(main_jit.parse_args([*TINY, "--output_dir", str(tmp_path), *extra]))


def test_default_grids_spread_over_the_classes():
    assert grid.default_classes(1000) == [0, 125, 250, 375, 500, 625, 750, 875]
    assert grid.default_classes(4) == [0, 1, 2, 3] and grid.default_per_class(4) == 8  # the demo: 4 × 8
    assert grid.default_per_class(8) == 4 and grid.default_per_class(40) == 1
    spec = grid.GridSpec((5, 7), 3, SamplerSettings())
    assert spec.labels(range(6)).tolist() == [5, 5, 5, 7, 7, 7]


def fake_run(folder, name_losses, fids, epochs=3):
    """A run folder with metrics.jsonl (train and eval records), two grids and a sweep csv."""
    os.makedirs(folder / "samples")
    lines = []
    for e in range(epochs):
        for s, loss in enumerate(name_losses, 1):
            lines.append(
                {
                    "kind": "train",
                    "epoch": e,
                    "step": s,
                    "global_step": e * len(name_losses) + s,
                    "loss": loss / (e + 1),
                    "lr": 1e-3,
                    "img_per_s": 100.0,
                    "skipped": 1 if (e, s) == (1, 1) else 0,
                    "images_per_step": 4,
                    "loss_by_t": [0.5, None],
                    "t_edges": [0.0, 0.3, 1.0],
                    "grad_norm": 1.0,
                    "update_ratio": 1e-3,
                }
            )
    lines += [
        {
            "kind": "eval",
            "epoch": e,
            "fid": f,
            "inception_score": 2.0,
            "ema": 1,
            "cfg": 2.0,
            "interval_min": 0.1,
            "interval_max": 1.0,
            "num_images": 12,
        }
        for e, f in fids
    ]
    (folder / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in lines) + '{"kind": "tra'
    )  # a cut last line
    for e in (0, 2):
        Image.fromarray(np.full((10, 10, 3), 40 * e, np.uint8)).save(folder / "samples" / f"epoch-{e:04d}.png")
    (folder / "sweep.csv").write_text("cfg,fid\n1.0,30.5\n2.0,25.1\n")
    (folder / "log.txt").write_text("Epoch [0] ...\nerror: could not write x: No space left on device\n")


def test_the_report_overlays_runs_and_refers_only_to_files_that_exist(tmp_path, capsys):
    fake_run(tmp_path / "a", [1.0, 0.8], [(0, 50.0), (2, 40.0)])
    fake_run(tmp_path / "b", [2.0, 1.5], [(2, 45.0)])
    args = report.parse_args([str(tmp_path / "a"), str(tmp_path / "b")])
    assert exit_code(report.main, args) == 0
    page = (tmp_path / "a" / "report.html").read_text()
    assert "a (smoothed)" in page and "b (smoothed)" in page  # the loss curves overlaid
    assert "a ema1 cfg2.0" in page and "b ema1 cfg2.0" in page  # and the FID histories
    assert "1 optimiser step(s) skipped" in page and "1 line(s) of metrics.jsonl not readable" in page
    assert "No space left on device" in page and "25.1" in page
    assert "<script" not in page and not re.search(r'(src|href)="(https?:)?//', page)  # nothing from the network
    sources = re.findall(r'src="([^"]+)"', page)
    assert "../b/samples/epoch-0002.png" in sources
    assert all((tmp_path / "a" / s).is_file() for s in sources)
    assert report.cli([str(tmp_path / "nope")]) == 2
    assert "error: " in capsys.readouterr().err


def test_the_report_reads_the_newest_readable_checkpoint_and_names_a_bad_one_in_one_line(tmp_path):
    """util.report reads checkpoints through util.checkpoint's reader: a cut newest file is one line
    under Warnings, and the config comes from the older file; a folder of bad files only, a line each."""
    fake_run(tmp_path / "a", [1.0, 0.8], [(0, 50.0)])
    sd = tiny_denoiser().state_dict()
    older = ckpt_util.TrainState(
        model=sd, emas=[sd, sd], optimizer=None, epoch=1, start={"epoch": 2, "step": 0}, args={"epochs": 7, "lr": 0.5}
    )
    ckpt_util.save(older, str(tmp_path / "a" / "checkpoint-1.pth"))
    newest = tmp_path / "a" / "checkpoint-last.pth"
    newest.write_bytes((tmp_path / "a" / "checkpoint-1.pth").read_bytes()[:1000])  # cut by a full disk
    os.utime(newest, (time.time() + 5, time.time() + 5))
    run = R.read_run(str(tmp_path / "a"))
    assert run["config"] == {"epochs": 7, "lr": 0.5} and run["progress"]["total_steps"] == 7 * 2
    (line,) = run["unreadable"]
    assert line.startswith(f"cannot read checkpoint {newest}") and "\n" not in line
    R.write_report([str(tmp_path / "a")])
    page = (tmp_path / "a" / "report.html").read_text()
    assert f"<li>cannot read checkpoint {newest}" in page and "<td>lr</td><td>0.5</td>" in page
    os.remove(tmp_path / "a" / "checkpoint-1.pth")
    (bad,) = R.read_run(str(tmp_path / "a"))["unreadable"]
    assert bad == line and R.read_run(str(tmp_path / "a"))["config"] == {}


def test_smoothing_is_the_debiased_exponential_average():
    values = [3.0, 1.0, 2.0, 5.0]
    w = 0.9
    for k, s in enumerate(smooth(values, w)):
        weights = [w ** (k - i) * (1 - w) for i in range(k + 1)]
        assert s == pytest.approx(sum(wi * v for wi, v in zip(weights, values)) / sum(weights))


CHECK = """<script>
window.__errors = [];
window.addEventListener("error",
  e => window.__errors.push(String(e.message || (e.target && e.target.src) || "error")), true);
window.addEventListener("load", () => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.getAttribute("src"));
  const check = {images: images.length, broken: broken, errors: window.__errors};
  document.body.setAttribute("data-check", JSON.stringify(check));
});
</script>"""


def chromium(*args, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="needs Debian's chromium package (apt-get install chromium)"
)
def test_the_report_of_a_real_run_loads_in_chromium(straight, tmp_path):
    """The page of a real run, in a real browser: every image loads, nothing is logged to the console,
    and the screenshot is not blank. A copy of the page with a checking script is opened (the page
    itself has none)."""
    out = straight / "straight"
    page = (out / "report.html").read_text()
    probe = out / "report-check.html"  # next to the page: the same relative paths
    probe.write_text(page.replace("<head>", "<head>" + CHECK, 1))
    try:
        p = chromium("--enable-logging=stderr", "--v=0", "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    finally:
        probe.unlink()
    found = re.search(r'data-check="([^"]*)"', p.stdout)
    assert found, p.stderr[-2000:]
    check = json.loads(found.group(1).replace("&quot;", '"'))
    assert check["images"] == 3 and check["broken"] == [] and check["errors"] == [], check  # latest + 2 thumbnails
    assert not [line for line in p.stderr.splitlines() if ":CONSOLE" in line]

    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1000,1400", (out / "report.html").as_uri())
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.shape == (1400, 1000) and pixels.std() > 10 and (pixels < 200).mean() > 0.005  # a blank page: 0 and 0


@pytest.mark.slow
def test_the_cost_bench_measures_and_works_out_figures(tmp_path):
    from helpers import run_script

    out = tmp_path / "cost.json"
    run_script(
        "bench/monitor_cost.py",
        "--model",
        "JiT-XS/4",
        "--img_size",
        16,
        "--class_num",
        3,
        "--batch_size",
        4,
        "--steps",
        1,
        "--sample_steps",
        2,
        "--images_per_epoch",
        24,
        "--log_freq",
        2,
        "--json",
        out,
    )
    r = json.loads(out.read_text())
    assert (
        r["grid"].startswith("3 × 10, heun 2 steps")
        and r["grid_s"] > 0
        and r["epoch_s"] == pytest.approx(6 * r["step_s"])
    )
    assert r["grid_pct"] == pytest.approx(100 * r["grid_s"] / (r["epoch_s"] * 12))
    p = run_script(
        "bench/monitor_cost.py",
        "--from_figures",
        "--train_img_per_s",
        1958,
        "--sample_img_per_s",
        32.3,
        "--class_num",
        1000,
        "--images_per_epoch",
        1281167,
        "--world_size",
        8,
        "--sample_every",
        5,
    )
    figures = json.loads(p.stdout)
    assert figures["grid_images"] == 32 and figures["epoch_s"] == pytest.approx(1281167 / (8 * 1958))
    assert figures["grid_s"] == pytest.approx([32 / 8 / 32.3, 32 / 32.3])
