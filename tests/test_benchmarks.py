"""The benchmark scripts run end to end in --tiny mode and write complete, consistent JSON.

The scripts are not timed here (performance figures come from running them, never from tests);
these checks cover the plumbing, the fields and the arithmetic that ties the fields together.
"""

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import ROOT

BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

import quality_budget  # noqa: E402
import throughput  # noqa: E402

HAS_DIFFUSERS = importlib.util.find_spec("diffusers") is not None


def _evaluator_available() -> bool:
    from mnistdiff.evaluator import EvaluatorError, load_evaluator

    try:
        load_evaluator()
    except EvaluatorError:
        return False
    return True


def run_script(name: str, tmp_path, data_dir: str, *args) -> dict:
    """Run ``benchmarks/<name> --tiny`` on the synthetic digits; the stdout JSON must equal
    the ``--out`` file."""
    out = tmp_path / f"{name}.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    data = ("--set", "data.dataset=synthetic", "--data-dir", data_dir)
    proc = subprocess.run(
        [sys.executable, str(BENCH / name), "--tiny", "--out", str(out), *data, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == result
    return result


def _positive(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


PRECISION_FIELDS = (
    "train_images_per_sec",
    "train_step_seconds_median",
    "train_steps_measured",
    "train_seconds_measured",
    "train_peak_memory_mb",
    "sample_images_per_sec",
    "sample_image_nfes_per_sec",
    "sample_batch",
    "sample_seconds_measured",
    "sample_peak_memory_mb",
    "train_flops_per_sec",
    "train_mfu",
    "train_mfu_vs_bf16_peak",
    "sample_flops_per_image",
    "sample_flops_per_sec",
    "sample_mfu",
)


def _check_throughput_recipe(r: dict, peaks: dict) -> None:
    for key in ("parameters", "forward_flops_per_image", "train_flops_per_image", "nfe"):
        assert _positive(r[key]) and isinstance(r[key], int), key
    # backward costs about twice the forward (input grads + weight grads)
    assert 2.0 < r["train_flops_per_image"] / r["forward_flops_per_image"] < 4.0
    # classifier-free guidance adds a pass per step where it is active (none for the baseline)
    assert r["nfe"] <= r["passes_per_image"] <= 2 * r["nfe"]
    assert r["nfe"] == r["sampler_steps"]  # DDIM: one network call per step
    assert set(r["precisions"]) == {"fp32", "bf16"}
    for name, p in r["precisions"].items():
        assert all(_positive(p[k]) for k in PRECISION_FIELDS), (name, p)
        per_image = r["forward_flops_per_image"] * r["passes_per_image"]
        assert p["sample_flops_per_image"] == per_image
        assert p["sample_flops_per_sec"] == pytest.approx(p["sample_images_per_sec"] * per_image)
        train_fs = p["train_images_per_sec"] * r["train_flops_per_image"]
        assert p["train_flops_per_sec"] == pytest.approx(train_fs)
        assert p["train_mfu"] == pytest.approx(train_fs / peaks[name]["flops_per_sec"])
        nfe_rate = p["sample_images_per_sec"] * r["nfe"]
        assert p["sample_image_nfes_per_sec"] == pytest.approx(nfe_rate)
    fp32, bf16 = r["precisions"]["fp32"], r["precisions"]["bf16"]
    speedup = bf16["train_images_per_sec"] / fp32["train_images_per_sec"]
    assert r["bf16_speedup_train"] == pytest.approx(speedup)


def test_throughput_measures_each_batch_size_in_one_run(synthetic_data, tmp_path):
    args = ("--precisions", "fp32", "--profile-steps", "0", "--batch-size", "4", "8")
    # w = 1 is the plain conditional model: one network pass per step, not two
    args += ("--set", "sample.guidance=1")
    result = run_script("throughput.py", tmp_path, synthetic_data, *args)
    recipes = result["recipes"]
    assert [(r["name"], r["batch_size"]) for r in recipes] == [("smoke", 4), ("smoke", 8)]
    for r in recipes:
        assert _positive(r["precisions"]["fp32"]["train_images_per_sec"])
        assert r["passes_per_image"] == r["nfe"]


def test_throughput_peak_is_the_faster_pass_per_size():
    def peaks(*flops):
        runs = [
            {"size": n, "flops_per_sec": f, "seconds": 2 * n**3 / f}
            for n, f in zip((128, 256), flops, strict=True)
        ]
        best = max(runs, key=lambda r: r["flops_per_sec"])
        return {"fp32": {**best, "by_size": runs}}

    best = throughput.best_peaks(peaks(10.0, 30.0), peaks(20.0, 25.0))["fp32"]
    assert [r["flops_per_sec"] for r in best["by_size"]] == [20.0, 30.0]
    assert (best["size"], best["flops_per_sec"]) == (256, 30.0)
    assert best["passes_flops_per_sec"] == [30.0, 25.0]


def test_throughput_tiny(synthetic_data, tmp_path):
    extra = ("--baseline", "diffusers") if HAS_DIFFUSERS else ()
    result = run_script("throughput.py", tmp_path, synthetic_data, *extra)
    assert result["device"] == "cpu" and result["torch"] == torch.__version__
    peaks = result["matmul_peak"]
    for p in peaks.values():
        assert [r["size"] for r in p["by_size"]] == [128, 256]
        for r in (p, *p["by_size"]):
            assert r["flops_per_sec"] == pytest.approx(2 * r["size"] ** 3 / r["seconds"])
        assert p["flops_per_sec"] == max(r["flops_per_sec"] for r in p["by_size"])
    names = [r["name"] for r in result["recipes"]]
    assert names == ["smoke"] + (["diffusers"] if HAS_DIFFUSERS else [])
    assert result["recipes"][0]["passes_per_image"] == 2 * result["recipes"][0]["nfe"]  # w = 2
    for r in result["recipes"]:
        _check_throughput_recipe(r, peaks)
    for r in result["recipes"][:1]:
        prof = r["profile"]
        assert prof["steps"] == 1 and _positive(prof["step_ms_under_profiler"])
        ms = [op["self_cpu_ms_per_step"] for op in prof["top_ops"]]
        assert 1 <= len(ms) <= 10 and ms == sorted(ms, reverse=True) and min(ms) >= 0
        assert all(isinstance(op["op"], str) for op in prof["top_ops"])
        assert all(op["calls_per_step"] > 0 for op in prof["top_ops"])
        if prof["untracked_ms_per_step"] > 0:  # ops + Python overhead = the step
            total = prof["ops_self_cpu_ms_per_step"] + prof["untracked_ms_per_step"]
            assert total == pytest.approx(prof["step_ms_under_profiler"])
        phases = prof["phases"]  # disjoint named ranges inside the step
        assert set(phases) == {"data", "forward", "backward", "optimizer", "ema", "logging"}
        for name in ("data", "forward", "backward", "optimizer", "logging"):  # log_every = 1
            assert phases[name]["ms_per_step"] > 0, name
        spent = sum(p["ms_per_step"] for p in phases.values())
        assert spent <= prof["step_ms_under_profiler"] * (1 + 1e-6)
        for p in phases.values():
            assert p["share_of_step"] == pytest.approx(
                p["ms_per_step"] / prof["step_ms_under_profiler"]
            )


RECIPE_FIELDS = (
    "minutes",
    "steps",
    "epochs",
    "images_per_sec",
    "num_samples",
    "sampler",
    "nfe",
    "guidance",
    "sampling_seconds",
    "fd_mnist",
    "fd_floor",
    "fd_ratio_to_floor",
    "kid",
    "precision",
    "recall",
    "class_accuracy",
)


def _check_quality_row(row: dict, scored: bool) -> None:
    assert all(k in row for k in RECIPE_FIELDS), set(RECIPE_FIELDS) - row.keys()
    assert row["num_samples"] == 40 and row["budget_minutes"] == 0.02
    for key in ("minutes", "steps", "epochs", "images_per_sec", "nfe", "sampling_seconds"):
        assert _positive(row[key]), key
    assert row["epochs"] < 1  # a few steps of a tiny run
    if not scored:
        assert row["fd_mnist"] is None and row["fd_ratio_to_floor"] is None
        return
    assert row["fd_mnist"] >= 0 and row["fd_floor"] > 0 and isinstance(row["kid"], float)
    assert row["fd_ratio_to_floor"] == pytest.approx(row["fd_mnist"] / row["fd_floor"])
    for key in ("precision", "recall", "class_accuracy"):
        assert 0.0 <= row[key] <= 1.0, key


def test_quality_budget_tiny(synthetic_data, tmp_path):
    extra = ("--baseline", "diffusers") if HAS_DIFFUSERS else ()
    out_dir = tmp_path / "keep"
    result = run_script(
        "quality_budget.py",
        tmp_path,
        synthetic_data,
        "--allow-missing-evaluator",
        "--out-dir",
        out_dir,
        *extra,
    )
    scored = _evaluator_available()
    assert result["evaluator"]["available"] is scored
    assert result["num_samples"] == 40
    names = ["smoke"] + (["diffusers"] if HAS_DIFFUSERS else [])
    assert list(result["recipes"]) == names
    for name in names:
        _check_quality_row(result["recipes"][name], scored)
        with np.load(out_dir / f"{name}_samples.npz") as f:
            assert f["images"].shape == (40, 28, 28) and f["images"].dtype == np.uint8
            assert np.bincount(f["labels"]).tolist() == [4] * 10
        assert (out_dir / f"{name}_samples.png").is_file()
    assert (out_dir / "smoke" / "checkpoints" / "last.pt").is_file()
    if scored:
        floor = result["floor"]
        # the MNIST evaluator names about 80% of the synthetic digits (test_evaluator.py)
        assert floor["num_samples"] == 40 and floor["class_accuracy"] > 0.6
    if HAS_DIFFUSERS:
        ratios = result["ratios"]["smoke_over_diffusers"]
        a, b = result["recipes"]["smoke"], result["recipes"]["diffusers"]
        assert ratios["steps"] == pytest.approx(a["steps"] / b["steps"])
        if scored:
            assert ratios["fd_mnist"] == pytest.approx(a["fd_mnist"] / b["fd_mnist"])


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers not installed (optional extra)")
def test_diffusers_recipe_script_tiny(synthetic_data, tmp_path, capsys):
    # in-process (the subprocess runs above already import it as a script's module)
    import diffusers_recipe as dr

    npz, out = tmp_path / "dd.npz", tmp_path / "dd.json"
    data = ["--set", "data.dataset=synthetic", "--set", "data.val_size=100"]
    data += ["--data-dir", synthetic_data]
    argv = ["--tiny", "--minutes", "0.005", "--save-npz", str(npz), "--out", str(out), *data]
    assert dr.main(argv) == 0
    stats = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == stats
    assert stats["steps"] >= 1 and stats["nfe"] == stats["sampler_steps"] == 3
    assert stats["recipe"]["lr"] == 1e-3
    assert stats["recipe"]["beta_schedule"] == "squaredcos_cap_v2"
    with np.load(npz) as f:
        assert f["images"].shape == (40, 28, 28) and f["images"].dtype == np.uint8
        assert np.bincount(f["labels"]).tolist() == [4] * 10


@pytest.mark.skipif(not HAS_DIFFUSERS, reason="diffusers not installed (optional extra)")
def test_diffusers_model_is_class_conditioned():
    import diffusers_recipe as dr

    recipe = dr.DiffusersRecipe(**dr.TINY)
    model = dr.build(recipe).eval()
    assert model.unet.config.in_channels == 1 + recipe.class_emb_size
    x, t = torch.randn(2, 1, 28, 28), torch.tensor([500, 500])
    with torch.no_grad():
        same = model(x, t, torch.tensor([3, 3]))
        other = model(x, t, torch.tensor([3, 7]))
    assert same.shape == (2, 1, 28, 28)
    assert torch.equal(same[0], other[0]) and not torch.allclose(same[1], other[1])
    with pytest.raises(ValueError, match="precision"):
        dr.DiffusersRecipe(precision="fp16")


def test_ratios_and_floor_arithmetic():
    a = {"fd_mnist": 6.0, "class_accuracy": 0.99, "steps": 300, "recall": None}
    b = {"fd_mnist": 3.0, "class_accuracy": 0.1, "steps": 100, "recall": 0.5}
    r = quality_budget.ratios(a, b)
    assert r["fd_mnist"] == 2.0 and r["class_accuracy"] == pytest.approx(9.9)
    assert r["steps"] == 3.0 and r["recall"] is None and r["kid"] is None
    row = quality_budget.with_floor({"fd_mnist": 6.0}, {"fd_mnist": 2.0})
    assert row["fd_floor"] == 2.0 and row["fd_ratio_to_floor"] == 3.0
    assert quality_budget.with_floor({"fd_mnist": None}, None)["fd_ratio_to_floor"] is None


def test_bad_input_is_a_clear_error(capsys):
    assert quality_budget.main(["--config", "no/such.yaml"]) == 2
    assert "config file not found: no/such.yaml" in capsys.readouterr().err
    assert throughput.main(["--configs", "configs/smoke.yaml", "--set", "train.lrr=1"]) == 2
    assert "unknown config key 'train.lrr'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        quality_budget.parse_args(["--num-samples", "5"])
    with pytest.raises(SystemExit):
        throughput.parse_args(["--tiny", "--configs", "configs/smoke.yaml"])


def test_architecture_ablation_tiny(capsys):
    import architecture_ablation

    assert architecture_ablation.main(["--tiny"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["matmul_peak_fp32"] > 0 and result["matmul_peak_bf16"] > 0
    (row,) = result["variants"]
    modes = ("fp32", "fp32_channels_last", "bf16", "bf16_channels_last")
    assert result["modes"] == list(modes)
    for mode in modes:
        assert row[f"{mode}_images_per_sec"] > 0
    assert row["parameters"] > 0 and row["train_flops_per_image"] > 0
    best = max(row[f"{m}_images_per_sec"] for m in modes)
    assert math.isclose(row["best_flops_per_sec"], best * row["train_flops_per_image"])


def test_architecture_ablation_modes_filter(capsys):
    import architecture_ablation

    assert architecture_ablation.main(["--tiny", "--modes", "fp32"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["variants"]
    assert row["fp32_images_per_sec"] > 0 and "bf16_images_per_sec" not in row
    assert math.isclose(
        row["best_flops_per_sec"], row["fp32_images_per_sec"] * row["train_flops_per_image"]
    )
    with pytest.raises(SystemExit):
        architecture_ablation.main(["--only", "no-such-variant"])
    assert "matches no variant" in capsys.readouterr().err


def test_quality_budget_distill_specs():
    from mnistdiff.config import ConfigError

    assert quality_budget.parse_distill_spec("progressive:4") == ("progressive", 4)
    assert quality_budget.parse_distill_spec("guidance") == ("guidance", None)
    for bad in ("magic:4", "reflow:0", "reflow:x"):
        with pytest.raises(ConfigError, match="--distill"):
            quality_budget.parse_distill_spec(bad)
    row = quality_budget.over_teacher({"fd_mnist": 0.6, "sampling_seconds": 10.0}, {
        "fd_mnist": 0.5, "sampling_seconds": 100.0, "passes_per_image": 40.0})  # fmt: skip
    assert row["fd_mnist_over_teacher"] == pytest.approx(1.2)
    assert row["sampling_seconds_over_teacher"] == pytest.approx(0.1)
    assert row["passes_per_image_over_teacher"] is None


def test_autoguidance_tiny(synthetic_data, tmp_path):
    """With the weak model equal to the strong one, CFG through the weak-unconditional proxy
    is CFG itself (same images, same scores). The routing itself is checked below."""
    result = run_script("autoguidance.py", tmp_path, synthetic_data)
    rows = {r["mode"]: r for r in result["rows"]}
    assert set(rows) == {"cfg", "auto", "weak_uncond"}
    for r in rows.values():
        assert r["num_samples"] == result["num_samples"] and r["passes_per_image"] == 2 * r["nfe"]
    same = ("fd_mnist", "kid", "precision", "recall", "class_accuracy")
    assert {k: rows["weak_uncond"][k] for k in same} == {k: rows["cfg"][k] for k in same}


def test_autoguidance_proxy_routes_the_negative_half():
    import autoguidance

    def strong(x, t, y, w=None):
        return x + y.float().view(-1, 1, 1, 1)

    def weak(x, t, y, w=None):
        return x - 100 * y.float().view(-1, 1, 1, 1)

    strong.null_label = 10
    x, t, y = torch.zeros(4, 1, 2, 2), torch.full((4,), 0.5), torch.tensor([3, 7, 10, 10])
    auto = autoguidance.WeakNegative(strong, weak, "auto")(x, t, y)
    assert auto[:2, 0, 0, 0].tolist() == [3.0, 7.0] and auto[2:, 0, 0, 0].tolist() == [
        -300.0,
        -700.0,
    ]
    uncond = autoguidance.WeakNegative(strong, weak, "weak_uncond")(x, t, y)
    assert uncond[2:, 0, 0, 0].tolist() == [-1000.0, -1000.0]
    plain = torch.tensor([3, 7, 1, 2])  # not a CFG batch: the strong model alone
    assert torch.equal(
        autoguidance.WeakNegative(strong, weak, "auto")(x, t, plain), strong(x, t, plain)
    )
