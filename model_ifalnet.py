"""IFALNet (ZHY-tech11/IFALNet, "middle-modality interactive feature attention learning"): METHODS.md 2.2.

Four stems (visible, thermal, and one of each for the middle-modality images), a shared ResNet trunk with a
MIA block after layer1, layer2 and layer3 (one CBAM shared by the original and the middle-modality rows, and a
strided residual from each stage into the next), IFALNet's own MFA block after layer3 (dilated convolutions
mixed by a sigmoid gate; not DEEN's MFA), average pooling, BN neck, classifier. The middle-modality (M) image
of the second visible and second infrared view comes from a small learned generator (middle_modality.py).

Parameter names and their order are the official ones, so an official checkpoint loads strictly after its
known-unused entries are dropped (model.load_checkpoint): like model.IRL, the stems hold only conv1/bn1 and the
trunk only layer1..4, and MIA3 holds no residual convolutions (the official ones are never run).

**Channel selection.** The official generator picks three of encode3's six channels per image with
`torch.topk` of an SE layer's weights. That SE layer is degenerate: SELayer(6, reduction 16) has a zero-width
bottleneck, so its weights are sigmoid(0) = 0.5 for every channel of every image, and topk's choice among six
equal values is implementation-defined (torch 2.14.1 on the CPU returns channels 3, 5, 4). Here the choice is
the top three of the SE weights with ties going to the lowest index, which for the degenerate SE is always
channels 0, 1, 2: the same on every device and version. The choice matters only when encode3's six channels
differ (`channel_choice_matters`). Training from the official initialisation keeps the three selected channels
equal (identical updates) and leaves the other three unused: their biases stay exactly 0 (no gradient, and
weight decay keeps 0 at 0). So a trained checkpoint tells which three were selected, whatever the device's
tie-breaking was, and loading one adopts them (`trained_channels`, `middle_channels`); for our own
checkpoints that is 0, 1, 2 again. Where the weights do not tell (fresh, or all six channels used), the rule
above holds.
"""
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import middle_modality as mm
from model import (ChannelAttention, NetworkBase, SpatialAttention, add_backbone, at_least_float32,
                   backbone_unused_keys, bn_neck, l2_normalize)

SE_REDUCTION = 16
GENERATOR_CHANNELS = 6         # encode3's output channels, of which the SE weights select three
SELECTED_CHANNELS = 3
CBAM_RATIO, CBAM_KERNEL = 16, 7
MIA_RESIDUAL_WEIGHT = 0.2      # weight of the previous stage's residual added before the next CBAM
MFA_DROPOUT = 0.01
MFA_DILATIONS = ((1, 3, 5, 7), (2, 4, 6, 8))     # FC11..FC14 and FC21..FC24


