"""
What the model does with the image while generate.py decodes, measured from inside the forward
passes by hooks and drawn by `generate.py --report FILE.png`:

    AttentionReport   records, at every generated token and in every decoder layer, the attention
                      that the choosing query puts on the image, and |PVM| / |FFN| at PVM layers
    check_report      refuses a --report that could not be written, before the model loads
    report_figure     draws the numbers; write_report saves the figure and the numbers (JSON)

It shows the problem PVM solves: the image's share of attention thinning as the answer grows.
The next analysis, prediction convergence (the logit lens: the next token read off each layer's
hidden state), will live here too.
"""
import json
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F


class AttentionReport:
    """Watches generate() from a `with` block: at the query that chose each token (the prompt's last
    position, then each token fed back) and in every decoder layer, each head's attention mass on
    the image's tokens and on the text (they sum to 1), and |PVM(a)| / |FFN(a)| at PVM layers.
    SDPA never returns its weights, so hooks recompute them; without a report there are no hooks
    and no cost. Hooks run only when the step runs eagerly: use generate(..., cuda_graph=False)."""

    def __init__(self, model, input_ids):
        device = model.embed_tokens.weight.device
        self.is_image = (input_ids[0] == model.config.image_token_id).to(device)  # (T,)
        self.mass = [[] for _ in model.layers]  # per layer, per step: (nh, 2) on image, on text
        self.pvm = {}  # per PVM layer: per step |PVM| / |FFN|
        self.ffn = {}  # per PVM layer: this step's |FFN|, which the PVM hook divides by
        self.hooks = [layer.self_attn.register_forward_hook(self.attention_mass)
                      for layer in model.layers]
        for i, layer in enumerate(model.layers):
            if layer.pvm_block is None:
                continue
            self.pvm[i] = []
            self.hooks.append(layer.mlp.register_forward_hook(partial(self.ffn_size, i)))
            self.hooks.append(layer.pvm_block.register_forward_hook(partial(self.pvm_size, i)))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for hook in self.hooks:
            hook.remove()

    def attention_mass(self, attn, args, out):
        """The softmax that SDPA took inside forward, written out for the step's last query."""
        x, cos, sin, mask, cache = args
        q = attn.qkv(x[:, -1:], cos[:, -1:], sin[:, -1:])[0].float()  # (1, nh, 1, hd)
        # the keys it saw: the prompt's at an unmasked prefill, else the whole cache under the mask
        S = x.size(1) if mask is None else mask.size(-1)
        k = cache.k_layers[attn.layer_idx][:, :, :S].float()            # (1, nkv, S, hd)
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)          # (1, nh, S, hd)
        scores = (q @ k.transpose(-1, -2)) * attn.head_dim**-0.5        # (1, nh, 1, S)
        if mask is not None:  # hides the empty cache slots; the last row is the last query's
            scores = scores + mask[:, :, -1:].float()                   # (1, 1, 1, S)
        weights = scores.softmax(dim=-1)[0, :, 0]                       # (nh, S)
        # the image's keys, then text: the rest of the prompt and every generated token
        on_image = F.pad(self.is_image, (0, S - len(self.is_image)))    # (S,)
        groups = torch.stack([on_image, ~on_image], dim=1).float()      # (S, 2)
        self.mass[attn.layer_idx].append(weights @ groups)              # (nh, 2)

    def ffn_size(self, i, mlp, args, out):
        # the FFN runs before the PVM branch (model.DecoderLayer), so this is the step's own
        self.ffn[i] = out[0, -1].float().norm()

    def pvm_size(self, i, block, args, out):
        self.pvm[i].append(out[0, -1].float().norm() / self.ffn[i])

    def summary(self, tokens):
        """The raw numbers of report.json; the lists are indexed [generated token][layer]."""
        # each layer's steps (N, nh, 2): the image's mass, mean over heads (N,); layers side by side
        share = torch.stack([torch.stack(steps)[..., 0].mean(-1) for steps in self.mass], dim=1)
        ratios = [torch.stack(steps) for steps in self.pvm.values()]            # P x (N,)
        return {
            "prompt_tokens": len(self.is_image),
            "image_tokens": int(self.is_image.sum()),
            "tokens": tokens,
            "image_share": share.tolist(),                                      # (N, layers)
            "pvm_layers": list(self.pvm),
            "pvm_ratio": torch.stack(ratios, dim=1).tolist() if ratios else [],  # (N, P)
        }


