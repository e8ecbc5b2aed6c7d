"""Editing (mnistdiff.edit): maths on Gaussian toys, behaviour on tiny untrained models of every
kind, bad input, and the CLI end to end on a model trained from configs/smoke.yaml."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import ROOT
from mnistdiff import edit
from mnistdiff.build import build_denoiser, data_spec
from mnistdiff.checkpoint import write_export
from mnistdiff.cli import main
from mnistdiff.config import load_config, to_dict
from mnistdiff.data import DataSpec
from mnistdiff.device import select_precision
from mnistdiff.edit.core import full_grid, run_sampler, run_steps, truncate_grid
from mnistdiff.edit.interpolate import mixed_label_embedding
from mnistdiff.sample import Pipeline
from mnistdiff.samplers import get_sampler
from mnistdiff.schedules import build_schedule, time_grid

MU, S = 0.2, 0.5  # Gaussian toy data N(MU, S^2) per pixel


def gaussian_denoiser(schedule):
    """The exact x0_hat = E[x0 | x_t] for data N(MU, S^2 I)."""

    def denoise(x, t):
        a, s = (v.view(-1, 1, 1, 1).to(x.dtype) for v in schedule.alpha_sigma(t.double()))
        return MU + S * S * a * (x - a * MU) / (a * a * S * S + s * s)

    return denoise


def exact_latent(schedule, x0, t):
    """The probability-flow ODE keeps the z-score: x_t = a MU + sqrt(a^2 S^2 + s^2) (x0 - MU)/S."""
    a, s = (float(v) for v in schedule.alpha_sigma(torch.tensor(t, dtype=torch.float64)))
    return a * MU + math.sqrt(a * a * S * S + s * s) * (x0 - MU) / S


def tiny_pipe(*overrides, seed=0):
    """An untrained tiny model of the smoke config (with overrides) as a Pipeline."""
    cfg = load_config(ROOT / "configs" / "smoke.yaml", list(overrides))
    spec = data_spec(cfg.data, DataSpec())
    torch.manual_seed(seed)
    denoiser = build_denoiser(cfg, spec).eval()
    cpu = torch.device("cpu")
    return Pipeline(cfg, spec, denoiser, cpu, select_precision("fp32", cpu), Path("."))


def labels_matter(pipe, seed=0):
    """Fill the backbone's zero-initialised layers with noise, so labels (and guidance) act."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in pipe.denoiser.backbone.parameters():
            if not p.any():
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return pipe


