"""
Persistent Visual Memory (PVM, arXiv 2605.00814): a small cross-attention branch beside the FFN of
a few decoder layers that keeps the model looking at the image however long the answer grows.

The image's tokens sit once at the start of the context and every generated token adds a term
to each self-attention softmax, so their share of attention decays roughly like 1/length. PVM's
softmax runs over the visual tokens ONLY, never over the text history, so what it reads from the
image does not thin out:

    h = a + FFN(RMSNorm(a)) + PVM(a, V)

with a the residual stream after self-attention and V the image embeddings as they entered the
decoder.

Shape legend: B batch, T text positions, Nv visual tokens (padded), D model width, d latent
width, nq / nkv latent query / key-value heads, hd head width.
"""
import re

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from model import MLP, RMSNorm


class CrossAttention(nn.Module):
    """Text queries attend to visual keys in the latent space: no RoPE, no causal mask."""

    def __init__(self, d, hd, n_kv):
        super().__init__()
        self.hd = hd
        self.q_proj = nn.Linear(d, d, bias=False)  # d // hd query heads
        self.k_proj = nn.Linear(d, n_kv * hd, bias=False)
        self.v_proj = nn.Linear(d, n_kv * hd, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.q_norm, self.k_norm = RMSNorm(hd), RMSNorm(hd)  # per head, as the backbone's attention

    def forward(self, text, bank, bank_mask):
        """text (B, T, d) attends to the visual bank (B, Nv, d), bank_mask (B, Nv) -> (B, T, d)."""
        (B, T, d), Nv = text.shape, bank.size(1)
        q = self.q_norm(self.q_proj(text).view(B, T, -1, self.hd)).transpose(1, 2)  # (B,nq,T,hd)
        k = self.k_norm(self.k_proj(bank).view(B, Nv, -1, self.hd)).transpose(1, 2)
        v = self.v_proj(bank).view(B, Nv, -1, self.hd).transpose(1, 2)    # (B, nkv, Nv, hd)
        k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)            # (B, nq, Nv, hd)
        v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)            # (B, nq, Nv, hd)
        scores = (q @ k.transpose(-1, -2)).float() * self.hd**-0.5        # (B, nq, T, Nv)
        scores = scores.masked_fill(~bank_mask[:, None, None, :], torch.finfo(torch.float32).min)
        attn = scores.softmax(dim=-1).to(v.dtype)  # over the visual tokens alone: no length in it
        out = (attn @ v).transpose(1, 2).reshape(B, T, d)                            # (B, T, d)
        return self.o_proj(out)


class PVMBlock(nn.Module):
    def __init__(self, config, d):
        super().__init__()
        D, hd = config.hidden_size, config.head_dim
        n_kv = max(1, (d // hd) // (config.num_heads // config.num_kv_heads))  # backbone's GQA
        self.text_reducer = nn.Linear(D, d, bias=False)
        self.vision_reducer = nn.Linear(D, d, bias=False)
        self.input_norm = RMSNorm(d, config.rms_norm_eps)
        self.cross_attn = CrossAttention(d, hd, n_kv)
        self.post_attn_norm = RMSNorm(d, config.rms_norm_eps)
        self.mlp = MLP(d, int(d * config.intermediate_size / D))
        self.output_expander = nn.Linear(d, D, bias=False)
        self.gate_alpha = nn.Parameter(torch.zeros(1))
        self.eps = config.rms_norm_eps
        # gate 0: at step 0 the model is exactly the base model. The expander must NOT also be 0:
        # then out = 0 * N(0) and both gradients vanish, so the branch would never train.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, a, bank, bank_mask, is_image):
        """a (B, T, D), bank (B, Nv, D), bank_mask (B, Nv), is_image (B, T) -> (B, T, D)"""
        if bank.size(1) == 0:  # no image anywhere in the batch: PVM adds nothing
            return torch.zeros_like(a)
        t = self.input_norm(self.text_reducer(a))                                 # (B, T, d)
        m = self.cross_attn(t, self.vision_reducer(bank), bank_mask)              # (B, T, d)
        m = m + self.mlp(self.post_attn_norm(m))
        out = F.rms_norm(self.output_expander(m), (a.size(-1),), eps=self.eps)  # (B, T, D)
        out = self.gate_alpha * out
        # silence the image's own positions and samples without an image (a bank of padding)
        keep = ~is_image & bank_mask.any(dim=1, keepdim=True)                     # (B, T)
        return out * keep[..., None].to(out.dtype)


def attach_pvm(model, layers, d=512):
    """Give decoder `layers` a freshly initialised PVM block of latent width d (trainable)."""
    config = model.config
    if not set(layers) <= set(range(config.num_layers)) or d <= 0 or d % config.head_dim:
        raise ValueError(f"PVM needs layers within 0..{config.num_layers - 1} and a width that "
                         f"is a multiple of head_dim {config.head_dim}; got layers "
                         f"{list(layers)}, width {d}")
    for i in layers:
        # fresh, on the model's device and in its dtype
        model.layers[i].pvm_block = PVMBlock(config, d).to(model.embed_tokens.weight)
    config.pvm_layers, config.pvm_dim = tuple(sorted(layers)), d
    return model


def pvm_state_dict(model):
    """PVM weights under the reference code's names, so files move between both codebases."""
    return {f"model.language_model.layers.{i}.pvm_block.{name}": tensor
            for i, layer in enumerate(model.layers) if layer.pvm_block is not None
            for name, tensor in layer.pvm_block.state_dict().items()}


def save_pvm(model, path):
    """The PVM weights alone, as safetensors (common.save_checkpoint writes them atomically)."""
    save_file({k: v.detach().contiguous().cpu() for k, v in pvm_state_dict(model).items()}, path)


def load_pvm(model, path):
    """Attach and load PVM weights. The layers and the width come from the tensor names and
    shapes (the reference code's files carry no metadata); a file that does not fit the model,
    or a file safetensors refuses, raises ValueError naming the path."""
    try:
        tensors = load_file(path)
    except Exception as e:  # missing, truncated, not safetensors
        raise ValueError(f"cannot read PVM weights {path}: {e}") from None
    prefix = re.compile(r"model\.language_model\.layers\.(\d+)\.pvm_block\.")
    if not tensors or not all(map(prefix.match, tensors)):
        raise ValueError(f"{path} is not a file of PVM weights "
                         "(model.language_model.layers.N.pvm_block.*)")
    if not model.config.pvm_layers:  # the layers from the names, the width from a shape
        layers = {int(prefix.match(name).group(1)) for name in tensors}
        d = next((t.size(0) for n, t in tensors.items() if n.endswith("text_reducer.weight")), 0)
        attach_pvm(model, layers, d)
    blocks = nn.ModuleDict({str(i): model.layers[i].pvm_block for i in model.config.pvm_layers})
    try:  # strict: every name and every shape
        blocks.load_state_dict({prefix.sub(r"\1.", name): t for name, t in tensors.items()})
    except RuntimeError as e:  # torch's message lists each misfit, over several lines
        raise ValueError(f"{path} does not fit the model's PVM blocks: "
                         f"{' '.join(str(e).split())}") from None
    return model
