"""Synthetic SYSU-MM01, RegDB and LLCM trees in the exact on-disk layouts of REFERENCE section 1.

Used by the tests and the README quick start, before the licence-gated datasets are available.

What makes the identities learnable across modalities (and generalise to unseen identities): every identity
is a parametric person drawn from one shared distribution: body geometry (height, head size, shoulder and
waist width, torso length, leg spacing), garment cut (short/long sleeves, trousers/shorts/skirt), garment
pattern (solid, stripes of a given orientation and frequency, checks, dots, two-tone), accessories (hat, long
hair, bag on one side, backpack, belt) and materials. Both modalities render the same material map:
  * visible: the garment colours, with shading, camera colour cast, gain and noise; some cameras are
    "low-light" (15-35% brightness plus stronger noise);
  * infrared: intensities are a FIXED NONLINEAR function of the material colour and fabric (not the
    luminance), plus a per-identity thermal signature; near-infrared cameras (SYSU, LLCM) keep the garment
    structure, thermal cameras (RegDB) show warm skin, insulation-dependent clothing and cold accessories.
    IR images are 3-channel with R = G = B.
Each image jitters position, scale, view (front/back, which mirrors sides and shows hair/backpack
differently), arm swing and stride, background (a per-camera scene, shifted per image) and noise.
Everything is deterministic by seed: each identity and each image has its own numpy stream derived from
(seed, dataset, identity, camera, image), so the same call writes the same bytes.

API: make_sysu(root, *, size="test", seed=0, **overrides) -> root/SYSU-MM01, make_regdb(...) -> root/RegDB,
make_llcm(...) -> root/LLCM. `overrides` replace preset entries (see PRESETS). An existing output folder is
replaced only if this generator wrote it (it holds a `.synthetic` marker); otherwise FileExistsError.
CLI: python tools/make_synthetic.py --out DIR [--datasets sysu regdb llcm] [--size test|demo] [--seed 0]
"""
import argparse
import os
import shutil
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

MARKER = ".synthetic"

# Size presets. SYSU/LLCM: `images` = (min, max) images per existing (id, camera) folder, `folder_prob` =
# probability that an (id, camera) folder exists. RegDB: `ids` identities in total (each trial splits them
# half train / half test), `images` per modality per identity.
PRESETS = {
    "sysu": {
        "test": dict(train_ids=12, val_ids=3, test_ids=8, images=(2, 3), folder_prob=0.75),
        "demo": dict(train_ids=48, val_ids=6, test_ids=22, images=(5, 8), folder_prob=0.85),
    },
    "regdb": {
        "test": dict(ids=20, images=4),
        "demo": dict(ids=80, images=10),
    },
    "llcm": {
        "test": dict(train_ids=12, test_ids=8, images=(1, 2), folder_prob=0.5),
        "demo": dict(train_ids=48, test_ids=22, images=(2, 4), folder_prob=0.6),
    },
}
DATASET_CODES = {"sysu": 1, "regdb": 2, "llcm": 3}  # part of every seed, so datasets differ

# Material labels of the rendered map (0 = background).
SKIN, HAIR, TOP_A, TOP_B, BOTTOM_A, BOTTOM_B, SHOES, BAG, HAT, STRAP = range(1, 11)
NUM_LABELS = 11
PATTERNS = ("solid", "hstripe", "vstripe", "diag", "check", "dots", "block")
# Fabric of each material slot (phase of the NIR response) and its thermal insulation: FIXED, so the infrared
# value of a garment is a learnable function of its colour and slot, the same for every identity.
FABRIC_PHASE = np.linspace(0.0, 2 * np.pi, NUM_LABELS, endpoint=False)
INSULATION = np.array([0.0, 0.0, 0.5, 0.35, 0.35, 0.55, 0.55, 0.7, 0.9, 0.6, 0.8])