def digits(n=3, seed=0):
    """Random MNIST-like uint8 images: a bright blob on black."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(n, 28, 28, dtype=torch.uint8)
    for i in range(n):
        r, c = torch.randint(6, 16, (2,), generator=g).tolist()
        x[i, r : r + 10, c : c + 6] = torch.randint(100, 256, (10, 6), generator=g).to(torch.uint8)
    return x


KINDS = {
    "unet-cosine-eps": [],
    "unet-flow-velocity": ["diffusion.schedule=flow", "diffusion.prediction=velocity"],
    "unet-linear-v-pad32": [
        "diffusion.prediction=v",
        "diffusion.schedule=linear",
        "data.pad_to_32=true",
    ],
    "dit-sigmoid-x0": ["model.type=dit", "diffusion.schedule=sigmoid", "diffusion.prediction=x0"],
    "unet-uncond": ["model.conditional=false"],
}


# --------------------------------------------------------------------------- maths


@pytest.mark.parametrize(("sampler", "order"), [("ddim", 1), ("euler", 1), ("heun", 2)])
@pytest.mark.parametrize("schedule_name", ["linear", "flow"])
def test_inversion_of_exact_denoiser_converges_at_solver_order(sampler, order, schedule_name):
    schedule = build_schedule(schedule_name, 1000)
    x0 = MU + S * torch.randn(32, 1, 4, 4, generator=torch.Generator().manual_seed(0)).double()
    den = gaussian_denoiser(schedule)
    errors = []
    for n in (20, 40, 80):
        ts = time_grid(schedule, "karras", n)
        z, nfe = edit.invert_x(den, x0, schedule, ts, sampler)
        assert nfe == get_sampler(sampler).nfe(n)  # as many evaluations as decoding
        errors.append(float((z - exact_latent(schedule, x0, float(ts[0]))).abs().max()))
        back = get_sampler(sampler).fn(den, z, schedule, ts).x  # decode: round trip
        assert float((back - x0).abs().max()) < 4 * errors[-1]
    rates = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(0.85 * order < r < 1.2 * order for r in rates), (errors, rates)


def test_stepwise_driver_equals_one_run_for_one_step_samplers():
    schedule = build_schedule("cosine", 1000)
    den = gaussian_denoiser(schedule)
    x = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    cases = [("ddim", {}), ("ddpm", {}), ("heun", {}), ("ddim", {"eta": 0.5})]
    cases += [("heun", {"s_churn": 3.0}), ("euler", {"s_churn": 5.0, "s_noise": 1.007})]
    for name, kwargs in cases:
        ts = full_grid(schedule, name, 7)
        full = run_sampler(
            name, den, x, schedule, ts, gen=torch.Generator().manual_seed(2), sampler_kwargs=kwargs
        )
        steps = run_steps(
            name, den, x, schedule, ts, gen=torch.Generator().manual_seed(2), sampler_kwargs=kwargs
        )
        assert torch.equal(full.x, steps.x) and full.nfe == steps.nfe, (name, kwargs)
        if kwargs:  # the options act (churn per step is s_churn / N in both)
            plain = run_sampler(name, den, x, schedule, ts, gen=torch.Generator().manual_seed(2))
            assert not torch.allclose(plain.x, full.x), (name, kwargs)


def test_truncated_grid_starts_at_strength_and_keeps_the_rest():
    ts = time_grid(build_schedule("flow", 1000), "uniform", 10)
    part = truncate_grid(ts, 0.55)
    assert part[0] == 0.55 and torch.equal(part[1:], ts[ts < 0.55]) and part[-1] == 0
    assert torch.equal(truncate_grid(ts, 1.0), ts)


def test_slerp_endpoints_exact_and_norm_kept():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 1, 28, 28, generator=g), torch.randn(3, 1, 28, 28, generator=g)
    assert torch.equal(edit.slerp(a, b, 0.0), a) and torch.equal(edit.slerp(a, b, 1.0), b)
    mid = edit.slerp(a, b, 0.5)
    ratio = mid.flatten(1).norm(dim=1) / a.flatten(1).norm(dim=1)
    assert torch.allclose(ratio, torch.ones(3), atol=0.05)  # a linear mix would give ~0.71
    assert torch.allclose(edit.slerp(a, a, 0.3), a, atol=1e-5)  # parallel: no NaN


# --------------------------------------------------------------------------- methods


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("method", ["repaint", "replace"])
def test_inpaint_keeps_known_pixels_bit_for_bit(kind, method):
    pipe = tiny_pipe(*KINDS[kind])
    images = digits(3)
    labels = [1, 2, 3] if pipe.conditional else None
    out = edit.inpaint(pipe, images, "box:4,10,20,26", labels, method=method, resample=2, steps=4)
    mask = edit.make_mask("box:4,10,20,26")
    assert out.images.dtype == torch.uint8 and out.images.shape == (3, 28, 28)
    assert torch.equal(out.images[:, ~mask], images[:, ~mask])
    assert not torch.equal(out.images[:, mask], images[:, mask])
    assert out.nfe == (4 if method == "replace" else 2 * 3 + 1)  # R repeats except the last
    again = edit.inpaint(pipe, images, "box:4,10,20,26", labels, method=method, resample=2, steps=4)
    assert torch.equal(out.images, again.images)  # seeded


@pytest.mark.parametrize("kind", list(KINDS))
def test_every_method_runs_on_every_model_kind(kind):
    pipe = tiny_pipe(*KINDS[kind])
    images = digits(2)
    cond = pipe.conditional
    rec = edit.reconstruct(pipe, images, [3, 4] if cond else None, steps=4)
    assert len(rec.info["psnr"]) == 2 and rec.info["nfe_invert"] == rec.info["nfe_decode"] == 4
    sd = edit.sdedit(pipe, images, 0.5, 7 if cond else None, steps=4, seed=3)
    assert sd.images.shape == (2, 28, 28) and sd.nfe == 2
    assert torch.equal(
        sd.images, edit.sdedit(pipe, images, 0.5, 7 if cond else None, steps=4, seed=3).images
    )
    frames = edit.interpolate(pipe, 3, seeds=(1, 2), labels=(3, 8) if cond else None, steps=3)
    assert frames.images.shape == (3, 28, 28)
    if cond:
        rs = edit.restyle(pipe, images, 5, [3, 4], steps=3, strength=0.8)
        assert rs.labels.tolist() == [5, 5] and rs.images.shape == (2, 28, 28)
        comp = edit.compose(pipe, "2+1", steps=3)
        assert len(comp.boxes) == 3


def test_inversion_round_trip_of_a_network_is_close_with_heun():
    """A smooth (random) network is inverted and decoded back to the same uint8 images."""
    pipe = tiny_pipe("diffusion.schedule=flow", "diffusion.prediction=velocity")
    images = digits(2)
    out = edit.reconstruct(pipe, images, [1, 2], steps=16, sampler="heun", grid="karras")
    assert out.info["mean_psnr"] > 40 and min(out.info["psnr"]) > 40
    assert out.info["nfe_invert"] == out.info["nfe_decode"] == 31


def test_interpolation_endpoints_equal_the_endpoint_samples():
    pipe = tiny_pipe()
    out = edit.interpolate(pipe, 5, seeds=(4, 9), labels=(3, 8), steps=3)
    first = edit.endpoint_sample(pipe, 4, 3, steps=3)
    last = edit.endpoint_sample(pipe, 9, 8, steps=3)
    assert (out.images[0].int() - first[0].int()).abs().max() <= 1
    assert (out.images[-1].int() - last[0].int()).abs().max() <= 1
    assert out.labels.tolist() == [3, 3, 8, 8, 8]
    images = digits(2)
    between = edit.interpolate(pipe, 3, images=images, labels=(1, 2), steps=3)
    rec = edit.reconstruct(pipe, images, [1, 2], steps=3)
    assert (between.images[[0, -1]].int() - rec.images.int()).abs().max() <= 1


def test_label_embedding_mix_at_the_ends_is_the_plain_label():
    pipe = tiny_pipe()
    backbone, x = pipe.denoiser.backbone, torch.randn(2, 1, 28, 28)
    t, y0, y1 = torch.full((2,), 0.5), torch.tensor([3, 3]), torch.tensor([8, 8])
    with torch.no_grad(), mixed_label_embedding(backbone, y1, torch.tensor([0.0, 1.0])):
        mixed = backbone(x, t, y0)
    with torch.no_grad():
        assert torch.equal(mixed[0], backbone(x, t, y0)[0])
        assert torch.allclose(mixed[1], backbone(x, t, y1)[1], atol=1e-6)
        assert torch.equal(backbone(x, t, y0), backbone(x, t, y0))  # hook removed


def test_compose_places_every_character_in_order():
    pipe = tiny_pipe()
    out = edit.compose(pipe, "2026", steps=3, seed=5)
    assert out.text == "2026" and out.glyphs.shape == (4, 28, 28) and len(out.boxes) == 4
    for (l0, r0), (l1, _) in zip(out.boxes, out.boxes[1:], strict=False):
        assert l0 < r0 < l1 and 1 <= l1 - r0 <= 4  # gaps within (1, 4)
    assert out.image.shape[0] == 28 and out.image.shape[1] == out.boxes[-1][1] + 2
    for i in range(4):
        cut = out.cut(i)
        left, right = out.boxes[i]
        x, y = out.offsets[i]
        assert cut.shape == (28, 28)
        assert cut.max() > 0 and torch.equal(
            cut[:, : left - x], torch.zeros_like(cut[:, : left - x])
        )
    assert torch.equal(edit.compose(pipe, "2026", steps=3, seed=5).image, out.image)


def test_compose_layout_and_operators_on_synthetic_glyphs():
    from mnistdiff.edit.compose import layout

    bar = torch.zeros(28, 28, dtype=torch.uint8)
    bar[4:24, 12:15] = 255  # a "1", 3 pixels wide
    assert edit.stroke_width(bar[None]) == 3.0
    plus = edit.draw_operator("+", 3.0)
    assert plus.dtype == torch.uint8 and (plus > 127).sum(1).max() >= 10  # a horizontal stroke
    assert edit.stroke_width(edit.draw_operator("-", 3.0)[None]) == 12.0  # one run, full length
    canvas, boxes, offsets = layout([bar, plus, bar], seed=0, gap=(2, 2), jitter=0)
    assert [r - l for l, r in boxes] == [3, 12, 3] or boxes[1][1] - boxes[1][0] >= 12
    assert boxes[1][0] - boxes[0][1] == 2 and boxes[2][0] - boxes[1][1] == 2
    assert int(canvas[14, boxes[0][0]]) == 255 and canvas.shape[1] == boxes[-1][1] + 2


# --------------------------------------------------------------------------- options


def test_edits_take_samplings_options_and_record_them():
    """Options are config.SampleOptions: the sampler's own options act in edits, seeded."""
    from mnistdiff import SampleOptions

    pipe, images = tiny_pipe(), digits(2)
    base = dict(sampler="heun", steps=4, seed=3)
    plain = edit.sdedit(pipe, images, 0.8, [1, 2], **base)
    churn = edit.sdedit(pipe, images, 0.8, [1, 2], s_churn=20.0, **base)
    again = edit.sdedit(pipe, images, 0.8, [1, 2], s_churn=20.0, **base)
    assert torch.equal(churn.images, again.images)  # deterministic given the seed
    assert not torch.equal(churn.images, plain.images)  # the option acts
    record = churn.info["options"]
    assert record["sampler"] == "heun" and record["s_churn"] == 20.0 and "eta" not in record
    assert SampleOptions(**record) == edit.sampling(pipe, sampler="heun", steps=4, s_churn=20.0)
    # the RePaint driver passes them on too; so do guidance rescale and interval
    kw = dict(method="replace", steps=4, seed=1, sampler="ddim")
    ip = edit.inpaint(pipe, images, "bottom", [1, 2], **kw)
    ip_eta = edit.inpaint(pipe, images, "bottom", [1, 2], eta=1.0, **kw)
    assert not torch.equal(ip.images, ip_eta.images) and ip_eta.info["options"]["eta"] == 1.0
    pipe, guided = labels_matter(pipe), dict(sampler="ddim", steps=4, seed=3, guidance=4.0)
    g0 = edit.sdedit(pipe, images, 0.8, [1, 2], **guided)
    g1 = edit.sdedit(pipe, images, 0.8, [1, 2], guidance_rescale=1.0, **guided)
    g2 = edit.sdedit(pipe, images, 0.8, [1, 2], guidance_interval=(0.0, 0.1), **guided)
    assert not torch.equal(g0.images, g1.images) and not torch.equal(g0.images, g2.images)
    assert g2.info["options"]["guidance_interval"] == [0.0, 0.1]


