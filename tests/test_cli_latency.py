"""`convtool separate --latency-target F [--latency PROVIDER]` (issue 25, item 1).

The timings are faked (as in tests/pytorch/test_latency_target.py) so the command's wiring and
its report are tested deterministically; the search itself is tested there, on onnxruntime too.
"""

import json

import pytest

from .pytorch.test_latency_target import FakeTiming, fake  # noqa: F401  (fake is a fixture)
from .test_cli import arch, project, run  # noqa: F401  (project is a fixture)


def test_latency_target_reports_the_target_the_ratio_runs_and_threads(project, fake):
    result = run("separate", project / "small.pt", "--arch", arch(project), "--input-shape", "1,3,16,16",
                 "--latency-target", "0.6", "--report", project / "r.json", "-o", project / "s.pt")
    assert result.exit_code == 0, result.output
    search = json.loads((project / "r.json").read_text())["search"]
    target, latency = search["target"], search["latency"]
    assert target["fraction"] == 0.6 and latency["provider"] == "CPUExecutionProvider" and latency["runs"] == 30
    assert latency["threads"] is None and search["tried"] and target["rounds"] == 5
    timed = [(t.original_ms, t.separated_ms) for _, t in FakeTiming.made[0].returned]  # what each round's benchmark returned
    assert (latency["original_ms"], latency["separated_ms"]) in timed and len(timed) == len(search["tried"])
    assert latency["ratio"] == latency["separated_ms"] / latency["original_ms"]
    assert f"Searched for 0.6 of the original's latency on cpu: the model returned measured {latency['ratio']:.3f}" in result.stderr


@pytest.mark.parametrize("extra, message", [
    (["--latency-target", "1.5"], "a latency target is a fraction of the original's latency in (0, 1]; got 1.5"),
    (["--latency-target", "0"], "in (0, 1]; got 0.0"),
    (["--latency-target", "0.5", "--flops-target", "0.5"], "--flops-target and --latency-target each choose the ranks: give one"),
    (["--latency-target", "0.5", "--rank", "2"], "--rank and --latency-target each choose the ranks: give one"),
    (["--latency-target", "0.5", "--latency", "abacus"], "unknown provider 'abacus'"),
])
def test_bad_latency_targets_are_one_line_exit_2(project, extra, message):
    result = run("separate", project / "small.pt", "--arch", arch(project), "--input-shape", "1,3,16,16", *extra,
                 "-o", project / "s.pt")
    assert result.exit_code == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (project / "s.pt").exists()


def test_a_latency_target_on_a_provider_that_cannot_run_exits_2(project):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    result = run("separate", project / "small.pt", "--arch", arch(project), "--input-shape", "1,3,16,16",
                 "--latency-target", "0.5", "--latency", "cuda", "-o", project / "s.pt")
    assert result.exit_code == 2 and "CUDAExecutionProvider is not in this onnxruntime build" in result.stderr
    assert not (project / "s.pt").exists()
