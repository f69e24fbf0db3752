"""One override path for federated.py's constants: command line flags and Flower run-config keys.

A constant NUM_ROUNDS is `--num-rounds` on the command line and `num-rounds` in the Flower run config.
Values are checked against the constant's type: int, float, bool, str, list[str] (DATASETS: several values on the
command line, a comma- or else space-separated string in the run config) and dict (CLIENT_RESOURCES: JSON or
`key=value,key=value`). `--help` shows each flag's default and the comment beside its constant (`setting_help`).
"""

import argparse
import ast
import difflib
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
    """Return the comments and groups of the top-level UPPER_CASE assignments of a settings file.

    A line `NUM_ROUNDS = 15  # (int) federated rounds` gives "federated rounds": the leading `(type)` is dropped, as
    the flag's metavar shows the type. A comment continued on the next lines (comment-only lines indented after the
    `#`) is read whole. A ruler comment `# --- Run ---` starts a group: the settings below it, up to the next ruler.

    Args:
        path (str | Path): a Python file such as federated.py.

    Returns:
        (tuple[dict[str, str], dict[str, str]]): {NAME: comment} and {NAME: group title}, in file order.
    """
    source = Path(path).read_text(encoding="utf-8")
    comments = {t.start[0]: (t.string, t.line.strip() == t.string.strip())
                for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type == tokenize.COMMENT}
    rulers = {n: m.group(1).strip() for n, (c, alone) in comments.items()
              if alone and (m := re.match(r"#\s*-{3}\s*([^-].*?)\s*-*$", c))}
    helps, groups = {}, {}
    for node in ast.parse(source).body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        names = [t.id for t in targets if isinstance(t, ast.Name) and t.id.isupper()]
        if not names or node.end_lineno not in comments:
            continue
        text, line = [re.sub(r"^#\s*(\([^)]*\)\s*)?", "", comments[node.end_lineno][0]).strip()], node.end_lineno + 1
        while line in comments and comments[line][1] and re.match(r"#\s{2,}\S", comments[line][0]):
            text.append(comments[line][0].lstrip("#").strip())
            line += 1
        group = next((rulers[n] for n in range(node.lineno - 1, 0, -1) if n in rulers), None)
        for name in names:
            helps[name] = " ".join(text)
            if group:
                groups[name] = group
    return helps, groups


class SettingsParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, naming the closest flag for a misspelled one."""

    def error(self, message):
        """Exit 2 with one line: the error and, for an unknown flag, the flag it probably meant."""
        unknown = re.findall(r"(--?[\w-]+)", message.split(":", 1)[1]) if "unrecognized" in message else []
        flags = [o for a in self._actions for o in a.option_strings]
        close = [difflib.get_close_matches(u.split("=")[0], flags, 1) for u in unknown]
        hints = [f"did you mean {m[0]}?" for m in close if m]
        self.exit(2, f"{self.prog}: error: {message}{'; ' + ' '.join(hints) if hints else ''} (--help lists every "
                     "flag)\n")


def get_args_parser(defaults, description="", helps=None, groups=None):
    """Return an argparse parser with one `--flag` per constant in `defaults`, each showing its help and default.

    Flags must be given whole: a prefix (`--num-round`) is an error, never taken for the flag it starts.

    Args:
        defaults (dict): constant name -> default value (its type is the flag's type).
        description (str): the text above the flags.
        helps (dict[str, str] | None): constant name -> its description (see `setting_help`).
        groups (dict[str, str] | None): constant name -> the title of its group in `--help`.

    Returns:
        (argparse.ArgumentParser): `--help` prints every flag as `description (default: value)`, by group.
    """
    helps, groups = helps or {}, groups or {}
    parser = SettingsParser(description=description, allow_abbrev=False)
    sections = {}
    for name, default in defaults.items():
        title = groups.get(name)
        if title not in sections:
            sections[title] = parser.add_argument_group(title) if title else parser
        kw = {"default": default, "dest": name, "metavar": type(default).__name__.upper()}
        shown = '""' if default == "" else default  # written here, as ArgumentDefaultsHelpFormatter skips empty helps
        kw["help"] = f"{helps.get(name, '')} (default: {shown})".strip().replace("%", "%%")
        if isinstance(default, bool):
            kw.update(nargs="?", const=True)
        elif isinstance(default, list):
            kw.update(nargs="*")
        sections[title].add_argument(f"--{flag(name)}", **kw)
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
