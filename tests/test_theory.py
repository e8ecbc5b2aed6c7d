"""docs/theory.md stays true: every `mnistdiff.…` name it cites exists; it covers the registries."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
THEORY = ROOT / "docs" / "theory.md"
REFERENCE = re.compile(r"`(mnistdiff(?:\.[A-Za-z_]\w*)+)`")


def references(text: str) -> list[str]:
    """Every distinct ``mnistdiff.x.y`` name written in backticks, in order of appearance."""
    return list(dict.fromkeys(REFERENCE.findall(text)))


def resolve(name: str) -> object:
    """Import the longest module prefix of ``name``, then getattr the rest.

    Raises:
        ImportError / AttributeError: if no such module or attribute exists.
    """
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        module_name = ".".join(parts[:i])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module_name.startswith(exc.name):
                continue  # this prefix is not a module; try a shorter one
            raise  # a real module failed to import one of its dependencies
        for attr in parts[i:]:
            obj = getattr(obj, attr)
        return obj
    raise ImportError(f"no module in {name!r}")


def missing_references(text: str) -> list[str]:
    """The names among :func:`references` that do not resolve, or are not callable."""
    missing = []
    for name in references(text):
        try:
            obj = resolve(name)
        except (ImportError, AttributeError):
            missing.append(name)
            continue
        if not callable(obj):
            missing.append(name)
    return missing


def test_every_reference_exists():
    text = THEORY.read_text()
    names = references(text)
    assert len(names) >= 30, f"expected the page to cite the code, found only {names}"
    assert missing_references(text) == []


def test_checker_catches_missing_names():
    text = (
        "`mnistdiff.samplers.ddim` `mnistdiff.samplers.no_such_sampler` "
        "`mnistdiff.no_such_module.f` `mnistdiff.schedules.Schedule.log_snr` "
        "`mnistdiff.schedules.Schedule.no_such_method` `mnistdiff.schedules.COSINE_S`"
    )
    assert references(text)[0] == "mnistdiff.samplers.ddim"
    assert missing_references(text) == [
        "mnistdiff.samplers.no_such_sampler",
        "mnistdiff.no_such_module.f",
        "mnistdiff.schedules.Schedule.no_such_method",
        "mnistdiff.schedules.COSINE_S",  # a constant, not a function
    ]


def test_page_covers_every_sampler_schedule_and_prediction():
    from mnistdiff.parameterization import PREDICTIONS
    from mnistdiff.samplers import SAMPLERS
    from mnistdiff.schedules import SCHEDULE_NAMES

    names = set(references(THEORY.read_text()))
    undocumented = [s for s in SAMPLERS if f"mnistdiff.samplers.{s}" not in names]
    assert undocumented == [], "every sampler needs its formula on the theory page"
    text = THEORY.read_text()
    for word in (*SCHEDULE_NAMES, *PREDICTIONS):
        assert f"| `{word}` |" in text, f"{word} has no row in the theory page's tables"


def test_math_delimiters_balance():
    """GitHub renders $…$ and $$…$$; an odd count on a line breaks the rest of the page."""
    text = THEORY.read_text()
    assert text.count("$$") % 2 == 0
    inline = re.sub(r"\$\$.*?\$\$", "", text, flags=re.S)
    odd = [line for line in inline.splitlines() if line.count("$") % 2]
    assert odd == []
