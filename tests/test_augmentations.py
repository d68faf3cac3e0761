"""Channel augmentations (REFERENCE 5.1) checked statistically and by replaying Python's `random` stream,
and the transform chains of REFERENCE 5.2 / 5.3."""
import math
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T

import methods
from data_loader import (CIFAR_MEAN, ChannelAdapGray, ChannelExchange, ChannelRandomErasing, ChannelT,
                         build_test_transform)
from utils import ConfigError

N_TRIALS = 3000
TOL = 0.04          # > 4.5 binomial standard deviations for p in [0.25, 0.5] at N_TRIALS


def channel_image(values=(1.0, 2.0, 3.0), h=8, w=4):
    """3xHxW tensor whose channel c is the constant values[c]: every outcome is recognisable."""
    return torch.tensor(values, dtype=torch.float32).view(3, 1, 1).expand(3, h, w).clone()


def channel_values(img):
    return tuple(round(float(img[c, 0, 0]), 5) for c in range(3))


def outcome_frequencies(op, n=N_TRIALS, seed=0, **img_kw):
    random.seed(seed)
    counts = {}
    for _ in range(n):
        key = channel_values(op(channel_image(**img_kw)))
        counts[key] = counts.get(key, 0) + 1
    return {k: v / n for k, v in counts.items()}


def gray_of(values):
    return round(0.2989 * values[0] + 0.5870 * values[1] + 0.1140 * values[2], 5)


# --- ChannelExchange -------------------------------------------------------------------------------

def test_channel_exchange_three_equally_likely_outcomes():
    freqs = outcome_frequencies(ChannelExchange(gray=2))
    assert set(freqs) == {(1.0, 1.0, 1.0), (2.0, 2.0, 2.0), (3.0, 3.0, 3.0)}
    for f in freqs.values():
        assert abs(f - 1 / 3) < TOL


def test_channel_exchange_replays_one_randint_per_call():
    op = ChannelExchange(gray=2)
    random.seed(123)
    got = [channel_values(op(channel_image()))[0] for _ in range(50)]
    after = random.random()
    random.seed(123)
    expected = [float(random.randint(0, 2) + 1) for _ in range(50)]
    assert got == expected
    assert random.random() == after


def test_channel_exchange_gray_branch_reachable_only_with_gray_above_2():
    freqs = outcome_frequencies(ChannelExchange(gray=3), n=2000)
    g = gray_of((1.0, 2.0, 3.0))
    assert (g, g, g) in freqs and abs(freqs[(g, g, g)] - 0.25) < TOL


def test_channel_exchange_is_in_place():
    img = channel_image()
    random.seed(0)
    assert ChannelExchange()(img) is img


# --- ChannelAdapGray -------------------------------------------------------------------------------

def test_channel_adap_gray_50_25_25():
    freqs = outcome_frequencies(ChannelAdapGray(p=0.5))
    g = gray_of((1.0, 2.0, 3.0))
    assert set(freqs) == {(2.0, 2.0, 2.0), (g, g, g), (1.0, 2.0, 3.0)}
    assert abs(freqs[(2.0, 2.0, 2.0)] - 0.50) < TOL      # G replicated
    assert abs(freqs[(g, g, g)] - 0.25) < TOL             # weighted gray on normalised values
    assert abs(freqs[(1.0, 2.0, 3.0)] - 0.25) < TOL       # unchanged


def test_channel_adap_gray_replays_randint_then_uniform_only_on_k1():
    op = ChannelAdapGray(p=0.5)
    random.seed(7)
    got = [channel_values(op(channel_image())) for _ in range(60)]
    after = random.random()
    random.seed(7)
    g = gray_of((1.0, 2.0, 3.0))
    expected = []
    for _ in range(60):
        if random.randint(0, 1) == 0:
            expected.append((2.0, 2.0, 2.0))
        elif random.uniform(0, 1) > 0.5:
            expected.append((1.0, 2.0, 3.0))
        else:
            expected.append((g, g, g))
    assert got == expected
    assert random.random() == after


def test_channel_adap_gray_exact_gray_values():
    img = torch.randn(3, 6, 5)
    original = img.clone()
    random.seed(0)
    while True:   # find a seed state that takes the gray branch
        state = random.getstate()
        if random.randint(0, 1) == 1 and random.uniform(0, 1) <= 0.5:
            break
    random.setstate(state)
    out = ChannelAdapGray(p=0.5)(img)
    expected = 0.2989 * original[0] + 0.5870 * original[1] + 0.1140 * original[2]
    for c in range(3):
        assert torch.allclose(out[c], expected, atol=1e-6)


