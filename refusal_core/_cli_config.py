"""Command-line options and config files generated from frozen config dataclasses.

The defaults, types and documentation of a setting live once, in its
dataclass; this module reads them and builds the ``argparse`` options and the
TOML reader and writer from them, so a field added to a config appears on the
command line and in the config file without being declared again here.

Rules (one option per leaf field; nested dataclass fields are flattened with
their field name as a prefix):

========================  ===========================================================
field type                command line
========================  ===========================================================
``int``, ``float``,       ``--name VALUE``; ints below 0 are refused at parse time
``str``
``bool``                  ``--name`` / ``--no-name``
``tuple[X, ...]``         ``--name a,b,c`` (``''`` is the empty tuple)
``X | None``              as ``X``, and the word ``none`` gives ``None``
``Literal[...]``          ``--name CHOICE``
nested dataclass          its fields, as ``--<field>-<subfield>``
anything else             settable only in the config file (listed in ``--help``)
========================  ===========================================================

The help text of a field is, in this order: ``metadata["help"]``; the comment
on the field's line; the block of full-line comments directly above it (``#``
or ``#:``; a block documents the one field below it, never the fields after
that one); a string literal right after it (an attribute docstring); the help
table of the caller; else the field's name in words (``help_source`` "none").

Example:
    >>> from dataclasses import dataclass
    >>> @dataclass(frozen=True)
    ... class Knobs:
    ...     steps: int = 3  # optimisation steps
    ...     names: tuple[str, ...] = ("a", "b")  # which names
    >>> [(o.flag, o.default) for o in config_options(Knobs)]
    [('--steps', 3), ('--names', ('a', 'b'))]
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import io
import json
import math
import textwrap
import tokenize
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from refusal_core.errors import InvalidArgumentError

__all__ = [
    "ConfigOption",
    "add_config_options",
    "build_config",
    "cli_overrides",
    "commented_config_toml",
    "config_options",
    "config_to_toml",
    "field_help",
    "parse_toml",
    "read_config_file",
]

#: The word that gives ``None`` for an optional field, on the command line and in TOML.
NONE_WORD = "none"

_DEST_PREFIX = "cfg:"


@dataclass(frozen=True)
class ConfigOption:
    """One leaf field of a config dataclass, as a command-line option.

    ``path`` is the chain of field names from the top config (``("aird",
    "alpha_attn")``), ``flag`` the option (``--aird-alpha-attn``), ``kind`` one
    of ``"int" "float" "str" "bool" "tuple" "literal" "other"``, ``element``
    the element type of a tuple (a type, or ``None`` for a fixed-length tuple
    of mixed types), ``length`` the length of a fixed-length tuple (``None``
    for ``tuple[X, ...]``), ``optional`` whether ``None`` is allowed,
    ``choices`` the values of a ``Literal``, ``help_source`` where the help
    came from (``"metadata" "comment" "docstring" "table"``, or ``"none"``).
    """

    path: tuple[str, ...]
    flag: str
    kind: str
    default: Any
    help: str
    help_source: str
    optional: bool = False
    element: Any = None
    length: int | None = None
    choices: tuple[Any, ...] = ()

    @property
    def dest(self) -> str:
        return _DEST_PREFIX + ".".join(self.path)

    @property
    def key(self) -> str:
        """The dotted name of the field, as in a config file (``aird.alpha_attn``)."""
        return ".".join(self.path)


# ----------------------------------------------------------------------------
# help text from the source of a dataclass
# ----------------------------------------------------------------------------


def _source_help(cls: type) -> dict[str, tuple[str, str]]:
    """``{field: (help, source)}`` from comments and attribute docstrings in ``cls``'s source."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):
        return {}
    tree = ast.parse(source)
    if not tree.body or not isinstance(tree.body[0], ast.ClassDef):
        return {}
    lines = source.splitlines()
    comments: dict[int, str] = {}
    full_line: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            row = tok.start[0]
            comments[row] = tok.string.lstrip("#").lstrip(":").strip()
            if not lines[row - 1][: tok.start[1]].strip():
                full_line.add(row)

    out: dict[str, tuple[str, str]] = {}
    body = tree.body[0].body
    prev_end = 0
    for i, node in enumerate(body):
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            prev_end = node.end_lineno or node.lineno
            continue
        name = node.target.id
        end = node.end_lineno or node.lineno
        # The block of full-line comments directly above this field documents this field only: a
        # field right below it without a comment of its own gets no help from it (it used to
        # inherit the block, so `study --help` showed dtype's comment for --methods and onwards).
        block: list[str] = []
        row = node.lineno - 1
        while row > prev_end and row in full_line:
            block.insert(0, comments[row])
            row -= 1
        inline = [comments[r] for r in range(node.lineno, end + 1) if r in comments and r not in full_line]
        nxt = body[i + 1] if i + 1 < len(body) else None
        if inline:
            out[name] = (" ".join(inline), "comment")
        elif block:
            out[name] = (" ".join(block), "comment")
        elif (
            isinstance(nxt, ast.Expr)
            and isinstance(nxt.value, ast.Constant)
            and isinstance(nxt.value.value, str)
        ):
            out[name] = (inspect.cleandoc(nxt.value.value), "docstring")
        prev_end = end
    return out


