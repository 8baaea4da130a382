"""
Grade the exercises: run each exercise's tests (exercises/tests) in a pytest process of its own,
then print for each exercise whether it passed, its points, and the total.

    python exercises/grade.py             # every exercise
    python exercises/grade.py --only 3 5  # these exercises
    python exercises/grade.py --timeout 300

An exercise passes when every one of its tests passes (a skipped test does not). Its tests use the
exercises before it, so a test that fails with an earlier exercise's NotImplementedError is
reported as waiting for that exercise. A process of its own, because the code under test may never
return (a loop that does not end: the process is killed after --timeout seconds, 60 unless told)
or end the process itself (os._exit): either way that exercise fails, with the reason, and the
others are graded. The exit status is 0 whatever the grade (this is a report); 2 when the tests
could not be run at all.
"""
import argparse
import importlib
import json
import math
import multiprocessing
import os
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from course import BY_NUMBER, EXERCISES  # noqa: E402  (the path above)

ROOT = Path(__file__).resolve().parent.parent
BLANK = re.compile(r"NotImplementedError: exercise (\d+):")
TIMEOUT = 60  # seconds for one exercise's tests
NOT_RUN = (2, 3, 4)  # pytest's exit status when interrupted, after an internal or a usage error
# what every exercise's tests import, in seconds: imported once, before the processes are forked
SHARED = ("torch", "pytest", "transformers.models.qwen3_vl.modeling_qwen3_vl")


class Recorder:
    """A pytest plugin that keeps, per test, its exercise, its outcome (setup, call and teardown
    together), the first line of its failure and, for a blank function's NotImplementedError, the
    exercise that raised it; and the files whose tests could not be collected. pytest itself prints
    no tracebacks here (--tb=no): the report names each exercise's first failure."""

    def __init__(self):
        self.exercise_of = {exercise.tests: exercise.number for exercise in EXERCISES}
        self.tests, self.broken = {}, {}

    def pytest_runtest_logreport(self, report):
        path, _, name = report.nodeid.partition("::")
        test = self.tests.setdefault(f"{Path(path).name}::{name}", {
            "exercise": self.exercise_of.get(Path(path).name), "outcome": "passed",
            "message": "", "blank": None})
        if test["outcome"] == "failed" or report.passed:
            return
        if report.skipped:
            test["outcome"] = "skipped"
            return
        crash = getattr(report.longrepr, "reprcrash", None)
        message = crash.message if crash is not None else str(report.longrepr)
        blank = BLANK.search(message)
        lines = [line.strip() for line in message.strip().splitlines() if line.strip()]
        test.update(outcome="failed", message=" | ".join(lines[:3])[:300],
                    blank=int(blank.group(1)) if blank else None)

    def pytest_collectreport(self, report):
        if report.failed:
            lines = str(report.longrepr).strip().splitlines()
            last = re.sub(r"^E\s+", "", lines[-1]) if lines else "cannot collect"  # pytest's E
            self.broken[Path(report.nodeid).name] = last


def verdict(exercise, tests, broken, fault=None):
    """(passed, a note on why not) of one exercise from its tests' records, or from why its tests'
    process left none (`fault`)."""
    if fault:
        return False, fault
    if exercise.tests in broken:
        return False, f"its tests do not import: {broken[exercise.tests]}"
    mine = {name: t for name, t in tests.items() if t["exercise"] == exercise.number}
    if not mine:
        return False, "no test ran"
    failed = {name: t for name, t in mine.items() if t["outcome"] != "passed"}
    if not failed:
        return True, f"{len(mine)} tests"
    waits = sorted({t["blank"] for t in failed.values()
                    if t["blank"] is not None and t["blank"] != exercise.number})
    wrong = [(name, t) for name, t in failed.items() if t["blank"] is None]
    notes = ["not done"] * any(t["blank"] == exercise.number for t in failed.values())
    if waits:
        notes.append(f"waits for exercise {', '.join(map(str, waits))}")
    if wrong:
        name, first = wrong[0]
        notes.append(f"{len(wrong)} of {len(mine)} tests fail; first {name.split('::')[-1]}: "
                     f"{first['message'] or first['outcome']}")
    return False, "; ".join(notes)


def run_tests(args, out):
    """In the process of one exercise's tests: pytest with `args`, then the records as JSON to
    `out`, which stays unwritten when pytest does not return."""
    import pytest

    recorder = Recorder()
    code = pytest.main(args, plugins=[recorder])
    Path(out).write_text(json.dumps({"code": int(code), "tests": recorder.tests,
                                     "broken": recorder.broken}))


