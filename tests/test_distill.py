"""Distillation: guidance embedding, the losses' maths, end-to-end runs and exact resume."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from mnistdiff.build import build_denoiser
from mnistdiff.config import ConfigError, load_config
from mnistdiff.data import DataSpec
from mnistdiff.distill import distill_checkpoint, student_config
from mnistdiff.distill.batch import Batch
from mnistdiff.distill.guidance import guidance_distillation_loss
from mnistdiff.distill.methods import guidance_plan
from mnistdiff.distill.progressive import two_step_target
from mnistdiff.distill.reflow import generate_pairs, reflow_loss
from mnistdiff.distill.student import load_teacher_weights
from mnistdiff.distill.teacher import GuidancePlan, guided_x0
from mnistdiff.guidance import classifier_free, thresholded
from mnistdiff.samplers import ddim, get_sampler, initial_sample
from mnistdiff.schedules import time_grid

ROOT = Path(__file__).resolve().parents[1]
SPEC = DataSpec(channels=1, size=28, num_classes=10)
FLOW = ("diffusion.schedule=flow", "diffusion.prediction=velocity")


def tiny(*overrides: str, seed: int = 0):
    """A smoke-config Denoiser with every weight perturbed (so c != u and outputs are not 0)."""
    cfg = load_config(ROOT / "configs" / "smoke.yaml", list(overrides))
    torch.manual_seed(seed)
    model = build_denoiser(cfg, SPEC)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return cfg, model.eval()


def student_of(teacher, *overrides: str):
    cfg = load_config(ROOT / "configs" / "smoke.yaml", [*overrides, "model.guidance_embed=true"])
    torch.manual_seed(1)
    student = build_denoiser(cfg, SPEC)
    load_teacher_weights(student.backbone, teacher.backbone.state_dict())
    return student


def images(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand((n, 1, 28, 28), generator=g) * 2 - 1


# --------------------------------------------------------------------------- guidance input


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_guidance_embedding_starts_as_the_teacher_for_every_scale(backbone):
    _, teacher = tiny(f"model.type={backbone}")
    student = student_of(teacher, f"model.type={backbone}").eval()
    assert student.accepts_guidance and not teacher.accepts_guidance
    x, t, y = images(4), torch.rand(4), torch.tensor([0, 3, 7, 10])
    with torch.no_grad():
        ref = teacher(x, t, y)
        for w in (0.0, 1.0, 4.5):
            assert torch.equal(student(x, t, y, torch.full((4,), w)), ref)


def test_a_model_without_guidance_input_refuses_one():
    _, teacher = tiny()
    with pytest.raises(ValueError, match="no guidance-scale input"):
        teacher(images(2), torch.rand(2), torch.tensor([1, 2]), torch.ones(2))


def test_teacher_weights_must_fit_the_student():
    _, teacher = tiny()
    _, other = tiny("model.unet.channels=8")
    with pytest.raises(ValueError, match="architectures differ"):
        load_teacher_weights(other.backbone, teacher.backbone.state_dict())


def test_guided_teacher_equals_classifier_free_guidance():
    _, teacher = tiny()
    x, t, y = images(6), torch.rand(6), torch.tensor([0, 1, 2, 3, 4, 10])
    with torch.no_grad():
        ref = classifier_free(teacher, y, 2.5, teacher.null_label)(x, t)
        got = guided_x0(teacher, x, t, y, torch.full((6,), 2.5), clip=False)
        torch.testing.assert_close(got, ref)
        # per-example scales: row i guided at w_i
        w = torch.tensor([0.0, 1.0, 2.0, 3.0, 1.5, 2.0])
        rows = [classifier_free(teacher, y[i : i + 1], float(w[i]), 10)(x[i : i + 1], t[i : i + 1])
                for i in range(6)]  # fmt: skip
        got = guided_x0(teacher, x, t, y, w, clip=False)  # batch shapes differ: fp rounding
        torch.testing.assert_close(got, torch.cat(rows), atol=1e-3, rtol=1e-3)


# --------------------------------------------------------------------------- maths of the losses


@pytest.mark.parametrize("overrides", [(), FLOW], ids=["cosine-eps", "flow-velocity"])
@pytest.mark.parametrize("i", [1, 3])
@pytest.mark.parametrize("interval", [None, (0.0, 0.7)], ids=["every-t", "interval"])
def test_progressive_target_lands_where_two_teacher_ddim_steps_land(overrides, i, interval):
    """One DDIM step with the target x0 == two DDIM steps of the teacher (the sampler's own,
    guidance interval included: at i = 3 the first teacher step is outside it, the second in)."""
    _, teacher = tiny(*overrides)
    n_steps, y, w = 4, torch.tensor([2, 5, 10]), 1.8
    t0 = i / n_steps
    x_t = torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        target = two_step_target(
            teacher,
            x_t,
            torch.full((3,), t0, dtype=torch.float64),
            n_steps,
            y,
            torch.full((3,), w),
            interval=interval,
        )
        guided = classifier_free(teacher, y, w, teacher.null_label, interval=interval)
        teacher_fn = thresholded(guided, "clip")
        fine = torch.tensor([t0, t0 - 0.5 / n_steps, t0 - 1 / n_steps], dtype=torch.float64)
        coarse = torch.tensor([t0, t0 - 1 / n_steps], dtype=torch.float64)
        states = {}

        def keep(name, step):
            return lambda k, x, x0: states.setdefault(name, x) if k == step else None

        def grid(ts):
            return ts if ts[-1] == 0 else torch.cat([ts, torch.zeros(1, dtype=torch.float64)])

        ddim(teacher_fn, x_t, teacher.schedule, grid(fine), callback=keep("teacher", 1))
        ddim(lambda x, t: target, x_t, teacher.schedule, grid(coarse), callback=keep("student", 0))
    torch.testing.assert_close(states["student"], states["teacher"], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("interval", [None, (0.0, 0.5)], ids=["every-t", "interval"])
def test_reflow_pairs_are_the_guided_teacher_ode_samples(interval):
    _, teacher = tiny(*FLOW)
    y, w = torch.tensor([1, 4, 9]), 1.6
    plan = GuidancePlan(w, w, student_input=False, interval=interval)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        pairs = generate_pairs(teacher, y, gen, plan=plan, label_dropout=0.0, steps=3)
        ts = time_grid(teacher.schedule, "uniform", 3)
        guided = classifier_free(teacher, y, w, teacher.null_label, interval=interval)
        fn = thresholded(guided, "clip")
        x = initial_sample(teacher.schedule, ts, pairs.noise)
        ref = get_sampler("dpmpp_2m").fn(fn, x, teacher.schedule, ts).x
    torch.testing.assert_close(pairs.x0, ref)
    assert torch.equal(pairs.labels, y) and pairs.guidance is None
    again = generate_pairs(teacher, y, torch.Generator().manual_seed(3), plan=plan,
                           label_dropout=0.0, steps=3)  # fmt: skip
    assert torch.equal(again.x0, pairs.x0)


def test_reflow_loss_is_zero_for_the_straight_line_velocity():
    """A student predicting ``z - x1`` exactly (the pair's straight line) has zero loss."""
    _, student = tiny(*FLOW)
    x1, z = images(4, seed=1), torch.randn(4, 1, 28, 28)

    class Straight(torch.nn.Module):
        def forward(self, x, t, labels=None, guidance=None):
            return z - x1

    student.backbone = Straight()
    loss = reflow_loss(student, student, Batch(x1, None, z), torch.Generator().manual_seed(0))
    assert loss.shape == (4,) and float(loss.max()) < 1e-10
    with pytest.raises(ValueError, match="pairs"):
        reflow_loss(student, student, Batch(x1, None), torch.Generator())


def test_reflow_refuses_a_variance_preserving_teacher():
    _, teacher = tiny()
    with pytest.raises(ValueError, match="rectified-flow"):
        generate_pairs(
            teacher, torch.tensor([1]), torch.Generator(), plan=GuidancePlan(1, 1, False)
        )


def test_losses_draw_randomness_only_from_the_generator():
    _, teacher = tiny()
    student = student_of(teacher)
    batch = Batch(images(4), torch.tensor([1, 2, 3, 4]))
    plan = GuidancePlan(1.0, 3.0, student_input=True)

    def run(seed):
        torch.manual_seed(seed)  # the global RNG must not matter
        with torch.no_grad():
            gen = torch.Generator().manual_seed(7)
            return guidance_distillation_loss(student, teacher, batch, gen, plan=plan)

    assert torch.equal(run(0), run(1))


def test_guidance_distilled_student_learns_the_teachers_guided_output():
    """A loss that falls, and on fresh draws the student matches the guided teacher better
    than at its start (where it gives the plain conditional answer for every w)."""
    _, teacher = tiny()
    student = student_of(teacher)
    student.train()
    data, labels = images(64, seed=2), torch.arange(64) % 10
    plan = GuidancePlan(2.0, 4.0, student_input=True)
    opt = torch.optim.Adam(student.backbone.parameters(), lr=2e-3)

    def held_out_error() -> float:
        gen = torch.Generator().manual_seed(12345)
        with torch.no_grad():
            batch = Batch(images(32, seed=9), torch.arange(32) % 10)
            return float(guidance_distillation_loss(student, teacher, batch, gen, plan=plan,
                                                    label_dropout=0.0).mean())  # fmt: skip

    before = held_out_error()
    losses = []
    for step in range(60):
        idx = torch.randperm(64, generator=torch.Generator().manual_seed(step))[:16]
        gen = torch.Generator().manual_seed(1000 + step)
        loss = guidance_distillation_loss(student, teacher, Batch(data[idx], labels[idx]), gen,
                                          plan=plan).mean()  # fmt: skip
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    after = held_out_error()
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10]), losses
    assert after < 0.8 * before, (before, after)


