"""
Grade the exercises: run their tests (exercises/tests) in one pytest session, then print for each
exercise whether it passed, its points, and the total.

    python exercises/grade.py             # every exercise
    python exercises/grade.py --only 3 5  # these exercises

An exercise passes when every one of its tests passes (a skipped test does not). Its tests use the
exercises before it, so a test that fails with an earlier exercise's NotImplementedError is
reported as waiting for that exercise. The exit status is 0 whatever the grade (this is a report);
2 when the tests could not be run at all.
"""
import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from course import BY_NUMBER, EXERCISES  # noqa: E402  (the path above)

ROOT = Path(__file__).resolve().parent.parent
BLANK = re.compile(r"NotImplementedError: exercise (\d+):")


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


def verdict(exercise, tests, broken):
    """(passed, a note on why not) of one exercise from its tests' records."""
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


def grade(numbers, root=ROOT, pytest_args=(), recorder=None):
    """Run the tests of the exercises `numbers`, print the report; the exit status."""
    import pytest

    files = [str(root / "exercises" / "tests" / BY_NUMBER[n].tests) for n in numbers]
    recorder = recorder or Recorder()
    code = pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", str(root),
                        "--continue-on-collection-errors", "--tb=no", "-rN", "--disable-warnings",
                        *pytest_args, *files],
                       plugins=[recorder])
    if code in (pytest.ExitCode.INTERNAL_ERROR, pytest.ExitCode.USAGE_ERROR,
                pytest.ExitCode.INTERRUPTED) or not (recorder.tests or recorder.broken):
        print(f"error: the tests could not be run (pytest exit status {int(code)})",
              file=sys.stderr)
        return 2
    print()
    earned = total = 0
    failed = []
    for number in numbers:
        exercise = BY_NUMBER[number]
        passed, note = verdict(exercise, recorder.tests, recorder.broken)
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
    args = parser.parse_args(argv)
    numbers = args.only or [exercise.number for exercise in EXERCISES]
    if unknown := [n for n in numbers if n not in BY_NUMBER]:
        parser.error(f"no exercise {unknown}; there are {sorted(BY_NUMBER)}")
    return grade(numbers)


if __name__ == "__main__":
    sys.exit(main())
