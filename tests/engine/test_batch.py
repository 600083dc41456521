"""A step's rows as the model's input tensors (engine/batch.py)."""
import torch

from distserve.engine.batch import Batch, DecodeRow, PrefillRow, _prepare_any, prepare

CPU = torch.device("cpu")


def _fields(inputs):
    m = inputs.meta
    return {"input_ids": inputs.input_ids, "positions": inputs.positions,
            "logit_rows": inputs.logit_rows, "slot_blocks": m.slot_blocks,
            "slot_offsets": m.slot_offsets, "decode_block_tables": m.decode_block_tables,
            "decode_context_lens": m.decode_context_lens}


def test_a_decode_only_batch_gets_the_tensors_of_the_general_path():
    """Tables of different lengths, a context that ends a block and one that starts one."""
    batch = Batch(decodes=[DecodeRow(11, 16, [4]), DecodeRow(12, 17, [5, 9]),
                           DecodeRow(13, 40, [6, 7, 8]), DecodeRow(14, 1, [3])])
    fast, general = prepare(batch, 16, CPU), _prepare_any(batch, 16, CPU)
    assert not fast.meta.prefills and fast.meta.num_prefill_tokens == 0
    for name, tensor in _fields(general).items():
        got = _fields(fast)[name]
        assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
    assert fast.input_ids.tolist() == [11, 12, 13, 14]
    assert fast.positions.tolist() == [15, 16, 39, 0]
    assert fast.meta.slot_blocks.tolist() == [4, 9, 8, 3]
    assert fast.meta.slot_offsets.tolist() == [15, 0, 7, 0]
    assert fast.meta.decode_block_tables.tolist() == [[4, 0, 0], [5, 9, 0], [6, 7, 8], [3, 0, 0]]


def test_a_batch_with_a_prompt_keeps_the_general_path():
    batch = Batch([PrefillRow([1, 2, 3], 0, [2], True)], [DecodeRow(9, 5, [7])])
    inputs = prepare(batch, 16, CPU)
    assert inputs.input_ids.tolist() == [1, 2, 3, 9]
    assert inputs.logit_rows.tolist() == [2, 3]
    assert inputs.meta.slot_blocks.tolist() == [2, 2, 2, 7]
    assert inputs.meta.num_prefill_tokens == 3
