"""
What the model does with the image while generate.py decodes, measured from inside the forward
passes by hooks: for one answer by `generate.py --report FILE.png`, pooled over every answer to a
benchmark by `eval.py --analysis`.

    AttentionReport    records, at every generated token and in every decoder layer, the attention
                       that the choosing query puts on the image, |PVM| / |FFN| at PVM layers,
                       and the layer's output there, which the logit lens reads
    convergence_layer  the first layer from which the lens keeps the chosen token on top
    check_report       refuses a --report that could not be written, before the model loads
    report_figure      draws one answer's numbers; write_report saves the figure and the JSON
                       (FILE.png and FILE.json: new files only, never over an existing one)
    analysis_record    one answer's numbers in short; analysis_buckets pools many by position,
                       analysis_figure draws them

The paper's two claims beyond accuracy: PVM resists the length-induced decay of the visual signal
(the image's share of self-attention thins as the answer grows: dilution), and it makes the next
token settle in earlier layers (prediction convergence, read with the logit lens).
"""
import json
import os
import tempfile
from functools import partial
from math import nan
from pathlib import Path

import torch
import torch.nn.functional as F


class AttentionReport:
    """Watches generate() from a `with` block: at the query that chose each token (the prompt's last
    position, then each token fed back) and in every decoder layer, each head's attention mass on
    the image's tokens and on the text (they sum to 1), |PVM(a)| / |FFN(a)| at PVM layers, and the
    layer's output. SDPA never returns its weights, so hooks recompute them; without a report
    there are no hooks and no cost. Hooks run only when the step runs eagerly: use
    generate(..., cuda_graph=False). One prompt at a time (input_ids (1, T))."""

    def __init__(self, model, input_ids):
        device = model.embed_tokens.weight.device
        self.is_image = (input_ids[0] == model.config.image_token_id).to(device)  # (T,)
        self.norm, self.head = model.norm, model.lm_head  # what the logit lens applies
        self.mass = [[] for _ in model.layers]  # per layer, per step: (nh, 2) on image, on text
        self.output = [[] for _ in model.layers]  # per layer, per step: (D,) at the query
        self.pvm = {}  # per PVM layer: per step |PVM| / |FFN|
        self.ffn = {}  # per PVM layer: this step's |FFN|, which the PVM hook divides by
        self.hooks = [layer.self_attn.register_forward_hook(self.attention_mass)
                      for layer in model.layers]
        for i, layer in enumerate(model.layers):
            self.hooks.append(layer.register_forward_hook(partial(self.layer_output, i)))
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

    def layer_output(self, i, layer, args, out):
        # The layer's own output, as transformers' output_hidden_states records it; DeepStack
        # adds to it afterwards, but only at image positions, never at a choosing query (text).
        # A copy: a view would keep the prefill's whole (1, T, D) output alive.
        self.output[i].append(out[0, -1].clone())

    def ffn_size(self, i, mlp, args, out):
        # the FFN runs before the PVM branch (model.DecoderLayer), so this is the step's own
        self.ffn[i] = out[0, -1].float().norm()

    def pvm_size(self, i, block, args, out):
        self.pvm[i].append(out[0, -1].float().norm() / self.ffn[i])

    @torch.inference_mode()
    def logit_lens(self, tokens):
        """The final norm and the output head applied to every layer's output at the query that
        chose each token -> under each layer's lens, the chosen token's probability, its rank
        (1: the likeliest) and the lens's top-1: three (N, layers) tensors. At the last layer
        the lens is the model's own next-token distribution."""
        h = torch.stack([torch.stack(steps) for steps in self.output], dim=1)    # (N, layers, D)
        N, layers, _ = h.shape
        rows = h.flatten(0, 1)                                                  # (N * layers, D)
        token = torch.tensor(tokens, device=h.device).repeat_interleave(layers)  # (N * layers,)
        # rows at a time: one pass over the head's weights serves many, and the logits of
        # all N * layers rows (N * layers, V) may not fit; 2^24 floats are 64 MiB
        step, prob, rank, top1 = max(1, 2**24 // self.head.out_features), [], [], []
        for start in range(0, len(rows), step):
            logits = self.head(self.norm(rows[start:start + step])).float()     # (step, V)
            chosen = logits.gather(1, token[start:start + step, None])          # (step, 1)
            prob.append((chosen - logits.logsumexp(-1, keepdim=True)).exp()[:, 0])
            rank.append((logits > chosen).sum(-1) + 1)
            top1.append(logits.argmax(-1))
        return [torch.cat(x).view(N, layers) for x in (prob, rank, top1)]

    def summary(self, tokens):
        """The raw numbers of report.json; the lists are indexed [generated token][layer]."""
        # each layer's steps (N, nh, 2): the image's mass, mean over heads (N,); layers side by side
        share = torch.stack([torch.stack(steps)[..., 0].mean(-1) for steps in self.mass], dim=1)
        ratios = [torch.stack(steps) for steps in self.pvm.values()]            # P x (N,)
        prob, rank, top1 = self.logit_lens(tokens)                              # (N, layers)
        return {
            "prompt_tokens": len(self.is_image),
            "image_tokens": int(self.is_image.sum()),
            "tokens": tokens,
            "image_share": share.tolist(),                                      # (N, layers)
            "pvm_layers": list(self.pvm),
            "pvm_ratio": torch.stack(ratios, dim=1).tolist() if ratios else [],  # (N, P)
            "lens_prob": prob.tolist(),                                         # (N, layers)
            "lens_rank": rank.tolist(),                                         # (N, layers)
            "convergence_layer": [convergence_layer(t, c) for t, c in zip(top1.tolist(), tokens)],
        }


def convergence_layer(top1, chosen):
    """The first layer from which the lens's top-1 (one per layer) is the chosen token at every
    later layer; None when not even the last layer's is (a sampled token the model ranked lower)."""
    layer = len(top1)
    while layer > 0 and top1[layer - 1] == chosen:
        layer -= 1
    return layer if layer < len(top1) else None


def check_report(path, compile):
    """Refuse a --report that could not be written before the model loads, not after the answer.
    A report writes only new files: FILE.json may be a checkpoint's config.json or tokenizer.json,
    FILE.png a photo, and an earlier report is the user's too."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase  # optional: only the report needs it
    except ImportError:
        raise ValueError("--report needs matplotlib (pip install matplotlib)") from None
    if Path(path).suffix[1:] not in FigureCanvasBase.get_supported_filetypes():
        raise ValueError(f"--report {path}: needs a figure suffix such as .png")
    if not Path(path).parent.is_dir():
        raise ValueError(f"--report {path}: needs an existing directory")
    for file in (Path(path), Path(path).with_suffix(".json")):
        if os.path.lexists(file):  # a dangling symlink too: writing would follow it
            raise ValueError(f"--report {path}: {file} exists, and a report writes only new files")
    try:  # a folder closed by its permissions or a read-only disk: said now, not after the answer
        tempfile.TemporaryFile(dir=Path(path).parent).close()
    except OSError as e:
        raise ValueError(f"--report {path}: cannot write in its folder: {e.strerror}") from None
    if compile:  # compiled code does not call the hooks
        raise ValueError("--report and --compile do not go together: "
                         "the report's hooks must run in Python at every step")


def layer_groups(layers):
    """The decoder in thirds, by name ("early: layers 0-11", ...) -> their layer ids; a decoder of
    fewer than 3 layers has fewer thirds."""
    groups = {}
    for name, group in zip(("early", "middle", "late"), torch.arange(layers).tensor_split(3)):
        if len(group):
            span = f"layer {group[0]}" if len(group) == 1 else f"layers {group[0]}-{group[-1]}"
            groups[f"{name}: {span}"] = group
    return groups


def floats(values):
    """A tensor of JSON's numbers, None (no convergence layer, no share) as NaN."""
    return torch.tensor([nan if v is None else v for v in values], dtype=torch.float64)


def bucket_means(position, values):
    """values (n, k) averaged within log-spaced buckets of the generated position (n,): 1, 2-3,
    4-7, 8-15, ..., NaN left out -> per bucket: its first and last position (b, 2), the mean
    position (b,), its tokens (b,), the means (b, k) and how many values were not NaN (b, k)."""
    bucket = position.double().log2().floor()                                     # (n,)
    rows = [bucket == b for b in bucket.unique()]
    return (torch.stack([torch.stack([position[r].min(), position[r].max()]) for r in rows]),
            torch.stack([position[r].double().mean() for r in rows]),
            torch.stack([r.sum() for r in rows]),
            torch.stack([values[r].nanmean(0) for r in rows]),
            torch.stack([values[r].isfinite().sum(0) for r in rows]))


def plot_shares(ax, x, shares, dilution):
    for name, share in shares.items():
        ax.plot(x, share, label=name)
    ax.plot(x, dilution, "k--", label="1 / length, from the first token")
    ax.set(ylabel="attention share on the image")
    ax.legend()


def position_axis(ax):
    """The generated position on a log scale, ticked at 1, 2, 4, 8, ... in plain numbers (base 2
    has no minor ticks; base 10 labels them 2x10^0, 3x10^0). Shared axes follow."""
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter("{x:g}")
    ax.set_xlabel("generated position (log scale)")


def plot_convergence(ax, x, mean, pvm_layers, layers):
    """The mean convergence layer of each position bucket, the PVM layers marked."""
    ax.plot(x, mean, "o-", label="mean over positions 1, 2-3, 4-7, ...")
    for i in pvm_layers:
        ax.axhline(i, color="tab:red", linestyle=":", label=f"PVM at layer {i}")
    ax.set(ylabel="convergence layer (logit lens)", ylim=(-0.5, layers - 0.5))
    ax.yaxis.get_major_locator().set_params(integer=True)  # layers are whole numbers
    ax.legend()


def report_figure(numbers):
    """The image's share of attention against the generated position, one line per third of the
    decoder, with the 1/length trend of dilution; the PVM branch's size where attached; and the
    layer from which the logit lens settles on each chosen token."""
    from matplotlib.figure import Figure  # without pyplot: no window, no global state

    share = torch.tensor(numbers["image_share"])        # (N, layers)
    pvm = torch.tensor(numbers["pvm_ratio"])            # (N, P), or (0,) without PVM
    x = torch.arange(1, len(share) + 1)                 # generated position of the chosen token
    keys = numbers["prompt_tokens"] + x - 1             # how many keys its query attends to
    fig = Figure(figsize=(7, 9.5 if len(pvm) else 7), layout="constrained")
    axes = fig.subplots(3 if len(pvm) else 2, 1, sharex=True)
    top = axes[0]
    if numbers["image_tokens"]:
        shares = {name: share[:, g].mean(1) for name, g in layer_groups(share.size(1)).items()}
        plot_shares(top, x, shares, share[0].mean() * keys[0] / keys)  # the first token, thinned
        top.set_title(f"{numbers['image_tokens']} image tokens in a prompt of "
                      f"{numbers['prompt_tokens']}, mean over heads")
    else:  # every share is 0: say why rather than draw flat lines
        top.text(0.5, 0.5, "no image in the prompt", transform=top.transAxes,
                 ha="center", va="center")
        top.set(ylabel="attention share on the image",
                title=f"no image in the prompt of {numbers['prompt_tokens']} tokens")
    top.set_ylim(0, None)  # once the lines are drawn: the top then fits them
    if len(pvm):
        for j, layer in enumerate(numbers["pvm_layers"]):
            axes[1].plot(x, pvm[:, j], label=f"PVM at layer {layer}")
        # once every line is drawn: fixed any earlier, the limits would fit the first line alone
        axes[1].set(ylabel="|PVM| / |FFN| at the new token", ylim=(0, None))
        axes[1].legend()
    layer = floats(numbers["convergence_layer"])                                  # (N,)
    axes[-1].plot(x, layer, ".", color="0.7", label="each token")
    _, centre, _, mean, _ = bucket_means(x, layer[:, None])
    plot_convergence(axes[-1], centre, mean[:, 0], numbers["pvm_layers"], share.size(1))
    never = numbers["convergence_layer"].count(None)  # sampled below the last layer's top-1
    title = "logit lens: the chosen token is the top-1 from this layer on"
    if never:
        title += f"\n(no layer for {never} of {len(x)}: sampled below the last layer's top-1)"
    axes[-1].set_title(title)
    position_axis(axes[-1])
    return fig


def write_report(numbers, path):
    """The numbers to FILE.json, their figure to FILE (its suffix says the format): new files, as
    check_report made sure before the model loaded."""
    Path(path).with_suffix(".json").write_text(json.dumps(numbers) + "\n")
    report_figure(numbers).savefig(path, dpi=120)


def number(x):
    """A float for JSON, NaN (a bucket without such tokens) as null."""
    return None if x != x else x


def analysis_record(numbers):
    """One answer's report in short, for eval.py --analysis: the image share of each third of the
    decoder (N, thirds), what its 1/length reference needs, and the convergence layers (N,)."""
    share = torch.tensor(numbers["image_share"])                                  # (N, layers)
    thirds = layer_groups(share.size(1)).values()
    return {"prompt_tokens": numbers["prompt_tokens"], "image_tokens": numbers["image_tokens"],
            "first_share": share[0].mean().item(),
            "image_share": torch.stack([share[:, g].mean(1) for g in thirds], 1).tolist(),
            "convergence_layer": numbers["convergence_layer"]}


def analysis_buckets(records, groups):
    """Many answers' records pooled by generated position, in bucket_means' buckets: the mean image
    share of each third and its 1/length reference, over the answers with an image; the mean
    convergence layer, over the tokens that have one."""
    position, values = [], []
    for r in records:
        n = torch.arange(1, len(r["convergence_layer"]) + 1)                     # (N,)
        share = torch.tensor(r["image_share"], dtype=torch.float64)               # (N, thirds)
        keys = r["prompt_tokens"] + n - 1  # the keys that the query of position n attends to
        dilution = r["first_share"] * keys[0] / keys.double()                     # (N,)
        if not r["image_tokens"]:  # shares of 0 say nothing of dilution: left out
            share, dilution = share.fill_(nan), dilution.fill_(nan)
        position.append(n)
        layer = floats(r["convergence_layer"])
        values.append(torch.cat([share, dilution[:, None], layer[:, None]], 1))  # (N, thirds + 2)
    span, centre, tokens, mean, count = bucket_means(torch.cat(position), torch.cat(values))
    return [{"positions": s.tolist(), "mean_position": c.item(), "tokens": t.item(),
             "image_share": {g: number(v) for g, v in zip(groups, m[:-2].tolist())},
             "dilution": number(m[-2].item()), "tokens_with_image": k[-2].item(),
             "convergence_layer": number(m[-1].item()), "converged": k[-1].item()}
            for s, c, t, m, k in zip(span, centre, tokens, mean, count)]


def analysis_figure(analysis):
    """eval.py --analysis's numbers drawn, a column per model: the image share (top) and the
    convergence layer (bottom), each the mean within log-spaced buckets of the position."""
    from matplotlib.figure import Figure

    models = analysis["models"]
    fig = Figure(figsize=(1 + 5 * len(models), 7), layout="constrained")
    axes = fig.subplots(2, len(models), sharex=True, sharey="row", squeeze=False)
    for (name, result), (top, bottom) in zip(models.items(), axes.T):
        buckets = result["buckets"]
        x = [b["mean_position"] for b in buckets]
        shares = {g: floats([b["image_share"][g] for b in buckets]) for g in analysis["groups"]}
        plot_shares(top, x, shares, floats([b["dilution"] for b in buckets]))
        top.set_title(f"{name}: {result['answers']} answers, {result['with_image']} with an image")
        layer = floats([b["convergence_layer"] for b in buckets])
        plot_convergence(bottom, x, layer, analysis["pvm_layers"] if name != "base" else [],
                         analysis["layers"])
        for b, x_b, y_b in zip(buckets, x, layer.nan_to_num(-0.4)):  # few tokens: a weak mean
            bottom.annotate(b["tokens"], (x_b, y_b), xytext=(0, 6), textcoords="offset points",
                            ha="center", fontsize=8)
        bottom.set_title("numbers: the tokens in each bucket")
        position_axis(bottom)
    axes[0, 0].set_ylim(0, None)  # once every column is drawn: the row's range fits them all
    return fig
