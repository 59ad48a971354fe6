"""core.padding: right and left padding by hand."""

import torch

from reasonmaxxer.core.padding import pad_left, pad_right


def test_pad_right_and_left_by_hand():
    ids, att = pad_right([(5, 6, 7), [8], ()], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert att.tolist() == [[1, 1, 1], [1, 0, 0], [0, 0, 0]]
    ids, att = pad_left([(5, 6, 7), [8]], pad_id=9)
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]]
    assert att.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == att.dtype == torch.long


def test_pad_all_empty():
    ids, att = pad_left([(), ()], pad_id=0)
    assert ids.shape == att.shape == (2, 0)
