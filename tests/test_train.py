import errno
import json
import math
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mnistdiff.train as train_mod
from mnistdiff.checkpoint import load_checkpoint
from mnistdiff.rundir import lock_run_dir
from mnistdiff.train import (
    TrainingError,
    TrainingInterrupted,
    build_optimizer,
    load_optimizer_state,
    lr_at,
    train,
)


def _quiet(*args, **kwargs):
    pass


def _tensors_equal(a, b):
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_tensors_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_run_directory_contents(smoke_cfg):
    run = train(smoke_cfg(), log=_quiet)
    assert (run / "config.yaml").is_file() and (run / "loss_curves.png").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == [2, 4, 6]
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    assert all(math.isfinite(r.get("loss", 0)) for r in records)
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["best.pt", "last.pt", "step_0000003.pt", "step_0000006.pt"]
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    for key in (
        "model",
        "ema",
        "optimizer",
        "lr_schedule",
        "step",
        "epoch",
        "data_state",
        "history",
        "config",
        "data_spec",
        "format_version",
    ):
        assert key in state
    assert state["step"] == 6 and state["data_state"]["position"] == 6


def test_exact_resume_bit_for_bit(smoke_cfg):
    overrides = ("model.unet.dropout=0.2", "diffusion.label_dropout=0.3")
    full = train(smoke_cfg(*overrides, name="full"), log=_quiet)
    part_cfg = smoke_cfg(*overrides, name="part")
    train(part_cfg, stop_after_steps=4, log=_quiet)
    assert load_checkpoint(part_cfg.train.run_dir + "/checkpoints/last.pt")["step"] == 4
    train(part_cfg, resume="auto", log=_quiet)
    a = load_checkpoint(full / "checkpoints" / "last.pt")
    b = load_checkpoint(part_cfg.train.run_dir + "/checkpoints/last.pt")
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema", "optimizer", "data_state"):
        assert _tensors_equal(a[key], b[key]), key
    losses_a = [r["loss"] for r in a["history"] if "loss" in r]
    losses_b = [r["loss"] for r in b["history"] if "loss" in r]
    assert losses_a == losses_b


def test_resume_refuses_model_change_and_reports_train_change(smoke_cfg):
    cfg = smoke_cfg()
    train(cfg, stop_after_steps=2, log=_quiet)
    with pytest.raises(TrainingError, match=r"model.unet.channels: 16 -> 32"):
        train(smoke_cfg("model.unet.channels=32"), resume="auto", log=_quiet)
    messages = []
    train(smoke_cfg("train.lr=0.0005"), resume="auto", log=messages.append)
    assert any("train.lr changed" in m for m in messages)


def test_fresh_run_refuses_existing_checkpoints(smoke_cfg):
    train(smoke_cfg(), stop_after_steps=1, log=_quiet)
    with pytest.raises(TrainingError, match="--resume auto"):
        train(smoke_cfg(), log=_quiet)


def _loss_hook(monkeypatch, at_call, action):
    calls = {"n": 0}
    real = train_mod.diffusion_loss

    def patched(*args, **kwargs):
        out = real(*args, **kwargs)
        if not torch.is_grad_enabled():  # validation
            return out
        calls["n"] += 1
        if calls["n"] == at_call:
            return action(out)
        return out

    monkeypatch.setattr(train_mod, "diffusion_loss", patched)


def test_sigterm_writes_checkpoint(smoke_cfg, monkeypatch):
    import os

    def send(out):
        os.kill(os.getpid(), signal.SIGTERM)
        return out

    _loss_hook(monkeypatch, 2, send)  # during step index 1
    cfg = smoke_cfg("train.checkpoint_every=0")
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg, log=_quiet)
    assert info.value.exit_code == 128 + signal.SIGTERM
    assert "--resume auto" in str(info.value)
    state = load_checkpoint(cfg.train.run_dir + "/checkpoints/last.pt")
    assert state["step"] == 2  # the running step finished, then stopped
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_nonfinite_loss_stops_and_keeps_last_good(smoke_cfg, monkeypatch):
    _loss_hook(monkeypatch, 5, lambda out: out * float("nan"))  # step index 4
    cfg = smoke_cfg()
    with pytest.raises(TrainingError, match="non-finite loss.*step 4"):
        train(cfg, log=_quiet)
    assert load_checkpoint(cfg.train.run_dir + "/checkpoints/last.pt")["step"] == 3


