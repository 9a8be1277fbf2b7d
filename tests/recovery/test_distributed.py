"""Distillation and calibration on several processes (torchrun, gloo): the same result as one process.

Each multi-process test launches ``python -m torch.distributed.run --standalone --nproc_per_node=2``
on a script that saves what every process got; the test compares those files with a run in
this process. One thread per process: two processes of two OpenMP threads on two cores slow
each other down by an order of magnitude.
"""

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import convtool
from convtool import InvalidOptionError
from convtool.recovery.sampling import Sampler as _Sampler, StepIndices as _StepIndices
from convtool.recovery.distributed import World, process_group
from convtool.errors import DistributedError, OutputExistsError
from convtool.io import Checkpoints

ROOT = Path(__file__).resolve().parents[2]


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4)).eval()


def data() -> torch.Tensor:
    return torch.randn(96, 3, 8, 8, generator=torch.Generator().manual_seed(1))


class Rows(Dataset):
    """A map-style data set of single samples, as a folder reader gives them."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.x[i]


def launch(script: str, tmp_path: Path, processes: int = 2, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``script`` under torchrun with ``processes`` CPU processes; it writes into ``tmp_path``."""
    file = tmp_path / "job.py"
    file.write_text(textwrap.dedent(script))
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}", str(file), str(tmp_path)],
        capture_output=True, text=True, timeout=900, env=environment, cwd=ROOT,  # room for a busy machine
    )


def same_weights(a: dict, b: dict, **tolerance) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **tolerance, msg=lambda m, key=key: f"{key}: {m}")


JOB = """
    import sys
    from pathlib import Path

    import torch

    import convtool
    from convtool.recovery.distributed import process_group
    from torch.utils.data import DataLoader

    from tests.recovery.test_distributed import Rows, data, tiny

    out = Path(sys.argv[1])
    torch.set_num_threads(1)
    teacher = tiny()
    x = data()
    student = convtool.separate(teacher, x[:1], rank=1).model
    with process_group(cuda=x.is_cuda) as world:
        r = world.rank
        tensors = convtool.distill(student, teacher, x, steps=6, batch_size=16, lr=3e-3, features=True)
        rows = convtool.distill(student, teacher, Rows(x), steps=6, batch_size=16, lr=3e-3, features=True, workers=1)
        # calibration: each process refits on its own half; the normal equations are summed over both
        half = x[r * 48:(r + 1) * 48]
        calibrated = convtool.separate(teacher, x[:1], rank=1, calibration=DataLoader(Rows(half), batch_size=16),
                                       recalibrate_bn=True)
        both = convtool.separate(teacher, x[:1], rank=1, calibration=DataLoader(Rows(half), batch_size=16), refit="both")
        torch.save(dict(tensors=tensors.model.state_dict(), tensor_losses=tensors.losses, processes=tensors.processes,
                        rows=rows.model.state_dict(), calibrated=calibrated.model.state_dict(), both=both.model.state_dict()),
                   out / f"rank{r}.pt")
"""


