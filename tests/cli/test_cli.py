"""End-to-end tests of the quadmamba command on tiny settings (reference ops, 32x32 digits,
a few batches): the files each command writes, exact resume, and clean errors."""
import csv
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from cli_testing import TINY, assert_clean_error, make_folder, run_cli, run_main
from quadmamba import cli
from quadmamba.train import METRIC_COLUMNS, TrainConfig, evaluate_checkpoint, load_checkpoint, run_training
from quadmamba.visualize import figure_size


def read_metrics(run):
    with open(run / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def png_size(path):
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.format == "PNG", img.format
        return img.size


def assert_main_error(result, *fragments):
    code, out, err = result
    lines = err.strip().splitlines()
    assert code == 1, f"exit {code}, stderr {err!r}"
    assert len(lines) == 1 and lines[0].startswith("quadmamba: error: "), err
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"


# ---------------------------------------------------------------------------------------------
# train / eval
# ---------------------------------------------------------------------------------------------
def test_train_writes_checkpoint_metrics_and_curves(trained_run):
    run, proc = trained_run
    assert "held-out accuracy:" in proc.stdout, proc.stdout
    columns, rows = read_metrics(run)
    assert tuple(columns) == METRIC_COLUMNS
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    for row in rows:
        assert 0.0 <= float(row["test_acc"]) <= 1.0 and float(row["images_per_s"]) > 0, row
    # the cosine schedule decays within the run
    assert float(rows[1]["lr"]) < float(rows[0]["lr"]), rows
    assert png_size(run / "curves.png") == (1000, 400)
    state = load_checkpoint(str(run / "checkpoint.pt"))
    for key in ("model", "config", "optimizer", "scheduler", "epoch", "metrics", "ema", "data", "train"):
        assert key in state, key
    assert state["epoch"] == 2 and state["config"]["name"] == "quadmamba_nano"
    assert state["config"]["in_chans"] == 1 and state["data"]["img_size"] == 32
    assert len(state["metrics"]) == 2


def test_eval_reproduces_logged_accuracy(trained_run, tmp_path):
    run, _ = trained_run
    _, rows = read_metrics(run)
    logged = float(rows[-1]["test_acc"])
    r = evaluate_checkpoint(str(run / "checkpoint.pt"), kernels="reference", test_limit=32)
    assert r["count"] == 32 and r["top1"] == pytest.approx(logged, abs=1e-12), (r["top1"], logged)
    assert r["top5"] >= r["top1"]
    assert int(r["confusion"].sum()) == 32 and int(r["confusion"].trace()) == r["correct"]
    out = tmp_path / "cm.png"
    proc = run_cli("eval", "--checkpoint", run / "checkpoint.pt", "--kernels", "reference",
                   "--test-limit", "32", "--output", out)
    assert proc.returncode == 0, proc.stderr
    top1 = float(re.search(r"top-1 ([\d.]+)%", proc.stdout).group(1))
    assert top1 == pytest.approx(100 * logged, abs=0.005 + 1e-9), (top1, logged)   # printed to 0.01
    assert png_size(out) == (700, 600)


def test_resume_continues_exactly(trained_run, tmp_path):
    """Interrupt a run after its first epoch, resume it from the command line: the final
    weights and metrics equal those of the uninterrupted run (same settings)."""
    reference_run, _ = trained_run
    out = tmp_path / "interrupted"
    cfg = TrainConfig(kernels="reference", epochs=2, batch_size=16, train_limit=48, test_limit=32, img_size=32)

    def log(line):
        if line.startswith("epoch   1/2"):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(cfg, str(out), log=log)
    assert load_checkpoint(str(out / "checkpoint.pt"))["epoch"] == 1
    proc = run_cli("train", "--resume", "--output", out)
    assert proc.returncode == 0, proc.stderr
    assert "resuming" in proc.stdout and "epoch   2/2" in proc.stdout, proc.stdout
    resumed = load_checkpoint(str(out / "checkpoint.pt"))
    straight = load_checkpoint(str(reference_run / "checkpoint.pt"))
    assert resumed["epoch"] == straight["epoch"] == 2
    for name, value in straight["model"].items():
        assert torch.equal(resumed["model"][name], value), \
            f"{name}: max diff {(resumed['model'][name] - value).abs().max().item()}"
    for a, b in zip(resumed["metrics"], straight["metrics"]):
        for key in ("train_loss", "train_acc", "test_loss", "test_acc", "lr"):
            assert a[key] == b[key], (key, a[key], b[key])
    # resuming a finished run changes nothing and says so
    before = (out / "checkpoint.pt").read_bytes()
    proc = run_cli("train", "--resume", "--output", out)
    assert proc.returncode == 0 and "already finished" in proc.stdout, proc.stdout + proc.stderr
    assert (out / "checkpoint.pt").read_bytes() == before


def test_train_with_ema_evaluates_the_averaged_weights(tmp_path, capsys):
    out = tmp_path / "ema"
    cfg = TrainConfig(kernels="reference", epochs=1, batch_size=16, train_limit=32, test_limit=16,
                      img_size=32, ema_decay=0.9)
    final = run_training(cfg, str(out), log=lambda line: None)
    state = load_checkpoint(str(out / "checkpoint.pt"))
    assert state["ema"] is not None
    differs = [k for k in state["model"] if not torch.equal(state["model"][k], state["ema"][k])]
    assert differs, "EMA weights equal the raw weights after training"
    r = evaluate_checkpoint(str(out / "checkpoint.pt"), kernels="reference", test_limit=16)
    assert r["top1"] == pytest.approx(final["test_acc"], abs=1e-12)


@pytest.mark.parametrize("layout", ["flat", "split"])
def test_train_and_eval_on_an_image_folder(tmp_path, capsys, layout):
    data = make_folder(tmp_path / "data", layout)
    out = tmp_path / "run"
    code, stdout, err = run_main(capsys, "train", "--data", data, "--img-size", 32, "--epochs", 1,
                                 "--batch-size", 4, "--kernels", "reference", "--output", out)
    assert code == 0, err
    assert "2 classes, 32x32x3" in stdout, stdout
    state = load_checkpoint(str(out / "checkpoint.pt"))
    assert state["data"]["classes"] == ["left", "right"] and state["config"]["in_chans"] == 3
    code, stdout, err = run_main(capsys, "eval", "--checkpoint", out / "checkpoint.pt", "--data", data,
                                 "--kernels", "reference")
    assert code == 0, err
    assert png_size(out / "confusion.png") == (700, 600)


# ---------------------------------------------------------------------------------------------
# visualize / bench / info / ablation
# ---------------------------------------------------------------------------------------------
def test_visualize_sample_photo_and_other_resolution(trained_run, tmp_path, capsys):
    run, _ = trained_run
    out = tmp_path / "china.png"
    code, stdout, err = run_main(capsys, "visualize", "--checkpoint", run / "checkpoint.pt", "--sample", "china",
                                 "--kernels", "reference", "--output", out)
    assert code == 0, err
    assert "4 quadtree blocks" in stdout, stdout
    assert png_size(out) == figure_size(4) == (1500, 350)
    # an arbitrary RGB photo file at a resolution the model was not trained on
    photo = tmp_path / "photo.jpg"
    Image.fromarray((np.random.default_rng(1).random((90, 140, 3)) * 255).astype(np.uint8)).save(photo)
    out2 = tmp_path / "photo_vis.png"
    code, stdout, err = run_main(capsys, "visualize", "--checkpoint", run / "checkpoint.pt", "--image", photo,
                                 "--img-size", 64, "--kernels", "reference", "-o", out2)
    assert code == 0, err
    assert png_size(out2) == (1500, 350)


def test_window_borders_follow_window_ids():
    from quadmamba.visualize import window_borders

    ids = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 4, 5], [2, 2, 6, 7]])
    coarse, fine = window_borders(ids, stride=4)
    # coarse: 0|1 two vertical segments, 0/2 two horizontal, 2|4 none (touches fine) ...
    assert sorted(coarse) == sorted([((8, 0), (8, 4)), ((8, 4), (8, 8)), ((0, 8), (4, 8)), ((4, 8), (8, 8))])
    assert len(fine) == 2 + 2 + 2 + 2, fine   # 2|4,2|6 ; 4|5,6|7 ; 1/4,1/5 ; 4/6,5/7