def field_help(cls: type, name: str, table: Mapping[tuple[str, str], str] | None = None) -> tuple[str, str]:
    """``(help, source)`` of field ``name`` of dataclass ``cls`` (see the module docstring for the order)."""
    f = {f.name: f for f in dataclasses.fields(cls)}[name]
    if "help" in f.metadata:
        return str(f.metadata["help"]), "metadata"
    found = _source_help(cls).get(name)
    if found is not None and found[0]:
        return found
    if table is not None and (cls.__name__, name) in table:
        return table[(cls.__name__, name)], "table"
    return name.replace("_", " "), "none"


# ----------------------------------------------------------------------------
# options
# ----------------------------------------------------------------------------


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(args) < len(typing.get_args(tp)):
            return args[0], True
    return tp, False


def _kind(tp: Any) -> tuple[str, Any, int | None, tuple[Any, ...]]:
    """``(kind, element, length, choices)`` of an (already unwrapped) annotation."""
    if tp is bool:
        return "bool", None, None, ()
    if tp in (int, float, str):
        return tp.__name__, None, None, ()
    origin = typing.get_origin(tp)
    if origin is typing.Literal:
        return "literal", None, None, tuple(typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis and args[0] in (int, float, str):
            return "tuple", args[0], None, ()
        if args and Ellipsis not in args and len(set(args)) == 1 and args[0] in (int, float, str):
            return "tuple", args[0], len(args), ()
    return "other", None, None, ()


def config_options(
    cls: type,
    *,
    table: Mapping[tuple[str, str], str] | None = None,
    prefix: tuple[str, ...] = (),
    default: Any = None,
) -> list[ConfigOption]:
    """The leaf options of dataclass ``cls`` (nested dataclasses flattened), in field order.

    ``default`` is the instance whose values are the defaults (``cls()`` when
    omitted, so ``default_factory`` values count); ``table`` maps
    ``(class name, field)`` to help text for fields without their own.
    """
    if not dataclasses.is_dataclass(cls):
        raise InvalidArgumentError(f"{cls!r} is not a dataclass")
    if default is None:
        default = cls()
    hints = typing.get_type_hints(cls)
    options: list[ConfigOption] = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        tp, optional = _unwrap_optional(hints[f.name])
        value = getattr(default, f.name)
        path = (*prefix, f.name)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp) and not optional:
            options += config_options(tp, table=table, prefix=path, default=value)
            continue
        kind, element, length, choices = _kind(tp)
        text, source = field_help(cls, f.name, table)
        options.append(
            ConfigOption(
                path=path,
                flag="--" + "-".join(path).replace("_", "-"),
                kind=kind,
                default=value,
                help=text,
                help_source=source,
                optional=optional,
                element=element,
                length=length,
                choices=choices,
            )
        )
    return options


