"""
Write the student copy of the project: the runtime files, tests/ and exercises/, in which every
function of the chosen exercises keeps its decorators, signature and docstring while its body
becomes `raise NotImplementedError("exercise N: see exercises/README.md")`.

    python exercises/make.py --out ../hw              # every exercise blank
    python exercises/make.py --out ../hw --only 3 5   # exercises 3 and 5 blank, the rest solved

The solutions are the runtime code itself, so the copy is generated, never kept: the handout, the
tests and the code cannot drift apart. The functions are found by their qualified names
(course.py) with Python's `ast`, which knows where each body starts and ends; nothing in the
runtime files marks them. mutants.py (wrong implementations, each one edit away from a solution)
and the project test that runs them stay out of the copy.
"""
import argparse
import ast
import io
import os
import shutil
import sys
import textwrap
import tokenize
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from course import BY_NUMBER, EXERCISES  # noqa: E402  (the path above)

ROOT = Path(__file__).resolve().parent.parent
COPIED_DIRS = ("tests", "exercises")  # with every regular top-level file
NOT_COPIED = {"exercises/mutants.py", "tests/test_exercises.py"}
SKIPPED_DIRS = {"__pycache__", ".pytest_cache"}


def project_files(root=ROOT):
    """Paths relative to `root` of what the copy holds: the top-level files (not hidden), and
    tests/ and exercises/ but for what the student must not see and caches."""
    files = [p for p in root.iterdir() if p.is_file() and not p.name.startswith(".")]
    for name in COPIED_DIRS:
        files += [p for p in (root / name).rglob("*") if p.is_file()
                  and not SKIPPED_DIRS & set(p.relative_to(root).parts)]
    relative = (p.relative_to(root).as_posix() for p in files)
    return sorted(r for r in relative if r not in NOT_COPIED)


def locate(qualname, root=ROOT):
    """'model.Attention.forward' -> ('model.py', ['Attention', 'forward']): the longest leading
    part of the name that is a file under `root` is the module, the rest the class and function."""
    parts = qualname.split(".")
    for i in range(len(parts) - 1, 0, -1):
        path = "/".join(parts[:i]) + ".py"
        if (root / path).is_file():
            return path, parts[i:]
    raise ValueError(f"{qualname}: no module of it under {root}")


def find_function(tree, names, qualname):
    """The def node of names (classes, then the function) in a parsed module."""
    body = tree.body
    for k, name in enumerate(names):
        kinds = (ast.FunctionDef, ast.AsyncFunctionDef) if k == len(names) - 1 else ast.ClassDef
        node = next((n for n in body if isinstance(n, kinds) and n.name == name), None)
        if node is None:
            raise ValueError(f"{qualname}: no {'/'.join(names[:k + 1])} in its module")
        body = node.body
    return node


def header_end(lines, node):
    """0-based index of the line holding the colon that ends the def's header (a signature may
    span lines, and a default or an annotation may hold colons inside brackets)."""
    depth, text = 0, "".join(lines[node.lineno - 1:])
    for token in tokenize.generate_tokens(io.StringIO(text).readline):
        if token.type == tokenize.OP and token.string in "([{":
            depth += 1
        elif token.type == tokenize.OP and token.string in ")]}":
            depth -= 1
        elif token.type == tokenize.OP and token.string == ":" and depth == 0:
            return node.lineno - 1 + token.start[0] - 1
    raise ValueError(f"no end to the header of {node.name}")


def has_docstring(node):
    first = node.body[0]
    return (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str))


def end_of(lines, node):
    """0-based index one past the function's last line, with any comment lines that follow it
    indented as its body (they belong to the body: a blank body must not keep them)."""
    end = node.end_lineno
    k = end
    while k < len(lines) and not lines[k].strip():
        k += 1
    while k < len(lines) and lines[k].lstrip().startswith("#") and \
            len(lines[k]) - len(lines[k].lstrip()) > node.col_offset:
        end = k = k + 1
        while k < len(lines) and not lines[k].strip():
            k += 1
    return end


def body_span(lines, node):
    """(first, stop): the 0-based lines that a blank body replaces: everything after the header,
    or after the docstring where there is one."""
    head = header_end(lines, node)
    if node.body[0].lineno - 1 == head:
        raise ValueError(f"{node.name}: its body starts on the line of its header")
    first = node.body[0].end_lineno if has_docstring(node) else head + 1
    return first, end_of(lines, node)


