"""
What train.py learns from: JSON-lines files in either of two formats, a built-in synthetic task,
and a byte-level tokenizer for the tiny random model (no download).

One JSON object a line, image paths relative to the file:
    LLaVA: {"image": "a.jpg", "conversations": [{"from": "human", "value": "<image>\\nWhat is it?"},
                                                {"from": "gpt", "value": "A cat."}]}
    chat:  {"images": ["a.jpg"], "messages": [{"role": "user", "content": [{"type": "image"},
            {"type": "text", "text": "What is it?"}]}, {"role": "assistant", "content": "A cat."}]}
A LLaVA record is first rewritten as a chat record (llava_to_chat); one reader (to_messages) turns
chat records into the messages processor.chat_text reads. Every error names file and line.
Images are decoded only when a step needs them (encode_sample), so a sample whose image turns out
unreadable then is skipped, named and counted, not fatal.
"""
import json
import random
import sys
from contextlib import nullcontext
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

from processor import chat_text, content_parts, framing_token, user_turn
from vision import MERGE, PATCH, open_image, smart_resize

LLAVA_ROLES = {"human": "user", "gpt": "assistant"}  # any other role ("system") keeps its name
CHAT_ROLES = ("system", "user", "assistant")
# the split train.py holds back and eval.py --size tiny evaluates: the same defaults in both
EVAL_SAMPLES, MAX_LEN, SYNTHETIC_SAMPLES = 64, 4096, 2000


def llava_to_chat(record):
    """{"image", "conversations"} -> {"images", "messages"}: "from" and "value" become "role" and
    "content", and each "<image>" in a text an image part at its place."""
    turns = record["conversations"]
    if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
        raise ValueError('expected a list of turns under "conversations"')
    messages = []
    for turn in turns:
        role = LLAVA_ROLES.get(turn.get("from"), turn.get("from"))
        messages.append({"role": role, "content": llava_content(turn.get("value"))})
    return {"images": record.get("image"), "messages": messages}


def llava_content(value):
    """A LLaVA text with "<image>" placeholders -> chat content parts."""
    if not isinstance(value, str):
        return value  # content_parts says what is wrong with it
    parts = []
    for k, text in enumerate(value.split("<image>")):
        if k > 0:  # a placeholder stood before this piece
            parts.append({"type": "image"})
        if text:
            parts.append({"type": "text", "text": text})
    return parts


def to_messages(record, root):
    """A record of either format -> messages for chat_text. An image part without a path of its
    own takes the record's next image; if the record has no image part at all, its images go in
    front of the first user turn. Paths are relative to `root`, the data file's directory."""
    if not isinstance(record, dict):
        raise ValueError("expected a JSON object")
    if "conversations" in record:
        record = llava_to_chat(record)
    turns, paths = record.get("messages"), record.get("images") or []
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(turns, list) or not all(isinstance(turn, dict) for turn in turns):
        raise ValueError('expected a list of turns under "messages" (chat) or "conversations" '
                         "(LLaVA)")
    if not isinstance(paths, list) or not all(isinstance(path, str) for path in paths):
        raise ValueError("images must be a path or a list of paths")
    images, messages = iter(paths), []
    for turn in turns:
        if turn.get("role") not in CHAT_ROLES:
            raise ValueError(f"unknown role {turn.get('role')!r}")
        parts = []
        for part in content_parts(turn.get("content")):
            if part["type"] == "image":
                path = part["image"] if part["image"] is not None else next(images, None)
                if path is None:
                    raise ValueError("more image placeholders than images")
                part = {"type": "image", "image": str(Path(root, path))}  # absolute stays as it is
            elif token := framing_token(part["text"]):
                raise ValueError(f"the text holds {token}, a special token of the chat format")
            parts.append(part)
        messages.append({"role": turn["role"], "content": parts})
    if rest := list(images):
        if any(part["type"] == "image" for m in messages for part in m["content"]):
            raise ValueError(f"{len(rest)} image(s) more than image placeholders")
        user = next((m for m in messages if m["role"] == "user"), None)
        if user is None:
            raise ValueError("images but no user turn to show them in")
        user["content"][:0] = [{"type": "image", "image": str(Path(root, p))} for p in rest]
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("no assistant turn, so nothing to learn from")
    return messages


def read_jsonl(path, convert):
    """[convert(record, the file's folder, "file:line")] of a JSON-lines file: the one reader of
    train.py's and eval.py's data. Any error names file and line."""
    items = []
    with open(path, "rb") as f:  # bytes, decoded line by line: bad UTF-8 is named with its line
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                items.append(convert(json.loads(line.decode("utf-8")), Path(path).parent, where))
            except json.JSONDecodeError as e:
                raise ValueError(f"{where}: not valid JSON ({e.msg})") from None
            except (ValueError, TypeError) as e:  # not UTF-8 too; TypeError: a path not a string
                raise ValueError(f"{where}: {e}") from None
    if not items:
        raise ValueError(f"{path} holds no samples")
    return items


