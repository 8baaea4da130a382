"""generate.py on bad input: one clear line on stderr, exit status 2, no traceback; on Ctrl-C a
finished line and exit status 130; quiet when its reader stops reading. Some cases run as real
processes (started together); the rest call generate.cli in this one."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import fixtures as fx
import generate

REPO = Path(__file__).resolve().parent.parent
CAT = REPO / "cat.jpg"

# case -> (what goes on the command line, a phrase the message must hold)
IN_PROCESS = {
    "not an image": (["--image", "{tmp}/notes.jpg"], "cannot read image"),
    "truncated jpeg": (["--image", "{tmp}/truncated.jpg"], "truncated"),
    "longer than the context": (["--model", "{tmp}/short_context", "--image", CAT],
                                "over the model's context of 100"),
    "pvm that does not fit": (["--image", CAT, "--pvm", "{tmp}/pvm.safetensors"],
                              "PVM needs layers within 0..3"),
    "tokenizer.json cut short": (["--model", "{tmp}/cut_tokenizer", "--image", CAT],
                                 "cannot read {tmp}/cut_tokenizer/tokenizer.json"),
    "temperature nan": (["--temperature", "nan"], "--temperature must be a number >= 0, got nan"),
    "top-p 0": (["--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    "negative max-new-tokens": (["--max-new-tokens", "-5"],
                                "--max-new-tokens must be positive, got -5"),
    "report of no token": (["--report", "{tmp}/r.png", "--max-new-tokens", "0"],
                           "--max-new-tokens must be positive, got 0"),
    "no such device": (["--device", "cuda:7"], "--device cuda:7: "),  # torch's words follow
    "not a device": (["--device", "gpu"], "--device gpu: Expected one of cpu, cuda"),
}
AS_PROCESS = {
    "missing image": (["--image", "no/such/photo.jpg"],
                      "cannot read image no/such/photo.jpg: [Errno 2] No such file"),
    "unknown model offline": (["--model", "nobody/no-such-model", "--image", CAT],
                              "nobody/no-such-model"),
    # an old loader wrote past the tensor here and died of a segmentation fault
    # a named pipe: PIL would wait on it forever (a process here: a hang fails by time)
    "a FIFO for an image": (["--image", "{tmp}/pipe.jpg"], "pipe.jpg is not a regular file"),
    "weights header span too long": (["--model", "{tmp}/long_span", "--image", CAT],
                                     "invalid shape, data type, or offset for tensor"),
}
# long answers (greedy: the tiny model does not stop early), cut short by the tests below
LONG = ["--image", CAT, "--max-new-tokens", "3000", "--temperature", "0"]


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_untied):
    tmp = tmp_path_factory.mktemp("bad_inputs")
    (tmp / "notes.jpg").write_text("not a picture\n")
    os.mkfifo(tmp / "pipe.jpg")
    data = CAT.read_bytes()
    (tmp / "truncated.jpg").write_bytes(data[:len(data) // 2])
    # the same checkpoint with a 100-token context (cat.jpg alone is 126 visual tokens)
    short = tmp / "short_context"
    short.mkdir()
    for file in Path(tiny_untied).iterdir():
        if file.name != "config.json":
            (short / file.name).symlink_to(file)
    config = json.loads((Path(tiny_untied) / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 100
    (short / "config.json").write_text(json.dumps(config))
    # PVM weights for a decoder layer the 4-layer model does not have
    weights = {"model.language_model.layers.7.pvm_block.text_reducer.weight": torch.zeros(64, 64)}
    save_file(weights, str(tmp / "pvm.safetensors"))
    # the checkpoint with tokenizer.json cut in half; with model.safetensors whose header gives the
    # first tensor 4 bytes more than its shape takes
    for name, changed in (("cut_tokenizer", "tokenizer.json"), ("long_span", "model.safetensors")):
        (tmp / name).mkdir()
        for file in Path(tiny_untied).iterdir():
            if file.name != changed:
                (tmp / name / file.name).symlink_to(file)
    text = (Path(tiny_untied) / "tokenizer.json").read_text()
    (tmp / "cut_tokenizer" / "tokenizer.json").write_text(text[:len(text) // 2])
    norms = load_file(Path(tiny_untied) / "model.safetensors")["model.language_model.norm.weight"]
    save_file({"model.language_model.norm.weight": norms}, tmp / "long_span" / "model.safetensors")
    fx.edit_safetensors_header(tmp / "long_span" / "model.safetensors", four_bytes_more)
    return tmp


def four_bytes_more(header, names):
    header[names[0]]["data_offsets"][1] += 4


def command(args, tmp, checkpoint):
    args = [str(a).format(tmp=tmp) for a in args]
    return args if "--model" in args else ["--model", str(checkpoint), *args]


def start(args, tmp, checkpoint):
    """generate.py as a process, its output piped; Ctrl-C its default even where the shell that
    started the tests ignores it (a background job): Python then turns it into KeyboardInterrupt."""
    line = [sys.executable, str(REPO / "generate.py"), *command(args, tmp, checkpoint)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(line, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


@pytest.fixture(scope="module")
def processes(tiny_untied, bad_files):
    """The cases that fail at once, started together; the long answers each start in their own
    test, so that their answer is still being written when the test acts on it."""
    started = {case: start(args, bad_files, tiny_untied) for case, (args, _) in AS_PROCESS.items()}
    yield started
    for process in started.values():  # any a deselected test left running
        process.kill()
        process.wait()


def check(status, stdout, stderr, phrase):
    assert status == 2, stderr
    assert stdout == ""
    assert "Traceback" not in stderr
    assert stderr.count("\n") == 1
    assert stderr.startswith("error: ")
    assert phrase in stderr


@pytest.mark.parametrize("case", AS_PROCESS)
def test_bad_input_exits_2(case, processes):
    stdout, stderr = processes[case].communicate(timeout=120)
    check(processes[case].returncode, stdout, stderr, AS_PROCESS[case][1])


@pytest.mark.parametrize("case", IN_PROCESS)
def test_bad_input_one_line(case, bad_files, tiny_untied, capsys, monkeypatch):
    args, phrase = IN_PROCESS[case]
    status = generate.cli(command(args, bad_files, tiny_untied))
    check(status, *capsys.readouterr(), phrase.format(tmp=bad_files))


def test_ctrl_c_ends_the_line_and_exits_130(bad_files, tiny_untied):
    process = start(LONG, bad_files, tiny_untied)
    begun = process.stdout.read(1)  # the answer is streaming
    process.send_signal(signal.SIGINT)
    rest, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr
    assert len(begun + rest) > 1
    assert rest.endswith("\n")


def test_a_reader_that_stops_reading_ends_it_quietly(bad_files, tiny_untied):
    """As `generate.py ... | head -c 1`: head reads its byte and exits."""
    process = start(LONG, bad_files, tiny_untied)
    process.stdout.read(1)
    process.stdout.close()
    process.wait(timeout=120)
    assert process.stderr.read() == ""
    assert process.returncode == 141  # as a process that SIGPIPE ends


def test_an_answer_cut_by_the_context_says_so(bad_files, capsys):
    """A prompt that nearly fills a context of 100 tokens leaves room for a few: the answer
    stops there, exit status 0, and stderr says that the context, not --max-new-tokens, cut it."""
    prompt = " ".join(["word"] * 80)
    status = generate.cli(["--model", str(bad_files / "short_context"), "--prompt", prompt,
                           "--temperature", "0", "--max-new-tokens", "50"])
    out, err = capsys.readouterr()
    assert status == 0, err
    assert err.strip().splitlines()[-1] == "note: the context (100 tokens) cut the answer"
