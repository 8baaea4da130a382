"""
Qwen3-VL in plain PyTorch: the config, the Qwen3 text decoder, and the assembled model.

    embed tokens -> vision tower -> image embeddings placed at <|image_pad|>
    -> 3-D rotary positions -> decoder layers (DeepStack added after layers 0..2,
    PVM beside the FFN where attached) -> final norm -> LM head

Mirrors transformers' `Qwen3VLForConditionalGeneration` (modeling_qwen3_vl.py). The model's
classes come first; the KV cache, the machinery of fast decoding, comes last. Left out on
purpose: video, MoE variants, attention-backend switches, output dataclasses.

Shape legend: B batch, T new tokens, S keys attended to (the prompt's, or the whole KV cache),
D model width, nh / nkv query / key-value heads, g = nh / nkv, hd head width, V vocabulary.
"""
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vision import MERGE, VisionTower, apply_rope


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
    eos_token_ids: tuple = (151645, 151643)  # <|im_end|>, <|endoftext|>: generation_config.json
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


def tiny_config():
    """A 4-layer model 64 wide with the official vocabulary and token ids: the tests, bench.py
    and `train.py --size tiny` use it. A forward pass takes milliseconds on a CPU."""
    return Config(hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4,
                  num_kv_heads=2, head_dim=32, mrope_section=(6, 5, 5),
                  max_position_embeddings=4096, tie_word_embeddings=False,
                  vision_hidden_size=64, vision_depth=4, vision_num_heads=4,
                  vision_intermediate_size=128, vision_deepstack_indexes=(1, 2, 3))


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight over the last axis. F.rms_norm (without the weight)
    computes in float32 and returns x's dtype, as the reference does; the weight multiplies
    after the cast back."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return self.weight * F.rms_norm(x, x.shape[-1:], eps=self.eps)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Attention(nn.Module):
    """Grouped-query self-attention with q/k norm and multimodal RoPE (Qwen3VLTextAttention)."""

    def __init__(self, config, layer_idx):
        super().__init__()
        D, hd = config.hidden_size, config.head_dim
        self.layer_idx, self.head_dim = layer_idx, hd
        self.q_proj = nn.Linear(D, config.num_heads * hd, bias=False)
        self.k_proj = nn.Linear(D, config.num_kv_heads * hd, bias=False)
        self.v_proj = nn.Linear(D, config.num_kv_heads * hd, bias=False)
        self.o_proj = nn.Linear(config.num_heads * hd, D, bias=False)
        self.q_norm = RMSNorm(hd, config.rms_norm_eps)  # each head normalised alone, before RoPE
        self.k_norm = RMSNorm(hd, config.rms_norm_eps)

    def qkv(self, x, cos, sin):
        """Queries (B, nh, T, hd), keys and values (B, nkv, T, hd) of x (B, T, D), RoPE applied.
        report.py calls it too, to recompute a step's query."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, -1, self.head_dim)                   # (B, T, nh, hd)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)                   # (B, T, nkv, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim)                   # (B, T, nkv, hd)
        q = apply_rope(self.q_norm(q), cos, sin)
        k = apply_rope(self.k_norm(k), cos, sin)
        return q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)     # (B, heads, T, hd)

    def forward(self, x, cos, sin, mask, cache):
        """x (B, T, D) -> (B, T, D). mask: None (causal over the T new keys) or additive
        (B, 1, g*T, S) as causal_mask makes it; cache: None or a KVCache, whose update returns
        the S keys and values to attend over."""
        B, T, _ = x.shape
        q, k, v = self.qkv(x, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)                      # (B, nkv, S, hd)
        if mask is None:  # a prompt without padding: plain causal attention
            y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)
        else:
            # the g query heads that share a key-value head attend as g*T rows of it, so the
            # keys and values are never copied g times; the mask's rows repeat to match
            q = q.reshape(B, k.size(1), -1, self.head_dim)                 # (B, nkv, g*T, hd)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)    # (B, nkv, g*T, hd)
        y = y.reshape(B, -1, T, self.head_dim)                             # (B, nh, T, hd)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))           # (B, T, D)


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
        if self.pvm_block is not None:  # a branch beside the FFN: h = a + FFN(a) + PVM(a, V)
            h = h + self.pvm_block(a, *pvm_inputs)
        return h


def rope_positions(input_ids, image_grid_thw, attention_mask, image_token_id):
    """3-D (t, h, w) rotary positions (3, B, T) of a prompt, and each sample's next position (B,).
    Mirrors the reference's get_rope_index: text counts up on all three axes; an image starting
    at p gets t = p, h = p + row, w = p + col over its merged grid; text after it resumes at
    p + max(rows, cols). Left padding is skipped: positions start at 0 on the first real token."""
    B, T = input_ids.shape
    positions = torch.zeros(3, B, T, dtype=torch.long)
    next_position = torch.zeros(B, dtype=torch.long)
    grids = iter([] if image_grid_thw is None else image_grid_thw.tolist())
    if attention_mask is None:
        attention_mask = torch.ones(B, T, dtype=torch.bool)
    real = attention_mask.bool().cpu()                                     # (B, T)
    for b in range(B):
        ids = input_ids[b].cpu()[real[b]].tolist()
        chunks, p, i = [], 0, 0
        while i < len(ids):
            if ids[i] == image_token_id:  # an image: its merged grid of h x w tokens
                _, h, w = next(grids)
                h, w = h // MERGE, w // MERGE
                rows = torch.arange(h).repeat_interleave(w)                # (h*w,) 0 0 0 1 1 1 ..
                cols = torch.arange(w).repeat(h)                           # (h*w,) 0 1 2 0 1 2 ..
                chunks.append(torch.stack([torch.zeros_like(rows), rows, cols]) + p)  # (3, h*w)
                i, p = i + h * w, p + max(h, w)
            else:  # text up to the next image: p, p+1, ... on all three axes
                end = next((j for j in range(i, len(ids)) if ids[j] == image_token_id), len(ids))
                chunks.append(torch.arange(p, p + end - i).expand(3, -1))  # (3, n)
                i, p = end, p + end - i
        pos = torch.cat(chunks, dim=1)                                     # (3, T_b)
        positions[:, b, real[b]] = pos
        next_position[b] = pos.max() + 1
    return positions.to(input_ids.device), next_position.to(input_ids.device)


def causal_mask(key_mask, query_slots, groups, dtype):
    """Additive mask (0: may attend, -inf: may not) for queries at `query_slots` (T,) over keys
    whose real ones `key_mask` (B, S) marks: causal, and never a padded or empty key. Its rows
    repeat for the `groups` query heads that share a key-value head (see Attention)."""
    key_slot = torch.arange(key_mask.size(1), device=key_mask.device)        # (S,)
    allowed = (key_slot <= query_slots[:, None]) & key_mask[:, None, :]      # (B, T, S)
    allowed = allowed | (key_slot == query_slots[:, None])  # a padding query sees itself: no NaN
    mask = torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device)
    mask = mask.masked_fill_(~allowed, float("-inf"))                         # (B, T, S)
    return mask.repeat(1, groups, 1)[:, None]                                 # (B, 1, g*T, S)


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
        self.gradient_checkpointing = False  # train.py: recompute decoder layers in backward
        self.rope_tables = {}  # device -> (axis of each frequency, inverse frequencies)

    def forward(self, input_ids, pixel_values=None, image_grid_thw=None, attention_mask=None,
                cache=None):
        """Logits (B, T, V) for the same tensors the reference processor returns."""
        hidden = self.hidden_states(input_ids, pixel_values, image_grid_thw, attention_mask, cache)
        return self.lm_head(hidden)

    def hidden_states(self, input_ids, pixel_values=None, image_grid_thw=None,
                      attention_mask=None, cache=None):
        """The final-normed hidden states (B, T, D); `cache` (a KVCache) is filled in place."""
        x = self.embed_tokens(input_ids)                                   # (B, T, D)
        is_image = input_ids == self.config.image_token_id                 # (B, T)
        deepstack = []  # vision features added after the first decoder layers
        if pixel_values is not None:
            image_embeds, deepstack = self.visual(pixel_values, image_grid_thw)  # (Nv, D), 3 x
            x = place_image(x, is_image, image_embeds)
        if cache is None or cache.is_empty():  # a whole prompt
            if pixel_values is None and bool(is_image.any()):
                raise ValueError("prompt holds <|image_pad|> tokens but no pixel_values were given")
            positions, next_position = rope_positions(input_ids, image_grid_thw, attention_mask,
                                                      self.config.image_token_id)
            mask = self.prompt_mask(attention_mask, x)
            if cache is not None:
                cache.start(x.size(1), attention_mask, next_position)
        else:  # tokens that follow the cached ones; a chat's later turn may bring images, laid
            # out as in a whole prompt from the next position on (None: text, counting up)
            layout = None if pixel_values is None else rope_positions(
                input_ids, image_grid_thw, None, self.config.image_token_id)
            positions, mask = cache.extend(input_ids.size(1), x.dtype, layout)
        cos, sin = self.rotary(positions, x.dtype)
        pvm_inputs = self.pvm_inputs(x, is_image, cache, pixel_values is not None)
        for i, layer in enumerate(self.layers):
            if self.gradient_checkpointing and self.training and x.requires_grad:
                # keep only the layer's input; its insides are recomputed during backward
                x = checkpoint(layer, x, cos, sin, mask, cache, pvm_inputs, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache, pvm_inputs)
            if i < len(deepstack):  # DeepStack: vision feature i is added after decoder layer i
                x = x.index_put((is_image,), deepstack[i].to(x.dtype), accumulate=True)
        return self.norm(x)

    def prompt_mask(self, attention_mask, x):
        """None where plain causal attention is exact (no padding), else causal_mask's."""
        if attention_mask is None or bool(attention_mask.all()):
            return None
        slots = torch.arange(x.size(1), device=x.device)
        groups = self.config.num_heads // self.config.num_kv_heads
        return causal_mask(attention_mask.bool(), slots, groups, x.dtype)

    def rotary(self, positions, dtype):
        """Interleaved multimodal RoPE: frequency pair j turns with the height position if
        j % 3 == 1 and j < 3*sections[1], the width position if j % 3 == 2 and j < 3*sections[2],
        else the temporal one. positions (3, B, T) -> cos, sin (B, T, 1, hd)."""
        device = positions.device
        if device not in self.rope_tables:  # constants, made once per device
            hd, (_, s_h, s_w) = self.config.head_dim, self.config.mrope_section
            axis = torch.zeros(hd // 2, dtype=torch.long)
            axis[1:3 * s_h:3] = 1
            axis[2:3 * s_w:3] = 2
            inv_freq = 1.0 / self.config.rope_theta ** (torch.arange(0, hd, 2).float() / hd)
            # both halves of a head turn with the same frequencies (see vision.apply_rope)
            self.rope_tables[device] = axis.repeat(2).to(device), inv_freq.repeat(2).to(device)
        axis, inv_freq = self.rope_tables[device]
        position = positions.index_select(0, axis).permute(1, 2, 0)        # (B, T, hd)
        angles = position.float() * inv_freq                               # (B, T, hd)
        return angles.cos().to(dtype)[:, :, None], angles.sin().to(dtype)[:, :, None]

    def pvm_inputs(self, x, is_image, cache, new_images):
        """What the PVM blocks read: the visual bank (B, Nv, D) with its mask (B, Nv), and which
        query positions are image tokens (B, T). The bank is the image embeddings as they enter
        the decoder, taken at the prompt and kept in the cache for every later step; a later
        chat turn's images join it (the bank has no order: PVM's attention has no positions)."""
        if not self.config.pvm_layers:  # set by pvm.attach_pvm
            return None
        if cache is not None and cache.pvm_bank is not None and not new_images:
            return (*cache.pvm_bank, is_image)
        per_sample = [x[b][is_image[b]] for b in range(x.size(0))]         # B x (Nv_b, D)
        bank = nn.utils.rnn.pad_sequence(per_sample, batch_first=True)     # (B, Nv, D)
        lengths = torch.tensor([len(s) for s in per_sample], device=x.device)
        bank_mask = torch.arange(bank.size(1), device=x.device) < lengths[:, None]  # (B, Nv)
        if cache is not None and cache.pvm_bank is not None:  # earlier turns' images first
            bank, bank_mask = (torch.cat(p, 1) for p in zip(cache.pvm_bank, (bank, bank_mask)))
        if cache is not None:
            cache.pvm_bank = (bank, bank_mask)
        return bank, bank_mask, is_image


def place_image(x, is_image, image_embeds):
    """The text embeddings x (B, T, D) with the image embeddings (Nv, D) in place of the
    <|image_pad|> tokens, in order. Their counts must agree."""
    if int(is_image.sum()) != len(image_embeds):
        raise ValueError(f"prompt holds {int(is_image.sum())} <|image_pad|> tokens but the "
                         f"images give {len(image_embeds)} visual tokens")
    return x.masked_scatter(is_image[..., None], image_embeds.to(x.dtype))


# -----------------------------------------------------------------------------
# the KV cache: the machinery that makes decoding fast

def bucket(n, most):
    """Cache slots for n tokens: the next power of two, so that a step attends over fewer than
    twice the keys it needs and a growing cache is copied log2(n) times; at least 8 (SDPA then
    takes the mask uncopied), at most `most`."""
    return min(max(8, 1 << (n - 1).bit_length()), most)


class KVCache:
    """Keys and values of every layer, up to `max_len` tokens, written in place into `capacity`
    slots (by default all of them at once) that `reserve` grows as an answer grows.
    `start` takes the prompt (slots 0..T-1, attended to alone); each later forward calls
    `extend`, which writes at slots counted on the device and attends over every slot under a
    mask of the real keys. While the capacity stays the same, decoding has fixed shapes and no
    Python-side state, so one CUDA graph or one torch.compile serves every step."""

    def __init__(self, config, batch_size, max_len, device, dtype, capacity=None):
        self.max_len = -(-max_len // 8) * 8  # whole rows of 8: SDPA then takes the mask uncopied
        self.capacity = bucket(capacity or max_len, self.max_len)
        shape = (config.num_layers, batch_size, config.num_kv_heads, self.capacity, config.head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)  # per-layer views
        self.key_mask = torch.zeros(batch_size, self.capacity, dtype=torch.bool, device=device)
        self.groups = config.num_heads // config.num_kv_heads
        self.length = 0              # tokens written, counted in Python (eager calls only)
        self.filled = None           # (1,) the same count on the device; None before the prompt
        self.slots = None            # (T,) the slots the current forward writes
        self.attended = None         # keys attended to: the prompt's, then every slot
        self.next_position = None    # (B,) rotary position of the next token
        self.pvm_bank = None         # (bank, bank_mask) of PVM, taken at the prompt

    def is_empty(self):
        return self.filled is None

    def start(self, T, attention_mask, next_position):
        """Take a prompt of T tokens: its keys go to slots 0..T-1, its real ones marked."""
        if T > self.capacity:
            raise ValueError(f"the KV cache holds {self.capacity} tokens, the prompt is {T}")
        self.key_mask[:, :T] = True if attention_mask is None else attention_mask.bool()
        self.slots = torch.arange(T, device=self.key_mask.device)
        self.filled = torch.tensor([T], device=self.key_mask.device)
        self.length, self.attended, self.next_position = T, T, next_position

    def extend(self, T, dtype, layout=None):
        """Make room for T new tokens: their slots, rotary positions (3, B, T) and additive mask
        (B, 1, g*T, capacity). Everything advances in place on the device, so that a recorded
        CUDA graph advances too on every replay. `layout`: rope_positions' (positions from 0,
        next position) for new tokens that hold images; without it, text counts up."""
        if not torch.compiler.is_compiling():  # a clear error where Python runs the step
            if self.length + T > self.capacity:
                grow = "" if self.capacity == self.max_len else "; reserve() makes room"
                raise ValueError(f"the KV cache holds {self.capacity} tokens; "
                                 f"{self.length + T} do not fit{grow}")
            self.length += T
        B, new = self.key_mask.size(0), torch.arange(T, device=self.key_mask.device)
        self.slots = self.filled + new                                       # (T,)
        self.key_mask.index_fill_(1, self.slots, True)
        relative, advance = layout or (new.expand(3, B, T), T)
        positions = self.next_position[:, None] + relative                   # (3, B, T)
        mask = causal_mask(self.key_mask, self.slots, self.groups, dtype)    # (B, 1, g*T, S)
        self.filled += T
        self.next_position += advance
        self.attended = self.capacity
        return positions, mask

    def update(self, layer, k, v):
        """Write this forward's keys and values (B, nkv, T, hd) at their slots; return the ones
        to attend over (B, nkv, S, hd): the prompt's alone, or every slot (masked)."""
        k_all, v_all = self.k_layers[layer], self.v_layers[layer]           # (B, nkv, cap, hd)
        k_all.index_copy_(2, self.slots, k)
        v_all.index_copy_(2, self.slots, v)
        return k_all[:, :, :self.attended], v_all[:, :, :self.attended]

    def reserve(self, length):
        """Make room for `length` tokens in all. Where they do not fit, move everything into
        bucket(length) slots: the steps that follow attend over fewer than twice the keys they
        need, and memory grows with the answer, not with its cap. The caller keeps the count in
        Python (reading `filled` would wait for the device); new tensors need a new CUDA graph."""
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise ValueError(f"the KV cache holds at most {self.max_len} tokens; "
                             f"{length} do not fit")
        extra = bucket(length, self.max_len) - self.capacity
        self.capacity += extra
        self.k_layers = self.v_layers = None  # the old views: then each old tensor goes once copied
        self.k = F.pad(self.k, (0, 0, 0, extra))                   # (L, B, nkv, capacity, hd)
        self.v = F.pad(self.v, (0, 0, 0, extra))                   # (L, B, nkv, capacity, hd)
        self.key_mask = F.pad(self.key_mask, (0, extra))           # (B, capacity): new slots empty
        self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)

    def repeat_rows(self, times):
        """Copy each row `times` times, in place of the prompt's one (row b becomes rows
        b*times .. b*times + times - 1): after a prefill of B prompts, several answers to each."""
        self.k = self.k.repeat_interleave(times, dim=1)            # (L, B*times, nkv, cap, hd)
        self.v = self.v.repeat_interleave(times, dim=1)            # (L, B*times, nkv, cap, hd)
        self.key_mask = self.key_mask.repeat_interleave(times, dim=0)          # (B*times, cap)
        self.next_position = self.next_position.repeat_interleave(times)       # (B*times,)
        if self.pvm_bank is not None:  # (B*times, Nv, D) and (B*times, Nv)
            self.pvm_bank = tuple(t.repeat_interleave(times, dim=0) for t in self.pvm_bank)
        self.k_layers, self.v_layers = self.k.unbind(0), self.v.unbind(0)