# Camera models: kind (vis / nir / thermal), gain range (brightness), noise sigma, colour cast, base height.
SYSU_CAMERAS = {
    1: dict(kind="vis", gain=(0.85, 1.05), noise=0.02, cast=(1.0, 0.97, 0.9), base_h=200, outdoor=False),
    2: dict(kind="vis", gain=(0.15, 0.35), noise=0.035, cast=(0.9, 0.95, 1.1), base_h=180, outdoor=False),
    3: dict(kind="nir", gain=(0.8, 1.1), noise=0.03, cast=None, base_h=190, outdoor=False),
    4: dict(kind="vis", gain=(0.95, 1.15), noise=0.015, cast=(1.0, 1.02, 0.95), base_h=230, outdoor=True),
    5: dict(kind="vis", gain=(0.8, 1.0), noise=0.02, cast=(0.95, 1.0, 1.05), base_h=160, outdoor=True),
    6: dict(kind="nir", gain=(0.75, 1.0), noise=0.035, cast=None, base_h=170, outdoor=True),
}
REGDB_CAMERAS = {
    "visible": dict(kind="vis", gain=(0.8, 1.1), noise=0.02, cast=(1.0, 1.0, 0.97), base_h=136, outdoor=True),
    "thermal": dict(kind="thermal", gain=(0.85, 1.1), noise=0.02, cast=None, base_h=136, outdoor=True),
}
LLCM_DARK_VIS_CAMS = (2, 5, 8)


def _llcm_camera(cam, modality):
    if modality == "nir":
        return dict(kind="nir", gain=(0.75, 1.05), noise=0.03, cast=None, base_h=150 + 10 * cam, outdoor=cam > 5)
    gain = (0.15, 0.35) if cam in LLCM_DARK_VIS_CAMS else (0.45, 0.8)  # LLCM is a low-light dataset
    return dict(kind="vis", gain=gain, noise=0.03, cast=(1.0, 0.95, 0.85 + 0.04 * cam), base_h=150 + 10 * cam,
                outdoor=cam > 5)


# ----------------------------------------------------------------------------------------------------------
# Identities and their material palettes