def test_bench_prints_both_kernel_sets(capsys):
    code, out, err = run_main(capsys, "bench", "--model", "quadmamba_nano", "--batch-size", 2, "--img-size", 32,
                              "--iters", 2, "--warmup", 1)
    assert code == 0, err
    ref = re.search(r"^reference\s+([\d.]+)\s+([\d.]+)\s+\d+$", out, re.M)
    assert ref and float(ref.group(1)) > 0 and float(ref.group(2)) > 0, out
    assert re.search(r"^fused\s+", out, re.M), out
    assert "fused speed-up over reference:" in out
    from quadmamba.layers.common import onednn_linear_works
    expected = ("float32 Linears: fused oneDNN (products of 2^21 multiply-adds and more; QUADMAMBA_ONEDNN_LINEAR=0: "
                "F.linear), reference F.linear" if onednn_linear_works() else "float32 Linears: fused F.linear (")
    assert expected in out, out


def test_info_lists_variants_and_kernels(capsys):
    import quadmamba

    code, out, err = run_main(capsys, "info", "--model", "quadmamba_nano", "--model", "quadmamba_li")
    assert code == 0, err
    li = quadmamba.count_params(quadmamba.create_model("quadmamba_li", kernels="reference"))
    assert f"{li:,}" in out and "56x56x48" in out and "7x7x384" in out, out
    assert "0.821" in out, out
    assert "compiled core: yes" in out and "reference kernels" in out, out
    assert re.search(r"CPU instruction sets: selective scan (avx512|avx2|portable), quad scan (avx|sse2|portable)", out), out
    from quadmamba.layers.common import onednn_linear_works
    assert ("float32 CPU Linears of the fused models: " + ("oneDNN" if onednn_linear_works() else "F.linear")) in out, out


