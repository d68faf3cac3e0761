"""The middle-modality family's shared parts (MMN, IFALNet; METHODS.md 2.2, 2.3, 5.1, 5.2).

Both methods turn each input into a one-channel "gray" map with a small per-modality generator, decode it
into a 3-channel middle-modality (M) image, and train on four row blocks [VIS, M-VIS, IR, M-IR] in one trunk
pass. The generator convolutions are attributes of the network itself (official keys `encode1`, `fc1`,
`bn1`, ...), so this room gives the functions that register and apply them, not a module of its own.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import CrossModalNet
from similarity import Fusion

# The official generators initialise every 1x1 convolution to this constant weight and a zero bias.
GENERATOR_INIT_WEIGHT = 0.333
# The per-modality generators, numbered as the forward's `modal`: 1 visible, 2 infrared.
GENERATOR_MODALS = (1, 2)
# Row blocks of the training batch, in order.
BLOCKS = ("vis", "middle_vis", "ir", "middle_ir")
# Test features: "pool" and "bn" of the image itself (o), "pool_m" and "bn_m" of its middle-modality image (m).
TEST_FEATURE_NAMES = ("pool", "bn", "pool_m", "bn_m")
# The four query-gallery stem pairs, as feature-name suffixes (query first): o-o, o-m, m-o, m-m.
STEM_PAIRS = {"oo": ("", ""), "om": ("", "_m"), "mo": ("_m", ""), "mm": ("_m", "_m")}


def cross_stem_terms(feature, pairs=tuple(STEM_PAIRS)):
    """Fusion terms (query feature, gallery feature, 1) of `feature` ("pool" or "bn") over the named stem pairs."""
    return tuple((feature + STEM_PAIRS[pair][0], feature + STEM_PAIRS[pair][1], 1.0) for pair in pairs)


# The BN rows both official test scripts print beside the standard "bn" (o-o): the three cross pairs and the
# sum of all four matrices.
CROSS_STEM_FUSIONS = {**{f"bn_{pair}": Fusion(cross_stem_terms("bn", (pair,))) for pair in ("om", "mo", "mm")},
                      "bn_sum": Fusion(cross_stem_terms("bn"))}


def constant_conv(in_channels, out_channels):
    """A 1x1 convolution with bias, initialised as the official generators do (0.333, bias 0)."""
    conv = nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=True)
    nn.init.constant_(conv.weight, GENERATOR_INIT_WEIGHT)
    nn.init.zeros_(conv.bias)
    return conv


def add_gray_generators(net):
    """Give `net` the per-modality generators as the official flat attributes encode1, fc1, bn1, encode2, fc2,
    bn2, registered in that (the official parameter) order."""
    for modal in GENERATOR_MODALS:
        net.add_module(f"encode{modal}", constant_conv(3, 1))
        net.add_module(f"fc{modal}", constant_conv(1, 1))
        # The official weights_init_kaiming has no BatchNorm2d branch: the default weight 1, bias 0 stay.
        net.add_module(f"bn{modal}", nn.BatchNorm2d(1))


def gray_map(net, images, modal):
    """bn(relu(fc(relu(encode(images))))) with `net`'s generator of `modal` (`add_gray_generators`): the
    one-channel map [N, 1, H, W]."""
    encode, fc, bn = (getattr(net, f"{part}{modal}") for part in ("encode", "fc", "bn"))
    return bn(F.relu(fc(F.relu(encode(images)))))


def four_blocks(x):
    """The training batch's [VIS, M-VIS, IR, M-IR] row blocks (equal sizes)."""
    return x.chunk(len(BLOCKS), 0)


def split_original_middle(rows, training_rows):
    """(original rows, middle-modality rows) of a batch (official chunk_feature). training_rows: the training
    layout [VIS, M-VIS, IR, M-IR] (the forward's modal 0), giving (VIS and IR, M-VIS and M-IR); otherwise the
    test layout [o, m] of one modality, giving its two halves."""
    if not training_rows:
        return rows.chunk(2, 0)
    vis, middle_vis, ir, middle_ir = four_blocks(rows)
    return torch.cat((vis, ir)), torch.cat((middle_vis, middle_ir))


def join_original_middle(original, middle, training_rows):
    """The inverse of `split_original_middle` (official concat_feature): back to [VIS, M-VIS, IR, M-IR] or [o, m]."""
    if not training_rows:
        return torch.cat((original, middle))
    vis, ir = original.chunk(2, 0)
    middle_vis, middle_ir = middle.chunk(2, 0)
    return torch.cat((vis, middle_vis, ir, middle_ir))


def pairwise_block_triplet(features, visible_labels, infrared_labels, triplet):
    """Mean of the triplet loss over the four cross pairs (VIS|IR, VIS|M-IR, M-VIS|IR, M-VIS|M-IR), each on
    the two blocks' rows stacked with labels (visible, infrared): MMN's per-stripe and IFALNet's triplet."""
    vis, middle_vis, ir, middle_ir = four_blocks(features)
    labels = torch.cat((visible_labels, infrared_labels))
    pairs = ((vis, ir), (vis, middle_ir), (middle_vis, ir), (middle_vis, middle_ir))
    return sum(triplet(torch.cat(pair), labels) for pair in pairs) / len(pairs)


def test_features(net, images, modal, flip=False):
    """{"pool", "bn", "pool_m", "bn_m"} of eval-mode images of one modality, for a network whose eval forward
    gives (pool, bn) with the images' rows first, then their middle-modality images' rows: the AGW-family
    test features (model.CrossModalNet.test_features, with CAJ's row-wise flip averaging) split in two."""
    features = CrossModalNet.test_features(net, images, modal, flip=flip)
    (pool_o, pool_m), (bn_o, bn_m) = (split_original_middle(features[name], training_rows=False)
                                      for name in ("pool", "bn"))
    return {"pool": pool_o, "bn": bn_o, "pool_m": pool_m, "bn_m": bn_m}
