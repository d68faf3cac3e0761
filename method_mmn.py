"""MMN (Zhang et al., ACM MM 2021; ZYK100/MMN): METHODS.md section 5.

The network is model_mmn.MMN (generator, M-images through their source stem, four stripes). Training: one
transform for both modalities, the four stripes' CE, the four pairwise block triplets per stripe, and the DCL
term. The DCL projection head is trained by default (the official code never gives it to the optimiser, a
bug); `--dcl-head official` reproduces the official run. Test: the seven BN similarities of
test.py over the images (o) and their middle-modality images (m).
"""
import torch
import torch.nn as nn
import torchvision.transforms as T

import data_loader as dl
import loss as losses
import middle_modality as mm
import model_mmn
from data_loader import IR, RGB
from method_base import Method
from similarity import Fusion
from utils import ConfigError

DCL_WEIGHT = 0.2        # train.py --delta
DCL_HEAD_CHOICES = ("trained", "official")
# test.py's seven BN rows after "bn" (o-o, its first, "FC" row): o-m, m-o, m-m, their sum, element-wise min
# and max.
FUSIONS = {**mm.CROSS_STEM_FUSIONS, "bn_min": Fusion(mm.cross_stem_terms("bn"), "min"),
           "bn_max": Fusion(mm.cross_stem_terms("bn"), "max")}


class MMNLoss:
    """MMN train.py's loss as named terms, on the training forward's model_mmn.MMNTrainOutputs.

    `labels` are the batch's [visible, infrared] labels (2M rows); the trunk rows [VIS, M-VIS, IR, M-IR] carry
    (visible, visible, infrared, infrared). id: mean of the stripes' CE; OriTriplet: mean over the stripes of
    the four cross-block triplets (middle_modality.pairwise_block_triplet); DCL: 0.25 x delta x the sum of the
    stripes' DCL values.
    """

    def __init__(self, margin):
        self.cross_entropy = nn.CrossEntropyLoss()
        self.triplet = losses.OriTripletLoss(margin=margin)

    def __call__(self, outputs, labels):
        visible, infrared = labels.chunk(2, 0)
        block_labels = torch.cat((visible, visible, infrared, infrared))
        stripes = len(outputs.logits)
        return {"id": sum(self.cross_entropy(logits.float(), block_labels) for logits in outputs.logits) / stripes,
                "OriTriplet": sum(mm.pairwise_block_triplet(features.float(), visible, infrared, self.triplet)
                                  for features in outputs.features) / stripes,
                "DCL": DCL_WEIGHT * outputs.dcl.sum() / stripes}


class MMNMethod(Method):
    name = "mmn"
    title = "MMN (ACM MM 2021)"
    network = model_mmn.MMN
    view_modalities = (RGB, IR)
    # MMN train.py: 384x192, 4 ids x 4, lr 0.1 in nine groups (model.param_groups with MMN.HEAD_MODULES), the
    # AGW warm-up/step schedule over epochs 0..80, CE + pairwise triplets (margin 0.3) + DCL, evaluation every
    # second epoch, no AMP.
    defaults = dict(img_h=384, img_w=192, batch_size=4, num_pos=4, lr=0.1, epochs=81, loss_tri="OriTriplet",
                    margin=0.3, lr_scheduler="agw", warmup_epochs=10, milestones=[20, 50], eval_every=2, amp=False,
                    dcl_head="trained")
    train_options = {"dcl_head": (DCL_HEAD_CHOICES, "the DCL projection head: 'trained' (default, with the generator "
                                                    "at the backbone LR) or 'official' (never optimised, as the "
                                                    "official train.py; for reproducing its numbers)")}
    fusions = FUSIONS
    mode_names = {"bn": "bn o-o (FC)", "bn_om": "bn o-m", "bn_mo": "bn m-o", "bn_mm": "bn m-m",
                  "bn_sum": "bn sum of 4", "bn_min": "bn min of 4", "bn_max": "bn max of 4"}
    # All seven rows everywhere: the README does not say which one it published.
    report_modes = dict.fromkeys(("sysu", "regdb", "llcm"), ("bn", *FUSIONS))
    selection_mode = "bn"        # train.py keeps the epoch of the best o-o BN Rank-1

    def view_transforms(self, img_h, img_w, dataset=None):
        """train.py's transform_train for both modalities: its RandomErasing fills with 0 (the draws are
        ChannelRandomErasing's)."""
        transform = T.Compose([T.ToPILImage(), *dl.pad_crop_flip(img_h, img_w), *dl.to_normalized_tensor(),
                               dl.ChannelRandomErasing(p=0.5, sl=0.02, sh=0.4, r1=0.3, fill=(0.0, 0.0, 0.0))])
        return transform, transform

    def network_options(self, dataset, options):
        return {"train_dcl_head": options["dcl_head"] == "trained"}

    @staticmethod
    def classification_logits(outputs):
        """Stripe 1's logits of the original rows (VIS and IR blocks), one row per label."""
        vis, _, ir, _ = mm.four_blocks(outputs.logits[0])
        return torch.cat((vis, ir))

    def build_criterion(self, config):
        if config["loss_tri"] != "OriTriplet":
            raise ConfigError(f"--loss_tri {config['loss_tri']}: MMN trains with OriTriplet (and DCL)")
        return MMNLoss(config["margin"])