@pytest.mark.parametrize("env,scan,quad", [
    ({"QUADMAMBA_CPU_NO_AVX512": "1"}, "(avx2|portable)", "(avx|sse2|portable)"),
    ({"QUADMAMBA_CPU_GENERIC": "1"}, "portable", "(sse2|portable)"),
    ({"QUADMAMBA_CPU_GENERIC": "2"}, "portable", "portable"),
])
def test_info_reports_the_paths_held_back_by_the_environment(env, scan, quad):
    proc = run_cli("info", "--model", "quadmamba_nano", env=env)
    assert proc.returncode == 0, proc.stderr
    assert re.search(rf"CPU instruction sets: selective scan {scan}, quad scan {quad}", proc.stdout), \
        proc.stdout


def test_info_reports_the_linear_route_held_back_by_the_environment():
    proc = run_cli("info", "--model", "quadmamba_nano", env={"QUADMAMBA_ONEDNN_LINEAR": "0"})
    assert proc.returncode == 0, proc.stderr
    assert "float32 CPU Linears of the fused models: F.linear (QUADMAMBA_ONEDNN_LINEAR=0)" in proc.stdout, proc.stdout


@pytest.mark.parametrize("env,expected", [
    ({}, "malloc, tuned: buffers under 1 GiB reused from the heap"),
    ({"QUADMAMBA_TUNE_ALLOCATOR": "0"}, "malloc defaults: large buffers page-fault on every call"),
    ({"MALLOC_MMAP_THRESHOLD_": "65536"}, "malloc as set by the environment (MALLOC_MMAP_THRESHOLD_)"),
])
def test_info_reports_the_allocator_the_command_runs_with(env, expected):
    from quadmamba.allocator import _glibc_version

    if _glibc_version() is None:
        pytest.skip("the C library is not glibc: nothing to tune")
    proc = run_cli("info", "--model", "quadmamba_nano", env=env,
                   unset=("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "GLIBC_TUNABLES", "LD_PRELOAD",
                          "QUADMAMBA_TUNE_ALLOCATOR"))
    assert proc.returncode == 0, proc.stderr
    assert f"CPU allocator: {_glibc_version()} {expected}" in proc.stdout, proc.stdout


