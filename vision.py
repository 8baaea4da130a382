"""
The Qwen3-VL vision encoder and the image preprocessing that feeds it.

    preprocess_image(pil) -> pixel_values (N, 1536), grid_thw (1, 3)
    VisionTower(pixel_values, grid_thw) -> image embeddings (N/4, D_text), 3 DeepStack features

Mirrors transformers' `Qwen3VLVisionModel` and `Qwen2VLImageProcessorPil`. Left out on purpose:
video (frames with timestamps), flash-attention varlen kernels, the torchvision preprocessing
backend (it differs from the PIL backend by up to ~0.09 in pixel values).

Shape legend: N patches of all images together, n patches of one image, C vision width,
h, w patch-grid rows / columns of one image, D the text decoder width.
"""
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageOps

# -----------------------------------------------------------------------------
# preprocessing (the official preprocessor_config.json, PIL backend)

PATCH, MERGE, TEMPORAL = 16, 2, 2        # patch side, 2x2 merge window, frames per patch
MIN_PIXELS, MAX_PIXELS = 65536, 16777216  # size.shortest_edge / size.longest_edge


def smart_resize(height, width, factor=PATCH * MERGE, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS):
    """Sides become multiples of `factor`, aspect kept, pixel count within the budget
    (mirrors `smart_resize` of the reference image processor)."""
    if max(height, width) / min(height, width) > 200:
        ratio = max(height, width) / min(height, width)
        raise ValueError(f"image aspect ratio {ratio:.0f}:1 is over 200:1")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def to_rgb(image):
    """RGB, with any transparency composited onto white (as the reference's convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def open_image(path):
    """PIL's lazy open of an image file (the header is read, the pixels when needed), refusing
    a path that is not a regular file: PIL would wait on a FIFO (named pipe) or a device
    forever. A file object (chat.py's uploads, in memory) is opened as it is."""
    if not hasattr(path, "read") and os.path.exists(path) and not os.path.isfile(path):
        raise OSError(f"{path} is not a regular file")  # the callers name it an unreadable image
    return Image.open(path)


def load_image(path):
    """Open and fully decode an image file, upright and RGB, as the reference's load_image does
    (EXIF rotation applied; for files, transparency is dropped rather than composited). A
    missing, unreadable or truncated file raises ValueError naming the file."""
    try:
        image = open_image(path)
        image.load()  # PIL decodes lazily: force it here so a truncated file fails now
        return ImageOps.exif_transpose(image).convert("RGB")
    except (OSError, SyntaxError, Image.DecompressionBombError) as e:  # missing ones too
        raise ValueError(f"cannot read image {path}: {e}") from None


def preprocess_image(image):
    """PIL image -> (pixel_values (n, 3*2*16*16) float32, grid_thw (1, 3) long)."""
    image = to_rgb(image)
    H, W = smart_resize(image.height, image.width)
    image = image.resize((W, H), resample=Image.BICUBIC)  # PIL takes (width, height)
    x = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(H, W, 3)
    x = x.permute(2, 0, 1)                                                   # (3, H, W)
    # rescale in float64 as the reference does, then normalise with mean = std = 0.5
    x = ((x.double() * (1 / 255)).float() - 0.5) / 0.5
    h, w = H // PATCH, W // PATCH
    # (3, H, W) -> (h/2, w/2, 2, 2, 3, 16, 16): each 2x2 merge window becomes 4 consecutive rows
    x = x.reshape(3, h // MERGE, MERGE, PATCH, w // MERGE, MERGE, PATCH)
    x = x.permute(1, 4, 2, 5, 0, 3, 6)
    # a still image is its own second frame: (..., 3, 16, 16) -> (..., 3, 2, 16, 16)
    x = x[:, :, :, :, :, None].expand(*x.shape[:5], TEMPORAL, PATCH, PATCH)
    pixel_values = x.reshape(h * w, 3 * TEMPORAL * PATCH * PATCH)                      # (n, 1536)
    return pixel_values, torch.tensor([[1, h, w]])


# -----------------------------------------------------------------------------
# the vision tower

def merge_window_order(x, h, w):
    """(h, w, ...) in raster order -> (h*w, ...) with each 2x2 merge window contiguous."""
    x = x.reshape(h // MERGE, MERGE, w // MERGE, MERGE, *x.shape[2:])     # (h/2, 2, w/2, 2, ...)
    x = x.transpose(1, 2)                                                    # (h/2, w/2, 2, 2, ...)
    return x.reshape(h * w, *x.shape[4:])


def rotate_half(x):
    """(x1, x2) -> (-x2, x1), the two halves of the last axis: a quarter turn of each pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x, cos, sin):
    """Rotary embedding of x (..., hd): each pair (x_i, x_i+hd/2) turned by its angle. Shared by
    the vision tower (2-D angles) and the text decoder (3-D multimodal angles, model.py)."""
    return x * cos + rotate_half(x) * sin


class VisionAttention(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.vision_num_heads
        self.qkv = nn.Linear(config.vision_hidden_size, 3 * config.vision_hidden_size)
        self.proj = nn.Linear(config.vision_hidden_size, config.vision_hidden_size)

    def forward(self, x, cos, sin, lengths):
        N, C = x.shape
        q, k, v = self.qkv(x).view(N, 3, self.n_head, C // self.n_head).unbind(1)  # 3 x (N, nh, hd)
        # 2-D rotary in float32, as the reference's apply_rotary_pos_emb_vision
        q = apply_rope(q.float(), cos, sin).to(v.dtype)
        k = apply_rope(k.float(), cos, sin).to(v.dtype)
        # full (non-causal) attention inside each image, never across images
        out = []
        per_image = (t.transpose(0, 1).split(lengths, dim=1) for t in (q, k, v))  # (nh, n, hd)
        for qi, ki, vi in zip(*per_image):
            # a leading batch dimension of 1: the fused CPU kernel only takes 4-D inputs
            y = F.scaled_dot_product_attention(qi[None], ki[None], vi[None])[0]     # (nh, n, hd)
            out.append(y.transpose(0, 1))                                         # (n, nh, hd)
        return self.proj(torch.cat(out).reshape(N, C))


class VisionMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.linear_fc1 = nn.Linear(config.vision_hidden_size, config.vision_intermediate_size)
        self.linear_fc2 = nn.Linear(config.vision_intermediate_size, config.vision_hidden_size)

    def forward(self, x):
        # the vision blocks' GELU is the tanh approximation (gelu_pytorch_tanh)
        return self.linear_fc2(F.gelu(self.linear_fc1(x), approximate="tanh"))


class VisionBlock(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.vision_hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(config.vision_hidden_size, eps=1e-6)
        self.attn = VisionAttention(config)
        self.mlp = VisionMLP(config)

    def forward(self, x, cos, sin, lengths):
        x = x + self.attn(self.norm1(x), cos, sin, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """2x2 neighbouring patches -> one token of the text width. The final merger normalises each
    patch before the shuffle (width C); the DeepStack mergers normalise after it (width 4C)."""

    def __init__(self, config, postshuffle_norm):
        super().__init__()
        C4 = config.vision_hidden_size * MERGE**2
        self.postshuffle_norm = postshuffle_norm
        self.norm = nn.LayerNorm(C4 if postshuffle_norm else config.vision_hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(C4, C4)
        self.linear_fc2 = nn.Linear(C4, config.hidden_size)

    def forward(self, x):
        C4 = self.linear_fc1.in_features
        if self.postshuffle_norm:
            x = self.norm(x.view(-1, C4))                                        # (N/4, 4C)
        else:
            x = self.norm(x).view(-1, C4)                                        # (N/4, 4C)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))  # mergers: exact (erf) GELU


class VisionTower(nn.Module):
    def __init__(self, config):
        super().__init__()
        C = config.vision_hidden_size
        # The checkpoint stores a Conv3d with kernel == stride: that is a Linear over each patch's
        # 3*2*16*16 values, which is how we hold it (load_qwen.py flattens the kernel).
        self.patch_embed = nn.Linear(3 * TEMPORAL * PATCH * PATCH, C)
        self.pos_embed = nn.Embedding(config.vision_num_position_embeddings, C)
        self.blocks = nn.ModuleList(VisionBlock(config) for _ in range(config.vision_depth))
        self.merger = PatchMerger(config, postshuffle_norm=False)
        self.deepstack_indexes = list(config.vision_deepstack_indexes)
        self.deepstack_merger_list = nn.ModuleList(
            PatchMerger(config, postshuffle_norm=True) for _ in self.deepstack_indexes)
        self.head_dim = C // config.vision_num_heads

    def position_embedding(self, h, w):
        """The learned 48x48 grid, bilinearly resampled (corners aligned) to (h, w): (h*w, C)."""
        side = int(self.pos_embed.num_embeddings ** 0.5)
        grid = self.pos_embed.weight.view(side, side, -1).permute(2, 0, 1)[None]  # (1,C,48,48)
        grid = F.interpolate(grid.float(), size=(h, w), mode="bilinear", align_corners=True)
        return merge_window_order(grid[0].permute(1, 2, 0), h, w)                         # (h*w, C)

    def rotary(self, h, w, device):
        """2-D rotary angles: the first half of the frequencies turn with the row, the second with
        the column. Returns cos, sin (h*w, 1, head_dim); both halves of a head turn alike."""
        dim = self.head_dim // 2
        inv_freq = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, device=device).float() / dim)
        rows, cols = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device),
                                    indexing="ij")                               # (h, w) each
        rc = merge_window_order(torch.stack([rows, cols], dim=-1), h, w).float()          # (h*w, 2)
        freqs = (rc[:, :, None] * inv_freq).flatten(1)                           # (h*w, dim)
        cos, sin = freqs.cos(), freqs.sin()
        cos, sin = torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)  # (h*w, hd)
        return cos[:, None], sin[:, None]

    def forward(self, pixel_values, grid_thw):
        """(N, 1536), (images, 3) -> image embeddings (N/4, D), 3 DeepStack features (N/4, D)."""
        if any(t != 1 for t, _, _ in grid_thw.tolist()):
            raise ValueError("only still images (grid t == 1) are supported: video is left out")
        grids = [(h, w) for _, h, w in grid_thw.tolist()]
        x = self.patch_embed(pixel_values.to(self.pos_embed.weight.dtype))            # (N, C)
        x = x + torch.cat([self.position_embedding(h, w) for h, w in grids]).to(x.dtype)
        cos, sin = (torch.cat(t) for t in zip(*(self.rotary(h, w, x.device) for h, w in grids)))
        lengths = [h * w for h, w in grids]
        deepstack = []
        for i, block in enumerate(self.blocks):
            x = block(x, cos, sin, lengths)
            if i in self.deepstack_indexes:  # after these blocks, for decoder layers 0, 1, 2
                deepstack.append(self.deepstack_merger_list[self.deepstack_indexes.index(i)](x))
        return self.merger(x), deepstack