def test_an_edit_started_from_noise_samples_exactly_as_sample_does():
    """One denoise construction and one options type: edit.core == Pipeline.generate."""
    from mnistdiff.edit.core import generator, grid_for, randn, sample_from
    from mnistdiff.samplers import initial_sample

    pipe, labels = labels_matter(tiny_pipe()), torch.tensor([3, 8, 1])
    over = dict(sampler="ddim", steps=4, eta=0.6, guidance=3.0, guidance_rescale=0.5)
    over["guidance_interval"] = (0.2, 0.9)
    opts = edit.sampling(pipe, **over)
    gen = generator(pipe, 5)  # seeded as batch 0 of seed 5
    ts = grid_for(opts, pipe.denoiser.schedule)
    x = initial_sample(pipe.denoiser.schedule, ts, randn(pipe, 3, gen))
    ours = sample_from(pipe, x, ts, labels, opts, gen=gen)
    theirs = pipe.generate(labels, seed=5, batch_size=3, **over)
    assert torch.equal(ours.x, theirs.x) and ours.nfe == theirs.nfe


def test_inapplicable_or_noisy_options_are_errors():
    from mnistdiff.config import ConfigError

    pipe, images = tiny_pipe(), digits(2)
    with pytest.raises(ConfigError, match="does not apply to sampler 'dpmpp_2m'"):
        edit.sdedit(pipe, images, 0.5, sampler="dpmpp_2m", eta=0.3, steps=3)
    with pytest.raises(ConfigError, match="does not apply to sampler 'ddim'.*euler, heun"):
        edit.inpaint(pipe, images, "bottom", sampler="ddim", s_churn=1.0, steps=3)
    with pytest.raises(ConfigError, match="sample.s_churn"):
        edit.sdedit(pipe, images, 0.5, sampler="heun", s_churn=-1.0, steps=3)
    # inversion (and so restyle, reconstruct, interpolation) needs the deterministic ODE
    with pytest.raises(ValueError, match=r"eta=0.5 makes ddim draw noise; use eta=0"):
        edit.invert(pipe, images, sampler="ddim", eta=0.5, steps=3)
    with pytest.raises(ValueError, match=r"s_churn=2.0 makes heun draw noise"):
        edit.reconstruct(pipe, images, sampler="heun", s_churn=2.0, steps=3)
    with pytest.raises(ValueError, match=r"s_churn=2.0 makes euler draw noise"):
        edit.restyle(pipe, images, 3, sampler="euler", s_churn=2.0, steps=3)
    with pytest.raises(ValueError, match="needs a deterministic sampler; 'ddpm'"):
        edit.interpolate(pipe, 3, seeds=(1, 2), sampler="ddpm", steps=3)
    with pytest.raises(ValueError, match="steps or nfe, not both"):
        edit.sdedit(pipe, images, 0.5, steps=3, nfe=3)