def test_ablation_trains_both_scans(tmp_path, capsys):
    out = tmp_path / "abl"
    code, stdout, err = run_main(capsys, "ablation", *TINY, "--epochs", 1, "--output", out)
    assert code == 0, err
    for scan in ("quadtree", "raster"):
        assert (out / scan / "checkpoint.pt").is_file()
        assert load_checkpoint(str(out / scan / "checkpoint.pt"))["config"]["quad_scan"] == scan
        assert re.search(rf"^{scan}\s+[\d.]+%", stdout, re.M), stdout
    # the raster model has no partition to draw: clean error
    assert_main_error(run_main(capsys, "visualize", "--checkpoint", out / "raster" / "checkpoint.pt", "--sample",
                               "flower", "--kernels", "reference", "-o", tmp_path / "x.png"), "raster")
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------------------
# bad input: one line on stderr, exit 1, nothing written
# ---------------------------------------------------------------------------------------------
def test_bad_input_subprocess_has_no_traceback(tmp_path):
    """The same errors seen from a real process: exit 1, a single stderr line, no traceback."""
    assert_clean_error(run_cli("train", "--data", tmp_path / "missing", "--kernels", "reference"),
                       "data folder not found")
    junk = tmp_path / "junk.pt"
    junk.write_bytes(os.urandom(256))
    assert_clean_error(run_cli("eval", "--checkpoint", junk, "--kernels", "reference"), "not a quadmamba checkpoint")
    assert_clean_error(run_cli("train", "--model", "quadmamba_xxl"), "unknown model")


def test_bad_data_folders(tmp_path, capsys):
    tiny = ["--img-size", 32, "--epochs", 1, "--kernels", "reference"]
    (tmp_path / "empty").mkdir()
    assert_main_error(run_main(capsys, "train", "--data", tmp_path / "empty", *tiny, "-o", tmp_path / "o1"),
                      "no class sub-folders")
    (tmp_path / "noimg" / "a").mkdir(parents=True)
    (tmp_path / "noimg" / "b").mkdir(parents=True)
    assert_main_error(run_main(capsys, "train", "--data", tmp_path / "noimg", *tiny, "-o", tmp_path / "o2"),
                      "no images")
    bad = make_folder(tmp_path / "bad", corrupt="left/broken.png")
    assert_main_error(run_main(capsys, "train", "--data", bad, *tiny, "-o", tmp_path / "o3"),
                      "not a readable image", "broken.png")
    assert_main_error(run_main(capsys, "train", "--data", tmp_path / "nope", *tiny), "data folder not found")
    # a file that passes the scan (PIL's verify) but not decoding: found in the first epoch, and
    # the run directory made for it is removed again
    late = make_folder(tmp_path / "late")
    Image.fromarray(np.full((20, 20), np.nan, dtype=np.float32)).save(late / "left" / "nan.tif")
    assert_main_error(run_main(capsys, "train", "--data", late, *tiny, "-o", tmp_path / "o4"),
                      "not a readable image", "nan.tif")
    for o in ("o1", "o2", "o3", "o4"):
        assert not (tmp_path / o).exists()   # nothing written before the data is checked


@pytest.mark.parametrize("package", ["sklearn", "matplotlib"])
def test_missing_optional_package_is_named_before_anything_is_written(tmp_path, capsys, monkeypatch, package):
    monkeypatch.setitem(__import__("sys").modules, package, None)   # `import package` fails
    assert_main_error(run_main(capsys, "train", "--img-size", 32, "--epochs", 1, "--kernels", "reference",
                               "-o", tmp_path / "run"), f"optional package {package!r}", "quadmamba[cli]")
    assert not (tmp_path / "run").exists()


