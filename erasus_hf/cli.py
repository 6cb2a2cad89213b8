"""`erasus-hf`: the command line. Every command parses its dataclasses with `HfArgumentParser`, takes an optional
YAML recipe (`--config`) whose values flags override, and documents every field in `--help`."""

from __future__ import annotations

import shlex
import sys

COMMANDS = {
    "demo": "Offline demo: learn real TOFU authors from scratch, then unlearn two with NPO + LoRA.",
    "unlearn": "Run an unlearning recipe (YAML + flags): train, save the weights, evaluate with TOFU.",
    "evaluate": "Evaluate a model or adapter (TOFU, MUSE, MIA, memorization) and write the evaluation JSON.",
    "push": "Upload an output folder (safetensors weights, card, evaluation JSON) to the Hugging Face Hub.",
}


def _usage() -> str:
    lines = ["usage: erasus-hf COMMAND [--help] [--config RECIPE.yaml] [options]", "", "commands:"]
    lines += [f"  {name:<10}{text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"erasus-hf: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    from .scripts.parsing import make_parser, parse

    if command == "demo":
        from .demo import DemoArguments, run_demo

        (args,) = parse(make_parser((DemoArguments,), "erasus-hf demo", COMMANDS["demo"]), rest)
        run_demo(args)
    elif command == "unlearn":
        from .config import UnlearningConfig
        from .scripts.unlearn import UnlearnArguments, run_unlearn

        parser = make_parser((UnlearnArguments, UnlearningConfig), "erasus-hf unlearn", COMMANDS["unlearn"])
        run_unlearn(*parse(parser, rest), command=shlex.join(["erasus-hf", "unlearn", *rest]))
    elif command == "push":
        from .scripts.push import PushArguments, positional_output_dir, run_push

        (args,) = parse(make_parser((PushArguments,), "erasus-hf push", COMMANDS["push"]), positional_output_dir(rest))
        print(run_push(args))
    else:
        from .scripts.evaluate import EvaluateArguments, run_evaluate

        (args,) = parse(make_parser((EvaluateArguments,), "erasus-hf evaluate", COMMANDS["evaluate"]), rest)
        run_evaluate(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
