"""The documentation runs (issue 16, item 18): every ```python block of README.md and docs/*.md
is executed, and every `python -m leffa_jax.X` command in their other blocks uses only flags that
`X --help` lists (and `--config.a.b=...` overrides name fields of the config they load).

Python blocks of one file run in order in one namespace (like a notebook), in a temporary working
directory. A block that needs real weights or data says how to run it on the fixtures with an HTML
comment directly above its fence (invisible on the rendered page), one substitution per line:

    <!-- docs-test:
    "ckpts/virtual_tryon.pth", "sd15-inpainting" => {tiny_checkpoint}, "tiny"
    1024, 768 => 32, 24
    -->

`OLD => NEW` replaces text in the block before it runs (OLD must occur); `{name}` in NEW is one of
`PLACEHOLDERS`, inserted as a Python string literal. `<!-- docs-test: skip REASON -->` skips a
block (for blocks that cannot run anywhere, e.g. cloud commands).
"""

import contextlib
import importlib
import importlib.util
import io
import os
import re
import shlex
import subprocess
import sys

import pytest
from conftest import REPO, shared_path

DOCS = ["README.md"] + sorted(f"docs/{f}" for f in os.listdir(REPO / "docs") if f.endswith(".md"))
FENCE = re.compile(r"^(?P<indent> *)```(?P<lang>[\w-]*)\s*$")
MARKER = re.compile(r"<!--\s*docs-test:(?P<body>.*?)-->", re.S)
ARGPARSE_MODULES = {"sample", "viz", "convert"}  # main(argv) prints --help in-process


def code_blocks(path: str) -> list[dict]:
    """[{lang, code, line, marker}] of a markdown file's fenced blocks; `marker` is the body of a
    docs-test comment ending on the line above the fence."""
    lines = (REPO / path).read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, start = len(m["indent"]), i
        body = []
        i += 1
        while i < len(lines) and not FENCE.match(lines[i]):
            body.append(lines[i][indent:] if lines[i][:indent].isspace() else lines[i])
            i += 1
        above = "\n".join(lines[max(0, start - 12):start])
        marker = None
        if start and lines[start - 1].rstrip().endswith("-->"):
            found = list(MARKER.finditer(above))
            if found and found[-1].end() == len(above.rstrip()):
                marker = found[-1]["body"]
        blocks.append({"lang": m["lang"], "code": "\n".join(body), "line": start + 1,
                       "marker": marker})
        i += 1
    return blocks


@pytest.fixture(scope="module")
def placeholders(tmp_path_factory):
    from leffa_jax.model import random_official_checkpoint, tiny_config_dir

    tmp = tmp_path_factory.mktemp("docs")
    tiny = tmp / "tiny_official.safetensors"
    random_official_checkpoint(tiny_config_dir(), str(tiny))
    return {"tiny_checkpoint": str(tiny), "tmp": str(tmp),
            "fixtures": str(shared_path("fixtures"))}


def prepare(block: dict, values: dict) -> str | None:
    """The block's code with the marker's substitutions applied; None for a skipped block."""
    code, marker = block["code"], block["marker"]
    if marker is None:
        return code
    if marker.strip().startswith("skip"):
        return None
    for rule in filter(None, (r.strip() for r in marker.strip().splitlines())):
        old, sep, new = rule.partition("=>")
        assert sep, f"line {block['line']}: docs-test rule without '=>': {rule!r}"
        old, new = old.strip(), new.strip()
        assert old in code, f"line {block['line']}: docs-test rule {old!r} matches nothing"
        new = re.sub(r"\{(\w+)\}", lambda m: repr(values[m[1]]), new)
        code = code.replace(old, new)
    return code


@pytest.mark.parametrize("doc", DOCS)
def test_python_blocks_run(doc, placeholders, monkeypatch):
    blocks = [b for b in code_blocks(doc) if b["lang"] == "python"]
    namespace = {"__name__": f"docs_{doc}"}
    monkeypatch.chdir(placeholders["tmp"])
    for block in blocks:
        code = prepare(block, placeholders)
        if code is None:
            continue
        try:
            exec(compile(code, f"{doc}:{block['line']}", "exec"), namespace)
        except Exception as e:
            raise AssertionError(f"{doc}, python block at line {block['line']} fails: "
                                 f"{type(e).__name__}: {e}\n{code}") from e


# ----------------------------------------------------------------------------- shell commands


