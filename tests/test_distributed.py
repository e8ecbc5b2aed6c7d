"""Multi-process training on CPU with gloo: 2 workers launched by torchrun, compared with one
process that trains the same global batch in-process.

Model dropout is 0 (the smoke config): dropout masks are drawn per rank, so they are the one
piece of randomness that differs between world sizes. Times, noise and label drops are drawn for
the whole global batch and sharded, so they match by construction.
"""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from conftest import ROOT, mnist_dir
from mnistdiff.checkpoint import load_checkpoint
from mnistdiff.config import load_config
from mnistdiff.distributed import (
    DistContext,
    DistributedError,
    agree_step,
    micro_batch_size,
    shard,
)
from mnistdiff.train import TrainingError, train

SMOKE = ROOT / "configs" / "smoke.yaml"
# Conditional model with CFG label dropout, so sharded label drops are exercised too; a metrics
# line every step, so a run resumed at any step logs the same records as an uninterrupted one.
COMMON = (
    "diffusion.label_dropout=0.3",
    "train.precision=fp32",
    "train.log_every=1",
    "train.tensorboard=true",
)
ATOL = 1e-5  # float summation order differs between 1 and 2 processes


@pytest.fixture(scope="module")
def data_dir():
    path = mnist_dir()
    if path is None:
        pytest.skip("real MNIST not available (set MNIST_DIR)")
    return path


def _overrides(run_dir: Path, data_dir: str, extra) -> list[str]:
    return [f"train.run_dir={run_dir}", f"data.data_dir={data_dir}", *COMMON, *extra]


def _train_here(run_dir: Path, data_dir: str, *extra, **kwargs) -> Path:
    """One process, in this interpreter."""
    cfg = load_config(SMOKE, _overrides(run_dir, data_dir, extra))
    return train(cfg, log=lambda *a, **k: None, **kwargs)


def _torchrun(
    run_dir: Path, data_dir: str, *extra, cli=(), entry=("-m", "mnistdiff"), env=None, timeout=120
) -> subprocess.CompletedProcess:
    """Two gloo workers via ``python -m torch.distributed.run``; returns the finished process."""
    sets = [arg for kv in _overrides(run_dir, data_dir, extra) for arg in ("--set", kv)]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [*entry, "train", "--config", str(SMOKE), *sets, *cli]
    child_env = {**os.environ, "OMP_NUM_THREADS": "1", "MNIST_DIR": data_dir, **(env or {})}
    child_env.pop("WORLD_SIZE", None)
    return subprocess.run(
        cmd, env=child_env, capture_output=True, text=True, timeout=timeout, cwd=run_dir.parent
    )


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr[-3000:]


def _last(run_dir: Path) -> dict:
    return load_checkpoint(run_dir / "checkpoints" / "last.pt")


def _assert_same_state(a: dict, b: dict) -> None:
    """Same step, data position and history steps; weights, EMA and Adam moments within ATOL."""
    assert a["step"] == b["step"] and a["epoch"] == b["epoch"]
    assert a["data_state"] == b["data_state"]
    for key in ("model", "ema"):
        sa = a[key] if key == "model" else a[key]["model"]
        sb = b[key] if key == "model" else b[key]["model"]
        assert sa.keys() == sb.keys()
        for name in sa:
            torch.testing.assert_close(sa[name], sb[name], rtol=0, atol=ATOL, msg=name)
    opt_a, opt_b = a["optimizer"]["state"], b["optimizer"]["state"]
    assert opt_a.keys() == opt_b.keys()
    for i in opt_a:
        for name in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(opt_a[i][name], opt_b[i][name], rtol=1e-3, atol=1e-7)
    hist_a = [(r["step"], sorted(r)) for r in a["history"]]
    hist_b = [(r["step"], sorted(r)) for r in b["history"]]
    assert hist_a == hist_b
    for ra, rb in zip(a["history"], b["history"], strict=True):
        for key in ("loss", "val_loss"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], abs=1e-5), (ra["step"], key)


def _listing(run_dir: Path) -> list[str]:
    """Relative file paths, with TensorBoard event-file names (host, pid, time) normalised."""
    names = []
    for p in sorted(run_dir.rglob("*")):
        if p.is_file():
            rel = p.relative_to(run_dir).as_posix()
            names.append("tensorboard/events" if rel.startswith("tensorboard/events") else rel)
    return names


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    """Six steps in one process, global batch 16, no accumulation."""
    run = tmp_path_factory.mktemp("ref") / "run"
    return _train_here(run, data_dir)


@pytest.fixture(scope="module")
def ddp(data_dir, tmp_path_factory):
    """The same six steps on 2 processes, each accumulating 2 micro-batches of 4."""
    run = tmp_path_factory.mktemp("ddp") / "run"
    proc = _torchrun(run, data_dir, "train.grad_accum=2")
    _ok(proc)
    return run, proc


# --------------------------------------------------------------------------- unit


def test_micro_batch_size_and_clear_error():
    assert micro_batch_size(16, 2, DistContext(rank=1, world_size=2)) == 4
    assert micro_batch_size(16, 1, DistContext()) == 16
    with pytest.raises(DistributedError, match=r"batch_size 16.*3 x 1 = 3.*multiple of 3"):
        micro_batch_size(16, 1, DistContext(rank=0, world_size=3))
    with pytest.raises(DistributedError, match=r"2 x 16 = 32"):
        micro_batch_size(16, 16, DistContext(rank=0, world_size=2))


def test_shards_partition_the_global_batch():
    x = torch.arange(12).reshape(6, 2)
    parts = [shard(x, DistContext(rank=r, world_size=3)) for r in range(3)]
    assert torch.equal(torch.cat(parts), x)
    assert [len(p) for p in parts] == [2, 2, 2]
    assert torch.equal(shard(x, DistContext()), x)


