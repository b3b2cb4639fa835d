"""The sharded checkpoint folder (util/checkpoint_dcp.py) in one process: what is written reads back bit
for bit, a part at a time; a full disk is one line and leaves the previous checkpoint; a save killed
between its two renames is recovered; an incomplete or foreign folder is never taken for a checkpoint.
The multi-process paths (every rank its shards, another world size, FSDP <-> DDP) are test_fsdp.py's."""

import errno
import os
import pickle

import pytest
import torch

import convert_checkpoint
import export
from util import checkpoint, checkpoint_dcp, errors, files


def parts(seed: int) -> tuple[dict, dict]:
    """(the tensors DCP writes, the rest) of a two-parameter 'model' with one EMA and AdamW state."""
    g = torch.Generator().manual_seed(seed)
    model = {"net.a": torch.randn(3, 4, generator=g), "net.b": torch.randn(4, generator=g)}
    ema = {k: v + 1 for k, v in model.items()}
    moments = {k: {"exp_avg": v * 2, "exp_avg_sq": v * v} for k, v in model.items()}
    groups = [{"lr": 1e-3, "betas": (0.9, 0.95), "fused": True, "params": ["net.b"]}, {"lr": 1e-3, "params": ["net.a"]}]
    rest = dict(
        epoch=seed,
        args={"model": "tiny"},
        resume={"epoch": seed + 1, "step": 0},
        rng=None,
        world_size=2,
        phema_stds=[],
        param_groups=groups,
        steps={"net.a": torch.tensor(5.0), "net.b": torch.tensor(5.0)},
        parts=["model", "model_ema1"],
        order=list(model),
    )
    return {"model": model, "model_ema1": ema, "optimizer": moments}, rest


def test_a_folder_reads_back_as_the_file_form_a_part_at_a_time(tmp_path):
    tensors, rest = parts(0)
    path = str(tmp_path / "checkpoint-last.dcp")
    checkpoint_dcp.write_folder(path, tensors, rest, needed=1000)
    assert checkpoint_dcp.is_dcp(path) and os.listdir(tmp_path) == ["checkpoint-last.dcp"]  # no temporary left
    state, found = checkpoint.load_checkpoint(str(tmp_path))
    assert found == path and state.folder == path and state.epoch == 0 and state.start == {"epoch": 1, "step": 0}
    assert state.model._data is None  # nothing read yet
    for key, want in tensors["model"].items():
        assert torch.equal(state.model[key], want)
    assert list(state.model) == rest["order"] and torch.equal(state.emas[0]["net.a"], tensors["model_ema1"]["net.a"])
    assert state.emas[1] is state.model  # no EMA 2 held: it starts from the model (from_dict)
    optimizer = state.optimizer
    assert [g["params"] for g in optimizer["param_groups"]] == [[0], [1]]  # numbered group by group
    assert float(optimizer["state"][1]["step"]) == 5.0 and optimizer._moments is None  # a counter reads no moment
    plain = checkpoint_dcp.plain(checkpoint.to_dict(state))
    assert torch.equal(plain["optimizer"]["state"][1]["exp_avg_sq"], tensors["optimizer"]["net.a"]["exp_avg_sq"])
    assert torch.equal(plain["optimizer"]["state"][0]["exp_avg"], tensors["optimizer"]["net.b"]["exp_avg"])
    checkpoint_dcp.release_shards(state.model)
    assert state.model._data is None and pickle.loads(pickle.dumps(state.model))._data is None