def check_report(path, compile):
    """Refuse a --report that could not be written before the model loads, not after the answer."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase  # optional: only the report needs it
    except ImportError:
        raise ValueError("--report needs matplotlib (pip install matplotlib)") from None
    if Path(path).suffix[1:] not in FigureCanvasBase.get_supported_filetypes():
        raise ValueError(f"--report {path}: needs a figure suffix such as .png")
    if not Path(path).parent.is_dir():
        raise ValueError(f"--report {path}: needs an existing directory")
    if compile:  # compiled code does not call the hooks
        raise ValueError("--report and --compile do not go together: "
                         "the report's hooks must run in Python at every step")


def report_figure(numbers):
    """The image's share of attention against the generated position, one line per third of the
    decoder, with the 1/length trend of dilution; below it the PVM branch's size where attached."""
    from matplotlib.figure import Figure  # without pyplot: no window, no global state

    share = torch.tensor(numbers["image_share"])        # (N, layers)
    pvm = torch.tensor(numbers["pvm_ratio"])            # (N, P), or (0,) without PVM
    x = torch.arange(1, len(share) + 1)                 # generated position of the chosen token
    keys = numbers["prompt_tokens"] + x - 1             # how many keys its query attends to
    fig = Figure(figsize=(7, 6.5 if len(pvm) else 4), layout="constrained")
    axes = fig.subplots(2 if len(pvm) else 1, 1, sharex=True, squeeze=False)[:, 0]
    top = axes[0]
    if numbers["image_tokens"]:
        thirds = torch.arange(share.size(1)).tensor_split(3)
        for name, group in zip(("early", "middle", "late"), thirds):
            if len(group) == 0:  # a decoder of fewer than 3 layers
                continue
            span = f"layer {group[0]}" if len(group) == 1 else f"layers {group[0]}-{group[-1]}"
            top.plot(x, share[:, group].mean(1), label=f"{name}: {span}")
        dilution = share[0].mean() * keys[0] / keys  # the first token's share, thinned by 1/length
        top.plot(x, dilution, "k--", label="1 / length, from the first token")
        top.legend()
        title = (f"{numbers['image_tokens']} image tokens in a prompt of "
                 f"{numbers['prompt_tokens']}, mean over heads")
    else:  # every share is 0: say why rather than draw flat lines
        top.text(0.5, 0.5, "no image in the prompt", transform=top.transAxes,
                 ha="center", va="center")
        title = f"no image in the prompt of {numbers['prompt_tokens']} tokens"
    top.set(ylabel="attention share on the image", xscale="log", ylim=(0, None), title=title)
    if len(pvm):
        for j, layer in enumerate(numbers["pvm_layers"]):
            axes[1].plot(x, pvm[:, j], label=f"PVM at layer {layer}")
        # once every line is drawn: fixed any earlier, the limits would fit the first line alone
        axes[1].set(ylabel="|PVM| / |FFN| at the new token", ylim=(0, None))
        axes[1].legend()
    axes[-1].set_xlabel("generated position (log scale)")
    axes[-1].xaxis.set_major_formatter("{x:g}")  # 1, 10, 100 rather than 10^0, 10^1, 10^2
    return fig


def write_report(numbers, path):
    """The numbers to FILE.json, their figure to FILE (its suffix says the format)."""
    Path(path).with_suffix(".json").write_text(json.dumps(numbers) + "\n")
    report_figure(numbers).savefig(path, dpi=120)