def test_bad_images_and_sizes(trained_run, tmp_path, capsys):
    run, _ = trained_run
    ckpt = run / "checkpoint.pt"
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    assert_main_error(run_main(capsys, "visualize", "--checkpoint", ckpt, "--image", text, "--kernels", "reference",
                               "-o", tmp_path / "v.png"), "not a readable image")
    assert_main_error(run_main(capsys, "visualize", "--checkpoint", ckpt, "--image", tmp_path / "none.jpg",
                               "--kernels", "reference", "-o", tmp_path / "v.png"), "image not found")
    assert not (tmp_path / "v.png").exists()
    for size in (16, 48):
        assert_main_error(run_main(capsys, "train", "--img-size", size, "--kernels", "reference",
                                   "-o", tmp_path / "s"), "--img-size", str(size))
        assert_main_error(run_main(capsys, "visualize", "--checkpoint", ckpt, "--sample", "china",
                                   "--img-size", size, "--kernels", "reference", "-o", tmp_path / "v.png"),
                          "--img-size")
    assert not (tmp_path / "s").exists()
    assert_main_error(run_main(capsys, "bench", "--img-size", 8), "--img-size")
    assert_main_error(run_main(capsys, "visualize", "--checkpoint", ckpt, "--sample", "moon",
                               "--kernels", "reference", "-o", tmp_path / "v.png"), "--sample")


def test_bad_checkpoints(trained_run, tmp_path, capsys):
    run, _ = trained_run
    ckpt = run / "checkpoint.pt"
    ref = ["--kernels", "reference"]
    assert_main_error(run_main(capsys, "eval", "--checkpoint", tmp_path / "none.pt", *ref), "checkpoint not found")
    other = tmp_path / "other.pt"
    torch.save({"model": {}, "epoch": 3}, other)
    assert_main_error(run_main(capsys, "eval", "--checkpoint", other, *ref), "not a quadmamba checkpoint")
    # asked for another variant
    assert_main_error(run_main(capsys, "eval", "--checkpoint", ckpt, "--model", "quadmamba_li", *ref),
                      "holds a quadmamba_nano model, not quadmamba_li")
    assert_main_error(run_main(capsys, "visualize", "--checkpoint", ckpt, "--model", "quadmamba_t", "--sample",
                               "china", "-o", tmp_path / "v.png", *ref), "not quadmamba_t")
    # weights of another variant under this config
    state = torch.load(ckpt, weights_only=True)
    state["config"]["dims"] = [24, 48, 96, 192]
    mixed = tmp_path / "mixed.pt"
    torch.save(state, mixed)
    assert_main_error(run_main(capsys, "eval", "--checkpoint", mixed, *ref), "do not fit")
    assert_main_error(run_main(capsys, "eval", "--checkpoint", ckpt, "--model", "nano", *ref), "unknown model")


def test_outputs_are_never_overwritten(trained_run, tmp_path, capsys):
    run, _ = trained_run
    before = (run / "checkpoint.pt").read_bytes()
    metrics = (run / "metrics.csv").read_bytes()
    assert_main_error(run_main(capsys, "train", *TINY, "--output", run), "already holds a checkpoint", "--force")
    assert_main_error(run_main(capsys, "train", "--resume", "--epochs", 5, "--output", run), "--epochs")
    assert_main_error(run_main(capsys, "train", "--resume", "--output", tmp_path / "fresh"), "no checkpoint.pt")
    assert (run / "checkpoint.pt").read_bytes() == before and (run / "metrics.csv").read_bytes() == metrics
    # unwritable: the output's parent is a file
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_main_error(run_main(capsys, "train", *TINY, "--output", blocker / "run"), "cannot write")
    assert_main_error(run_main(capsys, "train", *TINY, "--output", blocker), "not a directory")
    assert_main_error(run_main(capsys, "eval", "--checkpoint", run / "checkpoint.pt", "--kernels", "reference",
                               "--output", blocker / "cm.png"), "cannot write")
    assert_main_error(run_main(capsys, "visualize", "--checkpoint", run / "checkpoint.pt", "--sample", "china",
                               "--kernels", "reference", "--output", tmp_path), "is a directory")
    assert blocker.read_text() == "x"