def def_span(node):
    """(first, stop): the 0-based lines of the whole function, decorators included."""
    first = min([node.lineno] + [d.lineno for d in node.decorator_list]) - 1
    return first, node.end_lineno


def rewrite(source, edits, path):
    """`source` with each (names, qualname, kind, text) of `edits` applied: kind 'blank' replaces
    the body by `raise NotImplementedError(text)`, kind 'replace' the whole function by the
    function source `text` (written without indentation)."""
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source, filename=path)
    spans = []
    for names, qualname, kind, text in edits:
        node = find_function(tree, names, qualname)
        if kind == "blank":
            first, stop = body_span(lines, node)
            indent = " " * node.body[0].col_offset
            new = [f"{indent}raise NotImplementedError({text!r})\n"]
        else:
            first, stop = def_span(node)
            new = textwrap.indent(textwrap.dedent(text).strip("\n") + "\n",
                                  " " * node.col_offset).splitlines(keepends=True)
        spans.append((first, stop, new, qualname))
    spans.sort(reverse=True)
    for (first, stop, new, qualname), later in zip(spans, [None] + spans[:-1]):
        if later is not None and stop > later[0]:
            raise ValueError(f"{qualname} and {later[3]} overlap")
        lines[first:stop] = new
    result = "".join(lines)
    compile(result, path, "exec")  # a copy that does not even import is no exercise
    return result


def function_source(qualname, root=ROOT):
    """The reference source of a function, decorators included, without its indentation."""
    path, names = locate(qualname, root)
    source = (root / path).read_text()
    first, stop = def_span(find_function(ast.parse(source), names, qualname))
    return textwrap.dedent("".join(source.splitlines(keepends=True)[first:stop]))


def make_copy(out, blank=(), replace=None, root=ROOT):
    """Write the copy to `out` (absent or empty, in an existing directory outside the project):
    the functions of the exercises numbered in `blank` blanked, each function named in `replace`
    ({qualname: source}) replaced."""
    out = Path(out)
    if out.resolve().is_relative_to(root.resolve()):  # the project's tests would collect it
        raise ValueError(f"{out} is inside the project ({root}): write the copy outside it")
    if not out.parent.is_dir():  # a file, a dangling symlink, nothing
        raise ValueError(f"{out}: {out.parent} is not an existing directory")
    if os.path.lexists(out) and not (out.is_dir() and not any(out.iterdir())):
        raise ValueError(f"{out} exists and is not an empty directory")
    out.mkdir(exist_ok=True)  # before any work: a folder closed to writing fails here
    edits = defaultdict(list)  # file -> edits
    for number in blank:
        exercise = BY_NUMBER[number]
        for qualname in exercise.functions:
            path, names = locate(qualname, root)
            edits[path].append((names, qualname, "blank", exercise.message))
    for qualname, text in (replace or {}).items():
        path, names = locate(qualname, root)
        edits[path].append((names, qualname, "replace", text))
    for relative in project_files(root):
        (out / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / relative, out / relative)
    for relative, file_edits in edits.items():
        source = (root / relative).read_text()
        (out / relative).write_text(rewrite(source, file_edits, relative))
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write the student copy of the project.")
    parser.add_argument("--out", required=True, help="directory to write (absent or empty)")
    parser.add_argument("--only", type=int, nargs="+", metavar="N",
                        help="blank only these exercises (default: every one)")
    args = parser.parse_args(argv)
    numbers = args.only or [exercise.number for exercise in EXERCISES]
    if unknown := [n for n in numbers if n not in BY_NUMBER]:
        parser.error(f"no exercise {unknown}; there are {sorted(BY_NUMBER)}")
    try:
        make_copy(args.out, blank=numbers)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # permissions, a full disk: what the system says, with the path
        print(f"error: cannot write the copy to {args.out}: {e.strerror or e} "
              f"({e.filename})", file=sys.stderr)
        return 2
    functions = sum(len(BY_NUMBER[n].functions) for n in numbers)
    try:
        print(f"wrote the student copy to {args.out}: exercises {', '.join(map(str, numbers))} "
              f"blank ({functions} functions)\n"
              f"next: cd {args.out} && python exercises/grade.py", flush=True)
    except BrokenPipeError:  # `| head -1`: the reader wanted no more; the copy is written
        # stdout to /dev/null, so that the flush at exit cannot fail on the closed pipe again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a process that SIGPIPE ends
    return 0


if __name__ == "__main__":
    sys.exit(main())
