"""A lean forward for Llama-family models (Llama, Qwen2, Mistral): the same math as transformers'
layers, written as one flat loop over the layers.

Why: for SmolLM2-135M at batch 16 on CPU the linears take ~12 ms of a ~24 ms decode step; most of the
rest was transformers' per-layer Python (module calls, kwargs plumbing, [1, H, T, D] transposes) and a
dozen small eager ops per layer. Here the hidden state stays a flat [T, C] tensor, q/k/v stay [T, H, D]
(the layout the decode kernel reads), and the small ops go through `ops`: the fused C++ versions
(csrc/layer_ops.cpp) on CPU, or the PyTorch ones below, which are transformers' own formulas.

Every module that LoRA may wrap (embedding, projections, output head) is still called as a module, so
adapters, fused q/k/v groups and packed weights apply exactly as in the transformers forward. Models
this file does not recognise keep the transformers forward (`unsupported_reason` says why)."""

import torch
import torch.nn.functional as F
from torch import nn

from loraserve.engine.context import get_context
from loraserve.model import attention


class TorchOps:
    """The small per-layer ops in PyTorch, with transformers' rounding: RMSNorm in float32, then the
    weight times the result cast back; RoPE and SiLU in the model's dtype."""

    @staticmethod
    def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return weight * h.to(x.dtype)

    @classmethod
    def add_rms_norm(cls, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float) -> torch.Tensor:
        """residual += x (in place: the caller owns it), then the norm of the sum."""
        residual.add_(x)
        return cls.rms_norm(residual, weight, eps)

    @staticmethod
    def rope_write_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                      k_cache: torch.Tensor, v_cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """q [T, H, D], k/v [T, Hkv, D], cos/sin [T, D]: rotated q; rotated k and v go to their slots of the
        [Hkv, slots, D] caches."""
        cos, sin = cos[:, None], sin[:, None]
        attention.store_kv(k_cache, v_cache, slots, k * cos + _rotate_half(k) * sin, v)
        return q * cos + _rotate_half(q) * sin

    @staticmethod
    def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        return F.silu(gate) * up


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _layer_window(layer: nn.Module) -> int | None:
    """The sliding window transformers passes to attention for this layer (None: full attention)."""
    attn = layer.self_attn
    if type(layer).__name__ == "Qwen2DecoderLayer":
        return attn.sliding_window
    if type(layer).__name__ == "MistralDecoderLayer":
        return getattr(attn.config, "sliding_window", None)
    return None


# The decoder layers whose forward this file reproduces, with the modules each must hold unchanged.
SUPPORTED = {
    "LlamaDecoderLayer": ("LlamaAttention", "LlamaMLP", "LlamaRMSNorm"),
    "Qwen2DecoderLayer": ("Qwen2Attention", "Qwen2MLP", "Qwen2RMSNorm"),
    "MistralDecoderLayer": ("MistralAttention", "MistralMLP", "MistralRMSNorm"),
}


def unsupported_reason(model: nn.Module) -> str | None:
    """Why the lean forward cannot run `model` (None: it can)."""
    inner = getattr(model, "model", None)
    if inner is None or not all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return f"{type(model).__name__} is not a decoder-only model with the Llama layout"
    if getattr(model, "lm_head", None) is None:
        return "no lm_head"
    for layer in inner.layers:
        names = SUPPORTED.get(type(layer).__name__)
        if names is None:
            return f"{type(layer).__name__} layers"
        attn, mlp = layer.self_attn, layer.mlp
        if (type(attn).__name__, type(mlp).__name__) != names[:2] or \
                {type(layer.input_layernorm).__name__, type(layer.post_attention_layernorm).__name__} != {names[2]}:
            return f"{type(layer).__name__} holds modules of other types"
        if not isinstance(mlp.act_fn, nn.SiLU) and type(mlp.act_fn).__name__ != "SiLUActivation":
            return f"activation {type(mlp.act_fn).__name__}"
        if layer._forward_hooks or layer._forward_pre_hooks or attn._forward_hooks or attn._forward_pre_hooks:
            return "hooks on the decoder layers"
    if type(inner.norm).__name__ not in {n[2] for n in SUPPORTED.values()}:
        return f"final norm {type(inner.norm).__name__}"
    return None


def _project(x: torch.Tensor, modules: list[nn.Module]) -> list[torch.Tensor]:
    """The modules' outputs for x: from their sibling group in one call where they form one (the fused
    q/k/v or gate/up GEMM, with or without LoRA; o_proj and down_proj are LoRA's groups of one, called
    here without nn.Module's call path: a mixed decode step 1.005 faster), else module by module."""
    group = getattr(modules[0], "group", None)
    if group is not None and group.members == modules:
        outs = group.outputs(x)
        if outs is not None:
            return outs
    return [m(x) for m in modules]


class LeanDecoder:
    """Runs a Llama-family causal LM over one packed batch: ids [T], positions [T] -> logits of the
    `keep` rows. The attention metadata and LoRA slots come from the forward context, as for the
    transformers forward."""

    def __init__(self, model: nn.Module, ops: object | None = None) -> None:
        self.model, self.inner = model, model.model      # modules are looked up per call: LoRA may wrap them
        self.layers = list(self.inner.layers)
        self.windows = [_layer_window(layer) for layer in self.layers]
        # (weight, eps) of each layer's two norms: LoRA never wraps a norm, so these are fixed.
        self.norms = [[(n.weight, n.variance_epsilon) for n in (layer.input_layernorm, layer.post_attention_layernorm)]
                      for layer in self.layers]
        attn = self.layers[0].self_attn
        self.head_dim, self.scaling = attn.head_dim, attn.scaling
        self.ops = ops if ops is not None else TorchOps

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        ops, md, d = self.ops, get_context().attn, self.head_dim
        residual = self.inner.embed_tokens(ids).clone()          # [T, C]; owned: updated in place below
        cos, sin = (t[0] for t in self.inner.rotary_emb(residual, positions[None]))   # [T, D] each
        t = residual.shape[0]
        h = None
        for i, layer in enumerate(self.layers):
            (w_in, eps_in), (w_post, eps_post) = self.norms[i]
            x = ops.rms_norm(residual, w_in, eps_in) if h is None else ops.add_rms_norm(h, residual, w_in, eps_in)
            # Submodules through _modules: nn.Module.__getattr__ costs ~1 us a lookup (~500 a step).
            m = layer._modules["self_attn"]._modules
            q, k, v = (p.view(t, -1, d) for p in _project(x, [m["q_proj"], m["k_proj"], m["v_proj"]]))
            k_cache, v_cache, _ = md.kv_cache.layer(i)          # every layer of these models owns its cache
            q = ops.rope_write_kv(q, k, v, cos, sin, k_cache, v_cache, md.slot_mapping)
            o = attention.attend(md, i, q, self.scaling, self.windows[i], None)
            h = _project(o.reshape(t, -1), [m["o_proj"]])[0]
            x = ops.add_rms_norm(h, residual, w_post, eps_post)
            m = layer._modules["mlp"]._modules
            gate, up = _project(x, [m["gate_proj"], m["up_proj"]])
            h = _project(ops.silu_mul(gate, up), [m["down_proj"]])[0]
        # Only the rows that sample need the final norm and the head.
        norm, head = self.inner.norm, self.model.lm_head
        x = ops.add_rms_norm(h[keep], residual[keep], norm.weight, norm.variance_epsilon)
        if hasattr(head, "token_index"):   # a multi-LoRA head: which of the batch's tokens its rows are
            head.token_index = keep
        return head(x)
