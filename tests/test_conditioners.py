"""Tests for ldm/nn/conditioners.py, the bundled tiny tokenizer and configs/model/conditioner/*.yaml.

Oracles: transformers' CLIPTextModel (same weights) and diffusers' StableDiffusionPipeline.encode_prompt.
Everything is built from configs; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import hydra
import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.nn.conditioners import ClassConditioner, NullConditioner, TextConditioner, tiny_tokenizer_path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "model" / "conditioner"
DIGITS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTIONS = [f"a photo of the digit {d}" for d in DIGITS]


def _cfg(name: str, **overrides):
    """A conditioner config file with dotted-key overrides (as on the command line)."""
    cfg = OmegaConf.load(CONFIGS / f"{name}.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return cfg


def _tiny(**overrides) -> TextConditioner:
    return hydra.utils.instantiate(_cfg("tiny", **overrides))


@pytest.fixture(scope="module")
def tiny() -> TextConditioner:
    torch.manual_seed(0)
    return _tiny(**{"config.num_hidden_layers": 3})


# --- tokenizer -------------------------------------------------------------------------------------


def test_tiny_tokenizer_vocab_and_padding(tiny):
    tok = tiny.tokenizer
    assert len(tok) == 1024 == _cfg("tiny").config.vocab_size < 2000
    specials = tok.convert_ids_to_tokens([tok.bos_token_id, tok.eos_token_id])
    assert specials == ["<|startoftext|>", "<|endoftext|>"]
    assert tok.pad_token_id == tok.eos_token_id == 1023  # SD1 pads with <|endoftext|>
    ids = tiny.tokenize(CAPTIONS)
    assert ids.shape == (10, 77) and ids.dtype == torch.long
    # "a photo of the digit N" is six whole-word tokens between BOS and EOS, then padding.
    assert (ids[:, 0] == tok.bos_token_id).all() and (ids[:, 7:] == tok.pad_token_id).all()
    for caption, row in zip(CAPTIONS, ids):
        assert tok.decode(row, skip_special_tokens=True) == caption
    long = tiny.tokenize(" ".join(["digit"] * 200))
    assert long.shape == (1, 77) and long[0, -1] == tok.eos_token_id  # truncated, EOS kept


def test_tiny_tokenizer_generator_is_reproducible(tmp_path):
    path = ROOT / "ldm" / "assets" / "make_tiny_tokenizer.py"
    spec = importlib.util.spec_from_file_location("make_tiny_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.write(tmp_path)
    for name in ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json"]:
        assert (tmp_path / name).read_bytes() == (tiny_tokenizer_path() / name).read_bytes(), name


# --- configs -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, params, dim, index",
    [("clip_vit_l14", 123_060_480, 768, 12), ("openclip_vit_h14", None, 1024, 23)],
)
def test_real_configs_instantiate_on_meta(name, params, dim, index):
    # No weights and no download: the architecture comes from the config's `config:` block; the real
    # tokenizer would need the Hub, so the bundled one stands in (it fits inside the 49,408 vocabulary).
    cfg = _cfg(name, pretrained=False, tokenizer="tiny")
    with torch.device("meta"):
        cond = hydra.utils.instantiate(cfg)
    assert cond.output_dim == dim and cond.hidden_index == index
    assert not cond.training and not any(p.requires_grad for p in cond.parameters())
    assert next(iter(cond.state_dict())).startswith("transformer.text_model.embeddings.")
    if params is not None:
        assert sum(p.numel() for p in cond.parameters()) == params


def test_tiny_config(tiny):
    context = tiny(CAPTIONS[:2])
    assert context.shape == (2, 77, 32) and tiny.output_dim == 32
    assert tiny.unconditional(3).shape == (3, 77, 32)
    assert torch.equal(tiny.encode(CAPTIONS[:2]), context)
    assert torch.equal(tiny(tiny.tokenize(CAPTIONS[:2])), context)  # token ids in, same context out
    assert not torch.allclose(context[0], context[1])  # the digit word changes the context


# --- equivalence with transformers and diffusers ----------------------------------------------------


def _reference(cond: TextConditioner, attn: str) -> CLIPTextModel:
    """A plain transformers CLIPTextModel with the conditioner's weights."""
    config = CLIPTextConfig(**cond.transformer.config.to_dict())
    ref = CLIPTextModel._from_config(config, attn_implementation=attn).eval()
    state = cond.transformer.state_dict()  # text_model.* keys
    if "text_model.final_layer_norm.weight" not in ref.state_dict():  # transformers >= 5 has no wrapper
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    ref.load_state_dict(state)
    return ref


