"""Pre-process SYSU-MM01 training images into the four .npy files of REFERENCE 1.2, named by their size.

    python pre_process_sysu.py --data-path ./dataset/SYSU-MM01/                    # IRL, 384x192
    python pre_process_sysu.py --data-path ./dataset/SYSU-MM01/ --img-h 288 --img-w 144   # AGW/CAJ-sized
    python pre_process_sysu.py --data-path ./dataset/SYSU-MM01/ --img-h 384 --img-w 144   # DEEN-sized

The files are `train_{rgb,ir}_resized_{img,label}_<H>x<W>.npy`, so that several methods' caches coexist in
one dataset root (data_loader.SYSUData reads the one of its size, or the official script's unsized names).

The files are byte-identical to the official script's output (list of LANCZOS-resized arrays, then
np.save(np.array(list))), but each image is decoded once, by parallel worker processes that write it
straight into its slot of the pre-sized .npy file, so memory stays flat instead of holding the data twice.
Everything is written under `<name>.partial` and renamed only when all four files are complete, so an
interrupted or failed run (a corrupt image included) never leaves a file that looks valid. Labels: rank
of the pid among the sorted IR training pids (Q-04; equal to the official set order).
"""
import argparse
import contextlib
import os
import signal
import sys
import time
from multiprocessing import Pool

import numpy as np

import data_manager
from data_manager import DatasetError
from progress import Progress

PARTIAL_SUFFIX = ".partial"
# Images per pool task. Big enough that task hand-offs cost nothing next to ~2 ms of decoding per image,
# small enough that the last tasks (when one worker may already be idle) take well under a second.
CHUNK_IMAGES = 16


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


def _decode(path, img_w, img_h):
    """The official per-image step (np.array of the LANCZOS-resized image)."""
    return data_manager.load_resized_rgb(path, img_w, img_h)


def _write_images(task):
    """Decode `paths` and write them as images start, start+1, ... of the .npy whose pixels begin at
    byte `data_offset` of `out_path`. Runs in a worker process: each worker writes its own slots of the
    file directly, so no pixels travel back through the pool. Returns the number of images written."""
    out_path, data_offset, start, paths, img_w, img_h = task
    image_bytes = img_h * img_w * 3
    fd = os.open(out_path, os.O_WRONLY)
    try:
        for k, path in enumerate(paths):
            _pwrite_all(fd, _decode(path, img_w, img_h), data_offset + (start + k) * image_bytes)
    finally:
        os.close(fd)
    return len(paths)


def _pwrite_all(fd, array, offset):
    # pwrite goes through the page cache like np.save's write(), without the page faults and msync of a
    # memory map (a third of the run time when the output was a memmap). It may write less than asked
    # (disk nearly full, a signal): the loop writes the rest, or gets the OSError that main() reports.
    view = memoryview(array).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def _init_worker():
    # Ctrl-C is handled (and the partial files removed) by the parent only; Pool.terminate() stops
    # workers with SIGTERM, which must not go through the parent's clean-up handler inherited by fork.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _allocate_npy(path, shape):
    """Create `path` with the header np.save writes for a uint8 array of `shape`, sized for its pixels
    (left as a hole until written); returns the byte offset of the pixels."""
    allocated = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=shape)
    offset = allocated.offset
    del allocated           # nothing was touched through the map; only its header and size matter
    return offset


def _tasks(path, files, img_h, img_w):
    offset = _allocate_npy(path, (len(files), img_h, img_w, 3))
    return [(path, offset, start, files[start:start + CHUNK_IMAGES], img_w, img_h)
            for start in range(0, len(files), CHUNK_IMAGES)]


def preprocess(data_path, img_h, img_w, workers):
    """Write the four .npy files of this size (data_manager.sysu_npy_files) into `data_path`; returns
    {path: shape} in that order."""
    # Layout, id files and per-identity IR/RGB presence are all checked here, before any decoding.
    rgb_files, ir_files = data_manager.sysu_training_files(data_path, use_val=True)
    rgb_labels, ir_labels = data_manager.sysu_training_labels(rgb_files, ir_files)
    final = {key: os.path.join(data_path, name) for key, name in data_manager.sysu_npy_files(img_h, img_w).items()}
    partial = {key: path + PARTIAL_SUFFIX for key, path in final.items()}
    try:
        # One queue for both modalities: workers move on to IR images while the last RGB chunks are
        # still being written, instead of waiting for RGB to finish.
        tasks = (_tasks(partial["rgb_img"], rgb_files, img_h, img_w)
                 + _tasks(partial["ir_img"], ir_files, img_h, img_w))
        # The pool is forked before a progress bar (tqdm) can start its monitor thread. Leaving the `with` terminates the
        # workers, so on an error none of them is still writing when the partial files are removed below.
        with (Pool(workers, initializer=_init_worker) if workers > 0 else contextlib.nullcontext()) as pool:
            written = map(_write_images, tasks) if pool is None else pool.imap_unordered(_write_images, tasks)
            with Progress(len(rgb_files) + len(ir_files), "pre-processing images", "img") as shown:
                for count in written:
                    shown.update(count)
        # Every image of both files is written at this point: a corrupt one raised above, before any
        # final name exists.
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
    # `kill` gets the same clean-up as Ctrl-C. A SIGTERM that whoever started us ignores stays ignored, as
    # Python leaves an inherited ignored SIGINT (e.g. `cmd &` in a script) ignored. Signal handlers can
    # only be set from the main thread.
    try:
        if signal.getsignal(signal.SIGTERM) == signal.SIG_IGN:
            return None
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