def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint-last.dcp")
    checkpoint_dcp.write_folder(path, *parts(0), needed=1000)
    real_fsync = os.fsync

    def full(fd):
        if os.path.basename(os.readlink(f"/proc/self/fd/{fd}")).endswith(".distcp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(files.WriteError) as e:
        checkpoint_dcp.write_folder(path, *parts(1), needed=123_000_000)
    message = str(e.value)
    assert message.startswith(f"could not write {path}: No space left on device (needs about 123.0 MB, ")
    assert "\n" not in message and os.listdir(tmp_path) == ["checkpoint-last.dcp"]
    assert checkpoint.load_checkpoint(path)[0].epoch == 0  # the previous one, intact


def test_a_save_killed_between_its_renames_is_recovered_and_leftovers_are_removed(tmp_path):
    path = str(tmp_path / "checkpoint-last.dcp")
    checkpoint_dcp.write_folder(path, *parts(0), needed=1000)
    aside = tmp_path / f".checkpoint-last.dcp.old-{os.getpid()}"
    os.rename(path, aside)  # publish() renamed the old one aside, then the process was killed
    (tmp_path / ".checkpoint-last.dcp.tmp-77").mkdir()  # and an unfinished save of another attempt
    incomplete = tmp_path / "checkpoint-7.dcp"  # a folder without its metadata is no checkpoint
    incomplete.mkdir()
    assert checkpoint.candidates(str(tmp_path)) == []
    checkpoint.remove_stale_temporaries(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-7.dcp", "checkpoint-last.dcp"]
    assert checkpoint.candidates(str(tmp_path)) == [path] and checkpoint.load_checkpoint(path)[0].epoch == 0


def test_foreign_metadata_is_refused_before_it_runs(tmp_path):
    path = tmp_path / "checkpoint-last.dcp"
    checkpoint_dcp.write_folder(str(path), *parts(0), needed=1000)

    class Payload:
        def __reduce__(self):
            return os.system, ("echo pwned > " + str(tmp_path / "pwned"),)

    (path / checkpoint_dcp.METADATA).write_bytes(pickle.dumps(Payload()))
    with pytest.raises(checkpoint.CheckpointError, match=r"cannot read checkpoint .*posix.system is not part of"):
        checkpoint.load_checkpoint(str(path))
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize("damage", ["missing", "cut", "empty"])
def test_a_folder_with_a_damaged_shard_file_is_skipped_for_the_one_before(tmp_path, damage):
    older, newest = str(tmp_path / "checkpoint-100.dcp"), str(tmp_path / "checkpoint-last.dcp")
    checkpoint_dcp.write_folder(older, *parts(1), needed=1000)
    checkpoint_dcp.write_folder(newest, *parts(2), needed=1000)
    os.utime(os.path.join(older, checkpoint_dcp.METADATA), (1, 1))  # the older one by time, as on disk
    shard = os.path.join(newest, "__0_0.distcp")
    size = os.path.getsize(shard)
    if damage == "missing":
        os.remove(shard)
    else:
        os.truncate(shard, size // 2 if damage == "cut" else 0)
    logged = []
    state, found = checkpoint.load_checkpoint(str(tmp_path), log=logged.append)
    assert found == older and state.epoch == 1 and torch.equal(state.model["net.a"], parts(1)[0]["model"]["net.a"])
    assert logged[0].startswith(f"warning: cannot read checkpoint {newest}: shard file __0_0.distcp is ")
    assert logged[1] == f"warning: resuming from the older checkpoint {older}"
    with pytest.raises(checkpoint.CheckpointError, match="shard file __0_0.distcp is (missing|cut short)") as e:
        checkpoint.load_checkpoint(newest)  # named: an error, never another checkpoint
    assert "\n" not in str(e.value)


def test_a_shard_file_of_garbage_is_one_line_of_bad_input_when_read(tmp_path):
    path = str(tmp_path / "checkpoint-last.dcp")
    checkpoint_dcp.write_folder(path, *parts(0), needed=1000)
    shard = os.path.join(path, "__0_0.distcp")
    with open(shard, "r+b") as f:
        f.write(bytes(range(256)) * (os.path.getsize(shard) // 256))
    state, _ = checkpoint.load_checkpoint(path)  # sizes right: found when the tensors are read
    with pytest.raises(checkpoint_dcp.UnreadableFolder, match=f"^cannot read checkpoint {path}: ") as e:
        state.model["net.a"]
    assert isinstance(e.value, errors.BadInput) and "\n" not in str(e.value)  # exit 2, not DCP's BaseException


def test_an_incomplete_folder_named_as_a_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    path = tmp_path / "checkpoint-last.dcp"
    path.mkdir()  # a save that never finished, or a copy without its metadata
    (path / "__0_0.distcp").write_bytes(b"")
    for required in (True, False):  # --resume (required=False) would otherwise train from scratch
        with pytest.raises(checkpoint.CheckpointError, match="is not a complete sharded checkpoint"):
            checkpoint.load_checkpoint(str(path), required=required)
        with pytest.raises(checkpoint.CheckpointError, match="is not a complete sharded checkpoint"):
            checkpoint.load_checkpoint(str(path) + "/", required=required)


def test_convert_refuses_an_output_inside_its_checkpoint_or_in_no_folder_before_reading(tmp_path, capsys, monkeypatch):
    path = str(tmp_path / "checkpoint-last.dcp")
    checkpoint_dcp.write_folder(path, *parts(0), needed=1000)
    before = {n: (tmp_path / "checkpoint-last.dcp" / n).read_bytes() for n in os.listdir(path)}
    for source, output in (
        (path, os.path.join(path, checkpoint_dcp.METADATA)),  # with --overwrite it replaced the metadata
        (str(tmp_path), os.path.join(path, "..", "checkpoint-last.dcp", "x.pth")),
    ):
        assert convert_checkpoint.cli([source, output, "--overwrite"]) == 2
        message = capsys.readouterr().err
        assert message == f"error: output {output} is inside the checkpoint it converts: write it beside {path}\n"
    assert {n: (tmp_path / "checkpoint-last.dcp" / n).read_bytes() for n in os.listdir(path)} == before
    monkeypatch.setattr(checkpoint, "load_checkpoint", None)  # nothing is read: the output is checked first
    missing = str(tmp_path / "no" / "checkpoint-last.pth")
    assert convert_checkpoint.cli([path, missing]) == 2
    assert capsys.readouterr().err == f"error: output {missing}: its folder {tmp_path / 'no'} does not exist\n"
    monkeypatch.undo()
    assert convert_checkpoint.cli([str(tmp_path), str(tmp_path / "checkpoint-last.pth")]) == 0
    assert torch.equal(torch.load(tmp_path / "checkpoint-last.pth")["model"]["net.a"], parts(0)[0]["model"]["net.a"])


def test_export_refuses_to_write_into_a_run_folder_of_sharded_checkpoints_or_into_one(tmp_path):
    path = tmp_path / "checkpoint-last.dcp"
    checkpoint_dcp.write_folder(str(path), *parts(0), needed=1000)
    with pytest.raises(errors.BadValue, match="holds checkpoints"):
        export.check_output(str(tmp_path), overwrite=True)
    with pytest.raises(errors.BadValue, match="is a sharded checkpoint"):
        export.check_output(str(path), overwrite=True)


def test_a_publish_whose_second_rename_fails_puts_the_previous_folder_back(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint-last.dcp")
    checkpoint_dcp.write_folder(path, *parts(0), needed=1000)
    real_rename = os.rename

    def rename(src, dst):
        if str(dst) == path and ".tmp-" in str(src):  # the new folder into place: refused (a quota, an NFS error)
            raise OSError(errno.EDQUOT, "Disk quota exceeded")
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(files.WriteError, match="Disk quota exceeded"):
        checkpoint_dcp.write_folder(path, *parts(1), needed=1000)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["checkpoint-last.dcp"]  # visible to every reader, not only after a restart
    assert checkpoint.load_checkpoint(str(tmp_path))[0].epoch == 0


def test_an_older_folder_that_could_not_be_deleted_does_not_fail_the_next_saves(tmp_path):
    """NFS keeps a deleted folder whose files another process (an --evaluate_gen reading it) still has open
    (.nfsXXXX): the next save of the same process must not rename onto it (before: "Directory not empty")."""
    path = str(tmp_path / "checkpoint-last.dcp")
    checkpoint_dcp.write_folder(path, *parts(0), needed=1000)
    stuck = tmp_path / f".checkpoint-last.dcp.old-{os.getpid()}"
    stuck.mkdir()
    (stuck / ".nfs0000000000000001").write_bytes(b"still open elsewhere")
    for epoch in (1, 2):
        checkpoint_dcp.write_folder(path, *parts(epoch), needed=1000)
        assert checkpoint.load_checkpoint(path)[0].epoch == epoch
    checkpoint.remove_stale_temporaries(str(tmp_path))  # the next start: what is left over goes
    assert os.listdir(tmp_path) == ["checkpoint-last.dcp"]


def test_a_folder_replaced_by_another_save_while_read_is_an_error_not_a_mix_of_two_saves(tmp_path):
    """An --evaluate_gen (or export.py) beside a training run: the parts are read when used, and the run
    may have published a new checkpoint-last.dcp by then (a file's contents stay those of the opened file;
    a folder's do not): reading one must not give the new save's weights under the old one's epoch."""
    path = str(tmp_path / "checkpoint-last.dcp")
    checkpoint_dcp.write_folder(path, *parts(0), needed=1000)
    state, _ = checkpoint.load_checkpoint(path)
    assert torch.equal(state.model["net.b"], parts(0)[0]["model"]["net.b"])  # read before the next save
    checkpoint_dcp.release_shards(state.model)
    checkpoint_dcp.write_folder(path, *parts(1), needed=1000)  # the training run saves meanwhile
    for read in (
        lambda: state.model["net.a"],
        lambda: state.emas[0]["net.a"],
        lambda: state.optimizer["state"][0]["exp_avg"],
    ):
        with pytest.raises(
            checkpoint_dcp.UnreadableFolder, match="another save replaced it while this process read it"
        ):
            read()
    assert checkpoint.load_checkpoint(path)[0].epoch == 1  # the command run again reads the new one


def test_a_run_folder_with_an_unfinished_sharded_folder_is_not_started_afresh_over_it(tmp_path):
    unfinished = tmp_path / "checkpoint-last.dcp"  # a copy from another cluster, still under way
    unfinished.mkdir()
    (unfinished / "__0_0.distcp").write_bytes(b"\0" * 100)
    for required in (True, False):  # --resume DIR (required=False) trained from scratch, then saved over it
        with pytest.raises(checkpoint.CheckpointError, match="checkpoint-last.dcp is not a complete sharded"):
            checkpoint.load_checkpoint(str(tmp_path), required=required)
    older = str(tmp_path / "checkpoint-100.dcp")
    checkpoint_dcp.write_folder(older, *parts(1), needed=1000)
    logged = []
    assert checkpoint.load_checkpoint(str(tmp_path), log=logged.append)[1] == older
    assert logged == [
        f"warning: {unfinished} is not a complete sharded checkpoint (no .metadata or train_state.pth): skipped"
    ]


def test_a_file_and_a_folder_in_one_run_folder_the_newest_readable_is_taken(tmp_path):
    folder = str(tmp_path / "checkpoint-last.dcp")
    checkpoint_dcp.write_folder(folder, *parts(3), needed=1000)
    os.utime(os.path.join(folder, checkpoint_dcp.METADATA), (100, 100))
    file = tmp_path / "checkpoint-last.pth"  # newer (a DDP rerun of an FSDP run), but cut short
    file.write_bytes(b"PK\x03\x04 cut short")
    logged = []
    state, found = checkpoint.load_checkpoint(str(tmp_path), log=logged.append)
    assert found == folder and state.epoch == 3 and logged[0].startswith(f"warning: cannot read checkpoint {file}: ")
    assert logged[1] == f"warning: resuming from the older checkpoint {folder}" and "\n" not in logged[0]
    checkpoint.save(checkpoint.TrainState.weights_only(parts(4)[0]["model"], epoch=4), str(file))
    assert checkpoint.load_checkpoint(str(tmp_path))[1] == str(file)  # readable and newer: the file
