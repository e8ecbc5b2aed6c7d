"""`mnistdiff visualize` and the figure library on a smoke-trained model (real MNIST)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT, SYNTHETIC, smoke_yaml_on
from mnistdiff import visualize
from mnistdiff.cli import build_parser, main
from mnistdiff.schedules import build_schedule

SMOKE = ROOT / "configs" / "smoke.yaml"


def assert_png(path: Path) -> np.ndarray:
    """A readable, non-empty PNG that is not one flat colour; returns it as grayscale."""
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.size[0] > 50 and img.size[1] > 50
        pixels = np.asarray(img.convert("L"), dtype=np.float64)
    assert pixels.std() > 10, f"{path} looks blank"
    assert (pixels < 100).mean() > 0.01, f"{path} has almost no dark pixels"
    return pixels


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, synthetic_data):
    """A smoke-config model on the synthetic digits, trained once for this module."""
    from mnistdiff.config import load_config
    from mnistdiff.train import train

    out = tmp_path_factory.mktemp("vis") / "run"
    data = [*SYNTHETIC, f"data.data_dir={synthetic_data}"]
    cfg = load_config(SMOKE, [f"train.run_dir={out}", *data])
    return train(cfg, log=lambda *a, **k: None)


@pytest.fixture(scope="module")
def pipe(run_dir):
    from mnistdiff.sample import Pipeline

    return Pipeline.load(run_dir, device="cpu")


def untrained_pipe(*overrides: str):
    """A Pipeline around an untrained model built from the smoke config."""
    from mnistdiff.build import build_denoiser
    from mnistdiff.config import load_config
    from mnistdiff.data import DataSpec
    from mnistdiff.device import select_precision
    from mnistdiff.sample import Pipeline

    cfg = load_config(SMOKE, list(overrides))
    spec = DataSpec(channels=1, size=28, num_classes=10)
    den = build_denoiser(cfg, spec).eval()
    dev = torch.device("cpu")
    return Pipeline(cfg, spec, den, dev, select_precision("fp32", dev), SMOKE)


# --------------------------------------------------------------------------- maths


@pytest.mark.parametrize("name", ["linear", "cosine", "sigmoid", "flow"])
def test_noised_images_follow_q(name):
    sched = build_schedule(name, 100)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.rand(1, 4, 4, generator=g) * 2 - 1, torch.randn(1, 4, 4, generator=g)
    xs = visualize.noised_images(x0, sched, [0.0, 0.37, 1.0], noise)
    assert xs.shape == (3, 1, 4, 4)
    torch.testing.assert_close(xs[0], x0)  # t = 0 is the data
    a, s = sched.alpha_sigma(torch.tensor(0.37, dtype=torch.float64))
    torch.testing.assert_close(xs[1], float(a) * x0 + float(s) * noise)
    if name == "flow":
        torch.testing.assert_close(xs[2], noise)  # t = 1 is pure noise for flow
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        visualize.noised_images(x0, sched, [1.5], noise)


def test_schedule_curves_match_the_schedule():
    sched = build_schedule("cosine", 1000)
    c = visualize.schedule_curves(sched, points=11)
    assert c["t"][0] == 0.0 and c["t"][-1] == 1.0
    np.testing.assert_allclose(c["alpha"] ** 2 + c["sigma"] ** 2, 1.0, atol=1e-12)  # VP
    assert np.isnan(c["log_snr"][0])  # +inf at t = 0 is reported as NaN (not drawn)
    np.testing.assert_allclose(c["log_snr"][1:], np.log(c["alpha"][1:] ** 2 / c["sigma"][1:] ** 2))
    assert np.all(np.diff(c["log_snr"][1:]) < 0)


def test_figure_layouts():
    image = torch.zeros(1, 28, 28)
    fig = visualize.forward_figure(image, schedules=["cosine", "flow"], times=[0, 0.5, 1])
    assert len(fig.axes) == 6
    visualize.save_figure(fig, Path("/dev/null"))  # closes it
    fig = visualize.schedules_figure(["linear", "sigmoid", "flow"])
    assert [len(ax.lines) for ax in fig.axes] == [3, 3, 3]
    with pytest.raises(ValueError, match="allowed: linear, cosine, sigmoid, flow"):
        visualize.schedules_figure(["cosine", "cosinus"])


# --------------------------------------------------------------------------- sampling figures


def test_trajectory_records_every_step_and_ends_at_the_sample(pipe):
    traj = visualize.trajectory(pipe, 3, seed=5, sampler="ddim", steps=4)
    assert traj.x_t.shape == (4, 28, 28) and traj.x0_hat.shape == (4, 28, 28)
    assert traj.x_t.dtype == torch.uint8
    assert traj.t_from[0] == 1.0 and traj.t_to[-1] == 0.0 and traj.t_to[:-1] == traj.t_from[1:]
    assert traj.nfe == 4 and traj.label == 3
    sample = pipe.sample([3], seed=5, sampler="ddim", steps=4)
    assert torch.equal(traj.x_t[-1], sample[0])  # the last state is what `sample` returns
    assert torch.equal(traj.x_t[-1], traj.x0_hat[-1])  # ddim's last step lands on x0_hat
    frames = visualize.trajectory_frames(traj)
    assert len(frames) == 4 and frames[0].shape == (32, 62)


def test_trajectory_of_an_unconditional_model():
    pipe = untrained_pipe("model.conditional=false")
    traj = visualize.trajectory(pipe, 3, sampler="dpmpp_2m", steps=3)
    assert traj.label is None and len(traj.x_t) == 3
    fig = visualize.trajectory_figure(traj, max_columns=2)
    assert len(fig.axes) == 4  # 2 rows x 2 columns (first and last step)
    with pytest.raises(ValueError, match="class-conditional"):
        visualize.guidance_samples(pipe, [1.0, 2.0])


def test_guidance_samples_share_seeds(pipe):
    out = visualize.guidance_samples(pipe, [1.0, 3.0], digits=[1, 2], seed=2, steps=3)
    assert list(out) == [1.0, 3.0] and out[1.0].shape == (2, 28, 28)
    plain = pipe.sample([1, 2], seed=2, steps=3, guidance=1.0)
    assert torch.equal(out[1.0], plain)
    with pytest.raises(ValueError, match="do not pass guidance"):
        visualize.guidance_samples(pipe, [1.0], guidance=2.0)


def test_nfe_samples_count_calls(pipe):
    recs = visualize.nfe_samples(pipe, [3, 5], digits=[0, 1, 2], sampler="heun")
    assert [(r["nfe"], r["steps"]) for r in recs] == [(3, 2), (5, 3)]  # heun: NFE = 2N - 1
    assert recs[0]["images"].shape == (3, 28, 28) and recs[0]["class_accuracy"] is None
    recs = visualize.nfe_samples(pipe, [2], digits=[4], accuracy_per_class=1, sampler="ddim")
    assert 0.0 <= recs[0]["class_accuracy"] <= 1.0
    with pytest.raises(ValueError, match="do not pass steps"):
        visualize.nfe_samples(pipe, [2], steps=4)


# --------------------------------------------------------------------------- CLI


def test_cli_forward_and_schedules(digits, tmp_path, capsys):
    out = tmp_path / "forward.png"
    config = smoke_yaml_on(digits, tmp_path / "smoke.yaml")
    args = ["visualize", "forward", "--config", str(config), "--times", "0,0.5,1", "--digit", "3"]
    assert main([*args, "--out", str(out)]) == 0
    assert f"wrote {out}" in capsys.readouterr().out
    assert_png(out)
    out = tmp_path / "schedules.png"
    assert main(["visualize", "schedules", "--out", str(out)]) == 0
    assert_png(out)
    # with --config: that config's schedule only
    args = build_parser().parse_args(["visualize", "schedules", "--config", str(SMOKE)])
    fig, traj = visualize.build_figure(args)
    assert traj is None and [len(ax.lines) for ax in fig.axes] == [1, 1, 1]
    assert fig.axes[0].lines[0].get_label() == "cosine"


def test_cli_trajectory_writes_png_and_gif(run_dir, tmp_path):
    out = tmp_path / "traj.png"
    args = ["visualize", "trajectory", "--checkpoint", str(run_dir), "--out", str(out)]
    assert main([*args, "--steps", "6", "--digit", "5", "--device", "cpu"]) == 0
    assert_png(out)
    with Image.open(out.with_suffix(".gif")) as gif:
        assert gif.format == "GIF" and gif.n_frames >= 2


def test_cli_guidance_and_nfe(run_dir, tmp_path):
    out = tmp_path / "guidance.png"
    args = ["visualize", "guidance", "--checkpoint", str(run_dir), "--out", str(out)]
    assert main([*args, "--scales", "0,1,3", "--steps", "3", "--device", "cpu"]) == 0
    assert_png(out)
    out = tmp_path / "nfe.png"
    args = ["visualize", "nfe", "--checkpoint", str(run_dir), "--out", str(out), "--device", "cpu"]
    assert main([*args, "--nfes", "1,3", "--accuracy", "1", "--digits", "0,1,2,3"]) == 0
    assert_png(out)


def test_cli_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["visualize", "sideways"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'sideways'" in err and "trajectory" in err
    out = str(tmp_path / "x.png")
    missing = tmp_path / "nope.pt"
    assert main(["visualize", "trajectory", "--checkpoint", str(missing), "--out", out]) == 1
    assert str(missing) in capsys.readouterr().err
    assert main(["visualize", "guidance", "--out", out]) == 1
    assert "needs --checkpoint" in capsys.readouterr().err
    assert main(["visualize", "forward", "--checkpoint", str(missing), "--out", out]) == 1
    assert "not --checkpoint" in capsys.readouterr().err
    assert main(["visualize", "schedules", "--schedules", "cosine,warp", "--out", out]) == 1
    assert "unknown schedule(s) ['warp']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["visualize", "guidance", "--scales", "1,lots"])
    assert "comma-separated numbers" in capsys.readouterr().err
    assert not Path(out).exists()
    args = build_parser().parse_args(["visualize", "forward"])
    args.kind = "backward"
    with pytest.raises(ValueError, match="allowed: forward, schedules, trajectory"):
        visualize.build_figure(args)
