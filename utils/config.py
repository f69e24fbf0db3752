"""One override path for federated.py's constants: command line flags and Flower run-config keys.

A constant NUM_ROUNDS is `--num-rounds` on the command line and `num-rounds` in the Flower run config.
Values are checked against the constant's type: int, float, bool, str, list[str] (DATASETS: several values on the
command line, a comma- or else space-separated string in the run config) and dict (CLIENT_RESOURCES: JSON or
`key=value,key=value`). `--help` shows each flag's default and the comment beside its constant (`setting_help`).
"""

import argparse
import ast
import io
import json
import re
import tokenize
from pathlib import Path


def flag(name):
    """Return the hyphenated key of a constant: NUM_ROUNDS -> num-rounds."""
    return name.lower().replace("_", "-")


def coerce(name, value, default):
    """Return `value` converted to the type of `default`; ValueError naming the setting if it does not fit."""
    key = flag(name)
    try:
        if isinstance(default, bool):
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in {"1", "true", "yes", "on"}:
                return True
            if s in {"0", "false", "no", "off"}:
                return False
            raise ValueError
        if isinstance(default, int):
            if isinstance(value, float) and value != int(value):
                raise ValueError
            return int(value) if not isinstance(value, str) else int(value.strip())
        if isinstance(default, float):
            return float(value)
        if isinstance(default, list):
            if isinstance(value, (list, tuple)):
                return [str(v) for v in value]
            s = str(value)  # "a,b,c" (items may hold spaces) or "a b c"
            return [v.strip() for v in s.split(",") if v.strip()] if "," in s else s.split()
        if isinstance(default, dict):
            if isinstance(value, dict):
                return dict(value)
            s = str(value).strip()
            if s.startswith("{"):
                out = json.loads(s)
            else:
                out = dict(kv.split("=", 1) for kv in s.replace(" ", ",").split(",") if kv)
            return {k.strip(): float(v) if isinstance(v, str) else v for k, v in out.items()}
        return str(value)
    except (ValueError, TypeError, json.JSONDecodeError):
        kind = type(default).__name__
        raise ValueError(f"setting {key}: expected {kind} (like {default!r}), got {value!r}") from None


def setting_help(path):
    """Return {NAME: comment} for the top-level UPPER_CASE assignments of a settings file that end in a comment.

    A line `NUM_ROUNDS = 15  # (int) federated rounds` gives {"NUM_ROUNDS": "federated rounds"}: the leading
    `(type)` is dropped, as the flag's metavar shows the type.

    Args:
        path (str | Path): a Python file such as federated.py.

    Returns:
        (dict[str, str]): one entry per commented setting, in file order.
    """
    source = Path(path).read_text(encoding="utf-8")
    comments = {t.start[0]: t.string for t in tokenize.generate_tokens(io.StringIO(source).readline)
                if t.type == tokenize.COMMENT}
    out = {}
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        comment = comments.get(node.end_lineno)
        for t in targets:
            if isinstance(t, ast.Name) and t.id.isupper() and comment:
                out[t.id] = re.sub(r"^#\s*(\([^)]*\)\s*)?", "", comment).strip()
    return out


def get_args_parser(defaults, description="", helps=None):
    """Return an argparse parser with one `--flag` per constant in `defaults`, each showing its help and default.

    Args:
        defaults (dict): constant name -> default value (its type is the flag's type).
        description (str): the text above the flags.
        helps (dict[str, str] | None): constant name -> one-line description (see `setting_help`).

    Returns:
        (argparse.ArgumentParser): `--help` prints every flag as `description (default: value)`.
    """
    helps = helps or {}
    parser = argparse.ArgumentParser(description=description)
    for name, default in defaults.items():
        kw = {"default": default, "dest": name, "metavar": type(default).__name__.upper()}
        shown = '""' if default == "" else default  # written here, as ArgumentDefaultsHelpFormatter skips empty helps
        kw["help"] = f"{helps.get(name, '')} (default: {shown})".strip().replace("%", "%%")
        if isinstance(default, bool):
            kw.update(nargs="?", const=True)
        elif isinstance(default, list):
            kw.update(nargs="*")
        parser.add_argument(f"--{flag(name)}", **kw)
    return parser


def resolve(defaults, overrides):
    """Return defaults updated by `overrides` (constant names or hyphenated keys), each value type-checked."""
    by_key = {flag(n): n for n in defaults}
    out = dict(defaults)
    for k, v in overrides.items():
        name = by_key.get(flag(k))
        if name is None:
            raise ValueError(f"unknown setting {k!r}; known settings: {', '.join(sorted(by_key))}")
        out[name] = coerce(name, v, defaults[name])
    return out


def explicit_settings(parser, argv=None):
    """Return the constant names whose flags appear in `argv` (a flag given its default value counts too)."""
    unset = object()
    names = [a.dest for a in parser._actions if a.dest != "help"]
    ns = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(names, unset)))  # defaults fill only what's absent
    return {k for k, v in vars(ns).items() if v is not unset}