def test_force_restarts_a_run(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", *TINY, "--epochs", 1, "--train-limit", 16, "--test-limit", 16, "--output", out]
    assert run_main(capsys, *args)[0] == 0
    code, stdout, err = run_main(capsys, *args, "--force")
    assert code == 0, err
    assert load_checkpoint(str(out / "checkpoint.pt"))["epoch"] == 1


def test_argparse_errors_exit_2(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--epochs", "0"])
    assert info.value.code == 2
    assert "positive integer" in capsys.readouterr().err


@pytest.mark.parametrize("option,value,message", [
    ("--label-smoothing", "2", "--label-smoothing must be in [0, 1)"),
    ("--label-smoothing", "-0.5", "--label-smoothing must be in [0, 1)"),
    ("--weight-decay", "-1", "--weight-decay must be >= 0"),
    ("--warmup-epochs", "-1", "--warmup-epochs must be >= 0"),
    ("--clip-grad", "nan", "--clip-grad must be >= 0"),
    ("--drop-path", "1.5", "--drop-path must be in [0, 1)"),
    ("--lr", "inf", "--lr must be > 0"),
])
def test_bad_training_values_fail_before_anything_is_written(tmp_path, capsys, option, value, message):
    out = tmp_path / "run"
    assert_main_error(run_main(capsys, "train", *TINY, option, value, "-o", out), message)
    assert not out.exists()


@pytest.mark.parametrize("args,fragment", [
    (["train", "--seed", "-1"], "--seed: expected a non-negative integer"),
    (["train", "--workers", "-2"], "--workers: expected a non-negative integer"),
    (["eval", "--checkpoint", "x.pt", "--test-limit", "-3"], "--test-limit: expected a non-negative integer"),
    (["bench", "--warmup", "0"], "--warmup: expected a positive integer"),
    (["bench", "--max-seconds", "nan"], "--max-seconds: expected a positive number of seconds"),
    (["bench", "--max-seconds", "-1"], "--max-seconds: expected a positive number of seconds"),
])
def test_negative_counts_are_argument_errors(capsys, args, fragment):
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == 2
    assert fragment in capsys.readouterr().err


def test_help_texts_have_no_format_escapes(capsys):
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "20% held out" in out and "%%" not in out


def test_a_folder_named_digits_is_a_folder(tmp_path, capsys, monkeypatch):
    """--data digits: the folder ./digits where there is one, else the bundled digits."""
    make_folder(tmp_path / "digits")
    monkeypatch.chdir(tmp_path)
    code, stdout, err = run_main(capsys, "train", "--data", "digits", "--img-size", 32, "--epochs", 1,
                                 "--batch-size", 4, "--kernels", "reference", "--output", tmp_path / "run")
    assert code == 0, err
    assert "2 classes, 32x32x3" in stdout, stdout
    assert load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))["data"]["source"] == str(tmp_path / "digits")
    monkeypatch.chdir(tmp_path / "digits")                       # no ./digits here: the bundled set
    code, stdout, err = run_main(capsys, "train", "--data", "digits", *TINY, "--epochs", 1,
                                 "--output", tmp_path / "run2")
    assert code == 0, err
    assert "10 classes, 32x32x1" in stdout, stdout


