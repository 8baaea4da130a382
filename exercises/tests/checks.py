"""What the exercises' tests share: comparisons whose errors say what differs (shape, where, by
how much), the tiny reference model of transformers beside ours with the same weights, and small
prompts. Only the reference side may use transformers; our side calls the project's code."""
from functools import lru_cache

import torch

IMAGE, VISION_START, VISION_END = 151655, 151652, 151653  # <|image_pad|>, its brackets


def close(got, want, what, atol, rtol=0.0):
    """`got` equals `want` within atol + rtol * |want|, elementwise; else an error naming `what`,
    the shape, or the worst position and its values."""
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"{what}: got {type(got).__name__}, expected a tensor")
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    if got.dtype != want.dtype:
        raise AssertionError(f"{what}: dtype {got.dtype}, expected {want.dtype}")
    if not torch.isfinite(got).all() and torch.isfinite(want).all():
        where = tuple(torch.nonzero(~torch.isfinite(got))[0].tolist())
        raise AssertionError(f"{what}: {got[where].item()} at {where}, expected "
                             f"{want[where].item()} (all values are finite)")
    torch.testing.assert_close(got, want, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


def equal(got, want, what):
    """Integer tensors equal; else an error naming the first position that differs."""
    if not isinstance(got, torch.Tensor):
        raise AssertionError(f"{what}: got {type(got).__name__}, expected a tensor")
    if got.shape != want.shape:
        raise AssertionError(f"{what}: shape {tuple(got.shape)}, expected {tuple(want.shape)}")
    differ = got != want
    if differ.any():
        where = tuple(torch.nonzero(differ)[0].tolist())
        raise AssertionError(f"{what}: {got[where].item()} at {where}, expected "
                             f"{want[where].item()} ({int(differ.sum())} of {differ.numel()} "
                             "values differ)")


def hf_config(our_config=None):
    """transformers' Qwen3VLConfig for one of our Configs (default: the tiny one), eager attention:
    plain matmul and softmax, the most literal statement of the maths."""
    from transformers import Qwen3VLConfig

    import load_qwen
    from model import tiny_config
    config = Qwen3VLConfig(**load_qwen.hf_config(our_config or tiny_config()))
    config._attn_implementation = "eager"
    config.text_config._attn_implementation = "eager"
    config.vision_config._attn_implementation = "eager"
    return config


@torch.no_grad()
def randomize(module, seed):
    """Every weight N(0, 0.02), every norm weight 1 + N(0, 0.1) and bias N(0, 0.1): a norm that is
    skipped or moved, or a bias dropped, changes the output visibly."""
    torch.manual_seed(seed)
    for child in module.modules():
        is_norm = isinstance(child, torch.nn.LayerNorm) or type(child).__name__.endswith("RMSNorm")
        for name, param in child.named_parameters(recurse=False):
            if name == "bias":
                param.normal_(0.0, 0.1)
            elif is_norm:
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.02)
    return module


def copy_weights(ours, reference):
    """Copy a transformers module's weights into ours of the same structure and names."""
    missing = ours.load_state_dict(reference.state_dict(), strict=True)
    assert not missing.missing_keys and not missing.unexpected_keys
    return ours


def models(seed=1):
    """transformers' tiny Qwen3-VL (model.tiny_config's sizes, the real vocabulary, random
    weights) and our Qwen3VL holding the same weights, both float32 and in eval mode."""
    from transformers import Qwen3VLForConditionalGeneration
    from transformers.initialization import no_init_weights

    import load_qwen
    from model import Qwen3VL, tiny_config
    with no_init_weights():  # randomize draws every weight: transformers' own draw is time lost
        reference = Qwen3VLForConditionalGeneration(hf_config())
    reference = randomize(reference, seed).eval()
    with torch.device("meta"):
        ours = Qwen3VL(tiny_config())
    ours = ours.to_empty(device="cpu")
    params = dict(ours.named_parameters())
    with torch.no_grad():
        for name, tensor in reference.state_dict().items():
            target = params[load_qwen.rename(name, load_qwen.TO_OURS)]
            target.copy_(tensor.reshape(target.shape))  # the patch Conv3d is our Linear
    return reference, ours.eval().requires_grad_(False)


def image_prompt(text_ids, grid_hw, before=(151644, 872, 198)):
    """input_ids (1, T): `before`, an image of patch grid `grid_hw` (its merged tokens between
    <|vision_start|> and <|vision_end|>), then `text_ids`; and its image_grid_thw (1, 3)."""
    h, w = grid_hw
    ids = [*before, VISION_START] + [IMAGE] * (h * w // 4) + [VISION_END, *text_ids]
    return torch.tensor([ids]), torch.tensor([[1, h, w]])


@lru_cache(maxsize=None)
def photo(name):
    """One of the real photos of tests/fixtures.py, opened alone: chelsea (a cat, 451 x 300),
    astronaut, coffee, camera (grayscale), rocket (640 x 427)."""
    import fixtures
    return fixtures._open_skimage(f"{name}.jpg" if name == "rocket" else f"{name}.png")
