"""A newcomer's first run: precision chosen by the CPU's bf16 capability, progress lines off-terminal, and
errors that name the real problem in one line without leaving files behind."""
import io
import logging
import os

import pytest
import torch

import methods
import progress
import utils
from test_train import TINY, run_script, suffix_of, train_script, trained, workspace
from tools import quickstart


def fake_cpu(monkeypatch, capability, avx512_bf16, amx):
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)


@pytest.mark.parametrize("capability, avx512_bf16, amx, native", [
    ("AVX512", True, False, True),       # AMD Zen 4/5, Intel Cooper Lake
    ("AVX512", False, True, True),       # Intel Sapphire Rapids and later (AMX tiles)
    ("AVX2", False, False, False),       # AVX2-only CPUs (the first report of this issue)
    ("AVX512", False, False, False),     # Skylake-SP: AVX-512 without its BF16 extension
    ("AVX2", True, False, False),        # bf16-capable CPU but ATen dispatches AVX2 kernels (e.g. forced)
])
def test_native_bf16_follows_the_cpu_capability(monkeypatch, capability, avx512_bf16, amx, native):
    fake_cpu(monkeypatch, capability, avx512_bf16, amx)
    got, reason = utils.cpu_bf16_support()
    assert got is native
    assert ("natively" in reason) is native and ("emulated" in reason) is (not native)


def test_quickstart_uses_bf16_only_where_the_cpu_computes_it_natively(monkeypatch):
    fake_cpu(monkeypatch, "AVX512", True, False)
    flag, name, line = quickstart.precision()
    assert (flag, name) == ("--amp", "bf16") and "natively" in line
    fake_cpu(monkeypatch, "AVX2", False, False)
    flag, name, line = quickstart.precision()
    assert (flag, name) == ("--no-amp", "fp32") and "no native bf16" in line and "\n" not in line


def capture_log():
    stream = io.StringIO()
    log = logging.getLogger("test_first_run")
    log.handlers[:] = [logging.StreamHandler(stream)]
    log.propagate = False
    return log, stream


def test_explicit_amp_on_a_cpu_without_native_bf16_warns_once_and_obeys(monkeypatch):
    log, stream = capture_log()
    fake_cpu(monkeypatch, "AVX2", False, False)
    assert train_script.autocast_dtype(True, torch.device("cpu"), log) is torch.bfloat16
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1 and "emulated" in lines[0] and "slower than fp32" in lines[0]
    fake_cpu(monkeypatch, "AVX512", True, False)
    stream.truncate(0)
    assert train_script.autocast_dtype(True, torch.device("cpu"), log) is torch.bfloat16
    assert stream.getvalue() == ""
    # The IRL default ("cuda") never turns bf16 on for a CPU, whatever it supports.
    assert train_script.autocast_dtype("cuda", torch.device("cpu"), log) is None


