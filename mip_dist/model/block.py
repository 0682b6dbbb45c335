"""timm's ViT Block, extended to attend to prompts that enter attention only as keys and values."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from mip_dist.kernels import prompt_attention

Tensor = torch.Tensor


class PromptedBlock(Block):
    """A timm Block (same weights, same names) with an exact-compute prompted forward and the literal one.

    `forward(x)` is timm's; `forward(x, bank, bank_index, inst, impl)` runs the prompted form, so that
    module hooks (ZeRO-3's parameter gathering) see every prompted call. `forward_prompted` computes
    query/MLP rows for `x` only and feeds the prompts to attention as keys/values through the k/v slices
    of the same qkv Linear; `forward_concat` is the literal form (prompts concatenated as tokens after
    CLS, outputs at their positions dropped).
    """

    def forward(self, x: Tensor, bank: Optional[Tensor] = None, bank_index: Optional[Tensor] = None,
                inst: Optional[Tensor] = None, impl: str = "auto", deterministic: bool = False,
                **timm_kwargs) -> Tensor:
        """timm's block on x, or x attending to prompts: exact compute, or `impl="concat"` for the literal form."""
        if bank is None and inst is None:
            return super().forward(x, **timm_kwargs)
        if impl == "concat":
            return self.forward_concat(x, bank, bank_index, inst)
        return self.forward_prompted(x, bank, bank_index, inst, impl=impl, deterministic=deterministic)

    # ZeRO-3 sets this (engine/zero.py): prompt k/v then come from a call of the qkv module itself, which
    # ZeRO gathers and re-gathers for backward; a slice of its weight would be saved by autograd and freed
    # under it. The q rows computed for the prompts are dropped (a few percent more qkv work).
    kv_through_module = False

    @property
    def attn_dim(self) -> int:
        """Width of the concatenated heads (older timm Attention lacks `attn_dim`)."""
        return getattr(self.attn, "attn_dim", self.attn.num_heads * self.attn.head_dim)

    def _split(self, t: Tensor, parts: int) -> tuple[Tensor, ...]:
        """[B, N, parts*H*D] -> `parts` tensors [B, H, N, D]."""
        B, N, _ = t.shape
        t = t.reshape(B, N, parts, self.attn.num_heads, self.attn.head_dim).permute(2, 0, 3, 1, 4)
        return t.unbind(0)

    def qkv_heads(self, x_norm: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v [B, H, N, D] of already-normalised tokens."""
        q, k, v = self._split(self.attn.qkv(x_norm), 3)
        return self.attn.q_norm(q), self.attn.k_norm(k), v

    def kv_heads(self, x_norm: Tensor) -> tuple[Tensor, Tensor]:
        """k, v [B, H, P, D] only (no query rows), from the k/v slices of the qkv weight."""
        if self.kv_through_module:
            _, k, v = self._split(self.attn.qkv(x_norm), 3)
        else:
            d = self.attn_dim
            bias = self.attn.qkv.bias[d:] if self.attn.qkv.bias is not None else None
            k, v = self._split(F.linear(x_norm, self.attn.qkv.weight[d:], bias), 2)
        return self.attn.k_norm(k), v

    def finish(self, residual: Tensor, o: Tensor) -> Tensor:
        """Output projection, residuals and MLP for the query rows; `residual` may broadcast over the batch."""
        B, _, N, _ = o.shape
        o = o.transpose(1, 2).reshape(B, N, self.attn_dim)
        norm = getattr(self.attn, "norm", None)  # timm's optional scale-norm (absent in older timm)
        o = self.attn.proj_drop(self.attn.proj(norm(o) if norm is not None else o))
        x = residual + self.drop_path1(self.ls1(o))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))

    def forward_prompted(
        self,
        x: Tensor,
        bank: Optional[Tensor] = None,
        bank_index: Optional[Tensor] = None,
        inst: Optional[Tensor] = None,
        impl: str = "auto",
        deterministic: bool = False,
    ) -> Tensor:
        """Exact compute: x [B, N, C] attends to [bank[bank_index] | inst | x]; bank [M, Pm, C], inst [B, Pi, C]."""
        if getattr(self.attn, "gate", None) is not None:
            raise ValueError("timm gated attention (attn.gate) is not supported by the prompted forward")
        q, k, v = self.qkv_heads(self.norm1(x))
        bank_k = bank_v = inst_k = inst_v = None
        if bank is not None:
            bank_k, bank_v = self.kv_heads(self.norm1(bank))
        if inst is not None:
            inst_k, inst_v = self.kv_heads(self.norm1(inst))
        o = prompt_attention(q, k, v, bank_k, bank_v, bank_index if bank is not None else None, inst_k, inst_v,
                             scale=self.attn.scale, impl=impl, deterministic=deterministic)
        return self.finish(x, o)

    def forward_concat(
        self,
        x: Tensor,
        bank: Optional[Tensor] = None,
        bank_index: Optional[Tensor] = None,
        inst: Optional[Tensor] = None,
    ) -> Tensor:
        """Literal form: run the block on [CLS, bank[bank_index], inst, patches] and drop the prompt outputs."""
        prompts = []
        if bank is not None:
            prompts.append(bank[bank_index])
        if inst is not None:
            prompts.append(inst)
        if not prompts:
            return Block.forward(self, x)
        p = sum(t.shape[1] for t in prompts)
        out = Block.forward(self, torch.cat([x[:, :1], *prompts, x[:, 1:]], dim=1))  # inside this call's hooks
        return torch.cat([out[:, :1], out[:, 1 + p:]], dim=1)
