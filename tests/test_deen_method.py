"""DEEN's method entry (method_deen.py): recipe, schedule, views, the loss terms as train.py combines them,
the RegDB network variant, and the test-time features (S7/S8 through image_embeddings, flip-sum golden)."""
import os

import numpy as np
import pytest
import torch

import loss as losses
import model_deen as D
import methods
import model as M
import utils
from similarity import STANDARD_FUSIONS, similarity
from conftest import SPEC_GOLDEN_DIR

EXTRA = os.path.join(SPEC_GOLDEN_DIR, "deen_extra_goldens.npz")


@pytest.fixture
def deen():
    return methods.get("deen")


def test_recipe_is_the_official_one(deen):
    d = deen.defaults
    assert (d["img_h"], d["img_w"], d["batch_size"], d["num_pos"], d["lr"], d["epochs"]) == (384, 144, 6, 4, 0.1, 151)
    assert (d["loss_tri"], d["margin"], d["eval_every"], d["amp"]) == ("OriTriplet", 0.3, 1, False)
    factor = utils.FIXED_LR_SCHEDULES[d["lr_scheduler"]]
    expected = [(e + 1) / 10 for e in range(10)] + [1.0] * 10 + [0.1] * 60 + [0.01] * 71
    assert [factor(e) for e in range(151)] == pytest.approx(expected, rel=0, abs=0)
    assert deen.modes("llcm")[:2] == ("sum", "weighted")


def test_optimiser_groups_put_dee_and_mfa_at_the_backbone_rate(deen):
    net = deen.build_model(5, "resnet18", 64, 32)
    groups = {g["name"]: g for g in M.param_groups(net, 0.1, 0.1)}
    backbone = {id(p) for p in groups["backbone"]["params"]}
    assert groups["backbone"]["lr"] == pytest.approx(0.01) and groups["classifier"]["lr"] == 0.1
    assert all(id(p) in backbone for p in list(net.DEE.parameters()) + list(net.MFA1.parameters()))


def test_regdb_builds_the_layer3_variant(deen):
    regdb = deen.build_model(5, "resnet18", 64, 32, dataset="regdb")
    sysu = deen.build_model(5, "resnet18", 64, 32, dataset="sysu")
    assert not hasattr(regdb, "MFA3") and not hasattr(regdb.base_resnet.base, "layer4") and hasattr(sysu, "MFA3")
    assert (regdb.feat_dim, sysu.feat_dim) == (256, 512)
    regdb.eval()
    with torch.no_grad():
        pool, bn = regdb(torch.randn(2, 3, 64, 32), None, modal=1)
    assert pool.shape == bn.shape == (6, 256)


@pytest.mark.parametrize("dataset,area", [("sysu", (0.2, 0.8)), ("regdb", (0.02, 0.4)), ("llcm", (0.02, 0.4))])
def test_one_chain_for_both_modalities_with_the_dataset_erasing_area(deen, dataset, area):
    (_, rgb), (_, ir) = deen.train_views(384, 144, dataset=dataset)
    assert rgb is ir
    names = [type(t).__name__ for t in rgb.transforms]
    assert names == ["ToPILImage", "Pad", "RandomGrayscale", "RandomCrop", "RandomHorizontalFlip", "ToTensor",
                     "Normalize", "ChannelRandomErasing"]
    erasing = rgb.transforms[-1]
    assert (erasing.sl, erasing.sh, erasing.r1, erasing.fill) == (*area, 0.3, (0.485, 0.456, 0.406))


