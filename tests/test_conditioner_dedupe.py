"""TextConditioner encodes each distinct caption of a batch once, with the same context per row."""

import torch

from tests.tiny import text_conditioner


def test_repeated_captions_are_encoded_once_with_the_same_result():
    cond = text_conditioner()
    captions = ["a photo of the digit one", "", "a photo of the digit two", "a photo of the digit one", ""]
    seen = []
    handle = cond.transformer.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(kwargs["input_ids"].shape[0]), with_kwargs=True
    )
    with torch.no_grad():
        batched = cond(captions)
        handle.remove()
        rows = torch.cat([cond([c]) for c in captions])
    assert seen == [3]  # three distinct captions
    assert batched.shape == rows.shape == (5, 77, 32)
    torch.testing.assert_close(batched, rows, rtol=1e-5, atol=1e-6)
    assert torch.equal(batched[0], batched[3]) and torch.equal(batched[1], batched[4])
