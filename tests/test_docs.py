"""The documentation's commands run as written: every `python …` / `torchrun …` command in README.md,
docs/*.md (pages added later included), bench/README.md and fid_stats/README.md is parsed by the argument
parser of the script it names, and a script that does not exist fails. Also: README lines stay readable
and every docs/ page is linked from the README.

Commands come from shell code blocks (no info string, or bash/sh/shell/console), continuation lines
joined, and from inline code spans that start with `python ` or `torchrun `. Shell conventions the docs
use: `$(seq [-s SEP] FIRST STEP LAST)` expands to its numbers; `for V in a b; do ... $V ...` runs the
command once per value; an ellipsis (`...` or `…`) stands for more flags and is dropped (with the flag
whose value it stands for); `${VARIABLES}` stay as written; torchrun's own options are checked by name
against torchrun's parser (their values are often placeholders such as `--node_rank=i`).
"""

import argparse
import glob
import itertools
import os
import re
import runpy
import shlex
import sys
from decimal import Decimal

import pytest
from helpers import ROOT

SHELL_BLOCKS = {"", "bash", "sh", "shell", "console"}
ELLIPSES = {"...", "…"}
# Job scripts whose arguments go on to a Python script.
FORWARDS = {"scripts/slurm/train.sbatch": "main_jit.py"}


def doc_files() -> list[str]:
    """The Markdown files whose commands must run: paths relative to the repository root."""
    paths = ["README.md", *sorted(glob.glob("docs/*.md", root_dir=ROOT))]
    return paths + [p for p in ("bench/README.md", "fid_stats/README.md") if os.path.isfile(os.path.join(ROOT, p))]


def markdown_parts(text: str) -> tuple[list[tuple[int, list[str]]], list[tuple[int, str]]]:
    """(shell code blocks as (first line number, lines), prose lines as (line number, line))."""
    blocks, prose, block, info, start = [], [], None, "", 0
    for number, line in enumerate(text.splitlines(), 1):
        fence = re.match(r"^\s*(```+|~~~+)\s*([\w+-]*)", line)
        if fence and block is None:
            block, info, start = [], fence.group(2).lower(), number + 1
        elif fence:
            if info in SHELL_BLOCKS:
                blocks.append((start, block))
            block = None
        elif block is not None:
            block.append(line)
        else:
            prose.append((number, line))
    return blocks, prose


def logical_lines(lines: list[str], first: int) -> list[tuple[int, str]]:
    """Lines with their backslash continuations joined: (line number, text)."""
    out, pending, start = [], "", first
    for number, line in enumerate(lines, first):
        if not pending:
            start = number
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        out.append((start, pending + line))
        pending = ""
    return out + ([(start, pending)] if pending.strip() else [])


