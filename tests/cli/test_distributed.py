"""Data-parallel training (quadmamba.distributed): the batch plan, the launch environment,
the equivalence of a two-process step with a one-process step, and torchrun end to end."""
import os
import re
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from cli_testing import PYTHON_DIR, TINY, make_folder, run_cli
from quadmamba.distributed import (Group, epoch_batches, global_steps, launched_group, leave, process_device,
                                   shard)
from quadmamba.train import TrainConfig, evaluate, evaluate_checkpoint, load_checkpoint, train_one_epoch


# ---------------------------------------------------------------------------------------------
# the batch plan and the shards
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [0, 1, 5, 16, 17, 23])
@pytest.mark.parametrize("batch", [4, 5, 8])
def test_processes_split_every_global_batch(world, n, batch):
    order = list(torch.randperm(n, generator=torch.Generator().manual_seed(n)).tolist())
    plans = [epoch_batches(order, batch, Group(r, world, r)) for r in range(world)]
    steps = global_steps(n, batch, world)
    assert all(len(p) == steps for p in plans)
    for i in range(steps):
        parts = [p[i] for p in plans]
        assert sum(parts, []) == order[i * batch:(i + 1) * batch]   # the global batch, in order
        sizes = [len(part) for part in parts]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1, sizes
    kept = sum(len(b) for p in plans for b in p)
    dropped = n - kept
    assert dropped == (n % batch if n % batch < world else 0)   # only a last batch too small to split
    if world == 1:   # one process: every image, in batches of `batch` and a last partial one
        assert plans[0] == [order[i:i + batch] for i in range(0, n, batch)]


def test_the_global_batch_must_cover_the_processes():
    with pytest.raises(ValueError, match="--batch-size 2 is the global batch.*processes \\(3\\)"):
        epoch_batches(range(10), 2, Group(0, 3, 0))
    with pytest.raises(ValueError, match="--batch-size 0 is the global batch.*processes \\(1\\)"):
        global_steps(10, 0)
    with pytest.raises(ValueError, match="the number of processes must be >= 1, got 0"):
        global_steps(10, 4, 0)


@pytest.mark.parametrize("world", [1, 2, 3])
def test_shards_cover_every_item_once(world):
    items = list(range(10))
    parts = [shard(items, Group(r, world, r)) for r in range(world)]
    assert sorted(part[i] for part in parts for i in range(len(part))) == items


def test_launch_environment(monkeypatch):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert launched_group() == Group()
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert launched_group() == Group()
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert launched_group() == Group(2, 4, 0) and not launched_group().main
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="RANK 4 / WORLD_SIZE 4"):
        launched_group()
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ValueError, match="RANK must be an integer, got 'two'"):
        launched_group()
    monkeypatch.delenv("LOCAL_RANK")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(ValueError, match="LOCAL_RANK must be an integer, got None"):
        launched_group()


def test_device_of_each_process():
    alone, pair = Group(), Group(1, 2, 1)
    assert process_device("cuda:3", alone) == "cuda:3"   # one process: as given
    assert process_device("cpu", pair) == "cpu"
    with pytest.raises(ValueError, match="--device cuda:0: under torchrun each process takes cuda:LOCAL_RANK"):
        process_device("cuda:0", pair)
    if not torch.cuda.is_available():
        assert process_device("auto", pair) == "cpu"
        with pytest.raises(ValueError, match="LOCAL_RANK 1 has no GPU"):
            process_device("cuda", pair)


# ---------------------------------------------------------------------------------------------
# two processes take the step one process takes
# ---------------------------------------------------------------------------------------------
def _linear_run(group: Group, store: str, batch: int, out: dict):
    """train_one_epoch of a linear classifier on fixed data (no randomness), SGD with momentum,
    in ``group``; rank 0 puts the final weights and the epoch's stats in ``out``."""
    torch.manual_seed(0)
    images = torch.randn(23, 1, 4, 4)
    labels = torch.randint(0, 3, (23,))
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    trained = model
    if group.world > 1:
        torch.distributed.init_process_group("gloo", init_method=f"file://{store}", rank=group.rank,
                                             world_size=group.world)
        trained = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    order = torch.randperm(23, generator=torch.Generator().manual_seed(1)).tolist()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels),
                                         batch_sampler=epoch_batches(order, batch, group))
    cfg = TrainConfig(label_smoothing=0.1, clip_grad=0.5)
    stats = train_one_epoch(trained, loader, optimizer, scheduler, cfg, torch.device("cpu"), None, "test",
                            transform=lambda x: x, group=group)
    test = shard(torch.utils.data.TensorDataset(images, labels), group)
    result = evaluate(model, torch.utils.data.DataLoader(test, batch_size=4), torch.device("cpu"), 3, group=group)
    if group.main:
        out.update(weights={k: v.clone() for k, v in model.state_dict().items()}, stats=stats, eval=result)
    if group.world > 1:
        del trained   # the DDP wrapper holds the group (see distributed.leave)
        leave()


