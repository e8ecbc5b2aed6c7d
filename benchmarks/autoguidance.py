"""Autoguidance with an earlier snapshot of the same run, beside classifier-free guidance.

Autoguidance (Karras et al. 2024, "Guiding a diffusion model with a bad version of itself")
replaces the negative branch of classifier-free guidance: instead of
``u + w (c - u)`` with ``u`` the strong model's unconditional prediction, it uses
``b + w (c - b)`` with ``b = weak(x, t, y)``, the *conditional* prediction of a weaker model of
the same kind (smaller, or trained for less). A free weak model for the quick recipe is a
checkpoint the run wrote on its way (``train.checkpoint_every``), so this script asks whether
such a snapshot buys a better fd_mnist / class-accuracy trade than CFG at the same cost (two
network passes per step). Rows, each at every scale of ``--scales``:

- ``cfg``: plain classifier-free guidance of ``--strong``;
- ``auto``: autoguidance, negative ``weak(x, t, y)``;
- ``weak_uncond``: negative ``weak(x, t, null)``, CFG whose unconditional branch is the weak one.

Same seed, sampler and steps for all rows (the strong model's ``sample`` section unless given).
``--tiny`` uses one untrained smoke model as both; its numbers mean nothing. JSON on stdout (and
``--out``); progress on stderr. Example: ``python benchmarks/autoguidance.py --strong
runs/quick/checkpoints/last.pt --weak runs/quick/checkpoints/step_0001718.pt --scales
1.3,1.4,1.6 --num-samples 2000``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from classifier_guidance import row_of, tiny_models
from mnistdiff.evaluate import evaluate_pipeline
from mnistdiff.evaluator import load_evaluator
from mnistdiff.sample import Pipeline
from throughput import environment, log, write_result

MODES = ("cfg", "auto", "weak_uncond")


class WeakNegative:
    """The strong denoiser, except that CFG's unconditional half of the batch comes from ``weak``.

    Classifier-free guidance (:func:`mnistdiff.guidance.classifier_free`) evaluates one batch
    ``[x, x]`` with labels ``[y, null]``; this proxy answers the first half with the strong model
    and the second with the weak one, called with ``y`` (``mode="auto"``) or with the null label
    (``mode="weak_uncond"``). Any other batch goes to the strong model unchanged.
    """

    def __init__(self, strong, weak, mode: str):
        if mode not in ("auto", "weak_uncond"):
            raise ValueError(f"mode must be auto or weak_uncond, got {mode!r}")
        self.strong, self.weak, self.mode = strong, weak, mode

    def __getattr__(self, name: str):
        return getattr(self.strong, name)

    def __call__(self, x: Tensor, t: Tensor, y: Tensor, w: Tensor | None = None) -> Tensor:
        half, null = x.shape[0] // 2, self.strong.null_label
        is_cfg = half > 0 and bool((y[half:] == null).all()) and not bool((y[:half] == null).any())
        if not is_cfg:
            return self.strong(x, t, y, w)
        cond = self.strong(x[:half], t[:half], y[:half], w)
        labels = y[:half] if self.mode == "auto" else y[half:]
        return torch.cat([cond, self.weak(x[half:], t[half:], labels, w)])


def rows_for(args, strong: Pipeline, weak: Pipeline, ev) -> list[dict[str, Any]]:
    """Every mode at every scale, same seed and sampler."""
    plain = strong.denoiser
    common = {"num_samples": args.num_samples, "seed": args.seed, "evaluator": ev}
    sampling = {k: v for k, v in (("sampler", args.sampler), ("steps", args.steps)) if v}
    rows = []
    for mode in args.modes:
        strong.denoiser = plain if mode == "cfg" else WeakNegative(plain, weak.denoiser, mode)
        for w in args.scales:
            log(f"{mode} w={w:g}")
            r = evaluate_pipeline(strong, guidance=w, **sampling, **common)
            rows.append(row_of(r, mode=mode))
    strong.denoiser = plain
    return rows


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strong", help="the model to sample (run dir, checkpoint or export)")
    p.add_argument("--weak", help="the weak model: an earlier checkpoint of the same run")
    p.add_argument("--scales", type=lambda s: [float(v) for v in s.split(",")],
                   help="guidance scales (default 1.3,1.4,1.6)")  # fmt: skip
    p.add_argument("--modes", type=lambda s: s.split(","), default=list(MODES),
                   help=f"subset of {','.join(MODES)}")  # fmt: skip
    p.add_argument("--sampler", help="default: the strong model's sample.sampler")
    p.add_argument("--steps", type=int, help="default: the strong model's sample.steps")
    p.add_argument("--num-samples", type=int, help="N images per row (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tiny", action="store_true", help="untrained smoke models, seconds per row")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="--tiny: config override of the smoke models")  # fmt: skip
    p.add_argument("--data-dir", help="--tiny: the smoke models' data folder")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    if args.scales is None:
        args.scales = [2.0] if args.tiny else [1.3, 1.4, 1.6]
    if args.num_samples is None:
        args.num_samples = 20 if args.tiny else 2000
    if args.tiny:
        args.sampler, args.steps = args.sampler or "ddim", args.steps or 3
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown --modes {bad}; allowed: {', '.join(MODES)}")
    if not args.tiny and not (args.strong and args.weak):
        p.error("give --strong CHECKPOINT and --weak CHECKPOINT (or --tiny)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    ev = load_evaluator()
    with tempfile.TemporaryDirectory(prefix="mnistdiff-ag-") as tmp:
        strong_path, weak_path = args.strong, args.weak
        if args.tiny:
            overrides = [*args.set] + ([f"data.data_dir={args.data_dir}"] if args.data_dir else [])
            _, strong_path = tiny_models(Path(tmp), overrides)
            weak_path = strong_path  # then weak_uncond must equal cfg exactly (the test's check)
        strong, weak = Pipeline.load(strong_path), Pipeline.load(weak_path)
        if not (strong.conditional and weak.conditional):
            raise SystemExit("autoguidance here needs two conditional models")
        result = {
            **environment(strong.device),
            "num_samples": args.num_samples,
            "seed": args.seed,
            "evaluator_sha256": ev.checksum,
            "models": {"strong": str(strong_path), "weak": str(weak_path)},
            "steps_trained": {"strong": strong.info.get("step"), "weak": weak.info.get("step")},
            "rows": rows_for(args, strong, weak, ev),
        }
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
