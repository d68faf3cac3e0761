"""Dataset listings and test protocols for SYSU-MM01, RegDB and LLCM (REFERENCE sections 1 and 2).

Ground floor: imports only the standard library, numpy and Pillow. Every check is a directory listing or a
small text-file read, so validating a full-size dataset takes well under a second; the one image decoder,
`load_resized_rgb`, is shared by pre-processing and the datasets so both resize exactly alike.

Public AGW-family functions keep their official names and positional signatures
(`process_query_sysu(data_path, mode)`, `process_gallery_sysu(data_path, mode, trial)`,
`process_test_regdb(img_dir, trial, modal)`, `process_query_llcm(data_path, mode)`,
`process_gallery_llcm(data_path, mode, trial)`); additions are keyword-only arguments and new functions.

Listing order everywhere (REFERENCE 1.1, 1.4): ids ascending, then the camera list in its given order, then
the file names of each (camera, id) folder sorted. Hidden files (names starting with ".") are ignored; an
existing but empty (camera, id) folder is reported as an error because the official gallery sampling crashes
on it.

Gallery sampling (REFERENCE 2.1, golden_misc.json["gallery_choice"]): single-shot draws one
`random.choice` per existing folder in visiting order from a stream seeded with the trial number. We use a
private `random.Random(trial)` (bit-identical to `random.seed(trial)` + `random.choice`) so no global state
is touched. Multi-shot (`shots > 1`, an extension with no official reference): per folder in visiting order,
`rng.sample(range(n), min(shots, n))` from the same kind of private stream, kept in listing order.
"""
import os
import random
import re
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image



@dataclass(frozen=True)
class DatasetInfo:
    """What the scripts need to know of a dataset; its layouts and protocols are the functions below."""
    name: str                  # as papers print it
    default_path: str          # root looked for without --data-path (relative to the working directory)
    official_num_classes: int  # classifier size of the released models (REFERENCE 9)
    num_splits: int            # RegDB: 10 train/test splits with one model each; 0: one split, gallery trials
    options: tuple             # test-protocol options that apply to it (test.py checks its flags against them)
    low_light_cams: tuple      # cameras filming in the dark: marked "(low-light)" in per-camera tables


# Low-light cameras. SYSU-MM01: its two infrared cameras, cam3 (indoor) and cam6 (outdoor), are the ones set in
# dark scenes; its four visible cameras film lit ones (Wu et al., ICCV 2017). LLCM: all nine; the dataset was
# filmed by 9 RGB/IR cameras in low-light environments, as its paper says (Zhang & Wang, CVPR 2023: "all the
# existing VIReID datasets are captured under sufficient illumination"), and names none as darker than the
# others. RegDB: none; its visible and thermal cameras are not described as low-light.
DATASETS = {
    "sysu": DatasetInfo("SYSU-MM01", "./dataset/SYSU-MM01/", 395, 0, ("mode", "shots"), (3, 6)),
    "regdb": DatasetInfo("RegDB", "./dataset/RegDB/", 206, 10, ("tvsearch",), ()),
    "llcm": DatasetInfo("LLCM", "./dataset/LLCM/", 713, 0, ("direction", "shots", "deen_transposed"),
                        tuple(range(1, 10))),
}
DEFAULT_DATA_PATHS = {key: info.default_path for key, info in DATASETS.items()}
SYSU_RGB_CAMS = ("cam1", "cam2", "cam4", "cam5")
SYSU_IR_CAMS = ("cam3", "cam6")
SYSU_INDOOR_CAMS = ("cam1", "cam2")
SYSU_ALL_CAMS = ("cam1", "cam2", "cam3", "cam4", "cam5", "cam6")
SYSU_ID_FILES = ("train_id.txt", "val_id.txt", "test_id.txt")
LLCM_VIS_CAMS = tuple(f"cam{k}" for k in range(1, 10))
LLCM_NIR_CAMS = ("cam1", "cam2", "cam4", "cam5", "cam6", "cam7", "cam8", "cam9")
LLCM_MODAL_DIRS = {1: "test_vis", 2: "test_nir"}
LLCM_MODAL_CAMS = {1: LLCM_VIS_CAMS, 2: LLCM_NIR_CAMS}
REGDB_MODALS = ("visible", "thermal")
# Pre-processed SYSU training files (REFERENCE 1.2) under the official script's names. pre_process_sysu.py names
# them by size (sysu_npy_files); data_loader.SYSUData reads either (the official script's output included).
SYSU_NPY_FILES = {
    "rgb_img": "train_rgb_resized_img.npy",
    "rgb_label": "train_rgb_resized_label.npy",
    "ir_img": "train_ir_resized_img.npy",
    "ir_label": "train_ir_resized_label.npy",
}