def test_nonfinite_loss_skip(smoke_cfg, monkeypatch):
    _loss_hook(monkeypatch, 2, lambda out: out * float("inf"))
    cfg = smoke_cfg("train.nonfinite=skip")
    train(cfg, log=_quiet)
    state = load_checkpoint(cfg.train.run_dir + "/checkpoints/last.pt")
    assert state["skipped_steps"] == 1 and state["step"] == 6
    assert all(torch.isfinite(v).all() for v in state["model"].values())


COMBOS = [(s, p) for s in ("linear", "cosine", "sigmoid") for p in ("eps", "x0", "v")] + [
    ("flow", p) for p in ("velocity", "eps", "x0", "v")
]


@pytest.mark.parametrize("schedule,prediction", COMBOS)
def test_every_objective_and_schedule_trains(smoke_cfg, schedule, prediction):
    cfg = smoke_cfg(
        f"diffusion.schedule={schedule}",
        f"diffusion.prediction={prediction}",
        "diffusion.min_snr_gamma=5",
        "train.steps=3",
        "train.checkpoint_every=3",
        "train.val_every=3",
        "train.log_every=1",
    )
    run = train(cfg, log=_quiet)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    losses = [r["loss"] for r in state["history"] if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_lr_schedule():
    from mnistdiff.config import TrainConfig

    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, 110, cfg) == pytest.approx(0.1)
    assert lr_at(9, 110, cfg) == pytest.approx(1.0)
    assert lr_at(10, 110, cfg) == pytest.approx(1.0)
    assert lr_at(60, 110, cfg) == pytest.approx(0.55)
    assert lr_at(110, 110, cfg) == pytest.approx(0.1)


