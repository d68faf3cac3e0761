"""MMN (Zhang et al., ACM MM 2021, "Towards a Unified Middle Modality Learning for VI-ReID"): METHODS.md 5.1.

Two modality stems and a shared ResNet trunk (no Non_local, no GeM). A small generator turns every image into
a middle-modality (M) image: a per-modality one-channel map (encode, fc, bn: middle_modality.gray_map), then
one decode convolution shared by both modalities, ReLU. Each M-image goes through the stem of its source
modality, so the trunk batch is [VIS, M-VIS, IR, M-IR]. The layer-4 map is cut into 4 horizontal stripes,
each average-pooled, with its own BN neck (bottleneck1..4) and classifier (classifier1..4).

Parameter names and order are the official ones (998 entries with the unused ResNet parts, which
model.load_checkpoint drops, METHODS.md 5.1). The DCL projection head of the loss lives here as
`criterion_div` (appended after the official entries), so that it is trained with the network and saved in
our checkpoints; official files, which lack it, still load (`official_optional_keys`). It is not a head
module, so model.param_groups puts it in the 0.1x group with the generator, the other new part that the
official code trains at 0.1x: the head only shapes a loss weighted 0.05 per stripe, and a trained head can
learn to project the modality gap away (which lowers DCL without aligning the features), the faster the
higher its LR. `train_dcl_head=False` reproduces the official behaviour: the head is never optimised (frozen at
its initialisation, still on batch statistics in training).
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

import loss as losses
import middle_modality as mm
from model import (NetworkBase, add_backbone, at_least_float32, backbone_unused_keys, bn_neck, l2_normalize,
                   stage_map_size)
from utils import ConfigError

STRIPES = 4
DCL_DIM = 256
HEAD_PREFIX = "criterion_div"       # the official train.py's name of the DCLoss module


class MMNTrainOutputs(NamedTuple):
    """The training forward's outputs; every per-stripe tuple holds STRIPES tensors, rows [VIS, M-VIS, IR, M-IR]."""

    features: tuple          # pooled stripe features [4M, D]
    logits: tuple            # classifier_s(bottleneck_s(features_s)) [4M, C]
    dcl: torch.Tensor        # [STRIPES] unweighted DCL of each stripe's (M-VIS, M-IR) rows
    middle_images: torch.Tensor     # the generated images [2M, 3, H, W]: M-VIS then M-IR (official `gray`)


class MMN(NetworkBase):
    """MMN embed_net (official keys), for any ResNet and any input whose layer-4 height divides into 4 stripes."""

    method = "mmn"
    STEMS = (("thermal_module", "thermal"), ("visible_module", "visible"))
    num_inputs = 2
    HEAD_MODULES = tuple(f"{kind}{s}" for s in range(1, STRIPES + 1) for kind in ("bottleneck", "classifier"))
    CLASSIFIER_KEY = "classifier1.weight"      # official checkpoints: its rows count the classes
    # Test features: pooled and BN features of the image itself (o) and of its middle-modality image (m).
    test_feature_names = mm.TEST_FEATURE_NAMES

    @classmethod
    def check_input_size(cls, img_h, img_w):
        """The layer-4 map's rows must divide into STRIPES equal stripes."""
        super().check_input_size(img_h, img_w)
        height = stage_map_size(img_h, "layer4")
        if height % STRIPES:
            raise ConfigError(f"MMN cuts the layer-4 map into {STRIPES} equal stripes, but a {img_h}-pixel height "
                              f"gives {height} rows there; use a height whose layer-4 rows (height/16, rounded up) "
                              f"are a multiple of {STRIPES} (384, 256, 128, 64)")

    def __init__(self, num_classes, arch="resnet50", img_h=384, img_w=192, pretrained=None, train_dcl_head=True):
        super().__init__()
        self.check_input_size(img_h, img_w)
        self.num_classes, self.arch, self.img_h, self.img_w = num_classes, arch, img_h, img_w
        self.feat_dim = add_backbone(self, arch, pretrained)[4]
        for s in range(1, STRIPES + 1):
            bottleneck, classifier = bn_neck(self.feat_dim, num_classes)
            self.add_module(f"bottleneck{s}", bottleneck)
            self.add_module(f"classifier{s}", classifier)
        mm.add_gray_generators(self)
        self.decode = mm.constant_conv(1, 3)
        self.add_module(HEAD_PREFIX, losses.DCLoss(self.feat_dim, DCL_DIM))
        getattr(self, HEAD_PREFIX).requires_grad_(train_dcl_head)

    # -- checkpoints ----------------------------------------------------------------------------------

    def official_unused_keys(self):
        """The stems' layer1..4 and the trunk's conv1/bn1 of the official full ResNets (METHODS.md 5.1)."""
        return backbone_unused_keys(self)

    def official_optional_keys(self):
        """The DCL head: the official train.py keeps it outside the network, so official files lack it."""
        return {f"{HEAD_PREFIX}.{k}" for k in getattr(self, HEAD_PREFIX).state_dict()}

    # -- forward --------------------------------------------------------------------------------------

    def middle_images(self, x, modal):
        """relu(decode(gray map)) of images of one modality (1 visible, 2 infrared), [N, 3, H, W]."""
        return F.relu(self.decode(mm.gray_map(self, x, modal)))

    def forward(self, x_rgb, x_ir, modal=0):
        """Training (modal 0): MMNTrainOutputs with rows [VIS, M-VIS, IR, M-IR]. Test (modal 1 visible,
        2 infrared): L2-normalised (pool, bn) [2N, STRIPES*D], the images' rows then their M-images' rows."""
        self._check_modal(modal)
        if modal == 0:
            # The official code decodes both gray maps in one call; decode is a 1x1 convolution, so per row
            # block it is the same.
            middle_vis, middle_ir = self.middle_images(x_rgb, 1), self.middle_images(x_ir, 2)
            x = torch.cat((self.visible_module(torch.cat((x_rgb, middle_vis))),
                           self.thermal_module(torch.cat((x_ir, middle_ir)))))
        elif modal == 1:
            x = self.visible_module(torch.cat((x_rgb, self.middle_images(x_rgb, 1))))
        else:
            x = self.thermal_module(torch.cat((x_ir, self.middle_images(x_ir, 2))))
        base = self.base_resnet.base
        x = base.layer4(base.layer3(base.layer2(base.layer1(x))))
        # float32 under autocast (float64 stays float64 for the parity tests)
        pools = [stripe.mean((2, 3)) for stripe in at_least_float32(x).chunk(STRIPES, 2)]
        feats = [getattr(self, f"bottleneck{s + 1}")(pool) for s, pool in enumerate(pools)]
        if not self.training:
            return l2_normalize(torch.cat(pools, 1)), l2_normalize(torch.cat(feats, 1))
        head = getattr(self, HEAD_PREFIX)
        dcl = torch.stack([head(mm.split_original_middle(pool, training_rows=True)[1]) for pool in pools])
        logits = tuple(getattr(self, f"classifier{s + 1}")(feat) for s, feat in enumerate(feats))
        return MMNTrainOutputs(tuple(pools), logits, dcl, torch.cat((middle_vis, middle_ir)))

    # -- test -----------------------------------------------------------------------------------------

    @property
    def test_feature_dim(self):
        return self.feat_dim * STRIPES

    def test_features(self, images, modal, flip=False):
        """{"pool", "bn", "pool_m", "bn_m"} [N, 4D] of eval-mode images of one modality: o = the images' rows,
        m = their middle-modality images' rows. flip: CAJ's flip averaging (an extension, off officially)."""
        return mm.test_features(self, images, modal, flip)
