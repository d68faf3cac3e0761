"""ResNet backbones (REFERENCE 6.1): torchvision parameter names, no fc, last_conv_stride=1.

Ground floor: imports nothing of ours. ImageNet weights come from a local file or torchvision's cache;
this module never downloads anything.
"""
import os

import torch
from torch import nn

# torchvision IMAGENET1K_V1 file names (in torch.hub's checkpoints folder). resnet50 also accepts the legacy
# file name the official IRL/AGW code loads (believed numerically identical, REFERENCE 6.1).
IMAGENET_FILES = {
    "resnet18": ("resnet18-f37072fd.pth",),
    "resnet34": ("resnet34-b627a593.pth",),
    "resnet50": ("resnet50-0676ba61.pth", "resnet50-19c8e357.pth"),
}


class PretrainedWeightsError(RuntimeError):
    """ImageNet weights were requested but cannot be had (missing, unreadable or wrong file)."""


def conv3x3(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes, out_planes, stride=1):
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision "v1.5" bottleneck: the stride sits on the 3x3 conv."""
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def init_resnet_weights(module):
    """Official init: conv N(0, sqrt(2 / (k*k*out))), BN weight 1 bias 0."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class ResNetStem(nn.Module):
    """conv1 -> bn1 -> ReLU -> maxpool(3, s2, p1), with torchvision's names (the modality stems of IRL/AGW)."""

    out_channels = 64

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        init_resnet_weights(self)

    def forward(self, x):
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))


class ResNet(nn.Module):
    """ResNet without fc/avgpool. with_stem=False keeps only layer1..layer4 (the shared trunk)."""

    def __init__(self, block, layers, last_conv_stride=1, with_stem=True):
        super().__init__()
        self.with_stem = with_stem
        if with_stem:
            stem = ResNetStem()
            self.conv1, self.bn1, self.relu, self.maxpool = stem.conv1, stem.bn1, stem.relu, stem.maxpool
        self.inplanes = 64
        self.layer1 = self._make_layer(block, 64, layers[0])
        self.layer2 = self._make_layer(block, 128, layers[1], stride=2)
        self.layer3 = self._make_layer(block, 256, layers[2], stride=2)
        self.layer4 = self._make_layer(block, 512, layers[3], stride=last_conv_stride)
        self.stage_channels = (64,) + tuple(c * block.expansion for c in (64, 128, 256, 512))
        init_resnet_weights(self)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self.inplanes, planes * block.expansion, stride),
                                       nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        if self.with_stem:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


ARCHS = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
}


def build_resnet(arch, pretrained=False, last_conv_stride=1, with_stem=True):
    """pretrained: False/None = random init, True = torchvision cache, str = local weights file."""
    if arch not in ARCHS:
        raise ValueError(f"unknown ResNet architecture {arch!r}; choose from {', '.join(ARCHS)}")
    block, layers = ARCHS[arch]
    model = ResNet(block, layers, last_conv_stride=last_conv_stride, with_stem=with_stem)
    if pretrained:
        load_imagenet_weights(model, arch, None if pretrained is True else pretrained)
    return model


def resnet18(pretrained=False, last_conv_stride=1, **kw):
    return build_resnet("resnet18", pretrained, last_conv_stride, **kw)


def resnet34(pretrained=False, last_conv_stride=1, **kw):
    return build_resnet("resnet34", pretrained, last_conv_stride, **kw)


def resnet50(pretrained=False, last_conv_stride=1, **kw):
    return build_resnet("resnet50", pretrained, last_conv_stride, **kw)


def _hub_checkpoints_dir():
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def cached_imagenet_file(arch):
    """Path of torchvision's cached IMAGENET1K_V1 file for `arch`, or None when it is not cached."""
    folder = _hub_checkpoints_dir()
    for name in IMAGENET_FILES[arch]:
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return path
    return None


def imagenet_state_dict(arch, path=None):
    """ImageNet state dict (with fc) from `path`, else from torchvision's cache; never downloads."""
    if arch not in IMAGENET_FILES:
        raise PretrainedWeightsError(f"no ImageNet weights known for {arch!r}; choose from {', '.join(ARCHS)}")
    how = "supply the torchvision file with `--pretrained PATH` or train without it with `--no-pretrained`"
    if path is None:
        path = cached_imagenet_file(arch)
        if path is None:
            raise PretrainedWeightsError(f"ImageNet weights for {arch} ({IMAGENET_FILES[arch][0]}) are not in "
                                         f"torchvision's cache {_hub_checkpoints_dir()}; {how}")
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise PretrainedWeightsError(f"ImageNet weights file not found: {path}; {how}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt/non-torch files
        raise PretrainedWeightsError(f"cannot read ImageNet weights {path} ({type(exc).__name__}); {how}") from None
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise PretrainedWeightsError(f"{path} is not a ResNet state dict; {how}")
    return state


def load_imagenet_weights(model, arch, path=None):
    """Load ImageNet weights (local file `path`, else torchvision's cache) into a ResNet, ResNetStem or
    trunk (with_stem=False) of `arch`."""
    apply_imagenet_state(model, imagenet_state_dict(arch, path), imagenet_source(arch, path))


def imagenet_source(arch, path=None):
    """How error messages name the ImageNet weights of `arch`: the file given, else the cached one."""
    return f"{arch} ImageNet weights {path or cached_imagenet_file(arch)}"


def apply_imagenet_state(model, state, source):
    """Strict load of the entries `model` has; the others (fc.*, the stem for a trunk, the layers for a stem)
    are dropped. Lets one file read initialise several parts."""
    wanted = model.state_dict()
    missing = [k for k in wanted if k not in state]
    wrong = [k for k in wanted if k in state and state[k].shape != wanted[k].shape]
    if missing or wrong:
        detail = ", ".join((missing + wrong)[:5])
        raise PretrainedWeightsError(f"{source} do not fit the model ({len(missing)} keys missing, {len(wrong)} "
                                     f"of the wrong shape: {detail}); supply the right file with "
                                     "`--pretrained PATH` or use `--no-pretrained`")
    model.load_state_dict({k: state[k] for k in wanted}, strict=True)
