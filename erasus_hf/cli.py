"""`erasus-hf`: the command line. Subcommands parse their dataclass with `HfArgumentParser`, so `--help` lists
every field with its help text."""

from __future__ import annotations

import sys

from transformers import HfArgumentParser

COMMANDS = {
    "demo": "Offline demo: learn real TOFU authors from scratch, then unlearn two with NPO + LoRA.",
    "evaluate": "Evaluate a model or adapter (TOFU, MUSE, MIA, memorization) and write the evaluation JSON.",
}


def _usage() -> str:
    lines = ["usage: erasus-hf COMMAND [--help] [options]", "", "commands:"]
    lines += [f"  {name:<8}{text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from .demo import DemoArguments, run_demo

        parser = HfArgumentParser(DemoArguments, prog="erasus-hf demo", description=COMMANDS["demo"])
        (args,) = parser.parse_args_into_dataclasses(rest)
        run_demo(args)
        return 0
    if command == "evaluate":
        from .scripts.evaluate import EvaluateArguments, run_evaluate

        parser = HfArgumentParser(EvaluateArguments, prog="erasus-hf evaluate", description=COMMANDS["evaluate"])
        (args,) = parser.parse_args_into_dataclasses(rest)
        run_evaluate(args)
        return 0
    print(f"erasus-hf: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