def run_exercise(exercise, root, pytest_args, timeout, recorder):
    """Run one exercise's tests in a process of their own, at most `timeout` seconds; their
    records join `recorder`'s -> (pytest's exit status, None) or (None, why no records came)."""
    args = ["-q", "-p", "no:cacheprovider", "--rootdir", str(root),
            "--continue-on-collection-errors", "--tb=no", "-rN", "--disable-warnings",
            # pytest's plugins that SHARED imported (anyio) are not rewritten: nothing to say
            "-W", "ignore::pytest.PytestAssertRewriteWarning",
            *pytest_args, str(root / "exercises" / "tests" / exercise.tests)]
    # a fork starts at once with what this process imported (elsewhere: a new Python)
    start = multiprocessing.get_context("fork" if hasattr(os, "fork") else "spawn")
    with tempfile.TemporaryDirectory(prefix="grade-") as folder:
        out = Path(folder) / "records.json"
        # daemon: ended with grade.py (Ctrl-C), never outliving it
        process = start.Process(target=run_tests, args=(args, out), daemon=True)
        process.start()
        process.join(timeout)
        if process.is_alive():  # a loop that does not end, most likely
            process.kill()
            process.join()
            return None, f"its tests did not end within {timeout:g} s: stopped there"
        if not out.exists():  # os._exit, a crash or a signal in the code under test
            return None, (f"its tests' process ended before their report "
                          f"(exit status {process.exitcode})")
        records = json.loads(out.read_text())
    recorder.tests.update(records["tests"])
    recorder.broken.update(records["broken"])
    return records["code"], None


def grade(numbers, root=ROOT, pytest_args=(), recorder=None, timeout=TIMEOUT):
    """Run the tests of the exercises `numbers`, each in a process of its own for at most
    `timeout` seconds, print the report; the exit status."""
    recorder = recorder or Recorder()
    for name in SHARED:
        try:
            importlib.import_module(name)
        except ImportError:  # the tests will say what is missing
            pass
    codes, faults = [], {}
    for number in numbers:
        print(f"exercise {number}: {BY_NUMBER[number].tests}", flush=True)
        code, faults[number] = run_exercise(BY_NUMBER[number], root, pytest_args, timeout, recorder)
        codes.append(code)
    if not_run := [code for code in codes if code in NOT_RUN]:
        print(f"error: the tests could not be run (pytest exit status {not_run[0]})",
              file=sys.stderr)
        return 2
    if not (recorder.tests or recorder.broken or any(faults.values())):
        print("error: the tests could not be run (no test ran)", file=sys.stderr)
        return 2
    print()
    earned = total = 0
    failed = []
    for number in numbers:
        exercise = BY_NUMBER[number]
        passed, note = verdict(exercise, recorder.tests, recorder.broken, faults[number])
        points = exercise.points if passed else 0
        earned, total = earned + points, total + exercise.points
        failed += [] if passed else [exercise]
        print(f"exercise {number} {exercise.title}: {'passed' if passed else 'failed'}  "
              f"{points}/{exercise.points}  ({note})")
    print(f"total {earned}/{total}")
    if failed:  # the report keeps one line per exercise; pytest shows the whole failure
        print(f"a failure in full: python -m pytest -q -m {failed[0].marker} exercises/tests")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description="Grade the exercises of the student copy.")
    parser.add_argument("--only", type=int, nargs="+", metavar="N", help="these exercises only")
    parser.add_argument("--timeout", type=float, default=TIMEOUT, metavar="SECONDS",
                        help=f"the most that one exercise's tests may take (default {TIMEOUT}); "
                             f"then it fails")
    args = parser.parse_args(argv)
    numbers = args.only or [exercise.number for exercise in EXERCISES]
    if unknown := [n for n in numbers if n not in BY_NUMBER]:
        parser.error(f"no exercise {unknown}; there are {sorted(BY_NUMBER)}")
    if not 0 < args.timeout < math.inf:  # NaN fails every comparison
        parser.error(f"--timeout must be a number of seconds > 0, got {args.timeout}")
    try:
        return grade(numbers, timeout=args.timeout)
    except KeyboardInterrupt:  # Ctrl-C stops the tests' process too; no traceback
        print("\nerror: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
