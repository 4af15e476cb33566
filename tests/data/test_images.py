"""Image decoding and preprocessing against independent references (CLIPImageProcessor, hand-built arrays)."""

import io

import numpy as np
import pytest
from PIL import Image, PngImagePlugin
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from kd_pipeline.data import images


def encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


def random_rgb(width: int, height: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


@pytest.mark.parametrize("side, target", [(40, 56), (56, 28), (33, 42)])
def test_square_image_equals_clip_image_processor(side, target):
    image = random_rgb(side, side, seed=side)
    reference = CLIPImageProcessorPil(size={"shortest_edge": target}, crop_size={"height": target, "width": target})
    expected = reference(images=image, return_tensors="np")["pixel_values"][0]   # (3, S, S)
    ours = images.preprocess_image(encode(image), image_size=target, max_pixels=10**6)
    assert ours.shape == (3, target, target) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_non_square_is_padded_with_clip_mean_then_resized_like_the_processor():
    image = random_rgb(30, 18, seed=3)
    padded = images.pad_to_square(image)
    canvas = np.empty((30, 30, 3), dtype=np.uint8)
    canvas[:] = (122, 116, 104)
    canvas[6:24, :, :] = np.asarray(image)          # (30 - 18) // 2 = 6 rows above
    np.testing.assert_array_equal(np.asarray(padded), canvas)
    tall = images.pad_to_square(random_rgb(7, 12, seed=4))
    assert np.asarray(tall)[:, :2].tolist() == [[[122, 116, 104]] * 2] * 12   # (12 - 7) // 2 = 2 columns left

    reference = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    expected = reference(images=Image.fromarray(canvas), return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(images.preprocess_image(encode(image), image_size=28, max_pixels=10**6), expected,
                               atol=1e-5)


@pytest.mark.parametrize("width, height", [(389, 389), (600, 600), (389, 250), (37, 61), (1200, 800)])
def test_preprocessing_equals_llava_image_processor_with_do_pad_bit_for_bit(width, height):
    """transformers' LlavaImageProcessor configured here by hand (pad to square with the mean, bicubic resize to
    the tower's size, no crop) gives exactly the loader's pixels; ``images.image_processor`` is that processor."""
    from transformers import LlavaImageProcessorPil

    image = random_rgb(width, height, seed=width + height)
    reference = LlavaImageProcessorPil(do_pad=True, do_center_crop=False, size={"height": 56, "width": 56},
                                       resample=Image.Resampling.BICUBIC,
                                       image_mean=[0.48145466, 0.4578275, 0.40821073],
                                       image_std=[0.26862954, 0.26130258, 0.27577711])
    expected = reference(images=image, return_tensors="np")["pixel_values"][0]   # (3, 56, 56)
    ours = images.preprocess_image(encode(image), image_size=56, max_pixels=10**7)
    np.testing.assert_array_equal(ours, expected)
    exported = images.image_processor(56)(images=image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_array_equal(exported, expected)


def test_sixteen_bit_grayscale_is_scaled_not_clipped():
    values = np.array([[0, 257, 1000], [32768, 65000, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    rgb = images.to_rgb(Image.open(io.BytesIO(encode(image))))
    expected = np.rint(values.astype(np.float64) * 255 / 65535).astype(np.uint8)
    assert rgb.mode == "RGB"
    for channel in range(3):
        np.testing.assert_array_equal(np.asarray(rgb)[..., channel], expected)


def test_32_bit_integer_image_is_clipped_to_16_bit_range_then_scaled():
    values = np.array([[-5, 65535, 70000]], dtype=np.int32)
    rgb = images.to_rgb(Image.fromarray(values, mode="I"))
    np.testing.assert_array_equal(np.asarray(rgb)[0, :, 0], [0, 255, 255])


def test_grayscale_rgba_and_palette_conversions():
    gray = Image.fromarray(np.array([[0, 100], [200, 255]], dtype=np.uint8), mode="L")
    rgb = np.asarray(images.to_rgb(gray))
    for channel in range(3):
        np.testing.assert_array_equal(rgb[..., channel], np.asarray(gray))

    rgba_values = np.array([[[10, 20, 30, 0], [40, 50, 60, 255]]], dtype=np.uint8)
    rgba = Image.fromarray(rgba_values, mode="RGBA")
    np.testing.assert_array_equal(np.asarray(images.to_rgb(rgba)), rgba_values[..., :3])  # alpha dropped

    palette = random_rgb(8, 8, seed=5).quantize(colors=4)
    assert palette.mode == "P"
    np.testing.assert_array_equal(np.asarray(images.to_rgb(palette)), np.asarray(palette.convert("RGB")))


def test_pixel_limit_is_checked_before_decoding(monkeypatch):
    decoded = []
    original_load = PngImagePlugin.PngImageFile.load
    monkeypatch.setattr(PngImagePlugin.PngImageFile, "load",
                        lambda self: decoded.append(self.size) or original_load(self))
    payload = encode(random_rgb(20, 20))
    with pytest.raises(images.ImageError) as error:
        images.open_image(payload, max_pixels=399)
    assert error.value.reason == "too_many_pixels" and "data.max_image_pixels" in str(error.value)
    assert decoded == []
    assert images.open_image(payload, max_pixels=400).size == (20, 20) and decoded == [(20, 20)]


def test_pixel_limit_above_pils_own_default_is_honoured():
    payload = encode(Image.new("L", (10, 10)))
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = 20    # PIL on its own would refuse 100 pixels (> 2 x 20)
    try:
        assert images.open_image(payload, max_pixels=100).size == (10, 10)
    finally:
        Image.MAX_IMAGE_PIXELS = previous
    assert Image.MAX_IMAGE_PIXELS == previous


@pytest.mark.parametrize("payload", [encode(random_rgb(24, 24))[:-40], b"not an image at all", b""])
def test_truncated_or_garbage_bytes_raise_unreadable(payload):
    with pytest.raises(images.ImageError) as error:
        images.preprocess_image(payload, image_size=28, max_pixels=10**6)
    assert error.value.reason == "unreadable_image"


def test_blank_image_is_the_normalised_padding_colour():
    blank = images.blank_image(14)
    expected = [(c / 255 - m) / s for c, m, s in zip((122, 116, 104), images.CLIP_MEAN, images.CLIP_STD)]
    np.testing.assert_allclose(blank[:, 3, 5], expected, atol=1e-6)
