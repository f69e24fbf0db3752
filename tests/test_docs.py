"""The documentation stays true to the code: every relative link resolves, and docs/settings.md lists every setting.

Fast (no training): reads README.md and docs/*.md, and imports federated.py for its DEFAULTS.
"""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "bench").glob("*.md"))]
SETTINGS = ROOT / "docs" / "settings.md"

LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title")
ROW = re.compile(r"^\|\s*`(--[^`]+)`\s*\|\s*([^|]*?)\s*\|")  # | `--flag` | default | ...


def strip_code(text):
    """Return Markdown text without fenced code blocks and inline code spans (links there are not links)."""
    text = re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)
    return re.sub(r"(`+)(?:(?!\1).)+?\1", "", text, flags=re.S)


def broken_links(md):
    """Return the relative link targets of Markdown file `md` whose file part does not exist beside it."""
    bad = []
    for target in LINK.findall(strip_code(md.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue  # http(s):, mailto:, ...; an anchor within this file
        path = target.split("#", 1)[0].split("?", 1)[0]
        if not (md.parent / path).exists():
            bad.append(target)
    return bad


def settings_problems(text, defaults):
    """Return what is wrong with a settings table `text` against `defaults` ({NAME: value}): missing or repeated
    flags, flags that are no setting, and default cells that are not `repr(value)` in backticks."""
    flags = {name.lower().replace("_", "-"): name for name in defaults}
    seen, problems = {}, []
    for line in text.splitlines():
        m = ROW.match(line.strip())
        if not m:
            continue
        flag, cell = m.group(1)[2:], m.group(2)
        seen[flag] = seen.get(flag, 0) + 1
        if flag not in flags:
            problems.append(f"--{flag} is not a setting")
        elif cell != f"`{defaults[flags[flag]]!r}`":
            problems.append(f"--{flag}: default {cell}, federated.py has `{defaults[flags[flag]]!r}`")
    problems += [f"--{f} is missing" for f in flags if f not in seen]
    problems += [f"--{f} is listed {n} times" for f, n in seen.items() if n > 1]
    return problems


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md):
    assert broken_links(md) == []


def test_settings_md_lists_every_setting_once_with_its_default():
    import federated

    assert settings_problems(SETTINGS.read_text(encoding="utf-8"), federated.DEFAULTS) == []


def test_the_checks_can_fail(tmp_path):
    """A broken link, a missing, repeated or unknown flag and a wrong default are each reported."""
    (tmp_path / "there.md").write_text("# There\n")
    md = tmp_path / "a.md"
    md.write_text("[ok](there.md) [ok](there.md#there) [web](https://x.org) [self](#a) `[code](nowhere.md)`\n"
                  "```\n[fenced](nowhere.md)\n```\n[broken](missing.md#x) [broken too](sub/there.md)\n")
    assert broken_links(md) == ["missing.md#x", "sub/there.md"]

    defaults = {"NUM_ROUNDS": 15, "SAVE_DIR": "runs/federated", "DP_DELTA": 1e-5, "CLIENT_RESOURCES": {"num_cpus": 1}}
    good = ("| flag | default | meaning |\n|---|---|---|\n| `--num-rounds` | `15` | rounds |\n"
            "| `--save-dir` | `'runs/federated'` | out |\n| `--dp-delta` | `1e-05` | delta |\n"
            "| `--client-resources` | `{'num_cpus': 1}` | Ray |\n")
    assert settings_problems(good, defaults) == []
    bad = good.replace("`15`", "`16`").replace("| `--dp-delta` | `1e-05` | delta |\n", "")
    bad += "| `--save-dir` | `'runs/federated'` | again |\n| `--no-such` | `0` | ? |\n"
    assert settings_problems(bad, defaults) == [
        "--num-rounds: default `16`, federated.py has `15`", "--no-such is not a setting",
        "--dp-delta is missing", "--save-dir is listed 2 times"]


SCRIPTS = {"federated.py": lambda: __import__("federated").main,  # the project's scripts and their parsers
           "utils/partition.py": lambda: __import__("utils.partition", fromlist=["x"]).get_args_parser,
           "utils/export_federated.py": lambda: __import__("utils.export_federated", fromlist=["x"]).get_args_parser}


def commands(md):
    """Return the commands of Markdown file `md`'s shell blocks that run one of the project's scripts, as
    (script, argument list), continuation lines joined and comments dropped."""
    out = []
    for block in re.findall(r"^```(?:sh|bash|shell)\n(.*?)^```", md.read_text(encoding="utf-8"), flags=re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for i, word in enumerate(words):
                script = next((s for s in SCRIPTS if word == s or word.endswith("/" + s)), None)
                if script and i and words[i - 1].endswith(("python", "python3")):
                    out.append((script, [w for w in words[i + 1:] if w not in ("&&", "|")]))
    return out


def unknown_flags(script, args):
    """Return the `--flags` of `args` that `script`'s parser does not know (exactly: no prefixes)."""
    if script == "federated.py":
        import federated
        from utils.config import get_args_parser

        parser = get_args_parser(federated.DEFAULTS)
    else:
        parser = SCRIPTS[script]()()
    known = {o for a in parser._actions for o in a.option_strings}
    return [a.split("=")[0] for a in args if a.startswith("--") and a.split("=")[0] not in known]


def test_every_documented_command_uses_the_venv_python_and_flags_that_exist():
    found = [(md.name, script, args) for md in DOCS for script, args in commands(md)]
    assert len(found) >= 8  # the quick start, the own-data walkthrough, export, ...
    assert [(name, script, unknown_flags(script, args)) for name, script, args in found
            if unknown_flags(script, args)] == []
    runs = re.compile(r"([\w./-]*python3?)\s+[\w./-]*(?:federated|partition|export_federated)\.py")
    python = {(md.name, p) for md in DOCS for p in runs.findall(md.read_text(encoding="utf-8"))}
    assert len(python) > 5 and {p for _, p in python} == {".venv/bin/python"}, python  # as the quick start has it


def test_the_command_checks_can_fail(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("```sh\n.venv/bin/python federated.py --num-round 3 \\\n  --epochs 1\n"
                  ".venv/bin/python utils/export_federated.py --nmes a b c\n```\n")
    assert [(s, unknown_flags(s, a)) for s, a in commands(md)] == [("federated.py", ["--num-round"]),
                                                                   ("utils/export_federated.py", ["--nmes"])]
