"""DEEN (Zhang and Wang, CVPR 2023; the LLCM repository): REFERENCE 10 sharpened by METHODS.md section 1.

The network is model_deen.DEEN (RegDB: its layer-3 variant). Training: one transform for both modalities,
CE and the batch-hard triplet over the tripled batch (6 row blocks), 0.8 x CPM on (original, DEE1) and
(original, DEE2), 0.01 x ORT. Test: each image has three embeddings (original, DEE1, DEE2) x {pool, BN};
model_deen.image_embeddings puts them side by side so that the 'sum' similarity is DEEN's S7 (sum of the six cosine
matrices) and 'weighted' its S8 (0.1 pool + 0.9 BN); model_deen.DEEN.test_features gives them per batch.
"""
import torch
import torch.nn as nn
import torchvision.transforms as T

import data_loader as dl
import loss as losses
import model_deen
from data_loader import IR, RGB
from method_base import Method
from utils import ConfigError

CPM_WEIGHT = 0.8
ORT_WEIGHT = 0.01
# RandomErasing area range (sl, sh) of DEEN's SYSU loader; its RegDB and LLCM loaders use (0.02, 0.4).
ERASING_AREA = {"sysu": (0.2, 0.8)}
OTHER_ERASING_AREA = (0.02, 0.4)


class DEENLoss:
    """DEEN train.py's loss as named terms, on the training forward's (pool, logits, ort_raw).

    `labels` are the batch's [visible, infrared] labels (2M rows); the tripled batch repeats them 3 times.
    """

    def __init__(self, margin, identities=None):
        self.cross_entropy = nn.CrossEntropyLoss()
        self.triplet = losses.OriTripletLoss(margin=margin)
        self.cpm = losses.CPMLoss(identities=identities)

    def __call__(self, outputs, labels):
        pool, logits, ort_raw = outputs
        pool = pool.float()
        original, branch1, branch2 = pool.chunk(model_deen.DEEN.blocks, 0)
        pair_labels = labels.repeat(2)
        cpm = self.cpm(torch.cat((original, branch1)), pair_labels) + self.cpm(torch.cat((original, branch2)),
                                                                               pair_labels)
        all_labels = labels.repeat(model_deen.DEEN.blocks)
        return {"id": self.cross_entropy(logits.float(), all_labels), "OriTriplet": self.triplet(pool, all_labels),
                "CPM": CPM_WEIGHT * cpm, "ORT": ORT_WEIGHT * ort_raw}


class DEENMethod(Method):
    name = "deen"
    title = "DEEN (CVPR 2023)"
    network = model_deen.DEEN
    view_modalities = (RGB, IR)
    # DEEN train.py: 384x144, 6 ids x 4, lr 0.1 (backbone, DEE and MFA 0.1x: model.param_groups), epochs 0..150
    # on its own step schedule, CE + triplet (margin 0.3) + CPM + ORT, evaluation every epoch, no AMP.
    defaults = dict(img_h=384, img_w=144, batch_size=6, num_pos=4, lr=0.1, epochs=151, loss_tri="OriTriplet",
                    margin=0.3, lr_scheduler="deen", warmup_epochs=10, milestones=[20, 80], eval_every=1, amp=False)
    # S7 (sum of six) and S8 (0.1 pool + 0.9 BN) first, as DEEN test.py prints them.
    report_modes = {dataset: ("sum", "weighted", "pool", "bn") for dataset in ("sysu", "regdb", "llcm")}
    mode_names = {"sum": "S7 (sum of 6)", "weighted": "S8 (0.1 pool + 0.9 bn)"}
    selection_mode = "sum"       # DEEN train.py keeps the epoch of the best S7 Rank-1

    def view_transforms(self, img_h, img_w, dataset=None):
        """DEEN's one chain for both modalities (REFERENCE 10.2); the erasing area depends on the dataset."""
        low, high = ERASING_AREA.get(dataset or "sysu", OTHER_ERASING_AREA)
        transform = T.Compose([T.ToPILImage(), T.Pad(10), T.RandomGrayscale(p=0.5), T.RandomCrop((img_h, img_w)),
                               T.RandomHorizontalFlip(), *dl.to_normalized_tensor(),
                               dl.ChannelRandomErasing(p=0.5, sl=low, sh=high, r1=0.3, fill=dl.IMAGENET_MEAN)])
        return transform, transform

    def network_options(self, dataset, options):
        return {"layer3_variant": dataset in model_deen.LAYER3_DATASETS}

    @staticmethod
    def classification_logits(outputs):
        """The original embedding's logits (the first of the three row blocks), one row per label."""
        logits = outputs[1]
        return logits[:logits.size(0) // model_deen.DEEN.blocks]

    def build_criterion(self, config):
        if config["loss_tri"] != "OriTriplet":
            raise ConfigError(f"--loss_tri {config['loss_tri']}: DEEN trains with OriTriplet (and CPM, ORT)")
        return DEENLoss(config["margin"], identities=config.get("batch_size"))