def test_two_processes_give_what_one_process_gives(tmp_path):
    run = launch(JOB, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    teacher, x = tiny(), data()
    student = convtool.separate(teacher, x[:1], rank=1).model
    one = convtool.distill(student, teacher, x, steps=6, batch_size=16, lr=3e-3, features=True)
    rows = convtool.distill(student, teacher, Rows(x), steps=6, batch_size=16, lr=3e-3, features=True)
    assert ranks[0]["processes"] == 2 and one.processes == 1
    for got in ranks:  # every process ends with the one-process model, to float rounding
        same_weights(got["tensors"], one.model.state_dict(), rtol=1e-4, atol=1e-5)
        same_weights(got["rows"], rows.model.state_dict(), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(torch.tensor(got["tensor_losses"]), torch.tensor(one.losses), rtol=1e-5, atol=1e-6)
    for key in ranks[0]["tensors"]:  # and the processes agree exactly: DDP keeps them in step
        assert torch.equal(ranks[0]["tensors"][key], ranks[1]["tensors"][key])
    # A Dataset read sample by sample is the same data as the tensor: the same run.
    same_weights(rows.model.state_dict(), one.model.state_dict(), rtol=1e-4, atol=1e-5)

    # Calibration: both processes install the same refit, and the first layer (whose inputs no
    # refit changes) gets exactly the one-process least squares over all the data; the BatchNorm
    # after it, re-estimated on each process's share, gets the statistics of all of it.
    calibrated = convtool.separate(teacher, x[:1], rank=1, calibration=DataLoader(TensorDataset(x), batch_size=16),
                                   recalibrate_bn=True)
    for key in ranks[0]["calibrated"]:
        assert torch.equal(ranks[0]["calibrated"][key], ranks[1]["calibrated"][key])
    for key in ranks[0]["both"]:  # both halves, refit on every process's data, agree too
        assert torch.equal(ranks[0]["both"][key], ranks[1]["both"][key]), key
    first = [k for k in ranks[0]["calibrated"] if k.startswith(("0.", "1.running"))]
    assert first
    same_weights({k: ranks[0]["calibrated"][k] for k in first}, {k: calibrated.model.state_dict()[k] for k in first},
                 rtol=1e-4, atol=1e-5)


def test_each_process_takes_its_slice_of_the_same_global_batch():
    whole = list(_StepIndices(100, 12, seed=5, world=World(), start=0, steps=4))
    shares = [list(_StepIndices(100, 12, seed=5, world=World(r, 3), start=0, steps=4)) for r in range(3)]
    for step, batch in enumerate(whole):
        assert torch.equal(torch.cat([share[step] for share in shares]), batch)
    resumed = list(_StepIndices(100, 12, seed=5, world=World(1, 3), start=2, steps=4))
    assert all(torch.equal(a, b) for a, b in zip(resumed, shares[1][2:])) and len(resumed) == 2


def test_a_batch_that_does_not_split_evenly_is_refused():
    with pytest.raises(InvalidOptionError, match="multiple of 3"):
        _Sampler(torch.randn(40, 3), 16, 0, World(0, 3), 0, 5, 0, False)


def test_batches_of_an_iterable_are_dealt_out_in_turn_and_resume_where_they_stopped():
    batches = [torch.full((2, 1), float(i)) for i in range(5)]
    seen = lambda world, start: [float(b[0][0, 0]) for b, _ in zip(_Sampler(batches, 2, 0, world, start, 9, 0, False), range(4))]  # noqa: E731
    assert seen(World(0, 2), 0) == [0, 2, 4, 1] and seen(World(1, 2), 0) == [1, 3, 0, 2]
    assert seen(World(1, 2), 1) == [3, 0, 2, 4]
    loader = DataLoader(batches, batch_size=None)  # a generic iterable, read lazily
    assert [float(b[0][0, 0]) for b, _ in zip(_Sampler(loader, 2, 0, World(1, 2), 1, 9, 0, False), range(3))] == [3, 0, 2]


@pytest.mark.parametrize("dropout", [False, True], ids=["plain", "dropout"])
def test_a_killed_run_resumes_bit_for_bit(tmp_path, dropout):
    """With dropout the student draws from torch's generator each step: the loader must not draw from it too
    (making its iterator once took a seed from it, a draw the resumed run did not repeat)."""
    teacher, x = tiny(), data()
    student = convtool.separate(teacher, x[:1], rank=1).model
    if dropout:
        student = nn.Sequential(*student[:-1], nn.Dropout(0.2), student[-1])
    whole = convtool.distill(student, teacher, Rows(x), steps=8, batch_size=16, lr=3e-3,
                             checkpoints=Checkpoints(tmp_path / "a", every=3))

    def killed(step, loss):
        if step == 5:
            raise KeyboardInterrupt  # the process dies after step 5: the newest checkpoint is step 3's
    with pytest.raises(KeyboardInterrupt):
        convtool.distill(student, teacher, Rows(x), steps=8, batch_size=16, lr=3e-3, on_step=killed,
                         checkpoints=Checkpoints(tmp_path / "b", every=3))
    assert [step for step, _ in Checkpoints(tmp_path / "b", resume=True).found()] == [3]
    resumed = convtool.distill(student, teacher, Rows(x), steps=8, batch_size=16, lr=3e-3,
                               checkpoints=Checkpoints(tmp_path / "b", every=3, resume=True))
    assert resumed.resumed_from == 3 and resumed.losses == whole.losses
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert [step for step, _ in Checkpoints(tmp_path / "b", resume=True).found()] == [6, 8]  # the two newest kept


def test_checkpoints_refuse_other_settings_and_an_earlier_run(tmp_path):
    teacher, x = tiny(), data()
    student = convtool.separate(teacher, x[:1], rank=1).model
    convtool.distill(student, teacher, x, steps=2, batch_size=8, checkpoints=Checkpoints(tmp_path, every=1))
    with pytest.raises(OutputExistsError, match="--resume"):
        Checkpoints(tmp_path)
    with pytest.raises(InvalidOptionError, match="lr 0.001 .now 0.01"):
        convtool.distill(student, teacher, x, steps=2, batch_size=8, lr=1e-2, checkpoints=Checkpoints(tmp_path, resume=True))
    with pytest.raises(InvalidOptionError, match="samples"):
        convtool.distill(student, teacher, x[:50], steps=2, batch_size=8, checkpoints=Checkpoints(tmp_path, resume=True))
    fresh = convtool.distill(student, teacher, x, steps=2, batch_size=8, checkpoints=Checkpoints(tmp_path, force=True))
    # started over: the earlier run's checkpoints are gone, this run saved at its end only
    assert fresh.resumed_from == 0 and [s for s, _ in Checkpoints(tmp_path, resume=True).found()] == [2]


def test_a_group_that_cannot_form_is_one_clear_error(monkeypatch):
    # A port bound for the whole test and never listening: connections are refused, and nothing
    # else (a second copy of this suite running beside it) can take the port meanwhile.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        for key, value in dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)).items():
            monkeypatch.setenv(key, value)
        with pytest.raises(DistributedError, match=rf"2 processes could not form at 127.0.0.1:{port} within 10 s"):
            with process_group(timeout=10):
                pass
    assert not torch.distributed.is_initialized()


def test_amp_needs_cuda():
    teacher = tiny()
    with pytest.raises(InvalidOptionError, match="CUDA"):
        convtool.distill(teacher, teacher, data(), steps=1, amp=True)


@pytest.mark.gpu
def test_two_gpu_processes_with_nccl(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    script = JOB.replace("teacher = tiny()", "teacher = tiny().cuda()").replace("x = data()", "x = data().cuda()")
    run = launch(script, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for key in ranks[0]["tensors"]:
        assert torch.equal(ranks[0]["tensors"][key].cpu(), ranks[1]["tensors"][key].cpu())


PLANS = """
    import sys
    from pathlib import Path

    import torch

    import convtool
    from convtool.recovery.distributed import process_group

    from tests.recovery.test_distributed import data, tiny

    torch.set_num_threads(1)
    teacher, x = tiny(), data()
    with process_group() as world:
        try:  # each process asks for another rank: their refits would sum different layers' equations
            convtool.separate(teacher, x[:1], rank=1 + world.rank, calibration=x[world.rank * 48:(world.rank + 1) * 48])
            answer = "separated"
        except convtool.InvalidOptionError as error:
            answer = str(error)
        Path(sys.argv[1], f"rank{world.rank}.txt").write_text(answer)
"""


def test_processes_that_plan_differently_are_refused_before_the_refit(tmp_path):
    run = launch(PLANS, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    for r in range(2):
        assert "chose different ranks" in (tmp_path / f"rank{r}.txt").read_text()


RESUME_APART = """
    import sys
    from pathlib import Path

    import torch

    import convtool
    from convtool.recovery.distributed import process_group
    from convtool.io import Checkpoints

    from tests.recovery.test_distributed import data, tiny

    torch.set_num_threads(1)
    out = Path(sys.argv[1])
    teacher, x = tiny(), data()
    student = convtool.separate(teacher, x[:1], rank=1).model
    with process_group() as world:
        folder = out / f"ck{world.rank}"  # as on two machines without a shared disk: only the first one's holds checkpoints
        def killed(step, loss):
            if step == 3:
                raise KeyboardInterrupt  # both processes stop after step 3: the first machine's checkpoint is step 2's
        try:
            convtool.distill(student, teacher, x, steps=6, batch_size=16, on_step=killed, checkpoints=Checkpoints(folder, every=2))
        except KeyboardInterrupt:
            pass
        try:
            convtool.distill(student, teacher, x, steps=6, batch_size=16, checkpoints=Checkpoints(folder, every=2, resume=True))
            answer = "resumed"
        except convtool.InvalidOptionError as error:
            answer = str(error)
        (out / f"rank{world.rank}.txt").write_text(answer)
"""


def test_processes_that_find_different_checkpoints_are_refused(tmp_path):
    run = launch(RESUME_APART, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    for r in range(2):
        assert "found different checkpoints" in (tmp_path / f"rank{r}.txt").read_text()
