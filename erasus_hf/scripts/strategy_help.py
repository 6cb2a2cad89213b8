"""`erasus-hf unlearn --help-strategy NAME`: what a strategy does and the hyperparameters it takes in
`strategy_kwargs` (name, type, default, help), read from its typed config (`StrategyConfig.describe`), its paper and
the first paragraph of its docstring."""

from __future__ import annotations

import argparse
import inspect
import json
import textwrap
from typing import Any

from ..redaction import redact

WIDTH = 100


def strategy_help(name: str) -> str:
    """The help text of the registered strategy `name` (any case: `NPO` is `npo`); an unknown name raises ValueError
    with the closest match and the valid names (`Registry.lookup`)."""
    from ..strategies import STRATEGIES
    from .parsing import strategy_name

    name = strategy_name(name)
    cls = STRATEGIES[name]
    summary = inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0]
    lines = [f"{name}: {cls.__name__}"]
    if summary:
        lines.append(textwrap.fill(" ".join(summary.split()), WIDTH, break_long_words=False))
    lines.append(f"paper: {cls.paper}")
    rows = cls.config_class.describe()
    if not rows:
        lines += ["", "hyperparameters: none"]
        return "\n".join(lines)
    example = json.dumps({rows[0][0]: _plain(rows[0][2])})
    lines += ["", f"hyperparameters (strategy_kwargs in a recipe, or --strategy_kwargs '{example}'):"]
    for field_name, kind, default, help_text in rows:
        lines.append(f"  {field_name} ({kind}, default {json.dumps(_plain(default))})")
        if help_text:
            lines.append(textwrap.fill(help_text, WIDTH, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)


def _plain(value: Any) -> Any:
    """A default as JSON can write it (what `--strategy_kwargs` takes); other values as their repr."""
    try:
        json.dumps(value)
    except TypeError:
        return repr(value)
    return value


class HelpStrategyAction(argparse.Action):
    """Print `strategy_help(NAME)` and exit 0, as `--help` does; an unknown NAME exits 2 with a one-line error."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: Any, values: Any, option_string: Any = None):
        try:
            text = strategy_help(values)
        except ValueError as err:
            parser.exit(2, redact(f"erasus-hf: error: {err}\n"))
        print(text)
        parser.exit(0)


def add_strategy_help(parser: argparse.ArgumentParser) -> None:
    """Give `parser` the `--help-strategy NAME` option."""
    parser.add_argument(
        "--help-strategy",
        metavar="NAME",
        action=HelpStrategyAction,
        default=argparse.SUPPRESS,
        help="Show strategy NAME's hyperparameters (name, type, default, help), its paper and what it does, then "
        "exit.",
    )
