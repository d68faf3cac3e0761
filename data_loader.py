"""Training / test datasets and transforms (REFERENCE sections 1.2-1.5, 4.3 and 5).

The four channel augmentations reproduce the official classes exactly, including the order in which they
draw from Python's `random` module (that RNG is what DataLoader workers reseed per worker). They work in
place on *normalised* CHW tensors, as in the official chains (fill values and scaling act on normalised
values, Q-15 / Q-16).

Images are converted to RGB when they are not already (Q-02 clean fix); for the 3-channel files of the
real datasets this is an identity, so results match the official loaders.
"""
import math
import os
import random

import numpy as np
import torch
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import data_manager
from data_manager import DatasetError, load_resized_rgb
from utils import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)   # ChannelRandomErasing fill (Q-15, kept)
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)

SYSU_NPY_FILES = data_manager.SYSU_NPY_FILES
RGB, IR = "rgb", "ir"      # a training view transforms the visible or the infrared image of an item
VIEW_MODALITIES = (RGB, IR)


# ---------------------------------------------------------------------------------------------------
# Channel augmentations (REFERENCE 5.1), in place on a normalised 3xHxW tensor
# ---------------------------------------------------------------------------------------------------

class _ChannelAugmentation:
    """Shared __repr__: the class name and the constructor arguments, which each subclass stores as-is."""

    def __repr__(self):
        args = ", ".join(f"{key}={value}" for key, value in vars(self).items())
        return f"{type(self).__name__}({args})"


class ChannelRandomErasing(_ChannelAugmentation):
    """Erase one random rectangle with a per-channel constant (CAJ / IRL version).

    RNG order: u; then per attempt U(sl, sh), U(r1, 1/r1); the two randints only for a fitting attempt.
    """

    def __init__(self, p=0.5, sl=0.02, sh=0.4, r1=0.3, fill=CIFAR_MEAN):
        self.p, self.sl, self.sh, self.r1, self.fill = p, sl, sh, r1, tuple(fill)

    def __call__(self, img):
        if random.uniform(0, 1) > self.p:
            return img
        height, width = img.shape[1], img.shape[2]
        area = height * width
        for _ in range(100):
            target_area = random.uniform(self.sl, self.sh) * area
            aspect_ratio = random.uniform(self.r1, 1 / self.r1)
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < width and h < height:
                top = random.randint(0, height - h)
                left = random.randint(0, width - w)
                for c in range(img.shape[0]):
                    img[c, top:top + h, left:left + w] = self.fill[c]
                return img
        return img


class ChannelExchange(_ChannelAugmentation):
    """Replicate one randomly chosen channel: k = randint(0, gray); k < 3 copies channel k to all three.

    k >= 3 (only reachable with gray >= 3) writes the weighted gray image instead. IRL uses gray=2.
    """

    def __init__(self, gray=2):
        self.gray = gray

    def __call__(self, img):
        k = random.randint(0, self.gray)
        return _spread_channel(img, k) if k < 3 else _replicate(img, _weighted_gray(img))


class ChannelAdapGray(_ChannelAugmentation):
    """IRL's variant: 50 % G-replicate, else with probability p the weighted gray image (25 % / 25 %)."""

    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img):
        if random.randint(0, 1) == 0:
            _spread_channel(img, 1)
        elif random.uniform(0, 1) <= self.p:
            _replicate(img, _weighted_gray(img))
        return img


class ChannelAdapGrayCAJ(_ChannelAugmentation):
    """CAJ's variant (ICCV21_CAJ ChannelAug.ChannelAdapGray); IRL's class of the same name differs.

    k = randint(0, 3); k < 3 copies channel k (R, G or B) to all three, 25 % each; k == 3 then draws
    u = U(0, 1) and writes the weighted gray image when u <= p, else leaves the image as it is (12.5 % each
    at p = 0.5). The uniform is drawn only for k == 3: that is the official draw order, which decides
    every later draw of the chain.
    """

    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img):
        k = random.randint(0, 3)
        if k < 3:
            _spread_channel(img, k)
        elif random.uniform(0, 1) <= self.p:
            _replicate(img, _weighted_gray(img))
        return img


class ChannelT(_ChannelAugmentation):
    """"Low-light" scaling: with probability p multiply each channel by 2*U(0.01, 0.5) (factor in [0.02, 1])."""

    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, img):
        if random.uniform(0, 1) > self.p:
            return img
        factors = [2 * random.uniform(0.01, 0.5) for _ in range(3)]
        for c, factor in enumerate(factors):
            img[c].mul_(factor)
        return img


