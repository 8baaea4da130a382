"""
Talk to Qwen3-VL about images, several turns in a row: in the terminal, or in a browser page
that tints each token of the answer by the image's share of its attention.

    python chat.py --image cat.jpg [--model DIR] [--pvm FILE]
    python chat.py --web [--port 8000] [--host 127.0.0.1] [--pvm FILE]

In the terminal: `/image PATH` attaches an image to the next turn, `/clear` starts over, `/quit`
or Ctrl-D leaves; Ctrl-C stops the answer being written, not the program.

One KV cache holds the conversation: each turn prefills only its own tokens (generate.decode
continues the cache), as the chat format lays them out. With PVM, the bank holds the images of
the turns so far (docs/PVM.md). The page (chat.html) is served by FastAPI; what a request sends
stays in memory. Left out on purpose: several conversations at once, editing earlier turns.
"""
import argparse
import asyncio
import contextlib
import io
import json
import signal
import sys
import threading
from base64 import b64decode
from pathlib import Path
from queue import Queue

import torch
from tokenizers.decoders import DecodeStream

import common
from generate import generate, sampling_defaults
from load_qwen import load_model, resolve_checkpoint
from model import KVCache
from processor import encode_chat, load_tokenizer, user_turn
from pvm import load_pvm
from report import AttentionReport
from vision import load_image

MAX_UPLOAD = 20 << 20  # bytes of one request: an image, base64 in JSON


class Chat:
    """A conversation: its KV cache, its tokens, its images. `reply` answers one turn."""

    def __init__(self, model, tokenizer, **options):
        self.model, self.tokenizer = model, tokenizer
        self.options = options  # generate's: max_new_tokens, temperature, top_k, ...
        # what closes an answer's turn before the next user turn, as encode_chat writes it
        self.close = tokenizer.encode("<|im_end|>\n", add_special_tokens=False).ids
        self.clear()

    def clear(self):
        config, weight = self.model.config, self.model.embed_tokens.weight
        self.cache = KVCache(config, 1, config.max_position_embeddings, weight.device,
                             weight.dtype, capacity=1)  # grows as the conversation does
        # every token of the conversation, the last answer's too (its last token was yielded,
        # never fed to the cache); (pixel_values, image_grid_thw) of each turn that brought
        # images; how many tokens came before the last answer
        self.ids, self.images, self.asked = [], [], 0

    def turn(self, text, images):
        """The new turn's tokens (1, T), pixel_values, image_grid_thw: the end of the last
        answer's turn, then the user turn with its images and the generation prompt."""
        ids, pixel_values, grid = encode_chat(self.tokenizer, user_turn(images, text))
        if self.ids:  # the answer's last token unless it was <|im_end|>, which close repeats
            end = [t for t in self.ids[-1:] if t != self.close[0]] + self.close
            ids = torch.cat([torch.tensor([end]), ids], dim=1)
        return ids, pixel_values, grid

    def reply(self, text, images=(), watch=False):
        """Yield (token id, the image's share of its attention or None) for each answer token;
        stopping early leaves the chat whole. `watch`: report.py's hooks measure the share."""
        ids, pixel_values, grid = self.turn(text, images)
        # the conversation with this turn, which begins with the last answer's last token
        seen = torch.tensor([self.ids[:-1] + ids[0].tolist()])
        with AttentionReport(self.model, seen) if watch else contextlib.nullcontext() as report:
            tokens = generate(self.model, ids, pixel_values, grid, cache=self.cache,
                              cuda_graph=not watch, **self.options)
            token = next(tokens)  # the prefill: a turn over the context is refused here
            self.asked, self.ids = seen.size(1), seen[0].tolist()
            self.images += [] if grid is None else [(pixel_values, grid)]
            while token is not None:
                self.ids.append(token)
                yield token, report and image_share(report)
                token = next(tokens, None)

    def again_without_pvm(self):
        """The last answer written again with PVM's gates at 0, from one prefill over the
        conversation up to it (the cache holds keys that PVM changed): (token, share) pairs."""
        if not self.asked:
            raise ValueError("no answer yet to write again")
        ids = torch.tensor([self.ids[:self.asked]])
        pixel_values, grid = [torch.cat(x) for x in zip(*self.images)] or [None, None]
        gates = [l.pvm_block.gate_alpha for l in self.model.layers if l.pvm_block is not None]
        saved = [gate.detach().clone() for gate in gates]
        try:  # PVM's gates at 0: the base model exactly; then back, also when stopped early
            for gate in gates:
                gate.data.zero_()
            with AttentionReport(self.model, ids) as report:
                for token in generate(self.model, ids, pixel_values, grid, cuda_graph=False,
                                      **self.options):
                    yield token, image_share(report)
        finally:
            for gate, value in zip(gates, saved):
                gate.data.copy_(value)


def image_share(report):
    """The image's share of the attention that chose the last token, mean of layers and heads."""
    return torch.stack([steps[-1][:, 0].mean() for steps in report.mass]).mean().item()


