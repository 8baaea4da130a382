"""train.py when something goes wrong: options refused before any work; data that fails only
mid-run (an image whose body is cut: skipped, named once, counted, and the resumed run still
exact); data errors that name file and line; a
non-finite gradient; Ctrl-C; a full disk; a state.pt that does not fit. Each ends in one error:
line and exit status 2 (130 for Ctrl-C), never a traceback, and loses no finished step."""
import errno
import itertools
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import processor
import common
import data
import pvm
import train
from test_train import write_replies

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

REPO = Path(__file__).resolve().parent.parent
PREFIX = "model.language_model."  # pvm.safetensors' names; state.pt holds the model's own
TINY = ["--size", "tiny", "--synthetic-samples", "40", "--batch-size", "2", "--eval-every", "0"]


def run(argv, capsys):
    """train.py's command in this process: its exit status and the last line of its stderr."""
    status = train.cli(argv)
    return status, capsys.readouterr().err.strip().splitlines()[-1]


def logged(out):
    """The training steps' entries of log.jsonl."""
    entries = map(json.loads, (out / "log.jsonl").read_text().splitlines())
    return [entry for entry in entries if "loss" in entry]


def steps_logged(out):
    return [entry["step"] for entry in logged(out)]


BAD_OPTIONS = {  # options -> the error line
    ("--grad-clip", "0"): "--grad-clip must be positive, got 0.0",
    ("--grad-clip", "-1"): "--grad-clip must be positive, got -1.0",  # gradient ascent
    ("--grad-clip", "nan"): "--grad-clip must be positive, got nan",  # NaN weights
    ("--lr", "-0.01"): "--lr must be positive, got -0.01",
    ("--eval-samples", "-1"): "--eval-samples must be a number >= 0, got -1",  # 1 sample left
    ("--warmup", "nan"): "--warmup must be a share of the steps, from 0 to 1, got nan",
    ("--device", "cuda:7"): "--device cuda:7: ",  # torch's own words follow
}


@pytest.mark.parametrize("option", BAD_OPTIONS, ids=" ".join)
def test_options_are_refused_before_any_work(option, tmp_path, capsys, monkeypatch):
    status, line = run([*TINY, *option, "--out", str(tmp_path / "out")], capsys)
    assert status == 2
    assert line.startswith(f"error: {BAD_OPTIONS[option]}")
    assert not (tmp_path / "out").exists()


def png_header(width, height):
    """A PNG that declares width x height pixels and holds none: what PIL reads first."""
    def chunk(kind, body):
        checksum = zlib.crc32(kind + body)
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", checksum)
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def test_data_errors_found_at_start_up_name_file_and_line(tmp_path, capsys):
    record = {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>Colour?"},
                                                   {"from": "gpt", "value": "Red."}]}
    line = json.dumps(record).encode()
    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.png")
    (tmp_path / "bomb.png").write_bytes(png_header(20_000, 20_000))  # 400 megapixels
    Image.new("RGB", (1000, 4), "red").save(tmp_path / "thin.png")
    cases = {  # the second line of the data file -> what the error says besides FILE:2
        "special token": (line.replace(b"Colour?", b"Colour?<|image_pad|>"),
                          ": the text holds <|image_pad|>, a special token of the chat format"),
        "not utf-8": (line.replace(b"Red.", b"R\xe9d."), ": 'utf-8' codec can't decode byte 0xe9"),
        "bomb": (line.replace(b"ok.png", b"bomb.png"),
                 f"cannot read image {tmp_path}/bomb.png ({tmp_path}/bomb.jsonl:2): Image size "
                 "(400000000 pixels) exceeds limit"),
        "thin": (line.replace(b"ok.png", b"thin.png"), "image aspect ratio 250:1 is over 200:1"),
    }
    for name, (second, message) in cases.items():
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(line + b"\n" + second + b"\n")
        status, error = run([*TINY, "--data", str(path), "--out", str(tmp_path / name)], capsys)
        assert status == 2
        assert error.startswith("error: ")
        assert f"{path}:2" in error
        assert message in error