def test_fused_optimizer_matches_unfused_and_shares_state():
    from mnistdiff.config import TrainConfig

    cfg = TrainConfig(lr=1e-2, weight_decay=0.1, adam_beta2=0.99)
    torch.manual_seed(0)
    models = [torch.nn.Linear(8, 4) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    fused = build_optimizer(models[0], cfg, torch.device("cpu"))
    plain = torch.optim.AdamW(models[1].parameters(), lr=1e-2, weight_decay=0.1, betas=(0.9, 0.99))
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    for _ in range(5):
        grads = [torch.randn_like(p) for p in models[0].parameters()]
        for model, opt in zip(models, (fused, plain), strict=True):
            for p, g in zip(model.parameters(), grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for a, b in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        assert not torch.equal(a, torch.zeros_like(a))
    # checkpoints move between the two, and each keeps its own kernel choice
    load_optimizer_state(plain, fused.state_dict())
    assert not plain.param_groups[0]["fused"]
    torch.testing.assert_close(plain.state_dict()["state"], fused.state_dict()["state"])
    load_optimizer_state(fused, plain.state_dict())
    assert fused.param_groups[0]["fused"]


def test_time_budget_fits_schedule_and_stops(smoke_cfg):
    cfg = smoke_cfg(
        "train.steps=100000",
        "train.time_budget_minutes=0.2",
        "train.checkpoint_every=0",
        "train.val_every=0",
        "train.log_every=10",
    )
    messages = []
    run = train(cfg, log=messages.append)
    state = load_checkpoint(run / "checkpoints" / "last.pt")
    total = state["lr_schedule"]["total_steps"]
    assert state["step"] <= total < 100000
    # 12 s budget: the fitted step count fills most of it, the hard stop bounds it
    assert 6.0 <= state["train_seconds"] < 12.0 + 5.0
    if state["step"] > 20:  # calibration finished: the fitted length was announced
        assert any("time budget:" in m for m in messages)


def test_time_budget_up_stops_immediately():
    from mnistdiff.train import Progress, TimeBudget

    budget = TimeBudget(1e-9, cap=50)
    progress = Progress(step=3)
    budget.start(progress)
    assert budget.update(progress, 50) == 3
    fixed = TimeBudget(None, cap=50)
    fixed.start(progress)
    assert fixed.update(progress, 50) == 50
    assert TimeBudget(1.0, cap=50).resume({"lr_schedule": {"total_steps": 30}}, 50) == 30


def test_in_training_evaluation_and_best_by_fd(smoke_cfg):
    cfg = smoke_cfg(
        "train.steps=null",
        "train.epochs=2",
        "data.val_size=400",
        "train.batch_size=50",
        "train.eval_every_epochs=1",
        "train.eval_num_samples=20",
        "train.best_by=fd_mnist",
        "train.checkpoint_every=0",
        "train.val_every=0",
        "train.preview_every_epochs=1",
    )
    run = train(cfg, log=_quiet)
    from PIL import Image

    for epoch in (1, 2):  # one row per class, preview_per_class (2) images each
        grid = Image.open(run / "samples" / f"samples_epoch_{epoch:03d}.png")
        assert grid.size[1] > 2 * 10 * 28
    state = load_checkpoint(run / "checkpoints" / "best.pt")
    evals = [r for r in state["history"] if "fd_mnist" in r]
    assert [r["epoch"] for r in evals] == [1, 2][: len(evals)] and evals
    assert all(r["eval_num_samples"] == 20 and 0 <= r["class_accuracy"] <= 1 for r in evals)
    assert state["best_value"] == min(r["fd_mnist"] for r in evals)


def test_time_budget_refits_every_step(monkeypatch):
    """Fake clock: 5 slow start-up steps (10 s), 1 s/step, then from step 80 on 2 s/step
    (the machine got busy); 200 s budget, warmup 50."""
    import mnistdiff.train as tr

    clock = [0.0]
    monkeypatch.setattr(tr.time, "perf_counter", lambda: clock[0])
    budget = tr.TimeBudget(200 / 60, cap=10_000, warmup_steps=50)
    progress = tr.Progress()
    budget.start(progress)
    total, fitted = 10_000, []
    for step in range(1, 1000):
        clock[0] += 10.0 if step <= 5 else (1.0 if step < 80 else 2.0)
        progress.step = step
        total = budget.update(progress, total)
        fitted.append((step, total, budget.fitted_now))
        if total == step:
            break
    # start-up steps do not count: 1 s/step from step 5 on, so 200 - 50 - (s - 5) s are left
    assert fitted[19][:2] == (20, 20 + 200 - 50 - 15)  # first estimate at CALIBRATION steps
    assert all(t == 155 for s, t, _ in fitted if 20 <= s < 80)  # the exact rate: 155 in total
    assert [s for s, _, now in fitted if now] == [50]  # announced once, at warmup end
    # the slowdown shrinks the estimate step by step, towards the true end (step 117)
    last = fitted[-1][0]
    assert last == 5 + 74 + 38 == 117 and clock[0] >= 200
    later = [t for s, t, _ in fitted if 80 <= s < last]
    assert later == sorted(later, reverse=True) and later[0] < 155
    assert later[-1] - last <= 0.1 * last


# --------------------------------------------------------------------------- reliability


def test_nonfinite_loss_error_still_closes_the_logger(smoke_cfg, monkeypatch):
    closed = []
    real_close = train_mod.RunLogger.close

    def close(self):
        closed.append(self)
        real_close(self)

    monkeypatch.setattr(train_mod.RunLogger, "close", close)
    _loss_hook(monkeypatch, 2, lambda out: out * float("nan"))
    with pytest.raises(TrainingError, match="non-finite loss"):
        train(smoke_cfg(), log=_quiet)
    assert len(closed) == 1


def test_periodic_checkpoint_records_its_own_validation(smoke_cfg):
    run = train(smoke_cfg(), log=_quiet)  # validation and checkpoints at steps 3 and 6
    step3 = load_checkpoint(run / "checkpoints" / "step_0000003.pt")
    step6 = load_checkpoint(run / "checkpoints" / "step_0000006.pt")
    val = {r["step"]: r["val_loss"] for r in step6["history"] if "val_loss" in r}
    assert step3["best_value"] == val[3]  # was inf: the value from before step 3's validation
    assert step6["best_value"] == min(val[3], val[6])
    best = load_checkpoint(run / "checkpoints" / "best.pt")
    assert best["best_value"] == min(val.values())


def test_resume_removes_stale_temp_files(smoke_cfg):
    cfg = smoke_cfg()
    train(cfg, stop_after_steps=2, log=_quiet)
    run = Path(cfg.train.run_dir)
    stale = [
        run / "checkpoints" / ".step_0000003.pt.k2j4h1.tmp",
        run / "checkpoints" / ".last.pt.a8b7c6.tmp",
        run / ".metrics.jsonl.zz91.tmp",
    ]
    kept = [run / "checkpoints" / "notes.tmp", run / ".eval.json.x1.tmp"]  # not train's
    for path in stale + kept:
        path.write_bytes(b"partial")
    messages = []
    train(cfg, resume="auto", log=messages.append)
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in kept)
    assert any("removed 3 temporary file(s)" in m for m in messages)


_HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.ftruncate(fd, 0)
os.write(fd, str(os.getpid()).encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_second_writer_is_refused_until_the_holder_dies(smoke_cfg, tmp_path):
    cfg = smoke_cfg()
    run = Path(cfg.train.run_dir)
    run.mkdir(parents=True)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(run / ".train.lock")],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(TrainingError) as info:
            train(cfg, log=_quiet)
        assert f"run directory {run} is in use" in str(info.value)
        assert f"PID {holder.pid}" in str(info.value)
        assert not (run / "checkpoints").exists() and not (run / "config.yaml").exists()
    finally:
        holder.kill()  # as a crash would: the kernel drops its lock
        holder.wait()
    train(cfg, log=_quiet)
    with lock_run_dir(run):  # released on exit
        pass


def test_disk_full_names_the_intact_checkpoint(smoke_cfg, monkeypatch):
    import mnistdiff.checkpoint as ckpt

    real = ckpt.atomic_write_bytes

    def full_at_step_6(target, data):
        if target.name != "step_0000006.pt":
            return real(target, data)
        with ckpt.atomic_path(target) as tmp:
            tmp.write_bytes(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ckpt, "atomic_write_bytes", full_at_step_6)
    cfg = smoke_cfg()
    ckpt_dir = Path(cfg.train.run_dir) / "checkpoints"
    with pytest.raises(TrainingError) as info:
        train(cfg, log=_quiet)
    assert str(info.value).startswith(
        f"disk full while writing {ckpt_dir / 'step_0000006.pt'}; "
        f"last good checkpoint {ckpt_dir / 'last.pt'} is intact"
    )
    assert load_checkpoint(ckpt_dir / "last.pt")["step"] == 3
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["best.pt", "last.pt", "step_0000003.pt"]


class _HalfLoss(train_mod.DiffusionTask):
    """A task with another loss: half the diffusion loss, plus a counter kept in checkpoints."""

    name = "half"

    def __init__(self):
        super().__init__()
        self.calls = 0

    def loss(self, model, batch):
        self.calls += 1
        return 0.5 * super().loss(model, batch)

    def state_dict(self):
        return {"calls": self.calls}

    def load_state_dict(self, state):
        self.calls = state["calls"]


def test_another_task_reuses_the_loop(smoke_cfg):
    plain = train(smoke_cfg("train.log_every=1", name="plain"), log=_quiet)
    task = _HalfLoss()
    run = train(smoke_cfg("train.log_every=1", name="half"), task=task, log=_quiet)
    a = load_checkpoint(plain / "checkpoints" / "last.pt")
    b = load_checkpoint(run / "checkpoints" / "last.pt")
    assert b["task"] == {"name": "half", "state": {"calls": task.calls}} and task.calls >= 6
    assert a["task"]["name"] == "diffusion"
    first_a = next(r["loss"] for r in a["history"] if "loss" in r)
    first_b = next(r["loss"] for r in b["history"] if "loss" in r)
    assert first_b == pytest.approx(0.5 * first_a, rel=1e-6)  # same weights, data, noise
    with pytest.raises(TrainingError, match="trained by task 'half'"):
        train(smoke_cfg("train.log_every=1", "train.steps=8", name="half"), resume="auto")