def _spread_channel(img, k):
    """Copy channel k of img into the other two channels, in place (channel k is never overwritten, so it needs
    no copy of its own)."""
    for c in range(3):
        if c != k:
            img[c] = img[k]
    return img


def _replicate(img, channel):
    """Write `channel` (an H x W tensor not sharing memory with img) into all three channels of img, in place."""
    img[0], img[1], img[2] = channel, channel, channel
    return img


def _weighted_gray(img):
    return GRAY_WEIGHTS[0] * img[0] + GRAY_WEIGHTS[1] * img[1] + GRAY_WEIGHTS[2] * img[2]


# ---------------------------------------------------------------------------------------------------
# Transform chains (REFERENCE 5.2 / 5.3)
# ---------------------------------------------------------------------------------------------------

class ToTensor(T.ToTensor):
    """torchvision's ToTensor, with one float buffer instead of three for RGB PIL images (the training and test
    chains' input): the uint8 HWC pixels are converted to contiguous float CHW in one pass and divided by 255
    in place, the same float32 operations as torchvision's (the same bits). Other inputs go to torchvision's."""

    def __call__(self, pic):
        if isinstance(pic, Image.Image) and pic.mode == "RGB":
            pixels = torch.from_numpy(np.array(pic))
            return pixels.permute(2, 0, 1).to(torch.get_default_dtype(), memory_format=torch.contiguous_format).div_(255)
        return super().__call__(pic)


def to_normalized_tensor():
    """ToTensor then ImageNet normalisation: the end of every training and test chain. The normalisation works
    in place on ToTensor's fresh tensor (torchvision's default clones it first: a copy per image)."""
    return [ToTensor(), T.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD, inplace=True)]


def pad_crop_flip(img_h, img_w):
    """The AGW-family geometry: zero-pad 10, random crop back to (img_h, img_w), horizontal flip."""
    return [T.Pad(10), T.RandomCrop((img_h, img_w)), T.RandomHorizontalFlip()]


def caj_chain(img_h, img_w, *tail):
    """ICCV21_CAJ's per-view chain (METHODS.md 6.2), also IFALNet's (2.4): pad, crop, flip, normalise, channel
    erasing, then the view's own channel transforms `tail`."""
    return T.Compose([T.ToPILImage(), *pad_crop_flip(img_h, img_w), *to_normalized_tensor(),
                      ChannelRandomErasing(p=0.5), *tail])


def build_test_transform(img_h, img_w):
    """ToPIL -> Resize((H, W)) (a no-op on pre-resized images, REFERENCE 1.5) -> ToTensor -> Normalize."""
    return T.Compose([T.ToPILImage(), T.Resize((img_h, img_w)), *to_normalized_tensor()])


# ---------------------------------------------------------------------------------------------------
# Image loading
# ---------------------------------------------------------------------------------------------------

def _load_image_stack(paths, img_h, img_w):
    """All images resized into one pre-allocated uint8 [N, H, W, 3] array (no list-then-stack copy)."""
    stack = np.empty((len(paths), img_h, img_w, 3), dtype=np.uint8)
    for i, path in enumerate(paths):
        stack[i] = load_resized_rgb(path, img_w, img_h)
    return stack


# ---------------------------------------------------------------------------------------------------
# Training datasets
# ---------------------------------------------------------------------------------------------------

class _PairedTrainData(Dataset):
    """RGB/IR pairs picked by the sampler plans `cIndex` / `tIndex` (set per epoch, REFERENCE 4.2-4.3).

    `views` are the method's ((modality, transform), ...) (methods.Method.train_views). Item k is one
    transformed image per view, in view order (so the transforms draw their random numbers in that order,
    as the official loaders do), then rgb_label, ir_label (numpy int64 scalars). IRL: (T_rgb1(rgb),
    T_rgb2(rgb), T_ir1(ir), T_ir2(ir), labels); AGW: (T(rgb), T(ir), labels).
    """

    def __init__(self, views, colorIndex=None, thermalIndex=None):
        self.views = _checked_views(views)
        self.cIndex = colorIndex
        self.tIndex = thermalIndex

    def __len__(self):
        # Official definition; the sampler (not this length) decides how many items an epoch visits.
        return len(self.train_color_label)

    def __getitem__(self, k):
        if self.cIndex is None or self.tIndex is None:
            # Not IndexError: that would silently end a plain `for item in dataset` loop.
            raise RuntimeError("set cIndex/tIndex (IdentitySampler.index1/index2) before indexing "
                               "the training set")
        return self.pair(self.cIndex[k], self.tIndex[k])

    def pair(self, ci, ti):
        """The item of RGB image `ci` and IR image `ti`: one transformed image per view, then the two labels."""
        images = {RGB: np.asarray(self.train_color_image[ci]), IR: np.asarray(self.train_thermal_image[ti])}
        return (*(transform(images[modality]) for modality, transform in self.views),
                self.train_color_label[ci], self.train_thermal_label[ti])