def sysu_npy_files(img_h, img_w):
    """The SYSU training cache of one image size: the official names with `_<H>x<W>` before `.npy`, so that
    the caches of methods with different input sizes (IRL 384x192, AGW/CAJ 288x144, DEEN 384x144) coexist."""
    return {key: f"{name[:-len('.npy')]}_{img_h}x{img_w}.npy" for key, name in SYSU_NPY_FILES.items()}


def sysu_cache_sizes(data_path):
    """(H, W) of every complete sized SYSU training cache in `data_path`, sorted."""
    pattern = re.compile(r"^train_rgb_resized_img_(\d+)x(\d+)\.npy$")
    found = (pattern.match(name) for name in (os.listdir(data_path) if os.path.isdir(data_path) else ()))
    sizes = sorted((int(m.group(1)), int(m.group(2))) for m in found if m)
    return [size for size in sizes
            if all(os.path.isfile(os.path.join(data_path, n)) for n in sysu_npy_files(*size).values())]

VISIBLE, INFRARED = 1, 2  # modal numbers of the official code (stem selection at test time)

_CAM_DIR = re.compile(r"^cam(\d+)$")
_PID_DIR = re.compile(r"^\d{4}$")


class DatasetError(ValueError):
    """A dataset folder or list file is missing or malformed; the message names the problem and the path."""


# ----------------------------------------------------------------------------------------------------------
# Small readers and parsers


def load_resized_rgb(path, img_w, img_h):
    """uint8 HxWx3 array of the image at `path`, LANCZOS-resized to (img_w, img_h) like the official code
    (`np.array(Image.open(p).resize((w, h), ANTIALIAS))`; LANCZOS is the same filter, Q-03). Grayscale or
    RGBA files are converted to RGB (Q-02 clean fix; identical for the 3-channel files of the datasets).
    Unreadable or corrupt files raise DatasetError naming the file."""
    try:
        with Image.open(path) as img:
            if img.mode != "RGB":
                img = img.convert("RGB")
            return np.asarray(img.resize((img_w, img_h), Image.LANCZOS))
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DatasetError(f"cannot read image {path}: {exc}") from None


def read_id_file(path):
    """Ids from the FIRST line of a comma-separated id file (REFERENCE 1.1), e.g. exp/test_id.txt."""
    if not os.path.isfile(path):
        raise DatasetError(f"missing id file: {path}")
    with open(path, "r") as f:
        first_line = f.readline()
    tokens = [t.strip() for t in first_line.split(",")]
    tokens = [t for t in tokens if t]  # tolerate a trailing comma / newline
    if not tokens:
        raise DatasetError(f"empty id file (expected one comma-separated line of ids): {path}")
    try:
        ids = [int(t) for t in tokens]
    except ValueError:
        raise DatasetError(f"malformed id file (non-integer token on the first line): {path}") from None
    if len(set(ids)) != len(ids):
        raise DatasetError(f"duplicate ids in id file: {path}")
    if min(ids) < 0 or max(ids) > 9999:
        raise DatasetError(f"ids must be in 0..9999 (4-digit folder names): {path}")
    return ids


