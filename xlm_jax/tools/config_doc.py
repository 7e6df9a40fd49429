"""Writes the configuration reference (docs/configuration.md) from the configs' own comments.

  python -m xlm_jax.config_doc > docs/configuration.md

Every setting, its default and its comment come from the functions that define them
(``config.default_config`` and the defaults of the XNLI, retrieval and translation modes),
read with ``ast``/``tokenize``: an inline comment belongs to its line's setting, a block of
comment lines to the settings right below it, and ``# --- name ---`` lines are sections.
Defaults are the values the functions return (not their source text). Then each file of
``configs/`` with its docstring and what it changes. tests/test_docs.py checks that the committed
file is this command's output.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import importlib.util
import inspect
import io
import re
import sys
import textwrap
import tokenize
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import ml_collections

from xlm_jax.tasks import registry

# (title, mode(s), "module:function") of each family of settings, from the task registry.
FAMILIES = tuple(
    (title, modes, f"{fn.__module__}:{fn.__name__}") for title, modes, fn in registry.families()
)
_SECTION = re.compile(r"^#\s*---\s*(.*?)\s*-*\s*$")
_ASSIGN = re.compile(r"^(\w+)((?:\.\w+)+)\s*=(?!=)\s*(.+)$")
_CALL = re.compile(r"^([\w.]+)\((\w+)\)$")


@dataclasses.dataclass
class Item:
    """A setting (``key``), or a section heading (``key`` None, ``text`` the title)."""

    key: str | None
    source: str = ""  # the right-hand side as written
    comment: str = ""  # inline comment
    note: str = ""  # the comment block above it
    text: str = ""


def flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _comments(source: str) -> dict[int, str]:
    """{line number (1-based): comment text} of every comment token."""
    out = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            out[tok.start[0]] = tok.string.lstrip("#").strip()
    return out


def _resolve(name: str, module: ModuleType) -> Callable | None:
    """``name`` (``f`` or ``mod.f``) as seen from ``module``'s globals."""
    obj: Any = module
    for part in name.split("."):
        obj = getattr(obj, part, None) if obj is not module else module.__dict__.get(part)
        if obj is None:
            return None
    return obj if callable(obj) else None


def walk(fn: Callable, prefixes: Mapping[str, str] | None = None) -> Iterator[Item]:
    """The settings ``fn`` assigns, in source order, with their comments. ``prefixes`` maps the
    function's variable names to dotted key prefixes (``{"c": ""}`` for the config itself)."""
    module = sys.modules[fn.__module__]
    source = textwrap.dedent(inspect.getsource(fn))
    comments = _comments(source)
    tree = ast.parse(source).body[0]
    assert isinstance(tree, ast.FunctionDef)
    prefixes = dict(prefixes or {})
    if not prefixes:  # the function builds its own ConfigDict: `c = ml_collections.ConfigDict()`
        for node in tree.body:
            if isinstance(node, ast.Assign) and ast.unparse(node.value).endswith("ConfigDict()"):
                prefixes[node.targets[0].id] = ""  # type: ignore[attr-defined]
                break
        else:  # or takes it as its first argument: `def settings(c)`
            prefixes[tree.args.args[0].arg] = ""
    yield from _walk_body(tree.body, source, comments, prefixes, module)


def _block_note(comments: Mapping[int, str], lines: list[str], lineno: int) -> str:
    """The comment lines right above ``lineno`` (a section heading ends the block)."""
    note: list[str] = []
    i = lineno - 1
    while i >= 1 and lines[i - 1].strip().startswith("#") and i in comments:
        if _SECTION.match(lines[i - 1].strip()):
            break
        note.insert(0, comments[i])
        i -= 1
    return " ".join(note)


