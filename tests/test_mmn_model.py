"""MMN network (model_mmn.py): official key layout, official-format checkpoints (without the DCL head), and the
goldens of the official code with key-seeded weights (shared/spec/goldens_deen_caj_mmn, README section 6.3)."""
import json
import os

import numpy as np
import pytest
import torch

import method_mmn
import model as M
import model_mmn as X
from conftest import SPEC_GOLDEN_DIR
from test_deen_model import fill_tensor
from utils import CheckpointError, ConfigError

IO = os.path.join(SPEC_GOLDEN_DIR, "mmn_model_io.npz")
IO_F64 = os.path.join(SPEC_GOLDEN_DIR, "mmn_model_io_f64ref.npz")
KEYS = os.path.join(SPEC_GOLDEN_DIR, "mmn_keys.json")
HEAD_KEYS = "criterion_div_keys (DCLoss, filled with prefix criterion_div.)"
# Generator parameters: their float32 gradients are sums over ~147k cancelling pixels (README 6.3: up to 30 %
# apart from float64), so their norms are compared only loosely, with the float64 run's (README 6.3: rtol 0.5).
GENERATOR = ("encode", "fc1.", "fc2.", "bn1.", "bn2.", "decode")


def official_keys():
    with open(KEYS) as f:
        return json.load(f)


def official_state(net, keys):
    """The official 998 entries: used ones filled by the goldens' rule, the unused ResNet parts as broadcast
    zeros (the loader drops them; zeros keep the file small)."""
    used = set(net.state_dict())
    return {k: fill_tensor(k, tuple(shape), dtype) if k in used else
            torch.zeros((), dtype=torch.int64 if dtype == "int64" else torch.float32).expand(shape)
            for k, shape, dtype in keys}


def fill_head(net, keys):
    """The DCL head as the goldens fill it (keys 'criterion_div.' + key): it is not in official files."""
    head = {f"{X.HEAD_PREFIX}.{k}": fill_tensor(f"{X.HEAD_PREFIX}.{k}", tuple(shape), dtype) for k, shape, dtype in keys}
    net.load_state_dict({**net.state_dict(), **head})


@pytest.fixture(scope="module")
def golden():
    return np.load(IO)


@pytest.fixture(scope="module")
def golden_net(tmp_path_factory):
    """resnet50, 395 classes, 384x192, loaded from an official-format file ({'net', 'epoch', ...})."""
    keys = official_keys()
    net = X.MMN(395, "resnet50", 384, 192)
    path = tmp_path_factory.mktemp("mmn") / "sysu_agw_p4_n4_lr_0.1_seed_0_best.t"
    torch.save({"net": official_state(net, keys["keys"]), "epoch": np.int64(40), "mAP": np.float64(0.6)}, path)
    meta = M.load_checkpoint(net, str(path))
    assert meta["format"] == "official" and meta["epoch"] == 40
    fill_head(net, keys[HEAD_KEYS])
    return net


def test_keys_are_the_official_ones_in_official_order_then_the_dcl_head():
    keys = official_keys()
    net = X.MMN(keys["class_num"], "resnet50", 384, 192)
    ours, unused, head = net.state_dict(), net.official_unused_keys(), net.official_optional_keys()
    official = [k for k, _, _ in keys["keys"]]
    assert len(official) == keys["num_keys"] == 998 and unused <= set(official) and not unused & set(ours)
    assert list(ours) == [k for k in official if k not in unused] + sorted(head, key=list(ours).index)
    assert head == {f"{X.HEAD_PREFIX}.{k}" for k, _, _ in keys[HEAD_KEYS]} and list(ours)[-len(head):] == \
        [f"{X.HEAD_PREFIX}.{k}" for k, _, _ in keys[HEAD_KEYS]]
    shapes = {k: shape for k, shape, _ in keys["keys"] + [(f"{X.HEAD_PREFIX}.{k}", s, d) for k, s, d in keys[HEAD_KEYS]]}
    assert all(list(value.shape) == shapes[k] for k, value in ours.items())


def test_a_bare_official_state_dict_loads_strictly_without_the_head_and_wrong_keys_are_named():
    keys = official_keys()["keys"]
    net = X.MMN(395, "resnet50", 384, 192)
    # Broadcast zeros everywhere keep this fast; one filled entry shows the values arrive.
    state = {k: torch.zeros((), dtype=torch.int64 if d == "int64" else torch.float32).expand(s) for k, s, d in keys}
    state["decode.weight"] = fill_tensor("decode.weight", (3, 1, 1, 1), "float32")
    head_before = {k: v.clone() for k, v in net.state_dict().items() if k.startswith(X.HEAD_PREFIX)}
    assert M.load_checkpoint(net, state)["format"] == "state_dict"
    loaded = net.state_dict()
    assert torch.equal(loaded["decode.weight"], state["decode.weight"])
    assert all(torch.equal(loaded[k], v) for k, v in head_before.items())     # the head keeps its values
    del state["bottleneck3.running_var"]
    with pytest.raises(CheckpointError, match="missing 1 keys: bottleneck3.running_var"):
        M.load_checkpoint(net, dict(state))
    # Our own checkpoints must hold the head.
    ours = {k: v for k, v in net.state_dict().items() if not k.endswith("fc2.3.running_var")}
    with pytest.raises(CheckpointError, match=r"missing 1 keys: criterion_div\.fc2\.3\.running_var"):
        M.load_checkpoint(net, {"format": M.CHECKPOINT_FORMAT, "model": ours})


