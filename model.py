"""
Qwen3-VL in plain PyTorch: the config, the Qwen3 text decoder, and the assembled model.

    embed tokens -> vision tower -> image embeddings placed at <|image_pad|> -> 3-D rotary positions
    -> decoder layers (DeepStack added after layers 0..2, PVM beside the FFN where attached)
    -> final norm -> LM head

Mirrors transformers' `Qwen3VLForConditionalGeneration` (modeling_qwen3_vl.py). Left out on
purpose: video, MoE variants, attention-backend switches, output dataclasses.

Shape legend: B batch, T new tokens, S keys attended to (the prompt's, or the whole KV cache), D model width,
nh / nkv query / key-value heads, hd head width, V vocabulary.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vision import MERGE, VisionTower, rope


@dataclass
class Config:
    # text decoder (defaults: Qwen3-VL-4B-Instruct)
    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_layers: int = 36
    num_heads: int = 32
    num_kv_heads: int = 8
    head_dim: int = 128
    rms_norm_eps: float = 1e-6
    rope_theta: float = 5_000_000
    mrope_section: tuple = (24, 20, 20)  # frequency pairs given to (t, h, w), interleaved
    max_position_embeddings: int = 262144
    tie_word_embeddings: bool = True
    image_token_id: int = 151655
    # vision encoder
    vision_hidden_size: int = 1024
    vision_depth: int = 24
    vision_num_heads: int = 16
    vision_intermediate_size: int = 4096
    vision_num_position_embeddings: int = 2304
    vision_deepstack_indexes: tuple = (5, 11, 17)
    # Persistent Visual Memory (pvm.py): decoder layers that carry a PVM block, latent width
    pvm_layers: tuple = ()
    pvm_dim: int = 512


def rms_norm(x, eps):
    """x / sqrt(mean(x^2) + eps) over the last axis, computed in float32 and returned in x's dtype, as
    the reference does (F.rms_norm computes half-precision input in float32; on a GPU, in one kernel)."""
    return F.rms_norm(x, x.shape[-1:], eps=eps)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * rms_norm(x, self.eps)  # the weight multiplies after the cast back


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class KVCache:
    """Keys and values of every layer, allocated once for `max_len` tokens and written in place.
    The prefill fills slots 0..T-1. Every later forward writes at slots counted on the device and
    attends over the whole cache, `key_mask` hiding the empty and padded slots: decoding then has
    fixed shapes and no Python-side state, so one CUDA graph or one torch.compile serves every step.
    Size it for the whole generation: decoding does not check for room, since that would wait on the
    device every step (generate.py sizes it; an overflow is an out-of-bounds index error)."""

    def __init__(self, config, batch_size, max_len, device, dtype):
        max_len = -(-max_len // 8) * 8  # whole rows of 8: the fused attention kernel then takes the mask uncopied
        shape = (config.num_layers, batch_size, config.num_kv_heads, max_len, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)  # per-layer views, made once
        self.key_mask = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)  # True: a real key
        self.filled = None         # (1,) slots written so far, on the device; None until the prefill
        self.slots = None          # (T,) the slots the current forward writes
        self.next_position = None  # (B,) rotary position of the next token, set by the prefill
        self.pvm_bank = None       # (bank, bank_mask) of PVM, taken once at the prefill

    def update(self, layer, k, v):
        """Store this forward's keys and values (B, nkv, T, hd); return the ones to attend over."""
        k_all, v_all = self.k_layers[layer], self.v_layers[layer]                  # (B, nkv, max_len, hd)
        if self.filled is None:  # the prefill: slots 0..T-1, attended to alone
            T = k.size(2)
            k_all[:, :, :T], v_all[:, :, :T] = k, v
            return k_all[:, :, :T], v_all[:, :, :T]
        k_all.index_copy_(2, self.slots, k)
        v_all.index_copy_(2, self.slots, v)
        return k_all, v_all


class Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        D, hd = config.hidden_size, config.head_dim
        self.layer_idx, self.head_dim = layer_idx, hd
        self.heads = (config.num_heads, config.num_kv_heads, config.num_kv_heads)  # of q, k, v
        # q, k and v from one matrix: the checkpoint's q_proj, k_proj and v_proj stacked (load_qwen)
        self.qkv_proj = nn.Linear(D, sum(self.heads) * hd, bias=False)
        self.o_proj = nn.Linear(config.num_heads * hd, D, bias=False)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)  # per head, before RoPE
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def qkv(self, x, cos, sin):
        """Queries (B, nh, T, hd), keys and values (B, nkv, T, hd) of x (B, T, D), RoPE applied;
        also used by generate.py's attention report to recompute a step's query."""
        (B, T, _), (nh, nkv, _) = x.shape, self.heads
        qk, v = self.qkv_proj(x).view(B, T, -1, self.head_dim).split([nh + nkv, nkv], dim=2)  # (B, T, heads, hd)
        q, k = rms_norm(qk, self.q_norm.eps).split([nh, nkv], dim=2)  # q_norm and k_norm normalise each head
        q, k = q * self.q_norm.weight, k * self.k_norm.weight          # alone: one call for both, then the weights
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)                   # (B, heads, T, hd)

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                                   # (B, nkv, S, hd)
        if mask is None:  # plain causal attention over the prompt
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)  # (B, nh, T, hd)
        else:  # the g query heads that share a key-value head attend as g*T rows of it: no copy of the cache
            y = F.scaled_dot_product_attention(q.reshape(B, k.size(1), -1, self.head_dim), k, v, attn_mask=mask)
        return self.o_proj(y.reshape(B, -1, T, self.head_dim).transpose(1, 2).reshape(B, T, -1))


class DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config.hidden_size, config.intermediate_size)
        self.pvm_block = None  # set by pvm.attach_pvm

    def forward(self, x, cos, sin, mask, cache, pvm_inputs):
        a = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        h = a + self.mlp(self.post_attention_layernorm(a))
        if self.pvm_block is not None:  # a parallel branch beside the FFN: h = a + FFN(a) + PVM(a, V)
            h = h + self.pvm_block(a, *pvm_inputs)
        return h


def additive(mask, dtype):
    """A boolean attention mask (True: may attend) as the additive one SDPA adds to the scores."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))


def rope_positions(input_ids, image_grid_thw, attention_mask, image_token_id):
    """3-D (t, h, w) rotary positions (3, B, T) of a prompt, and each sample's next position (B,).
    Mirrors the reference's get_rope_index: text counts up on all three axes; an image starting at
    p gets t = p, h = p + row, w = p + col over its merged grid; text after it resumes at
    p + max(rows, cols). Left padding is skipped, so positions start at 0 on the first real token."""
    B, T = input_ids.shape
    positions = torch.zeros(3, B, T, dtype=torch.long)
    next_position = torch.zeros(B, dtype=torch.long)
    grids = iter([] if image_grid_thw is None else image_grid_thw.tolist())
    keep_mask = torch.ones(B, T, dtype=torch.bool) if attention_mask is None else attention_mask.bool().cpu()
    for b in range(B):
        ids = input_ids[b].cpu()[keep_mask[b]].tolist()
        chunks, p, i = [], 0, 0
        while i < len(ids):
            if ids[i] == image_token_id:
                _, h, w = next(grids)
                h, w = h // MERGE, w // MERGE
                rows, cols = torch.arange(h).repeat_interleave(w), torch.arange(w).repeat(h)
                chunks.append(torch.stack([torch.zeros_like(rows), rows, cols]) + p)    # (3, h*w)
                i, p = i + h * w, p + max(h, w)
            else:
                n = next((j for j in range(i, len(ids)) if ids[j] == image_token_id), len(ids)) - i
                chunks.append(torch.arange(p, p + n).expand(3, n))                      # (3, n)
                i, p = i + n, p + n
        pos = torch.cat(chunks, dim=1)                                                   # (3, T_b)
        positions[:, b, keep_mask[b]] = pos
        next_position[b] = pos.max() + 1
    return positions.to(input_ids.device), next_position.to(input_ids.device)


class Qwen3VL(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.visual = VisionTower(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:  # 4B: the output head is the embedding matrix
            self.lm_head.weight = self.embed_tokens.weight
        self.gradient_checkpointing = False  # train.py: recompute decoder layers in the backward pass
        self.rope_tables = {}  # device -> (axis of each frequency pair, inverse frequencies), see rotary

    def rotary(self, positions, dtype):
        """Interleaved multimodal RoPE: frequency pair j turns with the height position if
        j % 3 == 1 and j < 3*sections[1], the width position if j % 3 == 2 and j < 3*sections[2],
        else the temporal one. positions (3, B, T) -> cos, sin (B, T, 1, hd), sin's first half
        negated for rope()."""
        device = positions.device
        if device not in self.rope_tables:  # constants, made once per device (before any CUDA graph)
            hd, (_, s_h, s_w) = self.config.head_dim, self.config.mrope_section
            axis = torch.zeros(hd // 2, dtype=torch.long)
            axis[1:3 * s_h:3], axis[2:3 * s_w:3] = 1, 2
            inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float) / hd))
            sign = torch.cat([-torch.ones(hd // 2), torch.ones(hd // 2)])
            # both halves of a head turn with the same frequencies
            self.rope_tables[device] = axis.repeat(2).to(device), inv_freq.repeat(2).to(device), sign.to(device)
        axis, inv_freq, sign = self.rope_tables[device]
        angles = positions.index_select(0, axis).permute(1, 2, 0).float() * inv_freq     # (B, T, hd)
        return angles.cos().to(dtype)[:, :, None], (angles.sin() * sign).to(dtype)[:, :, None]

    def attention_mask(self, key_mask, query_slots, dtype):
        """Additive mask (0: may attend, -inf: may not) from the real keys (B, S) and the queries'
        slots (T,): causal, and no padded or empty key. (B, 1, g*T, S): the g query heads that share
        a key-value head attend as g*T rows of that head (Attention), so the T rows repeat g times."""
        k_pos = torch.arange(key_mask.size(1), device=key_mask.device)[None, :]
        q_pos = query_slots[:, None]
        mask = (k_pos <= q_pos) & key_mask[:, None, None, :]                               # (B, 1, T, S)
        mask = mask | (k_pos == q_pos)  # a padding query sees itself, so no row is empty (no NaN)
        return additive(mask, dtype).repeat(1, 1, self.config.num_heads // self.config.num_kv_heads, 1)

    def hidden_states(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None, cache=None):
        """The final-normed hidden states (B, T, D); `cache` (a KVCache) is filled in place."""
        B, T = input_ids.shape
        x = self.embed_tokens(input_ids)                                                  # (B, T, D)
        is_image = input_ids == self.config.image_token_id                               # (B, T)
        prefill = cache is None or cache.filled is None
        deepstack = []
        if prefill and pixel_values is None and bool(is_image.any()):
            raise ValueError("prompt holds <|image_pad|> tokens but no pixel_values were given")
        if pixel_values is not None:
            image_embeds, deepstack = self.visual(pixel_values, image_grid_thw)           # (Nv, D), 3 x (Nv, D)
            if int(is_image.sum()) != len(image_embeds):
                raise ValueError(f"prompt holds {int(is_image.sum())} <|image_pad|> tokens but the images "
                                 f"give {len(image_embeds)} visual tokens")
            x = x.masked_scatter(is_image[..., None], image_embeds.to(x.dtype))
        if prefill:
            positions, next_position = rope_positions(input_ids, image_grid_thw, attention_mask,
                                                      self.config.image_token_id)
            key_mask = torch.ones_like(is_image) if attention_mask is None else attention_mask.bool()
            # no mask where plain causal attention is exact: no padding
            slots = torch.arange(T, device=x.device)
            mask = None if bool(key_mask.all()) else self.attention_mask(key_mask, slots, x.dtype)
            if cache is not None:
                if T > cache.key_mask.size(1):
                    raise ValueError(f"the KV cache holds {cache.key_mask.size(1)} tokens, the prompt is {T}")
                cache.key_mask[:, :T], cache.next_position = key_mask, next_position
        else:  # a continuation: only tensor arithmetic on the device, fixed shapes (see KVCache)
            steps = torch.arange(T, device=x.device)
            cache.slots = cache.filled + steps                                            # (T,)
            cache.key_mask.index_fill_(1, cache.slots, True)
            positions = (cache.next_position[:, None] + steps).expand(3, B, T)
            # one new token may see every real key; several must also keep causal order among them.
            # Made additive here, once, rather than by SDPA in every layer.
            mask = (additive(cache.key_mask[:, None, None, :], x.dtype) if T == 1 else
                    self.attention_mask(cache.key_mask, cache.slots, x.dtype))           # (B, 1, 1 or g*T, max_len)
        cos, sin = self.rotary(positions, x.dtype)
        pvm_inputs = self.pvm_inputs(x, is_image, cache)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and x.requires_grad:
                # keep only the layer's input; its insides are recomputed during backward. Layers below
                # the first trainable one run without autograd anyway (x.requires_grad is False there).
                x = checkpoint(layer, x, cos, sin, mask, cache, pvm_inputs, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, pvm_inputs)
            if i < len(deepstack):  # DeepStack: vision feature k is added after decoder layer k
                x = x.index_put((is_image,), deepstack[i].to(x.dtype), accumulate=True)
        if cache is not None and prefill:
            cache.filled = torch.tensor([T], device=x.device)
        elif cache is not None:  # in place, so that a CUDA graph replays the advance too
            cache.filled += T
            cache.next_position += T
        return self.norm(x)

    def pvm_inputs(self, x, is_image, cache):
        """What the PVM blocks read: the visual bank (B, Nv, D) with its mask (B, Nv), and which
        query positions are image tokens (B, T). The bank is the image embeddings as they enter the
        decoder, taken once per prompt and kept in the cache for every decoding step."""
        if not self.config.pvm_layers:  # set by pvm.attach_pvm
            return None
        if cache is not None and cache.filled is not None:
            return (*cache.pvm_bank, is_image)
        per_sample = [x[b][is_image[b]] for b in range(x.size(0))]                        # B x (Nv_b, D)
        bank = nn.utils.rnn.pad_sequence(per_sample, batch_first=True)                    # (B, Nv, D)
        lengths = torch.tensor([len(s) for s in per_sample], device=x.device)
        bank_mask = torch.arange(bank.size(1), device=x.device)[None] < lengths[:, None]  # (B, Nv)
        if cache is not None:
            cache.pvm_bank = (bank, bank_mask)
        return bank, bank_mask, is_image

    def forward(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None, cache=None):
        """Logits (B, T, V) for the same tensors the reference processor returns."""
        return self.lm_head(self.hidden_states(input_ids, pixel_values, image_grid_thw, attention_mask, cache))
