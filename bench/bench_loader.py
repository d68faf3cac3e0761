"""Benchmark the training data pipeline (decode + augment, IRL's four views) against the official one.

    python bench/bench_loader.py [--img-h 384 --img-w 192] [--images 64] [--items 96] [--rounds 5]
                                 [--gpu-ips 500 1000 2000 4000]

Both pipelines run in this one process, as one DataLoader worker process runs them, interleaved for
--rounds rounds, and are timed by this process's CPU time (one thread): the rate of a worker that has a
core of its own, which the other work of a shared machine neither slows nor, through the interleaving,
favours one pipeline with (wall-clock rates on a loaded 2-core machine varied by 2x between rounds):
  official   a literal re-creation of the official IRL per-item pipeline: SYSUData.__getitem__ on the whole
             .npy arrays loaded into memory, the four torchvision chains of REFERENCE 5.2 with the official
             ChannelAug classes (written out below as the IRL repository has them);
  ours       data_loader's SYSU training set (memory-mapped cache) with methods.get("irl").train_views, indexed
             through utils.PlannedPairs as train.py's run-long DataLoader does.
Images per second count view images (four per item), the unit of train.py's "img/s" progress lines. The
last table gives the worker processes needed to feed a GPU that trains at each --gpu-ips rate.
"""
import argparse
import math
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np
import torch
import torchvision.transforms as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data_loader  # noqa: E402
import data_manager  # noqa: E402
import methods  # noqa: E402
import utils  # noqa: E402

VIEWS_PER_ITEM = 4


# ---------------------------------------------------------------- the official pipeline, as IRL has it

class OfficialChannelRandomErasing:
    def __init__(self, probability=0.5, sl=0.02, sh=0.4, r1=0.3, mean=(0.4914, 0.4822, 0.4465)):
        self.probability, self.mean, self.sl, self.sh, self.r1 = probability, mean, sl, sh, r1

    def __call__(self, img):
        if random.uniform(0, 1) > self.probability:
            return img
        for attempt in range(100):
            area = img.size()[1] * img.size()[2]
            target_area = random.uniform(self.sl, self.sh) * area
            aspect_ratio = random.uniform(self.r1, 1 / self.r1)
            h = int(round(math.sqrt(target_area * aspect_ratio)))
            w = int(round(math.sqrt(target_area / aspect_ratio)))
            if w < img.size()[2] and h < img.size()[1]:
                x1 = random.randint(0, img.size()[1] - h)
                y1 = random.randint(0, img.size()[2] - w)
                if img.size()[0] == 3:
                    img[0, x1:x1 + h, y1:y1 + w] = self.mean[0]
                    img[1, x1:x1 + h, y1:y1 + w] = self.mean[1]
                    img[2, x1:x1 + h, y1:y1 + w] = self.mean[2]
                else:
                    img[0, x1:x1 + h, y1:y1 + w] = self.mean[0]
                return img
        return img


class OfficialChannelExchange:
    def __init__(self, gray=2):
        self.gray = gray

    def __call__(self, img):
        idx = random.randint(0, self.gray)
        if idx == 0:
            img[1, :, :] = img[0, :, :]
            img[2, :, :] = img[0, :, :]
        elif idx == 1:
            img[0, :, :] = img[1, :, :]
            img[2, :, :] = img[1, :, :]
        elif idx == 2:
            img[0, :, :] = img[2, :, :]
            img[1, :, :] = img[2, :, :]
        else:
            tmp_img = 0.2989 * img[0, :, :] + 0.5870 * img[1, :, :] + 0.1140 * img[2, :, :]
            img[0, :, :] = tmp_img
            img[1, :, :] = tmp_img
            img[2, :, :] = tmp_img
        return img


class OfficialChannelAdapGray:
    def __init__(self, probability=0.5):
        self.probability = probability

    def __call__(self, img):
        idx = random.randint(0, 1)
        if idx == 0:
            img[0, :, :] = img[1, :, :]
            img[2, :, :] = img[1, :, :]
        elif random.uniform(0, 1) <= self.probability:
            tmp_img = 0.2989 * img[0, :, :] + 0.5870 * img[1, :, :] + 0.1140 * img[2, :, :]
            img[0, :, :] = tmp_img
            img[1, :, :] = tmp_img
            img[2, :, :] = tmp_img
        return img


class OfficialChannelT:
    def __init__(self, probability=0.5):
        self.probability = probability

    def __call__(self, img):
        if random.uniform(0, 1) > self.probability:
            return img
        a, b, c = random.uniform(0.01, 0.5), random.uniform(0.01, 0.5), random.uniform(0.01, 0.5)
        img[0, :, :] = img[0, :, :] * 2 * a
        img[1, :, :] = img[1, :, :] * 2 * b
        img[2, :, :] = img[2, :, :] * 2 * c
        return img


