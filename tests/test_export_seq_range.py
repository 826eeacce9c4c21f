"""Export of models that branch at the top of the sequence range (``export._excludes_only_upper_bound``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from autodeploy.errors import ExportError
from autodeploy.export import export_causal_lm
from autodeploy.models.tiny import tiny_model


class _TableAtTheTop(torch.nn.Module):
    """A position table of exactly ``rows`` rows sliced from its end: ``seq == rows`` takes another branch."""

    def __init__(self, rows: int, vocab: int = 11, hidden: int = 6):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.register_buffer("table", torch.randn(rows, hidden))
        self.rows = rows

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        seq = input_ids.shape[1]
        bias = self.table if seq == self.rows else self.table[self.rows - seq :]  # [S, H]
        return SimpleNamespace(logits=self.embed(input_ids) + bias)  # [B, S, H]


class _TooShortTable(_TableAtTheTop):
    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, use_cache: bool = False) -> torch.Tensor:
        seq = input_ids.shape[1]
        if seq > self.rows // 2:  # a guard in the middle of the range: not ours to narrow
            return SimpleNamespace(logits=self.embed(input_ids))
        return SimpleNamespace(logits=self.embed(input_ids) + self.table[:seq])


def test_a_branch_at_the_upper_bound_exports_one_position_less():
    model = _TableAtTheTop(rows=32)
    gm = export_causal_lm(model, max_batch=4, max_seq_len=32)
    ids = torch.randint(0, 11, (2, 31))
    pos = torch.arange(31).expand(2, 31)
    torch.testing.assert_close(gm(ids, pos), model(ids, pos).logits)


def test_a_guard_inside_the_range_is_still_an_export_error():
    with pytest.raises(ExportError) as info:
        export_causal_lm(_TooShortTable(rows=32), max_batch=4, max_seq_len=32)
    assert "Constraints violated (seq)" in info.value.what


def test_mpt_exports_up_to_its_own_position_table():
    model = tiny_model("mpt")
    rows = model.config.max_seq_len
    gm = export_causal_lm(model, max_batch=4, max_seq_len=rows)
    ids = torch.randint(3, model.config.vocab_size, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(gm(ids, torch.arange(9).expand(2, 9)), model(ids).logits)


def test_a_constraint_violation_says_which_constraint():
    with pytest.raises(ExportError) as info:
        export_causal_lm(_TooShortTable(rows=32), max_batch=4, max_seq_len=32)
    assert "Constraints violated (seq): Not all values of seq" in info.value.what