def _walk_body(body, source, comments, prefixes, module) -> Iterator[Item]:
    lines = source.splitlines()
    last_line = 0
    for node in body:
        # Section headings between the previous statement and this one.
        for n in range(last_line + 1, node.lineno):
            m = _SECTION.match(lines[n - 1].strip())
            if m:
                yield Item(None, text=m.group(1).rstrip(" -"))
        last_line = getattr(node, "end_lineno", node.lineno)
        note = _block_note(comments, lines, node.lineno)
        comment = comments.get(node.lineno, "") if node.end_lineno == node.lineno else ""
        if isinstance(node, ast.For) and isinstance(node.iter, ast.Tuple):
            # `for name in ("optimizer_e", "optimizer_p"): o = c[name] = ConfigDict(); o.lr = ...`
            names = [ast.literal_eval(e) for e in node.iter.elts]
            inner = node.body[0]
            if isinstance(inner, ast.Assign) and isinstance(inner.targets[-1], ast.Subscript):
                root = ast.unparse(inner.targets[-1].value)
                alias = ast.unparse(inner.targets[0])
                group = "{" + ",".join(names) + "}"
                sub = {**prefixes, alias: prefixes.get(root, "") + group + "."}
                if note:
                    yield Item(None, text="", note=note)
                yield from _walk_body(node.body[1:], source, comments, sub, module)
            continue
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            m = _CALL.match(ast.unparse(node.value))
            if m and m.group(2) in prefixes:  # a helper filling the same config: `settings(c)`
                helper = _resolve(m.group(1), module)
                if helper is not None:
                    params = inspect.signature(helper).parameters
                    arg = next(iter(params))
                    yield from walk(helper, {arg: prefixes[m.group(2)]})
            continue
        if not isinstance(node, ast.Assign) or len(node.targets) != 1:
            continue
        target = ast.unparse(node.targets[0])
        m = _ASSIGN.match(f"{target} = {ast.unparse(node.value)}")
        if not m or m.group(1) not in prefixes:
            continue
        key = prefixes[m.group(1)] + m.group(2).lstrip(".")
        value_src = ast.unparse(node.value)
        if value_src.endswith("ConfigDict()"):
            if comment or note:
                yield Item(f"{key}.*", comment=comment, note=note)
            continue
        call = re.match(r"^([\w.]+)\(\)$", value_src)
        helper = _resolve(call.group(1), module) if call else None
        if helper is not None and inspect.isfunction(helper):  # `c.optimizer = optimizer_config()`
            yield Item(f"{key}.*", comment=comment or _first_line(helper), note=note)
            yield from _prefixed(walk(helper), f"{key}.")
            continue
        yield Item(key, source=value_src, comment=comment, note=note)


def _prefixed(items: Iterator[Item], prefix: str) -> Iterator[Item]:
    for item in items:
        if item.key is not None:
            item.key = prefix + item.key
        yield item


def _first_line(fn: Callable) -> str:
    return (inspect.getdoc(fn) or "").split("\n\n")[0].replace("\n", " ")


def _get(config: Mapping[str, Any], key: str) -> Any:
    """The default of ``key``; ``{a,b}.x`` keys take ``a.x``."""
    key = re.sub(r"\{(\w+),[^}]*\}", r"\1", key)
    return config.get(key, "?")


def _fmt(value: Any, source: str) -> str:
    text = repr(value)
    if isinstance(value, tuple) and len(text) > 60:
        text = source  # e.g. parallel.DEFAULT_RULES: name it rather than spell it out
    return f"`{text}`"


def render_family(title: str, modes: str, target: str) -> str:
    module_name, fn_name = target.split(":")
    fn = getattr(importlib.import_module(module_name), fn_name)
    defaults = flatten(fn())
    out = [f"## {title}\n\n", f"{modes}. Defined in `{module_name}.{fn_name}`"]
    doc = _first_line(fn)
    out.append(f": {doc}\n\n" if doc else ".\n\n")
    # A key set twice (a shared helper's value, then the mode's own) is listed once, where it
    # first appears, with the later comment if it has one; the value is the final default.
    entries: list[Item] = []
    index: dict[str, int] = {}
    for item in walk(fn):
        if item.key is not None and item.key in index:
            if item.comment:
                entries[index[item.key]].comment = item.comment
            continue
        if item.key is not None:
            index[item.key] = len(entries)
        entries.append(item)
    seen: set[str] = set()
    for item in entries:
        if item.key is None:
            if item.text:
                out.append(f"\n### {item.text}\n\n")
            if item.note:
                out.append(f"\n{item.note}\n\n")
            continue
        if item.note:
            out.append(f"\n{item.note}\n\n")
        if item.key.endswith(".*"):
            out.append(f"- `{item.key}`: {item.comment}".rstrip(": ") + "\n")
            continue
        seen.add(re.sub(r"\{(\w+),[^}]*\}", r"\1", item.key))
        line = f"- `{item.key}` = {_fmt(_get(defaults, item.key), item.source)}"
        out.append(line + (f": {item.comment}" if item.comment else "") + "\n")
    missing = sorted(k for k in defaults if k not in seen and not k.startswith("optimizer_p."))
    if missing:
        raise ValueError(f"{target}: settings not found in the source: {missing}")
    return "".join(out)