def _show(value: Any) -> str:
    if value is None:
        return NONE_WORD
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(_show(v) for v in value) if value else "''"
    if value == "":
        return "''"
    return str(value)


def _scalar(text: str, element: Any) -> Any:
    try:
        if element is int:
            return int(text)
        if element is float:
            return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not {'an int' if element is int else 'a number'}"
        ) from None
    return text


def _parse_value(option: ConfigOption) -> Callable[[str], Any]:
    """The ``type=`` callable of an option's argument."""

    def parse(text: str) -> Any:
        if option.optional and text.strip().lower() == NONE_WORD:
            return None
        if option.kind == "tuple":
            items = [t.strip() for t in text.split(",")] if text.strip() else []
            if any(not t for t in items):
                raise argparse.ArgumentTypeError(f"empty item in {text!r}")
            value = tuple(_scalar(t, option.element) for t in items)
            if option.length is not None and len(value) != option.length:
                raise argparse.ArgumentTypeError(
                    f"needs {option.length} comma-separated values, got {text!r}"
                )
            return value
        if option.kind == "literal":
            for c in option.choices:
                if str(c) == text:
                    return c
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(map(str, option.choices))}")
        value = _scalar(text, {"int": int, "float": float}.get(option.kind, str))
        if option.kind == "int" and value < 0:
            raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
        return value

    return parse


def _metavar(option: ConfigOption) -> str:
    base = {"int": "N", "float": "X", "str": "TEXT", "literal": "CHOICE"}.get(option.kind, "VALUE")
    if option.kind == "tuple":
        base = {int: "N", float: "X", str: "A"}.get(option.element, "A") + ",..."
    return base + ("|none" if option.optional else "")


def add_config_options(
    parser: argparse.ArgumentParser,
    options: Sequence[ConfigOption],
    *,
    aliases: Mapping[str, Sequence[str]] | None = None,
    title: str | None = None,
) -> list[ConfigOption]:
    """Add one argument per option (default ``SUPPRESS``: only given values appear); returns the
    options of kind ``"other"``, which have no argument (config file only).

    Every help text ends with the field's default. ``aliases`` maps a dotted
    key to extra flags (kept for old command lines).
    """
    group = parser.add_argument_group(title) if title else parser
    file_only: list[ConfigOption] = []
    for option in options:
        if option.kind == "other":
            file_only.append(option)
            continue
        flags = [option.flag, *(aliases or {}).get(option.key, ())]
        text = f"{option.help} (default: {_show(option.default)})".replace("%", "%%")
        if option.kind == "bool" and not option.optional:
            group.add_argument(
                *flags,
                dest=option.dest,
                action=argparse.BooleanOptionalAction,
                default=argparse.SUPPRESS,
                help=text,
            )
        else:
            group.add_argument(
                *flags,
                dest=option.dest,
                type=_parse_value(option),
                default=argparse.SUPPRESS,
                metavar=_metavar(option),
                help=text,
            )
    return file_only


def cli_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """``{dotted key: value}`` of the config options given on the command line."""
    return {k[len(_DEST_PREFIX) :]: v for k, v in vars(args).items() if k.startswith(_DEST_PREFIX)}


# ----------------------------------------------------------------------------
# config files
# ----------------------------------------------------------------------------


def _flatten_file(
    data: Mapping[str, Any], options: Sequence[ConfigOption], nested: set[str], source: str
) -> dict[str, Any]:
    """``{dotted key: raw value}`` of a parsed TOML document; unknown keys raise naming the key."""
    known = {o.key for o in options}
    out: dict[str, Any] = {}

    def walk(table: Mapping[str, Any], prefix: str) -> None:
        for k, v in table.items():
            key = f"{prefix}{k}"
            if key in nested:
                if not isinstance(v, Mapping):
                    raise InvalidArgumentError(f"{source}: {key} must be a table ([{key}]), got {v!r}")
                walk(v, key + ".")
            elif key in known:
                out[key] = v
            else:
                raise InvalidArgumentError(f"{source}: unknown key {key!r}")

    walk(data, "")
    return out


