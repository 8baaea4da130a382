"""Exercise 4: image preprocessing (vision.smart_resize, vision.merge_window_order,
vision.preprocess_image), against transformers' Qwen2-VL image processor (PIL backend, the
official preprocessor_config.json) on real photos of several sizes and modes."""
import pytest
import torch
from PIL import Image
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

import fixtures
from checks import equal
from vision import MAX_PIXELS, MIN_PIXELS, merge_window_order, preprocess_image, smart_resize

pytestmark = pytest.mark.ex04

SIZES = [  # (height, width): ordinary, rounding up and down, tiny, huge, long and thin
    (300, 451), (512, 512), (500, 700), (17, 30), (20, 20), (33, 47),
    (4000, 6000), (10000, 10000), (40, 3000), (3000, 40), (1, 150), (255, 257),
]


def test_smart_resize_equals_the_reference():
    for height, width in SIZES:
        want = reference(height, width, factor=32, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        got = smart_resize(height, width)
        assert tuple(got) == want, f"smart_resize({height}, {width}) = {got}, expected {want}"


def test_smart_resize_refuses_an_aspect_ratio_over_200():
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(20, 4020)


def test_merge_window_order_by_hand():
    """A 4 x 4 grid numbered in raster order: each 2 x 2 window becomes 4 consecutive rows,
    the windows themselves in raster order."""
    grid = torch.arange(16).view(4, 4)
    want = torch.tensor([0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15])
    equal(merge_window_order(grid, 4, 4), want, "merge_window_order of a 4 x 4 grid")


def test_merge_window_order_keeps_trailing_axes():
    grid = torch.arange(4 * 6 * 3).view(4, 6, 3)  # rows, columns, a feature of 3
    got = merge_window_order(grid, 4, 6)
    rows, cols = [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 1, 1], [0, 1, 0, 1, 2, 3, 2, 3, 4, 5, 4, 5]
    want = torch.stack([grid[r, c] for r, c in zip(rows, cols)])  # the first row of windows
    equal(got[:12], want, "merge_window_order of a 4 x 6 x 3 grid, first row of windows")
    equal(torch.tensor(got.shape), torch.tensor([24, 3]), "shape of merge_window_order (4, 6, 3)")


def where(index):
    """Patch row and (channel, frame, y, x) within it of a flat index into pixel_values."""
    patch, rest = divmod(index, 3 * 2 * 16 * 16)
    channel, rest = divmod(rest, 2 * 16 * 16)
    frame, rest = divmod(rest, 16 * 16)
    return f"patch {patch}, channel {channel}, frame {frame}, pixel (y {rest // 16}, x {rest % 16})"


IMAGES = {  # name -> the image, made from the real photos
    "RGB 451 x 300": lambda p: p["chelsea"],
    "grayscale": lambda p: p["camera"].reduce(2),
    "RGBA": lambda p: p["chelsea_rgba"].reduce(2),
    "palette": lambda p: p["coffee_p"],
    "20 x 20, scaled up": lambda p: p["chelsea"].resize((20, 20), Image.BICUBIC),
    "3000 x 40 strip": lambda p: p["rocket"].resize((3000, 40), Image.BICUBIC),
}


@pytest.fixture(scope="module")
def processor():
    return fixtures.reference_image_processor()


@pytest.mark.parametrize("name", IMAGES)
def test_pixel_values_equal_the_reference(name, photos, processor):
    image = IMAGES[name](photos)
    want = processor(images=[image], return_tensors="pt")
    pixel_values, grid = preprocess_image(image)
    equal(grid, want["image_grid_thw"], f"grid_thw of {name}")
    want = want["pixel_values"]
    assert pixel_values.shape == want.shape, (
        f"pixel_values of {name}: shape {tuple(pixel_values.shape)}, expected {tuple(want.shape)}")
    assert pixel_values.dtype == torch.float32, f"pixel_values dtype {pixel_values.dtype}"
    delta = (pixel_values - want).abs()
    if delta.max() > 1e-5:
        index = int(delta.argmax())
        raise AssertionError(
            f"pixel_values of {name}: {pixel_values.flatten()[index]:.4f} at {where(index)}, "
            f"expected {want.flatten()[index]:.4f} ({int((delta > 1e-5).sum())} of "
            f"{delta.numel()} values differ)")