# --- ChannelT ---------------------------------------------------------------------------------------

def test_channel_t_probability_and_factor_range():
    random.seed(1)
    op = ChannelT(p=0.5)
    changed, factors = 0, []
    for _ in range(N_TRIALS):
        out = op(channel_image((1.0, 1.0, 1.0)))
        vals = channel_values(out)
        if vals != (1.0, 1.0, 1.0):
            changed += 1
            factors.extend(vals)
    assert abs(changed / N_TRIALS - 0.5) < TOL
    factors = np.array(factors)
    assert factors.min() >= 0.02 - 1e-6 and factors.max() <= 1.0 + 1e-6
    # 2*U(0.01, 0.5) = U(0.02, 1.0): mean 0.51, variance 0.98^2/12; range nearly covered
    assert abs(factors.mean() - 0.51) < 0.02
    assert abs(factors.var() - 0.98 ** 2 / 12) < 0.01
    assert factors.min() < 0.05 and factors.max() > 0.97


def test_channel_t_independent_channel_factors_and_rng_order():
    random.seed(5)
    img = torch.randn(3, 4, 4)
    original = img.clone()
    out = ChannelT(p=1.0)(img)
    random.seed(5)
    random.uniform(0, 1)
    factors = [2 * random.uniform(0.01, 0.5) for _ in range(3)]
    for c in range(3):
        assert torch.allclose(out[c], original[c] * factors[c])
    assert len(set(factors)) == 3


def test_channel_t_scales_normalised_values_toward_zero():
    # negative normalised values move UP toward 0 (contrast reduction, not darkening)
    random.seed(0)
    out = ChannelT(p=1.0)(channel_image((-2.0, -1.0, -0.5)))
    assert all(-2.0 <= v <= 0 for v in channel_values(out))
    assert channel_values(out)[0] > -2.0


# --- ChannelRandomErasing ----------------------------------------------------------------------------

def erased_mask(img, original):
    return (img != original).any(dim=0)


def test_channel_random_erasing_probability_fill_and_area():
    h, w = 64, 32
    random.seed(2)
    op = ChannelRandomErasing(p=0.5)
    erased, fractions, aspects = 0, [], []
    base = torch.full((3, h, w), 100.0)
    for _ in range(2000):
        img = op(base.clone())
        mask = erased_mask(img, base)
        if mask.any():
            erased += 1
            rows, cols = torch.nonzero(mask.any(dim=1)).flatten(), torch.nonzero(mask.any(dim=0)).flatten()
            rh, rw = len(rows), len(cols)
            assert rows.max() - rows.min() + 1 == rh and cols.max() - cols.min() + 1 == rw   # one rectangle
            assert int(mask.sum()) == rh * rw
            for c in range(3):
                assert torch.all(img[c][mask] == torch.tensor(CIFAR_MEAN[c], dtype=torch.float32))
            fractions.append(rh * rw / (h * w))
            aspects.append(rh / rw)
    assert abs(erased / 2000 - 0.5) < TOL
    fractions = np.array(fractions)
    # h, w are rounded: allow the rounding slack around [sl, sh] = [0.02, 0.4]
    assert fractions.min() >= 0.012 and fractions.max() <= 0.45
    assert fractions.min() < 0.04 and fractions.max() > 0.3
    assert min(aspects) < 0.5 and max(aspects) > 2.0


def official_erasing(img, p=0.5, sl=0.02, sh=0.4, r1=0.3, mean=CIFAR_MEAN):
    """Literal transcription of the official ChannelRandomErasing.__call__ (oracle)."""
    if random.uniform(0, 1) > p:
        return img
    for attempt in range(100):
        area = img.size()[1] * img.size()[2]
        target_area = random.uniform(sl, sh) * area
        aspect_ratio = random.uniform(r1, 1 / r1)
        h = int(round(math.sqrt(target_area * aspect_ratio)))
        w = int(round(math.sqrt(target_area / aspect_ratio)))
        if w < img.size()[2] and h < img.size()[1]:
            x1 = random.randint(0, img.size()[1] - h)
            y1 = random.randint(0, img.size()[2] - w)
            img[0, x1:x1 + h, y1:y1 + w] = mean[0]
            img[1, x1:x1 + h, y1:y1 + w] = mean[1]
            img[2, x1:x1 + h, y1:y1 + w] = mean[2]
            return img
    return img


