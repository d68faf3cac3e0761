"""MMN's method entry (method_mmn.py): recipe, schedule, the nine optimiser groups, the DCL head trained
(default) or frozen (official), the shared transform, the training-accuracy rows and the seven test-time BN
similarities against test.py's formulas written out."""
import random

import numpy as np
import pytest
import torch

import methods
import model as M
import model_mmn as X
import utils
from similarity import similarity

SIZE = (64, 32)


@pytest.fixture
def mmn():
    return methods.get("mmn")


def test_recipe_is_the_official_one(mmn):
    d = mmn.defaults
    assert (d["img_h"], d["img_w"], d["batch_size"], d["num_pos"], d["lr"], d["epochs"]) == (384, 192, 4, 4, 0.1, 81)
    assert (d["loss_tri"], d["margin"], d["eval_every"], d["amp"]) == ("OriTriplet", 0.3, 2, False)
    factor = utils.FIXED_LR_SCHEDULES[d["lr_scheduler"]]
    # train.py's adjust_learning_rate: (epoch + 1) / 10 to epoch 9, 1 to 19, 0.1 to 49, then 0.01.
    expected = [(e + 1) / 10 for e in range(10)] + [1.0] * 10 + [0.1] * 30 + [0.01] * 31
    assert [factor(e) for e in range(81)] == pytest.approx(expected, rel=0, abs=0)
    assert mmn.selection_mode == "bn" and mmn.title == "MMN (ACM MM 2021)"


def test_nine_sgd_groups_with_the_dcl_head_in_the_backbone_group(mmn):
    net = mmn.build_model(5, "resnet18", *SIZE)
    groups = M.param_groups(net, 0.1, 0.1)
    assert [g["name"] for g in groups] == ["backbone"] + [f"{kind}{s}" for s in range(1, 5)
                                                          for kind in ("bottleneck", "classifier")]
    assert [g["lr"] for g in groups] == pytest.approx([0.01] + [0.1] * 8)
    assert groups[1]["params"] == [net.bottleneck1.weight] and groups[8]["params"] == [net.classifier4.weight]
    backbone = {id(p) for p in groups[0]["params"]}
    assert all(id(p) in backbone for p in net.criterion_div.parameters())
    assert all(id(p) in backbone for p in list(net.encode1.parameters()) + list(net.decode.parameters()))


def one_step(method, dcl_head):
    torch.manual_seed(0)
    net = method.build_model(5, "resnet18", *SIZE, options={"dcl_head": dcl_head}).train()
    optimizer = torch.optim.SGD(M.param_groups(net, 0.1), lr=0.1, momentum=0.9)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    views = [torch.randn(4, 3, *SIZE), torch.randn(4, 3, *SIZE)]
    labels = method.train_labels(torch.tensor([0, 0, 1, 1]), torch.tensor([0, 0, 1, 1]))
    terms = method.build_criterion(method.defaults)(method.forward_train(net, views), labels)
    sum(terms.values()).backward()
    optimizer.step()
    return before, net.state_dict()


@pytest.mark.parametrize("dcl_head", ["trained", "official", None])
def test_the_dcl_head_is_trained_by_default_and_frozen_in_the_official_mode(single_thread, mmn, dcl_head):
    trained = dcl_head != "official"
    before, after = one_step(mmn, dcl_head)
    assert torch.equal(before["criterion_div.fc1.0.weight"], after["criterion_div.fc1.0.weight"]) is not trained
    assert torch.equal(before["criterion_div.fc2.3.bias"], after["criterion_div.fc2.3.bias"]) is not trained
    # Either way its BNs run on batch statistics and track them, and the generator trains.
    assert not torch.equal(before["criterion_div.fc2.0.running_mean"], after["criterion_div.fc2.0.running_mean"])
    assert not torch.equal(before["decode.weight"], after["decode.weight"])


def test_one_transform_for_both_modalities_erasing_with_zeros(mmn):
    (_, rgb), (_, ir) = mmn.train_views(*SIZE)
    assert rgb is ir
    assert [type(t).__name__ for t in rgb.transforms] == ["ToPILImage", "Pad", "RandomCrop", "RandomHorizontalFlip",
                                                          "ToTensor", "Normalize", "ChannelRandomErasing"]
    erasing = rgb.transforms[-1]
    assert (erasing.p, erasing.sl, erasing.sh, erasing.r1, erasing.fill) == (0.5, 0.02, 0.4, 0.3, (0.0, 0.0, 0.0))
    image = torch.full((3, 64, 32), 5.0)
    random.seed(0)      # its first uniform is 0.84 > 0.5: no erasing
    assert torch.equal(erasing(image.clone()), image)
    random.seed(1)      # 0.134: erases one rectangle
    erased = erasing(image.clone())
    assert (erased == 0).any() and set(erased.unique().tolist()) == {0.0, 5.0}