def _coerce(option: ConfigOption, value: Any, source: str) -> Any:
    """A TOML value checked against the option's type (lists become tuples, ints may be floats)."""
    where = f"{source}: {option.key}"
    if option.optional and isinstance(value, str) and value.strip().lower() == NONE_WORD:
        return None
    if option.kind == "other":
        return tuple(value) if isinstance(value, list) else value

    def scalar(v: Any, tp: Any) -> Any:
        if tp is float and isinstance(v, (int, float)) and not isinstance(v, bool):
            return float(v)
        if tp is int and isinstance(v, int) and not isinstance(v, bool):
            return v
        if tp is str and isinstance(v, str):
            return v
        raise InvalidArgumentError(f"{where} must be {tp.__name__}, got {v!r}")

    if option.kind == "bool":
        if not isinstance(value, bool):
            raise InvalidArgumentError(f"{where} must be true or false, got {value!r}")
        return value
    if option.kind == "tuple":
        if not isinstance(value, list):
            raise InvalidArgumentError(f"{where} must be a list, got {value!r}")
        out = tuple(scalar(v, option.element) for v in value)
        if option.length is not None and len(out) != option.length:
            raise InvalidArgumentError(f"{where} needs {option.length} values, got {value!r}")
        return out
    if option.kind == "literal":
        if value not in option.choices:
            raise InvalidArgumentError(f"{where} must be one of {list(option.choices)}, got {value!r}")
        return value
    out = scalar(value, {"int": int, "float": float, "str": str}[option.kind])
    if option.kind == "int" and out < 0:
        raise InvalidArgumentError(f"{where} must be >= 0, got {out}")
    return out


