"""The uniform interface of a training method, and the parts most methods share.

A method is one object that knows everything method-specific (timm-style): the network it builds, the
views of each training item (which modality each view comes from and its transform), how the views enter
the network in one trunk pass, the official recipe (defaults for train.py), the training loss as named
terms, the input-size rule and the similarities reported at test time. train.py, test.py and the shared
evaluation read methods through the table in methods.py and never compare method names.
"""
import torch
import torch.nn as nn

import loss as losses
import model as models
import resnet
import similarity
from data_loader import RGB
from utils import ConfigError

# Metric losses trained beside cross-entropy, by the --loss_tri name; `margin` is --margin.
METRIC_LOSSES = {
    "QCT": lambda margin: losses.QuarCenterTripletLoss(margin=0.7),     # margin hard-coded officially (REF 7.2)
    "WRT": lambda margin: losses.TripletLoss_WRT(),                     # no margin
    "OriTriplet": lambda margin: losses.OriTripletLoss(margin=margin),
    "ADP": lambda margin: losses.TripletLoss_ADP(alpha=1, gamma=1, square=1),   # CAJ README settings, no margin
}

# Similarities reported per dataset unless --modes says otherwise: the official IRL LLCM test prints the
# pool+BN sum and the 0.1/0.9 weighting, the AGW-family SYSU/RegDB tests print BN and pool.
DEFAULT_REPORT_MODES = {"sysu": ("bn", "pool"), "regdb": ("bn", "pool"), "llcm": ("sum", "weighted", "pool", "bn")}


class IdentityAndMetricLoss:
    """Cross-entropy on the BN-neck logits plus one metric loss on the pooled features (REFERENCE 7.1).

    Called with the training forward's (pool, logits) and the labels; returns the named terms
    {"id": CE, <metric name>: metric}, whose sum is the training loss.
    """

    def __init__(self, metric_name, metric):
        self.metric_name, self.metric = metric_name, metric
        self.cross_entropy = nn.CrossEntropyLoss()

    def __call__(self, outputs, labels):
        pool, logits = outputs
        return {"id": self.cross_entropy(logits.float(), labels), self.metric_name: self.metric(pool.float(), labels)}


