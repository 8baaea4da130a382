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


LIMITS = [  # (height, width) at each limit, where a mistake by one comparison shows
    (272, 1008), (336, 400),      # 8.5 and 31.5, 10.5 and 12.5 patches of 32: halves to even
    (4100, 4090),                 # 4096 x 4096 after rounding: exactly max_pixels, kept
    (250, 260),                   # 256 x 256 after rounding: exactly min_pixels, kept
    (20, 4000), (4000, 20),       # an aspect ratio of exactly 200, either way: accepted
    (1, 200), (200, 1), (1, 1),   # one pixel high, wide, both
    (100_000, 60_000),            # far over the budget
]


@pytest.mark.parametrize("height, width", LIMITS)
def test_smart_resize_at_its_limits(height, width):
    want = reference(height, width, factor=32, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    got = smart_resize(height, width)
    assert tuple(got) == want, f"smart_resize({height}, {width}) = {got}, expected {want}"


def test_smart_resize_over_random_sizes():
    """300 sizes, seeded, each side from 1 to 30,000 pixels (log-uniform), aspect ratio up to
    200, against the reference."""
    generator = torch.Generator().manual_seed(12)
    sides = (10 ** (torch.rand(300, 2, generator=generator) * 4.5)).round().clamp(min=1).long()
    for height, width in sides.tolist():
        if max(height, width) / min(height, width) > 200:
            continue
        want = reference(height, width, factor=32, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
        got = smart_resize(height, width)
        assert tuple(got) == want, f"smart_resize({height}, {width}) = {got}, expected {want}"


@pytest.mark.parametrize("height, width", [(20, 4001), (4001, 20), (1, 201), (201, 1),
                                           (20, 4020)])
def test_smart_resize_refuses_an_aspect_ratio_over_200(height, width):
    """Over 200 either way (wide or tall), even by a little, is refused; exactly 200 is not
    (test_smart_resize_at_its_limits)."""
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(height, width)


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


def test_merge_window_order_over_random_grids():
    """Even grids of 2 to 12 rows and columns, with 0 to 2 trailing axes, seeded, against the
    order written out: window (i, j) in raster order, then its patches (2i, 2j), (2i, 2j + 1),
    (2i + 1, 2j), (2i + 1, 2j + 1)."""
    generator = torch.Generator().manual_seed(13)
    for case in range(10):
        h, w = (2 * torch.randint(1, 7, (2,), generator=generator)).tolist()
        trailing = torch.randint(1, 4, (case % 3,), generator=generator).tolist()
        grid = torch.randn(h, w, *trailing, generator=generator)
        order = [(2 * i + a, 2 * j + b) for i in range(h // 2) for j in range(w // 2)
                 for a in (0, 1) for b in (0, 1)]
        want = torch.stack([grid[r, c] for r, c in order])
        before = grid.clone()
        equal(merge_window_order(grid, h, w), want,
              f"merge_window_order of a {h} x {w} grid with trailing axes {trailing}")
        equal(grid, before, f"the {h} x {w} grid after merge_window_order")


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
    "4000 x 20, aspect ratio 200": lambda p: p["rocket"].resize((4000, 20), Image.BICUBIC),
    "1 x 1 pixel": lambda p: p["coffee"].resize((1, 1), Image.BICUBIC),
}


@pytest.fixture(scope="module")
def processor():
    return fixtures.reference_image_processor()


@pytest.mark.parametrize("name", IMAGES)
def test_pixel_values_equal_the_reference(name, photos, processor):
    image = IMAGES[name](photos)
    want = processor(images=[image], return_tensors="pt")
    before = (image.mode, image.size, image.tobytes())
    pixel_values, grid = preprocess_image(image)
    assert (image.mode, image.size, image.tobytes()) == before, (
        f"preprocess_image changed the image it was given ({name}): resize and convert return "
        "new images, thumbnail and paste change the image in place")
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