def parse_cam_pid(path):
    """(camera number, person id) from the `camK/NNNN/<file>` components of an image path (Q-01, Q-07).

    Parsing components instead of fixed string offsets makes roots that contain "cam" (e.g.
    /data/camera/LLCM) and multi-digit camera numbers work; on clean paths the result equals the official one.
    """
    parts = re.split(r"[\\/]+", str(path))
    if len(parts) >= 3:
        cam_match = _CAM_DIR.match(parts[-3])
        if cam_match and _PID_DIR.match(parts[-2]):
            return int(cam_match.group(1)), int(parts[-2])
    raise DatasetError(f"cannot parse camera and person id (expected .../camK/NNNN/<file>): {path}")


def read_idx_file(path):
    """(relative paths, int64 labels) of a RegDB/LLCM list file with lines `<relative path> <label>`.

    The official code splits on the first space; we split on the last one: identical on the real files
    ('<path without spaces> <label>'), and paths containing spaces work too. Blank lines are skipped.
    """
    if not os.path.isfile(path):
        raise DatasetError(f"missing idx file: {path}")
    rel_paths, labels = [], []
    with open(path, "r") as f:
        for line_no, line in enumerate(f.read().splitlines(), start=1):
            if not line.strip():
                continue
            pieces = line.strip().rsplit(" ", 1)
            if len(pieces) != 2 or not pieces[0] or not re.fullmatch(r"-?\d+", pieces[1]):
                raise DatasetError(f"malformed idx line {line_no} (expected '<path> <int label>'): {path}")
            rel_paths.append(pieces[0])
            labels.append(int(pieces[1]))
    if not rel_paths:
        raise DatasetError(f"empty idx file: {path}")
    return rel_paths, np.asarray(labels, dtype=np.int64)


def check_training_labels(rgb_labels, ir_labels, source):
    """Q-06: the sampler indexes per-class lists by label value, so labels must be exactly 0..K-1 in BOTH
    modalities (same label set). `source` names the file(s) for the error message."""
    rgb_set = set(np.asarray(rgb_labels).tolist())
    ir_set = set(np.asarray(ir_labels).tolist())
    for name, labels in (("visible", rgb_set), ("infrared", ir_set)):
        if labels != set(range(len(labels))):
            raise DatasetError(f"{name} training labels are not contiguous 0..K-1 "
                               f"({len(labels)} distinct, max {max(labels)}): {source}")
    if rgb_set != ir_set:
        raise DatasetError(f"training labels differ between modalities ({len(rgb_set)} visible vs "
                           f"{len(ir_set)} infrared identities): {source}")


# ----------------------------------------------------------------------------------------------------------
# Folder listings


def check_dataset_root(dataset, data_path):
    """DatasetError naming the path when the root folder of `dataset` does not exist (a mistyped
    --data-path must be reported as such, before any file inside it is looked for)."""
    _require_dir(data_path, f"{DATASETS[dataset].name} dataset root")


def _require_dir(path, what):
    if not os.path.isdir(path):
        hint = " (create it empty if that camera has no images)" if what == "camera folder" else ""
        raise DatasetError(f"missing {what}{hint}: {path}")


def _sorted_files(folder):
    """Sorted full paths of the (non-hidden) files of one (camera, id) folder; empty folders are errors."""
    names = [n for n in os.listdir(folder) if not n.startswith(".")]
    files = sorted(os.path.join(folder, n) for n in names)
    files = [p for p in files if os.path.isfile(p)]
    if not files:
        raise DatasetError(f"empty identity folder (delete it or add images): {folder}")
    return files


def list_identity_folders(root, ids, cams):
    """Sorted file lists of the existing `root/cam/NNNN` folders, ids ascending then `cams` order.

    Returns a list of lists (one per existing folder, visiting order); the unit of gallery sampling.
    """
    folders = []
    for pid in sorted(ids):
        for cam in cams:
            folder = os.path.join(root, cam, "%04d" % pid)
            if os.path.isdir(folder):
                folders.append(_sorted_files(folder))
    return folders


def _pids_cams(paths):
    pairs = [parse_cam_pid(p) for p in paths]
    cams = np.asarray([c for c, _ in pairs], dtype=np.int64)
    pids = np.asarray([p for _, p in pairs], dtype=np.int64)
    return pids, cams


