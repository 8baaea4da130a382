"""
Describe images with Qwen3-VL: one prefill over the whole prompt (the vision
tower runs once), then one token at a time with a KV cache that grows with the
answer, the text streamed as it is chosen.

    python generate.py --image cat.jpg
    python generate.py --image a.jpg --image b.jpg --prompt "What differs?" --temperature 0
    python generate.py --image cat.jpg --report report.png      # also writes report.json

`decode` is the loop: sample, yield, stop, next logits. `generate(...)` runs it
for one prompt, a Python generator of token ids, for notebooks and bench.py;
`generate_batch(...)` answers a batch of prompts (processor.left_pad makes one),
several times each if asked (GRPO groups, pass@k): the decoding library that
eval.py and grpo.py use. Below the fold: the decoding step recorded as a CUDA
graph, and the command line (what --report draws is in report.py).

Left out on purpose: beam search, repetition penalties, video.
"""
import argparse
import contextlib
import random
import sys
import time
from functools import partial

import torch
from tokenizers.decoders import DecodeStream

import common
from load_qwen import load_model, read_json, resolve_checkpoint
from model import KVCache
from processor import encode_chat, load_tokenizer, user_turn
from pvm import load_pvm
from report import AttentionReport, check_report, write_report


def sample(logits, temperature=0.0, top_k=None, top_p=None, generator=None):
    """Next token ids (B,) from logits (B, V). Temperature 0 is greedy; otherwise sample from the
    softmax kept to the top_k likeliest tokens, then to the fewest whose mass reaches top_p
    (transformers' order: temperature, top-k, top-p)."""
    if not temperature:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if not top_k and (top_p is None or top_p >= 1.0):  # nothing filters: no sort needed
        return draw(logits.softmax(dim=-1), generator).squeeze(-1)
    # likeliest first, (B, k) or (B, V): the usual top-k of 20 sorts little
    values, indices = (torch.topk(logits, min(top_k, logits.size(-1))) if top_k else
                       logits.sort(dim=-1, descending=True))
    if top_p is not None and top_p < 1.0:
        probs = values.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs >= top_p  # the likelier tokens already reach top_p
        values = values.masked_fill(drop, float("-inf"))
    rank = draw(values.softmax(dim=-1), generator)  # (B, 1)
    return indices.gather(-1, rank).squeeze(-1)  # (B,)


def draw(probs, generator=None):
    """One index per row of probs (B, V), each drawn with its probability: a uniform number u
    per row, and the first index whose running sum reaches u. torch.multinomial draws the same
    law from a random number per entry: 20x slower over Qwen's 151,936 tokens on a CPU."""
    cdf = probs.cumsum(dim=-1)  # (B, V)
    # u in (0, total]: an index of probability 0 (its sum is the one before it) is never drawn
    u = (1 - torch.rand(len(probs), 1, device=probs.device, generator=generator)) * cdf[:, -1:]
    return torch.searchsorted(cdf, u)  # (B, 1)


@torch.inference_mode()  # as no_grad, and lighter on each of the many small decoding ops
def decode(model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None, *,
           max_new_tokens=256, temperature=0.0, top_k=None, top_p=None, seed=None,
           num_samples=1, stop_tokens=None, compile=False, cuda_graph=True, cache=None):
    """Yield the tokens (B*G,) chosen at each step for the prompts input_ids (B, T), left-padded
    as attention_mask (B, T) says, G = num_samples rows per prompt, until every row has chosen a
    stop token (by default the checkpoint's eos_token_id) or max_new_tokens have been chosen.
    `cache`: a KVCache to continue, a chat's earlier turns;
    input_ids are then the new turn's tokens alone,
    and every token yielded but the last joins the cache."""
    B, T = input_ids.shape
    if attention_mask is not None and not bool(attention_mask[:, -1].all()):
        raise ValueError("pad the prompts on the left: every row's last token must be real")
    T += 0 if cache is None else cache.length  # from here on: every turn's tokens
    if (room := model.config.max_position_embeddings - T) <= 0:  # the answer must fit too
        raise ValueError(f"the prompt is {T} tokens, over the model's context of {T + room}: "
                         "use smaller or fewer images, or a shorter prompt")
    max_new_tokens, device = min(max_new_tokens, room), model.embed_tokens.weight.device
    stops = torch.tensor(model.config.eos_token_ids if stop_tokens is None else stop_tokens,
                         dtype=torch.long, device=device)
    # a seed reproduces the sampled answers; without one, a fresh seed (not torch's global one)
    generator = torch.Generator(device).manual_seed(random.randrange(2**63) if seed is None
                                                    else seed)
    # room for the prompt and one token; reserve() below makes more as the answers grow
    cache = cache or KVCache(model.config, B, T + max_new_tokens, device,
                             model.embed_tokens.weight.dtype, capacity=T + 1)
    cache.reserve(T + 1)
    # compiled once, for every batch size and capacity: the sizes are symbols in the graph
    step = torch.compile(decode_step, fullgraph=True, dynamic=True) if compile else decode_step
    next_logits = partial(step, model, cache=cache)  # tokens (B*G, 1) -> logits (B*G, V)
    if cuda_graph and device.type == "cuda":  # the CPU path never records
        next_logits = CUDAGraphStep(next_logits, cache)
    to = lambda t: None if t is None else t.to(device)  # the inputs onto the model's device
    hidden = model.hidden_states(to(input_ids), to(pixel_values), to(image_grid_thw),
                                 to(attention_mask), cache)             # (B, T, D)
    logits = model.lm_head(hidden[:, -1])  # (B, V): the last position chooses, real in every row
    if num_samples > 1:  # G answers to each prompt from its one prefill: the cache's rows copied
        cache.repeat_rows(num_samples)
        logits = logits.repeat_interleave(num_samples, dim=0)            # (B*G, V)
    stopped = torch.zeros(len(logits), dtype=torch.bool, device=device)  # (B*G,)
    for n in range(1, max_new_tokens + 1):
        tokens = sample(logits, temperature, top_k, top_p, generator)   # (B*G,)
        yield tokens
        stopped |= torch.isin(tokens, stops)  # a stopped row decodes on, unread
        if n == max_new_tokens or bool(stopped.all()):  # no step whose logits go unused
            return
        cache.reserve(T + n)  # this step writes the n-th new token at slot T + n - 1
        logits = next_logits(tokens[:, None])  # (B*G, 1) in, (B*G, V) out


