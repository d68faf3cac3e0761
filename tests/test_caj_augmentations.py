"""CAJ channel augmentations and training chains (METHODS 6.2) against the official-code goldens
(shared/spec/goldens_deen_caj_mmn/caj_goldens.*, README 6.2): every seed's output bytes (sha256) and Python `random` draws,
bitwise."""
import hashlib
import json
import random

import numpy as np
import pytest
import torch
import torchvision.transforms as T

import data_loader
from conftest import caj_goldens
from data_loader import (IMAGENET_MEAN, IMAGENET_STD, ChannelAdapGray, ChannelAdapGrayCAJ, ChannelExchange,
                         ChannelRandomErasing)

CAJ_H, CAJ_W = 288, 144


@pytest.fixture(scope="module")
def golden():
    return caj_goldens()


def sha256(tensor):
    return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()


class DrawLog:
    """Stands in for the `random` module seen by data_loader: forwards randint/uniform to the real module
    (same values) and records (name, [a, b], value) as the goldens' harness did."""

    def __init__(self):
        self.draws = []

    def randint(self, a, b):
        value = random.randint(a, b)
        self.draws.append(["randint", [a, b], value])
        return value

    def uniform(self, a, b):
        value = random.uniform(a, b)
        self.draws.append(["uniform", [a, b], value])
        return value


@pytest.fixture
def draw_log(monkeypatch):
    log = DrawLog()
    monkeypatch.setattr(data_loader, "random", log)
    return log


def as_json(draws):
    """Draws as the JSON file stores them (tuples -> lists, floats exact through repr)."""
    return json.loads(json.dumps(draws))


# Golden transform case -> the toolkit transforms that must reproduce it, applied in this order.
TRANSFORM_CASES = {
    "ChannelAdapGray_p0.5": lambda: [ChannelAdapGrayCAJ(p=0.5)],
    "ChannelRandomErasing_p0.5": lambda: [ChannelRandomErasing(p=0.5)],
    "ChannelExchange_gray2": lambda: [ChannelExchange(gray=2)],
    "ChannelExchange_gray3": lambda: [ChannelExchange(gray=3)],
    "tail_thermal(Erasing0.5+AdapGray0.5)": lambda: [ChannelRandomErasing(p=0.5), ChannelAdapGrayCAJ(p=0.5)],
    "tail_color1(Erasing0.5+Exchange2)": lambda: [ChannelRandomErasing(p=0.5), ChannelExchange(gray=2)],
}


def test_golden_input_is_our_normalisation(golden):
    """ToTensor + Normalize(ImageNet) of the fixed image is bitwise the goldens' input."""
    z, _ = golden
    got = T.Compose([T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])(z["tf__input_uint8_hwc"])
    assert torch.equal(got, torch.from_numpy(z["tf__input_normalized"]))


def test_every_used_golden_transform_case_is_covered(golden):
    """ChannelAdap is defined but never used by CAJ (its case is the only one not reproduced)."""
    _, cases = golden
    assert set(cases["transform_cases"]) - set(TRANSFORM_CASES) == {"ChannelAdap_unused"}


@pytest.mark.parametrize("case", sorted(TRANSFORM_CASES))
def test_transform_golden_all_seeds_bitwise(golden, draw_log, case):
    z, cases = golden
    rows = cases["transform_cases"][case]
    assert [row["seed"] for row in rows] == list(range(40))
    source = torch.from_numpy(z["tf__input_normalized"])
    wrong_bytes, wrong_draws, full = [], [], 0
    for row in rows:
        random.seed(row["seed"])
        draw_log.draws.clear()
        img = source.clone()
        out = img
        for transform in TRANSFORM_CASES[case]():
            out = transform(out)
        assert out is img                          # in place, as the official transforms
        if sha256(out) != row["sha256"]:
            wrong_bytes.append(row["seed"])
        if as_json(draw_log.draws) != row["draws"]:
            wrong_draws.append(row["seed"])
        if "full_output_key" in row:
            assert np.array_equal(out.numpy(), z[row["full_output_key"]]), row["seed"]
            full += 1
    assert wrong_bytes == [] and wrong_draws == []
    assert full == sum("full_output_key" in row for row in rows)


def test_adapgray_golden_seeds_cover_every_branch(golden):
    """Guard: the 40 seeds reach all five CAJ branches, so the bitwise test checks each of them."""
    _, cases = golden
    branches = {row["branch"] for row in cases["transform_cases"]["ChannelAdapGray_p0.5"]}
    assert branches == {"ch0", "ch1", "ch2", "gray", "unchanged"}


def test_irl_adapgray_is_not_the_caj_variant(golden):
    """IRL's ChannelAdapGray draws differently; using it for CAJ would break comparability."""
    z, cases = golden
    source = torch.from_numpy(z["tf__input_normalized"])
    mismatches = 0
    for row in cases["transform_cases"]["ChannelAdapGray_p0.5"]:
        random.seed(row["seed"])
        mismatches += sha256(ChannelAdapGray(p=0.5)(source.clone())) != row["sha256"]
    assert mismatches > 0