@pytest.mark.parametrize("shape", [(3, 64, 32), (3, 12, 3), (3, 5, 40)])
def test_channel_random_erasing_replays_official_rng_order(shape):
    # narrow shapes force retries (attempts that do not fit consume exactly two uniforms each)
    op = ChannelRandomErasing(p=0.5)
    for seed in range(40):
        img = torch.randn(*shape)
        random.seed(seed)
        got = op(img.clone())
        after = random.random()
        random.seed(seed)
        expected = official_erasing(img.clone())
        assert torch.equal(got, expected)
        assert random.random() == after


def test_channel_random_erasing_p_bounds():
    img = torch.zeros(3, 16, 8)
    random.seed(0)
    assert torch.equal(ChannelRandomErasing(p=0.0)(img.clone()), img)
    assert not torch.equal(ChannelRandomErasing(p=1.0)(img.clone()), img)


# --- transform chains ----------------------------------------------------------------------------------

def train_transforms(method, img_h, img_w):
    """The transforms of a method's training views, in item order."""
    return tuple(transform for _, transform in methods.get(method).train_views(img_h, img_w))


def chain_names(compose):
    return [type(t).__name__ for t in compose.transforms]


def test_irl_train_transforms_match_reference_chains():
    t_rgb1, t_rgb2, t_ir1, t_ir2 = train_transforms("irl", 128, 64)
    geometry = ["Pad", "RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize", "ChannelRandomErasing"]
    assert chain_names(t_rgb1) == ["ToPILImage", "RandomGrayscale"] + geometry
    assert chain_names(t_rgb2) == ["ToPILImage"] + geometry + ["ChannelExchange"]
    assert chain_names(t_ir1) == ["ToPILImage"] + geometry + ["ChannelAdapGray"]
    assert chain_names(t_ir2) == ["ToPILImage", "ColorJitter"] + geometry + ["ChannelT"]
    pad, crop, flip = t_rgb1.transforms[2:5]
    assert pad.padding == 10 and pad.fill == 0 and tuple(crop.size) == (128, 64) and flip.p == 0.5
    assert t_rgb1.transforms[1].p == 0.5
    assert t_ir2.transforms[1].brightness == (0.5, 1.5)
    norm = t_rgb1.transforms[6]
    assert tuple(norm.mean) == (0.485, 0.456, 0.406) and tuple(norm.std) == (0.229, 0.224, 0.225)
    assert t_rgb1.transforms[-1].p == 0.5 and t_rgb2.transforms[-1].gray == 2


def test_irl_views_shapes_and_channel_effects():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (128, 64, 3), dtype=np.uint8)
    views = train_transforms("irl", 128, 64)
    assert len(views) == 4
    torch.manual_seed(0)
    random.seed(0)
    equal_ir1 = 0
    for _ in range(40):
        outs = [t(image) for t in views]
        for out in outs:
            assert out.shape == (3, 128, 64) and out.dtype == torch.float32
        # ChannelExchange always replicates one channel
        assert torch.equal(outs[1][0], outs[1][1]) and torch.equal(outs[1][1], outs[1][2])
        equal_ir1 += torch.equal(outs[2][0], outs[2][2])
    assert 20 <= equal_ir1 < 40     # ChannelAdapGray: 75 % of the views have equal channels


def test_agw_transform_is_single_pad_crop_flip_chain():
    t, t_ir = train_transforms("agw", 96, 48)
    assert t is t_ir and [m for m, _ in methods.get("agw").train_views(96, 48)] == ["rgb", "ir"]
    assert chain_names(t) == ["ToPILImage", "Pad", "RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize"]
    image = np.full((96, 48, 3), 200, dtype=np.uint8)
    assert t(image).shape == (3, 96, 48)


def test_unknown_method_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown method"):
        methods.get("bot")


def test_test_transform_is_plain_normalisation_of_presized_images():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (128, 64, 3), dtype=np.uint8)
    out = build_test_transform(128, 64)(image)
    expected = T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))(T.ToTensor()(image))
    assert torch.equal(out, expected)


def test_augmentation_reprs_name_class_and_arguments():
    # Shown in printed transform chains; built by the shared base class from the stored arguments.
    assert repr(ChannelRandomErasing(p=0.3, sl=0.1, sh=0.2, r1=0.5, fill=[1, 2, 3])) == \
        "ChannelRandomErasing(p=0.3, sl=0.1, sh=0.2, r1=0.5, fill=(1, 2, 3))"
    assert repr(ChannelExchange(gray=3)) == "ChannelExchange(gray=3)"
    assert repr(ChannelAdapGray(p=0.25)) == "ChannelAdapGray(p=0.25)"
    assert repr(ChannelT(p=0.75)) == "ChannelT(p=0.75)"
