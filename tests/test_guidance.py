import pytest
import torch

from mnistdiff.guidance import (
    classifier_free,
    conditional,
    guidance_input,
    thresholded,
    unconditional,
)
from mnistdiff.samplers import ddim, initial_sample
from mnistdiff.schedules import build_schedule, time_grid

NULL = 10
B = 6


class ToyModel:
    """Conditional "model" whose output depends on x, t and the label; records every call."""

    def __init__(self):
        self.calls = []  # batch sizes
        self.labels_seen = []
        weight = torch.randn(NULL + 1, 1, 3, 3, generator=torch.Generator().manual_seed(0))
        self.weight = weight

    def __call__(self, x, t, labels):
        assert labels.dtype == torch.int64 and labels.shape == (x.shape[0],)
        self.calls.append(x.shape[0])
        self.labels_seen.append(labels.clone())
        return torch.tanh(x) * (1 + t.view(-1, 1, 1, 1)) + self.weight[labels]


@pytest.fixture
def setup():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, 1, 3, 3, generator=g)
    t = torch.full((B,), 0.5)
    labels = torch.randint(0, NULL, (B,), generator=g)
    return ToyModel(), x, t, labels


def separate(model, x, t, labels, w):
    c = model(x, t, labels)
    u = model(x, t, torch.full_like(labels, NULL))
    return c, u, u + w * (c - u)


def test_w1_is_conditional_and_w0_unconditional(setup):
    model, x, t, labels = setup
    out = classifier_free(model, labels, 1.0, NULL)(x, t)
    assert model.calls == [B] and torch.equal(model.labels_seen[0], labels)
    assert torch.equal(out, model(x, t, labels))
    model.calls.clear()
    out = classifier_free(model, labels, 0.0, NULL)(x, t)
    assert model.calls == [B] and bool((model.labels_seen[-1] == NULL).all())
    assert torch.equal(out, unconditional(model, NULL)(x, t))
    assert torch.equal(conditional(model, labels)(x, t), model(x, t, labels))


@pytest.mark.parametrize("w", [3.0, 0.5, -1.0])
def test_batched_equals_separate_calls(setup, w):
    model, x, t, labels = setup
    out = classifier_free(model, labels, w, NULL)(x, t)
    assert model.calls == [2 * B]  # one forward of 2B per denoise call
    _, _, expected = separate(model, x, t, labels, w)
    assert torch.allclose(out, expected, atol=1e-6)


def test_interval(setup):
    model, x, _, labels = setup
    fn = classifier_free(model, labels, 4.0, NULL, interval=(0.2, 0.6))
    t_out = torch.full((B,), 0.9)
    assert torch.equal(fn(x, t_out), model(x, t_out, labels))
    assert model.calls == [B, B]  # outside the interval: conditional only
    t_in = torch.full((B,), 0.4)
    assert torch.allclose(fn(x, t_in), separate(model, x, t_in, labels, 4.0)[2], atol=1e-6)
    t_mixed = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.2, 0.6])
    inside = (t_mixed >= 0.2) & (t_mixed <= 0.6)
    c, _, g = separate(model, x, t_mixed, labels, 4.0)
    out = fn(x, t_mixed)
    assert torch.allclose(out[inside], g[inside], atol=1e-6)
    assert torch.allclose(out[~inside], c[~inside], atol=1e-6)


def test_interval_of_a_guidance_input_model(setup):
    """A guidance-distilled model gets w inside the interval and w = 1 (conditional) outside,
    in one pass per call."""
    _, x, _, labels = setup
    seen = []

    def model(x, t, y, w):
        seen.append(w.clone())
        return x * w.view(-1, 1, 1, 1)

    fn = guidance_input(model, labels, 2.5, interval=(0.2, 0.6))
    t_mixed = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.2, 0.6])
    out = fn(x, t_mixed)
    expected_w = torch.tensor([1.0, 2.5, 2.5, 1.0, 2.5, 2.5])
    assert len(seen) == 1 and torch.equal(seen[0], expected_w)
    assert torch.equal(out, x * expected_w.view(-1, 1, 1, 1))
    assert torch.equal(guidance_input(model, labels, 2.5)(x, t_mixed), 2.5 * x)
    with pytest.raises(ValueError, match="interval"):
        guidance_input(model, labels, 2.5, interval=(0.7, 0.2))


def test_rescale(setup):
    model, x, t, labels = setup
    c, _, g = separate(model, x, t, labels, 5.0)
    full = classifier_free(model, labels, 5.0, NULL, rescale=1.0)(x, t)
    dims = (1, 2, 3)
    assert torch.allclose(full.std(dim=dims), c.std(dim=dims), rtol=1e-5)
    assert torch.allclose(
        full / full.std(dim=dims, keepdim=True), g / g.std(dim=dims, keepdim=True)
    )
    half = classifier_free(model, labels, 5.0, NULL, rescale=0.5)(x, t)
    assert torch.allclose(half, 0.5 * full + 0.5 * g, atol=1e-5)
    assert torch.allclose(
        classifier_free(model, labels, 5.0, NULL, rescale=0.0)(x, t), g, atol=1e-6
    )


def test_guidance_does_not_change_samplers(setup):
    model, _, _, labels = setup
    schedule = build_schedule("linear", 1000)
    ts = time_grid(schedule, "uniform", 5)
    x = initial_sample(schedule, ts, torch.randn(B, 1, 3, 3))
    res = ddim(classifier_free(model, labels, 2.0, NULL), x, schedule, ts)
    assert res.nfe == 5 and model.calls == [2 * B] * 5


def test_bad_guidance_inputs(setup):
    model, x, t, labels = setup
    with pytest.raises(ValueError, match="1-D int64"):
        classifier_free(model, labels.float(), 2.0, NULL)
    with pytest.raises(ValueError, match="rescale"):
        classifier_free(model, labels, 2.0, NULL, rescale=2.0)
    with pytest.raises(ValueError, match="interval"):
        classifier_free(model, labels, 2.0, NULL, interval=(0.8, 0.2))
    with pytest.raises(ValueError, match="batch size"):
        classifier_free(model, labels[:2], 2.0, NULL)(x, t)


def test_thresholding():
    x0 = torch.linspace(-3, 3, 2 * 16).view(2, 1, 4, 4)
    x0[1] = x0[1] * 0.2  # within [-0.6, 0.6]: dynamic thresholding leaves it alone

    def denoise(x, t):
        return x0.clone()

    t = torch.zeros(2)
    assert thresholded(denoise, "none") is denoise
    assert torch.equal(thresholded(denoise, "clip")(x0, t), x0.clamp(-1, 1))
    out = thresholded(denoise, "dynamic", percentile=0.9)(x0, t)
    s = torch.quantile(x0[0].abs().flatten(), 0.9)
    assert torch.allclose(out[0], x0[0].clamp(-s, s) / s)
    assert out[0].abs().max() == pytest.approx(1.0)
    assert torch.equal(out[1], x0[1])
    with pytest.raises(ValueError, match="allowed: none, clip, dynamic"):
        thresholded(denoise, "static")
    with pytest.raises(ValueError, match="percentile"):
        thresholded(denoise, "dynamic", percentile=1.5)
