"""eval.py keeps what a run has done: results written whole or not at all, an earlier run never
replaced without --overwrite, --out checked before any generation, answers on disk as they come
(Ctrl-C and a failing sample keep them, --resume continues), work bounded whatever --samples,
no reply that takes long to score, no image file that is waited on."""
import json
import os
import signal
from pathlib import Path

import pytest
from PIL import Image

import eval as ev
import grading
import vision

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

TINY = ["--size", "tiny", "--max-new-tokens", "3", "--limit", "5"]


@pytest.fixture
def hang_guard():
    """Ends a test that hangs (a FIFO waited on, a regex that backtracks for minutes) with an
    error after 60 s, instead of stopping the suite. A guard, not a timing: the work it guards
    takes milliseconds."""
    def hung(*_):
        raise TimeoutError("still running after 60 s")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


@pytest.fixture
def calls(monkeypatch):
    """generate_batch's calls, as (prompts, replies per prompt); `calls.stop_at = n` makes call n
    (counted from 0) raise KeyboardInterrupt, as Ctrl-C would."""
    made, generate_batch = [], ev.generate.generate_batch

    def recording(model, input_ids, *args, **kwargs):
        if len(made) == getattr(recording, "stop_at", None):
            raise KeyboardInterrupt
        made.append((len(input_ids), kwargs["num_samples"]))
        return generate_batch(model, input_ids, *args, **kwargs)

    monkeypatch.setattr(ev.generate, "generate_batch", recording)
    recording.made = made
    return recording


