"""generate.py on bad input: one clear line on stderr, exit status 2, no traceback.
Two cases run as real processes (started together); the rest call generate.cli in this one."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

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
}
AS_PROCESS = {
    "missing image": (["--image", "no/such/photo.jpg"], "image not found: no/such/photo.jpg"),
    "unknown model offline": (["--model", "nobody/no-such-model", "--image", CAT],
                              "nobody/no-such-model"),
}


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, tiny_untied):
    tmp = tmp_path_factory.mktemp("bad_inputs")
    (tmp / "notes.jpg").write_text("not a picture\n")
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
    return tmp


def command(args, tmp, checkpoint):
    args = [str(a).format(tmp=tmp) for a in args]
    return args if "--model" in args else ["--model", str(checkpoint), *args]


@pytest.fixture(scope="module")
def processes(tiny_untied):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    started = {}
    for case, (args, _) in AS_PROCESS.items():
        line = [sys.executable, str(REPO / "generate.py"), *command(args, None, tiny_untied)]
        started[case] = subprocess.Popen(line, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True)
    yield started
    for process in started.values():  # any a deselected test left running
        process.kill()
        process.communicate()


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
def test_bad_input_one_line(case, bad_files, tiny_untied, capsys):
    args, phrase = IN_PROCESS[case]
    status = generate.cli(command(args, bad_files, tiny_untied))
    check(status, *capsys.readouterr(), phrase)