def _config_module(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"xlm_config_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _raw_docstring(text: str) -> str:
    """A file's docstring as written (a backslash-newline in it stays, as in a shell command)."""
    for tok in tokenize.generate_tokens(io.StringIO(text).readline):
        if tok.type == tokenize.STRING:
            body = tok.string
            quote = body[-3:]
            return textwrap.dedent(body[body.index(quote) + 3 : -3]).strip()
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.ENCODING):
            break
    return ""


def render_config_file(path: Path, families: Mapping[str, dict[str, Any]], root: Path) -> str:
    """A ``configs/`` file: its docstring and the settings it changes (default arguments)."""
    module = _config_module(path)
    values = flatten(module.get_config())
    family = next((t for t, d in families.items() if set(d) == set(values)), None)
    if family is None:
        raise ValueError(f"{path}: its settings match none of {list(families)}")
    defaults = families[family]
    comments = {}
    text = path.read_text(encoding="utf-8")
    for line in text.splitlines():
        m = re.match(r"^\s*c\.([\w.]+)\s*=.*#\s*(.*)$", line)
        if m:
            comments[m.group(1)] = m.group(2).strip()
    doc = _raw_docstring(text)
    head, _, rest = doc.partition("\n\n")
    rel = path.relative_to(root).as_posix()
    out = [f"### `{rel}`\n\n{head.replace(chr(10), ' ')} ({family} settings.)\n"]
    if rest.strip():
        out.append(f"\n```text\n{rest.strip()}\n```\n")
    out.append("\nChanges from the defaults:\n\n")
    for key in values:
        if values[key] != defaults[key]:
            comment = comments.get(key, "")
            value = _fmt(values[key], f"<{len(str(values[key]))} characters>")
            if isinstance(values[key], str) and len(values[key]) > 80:
                value = f"`{values[key][:70]}…` ({len(values[key])} characters)"
            out.append(f"- `{key}` = {value}" + (f": {comment}" if comment else "") + "\n")
    return "".join(out)


def render(root: Path | None = None) -> str:
    from xlm_jax.tools import tutorial

    root = root or tutorial.repo_root()
    parts = [
        "# Configuration reference\n\n",
        "<!-- Generated by `python -m xlm_jax.config_doc > docs/configuration.md`; do not edit. -->"
        "\n\n",
        "Every run reads one config file of `configs/` (`--config=configs/FILE.py[:ARG]`), which "
        "starts from the defaults of its mode below and changes a few settings. Any setting can "
        "be overridden on the command line, `--config.KEY=VALUE` (e.g. "
        "`--config.model.n_layers=2`, `--config.data.root=/data`). Data sources "
        "(`data.train`, ...) are `KEY: SPEC; ...` strings: a language (`en: train.en`) or a pair "
        "(`en-fr: train.en|train.fr`), each SPEC a file (optionally with a line range, "
        "`train.en@0:14500` or `@0:80%`) or a TFDS dataset (`tfds:NAME:SPLIT:FEATURE`); see "
        "`xlm_jax/data/corpus.py`. Sections: "
        + ", ".join(f"[{t}](#{t.lower().replace(' ', '-')})" for t, _, _ in FAMILIES)
        + ", [configs/](#configs).\n\n",
    ]
    families: dict[str, dict[str, Any]] = {}
    for title, modes, target in FAMILIES:
        parts.append(render_family(title, modes, target) + "\n")
        module_name, fn_name = target.split(":")
        families[title] = flatten(getattr(importlib.import_module(module_name), fn_name)())
    parts.append("## configs/\n\n")
    for path in sorted((root / "configs").glob("*.py")):
        if path.name != "__init__.py":
            parts.append(render_config_file(path, families, root) + "\n")
    return "".join(parts).rstrip() + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
