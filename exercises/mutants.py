"""
Proof that each exercise's tests tell right from wrong: plausible wrong implementations (mutants),
each a small edit of one solution, that the exercise's tests must fail; and the blank copy, whose
exercise tests must all fail with the exercise's NotImplementedError while every module imports.

    python exercises/mutants.py                  # every exercise, two at a time
    python exercises/mutants.py --only 3 7 --jobs 1 --json out.json

A mutant must be caught by its OWN exercise's tests: its check runs that exercise's test file
alone, and the failing test must be one of that exercise's (a mistake that only a later exercise's
tests would see is charged to the wrong exercise, and the student loses the trail).

Kept out of the student copy (make.py): each mutant is one edit away from a solution. Each check
writes a copy with make.py and runs the exercise's tests there, in a process forked from this
one after torch and transformers are imported (they take seconds to import; a fork, nothing).
"""
import argparse
import gc
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from course import BY_NUMBER, EXERCISES  # noqa: E402  (the path above)
from make import ROOT, function_source, make_copy  # noqa: E402


@dataclass(frozen=True)
class Mutant:
    exercise: int
    function: str   # qualified name, as in course.py
    name: str       # what is wrong, as a student might write it
    edits: tuple    # (old, new): each old occurs exactly once in the solution's source


MUTANTS = [
    # 1: RMSNorm and SwiGLU
    Mutant(1, "model.RMSNorm.forward", "no epsilon: 0 / 0 on a zero vector",
           (("F.rms_norm(x, x.shape[-1:], eps=self.eps)",
             "x / x.pow(2).mean(-1, keepdim=True).sqrt()"),)),
    Mutant(1, "model.RMSNorm.forward", "mean of squares over the wrong axis",
           (("F.rms_norm(x, x.shape[-1:], eps=self.eps)",
             "x * torch.rsqrt(x.pow(2).mean(1, keepdim=True) + self.eps)"),)),
    Mutant(1, "model.RMSNorm.forward", "the mean subtracted, as LayerNorm does",
           (("F.rms_norm(x, x.shape[-1:], eps=self.eps)",
             "F.rms_norm(x - x.mean(-1, keepdim=True), x.shape[-1:], eps=self.eps)"),)),
    Mutant(1, "model.RMSNorm.forward", "the weight applied before normalising",
           (("self.weight * F.rms_norm(x, x.shape[-1:], eps=self.eps)",
             "F.rms_norm(self.weight * x, x.shape[-1:], eps=self.eps)"),)),
    Mutant(1, "model.MLP.forward", "SiLU on the up projection instead of the gate",
           (("F.silu(self.gate_proj(x)) * self.up_proj(x)",
             "self.gate_proj(x) * F.silu(self.up_proj(x))"),)),
    Mutant(1, "model.MLP.forward", "GELU for SiLU",
           (("F.silu(", "F.gelu("),)),
    Mutant(1, "model.RMSNorm.forward", "the weight multiplied before the cast back to x's dtype",
           (("self.weight * F.rms_norm(x, x.shape[-1:], eps=self.eps)",
             "F.rms_norm(x, x.shape[-1:], self.weight, eps=self.eps)"),)),
    Mutant(1, "model.RMSNorm.forward", "epsilon outside the square root: x / (rms + eps)",
           (("F.rms_norm(x, x.shape[-1:], eps=self.eps)",
             "(x.float() / (x.float().pow(2).mean(-1, keepdim=True).sqrt() + self.eps))"
             ".to(x.dtype)"),)),
    Mutant(1, "model.RMSNorm.forward", "normalised in place: the caller's x overwritten",
           (("self.weight * F.rms_norm(x, x.shape[-1:], eps=self.eps)",
             "self.weight * x.copy_(F.rms_norm(x, x.shape[-1:], eps=self.eps))"),)),
    Mutant(1, "model.RMSNorm.forward", "normalised over the axes from the third on: (B, T, D) only",
           (("F.rms_norm(x, x.shape[-1:], eps=self.eps)",
             "F.rms_norm(x, x.shape[2:], eps=self.eps)"),)),
    Mutant(1, "model.RMSNorm.forward", "the mean of squares in x's dtype, not float32",
           (("F.rms_norm(x, x.shape[-1:], eps=self.eps)",
             "x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)"),)),
    Mutant(1, "model.MLP.forward", "the output viewed as (B, T, D): three axes only",
           (("return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))",
             "return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))"
             ".view(x.shape[0], x.shape[1], -1)"),)),
    Mutant(1, "model.MLP.forward", "silu(z) as z e^z / (1 + e^z): NaN once e^z overflows",
           (("F.silu(self.gate_proj(x))",
             "(lambda z: z * z.exp() / (1 + z.exp()))(self.gate_proj(x))"),)),
    Mutant(1, "model.MLP.forward", "SiLU taken in float32 and not cast back",
           (("F.silu(self.gate_proj(x))", "F.silu(self.gate_proj(x).float())"),)),
    # 2: attention
    Mutant(2, "vision.rotate_half", "the quarter turn the other way",
           (("torch.cat([-x2, x1], dim=-1)", "torch.cat([x2, -x1], dim=-1)"),)),
    Mutant(2, "vision.rotate_half", "pairs of neighbours (the GPT-J layout) for halves",
           (("x1, x2 = x.chunk(2, dim=-1)\n    return torch.cat([-x2, x1], dim=-1)",
             "x1, x2 = x[..., ::2], x[..., 1::2]\n"
             "    return torch.stack([-x2, x1], dim=-1).flatten(-2)"),)),
    Mutant(2, "model.Attention.qkv", "q/k norm after RoPE",
           (("q = apply_rope(self.q_norm(q), cos, sin)",
             "q = self.q_norm(apply_rope(q, cos, sin))"),
            ("k = apply_rope(self.k_norm(k), cos, sin)",
             "k = self.k_norm(apply_rope(k, cos, sin))"))),
    Mutant(2, "model.Attention.qkv", "no k norm",
           (("k = apply_rope(self.k_norm(k), cos, sin)", "k = apply_rope(k, cos, sin)"),)),
    Mutant(2, "model.Attention.forward", "no 1/sqrt(head_dim)",
           (("is_causal=T > 1, enable_gqa=True)", "is_causal=T > 1, enable_gqa=True, scale=1.0)"),
            ("attn_mask=mask)", "attn_mask=mask, scale=1.0)"))),
    Mutant(2, "model.Attention.forward", "no causal mask: the future leaks",
           (("is_causal=T > 1", "is_causal=False"),)),
    Mutant(2, "model.Attention.forward", "key-value heads tiled, not shared by neighbours",
           (("y = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=True)",
             "g = q.size(1) // k.size(1)\n"
             "        y = F.scaled_dot_product_attention(q, k.repeat(1, g, 1, 1), "
             "v.repeat(1, g, 1, 1), is_causal=T > 1)"),)),
    Mutant(2, "model.Attention.forward", "the cache's keys ignored",
           (("k, v = cache.update(self.layer_idx, k, v)", "cache.update(self.layer_idx, k, v)"),)),
    Mutant(2, "vision.apply_rope", "x turned in place: the caller's q and k overwritten",
           (("return x * cos + rotate_half(x) * sin",
             "return rotate_half(x) * sin + x.mul_(cos)"),)),
    Mutant(2, "model.Attention.forward", "the masked softmax in float32, not cast back",
           (("F.scaled_dot_product_attention(q, k, v, attn_mask=mask)",
             "((q @ k.transpose(-1, -2) * self.head_dim**-0.5 + mask).float().softmax(-1) "
             "@ v.float())"),)),
    Mutant(2, "model.Attention.forward", "the mask ignored for a single new token",
           (("if mask is None:", "if mask is None or T == 1:"),)),
    # 3: interleaved multimodal RoPE
    Mutant(3, "model.rope_positions", "text after an image resumes after its token count",
           (("p + max(h, w)", "p + h * w"),)),
    Mutant(3, "model.rope_positions", "rows and columns swapped",
           (("torch.stack([torch.zeros_like(rows), rows, cols])",
             "torch.stack([torch.zeros_like(rows), cols, rows])"),)),
    Mutant(3, "model.rope_positions", "text resumes after the patch grid's side, not the merged",
           (("i, p = i + h * w, p + max(h, w)", "i, p = i + h * w, p + max(h, w) * MERGE"),)),
    Mutant(3, "model.rope_positions", "left padding counted",
           (("ids = input_ids[b].cpu()[real[b]].tolist()", "ids = input_ids[b].cpu().tolist()"),
            ("positions[:, b, real[b]] = pos", "positions[:, b] = pos"))),
    Mutant(3, "model.Qwen3VL.rotary", "sections in blocks (Qwen2-VL's layout), not interleaved",
           (("axis[1:3 * s_h:3] = 1\n        axis[2:3 * s_w:3] = 2",
             "axis[hd // 2 - s_h - s_w:hd // 2 - s_w] = 1\n        axis[hd // 2 - s_w:] = 2"),)),
    Mutant(3, "model.Qwen3VL.rotary", "exponent j / hd for 2j / hd",
           (("torch.arange(0, hd, 2).float() / hd", "torch.arange(hd // 2).float() / hd"),)),
    Mutant(3, "model.rope_positions", "the grid merged in place: the caller's grid halved",
           (("grids = iter(", "if image_grid_thw is not None:\n"
             "        image_grid_thw[:, 1:] //= MERGE\n    grids = iter("),
            ("h, w = h // MERGE, w // MERGE", "h, w = h, w"))),
    Mutant(3, "model.rope_positions", "the next position is the last token's t + 1",
           (("next_position[b] = pos.max() + 1", "next_position[b] = pos[0, -1] + 1"),)),
    Mutant(3, "model.Qwen3VL.rotary", "the positions cast to the tables' dtype before the angles",
           (("angles = position.float() * inv_freq",
             "angles = position.to(dtype).float() * inv_freq"),)),
    Mutant(3, "model.rope_positions", "positions in float32, torch.zeros' default",
           (("positions = torch.zeros(3, B, T, dtype=torch.long)",
             "positions = torch.zeros(3, B, T)"),
            ("positions[:, b, real[b]] = pos", "positions[:, b, real[b]] = pos.float()"))),
    Mutant(3, "model.Qwen3VL.rotary", "the first row's positions for every row",
           (("position = positions.index_select(0, axis)",
             "position = positions[:, :1].index_select(0, axis)"),)),
    # 4: image preprocessing
    Mutant(4, "vision.smart_resize", "sides floored, not rounded",
           (("round(height / factor) * factor, round(width / factor) * factor",
             "height // factor * factor, width // factor * factor"),)),
    Mutant(4, "vision.smart_resize", "scaled up to the budget with floor, not ceil",
           (("math.ceil(height * beta / factor)", "math.floor(height * beta / factor)"),
            ("math.ceil(width * beta / factor)", "math.floor(width * beta / factor)"))),
    Mutant(4, "vision.smart_resize", "an aspect ratio of exactly 200 refused",
           (("min(height, width) > 200:", "min(height, width) >= 200:"),)),
    Mutant(4, "vision.smart_resize", "only a wide image's aspect ratio checked",
           (("if max(height, width) / min(height, width) > 200:", "if width / height > 200:"),)),
    Mutant(4, "vision.smart_resize", "exactly max_pixels scaled down",
           (("h_bar * w_bar > max_pixels", "h_bar * w_bar >= max_pixels"),)),
    Mutant(4, "vision.smart_resize", "exactly min_pixels scaled up",
           (("h_bar * w_bar < min_pixels", "h_bar * w_bar <= min_pixels"),)),
    Mutant(4, "vision.smart_resize", "halves rounded up, not to even",
           (("round(height / factor) * factor, round(width / factor) * factor",
             "math.floor(height / factor + 0.5) * factor, "
             "math.floor(width / factor + 0.5) * factor"),)),
    Mutant(4, "vision.merge_window_order", "rows and columns swapped in the window split",
           (("x.reshape(h // MERGE, MERGE, w // MERGE, MERGE, *x.shape[2:])",
             "x.reshape(w // MERGE, MERGE, h // MERGE, MERGE, *x.shape[2:])"),)),
    Mutant(4, "vision.merge_window_order", "no transpose: raster order",
           (("x = x.transpose(1, 2)", "x = x"),)),
    Mutant(4, "vision.preprocess_image", "patches in raster order",
           (("x = x.permute(1, 4, 2, 5, 0, 3, 6)", "x = x.permute(1, 2, 4, 5, 0, 3, 6)"),)),
    Mutant(4, "vision.preprocess_image", "resized to (height, width)",
           (("image.resize((W, H),", "image.resize((H, W),"),)),
    Mutant(4, "vision.preprocess_image", "pixels in [0, 1], not normalised",
           (("((x.double() * (1 / 255)).float() - 0.5) / 0.5",
             "(x.double() * (1 / 255)).float()"),)),
    # 5: the vision tower
    Mutant(5, "vision.PatchMerger.forward", "tanh GELU in the mergers, as in the blocks",
           (("F.gelu(self.linear_fc1(x))", "F.gelu(self.linear_fc1(x), approximate='tanh')"),)),
    Mutant(5, "vision.PatchMerger.forward", "no norm in the DeepStack mergers",
           (("x = self.norm(x.view(-1, C4))", "x = x.view(-1, C4)"),)),
    Mutant(5, "vision.VisionTower.forward", "DeepStack features taken before the block",
           (("        x = block(x, cos, sin, lengths)\n", ""),
            ("self.deepstack_indexes.index(i)](x))",
             "self.deepstack_indexes.index(i)](x))\n        x = block(x, cos, sin, lengths)"))),
    Mutant(5, "vision.VisionTower.forward", "attention across images",
           (("lengths = [h * w for h, w in grids]", "lengths = [sum(h * w for h, w in grids)]"),)),
    Mutant(5, "vision.VisionTower.forward", "no position embedding",
           (("x = x + torch.cat(", "x = x + 0 * torch.cat("),)),
    Mutant(5, "model.place_image", "image embeddings added to the tokens' embeddings",
           (("return x.masked_scatter(is_image[..., None], image_embeds.to(x.dtype))",
             "return x + torch.zeros_like(x).masked_scatter(is_image[..., None], "
             "image_embeds.to(x.dtype))"),)),
    Mutant(5, "model.place_image", "too many embeddings accepted: only too few refused",
           (("if int(is_image.sum()) != len(image_embeds):",
             "if int(is_image.sum()) > len(image_embeds):"),)),
    Mutant(5, "model.place_image", "the embeddings written into x in place",
           (("x.masked_scatter(", "x.masked_scatter_("),)),
    Mutant(5, "model.place_image", "the embeddings not cast to x's dtype",
           (("image_embeds.to(x.dtype))", "image_embeds)"),)),
    Mutant(5, "vision.VisionTower.forward", "a video grid (t = 2) not refused",
           (("if any(t != 1 for t, _, _ in grid_thw.tolist()):",
             "if any(t < 1 for t, _, _ in grid_thw.tolist()):"),)),
    Mutant(5, "vision.VisionTower.forward", "the float32 position grid not cast to x's dtype",
           ((" for h, w in grids]).to(x.dtype)", " for h, w in grids])"),)),
    # 6: the decoding mask and sampling
    Mutant(6, "model.causal_mask", "the future leaks: every real key visible",
           (("(key_slot <= query_slots[:, None]) & key_mask[:, None, :]",
             "key_mask[:, None, :].expand(-1, len(query_slots), -1)"),)),
    Mutant(6, "model.causal_mask", "padding keys visible",
           (("& key_mask[:, None, :]", "& torch.ones_like(key_mask)[:, None, :]"),)),
    Mutant(6, "model.causal_mask", "rows repeated query by query, not head by head",
           (("mask.repeat(1, groups, 1)", "mask.repeat_interleave(groups, dim=1)"),)),
    Mutant(6, "generate.sample", "temperature multiplies",
           (("logits.float() / temperature", "logits.float() * temperature"),)),
    Mutant(6, "generate.sample", "top-p drops the token that crosses the threshold",
           (("probs.cumsum(dim=-1) - probs >= top_p", "probs.cumsum(dim=-1) > top_p"),)),
    Mutant(6, "generate.sample", "top-p keeps a token whose likelier tokens hold exactly top_p",
           (("probs.cumsum(dim=-1) - probs >= top_p", "probs.cumsum(dim=-1) - probs > top_p"),)),
    Mutant(6, "generate.sample", "the rank returned for the token id",
           (("return indices.gather(-1, rank).squeeze(-1)", "return rank.squeeze(-1)"),)),
    Mutant(6, "generate.sample", "top_k 0 keeps no token",
           (("if top_k else", "if top_k is not None else"),)),
    Mutant(6, "generate.sample", "top-p's running mass over the vocabulary, not what top-k kept",
           (("probs = values.softmax(dim=-1)",
             "probs = (values - logits.logsumexp(dim=-1, keepdim=True)).exp()"),)),
    Mutant(6, "generate.sample", "the logits divided in place: the caller's logits changed",
           (("logits = logits.float() / temperature",
             "logits = logits.float()\n    logits /= temperature"),)),
    Mutant(6, "generate.sample", "the logits divided in their own dtype (bfloat16), not float32",
           (("logits.float() / temperature", "logits / temperature"),)),
    Mutant(6, "generate.sample", "probabilities by exp / sum: exp overflows for large logits",
           (("probs = values.softmax(dim=-1)",
             "probs = values.exp() / values.exp().sum(dim=-1, keepdim=True)"),
            ("draw(values.softmax(dim=-1), generator)",
             "draw(values.exp() / values.exp().sum(dim=-1, keepdim=True), generator)"))),
    Mutant(6, "model.causal_mask", "the mask in float32 whatever the dtype asked for",
           (("mask = torch.zeros(allowed.shape, dtype=dtype,",
             "mask = torch.zeros(allowed.shape, dtype=torch.float32,"),)),
    Mutant(6, "generate.sample", "the first row's token ids for every row",
           (("return indices.gather(-1, rank).squeeze(-1)",
             "return indices[0, rank.squeeze(-1)]"),)),
    # 7: the PVM block
    Mutant(7, "pvm.PVMBlock.__init__", "the gate initialised like the rest",
           (("nn.Parameter(torch.zeros(1))", "nn.Parameter(torch.randn(1) * 0.02)"),)),
    Mutant(7, "pvm.PVMBlock.__init__", "the expander zero too: no gradient reaches the gate",
           (("nn.init.normal_(module.weight, std=0.02)",
             "nn.init.normal_(module.weight, std=0.02)\n"
             "    nn.init.zeros_(self.output_expander.weight)"),)),
    Mutant(7, "pvm.PVMBlock.__init__", "one key-value head per query head",
           (("n_kv = max(1, (d // hd) // (config.num_heads // config.num_kv_heads))",
             "n_kv = d // hd"),)),
    Mutant(7, "pvm.CrossAttention.forward", "softmax over the text positions",
           (("scores.softmax(dim=-1)", "scores.softmax(dim=-2)"),)),
    Mutant(7, "pvm.CrossAttention.forward", "no 1/sqrt(head_dim)",
           (("(q @ k.transpose(-1, -2)).float() * self.hd**-0.5",
             "(q @ k.transpose(-1, -2)).float()"),)),
    Mutant(7, "pvm.CrossAttention.forward", "visual padding not masked",
           (("    scores = scores.masked_fill(~bank_mask[:, None, None, :], "
             "torch.finfo(torch.float32).min)\n", ""),)),
    Mutant(7, "pvm.CrossAttention.forward", "key-value heads tiled, not shared by neighbours",
           (("k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)",
             "k = k.repeat(1, q.size(1) // k.size(1), 1, 1)"),
            ("v = v.repeat_interleave(q.size(1) // v.size(1), dim=1)",
             "v = v.repeat(1, q.size(1) // v.size(1), 1, 1)"))),
    Mutant(7, "pvm.PVMBlock.forward", "the image's own positions written too",
           (("keep = ~is_image & bank_mask.any(dim=1, keepdim=True)",
             "keep = bank_mask.any(dim=1, keepdim=True).expand_as(is_image)"),)),
    Mutant(7, "pvm.PVMBlock.forward", "no norm after the expander",
           (("F.rms_norm(self.output_expander(m), (a.size(-1),), eps=self.eps)",
             "self.output_expander(m)"),)),
    Mutant(7, "pvm.PVMBlock.__init__", "no floor of one key-value head: 0 heads at d < g * hd",
           (("n_kv = max(1, (d // hd) // (config.num_heads // config.num_kv_heads))",
             "n_kv = (d // hd) // (config.num_heads // config.num_kv_heads)"),)),
    Mutant(7, "pvm.PVMBlock.__init__", "key-value heads rounded up, not down",
           (("n_kv = max(1, (d // hd) // (config.num_heads // config.num_kv_heads))",
             "n_kv = max(1, -(-(d // hd) // (config.num_heads // config.num_kv_heads)))"),)),
    Mutant(7, "pvm.CrossAttention.forward", "scores, mask and softmax in the model's dtype",
           (("(q @ k.transpose(-1, -2)).float() * self.hd**-0.5",
             "(q @ k.transpose(-1, -2)) * self.hd**-0.5"),)),
    Mutant(7, "pvm.CrossAttention.forward", "the float32 weights not cast back to v's dtype",
           (("scores.softmax(dim=-1).to(v.dtype)", "scores.softmax(dim=-1)"),)),
    Mutant(7, "pvm.CrossAttention.forward", "padding masked with -inf: NaN without an image",
           (("torch.finfo(torch.float32).min)", "float('-inf'))"),)),
    Mutant(7, "pvm.PVMBlock.forward", "the bank's padding zeroed in place",
           (("self.vision_reducer(bank)",
             "self.vision_reducer(bank.masked_fill_(~bank_mask[..., None], 0.0))"),)),
    Mutant(7, "pvm.PVMBlock.forward", "the output norm at F.rms_norm's default epsilon",
           (("F.rms_norm(self.output_expander(m), (a.size(-1),), eps=self.eps)",
             "F.rms_norm(self.output_expander(m), (a.size(-1),))"),)),
    # 8: the SFT loss and the schedule
    Mutant(8, "train.AssistantLoss.forward", "no shift: position t scored on token t",
           (("hidden[:, :-1][predicts]", "hidden[:, 1:][predicts]"),)),
    Mutant(8, "train.AssistantLoss.forward", "the mask read at the predicting position",
           (("predicts = loss_mask[:, 1:]", "predicts = loss_mask[:, :-1]"),)),
    Mutant(8, "train.AssistantLoss.forward", "a mean, not a sum",
           (('reduction="sum"', 'reduction="mean"'),)),
    Mutant(8, "train.get_lr", "warmup from 0: step / warmup",
           (("args.lr * (step + 1) / warmup", "args.lr * step / warmup"),)),
    Mutant(8, "train.get_lr", "the cosine over all the steps, not those after warmup",
           (("(step - warmup) / max(1, total - warmup)", "step / total"),)),
    Mutant(8, "train.get_lr", "a cosine down to lr / 2",
           (("args.lr * 0.5 * (1 + math.cos(", "args.lr * (0.75 + 0.25 * math.cos("),)),
    Mutant(8, "train.get_lr", "warmup steps rounded half up, not to even",
           (("round(args.warmup * total)", "math.floor(args.warmup * total + 0.5)"),)),
    Mutant(8, "train.get_lr", "warmup steps truncated by int()",
           (("round(args.warmup * total)", "int(args.warmup * total)"),)),
    Mutant(8, "train.AssistantLoss.forward", "shifted by roll: the last position predicts token 0",
           (("predicts = loss_mask[:, 1:]", "predicts = loss_mask.roll(-1, dims=1)"),
            ("hidden[:, :-1][predicts]", "hidden[predicts]"),
            ("input_ids[:, 1:][predicts]", "input_ids.roll(-1, dims=1)[predicts]"))),
    Mutant(8, "train.AssistantLoss.forward", "a mean times the count: NaN without marked tokens",
           (('reduction="sum")', 'reduction="mean") * predicts.sum()'),)),
    Mutant(8, "train.AssistantLoss.forward", "-100 labels written into the caller's input_ids",
           (("predicts = loss_mask[:, 1:]",
             "input_ids[~loss_mask] = -100  # transformers' labels\n"
             "    predicts = loss_mask[:, 1:]"),)),
    Mutant(8, "train.AssistantLoss.forward", "the cross-entropy in the model's dtype",
           (("F.cross_entropy(logits.float(),", "F.cross_entropy(logits,"),)),
    # 9: GRPO's group advantages and policy objective
    Mutant(9, "grpo.group_advantages", "the mean taken across prompts, not within a group",
           (("grouped.mean(dim=1, keepdim=True)", "grouped.mean(dim=0, keepdim=True)"),)),
    Mutant(9, "grpo.group_advantages", "the std without Bessel's correction",
           (("grouped.std(dim=1, keepdim=True)",
             "grouped.std(dim=1, keepdim=True, correction=0)"),)),
    Mutant(9, "grpo.group_advantages", "no + 1e-4 in the denominator",
           (("keepdim=True) + 1e-4)", "keepdim=True))"),)),
    Mutant(9, "grpo.group_advantages", "a group all equal where its std is 0",
           (("equal = (grouped == grouped[:, :1]).all(dim=1)",
             "equal = grouped.std(dim=1) == 0"),)),
    Mutant(9, "grpo.group_advantages", "centred in place: the caller's rewards overwritten",
           (("advantages = grouped - grouped.mean(dim=1, keepdim=True)",
             "advantages = grouped.sub_(grouped.mean(dim=1, keepdim=True))"),)),
    Mutant(9, "grpo.group_advantages", "all equal within torch.isclose's tolerance",
           (("equal = (grouped == grouped[:, :1]).all(dim=1)",
             "equal = torch.isclose(grouped, grouped[:, :1]).all(dim=1)"),)),
    Mutant(9, "grpo.PolicyObjective.weighted_logp", "log p in the model's dtype",
           (("self.model.lm_head(hidden / self.temperature).float()",
             "self.model.lm_head(hidden / self.temperature)"),)),
    Mutant(9, "grpo.PolicyObjective.weighted_logp", "log p at temperature 1, not T",
           (("self.model.lm_head(hidden / self.temperature).float()",
             "self.model.lm_head(hidden).float()"),)),
    Mutant(9, "grpo.PolicyObjective.forward", "the first chunk alone",
           (("if len(chunks[0]) == 1:", "if True:"),)),
    Mutant(9, "grpo.PolicyObjective.forward", "truncated rows' advantages zeroed in place",
           (("weights = advantages[:, None]",
             "weights = advantages.mul_(predicts.any(dim=1))[:, None]"),)),
    Mutant(9, "grpo.PolicyObjective.forward", "no shift: position t scored on token t",
           (("hidden[:, :-1][predicts]", "hidden[:, 1:][predicts]"),)),
    Mutant(9, "grpo.PolicyObjective.forward", "the mask read at the predicting position",
           (("predicts = loss_mask[:, 1:]", "predicts = loss_mask[:, :-1]"),)),
    Mutant(9, "grpo.PolicyObjective.forward", "every real token scored: prompts, truncated rows",
           (("predicts = loss_mask[:, 1:]", "predicts = attention_mask[:, 1:]"),)),
    Mutant(9, "grpo.PolicyObjective.forward", "a mean per sequence, not a sum over tokens",
           (("weights = advantages[:, None].expand_as(predicts)[predicts]",
             "weights = (advantages[:, None] / predicts.sum(1, keepdim=True))"
             ".expand_as(predicts)[predicts]"),)),
    # 10: measuring visual attention dilution
    Mutant(10, "exercises.measure.layer_groups", "layers dealt out in turn (l % 3)",
           (("share.tensor_split(groups, dim=1)",
             "(share[:, g::groups] for g in range(groups))"),)),
    Mutant(10, "exercises.measure.layer_groups", "groups of L // 3 layers, the rest dropped",
           (("share.tensor_split(groups, dim=1)",
             "share.split(max(1, share.size(1) // groups), dim=1)[:groups]"),)),
    Mutant(10, "exercises.measure.dilution", "1 / generated position, not 1 / keys",
           (("keys = keys_attended(prompt_tokens, n)",
             "keys = torch.arange(1, n + 1, dtype=torch.float64)"),)),
    Mutant(10, "exercises.measure.decay_exponent", "fitted against the generated position",
           (("x = keys_attended(prompt_tokens, len(share)).log()",
             "x = torch.arange(1, len(share) + 1, dtype=torch.float64).log()"),)),
    Mutant(10, "exercises.measure.decay_exponent", "fitted without logarithms",
           (("y = share.log()", "y = share"),)),
    Mutant(10, "exercises.measure.decay_exponent", "a single share not refused",
           (("if len(share) < 2 or not (share > 0).all():", "if not (share > 0).all():"),)),
    Mutant(10, "exercises.measure.decay_exponent", "a share of 0 accepted",
           (("(share > 0).all()", "(share >= 0).all()"),)),
    Mutant(10, "exercises.measure.decay_exponent", "two shares refused",
           (("len(share) < 2", "len(share) <= 2"),)),
    Mutant(10, "exercises.measure.decay_exponent", "the logarithm taken in place",
           (("y = share.log()", "y = share.log_()"),)),
    Mutant(10, "exercises.measure.decay_exponent", "the shares in float32",
           (("share = torch.as_tensor(share, dtype=torch.float64)",
             "share = torch.as_tensor(share, dtype=torch.float32)"),)),
]