def inline_commands(prose: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Inline code spans (also across a line break) that start with `python ` or `torchrun `."""
    text = "\n".join(line for _, line in prose)
    numbers = [n for n, _ in prose]
    out = []
    for m in re.finditer(r"(?<!`)`([^`]+)`(?!`)", text):
        span = m.group(1).replace("\n", " ").strip()
        if re.match(r"(python3?|torchrun) ", span):
            out.append((numbers[text.count("\n", 0, m.start())], span))
    return out


def expand_seq(line: str) -> str:
    """`$(seq [-s SEP] FIRST [STEP] LAST)` -> its numbers, separated by spaces."""

    def numbers(m):
        args = [Decimal(a) for a in m.group(1).split()]
        first, step, last = (args[0], Decimal(1), args[1]) if len(args) == 2 else args
        count = int((last - first) / step) + 1
        return " ".join(str(first + i * step) for i in range(count))

    return re.sub(r"\$\(seq\s+(?:-s\s+(?:'[^']*'|\"[^\"]*\"|\S+)\s+)?([\d.\s-]+?)\s*\)", numbers, line)


def shell_words(line: str) -> list[str]:
    lexer = shlex.shlex(expand_seq(line), posix=True, punctuation_chars=True)
    lexer.whitespace_split, lexer.commenters = True, "#"
    return list(lexer)


def commands(path: str, text: str) -> list[tuple[str, list[str]]]:
    """Every command of a Markdown file: (where, words from `python`/`torchrun` on), loop variables
    substituted with each of their values."""
    blocks, prose = markdown_parts(text)
    found = []
    for first, lines in blocks:
        loops = {}  # variable -> values, for the rest of the block
        for number, line in logical_lines(lines, first):
            for m in re.finditer(r"\bfor\s+(\w+)\s+in\s+([^;]*);\s*do\b", line):
                loops[m.group(1)] = shell_words(m.group(2))
            found += [(f"{path}:{number}", words) for words in substituted(line, loops)]
    for number, span in inline_commands(prose):
        found += [(f"{path}:{number}", words) for words in substituted(span, {})]
    return found


def substituted(line: str, loops: dict) -> list[list[str]]:
    """The commands of one shell line, once per combination of the loop variables it uses."""
    if not re.search(r"\b(python3?|torchrun)\b", line):  # output shown in a block, not a command
        return []
    used = [v for v in loops if re.search(rf"\$(\{{{v}\}}|{v}\b)", line)]
    out = []
    for values in itertools.product(*(loops[v] for v in used)):
        text = line
        for var, value in zip(used, values):
            text = re.sub(rf"\$(\{{{var}\}}|{var}\b)", value, text)
        out += split_commands(shell_words(text))
    return out


def split_commands(words: list[str]) -> list[list[str]]:
    """The `python …` / `torchrun …` commands among shell words (after `&&`, `|`, `;`, `srun …`, ...),
    each up to the next operator or redirection."""
    out, segment = [], []
    for word in [*words, ";"]:
        if word and set(word) <= set("&|;<>()"):
            start = next((i for i, w in enumerate(segment) if os.path.basename(w) in ("python", "python3")), None)
            start = next((i for i, w in enumerate(segment) if w == "torchrun"), start)
            forward = next((i for i, w in enumerate(segment) if w in FORWARDS), None)
            if start is not None:
                out.append(segment[start:])
            elif forward is not None:
                out.append(["python", FORWARDS[segment[forward]], *segment[forward + 1 :]])
            segment = []
        else:
            segment.append(word)
    return out


def script_and_args(words: list[str]) -> tuple[str | None, list[str]]:
    """(script path, its arguments) of a command; None for `python -m …`, `python -c …` and the like.
    torchrun's own options must be torchrun's (BadCommand otherwise)."""
    if words[0] == "torchrun":
        from torch.distributed.run import get_args_parser

        options = get_args_parser()._option_string_actions
        i = 1
        while i < len(words) and words[i].startswith("-"):
            name = words[i].split("=")[0]
            if name not in options:
                raise BadCommand(f"torchrun has no option {name}")
            if name in ("-m", "--module", "--no-python", "--no_python"):
                return None, []
            i += 1 if "=" in words[i] or options[name].nargs == 0 else 2
        rest = words[i:]
    else:
        rest = words[1:]
    if not rest or rest[0].startswith("-") or not rest[0].endswith(".py"):
        return None, []
    args, dropped = [], False
    for word in rest[1:]:
        if word in ELLIPSES:  # stands for more flags, or for the value of the flag before it
            if args and args[-1].startswith("--") and not dropped:
                args.pop()
            dropped = True
            continue
        args.append(word)
        dropped = False
    return rest[0], args


class BadCommand(Exception):
    """A command that cannot run as written."""


class Parsed(BaseException):
    """Raised by the patched ArgumentParser.parse_args once the script's own arguments are parsed."""


def parse_with_script(script: str, args: list[str], monkeypatch):
    """Run `script` as `python script args` would, up to its argument parser's parse_args on these
    arguments (nothing after it runs). Returns None when they parse; the parser's message otherwise."""
    path = os.path.join(ROOT, script)
    if not os.path.isfile(path):
        return f"no such script: {script}"
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, argv=None, namespace=None):
        real = argv is None or list(argv) == args  # not a parse of some other argument list
        result = original(self, argv, namespace)
        if real:
            raise Parsed
        return result

    errors = []
    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", parse_args)
    monkeypatch.setattr(argparse.ArgumentParser, "error", lambda self, message: errors.append(message) or sys.exit(2))
    monkeypatch.setattr(sys, "argv", [path, *args])
    monkeypatch.syspath_prepend(os.path.dirname(path))
    monkeypatch.delitem(sys.modules, "bench", raising=False)  # bench/ as a namespace package shadows bench.py
    try:
        runpy.run_path(path, run_name="__main__")
    except Parsed:
        return None
    except SystemExit as e:
        return None if e.code in (0, None) and not errors else "; ".join(errors) or f"exit status {e.code}"
    finally:
        monkeypatch.undo()
    return "the script ended without parsing these arguments"


def script_commands(path: str) -> list[tuple[str, list[str]]]:
    """The commands of a file that name a script (`python -m …`, `python -c …`, a bare `torchrun …` left out)."""
    found = commands(path, open(os.path.join(ROOT, path)).read())
    return [(where, w) for where, w in found if names_script(w)]


