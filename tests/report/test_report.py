"""The report renderings; the JSON keys are pinned by a golden file."""

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch
from rich.console import Console
from torch import nn

import convtool
from convtool.report.render import SCHEMA_VERSION, human, to_dict, to_markdown, to_rich

GOLDEN = Path(__file__).with_name("golden_report.json")


def small_report():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.ReLU(),
        nn.Conv2d(16, 16, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4),
    ).eval()
    x = torch.randn(2, 3, 8, 8)
    return convtool.separate(model, x, rank=1).report(x)


def _assert_matches(actual, expected, path="$"):
    assert type(actual) is type(expected) or {type(actual), type(expected)} <= {int, float}, path
    if isinstance(expected, dict):
        assert list(actual) == list(expected), f"keys changed at {path}"
        for key in expected:
            _assert_matches(actual[key], expected[key], f"{path}.{key}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_matches(a, e, f"{path}[{i}]")
    elif isinstance(expected, float):
        assert actual == pytest.approx(expected, rel=1e-4, abs=1e-6), path
    else:
        assert actual == expected, path


def test_json_report_matches_golden_file():
    data = json.loads(json.dumps(to_dict(small_report())))
    if os.environ.get("CONVTOOL_UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(data, indent=2) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert golden["schema_version"] == SCHEMA_VERSION
    _assert_matches(data, golden)


def test_json_is_strict_json():
    text = json.dumps(to_dict(small_report()), allow_nan=False)
    assert json.loads(text)["totals"]["params_before"] > 0


def test_markdown_and_terminal_show_totals_then_layers():
    report = small_report()
    md = to_markdown(report)
    assert md.index("| params |") < md.index("### Separated layers (2)") < md.index("### Left as they were")
    assert "one multiply-add counts as one flop" in md
    console = Console(record=True, width=140)
    for item in to_rich(report):
        console.print(item)
    text = console.export_text()
    assert text.index("before / after") < text.index("Separated layers")
    assert "1x1 conv: already pointwise" in text


@pytest.mark.parametrize(
    "n,text", [(0, "0"), (136, "136"), (2_336, "2.34k"), (18_432, "18.4k"), (12_345_678, "12.3M"), (4.56e9, "4.56G"), (math.inf, "-")]
)
def test_human_numbers(n, text):
    assert human(n) == text


class AllFunctional(nn.Module):
    """Every conv written with F.conv2d: its cost sits in the model's own code, in no leaf module."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.fc = nn.Linear(8, 2)

    def forward(self, x):
        return self.fc(torch.nn.functional.conv2d(x, self.w).mean((2, 3)))


def test_analysis_puts_every_flop_and_parameter_in_some_row():
    from convtool.report.render import analysis_markdown, cost_rows

    analysis = convtool.analyze(AllFunctional(), torch.randn(1, 3, 10, 10))
    rows = cost_rows(analysis)
    assert sum(m.own_flops for m in rows) == analysis.flops
    assert sum(m.own_params for m in rows) == analysis.params
    own = next(m for m in rows if m.name == "")
    assert own.own_flops == 8 * 3 * 9 * 8 * 8 and own.own_params == 8 * 3 * 9
    assert "<model> (own code)" in analysis_markdown(analysis)


def test_markdown_escapes_pipes_in_names_and_reasons():
    from convtool.core.records import SkippedLayer

    report = small_report()
    weird = dataclasses.replace(report, skipped=(SkippedLayer("a|b", "reason with | a pipe"),))
    text = to_markdown(weird)
    assert "| a\\|b | reason with \\| a pipe |" in text
    for line in text.splitlines():
        if line.startswith("| a"):
            assert line.replace("\\|", "").count("|") == 3  # two cells, not four