def test_eval_on_another_folder_scores_every_image(tmp_path, capsys):
    data = make_folder(tmp_path / "data")
    out = tmp_path / "run"
    code, _, err = run_main(capsys, "train", "--data", data, "--img-size", 32, "--epochs", 1, "--batch-size", 4,
                            "--kernels", "reference", "--output", out)
    assert code == 0, err
    ckpt = out / "checkpoint.pt"
    held = run_main(capsys, "eval", "--checkpoint", ckpt, "--data", data, "--kernels", "reference")
    assert held[0] == 0 and "/2)" in held[1], held                # the training folder: its held-out split
    test = make_folder(tmp_path / "test", n=3)
    code, stdout, err = run_main(capsys, "eval", "--checkpoint", ckpt, "--data", test, "--kernels", "reference")
    assert code == 0, err
    assert "/6)" in stdout, stdout                                 # another folder: all 6 images
    code, stdout, err = run_main(capsys, "eval", "--checkpoint", ckpt, "--data", test, "--test-limit", 2,
                                 "--kernels", "reference")
    assert code == 0 and "/2)" in stdout, (stdout, err)
    single = make_folder(tmp_path / "single", n=1)                 # one image per class is enough
    code, stdout, err = run_main(capsys, "eval", "--checkpoint", ckpt, "--data", single, "--kernels", "reference")
    assert code == 0 and "/2)" in stdout, (stdout, err)
    split = make_folder(tmp_path / "split", layout="split", n=2)   # train/ and val/: its val/
    code, stdout, err = run_main(capsys, "eval", "--checkpoint", ckpt, "--data", split, "--kernels", "reference")
    assert code == 0 and "/4)" in stdout, (stdout, err)
    (tmp_path / "other" / "a").mkdir(parents=True)
    (tmp_path / "other" / "b").mkdir(parents=True)
    for name in ("a", "b"):
        Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "other" / name / "0.png")
    assert_main_error(run_main(capsys, "eval", "--checkpoint", ckpt, "--data", tmp_path / "other",
                               "--kernels", "reference"), "has classes ['a', 'b']", "['left', 'right']")


def test_ablation_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "abl"
    (out / "raster").mkdir(parents=True)
    (out / "raster" / "checkpoint.pt").write_bytes(b"old")
    result = run_main(capsys, "ablation", *TINY, "--epochs", 1, "--output", out)
    assert_main_error(result, "already holds an ablation run (raster)", "--force")
    assert "--resume" not in result[2]
    assert not (out / "quadtree").exists()


def test_pictures_are_png_only(trained_run, tmp_path, capsys):
    run, _ = trained_run
    for args in (["eval", "--checkpoint", run / "checkpoint.pt"],
                 ["visualize", "--checkpoint", run / "checkpoint.pt", "--sample", "china"]):
        assert_main_error(run_main(capsys, *args, "--kernels", "reference", "-o", tmp_path / "out.pdf"),
                          "out.pdf", "give a .png file name")
    assert not (tmp_path / "out.pdf").exists()


def test_incomplete_checkpoint_is_a_clean_error(trained_run, tmp_path, capsys):
    run, _ = trained_run
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    del state["data"]
    broken = tmp_path / "broken.pt"
    torch.save(state, broken)
    assert_main_error(run_main(capsys, "eval", "--checkpoint", broken, "--kernels", "reference"),
                      "is incomplete", "'data'")

    def variant(name, edit, resume=False, *fragments):
        """The trained checkpoint edited; eval (or resume, in a copy of the run) fails in one line."""
        state = torch.load(run / "checkpoint.pt", weights_only=True)
        edit(state)
        folder = tmp_path / name
        folder.mkdir()
        torch.save(state, folder / "checkpoint.pt")
        args = ["train", "--resume", "-o", folder] if resume else \
            ["eval", "--checkpoint", folder / "checkpoint.pt", "--kernels", "reference"]
        assert_main_error(run_main(capsys, *args), *fragments)

    variant("version", lambda st: st.update(version="1"), False, "format version '1'")
    variant("data", lambda st: st["data"].update(colour=True), False, "malformed 'data' or 'train'")
    variant("train", lambda st: st["train"].update(epochs=0), False, "malformed 'data' or 'train'")
    variant("classes", lambda st: st["config"].update(num_classes=3), False, "has 3 classes, its data 10")

    def shrink(st):   # what a user might strip to keep only the weights: still evaluates
        for key in ("optimizer", "scheduler"):
            del st[key]
        st["train"]["epochs"] = 3
    variant("shrunk", shrink, True, "cannot resume a run", "'optimizer', 'scheduler'")
    shrunk = tmp_path / "shrunk" / "checkpoint.pt"
    assert evaluate_checkpoint(str(shrunk), kernels="reference")["count"] > 0
    variant("ema", lambda st: st["train"].update(ema_decay=0.9, epochs=3), True, "no usable 'ema'")
    variant("optimizer", lambda st: st.update(optimizer={"state": {}, "param_groups": []}, train=dict(
        st["train"], epochs=3)), True, "training state does not fit the run")


