"""
TEMPORARY: stand-ins for eval.py's reader, prompt and scorer, under their announced signatures,
until eval.py lands. grpo.py must import the real ones instead; then this file goes.
"""
import json
import re
from pathlib import Path

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
MC_POST_PROMPT = "Answer with the option's letter from the given choices directly."


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
