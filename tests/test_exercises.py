"""The course (exercises/): every exercise names functions that exist, has its tests, its section
in the handout and three or more mutants; the student copy blanks exactly the exercises' bodies
and nothing else, and make.py refuses in one line what it cannot or must not write; grade.py
fails an exercise whose tests never end or never report; and, in one run of exercises/mutants.py,
every mutant fails its exercise's tests while the blank copy fails every exercise test by
NotImplementedError and grades 0. The exercise tests themselves run in this suite too
(conftest.py adds exercises/tests)."""
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_report import unwritable_folder

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "exercises"))

import course  # noqa: E402  (the path above)
import grade  # noqa: E402
import make  # noqa: E402
import mutants  # noqa: E402


def test_every_exercise_is_complete():
    handout = (REPO / "exercises" / "README.md").read_text()
    numbers = [e.number for e in course.EXERCISES]
    assert numbers == sorted(set(numbers)), f"exercise numbers {numbers}: not increasing"
    for exercise in course.EXERCISES:
        for qualname in exercise.functions:
            make.function_source(qualname)  # raises, naming it, if it is not there
        tests = (REPO / "exercises" / "tests" / exercise.tests).read_text()
        assert f"pytestmark = pytest.mark.{exercise.marker}" in tests, exercise.tests
        assert f"\n## Exercise {exercise.number}: " in handout, f"no section for {exercise.number}"
        own = [m for m in mutants.MUTANTS if m.exercise == exercise.number]
        assert len(own) >= 3, f"exercise {exercise.number} has {len(own)} mutants, not 3 or more"
        for mutant in own:
            assert mutant.function in exercise.functions, (mutant.name, mutant.function)
            assert mutants.mutant_source(mutant) != make.function_source(mutant.function)


def stripped(source, qualnames):
    """The module's AST as text, with the bodies of `qualnames` (module-relative names) reduced
    to their docstrings: what must be equal between the project and the student copy."""
    tree = ast.parse(source)
    for names in qualnames:
        node = make.find_function(tree, names, ".".join(names))
        node.body = node.body[:1] if make.has_docstring(node) else []
    return ast.dump(tree)


def blank_body(node, message):
    """Whether a function's body is its docstring (if any), then the exercise's raise alone."""
    body = node.body[1:] if make.has_docstring(node) else node.body
    return (len(body) == 1 and isinstance(body[0], ast.Raise)
            and ast.unparse(body[0]) == f"raise NotImplementedError({message!r})")


def test_the_student_copy_blanks_the_exercises_and_nothing_else(tmp_path):
    copy = make.make_copy(tmp_path / "hw", blank=[e.number for e in course.EXERCISES])
    copied = make.project_files(REPO)
    assert "exercises/mutants.py" not in copied and "tests/test_exercises.py" not in copied
    assert not (copy / "exercises" / "mutants.py").exists()
    assert (copy / "exercises" / "README.md").exists() and (copy / "cat.jpg").exists()
    blanked = {}  # file -> [(names, message)]
    for exercise in course.EXERCISES:
        for qualname in exercise.functions:
            path, names = make.locate(qualname)
            blanked.setdefault(path, []).append((names, exercise.message))
    for relative in copied:
        original, student = REPO / relative, copy / relative
        if relative not in blanked:
            assert student.read_bytes() == original.read_bytes(), f"{relative} differs"
            continue
        ours, theirs = original.read_text(), student.read_text()
        names = [n for n, _ in blanked[relative]]
        assert stripped(ours, names) == stripped(theirs, names), f"{relative}: more than bodies"
        tree = ast.parse(theirs)
        for names, message in blanked[relative]:
            node = make.find_function(tree, names, ".".join(names))
            assert blank_body(node, message), f"{relative}: {'.'.join(names)} is not blank"
            if make.has_docstring(node):  # the docstring is kept, word for word
                original_node = make.find_function(ast.parse(ours), names, "")
                assert ast.get_docstring(node) == ast.get_docstring(original_node)


def test_only_the_chosen_exercises_are_blank(tmp_path):
    copy = make.make_copy(tmp_path / "hw", blank=[3])
    tree = ast.parse((copy / "model.py").read_text())
    assert blank_body(make.find_function(tree, ["rope_positions"], ""), course.BY_NUMBER[3].message)
    forward = make.find_function(tree, ["RMSNorm", "forward"], "")
    assert not blank_body(forward, course.BY_NUMBER[1].message)
    assert (copy / "vision.py").read_bytes() == (REPO / "vision.py").read_bytes()


