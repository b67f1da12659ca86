"""The transformers bridge: `full` through kvbench attention must be token-identical to stock transformers."""

import pytest
import torch

from kvbench import parse_method
from kvbench.bridge import KVBenchCache, UnsupportedModelError, attach
from kvbench.models import synthetic_config

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.",
           "Explain in two sentences what a key-value cache is."]


def chat_ids(tok, text):
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                   return_tensors="pt", return_dict=True)["input_ids"]


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_full_is_token_identical_to_stock_transformers(embedded, prompt):
    model, tok = embedded
    ids = chat_ids(tok, prompt)
    model.set_attn_implementation("sdpa")
    ref = model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    cache = attach(model, parse_method("full"))
    out = model.generate(ids, past_key_values=cache, max_new_tokens=64, min_new_tokens=64, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 64
    assert torch.equal(out, ref)
    assert cache.get_seq_length() == ids.shape[1] + 63  # the last token is sampled, never cached
    assert cache.nbytes() > 0


@pytest.mark.slow
def test_forward_calls_match_stock_logits(embedded):
    model, tok = embedded
    ids = chat_ids(tok, PROMPTS[0])
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        ref = model(ids).logits
        cache = attach(model, parse_method("full"))
        first = model(ids[:, :-3], past_key_values=cache).logits
        rest = model(ids[:, -3:], past_key_values=cache).logits  # a 3-token chunk through extend()
    torch.testing.assert_close(torch.cat([first, rest], 1), ref, atol=2e-4, rtol=1e-4)


def tiny_config(**overrides):
    cfg = synthetic_config("synthetic:smollm2-135m")
    cfg.num_hidden_layers = 2
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


def test_synthetic_model_generates_through_the_bridge():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config()).eval()
    ids = torch.randint(0, 1000, (2, 20))
    model.set_attn_implementation("sdpa")
    ref = model.generate(ids, max_new_tokens=8, do_sample=False)
    cache = attach(model, parse_method("full"))
    out = model.generate(ids, past_key_values=cache, max_new_tokens=8, do_sample=False)
    assert torch.equal(out, ref)
    assert isinstance(cache, KVBenchCache) and len(cache.layer_caches()) == 2


def test_sliding_window_architecture_is_refused_with_reason():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("mistral", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                               num_attention_heads=4, num_key_value_heads=2, sliding_window=16, vocab_size=100)
    with pytest.raises(UnsupportedModelError, match="sliding"):
        KVBenchCache(parse_method("full"), cfg)