def test_inversion_sets_the_configs_noise_options_to_zero():
    """A config that samples with eta > 0 still inverts: its own eta (not asked for) becomes 0."""
    pipe = tiny_pipe("sample.sampler=ddim", "sample.eta=0.7")
    inv = edit.invert(pipe, digits(2), [1, 2], steps=3)
    assert inv.sampling.sampler == "ddim" and inv.sampling.eta == 0.0
    assert edit.sampling(pipe).eta == 0.7  # sampling itself keeps the config's value
    churny = tiny_pipe("sample.sampler=heun", "sample.s_churn=4")
    assert edit.invert(churny, digits(1), steps=3).sampling.s_churn == 0.0
    z = edit.invert(churny, digits(1), steps=3).latents
    assert torch.equal(z, edit.invert(churny, digits(1), steps=3).latents)  # no noise drawn
    # decoding starts from the inversion's options; overrides win (nfe picks the steps)
    x, nfe = edit.decode(churny, edit.invert(churny, digits(1), steps=3), nfe=5)
    assert nfe == 5 and x.shape == (1, 1, 28, 28)


def test_edit_commands_have_the_sample_commands_sampling_flags():
    from mnistdiff.cli import build_parser

    commands = build_parser()._subparsers._group_actions[0].choices

    def flags(parser):
        return {name for action in parser._actions for name in action.option_strings}

    methods = commands["edit"]._subparsers._group_actions[0].choices
    sampling = flags(commands["sample"]) - {"--digits", "--per-class", "--num", "--gif"}
    sampling -= {"--unconditional", "--out", "--save-npz", "--checkpoint", "-h", "--help"}
    assert {"--s-churn", "--eta", "--guidance-rescale", "--guidance-interval"} <= sampling
    for name, parser in [*methods.items(), ("compose", commands["compose"])]:
        assert sampling <= flags(parser), (name, sampling - flags(parser))
    args = build_parser().parse_args(
        ["edit", "sdedit", "--checkpoint", "c", "--sampler", "heun", "--s-churn", "3"]
    )
    from mnistdiff.cli import sampling_overrides

    assert sampling_overrides(args) == {"sampler": "heun", "s_churn": 3.0}


