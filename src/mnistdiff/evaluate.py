"""Evaluation of checkpoints and sample files: sample quality, model-side metrics, sweeps.

Protocol (also in the README): N generated images (default 2000; class-conditional models get
N/10 of every class), compared in the shipped evaluator's feature space with the 10k MNIST test
images. Every result records N, sampler, steps, NFE, guidance and seed.
"""

from __future__ import annotations

import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_path, atomic_write_text
from .data import load_dataset, pad_to, to_model_range
from .evaluator import load_evaluator
from .losses import diffusion_loss
from .metrics import image_metrics, real_data_floor, reference_stats
from .sample import Pipeline, label_tensor, load_npz

SWEEPABLE = ("guidance", "steps", "nfe", "sampler", "eta", "grid")


# --------------------------------------------------------------------------- sample quality


def evaluate_images(
    images, labels=None, *, seed: int = 0, data_dir=None, evaluator=None
) -> dict[str, Any]:
    """Metrics of uint8 images (``labels`` optional) against the MNIST test reference."""
    evaluator = evaluator or load_evaluator()
    ref = reference_stats(evaluator, data_dir=data_dir)
    return image_metrics(evaluator, images, labels, ref, seed=seed)


def evaluate_pipeline(
    pipe: Pipeline,
    *,
    num_samples: int = 2000,
    seed: int = 0,
    batch_size: int | None = None,
    evaluator=None,
    progress: bool = False,
    inception: bool = False,
    **options,
) -> dict[str, Any]:
    """Sample ``num_samples`` images (balanced classes when conditional) and score them
    (``inception``: also ImageNet-Inception FID on the same images)."""
    opts = pipe.default_options(**options)
    labels = None
    if pipe.conditional:
        per = -(-num_samples // pipe.spec.num_classes)
        labels = label_tensor(per_class=per, num_classes=pipe.spec.num_classes)[:num_samples]
    t0 = time.perf_counter()
    out = pipe.generate(
        labels, num_samples, seed=seed, batch_size=batch_size, progress=progress, **opts.__dict__
    )
    seconds = time.perf_counter() - t0
    images = pipe.to_uint8(out.x)
    result = evaluate_images(
        images, labels, seed=seed, data_dir=pipe.cfg.data.data_dir, evaluator=evaluator
    )
    if inception:
        result.update(inception_fid(images, data_dir=pipe.cfg.data.data_dir))
    result.update(
        sampler=opts.sampler,
        steps=opts.steps,
        nfe=out.nfe,
        guidance=opts.guidance if pipe.conditional else None,
        eta=opts.eta,
        grid=opts.grid,
        seed=seed,
        sampling_seconds=seconds,
        sampling_images_per_sec=num_samples / seconds,
        checkpoint=str(pipe.source),
        step=pipe.info.get("step"),
        epoch=pipe.info.get("epoch"),
        ema=pipe.info.get("ema"),
    )
    return result


def inception_fid(images: torch.Tensor, *, data_dir=None) -> dict[str, Any]:
    """ImageNet-Inception FID against the MNIST test set via torch-fidelity (optional extra).

    Clearly labelled ``inception_fid``; skipped with a message when torch-fidelity or its
    Inception weights are unavailable.
    """
    try:
        import torch_fidelity
    except ImportError:
        return {
            "inception_fid": None,
            "inception_fid_note": "skipped: pip install 'mnistdiff[fid]' (torch-fidelity)",
        }
    test = load_dataset("mnist", data_dir).test_images
    try:
        out = torch_fidelity.calculate_metrics(
            input1=_RGBImages(images), input2=_RGBImages(test), fid=True, verbose=False
        )
    except Exception as exc:  # weights download or extractor failures
        return {"inception_fid": None, "inception_fid_note": f"skipped: {exc}"}
    return {"inception_fid": float(out["frechet_inception_distance"])}


class _RGBImages(torch.utils.data.Dataset):
    """uint8 [N, H, W] grayscale as uint8 [3, H, W] items (what torch-fidelity expects)."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.images[i].unsqueeze(0).expand(3, -1, -1).contiguous()


# --------------------------------------------------------------------------- model-side metrics


@torch.no_grad()
def objective_mse_by_time(
    pipe: Pipeline, *, num_images: int = 1000, bins: int = 10, seed: int = 0
) -> dict[str, list[float]]:
    """Test-set objective MSE and noise-prediction (eps) MSE at the centre of each t-bin."""
    x0, y = _test_batch(pipe, num_images)
    den = pipe.denoiser
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn(x0.shape, generator=gen)
    centers = [(i + 0.5) / bins for i in range(bins)]
    objective, eps_mse = [], []
    for c in centers:
        t = torch.full((len(x0),), c)
        objective.append(_batched_loss(pipe, x0, y, t, noise).mean().item())
        alpha, sigma = den.coefficients(t, x0)
        x_t = alpha * x0 + sigma * noise
        x0_hat = _batched_x0(pipe, x_t, t, y)
        eps_hat = (x_t - alpha * x0_hat) / sigma
        eps_mse.append((eps_hat - noise).square().mean().item())
    return {"t_bin_centers": centers, "objective_mse": objective, "eps_mse": eps_mse}


def _test_batch(pipe: Pipeline, num_images: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    data = load_dataset(
        pipe.cfg.data.dataset, pipe.cfg.data.data_dir, download=pipe.cfg.data.download
    )
    x = to_model_range(data.test_images[:num_images])
    if pipe.cfg.data.pad_to_32:
        x = pad_to(x, 32)
    y = data.test_labels[:num_images] if pipe.conditional else None
    return x, y


def _chunks(n: int, size: int = 500):
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


def _batched_loss(pipe, x0, y, t, noise) -> torch.Tensor:
    d, out = pipe.device, []
    for s in _chunks(len(x0)):
        with pipe.precision.autocast(d):
            out.append(
                diffusion_loss(
                    pipe.denoiser,
                    x0[s].to(d),
                    _opt(y, s, d),
                    t[s].to(d),
                    noise[s].to(d),
                    loss="mse",
                ).cpu()
            )
    return torch.cat(out)


def _batched_x0(pipe, x_t, t, y) -> torch.Tensor:
    d, out = pipe.device, []
    for s in _chunks(len(x_t)):
        with pipe.precision.autocast(d):
            out.append(pipe.denoiser(x_t[s].to(d), t[s].to(d), _opt(y, s, d)).float().cpu())
    return torch.cat(out)


def _opt(y, s, d):
    return None if y is None else y[s].to(d)


@torch.no_grad()
def bits_per_dim(
    pipe: Pipeline, *, num_images: int = 100, t_samples: int = 50, seed: int = 0
) -> dict[str, Any]:
    """Negative log-likelihood bound (bits/dim) on test images: the DDPM variational bound.

    ``L = L_T + sum_{t=2..T} KL(q(x_{t-1}|x_t,x0) || p(x_{t-1}|x_t)) + L_0`` with the reverse
    variance fixed to the posterior variance and a discretised Gaussian decoder at t = 1
    (Ho et al. 2020, Sec. 3.3). The sum over t is estimated by Monte Carlo: ``t_samples``
    uniform draws per image, scaled by ``T - 1`` (unbiased). Discrete-time schedules only.
    """
    sched = pipe.denoiser.schedule
    if not sched.is_discrete:
        return {
            "bits_per_dim": None,
            "note": "the DDPM bound needs a discrete-time schedule (not rectified flow)",
        }
    x0, y = _test_batch(pipe, num_images)
    abar = sched.alphas_cumprod.double()
    T = len(abar)
    gen = torch.Generator().manual_seed(seed)
    dims = x0[0].numel()
    prior = _prior_kl(x0, abar[-1])
    decoder = _decoder_nll(pipe, x0, y, abar, gen)
    ts = torch.randint(2, T + 1, (t_samples,), generator=gen)
    kls = torch.stack([_kl_term(pipe, x0, y, abar, int(t), gen) for t in ts])  # [S, N]
    total = prior + decoder + (T - 1) * kls.mean(0)
    bpd = total / (dims * math.log(2))
    return {
        "bits_per_dim": bpd.mean().item(),
        "bits_per_dim_stderr": (bpd.std() / math.sqrt(len(bpd))).item(),
        "num_images": len(x0),
        "t_samples": t_samples,
        "prior_bpd": (prior / (dims * math.log(2))).mean().item(),
        "decoder_bpd": (decoder / (dims * math.log(2))).mean().item(),
    }


def _prior_kl(x0: torch.Tensor, abar_T: torch.Tensor) -> torch.Tensor:
    """KL(q(x_T|x0) || N(0, I)) per image, in nats."""
    mean = abar_T.sqrt() * x0.double()
    var = 1 - abar_T
    return (0.5 * (var + mean**2 - 1 - torch.log(var))).flatten(1).sum(1)


def _posterior(abar, t: int, x0, x_t):
    """Mean and variance of q(x_{t-1} | x_t, x0) for discrete index t (1-based)."""
    a_t, a_prev = abar[t - 1], abar[t - 2] if t >= 2 else torch.tensor(1.0, dtype=abar.dtype)
    beta = 1 - a_t / a_prev
    var = beta * (1 - a_prev) / (1 - a_t)
    mean = (a_prev.sqrt() * beta / (1 - a_t)) * x0 + (
        (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t)
    ) * x_t
    return mean, var


def _noisy(abar, t: int, x0, gen):
    noise = torch.randn(x0.shape, generator=gen, dtype=torch.float64)
    return abar[t - 1].sqrt() * x0.double() + (1 - abar[t - 1]).sqrt() * noise


def _x0_hat(pipe, x_t, t: int, y, T: int):
    tt = torch.full((len(x_t),), t / T)
    return _batched_x0(pipe, x_t.float(), tt, y).double().clamp(-1, 1)


def _kl_term(pipe, x0, y, abar, t: int, gen) -> torch.Tensor:
    x_t = _noisy(abar, t, x0, gen)
    mean_q, var = _posterior(abar, t, x0.double(), x_t)
    mean_p, _ = _posterior(abar, t, _x0_hat(pipe, x_t, t, y, len(abar)), x_t)
    return (0.5 * (mean_q - mean_p) ** 2 / var).flatten(1).sum(1)


def _decoder_nll(pipe, x0, y, abar, gen) -> torch.Tensor:
    """-log p(x0 | x1) with a Gaussian discretised to the 256 pixel bins of [-1, 1]."""
    x1 = _noisy(abar, 1, x0, gen)
    mean = _x0_hat(pipe, x1, 1, y, len(abar))
    std = (1 - abar[0]).sqrt()
    normal = torch.distributions.Normal(mean, std)
    x = x0.double()
    upper = torch.where(x > 0.999, torch.ones_like(x), normal.cdf(x + 1 / 255))
    lower = torch.where(x < -0.999, torch.zeros_like(x), normal.cdf(x - 1 / 255))
    prob = (upper - lower).clamp_min(1e-12)
    return -torch.log(prob).flatten(1).sum(1)


# --------------------------------------------------------------------------- sweeps


def parse_sweeps(specs: list[str]) -> dict[str, list]:
    """``["guidance=0,1,2", "sampler=ddim,heun"]`` -> ``{"guidance": [0.0, 1.0, 2.0], ...}``."""
    out = {}
    for spec in specs:
        if "=" not in spec:
            raise ValueError(
                f"--sweep {spec!r}: expected NAME=V1,V2,... with NAME one of {list(SWEEPABLE)}"
            )
        name, values = spec.split("=", 1)
        if name not in SWEEPABLE:
            raise ValueError(f"--sweep {name!r}: not sweepable; allowed {list(SWEEPABLE)}")
        cast = {"guidance": float, "eta": float, "steps": int, "nfe": int}.get(name, str)
        out[name] = [cast(v) for v in values.split(",") if v]
    if "steps" in out and "nfe" in out:
        raise ValueError("sweep steps or nfe, not both")
    return out


def run_sweep(
    pipe: Pipeline,
    sweeps: dict[str, list],
    base: dict,
    *,
    num_samples: int,
    seed: int,
    batch_size: int | None,
    log=print,
) -> list[dict]:
    """Evaluate every combination of the swept values (cartesian product)."""
    rows = []
    names = list(sweeps)
    for combo in itertools.product(*(sweeps[n] for n in names)):
        options = {**base, **dict(zip(names, combo, strict=True))}
        row = evaluate_pipeline(
            pipe, num_samples=num_samples, seed=seed, batch_size=batch_size, **options
        )
        log(_summary(row))
        rows.append(row)
    return rows


def sweep_checkpoints(
    run_dir: Path,
    base: dict,
    *,
    num_samples: int,
    seed: int,
    batch_size: int | None,
    device: str,
    use_ema: bool,
    log=print,
) -> list[dict]:
    """Metrics for every ``step_*.pt`` of a run (metrics vs epoch)."""
    paths = sorted((Path(run_dir) / "checkpoints").glob("step_*.pt"))
    if not paths:
        raise FileNotFoundError(f"{run_dir}: no checkpoints/step_*.pt to sweep")
    rows = []
    for path in paths:
        pipe = Pipeline.load(path, device=device, use_ema=use_ema)
        row = evaluate_pipeline(
            pipe, num_samples=num_samples, seed=seed, batch_size=batch_size, **base
        )
        log(_summary(row))
        rows.append(row)
    return rows


# --------------------------------------------------------------------------- reporting

TABLE_KEYS = (
    "step",
    "epoch",
    "sampler",
    "steps",
    "nfe",
    "guidance",
    "num_samples",
    "fd_mnist",
    "kid",
    "precision",
    "recall",
    "class_accuracy",
    "class_balance_tv",
    "sampling_seconds",
)


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _summary(row: dict) -> str:
    keys = [k for k in TABLE_KEYS if row.get(k) is not None]
    return "  ".join(f"{k}={_fmt(row[k])}" for k in keys)


def markdown_table(rows: list[dict], keys=TABLE_KEYS) -> str:
    """A Markdown table of the rows over the keys that any row has."""
    keys = [k for k in keys if any(r.get(k) is not None for r in rows)]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot_rows(rows: list[dict], sweeps: dict[str, list], path: Path) -> Path | None:
    """FD vs NFE, FD vs class accuracy over guidance, or metrics vs epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if "checkpoints" in sweeps:
        x = [r.get("epoch") or r.get("step") for r in rows]
        ax.plot(x, [r["fd_mnist"] for r in rows], "o-", label="fd_mnist")
        ax.set_xlabel("epoch")
        ax.set_ylabel("fd_mnist")
        if rows[0].get("class_accuracy") is not None:
            ax2 = ax.twinx()
            ax2.plot(x, [r["class_accuracy"] for r in rows], "s--", color="C1")
            ax2.set_ylabel("class accuracy", color="C1")
    elif "guidance" in sweeps and rows[0].get("class_accuracy") is not None:
        for r in rows:
            ax.scatter(r["class_accuracy"], r["fd_mnist"], color="C0")
            ax.annotate(f"w={r['guidance']:g}", (r["class_accuracy"], r["fd_mnist"]))
        ax.set_xlabel("class accuracy")
        ax.set_ylabel("fd_mnist")
    else:
        for sampler in dict.fromkeys(r["sampler"] for r in rows):
            pts = sorted((r["nfe"], r["fd_mnist"]) for r in rows if r["sampler"] == sampler)
            ax.plot(*zip(*pts, strict=True), "o-", label=sampler)
        ax.set_xlabel("NFE (network evaluations per image)")
        ax.set_ylabel("fd_mnist")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend()
    ax.grid(alpha=0.3)
    ax.set_title(f"N = {rows[0]['num_samples']} samples vs MNIST test set")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return Path(path)


def write_json(obj: Any, path: str | Path) -> Path:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
    return Path(path)


# --------------------------------------------------------------------------- CLI


def add_evaluate_args(p, add_sampling_args) -> None:
    """Arguments of ``mnistdiff evaluate`` (sampling flags shared with ``sample``)."""
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="checkpoint file, run dir or export dir")
    src.add_argument("--samples", help=".npz with images (uint8 [N,28,28]) and optional labels")
    src.add_argument(
        "--real-floor",
        action="store_true",
        help="score N real training images (the floor of every metric)",
    )
    add_sampling_args(p)
    p.add_argument("--num-samples", type=int, default=2000, help="images to generate (N)")
    p.add_argument(
        "--sweep",
        action="append",
        default=[],
        metavar="NAME=V1,V2",
        help=f"sweep one of {list(SWEEPABLE)}; repeat for a grid",
    )
    p.add_argument(
        "--all-checkpoints",
        action="store_true",
        help="evaluate every step_*.pt of the run (metrics vs epoch)",
    )
    p.add_argument(
        "--model-metrics",
        action="store_true",
        help="also test-set objective/eps MSE per t-bin and bits/dim",
    )
    p.add_argument(
        "--model-metric-images",
        type=int,
        default=1000,
        help="test images for --model-metrics (bits/dim uses at most 100)",
    )
    p.add_argument(
        "--inception-fid",
        action="store_true",
        help="also ImageNet-Inception FID (needs the 'fid' extra: torch-fidelity)",
    )
    p.add_argument("--data-dir", help="folder with the MNIST IDX files")
    p.add_argument("--json", help="write the results as JSON")
    p.add_argument("--out-dir", help="where sweep tables and plots go (default: beside --json)")


