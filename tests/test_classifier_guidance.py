"""Classifier guidance: the wrapper's maths, the noisy classifier, its files, sampling and CLI."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT, digits_source
from mnistdiff.guidance import classifier_guided, classifier_log_prob_grad
from mnistdiff.noisy_classifier import (
    ClassifierError,
    NoisyClassifier,
    check_compatible,
    load_classifier,
    save_classifier,
    train_classifier,
)
from mnistdiff.schedules import SCHEDULE_NAMES, build_schedule

F64 = torch.float64
SHAPE = (1, 2, 2)
MUS = torch.tensor([[-0.5, 0.2, 0.4, -0.1], [0.6, -0.3, 0.0, 0.5]], dtype=F64).view(2, *SHAPE)
S = 0.3  # per-class std of the two-class Gaussian toy data


def _coeffs(schedule, t):
    a, s = schedule.alpha_sigma(t.to(F64))
    return a.view(-1, 1, 1, 1), s.view(-1, 1, 1, 1)


def toy_posterior(schedule, x, t):
    """log p(y | x_t) [B, 2] for x0 | y ~ N(MUS[y], S^2 I), equal priors: exact classifier."""
    a, s = _coeffs(schedule, t)
    var = a**2 * S**2 + s**2  # x_t | y ~ N(a MUS[y], var I)
    d2 = torch.stack([((x - a * m) ** 2).flatten(1).sum(1) for m in MUS], dim=1)  # [B, 2]
    return torch.log_softmax(-0.5 * d2 / var.flatten()[:, None], dim=1)


def toy_conditional_mean(schedule, x, t, y):
    """E[x0 | x_t, y] (Tweedie for one Gaussian class)."""
    a, s = _coeffs(schedule, t)
    m = MUS[y]
    return m + a * S**2 / (a**2 * S**2 + s**2) * (x - a * m)


def toy_denoiser(schedule, x, t):
    """The unconditional E[x0 | x_t] = sum_y p(y | x_t) E[x0 | x_t, y]."""
    p = toy_posterior(schedule, x, t).exp()
    means = [toy_conditional_mean(schedule, x, t, torch.full((len(x),), k)) for k in range(2)]
    return sum(p[:, k].view(-1, 1, 1, 1) * means[k] for k in range(2))


@pytest.mark.parametrize("schedule_name", SCHEDULE_NAMES)
def test_scale_one_with_the_exact_classifier_gives_the_conditional_denoiser(schedule_name):
    """x0_hat + (sigma^2/alpha) grad log p(y|x_t) is exactly E[x0 | x_t, y] (Bayes + Tweedie)."""
    schedule = build_schedule(schedule_name, 1000)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, *SHAPE, generator=gen, dtype=F64)
    t = torch.rand(64, generator=gen, dtype=F64) * 0.98 + 0.01
    y = torch.randint(0, 2, (64,), generator=gen)
    base = lambda x, t: toy_denoiser(schedule, x, t)  # noqa: E731
    clf = lambda x, t: toy_posterior(schedule, x, t)  # noqa: E731
    guided = classifier_guided(base, clf, y, 1.0, schedule)(x, t)
    assert torch.allclose(guided, toy_conditional_mean(schedule, x, t, y), atol=1e-9)
    # scale s multiplies the shift
    shift = guided - base(x, t)
    twice = classifier_guided(base, clf, y, 2.0, schedule)(x, t) - base(x, t)
    assert torch.allclose(twice, 2 * shift, atol=1e-12)


def test_no_shift_where_alpha_is_zero():
    schedule = build_schedule("flow")
    x, t = torch.randn(4, *SHAPE, dtype=F64), torch.tensor([1.0, 1.0, 0.5, 0.5], dtype=F64)
    base = lambda x, t: toy_denoiser(schedule, x, t)  # noqa: E731
    clf = lambda x, t: toy_posterior(schedule, x, t)  # noqa: E731
    out = classifier_guided(base, clf, torch.tensor([0, 1, 0, 1]), 3.0, schedule)(x, t)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:2], base(x, t)[:2]) and not torch.allclose(out[2:], base(x, t)[2:])


def small_classifier(schedule, dtype=torch.float32):
    torch.manual_seed(0)
    net = NoisyClassifier(schedule, channels=(4, 8, 8), time_dim=16).to(dtype)
    return net.eval()


@pytest.mark.parametrize("schedule_name", ["cosine", "flow"])
def test_gradient_matches_finite_difference(schedule_name):
    schedule = build_schedule(schedule_name, 1000)
    net = small_classifier(schedule, F64)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(3, 1, 28, 28, generator=gen, dtype=F64)
    t, y = torch.tensor([0.2, 0.5, 0.9], dtype=F64), torch.tensor([1, 4, 9])
    with torch.no_grad():  # as inside the samplers
        grad = classifier_log_prob_grad(net, x, t, y)
    assert grad.shape == x.shape and grad.dtype == F64

    def log_p(z):
        return torch.log_softmax(net(z, t), dim=1).gather(1, y[:, None]).squeeze(1)

    v = torch.randn(x.shape, generator=gen, dtype=F64)
    h = 1e-5
    with torch.no_grad():
        fd = (log_p(x + h * v) - log_p(x - h * v)) / (2 * h)  # [B] directional derivatives
    assert torch.allclose(fd, (grad * v).flatten(1).sum(1), rtol=1e-6, atol=1e-9)
    assert not any(p.grad is not None for p in net.parameters())  # no parameter grads kept


def test_scale_zero_is_identity_and_bad_input():
    schedule = build_schedule("linear", 1000)
    calls = []

    def clf(x, t):
        calls.append(1)
        return torch.zeros(len(x), 10)

    def base(x, t):
        return x * 0.5

    labels = torch.tensor([1, 2])
    assert classifier_guided(base, clf, labels, 0.0, schedule) is base
    assert calls == []
    with pytest.raises(ValueError, match="finite and >= 0"):
        classifier_guided(base, clf, labels, -1.0, schedule)
    with pytest.raises(ValueError, match="finite and >= 0"):
        classifier_guided(base, clf, labels, math.nan, schedule)
    net = small_classifier(schedule)  # knows its classes: refused at construction
    with pytest.raises(ValueError, match=r"labels \[10\] out of range.*classes 0..9"):
        classifier_guided(base, net, torch.tensor([3, 10]), 2.0, schedule)
    fn = classifier_guided(base, clf, torch.tensor([3, 12]), 2.0, schedule)  # found at call
    with pytest.raises(ValueError, match=r"labels \[12\] out of range"):
        fn(torch.zeros(2, 1, 28, 28), torch.full((2,), 0.5))
    with pytest.raises(ValueError, match="1-D int64"):
        classifier_guided(base, clf, torch.tensor([1.0]), 1.0, schedule)


def test_save_load_round_trip_checksum_and_schedule_check(tmp_path):
    schedule = build_schedule("cosine", 100)
    net = small_classifier(schedule)
    path = tmp_path / "c.safetensors"
    meta = save_classifier(net, path, {"note": "test"})
    assert meta["schedule"] == {"name": "cosine", "num_timesteps": 100}
    assert json.loads(path.with_suffix(".json").read_text()) == meta
    loaded = load_classifier(path)
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([0.3, 0.7])
    with torch.no_grad():
        assert torch.equal(loaded(x, t), net(x, t))
    assert loaded.checksum == meta["sha256"]
    check_compatible(loaded, build_schedule("cosine", 100), (1, 28, 28), 10)
    with pytest.raises(ClassifierError, match=r"cosine \(T=100\) schedule but the model uses flow"):
        check_compatible(loaded, build_schedule("flow", 100), (1, 28, 28), 10)
    with pytest.raises(ClassifierError, match=r"uses cosine \(T=1000\)"):
        check_compatible(loaded, build_schedule("cosine", 1000), (1, 28, 28), 10)
    with pytest.raises(ClassifierError, match="shape"):
        check_compatible(loaded, schedule, (1, 32, 32), 10)
    flow = save_classifier(
        small_classifier(build_schedule("flow", 7)), tmp_path / "f.safetensors", {}
    )
    assert flow["schedule"] == {"name": "flow", "num_timesteps": None}  # T is irrelevant to flow
    check_compatible(
        load_classifier(tmp_path / "f.safetensors"), build_schedule("flow"), (1, 28, 28)
    )
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(ClassifierError, match="checksum mismatch"):
        load_classifier(path)
    with pytest.raises(ClassifierError, match="must end in .safetensors"):
        load_classifier(tmp_path / "c.pt")
    with pytest.raises(ClassifierError, match="not found"):
        load_classifier(tmp_path / "missing.safetensors")


# --------------------------------------------------------------------------- on real MNIST


TINY, STEPS = (8, 16, 16), 300  # a classifier small enough to train in seconds


def _export(tmp, *overrides, name):
    """An export directory of an untrained smoke model (no training needed for these tests)."""
    from mnistdiff.build import build_denoiser
    from mnistdiff.checkpoint import write_export
    from mnistdiff.config import load_config, to_dict
    from mnistdiff.data import DataSpec

    cfg = load_config(ROOT / "configs" / "smoke.yaml", list(overrides))
    spec = DataSpec(channels=1, size=28, num_classes=10)
    torch.manual_seed(0)
    den = build_denoiser(cfg, spec)
    return write_export(tmp / name, to_dict(cfg), spec.to_dict(), den.backbone.state_dict())


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_data):
    """(unconditional cosine export, its classifier, a flow export, its data overrides); the
    classifier is trained for a few seconds on the test digits (real MNIST if present)."""
    dataset, path = digits_source(synthetic_data)
    data = [f"data.dataset={dataset}", f"data.data_dir={path}"]
    tmp = tmp_path_factory.mktemp("clf")
    uncond = _export(tmp, "model.conditional=false", *data, name="uncond")
    flow = _export(
        tmp, "diffusion.schedule=flow", "diffusion.prediction=velocity", *data, name="flow"
    )
    out = tmp / "clf.safetensors"
    meta = train_classifier(
        uncond,
        out=out,
        steps=STEPS,
        batch_size=32,
        channels=TINY,
        lr=5e-3,
        eval_images=100,
        progress=False,
    )
    return uncond, out, meta, flow, data


def test_trained_classifier_beats_chance_on_noised_test_images(trained):
    _, out, meta, _, _ = trained
    test = meta["noised_test"]
    assert test["images"] == 100 and meta["training"]["steps_done"] == STEPS
    # chance is 0.1; the noisiest times stay near chance. On the 100 synthetic test digits the
    # bounds are 4 (overall) and 3 (low-t bin, ~20 images) binomial standard deviations above it.
    overall, low_t = (0.3, 0.5) if meta["data"]["dataset"] == "mnist" else (0.2, 0.3)
    assert test["accuracy"] > overall, test
    assert test["accuracy_by_t"]["0.0-0.2"] > low_t, test
    assert meta["schedule"] == {"name": "cosine", "num_timesteps": 100}
    assert load_classifier(out).checksum == meta["sha256"]


def test_training_is_seeded(trained, tmp_path):
    uncond = trained[0]
    kw = {"steps": 3, "batch_size": 8, "channels": TINY, "eval_images": 0, "progress": False}
    a = train_classifier(uncond, out=tmp_path / "a.safetensors", **kw)
    b = train_classifier(uncond, out=tmp_path / "b.safetensors", **kw)
    c = train_classifier(uncond, out=tmp_path / "c.safetensors", seed=1, **kw)
    assert a["sha256"] == b["sha256"] != c["sha256"]


def test_guidance_steers_an_unconditional_pipeline(trained):
    """With an exact-enough classifier the steered labels win: here we check plumbing (labels
    accepted by an unconditional model, the classifier changes the images, bad inputs fail)."""
    from mnistdiff.sample import Pipeline

    uncond, out, _, flow, _ = trained
    pipe = Pipeline.load(uncond, device="cpu")
    assert not pipe.conditional
    with pytest.raises(ValueError, match="unconditional: sample without labels"):
        pipe.generate([3, 3], steps=2)
    plain = pipe.generate(num=4, steps=3, seed=0).x
    steered = pipe.generate(
        [3, 3, 7, 7], steps=3, seed=0, classifier=str(out), classifier_scale=4.0
    )
    assert steered.labels.tolist() == [3, 3, 7, 7] and torch.isfinite(steered.x).all()
    assert not torch.allclose(plain, steered.x)
    zero = pipe.generate([3, 3, 7, 7], steps=3, seed=0, classifier=str(out), classifier_scale=0.0)
    assert torch.equal(zero.x, plain)  # scale 0 is the unguided sampler
    with pytest.raises(ValueError, match="labels must be in 0..9"):
        pipe.generate([3, 10], steps=2, classifier=str(out))
    with pytest.raises(ClassifierError, match="trained for the cosine .* uses flow"):
        Pipeline.load(flow, device="cpu").generate([1], steps=2, classifier=str(out))


def _target_log_prob(classifier, images, labels, pipe):
    """Mean log p(label | image) of the classifier at a near-clean time."""
    from mnistdiff.edit.core import to_model

    x = to_model(pipe, images)
    with torch.no_grad():
        logits = classifier(x, torch.full((len(x),), 0.02))
    return logits.log_softmax(1).gather(1, labels.view(-1, 1)).mean().item()


def test_edits_steer_an_unconditional_model_with_the_classifier(trained):
    """Restyle, SDEdit, inpainting and compose take target labels on an unconditional model
    when a noisy classifier steers it; scale 0 is the unsteered edit, bit for bit."""
    from mnistdiff import edit
    from mnistdiff.sample import Pipeline

    uncond, out, _, _, _ = trained
    pipe = Pipeline.load(uncond, device="cpu")
    clf = load_classifier(out)
    images = edit.core.to_uint8(pipe, pipe.generate(num=6, steps=4, seed=3).x)
    targets = torch.tensor([0, 1, 2, 3, 4, 5])
    with pytest.raises(ValueError, match="or a noisy classifier to steer this unconditional"):
        edit.restyle(pipe, images, targets, steps=4)
    kw = {"steps": 4, "classifier": str(out)}
    plain = edit.reconstruct(pipe, images, None, steps=4)
    zero = edit.restyle(pipe, images, targets, classifier_scale=0.0, **kw)
    assert torch.equal(zero.images, plain.images)  # unsteered: invert + decode, no label
    steered = edit.restyle(pipe, images, targets, classifier_scale=8.0, **kw)
    assert steered.labels.tolist() == targets.tolist()
    gain = _target_log_prob(clf, steered.images, targets, pipe)
    assert gain > _target_log_prob(clf, zero.images, targets, pipe) + 1.0
    with pytest.raises(ValueError, match="unconditional: it cannot take a label here"):
        edit.restyle(pipe, images, targets, from_labels=targets, classifier_scale=8.0, **kw)

    sd = edit.sdedit(pipe, images, 0.8, targets, classifier_scale=8.0, seed=1, **kw)
    sd0 = edit.sdedit(pipe, images, 0.8, None, steps=4, seed=1)
    assert sd.labels.tolist() == targets.tolist() and not torch.equal(sd.images, sd0.images)
    with pytest.raises(ValueError, match="steer it with a noisy classifier"):
        edit.sdedit(pipe, images, 0.8, targets, steps=4)
    with pytest.raises(ValueError, match="classifier guidance needs labels"):
        edit.sdedit(pipe, images, 0.8, None, **kw)

    filled = edit.inpaint(pipe, images, "bottom", targets, classifier_scale=8.0, **kw)
    top = slice(0, 14)
    assert torch.equal(filled.images[:, top], images[:, top])  # known pixels kept exactly
    number = edit.compose(pipe, "205", classifier_scale=8.0, **kw)
    assert len(number.glyphs) == 3
    with pytest.raises(ValueError, match="compose needs a class-conditional model"):
        edit.compose(pipe, "205", steps=4)


def _cli(*args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mnistdiff", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def test_cli_train_classifier_and_sample(trained, tmp_path):
    uncond, out, _, flow, _ = trained
    proc = _cli(
        "train-classifier", "--checkpoint", flow, "--steps", "2", "--batch-size", "8",
        "--eval-images", "0", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    default = flow / "classifier.safetensors"
    assert json.loads(proc.stdout)["out"] == str(default) and default.with_suffix(".json").is_file()
    npz = tmp_path / "s.npz"
    proc = _cli(
        "sample", "--checkpoint", uncond, "--classifier", out, "--classifier-scale", "2",
        "--digits", "3,5", "--num", "4", "--steps", "2", "--out", tmp_path / "g.png",
        "--save-npz", npz, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with np.load(npz) as f:
        assert f["labels"].tolist() == [3, 3, 5, 5] and f["images"].shape == (4, 28, 28)
    proc = _cli(
        "sample", "--checkpoint", flow, "--classifier", out, "--digits", "1", "--num", "2",
        "--steps", "2", "--out", tmp_path / "h.png", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1 and "trained for the cosine (T=100) schedule" in proc.stderr
    assert not (tmp_path / "h.png").exists()
    proc = _cli("train-classifier", "--checkpoint", flow, "--out", tmp_path / "x.pt", cwd=tmp_path)
    assert proc.returncode == 1 and "must end in .safetensors" in proc.stderr
    # edits: restyle an unconditional model's digit with the classifier; refused without it
    from PIL import Image

    png = tmp_path / "digit.png"
    with np.load(npz) as f:
        Image.fromarray(f["images"][0]).save(png)
    base = ("edit", "restyle", "--checkpoint", uncond, "--image", png, "--to-label", "4,9")
    proc = _cli(*base, "--steps", "2", "--out", tmp_path / "r.png", cwd=tmp_path)
    assert proc.returncode == 1 and "--classifier FILE" in proc.stderr
    assert not (tmp_path / "r.png").exists()
    proc = _cli(
        *base, "--classifier", out, "--classifier-scale", "4", "--steps", "2",
        "--out", tmp_path / "r.png", "--save-npz", tmp_path / "r.npz", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    with np.load(tmp_path / "r.npz") as f:
        assert f["labels"].tolist() == [4, 9] and f["images"].shape == (2, 28, 28)


def test_benchmark_tiny(trained, tmp_path):
    out = tmp_path / "cg.json"
    data = trained[-1]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "classifier_guidance.py"), "--tiny"]
        + [arg for kv in data for arg in ("--set", kv)]
        + ["--out", str(out)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == result
    n = result["num_samples"]
    cg = result["classifier_guidance"]
    assert [r["classifier_scale"] for r in cg] == result["classifier_scales"]
    for row in [*cg, result["unguided_unconditional"], result["classifier_free"]]:
        assert row["num_samples"] == n and row["nfe"] > 0
        assert row["fd_mnist"] >= 0 and 0.0 <= row["class_accuracy"] <= 1.0
    assert result["classifier_free"]["guidance"] == result["cfg_scale"]
    rows = result["sampler_vs_nfe"]
    assert {r["sampler"] for r in rows} == set(result["samplers"])
    for r in rows:
        assert r["nfe"] <= r["nfe_budget"] and r["fd_mnist"] >= 0
        if r["sampler"] == "sde_pc":
            assert r["nfe"] == 2 * r["steps"]
