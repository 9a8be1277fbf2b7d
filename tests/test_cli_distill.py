"""`convtool distill`: one process and torchrun, checkpoints and resume, and what it refuses.

Multi-process runs go through ``python -m torch.distributed.run --standalone`` (gloo on the
CPU), one OpenMP thread per process.
"""

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import convtool
from convtool.cli import main
from convtool.io import write_model

from .test_cli import ARCHS  # the same small() the separate tests build

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def project(tmp_path):
    """The original's weights and code, its separated model (a pickled GraphModule), and a folder of .npy shards."""
    (tmp_path / "archs.py").write_text(ARCHS)
    namespace: dict = {}
    exec(ARCHS, namespace)
    model = namespace["small"]().eval()
    torch.save(model.state_dict(), tmp_path / "small.pt")
    x = torch.randn(64, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    write_model(convtool.separate(model, x[:2], rank=1).model, tmp_path / "sep.pt", (x[:2],))
    (tmp_path / "shards").mkdir()
    for i in range(4):
        np.save(tmp_path / "shards" / f"part{i}.npy", x[i * 16:(i + 1) * 16].numpy())
    return tmp_path


def args(project: Path, output: str, *extra) -> list[str]:
    return ["distill", str(project / "sep.pt"), "--allow-pickle", "--teacher", str(project / "small.pt"),
            "--arch", f"{project / 'archs.py'}:small", "--data", str(project / "shards"), "--batch-size", "16",
            "--workers", "0", "-o", str(project / output), *map(str, extra)]


def run(*arguments):
    return CliRunner().invoke(main, [str(a) for a in arguments], catch_exceptions=False)


def torchrun(arguments: list[str], processes: int = 2, popen: bool = False, env: dict | None = None):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "convtool", *arguments]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    if popen:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=environment,
                                start_new_session=True)
    # Room for a machine busy with other work: the tests assert what the processes did, not how fast.
    return subprocess.run(command, capture_output=True, text=True, timeout=900, env=environment)


def weights(path: Path) -> dict:
    return torch.load(path, weights_only=False).state_dict()


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_one_process_writes_the_model_and_leaves_inputs_alone(project):
    before = [digest(project / f) for f in ("sep.pt", "small.pt", "shards/part0.npy")]
    result = run(*args(project, "one.pt", "--steps", "4"))
    assert result.exit_code == 0, result.output
    assert "distilled 4 steps on 1 process" in result.stderr and "wrote" in result.stderr
    assert [digest(project / f) for f in ("sep.pt", "small.pt", "shards/part0.npy")] == before
    model = torch.load(project / "one.pt", weights_only=False)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 4)


def test_two_processes_match_one_and_only_the_first_writes_and_prints(project):
    # One process launched the same way (one thread, as torchrun gives each process): the refit
    # before the first step solves least squares whose conditioning magnifies the rounding of a
    # different thread count far beyond the tolerance, which is not what this compares.
    one = torchrun(args(project, "one.pt", "--steps", "12"), processes=1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = torchrun(args(project, "two.pt", "--steps", "12", "--checkpoint-dir", project / "ck", "--checkpoint-every", "5"))
    assert two.returncode == 0, two.stderr[-3000:]
    output = two.stdout + two.stderr
    assert output.count("wrote ") == 1 and output.count("distilled 12 steps on 2 processes") == 1
    assert sorted(p.name for p in (project / "ck").iterdir()) == ["step-00000010.pt", "step-00000012.pt"]  # no temporary left
    a, b = weights(project / "one.pt"), weights(project / "two.pt")
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-5)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun's workers run in sessions of their own, so killpg misses them)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


