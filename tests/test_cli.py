"""End-to-end CLI tests on configs/smoke.yaml and the synthetic digits, for both backbones."""

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from mnistdiff.cli import main


def run(*argv):
    return main([str(a) for a in argv])


def smoke_train(run_dir, data_dir, *extra) -> int:
    """``mnistdiff train`` on the smoke config and the synthetic digits."""
    config = ("--config", ROOT / "configs/smoke.yaml", "--run-dir", run_dir)
    return run("train", *config, "--dataset", "synthetic", "--data-dir", data_dir, *extra)


def test_help_lists_commands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for cmd in ("data", "config", "train", "sample", "export", "evaluate", "info"):
        assert cmd in out


def test_console_script_help():
    out = subprocess.run(
        [sys.executable, "-m", "mnistdiff", "train", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "--resume" in out and "--stop-after-steps" in out


def test_config_command_prints_overrides(capsys):
    assert (
        run(
            "config",
            "--config",
            ROOT / "configs/smoke.yaml",
            "--lr",
            "0.01",
            "--set",
            "model.unet.channels=24",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "lr: 0.01" in out and "channels: 24" in out


def test_user_error_is_one_line(capsys):
    assert run("config", "--set", "train.lrr=1") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("mnistdiff: error: unknown config key 'train.lrr'")
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_data_writes_png(synthetic_data, tmp_path, capsys):
    out = tmp_path / "data.png"
    data = ("--dataset", "synthetic", "--data-dir", synthetic_data)
    assert run("data", *data, "--no-download", "--per-class", "3", "--out", out) == 0
    img = Image.open(out)
    assert img.mode == "L" and img.size[0] > 28 * 3
    assert "train: 600 images" in capsys.readouterr().out


@pytest.mark.parametrize("backbone", ["unet", "dit"])
def test_train_sample_export_end_to_end(synthetic_data, tmp_path, backbone, capsys):
    run_dir = tmp_path / backbone
    assert smoke_train(run_dir, synthetic_data, "--model-type", backbone) == 0
    state = torch.load(run_dir / "checkpoints" / "last.pt", weights_only=True)
    assert state["config"]["model"]["type"] == backbone

    grid, npz = tmp_path / "g.png", tmp_path / "s.npz"
    assert (
        run(
            "sample",
            "--checkpoint",
            run_dir,
            "--sampler",
            "ddpm",
            "--steps",
            "10",
            "--per-class",
            "2",
            "--out",
            grid,
            "--save-npz",
            npz,
        )
        == 0
    )
    assert Image.open(grid).size[1] > 28 * 10  # ten rows
    with np.load(npz) as f:
        assert f["images"].shape == (20, 28, 28) and f["images"].dtype == np.uint8
        assert f["labels"].tolist() == [c for c in range(10) for _ in range(2)]

    assert (
        run(
            "sample",
            "--checkpoint",
            run_dir,
            "--sampler",
            "ddim",
            "--steps",
            "4",
            "--guidance",
            "3",
            "--digits",
            "3,7",
            "--num",
            "4",
            "--out",
            grid,
            "--gif",
            tmp_path / "t.gif",
        )
        == 0
    )
    assert Image.open(tmp_path / "t.gif").n_frames >= 2

    export = tmp_path / "export"
    assert run("export", "--checkpoint", run_dir, "--out", export) == 0
    assert (export / "model.safetensors").is_file()
    npz2 = tmp_path / "s2.npz"
    assert (
        run(
            "sample",
            "--checkpoint",
            export,
            "--sampler",
            "ddpm",
            "--steps",
            "10",
            "--per-class",
            "2",
            "--out",
            grid,
            "--save-npz",
            npz2,
        )
        == 0
    )
    with np.load(npz) as a, np.load(npz2) as b:  # export = EMA weights = checkpoint default
        assert np.array_equal(a["images"], b["images"])
    assert run("info", "--checkpoint", export) == 0
    assert "forward_flops_per_image" in capsys.readouterr().out


def test_same_seed_same_images_and_unconditional(synthetic_data, tmp_path):
    run_dir = tmp_path / "u"
    extra = ("--set", "model.conditional=false", "--steps", "2")
    assert smoke_train(run_dir, synthetic_data, *extra) == 0
    paths = [tmp_path / f"{i}.npz" for i in range(3)]
    for path, seed in zip(paths, (5, 5, 6), strict=True):
        assert (
            run(
                "sample",
                "--checkpoint",
                run_dir,
                "--num",
                "6",
                "--unconditional",
                "--seed",
                seed,
                "--steps",
                "3",
                "--out",
                tmp_path / "g.png",
                "--save-npz",
                path,
            )
            == 0
        )
    a, b, c = (np.load(p)["images"] for p in paths)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert (np.load(paths[0])["labels"] == -1).all()


def test_sample_errors(tmp_path, capsys):
    assert run("sample", "--checkpoint", tmp_path / "missing") == 1
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert run("sample", "--checkpoint", bad) == 1
    assert "not a readable mnistdiff checkpoint" in capsys.readouterr().err


def test_evaluate_json(synthetic_data, tmp_path, capsys):
    run_dir = tmp_path / "e"
    assert smoke_train(run_dir, synthetic_data) == 0
    png = tmp_path / "s.png"
    # an option the sampler does not take is refused before sampling (smoke: ddim)
    for argv in (["--sampler", "euler", "--eta", "0.7"], ["--s-churn", "1"]):
        assert run("sample", "--checkpoint", run_dir, "--out", png, *argv) == 1
        assert "does not apply to sampler" in capsys.readouterr().err and not png.exists()
    out = tmp_path / "eval.json"
    assert (
        run(
            "evaluate",
            "--checkpoint",
            run_dir,
            "--num-samples",
            "40",
            "--steps",
            "3",
            "--threshold",
            "dynamic",
            "--guidance-rescale",
            "0.5",
            "--guidance-interval",
            "0.1,0.9",
            "--eta",
            "0.25",
            "--json",
            out,
            "--model-metrics",
            "--model-metric-images",
            "50",
            "--ode-likelihood",
            "--inception-fid",
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["ode_num_images"] == 50 and result["bits_per_dim_ode"] > 0
    for key in (
        "fd_mnist",
        "kid",
        "precision",
        "recall",
        "class_accuracy",
        "num_samples",
        "nfe",
        "bits_per_dim",
    ):
        assert key in result, key
    assert result["num_samples"] == 40 and result["nfe"] == 3
    # the record holds every option needed to reproduce the result
    from mnistdiff.config import SampleOptions

    expected = SampleOptions(
        sampler="ddim",
        steps=3,
        guidance=2.0,
        threshold="dynamic",
        guidance_rescale=0.5,
        guidance_interval=(0.1, 0.9),
        eta=0.25,
    )
    assert SampleOptions(**{k: result[k] for k in expected.record()}) == expected
    assert result["fd_mnist"] > 0 and 0 <= result["class_accuracy"] <= 1
    assert result["bits_per_dim"] > 0
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:  # the optional extra is absent: skipped, clearly labelled
        assert result["inception_fid"] is None and "skipped" in result["inception_fid_note"]


def test_evaluate_npz_and_sweeps(synthetic_data, tmp_path):
    run_dir = tmp_path / "e"
    assert smoke_train(run_dir, synthetic_data) == 0
    npz = tmp_path / "s.npz"
    assert (
        run(
            "sample",
            "--checkpoint",
            run_dir,
            "--per-class",
            "3",
            "--steps",
            "2",
            "--out",
            tmp_path / "g.png",
            "--save-npz",
            npz,
        )
        == 0
    )
    out = tmp_path / "npz.json"
    data = ("--dataset", "synthetic", "--data-dir", synthetic_data)
    assert run("evaluate", "--samples", npz, *data, "--json", out) == 0
    result = json.loads(out.read_text())
    assert result["num_samples"] == 30 and "class_accuracy" in result

    sweep_dir = tmp_path / "sweep"
    assert (
        run(
            "evaluate",
            "--checkpoint",
            run_dir,
            "--num-samples",
            "20",
            "--sweep",
            "sampler=ddim,dpmpp_2m",
            "--sweep",
            "nfe=2,3",
            "--json",
            sweep_dir / "rows.json",
            "--guidance-rescale",
            "0.5",
        )
        == 0
    )
    rows = json.loads((sweep_dir / "rows.json").read_text())
    assert [(r["sampler"], r["nfe"]) for r in rows] == [
        ("ddim", 2),
        ("ddim", 3),
        ("dpmpp_2m", 2),
        ("dpmpp_2m", 3),
    ]
    table = (sweep_dir / "sweep_sampler_nfe.md").read_text()
    assert table.count("\n") == 2 + 4 and "fd_mnist" in table
    assert Image.open(sweep_dir / "sweep_sampler_nfe.png").size[0] > 100

    assert (
        run(
            "evaluate",
            "--checkpoint",
            run_dir,
            "--num-samples",
            "20",
            "--steps",
            "2",
            "--sweep",
            "guidance=1,3",
            "--out-dir",
            sweep_dir,
        )
        == 0
    )
    assert (sweep_dir / "sweep_guidance.png").is_file()
    assert (
        run(
            "evaluate",
            "--checkpoint",
            run_dir,
            "--all-checkpoints",
            "--num-samples",
            "20",
            "--steps",
            "2",
            "--out-dir",
            sweep_dir,
        )
        == 0
    )
    assert (sweep_dir / "sweep_checkpoints.md").read_text().count("\n") == 2 + 2


def test_evaluate_rejects_bad_input(tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    np.savez(bad, images=np.zeros((4, 28, 28), dtype=np.float32))
    assert run("evaluate", "--samples", bad) == 1
    assert "'images' must be uint8" in capsys.readouterr().err
    assert run("evaluate", "--samples", tmp_path / "missing.npz") == 1
    assert run("evaluate", "--checkpoint", tmp_path, "--sweep", "lr=1,2") == 1
    assert "not sweepable" in capsys.readouterr().err


# --------------------------------------------------------------------------- flag validation


@pytest.mark.parametrize(
    "argv,message",
    [
        (["sample", "--guidance", "-1"], r"--guidance: -1.0 is out of range; allowed \[0.0, 100"),
        (["sample", "--guidance", "nan"], r"--guidance: nan is not allowed; expected a finite"),
        (["sample", "--eta", ".nan"], r"--eta: nan is not allowed"),
        (["sample", "--per-class", "0"], r"--per-class: must be >= 1, got 0"),
        (["sample", "--per-class", "-1"], r"--per-class: must be >= 1, got -1"),
        (["sample", "--num", "0"], r"--num: must be >= 1, got 0"),
        (["sample", "--batch-size", "0"], r"--batch-size: 0 is out of range"),
        (["sample", "--nfe", "0"], r"--nfe: must be >= 1"),
        (["sample", "--digits", "a"], r"--digits: expected comma-separated class indices"),
        (["sample", "--sampler", "eulr"], r"--sampler: 'eulr' is not allowed.*'euler'"),
        (["sample", "--guidance-interval", "0.2"], r"--guidance-interval.*expected \[t_lo"),
        (["evaluate", "--num-samples", "0"], r"--num-samples: must be >= 1, got 0"),
        (["evaluate", "--model-metric-images", "0"], r"--model-metric-images: must be >= 1"),
        (["config", "--lr", "nan"], r"--lr: nan is not allowed"),
        (["config", "--model-type", "mlp"], r"--model-type: 'mlp' is not allowed.*'unet'"),
        (["data", "--per-class", "0"], r"--per-class: must be >= 1"),
    ],
)
def test_bad_flags_are_refused_before_any_work(argv, message, tmp_path, capsys):
    if argv[0] in ("sample", "evaluate"):
        argv = [argv[0], "--checkpoint", str(tmp_path / "missing"), *argv[1:]]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and re.search(message, err), err


@pytest.mark.parametrize(
    "args,message",
    [
        (["--set", "train.lr=.nan"], "train.lr: nan is not allowed"),
        (["--set", "sample.guidance=.nan"], "sample.guidance: nan is not allowed"),
        (["--set", "sample.sampler=eulr"], "sample.sampler: 'eulr' is not allowed"),
        (["--set", "sample.sampler=euler", "--set", "sample.eta=0.7"], "option of ddim"),
    ],
)
def test_config_values_are_refused(args, message, capsys):
    assert run("config", *args) == 1
    assert message in capsys.readouterr().err


def test_scalar_section_is_a_clear_error(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("train: 5\n")
    assert run("config", "--config", path) == 1
    err = capsys.readouterr().err
    assert err.startswith("mnistdiff: error: train: expected a mapping, got 5")
    assert "Traceback" not in err


def test_sampling_flags_cover_every_option():
    import dataclasses

    from mnistdiff.cli import build_parser
    from mnistdiff.config import SampleConfig

    flags = {
        name
        for action in build_parser()._subparsers._group_actions[0].choices["sample"]._actions
        for name in action.option_strings
    }
    for f in dataclasses.fields(SampleConfig):
        assert "--" + f.name.replace("_", "-") in flags, f.name


def test_null_sampling_flags_override_the_config():
    """A key that may be null (guidance interval, grid, classifier, s_tmax) is passed on only
    when given, so ``--guidance-interval null`` switches off a config's interval."""
    from mnistdiff.cli import build_parser, sampling_overrides

    parser = build_parser()
    given = parser.parse_args(["sample", "--guidance-interval", "null", "--grid", "null"])
    assert sampling_overrides(given) == {"guidance_interval": None, "grid": None}
    interval = parser.parse_args(["evaluate", "--real-floor", "--guidance-interval", "0,0.7"])
    assert sampling_overrides(interval) == {"guidance_interval": (0.0, 0.7)}
    assert sampling_overrides(parser.parse_args(["sample", "--guidance", "1.5"])) == {
        "guidance": 1.5
    }
