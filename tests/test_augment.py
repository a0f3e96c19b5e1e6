"""batchmates.data.augment: batched per-sample augmentation, views, multi-crop."""

from __future__ import annotations

import pytest
import torch

from batchmates.data import STRENGTHS, MultiCrop, TwoViews, eval_transform, make_augment, multicrop_sizes

torch.set_num_threads(1)

SIZES = [(8, 1), (28, 1), (32, 3)]


def _batch(size: int, ch: int, n: int = 6) -> torch.Tensor:
    g = torch.Generator().manual_seed(size)
    return torch.randint(0, 256, (n, ch, size, size), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("size,ch", SIZES)
@pytest.mark.parametrize("strength", STRENGTHS)
def test_shapes_dtype_and_reproducible(size, ch, strength):
    mean, std = [0.3] * ch, [0.2] * ch
    aug = make_augment(size, ch, mean, std, strength)
    x = _batch(size, ch)
    torch.manual_seed(0)
    a = aug(x)
    torch.manual_seed(0)
    b = aug(x)
    assert a.shape == (6, ch, size, size) and a.dtype == torch.float32
    assert torch.equal(a, b)
    lo, hi = (0 - 0.3) / 0.2, (1 - 0.3) / 0.2
    assert a.min() >= lo - 1e-5 and a.max() <= hi + 1e-5  # normalised [0, 1] values


@pytest.mark.parametrize("size,ch", SIZES)
def test_none_is_exact_normalisation_and_float_input_matches_uint8(size, ch):
    mean, std = [0.25, 0.5, 0.75][:ch], [0.5, 0.25, 0.125][:ch]
    x = _batch(size, ch)
    out = eval_transform(size, ch, mean, std)(x)
    ref = (x.double() / 255 - torch.tensor(mean, dtype=torch.float64).view(1, -1, 1, 1)) / torch.tensor(
        std, dtype=torch.float64
    ).view(1, -1, 1, 1)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(eval_transform(size, ch, mean, std)(x.float() / 255), out)
    resized = eval_transform(size, ch, mean, std, resize_to=size * 2)(x)
    assert resized.shape == (6, ch, size * 2, size * 2)


@pytest.mark.parametrize("size,ch", SIZES)
@pytest.mark.parametrize("strength", ["weak", "simclr", "barlow_a", "barlow_b"])
def test_parameters_are_drawn_per_sample(size, ch, strength):
    # a structured image (a gradient) so different crops / flips give different outputs
    ramp = torch.linspace(0, 255, size).round().to(torch.uint8)
    img = (ramp.view(1, -1) + ramp.view(-1, 1) // 3).clamp(max=255).to(torch.uint8).expand(ch, size, size)
    x = img.unsqueeze(0).repeat(16, 1, 1, 1)
    torch.manual_seed(1)
    out = make_augment(size, ch, [0.5] * ch, [0.5] * ch, strength)(x)
    distinct = {tuple(o.flatten().round(decimals=4).tolist()) for o in out}
    assert len(distinct) > 8, "identical inputs got (mostly) identical views: parameters shared across the batch"


def test_views_differ_and_two_views():
    x = _batch(28, 1, 4)
    aug = make_augment(28, 1, [0.3], [0.3], "simclr")
    torch.manual_seed(0)
    v1, v2 = TwoViews(aug)(x)
    assert v1.shape == v2.shape == (4, 1, 28, 28) and not torch.equal(v1, v2)
    a, b = make_augment(32, 3, [0.5] * 3, [0.5] * 3, "barlow_a"), make_augment(32, 3, [0.5] * 3, [0.5] * 3, "barlow_b")
    tv = TwoViews(a, b)
    assert tv.aug1 is a and tv.aug2 is b


def test_recipe_contents():
    names = lambda aug: [type(op).__name__ for op in aug.ops]  # noqa: E731
    assert "RandomHorizontalFlip" not in names(make_augment(8, 1, [0.5], [0.5], "weak", hflip=False,
                                                           backend="kornia"))
    assert "RandomHorizontalFlip" in names(make_augment(28, 1, [0.5], [0.5], "weak", backend="kornia"))
    small = names(make_augment(28, 1, [0.5], [0.5], "simclr"))
    assert "RandomGaussianBlur" not in small and "RandomGrayscale" not in small
    big = names(make_augment(96, 3, [0.5] * 3, [0.5] * 3, "simclr"))
    assert "RandomGaussianBlur" in big and "RandomGrayscale" in big
    a = make_augment(96, 3, [0.5] * 3, [0.5] * 3, "barlow_a")
    b = make_augment(96, 3, [0.5] * 3, [0.5] * 3, "barlow_b")
    blur_p = lambda aug: next(op.p for op in aug.ops if type(op).__name__ == "RandomGaussianBlur")  # noqa: E731
    assert blur_p(a) == 1.0 and blur_p(b) == pytest.approx(0.1)
    assert "RandomSolarize" in names(b) and "RandomSolarize" not in names(a)


def test_weak_padding_crop_keeps_content():
    # with p(flip)=0 the weak crop is a translation by at most `padding` pixels
    x = _batch(32, 3, 8)
    torch.manual_seed(3)
    out = make_augment(32, 3, [0.0] * 3, [1.0] * 3, "weak", hflip=False)(x)
    xf = x.float() / 255
    for i in range(8):
        found = False
        for dy in range(-4, 5):
            for dx in range(-4, 5):
                sy, sx = slice(max(dy, 0), 32 + min(dy, 0)), slice(max(dx, 0), 32 + min(dx, 0))
                ty, tx = slice(max(-dy, 0), 32 + min(-dy, 0)), slice(max(-dx, 0), 32 + min(-dx, 0))
                if torch.allclose(out[i][:, ty, tx], xf[i][:, sy, sx], atol=1e-5):
                    found = True
        assert found, f"sample {i}: weak crop is not a shift of at most 4 px"


@pytest.mark.parametrize("size,ch,expected", [(8, 1, (8, 6)), (28, 1, (28, 16)), (32, 3, (32, 18))])
def test_multicrop_sizes_and_order(size, ch, expected):
    assert multicrop_sizes(size) == expected
    high, low = expected
    mc = MultiCrop(high, low, 2, 3, channels=ch, mean=[0.5] * ch, std=[0.5] * ch, image_size=size)
    torch.manual_seed(0)
    views = mc(_batch(size, ch, 4))
    assert [tuple(v.shape[-2:]) for v in views] == [(high, high)] * 2 + [(low, low)] * 3
    assert all(v.shape[:2] == (4, ch) and v.dtype == torch.float32 for v in views)
    assert not torch.equal(views[0], views[1])


def test_validation():
    with pytest.raises(ValueError, match="strength"):
        make_augment(28, 1, [0.5], [0.5], "strong")
    with pytest.raises(ValueError, match="one value per channel"):
        make_augment(32, 3, [0.5], [0.5], "weak")
    with pytest.raises(ValueError, match="crop_scale"):
        make_augment(32, 3, [0.5] * 3, [0.5] * 3, "simclr", crop_scale=(0.5, 0.2))
    aug = make_augment(28, 1, [0.5], [0.5], "weak")
    with pytest.raises(ValueError, match="channels"):
        aug(torch.zeros(2, 3, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match="batch"):
        aug(torch.zeros(1, 28, 28, dtype=torch.uint8))
    with pytest.raises(TypeError, match="uint8"):
        aug(torch.zeros(2, 1, 28, 28, dtype=torch.int64))
    with pytest.raises(ValueError, match="low_size"):
        MultiCrop(16, 28, channels=1, mean=[0.5], std=[0.5])


def _offsets(out: torch.Tensor, size: int, pad: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Recover each sample's crop offsets and flip from a crop of the position-coded image of :func:`_coded`."""
    c = size // 2
    code = out[:, 0, c, c].round().long() - 1  # r * size + q of the source pixel under the output's centre
    right = out[:, 0, c, c + 1].round().long() - 1
    flipped = right < code
    r, q = code // size, code % size
    i = r - c + pad
    j = torch.where(flipped, q - (size - 1 - c), q - c) + pad
    return i, j, flipped


def _coded(n: int, size: int) -> torch.Tensor:
    """``n`` copies of an image whose pixel values are ``1 + row * size + col`` (float, so every pixel is unique)."""
    img = torch.arange(1, size * size + 1, dtype=torch.float32).view(1, 1, size, size)
    return img.repeat(n, 1, 1, 1)


@pytest.mark.parametrize("p_flip", [0.0, 1.0, 0.5])
def test_pad_crop_flip_is_an_exact_crop_of_the_padded_image(p_flip):
    from batchmates.data.augment import PadCropFlip

    x = torch.rand(16, 2, 12, 12)
    torch.manual_seed(4)
    out = PadCropFlip(12, 3, p_flip)(x)
    xp = torch.nn.functional.pad(x, (3, 3, 3, 3))
    flips = []
    for b in range(16):
        hits = [(i, j, f) for i in range(7) for j in range(7) for f in (False, True)
                if torch.equal(out[b], xp[b, :, i:i + 12, j:j + 12].flip(-1) if f else xp[b, :, i:i + 12, j:j + 12])]
        assert hits, f"sample {b} is not a crop of the zero-padded image"
        flips.append(hits[0][2])
    if p_flip in (0.0, 1.0):
        assert all(f == bool(p_flip) for f in flips)
    else:
        assert 0 < sum(flips) < 16


def test_torch_and_kornia_weak_crops_draw_from_the_same_distribution():
    # 4000 crops of a position-coded image: offsets uniform on [0, 2 * pad] and flips at p = 0.5 for both backends
    import kornia.augmentation as K

    from batchmates.data.augment import PadCropFlip

    n, size, pad = 4000, 28, 4
    x = _coded(n, size)
    torch.manual_seed(0)
    ours = _offsets(PadCropFlip(size, pad)(x), size, pad)
    torch.manual_seed(0)
    theirs = _offsets(K.RandomHorizontalFlip()(K.RandomCrop((size, size), padding=pad)(x)), size, pad)
    expected, sd = n / (2 * pad + 1), (n * (1 / 9) * (8 / 9)) ** 0.5
    for i, j, flipped in (ours, theirs):
        for v in (i, j):
            counts = torch.bincount(v, minlength=2 * pad + 1)
            assert counts.numel() == 2 * pad + 1 and int(v.min()) == 0
            assert (counts.float() - expected).abs().max() < 5 * sd, counts
        assert abs(flipped.float().mean().item() - 0.5) < 5 * (0.25 / n) ** 0.5


def test_weak_backends_and_their_ops():
    from batchmates.data.augment import PadCropFlip

    torch_aug = make_augment(28, 1, [0.5], [0.5], "weak")
    assert [type(op).__name__ for op in torch_aug.ops] == ["PadCropFlip"] and torch_aug.ops[0].p_flip == 0.5
    assert make_augment(8, 1, [0.5], [0.5], "weak", hflip=False).ops[0].p_flip == 0.0
    kornia_aug = make_augment(28, 1, [0.5], [0.5], "weak", backend="kornia")
    assert [type(op).__name__ for op in kornia_aug.ops] == ["RandomCrop", "RandomHorizontalFlip"]
    with pytest.raises(ValueError, match="backend"):
        make_augment(28, 1, [0.5], [0.5], "weak", backend="numpy")
    with pytest.raises(ValueError, match="does not fit"):
        PadCropFlip(40, 2)(torch.zeros(1, 1, 28, 28))


def test_dataset_crop_padding_reaches_the_weak_augmentation():
    from batchmates.config import ConfigError, DataInfo, RunConfig
    from batchmates.methods import get_method

    info = DataInfo("fashion-mnist", 10, 1, 28, (0.3,), (0.35,), crop_padding=2)
    cfg = RunConfig(method="ce", data="fashion-mnist").resolve()
    assert get_method("ce")(cfg, info).train_augment.ops[0].padding == 2
    # a checkpoint written before DataInfo had crop_padding rebuilds the augmentation it trained with
    old = DataInfo.from_dict({k: v for k, v in info.to_dict().items() if k != "crop_padding"})
    assert old.crop_padding is None and get_method("ce")(cfg, old).train_augment.ops[0].padding == 4
    # the run's --crop-padding wins over the dataset's, 0 included (flips only)
    for pad in (0, 3):
        own = cfg.replace(crop_padding=pad).resolve()
        assert get_method("ce")(own, info).train_augment.ops[0].padding == pad
    with pytest.raises(ConfigError, match="crop_padding"):
        cfg.replace(crop_padding=-1).resolve()


def test_fashion_mnist_crop_padding_scales_with_the_image_size():
    from batchmates.data import load_dataset
    from batchmates.data.datasets import DatasetNotFoundError
    from batchmates.data.datasets.fashion_mnist import CROP_PADDING

    try:
        native, big = load_dataset("fashion-mnist"), load_dataset("fashion-mnist", image_size=56)
    except DatasetNotFoundError:
        pytest.skip("Fashion-MNIST files are not on this machine")
    assert native.crop_padding == CROP_PADDING == 1 and big.crop_padding == 2