def _checked_views(views):
    views = tuple(views)
    if not views or not all(isinstance(v, tuple) and len(v) == 2 and v[0] in VIEW_MODALITIES and callable(v[1])
                            for v in views):
        raise ConfigError(f"training views must be (modality, transform) pairs with modality in {VIEW_MODALITIES} "
                          f"(see Method.train_views), got {views!r}")
    return views


class SYSUData(_PairedTrainData):
    """SYSU-MM01 training set from the four pre-processed .npy files (REFERENCE 1.2), memory-mapped.

    The image arrays are opened with mmap_mode="r" and never loaded whole; pickling (DataLoader workers
    with a spawn/forkserver start method) re-opens them instead of copying gigabytes. With img_h/img_w
    given, the stored image size is checked (IRL needs 384x192 files, AGW's script writes 288x144).
    """

    def __init__(self, data_dir, views, colorIndex=None, thermalIndex=None, *, img_h=None, img_w=None):
        super().__init__(views, colorIndex, thermalIndex)
        self.data_dir = str(data_dir)
        self.img_h, self.img_w = img_h, img_w
        self._open_arrays()

    def _cache_files(self):
        """The four file names to read: the cache of the requested size (pre_process_sysu.py), else the official
        script's unsized names (their size is checked on opening); without a size, the only sized cache."""
        sizes = data_manager.sysu_cache_sizes(self.data_dir)
        official = all(os.path.isfile(os.path.join(self.data_dir, n)) for n in SYSU_NPY_FILES.values())
        size = (self.img_h, self.img_w)
        if None in size and len(sizes) == 1 and not official:
            size = sizes[0]
        if size in sizes:
            return data_manager.sysu_npy_files(*size)
        if official or None in size:
            return SYSU_NPY_FILES
        found = f" (found {', '.join(f'{h}x{w}' for h, w in sizes)})" if sizes else ""
        raise DatasetError(f"no {self.img_h}x{self.img_w} SYSU training cache in {self.data_dir}{found}; make it "
                           f"with: {_preprocess_command(self.data_dir, self.img_h, self.img_w)}")

    def _open_arrays(self):
        names = self._cache_files()
        arrays = {key: _open_npy(os.path.join(self.data_dir, name)) for key, name in names.items()}
        for modality in ("rgb", "ir"):
            _check_image_array(arrays[f"{modality}_img"], arrays[f"{modality}_label"],
                               os.path.join(self.data_dir, names[f"{modality}_img"]), self.img_h, self.img_w)
        self.train_color_image = arrays["rgb_img"]
        self.train_thermal_image = arrays["ir_img"]
        self.train_color_label = np.array(arrays["rgb_label"])     # small: copied into memory
        self.train_thermal_label = np.array(arrays["ir_label"])

    def __getstate__(self):
        state = dict(self.__dict__)
        for key in ("train_color_image", "train_thermal_image", "train_color_label", "train_thermal_label"):
            del state[key]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._open_arrays()


def _open_npy(path):
    if not os.path.isfile(path):
        raise DatasetError(f"missing pre-processed SYSU file {path}: run `python pre_process_sysu.py "
                           f"--data-path {os.path.dirname(path)}` first")
    try:
        return np.load(path, mmap_mode="r")
    except (OSError, ValueError) as exc:
        raise DatasetError(f"cannot read {path}: {exc}") from None


