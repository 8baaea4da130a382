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
import os
import re
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save_file

from model import MLP, RMSNorm

PRESETS = {"4b": (5, 11, 17), "8b": (8, 16, 24)}  # decoder layers that carry a PVM block; d = 512


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
    layers_fit = layers and all(0 <= i < config.num_layers for i in layers)
    if d <= 0 or d % config.head_dim or not layers_fit:
        raise ValueError(f"PVM needs layers within 0..{config.num_layers - 1} and a width that is "
                         f"a multiple of head_dim {config.head_dim}; "
                         f"got layers {list(layers)}, width {d}")
    for i in layers:
        block = PVMBlock(config, d).to(model.embed_tokens.weight)  # the model's device and dtype
        model.layers[i].pvm_block = block
    config.pvm_layers, config.pvm_dim = tuple(sorted(layers)), d
    return model


def pvm_state_dict(model):
    """PVM weights under the reference code's names, so files move between both codebases."""
    return {f"model.language_model.layers.{i}.pvm_block.{name}": tensor
            for i, layer in enumerate(model.layers) if layer.pvm_block is not None
            for name, tensor in layer.pvm_block.state_dict().items()}


def write_atomic(path, write):
    """write(temporary file), then rename it to `path`: a crash or a full disk never leaves half a
    file there (the previous one stays whole), and a failed write removes its temporary file. The
    temporary name holds the process id, so that two processes never write into one file."""
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:  # Ctrl-C too
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception):  # torch and safetensors report a full disk in types of theirs
            raise OSError(f"cannot write {path}: {e}") from e
        raise


def save_pvm(model, path):
    """Write the PVM weights alone as safetensors, atomically; never a NaN or an infinity."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in pvm_state_dict(model).items()}
    for name, tensor in tensors.items():
        if not torch.isfinite(tensor).all():  # a diverged run: load_pvm would refuse the file
            raise ValueError(f"{name} holds NaN or infinite values: not written to {path}")
    write_atomic(path, lambda tmp: save_file(tensors, tmp))


def load_pvm(model, path):
    """Attach and load PVM weights. The layers and the width come from the tensor names and shapes
    (files of the reference code carry no metadata); a file that does not fit raises ValueError."""
    from load_qwen import open_safetensors  # here: load_qwen imports this module
    with open_safetensors(path, "PVM weights") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    found = [re.fullmatch(r"model\.language_model\.layers\.(\d+)\.pvm_block\..+", name)
             for name in tensors]
    if not found or None in found:
        raise ValueError(f"{path} is not a file of PVM weights "
                         "(model.language_model.layers.N.pvm_block.*)")
    layers = tuple(sorted({int(m.group(1)) for m in found}))
    d = next((t.shape[0] for name, t in tensors.items() if name.endswith("text_reducer.weight")), 0)
    if not model.config.pvm_layers:
        attach_pvm(model, layers, d)
    if (layers, d) != (model.config.pvm_layers, model.config.pvm_dim):
        raise ValueError(f"{path} holds PVM at layers {list(layers)} with width {d}; the model "
                         f"carries it at layers {list(model.config.pvm_layers)} "
                         f"with width {model.config.pvm_dim}")
    expected = pvm_state_dict(model)
    for name in sorted(expected.keys() | tensors.keys()):
        if name not in tensors or name not in expected:
            raise ValueError(f"{path}: {name} does not fit the model's PVM blocks of width {d}")
        if tensors[name].shape != expected[name].shape:
            raise ValueError(f"{path}: {name} does not fit the model's PVM blocks of width {d}")
        if not torch.isfinite(tensors[name]).all():  # a run that diverged
            raise ValueError(f"{path}: {name} holds NaN or infinite values")
    with torch.no_grad():
        for name, tensor in tensors.items():
            expected[name].copy_(tensor)
    return model