def parse_toml(text: str, source: str = "<string>") -> dict[str, Any]:
    """TOML ``text`` as a dict (``tomllib``, or ``tomli`` before Python 3.11)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]
        except ModuleNotFoundError:
            raise InvalidArgumentError("reading TOML needs Python >= 3.11 or the tomli package") from None
    try:
        return dict(tomllib.loads(text))
    except tomllib.TOMLDecodeError as exc:
        raise InvalidArgumentError(f"config file {source!r} is not valid TOML: {exc}") from None


def read_config_file(path: str | Path, cls: type, options: Sequence[ConfigOption]) -> dict[str, Any]:
    """``{dotted key: value}`` from a TOML file for config ``cls``, checked against ``options``.

    A missing or malformed file, an unknown key (named, dotted) or a value of
    the wrong type raises :class:`~refusal_core.errors.InvalidArgumentError`.
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidArgumentError(f"config file {str(p)!r} cannot be read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(f"config file {str(p)!r} is not UTF-8 text: {exc}") from None
    data = parse_toml(text, str(p))
    nested = _nested_keys(cls)
    raw = _flatten_file(data, options, nested, str(p))
    by_key = {o.key: o for o in options}
    return {k: _coerce(by_key[k], v, str(p)) for k, v in raw.items()}


def _nested_keys(cls: type, prefix: str = "") -> set[str]:
    hints = typing.get_type_hints(cls)
    out: set[str] = set()
    for f in dataclasses.fields(cls):
        tp, optional = _unwrap_optional(hints[f.name])
        if isinstance(tp, type) and dataclasses.is_dataclass(tp) and not optional:
            out.add(prefix + f.name)
            out |= _nested_keys(tp, prefix + f.name + ".")
    return out


def build_config(cls: type, *layers: Mapping[str, Any]) -> Any:
    """An instance of ``cls``: its defaults, overridden by each ``{dotted key: value}`` layer in turn.

    Later layers win (pass the file's values, then the command line's). Only
    the given fields are passed to the constructor, so a config that resolves
    fields in ``__post_init__`` (``AirdConfig``: α from a gain or the paper's
    default) sees what the user said, not the resolved defaults. A nested
    config whose ``default_factory`` is not its class itself keeps that
    factory's values for the fields not given. The dataclasses' own
    validation runs and raises :class:`~refusal_core.errors.InvalidArgumentError`.
    """
    merged: dict[str, Any] = {}
    for layer in layers:
        merged.update(layer)
    return _build(cls, None, merged, "")


def _build(cls: type, default: Any, values: Mapping[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    given: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        key = prefix + f.name
        tp, optional = _unwrap_optional(hints[f.name])
        if isinstance(tp, type) and dataclasses.is_dataclass(tp) and not optional:
            if any(k.startswith(key + ".") for k in values):
                factory = f.default_factory
                base = None if factory is tp or factory is dataclasses.MISSING else factory()
                given[f.name] = _build(tp, base, values, key + ".")
        elif key in values:
            given[f.name] = values[key]
    try:
        if default is None:
            return cls(**given)
        return dataclasses.replace(default, **given) if given else default
    except TypeError as exc:  # a value of a type the dataclass does not check itself
        raise InvalidArgumentError(f"bad value for {cls.__name__}: {exc}") from None


# ----------------------------------------------------------------------------
# writing a resolved config
# ----------------------------------------------------------------------------


def _toml_value(value: Any) -> str:
    if value is None:
        return json.dumps(NONE_WORD)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, (tuple, list)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{json.dumps(str(k))} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _toml_value({f.name: getattr(value, f.name) for f in dataclasses.fields(value)})
    raise InvalidArgumentError(f"cannot write {type(value).__name__} value {value!r} to TOML")


def config_to_toml(config: Any, *, header: str = "") -> str:
    """TOML text that :func:`read_config_file` turns back into ``config`` (``None`` as ``"none"``)."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise InvalidArgumentError(f"config must be a dataclass instance, got {type(config).__name__}")
    lines = [f"# {h}" for h in header.splitlines()]
    lines += _toml_table(config, "")
    return "\n".join(lines).strip() + "\n"


def _toml_table(config: Any, name: str) -> list[str]:
    hints = typing.get_type_hints(type(config))
    scalars: list[str] = []
    tables: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        tp, optional = _unwrap_optional(hints[f.name])
        if isinstance(tp, type) and dataclasses.is_dataclass(tp) and not optional:
            tables += ["", *_toml_table(value, f"{name}.{f.name}" if name else f.name)]
        else:
            scalars.append(f"{f.name} = {_toml_value(value)}")
    head = [f"[{name}]"] if name else []
    return head + scalars + tables


def commented_config_toml(config: Any, options: Sequence[ConfigOption], *, header: str = "") -> str:
    """Like :func:`config_to_toml`, with every setting's help (and default, where ``config``'s value
    differs) as a comment above it: a config file a newcomer can read and edit.

    Settings of kind ``"other"`` (config-file only) are documented the same way.
    """
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise InvalidArgumentError(f"config must be a dataclass instance, got {type(config).__name__}")
    by_key = {o.key: o for o in options}
    lines = [f"# {h}".rstrip() for h in header.splitlines()]
    lines += _commented_table(config, "", by_key)
    return "\n".join(lines).strip() + "\n"


def _commented_table(config: Any, name: str, by_key: Mapping[str, ConfigOption]) -> list[str]:
    hints = typing.get_type_hints(type(config))
    scalars: list[str] = []
    tables: list[str] = []
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = f"{name}.{f.name}" if name else f.name
        tp, optional = _unwrap_optional(hints[f.name])
        if isinstance(tp, type) and dataclasses.is_dataclass(tp) and not optional:
            tables += ["", f"[{key}]", *_commented_table(value, key, by_key)[1:]]
            continue
        option = by_key.get(key)
        text = option.help if option is not None else f.name.replace("_", " ")
        if option is not None and option.kind == "tuple":  # a TOML list, not the flag's comma list
            text = text.replace("comma-separated ", "")
        if option is not None and option.default != value:
            text += f" (default: {_toml_value(option.default)})"
        wrapped = textwrap.wrap(text, width=96) or [""]
        scalars += ["", *[f"# {w}" for w in wrapped], f"{f.name} = {_toml_value(value)}"]
    head = [f"[{name}]"] if name else [""]
    return head + scalars + tables