def gallery_candidates(folders):
    """(all candidate paths concatenated in visiting order, folder sizes) for `sample_gallery_indices`."""
    paths = [p for files in folders for p in files]
    return paths, [len(files) for files in folders]


def sample_gallery_indices(folder_sizes, trial, shots=1):
    """Indices into the concatenation of the sorted folders (REFERENCE 2.1).

    shots == 1: the official single-shot draw, one `random.choice` per folder from `random.seed(trial)`
    (a folder of size 1 still consumes random bits). shots > 1: multi-shot extension, per folder
    `sample(range(n), min(shots, n))` from the same seeded stream, returned in listing order.
    """
    if shots < 1:
        raise ValueError(f"shots must be >= 1, got {shots}")
    rng = random.Random(trial)
    chosen, offset = [], 0
    for n in folder_sizes:
        if n < 1:
            raise ValueError("gallery folder sizes must be >= 1")
        if shots == 1:
            chosen.append(offset + rng.choice(range(n)))
        else:
            chosen.extend(offset + i for i in sorted(rng.sample(range(n), min(shots, n))))
        offset += n
    return np.asarray(chosen, dtype=np.int64)


def _check_files_exist(paths, list_file):
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise DatasetError(f"{len(missing)} image(s) listed in {list_file} do not exist, first: {missing[0]}")


# ----------------------------------------------------------------------------------------------------------
# SYSU-MM01


def _sysu_cams(mode):
    if mode == "all":
        return SYSU_RGB_CAMS
    if mode == "indoor":
        return SYSU_INDOOR_CAMS
    raise ValueError(f"SYSU mode must be 'all' or 'indoor', got {mode!r}")


def validate_sysu_layout(data_path, *, need_train=True, need_test=True):
    """Check the dataset root, the exp/ id files needed and the six camera folders (REFERENCE 1.1)."""
    check_dataset_root("sysu", data_path)
    needed = (["train_id.txt", "val_id.txt"] if need_train else []) + (["test_id.txt"] if need_test else [])
    for name in needed:
        path = os.path.join(data_path, "exp", name)
        if not os.path.isfile(path):
            raise DatasetError(f"missing id file: {path}")
    for cam in SYSU_ALL_CAMS:
        _require_dir(os.path.join(data_path, cam), "camera folder")


def sysu_val_ids(data_path):
    return read_id_file(os.path.join(data_path, "exp", "val_id.txt"))


def _sysu_training_ids(data_path, use_val):
    train_path = os.path.join(data_path, "exp", "train_id.txt")
    ids = read_id_file(train_path)
    if use_val:
        val_ids = sysu_val_ids(data_path)
        overlap = sorted(set(ids) & set(val_ids))
        if overlap:
            raise DatasetError(f"ids {overlap[:5]} appear in both train_id.txt and val_id.txt: {train_path}")
        ids = ids + val_ids
    return sorted(ids)


def sysu_training_files(data_path, use_val=True):
    """(rgb_files, ir_files) of the training ids (train_id + val_id by default), REFERENCE 1.2 order.

    Every training identity must have both RGB and IR images, otherwise the relabelling (by IR pids, Q-04)
    and the sampler (Q-06) break; that is reported here with the identity and the dataset root.
    """
    validate_sysu_layout(data_path, need_train=True, need_test=False)
    ids = _sysu_training_ids(data_path, use_val)
    rgb_files, ir_files = [], []
    for pid in ids:
        rgb = [p for files in list_identity_folders(data_path, [pid], SYSU_RGB_CAMS) for p in files]
        ir = [p for files in list_identity_folders(data_path, [pid], SYSU_IR_CAMS) for p in files]
        for name, files, cams in (("IR", ir, SYSU_IR_CAMS), ("RGB", rgb, SYSU_RGB_CAMS)):
            if not files:
                raise DatasetError(f"training identity {pid:04d} has no {name} images in "
                                   f"{'/'.join(cams)}: {data_path}")
        rgb_files.extend(rgb)
        ir_files.extend(ir)
    return rgb_files, ir_files


