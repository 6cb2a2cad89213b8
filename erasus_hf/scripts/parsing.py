"""One parsing convention for every `erasus-hf` command: `HfArgumentParser` over the command's dataclasses, an
optional YAML recipe (`--config RECIPE.yaml`) whose values are defaults, and command-line flags that override them."""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import yaml
from transformers import HfArgumentParser


def make_parser(dataclass_types: tuple[type, ...], prog: str, description: str) -> HfArgumentParser:
    parser = HfArgumentParser(dataclass_types, prog=prog, description=description)
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
    outputs = parser.parse_args_into_dataclasses(rest)
    return tuple(outputs[: len(parser.dataclass_types)])
