"""chat.py --web: the server's requests on a running server (errors in the page's words, a client
that leaves stops its answer, one answer at a time), and the page in a real headless Chromium
driven by selenium, as a person uses it: attach cat.jpg, send, read the streamed answer (equal to
`generate.py --temperature 0`, PVM's answer and the one with its gates at 0), every token with a
share in [0, 1], a second turn, a non-image upload refused, the next message answered. Only
loopback addresses; every wait is bounded."""
import base64
import http.client
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import chat as chat_py
import load_qwen
import pvm
from processor import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py

REPO = Path(__file__).resolve().parent.parent
CAT = REPO / "cat.jpg"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8", "OMP_NUM_THREADS": "1"}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def until(condition, what, tries=240, pause=0.5):
    """Wait for condition() a bounded number of times."""
    for _ in range(tries):
        if result := condition():
            return result
        time.sleep(pause)
    raise AssertionError(f"never: {what}")


def post(port, path, body, headers=None):
    """(status, the events or the JSON reply) of one request to the server."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    if response.headers["content-type"].startswith("text/event-stream"):
        return response.status, [json.loads(e[len("data: "):]) for e in text.split("\n\n") if e]
    return response.status, json.loads(text)


def message(text, image=None):
    data = image and "data:image/jpeg;base64," + base64.b64encode(image).decode()
    return json.dumps({"text": text, "image": data})


@pytest.fixture(scope="module")
def served(tiny_untied):
    """chat.py's app on a uvicorn server in this process (its chat can be looked at): answers
    of up to 2000 tokens that never stop early, so that only a client leaving can stop one."""
    import uvicorn
    model = load_qwen.load_model(tiny_untied)
    model.config.eos_token_ids = ()
    chat = chat_py.Chat(model, load_tokenizer(tiny_untied), max_new_tokens=2000, temperature=0.0)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(chat_py.web_app(chat, {"model": "tiny"}),
                                           host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    until(lambda: server.started, "the server started")
    yield chat, port
    server.should_exit = True
    thread.join(timeout=30)


def test_refusals_in_the_page_s_words_and_the_server_goes_on(served):
    chat, port = served
    status, reply = post(port, "/chat", message("Hi", b"not a picture"))
    assert status == 400 and reply["error"].startswith("that file is not an image")
    too_big = str(chat_py.MAX_UPLOAD + 1)  # the header alone: the server reads none of it
    status, reply = post(port, "/chat", "{}", {"Content-Length": too_big})
    assert status == 413 and reply["error"] == "the upload is over 20 MB"
    status, events = post(port, "/chat", message(" a" * 5000))  # 5000 tokens: over 4096
    assert status == 200 and "over the model's context of 4096" in events[-1]["error"]
    assert chat.ids == [] and post(port, "/again", "{}")[1][-1]["error"] == \
        "no answer yet to write again"


def test_a_client_that_leaves_stops_its_answer(served):
    chat, port = served
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("POST", "/chat", message("Describe it.", CAT.read_bytes()),
                       {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert json.loads(response.readline()[len("data: "):])["share"] >= 0  # a first token
    connection.close()  # the page closed mid-answer

    def settled():  # the answer stopped growing
        before = len(chat.ids)
        time.sleep(1.0)
        return len(chat.ids) == before
    until(settled, "the answer stopped", tries=60, pause=0)
    answered = len(chat.ids) - chat.asked
    assert 1 <= answered < 2000
    # the next message is answered at once: nothing else holds the model
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    connection.request("POST", "/chat", message("Hi"), {"Content-Type": "application/json"})
    first = json.loads(connection.getresponse().readline()[len("data: "):])
    connection.close()
    assert "token" in first, first
    assert first["token"] == chat.ids[chat.asked]
    until(settled, "the second answer stopped", tries=60, pause=0)


@pytest.fixture(scope="module")
def pvm_file(tiny_untied, tmp_path_factory):
    model = pvm.attach_pvm(load_qwen.load_model(tiny_untied), [1, 3], 64)
    with torch.no_grad():
        for i in (1, 3):
            model.layers[i].pvm_block.gate_alpha.fill_(1.0)  # open: PVM changes the answer
    path = tmp_path_factory.mktemp("pvm") / "pvm.safetensors"
    pvm.save_pvm(model, path)
    return path


def generate_cli(*args):
    command = [sys.executable, str(REPO / "generate.py"), "--temperature", "0", *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=ENV, capture_output=True, text=True,
                          check=True).stdout


def test_the_page_in_a_headless_browser(tiny_untied, pvm_file, tmp_path):
    from selenium import webdriver
    from selenium.webdriver.common.by import By

    port, new = free_port(), ["--max-new-tokens", "12"]
    server = subprocess.Popen([sys.executable, str(REPO / "chat.py"), "--web", "--port", str(port),
                               "--model", str(tiny_untied), "--pvm", str(pvm_file),
                               "--temperature", "0", *new], cwd=REPO, env=ENV)
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                 "--window-size=1100,900"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options,
                               service=webdriver.ChromeService("/usr/bin/chromedriver"))
    try:
        until(lambda: reachable(port), "the page served")
        browser.get(f"http://127.0.0.1:{port}/")
        settings = browser.find_element(By.ID, "settings").text  # which model and settings ran
        assert f"model={tiny_untied}" in settings and f"pvm={pvm_file}" in settings
        file_input = browser.find_element(By.ID, "file")
        browser.execute_script("arguments[0].hidden = false", file_input)

        def send(text, attach=None):
            if attach:
                file_input.send_keys(str(attach))
                until(lambda: "attached" in browser.find_element(By.ID, "drop").text, "attached")
            browser.find_element(By.ID, "prompt").send_keys(text)
            browser.find_element(By.ID, "send").click()
            until(lambda: browser.find_element(By.ID, "send").is_enabled(), "the answer")
            return browser.execute_script("""
                const pair = [...document.querySelectorAll('.pair')].pop();
                return [...pair.querySelectorAll('.answer')].map(box => ({
                    text: [...box.querySelectorAll('.tok')].map(s => s.textContent).join(''),
                    shares: [...box.querySelectorAll('.tok')].map(s => +s.dataset.share),
                    error: box.querySelector('.error')?.textContent}));""")

        browser.find_element(By.ID, "again").click()  # PVM's gates at 0 beside the answer
        first = send("What is this?", CAT)
        asked = ["--image", CAT, "--prompt", "What is this?", *new]
        assert first[0]["text"] + "\n" == generate_cli("--model", tiny_untied, "--pvm",
                                                       pvm_file, *asked)
        assert first[1]["text"] + "\n" == generate_cli("--model", tiny_untied, *asked)
        for answer in first:
            assert answer["shares"] and all(0 <= s <= 1 for s in answer["shares"])
        second = send("And what colour is it?")
        assert second[0]["text"] and all(0 <= s <= 1 for s in second[0]["shares"])
        notes = tmp_path / "notes.png"
        notes.write_text("not a picture\n")
        refused = send("And this?", notes)
        assert refused[0]["error"].startswith("that file is not an image")
        after = send("Still there?")
        assert after[0]["text"] and after[0]["error"] is None
        assert browser.save_screenshot(str(tmp_path / "chat.png"))
        assert (tmp_path / "chat.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    finally:
        browser.quit()
        server.terminate()
        server.wait(timeout=30)


def reachable(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False