def sysu_training_labels(rgb_files, ir_files):
    """(rgb_labels, ir_labels) int64: label = rank of the pid among the sorted IR training pids (Q-04)."""
    rgb_pids, _ = _pids_cams(rgb_files)
    ir_pids, _ = _pids_cams(ir_files)
    sorted_pids = np.unique(ir_pids)
    if not np.isin(rgb_pids, sorted_pids).all():
        raise DatasetError("an RGB training identity has no IR images (labels are defined by IR pids)")
    return (np.searchsorted(sorted_pids, rgb_pids).astype(np.int64),
            np.searchsorted(sorted_pids, ir_pids).astype(np.int64))


def _sysu_test_ids(data_path):
    validate_sysu_layout(data_path, need_train=False, need_test=True)
    return read_id_file(os.path.join(data_path, "exp", "test_id.txt"))


def _nonempty(paths, what, where):
    if not paths:
        raise DatasetError(f"no {what} images found for the test ids: {where}")
    return paths


def process_query_sysu(data_path, mode="all"):
    """(img_paths, pids, cams): every IR image (cam3, cam6) of the test ids; same for both modes."""
    _sysu_cams(mode)
    folders = list_identity_folders(data_path, _sysu_test_ids(data_path), SYSU_IR_CAMS)
    paths = _nonempty(gallery_candidates(folders)[0], "SYSU query (IR)", data_path)
    pids, cams = _pids_cams(paths)
    return paths, pids, cams


def _sysu_gallery_folders(data_path, mode):
    cams = _sysu_cams(mode)
    folders = list_identity_folders(data_path, _sysu_test_ids(data_path), cams)
    _nonempty(folders, f"SYSU {mode}-search gallery (RGB)", data_path)
    return folders


def _sampled(folders, trial, shots):
    paths, sizes = gallery_candidates(folders)
    picked = [paths[i] for i in sample_gallery_indices(sizes, trial, shots)]
    pids, cams = _pids_cams(picked)
    return picked, pids, cams


def process_gallery_sysu(data_path, mode="all", trial=0, *, shots=1):
    """(img_paths, pids, cams): one RGB image per existing (test id, camera) folder drawn with seed `trial`
    (REFERENCE 2.1); `shots=10` gives the multi-shot extension."""
    return _sampled(_sysu_gallery_folders(data_path, mode), trial, shots)


# ----------------------------------------------------------------------------------------------------------
# RegDB


def _idx_list(data_path, name, check_files):
    """(paths joined onto data_path, labels, list file) of the RegDB/LLCM list file data_path/idx/<name>."""
    list_file = os.path.join(data_path, "idx", name)
    rel_paths, labels = read_idx_file(list_file)
    paths = [os.path.join(data_path, rel.lstrip("/\\")) for rel in rel_paths]
    if check_files:
        _check_files_exist(paths, list_file)
    return paths, labels, list_file


def _training_lists(data_path, rgb_name, ir_name, check_files):
    rgb_paths, rgb_labels, rgb_file = _idx_list(data_path, rgb_name, check_files)
    ir_paths, ir_labels, ir_file = _idx_list(data_path, ir_name, check_files)
    check_training_labels(rgb_labels, ir_labels, f"{rgb_file} / {ir_file}")
    return rgb_paths, rgb_labels, ir_paths, ir_labels


def process_test_regdb(img_dir, trial=1, modal="visible", *, check_files=True):
    """(img_paths, labels) of idx/test_{visible|thermal}_{trial}.txt; paths joined onto `img_dir`."""
    if modal not in REGDB_MODALS:
        raise ValueError(f"RegDB modal must be 'visible' or 'thermal', got {modal!r}")
    check_dataset_root("regdb", img_dir)
    paths, labels, _ = _idx_list(img_dir, f"test_{modal}_{trial}.txt", check_files)
    return paths, labels


def regdb_training_lists(data_path, trial, *, check_files=True):
    """(rgb_paths, rgb_labels, ir_paths, ir_labels) of idx/train_{visible,thermal}_{trial}.txt (Q-06 checked)."""
    check_dataset_root("regdb", data_path)
    return _training_lists(data_path, f"train_visible_{trial}.txt", f"train_thermal_{trial}.txt", check_files)


