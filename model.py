"""IRL and AGW cross-modality re-identification models (REFERENCE 6), and official-checkpoint loading.

Both models keep the official parameter names for every module they use, so an official checkpoint loads
by dropping its known-unused entries (REFERENCE 6.2, Q-10) and a strict load of the rest. Unlike the
official code they hold only what they use: the modality stems are conv1/bn1/ReLU/maxpool, the trunk is
layer1..layer4, and the dead modules (sin, NAF3, local_conv, feat_bn2d, unused layerATT parts) are absent.
"""
import os
from collections import OrderedDict

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

import resnet
from progress import Progress
from utils import CheckpointError, ConfigError, load_torch_file

CHECKPOINT_FORMAT = "vireid-ckpt-v1"
MODAL_NAMES = {1: "visible", 2: "infrared"}
IRL_SIZE_MULTIPLE = 16          # output stride of layer3: the layerATT side convs need exact divisions
OFFICIAL_NON_LOCAL_COUNTS = (2, 3)   # Non_local blocks after the last blocks of layer2 / layer3
GEM_P = 3.0


# ----------------------------------------------------------------------------------------------------
# Building blocks


def at_least_float32(x):
    """x in float32 where the official code casts to float32 (fp16/bf16 under autocast); float64 (parity
    tests) stays float64, which the official cast would break against float64 parameters."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 and cast back (official CLIP-style; keeps AMP stable)."""

    def forward(self, x):
        return super().forward(at_least_float32(x)).to(x.dtype)


class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Non_local(nn.Module):
    """Non-local block without softmax: y = (theta @ phi / L) @ g (REFERENCE 6.3).

    IRL uses inter_channels = C/2; the AGW baseline has inter_channels = 1 (Q-24, kept for its checkpoints).
    official_form = True computes it as the official code does, through the L x L matrix (the baseline
    that bench/bench_model.py measures us against; the same outputs up to rounding).
    """

    official_form = False

    def __init__(self, in_channels, inter_channels):
        super().__init__()
        self.inter_channels = inter_channels
        self.g = nn.Sequential(nn.Conv2d(in_channels, inter_channels, 1))
        self.W = nn.Sequential(nn.Conv2d(inter_channels, in_channels, 1), nn.BatchNorm2d(in_channels))
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)
        self.theta = nn.Conv2d(in_channels, inter_channels, 1)
        self.phi = nn.Conv2d(in_channels, inter_channels, 1)

    def forward(self, x):
        n, _, h, w = x.shape
        g = self.g(x).flatten(2).transpose(1, 2)            # [N, L, C']
        theta = self.theta(x).flatten(2).transpose(1, 2)    # [N, L, C']
        phi = self.phi(x).flatten(2)                        # [N, C', L]
        if self.official_form:
            y = ((theta @ phi) / (h * w)) @ g
        else:
            # Same product, associated so that a C' x C' matrix replaces the L x L one (256^2 against 1152^2
            # at layer 2 of 384x192); dividing first keeps the intermediate a mean (no fp16 overflow under
            # autocast).
            y = theta @ ((phi / (h * w)) @ g)
        y = y.transpose(1, 2).reshape(n, self.inter_channels, h, w)
        return self.W(y) + x


class ChannelAttention(nn.Module):
    def __init__(self, channels, ratio=8):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // ratio, 1, bias=False)
        self.fc2 = nn.Conv2d(channels // ratio, channels, 1, bias=False)

    def from_pooled(self, mean, maximum):
        """The attention weights from the average- and max-pooled maps (1x1 convs: any pooled grid works)."""
        def mlp(pooled):
            return self.fc2(F.relu(self.fc1(pooled)))
        return torch.sigmoid(mlp(mean) + mlp(maximum))

    def forward(self, x):
        return self.from_pooled(F.adaptive_avg_pool2d(x, 1), F.adaptive_max_pool2d(x, 1))


class SpatialAttention(nn.Module):
    def __init__(self, kernel_size=3):
        super().__init__()
        self.conv1 = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=False)

    def forward(self, x):
        pooled = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return torch.sigmoid(self.conv1(pooled))