class OfficialSYSUData:
    """The official IRL SYSUData: whole arrays in memory, four transforms per item."""

    def __init__(self, data_dir, img_h, img_w):
        names = data_manager.sysu_npy_files(img_h, img_w)
        self.train_color_image = np.load(os.path.join(data_dir, names["rgb_img"]))
        self.train_color_label = np.load(os.path.join(data_dir, names["rgb_label"]))
        self.train_thermal_image = np.load(os.path.join(data_dir, names["ir_img"]))
        self.train_thermal_label = np.load(os.path.join(data_dir, names["ir_label"]))
        normalize = T.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])
        self.transform_color = T.Compose([
            T.ToPILImage(), T.RandomGrayscale(p=0.5), T.Pad(10), T.RandomCrop((img_h, img_w)),
            T.RandomHorizontalFlip(), T.ToTensor(), normalize, OfficialChannelRandomErasing(probability=0.5)])
        self.transform_color1 = T.Compose([
            T.ToPILImage(), T.Pad(10), T.RandomCrop((img_h, img_w)), T.RandomHorizontalFlip(), T.ToTensor(),
            normalize, OfficialChannelRandomErasing(probability=0.5), OfficialChannelExchange(gray=2)])
        self.transform_thermal = T.Compose([
            T.ToPILImage(), T.Pad(10), T.RandomCrop((img_h, img_w)), T.RandomHorizontalFlip(), T.ToTensor(),
            normalize, OfficialChannelRandomErasing(probability=0.5), OfficialChannelAdapGray(probability=0.5)])
        self.transform_thermal1 = T.Compose([
            T.ToPILImage(), T.ColorJitter(brightness=0.5), T.Pad(10), T.RandomCrop((img_h, img_w)),
            T.RandomHorizontalFlip(), T.ToTensor(), normalize, OfficialChannelRandomErasing(probability=0.5),
            OfficialChannelT(probability=0.5)])
        self.cIndex = self.tIndex = None

    def __getitem__(self, index):
        img1, target1 = self.train_color_image[self.cIndex[index]], self.train_color_label[self.cIndex[index]]
        img2, target2 = self.train_thermal_image[self.tIndex[index]], self.train_thermal_label[self.tIndex[index]]
        img1_0 = self.transform_color(img1)
        img1_1 = self.transform_color1(img1)
        img2_0 = self.transform_thermal(img2)
        img2_1 = self.transform_thermal1(img2)
        return img1_0, img1_1, img2_0, img2_1, target1, target2


# ---------------------------------------------------------------- measurement

def write_training_cache(data_dir, images, img_h, img_w, seed=0):
    """Random SYSU training .npy files (4 images an identity and modality) under pre_process_sysu's names."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(images // 4), 4).astype(np.int64)
    for modality in ("rgb", "ir"):
        names = data_manager.sysu_npy_files(img_h, img_w)
        np.save(os.path.join(data_dir, names[f"{modality}_img"]),
                rng.integers(0, 256, (len(labels), img_h, img_w, 3), dtype=np.uint8))
        np.save(os.path.join(data_dir, names[f"{modality}_label"]), labels)
    return labels


def time_items(get_item, items, plan):
    """View images per CPU-second of this process over `items` items."""
    start = time.process_time()
    for k in range(items):
        get_item(k, plan[0][k], plan[1][k])
    return items * VIEWS_PER_ITEM / (time.process_time() - start)


def measure(args):
    torch.set_num_threads(1)      # as in a DataLoader worker process
    with tempfile.TemporaryDirectory() as data_dir:
        labels = write_training_cache(data_dir, args.images, args.img_h, args.img_w)
        views = methods.get("irl").train_views(args.img_h, args.img_w)
        ours = utils.PlannedPairs(data_loader.SYSUData(data_dir, views, img_h=args.img_h, img_w=args.img_w))
        official = OfficialSYSUData(data_dir, args.img_h, args.img_w)
        rng = np.random.default_rng(1)
        plan = rng.choice(len(labels), args.items), rng.choice(len(labels), args.items)
        official.cIndex, official.tIndex = plan
        pipelines = {"official": lambda k, ci, ti: official[k], "ours": lambda k, ci, ti: ours[(ci, ti, 0)]}
        rates = {name: [] for name in pipelines}
        for round_index in range(args.rounds):
            for name in (list(pipelines) if round_index % 2 == 0 else list(pipelines)[::-1]):
                rates[name].append(time_items(pipelines[name], args.items, plan))
    return {name: statistics.median(values) for name, values in rates.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img-h", type=int, default=384)
    p.add_argument("--img-w", type=int, default=192)
    p.add_argument("--images", type=int, default=64, help="training images per modality in the cache")
    p.add_argument("--items", type=int, default=96, help="items (4 view images each) timed per round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--gpu-ips", type=float, nargs="+", default=[500, 1000, 2000, 4000],
                   help="GPU training rates (view images/s) to size the worker pool for")
    args = p.parse_args(argv)
    if min(args.img_h, args.img_w, args.items, args.rounds) < 1 or args.images < 4:
        print("error: sizes, --items and --rounds must be >= 1 and --images >= 4", file=sys.stderr)
        return 2
    rates = measure(args)
    print(utils.format_table(
        [{"pipeline": name, "img/s per worker": rate, "ratio to official": rate / rates["official"]}
         for name, rate in rates.items()],
        ["pipeline", "img/s per worker", "ratio to official"],
        title=f"IRL training pipeline, {args.img_h}x{args.img_w}, 4 views an item: median of {args.rounds} "
              f"interleaved rounds of {args.items} items, one process, one thread, per CPU-second"))
    print()
    print(utils.format_table(
        [{"GPU img/s": f"{ips:g}", **{f"workers ({name})": math.ceil(ips / rate) for name, rate in rates.items()}}
         for ips in args.gpu_ips],
        ["GPU img/s"] + [f"workers ({name})" for name in rates],
        title="Worker processes needed to feed a GPU training at that rate (one core each)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