# ----------------------------------------------------------------------------------------------------------
# LLCM


def _llcm_modal(mode):
    if mode not in LLCM_MODAL_DIRS:
        raise ValueError(f"LLCM mode must be 1 (visible) or 2 (near-infrared), got {mode!r}")
    return LLCM_MODAL_DIRS[mode], LLCM_MODAL_CAMS[mode]


def validate_llcm_test_layout(data_path, mode):
    """Check the root and the camera folders of one test modality (REFERENCE 1.4)."""
    modal_dir, cams = _llcm_modal(mode)
    check_dataset_root("llcm", data_path)
    for cam in cams:
        _require_dir(os.path.join(data_path, modal_dir, cam), "camera folder")


def _llcm_folders(data_path, mode):
    validate_llcm_test_layout(data_path, mode)
    modal_dir, cams = _llcm_modal(mode)
    ids = read_id_file(os.path.join(data_path, "idx", "test_id.txt"))
    folders = list_identity_folders(os.path.join(data_path, modal_dir), ids, cams)
    _nonempty(folders, f"LLCM {modal_dir}", data_path)
    return folders


def llcm_training_lists(data_path, *, check_files=True):
    """(rgb_paths, rgb_labels, ir_paths, ir_labels) of idx/train_vis.txt and idx/train_nir.txt (Q-06)."""
    check_dataset_root("llcm", data_path)
    return _training_lists(data_path, "train_vis.txt", "train_nir.txt", check_files)


def process_query_llcm(data_path, mode=1):
    """(img_paths, pids, cams): every test image of modality `mode` (1 = test_vis, 2 = test_nir)."""
    paths = gallery_candidates(_llcm_folders(data_path, mode))[0]
    pids, cams = _pids_cams(paths)
    return paths, pids, cams


def process_gallery_llcm(data_path, mode=1, trial=0, *, shots=1):
    """(img_paths, pids, cams): one image of modality `mode` per existing (test id, camera) folder, seed
    `trial`, exactly like SYSU (REFERENCE 2.3)."""
    return _sampled(_llcm_folders(data_path, mode), trial, shots)


# ----------------------------------------------------------------------------------------------------------
# Test protocols: gallery features are extracted once for all candidates; trials index into them.


@dataclass
class TestProtocol:
    """One evaluation setting. `gallery_*` hold every candidate image once; `trial_indices[i]` selects the
    gallery of trial `trials[i]`. `transpose=True` means rows = gallery, columns = query (RegDB tvsearch,
    DEEN LLCM VIS->IR), with the gallery labels/cameras acting as query labels/cameras in the metric."""
    __test__ = False  # not a pytest test class despite the name

    name: str
    metric: str
    query_paths: list
    query_pids: np.ndarray
    query_cams: np.ndarray
    query_modal: int
    gallery_paths: list
    gallery_pids: np.ndarray
    gallery_cams: np.ndarray
    gallery_modal: int
    trial_indices: list = field(default_factory=list)
    trials: list = field(default_factory=list)
    transpose: bool = False

    def used_gallery_only(self):
        """The same protocol with only the gallery images some trial uses, so each is extracted once."""
        used = np.unique(np.concatenate([np.asarray(t, dtype=np.int64) for t in self.trial_indices]))
        position = np.full(len(self.gallery_paths), -1, dtype=np.int64)
        position[used] = np.arange(len(used))
        return replace(self, gallery_paths=[self.gallery_paths[i] for i in used],
                       gallery_pids=np.asarray(self.gallery_pids)[used],
                       gallery_cams=np.asarray(self.gallery_cams)[used],
                       trial_indices=[position[np.asarray(t, dtype=np.int64)] for t in self.trial_indices])


def _shots_tag(shots):
    return "single" if shots == 1 else f"multi{shots}"


