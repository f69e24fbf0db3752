"""One override path for federated.py's constants: command line flags and Flower run-config keys.

A constant NUM_ROUNDS is `--num-rounds` on the command line and `num-rounds` in the Flower run config.
Values are checked against the constant's type: int, float, bool, str, list[str] (DATASETS: several values on the
command line, a comma- or else space-separated string in the run config) and dict (CLIENT_RESOURCES: JSON or
`key=value,key=value`).
"""

import argparse
import json


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


def get_args_parser(defaults, description=""):
    """Return an argparse parser with one `--flag` per constant in `defaults`, each showing its default."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for name, default in defaults.items():
        kw = {"default": default, "dest": name, "metavar": type(default).__name__.upper()}
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
