"""Edges of a resumed or stopped run in one process: RunLog.start_at over a metrics.jsonl that a kill, a
person or another tool left odd, and the set-up stop's message with and without a checkpoint."""

import json
import signal
from types import SimpleNamespace

import pytest
from helpers import TINY, save_reference_checkpoint, tiny_denoiser

import main_jit
from util import nodes, stop
from util.logger import RunLog


def lines(path) -> list[str]:
    return path.read_text().splitlines()


def test_start_at_keeps_what_it_does_not_understand_and_drops_a_cut_line(tmp_path):
    records = [
        {"kind": "train", "epoch": 0, "step": 4},
        {"kind": "train", "epoch": None, "step": 3},  # not a run's record: kept, and no TypeError
        {"kind": "eval", "epoch": "5"},
        {"kind": "train", "epoch": 1, "step": [1]},
        {"kind": "eval", "epoch": 1, "checkpoint": "x/checkpoint-last.pth"},  # an --evaluate_gen: kept
        {"kind": "eval", "epoch": 1},  # an evaluation during training after the start: done again
        {"kind": "eval_seed", "epoch": 1, "seed": 1},  # and its seeds' (they were kept, and reused by it)
        {"kind": "train", "epoch": 1, "step": 2},
        {"kind": "train", "epoch": 1, "step": 4},  # after the start: trained again
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"kind": "train", "epo')  # cut by a kill
    log = RunLog(str(tmp_path))
    try:
        log.start_at(1, 2, 4)
        log.start_at(1, 2, 4)  # a second resume in a row changes nothing
    finally:
        log.close()
    assert [json.loads(x) for x in lines(path)] == records[:5] + [records[7]]


def test_a_stop_during_the_set_up_says_whether_a_checkpoint_exists():
    stopper = stop.StopSignal()
    try:
        stopper.requested = signal.SIGUSR1
        with pytest.raises(stop.GenerationStopped, match="nothing was trained since the checkpoint, exiting"):
            stop.raise_if_requested_at_set_up(stopper, "out/checkpoint-last.pth")
        with pytest.raises(stop.StopRun, match="nothing was trained and no checkpoint exists yet") as e:
            stop.raise_if_requested_at_set_up(stopper, None)
        assert e.value.code == 0
        stopper.requested = 0
        stop.raise_if_requested_at_set_up(stopper, None)  # no signal: nothing raised
    finally:
        stopper.close()


def test_an_evaluation_beside_a_training_run_leaves_the_temporaries_of_its_save(
    tmp_path, data, inception_weights, fid_ref_stats
):
    """--evaluate_gen may run in a training run's folder (its own lock): starting, it must not delete the
    temporary file or folder of a save in progress there (the save would fail and be lost)."""
    out = tmp_path / "out"
    out.mkdir()
    save_reference_checkpoint(out / "checkpoint-last.pth", tiny_denoiser(seed=1), epoch=1)
    saving = [out / ".checkpoint-last.pth.tmp-999", out / ".checkpoint-last.dcp.tmp-999"]
    saving[0].write_bytes(b"half a checkpoint")
    saving[1].mkdir()
    flags = ["--fid_stats", fid_ref_stats, "--inception_weights", inception_weights, "--num_images", "6"]
    evaluate = [*TINY, *flags, "--evaluate_gen", "--resume", str(out), "--output_dir", str(out), "--dry_run"]
    assert main_jit.cli([*evaluate, "--device", "cpu"]) == 0
    assert all(p.exists() for p in saving)
    train = [*TINY, "--resume", str(out), "--output_dir", str(out), "--dry_run", "--data_path", data]
    assert main_jit.cli([*train, "--device", "cpu"]) == 0  # a training run's start removes them
    assert not any(p.exists() for p in saving)


def test_gloo_over_ipv6_is_allowed_and_its_loopback_refused_across_nodes(monkeypatch, tmp_path):
    """util.nodes as gloo chooses: the host name may resolve to IPv6 only, GLOO_SOCKET_IFNAME may name an
    interface with only an IPv6 address (gloo binds to either); loopback (::1 too) cannot span nodes."""
    table = tmp_path / "if_inet6"
    table.write_text(
        "fd000000000000000000000000000005 04 40 00 80      ib0\n00000000000000000000000000000001 01 80 10 80       lo\n"
    )
    assert nodes.ipv6_addresses(str(table)) == [("ib0", "fd00::5"), ("lo", "::1")]
    assert nodes.ipv6_addresses(str(tmp_path / "none")) == []
    monkeypatch.setattr(nodes, "ipv6_addresses", lambda: [("ib0", "fd00::5"), ("lo", "::1")])
    monkeypatch.setattr(nodes, "ipv4_of", lambda interface: None)  # an IPv6-only machine
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    for address, interface, error in (("fd00::5", "ib0", None), ("::1", "lo", "would use the loopback address ::1")):
        monkeypatch.setattr(nodes, "hostname_address", lambda host, a=address: a)
        here = nodes.local_info(["gloo"])
        assert here["gloo"][:2] == [interface, address]
        found, lines = nodes.describe_nodes([here, {**here, "host": "elsewhere"}])
        assert (
            (found is None and lines[0].startswith(f"network: gloo on {interface} (host name) at "))
            if error is None
            else (error in found and lines == [])
        )
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "ib0")  # before: "no such network interface with an IPv4 address"
    assert nodes.local_info(["gloo"])["gloo"][:2] == ["ib0", "fd00::5"]
    assert nodes.describe_nodes([nodes.local_info(["gloo"])])[0] is None