def mutant_source(mutant, root=ROOT):
    """The wrong function: the solution's source with the mutant's edits."""
    source = function_source(mutant.function, root)
    for old, new in mutant.edits:
        if source.count(old) != 1:
            raise ValueError(f"mutant {mutant.name!r}: {old!r} occurs {source.count(old)} times "
                             f"in {mutant.function}, not once")
        source = source.replace(old, new)
    return source


# -----------------------------------------------------------------------------
# the checks, each in a forked process in its own copy of the project

@dataclass
class Check:
    label: str
    exercise: int
    copy: Path
    tests: list          # test files, relative to the copy
    stop_first: bool     # -x: a mutant is caught by its first failing test
    expect: str          # "caught": some test fails, not by NotImplementedError
                         # "blank": every test fails with NotImplementedError, exercise <= its own
    exact: bool = False  # "blank": each test's NotImplementedError is its own exercise's


def run_check(check, log):
    """In a forked child: run the check's tests in its copy, write the grade.Recorder's results
    as JSON to `log`.json and pytest's output to `log`."""
    import pytest
    import torch

    from grade import Recorder, grade
    os.chdir(check.copy)
    # the copy's modules, not this project's: nothing of the project is imported yet but
    # course, make and grade, whose paths go (a virtual environment inside the project stays)
    project = {str(ROOT / folder) for folder in (".", "tests", "exercises", "exercises/tests")}
    sys.path[:] = [str(check.copy)] + [p for p in sys.path if str(Path(p or ".").resolve())
                                       not in project]
    sys.dont_write_bytecode = True
    os.environ["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"  # the tests need no installed plugin
    torch.set_num_threads(1)
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(out, 1)
    os.dup2(out, 2)
    recorder = Recorder()
    imports = None
    if check.expect == "blank":  # the blank copy must import cleanly
        try:
            import data, generate, load_qwen, model, pvm, report, train, vision  # noqa: F401
            sys.path.insert(0, str(check.copy / "exercises"))
            import measure  # noqa: F401
        except Exception as e:
            imports = f"{type(e).__name__}: {e}"
    # plain asserts: whether a test fails is all a check needs, not pytest's rewritten messages
    args = ["-q", "-p", "no:cacheprovider", "--rootdir", str(check.copy), "--tb=line",
            "--assert=plain"]
    if check.exercise == 0:  # the whole blank copy, graded as a student would grade it
        code = grade([e.number for e in EXERCISES], check.copy, args, recorder)
    else:
        code = pytest.main(args + ["-x"] * check.stop_first + check.tests, plugins=[recorder])
    Path(f"{log}.json").write_text(json.dumps({"code": int(code), "imports": imports,
                                               "tests": recorder.tests,
                                               "broken": recorder.broken}))


def judge(check, result, output):
    """(passed, what happened) of a check from its child's results and printed output."""
    tests, broken = result["tests"], result["broken"]
    if broken:
        return False, f"the tests do not import: {next(iter(broken.values()))}"
    if check.expect == "caught":
        failed = [(name, t) for name, t in tests.items() if t["outcome"] != "passed"]
        if not failed:
            return False, f"NOT CAUGHT: all {len(tests)} tests pass"
        name, test = failed[0]
        if test["blank"] is not None:
            return False, f"{name} fails by NotImplementedError, not by the mutant"
        if test["exercise"] != check.exercise:
            return False, (f"caught by {name}, a test of exercise {test['exercise']}, not of "
                           f"exercise {check.exercise}")
        return True, f"caught by {name.split('::')[-1]}: {test['message'][:240]}"
    if result["imports"]:
        return False, f"the blank copy does not import: {result['imports']}"
    if not tests:
        return False, "no test ran"
    for name, test in tests.items():
        if test["outcome"] == "passed":
            return False, f"{name} passes in the blank copy"
        blank, own = test["blank"], test["exercise"]
        if blank is None:
            return False, f"{name} fails, but not by NotImplementedError: {test['message']}"
        if blank > own or (check.exact and blank != own):
            return False, f"{name} (exercise {own}) waits for exercise {blank}"
    if check.exercise == 0:  # grade.py's report: every exercise failed, no point given
        for e in EXERCISES:
            if f"exercise {e.number} {e.title}: failed  0/{e.points}" not in output:
                return False, f"grade.py does not report exercise {e.number} failed"
        if f"total 0/{sum(e.points for e in EXERCISES)}" not in output:
            return False, "grade.py's total is not 0"
        return True, f"all {len(tests)} tests fail by NotImplementedError; graded 0"
    return True, f"all {len(tests)} tests fail by NotImplementedError"


def plan(numbers, work):
    """The checks of the chosen exercises: the copy with every exercise blank once (all the
    exercises' tests); per exercise, the copy blank from it on (its own tests must fail by its
    own NotImplementedError: they need nothing later); per mutant, the solved copy with it."""
    checks = [Check("blank copy, every exercise's tests", 0, work / "blank-all",
                    [f"exercises/tests/{e.tests}" for e in EXERCISES], False, "blank")]
    make_copy(checks[0].copy, blank=[e.number for e in EXERCISES])
    for number in numbers:
        exercise = BY_NUMBER[number]
        tests = [f"exercises/tests/{exercise.tests}"]
        later = [e.number for e in EXERCISES if e.number >= number]
        if number != EXERCISES[0].number:  # for the first, the blank copy is this copy
            copy = make_copy(work / f"blank-from-{number}", blank=later)
            checks.append(Check(f"blank from exercise {number}", number, copy, tests, False,
                                "blank", exact=True))
        for k, mutant in enumerate(m for m in MUTANTS if m.exercise == number):
            if mutant.function not in exercise.functions:
                raise ValueError(f"mutant {mutant.name!r}: {mutant.function} is not a function "
                                 f"of exercise {number}")
            copy = make_copy(work / f"mutant-{number}-{k}",
                             replace={mutant.function: mutant_source(mutant)})
            checks.append(Check(f"{mutant.function}: {mutant.name}", number, copy, tests, True,
                                "caught"))
    return checks


def run(checks, work, jobs):
    """Run the checks, `jobs` forked children at a time; [(check, passed, detail, seconds)]."""
    import pytest  # noqa: F401  (imported once here, for every child)
    import torch  # noqa: F401
    import transformers.models.qwen3_vl.modeling_qwen3_vl  # noqa: F401
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl  # noqa: F401
    gc.freeze()  # what is imported stays shared with the children: their collections skip it
    results, running, waiting = [], {}, list(enumerate(checks))
    while waiting or running:
        while waiting and len(running) < jobs:
            k, check = waiting.pop(0)
            log = work / f"check-{k}.log"
            pid = os.fork()
            if pid == 0:  # the child: never return into the parent's code
                status = 1
                try:
                    run_check(check, log)
                    status = 0
                finally:
                    os._exit(status)
            running[pid] = (k, check, log, time.perf_counter())
        pid, status = os.wait()
        k, check, log, start = running.pop(pid)
        seconds = time.perf_counter() - start
        if status or not Path(f"{log}.json").exists():
            passed, detail = False, f"the check crashed: {log.read_text()[-2000:]}"
        else:
            passed, detail = judge(check, json.loads(Path(f"{log}.json").read_text()),
                                   log.read_text())
        results.append((k, check, passed, detail, seconds))
        print(f"{'ok  ' if passed else 'FAIL'} {seconds:5.1f} s  exercise {check.exercise:2d}  "
              f"{check.label}: {detail}", flush=True)
    return [r[1:] for r in sorted(results, key=lambda r: r[0])]


def main(argv=None):
    parser = argparse.ArgumentParser(description="Check that every exercise's tests catch its "
                                                 "mutants and fail on the blank copy.")
    parser.add_argument("--only", type=int, nargs="+", metavar="N", help="these exercises only")
    parser.add_argument("--jobs", type=int, default=2, help="checks run at once (default 2)")
    parser.add_argument("--json", help="write the results to this file")
    args = parser.parse_args(argv)
    numbers = args.only or [e.number for e in EXERCISES]
    if unknown := [n for n in numbers if n not in BY_NUMBER]:
        parser.error(f"no exercise {unknown}; there are {sorted(BY_NUMBER)}")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="mutants-") as work:
        checks = plan(numbers, Path(work))
        results = run(checks, Path(work), max(1, args.jobs))
    failed = [r for r in results if not r[1]]
    print(f"{len(results) - len(failed)} of {len(results)} checks passed in "
          f"{time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(
            [{"exercise": c.exercise, "check": c.label, "passed": p, "detail": d,
              "seconds": round(s, 2)} for c, p, d, s in results], indent=1) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
