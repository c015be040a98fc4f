import numpy as np

from cellbatch.crop import background_colour, crop_window


def test_crop_is_centred_on_the_cell():
    image = np.zeros((480, 640, 3), np.uint8)
    image[240, 320] = 255
    crop, window = crop_window(image, 320.2, 239.7, size=256)
    assert window == (192, 112, 448, 368)
    assert crop.shape == (256, 256, 3)
    assert tuple(np.argwhere(crop[..., 0] == 255)[0]) == (128, 128)


def test_crop_past_the_border_is_padded_with_fill():
    image = np.full((100, 100, 3), 50, np.uint8)
    crop, (x0, y0, x1, y1) = crop_window(image, 5, 95, size=64, fill=np.array([1, 2, 3], np.uint8))
    assert (x0, y0) == (-27, 63)
    assert (crop[0, 0] == [1, 2, 3]).all()  # left of the image
    assert (crop[-1, -1] == [1, 2, 3]).all()  # below the image
    assert (crop[10, 40] == 50).all()  # inside the image


def test_mask_crop_pads_with_background():
    labels = np.full((50, 50), 3, np.uint8)
    mask, _ = crop_window(labels, 0, 0, size=32, fill=0)
    assert mask[0, 0] == 0 and mask[20, 20] == 3


def test_background_colour_uses_background_labels():
    image = np.zeros((40, 40, 3), np.uint8)
    image[:20] = (230, 220, 210)
    labels = np.ones((40, 40), np.uint8)
    labels[:20] = 0
    assert background_colour(image, labels).tolist() == [230, 220, 210]


def test_median_uint8_equals_numpys_median_truncated():
    from cellbatch.crop import median_uint8

    rng = np.random.default_rng(3)
    for n in (16, 17, 255, 4096):
        for coarse in (False, True):  # ties and gaps in the histogram
            pixels = rng.integers(0, 256, (n, 3), dtype=np.uint8)
            if coarse:
                pixels = pixels // 64 * 64
            np.testing.assert_array_equal(median_uint8(pixels), np.median(pixels, axis=0).astype(np.uint8))


def test_opencv_and_numpy_crops_agree_for_every_layout_and_position():
    # uint8 with up to 4 channels is cut by OpenCV; other types keep numpy's path: both must agree
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (90, 120, 4), dtype=np.uint8)
    for image in (rgba[..., :3], rgba[:, ::-1, :3], rgba[..., 0], rgba[..., :1], rgba):
        wide = image.astype(np.uint16)
        for _ in range(40):
            cx, cy = rng.uniform(-80, 200, 2)
            size = int(rng.choice([1, 31, 64]))
            fill = rng.integers(0, 256, image.shape[2:]) if image.ndim == 3 else int(rng.integers(0, 256))
            crop, window = crop_window(image, cx, cy, size=size, fill=fill)
            reference, same_window = crop_window(wide, cx, cy, size=size, fill=fill)
            assert window == same_window and crop.dtype == np.uint8 and crop.shape == reference.shape
            assert np.array_equal(crop, reference)


def test_background_colour_is_the_median_of_the_background_pixels():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (80, 120, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, (80, 120)).astype(np.uint8)
    expected = np.median(image[::4, ::4][labels[::4, ::4] == 0], axis=0).astype(np.uint8)
    assert np.array_equal(background_colour(image, labels), expected)