def run_evaluate_cli(args) -> int:
    """Dispatch ``mnistdiff evaluate``; print a table; write JSON/plots."""
    sweeps = parse_sweeps(args.sweep)
    if args.real_floor:
        result = real_data_floor(
            load_evaluator(), args.num_samples, seed=args.seed, data_dir=args.data_dir
        )
        return _report([result], args, {})
    if args.samples:
        images, labels = load_npz(args.samples)
        result = evaluate_images(images, labels, seed=args.seed, data_dir=args.data_dir)
        result["source"] = str(args.samples)
        return _report([result], args, {})
    base = {
        "sampler": args.sampler,
        "steps": args.steps,
        "nfe": args.nfe,
        "guidance": args.guidance,
        "eta": args.eta,
        "grid": args.grid,
        "threshold": args.threshold,
        "guidance_rescale": args.guidance_rescale,
        "guidance_interval": args.guidance_interval,
    }
    device = args.device or "auto"
    if args.all_checkpoints:
        rows = sweep_checkpoints(
            Path(args.checkpoint),
            base,
            num_samples=args.num_samples,
            seed=args.seed,
            batch_size=args.batch_size,
            device=device,
            use_ema=not args.no_ema,
        )
        return _report(rows, args, {"checkpoints": []})
    pipe = Pipeline.load(args.checkpoint, device=device, use_ema=not args.no_ema)
    if sweeps:
        rows = run_sweep(
            pipe,
            sweeps,
            base,
            num_samples=args.num_samples,
            seed=args.seed,
            batch_size=args.batch_size,
        )
        return _report(rows, args, sweeps)
    result = evaluate_pipeline(
        pipe,
        num_samples=args.num_samples,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=True,
        inception=args.inception_fid,
        **base,
    )
    if args.inception_fid:
        print(result.get("inception_fid_note") or f"inception_fid: {result['inception_fid']:.3f}")
    if args.model_metrics:
        n = args.model_metric_images
        result["objective_mse_by_t"] = objective_mse_by_time(pipe, num_images=n, seed=args.seed)
        result.update(bits_per_dim(pipe, num_images=min(n, 100), seed=args.seed))
    return _report([result], args, {})


def _report(rows: list[dict], args, sweeps: dict) -> int:
    print(markdown_table(rows), end="")
    for row in rows:
        if "bits_per_dim" in row and row["bits_per_dim"] is not None:
            print(
                f"bits/dim (DDPM bound): {row['bits_per_dim']:.3f} "
                f"± {row['bits_per_dim_stderr']:.3f}"
            )
    out_dir = (
        Path(args.out_dir) if args.out_dir else (Path(args.json).parent if args.json else None)
    )
    if args.json:
        write_json(rows[0] if len(rows) == 1 and not sweeps else rows, args.json)
        print(f"wrote {args.json}")
    if sweeps and out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        name = "sweep_" + "_".join(sweeps) if sweeps else "sweep"
        atomic_write_text(out_dir / f"{name}.md", markdown_table(rows))
        plot = plot_rows(rows, sweeps, out_dir / f"{name}.png")
        print(f"wrote {out_dir / (name + '.md')} and {plot}")
    return 0
