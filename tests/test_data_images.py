"""Images read as users expect: every PIL mode the formats allow becomes the right RGB picture
(16-bit scaled, not clipped) or a one-line ImageError naming the file; bombs and broken files too."""
import numpy as np
import pytest
from PIL import Image

from hist_vlm.data.images import MAX_PIXELS_ENV, ImageError, open_rgb

GRADIENT = np.linspace(0, 65535, 32 * 32).reshape(32, 32)   # a left-to-right, top-to-bottom ramp


def test_a_16_bit_png_gradient_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "g16.png"
    Image.fromarray(GRADIENT.astype(np.uint16)).save(path)
    assert Image.open(path).mode == "I;16"
    assert np.asarray(Image.open(path).convert("RGB")).mean() > 250       # what a plain convert gives
    rgb = np.asarray(open_rgb(path))
    assert rgb.shape == (32, 32, 3) and rgb[0, 0].tolist() == [0, 0, 0] and rgb[-1, -1].tolist() == [255] * 3
    expected = np.rint(GRADIENT.astype(np.uint16) / 257)                  # 65535 / 257 = 255 exactly
    np.testing.assert_array_equal(rgb[..., 0], expected)
    assert abs(rgb.mean() - 127.5) < 1


@pytest.mark.parametrize("mode, values, suffix", [
    ("I", GRADIENT.astype(np.int32), ".tif"),
    ("F", (GRADIENT / 65535).astype(np.float32), ".tif"),
])
def test_32_bit_and_float_grey(tmp_path, mode, values, suffix):
    path = tmp_path / f"g{suffix}"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode == mode
    rgb = np.asarray(open_rgb(path))
    assert rgb[0, 0, 0] == 0 and rgb[-1, -1, 0] == 255 and abs(rgb.mean() - 127.5) < 1


@pytest.mark.parametrize("image, rgb", [
    (Image.new("1", (4, 4), 1), [255, 255, 255]),
    (Image.new("L", (4, 4), 77), [77, 77, 77]),
    (Image.new("RGBA", (4, 4), (10, 20, 30, 0)), [10, 20, 30]),
    (Image.new("LA", (4, 4), (90, 255)), [90, 90, 90]),
    (Image.new("CMYK", (4, 4), (0, 255, 255, 0)), [255, 0, 0]),
])
def test_other_modes_become_their_rgb_picture(tmp_path, image, rgb):
    path = tmp_path / ("x.jpg" if image.mode == "CMYK" else "x.png")
    image.save(path)
    assert np.asarray(open_rgb(path))[1, 1].tolist() == rgb


def test_a_palette_image(tmp_path):
    image = Image.new("P", (4, 4), 1)
    image.putpalette([0, 0, 0, 200, 100, 50] + [0] * 762)
    image.save(tmp_path / "p.png")
    assert np.asarray(open_rgb(tmp_path / "p.png"))[0, 0].tolist() == [200, 100, 50]


def test_out_of_range_float_and_int_are_refused(tmp_path):
    Image.fromarray(np.full((4, 4), 3.0, np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ImageError, match=r"f.tif: floating-point image with values outside \[0, 1\]"):
        open_rgb(tmp_path / "f.tif")
    Image.fromarray(np.full((4, 4), 70000, np.int32)).save(tmp_path / "i.tif")
    with pytest.raises(ImageError, match="outside 0..65535"):
        open_rgb(tmp_path / "i.tif")


def test_broken_files_are_one_line_errors_naming_the_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "text.jpg").write_text("not an image")
    Image.fromarray(GRADIENT.astype(np.uint16)).save(tmp_path / "whole.png")
    data = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    for name in ("empty.png", "text.jpg", "cut.png"):
        with pytest.raises(ImageError) as err:
            open_rgb(tmp_path / name)
        assert str(tmp_path / name) in str(err.value) and "\n" not in str(err.value)


def test_a_decompression_bomb_is_refused_and_the_limit_is_an_option(tmp_path, monkeypatch):
    Image.new("L", (300, 200)).save(tmp_path / "wide.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "50000")
    with pytest.raises(ImageError, match=r"300 x 200 pixels is over the limit of 50,000"):
        open_rgb(tmp_path / "wide.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "20000")                       # above twice the limit: Pillow's own check
    with pytest.raises(ImageError, match="more than twice the limit of 20,000"):
        open_rgb(tmp_path / "wide.png")
    monkeypatch.setenv(MAX_PIXELS_ENV, "60000")
    assert open_rgb(tmp_path / "wide.png").size == (300, 200)
    monkeypatch.setenv(MAX_PIXELS_ENV, "lots")
    with pytest.raises(ImageError, match="HIST_VLM_MAX_IMAGE_PIXELS='lots'"):
        open_rgb(tmp_path / "wide.png")
