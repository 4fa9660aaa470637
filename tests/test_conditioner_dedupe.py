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


def test_frozen_unconditional_context_is_encoded_once_until_the_weights_change():
    """Caption dropout asks for the empty caption's context every step: a frozen encoder computes it once;
    new weights (load_state_dict writes in place), or a text encoder that trains, compute it again."""
    cond = text_conditioner()
    cond.requires_grad_(False)
    calls = []
    cond.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    first = cond.unconditional(4)
    assert cond.unconditional(2).shape == (2, 77, 32) and len(calls) == 1
    torch.testing.assert_close(first[0], cond([""])[0])  # the same as encoding "" (one more call)
    calls.clear()
    state = {k: v + 0.01 if v.is_floating_point() else v for k, v in cond.state_dict().items()}
    cond.load_state_dict(state)
    changed = cond.unconditional(1)
    assert len(calls) == 1 and not torch.allclose(changed[0], first[0])
    calls.clear()
    cond.requires_grad_(True)  # a trained text encoder: every call runs, with gradients
    assert cond.unconditional(1).requires_grad and cond.unconditional(1).requires_grad and len(calls) == 2
