"""IFALNet (ZHY-tech11/IFALNet): METHODS.md section 2.

The network is model_ifalnet.IFALNet. Each training item has four views, (RGB, RGB, IR, IR), with CAJ's
chains (METHODS.md 2.4): the second visible and the second infrared view become middle-modality images inside
the network. Loss: CE over the four row blocks [VIS, M-VIS, IR, M-IR], the batch-hard triplet (margin 0.3)
averaged over the four cross pairs (middle_modality.pairwise_block_triplet), and 0.7 x TCA.

Test: each image gives the original stem's (o) and the M-image stem's (m) pool and BN features. The official
test prints six lines, BN(o,o), BN(o,m), BN(m,o), BN(m,m), their sum and ALL (the sum of all eight pool and BN
cosine matrices); train.py selects on ALL. With the standard pool (o,o) line and the sum of the four pool
matrices (computed by the official test, never printed) these are the eight modes below. The README does not
say which line gave its numbers; ALL is the most likely (it selects the best epoch) [inferred, METHODS.md 2.6].
"""
import torch.nn as nn

import data_loader as dl
import loss as losses
import middle_modality as mm
import model_ifalnet
from data_loader import IR, RGB
from method_base import Method
from similarity import Fusion
from utils import ConfigError

TCA_WEIGHT = 0.7
TCA_MARGIN = 0.7
TCA_DIVISORS = ("identities", "official")      # --tca-divisor: loss.TcaLoss(official_divisor=False / True)
FUSIONS = {**mm.CROSS_STEM_FUSIONS, "pool_sum": Fusion(mm.cross_stem_terms("pool")),
           "all": Fusion(mm.cross_stem_terms("pool") + mm.cross_stem_terms("bn")),
           # The official LLCM test's ALL: its (hard-coded, swapped) branch fills all four pool matrices with
           # pool(o,o) (METHODS.md 2.6 bug 2). Kept to compare with its published LLCM numbers, never default.
           "all_llcm": Fusion((("pool", "pool", 4.0),) + mm.cross_stem_terms("bn"))}


class IFALNetLoss:
    """IFALNet train.py's loss as named terms on the training forward's (pool, logits) and the 4M labels
    [VIS, M-VIS, IR, M-IR]: {"id": CE, "OriTriplet": the four cross-pair triplets' mean, "TCA": 0.7 x TCA}."""

    def __init__(self, margin, tca_official_divisor=False):
        self.cross_entropy = nn.CrossEntropyLoss()
        self.triplet = losses.OriTripletLoss(margin=margin)
        self.tca = losses.TcaLoss(margin=TCA_MARGIN, official_divisor=tca_official_divisor)

    def __call__(self, outputs, labels):
        pool, logits = outputs
        pool = pool.float()
        visible_labels, _, infrared_labels, _ = mm.four_blocks(labels)
        return {"id": self.cross_entropy(logits.float(), labels),
                "OriTriplet": mm.pairwise_block_triplet(pool, visible_labels, infrared_labels, self.triplet),
                "TCA": TCA_WEIGHT * self.tca(pool, labels)}


class IFALNetMethod(Method):
    name = "ifalnet"
    title = "IFALNet"
    network = model_ifalnet.IFALNet
    view_modalities = (RGB, RGB, IR, IR)
    # IFALNet train.py: 384x192, 4 ids x 4, lr 0.1 (everything but the BN neck and classifier 0.1x), epochs
    # 0..120 on its own step schedule, evaluation every epoch, no AMP.
    defaults = dict(img_h=384, img_w=192, batch_size=4, num_pos=4, lr=0.1, epochs=121, loss_tri="OriTriplet",
                    margin=0.3, lr_scheduler="ifalnet", warmup_epochs=10, milestones=[20, 60, 90], eval_every=1,
                    amp=False, tca_divisor="identities")
    train_options = {"tca_divisor": (TCA_DIVISORS, "TCA's positive-term divisor: 'identities' (default, the "
                                                   "batch's identity count) or 'official' (the official loss's "
                                                   "hard-coded 4; the same at its default 4 identities per batch)")}
    fusions = FUSIONS
    mode_names = {"bn": "BN(o,o)", "bn_om": "BN(o,m)", "bn_mo": "BN(m,o)", "bn_mm": "BN(m,m)",
                  "bn_sum": "BN sum (4)", "pool": "pool(o,o)", "pool_sum": "pool sum (4)", "all": "ALL (sum of 8)",
                  "all_llcm": "ALL as the official LLCM test (4 pool(o,o) + BN sum)"}
    # The official test's six lines, ALL first (it picks the best epoch), then the two pool modes.
    report_modes = {dataset: ("all", "bn_sum", "bn", "bn_om", "bn_mo", "bn_mm", "pool", "pool_sum")
                    for dataset in ("sysu", "regdb", "llcm")}
    selection_mode = "all"

    def view_transforms(self, img_h, img_w, dataset=None):
        """IFALNet build_transforms.py's color1, color2, thermal1, thermal2 (CAJ's chains, METHODS.md 2.4)."""
        return (dl.caj_chain(img_h, img_w), dl.caj_chain(img_h, img_w, dl.ChannelExchange(gray=2)),
                dl.caj_chain(img_h, img_w), dl.caj_chain(img_h, img_w, dl.ChannelAdapGrayCAJ(p=0.5)))

    def build_criterion(self, config):
        if config["loss_tri"] != "OriTriplet":
            raise ConfigError(f"--loss_tri {config['loss_tri']}: IFALNet trains with OriTriplet (and TCA)")
        official = self.option_values(config)["tca_divisor"] == "official"
        return IFALNetLoss(config["margin"], tca_official_divisor=official)
