"""
Describe images with Qwen3-VL: one prefill over the whole prompt (the vision tower runs once),
then one token at a time with the preallocated KV cache, the text streamed as it is chosen.

    python generate.py --image cat.jpg
    python generate.py --image a.jpg --image b.jpg --prompt "What differs?" --temperature 0
    python generate.py --image cat.jpg --report report.png      # also writes report.json

`generate(...)` is the loop on its own, a Python generator of token ids, for notebooks and
bench.py; `AttentionReport` watches it to show PVM's problem (the image's attention share thinning
as the answer grows); the rest of the file is the command line around them. Left out on purpose:
batches, beam search, repetition penalties, video.
"""
import argparse
import contextlib
import json
import random
import sys
import time
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
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
    """Logits (1, V) of the token after `token` (1, 1), whose keys and values join the cache.
    Fixed shapes and only device-side state (model.KVCache), so it can be compiled or recorded once."""
    return model.lm_head(model.hidden_states(token, cache=cache)[:, -1])


@torch.inference_mode()  # as no_grad, and lighter on each of the many small decoding ops
def generate(model, input_ids, pixel_values=None, image_grid_thw=None, max_new_tokens=256,
             temperature=0.0, top_k=None, top_p=None, seed=None, stop_tokens=STOP_TOKENS, compile=False,
             cuda_graph=True):
    """Yield each new token id (an int) as soon as it is chosen, for one prompt input_ids (1, T);
    stop after a stop token (which is yielded) or after max_new_tokens. `compile` runs the decoding
    step through torch.compile. On a CUDA device the step is recorded once as a CUDA graph and
    replayed for every later token (`cuda_graph`): one launch in place of the step's kernels (over
    a thousand for the 4B), whose one-by-one launching is what bounds the speed of a model at batch 1."""
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
    step = torch.compile(decode_step, fullgraph=True) if compile else decode_step  # one graph, compiled once
    graph, token_in, use_graph = None, None, cuda_graph and weight.device.type == "cuda"
    hidden = model.hidden_states(input_ids.to(weight.device), pixel_values, image_grid_thw, cache=cache)
    logits = model.lm_head(hidden[:, -1])                             # (1, V): only the last position matters
    for n in range(1, max_new_tokens + 1):
        token = sample(logits, temperature, top_k, top_p, generator)  # (1,)
        token_id = token.item()
        yield token_id
        if token_id in stop_tokens or n == max_new_tokens:  # no decoding step whose logits go unused
            return
        if graph is not None:  # the recorded step, on the new token; it refills `logits` in place
            token_in.copy_(token[:, None])
            graph.replay()
        elif n == 1 or not use_graph:
            logits = step(model, token[:, None], cache)  # the first step also warms up (or compiles)
        else:  # record the second step (recording runs nothing), then run it
            token_in, graph = token[:, None].clone(), torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                logits = step(model, token_in, cache)
            graph.replay()