def test_one_epoch_run_still_decays_its_learning_rate(tmp_path):
    """The default one-epoch warm-up takes at most half of a run: a one-epoch run peaks
    half-way and ends near the minimum learning rate."""
    cfg = TrainConfig(kernels="reference", epochs=1, batch_size=16, train_limit=64, test_limit=16)
    run_training(cfg, str(tmp_path / "run"), log=lambda line: None)
    _, rows = read_metrics(tmp_path / "run")
    assert float(rows[-1]["lr"]) < 0.5 * cfg.lr, rows


def test_images_deeper_than_8_bits_keep_their_scale(tmp_path):
    from quadmamba.data import load_image

    ramp = np.linspace(0, 1, 64)[None, :] * np.ones((64, 1))
    Image.fromarray((ramp * 65535).astype(np.uint16)).save(tmp_path / "g16.png")          # 16-bit grey
    Image.fromarray(ramp.astype(np.float32), mode="F").save(tmp_path / "f.tiff")        # float in [0, 1]
    Image.fromarray((ramp * 4 - 2).astype(np.float32), mode="F").save(tmp_path / "w.tiff")  # other range
    Image.fromarray((ramp * 255).astype(np.uint8)).save(tmp_path / "g8.png")             # the 8-bit twin
    want = load_image(str(tmp_path / "g8.png"), 32, 1)
    for name in ("g16.png", "f.tiff", "w.tiff"):
        with Image.open(tmp_path / name) as img:
            assert img.mode in ("I;16", "I", "F"), (name, img.mode)
        got = load_image(str(tmp_path / name), 32, 1)
        assert float((got - want).abs().max()) <= 2 / 255, name
        rgb = load_image(str(tmp_path / name), 32, 3)
        assert rgb.shape == (3, 32, 32) and torch.equal(rgb[0], rgb[2]), name


def test_stratified_split_holds_out_each_class_in_proportion():
    from quadmamba.data import stratified_split

    labels = np.array([0] * 50 + [1] * 11 + [2] * 3 + [3] * 1 + [4] * 2)
    train, held = stratified_split(labels, 0.2, seed=5)
    assert len(np.intersect1d(train, held)) == 0 and sorted(np.concatenate([train, held])) == list(range(len(labels)))
    for c, n in zip(range(5), (50, 11, 3, 1, 2)):
        want = 0 if n < 2 else min(max(round(0.2 * n), 1), n - 1)
        assert (labels[held] == c).sum() == want, (c, n)
    again = stratified_split(labels, 0.2, seed=5)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], held)
    assert not np.array_equal(stratified_split(labels, 0.2, seed=6)[1], held)


def test_digits_are_normalised_with_training_statistics():
    from quadmamba.data import digits_datasets

    train, test, spec = digits_datasets(32, seed=0)
    assert float(train.images.mean()) == pytest.approx(0.0, abs=1e-5)
    assert float(train.images.std()) == pytest.approx(1.0, abs=1e-4)
    assert len(test) == 359 and spec.mean[0] > 0 and spec.std[0] > 0
