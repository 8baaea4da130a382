"""
TEMPORARY: stand-ins for generate.generate_batch and eval.py's reader, prompt and scorer, under
their announced signatures, until both land. grpo.py must import the real ones instead; then this
file goes.
"""
import json
import re
from pathlib import Path

import torch

import generate
from model import KVCache

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_POST_PROMPT = "Answer with the option's letter from the given choices directly."


@torch.inference_mode()
def generate_batch(model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                   max_new_tokens=256, temperature=0.0, top_k=None, top_p=None, seed=None,
                   num_samples=1, stop_tokens=None, compile=False, cuda_graph=True):
    """One unpadded prompt, its G rows prefilled together (the real one prefills once)."""
    if input_ids.size(0) != 1 or attention_mask is not None:
        raise ValueError("the stand-in takes one unpadded prompt")
    G, T = num_samples, input_ids.size(1)
    stop_tokens = model.config.eos_token_ids if stop_tokens is None else stop_tokens
    device, dtype = model.embed_tokens.weight.device, model.embed_tokens.weight.dtype
    generator = torch.Generator(device).manual_seed(seed)
    cache = KVCache(model.config, G, T + max_new_tokens, device, dtype)
    repeat = lambda t: None if t is None else t.to(device).repeat(G, 1)
    hidden = model.hidden_states(repeat(input_ids), repeat(pixel_values), repeat(image_grid_thw),
                                 cache=cache)
    logits = model.lm_head(hidden[:, -1])
    rows, done = [[] for _ in range(G)], [False] * G
    for n in range(max_new_tokens):
        if temperature and top_k is None and (top_p is None or top_p >= 1):  # no sort needed
            probs = (logits.float() / temperature).softmax(dim=-1)
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            tokens = generate.sample(logits, temperature, top_k, top_p, generator)
        for row, token in enumerate(tokens.tolist()):
            if not done[row]:
                rows[row].append(token)
                done[row] = token in stop_tokens
        if all(done) or n == max_new_tokens - 1:
            return rows
        logits = generate.decode_step(model, tokens[:, None], cache)


def read_samples(path):
    samples = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                record = json.loads(line)
                images = [str(Path(path).parent / image) for image in record.get("images") or []]
                samples.append({"id": str(record.get("id", n)), "images": images,
                                "question": record["question"], "options": record.get("options"),
                                "answer": str(record["answer"]), "where": f"{path}:{n}"})
    return samples


def builtin_sample(messages, where):
    text = messages[0]["content"][1]["text"]
    return {"id": where, "benchmark": "built-in", "images": [], "question": text,
            "options": re.findall(r"\b[A-F]\. (\w+)", text), "answer": messages[1]["content"],
            "where": where, "messages": messages[:1]}


def prompt_messages(sample, post_prompt):
    if "messages" in sample:
        return sample["messages"]
    text = sample["question"]
    if sample["options"]:
        text += "".join(f"\n{LETTERS[i]}. {option}" for i, option in enumerate(sample["options"]))
        text += "\n" + MC_POST_PROMPT
    elif post_prompt:
        text += "\n" + post_prompt
    content = [{"type": "image", "image": image} for image in sample["images"]]
    return [{"role": "user", "content": content + [{"type": "text", "text": text}]}]


def score(response, sample):
    response = re.sub(r"<think>.*?(?:</think>|$)", "", response, flags=re.S)
    spans = re.findall(r"<answer>(.*?)</answer>", response, flags=re.S)
    given = (spans[-1] if spans else response).strip()
    if sample.get("options"):
        answer = sample["answer"].strip()
        letter = answer if answer in LETTERS else LETTERS[sample["options"].index(answer)]
        return given[:1] == letter and (len(given) == 1 or not given[1].isalpha())
    return given.casefold() == sample["answer"].strip().casefold()