def generate(model, input_ids, pixel_values=None, image_grid_thw=None, **options):
    """Yield each new token id (an int) as soon as it is chosen, for one prompt input_ids (1, T);
    stop after a stop token (yielded) or after max_new_tokens. Options as decode's: `compile`
    runs the decoding step through torch.compile; on a CUDA device `cuda_graph` records it and
    replays it for every later token (CUDAGraphStep)."""
    for tokens in decode(model, input_ids, None, pixel_values, image_grid_thw, **options):
        yield tokens.item()  # waits for the device: the caller needs the id anyway


def generate_batch(model, input_ids, attention_mask=None, pixel_values=None, image_grid_thw=None,
                   **options):
    """Answers to B prompts input_ids (B, T) at once, left-padded as attention_mask (B, T) says
    (the reference processor's padding; the images of every row in order in pixel_values): a
    list of B * num_samples lists of token ids, each ending after its first stop token or at
    max_new_tokens; prompt 0's num_samples answers first, then prompt 1's. The answers to one
    prompt share its prefill, so the vision tower sees each image once. Options as decode's."""
    stops = options.get("stop_tokens") or model.config.eos_token_ids
    steps = list(decode(model, input_ids, attention_mask, pixel_values, image_grid_thw,
                        **options))
    if not steps:  # max_new_tokens=0
        return [[] for _ in range(len(input_ids) * options.get("num_samples", 1))]
    answers = []
    for row in torch.stack(steps, dim=1).tolist():                       # (B*G, n)
        end = next((i + 1 for i, token in enumerate(row) if token in stops), len(row))
        answers.append(row[:end])
    return answers


# -----------------------------------------------------------------------------
# the decoding step, and the same step recorded as a CUDA graph

def decode_step(model, tokens, cache):
    """Logits (B, V) of the tokens after `tokens` (B, 1), whose keys and values join the cache.
    Fixed shapes and only device-side state (model.KVCache): it can be compiled or recorded once
    for each size of the cache."""
    return model.lm_head(model.hidden_states(tokens, cache=cache)[:, -1])

class CUDAGraphStep:
    """A decoding step recorded as a CUDA graph and replayed: one launch in place of the step's
    kernels (over a thousand for the 4B), whose one-by-one launching is what bounds the speed of
    a model at small batches. PyTorch's recipe (torch.cuda.graph): warm up on a side stream,
    record into fixed input and output tensors, replay. A graph holds the addresses of the
    cache's tensors, so each capacity of the cache (KVCache.reserve) gets its own: its first step
    is the warm-up (and compiles, under torch.compile), its second records. A step writes the
    cache, so every call decodes one real token."""

    def __init__(self, step, cache):
        self.step, self.cache = step, cache  # tokens (B, 1) -> logits (B, V)
        self.capacity, self.graph = None, None

    def __call__(self, tokens):
        if self.cache.capacity != self.capacity:  # the first step, or the cache grew: warm up
            self.capacity, self.graph = self.cache.capacity, None  # the old graph is done with
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())  # after the prefill's or growth's writes
            with torch.cuda.stream(side):
                logits = self.step(tokens)
            torch.cuda.current_stream().wait_stream(side)
            return logits
        if self.graph is None:  # record, which runs nothing: the replay below decodes the token
            self.graph, self.tokens = torch.cuda.CUDAGraph(), tokens.clone()
            with torch.cuda.graph(self.graph):
                self.logits = self.step(self.tokens)
        else:
            self.tokens.copy_(tokens)
        self.graph.replay()  # reads self.tokens, refills self.logits in place
        return self.logits

