"""One parsing convention for every `erasus-hf` command: `HfArgumentParser` over the command's dataclasses, an
optional YAML recipe (`--config RECIPE.yaml`) whose values are defaults, and command-line flags that override them.

The parsed values of every option named `...token` (from a flag or the recipe) are registered as secrets, and a
parse error is redacted before it is printed (`erasus_hf.redaction`)."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import yaml
from transformers import HfArgumentParser

from ..redaction import redact, register_secret


class RedactingArgumentParser(HfArgumentParser):
    """`HfArgumentParser` whose error message (`argument --max_steps: invalid int value: 'hf_...'`) is redacted."""

    def error(self, message: str):
        super().error(redact(message))


def make_parser(dataclass_types: tuple[type, ...], prog: str, description: str) -> HfArgumentParser:
    parser = RedactingArgumentParser(dataclass_types, prog=prog, description=description)
    parser.add_argument(
        "--config",
        default=None,
        help="A YAML recipe: its keys are this command's options; flags given on the command line win over it.",
    )
    return parser


def parse(parser: HfArgumentParser, argv: list[str]) -> tuple[Any, ...]:
    """The command's dataclasses from `argv`, with `--config` values as defaults; unknown recipe keys fail with the
    list of valid ones."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)
    if known.config is not None and not any(a in ("-h", "--help") for a in rest):
        with open(known.config) as f:
            values = yaml.safe_load(f) or {}
        if not isinstance(values, dict):
            raise ValueError(f"{known.config} must hold a mapping of option: value, got {type(values).__name__}")
        valid = {f.name for dc in parser.dataclass_types for f in dataclasses.fields(dc) if f.init}
        unknown = sorted(set(values) - valid)
        if unknown:
            raise ValueError(f"Unknown keys in {known.config}: {unknown}. Valid keys: {', '.join(sorted(valid))}")
        for action in parser._actions:  # a value from the recipe satisfies a required option
            if action.dest in values:
                action.required = False
        parser.set_defaults(**values)
    outputs = tuple(parser.parse_args_into_dataclasses(rest)[: len(parser.dataclass_types)])
    for output in outputs:
        register_secret(*(getattr(output, f.name) for f in dataclasses.fields(output) if f.name.endswith("token")))
        check_strategy(output)
    return outputs


def check_strategy(arguments: Any) -> None:
    """Build the strategy an `UnlearningConfig` names once, at parsing: an unknown name, an unknown hyperparameter or
    one of the wrong type (recipe strings are converted by the declared type) fails before any data is read or model
    trained, not after the starting model is built."""
    from ..config import UnlearningConfig
    from ..strategies import get_strategy

    if isinstance(arguments, UnlearningConfig):
        get_strategy(arguments.strategy, **arguments.strategy_kwargs)