class LPA(nn.Module):
    """Local-patch attention (REFERENCE 6.4): CBAM on each quadrant plus CBAM on the whole map.

    official_form = True runs the official quadrant loop (chunk, four CBAMs, concatenate; the bench
    baseline), otherwise the quadrants are processed in place.
    """

    official_form = False

    def __init__(self, channels):
        super().__init__()
        self.ca = ChannelAttention(channels)
        self.sa = SpatialAttention(3)

    def _cbam(self, x):
        x = self.ca(x) * x
        return self.sa(x) * x

    def _quadrant_cbam(self, x):
        """CBAM of each quadrant of x, in x's own layout: no copy of the full map is made (only the pooled
        maps are rearranged), which saves two full-size tensors per LPA in memory and time."""
        n, c, h, w = x.shape
        quads = x.view(n, c, 2, h // 2, 2, w // 2)
        # One call on the [N, C, 2, 2] pooled grid gives the four quadrants' channel weights.
        ca = self.ca.from_pooled(quads.mean((3, 5)), quads.amax((3, 5)))
        weighted = quads * ca[:, :, :, None, :, None]
        pooled = torch.stack([weighted.mean(1), weighted.amax(1)], dim=1)          # [N, 2, 2, h/2, 2, w/2]
        # The 3x3 conv runs on each quadrant separately (zero padding at the quadrant borders).
        pooled = pooled.permute(0, 2, 4, 1, 3, 5).reshape(4 * n, 2, h // 2, w // 2)
        sa = torch.sigmoid(self.sa.conv1(pooled)).reshape(n, 2, 2, h // 2, w // 2).permute(0, 1, 3, 2, 4)
        return (weighted * sa[:, None]).view(n, c, h, w)

    def forward(self, x):
        if self.official_form:
            top, bottom = x.chunk(2, dim=2)
            rows = [torch.cat([self._cbam(q) for q in half.chunk(2, dim=3)], dim=3) for half in (top, bottom)]
            return torch.cat(rows, dim=2) + self._cbam(x)
        # Even H and W are guaranteed by the IRL input-size check.
        return self._quadrant_cbam(x) + self._cbam(x)


class layerATT(nn.Module):
    """Cross-layer attention with channels as tokens and the flattened layer-3 map as embedding (6.5).

    side: None (layerATT3: self-attention only), "ATT_narrow1" (6x6 conv, stride 4, from the stem or
    layer1 resolution) or "ATT_narrow2" (4x4 conv, stride 2, from the layer2 resolution).
    The attention is fused (scaled_dot_product_attention: the [N, heads, tokens, tokens] weights are never
    kept for backward) unless official_form = True, which writes it out as matrix products and softmax
    as the official code ran (MultiheadAttention returning its weights; the bench baseline).
    """

    official_form = False

    def __init__(self, channel, tokens, edim, num_heads, side=None, side_channels=None):
        super().__init__()
        self.ATT_narrow = nn.Conv2d(channel, tokens, 1)
        self.ATT_broad = nn.Conv2d(tokens, channel, 1)
        self.attn = nn.MultiheadAttention(edim, num_heads, batch_first=True)
        self.ln_1 = LayerNorm(edim)
        self.mlp = nn.Sequential(OrderedDict([("c_fc", nn.Linear(edim, edim * 4)), ("gelu", QuickGELU()),
                                              ("c_proj", nn.Linear(edim * 4, edim))]))
        self.ln_2 = LayerNorm(edim)
        self.side = side
        if side is not None:
            self.ln_1o = LayerNorm(edim)
            kernel, stride, padding = {"ATT_narrow1": (6, 4, 2), "ATT_narrow2": (4, 2, 1)}[side]
            self.add_module(side, nn.Conv2d(side_channels, tokens, kernel, stride, padding))

    def forward(self, x, x_side=None):
        n, _, h, w = x.shape
        t = self.ln_1(self.ATT_narrow(x).flatten(2))                 # [N, tokens, H3*W3]
        if self.side is None:
            t = t + self.attn(t, t, t, need_weights=self.official_form)[0]
        else:
            s = self.ln_1o(getattr(self, self.side)(x_side).flatten(2))
            t = t + 0.1 * s
            t = t + self.attn(s, s, t, need_weights=self.official_form)[0]    # query/key from the side branch
        t = t + self.mlp(self.ln_2(t))
        return self.ATT_broad(t.reshape(n, -1, h, w))


class LayerNorm2d(nn.Module):
    """Channel LayerNorm of NAFNet (biased variance, eps 1e-6); plain autograd equals the official backward.

    Computed by F.layer_norm over the channels of the channels-last view (one fused kernel that keeps only
    the input and two per-position statistics for backward) unless official_form = True, which writes the
    expression out as the official code does.
    """

    official_form = False

    def __init__(self, channels, eps=1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x):
        if not self.official_form:
            normalised = F.layer_norm(x.permute(0, 2, 3, 1), x.shape[1:2], self.weight, self.bias, self.eps)
            return normalised.permute(0, 3, 1, 2)
        mu = x.mean(1, keepdim=True)
        var = (x - mu).pow(2).mean(1, keepdim=True)
        y = (x - mu) / (var + self.eps).sqrt()
        return self.weight.view(1, -1, 1, 1) * y + self.bias.view(1, -1, 1, 1)


def simple_gate(x):
    first, second = x.chunk(2, dim=1)
    return first * second


class NAFBlock(nn.Module):
    """NAFNet block (REFERENCE 6.6); identity at initialisation (beta = gamma = 0)."""

    def __init__(self, c, dw_expand=2, ffn_expand=2):
        super().__init__()
        dw, ffn = c * dw_expand, c * ffn_expand
        self.conv1 = nn.Conv2d(c, dw, 1)
        self.conv2 = nn.Conv2d(dw, dw, 3, padding=1, groups=dw)
        self.conv3 = nn.Conv2d(dw // 2, c, 1)
        self.sca = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(dw // 2, dw // 2, 1))
        self.conv4 = nn.Conv2d(c, ffn, 1)
        self.conv5 = nn.Conv2d(ffn // 2, c, 1)
        self.norm1 = LayerNorm2d(c)
        self.norm2 = LayerNorm2d(c)
        self.beta = nn.Parameter(torch.zeros(1, c, 1, 1))
        self.gamma = nn.Parameter(torch.zeros(1, c, 1, 1))

    def forward(self, inp):
        t = simple_gate(self.conv2(self.conv1(self.norm1(inp))))
        t = self.conv3(t * self.sca(t))
        y = inp + self.beta * t
        u = self.conv5(simple_gate(self.conv4(self.norm2(y))))
        return y + self.gamma * u


class ModalityStem(nn.Module):
    """Official wrapper `visible_module.visible.*`: of the ResNet it held only the stem is used."""

    def __init__(self, attr, stem):
        super().__init__()
        self.attr = attr
        self.add_module(attr, stem)

    def forward(self, x):
        return getattr(self, self.attr)(x)


class Trunk(nn.Module):
    """Official wrapper `base_resnet.base.*`: of the ResNet it held only layer1..layer4 are used."""

    def __init__(self, base):
        super().__init__()
        self.base = base


def add_backbone(net, arch, pretrained):
    """Give `net` its modality stems (`net.STEMS`, official wrappers holding a ResNet stem) and the shared trunk
    `base_resnet` (layer1..4), in that registration order; returns the trunk's stage channels."""
    stems, trunk = _backbone_parts(arch, len(net.STEMS), pretrained)
    net._official_trunk_keys = list(trunk.state_dict())
    for (name, attr), stem in zip(net.STEMS, stems):
        net.add_module(name, ModalityStem(attr, stem))
    net.base_resnet = Trunk(trunk)
    return trunk.stage_channels


def backbone_unused_keys(net):
    """The official keys of a network built by `add_backbone` that it does not hold: each stem's layer1..4 (the
    official stems are whole ResNets) and the trunk's conv1/bn1."""
    stem_keys = list(getattr(net, net.STEMS[0][0]).state_dict())
    unused = {f"{name}.{attr}.{k}" for name, attr in net.STEMS for k in net._official_trunk_keys}
    return unused | {f"base_resnet.base.{k.split('.', 1)[1]}" for k in stem_keys}


def bn_neck(feat_dim, num_classes):
    """(bottleneck, classifier) as the official heads: BatchNorm1d with weight N(1, 0.01) and a bias frozen at 0,
    and a bias-free Linear with weight N(0, 0.001)."""
    bottleneck = nn.BatchNorm1d(feat_dim)
    bottleneck.bias.requires_grad_(False)
    nn.init.normal_(bottleneck.weight, 1.0, 0.01)
    nn.init.zeros_(bottleneck.bias)
    classifier = nn.Linear(feat_dim, num_classes, bias=False)
    nn.init.normal_(classifier.weight, 0.0, 0.001)
    return bottleneck, classifier


def gem_pool(x, p=GEM_P):
    """Generalised-mean pooling over the spatial positions, no clamp (inputs are >= 0 after ReLU)."""
    return (x.flatten(2).pow(p).mean(-1) + 1e-12).pow(1.0 / p)


def l2_normalize(x):
    """Official Normalize: plain division by the L2 norm (no epsilon)."""
    return x / x.pow(2).sum(1, keepdim=True).sqrt()


def attention_heads(edim):
    """Largest divisor of edim not above edim // 9 (official: 288 // 9 = 32 heads of 9), at least 1."""
    return max(d for d in range(1, max(edim // 9, 1) + 1) if edim % d == 0)


def run_stage(layer, non_locals, x, call):
    """A ResNet stage with its Non_local blocks after the last len(non_locals) bottlenecks; call(block, x)
    runs each block (plainly or under activation checkpointing)."""
    first = len(layer) - len(non_locals)
    for i, block in enumerate(layer):
        x = call(block, x)
        if i >= first:
            x = call(non_locals[i - first], x)
    return x


class _BatchNormStatsKept:
    """Within: the BatchNorms of `module` run as usual, and their running statistics are put back on exit.
    Activation checkpointing recomputes a block's forward in backward; that second forward must not update
    the running mean/var (and batch count) a second time. (Switching the tracking off instead would change
    which tensors batch_norm saves, which checkpointing refuses.)"""

    def __init__(self, module):
        self.buffers = [b for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                        for b in m.buffers()]

    def __enter__(self):
        self.saved = [b.clone() for b in self.buffers]

    def __exit__(self, *exc):
        with torch.no_grad():
            for b, saved in zip(self.buffers, self.saved):
                b.copy_(saved)


def checkpointed(module, *inputs):
    """module(*inputs) keeping only its inputs for backward and recomputing the rest there (non-reentrant
    torch.utils.checkpoint); BatchNorm running statistics are updated once, as without checkpointing."""
    calls = []

    def run(*args):
        calls.append(None)
        if len(calls) == 1:
            return module(*args)
        with _BatchNormStatsKept(module):
            return module(*args)
    return checkpoint(run, *inputs, use_reentrant=False)


# ----------------------------------------------------------------------------------------------------
# Models


# Stride-2 steps from the input to each stage's output map: the stem's convolution and max pool, then the first
# block of layer2 and of layer3; layer4 keeps its input's size (last stride 1, `_backbone_parts`).
STAGE_STRIDE2_STEPS = {"stem": 2, "layer1": 2, "layer2": 3, "layer3": 4, "layer4": 4}


def stage_map_size(size, stage):
    """One side of `stage`'s output map for an input side of `size` pixels: each stride-2 step ('same' padding)
    rounds half the size up."""
    for _ in range(STAGE_STRIDE2_STEPS[stage]):
        size = (size - 1) // 2 + 1
    return size


def _backbone_parts(arch, n_stems, pretrained):
    """(stems, trunk): n_stems ResNet stems and one layer1..4 trunk, ImageNet-initialised if requested."""
    stems = [resnet.ResNetStem() for _ in range(n_stems)]
    trunk = resnet.build_resnet(arch, last_conv_stride=1, with_stem=False)
    if pretrained:
        path = None if pretrained is True else os.fspath(pretrained)
        state = resnet.imagenet_state_dict(arch, path)     # read once, shared by every stem and the trunk
        source = resnet.imagenet_source(arch, path)
        for part in stems + [trunk]:
            resnet.apply_imagenet_state(part, state, source)
    return stems, trunk


class NetworkBase(nn.Module):
    """The checks every network makes the same way (IRL and AGW, DEEN, MMN, IFALNet): the image size it is built
    for, the forward's `modal`, and activation checkpointing, which a network that has not written it refuses
    in one line instead of ignoring. Adds no parameters or buffers."""

    @classmethod
    def check_input_size(cls, img_h, img_w):
        """ConfigError unless the network accepts img_h x img_w inputs (here: any positive size)."""
        if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (img_h, img_w)):
            raise ConfigError(f"image size must be positive integers, got {img_h!r}x{img_w!r}")

    @staticmethod
    def _check_modal(modal):
        if modal not in (0, 1, 2):
            raise ConfigError(f"modal must be 0 (train), 1 (visible) or 2 (thermal), got {modal!r}")

    def set_grad_checkpointing(self, enabled=True):
        """Activation checkpointing is written only for IRL and AGW (CrossModalNet): refused, never ignored."""
        if enabled:
            raise ConfigError(f"--grad-checkpoint is not available for {type(self).__name__} "
                              f"(IRL, AGW and CAJ have it)")
        return self


class CrossModalNet(NetworkBase):
    """Common parts of IRL and AGW: modality stems, shared trunk with Non_local, GeM + BNNeck head."""

    method = None          # the training method's name; methods.Method.build_model sets it per instance
    STEMS = ()             # (module name, attribute name) in the official registration order
    num_inputs = 0         # image tensors the forward takes (the same image to each of them at test time)
    grad_checkpoint = False    # set_grad_checkpointing

    def __init__(self, num_classes, arch, img_h, img_w, pretrained, nl_inter):
        super().__init__()
        self.num_classes, self.arch, self.img_h, self.img_w = num_classes, arch, img_h, img_w
        channels = add_backbone(self, arch, pretrained)
        trunk = self.base_resnet.base
        c2, c3 = channels[2], channels[3]
        n2, n3 = (min(k, len(layer)) for k, layer in zip(OFFICIAL_NON_LOCAL_COUNTS, (trunk.layer2, trunk.layer3)))
        self.NL_2 = nn.ModuleList([Non_local(c2, nl_inter(c2)) for _ in range(n2)])
        self.NL_3 = nn.ModuleList([Non_local(c3, nl_inter(c3)) for _ in range(n3)])
        self.feat_dim = channels[4]
        self.bottleneck, self.classifier = bn_neck(self.feat_dim, num_classes)

    def set_grad_checkpointing(self, enabled=True):
        """Activation checkpointing in training: each stem, bottleneck, Non_local (and IRL's LPA, layerATT,
        NAF) keeps only its input for backward and recomputes its forward there. Same outputs and gradients;
        much less activation memory for about one more forward pass of time."""
        self.grad_checkpoint = bool(enabled)
        return self

    def set_official_form(self, enabled=True):
        """Attention blocks computed as the official code does (Non_local through its L x L matrix, layerATT
        with written-out attention weights): the baseline of bench/bench_model.py, same outputs."""
        for m in self.modules():
            if hasattr(type(m), "official_form"):
                m.official_form = bool(enabled)
        return self

    def _call(self, module, *inputs):
        """module(*inputs), under activation checkpointing when it is on and gradients are being recorded."""
        if self.grad_checkpoint and self.training and torch.is_grad_enabled():
            return checkpointed(module, *inputs)
        return module(*inputs)

    def _head(self, x):
        x_pool = gem_pool(at_least_float32(x))
        feat = self.bottleneck(x_pool)
        if self.training:
            return x_pool, self.classifier(feat)
        return l2_normalize(x_pool), l2_normalize(feat)

    def test_features(self, images, modal, flip=False):
        """{"pool", "bn"}: L2-normalised test features [N, D] of eval-mode images of one modality, the same
        images going to every stem (official test protocol). flip: CAJ's flip test-time augmentation
        (`flip_average`). Networks with several embeddings per image (DEEN, MMN) define their own; the names
        are those of similarity.py's fusions."""
        pool, bn = self(*([images] * self.num_inputs), modal=modal)
        if flip:
            pool_flipped, bn_flipped = self(*([images.flip(3)] * self.num_inputs), modal=modal)
            pool, bn = flip_average(pool, pool_flipped), flip_average(bn, bn_flipped)
        return {"pool": pool, "bn": bn}

    @property
    def test_feature_dim(self):
        return self.feat_dim

    # The names of test_features' dict, in order (an empty extraction still has them).
    test_feature_names = ("pool", "bn")

    def official_unused_keys(self):
        """Keys an official checkpoint holds that this model does not use (REFERENCE 6.2), derived by rule."""
        return backbone_unused_keys(self)


class IRL(CrossModalNet):
    """IRL embed_net (REFERENCE 6.2-6.8) generalised to any ResNet and any input size multiple of 16."""

    method = "irl"
    STEMS = (("thermal_module", "thermal"), ("visible_module", "visible"),
             ("thermal_moduleA", "thermal"), ("visible_moduleA", "visible"))
    num_inputs = 4

    @classmethod
    def check_input_size(cls, img_h, img_w):
        """The layerATT side convolutions divide the stem, layer1 and layer2 maps exactly into the layer-3 grid."""
        super().check_input_size(img_h, img_w)
        if img_h % IRL_SIZE_MULTIPLE or img_w % IRL_SIZE_MULTIPLE:
            raise ConfigError(f"IRL needs image height and width that are multiples of {IRL_SIZE_MULTIPLE} "
                              f"(e.g. 384x192, 256x128, 128x64), got {img_h}x{img_w}")

    def __init__(self, num_classes, arch="resnet50", img_h=384, img_w=192, pretrained=None):
        self.check_input_size(img_h, img_w)
        super().__init__(num_classes, arch, img_h, img_w, pretrained, nl_inter=lambda c: c // 2)
        c = self.base_resnet.base.stage_channels
        c3 = c[3]
        self.delta = nn.Parameter(torch.zeros(1, c3, 1, 1))
        edim = (img_h // IRL_SIZE_MULTIPLE) * (img_w // IRL_SIZE_MULTIPLE)
        tokens, heads = c3 // 4, attention_heads(edim)     # 256 channel tokens and 32 heads for resnet50 at 384x192
        self.layerATT0 = layerATT(c3, tokens, edim, heads, "ATT_narrow1", c[0])
        self.layerATT1 = layerATT(c3, tokens, edim, heads, "ATT_narrow1", c[1])
        self.layerATT2 = layerATT(c3, tokens, edim, heads, "ATT_narrow2", c[2])
        self.layerATT3 = layerATT(c3, tokens, edim, heads)
        self.LPA0, self.LPA1, self.LPA2 = LPA(c[0]), LPA(c[1]), LPA(c[2])
        self.NAF1, self.NAF2 = NAFBlock(c3), NAFBlock(c3)

    def _check_inputs(self, *xs):
        for x in xs:
            if tuple(x.shape[-2:]) != (self.img_h, self.img_w):
                h, w = x.shape[-2:]
                raise ConfigError(f"IRL model built for {self.img_h}x{self.img_w} inputs got {h}x{w}: layerATT "
                                  f"sizes follow the build size; resize the images or build the model with "
                                  f"img_h={h}, img_w={w} (IRL accepts multiples of {IRL_SIZE_MULTIPLE})")

    def forward(self, x_rgb1, x_rgb2, x_ir1, x_ir2, modal=0):
        self._check_modal(modal)
        if modal == 0:
            self._check_inputs(x_rgb1, x_rgb2, x_ir1, x_ir2)
            # One batch through the trunk: its BatchNorms see all four views together (REFERENCE 6.7).
            call = self._call
            x = torch.cat((call(self.visible_module, x_rgb1), call(self.visible_moduleA, x_rgb2),
                           call(self.thermal_module, x_ir1), call(self.thermal_moduleA, x_ir2)), 0)
        elif modal == 1:
            self._check_inputs(x_rgb1, x_rgb2)
            x = (self.visible_module(x_rgb1) + self.visible_moduleA(x_rgb2)) / 2
        else:
            self._check_inputs(x_ir1, x_ir2)
            x = (self.thermal_module(x_ir1) + self.thermal_moduleA(x_ir2)) / 2
        base, call = self.base_resnet.base, self._call
        xlay0 = call(self.LPA0, x)
        x = run_stage(base.layer1, (), x, call)
        xlay1 = call(self.LPA1, x)
        x = run_stage(base.layer2, self.NL_2, x, call)
        xlay2 = call(self.LPA2, x)
        x3 = run_stage(base.layer3, self.NL_3, x, call)
        x = call(self.layerATT0, x3, xlay0) + self.delta * call(self.NAF1, x3)
        x = call(self.layerATT1, x, xlay1) + 0.3 * call(self.NAF2, x3)
        x = call(self.layerATT2, x, xlay2)
        x = call(self.layerATT3, x)
        return self._head(run_stage(base.layer4, (), x, call))

    def official_unused_keys(self):
        unused = super().official_unused_keys()
        unused |= {"sin", "local_conv.weight"}
        unused |= {f"feat_bn2d.{k}" for k in nn.BatchNorm2d(1).state_dict()}
        unused |= {f"NAF3.{k}" for k in self.NAF1.state_dict()}
        unused |= {f"{att}.{conv}.{p}" for att, conv in (("layerATT0", "ATT_narrow2"), ("layerATT1", "ATT_narrow2"),
                                                         ("layerATT2", "ATT_narrow1"), ("layerATT3", "ATT_narrow1"),
                                                         ("layerATT3", "ATT_narrow2"))
                   for p in ("weight", "bias")}
        unused |= {"layerATT3.ln_1o.weight", "layerATT3.ln_1o.bias"}
        return unused


class AGW(CrossModalNet):
    """AGW cross-modality baseline (REFERENCE 6.11): two stems, Non_local with C'=1 (Q-24), GeM, BNNeck."""

    method = "agw"
    STEMS = (("thermal_module", "thermal"), ("visible_module", "visible"))
    num_inputs = 2

    def __init__(self, num_classes, arch="resnet50", img_h=288, img_w=144, pretrained=None):
        self.check_input_size(img_h, img_w)
        super().__init__(num_classes, arch, img_h, img_w, pretrained, nl_inter=lambda c: 1)

    def forward(self, x_rgb, x_ir, modal=0):
        self._check_modal(modal)
        call = self._call
        if modal == 0:
            x = torch.cat((call(self.visible_module, x_rgb), call(self.thermal_module, x_ir)), 0)
        elif modal == 1:
            x = self.visible_module(x_rgb)
        else:
            x = self.thermal_module(x_ir)
        base = self.base_resnet.base
        x = run_stage(base.layer1, (), x, call)
        x = run_stage(base.layer2, self.NL_2, x, call)
        x = run_stage(base.layer3, self.NL_3, x, call)
        return self._head(run_stage(base.layer4, (), x, call))


def unwrap(model):
    """The model inside a DataParallel/DistributedDataParallel wrapper (or the model itself)."""
    return getattr(model, "module", model)


def flip_average(features, flipped_features):
    """CAJ's flip test-time augmentation (testa.py): the mean of the L2-normalised features of an image and of
    its mirror image, normalised again."""
    return l2_normalize((features + flipped_features) / 2)


def extract_features(model, loader, modal, device, *, flip=False, channels_last=False, progress=True):
    """{feature name: float64 array [N, D]} (L2-normalised; "pool" and "bn", and whatever else the network's
    test_features names) of every loader image, in loader order.

    Eval mode, inference mode, float32. The same image goes to every stem (official test protocol,
    IRL averages its two stems of `modal`). flip: the network's flip test-time augmentation.
    channels_last also converts the model; its train/eval mode is restored afterwards.
    """
    if modal not in (1, 2):
        raise ConfigError(f"modal must be 1 (visible) or 2 (thermal), got {modal!r}")
    net = unwrap(model)
    device = torch.device(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if channels_last:
        net.to(memory_format=torch.channels_last)
    was_training = net.training
    net.eval()
    batches = []
    shown = Progress(len(loader.dataset), f"features of {MODAL_NAMES[modal]} images", "img") if progress else None
    try:
        with torch.inference_mode(), torch.autocast(device.type, enabled=False):
            for imgs, _ in loader:
                x = imgs.to(device, non_blocking=True).contiguous(memory_format=memory_format)
                # The features stay on the device until the end: a copy per batch would wait for each batch.
                batches.append(net.test_features(x, modal, flip=flip))
                if shown is not None:
                    shown.update(len(imgs))
            if not batches:
                return {name: np.zeros((0, net.test_feature_dim)) for name in net.test_feature_names}
            # float32 to the host, widened there: exact, and half the bytes (and no float64 copy on a GPU).
            return {name: torch.cat([batch[name] for batch in batches]).cpu().double().numpy()
                    for name in batches[0]}
    finally:
        net.train(was_training)
        if shown is not None:
            shown.close()


# Modules trained at the full LR, one SGD group each, unless a network lists its own in `HEAD_MODULES`
# (MMN: bottleneck1..4 and classifier1..4, its official nine groups).
HEAD_MODULES = ("bottleneck", "classifier")


def classifier_key(network):
    """The state-dict key whose rows count a network's classes (a network class or instance): its
    CLASSIFIER_KEY (MMN: its first stripe's classifier), else classifier.weight."""
    return getattr(network, "CLASSIFIER_KEY", "classifier.weight")


def param_groups(model, lr, backbone_lr_mult=0.1):
    """SGD groups of REFERENCE 8.2: backbone (everything else) at backbone_lr_mult*lr, then one group at lr per
    head module (`HEAD_MODULES` of the network, default bottleneck and classifier), named after it.

    `backbone_lr_mult` replaces the official 0.1 (chosen for ImageNet-initialised backbones).

    Only trainable parameters are listed (the frozen BNNeck bias gets no gradient either way).
    """
    net = unwrap(model)
    heads = [(name, [p for p in getattr(net, name).parameters() if p.requires_grad])
             for name in getattr(net, "HEAD_MODULES", HEAD_MODULES)]
    head_ids = {id(p) for _, params in heads for p in params}
    backbone = [p for p in net.parameters() if p.requires_grad and id(p) not in head_ids]
    return [{"params": backbone, "lr": backbone_lr_mult * lr, "name": "backbone"}] + \
        [{"params": params, "lr": lr, "name": name} for name, params in heads]


# ----------------------------------------------------------------------------------------------------
# Checkpoints


def _plain(value):
    """numpy/torch values of official checkpoints -> plain Python (floats, lists)."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def _split_checkpoint(ckpt, source):
    """(state_dict, metadata) of our, official or bare-state-dict checkpoints."""
    if not isinstance(ckpt, dict):
        raise CheckpointError(f"{source} is not a checkpoint: expected a dict, found {type(ckpt).__name__}")
    if "format" in ckpt:
        if ckpt["format"] != CHECKPOINT_FORMAT or not isinstance(ckpt.get("model"), dict):
            raise CheckpointError(f"{source}: unknown checkpoint format {ckpt['format']!r} "
                                  f"(expected {CHECKPOINT_FORMAT!r} with a 'model' state dict)")
        meta = {k: ckpt.get(k) for k in ("epoch", "config", "best_metric", "best_epoch", "metrics")}
        return ckpt["model"], {"format": CHECKPOINT_FORMAT, **meta}
    if isinstance(ckpt.get("net"), dict):
        meta = {k: _plain(ckpt[k]) for k in ("epoch", "cmc", "mAP", "mINP") if k in ckpt}
        return ckpt["net"], {"format": "official", "config": None, **meta}
    if ckpt and all(torch.is_tensor(v) for v in ckpt.values()):
        return ckpt, {"format": "state_dict", "epoch": None, "config": None}
    raise CheckpointError(f"{source} is not a model checkpoint: expected ours ('format', 'model'), an official "
                          f"one ('net', 'epoch', ...) or a state dict; found keys {sorted(map(str, ckpt))[:8]}")


def _strip_module_prefix(state):
    """Drop the `module.` prefix DataParallel/DDP put on every key."""
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return state


def _preview(keys, limit=5):
    keys = sorted(keys)
    more = f", ... ({len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_state(net, state, fmt, source):
    """CheckpointError naming missing/unexpected keys and shape mismatches, unless `state` fits `net`.

    Official checkpoints must carry exactly the known unused entries on top of ours; our own
    checkpoints none; a bare state dict either.
    """
    ours = net.state_dict()
    extra = set(state) - set(ours)
    unused = net.official_unused_keys()
    if fmt == "official" or (fmt == "state_dict" and extra and extra <= unused):
        # Our additions that official files cannot hold (MMN's trained DCL head) may be absent: they keep the
        # model's values.
        optional = getattr(net, "official_optional_keys", set)()
        missing = [k for k in ours if k not in state and k not in optional] + sorted(unused - extra)
        unexpected = extra - unused
    else:
        missing, unexpected = [k for k in ours if k not in state], extra
    mismatched = [k for k in ours if k in state and tuple(state[k].shape) != tuple(ours[k].shape)]
    if not (missing or unexpected or mismatched):
        return
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} keys: {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} keys: {_preview(unexpected)}")
    if mismatched:
        shapes = [f"{k} checkpoint {list(state[k].shape)} vs model {list(ours[k].shape)}" for k in mismatched[:5]]
        problems.append(f"{len(mismatched)} shape mismatches: {'; '.join(shapes)}")
        classifier = classifier_key(net)
        if classifier in mismatched:
            problems.append(f"checkpoint has {state[classifier].shape[0]} classes, model has {net.num_classes}")
        if any(k.startswith("layerATT") for k in mismatched):
            problems.append("layerATT shapes follow the input size: build the model with the checkpoint's "
                            "img_h/img_w")
    raise CheckpointError(f"{source} does not fit the {net.method.upper()} {net.arch} model "
                          f"({net.img_h}x{net.img_w}, {net.num_classes} classes): " + "; ".join(problems))


def load_checkpoint(model, path_or_state, *, source=None):
    """Load our checkpoint, an official IRL/AGW one or a bare state dict into `model`; returns metadata.

    metadata: format ('vireid-ckpt-v1' | 'official' | 'state_dict'), epoch, config (ours) and cmc/mAP/mINP
    (official, as plain Python numbers). Mismatches raise utils.CheckpointError before anything is loaded;
    `source` names an already-loaded checkpoint in those messages (a path names itself).
    """
    net = unwrap(model)
    if isinstance(path_or_state, (str, os.PathLike)):
        source = os.fspath(path_or_state)
        ckpt = load_torch_file(source)   # weights_only + numpy allow-list: never runs checkpoint code
    else:
        source, ckpt = source or "checkpoint", path_or_state
    state, meta = _split_checkpoint(ckpt, source)
    config = meta.get("config") or {}
    for field in ("method", "arch"):
        if field in config and config[field] != getattr(net, field):
            raise CheckpointError(f"{source} was saved from a {config.get('method')}/{config.get('arch')} "
                                  f"model; this model is {net.method}/{net.arch}")
    state = _strip_module_prefix(state)
    _check_state(net, state, meta["format"], source)
    current = net.state_dict()
    net.load_state_dict({k: state[k] if k in state else current[k] for k in current}, strict=True)
    return meta

