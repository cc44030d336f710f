"""Hugging Face model directories in: `config.json` + safetensors weights (+ `tokenizer.json`).

Reads what `transformers`' `save_pretrained` writes for `LlamaForCausalLM`, the families laid
out like it (`Qwen3ForCausalLM`: the extra tensors each family's module names, see
`stagejax.models.family.ImportNames`) and `GPT2LMHeadModel` (GPT-2 also without the
`transformer.` prefix, as the original checkpoints are), without importing torch or
transformers:

  config.json                      architecture (transformers `LlamaConfig` / `GPT2Config`)
  model.safetensors                all tensors, or
  model.safetensors.index.json     {"weight_map": {tensor name: shard file}} for sharded saves
  tokenizer.json                   a `tokenizers` tokenizer (optional)
  tokenizer_config.json            bos/eos tokens, `add_bos_token`, `chat_template` (optional)
  chat_template.jinja              the chat template, where newer transformers put it (optional)

Formats: safetensors (https://github.com/huggingface/safetensors, "Format"), and the weight
conventions of transformers' `modeling_llama.py` / `modeling_gpt2.py`: `nn.Linear` stores
[out, in]; GPT-2's `Conv1D` stores [in, out] and fuses q, k, v as `c_attn` [D, 3D].

Everything is converted to the `Decoder` parameter layout (see `stagejax.models.decoder`) as
float32 numpy. Anything this code cannot reproduce exactly (RoPE scaling, another activation,
biases Llama does not have, an unknown tensor) is refused with an `HFImportError` naming the
file and the field or tensor, rather than imported into a model that computes something else.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from stagejax.importers import ImportedModel
from stagejax.model_config import ModelConfig
from stagejax.models.family import Family, llama_like_families
from stagejax.tokenizer import Tokenizer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
CHAT_TEMPLATE_FILE = "chat_template.jinja"

# The activations whose math is ops' tanh-approximated GELU.
GPT2_TANH_GELUS = ("gelu_new", "gelu_pytorch_tanh")


class HFImportError(ValueError):
    """A Hugging Face directory this importer cannot (or must not) turn into a model."""


def read_hf_dir(path: str | os.PathLike, with_params: bool = True) -> ImportedModel:
    """Import a Hugging Face Llama or GPT-2 directory.

    Args:
      path: a directory holding `config.json` and `model.safetensors` (or a sharded save with
        `model.safetensors.index.json`), optionally `tokenizer.json` and `tokenizer_config.json`.
      with_params: False reads only the description (config, tokenizer, the safetensors
        headers): what a run needs before its weights, without holding them.
    Returns:
      An `ImportedModel` with float32 numpy params in the `Decoder` layout (an empty dict
      without `with_params`), and a `Tokenizer` if the directory has a `tokenizer.json`
      (else None).
    Raises:
      HFImportError: missing or malformed files, an unsupported `model_type` or feature, a
        missing tensor, or a tensor whose shape contradicts config.json.
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise HFImportError(f"{path}: not a directory (expected a Hugging Face model directory "
                            f"with {CONFIG_FILE} and safetensors weights)")
    hf_config = _read_json(os.path.join(path, CONFIG_FILE))
    fields = _ConfigFields(hf_config, os.path.join(path, CONFIG_FILE))
    model_type = fields.get("model_type")
    llama_like = llama_like_families()
    if model_type == "llama":
        config = _llama_config(fields)
    elif model_type in llama_like:
        config = _llama_config(fields, llama_like[model_type])
    elif model_type == "gpt2":
        config = _gpt2_config(fields)
    else:
        known = ", ".join(repr(t) for t in ("llama", "gpt2", *llama_like))
        raise HFImportError(f"{fields.file}: model_type {model_type!r} is not supported "
                            f"(supported: {known})")

    with _SafetensorsDir(path) as tensors:
        if model_type != "gpt2" and not tensors.has("lm_head.weight"):
            # A save without lm_head (e.g. written with tied weights) has the embedding as its
            # head, whatever tie_word_embeddings says.
            config = dataclasses.replace(config, tie_embeddings=True)
        if not with_params:
            params = {}
        else:
            params = (_gpt2_params if model_type == "gpt2" else _llama_params)(tensors, config)
            tensors.check_all_used()
        weight_files = [os.path.basename(file) for file in tensors.files]

    eos = hf_config.get("eos_token_id")
    metadata = {
        "model_type": model_type,
        "architectures": hf_config.get("architectures"),
        "stored_dtype": hf_config.get("dtype", hf_config.get("torch_dtype")),
        "weight_files": weight_files,
        "transformers_version": hf_config.get("transformers_version"),
    }
    if isinstance(eos, list):
        metadata["eos_token_ids"] = list(eos)
    return ImportedModel(config=config, params=params, tokenizer=_read_tokenizer(path, config),
                         source_path=path, source_format="hf", metadata=metadata)


