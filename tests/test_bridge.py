"""The transformers bridge: `full` through kvbench attention must be token-identical to stock transformers."""

import pytest
import torch

from kvbench import parse_method
from deprecations import no_cache_deprecation
from kvbench.bridge import KVBenchCache, UnsupportedModelError, attach, cache_kwarg, with_cache
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
    out = model.generate(ids, **with_cache(model, cache), max_new_tokens=64, min_new_tokens=64, do_sample=False)
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
        first = model(ids[:, :-3], **with_cache(model, cache)).logits
        rest = model(ids[:, -3:], **with_cache(model, cache)).logits  # a 3-token chunk through extend()
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
    out = model.generate(ids, **with_cache(model, cache), max_new_tokens=8, do_sample=False)
    assert torch.equal(out, ref)
    assert isinstance(cache, KVBenchCache) and len(cache.layer_caches()) == 2


def test_sliding_window_architecture_is_refused_with_reason():
    from transformers import AutoConfig

    cfg = AutoConfig.for_model("mistral", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                               num_attention_heads=4, num_key_value_heads=2, sliding_window=16, vocab_size=100)
    with pytest.raises(UnsupportedModelError, match="sliding"):
        KVBenchCache(parse_method("full"), cfg)


# --- the cache keyword: `cache` where the model takes it, `past_key_values` before; never a deprecation warning ------


def tiny_model():
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_config()).eval()


def test_cache_kwarg_follows_the_forward_signature():
    class Renamed:
        def forward(self, input_ids, cache=None, **kwargs): ...

    class Old:
        def forward(self, input_ids, past_key_values=None, **kwargs): ...

    assert cache_kwarg(Renamed) == "cache" and cache_kwarg(Old) == "past_key_values"
    assert with_cache(Old(), "c") == {"past_key_values": "c"}


def test_the_cache_given_by_with_cache_is_the_one_the_model_fills():
    # transformers 5.17 ignores an unknown `cache=` in forward without a word (it makes its own DynamicCache)
    model, ids = tiny_model(), torch.randint(0, 1000, (1, 12))
    cache = attach(model, parse_method("full"))
    with torch.no_grad(), no_cache_deprecation():
        model(ids, **with_cache(model, cache))
    assert cache.get_seq_length() == 12


def test_every_call_site_runs_without_a_cache_deprecation_warning():
    from kvbench.decoding import decode, real_prefill, run_instance
    from kvbench.graph_decode import _eager_step, graph_decode
    from kvbench.suites.fidelity import Fidelity
    from kvbench.suites.tasks import Instance

    model, ids = tiny_model(), torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(2))
    with no_cache_deprecation():
        cache, nxt, _ = real_prefill(model, parse_method("full"), ids)  # the throughput suite
        assert len(decode(model, cache, nxt, 1, 2)) == 2 and cache.get_seq_length() == 27
        cache, nxt, _ = real_prefill(model, parse_method("streaming:sinks=2,window=16"), ids)
        graph_decode(model, cache, nxt, 2, 2, graph=False, extra=0)  # the reserved eager steps
        with torch.inference_mode():
            _eager_step(model, cache, nxt)()  # the profiler's step
        inst = Instance("ppl", ids[0].tolist(), 20, [], "ppl", 0, score_tokens=4)  # the accuracy and fidelity suites
        wrapped = Fidelity(inner=parse_method("selfindex:budget=8,sinks=2,window=4"), drive="full")
        run_instance(model, None, attach(model, wrapped), inst, question_chunk=False)
        assert wrapped.stats.steps() == 3 * 3  # 3 decode steps x 3 KV heads
        out = model.generate(ids, **with_cache(model, attach(model, parse_method("full"))), max_new_tokens=3,
                             do_sample=False)
        assert out.shape[1] == 27


def test_the_warning_check_catches_the_deprecated_keyword():
    model = tiny_model()
    if cache_kwarg(type(model)) != "cache":
        pytest.skip("transformers here takes past_key_values without deprecating it")
    with pytest.raises(pytest.fail.Exception, match="cache keyword"), no_cache_deprecation(), torch.no_grad():
        model(torch.randint(0, 1000, (1, 5)), past_key_values=attach(model, parse_method("full")))


@pytest.mark.slow
def test_generate_command_prints_no_deprecation_warning():
    from typer.testing import CliRunner

    from kvbench.cli import app

    with no_cache_deprecation():
        r = CliRunner().invoke(app, ["generate", "-m", "selfindex:budget=64", "--device", "cpu", "-n", "4", "Hi"])
    assert r.exit_code == 0, r.output
    assert "past_key_values" not in r.output