def commands(doc: str) -> list[tuple[int, str, list[str]]]:
    """(line, module, arguments) of every `python -m leffa_jax.MODULE ...` in non-python blocks
    (continuation lines joined, comments dropped, `[...]` optional parts unwrapped)."""
    found = []
    for block in code_blocks(doc):
        if block["lang"] == "python" or (block["marker"] or "").strip().startswith("skip"):
            continue
        text = re.sub(r"\\\n", " ", block["code"])
        for line in text.splitlines():
            line = re.sub(r"(^|\s)#.*", "", line)
            m = re.search(r"python\S* -m leffa_jax\.([\w.]+)(.*)", line)
            m = m or re.search(r"(launch_tpu)\.sh(.*)", line)
            if m:
                words = shlex.split(m[2].replace("[", " ").replace("]", " "))
                if m[1] == "launch_tpu":  # trainer flags travel inside --extra "..."
                    words = [x for w in words for x in shlex.split(w)]
                found.append((block["line"], m[1], [w for w in words if w != "..."]))
    return found


def help_text(module: str, subcommand: list[str]) -> str:
    if module in ARGPARSE_MODULES:
        main = importlib.import_module(f"leffa_jax.{module}").main
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit):
            main([*subcommand, "--help"])
        return out.getvalue()
    result = subprocess.run([sys.executable, "-m", f"leffa_jax.{module}", *subcommand, "--help"],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    return result.stdout + result.stderr


def config_fields(spec: str):
    """The ConfigDict a `--config` value loads, or None for a placeholder (e.g. CONFIG)."""
    from leffa_jax.configs import resolve

    path = resolve(spec).partition(":")[0]
    if not os.path.isfile(path) and not os.path.isfile(REPO / path):
        return None
    path = path if os.path.isfile(path) else str(REPO / path)
    spec_ = importlib.util.spec_from_file_location("docs_config", path)
    module = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(module)
    return module.get_config()


def check_command(module: str, args: list[str], helps: dict) -> list[str]:
    """Problems of one command: flags its --help does not list, config overrides that name no
    field, a --config file that does not exist."""
    problems = []
    if module != "launch_tpu":  # launch_tpu.sh: only its trainer config overrides are checked
        sub = [args[0]] if module == "convert" and args and not args[0].startswith("-") else []
        if module == "sample" and "--task" in args[:-1]:  # tasks with their own parser
            from leffa_jax.sample import TASK_MODULES
            task = args[args.index("--task") + 1]
            sub = ["--task", task] if task in TASK_MODULES else []
        key = (module, *sub)
        if key not in helps:
            helps[key] = help_text(module, sub)
        known = set(re.findall(r"--[\w][\w.-]*", helps[key]))
        problems = [f"{a.split('=')[0]} is not a flag of {' '.join(key)}" for a in args
                    if a.startswith("--") and not a.startswith("--config.")
                    and a.split("=")[0] not in known]
    if "--config" in args[:-1]:
        spec = args[args.index("--config") + 1]
        config = config_fields(spec)
        if config is None and not os.path.splitext(os.path.basename(spec))[0].isupper():
            problems.append(f"--config {spec}: no such config file or packaged config")
        for arg in (a for a in args if a.startswith("--config.") and config is not None):
            node = config
            for part in arg.split("=")[0][len("--config."):].split("."):
                if part not in node:
                    problems.append(f"{arg}: the config has no field {part!r} there")
                    break
                node = node[part]
    return problems


@pytest.mark.parametrize("doc", DOCS)
def test_shell_commands_use_existing_flags(doc):
    helps, problems = {}, []
    for line, module, args in commands(doc):
        problems += [f"{doc}:{line}: {p}" for p in check_command(module, args, helps)]
    assert not problems, "\n".join(problems)


def test_the_harness_sees_bad_flags_and_markers():
    """The checks above can fail: an unknown flag and a stale substitution are reported."""
    assert check_command("sample", ["--checkpoint", "c", "--no-such-flag"], {}) == [
        "--no-such-flag is not a flag of sample"]
    with pytest.raises(AssertionError, match="matches nothing"):
        prepare({"code": "x = 1", "marker": "y => 2", "line": 1}, {})


@pytest.mark.parametrize("module", ["sample", "viz"])
def test_every_flag_of_sample_and_viz_is_documented(module):
    """Item 19: docs/sampling.md documents each flag of the two commands (not just their name)."""
    flags = set(re.findall(r"--[a-z][\w-]*", help_text(module, []))) - {"--help"}
    doc = (REPO / "docs" / "sampling.md").read_text()
    section = doc if module == "sample" else doc.split("python -m leffa_jax.viz`", 1)[-1]
    missing = sorted(f for f in flags if f not in section)
    assert not missing, f"docs/sampling.md does not document {module}'s {missing}"
