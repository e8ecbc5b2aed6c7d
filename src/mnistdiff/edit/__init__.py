"""Editing: inversion, handwriting transfer, SDEdit, inpainting, interpolation, composition.

Every method takes a :class:`mnistdiff.sample.Pipeline` and uint8 images ``[N, 28, 28]``
(:func:`load_inputs` reads PNGs, MNIST test digits and ``.npz`` files) and runs the registry's
samplers from some ``(x, t)`` on the usual time grids (:mod:`mnistdiff.edit.core`). Their
sampling options are ``sample``'s own (:class:`mnistdiff.SampleOptions`, resolved by
:func:`sampling`), so every sampler option works in edits too.

Example::

    import mnistdiff
    from mnistdiff import edit

    pipe = mnistdiff.load("runs/quick")
    digits = edit.load_inputs(from_test=[0, 1, 2])
    out = edit.restyle(pipe, digits.images, to_labels=8, from_labels=digits.labels)
    out.images  # uint8 [3, 28, 28]
"""

from .compose import Composition, compose, draw_operator, stroke_width
from .core import EditResult, psnr, sampling
from .inpaint import inpaint, make_mask
from .inputs import EditInputs, load_image, load_inputs
from .interpolate import endpoint_sample, interpolate, slerp
from .inversion import Inversion, decode, invert, invert_x, reconstruct
from .restyle import restyle
from .sdedit import sdedit

__all__ = [
    "Composition",
    "EditInputs",
    "EditResult",
    "Inversion",
    "compose",
    "decode",
    "draw_operator",
    "endpoint_sample",
    "inpaint",
    "interpolate",
    "invert",
    "invert_x",
    "load_image",
    "load_inputs",
    "make_mask",
    "psnr",
    "reconstruct",
    "restyle",
    "sampling",
    "sdedit",
    "slerp",
    "stroke_width",
]
