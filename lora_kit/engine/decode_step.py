"""A lean decode step for Llama-family models: the model's own modules, without transformers' per-call machinery.

Why: at one row, a decode step of the embedded 135M model spent ~17 ms in its matmuls and
as much again elsewhere (measured on a 2-core Xeon VM, bf16 weights: 36 ms per step), most
of it in Python: transformers' generic forward (keyword plumbing, output-capture decorators,
the 4-D mask builder, the attention-interface lookup, deprecation shims) runs for every
layer of every step. A decode step needs none of it: one new token per row, a KV cache
that grows in place (:mod:`.kv_cache`), a padding mask that only changes when rows join.

:class:`LeanDecoder` runs that step by calling the model's own submodules in the order its
forward does -- the same norms, the same (LoRA-wrapped, packed or 4-bit) projections, the
same rotary embedding and transformers' own SDPA attention function with the mask it would
build -- so with an fp32 cache its logits equal the full forward's (tested exactly, not within a
tolerance). With a 16-bit cache (``kv_dtype``) it attends in the cache's dtype, where the full
forward attends in fp32 over the widened cache.
Prefill keeps the full forward. Models of another architecture, or with features this step
does not reproduce (a sliding window shorter than the cache, attention other than SDPA/eager
with its own kernels, non-SiLU MLPs), keep the full forward for every step.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

logger = logging.getLogger(__name__)

SUPPORTED = ("llama", "mistral")


class LeanDecoder:
    """``decoder(input_ids (B, 1), attention_mask (B, L), position_ids (B, 1), cache) -> logits (B, V)``
    for one decode step; ``cache`` is updated in place (its layers' ``update``)."""

    def __init__(self, model: Any) -> None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        self.model = model
        self.inner = model.model
        config = model.config
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.window = getattr(config, "sliding_window", None)
        self._attention = sdpa_attention_forward
        # torch's rms_norm is transformers' ops in one call on the CPU; elsewhere (a fused CUDA
        # kernel) it may round differently, so other devices call the model's norm modules.
        on_cpu = next(model.parameters()).device.type == "cpu"
        self._norm = _rms_norm if on_cpu else _call_norm

    @classmethod
    def for_model(cls, model: Any) -> LeanDecoder | None:
        """A lean decoder for ``model``, or None when it must keep its full forward."""
        config = getattr(model, "config", None)
        if config is None or getattr(config, "model_type", None) not in SUPPORTED:
            return None
        if getattr(config, "hidden_act", None) != "silu" or getattr(config, "_attn_implementation", None) != "sdpa":
            return None
        if not hasattr(model, "model") or not hasattr(model.model, "rotary_emb"):
            return None
        if not all(_plain_rms_norm(norm) for norm in _norms(model.model)):
            return None
        return cls(model)

    def fits(self, length: int) -> bool:
        """Whether a step over ``length`` cached positions (the new one included) is reproduced
        exactly: not when a sliding window would cut the cache."""
        return self.window is None or length <= self.window

    def __call__(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        inner = self.inner
        hidden = inner.embed_tokens(input_ids)  # (B, 1, H)
        cos, sin = inner.rotary_emb(hidden, position_ids)  # (B, 1, D) each
        cos, signed_sin = cos.unsqueeze(1), _signed_sin(sin.unsqueeze(1))
        # transformers' SDPA mask for a decode step: none when every position is real, else
        # (B, 1, 1, L) booleans, True where a row may attend.
        mask = None if bool(attention_mask.all()) else attention_mask.bool()[:, None, None, :]
        norm = self._norm
        for layer, cache_layer in zip(inner.layers, cache.layers):
            hidden = hidden + self._attend(
                layer.self_attn, norm(layer.input_layernorm, hidden), cos, signed_sin, mask, cache_layer
            )
            mlp = layer.mlp
            h = norm(layer.post_attention_layernorm, hidden)
            hidden = hidden + mlp.down_proj(mlp.act_fn(mlp.gate_proj(h)) * mlp.up_proj(h))
        return self.model.lm_head(norm(inner.norm, hidden))[:, -1, :]

    def _attend(
        self, attn: Any, h: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor, mask: Any, cache_layer: Any
    ) -> torch.Tensor:
        """One attention block of a decode step: (B, 1, H) -> (B, 1, H); writes its K/V into the cache.

        Attention runs in the cache's dtype: a 16-bit cache (``kv_dtype``) is read as it is held,
        the query rounded to it, rather than widened to fp32 at every step (a copy of the whole
        cache per layer and step)."""
        rows = h.shape[0]
        shape = (rows, 1, -1, self.head_dim)
        q = attn.q_proj(h).view(shape).transpose(1, 2)  # (B, heads, 1, D)
        k = attn.k_proj(h).view(shape).transpose(1, 2)
        v = attn.v_proj(h).view(shape).transpose(1, 2)
        half = self.head_dim // 2
        q, k = q * cos + q.roll(half, -1) * signed_sin, k * cos + k.roll(half, -1) * signed_sin
        stored = getattr(cache_layer, "dtype", None) or k.dtype
        if stored != k.dtype:  # no casts at all for a cache in the model's dtype (this runs 4x per layer and step)
            q, k, v = q.to(stored), k.to(stored), v.to(stored)
        k, v = cache_layer.update(k, v)
        out, _ = self._attention(attn, q, k, v, mask, dropout=0.0, scaling=attn.scaling)
        out = out.reshape(rows, 1, -1)
        return attn.o_proj(out if out.dtype == h.dtype else out.to(h.dtype))


def _norms(inner: Any) -> list[Any]:
    return [inner.norm, *(n for layer in inner.layers for n in (layer.input_layernorm, layer.post_attention_layernorm))]


def _plain_rms_norm(norm: Any) -> bool:
    """Whether ``norm`` is transformers' Llama/Mistral RMSNorm (``weight * x / rms(x)``; not, say,
    Gemma's ``(1 + weight)`` form), which :func:`_rms_norm` reproduces."""
    return type(norm).__name__ in ("LlamaRMSNorm", "MistralRMSNorm") and hasattr(norm, "variance_epsilon")


def _rms_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    """transformers' Llama/Mistral RMSNorm ``norm(x)`` as one op on the CPU: torch's CPU ``rms_norm`` runs the
    same ops in the same order (pow, mean, add eps, rsqrt, two muls: bit for bit, which the lean
    step's exactness test checks) without six Python-level calls (18 -> 9 us a norm, 61 a step)."""
    return torch.rms_norm(x, norm.weight.shape, norm.weight, norm.variance_epsilon)


def _call_norm(norm: Any, x: torch.Tensor) -> torch.Tensor:
    return norm(x)


def _signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """``sin`` with its first half negated, once per step, so that each layer's rotation is
    ``x * cos + x.roll(D / 2) * signed_sin``: transformers' ``x * cos + rotate_half(x) * sin``
    bit for bit (rotate_half(x) = cat(-x2, x1), and -x2 * s1 = x2 * -s1 exactly), in one op per
    tensor where rotate_half took four (two slices, a negation and a cat, 4 tensors per layer)."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