def test_make_refuses_a_directory_that_holds_files(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty directory"):
        make.make_copy(tmp_path, blank=[1])
    assert make.main(["--out", str(tmp_path), "--only", "1"]) == 2


def one_error_line(capsys, *words):
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("error: ") and err.count("\n") == 1, err
    for word in words:
        assert word in err


def test_make_refuses_a_folder_inside_the_project(tmp_path, capsys, monkeypatch):
    """`pytest tests` would collect the copy's tests, and the next copy would carry it."""
    monkeypatch.chdir(REPO)
    (tmp_path / "link").symlink_to(REPO / "tests")  # outside by its name, inside in fact
    for out in ["tests/hw", str(REPO / "exercises" / "hw"), ".", str(tmp_path / "link" / "hw")]:
        assert make.main(["--out", out, "--only", "1"]) == 2
        one_error_line(capsys, f"error: {out} is inside the project ({REPO})")
    assert not (REPO / "tests" / "hw").exists() and not (REPO / "exercises" / "hw").exists()


@pytest.mark.parametrize("case", ["parent a file", "parent a dangling symlink",
                                  "itself a dangling symlink", "parent closed to writing"])
def test_make_says_in_one_line_why_it_cannot_write(case, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "link").symlink_to(tmp_path / "nowhere")
    out = {"parent a file": tmp_path / "notes.txt" / "hw",
           "parent a dangling symlink": tmp_path / "link" / "hw",
           "itself a dangling symlink": tmp_path / "link"}.get(case)
    out = out or unwritable_folder(tmp_path) / "hw"
    assert make.main(["--out", str(out), "--only", "1"]) == 2
    one_error_line(capsys, str(out))
    assert (tmp_path / "notes.txt").read_text() == "mine" and not (tmp_path / "nowhere").exists()


def test_make_ends_quietly_when_its_reader_has_gone(tmp_path):
    """`make.py --out DIR | head -1`: the reader may be gone by the time the summary comes."""
    make_py = [sys.executable, str(REPO / "exercises" / "make.py")]
    process = subprocess.Popen([*make_py, "--out", str(tmp_path / "hw"), "--only", "1"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    process.stdout.close()  # before the copy is written: its summary meets a closed pipe
    err = process.stderr.read()
    assert process.wait(timeout=120) == 141
    assert err == b""
    assert (tmp_path / "hw" / "exercises" / "grade.py").is_file()


def grade_copy(copy, *args):
    """grade.py's report on the student copy `copy`, as a student runs it."""
    result = subprocess.run([sys.executable, "exercises/grade.py", *args], cwd=copy,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_grade_fails_an_exercise_whose_tests_never_end_or_never_report(tmp_path):
    """RMSNorm.forward loops forever (exercise 1) and smart_resize ends the process with
    os._exit(0) (exercise 4): each exercise fails with the reason, and the report comes. A time
    limit of 5 s keeps the first short; the second runs under the default."""
    copy = make.make_copy(tmp_path / "hw", replace={
        "model.RMSNorm.forward": "def forward(self, x):\n    while True:\n        pass\n",
        "vision.smart_resize": "def smart_resize(h, w):\n    import os\n    os._exit(0)\n"})
    report = grade_copy(copy, "--only", "1", "--timeout", "5")
    assert ("exercise 1 RMSNorm and SwiGLU: failed  0/10  "
            "(its tests did not end within 5 s: stopped there)") in report
    assert "total 0/10" in report
    report = grade_copy(copy, "--only", "4")  # under the default limit: os._exit is no time-out
    assert ("exercise 4 image preprocessing: failed  0/10  "
            "(its tests' process ended before their report (exit status 0))") in report
    assert "total 0/10" in report


def test_grade_refuses_a_time_limit_that_is_no_number_of_seconds(capsys):
    for seconds in ["0", "-1", "nan", "inf"]:
        with pytest.raises(SystemExit) as stop:
            grade.main(["--timeout", seconds])
        assert stop.value.code == 2
        assert "error: --timeout must be a number of seconds > 0" in capsys.readouterr().err


def test_every_mutant_is_caught_and_the_blank_copy_fails_cleanly(tmp_path):
    """One process, which forks a child per check (see exercises/mutants.py); about half a
    minute on two cores."""
    result = subprocess.run([sys.executable, str(REPO / "exercises" / "mutants.py"), "--json",
                             str(tmp_path / "checks.json")], capture_output=True, text=True,
                            timeout=900)
    print(result.stdout)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    checks = json.loads((tmp_path / "checks.json").read_text())
    caught = {c["exercise"] for c in checks if c["passed"] and "caught by" in c["detail"]}
    assert caught == {e.number for e in course.EXERCISES}
    assert len(checks) == len(mutants.MUTANTS) + len(course.EXERCISES)  # + blank per exercise