def test_default_workers_never_exceed_the_usable_cpus(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert utils.default_workers() == 2 and utils.default_workers(1) == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert utils.default_workers() == 4


class NotATerminal(io.StringIO):
    def isatty(self):
        return False


def test_progress_prints_a_line_per_tenth_when_not_on_a_terminal():
    stream, lines = NotATerminal(), []
    with progress.Progress(23, "features", "img", write=lines.append, stream=stream) as shown:
        for _ in range(23):
            shown.update()
    assert stream.getvalue() == ""                          # no bar: not a terminal
    done = [int(line.split()[1].split("/")[0]) for line in lines]
    assert done == [3, 5, 7, 10, 12, 14, 17, 19, 21, 23]     # first item past each tenth of 23
    assert lines[-1].startswith("features: 23/23 img (100%)") and "ETA 0:00" in lines[-1]


def test_format_seconds():
    assert [progress.format_seconds(s) for s in (0, 59.6, 61, 3600, 3725)] == ["0:00", "1:00", "1:01", "1:00:00",
                                                                            "1:02:05"]


def test_training_log_shows_steps_both_learning_rates_and_a_singular_epoch(tmp_path_factory):
    _, proc, _ = trained(tmp_path_factory, "sysu_irl")      # one epoch; --log-every 50 > steps: last step logs
    out = proc.stdout
    step_lines = [line for line in out.splitlines() if "epoch 0/0 step " in line]
    assert step_lines and all("img/s" in line and "ETA epoch" in line for line in step_lines)
    assert "lr heads 0.0001 backbone 1e-05," in out      # --lr 0.001, warmup factor 0.1, backbone 0.1x
    assert "Finished 1 epoch;" in out


def test_resuming_a_run_never_evaluated_says_so():
    run = train_script.Run(best_metric=-1.0, best_epoch=-1)
    assert train_script.best_so_far(run) == "no evaluation yet"
    run = train_script.Run(best_metric=0.25, best_epoch=3, method=methods.get("agw"))
    assert train_script.best_so_far(run) == "best bn (FC) Rank-1 25.00% at epoch 3"
    run.method = methods.get("deen")        # DEEN selects by S7, as its train.py
    assert train_script.best_so_far(run) == "best S7 (sum of 6) Rank-1 25.00% at epoch 3"


def one_line_error(capsys, argv):
    code = train_script.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def outputs(tmp_path):
    return ["--model_path", str(tmp_path / "runs"), "--log_path", str(tmp_path / "logs")]


def test_mistyped_data_path_is_reported_as_a_missing_root_and_leaves_nothing(tmp_path, capsys):
    err = one_line_error(capsys, ["--dataset", "sysu", "--data-path", str(tmp_path / "SYSU-MM0l"), *TINY,
                                  *outputs(tmp_path)])
    assert "missing SYSU-MM01 dataset root" in err and "pre_process_sysu" not in err
    assert os.listdir(tmp_path) == []


def test_a_run_refused_after_its_logger_started_leaves_no_log(tmp_path_factory, tmp_path, capsys):
    ws = workspace(tmp_path_factory)
    argv = ws.train_args("regdb", "unused", ["--pretrained", str(tmp_path / "weights.pth")])
    argv[argv.index("--model_path") + 1] = str(tmp_path / "runs")
    argv[argv.index("--log_path") + 1] = str(tmp_path / "logs")
    assert "weights.pth" in one_line_error(capsys, argv)
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("make, message", [(lambda p: p.mkdir(), "is a directory"),
                                           (lambda p: p.write_text("not a checkpoint\n"), "not a PyTorch checkpoint")])
def test_bad_resume_paths_name_the_problem(tmp_path, capsys, make, message):
    path = tmp_path / "resume.pth"
    make(path)
    assert message in one_line_error(capsys, ["--resume", str(path), *outputs(tmp_path)])
    assert not os.path.exists(tmp_path / "logs") and not os.path.exists(tmp_path / "runs")


def test_agw_schedule_error_points_to_the_custom_schedule(capsys):
    err = one_line_error(capsys, ["--method", "agw", "--warmup-epochs", "3"])
    assert "AGW schedule" in err and "warmup 10, x0.1 at 20, x0.01 at 50." in err and "--lr_scheduler step" in err
    err = one_line_error(capsys, ["--method", "ifalnet", "--milestones", "5"])
    assert "IFALNET schedule" in err and "warmup 10, x0.1 at 20, x0.01 at 60, x0.001 at 90." in err


def test_a_new_run_never_overwrites_a_run_of_another_configuration(tmp_path_factory, capsys):
    ws, _, _ = trained(tmp_path_factory, "regdb_t2")         # 1 epoch, in runs/regdb
    last = os.path.join(ws.model_path("regdb"), f"{suffix_of('regdb_t2')}_last.pth")
    before = os.path.getmtime(last)
    argv = ws.train_args("regdb", "regdb", ["--method", "agw", "--trial", "2", "--epochs", "3"])
    err = one_line_error(capsys, argv)
    assert last in err and "epochs=1 there vs 3 now" in err and "--model_path" in err
    assert os.path.getmtime(last) == before


def test_a_multi_shot_gallery_that_covers_every_folder_says_its_trials_are_identical(tmp_path_factory, tmp_path):
    ws, _, _ = trained(tmp_path_factory, "sysu_irl")
    resume = os.path.join(ws.model_path("sysu"), f"{suffix_of('sysu_irl')}_best.pth")
    common = ["--dataset", "sysu", "--data-path", ws.data["sysu"], "--resume", resume, "--device", "cpu",
              "--workers", "0", "--num-trials", "3"]
    # The synthetic test tree has at most 3 images per (identity, camera): 10 shots take them all.
    out = run_script("test.py", [*common, "--shots", "10", "--output", str(tmp_path / "m.json")], ws.base).stdout
    assert out.count("note: every gallery trial of sysu-all-multi10 holds the same images") == 1
    out = run_script("test.py", [*common, "--shots", "2", "--output", str(tmp_path / "s.json")], ws.base).stdout
    assert "note: every gallery trial" not in out
