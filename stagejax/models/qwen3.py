"""The Qwen3 family: Llama's layer (RMSNorm, RoPE, grouped-query attention, SwiGLU, no biases)
with an RMSNorm over every query and key head before RoPE, a head dim of its own (Qwen3-0.6B:
16 heads of 128 in a 1024-wide model), and a tied or untied head.

This file is the whole family: its switches, the configs it refuses, and the names of its extra
tensors in a Hugging Face directory (transformers' `modeling_qwen3.py`: `self_attn.q_norm`,
`self_attn.k_norm`) and a GGUF file (llama.cpp's `qwen3` architecture: `attn_q_norm`,
`attn_k_norm`, q/k rows in Hugging Face's order since llama.cpp runs Qwen's RoPE NeoX-style).
"""

from stagejax.models.family import Family, ImportNames


def _check(config) -> None:
    if config.head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {config.head_dim}")


FAMILY = Family(
    name="qwen3", norm="rms", biases=False, rope=True, ffn="swiglu", qk_norm=True, check=_check,
    names=ImportNames(
        hf_model_type="qwen3", gguf_architecture="qwen3",
        hf_layer_tensors={"self_attn.q_norm.weight": ("q_norm", "scale"),
                          "self_attn.k_norm.weight": ("k_norm", "scale")},
        gguf_layer_tensors={"attn_q_norm.weight": ("q_norm", "scale"),
                            "attn_k_norm.weight": ("k_norm", "scale")},
        gguf_rope_permuted=False))
