"""resnet.py: torchvision naming and numerics, last_conv_stride, ImageNet weights from file/cache, errors."""
import os

import pytest
import torch
import torchvision

import resnet


pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture()
def fake_hub(tmp_path, monkeypatch):
    """An empty torch.hub directory, so tests never see (or download into) the real cache."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    return tmp_path / "hub"


def torchvision_resnet(arch):
    torch.manual_seed(0)
    return getattr(torchvision.models, arch)(weights=None)


@pytest.mark.parametrize("arch", ["resnet18", "resnet34", "resnet50"])
def test_keys_and_shapes_are_torchvision_without_fc(arch):
    ours = resnet.build_resnet(arch).state_dict()
    reference = {k: v.shape for k, v in torchvision_resnet(arch).state_dict().items() if not k.startswith("fc.")}
    assert list(ours) == list(reference)
    assert all(ours[k].shape == reference[k] for k in ours)


def test_trunk_and_stem_split_the_torchvision_keys():
    trunk = set(resnet.resnet18(with_stem=False).state_dict())
    stem = set(resnet.ResNetStem().state_dict())
    assert trunk.isdisjoint(stem)
    assert trunk | stem == set(resnet.resnet18().state_dict())
    assert all(k.startswith(("conv1.", "bn1.")) for k in stem)


def test_forward_matches_torchvision_with_last_stride_one():
    tv = torchvision_resnet("resnet18").eval()
    # torchvision's layer4 with its stride-2 3x3 conv and downsample set to 1 = official last_conv_stride=1
    tv.layer4[0].conv1.stride = (1, 1)
    tv.layer4[0].downsample[0].stride = (1, 1)
    ours = resnet.resnet18(last_conv_stride=1).eval()
    ours.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        got = ours(x)
    torch.testing.assert_close(got, expected)


def test_bottleneck_matches_torchvision():
    tv = torchvision_resnet("resnet50").eval()
    ours = resnet.resnet50(last_conv_stride=2).eval()
    ours.load_state_dict({k: v for k, v in tv.state_dict().items() if not k.startswith("fc.")})
    x = torch.randn(1, 3, 64, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = tv.layer4(tv.layer3(tv.layer2(tv.layer1(tv.maxpool(tv.relu(tv.bn1(tv.conv1(x))))))))
        torch.testing.assert_close(ours(x), expected)


@pytest.mark.parametrize("stride, out_hw", [(1, (8, 4)), (2, (4, 2))])
def test_last_conv_stride_sets_output_stride(stride, out_hw):
    out = resnet.resnet18(last_conv_stride=stride)(torch.zeros(2, 3, 128, 64))
    assert out.shape == (2, 512) + out_hw


def test_official_init_statistics():
    net = resnet.resnet50()
    conv = net.layer3[0].conv2                # 3x3, 256 out: std sqrt(2 / (9 * 256))
    assert conv.weight.std().item() == pytest.approx((2 / (9 * 256)) ** 0.5, rel=0.05)
    assert torch.all(net.bn1.weight == 1) and torch.all(net.layer1[0].bn3.bias == 0)


def test_imagenet_filenames_match_torchvision_urls():
    for arch, weights in (("resnet18", torchvision.models.ResNet18_Weights),
                          ("resnet34", torchvision.models.ResNet34_Weights),
                          ("resnet50", torchvision.models.ResNet50_Weights)):
        assert resnet.IMAGENET_FILES[arch][0] == os.path.basename(weights.IMAGENET1K_V1.url)


@pytest.fixture()
def imagenet_file(tmp_path):
    """A torchvision-format resnet18 state dict (with fc) in a local file."""
    state = torchvision_resnet("resnet18").state_dict()
    path = tmp_path / "resnet18-local.pth"
    torch.save(state, path)
    return path, state


def test_load_local_file_drops_fc(imagenet_file):
    path, state = imagenet_file
    net = resnet.resnet18()
    resnet.load_imagenet_weights(net, "resnet18", str(path))
    for k, v in net.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_pretrained_argument_loads_into_trunk_and_stem(imagenet_file):
    path, state = imagenet_file
    trunk = resnet.resnet18(pretrained=str(path), with_stem=False)
    assert torch.equal(trunk.layer4[1].conv2.weight, state["layer4.1.conv2.weight"])
    stem = resnet.ResNetStem()
    resnet.load_imagenet_weights(stem, "resnet18", path)
    assert torch.equal(stem.bn1.running_var, state["bn1.running_var"])


def test_cache_is_used_when_present(fake_hub, imagenet_file):
    path, state = imagenet_file
    (fake_hub / "checkpoints").mkdir(parents=True)
    os.replace(path, fake_hub / "checkpoints" / "resnet18-f37072fd.pth")
    net = resnet.resnet18(pretrained=True)
    assert torch.equal(net.conv1.weight, state["conv1.weight"])


def assert_one_line_with_instructions(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message
    assert "--pretrained PATH" in message and "--no-pretrained" in message


def test_missing_cache_says_how_to_supply_the_file(fake_hub):
    with pytest.raises(resnet.PretrainedWeightsError) as excinfo:
        resnet.resnet50(pretrained=True)
    assert_one_line_with_instructions(excinfo)
    assert "resnet50-0676ba61.pth" in str(excinfo.value)


def test_missing_local_file(tmp_path):
    with pytest.raises(resnet.PretrainedWeightsError) as excinfo:
        resnet.load_imagenet_weights(resnet.resnet18(), "resnet18", str(tmp_path / "nope.pth"))
    assert_one_line_with_instructions(excinfo)
    assert "nope.pth" in str(excinfo.value)


def test_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.pth"
    path.write_bytes(b"not a torch file")
    with pytest.raises(resnet.PretrainedWeightsError) as excinfo:
        resnet.load_imagenet_weights(resnet.resnet18(), "resnet18", str(path))
    assert_one_line_with_instructions(excinfo)


def test_wrong_architecture_file(imagenet_file):
    path, _ = imagenet_file
    with pytest.raises(resnet.PretrainedWeightsError) as excinfo:
        resnet.load_imagenet_weights(resnet.resnet50(), "resnet50", str(path))
    assert_one_line_with_instructions(excinfo)
    assert "missing" in str(excinfo.value)


def test_unknown_arch():
    with pytest.raises(ValueError, match="resnet101"):
        resnet.build_resnet("resnet101")
