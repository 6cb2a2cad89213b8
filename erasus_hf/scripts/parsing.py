"""One parsing convention for every `erasus-hf` command: `HfArgumentParser` over the command's dataclasses, an
optional YAML recipe (`--config RECIPE.yaml`) whose values are defaults, and command-line flags that override them.

A mistake on the command line (an unknown or mistyped flag, a value of the wrong type, an unknown strategy) ends in
one line, `erasus-hf: error: ...`, with exit status 2: no usage block, no traceback. The parsed values of every
option named `...token` (from a flag or the recipe) are registered as secrets, and a parse error is redacted before
it is printed (`erasus_hf.redaction`)."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import yaml
from transformers import HfArgumentParser, TrainingArguments

from ..redaction import redact, register_secret
from ..registry import Registry


class UsageError(ValueError):
    """A value the command cannot run with, found after parsing (rows that fit no format, a split the dataset lacks,
    two options that disagree): `erasus-hf` prints it as one `erasus-hf: error:` line, exit status 2, before any
    compute. Its message names the option and the fix."""


class RedactingArgumentParser(HfArgumentParser):
    """`HfArgumentParser` whose errors are one redacted line (`argument --max_steps: invalid int value: '<redacted>'`
    would otherwise come after a usage block of every `TrainingArguments` option)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"erasus-hf: error: {redact(message)} (see `{self.prog} --help`)\n")


def make_parser(
    dataclass_types: tuple[type, ...],
    prog: str,
    description: str,
    groups: Mapping[str, tuple[str | None, Sequence[str]]] | None = None,
) -> HfArgumentParser:
    """The command's parser: `--config` right after `--help`, then the command's own options, the options of each of
    `groups` (title -> (description, option names)) under its title, and the inherited `TrainingArguments` options
    last."""
    usage = f"{prog} [--config RECIPE.yaml] [--OPTION VALUE ...]"  # the full one lists every TrainingArguments flag
    parser = RedactingArgumentParser(dataclass_types, prog=prog, description=description, usage=usage)
    config = parser.add_argument(
        "--config",
        default=None,
        help="A YAML recipe: its keys are this command's options; flags given on the command line win over it.",
    )
    parser._optionals._group_actions.remove(config)  # listed right after --help
    parser._optionals._group_actions.insert(1, config)
    for title, (text, names) in (groups or {}).items():
        option_group(parser, title, names, text)
    inherited_options_last(parser)
    return parser


def option_group(parser: HfArgumentParser, title: str, names: Sequence[str], description: str | None = None) -> None:
    """List the options `names` (those the parser has) under `title` in `--help`, in the order of `names`."""
    group = parser.add_argument_group(title, description)
    for name in names:
        for action in [a for a in parser._optionals._group_actions if a.dest == name]:  # --x and --no_x
            parser._optionals._group_actions.remove(action)
            group._group_actions.append(action)


def inherited_options_last(parser: HfArgumentParser) -> None:
    """Show the options a `TrainingArguments` subclass inherits after the command's own ones in `--help`.

    `HfArgumentParser` puts every field of a dataclass in one group, in field order, so the hundred inherited
    `TrainingArguments` fields would come before the unlearning options. A field the subclass declares again with
    another default (`logging_steps`, `remove_unused_columns`) stays with the `TrainingArguments` options."""
    if not any(issubclass(dtype, TrainingArguments) for dtype in parser.dataclass_types):
        return
    inherited = {f.name for f in dataclasses.fields(TrainingArguments)}
    group = parser.add_argument_group("TrainingArguments options (inherited from transformers)")
    for action in [a for a in parser._optionals._group_actions if a.dest in inherited]:
        parser._optionals._group_actions.remove(action)
        group._group_actions.append(action)