def test_loss_terms_are_train_py_lines(deen):
    """On the golden B3P2 features: terms equal the official lines written out by hand."""
    golden = np.load(EXTRA)
    pool = torch.tensor(golden["case__B3P2_D64_randn__feat1"])
    labels6 = torch.tensor(golden["case__B3P2_D64_randn__labels"])
    labels = labels6[:len(labels6) // 3]
    logits = torch.randn(len(pool), int(labels6.max()) + 1, generator=torch.Generator().manual_seed(0))
    ort_raw = losses.ort_loss(pool)
    terms = deen.build_criterion({"loss_tri": "OriTriplet", "margin": 0.3})((pool, logits, ort_raw), labels)
    assert list(terms) == ["id", "OriTriplet", "CPM", "ORT"]
    assert terms["id"].item() == pytest.approx(torch.nn.functional.cross_entropy(logits, labels6).item(), rel=1e-6)
    assert terms["OriTriplet"].item() == pytest.approx(golden["case__B3P2_D64_randn__float32__triplet"], rel=1e-5)
    assert terms["CPM"].item() == pytest.approx(golden["case__B3P2_D64_randn__float32__loss_cpm_weighted"], rel=1e-5)
    assert terms["ORT"].item() == pytest.approx(0.01 * ort_raw.item())
    assert torch.equal(deen.classification_logits((pool, logits, ort_raw)), logits[:len(labels)])
    with pytest.raises(utils.ConfigError, match="DEEN trains with OriTriplet"):
        deen.build_criterion({"loss_tri": "WRT", "margin": 0.3})


def test_sum_and_weighted_modes_of_image_embeddings_are_s7_and_s8():
    """S7/S8 as DEEN test.py builds them: six cosine matrices, summed literally."""
    gen = torch.Generator().manual_seed(5)
    q_pool, q_bn, g_pool, g_bn = (M.l2_normalize(torch.randn(3 * n, 8, generator=gen, dtype=torch.float64))
                                  for n in (4, 4, 6, 6))
    qf = {"pool": D.image_embeddings(q_pool).numpy(), "bn": D.image_embeddings(q_bn).numpy()}
    gf = {"pool": D.image_embeddings(g_pool).numpy(), "bn": D.image_embeddings(g_bn).numpy()}
    pool_sims = [q_pool[4 * b:4 * b + 4] @ g_pool[6 * b:6 * b + 6].T for b in range(3)]
    bn_sims = [q_bn[4 * b:4 * b + 4] @ g_bn[6 * b:6 * b + 6].T for b in range(3)]
    s7 = sum(pool_sims) + sum(bn_sims)
    s8 = 0.1 * sum(pool_sims) + 0.9 * sum(bn_sims)
    np.testing.assert_allclose(similarity(qf, gf, STANDARD_FUSIONS["sum"]), s7.numpy(), atol=1e-12)
    np.testing.assert_allclose(similarity(qf, gf, STANDARD_FUSIONS["weighted"]), s8.numpy(), atol=1e-12)


class TTAStub(torch.nn.Module):
    """Returns DEEN test.py's stub-net features call by call, checking the images (orig, then flipped)."""

    blocks = 3

    def __init__(self, golden):
        super().__init__()
        self.golden, self.calls = golden, 0
        images = torch.from_numpy(golden["tta__images"])
        self.expected = [images[:3], images[:3].flip(3), images[3:], images[3:].flip(3)]

    def forward(self, x_rgb, x_ir, modal=0):
        assert torch.equal(x_rgb, self.expected[self.calls]) and torch.equal(x_ir, x_rgb)
        out = tuple(torch.from_numpy(self.golden[f"tta__call{self.calls}_feat_{k}"]) for k in ("pool", "fc"))
        self.calls += 1
        return out


def test_flip_sum_reproduces_the_deen_test_time_golden():
    golden = np.load(EXTRA)
    images = torch.from_numpy(golden["tta__images"])
    net = TTAStub(golden)
    batches = [D.DEEN.test_features(net, batch, 1, flip=True) for batch in (images[:3], images[3:])]
    pool, bn = (torch.cat([features[name] for features in batches]) for name in ("pool", "bn"))
    assert net.calls == 4
    d = 16
    for block in range(3):
        np.testing.assert_allclose(pool[:, block * d:(block + 1) * d].numpy(),
                                   golden[f"tta__extract_gall_feat__feat{2 * block + 1}"], rtol=0, atol=1e-7)
        np.testing.assert_allclose(bn[:, block * d:(block + 1) * d].numpy(),
                                   golden[f"tta__extract_gall_feat__feat{2 * block + 2}"], rtol=0, atol=1e-7)
