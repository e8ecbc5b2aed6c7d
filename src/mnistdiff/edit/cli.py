"""CLI of the editing methods: ``mnistdiff edit <method> ...`` and ``mnistdiff compose TEXT``.

Each command reads its inputs, calls one library function of :mod:`mnistdiff.edit`, and writes a
PNG grid (one row per input: input, condition, results) and, with ``--save-npz``, the result
images and labels. Every input and option is checked before anything is written.
"""

from __future__ import annotations

import argparse
from pathlib import Path

METHODS = ("invert", "restyle", "sdedit", "inpaint", "interpolate")


def add_commands(sub) -> None:
    """Register ``edit`` (with its methods) and ``compose`` on the top-level subparsers."""
    p = sub.add_parser("edit", help="edit digits: invert, restyle, sdedit, inpaint, interpolate")
    methods = p.add_subparsers(dest="method", required=True, metavar="METHOD")

    m = methods.add_parser("invert", help="invert to noise and reconstruct; PSNR per image")
    _common(m, "invert.png")
    _inputs(m)
    m.add_argument("--label", help="N | N,M,... | true (the inputs' labels); default: both")
    m.set_defaults(func=cmd_invert)

    m = methods.add_parser("restyle", help="keep the handwriting, change the digit")
    _common(m, "restyle.png")
    _inputs(m)
    m.add_argument("--to-label", required=True, help="target class(es): N or N,M,... (columns)")
    m.add_argument("--from-label", help="source classes N | N,M,... | true; default: inputs'")
    m.add_argument("--strength", type=float, default=1.0, help="inversion depth t in (0, 1]")
    m.set_defaults(func=cmd_restyle)

    m = methods.add_parser("sdedit", help="noise to t = strength, then denoise (SDEdit)")
    _common(m, "sdedit.png")
    _inputs(m)
    m.add_argument("--strength", type=float, default=0.6, help="start time t in (0, 1]")
    m.add_argument("--label", help="target class(es) N | N,M,... | true")
    m.add_argument("--variations", type=int, default=4, help="results per input (seeds)")
    m.set_defaults(func=cmd_sdedit)

    m = methods.add_parser("inpaint", help="regenerate the masked pixels (RePaint/replacement)")
    _common(m, "inpaint.png")
    _inputs(m)
    m.add_argument(
        "--mask", required=True, help="bottom | top | left | right | box:x0,y0,x1,y1 | MASK.png"
    )
    m.add_argument("--label", help="class(es) to complete to: N | N,M,... | true")
    m.add_argument("--method", default="both", choices=["repaint", "replace", "both"])
    m.add_argument("--resample", type=int, default=5, help="RePaint's R (repeats per step)")
    m.add_argument("--variations", type=int, default=2, help="results per input and method")
    m.set_defaults(func=cmd_inpaint)

    m = methods.add_parser("interpolate", help="slerp between two seeds or two images")
    _common(m, "interpolate.png")
    _inputs(m, required=False)
    m.add_argument("--seeds", help="A,B: interpolate between the samples of two seeds")
    m.add_argument("--label", help="Y or Y0,Y1 (different labels mix the class embedding)")
    m.add_argument("--frames", type=int, default=10, help="frames including both ends")
    m.add_argument("--gif", help="GIF path (default: the PNG path with .gif)")
    m.set_defaults(func=cmd_interpolate)

    p = sub.add_parser("compose", help="write a number or equation, e.g. 2026 or 3+4=7")
    p.add_argument("text", help="digits and the operators + - =")
    _common(p, "compose.png")
    p.add_argument("--style", help="reference digit PNG whose handwriting every digit takes")
    p.add_argument("--style-label", type=int, help="the reference's class (better inversion)")
    p.add_argument("--strength", type=float, default=1.0, help="inversion depth for --style")
    p.add_argument("--gap", default="1,4", help="MIN,MAX pixels between digits")
    p.add_argument("--scale", type=int, default=4, help="PNG upscaling factor")
    p.set_defaults(func=cmd_compose)