# --------------------------------------------------------------------------- inputs


def _png(path, array, mode="L"):
    Image.fromarray(array, mode=mode).save(path)
    return path


def test_dark_on_light_png_of_any_size_is_inverted_and_centred(tmp_path):
    paper = np.full((120, 90), 250, np.uint8)
    paper[20:100, 40:52] = 10  # a dark "1" on white paper, off centre
    image, inverted = edit.load_image(_png(tmp_path / "one.png", paper))
    assert inverted and image.shape == (28, 28) and image.dtype == torch.uint8
    assert image[0].max() == 0 and image[:, 0].max() == 0 and image.max() == 255
    ys, xs = torch.nonzero(image > 127, as_tuple=True)
    assert ys.max() - ys.min() + 1 in (19, 20, 21)  # MNIST: the digit fits 20x20
    assert (
        abs(float(xs.float().mean()) - 13.5) <= 1.5 and abs(float(ys.float().mean()) - 13.5) <= 1.5
    )


def test_mnist_like_png_is_read_unchanged_and_rgba_works(tmp_path):
    x = digits(1)[0].numpy()
    image, inverted = edit.load_image(_png(tmp_path / "d.png", x))
    assert not inverted and np.array_equal(image.numpy(), x)
    rgba = np.zeros((60, 60, 4), np.uint8)
    rgba[10:50, 25:33] = (0, 0, 0, 255)  # black ink on a transparent canvas
    image, inverted = edit.load_image(_png(tmp_path / "t.png", rgba, "RGBA"))
    assert inverted and image.max() == 255 and image[0].max() == 0


