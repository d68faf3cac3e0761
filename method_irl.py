"""IRL (Low-light Invariant Representation Learning, ACM MM 2025): its views, recipe and loss choice.

The network is model.IRL. Each training item has four views: two augmentations of the visible image and
two of the infrared image (REFERENCE 5.2), each through its own stem, concatenated in one trunk pass.
"""
import torchvision.transforms as T

import data_loader as dl
import model
from data_loader import IR, RGB
from method_base import Method


class IRLMethod(Method):
    name = "irl"
    title = "IRL (ACM MM 2025)"
    network = model.IRL
    view_modalities = (RGB, RGB, IR, IR)
    # IRL train.py (REFERENCE 8.5 / 11.1).
    defaults = dict(img_h=384, img_w=192, batch_size=6, num_pos=4, lr=0.1, epochs=150, loss_tri="QCT",
                    margin=0.7, lr_scheduler="step", warmup_epochs=10, milestones=[25, 90, 120], eval_every=1,
                    amp="cuda")

    def view_transforms(self, img_h, img_w, dataset=None):
        """(T_rgb1, T_rgb2, T_ir1, T_ir2) of REFERENCE 5.2, in the official order of their random draws."""
        geometry = dl.pad_crop_flip(img_h, img_w)
        tensor = dl.to_normalized_tensor()
        return (
            T.Compose([T.ToPILImage(), T.RandomGrayscale(p=0.5), *geometry, *tensor,
                       dl.ChannelRandomErasing(p=0.5)]),
            T.Compose([T.ToPILImage(), *geometry, *tensor, dl.ChannelRandomErasing(p=0.5), dl.ChannelExchange(gray=2)]),
            T.Compose([T.ToPILImage(), *geometry, *tensor, dl.ChannelRandomErasing(p=0.5), dl.ChannelAdapGray(p=0.5)]),
            T.Compose([T.ToPILImage(), T.ColorJitter(brightness=0.5), *geometry, *tensor,
                       dl.ChannelRandomErasing(p=0.5), dl.ChannelT(p=0.5)]),
        )
