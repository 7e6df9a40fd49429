"""The docs cannot drift: every shell command in README.md and docs/*.md is checked.

Each fenced ```bash block is split into commands (continuation lines joined, comments dropped);
every command of this project is validated without running anything heavy:

* ``python -m xlm_jax.main`` / ``bench`` (and the arguments after ``--`` of ``launch/*.sh``):
  every flag is defined, the config file loads with its argument, every ``--config.KEY=VALUE``
  names an existing setting and parses as its type, and the config belongs to the ``--mode``;
* ``python -m xlm_jax.translate`` / ``embed``: their flags exist;
* the argparse commands (``convert``, ``plots``, ``fetch``): their parser accepts the arguments;
* ``make TARGET``: the Makefile has the target; ``launch/*.sh``: the script exists;
* input files in the repository or in ../shared/data (``--input=``, ``< FILE``, config files,
  ``--config.data.root=``) exist;
* ``DRY_RUN=1`` launcher commands run (they only print what they would start).

Also: docs/configuration.md is exactly ``python -m xlm_jax.config_doc``'s output, and the
generator reads comments as documented. tests/test_docs_run.py then runs the commands of README.md
and the how-tos (docs/{pretrain,xnli,nmt,interop,launch}.md) with tiny overrides.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import re
import shlex
import subprocess
from pathlib import Path

import ml_collections
import pytest

from tests.conftest import SHARED_DATA
from xlm_jax.tasks import registry
from xlm_jax.tools import config_doc, tutorial

REPO = Path(__file__).resolve().parents[1]
DOCS = [
    REPO / "README.md",
    *sorted((REPO / "docs").glob("*.md")),
    *sorted((REPO / "notebooks").glob("*.ipynb")),  # their markdown cells
]
HOWTOS = ["pretrain.md", "xnli.md", "nmt.md", "interop.md", "launch.md", "notebooks.md"]
MODE_FAMILY = {name: mode.family for name, mode in registry.MODES.items()}
ABSL_MODULES = {"main", "bench", "translate", "embed", "tools.bench_checkpoint", "tools.bench_data"}
# launch/ scripts whose arguments after `--` go to another module than xlm_jax.main
LAUNCHED = {"launch/prepare_array.sbatch": "prepare"}
ARGPARSE_MODULES = {
    "convert": "xlm_jax.tools.convert",
    "plots": "xlm_jax.tools.plots",
    "fetch": "xlm_jax.tools.fetch",
}
SKIPPED_PROGRAMS = {"wget", "mkdir", "cd", "pip", "hf", "tensorboard", "gcloud", "export", "cat"}


# --- reading the docs ----------------------------------------------------------------------------


def shell_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, body) of each ```bash / ```sh / ```shell block."""
    out, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        if re.match(r"^\s*```(bash|sh|shell)\s*$", lines[i]):
            start, body = i + 2, []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i])
                i += 1
            out.append((start, "\n".join(body)))
        i += 1
    return out


def logical_lines(text: str) -> list[str]:
    """Splits shell text at newlines outside quotes, dropping ``#`` comments (a quoted string
    may span lines, as in ``python -c "..."``)."""
    lines, current, quote, i = [], [], "", 0
    while i < len(text):
        ch = text[i]
        if quote:
            current.append(ch)
            if ch == quote:
                quote = ""
        elif ch in "'\"":
            quote = ch
            current.append(ch)
        elif ch == "#" and (not current or current[-1] in " \t"):
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        elif ch == "\n":
            lines.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    lines.append("".join(current))
    return [line for line in lines if line.strip()]


def commands(block: str) -> list[list[str]]:
    """The block's commands as argument lists: continuations joined, comments dropped, split at
    ``|``, ``&&`` and ``;``, leading ``VAR=value`` assignments kept (they are checked too)."""
    out = []
    for line in logical_lines(re.sub(r"\\\n", " ", block)):
        current: list[str] = []
        for tok in shlex.split(line):
            if tok in ("|", "&&", ";", "||"):
                if current:
                    out.append(current)
                current = []
            else:
                current.append(tok)
        if current:
            out.append(current)
    return out


def doc_text(path: Path) -> str:
    """A markdown file, or the markdown cells of a notebook."""
    if path.suffix == ".ipynb":
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        return "\n\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
    return path.read_text(encoding="utf-8")


# --- validators ----------------------------------------------------------------------------------


