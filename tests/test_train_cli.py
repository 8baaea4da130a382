"""train.py as a command: two gloo processes against one; bad input -> one line, exit status 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train
from test_train import tiny_args, write_replies

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

REPO = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def files(directory):
    return {f.relative_to(directory): f.read_bytes() for f in directory.rglob("*") if f.is_file()}


def test_two_gloo_processes_equal_one_with_accumulation(tmp_path):
    """Two processes of one sample each against one accumulating two: the same weights, and the
    same loss and gradient norm at every step. The replies differ in length, so a wrong weighting
    of samples or of ranks shows."""
    common = ["--size", "tiny", "--data", str(write_replies(tmp_path, 8)), "--batch-size", "2",
              "--max-steps", "3", "--eval-every", "0"]
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", "train.py", *common, "--out", str(tmp_path / "ddp")],
                   cwd=REPO, env=ENV, check=True, capture_output=True)
    train.main(train.parse_args([*common, "--out", str(tmp_path / "single")]))
    a, b = (load_file(tmp_path / run / "pvm.safetensors") for run in ("ddp", "single"))
    assert a.keys() == b.keys()
    assert all((a[k] - b[k]).abs().max() <= 1e-6 for k in a)
    assert not torch.equal(a["model.language_model.layers.1.pvm_block.gate_alpha"], torch.zeros(1))
    logs = [[json.loads(line) for line in (tmp_path / run / "log.jsonl").read_text().splitlines()]
            for run in ("ddp", "single")]
    for ddp, single in zip(*logs):
        assert ddp["loss"] == pytest.approx(single["loss"], rel=1e-5)
        assert ddp["grad_norm"] == pytest.approx(single["grad_norm"], rel=1e-4)


def test_bad_input_gives_one_line_and_exit_status_2(tmp_path):
    good = {"image": "ok.png", "conversations": [{"from": "human", "value": "<image>Colour?"},
                                                 {"from": "gpt", "value": "Red."}]}
    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.png")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all")
    (tmp_path / "cut.png").write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    line = json.dumps(good)
    no_reply = json.dumps({"image": "ok.png", "conversations": good["conversations"][:1]})
    cases = {  # data file lines -> the message
        "malformed": ([line, "{not json"], "malformed.jsonl:2: not valid JSON"),
        "missing": ([line.replace("ok.png", "gone.png")],
                    f"cannot read image {tmp_path / 'gone.png'}"),
        "unreadable": ([line.replace("ok.png", "garbage.png")],
                       f"cannot read image {tmp_path / 'garbage.png'}"),
        "truncated": ([line.replace("ok.png", "cut.png")],
                      f"cannot read image {tmp_path / 'cut.png'}"),
        "no_reply": ([no_reply], "no_reply.jsonl:1: no assistant turn"),
        "empty": ([], "empty.jsonl holds no samples"),
    }
    runs = {}
    for name, (lines, _) in cases.items():
        (tmp_path / f"{name}.jsonl").write_text("".join(f"{x}\n" for x in lines))
        runs[name] = ["--data", str(tmp_path / f"{name}.jsonl"),
                      "--out", str(tmp_path / f"out_{name}")]
    # a checkpoint of another configuration, and a fresh run that would overwrite it
    train.main(tiny_args(tmp_path / "done", "--max-steps", "1"))
    before = files(tmp_path / "done")
    done = ["--synthetic-samples", "40", "--out", str(tmp_path / "done")]
    runs["resume"] = [*done, "--lr", "0.5", "--resume"]
    runs["overwrite"] = done
    cases["resume"] = ([], "comes from another configuration")
    cases["overwrite"] = ([], "holds an earlier run (state.pt, log.jsonl): pass --resume")
    command = [sys.executable, "train.py", "--size", "tiny", "--batch-size", "2"]
    processes = {name: subprocess.Popen([*command, *argv], cwd=REPO, env=ENV, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for name, argv in runs.items()}
    for name, process in processes.items():
        _, stderr = process.communicate(timeout=120)
        last = stderr.strip().splitlines()[-1]
        assert process.returncode == 2, (name, stderr)
        assert last.startswith("error: "), (name, stderr)
        assert cases[name][1] in last, (name, stderr)
    assert files(tmp_path / "done") == before
