"""DEEN (Zhang and Wang, CVPR 2023, the LLCM repository): REFERENCE 10.1 sharpened by METHODS.md 1.2.

Two modality stems and a shared ResNet trunk; an MFA block (channel non-local CNL, then position non-local
PNL) after layer1, layer2 and (SYSU/LLCM) layer3; the DEE module triples the batch (identity, two dilated
branches) before the last stage; average pooling, BN neck, classifier. RegDB's variant has no MFA3, puts DEE
after MFA2 and pools layer3.

Parameter names and their order are the official ones, so an official checkpoint loads strictly after its
known-unused entries are dropped (model.load_checkpoint): like model.AGW, the stems hold only conv1/bn1 and
the trunk only the stages it runs.

PNL multiplies a [Nh/2, Nl/2] energy matrix without softmax (about 12 MB per image at MFA1 for 384x144). It
is linear, so `position_attention` computes theta @ (phi @ g) instead and never forms the energy: the same
result up to float rounding, checked against `position_attention_literal` (the official order).
"""
import torch
import torch.nn.functional as F
from torch import nn

import loss as losses
from model import (NetworkBase, add_backbone, at_least_float32, backbone_unused_keys, bn_neck, l2_normalize,
                   stage_map_size)
from utils import ConfigError

DEE_DROPOUT = 0.01
PNL_REDUCTION = 2
# Datasets whose official network pools layer3 (DEE after MFA2, no MFA3, layer4 registered but unused).
LAYER3_DATASETS = ("regdb",)


def position_attention_literal(theta, phi, g):
    """The official PNL product: (theta @ phi / L) @ g with theta [N, Q, C], phi [N, C, L], g [N, L, C]."""
    energy = torch.matmul(theta, phi)
    return torch.matmul(energy / energy.size(-1), g)


def position_attention(theta, phi, g):
    """`position_attention_literal` without the [Q, L] energy: no softmax makes the product associative."""
    return torch.matmul(theta, torch.matmul(phi, g) / phi.size(-1))


class CNL(nn.Module):
    """Channel non-local: the energy is channel by channel ([low, low]), divided by `low` (METHODS.md 1.2)."""

    def __init__(self, high_dim, low_dim, flag=0):
        super().__init__()
        self.low_dim = low_dim
        stride = 2 if flag else 1
        self.g = nn.Conv2d(low_dim, low_dim, 1)
        self.theta = nn.Conv2d(high_dim, low_dim, 1)
        self.phi = nn.Conv2d(low_dim, low_dim, 1, stride=stride)
        self.W = nn.Sequential(nn.Conv2d(low_dim, high_dim, 1, stride=stride), nn.BatchNorm2d(high_dim))
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)

    def forward(self, x_h, x_l):
        n = x_h.size(0)
        g = self.g(x_l).reshape(n, self.low_dim, -1)
        theta = self.theta(x_h).reshape(n, self.low_dim, -1)
        phi = self.phi(x_l).reshape(n, self.low_dim, -1).transpose(1, 2)
        energy = torch.matmul(theta, phi)
        y = torch.matmul(energy / energy.size(-1), g).reshape(n, self.low_dim, *x_l.shape[2:])
        return self.W(y) + x_h


