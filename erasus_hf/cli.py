"""`erasus-hf`: the command line. Every command parses its dataclasses with `HfArgumentParser`, takes an optional
YAML recipe (`--config`) whose values flags override, and documents every field in `--help`.

No secret leaves a command: the values of its `--*token` options are registered as secrets
(`erasus_hf.redaction`), the card's reproducing command is redacted, every log record is redacted while the command
runs, and an exception escaping it is scrubbed before it is printed."""

from __future__ import annotations

import difflib
import shlex
import sys

from .redaction import redact, redact_argv, redact_exception, redacted_log_records, register_secret, secrets_in_argv

COMMANDS = {
    "demo": "Offline demo: learn real TOFU authors from scratch, then unlearn two with NPO + LoRA.",
    "unlearn": "Run an unlearning recipe (YAML + flags) on TOFU, MUSE or any rows: train, save the weights, evaluate.",
    "evaluate": "Evaluate a model or adapter (TOFU, MUSE, MIA, memorization, any rows); write the evaluation JSON.",
    "verify": "Test an unlearned model's forget rows against a holdout and a retrained model (p-values, levels).",
    "tune": "Search a recipe's hyperparameters (optuna, Trainer.hyperparameter_search); write the best recipe.",
    "forget": "Apply deletion requests in order, one adapter per request, each recorded in the run's deletion ledger.",
    "push": "Upload an output folder (safetensors weights, card, evaluation JSON) to the Hugging Face Hub.",
}
# the model family of the commands that train one, known before any model is loaded: `--strategy` may name only
# the strategies that serve it
CAUSAL_LM = "causal_lm"


def _usage() -> str:
    lines = ["usage: erasus-hf COMMAND [--help] [--config RECIPE.yaml] [options]", "", "commands:"]
    lines += [f"  {name:<10}{text}" for name, text in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    register_secret(*secrets_in_argv(argv))
    try:
        with redacted_log_records():
            return _run(argv)
    except BaseException as err:  # SystemExit and KeyboardInterrupt too: their tracebacks are printed as well
        redact_exception(err)
        raise


def _run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        close = difflib.get_close_matches(command, COMMANDS, n=1)
        hint = f" did you mean {close[0]!r}?" if close else ""
        print(
            redact(f"erasus-hf: error: unknown command {command!r};{hint} commands: {', '.join(COMMANDS)}"),
            file=sys.stderr,
        )
        return 2
    from .scripts.parsing import make_parser, parse

    if command == "demo":
        from .demo import DemoArguments, run_demo

        (args,) = parse(make_parser((DemoArguments,), "erasus-hf demo", COMMANDS["demo"]), rest, CAUSAL_LM)
        run_demo(args)
    elif command == "unlearn":
        from .config import UnlearningConfig
        from .data.loading import DataSourceError
        from .scripts.data_options import OPTION_GROUPS
        from .scripts.parsing import UsageError
        from .scripts.strategy_help import add_strategy_help
        from .scripts.unlearn import UnlearnArguments, run_unlearn

        parser = make_parser(
            (UnlearnArguments, UnlearningConfig), "erasus-hf unlearn", COMMANDS["unlearn"], OPTION_GROUPS
        )
        add_strategy_help(parser)  # `--help-strategy NAME`: a strategy's hyperparameters
        arguments = parse(parser, rest, CAUSAL_LM)
        try:
            run_unlearn(*arguments, command=shlex.join(["erasus-hf", "unlearn", *redact_argv(rest)]))
        except (UsageError, DataSourceError) as err:  # bad data or options, found before any compute: one line
            parser.error(str(err))
    elif command == "tune":
        from .config import UnlearningConfig
        from .data.loading import DataSourceError
        from .scripts.data_options import OPTION_GROUPS
        from .scripts.parsing import UsageError
        from .scripts.strategy_help import add_strategy_help
        from .scripts.tune import DESCRIPTION, TuneArguments, run_tune
        from .scripts.unlearn import UnlearnArguments

        groups = {"tuning": ("What the search draws and maximises.", list(TuneArguments.__dataclass_fields__))}
        parser = make_parser(
            (TuneArguments, UnlearnArguments, UnlearningConfig),
            "erasus-hf tune",
            DESCRIPTION,
            {**groups, **OPTION_GROUPS},
        )
        add_strategy_help(parser)
        arguments = parse(parser, rest, CAUSAL_LM)
        try:
            run_tune(*arguments[1:], arguments[0], argv=rest)
        except (UsageError, DataSourceError) as err:
            parser.error(str(err))
    elif command == "forget":
        from .config import UnlearningConfig
        from .data.loading import DataSourceError
        from .scripts.forget import DESCRIPTION, ForgetArguments, positional_requests, run_forget
        from .scripts.parsing import UsageError

        parser = make_parser((ForgetArguments, UnlearningConfig), "erasus-hf forget", DESCRIPTION)
        parser.usage = "erasus-hf forget REQUEST_FILE [REQUEST_FILE ...] --output_dir RUN [--OPTION VALUE ...]"
        arguments = parse(parser, positional_requests(rest), CAUSAL_LM)
        try:
            run_forget(*arguments)
        except (UsageError, DataSourceError) as err:
            parser.error(str(err))
    elif command == "push":
        from .scripts.push import HubUnreachableError, PushArguments, positional_output_dir, run_push

        (args,) = parse(make_parser((PushArguments,), "erasus-hf push", COMMANDS["push"]), positional_output_dir(rest))
        try:
            print(redact(run_push(args)))
        except HubUnreachableError as err:  # one line, not the HTTP client's traceback
            print(redact(f"erasus-hf push: {err}"), file=sys.stderr)
            return 1
    elif command == "verify":
        from .scripts.verify import main as verify_main

        return verify_main(rest)
    else:
        from .data.loading import DataSourceError
        from .scripts.data_options import OPTION_GROUPS, FormatArguments
        from .scripts.evaluate import EvaluateArguments, run_evaluate
        from .scripts.parsing import UsageError

        parser = make_parser(
            (EvaluateArguments, FormatArguments), "erasus-hf evaluate", COMMANDS["evaluate"], OPTION_GROUPS
        )
        args, formats = parse(parser, rest)
        try:
            run_evaluate(args, formats)
        except (UsageError, DataSourceError) as err:
            parser.error(str(err))
    return 0


if __name__ == "__main__":
    sys.exit(main())