def _protocol_from_folders(name, metric, query, query_modal, folders, gallery_modal, trials, shots,
                           transpose=False):
    query_paths, query_pids, query_cams = query
    gallery_paths, sizes = gallery_candidates(folders)
    gallery_pids, gallery_cams = _pids_cams(gallery_paths)
    trials = [int(t) for t in trials]
    return TestProtocol(name=name, metric=metric, query_paths=query_paths, query_pids=query_pids,
                        query_cams=query_cams, query_modal=query_modal, gallery_paths=gallery_paths,
                        gallery_pids=gallery_pids, gallery_cams=gallery_cams, gallery_modal=gallery_modal,
                        trial_indices=[sample_gallery_indices(sizes, t, shots) for t in trials],
                        trials=trials, transpose=transpose)


def sysu_protocol(data_path, mode="all", trials=range(10), shots=1):
    """SYSU all/indoor search: query = all IR test images (modal 2), gallery = RGB candidates (modal 1)."""
    return _protocol_from_folders(f"sysu-{mode}-{_shots_tag(shots)}", "sysu", process_query_sysu(data_path, mode),
                                  INFRARED, _sysu_gallery_folders(data_path, mode), VISIBLE, trials, shots)


def regdb_protocol(data_path, trial, tvsearch=False):
    """One RegDB trial: query = visible test list (modal 1), gallery = thermal test list (modal 2), all
    images, no sampling. tvsearch=True keeps the extraction and sets transpose (thermal rows, REFERENCE 2.2).
    Cameras are 1 (visible) and 2 (thermal); the RegDB metric ignores them."""
    vis_paths, vis_labels = process_test_regdb(data_path, trial, "visible")
    th_paths, th_labels = process_test_regdb(data_path, trial, "thermal")
    return TestProtocol(name=f"regdb-trial{trial}-{'t2v' if tvsearch else 'v2t'}", metric="regdb",
                        query_paths=vis_paths, query_pids=vis_labels,
                        query_cams=np.full(len(vis_paths), VISIBLE, dtype=np.int64), query_modal=VISIBLE,
                        gallery_paths=th_paths, gallery_pids=th_labels,
                        gallery_cams=np.full(len(th_paths), INFRARED, dtype=np.int64), gallery_modal=INFRARED,
                        trial_indices=[np.arange(len(th_paths), dtype=np.int64)], trials=[int(trial)],
                        transpose=bool(tvsearch))


def llcm_protocol(data_path, direction="ir2vis", trials=range(10), shots=1, deen_transposed=False):
    """LLCM (REFERENCE 2.3). ir2vis (IRL default, test_mode [1,2]): query = all NIR (modal 2), gallery =
    sampled VIS (modal 1). vis2ir: query = all VIS (modal 1), gallery = sampled NIR (modal 2).
    deen_transposed (vis2ir only, REFERENCE 10.3): DEEN's computation, where the sampled NIR set is ranked
    against all visible images (transpose=True)."""
    modals = {"ir2vis": (INFRARED, VISIBLE), "vis2ir": (VISIBLE, INFRARED)}
    if direction not in modals:
        raise ValueError(f"LLCM direction must be 'ir2vis' or 'vis2ir', got {direction!r}")
    if deen_transposed and direction != "vis2ir":
        raise ValueError("deen_transposed applies to direction='vis2ir' only (REFERENCE 10.3)")
    query_modal, gallery_modal = modals[direction]
    name = f"llcm-{direction}-{_shots_tag(shots)}" + ("-deen" if deen_transposed else "")
    return _protocol_from_folders(name, "llcm", process_query_llcm(data_path, query_modal), query_modal,
                                  _llcm_folders(data_path, gallery_modal), gallery_modal, trials, shots,
                                  transpose=deen_transposed)


def evaluation_protocol(dataset, data_path, *, split=1, trials=range(10), mode="all", shots=1, tvsearch=False,
                        direction="ir2vis", deen_transposed=False):
    """The test protocol of `dataset` with its options (each dataset takes those in DATASETS[dataset].options;
    RegDB evaluates one `split`, the others the gallery `trials`)."""
    if dataset == "sysu":
        return sysu_protocol(data_path, mode=mode, trials=trials, shots=shots)
    if dataset == "regdb":
        return regdb_protocol(data_path, split, tvsearch=tvsearch)
    return llcm_protocol(data_path, direction=direction, trials=trials, shots=shots, deen_transposed=deen_transposed)