def lines(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_a_second_run_never_replaces_the_first(tmp_path, capsys, calls):
    out = tmp_path / "run"
    assert ev.cli([*TINY, "--out", str(out)]) == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    made, _ = len(calls.made), capsys.readouterr()
    assert ev.cli([*TINY, "--seed", "1", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: {out} holds an earlier run: --resume continues it, "
                                       "--overwrite replaces it\n")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # nothing touched
    assert len(calls.made) == made  # refused before any generation
    assert ev.cli([*TINY, "--seed", "1", "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "results.json").read_text())["seed"] == 1


def test_out_is_checked_before_any_generation(tmp_path, capsys, calls):
    (tmp_path / "file").write_text("a file, not a folder")
    assert ev.cli([*TINY, "--out", str(tmp_path / "file" / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "file/out" in err and err.count("\n") == 1
    assert calls.made == []


def test_results_are_whole_or_absent(tmp_path, monkeypatch, capsys):
    """The disk fills while results.json is written: no half file is left (the predictions
    streamed as they came stay whole)."""
    write_text = Path.write_text

    def full_disk(path, text, *args, **kwargs):
        if '"macro"' in text:  # results.json's text
            write_text(path, text[:len(text) // 2], *args, **kwargs)
            raise OSError(28, "No space left on device")
        return write_text(path, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", full_disk)
    out = tmp_path / "run"
    assert ev.cli([*TINY, "--out", str(out)]) == 2
    assert "No space left on device" in capsys.readouterr().err
    assert sorted(f.name for f in out.iterdir()) == ["predictions.jsonl", "settings.json"]
    assert len(lines(out / "predictions.jsonl")) == 5


def test_ctrl_c_keeps_the_answers_and_resume_continues(tmp_path, capsys, calls):
    """A run stopped at its third batch keeps the first two samples' answers; --resume answers
    only the rest, and ends with the files of a run never stopped."""
    whole = tmp_path / "whole"
    assert ev.cli([*TINY, "--out", str(whole)]) == 0
    calls.stop_at, out = len(calls.made) + 2, tmp_path / "stopped"
    assert ev.cli([*TINY, "--out", str(out)]) == 130
    assert "stopped: the answers so far are kept in" in capsys.readouterr().err
    kept = lines(out / "predictions.jsonl")
    assert len(kept) == 2 and not (out / "results.json").exists()
    with open(out / "predictions.jsonl", "a") as f:
        f.write('{"id": "cut short by a kil')  # a line that a kill -9 cut
    calls.stop_at, made = None, len(calls.made)
    assert ev.cli([*TINY, "--out", str(out), "--resume"]) == 0
    assert len(calls.made) - made == 3  # the three samples not answered
    for name in ("results.json", "predictions.jsonl"):
        assert (out / name).read_text() == (whole / name).read_text().replace(
            str(whole), str(out))


def test_resume_refuses_other_settings(tmp_path, capsys, calls):
    out = tmp_path / "run"
    calls.stop_at = 1
    assert ev.cli([*TINY, "--out", str(out)]) == 130
    assert ev.cli([*TINY, "--out", str(out), "--resume", "--seed", "3"]) == 2
    assert capsys.readouterr().err.endswith(f"--resume: {out}'s run had other settings (seed)\n")


def truncated_png(path):
    """A PNG whose header reads (its size is known) and whose body is cut short."""
    Image.effect_noise((64, 64), 40).convert("RGB").save(path)
    path.write_bytes(path.read_bytes()[:300])


@pytest.mark.parametrize("analysis", [[], ["--analysis"]])
def test_a_failing_sample_is_named_and_the_answers_before_it_kept(analysis, tmp_path, capsys):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.png")
    truncated_png(tmp_path / "cut.png")
    images = ["ok.png", "ok.png", "cut.png", "ok.png"]
    records = [{"id": str(k), "images": [image], "question": "Colour?",
                "options": ["red", "blue"], "answer": "A"} for k, image in enumerate(images)]
    file = tmp_path / "bench.jsonl"
    file.write_text("".join(json.dumps(record) + "\n" for record in records))
    out = tmp_path / "run"
    assert ev.cli([*TINY, "--data", str(file), "--out", str(out), *analysis]) == 2
    last = capsys.readouterr().err.split("\n")[-2]  # below the progress bar
    assert last.startswith(f"error: {file}:3: cannot read image {tmp_path / 'cut.png'}")
    assert last.endswith("(the answers before it are kept in "
                         f"{out / 'predictions.jsonl'}: --resume continues)")
    assert [p["id"] for p in lines(out / "predictions.jsonl")] == ["0", "1"]


def test_runs_are_drawn_in_chunks(tmp_path, calls):
    """--samples 20: no call holds more than RUNS_AT_ONCE runs of a prompt, so memory is bounded
    by the batch, not by --samples (100,000 runs once asked for 21 GB at once)."""
    out = tmp_path / "run"
    args = ["--size", "tiny", "--max-new-tokens", "1", "--limit", "2", "--batch-size", "2",
            "--samples", "20", "--temperature", "1", "--top-k", "5", "--out", str(out)]
    assert ev.cli(args) == 0
    assert calls.made == [(2, 8), (2, 8), (2, 4)]
    predictions = lines(out / "predictions.jsonl")
    ids = {p["id"] for p in predictions}
    assert sorted((p["id"], p["run"]) for p in predictions) == [
        (i, run) for i in sorted(ids) for run in range(20)] and len(ids) == 2


def test_a_long_degenerate_reply_scores_fast(hang_guard):
    """A reply of 32k spaces after "The answer is" backtracked for a minute in the letter's
    regular expression; each pattern now scans such a reply once."""
    colours = {"options": ["red", "green", "blue", "yellow"], "answer": "C"}
    for reply in ("The answer is" + " " * 32_000 + ".", "answer" + " " * 32_000,
                  " " * 32_000 + "x", "A" + " " * 32_000 + "x"):
        assert ev.score(reply, colours) is False
    assert ev.score("The answer is" + " " * 32_000 + "C", colours) is True


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    return path


def test_a_fifo_is_no_image(fifo, tmp_path, capsys, hang_guard):
    """A named pipe given as an image is refused at once: opening it would wait for a writer
    forever (eval.py reads the header for the prompt's length; generate.py decodes it)."""
    with pytest.raises(ValueError, match=f"cannot read image {fifo}: {fifo} is not a regular"):
        vision.load_image(fifo)  # generate.py --image and every decoded image
    record = {"images": ["pipe.png"], "question": "Colour?", "answer": "red"}
    (tmp_path / "bench.jsonl").write_text(json.dumps(record) + "\n")
    assert ev.cli([*TINY, "--data", str(tmp_path / "bench.jsonl"), "--out",
                   str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err == (f"error: cannot read image {fifo} ({tmp_path / 'bench.jsonl'}:1): "
                   f"{fifo} is not a regular file\n")


PLAIN_CASES = [  # (given, truth, verdict) of the grader used without mathruler
    ("1,5", "15", False),  # a list or a decimal comma, not a thousands separator
    ("15", "1,5", False),
    ("1,000", "1000", True),
    ("12,345.5", "12345.50", True),
    ("1e400", "1e401", False),  # as floats both are inf
    ("1E3", "1000", True),
    ("NaN", "nan", True),  # compared as text: a NaN is never equal to itself as a number
    ("-0.5", "-.5", True),
    ("inf", "1e400", False),
]


@pytest.mark.parametrize("given, truth, verdict", PLAIN_CASES)
def test_plain_grader_numbers(given, truth, verdict):
    assert grading.plain_grade(given, truth) is verdict