# ----------------------------------------------------------------------------------- config


class _ConfigFields:
    """config.json with lookups whose errors name the file and the field."""

    def __init__(self, data: dict, file: str):
        if not isinstance(data, dict):
            raise HFImportError(f"{file}: expected a JSON object, got {type(data).__name__}")
        self.data, self.file = data, file

    def get(self, name: str, default: Any = None) -> Any:
        return self.data.get(name, default)

    def require(self, name: str, kind=int) -> Any:
        if self.data.get(name) is None:
            raise HFImportError(f"{self.file}: required field {name!r} is missing")
        return self.typed(name, self.data[name], kind)

    def optional(self, name: str, default: Any, kind=int) -> Any:
        value = self.data.get(name)
        return default if value is None else self.typed(name, value, kind)

    def typed(self, name: str, value: Any, kind) -> Any:
        if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if kind is bool and isinstance(value, bool):
            return value
        if kind is str and isinstance(value, str):
            return value
        raise HFImportError(f"{self.file}: field {name!r} should be {kind.__name__}, got {value!r}")

    def refuse_unless(self, name: str, allowed: tuple, default: Any, why: str) -> None:
        value = self.data.get(name)
        value = default if value is None else value  # null means transformers' default
        if value not in allowed:
            raise HFImportError(f"{self.file}: {name}={value!r} is not supported ({why})")

    def token_id(self, name: str) -> int | None:
        """bos/eos ids; a list (several stop tokens) yields its first, the list goes to metadata."""
        value = self.data.get(name)
        if isinstance(value, list):
            value = value[0] if value else None
        return None if value is None else self.typed(name, value, int)

    def build(self, **kwargs) -> ModelConfig:
        try:
            return ModelConfig(**kwargs)
        except ValueError as e:  # ModelConfig's own consistency checks, e.g. an odd head_dim
            raise HFImportError(f"{self.file}: {e}") from e