def parse(parser: HfArgumentParser, argv: list[str], objective: str | None = None) -> tuple[Any, ...]:
    """The command's dataclasses from `argv`, with `--config` values as defaults; unknown recipe keys fail with the
    list of valid ones. `objective` (e.g. "causal_lm"), when the command knows it, limits the strategies a
    `--strategy` may name to those serving it."""
    config, rest = _config_option(argv)
    if config is not None and not any(a in ("-h", "--help") for a in rest):
        values = yaml_recipe(argv)
        valid = {f.name for dc in parser.dataclass_types for f in dataclasses.fields(dc) if f.init}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"Unknown keys in {config}: {unknown}. Valid keys: {', '.join(sorted(valid))}")
        for action in parser._actions:  # a value from the recipe satisfies a required option
            if action.dest in values:
                action.required = False
        parser.set_defaults(**values)
    _, leftover = parser.parse_known_args(rest)  # refused before any dataclass is built
    if leftover:
        unrecognized(parser, leftover)
    try:  # a value the configs refuse (`UnlearningConfig.__post_init__`): one line naming the option
        outputs = tuple(parser.parse_args_into_dataclasses(rest)[: len(parser.dataclass_types)])
    except ValueError as err:
        parser.error(str(err))
    for output in outputs:
        register_secret(*(getattr(output, f.name) for f in dataclasses.fields(output) if f.name.endswith("token")))
        if "strategy" in {f.name for f in dataclasses.fields(output)}:
            try:
                output.strategy = strategy_name(output.strategy, objective)
            except ValueError as err:
                parser.error(str(err))
        check_strategy(output)
    return outputs


def _config_option(argv: list[str]) -> tuple[str | None, list[str]]:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    return known.config, rest


def yaml_recipe(argv: list[str]) -> dict[str, Any]:
    """The option -> value mapping of the `--config` recipe in `argv` ({} without one)."""
    config, _ = _config_option(argv)
    if config is None:
        return {}
    with open(config) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{config} must hold a mapping of option: value, got {type(values).__name__}")
    return values


def unrecognized(parser: argparse.ArgumentParser, leftover: list[str]) -> NoReturn:
    """Exit with the flags the parser does not know, each with the closest option it has; only the flags are named,
    never the values after them (one may be a token)."""
    flags = [arg.split("=", 1)[0] for arg in leftover if arg.startswith("-")]
    if not flags:
        parser.error(f"unexpected argument {leftover[0]!r}: options are given as --name value")
    hints = []
    for flag in flags:
        close = difflib.get_close_matches(flag, list(parser._option_string_actions), n=1)
        hints.append(f"{flag} (did you mean {close[0]}?)" if close else flag)
    parser.error(f"unrecognized option{'s' if len(flags) > 1 else ''}: {', '.join(hints)}")


def strategy_name(name: str, objective: str | None = None) -> str:
    """The registered name of strategy `name`, matched case-insensitively (`NPO` is `npo`). An unknown name, or one
    that does not serve `objective`, raises ValueError with the closest name and the strategies that do serve it."""
    from ..strategies import STRATEGIES

    by_lower = {registered.lower(): registered for registered in STRATEGIES}
    found = by_lower.get(str(name).lower())
    serving = Registry("strategy", f"strategies for {objective}" if objective else "strategies")
    for registered, cls in STRATEGIES.items():
        if objective is None or objective in cls.objectives:
            serving.register(cls, registered)
    if found is not None and found not in serving:
        served = ", ".join(STRATEGIES[found].objectives)
        raise ValueError(
            f"Strategy {found!r} does not serve {objective} models (it serves: {served}); strategies for "
            f"{objective}: {', '.join(sorted(serving))}"
        )
    if found is None:
        serving.lookup(name)  # raises: the closest name and the valid ones
    return found


def check_strategy(arguments: Any) -> None:
    """Build the strategy an `UnlearningConfig` names once, at parsing: an unknown name, an unknown hyperparameter or
    one of the wrong type (recipe strings are converted by the declared type) fails before any data is read or model
    trained, not after the starting model is built."""
    from ..config import UnlearningConfig
    from ..strategies import get_strategy

    if isinstance(arguments, UnlearningConfig):
        get_strategy(arguments.strategy, **arguments.strategy_kwargs)
