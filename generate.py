"""
Describe images with Qwen3-VL: one prefill over the whole prompt (the vision tower runs once),
then one token at a time with the preallocated KV cache, the text streamed as it is chosen.

    python generate.py --image cat.jpg
    python generate.py --image a.jpg --image b.jpg --prompt "What differs?" --temperature 0

`generate(...)` is the loop on its own, a Python generator of token ids, for notebooks and
bench.py; the rest of the file is the command line around it. Left out on purpose: batches,
beam search, repetition penalties, video.
"""
import argparse
import random
import sys
import time

import torch
from tokenizers.decoders import DecodeStream

from load_qwen import encode_chat, load_model, load_tokenizer, read_json, resolve_checkpoint
from model import KVCache

STOP_TOKENS = (151645, 151643)  # <|im_end|>, <|endoftext|>


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Next token ids (B,) from logits (B, V). Temperature 0 is greedy; otherwise sample from the
    softmax kept to the top_k likeliest tokens, then to the fewest whose mass reaches top_p
    (transformers' order: temperature, top-k, top-p)."""
    if not temperature:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    # likeliest first (B, k); sorting only the top k keeps this cheap for the usual k = 20
    values, indices = (torch.topk(logits, min(top_k, logits.size(-1))) if top_k else
                       logits.sort(dim=-1, descending=True))
    if top_p is not None and top_p < 1.0:
        probs = values.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > top_p  # the likelier tokens already hold top_p
        values = values.masked_fill(drop, float("-inf"))
    choice = torch.multinomial(values.softmax(dim=-1), 1, generator=generator)  # (B, 1): a rank in the list
    return indices.gather(-1, choice).squeeze(-1)


def decode_step(model, token, cache):
    """Logits (1, V) of the token after `token` (1, 1), whose keys and values join the cache."""
    return model.lm_head(model.hidden_states(token, cache=cache)[:, -1])


@torch.inference_mode()  # as no_grad, and lighter on each of the many small decoding ops
def generate(model, input_ids, pixel_values=None, image_grid_thw=None, max_new_tokens=256,
             temperature=0.0, top_k=None, top_p=None, seed=None, stop_tokens=STOP_TOKENS, compile=False):
    """Yield each new token id (an int) as soon as it is chosen, for one prompt input_ids (1, T);
    stop after a stop token (which is yielded) or after max_new_tokens. `compile` runs the decoding
    step through torch.compile (dynamic shapes: the cache grows by one every step)."""
    (B, T), context = input_ids.shape, model.config.max_position_embeddings
    if B != 1:
        raise ValueError(f"generate takes one prompt, got a batch of {B}")
    if temperature < 0 or (top_p is not None and not 0 < top_p <= 1) or (top_k is not None and top_k < 0):
        raise ValueError(f"need temperature >= 0, 0 < top-p <= 1, top-k >= 0; got {temperature}, {top_p}, {top_k}")
    if T >= context:
        n_image = int((input_ids == model.config.image_token_id).sum())
        raise ValueError(f"the prompt is {T} tokens ({n_image} from images), over the model's context of "
                         f"{context}: use smaller or fewer images, or a shorter prompt")
    max_new_tokens = min(max_new_tokens, context - T)
    weight = model.embed_tokens.weight
    # a seed reproduces the sampled answer; without one, a fresh random seed (not torch's global one)
    generator = torch.Generator(weight.device).manual_seed(random.randrange(2**63) if seed is None else seed)
    cache = KVCache(model.config, B, T + max_new_tokens, weight.device, weight.dtype)
    if pixel_values is not None:
        pixel_values, image_grid_thw = pixel_values.to(weight.device), image_grid_thw.to(weight.device)
    step = torch.compile(decode_step, dynamic=True) if compile else decode_step
    hidden = model.hidden_states(input_ids.to(weight.device), pixel_values, image_grid_thw, cache=cache)
    logits = model.lm_head(hidden[:, -1])                             # (1, V): only the last position matters
    for _ in range(max_new_tokens):
        token = sample(logits, temperature, top_k, top_p, generator)  # (1,)
        token_id = token.item()
        yield token_id
        if token_id in stop_tokens:
            return
        logits = step(model, token[:, None], cache)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Describe images with Qwen3-VL; the answer streams to stdout.")
    p.add_argument("--model", default="Qwen/Qwen3-VL-4B-Instruct", help="checkpoint directory or hub id")
    p.add_argument("--image", action="append", default=[], help="image file; repeat for several")
    p.add_argument("--prompt", default="Describe this image.")
    p.add_argument("--system", help="system message (none by default, as the official template)")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--temperature", type=float, help="0 means greedy (default: generation_config.json)")
    p.add_argument("--top-p", type=float, help="default: generation_config.json")
    p.add_argument("--top-k", type=int, help="default: generation_config.json")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 otherwise")
    p.add_argument("--pvm", help="file of trained PVM weights to attach (see pvm.py)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoding step (its first call compiles: the rate shown includes that)")
    return p.parse_args(argv)


def sampling_defaults(args, checkpoint):
    """Options the command line leaves out come from the checkpoint's generation_config.json
    (the released models: temperature 0.7, top-p 0.8, top-k 20); greedy where it does not sample."""
    file = checkpoint / "generation_config.json"
    config = read_json(file) if file.exists() else {}
    if not config.get("do_sample", False):
        config = {"temperature": 0.0}
    args.temperature = config.get("temperature", 1.0) if args.temperature is None else args.temperature
    args.top_p = config.get("top_p") if args.top_p is None else args.top_p
    args.top_k = config.get("top_k") if args.top_k is None else args.top_k


def main(args):
    checkpoint = resolve_checkpoint(args.model)  # one download or cache lookup, shared by all below
    sampling_defaults(args, checkpoint)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}, but this torch sees no CUDA device")
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    tokenizer = load_tokenizer(checkpoint)
    content = [{"type": "image", "image": path} for path in args.image] + [{"type": "text", "text": args.prompt}]
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = system + [{"role": "user", "content": content}]
    input_ids, pixel_values, image_grid_thw = encode_chat(tokenizer, messages)  # images are read here
    model = load_model(checkpoint, args.device, dtype, pvm=args.pvm)
    stream, times = DecodeStream(skip_special_tokens=True), [time.perf_counter()]
    for token in generate(model, input_ids, pixel_values, image_grid_thw, args.max_new_tokens, args.temperature,
                          args.top_k, args.top_p, args.seed, compile=args.compile):
        times.append(time.perf_counter())
        text = stream.step(tokenizer, token)  # None while a UTF-8 character is still incomplete
        print(text or "", end="", flush=True)
    print()
    # the first token comes out of the prefill, every later one out of a decoding step
    prefill, n = (times[1] - times[0] if len(times) > 1 else 0.0), max(len(times) - 2, 0)
    rate = n / (times[-1] - times[1]) if n else 0.0
    print(f"prompt {input_ids.size(1)} tokens | prefill {prefill * 1000:.0f} ms | "
          f"decode {n} tokens at {rate:.1f} tokens/s", file=sys.stderr)


def cli(argv=None):
    """The command; returns its exit status: 2, after one line on stderr, for bad input."""
    try:
        main(parse_args(argv))
    except (ValueError, OSError) as e:  # what the loaders raise for files, images and options
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(cli())