# --------------------------------------------------------------------------- config


def test_student_config_records_how_to_sample_it():
    teacher = load_config(ROOT / "configs" / "quick.yaml")
    g = student_config(teacher, "guidance", teacher_path="t")
    assert g.model.guidance_embed and g.sample.sampler == teacher.sample.sampler
    assert g.sample.guidance == teacher.sample.guidance and g.distill.method == "guidance"
    p = student_config(teacher, "progressive", teacher_path="t", steps=2)
    assert (p.sample.sampler, p.sample.steps, p.sample.grid, p.sample.guidance) == (
        "ddim",
        2,
        "uniform",
        1.0,
    )
    assert not p.model.guidance_embed and p.distill.guidance == teacher.sample.guidance
    # a student of a guidance-distilled teacher keeps the scale input and its scale
    r = student_config(g, "reflow", teacher_path="g", steps=1)
    assert r.model.guidance_embed and r.sample.guidance == teacher.sample.guidance
    with pytest.raises(ConfigError, match="method"):
        student_config(teacher, "magic", teacher_path="t")
    with pytest.raises(ConfigError, match="already guidance-distilled"):
        student_config(g, "guidance", teacher_path="g")
    # a student of a baked-in student asks its teacher at w = 1 (one pass)
    pp = student_config(p, "progressive", teacher_path="p", steps=1)
    assert pp.distill.guidance == 1.0 and pp.sample.guidance == 1.0


