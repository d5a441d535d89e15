import numpy as np
import pytest
import torch
from PIL import Image

from functional_mm.data import image
from functional_mm.data.sources import MediaError


def _img(h, w, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


# Sizes chosen to hit each smart-resize branch (round, shrink to max_pixels, grow to min_pixels) and odd aspects.
@pytest.mark.parametrize("hw", [(50, 80), (223, 97), (20, 30), (28, 280), (131, 131)])
def test_qwen2_vl_patches_equal_transformers(hw):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
        smart_resize,
    )

    img = _img(*hw)
    kw = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 12)
    ref = Qwen2VLImageProcessorPil(**kw)(images=[img], return_tensors="np")
    patches, grid = image.qwen2_vl_patches(img, **kw)
    assert grid.tolist() == ref["image_grid_thw"][0].tolist()
    assert image.smart_resize(*hw, 28, **kw) == smart_resize(*hw, 28, **kw)
    # Bit-identical: same PIL resize, same float64 rescale, same float32 normalise.
    np.testing.assert_array_equal(patches.numpy(), ref["pixel_values"])


def test_qwen2_vl_video_frames_pad_to_temporal_patch():
    frames = [_img(56, 84, s) for s in range(3)]
    patches, grid = image.qwen2_vl_patches(frames)
    assert grid.tolist() == [2, 4, 6] and patches.shape == (2 * 4 * 6, 3 * 2 * 14 * 14)
    # The padded 4th frame repeats the 3rd: in the second temporal slot both halves are equal.
    second = patches[24:].reshape(24, 3, 2, 14 * 14)
    assert torch.equal(second[:, :, 0], second[:, :, 1])


@pytest.mark.parametrize(
    "hw,max_tiles", [((50, 80), 6), ((40, 200), 6), ((64, 64), 4), ((30, 50), 1), ((90, 31), 12)]
)
def test_internvl_tiles_equal_transformers(hw, max_tiles):
    # transformers' InternVL processor uses GotOcr2's image processor (crop_to_patches); its PIL backend needs no
    # torchvision. Tiles are normalised with the same arithmetic, so the result must be bit-identical.
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    img, tile = _img(*hw), 32
    ref = GotOcr2ImageProcessorPil(
        size={"height": tile, "width": tile},
        crop_to_patches=True,
        max_patches=max_tiles,
        image_mean=image.IMAGENET[0],
        image_std=image.IMAGENET[1],
    )(images=[img], return_tensors="np")
    tiles = image.internvl_tiles(img, tile_size=tile, max_tiles=max_tiles)
    ours = image.normalize(image.to_tensor(tiles), *image.IMAGENET)
    assert len(tiles) == ref["num_patches"][0]
    np.testing.assert_array_equal(ours.numpy(), np.asarray(ref["pixel_values"]))


def test_resize_and_crops():
    img = _img(60, 100)
    assert image.resize_short_side(img, 30).size == (50, 30)
    assert image.resize_short_side(img, 30, max_long=40).size == (40, 24)
    small = image.resize_max_area(img, 1000, multiple=8)
    assert small.size[0] * small.size[1] <= 1000 and small.size[0] % 8 == 0 and small.size[1] % 8 == 0
    cover = image.resize_cover(img, (64, 64))
    assert cover.size[1] == 64 and cover.size[0] >= 64
    c = image.center_crop(cover, (64, 64))
    assert c.size == (64, 64)
    rng = np.random.default_rng(0)
    r1 = image.random_crop(img, (20, 20), rng)
    r2 = image.random_crop(img, (20, 20), np.random.default_rng(0))
    assert np.array_equal(np.asarray(r1), np.asarray(r2))
    crops = image.stride_crops(img, (40, 40), 30)  # rows at 0, 20; cols at 0, 30, 60
    assert len(crops) == 6 and all(c.size == (40, 40) for c in crops)
    with pytest.raises(ValueError, match="does not fit"):
        image.crop(img, 50, 0, (20, 20))


def test_normalize_matches_formula_and_rgba_goes_on_white(tmp_path):
    x = image.to_tensor(_img(4, 5))
    y = image.normalize(x, *image.CLIP)
    ref = (x.double() / 255 - torch.tensor(image.CLIP[0]).double()[:, None, None]) / torch.tensor(
        image.CLIP[1]
    ).double()[:, None, None]
    assert y.dtype == torch.float32 and torch.allclose(y.double(), ref, atol=1e-6)
    rgba = Image.new("RGBA", (3, 3), (0, 0, 0, 0))
    rgba.save(tmp_path / "t.png")
    assert np.asarray(image.load_image(str(tmp_path / "t.png"))).min() == 255


def test_load_image_errors_are_media_errors(tmp_path):
    with pytest.raises(MediaError, match="not found"):
        image.load_image(str(tmp_path / "missing.png"))
    _img(32, 32).save(tmp_path / "ok.png")
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(MediaError, match="cut.png"):
        image.load_image(str(tmp_path / "cut.png"))
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    with pytest.raises(MediaError, match="cannot decode"):
        image.load_image(str(tmp_path / "junk.jpg"))