def _common(p: argparse.ArgumentParser, out: str) -> None:
    """Model, outputs, and the sampling flags of ``mnistdiff sample`` (one generated set)."""
    from ..cli import add_sampling_args

    p.add_argument(
        "--checkpoint",
        help="checkpoint file, run dir or export dir (default: the shipped pretrained model)",
    )
    p.add_argument("--out", default=out, help="PNG path")
    p.add_argument("--save-npz", help="also write the result images and labels as .npz")
    add_sampling_args(p)  # --sampler, --steps, --guidance, --eta, --s-churn, ..., --seed


def _inputs(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--image", action="append", default=[], help="PNG file (repeatable)")
    p.add_argument("--from-test", help="MNIST test indices: N,M or N-M")
    p.add_argument("--npz", help="samples .npz (images, labels)")
    p.add_argument("--data-dir", help="MNIST folder for --from-test (else $MNIST_DIR or cache)")


# --------------------------------------------------------------------------- helpers


def _load(args):
    from ..cli import checkpoint_or_pretrained
    from ..sample import Pipeline

    checkpoint = checkpoint_or_pretrained(args)
    return Pipeline.load(checkpoint, device=args.device or "auto", use_ema=not args.no_ema)


def _read_inputs(args, pipe):
    """The inputs; ``--from-test`` reads the test split of the model's own dataset."""
    from .inputs import load_inputs

    data = pipe.cfg.data
    return load_inputs(
        args.image,
        args.from_test or (),
        args.npz,
        data_dir=args.data_dir or data.data_dir,
        dataset=data.dataset,
    )


def _options(args) -> dict:
    """The sampling options given on the command line (as for ``sample``)."""
    from ..cli import sampling_overrides

    return sampling_overrides(args)


def _labels(text: str | None, inputs, n: int, flag: str = "--label"):
    """``None`` | list of n ints from ``N``, ``N,M,...`` (cycled) or ``true``."""
    import torch

    if text is None:
        return None
    if text.strip().lower() == "true":
        if bool((inputs.labels < 0).any()):
            unknown = [
                nm for nm, y in zip(inputs.names, inputs.labels.tolist(), strict=True) if y < 0
            ]
            raise ValueError(f"{flag} true: no known label for {', '.join(unknown)}")
        return inputs.labels.clone()
    values = _int_list(text, flag)
    return torch.tensor([values[i % len(values)] for i in range(n)])


def _int_list(text: str, flag: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        raise ValueError(f"{flag}: expected N or N,M,..., got {text!r}") from None


def _known_labels(inputs):
    return None if bool((inputs.labels < 0).any()) else inputs.labels.clone()


def _check_outputs(args, gif: str | None = None) -> None:
    """Refuse unusable output paths before any work (mnistdiff.outputs)."""
    from ..outputs import check_output_file

    check_output_file(args.out, "--out", ".png")
    if args.save_npz:
        check_output_file(args.save_npz, "--save-npz", ".npz")
    if gif:
        check_output_file(gif, "--gif", ".gif")


def _write(args, grid_images, nrow: int, result_images=None, result_labels=None) -> None:
    """Write the PNG grid (and the results .npz) atomically, after everything succeeded."""
    from ..images import save_grid
    from ..sample import save_npz

    save_grid(grid_images, args.out, nrow=nrow, scale=2)
    print(f"wrote {args.out}")
    if args.save_npz and result_images is not None:
        save_npz(args.save_npz, result_images, result_labels)
        print(f"wrote {args.save_npz}")


def _interleave(columns):
    """``[K tensors of [N, 28, 28]]`` -> ``[N * K, 28, 28]`` (row i: column 0..K-1 of input i)."""
    import torch

    return torch.stack(columns, dim=1).reshape(-1, *columns[0].shape[1:])


def _shown(inputs) -> None:
    for name, inv in zip(inputs.names, inputs.inverted, strict=True):
        if inv:
            print(f"{name}: dark-on-light, inverted (the grid shows what the model saw)")


# --------------------------------------------------------------------------- commands


def cmd_invert(args) -> int:
    """Invert and reconstruct, without and with labels (when known); print PSNRs."""
    from .inversion import reconstruct

    _check_outputs(args)
    pipe = _load(args)
    inputs = _read_inputs(args, pipe)
    _shown(inputs)
    n, opts = len(inputs), _options(args)
    given = _labels(args.label, inputs, n)
    runs = []
    if given is not None:
        runs.append(("label", given))
    else:
        runs.append(("no label", None))
        if pipe.conditional and _known_labels(inputs) is not None:
            runs.append(("label", _known_labels(inputs)))
    columns, results = [inputs.images], []
    for name, labels in runs:
        out = reconstruct(pipe, inputs.images, labels, progress=True, **_batch(args), **opts)
        info, used = out.info, out.info["options"]
        print(
            f"{name}: mean PSNR {info['mean_psnr']:.2f} dB, NFE {info['nfe_invert']} invert + "
            f"{info['nfe_decode']} decode ({used['sampler']}, {used['steps']} steps); "
            f"per image: {', '.join(f'{v:.2f}' for v in info['psnr'])}"
        )
        columns.append(out.images)
        results.append(out)
    last = results[-1]
    _write(args, _interleave(columns), len(columns), last.images, last.labels)
    return 0


def _batch(args) -> dict:
    return {"batch_size": args.batch_size} if args.batch_size else {}


def cmd_restyle(args) -> int:
    """One column per target label."""
    import torch

    from .core import check_strength
    from .restyle import restyle

    check_strength(args.strength)
    _check_outputs(args)
    targets = _int_list(args.to_label, "--to-label")
    pipe = _load(args)
    inputs = _read_inputs(args, pipe)
    options = _options(args)
    if not pipe.conditional and not options.get("classifier"):
        raise ValueError(
            "--to-label needs a class-conditional model, or --classifier FILE (a noisy "
            "classifier from `mnistdiff train-classifier`) to steer this unconditional one"
        )
    _shown(inputs)
    n = len(inputs)
    sources = _labels(args.from_label, inputs, n, "--from-label")
    if sources is None and pipe.conditional:  # an unconditional model inverts without labels
        sources = _known_labels(inputs)
    images = inputs.images.repeat(len(targets), 1, 1)  # target-major
    to = torch.tensor(targets).repeat_interleave(n)
    src = None if sources is None else sources.repeat(len(targets))
    out = restyle(
        pipe,
        images,
        to,
        src,
        strength=args.strength,
        progress=True,
        **_batch(args),
        **options,
    )
    print(f"restyled {n} input(s) to {targets}: NFE {out.nfe} per image")
    cols = [inputs.images] + list(out.images.split(n))
    _write(args, _interleave(cols), len(cols), out.images, out.labels)
    return 0


def cmd_sdedit(args) -> int:
    from .core import check_strength
    from .sdedit import sdedit

    check_strength(args.strength)
    _check_variations(args.variations)
    _check_outputs(args)
    pipe = _load(args)
    inputs = _read_inputs(args, pipe)
    _shown(inputs)
    n, k = len(inputs), args.variations
    labels = _labels(args.label, inputs, n)
    images = inputs.images.repeat(k, 1, 1)
    out = sdedit(
        pipe,
        images,
        args.strength,
        None if labels is None else labels.repeat(k),
        seed=args.seed,
        progress=True,
        **_batch(args),
        **_options(args),
    )
    print(f"SDEdit at t = {args.strength}: {out.info['steps_run']} steps, NFE {out.nfe}")
    cols = [inputs.images] + list(out.images.split(n))
    _write(args, _interleave(cols), len(cols), out.images, out.labels)
    return 0


def _check_variations(k: int) -> None:
    if k < 1:
        raise ValueError(f"--variations must be >= 1, got {k}")


def cmd_inpaint(args) -> int:
    import torch

    from .inpaint import inpaint, make_mask

    mask = make_mask(args.mask)
    _check_variations(args.variations)
    if args.resample < 1:
        raise ValueError(f"--resample must be >= 1, got {args.resample}")
    _check_outputs(args)
    pipe = _load(args)
    inputs = _read_inputs(args, pipe)
    _shown(inputs)
    n, k = len(inputs), args.variations
    labels = _labels(args.label, inputs, n)
    methods = ["repaint", "replace"] if args.method == "both" else [args.method]
    shown = torch.where(mask, torch.full_like(inputs.images, 128), inputs.images)
    cols, results, result_labels = [inputs.images, shown], [], []
    for method in methods:
        out = inpaint(
            pipe,
            inputs.images.repeat(k, 1, 1),
            mask,
            None if labels is None else labels.repeat(k),
            method=method,
            resample=args.resample,
            seed=args.seed,
            progress=True,
            **_batch(args),
            **_options(args),
        )
        print(f"{method}: NFE {out.nfe} per image (R = {out.info['resample']})")
        cols += list(out.images.split(n))
        results.append(out.images)
        result_labels.append(out.labels)
    _write(args, _interleave(cols), len(cols), torch.cat(results), torch.cat(result_labels))
    return 0


def cmd_interpolate(args) -> int:
    from ..images import make_grid, save_gif
    from .interpolate import interpolate

    gif = args.gif or str(Path(args.out).with_suffix(".gif"))
    _check_outputs(args, gif)
    label = None if args.label is None else _int_list(args.label, "--label")
    if label is not None and len(label) not in (1, 2):
        raise ValueError(f"--label takes Y or Y0,Y1, got {args.label!r}")
    label = None if label is None else (label[0], label[-1])
    has_images = bool(args.image or args.from_test or args.npz)
    if has_images == (args.seeds is not None):
        raise ValueError("give --seeds A,B or two images (--image/--from-test/--npz), not both")
    kwargs = {"seeds": _int_list(args.seeds, "--seeds")} if args.seeds else {}
    pipe = _load(args)
    if has_images:
        inputs = _read_inputs(args, pipe)
        if len(inputs) != 2:
            raise ValueError(f"interpolating images needs exactly 2 inputs, got {len(inputs)}")
        kwargs["images"] = inputs.images
    out = interpolate(pipe, args.frames, labels=label, **kwargs, **_options(args))
    _write(args, out.images, len(out.images), out.images, out.labels)
    frames = [make_grid(img[None], nrow=1) for img in out.images]
    save_gif(frames + frames[::-1], gif, duration_ms=120, scale=4)
    print(f"wrote {gif} ({len(frames)} frames, NFE {out.nfe} per frame)")
    return 0


def cmd_compose(args) -> int:
    from ..images import save_grid
    from .compose import check_text, compose
    from .core import check_strength
    from .inputs import load_image

    text = check_text(args.text)
    check_strength(args.strength)
    gap = _int_list(args.gap, "--gap")
    if len(gap) != 2:
        raise ValueError(f"--gap takes MIN,MAX, got {args.gap!r}")
    _check_outputs(args)
    style = load_image(args.style)[0] if args.style else None
    pipe = _load(args)
    out = compose(
        pipe,
        text,
        seed=args.seed,
        style=style,
        style_label=args.style_label,
        strength=args.strength,
        gap=(gap[0], gap[1]),
        **_options(args),
    )
    save_grid(out.image[None], args.out, nrow=1, scale=args.scale)
    print(f"wrote {args.out} ({text!r}, {len(text)} glyphs, NFE {out.nfe} per digit)")
    if args.save_npz:
        import torch

        from ..sample import save_npz

        labels = torch.tensor([int(c) if c.isdigit() else -1 for c in text])
        save_npz(args.save_npz, out.glyphs, labels)
        print(f"wrote {args.save_npz}")
    return 0
