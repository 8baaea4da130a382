"""
Text and images in, token ids and pixels out: the tokenizer and the chat format, as the
reference processor's apply_chat_template produces them (the official chat_template.json,
without tools).

    load_tokenizer("Qwen/Qwen3-VL-4B-Instruct" or a directory) -> tokenizers.Tokenizer
    encode_chat(tokenizer, messages) -> input_ids (1, T), pixel_values (N, 1536), grid (images, 3)
    encode_chat_for_training(tokenizer, messages) -> the same, and the loss mask (1, T)
    left_pad([encode_chat(...), ...]) -> one batch, padded on the left, for generate_batch
    tiny_tokenizer(): bytes as tokens, for the tiny random model (no download)

Messages are {"role": "system" | "user" | "assistant", "content": a string or a list of parts,
{"type": "text", "text": ...} or {"type": "image", "image": a PIL image or a path}}. Left out on
purpose: tool calls, video.
"""
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE
from tokenizers.pre_tokenizers import ByteLevel

from load_qwen import resolve_checkpoint
from vision import MERGE, load_image, preprocess_image

IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
CHAT_TOKENS = ("<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>")
# special tokens that frame the turns and place the images: a text that spells one out is read
# as the token itself (a reply ended early, a placeholder without an image). Grounding tokens
# (<|box_start|>, <|object_ref_start|>, ...) are meant to be written in the text and pass.
FRAMING_TOKENS = ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|vision_start|>",
                  "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>")
SPECIAL_TOKENS = {"<|endoftext|>": 151643, "<|im_start|>": 151644, "<|im_end|>": 151645,
                  "<|vision_start|>": 151652, "<|vision_end|>": 151653, "<|image_pad|>": 151655}


def load_tokenizer(path_or_id):
    path = resolve_checkpoint(path_or_id) / "tokenizer.json"
    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as e:  # missing, not JSON, cut short, or not a tokenizer
        raise ValueError(f"cannot read {path}: {e}") from None
    # another model's tokenizer would spell the chat format's tokens out as text
    if missing := [token for token in CHAT_TOKENS if tokenizer.token_to_id(token) is None]:
        raise ValueError(f"{path} lacks the token {missing[0]}: not a Qwen3-VL tokenizer")
    return tokenizer


def tiny_tokenizer():
    """Bytes as tokens (no merges) plus the Qwen special tokens at their official ids."""
    vocab = {char: i for i, char in enumerate(sorted(ByteLevel.alphabet()))} | SPECIAL_TOKENS
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def framing_token(text):
    """The first of FRAMING_TOKENS that `text` spells out, or None."""
    return next((token for token in FRAMING_TOKENS if token in text), None)


def content_parts(content):
    """A message's content as a list of parts, {"type": "text", "text": str} or {"type": "image",
    "image": a PIL image, a path, or None where the part names none}. A string is one text part;
    a part is an image if its type says so or it has an "image" or "path" key (both spellings of
    the official template)."""
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list) or not all(isinstance(part, dict) for part in content):
        raise ValueError("message content must be a string or a list of parts")
    parts = []
    for part in content:
        if part.get("type") == "image" or "image" in part or "path" in part:
            parts.append({"type": "image", "image": part.get("image", part.get("path"))})
        elif isinstance(part.get("text"), str):
            parts.append({"type": "text", "text": part["text"]})
    return parts


def chat_text(messages, add_generation_prompt=True):
    """messages -> (the prompt's text with one <|image_pad|> per image, the images in order, and
    the character spans (start, end) of each assistant reply with its <|im_end|>: the tokens a
    fine-tuning loss is taken on)."""
    text, images, spans = "", [], []
    for i, message in enumerate(messages):
        role = message["role"]
        if role == "system" and i > 0:
            continue  # the official template only reads a system message in first place
        text += f"<|im_start|>{role}\n"
        start = len(text)
        for part in content_parts(message["content"]):
            if part["type"] == "text":
                text += part["text"]
            elif role == "user":  # images are read in user turns only
                if part["image"] is None:
                    raise ValueError("an image part needs an 'image' (a PIL image or a path)")
                images.append(part["image"])
                text += IMAGE_PLACEHOLDER
        text += "<|im_end|>"
        if role == "assistant":
            spans.append((start, len(text)))
        text += "\n"
    if add_generation_prompt:
        text += "<|im_start|>assistant\n"
    return text, images, spans


def encode(tokenizer, messages, add_generation_prompt):
    """input_ids (1, T), pixel_values (N, 1536) or None, grid (images, 3) or None, and a bool
    (1, T) mask of the tokens inside assistant replies."""
    text, images, spans = chat_text(messages, add_generation_prompt)
    images = [load_image(im) if isinstance(im, (str, Path)) else im for im in images]
    pixel_values, grids = zip(*map(preprocess_image, images)) if images else ((), ())
    encoding = tokenizer.encode(text, add_special_tokens=False)
    in_reply = [any(s <= start < e for s, e in spans) for start, _ in encoding.offsets]
    # each image's one <|image_pad|> becomes one pad per merged visual token, as the processor
    pad_id = tokenizer.token_to_id("<|image_pad|>")
    counts = iter(int(grid.prod()) // MERGE**2 for grid in grids)
    ids, mask = [], []
    for token, reply in zip(encoding.ids, in_reply):
        n = next(counts, None) if token == pad_id else 1
        if n is None:
            raise ValueError("the prompt holds more <|image_pad|> tokens than there are images")
        ids += [token] * n
        mask += [reply] * n
    if not images:
        return torch.tensor([ids]), None, None, torch.tensor([mask])
    return torch.tensor([ids]), torch.cat(pixel_values), torch.cat(grids), torch.tensor([mask])


def user_turn(images, text):
    """The messages of one user turn: the images (paths or PIL images) first, then the text."""
    return [{"role": "user", "content": [*({"type": "image", "image": image} for image in images),
                                         {"type": "text", "text": text}]}]


def encode_chat(tokenizer, messages, add_generation_prompt=True):
    """Chat messages with images -> input_ids (1, T), pixel_values (N, 1536) or None,
    image_grid_thw (images, 3) or None: what the reference processor's apply_chat_template
    gives."""
    return encode(tokenizer, messages, add_generation_prompt)[:3]


def encode_chat_for_training(tokenizer, messages):
    """As encode_chat without the generation prompt, plus the loss mask (1, T): True on the
    tokens of each assistant reply and its <|im_end|>."""
    return encode(tokenizer, messages, add_generation_prompt=False)


def left_pad(prompts, pad_id=0):
    """Several prompts, each encode_chat's (input_ids (1, T_b), pixel_values, image_grid_thw), as
    one batch for generate_batch: input_ids and attention_mask (B, T) padded on the left (pad_id
    is never read), and the images of every row in order (None where no prompt has one)."""
    B, T = len(prompts), max(ids.size(1) for ids, _, _ in prompts)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    for b, (ids, _, _) in enumerate(prompts):
        input_ids[b, T - ids.size(1):] = ids[0]
        attention_mask[b, T - ids.size(1):] = 1
    images = [(pixels, grid) for _, pixels, grid in prompts if pixels is not None]
    if not images:
        return input_ids, attention_mask, None, None
    pixel_values, image_grid_thw = (torch.cat(parts) for parts in zip(*images))
    return input_ids, attention_mask, pixel_values, image_grid_thw
