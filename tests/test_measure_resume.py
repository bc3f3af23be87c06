"""The resume hooks of ``pipeline.measure_model`` / ``calibrate.stream_blocks``: continuing from a saved block
gives exactly the table of an uninterrupted run; saved states that do not fit are refused."""
from __future__ import annotations

import pytest
import torch

from bitalloc.calibrate import stream_blocks
from bitalloc.errors import InputError
from bitalloc.models.view import ModelView
from bitalloc.pipeline import MeasureStart, measure_model
from tests.conftest import tiny_llama, token_ids

torch.set_num_threads(1)
FMTS = ["int3-g32", "int4-g32"]


def test_measurement_continued_from_a_block_equals_the_uninterrupted_one():
    model = tiny_llama()
    view = ModelView(model)
    windows = token_ids(3, 16)
    saved: dict[str, object] = {}
    blocks: list[tuple[int, list, torch.Tensor]] = []

    full = measure_model(model, view, windows, FMTS, "rtn", True, progress=False, fisher_windows=windows[:2],
                         on_fisher=lambda f: saved.update(fisher=f),
                         on_block=lambda b, rows, h: blocks.append((b, rows, h.clone())))
    assert [b for b, _, _ in blocks] == [0, 1]
    assert all(r.tensor.startswith(f"model.layers.{b}.") for b, rows, _ in blocks for r in rows)
    b, rows, hidden = blocks[0]
    start = MeasureStart(1, hidden, tuple(rows))
    again = measure_model(model, view, windows, FMTS, "rtn", True, progress=False, fisher_windows=windows[:2],
                          fisher_stats=saved["fisher"], start=start,
                          on_fisher=lambda f: pytest.fail("the Fisher pass must not run again"))
    assert again.to_json() == full.to_json()
    # the head only: every block done
    last = MeasureStart(2, blocks[1][2], tuple(blocks[0][1]) + tuple(blocks[1][1]))
    head_only = measure_model(model, view, windows, FMTS, "rtn", True, progress=False, fisher_windows=windows[:2],
                              fisher_stats=saved["fisher"], start=last)
    assert head_only.to_json() == full.to_json()


def test_saved_states_that_do_not_fit_are_refused():
    model = tiny_llama()
    windows = token_ids(2, 16)
    with pytest.raises(InputError, match="do not match"):
        next(stream_blocks(model, None, windows, progress=False, start_block=1, start_hidden=torch.zeros(2, 8, 64)))
    with pytest.raises(InputError, match="has 2 blocks"):
        next(stream_blocks(model, None, windows, progress=False, start_block=3, start_hidden=torch.zeros(2, 16, 64)))
    with pytest.raises(InputError, match="needs the hidden states"):
        next(stream_blocks(model, None, windows, progress=False, start_block=1))
    with pytest.raises(InputError, match="non-negative"):
        MeasureStart(-1, torch.zeros(2, 16, 64), ())