@pytest.mark.slow
def test_a_killed_torchrun_resumes_bit_for_bit(project):
    steps = 600
    common = ["--steps", steps, "--checkpoint-every", 5]
    whole = torchrun(args(project, "whole.pt", *common, "--checkpoint-dir", project / "ck-whole"))
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = torchrun(args(project, "resumed.pt", *common, "--checkpoint-dir", project / "ck"), popen=True)
    deadline = time.monotonic() + 600  # a wait for the first checkpoint, not a claim on speed
    while not list((project / "ck").glob("step-*.pt")) and time.monotonic() < deadline and killed.poll() is None:
        time.sleep(0.02)
    for pid in [*reversed(descendants(killed.pid)), killed.pid]:  # SIGKILL: no handler runs, as when a node dies
        os.kill(pid, signal.SIGKILL)
    killed.wait()
    time.sleep(0.5)
    saved = sorted(int(p.stem.split("-")[1]) for p in (project / "ck").glob("step-*.pt"))
    assert saved and saved[-1] < steps and not (project / "resumed.pt").exists(), saved
    resumed = torchrun(args(project, "resumed.pt", *common, "--checkpoint-dir", project / "ck", "--resume"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"(resumed at step {saved[-1]})" in resumed.stderr
    a, b = weights(project / "whole.pt"), weights(project / "resumed.pt")
    assert all(torch.equal(a[key], b[key]) for key in a)


def test_a_group_that_cannot_form_is_one_line_and_exit_2(project):
    # The port stays bound, never listening, for the whole test: connections to it are refused, and
    # no other program (a second copy of this suite, its torchrun) can take it meanwhile.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2",
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        result = subprocess.run([sys.executable, "-m", "convtool", *args(project, "x.pt", "--steps", "2", "--timeout", "10")],
                                capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not form at 127.0.0.1" in lines[0] and "Traceback" not in result.stderr
    assert not (project / "x.pt").exists()


def test_an_image_folder_is_streamed(project):
    from PIL import Image

    folder = project / "images"
    (folder / "a").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (10, 10, 3), dtype=np.uint8)).save(folder / "a" / f"{i}.png")
    result = run(*args(project, "img.pt", "--steps", "3", "--batch-size", "4"), "--data", folder, "--image-size", "8,8",
                 "--mean", "0.5", "--std", "0.25", "--workers", "1")
    assert result.exit_code == 0, result.output
    assert (project / "img.pt").exists()


@pytest.mark.parametrize("extra, message", [
    (["--resume"], "--resume needs --checkpoint-dir"),
    (["--checkpoint-every", "3"], "--checkpoint-every needs --checkpoint-dir"),
    (["--amp"], "--amp needs --device cuda"),
    (["--data", "/nonexistent"], "does not exist"),
    (["--image-size", "8,8"], "--image-size applies to a folder of images"),
])
def test_bad_options_are_one_line_and_exit_2(project, extra, message):
    result = run(*args(project, "out.pt", "--steps", "2"), *extra)
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (project / "out.pt").exists()


def test_it_never_overwrites_or_unpickles_without_being_asked(project):
    (project / "out.pt").write_text("keep me")
    result = run(*args(project, "out.pt", "--steps", "2"))
    assert result.exit_code == 2 and "--force" in result.output and (project / "out.pt").read_text() == "keep me"
    no_pickle = [a for a in args(project, "new.pt", "--steps", "2") if a != "--allow-pickle"]
    result = run(*no_pickle)
    assert result.exit_code == 2 and "--allow-pickle" in result.output
    assert run(*args(project, "a.pt", "--steps", "2", "--checkpoint-dir", project / "ck")).exit_code == 0
    result = run(*args(project, "b.pt", "--steps", "2", "--checkpoint-dir", project / "ck"))
    assert result.exit_code == 2 and "holds checkpoints of an earlier run" in result.output
    (project / "evil").mkdir()
    torch.save([torch.zeros(4, 3, 8, 8), {"not": object()}], project / "evil" / "shard.pt")  # needs unpickling
    result = run(*args(project, "c.pt", "--steps", "2"), "--data", project / "evil")
    assert result.exit_code == 2 and "not a readable .npy/.pt shard" in result.output


def test_an_existing_output_stops_every_process_at_once(project):
    """Only the first process used to check the output: the others then waited for it in the rendezvous until --timeout."""
    (project / "out.pt").write_text("keep me")
    # A --timeout far past the run's own limit: a process left waiting in the rendezvous for the one
    # that refused would hang the run (TimeoutExpired) or end in "could not form", never in the refusal.
    result = torchrun(args(project, "out.pt", "--steps", "2", "--timeout", "3600"))
    refusals = [line for line in result.stderr.splitlines() if line.startswith("Error:") and "--force" in line]
    assert result.returncode != 0 and refusals, result.stderr[-3000:]
    assert "could not form" not in result.stderr
    assert (project / "out.pt").read_text() == "keep me"