def channel_image(values=(1.0, 2.0, 3.0)):
    return torch.tensor(values).view(3, 1, 1).expand(3, 4, 2).clone()


def test_adapgray_caj_branch_frequencies():
    """R, G, B 25 % each, gray and unchanged 12.5 % each at p = 0.5 (12,000 seeded calls: 5 sigma < 0.02)."""
    gray = 0.2989 * 1.0 + 0.5870 * 2.0 + 0.1140 * 3.0
    outcomes = {(1.0, 1.0, 1.0): 0.25, (2.0, 2.0, 2.0): 0.25, (3.0, 3.0, 3.0): 0.25,
                (round(gray, 4),) * 3: 0.125, (1.0, 2.0, 3.0): 0.125}
    random.seed(0)
    op, n, counts = ChannelAdapGrayCAJ(p=0.5), 12000, {}
    for _ in range(n):
        out = op(channel_image())
        key = tuple(round(float(out[c, 0, 0]), 4) for c in range(3))
        counts[key] = counts.get(key, 0) + 1
    assert set(counts) == set(outcomes)
    for key, want in outcomes.items():
        assert abs(counts[key] / n - want) < 0.02, key


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_adapgray_caj_probability_only_splits_the_fourth_branch(p):
    """p = 1: the fourth branch is always gray (never unchanged); p = 0: never gray."""
    random.seed(1)
    seen = {tuple(float(v) for v in ChannelAdapGrayCAJ(p=p)(channel_image())[:, 0, 0]) for _ in range(400)}
    unchanged = (1.0, 2.0, 3.0)
    assert len(seen) == 4
    assert (unchanged in seen) == (p == 0.0)


# ------------------------------------------------------------------------------------ full pipelines

def reference_caj_views(img_h, img_w):
    """Local reference of the official SYSUData chains (ICCV21_CAJ data_loader.py), built from the
    toolkit's classes: view 0 and view 1 take the visible image, view 2 the infrared one. The pipeline
    golden test runs both this and the registered CAJ method's train_views (what training uses), so a
    change to either is caught against the official bytes."""
    def base():
        return [T.ToPILImage(), T.Pad(10), T.RandomCrop((img_h, img_w)), T.RandomHorizontalFlip(),
                T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD), ChannelRandomErasing(p=0.5)]
    return (("rgb", T.Compose(base())),
            ("rgb", T.Compose(base() + [ChannelExchange(gray=2)])),
            ("ir", T.Compose(base() + [ChannelAdapGrayCAJ(p=0.5)])))


def registered_caj_views(img_h, img_w):
    import methods                                 # imported here: the method table builds every method
    return methods.get("caj").train_views(img_h, img_w)


VIEW_BUILDERS = {"local_reference": reference_caj_views, "methods_caj": registered_caj_views}


@pytest.mark.parametrize("builder", sorted(VIEW_BUILDERS))
def test_official_pipeline_golden_bitwise(golden, draw_log, builder):
    """SYSUData.__getitem__: view 0, view 1, view 2 in that order on one item, sharing the Python and torch
    RNG streams; random.seed(s), torch.manual_seed(s) before each item."""
    z, cases = golden
    views = VIEW_BUILDERS[builder](CAJ_H, CAJ_W)
    assert len(views) == 3
    modalities = [modality for modality, _ in views]
    assert modalities[0] == modalities[1] != modalities[2]
    if builder == "methods_caj":                   # the registry's names for the two modalities
        assert modalities == [data_loader.RGB, data_loader.RGB, data_loader.IR]
    images = {modalities[0]: z["pipe__input_rgb_uint8_hwc"], modalities[2]: z["pipe__input_ir_uint8_hwc"]}
    rows = cases["pipeline_cases"]["SYSUData.__getitem__"]["rows"]
    assert [row["seed"] for row in rows] == list(range(12))
    names = ("img1_0", "img1_1", "img2")
    wrong, full = [], 0
    for row in rows:
        random.seed(row["seed"])
        torch.manual_seed(row["seed"])
        draw_log.draws.clear()
        outs = [transform(images[modality]) for modality, transform in views]
        if [sha256(out) for out in outs] != [row[f"sha256_{name}"] for name in names]:
            wrong.append(row["seed"])
        if as_json(draw_log.draws) != row["python_random_draws"]:
            wrong.append(("draws", row["seed"]))
        if row.get("full_outputs"):
            for out, name in zip(outs, names):
                assert np.array_equal(out.numpy(), z[f"pipe__seed{row['seed']}__{name}"]), name
            full += 1
    assert wrong == []
    assert full == 1