def test_the_host_name_resolves_as_gloo_resolves_it():
    assert nodes.hostname_address("localhost") in ("127.0.0.1", "::1")  # resolvable and bindable here
    assert nodes.hostname_address("no-such-host.invalid") is None  # gloo then falls back to loopback


def test_debians_host_name_address_is_named_as_the_loopback_interface():
    assert nodes.interface_of("127.0.1.1") == nodes.interface_of("127.0.0.1") == "lo"  # before: "?" for 127.0.1.1


@pytest.mark.parametrize("epoch", [100, 101])
def test_a_stop_during_the_grid_of_a_keep_epoch_still_writes_its_numbered_checkpoint(epoch):
    """The grid comes before the epoch's saves: a stop in it saved checkpoint-last only, and the rerun starts
    after the epoch, so checkpoint-100 (every 100 epochs) was never written."""
    saved = []

    class Grids:
        def due(self, e):
            return True

        def __call__(self, e, weights):
            raise stop.GenerationStopped("stop requested (signal) between two generation batches")

    class Checkpoints:
        def is_saved(self, *position):
            return bool(saved)

    run = SimpleNamespace(
        config=SimpleNamespace(epochs=600, save_last_freq=5),
        data=SimpleNamespace(steps_per_epoch=6),
        grids=Grids(),
        weights=None,
        checkpoints=Checkpoints(),
        evaluation=None,
    )
    with pytest.raises(stop.StopRun, match=f"after epoch {epoch}: checkpoint saved") as e:
        main_jit.end_epoch(run, epoch, lambda ep, step, name="last": saved.append((ep, step, name)) or True, False)
    assert e.value.code == 0 and saved == [(epoch, 6, "last")] + ([(100, 6, "100")] if epoch == 100 else [])


def test_a_record_appended_after_a_cut_line_is_kept_on_a_line_of_its_own(tmp_path):
    """An --evaluate_gen appends to the metrics.jsonl of a training run that was killed mid-line (it does not
    clean the file as a training start does): its record was glued to the cut line and lost with it."""
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "epoch": 0, "step": 4}\n{"kind": "train", "epo')
    log = RunLog(str(tmp_path))
    try:
        log.record({"kind": "eval", "epoch": 1, "checkpoint": "x.pth", "fid": 3.5})
        log.start_at(2, 0, 6)  # the training run's next start drops the cut line only
    finally:
        log.close()
    assert [json.loads(x) for x in lines(path)] == [
        {"kind": "train", "epoch": 0, "step": 4},
        {"kind": "eval", "epoch": 1, "checkpoint": "x.pth", "fid": 3.5},
    ]