def _llama_config(f: _ConfigFields, family: Family | None = None) -> ModelConfig:
    """A Llama config, or that of a family laid out like Llama (`family`, e.g. Qwen3)."""
    f.refuse_unless("hidden_act", ("silu",), "silu", "Llama's FFN here is SwiGLU with SiLU")
    for name in ("attention_bias", "mlp_bias"):
        f.refuse_unless(name, (False,), False, "the Llama layout has no biases")
    f.refuse_unless("use_sliding_window", (False,), False,
                    "attention here is full attention over the whole cache")
    layer_types = f.get("layer_types")
    if layer_types is not None and set(layer_types) - {"full_attention"}:
        raise HFImportError(f"{f.file}: layer_types {sorted(set(layer_types))} is not supported "
                            f"(full attention in every layer only)")
    _check_rope(f)
    d_model = f.require("hidden_size")
    n_heads = f.require("num_attention_heads")
    if "head_dim" not in f.data and d_model % n_heads:
        raise HFImportError(f"{f.file}: no 'head_dim' and hidden_size ({d_model}) is not a "
                            f"multiple of num_attention_heads ({n_heads})")
    return f.build(
        family="llama" if family is None else family.name,
        vocab_size=f.require("vocab_size"),
        d_model=d_model,
        n_layers=f.require("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=f.optional("num_key_value_heads", n_heads),
        head_dim=f.optional("head_dim", d_model // n_heads),
        ffn_dim=f.require("intermediate_size"),
        max_seq_len=f.require("max_position_embeddings"),
        norm_eps=f.optional("rms_norm_eps", 1e-6, float),  # LlamaConfig's default
        rope_theta=_rope_theta(f),
        # LlamaConfig defaults to an untied head; a missing lm_head ties it (see _llama_params).
        tie_embeddings=f.optional("tie_word_embeddings", False, bool),
        bos_token_id=f.token_id("bos_token_id"),
        eos_token_id=f.token_id("eos_token_id"),
    )


def _rope_parameters(f: _ConfigFields) -> dict:
    """transformers >= 5 writes `rope_parameters`; older configs `rope_theta` + `rope_scaling`."""
    params = f.get("rope_parameters")
    if params is not None and not isinstance(params, dict):
        raise HFImportError(f"{f.file}: field 'rope_parameters' should be an object, "
                            f"got {params!r}")
    return params or {}


def _check_rope(f: _ConfigFields) -> None:
    for name, params in (("rope_scaling", f.get("rope_scaling")),
                         ("rope_parameters", _rope_parameters(f))):
        if params is None:
            continue
        if not isinstance(params, dict):
            raise HFImportError(f"{f.file}: field {name!r} should be an object, got {params!r}")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in (None, "default"):
            raise HFImportError(f"{f.file}: {name} of type {kind!r} is not supported; only "
                                f"unscaled RoPE ({name}: null or rope_type 'default') is")
        factor = params.get("partial_rotary_factor", 1.0)
        if factor != 1.0:
            raise HFImportError(f"{f.file}: {name}.partial_rotary_factor={factor!r} is not "
                                f"supported; RoPE here rotates the whole head")
    factor = f.get("partial_rotary_factor", 1.0)
    if factor not in (None, 1.0):
        raise HFImportError(f"{f.file}: partial_rotary_factor={factor!r} is not supported")


def _rope_theta(f: _ConfigFields) -> float:
    theta = _rope_parameters(f).get("rope_theta", f.get("rope_theta"))
    return 10000.0 if theta is None else f.typed("rope_theta", theta, float)  # Llama's default


def _gpt2_config(f: _ConfigFields) -> ModelConfig:
    f.refuse_unless("activation_function", GPT2_TANH_GELUS, "gelu_new",
                    f"only the tanh-approximated GELU is implemented: {', '.join(GPT2_TANH_GELUS)}")
    f.refuse_unless("scale_attn_weights", (True,), True, "attention is always scaled by 1/sqrt(H)")
    f.refuse_unless("scale_attn_by_inverse_layer_idx", (False,), False,
                    "per-layer attention scaling is not implemented")
    f.refuse_unless("add_cross_attention", (False,), False, "decoder-only models only")
    f.refuse_unless("tie_word_embeddings", (True,), True, "GPT-2's head is its token embedding")
    d_model = f.require("n_embd")
    n_heads = f.require("n_head")
    if d_model % n_heads:
        raise HFImportError(f"{f.file}: n_embd ({d_model}) is not a multiple of n_head ({n_heads})")
    return f.build(
        family="gpt2",
        vocab_size=f.require("vocab_size"),
        d_model=d_model,
        n_layers=f.require("n_layer"),
        n_heads=n_heads,
        n_kv_heads=n_heads,
        head_dim=d_model // n_heads,
        ffn_dim=f.optional("n_inner", 4 * d_model),  # GPT2Config: n_inner None means 4 * n_embd
        max_seq_len=f.require("n_positions"),
        norm_eps=f.optional("layer_norm_epsilon", 1e-5, float),
        tie_embeddings=True,
        bos_token_id=f.token_id("bos_token_id"),
        eos_token_id=f.token_id("eos_token_id"),
    )


# ---------------------------------------------------------------------------------- tensors


class _SafetensorsDir:
    """The tensors of a (possibly sharded) safetensors save, read by name with shape checks."""

    def __init__(self, path: str):
        from safetensors import safe_open

        single = os.path.join(path, WEIGHTS_FILE)
        index = os.path.join(path, WEIGHTS_INDEX_FILE)
        # The file that lists the tensors: errors about a missing tensor name it.
        self.listing = index if os.path.exists(index) else single
        if os.path.exists(index):
            weight_map = _read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise HFImportError(f"{index}: field 'weight_map' is missing or empty")
            self._file_of = {name: os.path.join(path, shard) for name, shard in weight_map.items()}
        elif os.path.exists(single):
            self._file_of = None  # every tensor of the single file, filled in below
        else:
            raise HFImportError(f"{path}: no safetensors weights: expected {WEIGHTS_FILE} or "
                                f"{WEIGHTS_INDEX_FILE} (.bin/.pt checkpoints are not supported)")
        self.files = sorted(set(self._file_of.values())) if self._file_of else [single]
        self._handles = {}
        for file in self.files:
            if not os.path.exists(file):
                raise HFImportError(f"{index}: shard {os.path.basename(file)} is listed in "
                                    f"'weight_map' but does not exist")
            try:
                self._handles[file] = safe_open(file, framework="numpy")
            except Exception as e:  # safetensors raises its own error types for bad headers
                raise HFImportError(f"{file}: not a readable safetensors file: {e}") from e
        if self._file_of is None:
            self._file_of = {name: single for name in self._handles[single].keys()}
        else:
            for name, file in self._file_of.items():
                if name not in self._handles[file].keys():
                    raise HFImportError(f"{index}: tensor {name!r} is mapped to "
                                        f"{os.path.basename(file)}, which does not hold it")
        self._used: set[str] = set()
        self._ignored: set[str] = set()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._handles.clear()  # safe_open handles close when released

    def has(self, name: str) -> bool:
        return name in self._file_of

    def where(self, name: str) -> str:
        return self._file_of.get(name, self.listing)

    def ignore(self, name: str) -> None:
        """Mark a tensor as deliberately unused (a buffer, or a duplicate of a tied weight)."""
        self._ignored.add(name)

    def get(self, name: str, shape: tuple[int, ...], implied_by: str) -> np.ndarray:
        """Tensor `name` as float32, after checking it has the `shape` config.json implies."""
        if name not in self._file_of:
            raise HFImportError(f"{self.where(name)}: tensor {name!r} is missing "
                                f"(required by config.json: {implied_by})")
        file = self._file_of[name]
        tensor_slice = self._handles[file].get_slice(name)
        stored = tuple(tensor_slice.get_shape())
        if stored != tuple(shape):
            raise HFImportError(f"{file}: tensor {name!r} has shape {list(stored)}, but "
                                f"config.json ({implied_by}) implies {list(shape)}")
        self._used.add(name)
        return _to_float32(self._handles[file], file, name, tensor_slice.get_dtype())

    def check_all_used(self) -> None:
        """Refuse tensors we neither read nor know to skip: ignoring one would change the math."""
        unused = sorted(set(self._file_of) - self._used - self._ignored)
        if unused:
            shown = ", ".join(repr(n) for n in unused[:8]) + (" ..." if len(unused) > 8 else "")
            raise HFImportError(f"{self.where(unused[0])}: {len(unused)} tensor(s) not part of "
                                f"the architecture config.json describes: {shown}")


def _to_float32(handle, file: str, name: str, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        # numpy has no bfloat16, so safetensors' numpy backend refuses it; the jax backend
        # returns an ml_dtypes bfloat16 array, which widens to float32 exactly.
        from safetensors import safe_open

        with safe_open(file, framework="flax") as jax_handle:
            return np.asarray(jax_handle.get_tensor(name), dtype=np.float32)
    try:
        return np.asarray(handle.get_tensor(name), dtype=np.float32)
    except TypeError as e:  # e.g. float8 dtypes numpy cannot hold
        raise HFImportError(f"{file}: tensor {name!r} has dtype {dtype}, which cannot be read "
                            f"as float32") from e


def _llama_params(t: _SafetensorsDir, c: ModelConfig) -> dict:
    D, N, K, H, F, V = c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.ffn_dim, c.vocab_size
    params = {"embed": {"embedding": t.get("model.embed_tokens.weight", (V, D),
                                            "vocab_size, hidden_size")}}
    attn = f"num_attention_heads*head_dim={N}*{H}, hidden_size={D}"
    kv = f"num_key_value_heads*head_dim={K}*{H}, hidden_size={D}"
    ffn = f"intermediate_size={F}, hidden_size={D}"
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        # nn.Linear stores [out, in]; the out axis of q/k/v is (heads, head_dim), heads major.
        q = t.get(p + "self_attn.q_proj.weight", (N * H, D), attn)
        k = t.get(p + "self_attn.k_proj.weight", (K * H, D), kv)
        v = t.get(p + "self_attn.v_proj.weight", (K * H, D), kv)
        o = t.get(p + "self_attn.o_proj.weight", (D, N * H), attn)
        params[f"L{i}"] = {
            "attn_norm": {"scale": t.get(p + "input_layernorm.weight", (D,), "hidden_size")},
            "q": {"kernel": _c(q.T.reshape(D, N, H))},
            "k": {"kernel": _c(k.T.reshape(D, K, H))},
            "v": {"kernel": _c(v.T.reshape(D, K, H))},
            "o": {"kernel": _c(o.T.reshape(N, H, D))},
            "ffn_norm": {"scale": t.get(p + "post_attention_layernorm.weight", (D,),
                                        "hidden_size")},
            "gate": {"kernel": _c(t.get(p + "mlp.gate_proj.weight", (F, D), ffn).T)},
            "up": {"kernel": _c(t.get(p + "mlp.up_proj.weight", (F, D), ffn).T)},
            "down": {"kernel": _c(t.get(p + "mlp.down_proj.weight", (D, F), ffn).T)},
        }
        names = c.traits.names
        for tensor, (module, leaf) in (names.hf_layer_tensors.items() if names else ()):
            params[f"L{i}"][module] = {leaf: t.get(p + tensor, (H,), f"head_dim={H}")}
        # Older transformers saved RoPE's inverse frequencies; they follow from rope_theta.
        if t.has(p + "self_attn.rotary_emb.inv_freq"):
            t.ignore(p + "self_attn.rotary_emb.inv_freq")
    params["final_norm"] = {"scale": t.get("model.norm.weight", (D,), "hidden_size")}
    if c.tie_embeddings:
        if t.has("lm_head.weight"):
            t.ignore("lm_head.weight")  # tie_word_embeddings: transformers ties it over the file
    else:
        head = t.get("lm_head.weight", (V, D), "vocab_size, hidden_size")
        params["head"] = {"kernel": _c(head.T)}
    return params


def _gpt2_params(t: _SafetensorsDir, c: ModelConfig) -> dict:
    D, N, H, F, V, P = c.d_model, c.n_heads, c.head_dim, c.ffn_dim, c.vocab_size, c.max_seq_len
    # GPT2LMHeadModel saves "transformer.h.0...", GPT2Model (the original checkpoints) "h.0...".
    prefix = "transformer." if t.has("transformer.wte.weight") else ""
    params = {
        "embed": {"embedding": t.get(prefix + "wte.weight", (V, D), "vocab_size, n_embd")},
        "pos_embed": {"embedding": t.get(prefix + "wpe.weight", (P, D), "n_positions, n_embd")},
    }
    ffn = f"n_embd={D}, n_inner={F}"
    for i in range(c.n_layers):
        p = f"{prefix}h.{i}."
        # Conv1D stores [in, out]; c_attn's out axis is q | k | v, each (heads, head_dim).
        qkv = t.get(p + "attn.c_attn.weight", (D, 3 * D), f"n_embd={D}")
        qkv_bias = t.get(p + "attn.c_attn.bias", (3 * D,), f"n_embd={D}")
        q, k, v = np.split(qkv, 3, axis=1)
        q_bias, k_bias, v_bias = np.split(qkv_bias, 3)
        params[f"L{i}"] = {
            "attn_norm": _layer_norm(t, p + "ln_1", D),
            "q": {"kernel": _c(q.reshape(D, N, H)), "bias": _c(q_bias.reshape(N, H))},
            "k": {"kernel": _c(k.reshape(D, N, H)), "bias": _c(k_bias.reshape(N, H))},
            "v": {"kernel": _c(v.reshape(D, N, H)), "bias": _c(v_bias.reshape(N, H))},
            "o": {"kernel": t.get(p + "attn.c_proj.weight", (D, D), f"n_embd={D}").reshape(N, H, D),
                  "bias": t.get(p + "attn.c_proj.bias", (D,), f"n_embd={D}")},
            "ffn_norm": _layer_norm(t, p + "ln_2", D),
            "up": {"kernel": t.get(p + "mlp.c_fc.weight", (D, F), ffn),
                   "bias": t.get(p + "mlp.c_fc.bias", (F,), ffn)},
            "down": {"kernel": t.get(p + "mlp.c_proj.weight", (F, D), ffn),
                     "bias": t.get(p + "mlp.c_proj.bias", (D,), ffn)},
        }
        # Older saves hold the causal mask and its fill value as buffers; they are not weights.
        for buffer in ("attn.bias", "attn.masked_bias"):
            if t.has(p + buffer):
                t.ignore(p + buffer)
    params["final_norm"] = _layer_norm(t, prefix + "ln_f", D)
    if t.has("lm_head.weight"):
        head = t.get("lm_head.weight", (V, D), "vocab_size, n_embd")
        if not np.array_equal(head, params["embed"]["embedding"]):
            raise HFImportError(f"{t.where('lm_head.weight')}: 'lm_head.weight' differs from "
                                f"{prefix}wte.weight; GPT-2's head must be tied to the embedding")
    return params


def _layer_norm(t: _SafetensorsDir, name: str, d: int) -> dict:
    return {"scale": t.get(name + ".weight", (d,), f"n_embd={d}"),
            "bias": t.get(name + ".bias", (d,), f"n_embd={d}")}


def _c(x: np.ndarray) -> np.ndarray:
    """Contiguous copy of a transposed/reshaped view, so params do not pin the source buffers."""
    return np.ascontiguousarray(x, dtype=np.float32)


# -------------------------------------------------------------------------------- tokenizer


def _read_tokenizer(path: str, config: ModelConfig) -> Tokenizer | None:
    tokenizer_file = os.path.join(path, TOKENIZER_FILE)
    if not os.path.exists(tokenizer_file):
        return None
    import tokenizers

    try:
        backend = tokenizers.Tokenizer.from_file(tokenizer_file)
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise HFImportError(f"{tokenizer_file}: not a readable tokenizers file: {e}") from e
    config_file = os.path.join(path, TOKENIZER_CONFIG_FILE)
    tok_config = _read_json(config_file) if os.path.exists(config_file) else {}

    def special_id(key: str, fallback: int | None) -> int | None:
        token = tok_config.get(key)
        if isinstance(token, dict):  # AddedToken serialised as {"content": ..., ...}
            token = token.get("content")
        token_id = backend.token_to_id(token) if isinstance(token, str) else None
        return fallback if token_id is None else token_id

    bos_id = special_id("bos_token", config.bos_token_id)
    eos_id = special_id("eos_token", config.eos_token_id)
    add_bos = tok_config.get("add_bos_token")
    if add_bos is None:
        # No explicit flag: do what tokenizer.json's post-processor does (e.g. Llama 3 adds <bos>).
        with_special = backend.encode("a", add_special_tokens=True).ids
        without = backend.encode("a", add_special_tokens=False).ids
        add_bos = bos_id is not None and with_special[:1] == [bos_id] and without[:1] != [bos_id]
    return Tokenizer(backend=backend, bos_token_id=bos_id, eos_token_id=eos_id,
                     add_bos=bool(add_bos), chat_template=_chat_template(path, tok_config))


def _chat_template(path: str, tok_config: dict) -> str | None:
    template = tok_config.get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is None:
        jinja_file = os.path.join(path, CHAT_TEMPLATE_FILE)
        if os.path.exists(jinja_file):
            with open(jinja_file, encoding="utf-8") as fh:
                template = fh.read()
    return template if isinstance(template, str) else None


def _read_json(file: str) -> Any:
    if not os.path.exists(file):
        raise HFImportError(f"{file}: missing (a Hugging Face model directory needs it)")
    try:
        with open(file, encoding="utf-8") as fh:
            return json.load(fh)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFImportError(f"{file}: not valid JSON: {e}") from e
