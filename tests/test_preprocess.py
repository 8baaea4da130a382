"""Image preprocessing: pixel_values and grid_thw equal to the reference image processor's (PIL
backend) on real photos of several sizes and modes and on the extremes of the pixel budget; and
images given as files, through the chat format, equal to the reference processor's."""
import pytest
import torch
from PIL import Image

import fixtures as fx
import processor
import load_qwen
from vision import MAX_PIXELS, MIN_PIXELS, preprocess_image


@pytest.fixture(scope="module")
def reference():
    return fx.reference_image_processor()


def assert_same_as_reference(image, reference):
    """Returns (grid rows, grid columns) after asserting ours equals the reference's output."""
    want = reference(images=[image], return_tensors="pt")
    pixel_values, grid = preprocess_image(image)
    assert grid.tolist() == want["image_grid_thw"].tolist()
    assert pixel_values.dtype == want["pixel_values"].dtype == torch.float32
    assert pixel_values.shape == want["pixel_values"].shape
    delta = (pixel_values - want["pixel_values"]).abs().max().item()
    print(f"{image.mode} {image.size}: grid {grid.tolist()}, max |dpixel| {delta:.1e}")
    assert delta <= 1e-6
    return grid[0, 1].item(), grid[0, 2].item()


def with_transparent_index(image):
    """A palette image whose colour 0 is transparent (composited onto white, like RGBA)."""
    image = image.copy()
    image.info["transparency"] = 0
    return image


DERIVED = {  # name -> how the image is made from the real photos
    "palette, transparent index": lambda p: with_transparent_index(p["coffee_p"]),
    "20x20": lambda p: p["chelsea"].resize((20, 20), Image.BICUBIC),
    "3000x40 strip": lambda p: p["rocket"].resize((3000, 40), Image.BICUBIC),
}


# modes RGB, L, RGBA, P
PHOTOS = ["chelsea", "astronaut", "coffee", "camera", "rocket", "chelsea_rgba", "coffee_p"]


@pytest.mark.parametrize("name", PHOTOS + list(DERIVED))
def test_pixel_values_equal_the_reference(name, photos, reference):
    image = DERIVED[name](photos) if name in DERIVED else photos[name]
    h, w = assert_same_as_reference(image, reference)
    assert MIN_PIXELS <= h * w * 16 * 16 <= MAX_PIXELS
    if name == "20x20":  # scaled up to the smallest pixel budget
        assert image.width * image.height < MIN_PIXELS
    if name == "3000x40 strip":
        assert (h, w) == (2, 188)


def test_a_6000x4000_photo_is_scaled_down_to_the_pixel_budget(photos, reference):
    # 24 M pixels, over the 16.8 M budget
    image = photos["coffee"].resize((6000, 4000), Image.BICUBIC)
    h, w = assert_same_as_reference(image, reference)
    assert h * w * 16 * 16 <= MAX_PIXELS < image.width * image.height
    assert (h, w) == (208, 312)


def test_aspect_ratio_over_200_is_refused_like_the_reference(photos, reference):
    image = photos["rocket"].resize((4020, 20), Image.BICUBIC)  # 201:1
    with pytest.raises(ValueError, match="aspect ratio"):
        reference(images=[image], return_tensors="pt")
    with pytest.raises(ValueError, match="aspect ratio"):
        preprocess_image(image)


@pytest.fixture(scope="module")
def tokenizer(tiny_tied):
    return processor.load_tokenizer(tiny_tied)


def rotated_jpeg(photos, path):
    """A JPEG stored sideways with EXIF Orientation 6 ("turn 90 degrees clockwise to view"), as
    phone cameras write them."""
    exif = Image.Exif()
    exif[0x0112] = 6
    photos["rocket"].save(path, exif=exif.tobytes(), quality=90)


FILES = {  # file name -> how it is written
    "plain.jpg": lambda photos, path: photos["rocket"].save(path, quality=90),
    "exif_rotated.jpg": rotated_jpeg,
    "transparent.png": lambda photos, path: photos["chelsea_rgba"].save(path),
}


@pytest.mark.parametrize("name, key", [(name, "image") for name in FILES] + [("plain.jpg", "path")])
def test_image_files_in_a_chat_equal_the_processor(name, key, tmp_path, photos, tokenizer,
                                                   ref_processor):
    """The reference opens files with transformers.image_utils.load_image: EXIF orientation
    applied, then a plain RGB conversion; the file may be named by "image" or "path"."""
    FILES[name](photos, tmp_path / name)
    messages = [{"role": "user", "content": [{"type": "image", key: str(tmp_path / name)},
                                             {"type": "text", "text": "What is this?"}]}]
    want = ref_processor.apply_chat_template(messages, tokenize=True, add_generation_prompt=True,
                                             return_dict=True, return_tensors="pt")
    ids, pixel_values, grid = processor.encode_chat(tokenizer, messages)
    assert ids.tolist() == want["input_ids"].tolist()
    assert grid.tolist() == want["image_grid_thw"].tolist()
    assert torch.equal(pixel_values, want["pixel_values"])
