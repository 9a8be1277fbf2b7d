"""The command line: exit codes, safety, and what it writes."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

from convtool.cli import main

ROOT = Path(__file__).resolve().parents[1]

ARCHS = '''
import torch
from torch import nn


def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def depthwise_only():
    return nn.Sequential(nn.Conv2d(3, 3, 3, groups=3), nn.Conv2d(3, 8, 1))


def speech():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv1d(80, 32, 5, padding=2), nn.BatchNorm1d(32), nn.ReLU(), nn.Conv1d(32, 32, 3, stride=2),
                         nn.ConvTranspose1d(32, 16, 4, stride=2), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(16, 4))
'''


@pytest.fixture
def project(tmp_path):
    (tmp_path / "archs.py").write_text(ARCHS)
    namespace: dict = {}
    exec(ARCHS, namespace)
    model = namespace["small"]().eval()
    torch.save(model.state_dict(), tmp_path / "small.pt")
    save_file(model.state_dict(), str(tmp_path / "small.safetensors"))
    torch.save(namespace["depthwise_only"]().state_dict(), tmp_path / "dw.pt")
    return tmp_path


def run(*args, cwd=None):
    runner = CliRunner()
    old = os.getcwd()
    os.chdir(cwd or old)
    try:
        return runner.invoke(main, [str(a) for a in args], catch_exceptions=False)
    finally:
        os.chdir(old)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def arch(project, name="small"):
    return f"{project / 'archs.py'}:{name}"


def test_every_command_has_help_and_is_in_the_readme():
    readme, reference = (ROOT / "README.md").read_text(), (ROOT / "docs" / "cli.md").read_text()
    for name, command in main.commands.items():
        assert command.help and "Example" in command.help, name
        assert f"convtool {name}" in readme and f"convtool {name}" in reference, name
        assert run(name, "--help").exit_code == 0


def test_separate_writes_a_portable_model(project):
    before = digest(project / "small.pt")
    result = run("separate", project / "small.pt", "--arch", arch(project), "--input-shape", "2,3,16,16")
    assert result.exit_code == 0, result.output
    out = project / "small.separated.pt"
    assert out.exists() and digest(project / "small.pt") == before
    assert "before / after" in result.output
    # Loads where the architecture's code is not importable: a GraphModule of torch + convtool classes.
    code = f"import torch; m = torch.load({str(out)!r}, weights_only=False); print(m(torch.randn(1, 3, 16, 16)).shape)"
    loaded = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True)
    assert loaded.returncode == 0, loaded.stderr
    assert "torch.Size([1, 4])" in loaded.stdout


def test_separate_with_safetensors_onnx_and_reports(project):
    result = run(
        "separate", project / "small.safetensors", "--arch", arch(project), "--input-shape", "1,3,16,16",
        "-o", project / "out.pt", "--onnx", project / "out.onnx", "--providers", "cpu",
        "--report", project / "report.json", "--rank", "full",
    )
    assert result.exit_code == 0, result.output
    assert "CPUExecutionProvider: passed" in result.output
    report = json.loads((project / "report.json").read_text())
    assert report["schema_version"] == 7 and report["totals"]["params_before"] > 0 and report["verified"] is True
    assert [layer["name"] for layer in report["layers"]] == ["0", "3"]


def test_json_goes_to_stdout_and_quiet_prints_nothing(project):
    result = run("separate", project / "small.pt", "--arch", arch(project), "--input-shape", "1,3,16,16", "--json",
                 "-o", project / "a.pt")
    assert result.exit_code == 0
    assert json.loads(result.stdout)["totals"]["flops_before"] > 0
    quiet = run("separate", project / "small.pt", "--arch", arch(project), "--input-shape", "1,3,16,16", "-q",
                "-o", project / "b.pt")
    assert quiet.exit_code == 0 and quiet.output == ""


def test_default_input_shape_is_assumed_and_said(project):
    result = run("analyze", project / "small.pt", "--arch", arch(project))
    assert result.exit_code == 0
    assert "assuming 1,3,224,224" in result.stderr


def test_a_speech_model_gets_a_1d_default_shape_and_exports(project):
    namespace: dict = {}
    exec(ARCHS, namespace)
    torch.save(namespace["speech"]().eval().state_dict(), project / "speech.pt")
    out, onnx_path = project / "speech.separated.pt", project / "speech.onnx"
    result = run("separate", project / "speech.pt", "--arch", arch(project, "speech"), "--onnx", onnx_path, "-o", out)
    assert result.exit_code == 0, result.output
    assert "assuming 1,80,3000" in result.stderr
    assert out.exists() and onnx_path.exists()
    shaped = run("analyze", project / "speech.pt", "--arch", arch(project, "speech"), "--input-shape", "2,80,400")
    assert shaped.exit_code == 0 and "assuming" not in shaped.stderr


def test_nothing_to_separate_writes_nothing(project):
    result = run("separate", project / "dw.pt", "--arch", arch(project, "depthwise_only"), "--input-shape", "1,3,8,8")
    assert result.exit_code == 2
    assert "nothing to separate" in result.output
    assert not (project / "dw.separated.pt").exists()


def test_existing_output_needs_force(project):
    out = project / "taken.pt"
    out.write_bytes(b"keep me")
    args = ["separate", project / "small.pt", "--arch", arch(project), "--input-shape", "1,3,8,8", "-o", out]
    result = run(*args)
    assert result.exit_code == 2 and "--force" in result.output
    assert out.read_bytes() == b"keep me"
    assert run(*args, "--force").exit_code == 0
    assert out.read_bytes() != b"keep me"


def test_output_equal_to_input_is_refused_even_with_force(project):
    before = digest(project / "small.pt")
    result = run("separate", project / "small.pt", "--arch", arch(project), "-o", project / "small.pt", "--force")
    assert result.exit_code == 2 and "input file" in result.output
    assert digest(project / "small.pt") == before


class Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_hostile_pickle_is_never_unpickled(project):
    marker = project / "pwned"
    torch.save(Hostile(str(marker)), project / "evil.pt")
    for command in (["separate"], ["analyze"], ["export", "-o", project / "evil.onnx"]):
        result = run(*command[:1], project / "evil.pt", *command[1:])
        assert result.exit_code == 2, result.output
        assert "--allow-pickle" in result.output
    assert not marker.exists()


def test_pickled_module_loads_with_allow_pickle(project):
    torch.save(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), project / "whole.pt")
    refused = run("separate", project / "whole.pt", "--input-shape", "1,3,8,8")
    assert refused.exit_code == 2 and "runs code from the file" in refused.output
    allowed = run("separate", project / "whole.pt", "--input-shape", "1,3,8,8", "--allow-pickle")
    assert allowed.exit_code == 0, allowed.output


@pytest.mark.parametrize("content", [os.urandom(2048), b"", b"PK\x03\x04truncated zip"])
def test_random_empty_and_truncated_files(project, content):
    path = project / "bad.pt"
    path.write_bytes(content)
    result = run("separate", path, "--arch", arch(project))
    assert result.exit_code == 2
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_truncated_checkpoint(project):
    data = (project / "small.pt").read_bytes()
    (project / "cut.pt").write_bytes(data[: len(data) // 2])
    result = run("separate", project / "cut.pt", "--arch", arch(project))
    assert result.exit_code == 2 and "truncated or corrupted" in result.output


def test_state_dict_without_arch_and_torchscript(project):
    result = run("separate", project / "small.pt")
    assert result.exit_code == 2 and "--arch" in result.output
    scripted = torch.jit.trace(nn.Conv2d(3, 8, 3), torch.randn(1, 3, 8, 8))
    scripted.save(str(project / "ts.pt"))
    result = run("separate", project / "ts.pt")
    assert result.exit_code == 2 and "TorchScript" in result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--input-shape", "1,3,abc"], "positive integers"),
        (["--input-shape", "1,5,16,16"], "check --input-shape"),
        (["--rank", "0"], "--rank"),
        (["--onnx", "o.onnx", "--providers", "cpu,quantum"], "unknown provider"),
        (["--report", "r.txt"], ".json or .md"),
        (["--arch", "nosuchmodule:build"], "cannot import"),
    ],
)
def test_bad_options_exit_2_with_one_line(project, args, message):
    base = ["separate", project / "small.pt", "--arch", arch(project)]
    result = run(*base, *args, cwd=project)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_weights_that_do_not_fit_the_arch(project):
    result = run("separate", project / "dw.pt", "--arch", arch(project))
    assert result.exit_code == 2 and "do not fit" in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_device_without_cuda(project):
    result = run("separate", project / "small.pt", "--arch", arch(project), "--device", "cuda")
    assert result.exit_code == 2 and "CUDA is not available" in result.output


def test_export_then_verify_exit_codes(project):
    onnx_path = project / "small.onnx"
    exported = run("export", project / "small.pt", "--arch", arch(project), "--input-shape", "1,3,16,16", "-o", onnx_path)
    assert exported.exit_code == 0, exported.output
    ok = run("verify", onnx_path, "--against", project / "small.pt", "--arch", arch(project), "--input-shape", "1,3,16,16",
             "--providers", "cpu")
    assert ok.exit_code == 0 and "passed" in ok.output
    # Against other weights the outputs differ: verification fails with exit code 1.
    namespace: dict = {}
    exec(ARCHS, namespace)
    torch.manual_seed(1)
    different = namespace["small"]()
    for p in different.parameters():
        torch.nn.init.normal_(p)
    torch.save(different.state_dict(), project / "different.pt")
    bad = run("verify", onnx_path, "--against", project / "different.pt", "--arch", arch(project),
              "--input-shape", "1,3,16,16", "--providers", "cpu")
    assert bad.exit_code == 1 and "FAILED" in bad.output
    # Asking for CUDA where onnxruntime has none is a failed verification too.
    import onnxruntime

    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        cuda = run("verify", onnx_path, "--against", project / "small.pt", "--arch", arch(project),
                   "--input-shape", "1,3,16,16", "--providers", "cuda")
        assert cuda.exit_code == 1 and "convtool[gpu]" in cuda.output


def test_corrupted_onnx_is_exit_2(project):
    (project / "bad.onnx").write_bytes(b"\x08\x07garbage")
    result = run("verify", project / "bad.onnx", "--against", project / "small.pt", "--arch", arch(project),
                 "--input-shape", "1,3,16,16", "--providers", "cpu")
    assert result.exit_code == 2 and "not a valid ONNX model" in result.output


def test_as_a_subprocess_user_errors_have_no_traceback(project):
    completed = subprocess.run(
        [sys.executable, "-m", "convtool", "separate", str(project / "small.pt")],
        capture_output=True, text=True, cwd=project,
    )
    assert completed.returncode == 2
    assert "Traceback" not in completed.stderr and "--arch" in completed.stderr
    debug = subprocess.run(
        [sys.executable, "-m", "convtool", "separate", str(project / "small.pt"), "--debug"],
        capture_output=True, text=True, cwd=project,
    )
    assert debug.returncode != 0 and "Traceback" in debug.stderr


def test_help_does_not_import_torch():
    code = "import sys, convtool.cli; assert 'torch' not in sys.modules, 'torch imported'"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_auto_rank_with_calibration_and_distillation(project):
    import numpy as np

    np.save(project / "images.npy", torch.randn(32, 3, 16, 16).numpy())
    result = run("separate", project / "small.pt", "--arch", arch(project), "--rank", "auto", "--flops-target", "0.5",
                 "--calibration", project / "images.npy", "--distill-steps", "5", "--report", project / "r.json")
    assert result.exit_code == 0, result.output
    assert "distilled 5 steps" in result.stderr
    report = json.loads((project / "r.json").read_text())
    assert report["input_shapes"] == [[1, 3, 16, 16]]  # the first calibration sample


def test_energy_and_order_options(project):
    result = run("separate", project / "small.pt", "--arch", arch(project), "--input-shape", "1,3,16,16",
                 "--energy", "0.6", "--order", "auto", "--json", "-o", project / "e.pt")
    assert result.exit_code == 0, result.output
    assert all(layer["rank"] >= 1 for layer in json.loads(result.stdout)["layers"])


@pytest.mark.parametrize("kind", ["npz", "pt", "images"])
def test_calibration_formats(project, kind):
    import numpy as np
    from PIL import Image

    data = torch.rand(8, 3, 16, 16)
    if kind == "npz":
        path = project / "cal.npz"
        np.savez(path, images=data.numpy())
    elif kind == "pt":
        path = project / "cal.pt"
        torch.save(data, path)
    else:
        path = project / "photos"
        path.mkdir()
        for i in range(4):
            Image.fromarray((data[i].permute(1, 2, 0).numpy() * 255).astype("uint8")).save(path / f"{i}.png")
    extra = ["--image-size", "16,16", "--mean", "0.5", "--std", "0.25"] if kind == "images" else []
    result = run("separate", project / "small.pt", "--arch", arch(project), "--calibration", path, *extra,
                 "-o", project / f"{kind}.pt")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--distill-steps", "5"], "--calibration"),
        (["--rank", "2", "--flops-target", "0.5"], "--rank and --flops-target each choose the ranks: give one"),
        (["--calibration", "missing.npy"], "does not exist"),
    ],
)
def test_bad_accuracy_options(project, args, message):
    result = run("separate", project / "small.pt", "--arch", arch(project), *args, cwd=project)
    assert result.exit_code == 2 and message in result.output, result.output


def test_image_folder_needs_a_size(project):
    from PIL import Image

    (project / "photos").mkdir()
    Image.new("RGB", (8, 8)).save(project / "photos" / "a.png")
    result = run("separate", project / "small.pt", "--arch", arch(project), "--calibration", project / "photos")
    assert result.exit_code == 2 and "--image-size" in result.output


def test_latency_guided_rank_and_export_layout(project):
    result = run("separate", project / "small.pt", "--arch", arch(project), "--input-shape", "1,3,16,16",
                 "--rank", "auto", "--flops-target", "0.9", "--latency", "cpu", "-o", project / "l.pt")
    assert result.exit_code in (0, 2), result.output  # 2: nothing was faster than dense on this machine
    if result.exit_code == 2:
        assert "dense" in result.output
    exported = run("export", project / "small.pt", "--arch", arch(project), "--input-shape", "1,3,16,16",
                   "-o", project / "x.onnx", "--no-fold-bn", "--layout", "multiplier")
    assert exported.exit_code == 0 and "BatchNorms folded" not in exported.output


def test_pickled_training_checkpoint_with_arch(project):
    import argparse

    namespace: dict = {}
    exec(ARCHS, namespace)
    state = namespace["small"]().state_dict()
    torch.save({"state_dict": state, "args": argparse.Namespace(lr=0.1), "epoch": 3}, project / "ckpt.pt")
    refused = run("separate", project / "ckpt.pt", "--arch", arch(project), "--input-shape", "1,3,16,16")
    assert refused.exit_code == 2 and "--allow-pickle" in refused.output
    allowed = run("separate", project / "ckpt.pt", "--arch", arch(project), "--input-shape", "1,3,16,16",
                  "--allow-pickle", "-o", project / "c.pt")
    assert allowed.exit_code == 0, allowed.output


def test_outputs_must_differ(project):
    result = run("separate", project / "small.pt", "--arch", arch(project), "--input-shape", "1,3,16,16",
                 "-o", project / "same.json", "--report", project / "same.json", "--force")
    assert result.exit_code == 2 and "different files" in result.output
    assert not (project / "same.json").exists()


@pytest.mark.parametrize(
    "outputs",
    [
        ["-o", "/proc/x.pt"],
        ["-o", "{project}/small.pt/x.pt"],
        ["-o", "{project}/missing/x.pt"],
        ["-o", "{project}/fine.pt", "--onnx", "/proc/x.onnx"],
        ["-o", "{project}/fine.pt", "--report", "/proc/r.json"],
    ],
)
def test_an_unwritable_output_is_refused_before_any_work(project, outputs):
    outputs = [o.format(project=project) for o in outputs]
    before = sorted(p.name for p in project.iterdir())
    result = run("separate", project / "small.pt", "--arch", arch(project), "--input-shape", "1,3,16,16", *outputs)
    assert result.exit_code == 2, result.output
    assert len(result.output.strip().splitlines()) == 1 and ("cannot write" in result.output or "does not exist" in result.output)
    assert sorted(p.name for p in project.iterdir()) == before  # nothing written, not even the .pt


def test_export_refuses_an_opset_it_cannot_write_and_an_unwritable_file(project):
    base = ["export", project / "small.pt", "--arch", arch(project), "--input-shape", "1,3,16,16"]
    result = run(*base, "-o", project / "m.onnx", "--opset", "5")
    assert result.exit_code == 2 and "opset 5 cannot be written" in result.output
    result = run(*base, "-o", "/proc/m.onnx")
    assert result.exit_code == 2 and "cannot write" in result.output
    result = run(*base, "-o", project / "m.onnx", "--opset", "11")
    assert result.exit_code == 0 and "opset 11, torchscript exporter" in result.output, result.output


@pytest.mark.parametrize(
    "args,message",
    [
        (["--std", "0,1,1"], "--std"),
        (["--std", "0.2,-1,1"], "positive"),
        (["--mean", "nan"], "--mean"),
        (["--recalibrate-bn"], "recalibrate_bn works on calibration data: pass calibration"),
        (["--image-size", "16,16"], "--image-size needs --calibration"),
        (["--providers", "cpu"], "--providers needs --onnx"),
        (["--rank", "auto", "--flops-target", "0.5", "--energy", "0.9"], "--flops-target and --energy each choose the ranks: give one"),
    ],
)
def test_options_that_cannot_work_exit_2_before_any_work(project, args, message):
    calibration = ["--calibration", project / "photos"] if "--std" in args or "--mean" in args else []
    if calibration:
        from PIL import Image

        (project / "photos").mkdir()
        Image.new("RGB", (16, 16)).save(project / "photos" / "a.png")
        calibration += ["--image-size", "16,16"]
    result = run("separate", project / "small.pt", "--arch", arch(project), *calibration, *args, "-o", project / "o.pt")
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (project / "o.pt").exists()


def test_non_finite_calibration_data_is_refused(project):
    import numpy as np

    data = np.random.rand(8, 3, 16, 16).astype("float32")
    data[2, 1, 3, 3] = np.nan
    np.save(project / "nan.npy", data)
    result = run("separate", project / "small.pt", "--arch", arch(project), "--calibration", project / "nan.npy", "--json")
    assert result.exit_code == 2 and "NaN or infinite" in result.output


def test_calibration_of_the_wrong_shape_names_the_file_and_the_expected_shape(project):
    import numpy as np

    np.save(project / "gray.npy", np.random.rand(8, 1, 16, 16).astype("float32"))
    result = run("separate", project / "small.pt", "--arch", arch(project), "--calibration", project / "gray.npy")
    assert result.exit_code == 2
    assert "gray.npy" in result.output and "(N, 1, 16, 16)" in result.output and "(N, 3, ...)" in result.output
    assert "--input-shape" not in result.output


def test_latency_on_a_provider_that_cannot_run_exits_2(project):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    result = run("separate", project / "small.pt", "--arch", arch(project), "--input-shape", "1,3,16,16",
                 "--latency", "cuda", "-o", project / "l.pt")
    assert result.exit_code == 2 and "CUDAExecutionProvider is not in this onnxruntime build" in result.output
    assert not (project / "l.pt").exists()


MYMODELS = '''
import torch
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 3)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)))
'''


def test_a_pickled_model_loads_when_run_from_its_own_project(project):
    (project / "mymodels.py").write_text(MYMODELS)
    save = "import torch, mymodels; torch.save(mymodels.Net(), 'whole.pt')"
    subprocess.run([sys.executable, "-c", save], cwd=project, check=True)
    command = [sys.executable, "-m", "convtool", "analyze", "whole.pt", "--allow-pickle", "--input-shape", "1,3,16,16"]
    result = subprocess.run(command, cwd=project, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "No module named" not in result.stderr


def test_models_saved_by_convtool_0_1_still_load():
    """A saved GraphModule names its tracer class by module path; 0.1 wrote convtool.io._StandardLeaves."""
    import importlib
    import pickle

    from convtool.io import portable

    model, x = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()).eval(), torch.randn(1, 3, 8, 8)
    gm = portable(model, (x,))
    cls = gm._tracer_cls
    assert getattr(importlib.import_module(cls.__module__), cls.__qualname__) is cls
    assert importlib.import_module("convtool.io")._StandardLeaves is cls
    old_path = pickle.dumps(cls, protocol=0).replace(cls.__module__.encode(), b"convtool.io")
    assert pickle.loads(old_path) is cls


CLOSURES = '''
import torch
from torch import nn


class WithLambda(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        conv = self.conv
        self.run = lambda x: conv(x)

    def forward(self, x):
        return self.run(x).mean((2, 3))


def lam():
    return WithLambda()


class LogOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.conv(x).log()  # NaN wherever the conv is negative, in both models


def logout():
    torch.manual_seed(0)
    return LogOut()
'''


@pytest.mark.parametrize("target", ["-o", "--onnx", "--report"])
def test_no_output_may_replace_an_input_file(project, target):
    import numpy as np

    np.save(project / "cal.npy", np.random.rand(4, 3, 16, 16).astype("float32"))
    arch_file = project / "archs.py"
    before = {p: digest(p) for p in (project / "cal.npy", arch_file, project / "small.pt")}
    for victim in before:
        outputs = {"-o": project / "o.pt", "--onnx": None, "--report": None}
        outputs[target] = victim
        if target != "-o" and victim.suffix not in ((".onnx",) if target == "--onnx" else (".json", ".md")):
            continue  # a suffix the option refuses anyway
        args = [a for k, v in outputs.items() if v for a in (k, v)]
        result = run("separate", project / "small.pt", "--arch", arch(project), "--calibration", project / "cal.npy",
                     *args, "--force")
        assert result.exit_code == 2 and "is the input file" in result.output, (victim, result.output)
    assert {p: digest(p) for p in before} == before


def test_a_model_that_cannot_be_pickled_leaves_no_output_behind(project):
    (project / "closures.py").write_text(CLOSURES)
    state = {"conv.weight": torch.randn(8, 3, 3, 3), "conv.bias": torch.randn(8)}
    torch.save(state, project / "lam.pt")
    before = sorted(p.name for p in project.iterdir())
    result = run("separate", project / "lam.pt", "--arch", f"{project / 'closures.py'}:lam", "--input-shape", "1,3,8,8",
                 "--onnx", project / "lam.onnx", "--report", project / "lam.json")
    assert result.exit_code == 2 and "cannot be saved with torch.save" in result.output, result.output
    assert sorted(p.name for p in project.iterdir()) == before


def test_nan_outputs_give_strict_json(project):
    (project / "closures.py").write_text(CLOSURES)
    torch.save(namespace_state(project), project / "log.pt")
    result = run("separate", project / "log.pt", "--arch", f"{project / 'closures.py'}:logout", "--input-shape", "1,3,8,8",
                 "--rank", "full", "--json", "--report", project / "r.json", "-o", project / "l.pt")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report == json.loads((project / "r.json").read_text())
    assert report["fidelity"]["max_abs_error"] is not None  # the NaNs sit at the same places in both


def namespace_state(project):
    namespace: dict = {}
    exec(CLOSURES, namespace)
    return namespace["logout"]().state_dict()


def test_analyze_json_has_a_row_for_every_counted_flop(project):
    result = run("analyze", project / "small.pt", "--arch", arch(project), "--input-shape", "1,3,16,16",
                 "--report", project / "a.json")
    assert result.exit_code == 0, result.output
    data = json.loads((project / "a.json").read_text())
    rows = data["modules"]
    assert rows[0]["name"] == "" and rows[0]["flops"] == data["flops"]
    assert sum(r["own_flops"] for r in rows) == data["flops"] and sum(r["own_params"] for r in rows) == data["params"]


def test_an_onnx_file_is_refused_with_what_to_give(project):
    (project / "m.onnx").write_bytes(b"\x08\x07")
    result = run("export", project / "m.onnx", "--allow-pickle", "-o", project / "out.onnx")
    assert result.exit_code == 2 and "ONNX file" in result.output and "PyTorch model" in result.output
    garbage = run("analyze", project / "m.onnx")
    assert garbage.exit_code == 2 and "not a valid ONNX model" in garbage.output


def test_calibration_that_does_not_fit_is_refused_even_with_an_input_shape(project):
    import numpy as np

    np.save(project / "gray.npy", np.random.rand(8, 1, 16, 16).astype("float32"))
    result = run("separate", project / "small.pt", "--arch", arch(project), "--calibration", project / "gray.npy",
                 "--input-shape", "1,3,16,16")
    assert result.exit_code == 2 and "calibration sample" in result.output, result.output
    assert len(result.output.strip().splitlines()) == 1


def test_separate_with_onnx_reports_both_latencies(project):
    result = run("separate", project / "small.pt", "--arch", arch(project), "--input-shape", "1,3,16,16",
                 "--onnx", project / "s.onnx", "--providers", "cpu", "--json", "-o", project / "s.pt")
    assert result.exit_code == 0, result.output
    latency = json.loads(result.stdout)["latency"]
    assert latency["provider"] == "CPUExecutionProvider" and latency["original_ms"] > 0 and latency["separated_ms"] > 0
    assert latency["speedup"] == pytest.approx(latency["original_ms"] / latency["separated_ms"])


def test_a_slower_separated_model_is_said_with_the_layers_that_lose(project, monkeypatch):
    import convtool
    from convtool.core.records import Benchmark, LayerLatency

    monkeypatch.setattr(convtool, "benchmark", lambda *a, **k: Benchmark("CPUExecutionProvider", 1.0, 2.0, 20, None))
    monkeypatch.setattr(convtool, "layer_latencies", lambda *a, **k: [LayerLatency("0", 0.1, 0.3), LayerLatency("3", 0.2, 0.1)])
    result = run("separate", project / "small.pt", "--arch", arch(project), "--input-shape", "1,3,16,16",
                 "--onnx", project / "s.onnx", "--providers", "cpu", "--report", project / "r.md", "-o", project / "s.pt")
    assert result.exit_code == 0, result.output
    assert "SLOWER (0.50x)" in result.output and "0 (0.1 ms dense, 0.3 ms separated)" in result.output
    assert "--latency cpu keeps such layers dense" in result.output
    assert "3 (" not in result.output.split("not faster:")[1]  # only the layers that lose are named
    assert "SLOWER" in (project / "r.md").read_text()


def test_layer_latencies_times_every_pair_at_its_input_shape():
    import convtool

    model = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1, padding_mode="reflect")).eval()
    x = torch.randn(1, 8, 16, 16)
    separated = convtool.separate(model, x, rank=1).model
    timings = convtool.layer_latencies(separated, x, provider="cpu")
    assert [t.name for t in timings] == ["0", "2"] and all(t.dense_ms > 0 and t.separated_ms > 0 for t in timings)


@pytest.mark.parametrize("name", ["wav2vec2", "hifigan", "unet3d", "dcgan", "deconv_output_size", "timm_style", "lazy", "tcn"])
def test_every_conv_type_through_the_cli(tmp_path, name):
    """Each model of the N-d zoo: separated, exported and verified on onnxruntime CPU from the command line."""
    from .zoo import build
    from .zoo_nd import ZOO_ND

    entry = next(e for e in ZOO_ND if e.name == name)
    (tmp_path / "archs.py").write_text(f"from tests.zoo_nd import ZOO_ND\n\n\ndef {name}():\n"
                                       f"    return next(e for e in ZOO_ND if e.name == {name!r}).build()\n")
    model, inputs = build(entry)
    with torch.no_grad():
        model(*inputs)  # materialises lazy convs, so their weights can be saved
    torch.save(model.state_dict(), tmp_path / "model.pt")
    shape = ",".join(map(str, inputs[0].shape))
    result = run("separate", tmp_path / "model.pt", "--arch", f"{tmp_path / 'archs.py'}:{name}", "--input-shape", shape,
                 "--onnx", tmp_path / "m.onnx", "--providers", "cpu", "-o", tmp_path / "m.pt")
    assert result.exit_code == 0, result.output
    assert "Verified: every separated layer ran" in result.output
    assert "CPUExecutionProvider: passed" in result.output


def test_separate_an_onnx_model(project):
    import convtool

    namespace: dict = {}
    exec(ARCHS, namespace)
    model = namespace["small"]().eval()
    source = project / "small.onnx"
    convtool.export_onnx(model, torch.randn(1, 3, 16, 16), source)  # dynamic batch: needs --input-shape
    before = digest(source)
    result = run("separate", source, "--rank", "full", "--input-shape", "1,3,16,16", "--report", project / "r.json")
    assert result.exit_code == 0, result.output
    assert "before / after" in result.output and "Separated layers (2)" in result.output
    assert "CPUExecutionProvider: ran both models" in result.stderr
    assert "CUDAExecutionProvider: not run" in result.stderr  # asked by default, never reported as run without a GPU
    report = json.loads((project / "r.json").read_text())
    assert report["verified"] is True and report["latency"]["provider"] == "CPUExecutionProvider"
    assert report["totals"]["flops_before"] > 0 and report["fidelity"]["relative_error"] < 1e-5
    assert [layer["source"] for layer in report["layers"]] == ["onnx", "onnx"]
    assert (project / "small.separated.onnx").exists() and digest(source) == before
    again = run("separate", source)
    assert again.exit_code == 2 and "--force" in again.output
    unshaped = run("separate", source, "-o", project / "u.onnx")
    assert unshaped.exit_code == 0 and "not verified" in unshaped.stderr and "--input-shape" in unshaped.stderr
    refused = run("separate", source, "--latency", "cpu", "-o", project / "x.onnx")  # layers timed at shapes it cannot know
    assert refused.exit_code == 2 and "--input-shape input=" in refused.output, refused.output
    assert not (project / "x.onnx").exists()
    np.save(project / "data.npy", np.random.default_rng(0).standard_normal((40, 3, 16, 16)).astype(np.float32))
    calibrated = run("separate", source, "--calibration", project / "data.npy", "-o", project / "c.onnx", "--json")
    assert calibrated.exit_code == 0, calibrated.output
    assert all(layer["output_error"] is not None for layer in json.loads(calibrated.stdout)["layers"])
    budget = run("separate", source, "--rank", "auto", "--flops-target", "0.5", "--order", "auto", "--input-shape", "1,3,16,16",
                 "-o", project / "b.onnx")
    assert budget.exit_code == 0, budget.output
    costs = run("analyze", source, "--input-shape", "2,3,16,16", "--json")
    assert costs.exit_code == 0, costs.output
    data = json.loads(costs.stdout)
    assert data["flops"] > 0 and any(m["type"] == "Conv" for m in data["modules"])
    unshaped_costs = run("analyze", source)  # a dynamic batch needs --input-shape
    assert unshaped_costs.exit_code == 2, unshaped_costs.output


def test_refit_both_halves_from_the_command_line(project):
    np.save(project / "cal.npy", np.random.default_rng(0).standard_normal((40, 3, 16, 16)).astype(np.float32))
    result = run("separate", project / "small.pt", "--arch", arch(project), "--calibration", project / "cal.npy", "--refit", "both",
                 "-o", project / "both.pt", "--json")
    assert result.exit_code == 0, result.output
    assert all(layer["output_error"] is not None for layer in json.loads(result.stdout)["layers"])
    alone = run("separate", project / "small.pt", "--arch", arch(project), "--refit", "both", "-o", project / "x.pt")
    assert alone.exit_code == 2 and "works on calibration data: pass calibration" in alone.output


def test_a_calibration_folder_of_shards_is_streamed_and_fits_as_the_whole_file_does(project):
    data = np.random.default_rng(0).standard_normal((70, 3, 16, 16)).astype(np.float32)
    np.save(project / "cal.npy", data)
    (project / "shards").mkdir()
    for i, start in enumerate(range(0, 70, 32)):  # shards that do not line up with the refit's batches of 32
        np.save(project / "shards" / f"part{i}.npy", data[start:start + 32])
    reports = []
    for source in ("cal.npy", "shards"):
        result = run("separate", project / "small.pt", "--arch", arch(project), "--calibration", project / source,
                     "--rank", "auto", "--flops-target", "0.5", "-o", project / f"{source}.sep.pt", "--json")
        assert result.exit_code == 0, result.output
        reports.append(json.loads(result.stdout)["layers"])
    assert [layer["rank"] for layer in reports[0]] == [layer["rank"] for layer in reports[1]]
    for whole, streamed in zip(*reports):
        assert streamed["output_error"] == pytest.approx(whole["output_error"], rel=1e-4)


def test_a_streamed_calibration_folder_reaches_a_float64_model_as_float64(project):
    """Streaming a folder skipped the cast to the model's dtype that files get: a float64 model then failed on it."""
    (project / "archs64.py").write_text(
        "import torch\nfrom torch import nn\n\n\ndef small():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1)).double()\n")
    from runpy import run_path

    torch.save(run_path(str(project / "archs64.py"))["small"]().state_dict(), project / "small64.pt")
    (project / "shards64").mkdir()
    np.save(project / "shards64" / "part0.npy", np.random.default_rng(0).standard_normal((40, 3, 16, 16)).astype(np.float32))
    result = run("separate", project / "small64.pt", "--arch", f"{project / 'archs64.py'}:small", "--calibration",
                 project / "shards64", "-o", project / "s64.pt", "--json")
    assert result.exit_code == 0, result.output
    assert all(layer["output_error"] is not None for layer in json.loads(result.stdout)["layers"])