# -----------------------------------------------------------------------------
# the command line

def parse_args(argv=None):
    p = argparse.ArgumentParser(description="Describe images with Qwen3-VL, answer to stdout.")
    p.add_argument("--model", default="Qwen/Qwen3-VL-4B-Instruct", help="checkpoint dir or hub id")
    p.add_argument("--image", action="append", default=[], help="image file; repeat for several")
    p.add_argument("--prompt", default="Describe this image.", help="what to ask about the images")
    p.add_argument("--system", help="system message (none by default, as the official template)")
    p.add_argument("--max-new-tokens", type=int, default=512, help="most tokens to generate")
    p.add_argument("--temperature", type=float, help="0: greedy (default: generation_config.json)")
    p.add_argument("--top-p", type=float, help="default: generation_config.json")
    p.add_argument("--top-k", type=int, help="default: generation_config.json")
    p.add_argument("--seed", type=int, help="makes sampling reproducible")
    p.add_argument("--device", default=common.DEVICE, help="cpu, cuda or cuda:N (default: cuda "
                   "where there is one)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="default: bfloat16 on CUDA, float32 otherwise")
    p.add_argument("--pvm", help="file of trained PVM weights to attach (see pvm.py)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the decoding step (the rate shown includes compiling)")
    p.add_argument("--report", metavar="FILE.png", help="the image's share of attention and the "
                   "logit lens at every token and layer to FILE.png, the numbers to FILE.json: "
                   "new files only, refused when either exists (needs matplotlib)")
    return common.check_options(p.parse_args(argv))


def sampling_defaults(args, checkpoint):
    """Options the command line leaves out come from the checkpoint's generation_config.json
    (the released models: temperature 0.7, top-p 0.8, top-k 20); greedy where it does not sample."""
    file = checkpoint / "generation_config.json"
    config = read_json(file) if file.exists() else {}
    if not config.get("do_sample", False):
        config = {"temperature": 0.0}
    for option, default in (("temperature", 1.0), ("top_p", None), ("top_k", None)):
        if getattr(args, option) is None:
            setattr(args, option, config.get(option, default))


def main(args):
    if args.report:
        check_report(args.report, args.compile)
    checkpoint = resolve_checkpoint(args.model)  # one download or cache lookup, shared below
    sampling_defaults(args, checkpoint)
    dtype = getattr(torch, args.dtype or ("bfloat16" if "cuda" in args.device else "float32"))
    tokenizer = load_tokenizer(checkpoint)
    system = [{"role": "system", "content": args.system}] if args.system else []
    messages = system + user_turn(args.image, args.prompt)
    input_ids, pixel_values, image_grid_thw = encode_chat(tokenizer, messages)  # reads the images
    model = load_model(checkpoint, args.device, dtype)
    if args.pvm:
        load_pvm(model, args.pvm)
    report = AttentionReport(model, input_ids) if args.report else contextlib.nullcontext()
    stream, times, tokens = DecodeStream(skip_special_tokens=True), [time.perf_counter()], []
    with report:  # its hooks run only where the step runs eagerly: no CUDA graph then
        for token in generate(model, input_ids, pixel_values, image_grid_thw,
                              max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                              compile=args.compile, cuda_graph=not args.report):
            times.append(time.perf_counter())
            tokens.append(token)
            text = stream.step(tokenizer, token)  # None while a UTF-8 character is incomplete
            print(text or "", end="", flush=True)
    print()
    if args.report:
        write_report(report.summary(tokens), args.report)
    # the first token comes out of the prefill, every later one (n) out of a decoding step
    n, prefill = len(tokens) - 1, times[1] - times[0]
    print(f"prompt {input_ids.size(1)} tokens | prefill {prefill * 1000:.0f} ms | decode {n} "
          f"tokens at {n / (times[-1] - times[1] or 1):.1f} tokens/s", file=sys.stderr)
    # no stop token and fewer tokens than asked: the context was full
    if len(tokens) < args.max_new_tokens and tokens[-1] not in model.config.eos_token_ids:
        context = model.config.max_position_embeddings
        print(f"note: the context ({context} tokens) cut the answer", file=sys.stderr)


cli = common.command(main, parse_args)

if __name__ == "__main__":
    sys.exit(cli())