def test_bad_inputs_are_clear_errors(tmp_path):
    pipe, images = tiny_pipe(), digits(2)
    (tmp_path / "x.png").write_text("not an image")
    with pytest.raises(ValueError, match="not an image"):
        edit.load_image(tmp_path / "x.png")
    with pytest.raises(ValueError, match="blank"):
        edit.load_image(_png(tmp_path / "blank.png", np.zeros((30, 30), np.uint8)))
    with pytest.raises(ValueError, match="mask is empty"):
        edit.make_mask(np.zeros((28, 28)))
    with pytest.raises(ValueError, match="whole image"):
        edit.make_mask(np.ones((28, 28)))
    with pytest.raises(ValueError, match="28x28"):
        edit.make_mask(_png(tmp_path / "m.png", np.full((32, 32), 255, np.uint8)))
    with pytest.raises(ValueError, match="bad box"):
        edit.make_mask("box:3,3,2,9")
    with pytest.raises(ValueError, match="not one of bottom"):
        edit.make_mask("middle")
    for strength in (0.0, 1.5, float("nan"), -0.2):
        with pytest.raises(ValueError, match="strength must be in"):
            edit.sdedit(pipe, images, strength)
    with pytest.raises(ValueError, match=r"outside the model's classes 0..9"):
        edit.sdedit(pipe, images, 0.5, labels=10)
    with pytest.raises(ValueError, match="cannot run backwards"):
        edit.invert(pipe, images, sampler="dpmpp_2m")
    with pytest.raises(ValueError, match="allowed are the digits"):
        edit.compose(pipe, "12a")
    with pytest.raises(ValueError, match="unknown inpainting method"):
        edit.inpaint(pipe, images, "bottom", method="magic")
    uncond = tiny_pipe("model.conditional=false")
    with pytest.raises(ValueError, match="unconditional"):
        edit.restyle(uncond, images, 8)
    with pytest.raises(ValueError, match="unconditional"):
        edit.compose(uncond, "12")