def _final_layer_norm(ref: CLIPTextModel) -> torch.nn.Module:
    return getattr(ref, "text_model", ref).final_layer_norm


def test_last_layer_equals_clip_text_model(tiny):
    ids = tiny.tokenize(CAPTIONS)
    with torch.no_grad():
        ours = tiny(CAPTIONS)
        assert torch.equal(ours, _reference(tiny, "sdpa")(ids).last_hidden_state)
        # The eager (matmul-softmax) implementation differs only by float rounding.
        torch.testing.assert_close(ours, _reference(tiny, "eager")(ids).last_hidden_state, atol=1e-5, rtol=0)


def test_penultimate_equals_final_norm_of_hidden_states(tiny):
    cond = _tiny(**{"config.num_hidden_layers": 3, "layer": "penultimate"})
    cond.load_state_dict(tiny.state_dict())
    ids = cond.tokenize(CAPTIONS)
    ref = _reference(cond, "sdpa")
    with torch.no_grad():
        hidden = ref(ids, output_hidden_states=True).hidden_states
        expected = _final_layer_norm(ref)(hidden[-2])
        assert torch.equal(cond(CAPTIONS), expected)
        assert not torch.allclose(expected, tiny(CAPTIONS))
        clip_skip = _tiny(**{"config.num_hidden_layers": 3, "layer": -2})  # A1111 "clip skip 2"
        clip_skip.load_state_dict(tiny.state_dict())
        assert torch.equal(clip_skip(CAPTIONS), expected)


