"""Progress of long loops, on terminals and in logs alike (ground floor: standard library and tqdm only, so
that pre_process_sysu.py does not pay for importing torch)."""
import sys
import time

from tqdm import tqdm


class Progress:
    """Progress of a long loop: a tqdm bar on an interactive terminal, otherwise (logs, pipes, nohup, batch
    schedulers) a plain line at every tenth of the work, so a log never stays silent for minutes.

    `update(n)` after each piece of work; `close()` (or leaving a `with` block) ends it. `stream` is the
    terminal the bar is drawn on (default stderr, as tqdm does); `write` is where the plain lines go
    (default: print to stdout).
    """

    def __init__(self, total, desc, unit="it", *, write=None, stream=None):
        self.total, self.desc, self.unit = int(total), desc, unit
        self.done, self.start = 0, time.time()
        stream = stream or sys.stderr
        self.bar = tqdm(total=self.total, desc=desc, unit=unit, leave=False, file=stream) \
            if stream.isatty() else None
        # Plain lines go beside the logs, on stdout: stderr stays for errors, one line each.
        self.write = write or (lambda line: print(line, file=sys.stdout, flush=True))
        self.tenths_shown = 0

    def update(self, n=1):
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        tenths = 10 * self.done // self.total if self.total else 0
        if tenths > self.tenths_shown:
            self.tenths_shown = tenths
            elapsed = time.time() - self.start
            eta = elapsed / self.done * max(self.total - self.done, 0)
            self.write(f"{self.desc}: {self.done}/{self.total} {self.unit} ({100 * self.done // self.total}%), "
                       f"{format_seconds(elapsed)} elapsed, ETA {format_seconds(eta)}")

    def close(self):
        if self.bar is not None:
            self.bar.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def format_seconds(seconds) -> str:
    """h:mm:ss (or m:ss under an hour) of a duration in seconds."""
    seconds = int(round(max(seconds, 0)))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
