"""Markdown tables of what timm-ood holds, generated from the code: the documentation cannot drift from it.

The documentation site (``mkdocs.yml``, ``docs/_hooks/catalogue.py``) replaces
``<!-- timm-ood:detectors -->``, ``<!-- timm-ood:methods -->`` and
``<!-- timm-ood:cli -->`` in its pages with :func:`detector_table`,
:func:`method_table` and :func:`cli_reference`.
"""

from __future__ import annotations

import argparse
import inspect
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["MARKERS", "cli_reference", "detector_table", "method_table", "render_markers"]


def _cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _value(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) >= 1:
        return str(int(value))
    return repr(value) if isinstance(value, str) else str(value)


def _keywords(values: Mapping[str, Any]) -> str:
    return ", ".join(f"`{k}={_value(v)}`" for k, v in values.items()) or "none"


def _needs(detector: Any) -> str:
    requirements = detector.requirements
    needs = sorted(need.value for need in requirements.outputs | requirements.outputs_for_fit)
    if requirements.input_gradients:
        needs.append("input gradients")
    if requirements.linear_classifier:
        needs.append("linear head")
    if requirements.fit:
        needs.append("fit data" + (" with labels" if requirements.fit_labels else ""))
    if requirements.held_out:
        needs.append(f"held-out {requirements.held_out.replace('+', ' + ')} data")
    return ", ".join(needs)


def detector_table() -> str:
    """Every registered detector: name, paper, what it needs, its defaults, its ``tune`` search space, its package."""
    from .detectors import create_detector, detector_registrations

    rows = []
    for name, registration in detector_registrations().items():
        cls = registration.obj
        detector = create_detector(name)
        parameters = inspect.signature(cls.__init__).parameters.values()
        defaults = {p.name: p.default for p in parameters
                    if p.name != "self" and p.default is not inspect.Parameter.empty}
        space = "; ".join(f"`{k}` ∈ {{{', '.join(_value(v) for v in values)}}}"
                          for k, values in cls.search_space.items()) or "none"
        rows.append([f"`{name}`", cls.paper, _needs(detector), _keywords(defaults), space,
                     registration.distribution])
    return _table(["name", "paper", "needs", "defaults", "search space (`tune`)", "from"], rows)


def method_table() -> str:
    """Every training-time method: paper, the call that trains with it, head, defaults, detectors, OOD data."""
    from .training.methods import METHODS

    rows = [[m.name, m.paper, f"`{m.call}`", f"`{m.head}`" if m.head else "the model's linear classifier",
             _keywords(m.defaults()), ", ".join(f"`{d}`" for d in m.detectors), m.outliers] for m in METHODS]
    return _table(["method", "paper", "train with", "head", "defaults", "score with", "OOD data in training"],
                  rows)


def _options(parser: argparse.ArgumentParser) -> list[list[str]]:
    rows = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        names = ", ".join(f"`{o}`" for o in action.option_strings) or f"`{action.dest}`"
        absent = action.default is None or action.default is False or action.default == argparse.SUPPRESS
        default = "" if absent or action.required else f"`{action.default}`"
        rows.append([names, (action.help or "").replace("%(default)s", str(action.default)),
                     "required" if action.required else default])
    return rows


def cli_reference() -> str:
    """Every ``timm-ood`` sub-command with its options, help texts and defaults, read from its parser."""
    from .cli import build_parser

    parser = build_parser()
    sections = [_table(["option", "what", "default"], _options(parser))]
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    helps = {choice.dest: choice.help for choice in commands._choices_actions}
    for name, sub in commands.choices.items():
        sections.append(f"### `timm-ood {name}`\n\n{helps.get(name, '')}\n\n"
                        + _table(["option", "what", "default"], _options(sub)))
    return "\n\n".join(sections)


#: page markers and the generator that replaces each
MARKERS = {
    "<!-- timm-ood:detectors -->": detector_table,
    "<!-- timm-ood:methods -->": method_table,
    "<!-- timm-ood:cli -->": cli_reference,
}


def render_markers(markdown: str) -> str:
    """``markdown`` with every marker of :data:`MARKERS` replaced by its generated table."""
    for marker, make in MARKERS.items():
        if marker in markdown:
            markdown = markdown.replace(marker, make())
    return markdown
