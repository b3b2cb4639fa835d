"""The developers' guide's size and naming rules, read off the source with `ast`: no module over 450
lines, no function over 80 (a script's flag table, get_args_parser, is exempt: one flag a line or
two reads best in one piece), and every top-level name defined once in the repository (the scripts'
entry points get_args_parser / parse_args / main / cli aside): one name per concept, one place to
find it. What is over today is listed with its owner, and the list must shrink: an entry that is no
longer over fails too."""

import ast
import os

from helpers import ROOT

MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
ENTRY_POINTS = {"get_args_parser", "parse_args", "main", "cli"}
# Over a limit today, with who is changing it (remove an entry when it is no longer over).
KNOWN_LONG = {
    "engine_jit.py:train_one_epoch": "the training loop; not split while issues 34-36 change it",
}
KNOWN_TWICE: dict[str, str] = {}


def sources() -> dict[str, tuple[ast.Module, int]]:
    """{path relative to the repository: (its syntax tree, its lines)} of every Python file but the tests'."""
    out = {}
    for folder, dirs, names in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in ("tests", "__pycache__", "output_dir")]
        for name in names:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    text = f.read()
                out[os.path.relpath(path, ROOT).replace(os.sep, "/")] = ast.parse(text, path), len(text.splitlines())
    return out


def over_limits(files: dict[str, tuple[ast.Module, int]]) -> dict[str, int]:
    """{"module" or "module:function": lines} of what is over MAX_MODULE_LINES / MAX_FUNCTION_LINES."""
    over = {}
    for path, (tree, lines) in files.items():
        if lines > MAX_MODULE_LINES:
            over[path] = lines
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name != "get_args_parser":
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    over[f"{path}:{node.name}"] = length
    return over


def test_no_module_over_450_lines_and_no_function_over_80():
    over = over_limits(sources())
    new = {k: v for k, v in over.items() if k not in KNOWN_LONG}
    assert not new, f"over {MAX_MODULE_LINES} lines a module or {MAX_FUNCTION_LINES} a function: {new}"
    assert set(KNOWN_LONG) <= set(over), f"no longer over, take them off KNOWN_LONG: {set(KNOWN_LONG) - set(over)}"


def test_every_top_level_name_is_defined_once():
    where = {}
    for path, (tree, _) in sources().items():
        for node in tree.body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                where.setdefault(node.name, []).append(path)
    twice = {n: paths for n, paths in where.items() if len(paths) > 1 and n not in ENTRY_POINTS}
    new = {n: paths for n, paths in twice.items() if n not in KNOWN_TWICE}
    assert not new, f"defined in several modules (one name per concept): {new}"
    assert set(KNOWN_TWICE) <= set(twice), (
        f"defined once now, take them off KNOWN_TWICE: {set(KNOWN_TWICE) - set(twice)}"
    )


def test_the_rules_catch_what_they_are_for():
    """The checker itself: a long module, a long function and a long get_args_parser."""
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_FUNCTION_LINES))
    code = f"def long():\n{body}\n\ndef get_args_parser():\n{body}\n"
    tree = ast.parse(code)
    assert over_limits({"m.py": (tree, MAX_MODULE_LINES)}) == {"m.py:long": MAX_FUNCTION_LINES + 1}
    assert over_limits({"m.py": (tree, MAX_MODULE_LINES + 1)})["m.py"] == MAX_MODULE_LINES + 1
    short = ast.parse(code.replace(f"    x{MAX_FUNCTION_LINES - 1} = {MAX_FUNCTION_LINES - 1}\n", "", 1))
    assert over_limits({"m.py": (short, 10)}) == {}