class PNL(nn.Module):
    """Position non-local with the official memory reinterpretation: the [N, low/2, h, w] maps are viewed as
    [N, low, h*w/2] before the attention (which is why h*w must be even)."""

    official_form = False      # True: the official product through the energy matrix (the bench baseline)

    def __init__(self, high_dim, low_dim):
        super().__init__()
        self.low_dim = low_dim
        inter = low_dim // PNL_REDUCTION
        self.g = nn.Conv2d(low_dim, inter, 1)
        self.theta = nn.Conv2d(high_dim, inter, 1)
        self.phi = nn.Conv2d(low_dim, inter, 1)
        self.W = nn.Sequential(nn.Conv2d(inter, high_dim, 1), nn.BatchNorm2d(high_dim))
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)

    def forward(self, x_h, x_l):
        n = x_h.size(0)
        g = self.g(x_l).reshape(n, self.low_dim, -1).transpose(1, 2)
        theta = self.theta(x_h).reshape(n, self.low_dim, -1).transpose(1, 2)
        phi = self.phi(x_l).reshape(n, self.low_dim, -1)
        attend = position_attention_literal if self.official_form else position_attention
        y = attend(theta, phi, g).transpose(1, 2).reshape(n, self.low_dim // PNL_REDUCTION, *x_h.shape[2:])
        return self.W(y) + x_h


class MFA_block(nn.Module):
    """PNL(CNL(x_h, x_l), x_l): x_l is the stage input, x_h the stage output (METHODS.md 1.2 item 3)."""

    def __init__(self, high_dim, low_dim, flag):
        super().__init__()
        self.CNL = CNL(high_dim, low_dim, flag)
        self.PNL = PNL(high_dim, low_dim)

    def forward(self, x_h, x_l):
        return self.PNL(self.CNL(x_h, x_l), x_l)


class DEE_module(nn.Module):
    """Diverse embedding expansion: batch (x, branch1(x), branch2(x)), then Dropout(0.01) over all of it.

    Each branch averages three 3x3 convolutions (dilations 1, 2, 3), ReLU, 1x1 conv. The tripling also
    happens in eval mode (METHODS.md 1.2 item 5).
    """

    def __init__(self, channels):
        super().__init__()
        inner = channels // 4
        for branch in (1, 2):
            for dilation in (1, 2, 3):
                self.add_module(f"FC{branch}{dilation}", nn.Conv2d(channels, inner, 3, padding=dilation,
                                                                   dilation=dilation, bias=False))
            self.add_module(f"FC{branch}", nn.Conv2d(inner, channels, 1))
        for name, conv in self.named_children():
            nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in")   # official weights_init_kaiming
        self.dropout = nn.Dropout(p=DEE_DROPOUT)

    def _branch(self, x, branch):
        dilated = sum(getattr(self, f"FC{branch}{d}")(x) for d in (1, 2, 3)) / 3
        return getattr(self, f"FC{branch}")(F.relu(dilated))

    def forward(self, x):
        return self.dropout(torch.cat((x, self._branch(x, 1), self._branch(x, 2)), 0))


def image_embeddings(features, blocks=3):
    """[3N, D] block-major rows (all originals, then DEE1, then DEE2) -> [N, 3D], one row per image: the dot
    product of two such rows is the sum of the three blocks' cosine similarities, so the 'sum' similarity of
    (pool, bn) is DEEN's S7 and 'weighted' (0.1 pool + 0.9 bn) its S8 (METHODS.md 1.4)."""
    return torch.cat(features.chunk(blocks, 0), 1)


def flip_sum(features, flipped_features):
    """DEEN test.py's flip test-time augmentation: f(x) + f(flip x), not normalised again (METHODS.md 1.4)."""
    return features + flipped_features


class DEEN(NetworkBase):
    """DEEN embed_net; `layer3_variant` (RegDB) pools layer3 as the official code does for RegDB."""

    method = "deen"
    STEMS = (("thermal_module", "thermal"), ("visible_module", "visible"))
    num_inputs = 2
    blocks = 3           # embeddings per image (identity, DEE branch 1, DEE branch 2), in row blocks

    @classmethod
    def check_input_size(cls, img_h, img_w):
        """PNL views each [N, C/2, h, w] map as [N, C, h*w/2]: h*w must be even at every MFA resolution."""
        super().check_input_size(img_h, img_w)
        for stage in ("stem", "layer2", "layer3"):
            h, w = stage_map_size(img_h, stage), stage_map_size(img_w, stage)
            if h * w % 2:
                raise ConfigError(f"DEEN needs an even number of positions at every MFA block; {img_h}x{img_w} "
                                  f"gives {h}x{w} at {stage} (384x144, 288x144, 256x128 work)")

    def __init__(self, num_classes, arch="resnet50", img_h=384, img_w=144, pretrained=None, layer3_variant=False):
        super().__init__()
        self.check_input_size(img_h, img_w)
        self.num_classes, self.arch, self.img_h, self.img_w = num_classes, arch, img_h, img_w
        self.layer3_variant = layer3_variant
        c = add_backbone(self, arch, pretrained)
        if layer3_variant:
            del self.base_resnet.base.layer4
        self.DEE = DEE_module(c[2] if layer3_variant else c[3])
        self.MFA1 = MFA_block(c[1], c[0], 0)
        self.MFA2 = MFA_block(c[2], c[1], 1)
        if not layer3_variant:
            self.MFA3 = MFA_block(c[3], c[2], 1)
        self.feat_dim = c[3] if layer3_variant else c[4]
        self.bottleneck, self.classifier = bn_neck(self.feat_dim, num_classes)

    def official_unused_keys(self):
        """The stems' layer1..4, the trunk's conv1/bn1 and, for RegDB, the trunk's layer4 (METHODS.md 1.2)."""
        unused = backbone_unused_keys(self)
        if self.layer3_variant:
            unused |= {f"base_resnet.base.{k}" for k in self._official_trunk_keys if k.startswith("layer4.")}
        return unused

    def forward(self, x_rgb, x_ir, modal=0):
        """Training (modal 0): (pool [3M, D], logits [3M, C], ort_raw) with rows [orig VIS, orig IR, DEE1 VIS,
        DEE1 IR, DEE2 VIS, DEE2 IR]; test (modal 1 visible, 2 thermal): L2-normalised (pool, bn) [3N, D]."""
        self._check_modal(modal)
        if modal == 0:
            x = torch.cat((self.visible_module(x_rgb), self.thermal_module(x_ir)), 0)
        elif modal == 1:
            x = self.visible_module(x_rgb)
        else:
            x = self.thermal_module(x_ir)
        base = self.base_resnet.base
        x = self.MFA1(base.layer1(x), x)
        x = self.MFA2(base.layer2(x), x)
        if self.layer3_variant:
            x = base.layer3(self.DEE(x))
        else:
            x = self.MFA3(base.layer3(x), x)
            x = base.layer4(self.DEE(x))
        pool = at_least_float32(x).mean((2, 3))    # float32 under autocast
        feat = self.bottleneck(pool)
        if self.training:
            return pool, self.classifier(feat), losses.ort_loss(pool)
        return l2_normalize(pool), l2_normalize(feat)

    def set_official_form(self, enabled=True):
        """Compute every PNL through its energy matrix as the official code does (True) or without it."""
        for module in self.modules():
            if isinstance(module, PNL):
                module.official_form = bool(enabled)
        return self

    @property
    def test_feature_dim(self):
        return self.feat_dim * self.blocks

    test_feature_names = ("pool", "bn")

    def test_features(self, images, modal, flip=False):
        """{"pool", "bn"} [N, 3D] of eval-mode images of one modality (`image_embeddings`); flip: DEEN's flip-sum."""
        pool, bn = self(images, images, modal=modal)
        if flip:
            pool_flipped, bn_flipped = self(images.flip(3), images.flip(3), modal=modal)
            pool, bn = flip_sum(pool, pool_flipped), flip_sum(bn, bn_flipped)
        return {"pool": image_embeddings(pool, self.blocks), "bn": image_embeddings(bn, self.blocks)}