def _check_image_array(images, labels, path, img_h, img_w):
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[3] != 3:
        raise DatasetError(f"{path}: expected uint8 [N, H, W, 3] images, found {images.dtype} {images.shape}")
    if labels.shape != (images.shape[0],):
        raise DatasetError(f"{path}: {images.shape[0]} images but labels of shape {labels.shape}")
    if (img_h is not None and images.shape[1] != img_h) or (img_w is not None and images.shape[2] != img_w):
        raise DatasetError(f"{path}: images are {images.shape[1]}x{images.shape[2]} (HxW) but {img_h}x{img_w} "
                           f"was requested; make that size with: "
                           f"{_preprocess_command(os.path.dirname(path), img_h, img_w)}")


def _preprocess_command(data_dir, img_h, img_w):
    return f"python pre_process_sysu.py --data-path {data_dir} --img-h {img_h} --img-w {img_w}"


class _ListTrainData(_PairedTrainData):
    """Training set from image lists, LANCZOS-resized to (img_w, img_h) at load and kept as uint8 HWC."""

    def _load(self, rgb_paths, rgb_labels, ir_paths, ir_labels, img_h, img_w):
        self.img_h, self.img_w = img_h, img_w
        self.train_color_image = _load_image_stack(rgb_paths, img_h, img_w)
        self.train_thermal_image = _load_image_stack(ir_paths, img_h, img_w)
        self.train_color_label = np.asarray(rgb_labels, dtype=np.int64)
        self.train_thermal_label = np.asarray(ir_labels, dtype=np.int64)


class RegDBData(_ListTrainData):
    """RegDB training split `trial` (1..10) from idx/train_{visible,thermal}_{trial}.txt (REFERENCE 1.3)."""

    def __init__(self, data_dir, trial, views, img_h=384, img_w=192, colorIndex=None, thermalIndex=None):
        super().__init__(views, colorIndex, thermalIndex)
        self.data_dir, self.trial = str(data_dir), trial
        self._load(*data_manager.regdb_training_lists(self.data_dir, trial), img_h, img_w)


class LLCMData(_ListTrainData):
    """LLCM training set from idx/train_vis.txt and idx/train_nir.txt (REFERENCE 1.4)."""

    def __init__(self, data_dir, views, img_h=384, img_w=192, colorIndex=None, thermalIndex=None):
        super().__init__(views, colorIndex, thermalIndex)
        self.data_dir = str(data_dir)
        self._load(*data_manager.llcm_training_lists(self.data_dir), img_h, img_w)


def training_set(dataset, data_path, views, img_h, img_w, *, trial=None):
    """The training set of `dataset` ("sysu" | "regdb" | "llcm"; `trial` is RegDB's split 1..10)."""
    if dataset == "sysu":
        return SYSUData(data_path, views, img_h=img_h, img_w=img_w)
    if dataset == "regdb":
        return RegDBData(data_path, trial, views, img_h=img_h, img_w=img_w)
    if dataset == "llcm":
        return LLCMData(data_path, views, img_h=img_h, img_w=img_w)
    raise ConfigError(f"no training set for dataset {dataset!r}; expected one of {sorted(data_manager.DATASETS)}")


# ---------------------------------------------------------------------------------------------------
# Test data
# ---------------------------------------------------------------------------------------------------

class TestData(Dataset):
    """Test images loaded lazily in __getitem__ (so in DataLoader workers), not all up front.

    Each image: LANCZOS resize to img_size = (w, h) as the official loader does at construction, then
    `transform`. Returns (tensor, label).
    """

    def __init__(self, img_paths, labels, transform, img_size=(192, 384)):
        self.img_paths = [str(p) for p in img_paths]
        self.labels = np.asarray(labels)
        if len(self.labels) != len(self.img_paths):
            raise DatasetError(f"{len(self.img_paths)} test images but {len(self.labels)} labels")
        self.transform = transform
        self.img_w, self.img_h = img_size

    def __len__(self):
        return len(self.img_paths)

    def __getitem__(self, k):
        image = load_resized_rgb(self.img_paths[k], self.img_w, self.img_h)
        return self.transform(image), self.labels[k]


def make_test_loader(img_paths, labels, img_h, img_w, batch_size, workers, *, pin_memory=False):
    """Ordered (no shuffle) DataLoader over TestData with the test transform. pin_memory: batches in page-locked
    memory, for copies to a GPU that overlap its work (`.to(device, non_blocking=True)`); for CUDA only."""
    dataset = TestData(img_paths, labels, build_test_transform(img_h, img_w), img_size=(img_w, img_h))
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=pin_memory)
