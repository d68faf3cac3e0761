"""The AGW family: the AGW baseline (Ye et al., TPAMI 2021) and CAJ (Ye et al., ICCV 2021), which trains
the unchanged AGW network with channel augmentation and the ADP triplet (METHODS.md section 6).

Both use model.AGW: two stems (visible, thermal), a shared trunk with Non_local (C' = 1), GeM and a BN neck.
"""
import torch
import torchvision.transforms as T

import data_loader as dl
import model
from data_loader import IR, RGB
from method_base import Method


class AGWMethod(Method):
    name = "agw"
    title = "AGW (TPAMI 2021)"
    network = model.AGW
    view_modalities = (RGB, IR)
    # The cross-modality baseline repository's train.py: 288x144, 8 ids x 4, lr 0.1 with its own warmup/step
    # schedule, CE + weighted-regularisation triplet, epochs 0..80, no AMP, evaluation every second epoch.
    defaults = dict(img_h=288, img_w=144, batch_size=8, num_pos=4, lr=0.1, epochs=81, loss_tri="WRT",
                    margin=0.3, lr_scheduler="agw", warmup_epochs=10, milestones=[20, 50], eval_every=2, amp=False)

    def view_transforms(self, img_h, img_w, dataset=None):
        """The root AGW repository's chain (REFERENCE 5.3), the same for both modalities."""
        transform = T.Compose([T.ToPILImage(), *dl.pad_crop_flip(img_h, img_w), *dl.to_normalized_tensor()])
        return transform, transform


class CAJMethod(AGWMethod):
    """CAJ (ICCV21_CAJ train_ext.py with the README's settings): the AGW network unchanged, three views per item
    (visible, channel-exchanged visible, infrared), CE + ADP triplet (alpha 1, gamma 1, square 1; --kl 0)."""

    name = "caj"
    title = "CAJ (ICCV 2021)"
    view_modalities = (RGB, RGB, IR)
    # train_ext.py: the AGW recipe with 100 epochs and the ADP triplet (METHODS.md 6.4, 7.1).
    defaults = dict(AGWMethod.defaults, epochs=100, loss_tri="ADP")

    def view_transforms(self, img_h, img_w, dataset=None):
        """ICCV21_CAJ data_loader.py's transform_color, transform_color1, transform_thermal (METHODS.md 6.2)."""
        return (dl.caj_chain(img_h, img_w), dl.caj_chain(img_h, img_w, dl.ChannelExchange(gray=2)),
                dl.caj_chain(img_h, img_w, dl.ChannelAdapGrayCAJ(p=0.5)))

    def network_inputs(self, views):
        """Both visible views go through the visible stem as one batch, as train_ext.py's
        input1 = cat(input10, input11); the output rows are then [view 0 | view 1 | infrared]."""
        visible, visible_exchanged, infrared = views
        return torch.cat((visible, visible_exchanged), 0), infrared