def data_with_a_cut_jpeg(directory):
    """8 chat samples, the one at position 4 of the shuffled order (in step 3 of batches of 2)
    with a JPEG whose header is whole and whose body is cut: start-up reads only headers, so
    the run meets it mid-way. Returns the file, the sample's file:line and the JPEG."""
    path = write_replies(directory, 8)
    tokenizer = processor.tiny_tokenizer()
    _, order, _ = data.load_data(str(path), tokenizer, 4096, 0, 64, 0)
    where = order[4][1]
    number = int(where.rsplit(":", 1)[1])
    noise = torch.randint(0, 256, (64, 64, 3), generator=torch.Generator().manual_seed(0))
    Image.fromarray(noise.to(torch.uint8).numpy()).save(directory / "cut.jpg", quality=95)
    jpeg = (directory / "cut.jpg").read_bytes()
    (directory / "cut.jpg").write_bytes(jpeg[: len(jpeg) // 2])
    lines = path.read_text().splitlines()
    lines[number - 1] = lines[number - 1].replace(f'"{number - 1}.png"', '"cut.jpg"')
    path.write_text("\n".join(lines) + "\n")
    return path, where, directory / "cut.jpg"


def test_an_image_that_fails_mid_run_is_skipped_named_once_counted_and_resumes_exactly(
        tmp_path, capsys, monkeypatch):
    path, where, jpeg = data_with_a_cut_jpeg(tmp_path)
    common = ["--size", "tiny", "--data", str(path), "--batch-size", "2", "--max-steps", "8",
              "--eval-every", "0", "--save-every", "3"]
    assert train.cli([*common, "--out", str(tmp_path / "straight")]) == 0  # two epochs of 8
    named = [line for line in capsys.readouterr().err.splitlines() if line.startswith("skipped")]
    assert len(named) == 1
    assert named[0].startswith(f"skipped {where}: cannot read image {jpeg}: image file is "
                               "truncated")
    assert [entry["skipped"] for entry in logged(tmp_path / "straight")] == [0, 0, 1, 0, 0, 0, 1, 0]

    class Crash(Exception):
        pass
    get_lr = train.get_lr

    def crash_at_step_5(step, *rest):
        if step >= 4:
            raise Crash()
        return get_lr(step, *rest)
    monkeypatch.setattr(train, "get_lr", crash_at_step_5)
    with pytest.raises(Crash):  # after the checkpoint of step 3, which met the image
        train.main(train.parse_args([*common, "--out", str(tmp_path / "resumed")]))
    monkeypatch.setattr(train, "get_lr", get_lr)
    train.main(train.parse_args([*common, "--out", str(tmp_path / "resumed"), "--resume"]))
    a, b = (load_file(tmp_path / name / "pvm.safetensors") for name in ("straight", "resumed"))
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_non_finite_gradient_stops_before_it_is_applied_or_saved(tmp_path, capsys,
                                                                   monkeypatch):
    forward, calls = train.AssistantLoss.forward, itertools.count(1)

    def diverge_at_step_3(self, *batch):  # two samples a step: calls 5 and 6 are step 3's
        loss = forward(self, *batch)
        return loss * float("nan") if next(calls) > 4 else loss
    monkeypatch.setattr(train.AssistantLoss, "forward", diverge_at_step_3)
    out = tmp_path / "out"
    status, line = run([*TINY, "--max-steps", "4", "--save-every", "2", "--out", str(out)], capsys)
    assert status == 2
    assert line == ("error: step 3: gradient norm nan, loss nan: training diverged; nothing of "
                    "this step was applied or saved")
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 2
    assert steps_logged(out) == [1, 2]
    weights = load_file(out / "pvm.safetensors")  # step 2's, as state.pt's
    assert all(torch.equal(weights[name], state["weights"][name.removeprefix(PREFIX)])
               for name in weights)
    assert all(tensor.isfinite().all() for tensor in weights.values())


@pytest.mark.parametrize("target", ["state.pt", "pvm.safetensors"])
def test_a_full_disk_names_the_file_and_keeps_the_previous_checkpoint(target, tmp_path, capsys,
                                                                      monkeypatch):
    module, name = {"state.pt": (torch, "save"), "pvm.safetensors": (common, "save_file")}[target]
    write, calls = getattr(module, name), itertools.count(1)

    def full_at_the_second_save(tensors, path, *rest, **options):
        if next(calls) == 1:
            return write(tensors, path, *rest, **options)
        Path(path).write_bytes(b"the first bytes of the file")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(module, name, full_at_the_second_save)
    out = tmp_path / "out"
    status, line = run([*TINY, "--max-steps", "4", "--save-every", "2", "--out", str(out)], capsys)
    assert status == 2
    assert line == f"error: cannot write {out / target}: [Errno 28] No space left on device"
    assert sorted(path.name for path in out.iterdir()) == [
        "backbone", "log.jsonl", "pvm.safetensors", "state.pt"]  # no temporary file left
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["step"] == 2
    weights = load_file(out / "pvm.safetensors")  # whole: step 2's, or step 4's before state.pt
    assert weights.keys() == {PREFIX + name for name in state["weights"]}


def test_resume_refuses_a_changed_grad_clip_and_a_state_that_does_not_fit(tmp_path, capsys):
    out = tmp_path / "out"
    argv = [*TINY, "--max-steps", "1", "--out", str(out)]
    assert train.cli(argv) == 0
    status, line = run([*argv, "--resume", "--grad-clip", "0.5"], capsys)
    assert status == 2
    assert line.endswith("comes from another configuration: grad_clip 1.0 there, 0.5 here")
    state = torch.load(out / "state.pt", weights_only=True)
    name = "layers.1.pvm_block.text_reducer.weight"
    state["weights"][name] = torch.zeros(64, 65)  # hand-edited, or from another program
    torch.save(state, out / "state.pt")
    status, line = run([*argv, "--resume"], capsys)
    assert status == 2
    assert line.startswith(f"error: --resume: {out}/state.pt does not fit this run: ")
    assert f"size mismatch for {name}" in line
    torch.save([1, 2, 3], out / "state.pt")
    status, line = run([*argv, "--resume"], capsys)
    assert status == 2
    assert line.startswith(f"error: --resume: {out}/state.pt does not fit this run")


def test_ctrl_c_saves_the_finished_steps_exactly(tmp_path, monkeypatch):
    """SIGINT once a step is logged: exit status 130, no traceback, a checkpoint of every finished
    step, equal bit for bit to the same run's checkpoint at that step."""
    out, argv = tmp_path / "interrupted", [*TINY, "--max-steps", "30"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # Ctrl-C its default even where the tests' shell ignores it (a background job)
    process = subprocess.Popen([sys.executable, "train.py", *argv, "--out", str(out)], cwd=REPO,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while process.poll() is None and not (out / "log.jsonl").exists():
        time.sleep(0.01)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    state = torch.load(out / "state.pt", weights_only=True)
    step = state["step"]
    assert 1 <= step < 30
    assert stderr.splitlines()[-1] == (f"interrupted: step {step} is saved in {out}, --resume "
                                       "continues")
    assert steps_logged(out) == list(range(1, step + 1))

    class Stop(Exception):
        pass
    save = common.save_checkpoint

    def save_and_stop(*args):
        save(*args)
        raise Stop()
    monkeypatch.setattr(common, "save_checkpoint", save_and_stop)
    straight = tmp_path / "straight"
    with pytest.raises(Stop):
        train.main(train.parse_args([*argv, "--save-every", str(step), "--out", str(straight)]))
    straight = torch.load(straight / "state.pt", weights_only=True)
    assert straight["step"] == step
    assert straight["run"] == state["run"]
    assert all(torch.equal(straight["weights"][name], state["weights"][name])
               for name in state["weights"])


def test_a_resumed_run_logs_each_step_once_and_a_fresh_run_never_mixes(tmp_path, capsys,
                                                                        monkeypatch):
    """A crash after step 3 is logged but before its checkpoint (every 2 steps): --resume redoes
    step 3 and log.jsonl holds every step once (the log is cut back to the checkpoint's). A fresh
    run into that folder is refused and leaves it as it was."""
    class Crash(Exception):
        pass
    get_lr, out = train.get_lr, tmp_path / "out"
    argv = [*TINY, "--max-steps", "4", "--save-every", "2", "--out", str(out)]

    def crash_at_step_4(step, *rest):
        if step >= 3:
            raise Crash()
        return get_lr(step, *rest)
    monkeypatch.setattr(train, "get_lr", crash_at_step_4)
    with pytest.raises(Crash):
        train.main(train.parse_args(argv))
    assert steps_logged(out) == [1, 2, 3]
    monkeypatch.setattr(train, "get_lr", get_lr)
    train.main(train.parse_args([*argv, "--resume"]))
    assert steps_logged(out) == [1, 2, 3, 4]
    before = (out / "log.jsonl").read_bytes()
    status, line = run(argv, capsys)
    assert status == 2
    assert line == (f"error: {out} holds an earlier run (state.pt, log.jsonl): pass --resume, "
                    "or another --out")
    assert (out / "log.jsonl").read_bytes() == before