class AttentionReport:
    """Watches generate() from a `with` block: at the query that chose each token (the prompt's last
    position, then each token fed back) and in every decoder layer, each head's attention mass on the
    image's tokens and on the text (they sum to 1), and |PVM(a)| / |FFN(a)| at PVM layers. SDPA never
    returns its weights, so hooks recompute them; without a report there are no hooks and no cost.
    Hooks run only when the step runs eagerly: use it with generate(..., cuda_graph=False)."""

    def __init__(self, model, input_ids):
        self.is_image = (input_ids[0] == model.config.image_token_id).to(model.embed_tokens.weight.device)  # (T,)
        self.mass = [[] for _ in model.layers]  # per layer, per step: (nh, 2) mass on the image, on the text
        self.pvm, self.ffn = {}, {}             # per PVM layer: per step |PVM| / |FFN|; this step's |FFN|
        self.hooks = [layer.self_attn.register_forward_hook(self.attention_mass) for layer in model.layers]
        for i, layer in enumerate(model.layers):
            if layer.pvm_block is not None:
                self.pvm[i] = []
                self.hooks += [layer.mlp.register_forward_hook(partial(self.ffn_size, i)),
                               layer.pvm_block.register_forward_hook(partial(self.pvm_size, i))]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()

    def attention_mass(self, attn, args, out):
        """The softmax that SDPA took inside forward, for the step's last query, written out."""
        x, cos, sin, mask, cache = args
        q = attn.qkv(x[:, -1:], cos[:, -1:], sin[:, -1:])[0].float()                  # (1, nh, 1, hd)
        S = x.size(1) if mask is None else mask.size(-1)  # the prompt, or the whole cache under the mask
        k = cache.k_layers[attn.layer_idx][:, :, :S].float()                        # (1, nkv, S, hd)
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)                      # (1, nh, S, hd)
        scores = (q @ k.transpose(-1, -2)) * attn.head_dim**-0.5                    # (1, nh, 1, S)
        if mask is not None:  # empty cache slots (the last query may see every written key)
            scores = scores + mask[:, :, -1:].float()
        on_image = F.pad(self.is_image, (0, S - len(self.is_image)))                # (S,): generated = text
        groups = torch.stack([on_image, ~on_image], dim=1).float()                  # (S, 2)
        self.mass[attn.layer_idx].append(scores.softmax(dim=-1)[0, :, 0] @ groups)  # (nh, 2)

    def ffn_size(self, i, mlp, args, out):  # the FFN runs before the PVM branch (model.DecoderLayer)
        self.ffn[i] = out[0, -1].float().norm()

    def pvm_size(self, i, block, args, out):
        self.pvm[i].append(out[0, -1].float().norm() / self.ffn[i])

    def summary(self, tokens):
        """The raw numbers of report.json; the lists are indexed [generated token][layer]."""
        share = torch.stack([torch.stack(per_step)[..., 0].mean(-1) for per_step in self.mass], dim=1)  # head mean
        ratio = torch.stack([torch.stack(r) for r in self.pvm.values()], dim=1).tolist() if self.pvm else []
        return {"prompt_tokens": len(self.is_image), "image_tokens": int(self.is_image.sum()), "tokens": tokens,
                "image_share": share.tolist(), "pvm_layers": list(self.pvm), "pvm_ratio": ratio}


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
    p.add_argument("--report", metavar="FILE.png",
                   help="record the image's share of attention at every token and layer; plot it to FILE.png "
                        "and write the numbers to FILE.json (needs matplotlib)")
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
    if args.report:
        check_report(args.report, args.compile)
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
    report = AttentionReport(model, input_ids) if args.report else contextlib.nullcontext()
    stream, times, tokens = DecodeStream(skip_special_tokens=True), [time.perf_counter()], []
    with report:
        for token in generate(model, input_ids, pixel_values, image_grid_thw, args.max_new_tokens,
                              args.temperature, args.top_k, args.top_p, args.seed, compile=args.compile,
                              cuda_graph=not args.report):  # the hooks run only where the step runs eagerly
            times.append(time.perf_counter())
            tokens.append(token)
            text = stream.step(tokenizer, token)  # None while a UTF-8 character is still incomplete
            print(text or "", end="", flush=True)
    print()
    if args.report:
        write_report(report.summary(tokens), args.report)
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


def check_report(path, compile):
    """Refuse a --report that could not be written before the model loads, not after the answer."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase  # optional: only the report needs it
    except ImportError:
        raise ValueError("--report needs matplotlib (pip install matplotlib)") from None
    if Path(path).suffix[1:] not in FigureCanvasBase.get_supported_filetypes() or not Path(path).parent.is_dir():
        raise ValueError(f"--report {path}: needs an existing directory and a figure suffix such as .png")
    if compile:
        raise ValueError("--report and --compile do not go together: the report's hooks must run in Python at every step")


def write_report(numbers, path):
    """The numbers to FILE.json; to FILE.png the image's share of attention against the generated
    position, one line per third of the decoder, with the 1/length trend of dilution, and below it
    the PVM branch's size where attached."""
    from matplotlib.figure import Figure

    Path(path).with_suffix(".json").write_text(json.dumps(numbers) + "\n")
    share, pvm = torch.tensor(numbers["image_share"]), torch.tensor(numbers["pvm_ratio"])  # (N, layers), (N, P)
    x = torch.arange(1, len(share) + 1)                          # generated position of the chosen token
    keys = numbers["prompt_tokens"] + x - 1                      # how many keys its query attends to
    fig = Figure(figsize=(7, 6.5 if len(pvm) else 4), layout="constrained")
    axes = fig.subplots(2 if len(pvm) else 1, 1, sharex=True, squeeze=False)[:, 0]
    for name, group in zip(("early", "middle", "late"), torch.arange(share.size(1)).tensor_split(3)):
        if len(group):
            span = f"layer {group[0]}" if len(group) == 1 else f"layers {group[0]}-{group[-1]}"
            axes[0].plot(x, share[:, group].mean(1), label=f"{name}: {span}")
    axes[0].plot(x, share[0].mean() * keys[0] / keys, "k--", label="1 / length, from the first token")
    axes[0].set(ylabel="attention share on the image", xscale="log", ylim=(0, None),
                title=f"{numbers['image_tokens']} image tokens in a prompt of {numbers['prompt_tokens']}, "
                      "mean over heads")
    for j, layer in enumerate(numbers["pvm_layers"]):
        axes[1].plot(x, pvm[:, j], label=f"PVM at layer {layer}")
        axes[1].set(ylabel="|PVM| / |FFN| at the new token", ylim=(0, None))
    for ax in axes:
        ax.legend()
    axes[-1].set_xlabel("generated position (log scale)")
    axes[-1].xaxis.set_major_formatter("{x:g}")  # 1, 10, 100 rather than 10^0, 10^1, 10^2
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(cli())