class SELayer(nn.Module):
    """The official squeeze-and-excitation layer: fc = Linear(C, C/r), ReLU, Linear(C/r, C), Sigmoid, no biases.
    With C = 6 and r = 16 the bottleneck has width 0 (kept: the official state dict holds the empty weights)."""

    def __init__(self, channels, reduction=SE_REDUCTION):
        super().__init__()
        with warnings.catch_warnings():     # "Initializing zero-element tensors is a no-op": expected here
            warnings.simplefilter("ignore", UserWarning)
            self.fc = nn.Sequential(nn.Linear(channels, channels // reduction, bias=False), nn.ReLU(inplace=True),
                                    nn.Linear(channels // reduction, channels, bias=False), nn.Sigmoid())

    def forward(self, x):
        """(x scaled by the channel weights, the channel weights [N, C])."""
        weights = self.fc(x.mean((2, 3)))
        return x * weights[:, :, None, None], weights


def top_channels(weights, k=SELECTED_CHANNELS):
    """Indices [N, k] of the k largest channel weights of each row, ties to the lowest index (a stable sort):
    torch.topk with a tie rule that does not depend on the device or version."""
    return torch.sort(weights, dim=1, descending=True, stable=True)[1][:, :k]


class CBAM(nn.Module):
    """Channel then spatial attention (ratio 16, 7x7): y = x * ca(x), out = y * sa(y). Per image, so applying it
    to the original and the middle rows separately (the official calls) equals one call on both."""

    def __init__(self, channels):
        super().__init__()
        self.ca = ChannelAttention(channels, CBAM_RATIO)
        self.sa = SpatialAttention(CBAM_KERNEL)

    def forward(self, x):
        x = x * self.ca(x)
        return x * self.sa(x)


def narrowing_conv(channels):
    """Conv(C -> 2C, kernel 2, stride 2, padding 1, dilation 2): a stage input's size is that of the next stage."""
    return nn.Conv2d(channels, 2 * channels, kernel_size=2, stride=2, padding=1, dilation=2)


class MIA(nn.Module):
    """Shared CBAM on the original (branch 1) and the middle-modality (branch 2) rows; each branch's attended
    map, narrowed by its own convolution, is added with weight 0.2 before the next stage's CBAM. The last MIA
    (`narrows=False`, MIA3) gives no residual: its official conv_narrow1/2 are never run and are left out."""

    def __init__(self, channels, narrows=True):
        super().__init__()
        self.CBAM_ori = CBAM(channels)
        if narrows:
            self.conv_narrow1 = narrowing_conv(channels)
            self.conv_narrow2 = narrowing_conv(channels)
        self.narrows = narrows

    def forward(self, x_1, x_2, residuals=None):
        """(x_1, x_2, residuals for the next MIA or None); `residuals` from the previous MIA (None at MIA1)."""
        if residuals is not None:
            x_1, x_2 = x_1 + MIA_RESIDUAL_WEIGHT * residuals[0], x_2 + MIA_RESIDUAL_WEIGHT * residuals[1]
        x_1, x_2 = self.CBAM_ori(x_1), self.CBAM_ori(x_2)
        if not self.narrows:
            return x_1, x_2, None
        return x_1, x_2, (self.conv_narrow1(x_1), self.conv_narrow2(x_2))


class MFA(nn.Module):
    """IFALNet's MFA (METHODS.md 2.2): two means of four dilated 3x3 convs (C -> C/4), each through ReLU and the
    shared FC1 (C/4 -> C/2) and Dropout(0.01); a gate a = sigmoid(FC2(x)) mixes them, with FC2(x) added:
    out = conv_o((1 - a) * x1 + FC2(x) + a * x2), conv_o = 1x1 conv (C/2 -> C) + BN. No residual to x."""

    def __init__(self, channels):
        super().__init__()
        quarter, half = channels // 4, channels // 2
        for branch, dilations in enumerate(MFA_DILATIONS, start=1):
            for i, dilation in enumerate(dilations, start=1):
                self.add_module(f"FC{branch}{i}", nn.Conv2d(channels, quarter, 3, padding=dilation,
                                                            dilation=dilation, bias=False))
        self.FC1 = nn.Conv2d(quarter, half, 1)
        self.FC2 = nn.Conv2d(channels, half, 1)
        for conv in self.children():
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in")    # official weights_init_kaiming
        self.dropout = nn.Dropout(p=MFA_DROPOUT)
        self.conv_o = nn.Sequential(nn.Conv2d(half, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def _branch(self, x, branch):
        dilated = sum(getattr(self, f"FC{branch}{i}")(x) for i in range(1, 5)) / 4
        return self.dropout(self.FC1(F.relu(dilated)))

    def forward(self, x):
        gate_input = self.FC2(x)
        gate = torch.sigmoid(gate_input)
        return self.conv_o((1 - gate) * self._branch(x, 1) + gate_input + gate * self._branch(x, 2))


class IFALNet(NetworkBase):
    """IFALNet embed_net, for any ResNet of resnet.ARCHS and any input size."""

    method = "ifalnet"
    STEMS = (("thermal_module", "thermal"), ("visible_module", "visible"),
             ("thermal_moduleA", "thermal"), ("visible_moduleA", "visible"))
    num_inputs = 4
    test_feature_names = mm.TEST_FEATURE_NAMES

    def __init__(self, num_classes, arch="resnet50", img_h=384, img_w=192, pretrained=None):
        super().__init__()
        self.check_input_size(img_h, img_w)
        self.num_classes, self.arch, self.img_h, self.img_w = num_classes, arch, img_h, img_w
        c = add_backbone(self, arch, pretrained)
        self.feat_dim = c[4]
        self.bottleneck, self.classifier = bn_neck(self.feat_dim, num_classes)
        # The middle-modality generator, as flat official attributes (middle_modality.py).
        mm.add_gray_generators(self)
        self.encode3 = mm.constant_conv(1, GENERATOR_CHANNELS)
        self.SEnet = SELayer(GENERATOR_CHANNELS)
        self.decode = mm.constant_conv(SELECTED_CHANNELS, 3)
        self.MIA1, self.MIA2, self.MIA3 = MIA(c[1]), MIA(c[2]), MIA(c[3], narrows=False)
        self.MFA = MFA(c[3])
        self.middle_channels = None     # encode3 channels adopted from loaded weights; None: `top_channels`
        self.register_load_state_dict_post_hook(IFALNet._adopt_trained_channels)

    def official_unused_keys(self):
        """The stems' layer1..4, the trunk's conv1/bn1 and MIA3's residual convolutions (METHODS.md 2.2)."""
        unused = backbone_unused_keys(self)
        unused |= {f"MIA3.{conv}.{p}" for conv in ("conv_narrow1", "conv_narrow2") for p in ("weight", "bias")}
        return unused

    def channel_choice_matters(self):
        """True when encode3's six channels (weight and bias) are not all equal: then which three channels the
        generator selects changes its output, and a checkpoint gives its training's outputs only if the channels
        used here (`middle_channels` adopted at load, else `top_channels`) are the ones its training selected."""
        channels = torch.cat((self.encode3.weight.flatten(1), self.encode3.bias[:, None]), 1)
        return not bool((channels == channels[:1]).all())

    def trained_channels(self):
        """The three encode3 channels a training selected, told by their biases: the unselected ones get no
        gradient, so they keep the initial bias 0 exactly, while the selected ones move. None when the weights
        do not tell (not exactly three non-zero biases)."""
        moved = [c for c, bias in enumerate(self.encode3.bias.tolist()) if bias != 0]
        return tuple(moved) if len(moved) == SELECTED_CHANNELS else None

    @staticmethod
    def _adopt_trained_channels(module, incompatible_keys):
        module.middle_channels = module.trained_channels()

    def middle_image(self, gray):
        """The generator's shared part on one-channel maps [N, 1, H, W]: encode3, the SE layer, the three
        selected channels of each image (`middle_channels`, else `top_channels`), decode -> the M-image."""
        encoded, weights = self.SEnet(F.relu(self.encode3(gray)))
        if self.middle_channels is not None:
            selected = encoded[:, list(self.middle_channels)]
        else:
            index = top_channels(weights)[:, :, None, None].expand(-1, -1, *encoded.shape[2:])
            selected = torch.gather(encoded, 1, index)
        return F.relu(self.decode(selected))

    def forward(self, x1_1, x1_2, x2_1, x2_2, modal=0):
        """Training (modal 0; x1_* visible, x2_* infrared views): (pool, logits) with rows [VIS, M-VIS, IR, M-IR].
        Test (modal 1 visible: x1_1 and x1_2; modal 2 thermal: x2_1 and x2_2; the same images to both):
        L2-normalised (pool, bn) [2N, D], the original stem's rows first, then the M-image stem's."""
        self._check_modal(modal)
        if modal == 0:
            gray_vis, gray_ir = mm.gray_map(self, x1_2, 1), mm.gray_map(self, x2_2, 2)
            middle_vis, middle_ir = self.middle_image(torch.cat((gray_vis, gray_ir))).chunk(2, 0)
            x = torch.cat((self.visible_module(x1_1), self.visible_moduleA(middle_vis),
                           self.thermal_module(x2_1), self.thermal_moduleA(middle_ir)))
        elif modal == 1:
            middle = self.middle_image(mm.gray_map(self, x1_2, 1))
            x = torch.cat((self.visible_module(x1_1), self.visible_moduleA(middle)))
        else:
            middle = self.middle_image(mm.gray_map(self, x2_2, 2))
            x = torch.cat((self.thermal_module(x2_1), self.thermal_moduleA(middle)))
        training_rows = modal == 0
        base = self.base_resnet.base
        residuals = None
        for layer, mia in ((base.layer1, self.MIA1), (base.layer2, self.MIA2), (base.layer3, self.MIA3)):
            x_1, x_2, residuals = mia(*mm.split_original_middle(layer(x), training_rows), residuals)
            x = mm.join_original_middle(x_1, x_2, training_rows)
        x = base.layer4(self.MFA(x))
        pool = at_least_float32(x).mean((2, 3))    # float32 under autocast
        feat = self.bottleneck(pool)
        if self.training:
            return pool, self.classifier(feat)
        return l2_normalize(pool), l2_normalize(feat)

    @property
    def test_feature_dim(self):
        return self.feat_dim

    def test_features(self, images, modal, flip=False):
        """{"pool", "bn" (original stem), "pool_m", "bn_m" (M-image stem)}: L2-normalised [N, D] features of
        eval-mode images of one modality. flip: CAJ's flip test-time augmentation (model.flip_average) of each
        (IFALNet's own test has none)."""
        return mm.test_features(self, images, modal, flip)