def test_matches_diffusers_encode_prompt(tiny):
    from diffusers import StableDiffusionPipeline

    cond = _tiny(**{"config.num_hidden_layers": 3, "layer": "penultimate"})
    cond.load_state_dict(tiny.state_dict())
    # transformer (not .text_model): diffusers' clip_skip path reads text_encoder.text_model.final_layer_norm.
    pipe = StableDiffusionPipeline(
        vae=None,
        text_encoder=cond.transformer,
        tokenizer=cond.tokenizer,
        unet=None,
        scheduler=None,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with torch.no_grad():
        pos, neg = pipe.encode_prompt(CAPTIONS[:2], "cpu", 1, True, clip_skip=1)
        assert torch.equal(pos, cond(CAPTIONS[:2]))
        # diffusers applies clip_skip to the prompt only; its negative ("") is the last layer's output.
        assert torch.equal(neg, tiny.unconditional(2))


# --- loading ------------------------------------------------------------------------------------


def test_save_pretrained_roundtrip(tiny, tmp_path):
    from safetensors import safe_open

    tiny.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        assert all(k.startswith("text_model.") for k in f.keys())  # the layout every CLIP file has
    again = TextConditioner(version=str(tmp_path))  # tokenizer from the same folder
    assert again.frozen and again.hidden_index == 3
    assert torch.equal(again(CAPTIONS), tiny(CAPTIONS))
    assert torch.equal(again.unconditional(2), tiny.unconditional(2))


def test_diffusers_layout_with_dropped_last_layer(tiny, tmp_path):
    # SD2 in diffusers: text_encoder/ holds the blocks up to the penultimate (the last is unused).
    full = _tiny(**{"config.num_hidden_layers": 3, "layer": "penultimate"})
    full.load_state_dict(tiny.state_dict())
    short = _tiny(**{"config.num_hidden_layers": 2})
    missing, unexpected = short.load_state_dict(full.state_dict(), strict=False)
    assert not missing and all(k.startswith("transformer.text_model.encoder.layers.2.") for k in unexpected)
    short.transformer.save_pretrained(tmp_path / "text_encoder")
    full.tokenizer.save_pretrained(tmp_path / "tokenizer")

    cfg = _cfg(
        "tiny",
        version=str(tmp_path),
        subfolder="text_encoder",
        tokenizer=None,
        pretrained=True,
        layer="penultimate",
        **{"config.num_hidden_layers": 3},
    )
    loaded = hydra.utils.instantiate(cfg)
    assert loaded.transformer.config.num_hidden_layers == 2 and loaded.hidden_index == 2
    assert torch.equal(loaded(CAPTIONS), full(CAPTIONS))
    # The last of the 3 declared blocks is not in the file:
    with pytest.raises(InstantiationException, match="block 3"):
        hydra.utils.instantiate(cfg, layer="last")
    with pytest.raises(InstantiationException, match="does not match"):
        hydra.utils.instantiate(
            _cfg(
                "tiny",
                version=str(tmp_path),
                subfolder="text_encoder",
                tokenizer=None,
                pretrained=True,
                **{"config.hidden_size": 64},
            )
        )


# --- freezing -------------------------------------------------------------------------------------


def test_frozen_stays_in_eval(tiny):
    assert not any(p.requires_grad for p in tiny.parameters())
    tiny.train()
    assert not tiny.training and not tiny.transformer.training
    trainable = _tiny(freeze=False)
    assert all(p.requires_grad for p in trainable.parameters())
    trainable.train()
    assert trainable.transformer.training
    trainable(CAPTIONS[:1]).sum().backward()
    assert trainable.transformer.text_model.embeddings.token_embedding.weight.grad is not None


# --- class and null conditioners ------------------------------------------------------------------


def test_class_conditioner():
    cond = ClassConditioner(n_classes=10, embed_dim=16)
    assert cond.output_dim == 16 and cond.embedding.num_embeddings == 11 and cond.null_class == 10
    context = cond(torch.tensor([3, 7]))
    assert context.shape == (2, 1, 16)
    assert torch.equal(cond([3, 7]), context)
    assert torch.equal(context[1, 0], cond.embedding.weight[7])
    uncond = cond.unconditional(4)
    assert uncond.shape == (4, 1, 16) and torch.equal(uncond[2, 0], cond.embedding.weight[10])
    no_null = ClassConditioner(n_classes=10, embed_dim=16, ucg=False)
    assert no_null.embedding.num_embeddings == 10
    with pytest.raises(ValueError):
        no_null.unconditional(1)


def test_class_conditioner_names_and_the_digits_config():
    cond = hydra.utils.instantiate(_cfg("digits_class"))
    assert isinstance(cond, ClassConditioner) and cond.output_dim == 32 and cond.class_names == DIGITS
    assert [cond.label_index(x) for x in ("seven", "Seven ", 7, "7")] == [7, 7, 7, 7]
    with pytest.raises(ValueError, match="unknown class 'ten'"):
        cond.label_index("ten")
    with pytest.raises(ValueError, match="out of range"):
        cond.label_index(10)
    with pytest.raises(ValueError, match="an integer"):
        ClassConditioner(3, 4).label_index("cat")  # no names to look up
    with pytest.raises(ValueError, match="2 class_names"):
        ClassConditioner(3, 4, class_names=["cat", "dog"])


def test_tokenizer_that_cannot_be_found_is_an_error(tmp_path):
    """Never a stand-in tokenizer (transformers 5 quietly builds an empty one): an error naming it."""
    config = dict(OmegaConf.to_container(_cfg("tiny").config))
    (tmp_path / "empty").mkdir()
    for source, error in [
        (str(tmp_path / "empty"), FileNotFoundError),  # a folder without vocabulary files
        (str(tmp_path / "moved-away"), FileNotFoundError),  # a path of another machine
        ("openai/clip-vit-large-patch14-not-cached", OSError),  # a hub id, offline (conftest), not cached
    ]:
        with pytest.raises(error, match="tokenizer="):
            TextConditioner(config=config, pretrained=False, tokenizer=source)


def test_null_conditioner():
    cond = NullConditioner(output_dim=8).to(torch.float64)
    context = cond(["any", "captions", "here"])
    assert context.shape == (3, 1, 8) and context.dtype == torch.float64 and not context.any()
    assert cond.unconditional(2).shape == (2, 1, 8)
    assert cond.state_dict() == {}  # nothing to save