def test_student_config_keeps_the_teachers_guidance_interval():
    quick = load_config(ROOT / "configs" / "quick.yaml")
    teacher = quick.replace(sample=dataclasses.replace(quick.sample, guidance_interval=(0.0, 0.7)))
    p = student_config(teacher, "progressive", teacher_path="t", steps=4)
    # baked in: the first round's teacher is guided only in the interval, the student is not
    assert p.distill.guidance_interval == (0.0, 0.7) and p.sample.guidance_interval is None
    assert guidance_plan(p).interval == (0.0, 0.7)
    g = student_config(teacher, "guidance", teacher_path="t")
    assert g.sample.guidance_interval == (0.0, 0.7)  # the w input is given only there
    assert guidance_plan(g).interval is None  # learns every w at every t
    gp = student_config(g, "progressive", teacher_path="g", steps=4)
    assert gp.sample.guidance_interval == (0.0, 0.7) and guidance_plan(gp).interval is None


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def flow_teacher(tmp_path_factory, synthetic_data):
    """A smoke-sized rectified-flow teacher trained for a few steps on the synthetic digits."""
    from mnistdiff.train import train

    run = tmp_path_factory.mktemp("teacher") / "run"
    cfg = load_config(
        ROOT / "configs" / "smoke.yaml",
        [
            f"train.run_dir={run}",
            "data.dataset=synthetic",
            f"data.data_dir={synthetic_data}",
            "train.steps=4",
            *FLOW,
        ],
    )
    train(cfg, log=lambda *a, **k: None)
    return run


