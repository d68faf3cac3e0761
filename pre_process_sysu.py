"""Pre-process SYSU-MM01 training images into the four .npy files of REFERENCE 1.2.

    python pre_process_sysu.py --data-path ./dataset/SYSU-MM01/                    # IRL, 384x192
    python pre_process_sysu.py --data-path ./dataset/SYSU-MM01/ --img-h 288 --img-w 144   # AGW-sized

The files are byte-identical to the official script's output (list of LANCZOS-resized arrays, then
np.save(np.array(list))), but images are decoded in parallel worker processes and streamed into a
pre-allocated memory-mapped .npy, so memory stays flat instead of holding the data twice. Everything is
written under `<name>.partial` and renamed only when all four files are complete, so an interrupted or
failed run never leaves a file that looks valid. Labels: rank of the pid among the sorted IR training
pids (Q-04; equal to the official set order).
"""
import argparse
import contextlib
import os
import signal
import sys
import time
from multiprocessing import Pool

import numpy as np
from tqdm import tqdm

import data_manager
from data_manager import DatasetError

OUTPUT_FILES = data_manager.SYSU_NPY_FILES   # the names data_loader.SYSUData reads
PARTIAL_SUFFIX = ".partial"
WINDOW_BYTES = 32 << 20      # re-map the output every ~32 MB so written pages leave the resident set
POOL_CHUNKSIZE = 8


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-path", default="./dataset/SYSU-MM01/",
                        help="SYSU-MM01 root (camK/ folders and exp/); the .npy files are written here")
    parser.add_argument("--img-h", type=int, default=384, help="image height (288 for AGW)")
    parser.add_argument("--img-w", type=int, default=192, help="image width (144 for AGW)")
    parser.add_argument("--workers", type=int, default=min(os.cpu_count() or 1, 8),
                        help="decoding processes (0 = decode in this process)")
    args = parser.parse_args(argv)
    if args.img_h < 1 or args.img_w < 1:
        parser.error("--img-h and --img-w must be positive")
    if args.workers < 0:
        parser.error("--workers must be >= 0")
    return args


def _decode(task):
    """The official per-image step (np.array of the LANCZOS-resized image), run in a worker process."""
    path, img_w, img_h = task
    return data_manager.load_resized_rgb(path, img_w, img_h)


def _init_worker():
    # Ctrl-C is handled (and the partial files removed) by the parent only; Pool.terminate() stops
    # workers with SIGTERM, which must not go through the parent's clean-up handler inherited by fork.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def write_image_npy(path, files, img_h, img_w, pool, desc):
    """Stream the resized images of `files`, in order, into a pre-allocated .npy at `path`."""
    shape = (len(files), img_h, img_w, 3)
    allocated = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)  # header + file size
    del allocated
    tasks = [(f, img_w, img_h) for f in files]
    images = map(_decode, tasks) if pool is None else pool.imap(_decode, tasks, chunksize=POOL_CHUNKSIZE)
    window = max(1, WINDOW_BYTES // (img_h * img_w * 3))
    with tqdm(total=len(files), desc=desc, unit="img", disable=None) as progress:
        for start in range(0, len(files), window):
            out = np.load(path, mmap_mode="r+")
            for i in range(start, min(start + window, len(files))):
                out[i] = next(images)
                progress.update()
            out.flush()
            del out


def preprocess(data_path, img_h, img_w, workers):
    """Write the four .npy files into `data_path`; returns {path: shape} in OUTPUT_FILES order."""
    # Layout, id files and per-identity IR/RGB presence are all checked here, before any decoding.
    rgb_files, ir_files = data_manager.sysu_training_files(data_path, use_val=True)
    rgb_labels, ir_labels = data_manager.sysu_training_labels(rgb_files, ir_files)
    final = {key: os.path.join(data_path, name) for key, name in OUTPUT_FILES.items()}
    partial = {key: path + PARTIAL_SUFFIX for key, path in final.items()}
    try:
        with (Pool(workers, initializer=_init_worker) if workers > 0 else contextlib.nullcontext()) as pool:
            write_image_npy(partial["rgb_img"], rgb_files, img_h, img_w, pool, "rgb")
            write_image_npy(partial["ir_img"], ir_files, img_h, img_w, pool, "ir")
        _save_npy(partial["rgb_label"], rgb_labels)
        _save_npy(partial["ir_label"], ir_labels)
        for key in final:
            os.replace(partial[key], final[key])
    finally:
        for path in partial.values():
            if os.path.exists(path):
                os.remove(path)
    shapes = {"rgb_img": (len(rgb_files), img_h, img_w, 3), "rgb_label": rgb_labels.shape,
              "ir_img": (len(ir_files), img_h, img_w, 3), "ir_label": ir_labels.shape}
    return {final[key]: shapes[key] for key in final}


def _save_npy(path, array):
    with open(path, "wb") as f:      # a file object: np.save would append ".npy" to a bare name
        np.save(f, array)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    args = parse_args(argv)
    previous_sigterm = _install_sigterm_handler()
    start = time.time()
    try:
        written = preprocess(args.data_path, args.img_h, args.img_w, args.workers)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:         # e.g. disk full or read-only dataset root while writing
        print(f"error: cannot write the output files: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; partial output removed", file=sys.stderr)
        return 130
    finally:
        _restore_sigterm_handler(previous_sigterm)
    _print_summary(written, time.time() - start)
    return 0


def _install_sigterm_handler():
    # `kill` gets the same clean-up as Ctrl-C. Signal handlers can only be set from the main thread.
    try:
        return signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    except ValueError:
        return None


def _restore_sigterm_handler(previous):
    if previous is not None:
        signal.signal(signal.SIGTERM, previous)


def _print_summary(written, seconds):
    rgb_shape, _, ir_shape, _ = written.values()
    print(f"pre-processed {rgb_shape[0]} RGB and {ir_shape[0]} IR training images "
          f"({rgb_shape[1]}x{rgb_shape[2]}) in {seconds:.1f} s")
    for path, shape in written.items():
        print(f"  {path}  shape {tuple(shape)}")


if __name__ == "__main__":
    sys.exit(main())