def absl_flags(module: str) -> dict[str, str]:
    """{flag name: DEFINE kind} of an absl module, read from its source (importing several such
    modules in one process would define --config twice)."""
    text = (REPO / "xlm_jax" / f"{module.replace('.', '/')}.py").read_text(encoding="utf-8")
    runs = re.search(r'run_module\("([\w.]+)"', text)  # a short entry point: the module it runs
    if runs:
        text = (REPO / (runs.group(1).replace(".", "/") + ".py")).read_text(encoding="utf-8")
    tree = ast.parse(text)
    out = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr.startswith("DEFINE_")
            and node.args
            and isinstance(node.args[0], ast.Constant)
        ):
            out[node.args[0].value] = node.func.attr.removeprefix("DEFINE_")
    return out


REPO_DIRS = ("configs/", "docs/", "launch/", "notebooks/", "tests/", "xlm_jax/")


def check_path(path: str, where: str) -> None:
    """A file of the repository or of ../shared/data named by a doc must exist (other paths,
    /tmp/... or input.en, are the reader's own)."""
    if path.startswith("../shared/data"):
        if SHARED_DATA.exists():  # else: no data on this machine to compare against
            p = SHARED_DATA / path.removeprefix("../shared/data").lstrip("/")
            assert p.exists(), f"{where}: {path} does not exist"
    elif path.startswith(REPO_DIRS):
        assert (REPO / path).exists(), f"{where}: {path} does not exist"


def parse_override(config: ml_collections.ConfigDict, key: str, value: str, where: str) -> None:
    """``--config.KEY=VALUE`` as ml_collections' flag parser takes it: the setting exists and
    VALUE parses as its type. Applies it."""
    node = config
    *path, last = key.split(".")
    for part in path:
        assert part in node, f"{where}: --config.{key}: no setting {part!r}"
        node = node[part]
    assert last in node, f"{where}: --config.{key}: no such setting"
    current = node[last]
    if isinstance(current, bool):
        assert value.lower() in ("true", "false", "1", "0"), f"{where}: {key}={value!r} not a bool"
        parsed: object = value.lower() in ("true", "1")
    elif isinstance(current, int):
        parsed = int(value)
    elif isinstance(current, float):
        parsed = float(value)
    elif isinstance(current, tuple):
        parsed = ast.literal_eval(value)
        assert isinstance(parsed, tuple), f"{where}: {key}={value!r} is not a tuple"
    else:
        parsed = value
    node[last] = parsed


def check_main_args(args: list[str], where: str, module: str = "main") -> None:
    """Flags of ``python -m xlm_jax.main`` (or ``bench``): defined, and the config they build."""
    defined = absl_flags(module)
    config: ml_collections.ConfigDict | None = None
    mode = "pretrain"
    overrides = []
    for arg in args:
        assert arg.startswith("--"), f"{where}: unexpected argument {arg!r}"
        name, _, value = arg[2:].partition("=")
        if name.startswith("config."):
            overrides.append((name.removeprefix("config."), value))
            continue
        bare = name.removeprefix("no")
        assert name in defined or defined.get(bare) == "bool", f"{where}: no flag --{name}"
        if name == "config":
            file = value.partition(":")[0]
            check_path(file, where)
            config = tutorial.load_config(value)
        elif name == "mode":
            mode = value
            assert mode in MODE_FAMILY, f"{where}: --mode={mode}"
    if config is None:
        assert not overrides, f"{where}: --config.* overrides without --config"
        return
    for key, value in overrides:
        parse_override(config, key, value, where)
        if key == "data.root" and value:
            check_path(value, where)
    if module == "main":
        family = MODE_FAMILY[mode]
        keys = set(config_doc.flatten(config))
        assert keys == set(FAMILY_KEYS[family]), f"{where}: the config is not a {family} config"


def check_absl_module(module: str, args: list[str], where: str) -> None:
    defined = absl_flags(module)
    for arg in args:
        assert arg.startswith("--"), f"{where}: unexpected argument {arg!r}"
        name, _, value = arg[2:].partition("=")
        assert name in defined or defined.get(name.removeprefix("no")) == "bool", (
            f"{where}: python -m xlm_jax.{module} has no flag --{name}"
        )
        if name in ("input", "reference") and value not in ("-", ""):
            check_path(value, where)


class _Parsed(Exception):
    pass


def check_argparse(module: str, args: list[str], where: str, monkeypatch) -> None:
    """Runs the module's ``main(args)`` until its parser has accepted the arguments."""
    import importlib

    real = argparse.ArgumentParser.parse_args

    def parse_then_stop(self, argv=None, namespace=None):
        real(self, argv, namespace)  # exits with status 2 on a bad argument
        raise _Parsed

    with monkeypatch.context() as m:
        m.setattr(argparse.ArgumentParser, "parse_args", parse_then_stop)
        with pytest.raises(_Parsed):
            try:
                importlib.import_module(ARGPARSE_MODULES[module]).main(args)
            except SystemExit as e:
                pytest.fail(f"{where}: python -m xlm_jax.{module} {shlex.join(args)}: exit {e}")


