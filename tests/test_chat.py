"""chat.py in the terminal, driven through its loop with scripted input: three turns (the second
brings an image by /image, the third is stopped by Ctrl-C), /clear, and Ctrl-D. Each answer is
the greedy one of a whole forward over the conversation; the first equals `generate.py
--temperature 0` on the same input; after /clear the chat starts over."""
import io
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import chat as chat_py
import fixtures as fx
import load_qwen
from processor import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

REPO = Path(__file__).resolve().parent.parent
CAT = REPO / "cat.jpg"
NEW_TOKENS = 6


def generate_cli(model, prompt):
    """generate.py's answer at temperature 0 (stdout, the answer's line)."""
    command = [sys.executable, str(REPO / "generate.py"), "--model", str(model), "--image",
               str(CAT), "--prompt", prompt, "--temperature", "0",
               "--max-new-tokens", str(NEW_TOKENS)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=True,
                          env={"HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8",
                               "OMP_NUM_THREADS": "1", "PATH": ""}).stdout


def test_three_turns_image_ctrl_c_clear_and_ctrl_d(tiny_untied, photos, tmp_path):
    model, tokenizer = load_qwen.load_model(tiny_untied), load_tokenizer(tiny_untied)
    rocket = tmp_path / "rocket.jpg"
    photos["rocket"].reduce(3).save(rocket)
    chat = chat_py.Chat(model, tokenizer, max_new_tokens=NEW_TOKENS, temperature=0.0)
    script = ["What is this?", f"/image {rocket}", "And this one?", "Why?", "/image nope.png",
              "/clear", "Hi"]
    seen, written = [], []  # what the chat held at each prompt; what was written

    def read(prompt):
        seen.append((chat.asked, len(chat.ids), list(chat.ids), list(chat.images)))
        if len(seen) > len(script):
            raise EOFError  # Ctrl-D
        return script[len(seen) - 1]

    def write(text="", end="\n", flush=False):
        written.append(text + end)
        if script[len(seen) - 1:len(seen)] == ["Why?"] and len(chat.ids) == chat.asked + 2:
            signal.raise_signal(signal.SIGINT)  # Ctrl-C at the third answer's second token

    handler = signal.getsignal(signal.SIGINT)
    chat_py.terminal(chat, [chat_py.load_image(CAT)], read, write)
    assert signal.getsignal(signal.SIGINT) is handler  # given back
    # at the prompt before /clear: three answered turns, each answer greedy over the whole
    # conversation (one forward, both images)
    _, _, ids, images = seen[5]
    starts, ends = [seen[i][0] for i in (1, 3, 4)], [seen[i][1] for i in (1, 3, 4)]
    pixel_values, grid = (torch.cat(x) for x in zip(*images))
    assert grid.size(0) == 2 and ids.count(fx.VISION_START_ID) == 2
    with torch.no_grad():
        greedy = model(torch.tensor([ids]), pixel_values, grid)[0].argmax(-1)
    for start, end in zip(starts, ends):
        assert ids[start:end] == greedy[start - 1:end - 1].tolist()
    assert ends[2] - starts[2] == 2  # Ctrl-C stopped the third answer after its second token
    # what was written is each answer's text; the first is generate.py's at temperature 0
    text = "".join(written)
    answers = [tokenizer.decode(ids[s:e]) for s, e in zip(starts, ends)]
    assert all(f"{answer}\n" in text for answer in answers)
    assert generate_cli(tiny_untied, "What is this?") == answers[0] + "\n"
    assert "error: cannot read image nope.png" in text
    # after /clear: one turn without an image, as a new chat answers it
    fresh = chat_py.Chat(model, tokenizer, max_new_tokens=NEW_TOKENS, temperature=0.0)
    assert list(fresh.reply("Hi")) and fresh.ids == chat.ids and chat.images == []
    assert written[-1] == "\n"  # Ctrl-D ends the line


def test_command_line_refuses_a_bad_image_before_loading(tiny_untied, capsys):
    assert chat_py.cli(["--model", str(tiny_untied), "--image", "nope.png"]) == 2
    assert capsys.readouterr().err.startswith("error: cannot read image nope.png")


def test_command_line_ctrl_d_at_once(tiny_untied, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert chat_py.cli(["--model", str(tiny_untied), "--temperature", "0"]) == 0
