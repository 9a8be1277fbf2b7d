"""Calibration of a model with a recurrent state whose batch is on dim 1 (issue 35): a voice-activity
detector, conv front end and a GRUCell fed a state ``(1, batch, hidden)`` as nn.GRU lays it out."""

import pytest
import torch
from torch import nn

import convtool
from convtool import InvalidOptionError
from convtool.core.inputs import batch_dim
from convtool.recovery.batches import calibration_batches

HIDDEN = 16


class StatefulVAD(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.front = nn.Conv1d(1, 8, 5, padding=2)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.cell = nn.GRUCell(8, HIDDEN)
        self.out = nn.Linear(HIDDEN, 1)

    def forward(self, x, state):
        h = self.cell(self.conv(torch.relu(self.front(x))).mean(-1), state[0])
        return torch.sigmoid(self.out(h)), h.unsqueeze(0)


def _data(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.randn(n, 1, 64), torch.randn(1, n, HIDDEN) * 0.1


@pytest.fixture
def model():
    torch.manual_seed(0)
    return StatefulVAD().eval()


@pytest.mark.parametrize("given", ["one tuple of every sample", "a list of batches"])
@pytest.mark.parametrize("with_inputs", [True, False], ids=["example-inputs", "calibration-only"])
def test_a_state_whose_batch_is_on_dim_1_calibrates(model, given, with_inputs):
    """Refused before: the tuple ("must share a non-empty first (batch) dimension"), and every batch of the list
    ("does not run on the first calibration sample ... Input batch size 1 doesn't match hidden0 batch size 4")."""
    torch.manual_seed(1)
    calibration = _data(40) if given == "one tuple of every sample" else [_data(8) for _ in range(4)]
    inputs = _data(2) if with_inputs else None
    result = convtool.separate(model, inputs, rank=1, calibration=calibration)
    assert [layer.name for layer in result.layers] == ["conv"]  # the front end has one input channel
    assert result.layers[0].output_error is not None and result.verified
    x, state = _data(3)
    assert result.model(x, state)[1].shape == (1, 3, HIDDEN)


def test_the_batch_dimension_of_each_input(model):
    x, state = _data(10)
    assert batch_dim(x, 10) == 0 and batch_dim(state, 10) == 1
    assert batch_dim(torch.zeros(2, 2, 16), 2, like=torch.zeros(2, 5, 16)) == 1  # two layers, two samples: the example tells
    assert batch_dim(torch.zeros(8), 10) is None
    batches = calibration_batches((x, state), batch_size=4)
    assert [tuple(t.shape) for t in batches[-1]] == [(2, 1, 64), (1, 2, HIDDEN)]


def test_a_tensor_holding_no_sample_is_still_refused():
    with pytest.raises(InvalidOptionError, match="hold the 10 samples"):
        calibration_batches((torch.zeros(10, 3), torch.zeros(7, 3)))


@pytest.mark.parametrize("given", ["one tuple of every sample", "a list of batches"])
def test_an_agreement_floor_judges_held_out_samples_of_a_state_on_dim_1(model, given):
    """Held-out samples were cut, and outputs joined, on dim 0: a state (1, batch, hidden) broke the search."""
    torch.manual_seed(1)
    calibration = _data(40) if given == "one tuple of every sample" else [_data(8) for _ in range(8)]
    result = convtool.separate(model, _data(2), rank=convtool.AgreementTarget(sqnr_db=10), calibration=calibration)
    search = result.search
    assert search.met and search.sqnr_db >= 10 and search.samples == (10 if given == "one tuple of every sample" else 16)
