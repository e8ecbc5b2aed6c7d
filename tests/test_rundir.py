import errno
import os

import pytest

import mnistdiff.rundir as rundir
from mnistdiff.rundir import RunDirBusyError, lock_run_dir, remove_stale_temps


def test_lock_refuses_a_second_holder_and_names_the_first(tmp_path):
    run = tmp_path / "run"
    with lock_run_dir(run) as lock_file:
        assert lock_file.read_text().strip() == str(os.getpid())
        with pytest.raises(RunDirBusyError) as info, lock_run_dir(run):
            pass
        assert f"run directory {run} is in use" in str(info.value)
        assert f"PID {os.getpid()}" in str(info.value) and "--run-dir" in str(info.value)
    with lock_run_dir(run):  # released when the first holder's block ended
        pass


def test_lock_on_a_file_system_without_locks_warns_and_goes_on(tmp_path, monkeypatch):
    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(rundir.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="cannot lock the run directory"), lock_run_dir(tmp_path):
        pass


def test_remove_stale_temps_only_touches_train_writes(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "samples").mkdir()
    stale = [
        "checkpoints/.step_0000100.pt.abc123.tmp",
        "checkpoints/.last.pt.x_y.tmp",
        "checkpoints/.best.pt.q.tmp",
        ".metrics.jsonl.r.tmp",
        "samples/.samples_epoch_003.png.s.tmp",
    ]
    kept = ["checkpoints/last.pt", "checkpoints/.other.pt.a.tmp", ".eval.json.b.tmp", "x.tmp"]
    for name in stale + kept:
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temps(tmp_path)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in removed) == sorted(stale)
    assert all((tmp_path / name).exists() for name in kept)
