"""Command line: ``mnistdiff <command>``. Each command parses arguments and calls one function.

User errors exit non-zero with a one-line cause on stderr (no traceback).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import __version__

COMMON_FLAGS = {  # flag dest -> config key
    "epochs": "train.epochs",
    "steps": "train.steps",
    "batch_size": "train.batch_size",
    "lr": "train.lr",
    "run_dir": "train.run_dir",
    "device": "train.device",
    "seed": "train.seed",
    "precision": "train.precision",
    "model_type": "model.type",
    "data_dir": "data.data_dir",
    "dataset": "data.dataset",
}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config file (default: built-in defaults)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override, e.g. --set train.lr=3e-4 (repeatable)",
    )
    helps = {
        "steps": "total optimizer steps (beats --epochs)",
        "batch_size": "global batch size",
        "run_dir": "output directory (default runs/<config name>)",
        "data_dir": "folder with the IDX files (else $MNIST_DIR or cache)",
    }
    for dest, key in COMMON_FLAGS.items():  # parsed and validated as the config key is
        flag = "--" + dest.replace("_", "-")
        p.add_argument(flag, type=_config_flag(key, flag), help=helps.get(dest))


def _config_flag(key: str, flag: str) -> Callable[[str], Any]:
    """An argparse ``type`` parsing ``flag`` as the config key ``section.name`` (same checks)."""

    def parse(text: str) -> Any:
        import typing

        from .config import Config, ConfigError, parse_flag

        *sections, name = key.split(".")
        cls = Config
        for section in sections:
            cls = typing.get_type_hints(cls)[section]
        try:
            return parse_flag(cls, name, text, flag)
        except ConfigError as exc:  # argparse names the flag itself
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{flag}: ")) from None

    return parse


def resolve_config(args: argparse.Namespace):
    """Config file + common flags + ``--set`` overrides (later wins), validated."""
    import dataclasses

    from .config import apply_overrides, from_dict, load_yaml
    from .train import default_run_dir

    data = load_yaml(args.config) if args.config else {}
    flags = {
        key: getattr(args, dest)
        for dest, key in COMMON_FLAGS.items()
        if getattr(args, dest, None) is not None
    }
    data = apply_overrides(data, flags)
    data = apply_overrides(data, args.overrides)
    cfg = from_dict(data)
    if cfg.train.run_dir is None:
        train = dataclasses.replace(cfg.train, run_dir=default_run_dir(args.config))
        cfg = cfg.replace(train=train)
    return cfg


# --------------------------------------------------------------------------- commands


def cmd_config(args) -> int:
    from .config import dump_yaml

    print(dump_yaml(resolve_config(args)), end="")
    return 0


def cmd_data(args) -> int:
    from .data import dataset_stats, load_dataset
    from .datasets import get_dataset_info
    from .images import save_grid
    from .sample import label_tensor

    arrays = load_dataset(args.dataset, args.data_dir, download=not args.no_download)
    stats = dataset_stats(arrays)
    for split, s in stats.items():
        print(
            f"{split}: {s['count']} images, pixel mean {s['pixel_mean_01']:.4f} "
            f"std {s['pixel_std_01']:.4f} (in [0,1]); labels {s['label_hist']}"
        )
    info = get_dataset_info(args.dataset)
    labels = label_tensor(per_class=args.per_class, num_classes=info.num_classes)
    picks = [
        int((arrays.train_labels == c).nonzero()[i])
        for c, i in zip(
            labels.tolist(), list(range(args.per_class)) * info.num_classes, strict=True
        )
    ]
    path = save_grid(arrays.train_images[picks], args.out, nrow=args.per_class, scale=2)
    print(f"wrote {path} (one row per class: {', '.join(info.classes)})")
    return 0


def cmd_train(args) -> int:
    from .train import train

    cfg = resolve_config(args)
    train(cfg, resume=args.resume, stop_after_steps=args.stop_after_steps)
    return 0


CHECKPOINT_HELP = "checkpoint file, run dir or export dir (default: the shipped pretrained model)"


def cmd_distill(args) -> int:
    from .distill import distill_checkpoint

    distill_checkpoint(
        args.checkpoint,
        args.method,
        run_dir=args.run_dir,
        steps=args.steps,
        time_budget_minutes=args.time_budget_minutes,
        train_steps=args.train_steps,
        overrides=args.overrides,
        resume=args.resume,
        stop_after_steps=args.stop_after_steps,
    )
    return 0


def checkpoint_or_pretrained(args) -> str:
    """``--checkpoint``, or the shipped pretrained model, said in one line when it is used."""
    if args.checkpoint is not None:
        return args.checkpoint
    from .pretrained import describe, verified_dir

    print(describe())
    return str(verified_dir())


def cmd_sample(args) -> int:
    """Under torchrun every rank samples its share of the batches; rank 0 writes the files.

    Images stream to ``--save-npz`` batch by batch (:func:`mnistdiff.streaming.sample_to_file`);
    the grid shows at most ``GRID_MAX_IMAGES`` of them.
    """
    from .distributed import setup
    from .images import make_grid, save_gif, save_grid
    from .sample import Pipeline, label_tensor
    from .streaming import grid_rows, sample_to_file

    _check_sample_outputs(args)
    ctx = setup(args.device or "auto")
    device = str(ctx.device) if ctx.is_distributed else (args.device or "auto")
    pipe = Pipeline.load(checkpoint_or_pretrained(args), device=device, use_ema=not args.no_ema)
    options = sampling_overrides(args)
    pipe.default_options(**options)  # an option the sampler does not take fails before sampling
    n_cls = pipe.spec.num_classes
    if args.unconditional or not (pipe.conditional or options.get("classifier")):
        labels, num, nrow = None, args.num or 64, 8
    elif args.per_class is not None:
        labels = label_tensor(per_class=args.per_class, num_classes=n_cls)
        num, nrow = len(labels), args.per_class
    else:
        digits = args.digits
        labels = label_tensor(digits, num=args.num, num_classes=n_cls)
        num = len(labels)
        nrow = num // len(set(labels.tolist())) if digits else max(1, num // n_cls)
    keep, nrow = grid_rows(labels, num, nrow)
    frames, shown = [], [num]  # the trajectory is batch 0's (all images if they fit one batch)

    def keep_frames(i, x_t, x0_hat):
        shown[0] = len(x_t)
        frames.append(make_grid(pipe.to_uint8(x_t.clamp(-1, 1)), nrow=nrow))

    result = sample_to_file(
        pipe,
        labels,
        num,
        ctx,
        npz=args.save_npz,
        keep=keep,
        seed=args.seed,
        batch_size=args.batch_size,
        progress=True,
        callback=keep_frames if args.gif else None,
        **options,
    )
    if result is None:  # not rank 0
        return 0
    images, nfe = result.preview, result.nfe
    save_grid(images, args.out, nrow=nrow, scale=2)
    sampler = pipe.default_options(**options).sampler
    shown_note = "" if len(images) == num else f", {len(images)} shown"
    print(
        f"wrote {args.out} ({num} images{shown_note}, sampler {sampler}, NFE {nfe} per image, "
        f"{result.passes_per_image:g} network passes per image)"
    )
    if args.save_npz:
        print(f"wrote {args.save_npz}")
    if args.gif:
        frames.append(make_grid(result.first[: shown[0]], nrow=nrow))
        save_gif(frames, args.gif, scale=2)
        print(f"wrote {args.gif} ({len(frames)} frames)")
    return 0


def _check_sample_outputs(args) -> None:
    """Refuse unusable ``--out`` / ``--save-npz`` / ``--gif`` paths before loading or sampling."""
    from .outputs import check_output_file

    check_output_file(args.out, "--out", ".png")
    if args.save_npz:
        check_output_file(args.save_npz, "--save-npz", ".npz")
    if args.gif:
        check_output_file(args.gif, "--gif", ".gif")


def cmd_export(args) -> int:
    from .checkpoint import export_checkpoint
    from .outputs import check_output_dir

    check_output_dir(args.out, "--out")

    out = export_checkpoint(args.checkpoint, args.out)
    print(f"wrote {out}/config.json and {out}/model.safetensors")
    return 0


def cmd_info(args) -> int:
    from .info import model_info

    cfg = resolve_config(args) if args.checkpoint is None else None
    report = model_info(cfg, checkpoint=args.checkpoint)
    for key, value in report.items():
        print(f"{key}: {value}")
    return 0


def cmd_plot(args) -> int:
    from .tracking import plot_loss_curves, read_metrics

    history = read_metrics(Path(args.run_dir))
    if not history:
        raise FileNotFoundError(f"{args.run_dir}: no metrics.jsonl to plot")
    out = plot_loss_curves(history, Path(args.out or Path(args.run_dir) / "loss_curves.png"))
    print(f"wrote {out}")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import run_evaluate_cli

    return run_evaluate_cli(args)


def cmd_visualize(args) -> int:
    from .visualize import run_visualize_cli

    return run_visualize_cli(args)


def cmd_demo(args) -> int:
    from .demo import run_demo_cli

    return run_demo_cli(args)


def cmd_train_evaluator(args) -> int:
    from .evaluator import train_evaluator

    meta = train_evaluator(args.out, data_dir=args.data_dir, epochs=args.epochs, seed=args.seed)
    print(json.dumps(meta, indent=2))
    return 0


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mnistdiff", description="Train, sample and evaluate diffusion models on MNIST."
    )
    parser.add_argument("--version", action="version", version=f"mnistdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("data", help="download/verify the data, print statistics, write a grid")
    p.add_argument("--dataset", default="mnist", type=_config_flag("data.dataset", "--dataset"))
    p.add_argument("--data-dir", help="folder with the IDX files (else $MNIST_DIR or cache)")
    p.add_argument("--no-download", action="store_true", help="fail instead of downloading")
    p.add_argument("--per-class", type=positive_int, default=10, help="images per class in grid")
    p.add_argument("--out", default="real_digits.png", help="PNG grid path")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("config", help="print the resolved config (file + overrides)")
    _add_config_args(p)
    p.set_defaults(func=cmd_config)

    p = sub.add_parser("train", help="train a model")
    _add_config_args(p)
    p.add_argument("--resume", help="'auto' (continue the run directory) or a checkpoint path")
    p.add_argument(
        "--stop-after-steps",
        type=int,
        help="stop this invocation after N optimizer steps, with a checkpoint",
    )
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="distill a few-step / one-pass student from a teacher")
    p.add_argument("--checkpoint", help="the teacher: run dir, checkpoint or export")
    p.add_argument("--method", choices=["guidance", "progressive", "reflow"])
    p.add_argument("--steps", type=int, help="the student's sampler steps (progressive, reflow)")
    p.add_argument("--run-dir", required=True, help="the student's run directory")
    p.add_argument("--time-budget-minutes", type=float, help="wall-clock budget of the run")
    p.add_argument("--train-steps", type=int, help="optimizer steps (cap under a budget)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="dotted override of the student's config, e.g. --set train.lr=2e-4",
    )
    p.add_argument("--resume", help="'auto' (continue --run-dir) or a checkpoint path")
    p.add_argument("--stop-after-steps", type=int, help="stop this invocation after N steps")
    p.set_defaults(func=cmd_distill)

    p = sub.add_parser("sample", help="generate images from a checkpoint, run or export")
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP)
    add_sampling_args(p)
    p.add_argument("--digits", type=_digits, help="comma-separated classes, e.g. 3,7")
    p.add_argument("--per-class", type=positive_int, help="a grid with N images of every class")
    p.add_argument("--num", type=positive_int, help="number of images")
    p.add_argument("--unconditional", action="store_true")
    p.add_argument("--out", default="samples.png", help="PNG grid path")
    p.add_argument("--save-npz", help="also write images+labels as .npz")
    p.add_argument("--gif", help="animated GIF of the denoising trajectory")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("export", help="write config.json + model.safetensors (EMA weights)")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True)
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("info", help="parameter count and FLOPs of a config or checkpoint")
    _add_config_args(p)
    p.add_argument("--checkpoint", help="report on a checkpoint/run/export instead")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("plot", help="redraw loss_curves.png of a run")
    p.add_argument("run_dir")
    p.add_argument("--out")
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser("evaluate", help="FD/KID/precision/recall/class accuracy, sweeps")
    from .evaluate import add_evaluate_args

    add_evaluate_args(p, add_sampling_args)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("visualize", help="figures: forward, schedules, trajectory, guidance, nfe")
    from .visualize import add_visualize_args

    add_visualize_args(p)
    p.set_defaults(func=cmd_visualize)

    p = sub.add_parser("demo", help="web demo (Gradio): generate, draw, numbers, explain")
    from .demo import add_demo_args

    add_demo_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train-evaluator", help="train the MNIST feature network for metrics")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--data-dir")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_train_evaluator)
    from .edit.cli import add_commands as add_edit_commands

    add_edit_commands(sub)  # edit <method>, compose
    _add_train_classifier_parser(sub)
    return parser


# --- classifier guidance (noisy classifier): `train-classifier`; sampling flags below
def _add_train_classifier_parser(sub) -> None:
    from .noisy_classifier import DEFAULT_MINUTES, DEFAULT_STEPS

    p = sub.add_parser(
        "train-classifier", help="train a noisy classifier on a run's schedule (for guidance)"
    )
    p.add_argument("--checkpoint", required=True, help="checkpoint file, run dir or export dir")
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS, help="maximum optimizer steps")
    p.add_argument("--minutes", type=float, default=DEFAULT_MINUTES, help="wall-time budget")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", help="FILE.safetensors (default RUN/classifier.safetensors)")
    p.add_argument("--data-dir", help="folder with the IDX files (else the run's or $MNIST_DIR)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-images", type=int, default=2000, help="noised test images to score")
    p.add_argument("--device", default="cpu", help="cpu | cuda[:N] | mps")
    p.set_defaults(func=cmd_train_classifier)


def cmd_train_classifier(args) -> int:
    from .noisy_classifier import default_output, train_classifier

    out = args.out or default_output(args.checkpoint)
    meta = train_classifier(
        args.checkpoint,
        out=out,
        steps=args.steps,
        minutes=args.minutes,
        batch_size=args.batch_size,
        seed=args.seed,
        data_dir=args.data_dir,
        eval_images=args.eval_images,
        device=args.device,
    )
    acc = meta["noised_test"].get("accuracy", "not measured")
    print(json.dumps({"out": str(out), "noised_test": meta["noised_test"]}, indent=2))
    print(f"wrote {out} (+ .json); noised test accuracy {acc}", file=sys.stderr)
    return 0


# --- end classifier guidance


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    """One flag per field of the config's ``sample`` section (``--eta``, ``--s-churn``, ...),
    parsed and validated as the config key is; plus ``--nfe``, ``--seed``, ``--device``,
    ``--no-ema``. ``sample``, ``evaluate``, ``edit`` and ``compose`` share this set;
    :func:`sampling_overrides` reads the given ones back."""
    import dataclasses

    from .config import SampleConfig, choices_of

    for f in dataclasses.fields(SampleConfig):
        choices = choices_of(f.metadata)
        extra = f" ({' | '.join(map(str, choices))})" if choices else ""
        flag = "--" + f.name.replace("_", "-")
        p.add_argument(
            flag,
            type=_config_flag(f"sample.{f.name}", flag),
            # a key that may be null is absent unless given, so "--grid null" can override
            default=argparse.SUPPRESS if f.default is None else None,
            metavar="T_LO,T_HI" if f.name == "guidance_interval" else None,
            help=f.metadata["help"] + (" (null: none)" if f.default is None else "") + extra,
        )
    p.add_argument(
        "--nfe", type=positive_int, help="pick the steps giving this many network evaluations"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", help="auto | cpu | cuda[:N] | mps")
    p.add_argument("--no-ema", action="store_true", help="use the raw (non-EMA) weights")


def sampling_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The sampling options given on the command line (``nfe`` included), by name."""
    import dataclasses

    from .config import SampleOptions

    given = vars(args)
    nullable = {f.name for f in dataclasses.fields(SampleOptions) if f.default is None}
    names = [f.name for f in dataclasses.fields(SampleOptions)] + ["nfe"]
    return {n: given[n] for n in names if n in given and (given[n] is not None or n in nullable)}


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1 (counts: zero and negatives are refused)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _digits(text: str) -> list[int]:
    try:
        return [int(d) for d in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated class indices such as 3,7, got {text!r}"
        ) from None


def _user_errors() -> tuple[type[BaseException], ...]:
    from .checkpoint import CheckpointError
    from .config import ConfigError
    from .demo import DemoUnavailable
    from .device import DeviceError
    from .evaluator import EvaluatorError
    from .idx import DataError
    from .pretrained import PretrainedError
    from .train import TrainingError

    return (
        ConfigError,
        DataError,
        CheckpointError,
        DeviceError,
        TrainingError,
        EvaluatorError,
        DemoUnavailable,
        PretrainedError,
        FileNotFoundError,
        ValueError,
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``mnistdiff`` console script."""
    args = build_parser().parse_args(argv)
    if getattr(args, "nfe", None) is not None and getattr(args, "steps", None) is not None:
        print("mnistdiff: error: give --steps or --nfe, not both", file=sys.stderr)
        return 2
    from .train import TrainingInterrupted

    try:
        return args.func(args)
    except TrainingInterrupted as exc:
        print(f"mnistdiff: {exc}", file=sys.stderr)
        return exc.exit_code
    except _user_errors() as exc:
        print(f"mnistdiff: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("mnistdiff: interrupted", file=sys.stderr)
        return 130
    finally:
        from .distributed import teardown

        teardown()


if __name__ == "__main__":
    sys.exit(main())