def _nir_response(rgb, phase):
    """Near-infrared reflectance: a fixed smooth nonlinear function of the dye colour and the fabric (phase).
    Deliberately non-monotone in the luminance, as dyes differ far more in NIR than in visible light."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return 0.5 + 0.4 * np.sin(2 * np.pi * (0.55 * r - 0.45 * g + 0.4 * b) + phase)


def _random_colour(rng):
    return rng.uniform(0.05, 0.95, size=3)


def _contrasting_colour(rng, other, other_phase, phase):
    """A second garment colour that differs from `other` both in visible light and in NIR, so a pattern is
    visible in both modalities (tried a few times; real garments sometimes lose their pattern in IR)."""
    colour = _random_colour(rng)
    for _ in range(8):
        if (np.abs(colour - other).max() > 0.3
                and abs(_nir_response(colour, phase) - _nir_response(other, other_phase)) > 0.2):
            break
        colour = _random_colour(rng)
    return colour


def make_identity(rng):
    """All appearance parameters of one identity (geometry in units of the person's height)."""
    ident = dict(
        height=rng.uniform(0.84, 0.96), head=rng.uniform(0.055, 0.072),
        shoulder=rng.uniform(0.085, 0.13), waist=rng.uniform(0.07, 0.11), torso=rng.uniform(0.27, 0.34),
        leg_sep=rng.uniform(0.03, 0.05), leg_w=rng.uniform(0.024, 0.036), arm_w=rng.uniform(0.018, 0.026),
        long_sleeves=bool(rng.random() < 0.5), bottom=str(rng.choice(["trousers", "trousers", "shorts", "skirt"])),
        long_hair=bool(rng.random() < 0.35), hat=bool(rng.random() < 0.2),
        bag_side=int(rng.choice([0, 0, -1, 1])), backpack=bool(rng.random() < 0.3), belt=bool(rng.random() < 0.3),
        top_pattern=str(rng.choice(PATTERNS)), top_freq=rng.uniform(9.0, 22.0),
        top_angle=float(rng.choice([-1.0, 1.0])) * np.pi / 4,
        bottom_pattern=str(rng.choice(["solid", "solid", "solid", "hstripe", "vstripe", "check"])),
        bottom_freq=rng.uniform(8.0, 16.0),
        body_temp=rng.uniform(0.78, 0.95), signature=rng.uniform(-0.08, 0.08),
    )
    rgb = np.zeros((NUM_LABELS, 3))
    rgb[SKIN] = np.array([0.85, 0.65, 0.5]) * rng.uniform(0.45, 1.05)
    rgb[HAIR] = np.array([0.25, 0.17, 0.1]) * rng.uniform(0.2, 2.5)
    rgb[TOP_A] = _random_colour(rng)
    rgb[TOP_B] = _contrasting_colour(rng, rgb[TOP_A], FABRIC_PHASE[TOP_A], FABRIC_PHASE[TOP_B])
    rgb[BOTTOM_A] = _random_colour(rng) * rng.uniform(0.4, 1.0)
    rgb[BOTTOM_B] = _contrasting_colour(rng, rgb[BOTTOM_A], FABRIC_PHASE[BOTTOM_A], FABRIC_PHASE[BOTTOM_B])
    for label in (SHOES, BAG, HAT, STRAP):
        rgb[label] = _random_colour(rng)
    ident["rgb"] = np.clip(rgb, 0.0, 1.0)
    ident["nir"] = _nir_palette(ident["rgb"], ident)
    ident["thermal"] = _thermal_palette(ident["rgb"], ident)
    return ident


def _nir_palette(rgb, ident):
    nir = _nir_response(rgb, FABRIC_PHASE) + ident["signature"]
    nir[SKIN] = 0.62 + 0.5 * ident["signature"]
    nir[HAIR] = 0.3 + 0.4 * rgb[HAIR].mean()
    return np.clip(nir, 0.03, 0.97)


def _thermal_palette(rgb, ident):
    """Far-infrared: clothing between body temperature and ambient by its insulation, small emissivity
    differences by dye; carried objects stay cold; skin is the warmest."""
    ambient = 0.3
    body = ident["body_temp"] + ident["signature"]
    emissivity = 0.12 * np.sin(2 * np.pi * 1.3 * rgb.sum(-1) + FABRIC_PHASE)
    thermal = body * (1 - INSULATION) + ambient * INSULATION + emissivity
    thermal[SKIN] = body
    thermal[HAIR] = 0.5 * body + 0.5 * ambient
    thermal[BAG] = ambient + emissivity[BAG]
    thermal[SHOES] = ambient + 0.1
    return np.clip(thermal, 0.03, 0.97)


# ----------------------------------------------------------------------------------------------------------
# Rendering


def _pattern(kind, freq, angle, u, v):
    """Boolean mask of the second garment colour for a pattern at (u, v) in person-height units."""
    if kind == "solid":
        return np.zeros(np.broadcast_shapes(u.shape, v.shape), dtype=bool)
    if kind == "hstripe":
        return np.broadcast_to(np.sin(2 * np.pi * freq * v) > 0, np.broadcast_shapes(u.shape, v.shape))
    if kind == "vstripe":
        return np.broadcast_to(np.sin(2 * np.pi * freq * u) > 0, np.broadcast_shapes(u.shape, v.shape))
    if kind == "diag":
        return np.sin(2 * np.pi * freq * (u * np.cos(angle) + v * np.sin(angle))) > 0
    if kind == "check":
        return (np.sin(2 * np.pi * freq * u) > 0) ^ (np.sin(2 * np.pi * freq * v) > 0)
    if kind == "dots":
        return ((u * freq) % 1 - 0.5) ** 2 + ((v * freq) % 1 - 0.5) ** 2 < 0.09
    return np.broadcast_to(v > 0.15, np.broadcast_shapes(u.shape, v.shape))  # "block": two-tone top


def _segment_distance(u, v, start, end):
    """(distance to the segment start->end, position 0..1 along it) for every pixel."""
    du, dv = end[0] - start[0], end[1] - start[1]
    t = np.clip(((u - start[0]) * du + (v - start[1]) * dv) / (du * du + dv * dv), 0.0, 1.0)
    return np.hypot(u - start[0] - t * du, v - start[1] - t * dv), t


def render_labels(ident, h, w, rng, view=None):
    """Material map [h, w] uint8 and shading [h, w] of one posed person; `view` 'front'/'back' or random."""
    view = view or ("front" if rng.random() < 0.5 else "back")
    mirror = 1.0 if view == "front" else -1.0
    person_h = h * ident["height"] * rng.uniform(0.88, 1.02)
    top = rng.uniform(0.01 * h, max(0.011 * h, h - person_h - 0.005 * h))
    centre = w / 2 + rng.uniform(-0.08, 0.08) * w
    v = ((np.arange(h, dtype=np.float32) - top) / person_h)[:, None]
    u = ((np.arange(w, dtype=np.float32) - centre) / person_h)[None, :]
    u_id = u * mirror  # identity's own left/right: a bag on its right shows on the other side from behind
    labels = np.zeros((h, w), dtype=np.uint8)

    hr = ident["head"]
    shoulder_v = 2 * hr + 0.03
    waist_v = shoulder_v + ident["torso"]
    sw, ww = ident["shoulder"], ident["waist"]

    if ident["long_hair"]:
        labels[(np.abs(u) < 0.9 * hr) & (v > hr) & (v < shoulder_v + 0.08)] = HAIR

    # legs (with a random stride), bottoms, shoes
    stride = rng.uniform(-0.04, 0.04)
    leg_len = np.clip((v - waist_v) / (0.97 - waist_v), 0.0, 1.0)
    legs = np.zeros((h, w), dtype=bool)
    for side in (-1.0, 1.0):
        leg_centre = side * (ident["leg_sep"] + stride * side * leg_len)
        legs |= (np.abs(u - leg_centre) < ident["leg_w"]) & (v >= waist_v - 0.01) & (v < 0.96)
        labels[(np.abs(u - leg_centre) < 1.25 * ident["leg_w"]) & (v >= 0.95) & (v < 1.0)] = SHOES
    bottom_b = _pattern(ident["bottom_pattern"], ident["bottom_freq"], 0.0, u_id, v - waist_v)
    if ident["bottom"] == "trousers":
        labels[legs] = np.where(bottom_b, BOTTOM_B, BOTTOM_A)[legs]
    else:
        labels[legs] = SKIN
        if ident["bottom"] == "shorts":
            shorts = legs & (v < waist_v + 0.17)
        else:  # skirt: a trapezoid widening downwards
            half = ww + 0.45 * np.clip(v - waist_v, 0.0, None)
            shorts = (np.abs(u) < half) & (v >= waist_v - 0.01) & (v < waist_v + 0.22)
        labels[shorts] = np.where(bottom_b, BOTTOM_B, BOTTOM_A)[shorts]

    # torso (trapezoid) with its pattern
    frac = np.clip((v - shoulder_v) / ident["torso"], 0.0, 1.0)
    torso = (np.abs(u) < sw + (ww - sw) * frac) & (v >= shoulder_v) & (v < waist_v + 0.02)
    top_b = _pattern(ident["top_pattern"], ident["top_freq"], ident["top_angle"], u_id, v - shoulder_v)
    labels[torso] = np.where(top_b, TOP_B, TOP_A)[torso]

    if ident["backpack"]:
        if view == "back":
            labels[(np.abs(u) < 0.75 * sw) & (v > shoulder_v + 0.02) & (v < shoulder_v + 0.65 * ident["torso"])] = BAG
        else:
            for side in (-1.0, 1.0):
                labels[torso & (np.abs(u - side * 0.55 * sw) < 0.012)] = STRAP
    if ident["belt"]:
        labels[torso & (np.abs(v - waist_v) < 0.012)] = STRAP

    # arms: sleeve then skin, swinging
    sleeve_end = 0.9 if ident["long_sleeves"] else 0.35
    for side in (-1.0, 1.0):
        swing = rng.uniform(-0.03, 0.06)
        start = (side * (sw - 0.01), shoulder_v + 0.015)
        end = (side * (sw + 0.02 + swing), shoulder_v + 0.36)
        dist, t = _segment_distance(u, v, start, end)
        arm = dist < ident["arm_w"]
        labels[arm] = np.where(t < sleeve_end, TOP_A, SKIN)[arm]

    # neck, head, hair, hat
    labels[(np.abs(u) < 0.35 * hr) & (v > 1.6 * hr) & (v < shoulder_v + 0.01)] = SKIN
    head = (u / (0.78 * hr)) ** 2 + ((v - hr - 0.005) / hr) ** 2 < 1.0
    labels[head] = SKIN
    hair_line = 0.8 * hr if view == "front" else 1.9 * hr
    labels[head & (v < hair_line)] = HAIR
    if ident["hat"]:
        labels[(np.abs(u) < 0.95 * hr) & (v > -0.01) & (v < 0.6 * hr)] = HAT
        labels[(np.abs(u) < 1.3 * hr) & (v >= 0.6 * hr) & (v < 0.75 * hr)] = HAT

    if ident["bag_side"]:
        side = ident["bag_side"]
        bag = (u_id * side > ww + 0.01) & (u_id * side < ww + 0.085) & (v > waist_v - 0.05) & (v < waist_v + 0.1)
        labels[bag] = BAG

    shading = (1.0 - 0.35 * np.clip(np.abs(u) / 0.16, 0.0, 1.0) ** 2) * (1.0 - 0.12 * np.clip(v, 0.0, 1.0))
    return labels, shading.astype(np.float32)


def make_scene(rng, outdoor):
    """Per-camera background: wall/floor (or vegetation/road) colours, horizon, panels and a few objects."""
    base = np.array([0.45, 0.55, 0.4]) if outdoor else np.array([0.7, 0.68, 0.62])
    objects = [dict(x=rng.uniform(-0.2, 1.0), y=rng.uniform(0.1, 0.6), w=rng.uniform(0.1, 0.4),
                    h=rng.uniform(0.1, 0.4), rgb=rng.uniform(0.1, 0.9, 3), ir=rng.uniform(0.1, 0.6))
               for _ in range(int(rng.integers(1, 4)))]
    return dict(wall=np.clip(base * rng.uniform(0.6, 1.3, 3), 0, 1), floor=rng.uniform(0.2, 0.6, 3),
                wall_ir=rng.uniform(0.15, 0.45), floor_ir=rng.uniform(0.1, 0.35), horizon=rng.uniform(0.6, 0.85),
                panel_freq=rng.uniform(2.0, 7.0), objects=objects)


def _scene_image(scene, h, w, rng, channel):
    """Background [h, w, c] for channel 'rgb' (c=3) or 'ir'/'thermal' (c=1), shifted randomly per image."""
    y = (np.arange(h, dtype=np.float32) / h)[:, None]
    x = (np.arange(w, dtype=np.float32) / w)[None, :] + rng.uniform(-0.15, 0.15)
    horizon = scene["horizon"] + rng.uniform(-0.04, 0.04)
    is_rgb = channel == "rgb"
    wall = scene["wall"] if is_rgb else np.array([scene["wall_ir"]])
    floor = scene["floor"] if is_rgb else np.array([scene["floor_ir"]])
    panel = 1.0 + 0.08 * np.sin(2 * np.pi * scene["panel_freq"] * x)
    img = np.where((y < horizon)[..., None], (wall * panel[..., None]).astype(np.float32),
                   (floor * (0.8 + 0.3 * y)[..., None]).astype(np.float32))
    img = np.broadcast_to(img, (h, w, len(wall))).copy()
    for obj in scene["objects"]:
        box = (x > obj["x"]) & (x < obj["x"] + obj["w"]) & (y > obj["y"]) & (y < obj["y"] + obj["h"])
        img[box] = obj["rgb"] if is_rgb else obj["ir"]
    if channel == "thermal":  # thermal backgrounds are flat and cold
        img = 0.5 * img + 0.05
    return img


def _box_blur(img):
    """Cheap 3-tap blur along both axes (thermal optics are soft)."""
    padded = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows = (padded[:-2] + padded[1:-1] + padded[2:]) / 3
    return (rows[:, :-2] + rows[:, 1:-1] + rows[:, 2:]) / 3


def render_image(ident, camera, scene, rng, view=None):
    """One uint8 [h, w, 3] image of `ident` seen by `camera` (IR images have R = G = B)."""
    h = int(np.clip(round(camera["base_h"] * rng.uniform(0.88, 1.12)), 128, 256))
    w = int(np.clip(round(h * rng.uniform(0.42, 0.52)), 64, 128))
    labels, shading = render_labels(ident, h, w, rng, view)
    person = labels > 0
    gain = rng.uniform(*camera["gain"])
    if camera["kind"] == "vis":
        img = _scene_image(scene, h, w, rng, "rgb")
        img[person] = ident["rgb"].astype(np.float32)[labels[person]] * shading[person][:, None]
        img *= np.asarray(camera["cast"], dtype=np.float32) * np.float32(gain)
    else:
        img = _scene_image(scene, h, w, rng, "thermal" if camera["kind"] == "thermal" else "ir")
        palette = ident[camera["kind"]].astype(np.float32)
        img[person] = (palette[labels[person]] * (0.8 + 0.2 * shading[person]))[:, None]
        if camera["kind"] == "thermal":
            img = _box_blur(img)
        img = img * np.float32(gain) + np.float32(rng.uniform(-0.05, 0.05))  # per-frame automatic gain control
    img += rng.standard_normal(size=img.shape, dtype=np.float32) * np.float32(camera["noise"])
    img = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return img if img.shape[2] == 3 else np.repeat(img, 3, axis=2)


def _save(img, path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if path.endswith(".jpg"):
        Image.fromarray(img).save(path, quality=92)
    else:
        Image.fromarray(img).save(path)


# ----------------------------------------------------------------------------------------------------------
# Output folder handling and common helpers


def _settings(dataset, size, overrides):
    if size not in PRESETS[dataset]:
        raise ValueError(f"size must be one of {sorted(PRESETS[dataset])}, got {size!r}")
    settings = dict(PRESETS[dataset][size])
    unknown = sorted(set(overrides) - set(settings))
    if unknown:
        raise ValueError(f"unknown {dataset} override(s) {unknown}; valid: {sorted(settings)}")
    settings.update(overrides)
    return settings


def _fresh_dir(path):
    """Create `path`, replacing a previous synthetic tree; never delete anything we did not write."""
    if os.path.exists(path):
        if not os.path.isfile(os.path.join(path, MARKER)):
            raise FileExistsError(f"{path} exists and was not written by make_synthetic.py; remove it first")
        shutil.rmtree(path)
    os.makedirs(path)
    with open(os.path.join(path, MARKER), "w") as f:
        f.write("written by tools/make_synthetic.py\n")


def _rng(seed, dataset, *keys):
    return np.random.default_rng([seed, DATASET_CODES[dataset], *keys])


def _split_ids(rng, counts):
    """Disjoint, non-contiguous id lists (sorted) of the given sizes, drawn from 1..~1.3*total."""
    total = sum(counts)
    pool = rng.permutation(np.arange(1, int(total * 1.3) + 2))[:total]
    splits, start = [], 0
    for n in counts:
        splits.append(sorted(int(i) for i in pool[start:start + n]))
        start += n
    return splits


def _present_cams(rng, cams, prob, required_groups):
    """Cameras in which an identity appears: each with probability `prob`, at least one per required group."""
    present = {cam for cam in cams if rng.random() < prob}
    for group in required_groups:
        if not present & set(group):
            present.add(int(rng.choice(group)))
    return sorted(present)


def _write_id_file(path, ids):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(",".join(str(i) for i in ids) + "\n")


def _write_idx(path, lines):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write("".join(f"{rel} {label}\n" for rel, label in lines))


# ----------------------------------------------------------------------------------------------------------
# Datasets


def make_sysu(root, *, size="test", seed=0, **overrides):
    """Write root/SYSU-MM01 (REFERENCE 1.1): exp/{train,val,test}_id.txt, camK/NNNN/MMMM.jpg. Returns its path.

    Every train/val identity has RGB and IR images; every test identity has IR images and at least one
    indoor RGB camera (so both search modes have a gallery). cam2 is the low-light RGB camera."""
    cfg = _settings("sysu", size, overrides)
    out = os.path.join(root, "SYSU-MM01")
    _fresh_dir(out)
    train_ids, val_ids, test_ids = _split_ids(_rng(seed, "sysu", 0), [cfg["train_ids"], cfg["val_ids"],
                                                                       cfg["test_ids"]])
    for name, ids in (("train_id.txt", train_ids), ("val_id.txt", val_ids), ("test_id.txt", test_ids)):
        _write_id_file(os.path.join(out, "exp", name), ids)
    scenes = {cam: make_scene(_rng(seed, "sysu", 1, cam), SYSU_CAMERAS[cam]["outdoor"]) for cam in SYSU_CAMERAS}
    test_set = set(test_ids)
    for pid in sorted(train_ids + val_ids + test_ids):
        required = [(1, 2), (3, 6)] if pid in test_set else [(1, 2, 4, 5), (3, 6)]
        ident = make_identity(_rng(seed, "sysu", 2, pid))
        for cam in _present_cams(_rng(seed, "sysu", 3, pid), sorted(SYSU_CAMERAS), cfg["folder_prob"], required):
            rng = _rng(seed, "sysu", 4, pid, cam)
            for k in range(1, int(rng.integers(cfg["images"][0], cfg["images"][1] + 1)) + 1):
                img = render_image(ident, SYSU_CAMERAS[cam], scenes[cam], rng)
                _save(img, os.path.join(out, f"cam{cam}", "%04d" % pid, "%04d.jpg" % k))
    for cam in SYSU_CAMERAS:  # camera folders exist even if no identity was drawn there
        os.makedirs(os.path.join(out, f"cam{cam}"), exist_ok=True)
    return out


def make_regdb(root, *, size="test", seed=0, **overrides):
    """Write root/RegDB (REFERENCE 1.3): Visible/<id>/*.bmp, Thermal/<id>/*.bmp (3-channel thermal) and
    idx/{train,test}_{visible,thermal}_{t}.txt for t = 1..10 (lines '<relpath> <label>', labels 0..K-1 by
    ascending id; each trial splits the identities at random, half for training). Returns its path."""
    cfg = _settings("regdb", size, overrides)
    out = os.path.join(root, "RegDB")
    _fresh_dir(out)
    scenes = {m: make_scene(_rng(seed, "regdb", 1, k), True) for k, m in enumerate(REGDB_CAMERAS)}
    scenes["thermal"] = scenes["visible"]  # one place, two co-located cameras
    files = {}  # (pid, modality) -> relative paths
    for pid in range(1, cfg["ids"] + 1):
        ident = make_identity(_rng(seed, "regdb", 2, pid))
        gender = "female" if _rng(seed, "regdb", 3, pid).random() < 0.5 else "male"
        for k, (modality, letter) in enumerate((("visible", "v"), ("thermal", "t"))):
            rng = _rng(seed, "regdb", 4, pid, k)
            folder = "Visible" if modality == "visible" else "Thermal"
            rels = []
            for i in range(cfg["images"]):
                view = "front" if i < (cfg["images"] + 1) // 2 else "back"
                serial = pid * 100 + i
                rel = f"{folder}/{pid}/{gender}_{view}_{letter}_{serial:05d}_{pid}.bmp"
                _save(render_image(ident, REGDB_CAMERAS[modality], scenes[modality], rng, view), os.path.join(out, rel))
                rels.append(rel)
            files[pid, modality] = sorted(rels)
    for trial in range(1, 11):
        perm = _rng(seed, "regdb", 5, trial).permutation(np.arange(1, cfg["ids"] + 1))
        half = cfg["ids"] // 2
        for split, pids in (("train", sorted(perm[:half])), ("test", sorted(perm[half:]))):
            for modality in REGDB_CAMERAS:
                lines = [(rel, label) for label, pid in enumerate(pids) for rel in files[int(pid), modality]]
                _write_idx(os.path.join(out, "idx", f"{split}_{modality}_{trial}.txt"), lines)
    return out


def _llcm_name(pid, cam, seq, frame, modality):
    return f"{pid:04d}_c{cam:02d}_s{seq:06d}_f{frame:04d}_{modality}.jpg"


def _write_llcm_identity(out, split, pid, ident, cams_by_modality, cfg, seed, scenes):
    """Images of one identity; returns {modality: [relative paths in listing order]}."""
    rels = {"vis": [], "nir": []}
    for modality, cams in cams_by_modality.items():
        for cam in cams:
            rng = _rng(seed, "llcm", 4, pid, cam, 0 if modality == "vis" else 1)
            seq, frame = int(rng.integers(100000, 999999)), int(rng.integers(100, 2000))
            for _ in range(int(rng.integers(cfg["images"][0], cfg["images"][1] + 1))):
                frame += int(rng.integers(5, 60))
                rel = f"{split}_{modality}/cam{cam}/{pid:04d}/{_llcm_name(pid, cam, seq, frame, modality)}"
                img = render_image(ident, _llcm_camera(cam, modality), scenes[cam, modality], rng)
                _save(img, os.path.join(out, rel))
                rels[modality].append(rel)
    return rels


def make_llcm(root, *, size="test", seed=0, **overrides):
    """Write root/LLCM (REFERENCE 1.4): idx/train_vis.txt, idx/train_nir.txt (labels 0..K-1 by ascending id),
    idx/test_id.txt, {train,test}_vis/cam1..cam9/NNNN/<pid>_c<cc>_s<seq>_f<frame>_vis.jpg and
    {train,test}_nir/cam{1,2,4..9}/NNNN/..._nir.jpg; test_nir/cam3 exists but is empty. Visible cams
    2, 5 and 8 are very dark, the others dim (LLCM is a low-light dataset). Returns its path."""
    cfg = _settings("llcm", size, overrides)
    out = os.path.join(root, "LLCM")
    _fresh_dir(out)
    train_ids, test_ids = _split_ids(_rng(seed, "llcm", 0), [cfg["train_ids"], cfg["test_ids"]])
    vis_cams, nir_cams = list(range(1, 10)), [1, 2, 4, 5, 6, 7, 8, 9]
    scenes = {(cam, m): make_scene(_rng(seed, "llcm", 1, cam), cam > 5) for cam in vis_cams for m in ("vis", "nir")}
    train_lines = {"vis": [], "nir": []}
    for split, ids in (("train", train_ids), ("test", test_ids)):
        for label, pid in enumerate(ids):
            rng = _rng(seed, "llcm", 3, pid)
            cams = {"vis": _present_cams(rng, vis_cams, cfg["folder_prob"], [vis_cams]),
                    "nir": _present_cams(rng, nir_cams, cfg["folder_prob"], [nir_cams])}
            rels = _write_llcm_identity(out, split, pid, make_identity(_rng(seed, "llcm", 2, pid)), cams, cfg,
                                        seed, scenes)
            if split == "train":
                for modality in rels:
                    train_lines[modality].extend((rel, label) for rel in rels[modality])
    for modality in ("vis", "nir"):
        _write_idx(os.path.join(out, "idx", f"train_{modality}.txt"), train_lines[modality])
        for cam in vis_cams:  # every camera folder exists (test_nir/cam3 stays empty, as in the real data)
            os.makedirs(os.path.join(out, f"test_{modality}", f"cam{cam}"), exist_ok=True)
    _write_id_file(os.path.join(out, "idx", "test_id.txt"), test_ids)
    return out


MAKERS = {"sysu": make_sysu, "regdb": make_regdb, "llcm": make_llcm}


def _count_images(path):
    return sum(name.endswith((".jpg", ".bmp")) for _, _, names in os.walk(path) for name in names)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Write small synthetic SYSU-MM01 / RegDB / LLCM trees.")
    parser.add_argument("--out", required=True, help="folder that receives SYSU-MM01/, RegDB/, LLCM/")
    parser.add_argument("--datasets", nargs="+", choices=sorted(MAKERS), default=["sysu", "regdb", "llcm"])
    parser.add_argument("--size", choices=["test", "demo"], default="demo")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in args.datasets:
        start = time.time()
        try:
            path = MAKERS[name](args.out, size=args.size, seed=args.seed)
        except (FileExistsError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"wrote {path}: {_count_images(path)} images ({args.size} size, seed {args.seed}) "
              f"in {time.time() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