def names_script(words: list[str]) -> bool:
    """`python X.py …`, or `torchrun … X.py …`."""
    if words[0] == "torchrun":
        return any(word.endswith(".py") for word in words)
    return len(words) > 1 and words[1].endswith(".py")


ALL = [command for path in doc_files() for command in script_commands(path)]


@pytest.mark.parametrize("where,words", ALL, ids=[where for where, _ in ALL])
def test_documented_command_parses_with_its_scripts_parser(where, words, monkeypatch, capsys):
    try:
        script, args = script_and_args(words)
    except BadCommand as e:
        pytest.fail(f"{where}: {shlex.join(words)}\n{e}")
    if script is None:
        pytest.skip(f"not a script of this repository: {shlex.join(words)}")
    error = parse_with_script(script, args, monkeypatch)
    capsys.readouterr()  # --help's text
    assert error is None, f"{where}: {shlex.join(words)}\n{error}"


def test_every_command_of_the_reference_readme_is_found():
    """The extractor finds the reference's four torchrun commands (3 trainings, 1 evaluation) in the README."""
    found = [words for where, words in ALL if where.startswith("README.md:")]
    runs = [w for w in found if w[0] == "torchrun" and "main_jit.py" in w and "--nnodes=1" in w]
    assert sum("--online_eval" in w for w in runs) >= 3 and sum("--evaluate_gen" in w for w in runs) >= 1


def test_the_checker_rejects_wrong_commands(monkeypatch):
    """A misspelled flag, a bad choice, a missing script and an unknown torchrun option all fail."""
    doc = "\n".join(
        [
            "Run `python main_jit.py --modle JiT-B/16`, or:",
            "```bash",
            "for m in heun rk4; do",
            "torchrun --nproc_per_node=2 --nodes=2 main_jit.py --sampling_method $m \\",
            "  --cfg $(seq -s ' ' 1.0 0.5 2.0) ...",
            "done",
            "python no_such_script.py --x 1 && python sample.py --resume ckpt --classes …",
            "```",
        ]
    )
    found = commands("doc.md", doc)
    assert [where for where, _ in found] == ["doc.md:4", "doc.md:4", "doc.md:7", "doc.md:7", "doc.md:1"]
    assert found[0][1][-7:] == ["--sampling_method", "heun", "--cfg", "1.0", "1.5", "2.0", "..."]
    outcomes = []
    for _, words in found:
        try:
            script, args = script_and_args(words)
        except BadCommand as e:
            outcomes.append(str(e))
            continue
        outcomes.append(parse_with_script(script, args, monkeypatch))
    assert outcomes[0] == "torchrun has no option --nodes" == outcomes[1]  # heun, rk4
    assert outcomes[2] == "no such script: no_such_script.py"
    assert outcomes[3] is None  # `--classes …`: the value elided
    assert "unrecognized arguments: --modle" in outcomes[4]
    words = split_commands(shell_words("python main_jit.py --sampling_method rk4 --cfg 2"))[0]
    assert "invalid choice: 'rk4'" in parse_with_script(*script_and_args(words), monkeypatch)


def outside_code(path: str) -> list[tuple[int, str]]:
    return markdown_parts(open(os.path.join(ROOT, path)).read())[1]


def test_readme_lines_are_short_and_every_docs_page_is_linked():
    long = [n for n, line in outside_code("README.md") if len(line) > 160]
    assert not long, f"README.md lines over 160 characters outside code blocks: {long}"
    readme = open(os.path.join(ROOT, "README.md")).read()
    pages = glob.glob("docs/*.md", root_dir=ROOT)
    assert pages and not [p for p in pages if f"({p})" not in readme], "docs pages not linked from README.md"


@pytest.mark.parametrize("page", sorted(glob.glob("docs/*.md", root_dir=ROOT)))
def test_docs_lines_are_at_most_120_characters_outside_code(page):
    long = [n for n, line in outside_code(page) if len(line) > 120]
    assert not long, f"{page}: lines over 120 characters outside code blocks: {long}"


def test_the_layout_page_names_every_module():
    """docs/layout.md has a row for each Python module of the top level and of util/ (a new module
    gets its line there)."""
    text = open(os.path.join(ROOT, "docs", "layout.md")).read()
    modules = [os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "*.py"))]
    modules += [os.path.basename(p) for p in glob.glob(os.path.join(ROOT, "util", "*.py")) if "__init__" not in p]
    missing = sorted(m for m in modules if f"`{m}`" not in text)
    assert not missing, f"not in docs/layout.md: {missing}"