TINY_DISTILL = [
    "train.log_every=2",
    "train.checkpoint_every=3",
    "train.val_every=3",
    "train.preview_per_class=1",
    "distill.pair_steps=2",
    "sample.batch_size=16",
]


def _run(teacher, method, run_dir, *, stop=None, resume=None, log=None):
    return distill_checkpoint(
        str(teacher),
        method,
        run_dir=str(run_dir),
        steps=2,
        train_steps=6,
        overrides=TINY_DISTILL,
        resume=resume,
        stop_after_steps=stop,
        log=log or (lambda *a, **k: None),
    )


def _same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


@pytest.mark.parametrize("method", ["guidance", "progressive", "reflow"])
def test_distill_resumes_bit_for_bit(flow_teacher, tmp_path, method):
    """Distill 6 steps, or 4, stop, then the printed resume command: the same bits."""
    from mnistdiff.checkpoint import load_checkpoint
    from mnistdiff.cli import main

    _run(flow_teacher, method, tmp_path / "straight")
    messages = []
    _run(flow_teacher, method, tmp_path / "split", stop=4, log=messages.append)
    hint = messages[-1].split("resume with: ")[1]  # the command the user is told to run
    assert hint == f"mnistdiff distill --run-dir {tmp_path / 'split'} --resume auto"
    assert main(hint.split()[1:]) == 0
    a = load_checkpoint(tmp_path / "straight" / "checkpoints" / "last.pt")
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "last.pt")
    assert a["step"] == b["step"] == 6
    for key in ("model", "ema", "optimizer", "data_state"):
        assert _same(a[key], b[key]), key
    assert a["task"]["name"] == "distill"
    assert _same(a["task"]["state"]["teacher"], b["task"]["state"]["teacher"])
    assert [r.get("loss") for r in a["history"]] == [r.get("loss") for r in b["history"]]
    assert [r.get("val_loss") for r in a["history"]] == [r.get("val_loss") for r in b["history"]]
    assert (tmp_path / "straight" / "samples" / "samples_final.png").is_file()


def test_distilled_checkpoints_sample_as_recorded(flow_teacher, tmp_path):
    from mnistdiff.cli import main
    from mnistdiff.sample import Pipeline

    _run(flow_teacher, "guidance", tmp_path / "g")
    _run(flow_teacher, "progressive", tmp_path / "p")
    teacher = Pipeline.load(flow_teacher)
    g, p = Pipeline.load(tmp_path / "g"), Pipeline.load(tmp_path / "p")
    opts = p.default_options()
    assert (opts.sampler, opts.steps, opts.grid, opts.guidance) == ("ddim", 2, "uniform", 1.0)
    assert (
        g.denoiser.accepts_guidance and g.default_options().guidance == teacher.cfg.sample.guidance
    )
    labels = [3, 8]
    out_t, out_g = teacher.generate(labels), g.generate(labels)
    assert out_t.passes_per_image == 2 * out_t.nfe  # classifier-free guidance: two passes
    assert out_g.passes_per_image == out_g.nfe  # guidance-distilled: one
    assert p.generate(labels).passes_per_image == 2
    png = tmp_path / "p.png"
    assert main(["sample", "--checkpoint", str(tmp_path / "p"), "--out", str(png),
                 "--per-class", "1"]) == 0  # fmt: skip
    assert png.is_file()


def test_distill_cli_needs_a_teacher_and_method(tmp_path, capsys):
    from mnistdiff.cli import main

    assert main(["distill", "--run-dir", str(tmp_path / "x")]) == 1
    assert "--checkpoint" in capsys.readouterr().err
