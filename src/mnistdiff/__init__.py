"""mnistdiff: train, sample, evaluate and edit diffusion models on MNIST.

Library use (the README's "Library" section runs as a test)::

    import mnistdiff

    cfg = mnistdiff.load_config("configs/smoke.yaml", {"train.run_dir": "runs/smoke"})
    run_dir = mnistdiff.train(cfg)                       # -> Path of the run directory
    pipe = mnistdiff.load(run_dir)                       # -> Pipeline (EMA weights)
    images = pipe.sample([3, 7], sampler="ddim", steps=20, eta=0.5)  # uint8 [2, 28, 28]
    metrics = mnistdiff.evaluate(pipe, num_samples=1000)             # FD, KID, accuracy, ...

Every public name is imported on first use, so ``import mnistdiff`` does not import torch.
``mnistdiff.train`` and ``mnistdiff.evaluate`` are the modules of those names and are callable:
``mnistdiff.train(cfg)`` is ``mnistdiff.train.train(cfg)`` and ``mnistdiff.evaluate(model)`` is
``mnistdiff.evaluate.evaluate(model)``, so ``import mnistdiff.train`` keeps working too.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import types
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> (module, attribute); attribute None: the module itself (a callable module)
_EXPORTS: dict[str, tuple[str, str | None]] = {
    # models and sampling
    "load": ("mnistdiff.sample", "load"),
    "Pipeline": ("mnistdiff.sample", "Pipeline"),
    "SampleOptions": ("mnistdiff.config", "SampleOptions"),
    "save_grid": ("mnistdiff.images", "save_grid"),
    # training and evaluation
    "train": ("mnistdiff.train", None),
    "evaluate": ("mnistdiff.evaluate", None),
    # configuration
    "Config": ("mnistdiff.config", "Config"),
    "ConfigError": ("mnistdiff.config", "ConfigError"),
    "load_config": ("mnistdiff.config", "load_config"),
    # editing (mnistdiff.edit)
    "invert": ("mnistdiff.edit", "invert"),
    "reconstruct": ("mnistdiff.edit", "reconstruct"),
    "restyle": ("mnistdiff.edit", "restyle"),
    "sdedit": ("mnistdiff.edit", "sdedit"),
    "inpaint": ("mnistdiff.edit", "inpaint"),
    "interpolate": ("mnistdiff.edit", "interpolate"),
    "compose": ("mnistdiff.edit", "compose"),
    "load_inputs": ("mnistdiff.edit", "load_inputs"),
}

__all__ = [  # the keys of _EXPORTS (a test checks), written out for tools
    "Config",
    "ConfigError",
    "Pipeline",
    "SampleOptions",
    "__version__",
    "compose",
    "evaluate",
    "inpaint",
    "interpolate",
    "invert",
    "load",
    "load_config",
    "load_inputs",
    "reconstruct",
    "restyle",
    "save_grid",
    "sdedit",
    "train",
]

if TYPE_CHECKING:  # what type checkers and IDEs see; at run time the names load lazily
    from .config import Config, ConfigError, SampleOptions, load_config
    from .edit import (
        compose,
        inpaint,
        interpolate,
        invert,
        load_inputs,
        reconstruct,
        restyle,
        sdedit,
    )
    from .evaluate import evaluate
    from .images import save_grid
    from .sample import Pipeline, load
    from .train import train


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'mnistdiff' has no attribute {name!r}")
    module_name, attr = _EXPORTS[name]
    module = importlib.import_module(module_name)
    return module if attr is None else getattr(module, attr)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _CallableModule(types.ModuleType):
    """A module that is also its main function (``mnistdiff.train(cfg)``)."""

    __main_function__: Callable[..., Any]

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.__main_function__(*args, **kwargs)


def make_callable(module_name: str, function: Callable[..., Any]) -> None:
    """Let module ``module_name`` be called as ``function`` (same signature and docstring)."""
    module = sys.modules[module_name]
    module.__class__ = _CallableModule
    module.__main_function__ = function
    module.__signature__ = inspect.signature(function)