def test_a_checkpoint_of_another_class_count_is_named_by_its_first_stripe_classifier():
    trained = X.MMN(7, "resnet18", 64, 32).state_dict()
    with pytest.raises(CheckpointError, match="checkpoint has 7 classes, model has 5"):
        M.load_checkpoint(X.MMN(5, "resnet18", 64, 32), {"format": M.CHECKPOINT_FORMAT, "model": trained})


def test_the_stripe_split_needs_a_layer4_height_divisible_by_four():
    X.MMN.check_input_size(384, 192)
    X.MMN.check_input_size(64, 32)
    with pytest.raises(ConfigError, match=r"4 equal stripes.*288-pixel height gives 18 rows"):
        X.MMN.check_input_size(288, 144)


def test_eval_outputs_reproduce_the_official_goldens(golden_net, golden):
    golden_net.eval()
    x = torch.from_numpy(golden["input_eval_x"])
    with torch.no_grad():
        for modal in (1, 2):
            pool, feat = golden_net(x, x, modal=modal)
            assert pool.shape == (4, 8192)       # the images' rows, then their middle-modality images'
            np.testing.assert_allclose(pool.numpy(), golden[f"eval_modal{modal}_out0_l2norm_pool"], atol=1e-6)
            np.testing.assert_allclose(feat.numpy(), golden[f"eval_modal{modal}_out1_l2norm_feat"], atol=1e-6)


def train_step(net, golden):
    """The golden train forward and loss (fresh BN buffers restored afterwards): (outputs, terms, buffers)."""
    before = {k: v.clone() for k, v in net.state_dict().items()}
    net.train()
    try:
        outputs = net(torch.from_numpy(golden["input_train_x1"]), torch.from_numpy(golden["input_train_x2"]))
        buffers = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
        labels = torch.cat((torch.from_numpy(golden["label1"]), torch.from_numpy(golden["label2"])))
        terms = method_mmn.MMNLoss(margin=0.3)(outputs, labels)
        net.zero_grad()
        sum(terms.values()).backward()
        return outputs, terms, buffers
    finally:
        net.load_state_dict(before)
        net.eval()


@pytest.mark.slow
def test_train_outputs_losses_and_gradients_reproduce_the_official_goldens(golden_net, golden):
    outputs, terms, buffers = train_step(golden_net, golden)
    for s in range(4):
        np.testing.assert_allclose(outputs.features[s].detach().numpy(), golden[f"train_modal0_out{s}_x4{s + 1}"],
                                   rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(outputs.logits[s].detach().numpy(), golden[f"train_modal0_out{s + 4}_logits{s + 1}"],
                                   rtol=1e-3, atol=1e-3)
        np.testing.assert_allclose(outputs.dcl[s].item(), golden[f"train_loss_dcl_stripe{s + 1}_unweighted"], rtol=1e-5)
    np.testing.assert_allclose(outputs.middle_images.detach().numpy(), golden["train_modal0_out8_1_gray"], atol=1e-4)
    for ours, official in (("id", "id"), ("OriTriplet", "tri"), ("DCL", "dcl")):
        np.testing.assert_allclose(terms[ours].item(), golden[f"train_loss_{official}"], rtol=1e-5)
    np.testing.assert_allclose(sum(terms.values()).item(), golden["train_loss_total"], rtol=1e-5)
    for key in ("bottleneck1.running_mean", "bottleneck4.running_var", "bn1.running_mean", "bn1.running_var",
                "bn2.running_mean", "criterion_div.fc2.0.running_mean", "criterion_div.fc2.3.running_var",
                "visible_module.visible.bn1.running_mean", "base_resnet.base.layer1.0.bn1.running_var"):
        # Running means are 0.1 x batch means of train features that carry ~5e-5 of float32 noise (README 6.3).
        np.testing.assert_allclose(buffers[key].numpy(), golden["train_after_" + key.replace(".", "_")],
                                   rtol=1e-5, atol=1e-5)
    params = dict(golden_net.named_parameters())
    compared = 0
    for name, norm in zip(golden["grad_param_names"], golden["grad_total_norms"]):
        if not name.startswith(GENERATOR) and np.isfinite(norm):
            np.testing.assert_allclose(params[name].grad.norm().item(), norm, rtol=5e-3, err_msg=name)
            compared += 1
    assert compared == 9
    f64 = np.load(IO_F64)
    for name, norm in zip(f64["grad_param_names"], f64["grad_total_norms"]):
        if name.startswith(GENERATOR):
            np.testing.assert_allclose(params[name].grad.norm().item(), norm, rtol=0.5, err_msg=name)
    np.testing.assert_allclose(params["criterion_div.fc1.0.weight"].grad.norm().item(),
                               golden["grad_total_criterion_div_fc1_0_weight_norm"], rtol=5e-3)
    np.testing.assert_allclose(params["bottleneck2.weight"].grad.numpy(), golden["grad_total_full_bottleneck2_weight"],
                               atol=5e-2 * np.abs(golden["grad_total_full_bottleneck2_weight"]).max())