def test_inputs_from_the_test_set_and_npz(digits, tmp_path):
    from mnistdiff.data import load_dataset
    from mnistdiff.sample import save_npz

    dataset, folder = digits
    test_set = {"dataset": dataset, "data_dir": folder}
    arrays = load_dataset(dataset, folder)
    got = edit.load_inputs(from_test="0,2-3", **test_set)
    want = arrays.test_labels[[0, 2, 3]].tolist()
    assert want == [7, 1, 0] or dataset != "mnist"  # the first MNIST test labels
    assert got.labels.tolist() == want and got.names == ["test[0]", "test[2]", "test[3]"]
    assert torch.equal(got.images, arrays.test_images[[0, 2, 3]])
    save_npz(tmp_path / "s.npz", got.images, torch.tensor([-1, -1, -1]))
    both = edit.load_inputs(from_test=[0], npz=tmp_path / "s.npz", **test_set)
    assert torch.equal(both.images[1:], got.images)
    assert both.labels.tolist() == [want[0], -1, -1, -1]
    with pytest.raises(ValueError, match="test indices"):
        edit.load_inputs(from_test=[70000], **test_set)
    with pytest.raises(ValueError, match="no input"):
        edit.load_inputs()


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def trained(tmp_path_factory, synthetic_data):
    """A 2-step smoke model on the test digits; ``--from-test`` reads that dataset's test split."""
    from conftest import digits_source
    from mnistdiff.train import train

    dataset, data = digits_source(synthetic_data)
    run_dir = tmp_path_factory.mktemp("edit") / "run"
    overrides = [f"data.dataset={dataset}", f"data.data_dir={data}"]
    cfg = load_config(
        ROOT / "configs" / "smoke.yaml",
        [f"train.run_dir={run_dir}", *overrides, "train.steps=2", "train.val_every=2"],
    )
    train(cfg)
    return run_dir, (dataset, data)


def run(*argv):
    return main([str(a) for a in argv])