COLORS = {"red": (220, 40, 40), "green": (40, 170, 70), "blue": (50, 80, 230),
          "yellow": (240, 210, 40), "white": (250, 250, 250), "black": (20, 20, 20)}
SHAPES = ("circle", "square", "triangle")


def synthetic_sample(rng):
    """The built-in task: one coloured shape at a random place and size on a grey 64x64 canvas,
    and a lettered multiple-choice question on its colour or its kind. The options keep one
    order, so the text alone says nothing about the answer: it can only be read from the image."""
    color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
    image = Image.new("RGB", (64, 64), (rng.randint(100, 160),) * 3)
    s = rng.randint(20, 40)
    x, y = rng.randint(0, 64 - s), rng.randint(0, 64 - s)
    draw, box = ImageDraw.Draw(image), (x, y, x + s, y + s)
    if shape == "triangle":
        draw.polygon([(x + s / 2, y), (x, y + s), (x + s, y + s)], fill=COLORS[color])
    else:  # a circle is the ellipse in the square's box
        (draw.ellipse if shape == "circle" else draw.rectangle)(box, fill=COLORS[color])
    if rng.random() < 0.5:
        question, options, answer = "What colour is the shape?", list(COLORS), color
    else:
        question, options, answer = "Which shape is drawn?", list(SHAPES), shape
    letters = "ABCDEF"[:len(options)]
    choices = " ".join(f"{letter}. {option}" for letter, option in zip(letters, options))
    text = f"{question} {choices}. Answer with the letter."
    return user_turn([image], text) + [{"role": "assistant",
                                        "content": letters[options.index(answer)]}]


def image_tokens(image, where):
    """Visual tokens an image will give, from its size alone (a path: only the header is read)."""
    try:
        with nullcontext(image) if isinstance(image, Image.Image) else open_image(image) as f:
            height, width = smart_resize(f.height, f.width)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        # missing, not an image, an aspect ratio over 200, a decompression bomb (by its header)
        raise ValueError(f"cannot read image {image} ({where}): {e}") from None
    return height * width // (PATCH * MERGE) ** 2


def sample_lengths(samples, tokenizer):
    """(tokens, images) of each sample without decoding an image: the text is tokenised with one
    <|image_pad|> per image, then each image adds the visual tokens its size gives."""
    texts, images, _ = zip(*(chat_text(messages, False) for messages, _ in samples))
    encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)  # in parallel
    return [(len(encoding.ids) + sum(image_tokens(image, where) - 1 for image in sample_images),
             len(sample_images))
            for encoding, sample_images, (_, where) in zip(encodings, images, samples)]


def load_data(path, tokenizer, max_len, seed, eval_samples, synthetic_samples):
    """The samples that fit, shuffled by the seed: (held-out, train, what was skipped). `path`
    None: the built-in task. Samples over max_len tokens are skipped, never cut (a cut could fall
    inside an image); so are samples without an image, which PVM cannot learn from (it adds
    exactly zero there). Both are counted. The held-out share depends on eval_samples alone."""
    if path:
        samples = read_jsonl(path, lambda record, root, where: (to_messages(record, root), where))
    else:
        rng = random.Random(seed)
        samples = [(synthetic_sample(rng), f"built-in sample {i}")
                   for i in range(synthetic_samples)]
    lengths = sample_lengths(samples, tokenizer)
    keep = [sample for sample, (n, k) in zip(samples, lengths) if n <= max_len and k > 0]
    skipped = (f"{sum(n > max_len for n, _ in lengths)} over --max-len {max_len} and "
               f"{sum(k == 0 for _, k in lengths)} without an image skipped")
    n_eval = min(eval_samples, len(keep) // 10)
    if len(keep) <= n_eval:
        raise ValueError(f"no training samples in {path or 'the built-in task'}: "
                         f"{len(samples)} read, {skipped}")
    order = torch.randperm(len(keep), generator=torch.Generator().manual_seed(seed)).tolist()
    keep = [keep[i] for i in order]
    return keep[:n_eval], keep[n_eval:], skipped


def encode_sample(samples, i, encode, named):
    """encode(sample) of sample i of `samples`, (sample, "file:line") pairs, wrapping: (the
    sample, its tensors, how many were skipped for it). The readers check image headers only,
    so an image can still fail to decode here (a truncated JPEG body, a file changed since):
    that sample is skipped for the next of the order, which keeps every batch full, processes
    in step and a resumed run exact. It is named on stderr once (`named` holds those named) and
    counted in the log. train.py's samples and grpo.py's prompts both come through here."""
    for j in range(i, i + len(samples)):
        sample, where = samples[j % len(samples)]
        try:
            return sample, encode(sample), j - i
        except ValueError as e:  # load_image's, which names the file
            if where not in named:
                tqdm.write(f"skipped {where}: {e}", file=sys.stderr)  # above a progress bar
                named.add(where)
            error = f"{where}: {e}"
    raise ValueError(f"no sample's images can be decoded; the last: {error}")