def training_protocol(dataset, data_path, *, mode="all", split=1):
    """The official training-time evaluation: the trial-0 gallery of the test set (REFERENCE 2), with only
    the gallery images that trial uses."""
    return evaluation_protocol(dataset, data_path, split=split, trials=[0], mode=mode).used_gallery_only()


def protocol_label(dataset, *, mode="all", shots=1, tvsearch=False, direction="ir2vis", deen_transposed=False):
    """Name of a protocol setting over all its trials/splits, e.g. sysu-all-single, regdb-t2v, llcm-vis2ir-single-deen."""
    if dataset == "sysu":
        return f"sysu-{mode}-{_shots_tag(shots)}"
    if dataset == "regdb":
        return "regdb-" + ("t2v" if tvsearch else "v2t")
    return f"llcm-{direction}-{_shots_tag(shots)}" + ("-deen" if deen_transposed else "")


# ----------------------------------------------------------------------------------------------------------
# Held-out validation identities (train.py --val): selection without looking at the test set


def held_out_labels(dataset, data_path, rgb_labels):
    """Training labels used for validation: SYSU exp/val_id.txt; RegDB/LLCM a deterministic 10%."""
    if dataset == "sysu":
        rgb_files, ir_files = sysu_training_files(data_path, use_val=True)
        if len(rgb_files) != len(rgb_labels):
            raise DatasetError(f"the preprocessed .npy files in {data_path} hold {len(rgb_labels)} RGB images but "
                               f"exp/train_id.txt + val_id.txt list {len(rgb_files)}: re-run pre_process_sysu.py")
        file_labels, _ = sysu_training_labels(rgb_files, ir_files)
        val_pids = set(sysu_val_ids(data_path))
        return np.unique([label for label, f in zip(file_labels, rgb_files) if parse_cam_pid(f)[1] in val_pids])
    ids = np.unique(rgb_labels)
    return ids[9::10] if len(ids) >= 20 else ids[1::3]   # spread over the id range; >= 2 ids when tiny


def validation_protocol(dataset, data_path, val_labels, split=1):
    """Held-out identities: query = their IR images, gallery = their visible images (one trial)."""
    if dataset == "sysu":
        val_ids = sysu_val_ids(data_path)
        query, _ = gallery_candidates(list_identity_folders(data_path, val_ids, SYSU_IR_CAMS))
        gallery, sizes = gallery_candidates(list_identity_folders(data_path, val_ids, SYSU_RGB_CAMS))
        q_pids, q_cams = _pids_cams(query)
        g_pids, g_cams = _pids_cams(gallery)
        return TestProtocol(name="sysu-val", metric="sysu", query_paths=query, query_pids=q_pids, query_cams=q_cams,
                            query_modal=INFRARED, gallery_paths=gallery, gallery_pids=g_pids, gallery_cams=g_cams,
                            gallery_modal=VISIBLE, trial_indices=[sample_gallery_indices(sizes, trial=0, shots=1)],
                            trials=[0])
    if dataset == "regdb":
        rgb_paths, rgb_labels, ir_paths, ir_labels = regdb_training_lists(data_path, split)
    else:
        rgb_paths, rgb_labels, ir_paths, ir_labels = llcm_training_lists(data_path)
    q = np.flatnonzero(np.isin(ir_labels, val_labels))
    g = np.flatnonzero(np.isin(rgb_labels, val_labels))
    return TestProtocol(name=f"{dataset}-val", metric="regdb", query_paths=[ir_paths[i] for i in q],
                        query_pids=np.asarray(ir_labels)[q], query_cams=np.full(len(q), INFRARED),
                        query_modal=INFRARED, gallery_paths=[rgb_paths[i] for i in g],
                        gallery_pids=np.asarray(rgb_labels)[g], gallery_cams=np.full(len(g), VISIBLE),
                        gallery_modal=VISIBLE, trial_indices=[np.arange(len(g))], trials=[0])