def test_cli_end_to_end(trained, tmp_path, capsys, monkeypatch):
    run_dir, (dataset, data) = trained
    ck = ["--checkpoint", run_dir, "--steps", "3"]
    paper = np.full((50, 40), 255, np.uint8)
    paper[10:40, 15:22] = 0
    user = _png(tmp_path / "user.png", paper)

    assert (
        run(
            "edit",
            "invert",
            *ck,
            "--from-test",
            "0,1",
            "--image",
            user,
            "--out",
            tmp_path / "i.png",
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "no label: mean PSNR" in out and "NFE 3 invert + 3 decode" in out and "inverted" in out
    # rows: 3 inputs; columns: input, reconstruction (no label: the PNG has none); 2x scale
    assert Image.open(tmp_path / "i.png").size == ((2 * 30 + 2) * 2, (3 * 30 + 2) * 2)

    npz = tmp_path / "inpaint.npz"
    args = ["--from-test", "3,4", "--mask", "bottom", "--resample", "2", "--save-npz", npz]
    assert run("edit", "inpaint", *ck, *args, "--label", "true", "--out", tmp_path / "p.png") == 0
    with np.load(npz) as f:
        images, labels = f["images"], f["labels"]
    test_set = {"data_dir": data, "dataset": dataset}
    real = edit.load_inputs(from_test="3,4", **test_set).images.numpy()
    assert images.shape == (8, 28, 28)  # 2 methods x 2 variations x 2 inputs
    assert np.array_equal(images[:, :14], np.tile(real[:, :14], (4, 1, 1)))
    assert labels.tolist() == edit.load_inputs(from_test="3,4", **test_set).labels.tolist() * 4

    assert (
        run(
            "edit",
            "restyle",
            *ck,
            "--from-test",
            "5",
            "--to-label",
            "0,8",
            "--out",
            tmp_path / "r.png",
        )
        == 0
    )
    assert (
        run(
            "edit",
            "sdedit",
            *ck,
            "--image",
            user,
            "--strength",
            "0.5",
            "--label",
            "1",
            "--variations",
            "2",
            "--out",
            tmp_path / "s.png",
        )
        == 0
    )
    assert (
        run(
            "edit",
            "interpolate",
            *ck,
            "--seeds",
            "1,2",
            "--label",
            "3,8",
            "--frames",
            "4",
            "--out",
            tmp_path / "f.png",
        )
        == 0
    )
    assert (tmp_path / "f.gif").is_file()
    assert (
        run("compose", "3+4=7", *ck, "--out", tmp_path / "c.png", "--save-npz", tmp_path / "c.npz")
        == 0
    )
    with np.load(tmp_path / "c.npz") as f:
        assert f["labels"].tolist() == [3, -1, 4, -1, 7]
    for name in ("i", "p", "r", "s", "f", "c"):
        assert Image.open(tmp_path / f"{name}.png").format == "PNG"


def test_cli_bad_input_exits_nonzero_and_writes_nothing(trained, tmp_path, capsys, monkeypatch):
    run_dir, (dataset, data) = trained
    out = tmp_path / "out.png"
    (tmp_path / "bad.png").write_text("nope")
    _png(tmp_path / "big.png", np.full((30, 30), 255, np.uint8))
    cases = [
        (["edit", "sdedit", "--image", tmp_path / "bad.png"], "not an image"),
        (["edit", "inpaint", "--from-test", "1", "--mask", tmp_path / "big.png"], "28x28"),
        (["edit", "inpaint", "--from-test", "1", "--mask", "box:0,0,28,28"], "whole image"),
        (["edit", "sdedit", "--from-test", "1", "--strength", "1.5"], "strength must be in"),
        (["edit", "sdedit", "--from-test", "1", "--label", "12"], "outside the model's classes"),
        (["compose", "12x"], "allowed are the digits"),
        (["edit", "invert", "--from-test", "1", "--sampler", "ddpm"], "cannot run backwards"),
        (["edit", "invert", "--from-test", "1", "--sampler", "ddim", "--eta", "0.3"], "use eta=0"),
        (["edit", "sdedit", "--from-test", "1", "--sampler", "euler", "--eta", "0.3"], "apply"),
        (["edit", "inpaint", "--from-test", "1", "--mask", "top", "--s-churn", "2"], "apply"),
    ]
    for argv, message in cases:
        assert run(*argv, "--checkpoint", run_dir, "--steps", "2", "--out", out) == 1, argv
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
        assert not out.exists()
    argv = ["compose", "12", "--checkpoint", run_dir, "--out", tmp_path / "c.jpg"]
    assert run(*argv) == 1 and "path ending in .png" in capsys.readouterr().err
    # an unconditional model cannot take --to-label
    pipe = tiny_pipe("model.conditional=false", f"data.dataset={dataset}", f"data.data_dir={data}")
    export = write_export(
        tmp_path / "uncond",
        to_dict(pipe.cfg),
        pipe.spec.to_dict(),
        pipe.denoiser.backbone.state_dict(),
    )
    argv = ["edit", "restyle", "--checkpoint", export, "--from-test", "1", "--to-label", "8"]
    assert run(*argv, "--out", out) == 1
    assert "unconditional" in capsys.readouterr().err and not out.exists()


# --------------------------------------------------------------------------- benchmark


def test_edit_quality_benchmark_tiny(digits, tmp_path):
    """benchmarks/edit_quality.py --tiny: every section, consistent JSON (numbers mean nothing)."""
    import json
    import os
    import subprocess
    import sys

    pipe = tiny_pipe(f"data.dataset={digits[0]}", f"data.data_dir={digits[1]}")
    export = write_export(
        tmp_path / "tiny",
        to_dict(pipe.cfg),
        pipe.spec.to_dict(),
        pipe.denoiser.backbone.state_dict(),
    )
    out = tmp_path / "edit.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = ROOT / "benchmarks" / "edit_quality.py"
    argv = [sys.executable, str(script), "--tiny", "--checkpoint", str(export), "--out", str(out)]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert json.loads(out.read_text()) == result and result["tiny"] and result["n_test_digits"] == 4
    inv = result["inversion"]
    assert {(r["sampler"], r["label"], r["nfe_invert"]) for r in inv} == {
        ("ddim", False, 2), ("ddim", True, 2), ("ddim", False, 4), ("ddim", True, 4),
        ("heun", False, 3), ("heun", True, 3),
    }  # fmt: skip
    assert all(r["nfe_invert"] == r["nfe_decode"] and r["mean_psnr"] >= r["min_psnr"] for r in inv)
    assert all(r["known_pixels_exact"] for r in result["inpaint"]) and len(result["inpaint"]) == 4
    assert [r["strength"] for r in result["sdedit"]] == [0.5, 1.0]
    for r in result["sdedit"] + result["restyle"]["by_strength"]:
        assert all(0 <= r[k] <= 1 for k in r if k.endswith("accuracy") or k == "still_source")
    assert result["compose"]["digits"] == 8 and 0 <= result["compose"]["digit_accuracy"] <= 1