def _worker(rank, world, store, batch, queue_path):
    out = {}
    _linear_run(Group(rank, world, rank), store, batch, out)
    if rank == 0:
        torch.save(out, queue_path)


@pytest.mark.parametrize("world,batch", [(2, 5), (3, 4)])
def test_processes_take_the_one_process_step(tmp_path, world, batch):
    """Uneven local batches (5 = 3 + 2; 4 = 2 + 1 + 1, and a last batch of 3 = 1 + 1 + 1): the
    weights after an epoch, the logged loss/accuracy and the sharded evaluation equal one
    process's."""
    alone = {}
    _linear_run(Group(), "", batch, alone)
    torch.multiprocessing.spawn(_worker, args=(world, str(tmp_path / "store"), batch, str(tmp_path / "out.pt")),
                                nprocs=world)
    group_out = torch.load(tmp_path / "out.pt", weights_only=False)
    for name, value in alone["weights"].items():
        torch.testing.assert_close(group_out["weights"][name], value, rtol=1e-5, atol=1e-6)
    assert group_out["stats"]["train_loss"] == pytest.approx(alone["stats"]["train_loss"], rel=1e-6)
    assert group_out["stats"]["train_acc"] == alone["stats"]["train_acc"]
    for key in ("correct", "count"):
        assert group_out["eval"][key] == alone["eval"][key]
    assert torch.equal(group_out["eval"]["confusion"], alone["eval"]["confusion"])
    assert group_out["eval"]["loss"] == pytest.approx(alone["eval"]["loss"], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# torchrun end to end
# ---------------------------------------------------------------------------------------------
def _torchrun(*args, nproc=2, timeout=300):
    env = dict(os.environ, OMP_NUM_THREADS="1", MPLBACKEND="Agg")
    env["PYTHONPATH"] = os.path.abspath(PYTHON_DIR) + os.pathsep + env.get("PYTHONPATH", "")
    env.pop("QUADMAMBA_TRACEBACK", None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc-per-node={nproc}", "-m", "quadmamba", *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout)


def test_torchrun_trains_one_run(tmp_path):
    out = tmp_path / "run"
    proc = _torchrun("train", *TINY, "--output", out)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # process 0 alone logs, once
    assert proc.stdout.count("x 2 processes") == 1, proc.stdout
    assert len(re.findall(r"^epoch +\d/2 ", proc.stdout, re.M)) == 2, proc.stdout
    assert "Grad strides" not in proc.stderr
    state = load_checkpoint(str(out / "checkpoint.pt"))
    assert state["epoch"] == 2 and len(state["metrics"]) == 2
    logged = re.search(r"held-out accuracy: [\d.]+% \((\d+)/(\d+)\)", proc.stdout)
    # the group's sharded evaluation counted every held-out image once: one process agrees
    r = evaluate_checkpoint(str(out / "checkpoint.pt"), kernels="reference", test_limit=32)
    assert (r["correct"], r["count"]) == (int(logged.group(1)), int(logged.group(2))) and r["count"] == 32
    # eval under torchrun: the same totals, printed once
    proc = _torchrun("eval", "--checkpoint", out / "checkpoint.pt", "--kernels", "reference",
                     "--test-limit", "32", "--output", tmp_path / "cm.png")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("top-1") == 1 and f"({r['correct']}/32)" in proc.stdout, proc.stdout
    # same settings and seed, one process: the same number of optimizer steps and schedule
    proc = run_cli("train", *TINY, "--output", tmp_path / "alone")
    assert proc.returncode == 0, proc.stderr
    alone = load_checkpoint(str(tmp_path / "alone" / "checkpoint.pt"))
    assert [row["lr"] for row in alone["metrics"]] == [row["lr"] for row in state["metrics"]]
    assert alone["scheduler"]["last_epoch"] == state["scheduler"]["last_epoch"]


def test_torchrun_errors(tmp_path):
    proc = _torchrun("train", *TINY, "--batch-size", "1", "--output", tmp_path / "run")
    assert proc.returncode != 0
    assert "quadmamba: error: --batch-size 1 is the global batch; it must be at least the number of processes (2)" \
        in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()
    proc = _torchrun("train", *TINY, "--device", "cuda:0", "--output", tmp_path / "run")
    assert proc.returncode != 0 and "each process takes cuda:LOCAL_RANK" in proc.stderr, proc.stderr


def test_each_process_verifies_its_share_of_a_folder(tmp_path, monkeypatch):
    """Under torchrun the image files are verified once in the group: the process whose share
    holds a broken file fails (and torchrun stops the group), the others do not read it."""
    from quadmamba.data import DataError, scan_folder

    data = make_folder(tmp_path / "data", corrupt="left/broken.png")
    failed = []
    for rank in range(3):
        monkeypatch.setenv("WORLD_SIZE", "3")
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
        try:
            scan_folder(str(data))
        except DataError as exc:
            assert "broken.png" in str(exc)
            failed.append(rank)
    assert len(failed) == 1, failed
