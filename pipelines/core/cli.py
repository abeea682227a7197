"""One command-line convention for every command:

    python -m pipelines.<name> [--config FILE] [key=value ...] [--print-config] [--verbose] [--debug]

The keys are the fields of the command's config dataclass (nested sections dotted: `fetch.max_bytes=1e6`),
in a YAML file (`--config`) and/or on the command line (values parsed as YAML, later ones win). `--help`
lists every key with its type, default and the comment above the field in the source, generated from
the dataclasses, so the help cannot drift from the code.

Errors a user can fix (a bad key or value, a missing input file, storage that cannot be reached) are
one line on stderr, `pipelines.<name>: error: <message>`, exit status 2 (`--debug` shows the traceback
instead); anything unexpected keeps its traceback (exit status 1). Ray's own output goes to a log file
(see pipelines.core.console); `--verbose` brings it back to the terminal.

Hand-written on top of pipelines.core.config rather than draccus/tyro/jsonargparse: those parse
`--key value` flags with their own loaders, while every config, test and doc here uses `key=value`
overrides through one strict loader (unknown keys, type errors and `__post_init__` validation).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import functools
import inspect
import io
import os
import shutil
import sys
import textwrap
import tokenize
import traceback
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, Literal, TypeVar, Union

import yaml

from pipelines.core.config import ConfigError, _plain, load_config, to_dict

T = TypeVar("T")

OVERRIDES_HELP = "config keys (listed below); values are YAML, dotted keys for nested sections"


# ---------------------------------------------------------------------------------------------
# Field comments and the key listing.


def field_comments(cls: type) -> dict[str, str]:
    """Field name -> the `#` (or `#:`) comment lines directly above the field in the class source
    (or, failing those, a comment at the end of the field's own line, or the field's metadata["doc"]).
    Inherited fields included."""
    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is not object and dataclasses.is_dataclass(klass):
            out.update(_own_comments(klass))
    for f in dataclasses.fields(cls):  # classes made by make_dataclass have no source: field(metadata={"doc": ...})
        if f.name not in out and f.metadata.get("doc"):
            out[f.name] = str(f.metadata["doc"])
    return out


@functools.lru_cache(maxsize=None)
def _own_comments(cls: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # classes made at runtime have no source
        return {}
    comment_lines: dict[int, str] = {}  # row -> text of a line that holds only a comment
    trailing: dict[int, str] = {}  # row -> comment after code
    fields: dict[str, int] = {}
    depth, first, tokens = 0, True, list(tokenize.generate_tokens(io.StringIO(source).readline))
    for i, tok in enumerate(tokens):
        if tok.type == tokenize.INDENT:
            depth += 1
        elif tok.type == tokenize.DEDENT:
            depth -= 1
        elif tok.type == tokenize.NEWLINE:
            first = True
        elif tok.type == tokenize.COMMENT:
            text = tok.string.lstrip("#").removeprefix(":").strip()
            (comment_lines if tok.line.lstrip().startswith("#") else trailing)[tok.start[0]] = text
        elif tok.type not in (tokenize.NL, tokenize.ENCODING):
            if first and depth == 1 and tok.type == tokenize.NAME and i + 1 < len(tokens) \
                    and tokens[i + 1].string == ":":
                fields[tok.string] = tok.start[0]
            first = False
    out = {}
    for name, row in fields.items():
        above = []
        while row - 1 - len(above) in comment_lines:
            above.append(comment_lines[row - 1 - len(above)])
        text = " ".join(reversed(above)) or trailing.get(row, "")
        if text:
            out[name] = text
    return out


def type_label(tp: Any) -> str:
    """A config type as a user reads it: `int | None`, `list[str]`, `'clip' | 'siglip'`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is type(None):
        return "null"
    if origin in (Union, types.UnionType):
        return " | ".join(type_label(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) if isinstance(a, str) else _inline(a) for a in args)
    if origin in (list, tuple, dict):
        inner = ", ".join("..." if a is Ellipsis else type_label(a) for a in args)
        return f"{origin.__name__}[{inner}]" if args else origin.__name__
    if tp is Any:
        return "any"
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _inline(value: Any) -> str:
    """A value as one line of YAML (what you would type after `key=`)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = to_dict(value)
    text = yaml.safe_dump(_plain(value), default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text.removesuffix("...").strip()


def _default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return f" = {_inline(f.default)}"
    if f.default_factory is not dataclasses.MISSING:
        return f" = {_inline(f.default_factory())}"
    return "  (required)"


def _item_dataclass(tp: Any) -> type | None:
    """The dataclass of a `list[SomeDataclass]` field, else None."""
    args = typing.get_args(tp)
    if typing.get_origin(tp) is list and args and dataclasses.is_dataclass(args[0]):
        return args[0]
    return None


def _doc_line(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    if doc.startswith(f"{cls.__name__}("):  # the signature dataclasses put there when there is no docstring
        return ""
    return doc.split("\n\n")[0].replace("\n", " ")


def describe_keys(cls: type, hide: Sequence[str] = (), width: int | None = None) -> str:
    """Every key of `cls`, grouped by section (top level first, then each nested dataclass), each with its
    type, default and field comment. Keys in `hide` (dotted prefixes) are left out."""
    width = width or max(60, min(110, shutil.get_terminal_size((100, 24)).columns))
    wrap = functools.partial(textwrap.fill, width=width, initial_indent=" " * 8, subsequent_indent=" " * 8,
                             break_on_hyphens=False, break_long_words=False)
    blocks: list[str] = []

    def hidden(key: str) -> bool:
        return any(key == h or key.startswith(h + ".") for h in hide)

    def section(klass: type, prefix: str, title: str, note: str) -> None:
        hints = typing.get_type_hints(klass)
        comments = field_comments(klass)
        lines, nested = [], []
        for f in dataclasses.fields(klass):
            key = prefix + f.name
            if not f.init or hidden(key):
                continue
            tp = hints[f.name]
            if dataclasses.is_dataclass(tp):
                nested.append((tp, f"{key}.", key, comments.get(f.name, "")))
                continue
            lines.append(f"    {key}: {type_label(tp)}{_default(f)}")
            if comments.get(f.name):
                lines.append(wrap(comments[f.name]))
            item = _item_dataclass(tp)
            if item is not None:
                nested.append((item, f"{key}[].", f"{key}[] (each item of {key})", ""))
        if lines:
            head = [f"  [{title}] {klass.__name__}"]
            if note:
                head.append(textwrap.fill(note, width=width, initial_indent=" " * 4, subsequent_indent=" " * 4,
                                          break_on_hyphens=False, break_long_words=False))
            blocks.append("\n".join([*head, *lines]))
        for sub, sub_prefix, sub_title, sub_note in nested:
            section(sub, sub_prefix, sub_title, sub_note or _doc_line(sub))

    section(cls, "", "top level", _doc_line(cls))
    return "\n\n".join(blocks)


# ---------------------------------------------------------------------------------------------
# The command.


class _Usage(Exception):
    """A command-line error (argparse's), reported like any other input error."""


class _HelpShown(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise _Usage(f"{message} (--help lists the options and keys)")


# Keys that the manifests' secret pattern matches by name but that hold no secret (fetch.user_agent_token is the
# crawler's product token in robots.txt): printed, so that --print-config output loads back to the same config.
NOT_SECRET = frozenset({"user_agent_token"})


def redact(value: Any) -> Any:
    """Values of secret-looking keys replaced, as manifests do (pipelines.core.manifest.strip_secrets)."""
    from pipelines.core.manifest import REDACTED, strip_secrets

    if isinstance(value, dict):
        return {k: REDACTED if k not in NOT_SECRET and strip_secrets({k: None})[k] == REDACTED else redact(v)
                for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact(v) for v in value]
    return value


def dump_yaml(data: dict[str, Any]) -> str:
    """A resolved config as YAML that `--config` loads back to the same config; secrets redacted."""
    return yaml.safe_dump(_plain(redact(data)), sort_keys=False, default_flow_style=False, width=100)


def is_user_error(err: BaseException) -> bool:
    """Errors a user fixes by changing a key, a file or a setting: reported in one line, exit status 2.
    An exception raised inside a Ray task or actor is not one of them (Ray subclasses the original
    exception type, so a worker's ValueError would otherwise pass for a config error)."""
    from pipelines.core.storage import StorageError

    ray_exceptions = sys.modules.get("ray.exceptions")
    if ray_exceptions is not None and isinstance(err, ray_exceptions.RayError):
        return False
    return isinstance(err, (_Usage, ConfigError, ValueError, FileNotFoundError, StorageError))


def report_error(name: str, err: BaseException, debug: bool) -> int:
    if debug:
        traceback.print_exception(err)
    else:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"pipelines.{name}: error: {message}", file=sys.stderr, flush=True)
    return 2


def log_file(name: str, root: str | None, now: dt.datetime | None = None) -> str:
    """Where Ray's output of this command goes: `<root>/_logs/<name>-<timestamp>.log` for a local output root,
    `./ray-logs/<name>-<timestamp>.log` for an s3:// one (or none)."""
    stamp = (now or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    if root and "://" not in root:
        return os.path.join(os.path.abspath(root), "_logs", f"{name}-{stamp}.log")
    return os.path.join(os.path.abspath("ray-logs"), f"{name}-{stamp}.log")


def run_command(
    name: str,
    cls: type[T],
    argv: Sequence[str] | None,
    body: Callable[[T, argparse.Namespace], Any],
    *,
    doc: str | None = None,
    load: Callable[[str | None, list[str]], T] | None = None,
    printable: Callable[[T], dict[str, Any] | str] | None = None,
    hide: Sequence[str] = (),
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    log_root: Callable[[T], str | None] | None = None,
    keys_note: str = "",
    status: bool = True,
) -> int:
    """Parse `argv`, load the config and run `body(cfg, args)`; returns the exit status (body's, if it
    returns an int, else 0).

    doc: the module docstring (its first paragraph is the description).
    load: (config file, overrides) -> config; default `load_config(cls, ...)`.
    printable: config -> the dict `--print-config` shows as YAML (or its text); default `to_dict`.
    hide: dotted key prefixes `--help` leaves out (e.g. keys the DAG runner sets itself).
    add_arguments: the command's own flags (the DAG runner's --only, --from, --force, --dry-run).
    log_root: config -> the output root the Ray log file goes under (see log_file).
    status: show a progress line for the command as one stage (the DAG runner shows one per stage).
    """
    from pipelines.core import console

    argv = list(sys.argv[1:] if argv is None else argv)
    prog = f"python -m pipelines.{name}"
    parser = _parser(prog, cls, doc, hide, keys_note)
    if add_arguments is not None:
        add_arguments(parser)
    try:
        args = parser.parse_intermixed_args(argv)
    except _HelpShown:
        return 0
    except _Usage as err:
        return report_error(name, err, debug=False)
    debug = args.debug
    try:
        cfg = (load or functools.partial(load_config, cls))(args.config, list(args.overrides))
    except Exception as err:
        if not is_user_error(err):
            raise
        return report_error(name, err, debug)
    if args.print_config:
        shown = (printable or to_dict)(cfg)
        sys.stdout.write(shown if isinstance(shown, str) else dump_yaml(shown))
        return 0
    path = None if args.verbose else log_file(name, log_root(cfg) if log_root else None)
    with console.session(name, path, verbose=args.verbose, status=status):
        try:
            rc = body(cfg, args)
            return rc if isinstance(rc, int) else 0
        except Exception as err:
            if not is_user_error(err):
                console.failed()
                raise
            console.discard()
            return report_error(name, err, debug)


def _parser(prog: str, cls: type, doc: str | None, hide: Sequence[str], keys_note: str) -> _Parser:
    description = (doc or "").strip().split("\n\n")[0]
    parser = _Parser(prog=prog, description=description, add_help=False,
                     formatter_class=argparse.RawDescriptionHelpFormatter,
                     usage=f"{prog} [--config FILE] [key=value ...] [options]")

    class Help(argparse.Action):
        def __init__(self, **kw: Any) -> None:
            super().__init__(nargs=0, **kw)

        def __call__(self, p: argparse.ArgumentParser, *_: Any) -> None:
            keys = describe_keys(cls, hide)
            sys.stdout.write(p.format_help() + "\nkeys (key=value on the command line, or the same keys nested in "
                             "the --config YAML):\n\n" + keys + "\n" + (f"\n{keys_note}\n" if keys_note else ""))
            raise _HelpShown

    parser.add_argument("-h", "--help", action=Help, help="show this help (every key) and exit")
    parser.add_argument("--config", metavar="FILE", help="YAML file of keys; omitted = the defaults below")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help=OVERRIDES_HELP)
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML (loadable with --config) and exit")
    parser.add_argument("--verbose", action="store_true",
                        help="show Ray's own output (its logs, progress bars, the workers' prints) on the terminal "
                             "instead of only in the log file")
    parser.add_argument("--debug", action="store_true", help="show the traceback of config and input errors")
    return parser
