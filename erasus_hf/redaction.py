"""No secret in anything erasus_hf writes or prints: one helper that every writer (model card, JSON files, printed
lines, log records, exception messages) passes its text through.

What is a secret here:

- every value registered with `register_secret` (the CLI registers each value of a `--*token` option, the
  `UnlearningConfig` its `hub_token`, `erasus-hf push` its `--token`), the `HF_TOKEN` / `HUGGING_FACE_HUB_TOKEN`
  environment variables and the saved login (`hf auth login`, the file `huggingface_hub.constants.HF_TOKEN_PATH`);
  values shorter than `MIN_SECRET_LENGTH` characters are ignored (replacing them would garble ordinary text);
- anything shaped like a Hugging Face token, wherever it appears: `hf_` or `api_org_` followed by at least 30
  letters and digits (user access tokens are `hf_` and 34 of them);
- the value of an option named `...token` (`--hub_token X`, `--token=X`, argparse's `['--token', 'X']`) and of an
  assignment `NAME=X` whose name ends in TOKEN, SECRET, PASSWORD or API_KEY (`HF_TOKEN=X` before a command).

Each is replaced by `REDACTED`. transformers already masks `TrainingArguments` fields ending in `_token` in
`to_dict` / `to_json_string` / `str` (as `<HUB_TOKEN>`); huggingface_hub hides the Authorization header in its debug
logs. This module covers what they do not: the other fields, the command line, our own files and messages.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

REDACTED = "<redacted>"
MIN_SECRET_LENGTH = 8
TOKEN_ENV_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

TOKEN_SHAPE = re.compile(r"(?:hf|api_org)_[A-Za-z0-9]{30,}")
SECRET_OPTION = re.compile(r"--?[A-Za-z0-9_-]*token", re.IGNORECASE)  # an option name whose value is a credential
# The same option in free text, with its value: `--token X`, `--token=X`, `'--token', 'X'` (argparse's lists).
SECRET_OPTION_IN_TEXT = re.compile(
    r"(?P<key>--?[A-Za-z0-9_-]*token)(?P<sep>=|['\"]?,?\s+['\"]?)(?P<value>(?![-<])[^\s'\",\]]+)", re.IGNORECASE
)
SECRET_ASSIGNMENT = re.compile(
    r"(?P<key>\b[A-Za-z0-9_]*(?:TOKEN|SECRET|PASSWORD|API_KEY))=(?!None\b|<)(?P<value>'[^']*'|\"[^\"]*\"|[^\s'\",)\]]+)",
    re.IGNORECASE,
)

_registered: set[str] = set()


def register_secret(*values: str | None) -> None:
    """Treat `values` as secrets in every later `redact` of this process (None and short values are ignored)."""
    _registered.update(v for v in values if isinstance(v, str) and len(v) >= MIN_SECRET_LENGTH)


def known_secrets(extra: Iterable[str | None] = ()) -> list[str]:
    """The registered secrets, `extra`, the token environment variables and the saved login, longest first.

    The saved login is read from its file, never through `huggingface_hub.get_token` (which may refresh an OAuth
    token or run an OIDC exchange over the network)."""
    from huggingface_hub import constants

    values = set(_registered)
    values.update(v for v in extra if isinstance(v, str))
    values.update(os.environ.get(name) or "" for name in TOKEN_ENV_VARS)
    with contextlib.suppress(OSError):
        values.add(Path(constants.HF_TOKEN_PATH).read_text().strip())
    return sorted((v.strip() for v in values if len(v.strip()) >= MIN_SECRET_LENGTH), key=len, reverse=True)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """`text` with every secret (see the module docstring; `secrets` adds more) replaced by `REDACTED`."""
    return _redact(text, known_secrets(secrets))


def _redact(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    text = TOKEN_SHAPE.sub(REDACTED, text)
    text = SECRET_OPTION_IN_TEXT.sub(lambda m: m["key"] + m["sep"] + REDACTED, text)
    return SECRET_ASSIGNMENT.sub(lambda m: m["key"] + "=" + REDACTED, text)


def secrets_in_argv(argv: Sequence[str]) -> list[str]:
    """The values of the `--*token` options of a command line (`--hub_token X` and `--hub_token=X`)."""
    found = []
    for index, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if not SECRET_OPTION.fullmatch(name):
            continue
        if eq:
            found.append(value)
        elif index + 1 < len(argv) and not argv[index + 1].startswith("-"):
            found.append(argv[index + 1])
    return found


def redact_argv(argv: Sequence[str], secrets: Iterable[str | None] = ()) -> list[str]:
    """A command line with the value of every `--*token` option, and every other secret, replaced by `REDACTED`
    (element by element, so `shlex.join` of the result quotes the placeholder)."""
    secrets = known_secrets([*secrets, *secrets_in_argv(argv)])
    out = []
    for index, arg in enumerate(argv):
        name, eq, _ = arg.partition("=")
        if eq and SECRET_OPTION.fullmatch(name):
            out.append(f"{name}={REDACTED}")
        elif index and SECRET_OPTION.fullmatch(argv[index - 1]) and not arg.startswith("-"):
            out.append(REDACTED)
        else:
            out.append(_redact(arg, secrets))
    return out


def redact_json(value: Any, secrets: Iterable[str | None] = ()) -> Any:
    """A copy of a JSON-like value (dicts, lists, tuples, strings, numbers) with `redact` applied to every string,
    keys included."""
    return _redact_json(value, known_secrets(secrets))


def _redact_json(value: Any, secrets: list[str]) -> Any:
    if isinstance(value, str):
        return _redact(value, secrets)
    if isinstance(value, dict):
        return {_redact_json(k, secrets): _redact_json(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_redact_json(v, secrets) for v in value)
    return value


def redact_exception(err: BaseException, secrets: Iterable[str | None] = ()) -> BaseException:
    """Scrub `err` in place, with its causes and contexts, and return it: its `args`, its notes and its string
    attributes (what a traceback prints: `HfHubHTTPError`'s `server_message`, argparse's `message`, ...)."""
    secrets = known_secrets(secrets)
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        with contextlib.suppress(AttributeError, TypeError):
            current.args = _redact_json(tuple(current.args), secrets)
        for name, value in list(vars(current).items()):
            if isinstance(value, (str, list, tuple, dict)):
                with contextlib.suppress(AttributeError, TypeError):
                    setattr(current, name, _redact_json(value, secrets))
        todo += [current.__cause__, current.__context__]
    return err


@contextlib.contextmanager
def redacted_log_records() -> Iterator[None]:
    """While inside, every log record of this process is created with its message (and exception) redacted."""
    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: logging reports it when the record is emitted
            return record
        record.msg, record.args = redact(message), ()
        if record.exc_info and record.exc_info[1] is not None:
            redact_exception(record.exc_info[1])
        return record

    logging.setLogRecordFactory(factory)
    try:
        yield
    finally:
        logging.setLogRecordFactory(previous)
