import torch

from diffsr.backbone import PROMPT_CACHE_SIZE, load_backbone


def test_repeated_prompts_are_encoded_once_until_the_text_encoder_changes(tiny_base):
    backbone = load_backbone(tiny_base)
    calls = []
    backbone.text_encoder.register_forward_hook(lambda module, args, output: calls.append(args[0].shape[0]))
    first = backbone.encode_prompt(["a photo", ""])
    again = backbone.encode_prompt(["a photo", ""])
    assert calls == [2] and torch.equal(first, again)
    again.add_(1)  # a caller's result is its own
    assert torch.equal(backbone.encode_prompt(["a photo", ""]), first) and calls == [2]
    assert torch.equal(backbone.encode_prompt(["a photo"]), first[:1]) and calls == [2, 1]  # other prompts: encoded

    with torch.no_grad():  # weights changed in place (as load_state_dict does)
        backbone.text_encoder.get_input_embeddings().weight.mul_(2)
    changed = backbone.encode_prompt(["a photo", ""])
    assert calls == [2, 1, 2] and not torch.allclose(changed, first)
    assert torch.equal(changed, backbone._encode(["a photo", ""]))

    backbone.text_encoder.to(torch.float64)  # cast (as a trainer or accelerate may): encoded again
    assert torch.allclose(backbone.encode_prompt(["a photo", ""]), changed, atol=1e-5) and calls[-1] == 2
    assert len(calls) == 5


def test_the_prompt_cache_keeps_the_last_few(tiny_base):
    backbone = load_backbone(tiny_base)
    for index in range(PROMPT_CACHE_SIZE + 3):
        backbone.encode_prompt([f"prompt {index}"])
    assert len(backbone.prompt_cache) == PROMPT_CACHE_SIZE
    assert [key[0] for key in backbone.prompt_cache] == [(f"prompt {index}",) for index in range(3, PROMPT_CACHE_SIZE + 3)]


def test_a_text_encoder_cast_under_inference_mode_is_encoded_every_time(tiny_base):
    """Weights made under torch.inference_mode keep no version: nothing is kept for them (and nothing fails)."""
    backbone = load_backbone(tiny_base)
    with torch.inference_mode():
        backbone.text_encoder.to(torch.float64)
        first = backbone.encode_prompt(["a photo"])
        assert torch.equal(backbone.encode_prompt(["a photo"]), first)
    assert not backbone.prompt_cache
