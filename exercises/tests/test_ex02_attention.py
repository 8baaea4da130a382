"""Exercise 2: rotary embedding and grouped-query attention with q/k norm (vision.rotate_half,
vision.apply_rope, model.Attention.qkv, model.Attention.forward), against transformers'
Qwen3VLTextAttention and Qwen3VLTextDecoderLayer holding the same random weights. The rotary
tables and the masks are written out here, so this exercise needs nothing from later ones."""
import pytest
import torch
from transformers.models.qwen3_vl import modeling_qwen3_vl as reference

from checks import close, copy_weights, hf_config, randomize
from model import Attention, DecoderLayer, tiny_config
from vision import apply_rope, rotate_half

pytestmark = pytest.mark.ex02

B, T = 2, 6


def rope_tables(positions, head_dim, theta=5_000_000):
    """Plain 1-D rotary tables for positions (B, T): cos, sin (B, T, head_dim), frequency pair
    j at angle position * theta^(-2j / head_dim), both halves of a head alike."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = positions[..., None].float() * inv_freq                      # (B, T, hd / 2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def allowed_keys(real, T_query):
    """(B, T, S) booleans: query t (the last T_query of S positions) may see key s if s <= its
    position and s is real; a padding query sees itself."""
    S = real.size(1)
    query = torch.arange(S - T_query, S)[:, None]
    key = torch.arange(S)[None, :]
    return ((key <= query) & real[:, None, :]) | (key == query)


def additive(allowed):
    return torch.zeros(allowed.shape).masked_fill(~allowed, float("-inf"))


CAUSAL = additive(allowed_keys(torch.ones(B, T, dtype=torch.bool), T))[:, None]  # (B, 1, T, T)


def attentions(seed=0):
    """(ours, transformers') attention layer 0 of the tiny model: 4 query heads sharing 2
    key-value heads (g = 2) of width 32."""
    ref = randomize(reference.Qwen3VLTextAttention(hf_config().text_config, layer_idx=0), seed)
    return copy_weights(Attention(tiny_config(), layer_idx=0), ref).eval(), ref.eval()


def inputs(seed=1):
    torch.manual_seed(seed)
    x = torch.randn(B, T, 64)
    cos, sin = rope_tables(torch.arange(T).expand(B, T) + 3, 32)
    return x, cos, sin


def test_rotate_half_turns_each_pair_a_quarter():
    x = torch.arange(8.0)
    want = torch.tensor([-4.0, -5.0, -6.0, -7.0, 0.0, 1.0, 2.0, 3.0])
    close(rotate_half(x), want, "rotate_half(0, 1, ..., 7)", atol=0.0)


def test_apply_rope_equals_the_reference():
    torch.manual_seed(2)
    q, k = torch.randn(B, 4, T, 32), torch.randn(B, 2, T, 32)  # (B, heads, T, hd)
    cos, sin = rope_tables(torch.arange(T).expand(B, T) * 7, 32)
    want_q, want_k = reference.apply_rotary_pos_emb(q, k, cos, sin)  # it adds the head axis
    close(apply_rope(q, cos[:, None], sin[:, None]), want_q, "apply_rope(q)", atol=1e-6)
    close(apply_rope(k, cos[:, None], sin[:, None]), want_k, "apply_rope(k)", atol=1e-6)


def test_rope_scores_depend_on_the_distance_alone():
    """<R(m) q, R(n) k> is the same for (m, n) and (m + 11, n + 11): RoPE encodes m - n."""
    torch.manual_seed(3)
    q, k = torch.randn(32), torch.randn(32)
    cos, sin = rope_tables(torch.tensor([[5, 2, 16, 13]]), 32, theta=10_000)  # m, n, m+11, n+11
    turned_q, turned_k = apply_rope(q, cos[0], sin[0]), apply_rope(k, cos[0], sin[0])
    near = turned_q[0] @ turned_k[1]
    shifted = turned_q[2] @ turned_k[3]
    close(shifted, near, "score at positions (16, 13) against (5, 2)", atol=1e-4, rtol=1e-5)
    close(turned_q.norm(dim=-1), q.norm().expand(4), "|R(m) q| against |q|", atol=1e-5, rtol=1e-5)


def test_qkv_equals_the_reference_projections():
    ours, ref = attentions()
    x, cos, sin = inputs()
    with torch.no_grad():
        q, k, v = ours.qkv(x, cos[:, :, None], sin[:, :, None])
        want_q = ref.q_norm(ref.q_proj(x).view(B, T, -1, 32)).transpose(1, 2)
        want_k = ref.k_norm(ref.k_proj(x).view(B, T, -1, 32)).transpose(1, 2)
        want_v = ref.v_proj(x).view(B, T, -1, 32).transpose(1, 2)
        want_q, want_k = reference.apply_rotary_pos_emb(want_q, want_k, cos, sin)
    close(q, want_q, "q (B, nh, T, hd)", atol=1e-5, rtol=1e-5)
    close(k, want_k, "k (B, nkv, T, hd)", atol=1e-5, rtol=1e-5)
    close(v, want_v, "v (B, nkv, T, hd)", atol=1e-5, rtol=1e-5)


def test_causal_attention_equals_the_reference():
    ours, ref = attentions()
    x, cos, sin = inputs()
    with torch.no_grad():
        got = ours(x, cos[:, :, None], sin[:, :, None], None, None)
        want = ref(x, (cos, sin), CAUSAL)[0]
    close(got, want, "Attention(x), causal, no mask given", atol=1e-5, rtol=1e-5)


def test_a_left_padded_batch_under_the_mask():
    """Row 0 starts with 2 padding tokens. The mask comes in the layout of model.causal_mask:
    (B, 1, g*T, S), its T rows repeated for the g query heads that share a key-value head.
    Padding queries are compared nowhere."""
    ours, ref = attentions()
    x, cos, sin = inputs()
    real = torch.ones(B, T, dtype=torch.bool)
    real[0, :2] = False
    mask = additive(allowed_keys(real, T))                                  # (B, T, S)
    with torch.no_grad():
        got = ours(x, cos[:, :, None], sin[:, :, None], mask.repeat(1, 2, 1)[:, None], None)
        want = ref(x, (cos, sin), mask[:, None])[0]
    close(got[real], want[real], "Attention(x) at the real positions of a padded batch",
          atol=1e-5, rtol=1e-5)


class PastKeys:
    """A stand-in for the KV cache: holds the keys and values of earlier positions, and `update`
    returns them followed by the new ones, as model.KVCache does."""

    def __init__(self, k, v, layer):
        self.k, self.v, self.layer, self.calls = k, v, layer, 0

    def update(self, layer, k, v):
        assert layer == self.layer, f"cache.update got layer {layer}, the attention is {self.layer}"
        self.calls += 1
        return torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)


def test_one_new_token_attends_over_the_cached_keys():
    """Decoding: x holds the last position alone, the cache the keys and values of the others;
    the result is the full causal attention's at the last position."""
    ours, ref = attentions()
    x, cos, sin = inputs()
    with torch.no_grad():
        want = ref(x, (cos, sin), CAUSAL)[0]
        past_k = ref.k_norm(ref.k_proj(x[:, :-1]).view(B, T - 1, -1, 32)).transpose(1, 2)
        past_v = ref.v_proj(x[:, :-1]).view(B, T - 1, -1, 32).transpose(1, 2)
        past_k = reference.apply_rotary_pos_emb(past_k, past_k, cos[:, :-1], sin[:, :-1])[0]
        cache = PastKeys(past_k, past_v, layer=0)
        mask = torch.zeros(B, 1, 2, T)  # every key visible, for each of the g = 2 query heads
        got = ours(x[:, -1:], cos[:, -1:, None], sin[:, -1:, None], mask, cache)
    assert cache.calls == 1, f"cache.update was called {cache.calls} times, expected once"
    close(got, want[:, -1:], "Attention of the last token over the cache", atol=1e-5, rtol=1e-5)


class CacheWithEmptySlots(PastKeys):
    """As model.KVCache returns them: the earlier keys and values, the new ones, then slots not
    yet filled (here junk, which the mask must hide)."""

    def update(self, layer, k, v):
        k, v = super().update(layer, k, v)
        junk = torch.randn(k.size(0), k.size(1), 2, k.size(3),
                           generator=torch.Generator().manual_seed(9)) * 10
        return torch.cat([k, junk], dim=2), torch.cat([v, junk], dim=2)


def test_one_new_token_under_the_mask_of_a_padded_cache():
    """Decoding a left-padded batch: row 0's first 2 slots are padding and the cache's last 2
    slots are still empty; the mask (B, 1, g*1, S) hides both. The result is that of the
    padded batch's full attention at its last position."""
    ours, ref = attentions()
    x, cos, sin = inputs()
    real = torch.ones(B, T, dtype=torch.bool)
    real[0, :2] = False
    full = additive(allowed_keys(real, T))                                     # (B, T, T)
    with torch.no_grad():
        want = ref(x, (cos, sin), full[:, None])[0]
        past_k = ref.k_norm(ref.k_proj(x[:, :-1]).view(B, T - 1, -1, 32)).transpose(1, 2)
        past_v = ref.v_proj(x[:, :-1]).view(B, T - 1, -1, 32).transpose(1, 2)
        past_k = reference.apply_rotary_pos_emb(past_k, past_k, cos[:, :-1], sin[:, :-1])[0]
        cache = CacheWithEmptySlots(past_k, past_v, layer=0)
        mask = torch.cat([full[:, -1:], torch.full((B, 1, 2), float("-inf"))], dim=-1)
        got = ours(x[:, -1:], cos[:, -1:, None], sin[:, -1:, None],
                   mask.repeat(1, 2, 1)[:, None], cache)                      # (B, 1, 2, S)
    close(got, want[:, -1:], "Attention of the last token over a padded cache with empty slots",
          atol=1e-5, rtol=1e-5)


def test_decoder_layer_equals_the_reference():
    """Norms, attention, MLP and both residuals together (DecoderLayer is written already)."""
    config = hf_config().text_config
    ref = randomize(reference.Qwen3VLTextDecoderLayer(config, layer_idx=1), seed=5).eval()
    ours = DecoderLayer(tiny_config(), layer_idx=1)
    copy_weights(ours, ref).eval()
    x, cos, sin = inputs(seed=6)
    with torch.no_grad():
        got = ours(x, cos[:, :, None], sin[:, :, None], None, None, None)
        want = ref(x, (cos, sin), CAUSAL)
    close(got, want, "DecoderLayer(x)", atol=1e-5, rtol=1e-5)


def test_rope_and_attention_leave_their_inputs_unchanged():
    """rotate_half, apply_rope, qkv and forward return new tensors: x (the residual stream after
    the norm), the tables, the mask and the cached keys are read, never written."""
    ours, _ = attentions()
    x, cos, sin = inputs()
    real = torch.ones(B, T, dtype=torch.bool)
    real[0, :2] = False
    mask = additive(allowed_keys(real, T)).repeat(1, 2, 1)[:, None]
    torch.manual_seed(7)
    q = torch.randn(B, 4, T, 32)
    past_k, past_v = torch.randn(B, 2, 3, 32), torch.randn(B, 2, 3, 32)
    given = {"x": x, "cos": cos, "sin": sin, "mask": mask, "q": q, "past keys": past_k,
             "past values": past_v}
    before = {name: t.clone() for name, t in given.items()}
    with torch.no_grad():
        rotate_half(q)
        apply_rope(q, cos[:, None], sin[:, None])
        ours.qkv(x, cos[:, :, None], sin[:, :, None])
        ours(x, cos[:, :, None], sin[:, :, None], mask, None)
        ours(x, cos[:, :, None], sin[:, :, None], None, None)
        cache = PastKeys(past_k, past_v, layer=0)
        ours(x[:, -1:], cos[:, -1:, None], sin[:, -1:, None], torch.zeros(B, 1, 2, 4), cache)
    for name, t in given.items():
        assert torch.equal(t, before[name]), (
            f"{name} changed by rotate_half, apply_rope, qkv or forward")


def test_apply_rope_over_random_shapes_and_far_positions():
    """Random leading axes, head widths 8 to 128 and positions up to 100,000 (angles of 10^5
    radians: the tables are exact here, the rotation must use them as given), against
    transformers' apply_rotary_pos_emb."""
    generator = torch.Generator().manual_seed(8)
    for case in range(8):
        hd = [8, 32, 64, 128][case % 4]
        heads, t = torch.randint(1, 5, (2,), generator=generator).tolist()
        positions = torch.randint(0, 100_000, (1, t), generator=generator)
        cos, sin = rope_tables(positions, hd, theta=10_000)
        q = torch.randn(1, heads, t, hd, generator=generator) * 10 ** (case - 4)
        want, _ = reference.apply_rotary_pos_emb(q, q, cos, sin)
        close(apply_rope(q, cos[:, None], sin[:, None]), want,
              f"apply_rope(q) of q {tuple(q.shape)} (case {case})", atol=1e-6 * 10 ** (case - 4),
              rtol=1e-5)


def test_attention_in_bfloat16_equals_the_reference():
    """The model runs in bfloat16: x, the tables and the additive mask all bfloat16, the result
    bfloat16, against transformers' layer in bfloat16 (within 2e-3 + 1%: a few bfloat16 steps
    of values near 0.1), causal and under a padded batch's mask."""
    ours, ref = attentions()
    ours, ref = ours.to(torch.bfloat16), ref.to(torch.bfloat16)
    x, cos, sin = (t.to(torch.bfloat16) for t in inputs())
    real = torch.ones(B, T, dtype=torch.bool)
    real[0, :2] = False
    mask = additive(allowed_keys(real, T)).to(torch.bfloat16)
    with torch.no_grad():
        want = ref(x, (cos, sin), CAUSAL.to(torch.bfloat16))[0]
        got = ours(x, cos[:, :, None], sin[:, :, None], None, None)
        close(got, want, "Attention(x) in bfloat16, causal", atol=2e-3, rtol=1e-2)
        want = ref(x, (cos, sin), mask[:, None])[0]
        got = ours(x, cos[:, :, None], sin[:, :, None], mask.repeat(1, 2, 1)[:, None], None)
    close(got[real], want[real], "Attention(x) in bfloat16 under a padded batch's mask",
          atol=2e-3, rtol=1e-2)