def check_make(args: list[str], where: str) -> None:
    makefile = (REPO / "Makefile").read_text()
    for arg in args:
        if "=" in arg:
            var = arg.split("=")[0]
            assert re.search(rf"^{var}\s*\?=", makefile, re.M), f"{where}: Makefile has no {var}"
        else:
            assert re.search(rf"^{re.escape(arg)}:", makefile, re.M), f"{where}: no target {arg}"


def validate(cmd: list[str], where: str, monkeypatch) -> str:
    """Checks one command; returns what kind it was ('skipped' for other tools)."""
    env = {}
    while cmd and re.match(r"^[A-Z_]+=", cmd[0]):
        key, _, value = cmd.pop(0).partition("=")
        env[key] = value
    if not cmd:
        return "skipped"
    # Redirections: an input file must exist; the output is the reader's.
    for op in ("<", ">", "2>"):
        while op in cmd:
            i = cmd.index(op)
            if op == "<":
                check_path(cmd[i + 1], where)
            del cmd[i : i + 2]
    prog, *args = cmd
    if prog in ("python", "python3") and args[:1] == ["-m"]:
        if args[1] == "pytest":
            for arg in args[2:]:
                if not arg.startswith("-"):
                    check_path(arg.split("::")[0], where)
            return "pytest"
        if not args[1].startswith("xlm_jax."):
            return "skipped"  # python -m pip, ...
        module = args[1].removeprefix("xlm_jax.")
        rest = args[2:]
        if module in ("main", "bench", "aot", "prepare"):
            check_main_args(rest, where, module)
        elif module in ABSL_MODULES:
            check_absl_module(module, rest, where)
        elif module in ARGPARSE_MODULES:
            check_argparse(module, rest, where, monkeypatch)
        elif module == "metrics":
            assert rest, f"{where}: python -m xlm_jax.metrics needs a WORKDIR"
        elif module == "config_doc":
            assert not rest, where
        else:
            pytest.fail(f"{where}: unknown module xlm_jax.{module}")
        return f"xlm_jax.{module}"
    if prog in ("python", "python3"):
        return "skipped"  # python -c snippets
    if prog == "make":
        check_make(args, where)
        return "make"
    if prog == "bash" and args and args[0].startswith("launch/"):
        prog, *args = args
    if prog.startswith("launch/"):
        assert (REPO / prog).is_file(), f"{where}: {prog} does not exist"
        if "--" in args:
            launched = [a for a in args[args.index("--") + 1 :] if a != "..."]
            check_main_args(launched, where, LAUNCHED.get(prog, "main"))
        if env.get("DRY_RUN") == "1" and "..." not in args:
            run = subprocess.run(
                ["bash", prog, *args],
                cwd=REPO,
                env={**os.environ, **env},
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert run.returncode == 0, f"{where}: {prog} dry run: {run.stderr[-2000:]}"
        return "launch"
    if prog == "sbatch":
        script = next(a for a in args if a.startswith("launch/"))
        assert (REPO / script).is_file(), f"{where}: {script}"
        rest = args[args.index(script) + 1 :]
        if "--" in rest and "..." not in rest:
            check_main_args(rest[rest.index("--") + 1 :], where, LAUNCHED.get(script, "main"))
        return "launch"
    return "skipped"


FAMILY_KEYS = {
    title: config_doc.flatten(
        getattr(__import__(target.split(":")[0], fromlist=["_"]), target.split(":")[1])()
    )
    for title, _, target in config_doc.FAMILIES
}


# --- tests ---------------------------------------------------------------------------------------


def test_howtos_exist_and_are_linked_from_the_readme():
    readme = (REPO / "README.md").read_text()
    for name in HOWTOS:
        assert (REPO / "docs" / name).is_file(), f"docs/{name} is missing"
        assert f"docs/{name}" in readme, f"README.md does not link docs/{name}"
    for nb in sorted((REPO / "notebooks").glob("*.ipynb")):
        assert f"notebooks/{nb.name}" in readme, f"README.md does not link {nb.name}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_shell_command_in_the_docs_is_valid(doc, monkeypatch):
    kinds = []
    for line, block in shell_blocks(doc_text(doc)):
        for cmd in commands(block):
            kinds.append(validate(list(cmd), f"{doc.relative_to(REPO)}:{line}", monkeypatch))
    if doc.name in HOWTOS or doc.name == "README.md":
        assert any(k != "skipped" for k in kinds), f"{doc.name}: no command of this project"


@pytest.mark.parametrize("size", tutorial.SIZES)
def test_the_notebooks_runs_are_valid_command_lines(size, monkeypatch):
    """Each notebook prints its run as a command line; that command is valid too."""
    data = "../shared/data"
    presets = [
        tutorial.pretrain(size, data),
        tutorial.xnli_pretrain(size, data),
        tutorial.xnli(size, data, "/tmp/encoder"),
        tutorial.unmt_pretrain(size, data),
        tutorial.unmt(size, data, "/tmp/mlm_enfr"),
    ]
    for preset in presets:
        cmd = shlex.split(preset.command("/tmp/run"))
        assert validate(cmd, f"{preset.spec} ({size})", monkeypatch) == "xlm_jax.main"
        # and the notebook's config is the command line's config
        config = tutorial.load_config(preset.spec)
        for key, value in preset.overrides.items():
            parse_override(config, key, str(value), preset.spec)
        assert config_doc.flatten(config) == config_doc.flatten(preset.config())


def test_the_validator_catches_drift(monkeypatch):
    bad = {
        "python -m xlm_jax.main --config=configs/demo.py --config.model.n_layerz=2": "n_layerz",
        "python -m xlm_jax.main --config=configs/nope.py --workdir=/tmp/x": "nope.py",
        "python -m xlm_jax.main --config=configs/demo.py --flag_that_is_not=1": "no flag",
        "python -m xlm_jax.main --mode=xnli --config=configs/demo.py --workdir=/tmp/x": "XNLI",
        "python -m xlm_jax.translate --workdir=/tmp/x --beam=4": "no flag --beam",
        "make demoo": "no target",
    }
    for text, message in bad.items():
        with pytest.raises((AssertionError, FileNotFoundError), match=re.escape(message)):
            validate(shlex.split(text), "test", monkeypatch)
    with pytest.raises(pytest.fail.Exception, match="exit 2"):
        validate(shlex.split("python -m xlm_jax.convert --from=hf"), "test", monkeypatch)
    with pytest.raises(ValueError):
        validate(
            shlex.split("python -m xlm_jax.main --config=configs/demo.py --config.seed=x"),
            "test",
            monkeypatch,
        )


def test_commands_are_split_as_a_shell_would():
    block = (
        "# a comment\n"
        "python -m xlm_jax.main --config=configs/demo.py \\\n"
        "    --workdir=/tmp/x  # trailing comment\n"
        "A=1 make demo && make test | tee log\n"
    )
    assert commands(block) == [
        ["python", "-m", "xlm_jax.main", "--config=configs/demo.py", "--workdir=/tmp/x"],
        ["A=1", "make", "demo"],
        ["make", "test"],
        ["tee", "log"],
    ]


# --- the configuration reference -----------------------------------------------------------------


def test_configuration_md_is_generated_from_the_configs():
    committed = (REPO / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert committed == config_doc.render(REPO), (
        "docs/configuration.md is stale: python -m xlm_jax.config_doc > docs/configuration.md"
    )


def _example_settings(c):
    c.shared = 1  # set by a helper


def _example_config():
    c = ml_collections.ConfigDict()
    c.seed = 0  # an inline comment
    # A block comment
    # on two lines.
    c.lr = 0.5

    # --- a section ---
    _example_settings(c)
    c.sub = ml_collections.ConfigDict()  # the sub-settings
    c.sub.x = "a"
    c.shared = 2  # set by the config itself
    return c


def test_the_generator_reads_inline_block_and_section_comments():
    items = list(config_doc.walk(_example_config))
    keyed = {i.key: i for i in items if i.key}
    assert keyed["seed"].comment == "an inline comment"
    assert keyed["lr"].note == "A block comment on two lines."
    assert [i.text for i in items if i.key is None] == ["a section"]
    assert keyed["sub.*"].comment == "the sub-settings"
    assert keyed["sub.x"].source == "'a'"
    # the helper's setting comes first (in call order), the config's own assignment after it
    assert [i.key for i in items if i.key == "shared"] == ["shared", "shared"]
    assert [i.comment for i in items if i.key == "shared"] == [
        "set by a helper",
        "set by the config itself",
    ]


@pytest.mark.parametrize("doc", [d for d in DOCS if d.suffix == ".md"], ids=lambda p: p.name)
def test_relative_links_point_at_files_that_exist(doc):
    text = doc.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        path = target.split("#")[0]
        if not path or re.match(r"^[a-z]+:", path):
            continue  # an anchor in the same page, or a URL
        assert (doc.parent / path).exists(), f"{doc.relative_to(REPO)}: broken link {target}"