def test_accuracy_rows_are_stripe_one_logits_of_the_original_images(mmn):
    logits = torch.arange(4 * 2 * 3, dtype=torch.float32).reshape(8, 3)
    outputs = X.MMNTrainOutputs(features=(), logits=(logits,), dcl=torch.zeros(4), middle_images=None)
    assert torch.equal(mmn.classification_logits(outputs), logits[[0, 1, 4, 5]])


def official_distmats(q, g):
    """test.py's seven BN matrices, as written there (query_feat_fc, Xquery_feat_fc, gall_feat_fc, ...)."""
    distmat = np.matmul(q["bn"], np.transpose(g["bn"]))
    distmat1 = np.matmul(q["bn"], np.transpose(g["bn_m"]))
    distmat2 = np.matmul(q["bn_m"], np.transpose(g["bn"]))
    distmat3 = np.matmul(q["bn_m"], np.transpose(g["bn_m"]))
    distmat4 = distmat + distmat1 + distmat2 + distmat3
    distmat5 = np.minimum(np.minimum(distmat, distmat1), np.minimum(distmat2, distmat3))
    distmat6 = np.maximum(np.maximum(distmat, distmat1), np.maximum(distmat2, distmat3))
    return [distmat, distmat1, distmat2, distmat3, distmat4, distmat5, distmat6]


def test_the_seven_similarities_are_test_py_rows_in_order_and_labelled(mmn):
    rng = np.random.default_rng(0)

    def features(n):
        unit = rng.standard_normal((2, n, 8))
        unit /= np.linalg.norm(unit, axis=2, keepdims=True)
        return {"bn": unit[0], "bn_m": unit[1]}
    query, gallery = features(5), features(7)
    modes = mmn.modes("sysu")
    assert modes == ("bn", "bn_om", "bn_mo", "bn_mm", "bn_sum", "bn_min", "bn_max")
    assert all(mmn.modes(dataset) == modes for dataset in ("regdb", "llcm"))
    fusions, labels = mmn.similarity_modes(), mmn.mode_labels()
    for mode, expected in zip(modes, official_distmats(query, gallery)):
        np.testing.assert_allclose(similarity(query, gallery, fusions[mode]), expected, rtol=1e-12, atol=1e-12)
    assert len({labels[mode] for mode in modes}) == 7 and labels["bn"].startswith("bn o-o")


def test_test_features_split_the_eval_rows_into_images_and_middle_images(single_thread, mmn):
    torch.manual_seed(0)
    net = mmn.build_model(5, "resnet18", *SIZE).eval()
    images = torch.randn(3, 3, *SIZE)
    with torch.no_grad():
        pool, bn = net(images, images, modal=2)
        features = net.test_features(images, modal=2)
    assert list(features) == list(net.test_feature_names)
    assert torch.equal(features["pool"], pool[:3]) and torch.equal(features["pool_m"], pool[3:])
    assert torch.equal(features["bn"], bn[:3]) and torch.equal(features["bn_m"], bn[3:])
    assert features["bn"].shape == (3, net.test_feature_dim) == (3, 4 * 512)


def test_flip_averages_each_feature_with_that_of_the_mirrored_images(single_thread, mmn):
    torch.manual_seed(0)
    net = mmn.build_model(5, "resnet18", *SIZE).eval()
    images = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        plain, mirrored = net.test_features(images, 1), net.test_features(images.flip(3), 1)
        flipped = net.test_features(images, 1, flip=True)
    for name in net.test_feature_names:
        torch.testing.assert_close(flipped[name], M.flip_average(plain[name], mirrored[name]))


def test_grad_checkpointing_is_refused_in_one_line(mmn):
    net = mmn.build_model(5, "resnet18", *SIZE)
    net.set_grad_checkpointing(False)
    with pytest.raises(utils.ConfigError, match="not available for MMN"):
        net.set_grad_checkpointing(True)