def terminal(chat, images, read=input, write=print):
    """The terminal chat: read a line, answer it streaming; commands start with /."""
    while True:
        try:
            line = read("> ").strip()
        except EOFError:  # Ctrl-D
            return write()
        if line == "/quit":
            return
        stop = threading.Event()  # Ctrl-C from here: the answer ends after its next token
        previous = signal.signal(signal.SIGINT, lambda *_: stop.set())
        try:
            if line == "/clear":
                chat.clear()
                images = []
            elif line.startswith("/image "):
                images.append(load_image(line[len("/image "):].strip()))
            elif line:
                stream, turn_images, images = DecodeStream(skip_special_tokens=True), images, []
                for token, _ in chat.reply(line, turn_images):  # images go with this turn
                    write(stream.step(chat.tokenizer, token) or "", end="", flush=True)
                    if stop.is_set():
                        break
                write()
        except ValueError as e:  # an image or a turn the model cannot take
            write(f"error: {e}")
        finally:
            signal.signal(signal.SIGINT, previous)


def web_app(chat, settings):
    """The page and its three requests: a message (the answer streamed as server-sent events),
    the last answer again without PVM, and a new conversation."""
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

    app, busy = FastAPI(), threading.Lock()  # one answer at a time: the model is one

    def stream(answer):
        """(token, share) pairs as server-sent events. A thread of their own writes them and
        holds the model; a client that leaves stops it after the token being written. (A
        generator handed to Starlette would be left suspended, never closed, holding it.)"""
        queue, stop = Queue(), threading.Event()

        def work():
            with busy, contextlib.closing(answer):  # the answer's hooks go with it
                decoder = DecodeStream(skip_special_tokens=True)
                try:
                    for token, share in answer:
                        text = decoder.step(chat.tokenizer, token) or ""
                        queue.put({"text": text, "token": token, "share": share})
                        if stop.is_set():
                            break
                except (ValueError, OSError) as e:  # a turn over the context, say
                    queue.put({"error": str(e)})
            queue.put(None)

        async def events():
            if busy.locked():
                yield sse({"wait": "another answer is being written; yours comes next"})
            threading.Thread(target=work, daemon=True).start()
            try:
                while (event := await asyncio.to_thread(queue.get)) is not None:
                    yield sse(event)
            finally:  # the end, or the client gone: Starlette cancels this generator
                stop.set()
        return StreamingResponse(events(), media_type="text/event-stream")

    sse = lambda event: f"data: {json.dumps(event)}\n\n"  # one server-sent event

    @app.get("/")
    def index():
        page = (Path(__file__).parent / "chat.html").read_text()
        return HTMLResponse(page.replace("{{SETTINGS}}", json.dumps(settings)))

    @app.post("/chat")
    async def message(request: Request):
        if int(request.headers.get("content-length", 0)) > MAX_UPLOAD:  # read none of it
            return JSONResponse({"error": f"the upload is over {MAX_UPLOAD >> 20} MB"}, 413)
        try:  # the page sends {"text": ..., "image": a data: URL from FileReader, or null}
            sent = json.loads(await request.body())
            image = sent.get("image")
            images = [load_image(io.BytesIO(b64decode(image.split(",")[1])))] if image else []
        except (ValueError, AttributeError, IndexError):  # PIL's message names a memory file
            return JSONResponse({"error": "that file is not an image (PNG, JPEG, WebP, ...)"}, 400)
        return stream(chat.reply(str(sent.get("text", "")), images, watch=True))

    @app.post("/again")
    def again():
        return stream(chat.again_without_pvm())

    @app.post("/clear")
    def clear():
        with busy:  # after the answer being written
            return chat.clear()
    return app


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Talk to Qwen3-VL about images.")
    p.add_argument("--model", default="Qwen/Qwen3-VL-4B-Instruct", help="checkpoint dir or hub id")
    p.add_argument("--image", action="append", default=[], help="image for the first turn")
    p.add_argument("--pvm", help="file of trained PVM weights to attach (see pvm.py)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="most tokens per answer")
    p.add_argument("--temperature", type=float, help="0: greedy (default: generation_config.json)")
    p.set_defaults(top_p=None, top_k=None)  # generation_config.json's, as --temperature's
    p.add_argument("--device", default=common.DEVICE)
    p.add_argument("--web", action="store_true", help="serve the chat page in place of a prompt")
    p.add_argument("--host", default="127.0.0.1", help="the page's address (this machine only)")
    p.add_argument("--port", type=int, default=8000, help="the page's port")
    return common.check_options(p.parse_args(argv))


def main(args, read=input, write=print):
    checkpoint = resolve_checkpoint(args.model)
    sampling_defaults(args, checkpoint)
    images = [load_image(path) for path in args.image]  # a bad path fails before the model loads
    tokenizer = load_tokenizer(checkpoint)
    model = load_model(checkpoint, args.device,
                       torch.bfloat16 if "cuda" in args.device else torch.float32)
    model = load_pvm(model, args.pvm) if args.pvm else model
    chat = Chat(model, tokenizer, max_new_tokens=args.max_new_tokens,
                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    if not args.web:
        return terminal(chat, images, read, write)
    import uvicorn
    # the page says which model and settings ran: every option, as given or defaulted
    uvicorn.run(web_app(chat, vars(args)), host=args.host, port=args.port)


cli = common.command(main, parse_args)

if __name__ == "__main__":
    sys.exit(cli())
