"""IFALNet's method entry (method_ifalnet.py): recipe, schedule, the four views' chains and the eight
test-time similarity modes against the official test's matrices."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import loss as losses
import method_ifalnet
import model_ifalnet
import similarity
import utils
from test_ifalnet_loss import literal_tca, sampler_batch
from utils import ConfigError


def official_ifalnet_lr(epoch):
    """IFALNet train.py adjust_learning_rate (METHODS.md 2.5), for lr 0.1."""
    if epoch < 10:
        return 0.1 * (epoch + 1) / 10
    if epoch < 20:
        return 0.1
    if epoch < 60:
        return 0.01
    if epoch < 90:
        return 0.001
    return 0.0001


def test_the_ifalnet_schedule_is_the_official_one_and_agw_deen_keep_theirs():
    factor = utils.FIXED_LR_SCHEDULES["ifalnet"]
    for epoch in range(121):
        assert 0.1 * factor(epoch) == pytest.approx(official_ifalnet_lr(epoch), rel=1e-12), epoch
    assert [utils.FIXED_LR_SCHEDULES["agw"](e) for e in (9, 19, 20, 49, 50, 120)] == [1.0, 1.0, 0.1, 0.1, 0.01, 0.01]
    assert [utils.FIXED_LR_SCHEDULES["deen"](e) for e in (20, 79, 80, 150)] == [0.1, 0.1, 0.01, 0.01]


# ------------------------------------------------------------------------------------ recipe, views, fusions


def test_recipe_is_ifalnet_train_py():
    method = method_ifalnet.IFALNetMethod()
    assert method.network is model_ifalnet.IFALNet and method.view_modalities == ("rgb", "rgb", "ir", "ir")
    d = method.defaults
    assert (d["img_h"], d["img_w"], d["batch_size"], d["num_pos"], d["lr"], d["epochs"]) == (384, 192, 4, 4, 0.1, 121)
    assert (d["lr_scheduler"], d["milestones"], d["eval_every"], d["amp"]) == ("ifalnet", [20, 60, 90], 1, False)
    assert (d["loss_tri"], d["margin"]) == ("OriTriplet", 0.3)
    assert method.selection_mode == "all" and all(modes[0] == "all" for modes in method.report_modes.values())


def test_views_follow_the_official_build_transforms():
    names = [[type(t).__name__ for t in transform.transforms]
             for _, transform in method_ifalnet.IFALNetMethod().train_views(384, 192)]
    base = ["ToPILImage", "Pad", "RandomCrop", "RandomHorizontalFlip", "ToTensor", "Normalize", "ChannelRandomErasing"]
    assert names == [base, base + ["ChannelExchange"], base, base + ["ChannelAdapGrayCAJ"]]


def official_matrices(q, g):
    """IFALNet test.py's matrices from features 1 = original stem, 2 = middle stem; feat = pool, feat_att = BN."""
    distmat = [q[a] @ g[b].T for a, b in (("pool", "pool"), ("pool", "pool_m"), ("pool_m", "pool"), ("pool_m", "pool_m"))]
    att = [q[a] @ g[b].T for a, b in (("bn", "bn"), ("bn", "bn_m"), ("bn_m", "bn"), ("bn_m", "bn_m"))]
    return {"bn": att[0], "bn_om": att[1], "bn_mo": att[2], "bn_mm": att[3], "bn_sum": att[0] + att[1] + att[2] + att[3],
            "pool": distmat[0], "pool_sum": distmat[0] + distmat[1] + distmat[2] + distmat[3],
            "all": distmat[0] + att[0] + distmat[1] + att[1] + distmat[2] + att[2] + distmat[3] + att[3]}


def unit_rows(rng, n, d):
    x = rng.standard_normal((n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_the_eight_modes_are_the_official_test_matrices_and_labelled():
    method = method_ifalnet.IFALNetMethod()
    rng = np.random.default_rng(0)
    q = {name: unit_rows(rng, 5, 8) for name in model_ifalnet.IFALNet.test_feature_names}
    g = {name: unit_rows(rng, 7, 8) for name in model_ifalnet.IFALNet.test_feature_names}
    expected = official_matrices(q, g)
    modes = method.similarity_modes()
    assert set(expected) == set(method.report_modes["sysu"])
    for mode, matrix in expected.items():
        np.testing.assert_allclose(similarity.similarity(q, g, modes[mode]), matrix, rtol=1e-12, atol=1e-12)
    # The official LLCM branch (gallery rows, four pool(o,o) copies) is the transposed all_llcm.
    swapped_pool = g["pool"] @ q["pool"].T
    swapped_bn = [g[a] @ q[b].T for a, b in (("bn", "bn"), ("bn", "bn_m"), ("bn_m", "bn"), ("bn_m", "bn_m"))]
    np.testing.assert_allclose(similarity.similarity(g, q, modes["all_llcm"].transposed()),
                               4 * swapped_pool + sum(swapped_bn), rtol=1e-12, atol=1e-12)
    labels = method.mode_labels()
    assert [labels[m] for m in ("all", "bn_sum", "bn", "bn_om", "bn_mo", "bn_mm")] == \
        ["ALL (sum of 8)", "BN sum (4)", "BN(o,o)", "BN(o,m)", "BN(m,o)", "BN(m,m)"]


def test_ifalnet_loss_terms_are_ce_the_pairwise_triplet_and_0_7_tca():
    method = method_ifalnet.IFALNetMethod()
    x, labels = sampler_batch(3, 2, 6, torch.float32, scale=0.1, seed=3)
    logits = torch.randn(len(labels), 60, generator=torch.Generator().manual_seed(4))
    terms = method.build_criterion({"loss_tri": "OriTriplet", "margin": 0.3})((x, logits), labels)
    assert list(terms) == ["id", "OriTriplet", "TCA"]
    vis, mvis, ir, mir = x.chunk(4)
    block_labels = labels.chunk(4)[0]
    triplet = losses.OriTripletLoss(0.3)
    pairs = [triplet(torch.cat(p), torch.cat((block_labels, block_labels))) for p in
             ((vis, ir), (vis, mir), (mvis, ir), (mvis, mir))]
    torch.testing.assert_close(terms["id"], F.cross_entropy(logits, labels))
    torch.testing.assert_close(terms["OriTriplet"], sum(pairs) / 4)
    torch.testing.assert_close(terms["TCA"], 0.7 * literal_tca(x, labels, divisor=3), rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="IFALNet trains with OriTriplet"):
        method.build_criterion({"loss_tri": "WRT", "margin": 0.3})


@pytest.mark.parametrize("divisor, expected_divisor", [("identities", 3), ("official", 4), (None, 3)])
def test_tca_divisor_option_reaches_the_loss(divisor, expected_divisor):
    method = method_ifalnet.IFALNetMethod()
    x, labels = sampler_batch(3, 2, 6, torch.float32, scale=0.1, seed=8)
    config = {"loss_tri": "OriTriplet", "margin": 0.3, "tca_divisor": divisor}
    terms = method.build_criterion(config)((x, torch.zeros(len(labels), 60)), labels)
    torch.testing.assert_close(terms["TCA"], 0.7 * literal_tca(x, labels, divisor=expected_divisor),
                               rtol=1e-5, atol=1e-6)
