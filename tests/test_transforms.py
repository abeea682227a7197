import io

import numpy as np
import pytest
import torch
from PIL import Image

from clip_model.transforms import OPENAI_MEAN, OPENAI_STD, EvalTransform, TrainTransform, stack


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_eval_transform_resizes_crops_centre_and_normalises() -> None:
    # 80x40 image: left quarter red, middle half green, right quarter blue. Resize to 64x32 shorter
    # side 32 then a centre 32x32 crop must be all green.
    arr = np.zeros((40, 80, 3), dtype=np.uint8)
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:60] = (0, 255, 0)
    arr[:, 60:] = (0, 0, 255)
    out = EvalTransform(32)(_png(Image.fromarray(arr)))
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    green = torch.tensor([(0 - OPENAI_MEAN[0]) / OPENAI_STD[0], (1 - OPENAI_MEAN[1]) / OPENAI_STD[1],
                          (0 - OPENAI_MEAN[2]) / OPENAI_STD[2]])
    assert torch.allclose(out[:, 4:-4, 4:-4].mean(dim=(1, 2)), green, atol=1e-3)


def test_eval_transform_mean_colour_maps_to_zero_and_accepts_grey_and_rgba() -> None:
    mean_rgb = tuple(int(round(m * 255)) for m in OPENAI_MEAN)
    out = EvalTransform(16)(Image.new("RGB", (20, 30), mean_rgb))
    assert out.abs().max() < 0.01
    assert EvalTransform(16)(_png(Image.new("L", (20, 20), 128))).shape == (3, 16, 16)
    assert EvalTransform(16)(_png(Image.new("RGBA", (20, 20), (1, 2, 3, 4)))).shape == (3, 16, 16)


def test_train_transform_is_random_square_crop_and_seedable() -> None:
    rng = np.random.default_rng(0)
    img = _png(Image.fromarray(rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)))
    a = stack(TrainTransform(32, seed=1), [img] * 4)
    b = stack(TrainTransform(32, seed=1), [img] * 4)
    assert a.shape == (4, 3, 32, 32)
    assert torch.equal(a, b)  # same seed, same crops
    assert not torch.equal(a[0], a[1])  # different crops within a run
    # `array` is the same crop sequence as NumPy (the training loaders' form, without torch).
    t = TrainTransform(32, seed=1)
    arrays = [t.array(img) for _ in range(4)]
    assert all(x.dtype == np.float32 and x.flags.c_contiguous for x in arrays)
    assert np.array_equal(np.stack(arrays), a.numpy())
    assert np.array_equal(EvalTransform(32).array(img), EvalTransform(32)(img).numpy())
    with pytest.raises(ValueError, match="scale"):
        TrainTransform(32, scale=(0.0, 1.0))


def test_drop_words_keeps_order_and_never_empties() -> None:
    import random

    from clip_model.transforms import drop_words

    caption = "a photo of a small red triangle."
    assert drop_words(caption, 0.0, random.Random(0)) == caption
    rng = random.Random(0)
    outs = [drop_words(caption, 0.3, rng) for _ in range(2000)]
    words = caption.split()
    for out in outs:
        kept = out.split()
        assert kept  # never an empty caption
        it = iter(words)
        assert all(w in it for w in kept)  # a subsequence: order kept, nothing invented
    # Each word is dropped at about the asked rate (binomial, n=2000: 0.3 +- 0.05 is > 4 sigma).
    for w in ("red", "triangle."):
        assert abs(sum(w not in o.split() for o in outs) / len(outs) - 0.3) < 0.05
    assert drop_words("", 0.5, rng) == "" and drop_words("one", 0.999, rng) == "one"