class Method:
    """One training method. Subclasses set the class attributes and implement `view_transforms`."""

    name = None                  # the --method value
    title = None                 # for tables: e.g. "IRL (ACM MM 2025)"
    network = None               # model.CrossModalNet subclass
    view_modalities = ()         # source modality of each view of a training item, in item order
    defaults = {}                # the official recipe: train.py fills every unset flag from here
    report_modes = DEFAULT_REPORT_MODES
    fusions = {}                 # the method's own similarity modes: {name: similarity.Fusion} (MMN's o-m, ...)
    mode_names = {}              # the method's own labels of similarity modes in result tables (DEEN: S7, S8)
    selection_mode = "bn"        # the similarity whose Rank-1 picks train.py's best epoch (the official choice)
    # The method's own train.py options: {config key: (choices, help)}; the flag is --<key with dashes>, the
    # default is in `defaults`, and the value reaches `network_options` (MMN's --dcl-head).
    train_options = {}

    def view_transforms(self, img_h, img_w, dataset=None):
        """One transform per view (uint8 HxWx3 array -> normalised tensor), in `view_modalities` order.
        `dataset` matters only to methods whose augmentation depends on it (DEEN's erasing area)."""
        raise NotImplementedError

    # -- data -----------------------------------------------------------------------------------------

    def train_views(self, img_h, img_w, dataset=None):
        """((modality, transform), ...): what the training dataset returns for each item, in order."""
        self.check_input_size(img_h, img_w)
        return self.paired_views(self.view_transforms(img_h, img_w, dataset))

    def paired_views(self, transforms):
        """Each transform with the modality of its view; ConfigError unless there is one per view."""
        transforms = tuple(transforms)
        if len(transforms) != len(self.view_modalities):
            raise ConfigError(f"{self.name}: {len(transforms)} transforms for {len(self.view_modalities)} views")
        return tuple(zip(self.view_modalities, transforms))

    def train_labels(self, rgb_labels, ir_labels):
        """Labels of the concatenated views: each view carries the labels of its source modality."""
        return torch.cat([rgb_labels if modality == RGB else ir_labels for modality in self.view_modalities])

    # -- model ----------------------------------------------------------------------------------------

    def check_input_size(self, img_h, img_w):
        self.network.check_input_size(img_h, img_w)

    def build_model(self, num_classes, arch="resnet50", img_h=None, img_w=None, pretrained=None, dataset=None,
                    options=None):
        """The network with this method's name. pretrained: None/False = random initialisation (a checkpoint
        will overwrite it), True = torchvision's cached IMAGENET1K_V1, str = a local weights file.
        dataset, options: for methods whose network differs per dataset or `train_options` value
        (`network_options`); options is a run's config (its `train_options` keys; missing = the default)."""
        if arch not in resnet.ARCHS:
            raise ConfigError(f"unknown arch {arch!r}; choose from {', '.join(resnet.ARCHS)}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ConfigError(f"num_classes must be a positive integer, got {num_classes!r}")
        img_h = self.defaults["img_h"] if img_h is None else img_h
        img_w = self.defaults["img_w"] if img_w is None else img_w
        net = self.network(num_classes, arch=arch, img_h=img_h, img_w=img_w, pretrained=pretrained,
                           **self.network_options(dataset, self.option_values(options)))
        net.method = self.name      # checkpoints record it; the loader checks it
        return net

    def classifier_key(self):
        """The state-dict key whose rows count an official checkpoint's classes (MMN: its first stripe's)."""
        return models.classifier_key(self.network)

    def network_options(self, dataset, options):
        """Extra keyword arguments of the network for `dataset` and the `train_options` values `options`
        (default: the same network everywhere)."""
        return {}

    def option_values(self, config=None):
        """{key: value} of `train_options` from a config, the recipe's default where it has none."""
        config = config or {}
        return {key: config.get(key) if config.get(key) is not None else self.defaults[key]
                for key in self.train_options}

    def network_inputs(self, views):
        """The training forward's inputs from the batch views (default: one view per network input)."""
        return views

    def forward_train(self, model, views):
        """Training forward of a batch (a list of view tensors, in item order), in one trunk pass."""
        if len(views) != len(self.view_modalities):
            raise ConfigError(f"{self.name.upper()} takes {len(self.view_modalities)} views per batch, "
                              f"got {len(views)}")
        return model(*self.network_inputs(views), modal=0)

    @staticmethod
    def classification_logits(outputs):
        """The logits of the training forward's outputs (for the accuracy meter)."""
        return outputs[1]

    # -- loss and test ----------------------------------------------------------------------------------

    def build_criterion(self, config):
        """callable(outputs, labels) -> {term name: scalar tensor}; the training loss is their sum."""
        name = config["loss_tri"]
        if name not in METRIC_LOSSES:
            raise ConfigError(f"--loss_tri {name}: {self.name} trains with one of {', '.join(METRIC_LOSSES)}")
        return IdentityAndMetricLoss(name, METRIC_LOSSES[name](config["margin"]))

    def modes(self, dataset):
        """Similarities test.py reports for `dataset` by default."""
        return self.report_modes[dataset]

    def similarity_modes(self):
        """{mode name: similarity.Fusion}: the standard similarities and the method's own."""
        return {**similarity.STANDARD_FUSIONS, **self.fusions}

    def mode_labels(self):
        """{mode name: label in result tables} of every similarity_modes() entry."""
        return {**similarity.STANDARD_LABELS, **self.mode_names}

    def check_modes(self, modes):
        """ConfigError naming the choices unless every mode is one of this method's similarities."""
        unknown = [mode for mode in modes if mode not in self.similarity_modes()]
        if unknown:
            raise ConfigError(f"--modes {' '.join(unknown)}: {self.name} reports "
                              f"{', '.join(self.similarity_modes())}")
        return tuple(modes)