def test_agree_step_single_process_is_identity():
    assert agree_step(0.5, None, DistContext()) == (0.5, None)
    assert agree_step(0.5, 15, DistContext()) == (0.5, 15)


# --------------------------------------------------------------------------- 1 vs 2 processes


def test_grad_accumulation_equals_large_batch(reference, data_dir, tmp_path):
    run = _train_here(tmp_path / "accum", data_dir, "train.grad_accum=4")
    _assert_same_state(_last(reference), _last(run))


def test_ddp_matches_one_process_and_only_rank0_writes(reference, ddp):
    run, proc = ddp
    _assert_same_state(_last(reference), _last(run))
    for name in ("last.pt", "step_0000003.pt", "step_0000006.pt", "best.pt"):
        a = load_checkpoint(reference / "checkpoints" / name)
        b = load_checkpoint(run / "checkpoints" / name)
        assert a["step"] == b["step"], name
    # Rank 0 alone wrote: the same files as one process, one TensorBoard stream, no temp files.
    assert _listing(run) == _listing(reference)
    assert len(list((run / "tensorboard").iterdir())) == 1
    metrics_ref = (reference / "metrics.jsonl").read_text().splitlines()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == len(metrics_ref)
    # Other ranks are quiet: each one-line message appears once.
    assert proc.stdout.count("finished 6 steps") == 1
    assert proc.stdout.count("validation loss") == 2


def test_resume_one_process_checkpoint_on_two(reference, data_dir, tmp_path):
    run = tmp_path / "one_then_two"
    _train_here(run, data_dir, stop_after_steps=4)
    assert _last(run)["step"] == 4
    _ok(_torchrun(run, data_dir, cli=("--resume", "auto")))
    _assert_same_state(_last(reference), _last(run))


def test_resume_two_process_checkpoint_on_one(reference, ddp, data_dir, tmp_path):
    ddp_ckpt = ddp[0] / "checkpoints" / "step_0000003.pt"
    assert load_checkpoint(ddp_ckpt)["step"] == 3
    run = _train_here(tmp_path / "two_then_one", data_dir, resume=str(ddp_ckpt))
    _assert_same_state(_last(reference), _last(run))


def test_resume_with_other_global_batch_is_refused(reference, data_dir, tmp_path):
    ckpt = reference / "checkpoints" / "step_0000003.pt"
    with pytest.raises(TrainingError, match=r"batch_size=16.*batch_size=32.*global batch"):
        _train_here(tmp_path / "b32", data_dir, "train.batch_size=32", resume=str(ckpt))


# --------------------------------------------------------------------------- failures, signals

# A worker entry point that injects a fault into one rank's N-th training forward.
FAULT_SCRIPT = textwrap.dedent(
    """
    import os, signal, sys, time
    import torch
    import mnistdiff.train as train_mod
    from mnistdiff.cli import main

    action, rank, at = os.environ["FAULT"].split(":")
    real, calls = train_mod.diffusion_loss, [0]

    def patched(*args, **kwargs):
        out = real(*args, **kwargs)
        if torch.is_grad_enabled() and os.environ["RANK"] == rank:
            calls[0] += 1
            if calls[0] == int(at):
                if action == "raise":
                    raise RuntimeError(f"injected failure on rank {rank}")
                if action == "hang":
                    time.sleep(3600)
                target = os.getppid() if action == "term_launcher" else os.getpid()
                os.kill(target, signal.SIGTERM)
        return out

    train_mod.diffusion_loss = patched
    sys.exit(main(sys.argv[1:]))
    """
)


def _fault_run(tmp_path, data_dir, fault: str, env=None, timeout=90):
    script = tmp_path / "fault.py"
    script.write_text(FAULT_SCRIPT)
    run = tmp_path / "run"
    proc = _torchrun(
        run,
        data_dir,
        "train.steps=40",
        "train.val_every=0",
        "train.checkpoint_every=0",
        "train.tensorboard=false",
        entry=(str(script),),
        env={"FAULT": fault, **(env or {})},
        timeout=timeout,
    )
    return run, proc


def test_failing_rank_ends_the_job(data_dir, tmp_path):
    run, proc = _fault_run(tmp_path, data_dir, "raise:1:3")
    assert proc.returncode != 0
    assert "injected failure on rank 1" in proc.stderr
    assert not (run / "checkpoints").exists()  # it failed before any checkpoint was due


@pytest.mark.parametrize("fault", ["term_self:1:3", "term_launcher:1:3"])
def test_sigterm_writes_one_checkpoint(data_dir, tmp_path, fault):
    """SIGTERM to one worker only, or to torchrun (which forwards it to every worker): all ranks
    stop after the same step and rank 0 writes exactly one checkpoint."""
    run, proc = _fault_run(tmp_path, data_dir, fault)
    assert proc.returncode != 0  # an interrupted job is not a success
    assert proc.stderr.count("mnistdiff: SIGTERM: checkpoint written") == 1, proc.stderr[-3000:]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]
    step = _last(run)["step"]
    if fault.startswith("term_self"):
        assert step == 3  # the signalled step finished on both ranks, then both stopped
    assert 3 <= step < 40
    assert f"at step {step}/40" in proc.stderr


@pytest.mark.slow
def test_hung_rank_times_out(data_dir, tmp_path):
    """A rank that stops answering makes the others fail after the process-group timeout;
    torchrun then ends the job (SIGTERM, then SIGKILL after its 30 s grace)."""
    run, proc = _fault_run(
        tmp_path, data_dir, "hang:1:3", env={"MNISTDIFF_DIST_TIMEOUT_MIN": "0.1"}, timeout=120
    )
    assert proc.returncode != 0
    assert "Timed out" in proc.stderr
