"""The MIP model: prompted TransReID-style ViT with MPL, IPG, JPM, BNNeck heads and IAEL heads."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Optional

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm, trunc_normal_
from timm.models.vision_transformer import init_weights_vit_timm
from torch import nn

from mip_dist.config import ATTENTION_IMPLS, AttentionConfig, ModelConfig
from mip_dist.kernels import host_range

from .block import PromptedBlock
from .embed import build_token_embed
from .heads import BNNeckHead
from .ipg import FusionIPG, GenerationIPG
from .jpm import FinalBlock, shuffle_unit, split_parts
from .mpl import ModalityPrompts
from .pretrained import load_pretrained

log = logging.getLogger(__name__)
Tensor = torch.Tensor


@dataclass
class MIPOutput:
    """Everything the losses and the evaluator read from one forward pass."""

    global_feat: Tensor  # [B, C] pre-BN
    local_feats: Optional[Tensor]  # [B, P, C] pre-BN, None without JPM
    bn_feats: list[Tensor]  # 1 + P tensors [B, C] (global first)
    logits: list[Tensor]  # 1 + P tensors [B, num_classes] (global first)
    prompt_logits: list[Tensor] = field(default_factory=list)  # IAEL, one [B, num_classes] per prompted layer
    instance_prompts: list[Tensor] = field(default_factory=list)  # mean instance prompt [B, C] per prompted layer

    @property
    def feats(self) -> list[Tensor]:
        """Pre-BN features, global first, then each local part."""
        locals_ = [] if self.local_feats is None else list(self.local_feats.unbind(1))
        return [self.global_feat] + locals_


@dataclass
class _Trunk:
    """Token state inside the backbone: tokens entering block `at` (or after all blocks) and its prompts."""

    tokens: Tensor
    bank: Optional[Tensor] = None
    inst: Optional[Tensor] = None
    inst_means: list[Tensor] = field(default_factory=list)


def _make_block(cfg: ModelConfig, drop_path: float) -> PromptedBlock:
    """One backbone-shaped block (timm weights layout)."""
    return PromptedBlock(
        dim=cfg.embed_dim, num_heads=cfg.num_heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=cfg.qkv_bias,
        proj_drop=cfg.drop_rate, attn_drop=cfg.attn_drop_rate, drop_path=drop_path,
        norm_layer=partial(LayerNorm, eps=1e-6),
    )


class MIP(nn.Module):
    """TransReID-style ViT (overlapping patches, SIE, JPM) with modality and instance prompts.

    Blocks 0..L-1 are prompted (fresh prompts per layer, prompt outputs discarded). With JPM the last
    backbone block exists only as its two copies `b1` (global) and `b2` (local parts), so `blocks` holds
    depth-1 blocks; without JPM `blocks` holds all of them followed by `norm`.

    `model.layout=release` is the authors' released network: their prompted loop returns before block
    depth-2, so the last entry of `blocks` is kept (loaded, frozen: it gets no gradient there either) but
    never run; the IPG block has no drop-path and the IAEL BN biases train (see the README's fidelity table).
    """

    num_prefix_tokens = 1  # read by timm's checkpoint_filter_fn
    no_embed_class = False

    def __init__(self, cfg: ModelConfig, num_classes: int, num_cameras: int,
                 attention_impl: str = "auto", deterministic: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.num_classes = num_classes
        self.num_cameras = num_cameras
        self.deterministic = deterministic
        self.embed_dim = C = cfg.embed_dim
        self.num_prompted = cfg.num_prompted_layers if (cfg.use_mpl or cfg.use_ipg) else 0
        self.num_parts = cfg.num_parts if cfg.jpm else 0
        self._check(cfg, num_classes, num_cameras)

        self.patch_embed = build_token_embed(cfg)
        if cfg.jpm and self.patch_embed.num_patches < cfg.num_parts:
            raise ValueError(f"model.num_parts={cfg.num_parts} exceeds the {self.patch_embed.num_patches} patch tokens")
        self.cls_token = nn.Parameter(torch.zeros(1, 1, C))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.patch_embed.num_patches, C))
        self.sie_embed = nn.Parameter(torch.zeros(num_cameras, 1, C)) if cfg.sie else None
        self.pos_drop = nn.Dropout(cfg.drop_rate)
        dpr = torch.linspace(0.0, cfg.drop_path, cfg.depth).tolist()  # stochastic depth rule
        n_blocks = cfg.depth - 1 if cfg.jpm else cfg.depth
        self.release = cfg.layout == "release"
        self.blocks = nn.ModuleList([_make_block(cfg, dpr[i]) for i in range(n_blocks)])
        self.num_run_blocks = n_blocks - 1 if self.release else n_blocks  # release: theirs returns at depth-2
        if cfg.jpm:
            self.norm = None
            self.b1 = FinalBlock(_make_block(cfg, dpr[-1]), LayerNorm(C, eps=1e-6))
            self.b2 = FinalBlock(_make_block(cfg, dpr[-1]), LayerNorm(C, eps=1e-6))
        else:
            self.norm = LayerNorm(C, eps=1e-6)
            self.b1 = self.b2 = None
        L = self.num_prompted
        self.mpl = (ModalityPrompts(L, cfg.num_modality_prompts, C, cfg.patch_size, cfg.prompt_dropout)
                    if cfg.use_mpl and L else None)
        self.ipg: Optional[nn.Module] = None
        if cfg.use_ipg and L:
            if cfg.ipg_mode == "generation":
                ipg_drop_path = 0.0 if self.release else dpr[-1]  # theirs: a deep copy of block 0 (drop-path 0)
                self.ipg = GenerationIPG(_make_block(cfg, ipg_drop_path), cfg.num_instance_prompts, C)
            else:
                self.ipg = FusionIPG(L, cfg.num_instance_prompts, cfg.ipg_fusion_bank, C, cfg.patch_size)
        self.heads = nn.ModuleList([BNNeckHead(C, num_classes) for _ in range(1 + self.num_parts)])
        self.iael_heads = (nn.ModuleList([BNNeckHead(C, num_classes, train_bias=self.release) for _ in range(L)])
                           if self.ipg is not None and cfg.iael_heads else None)
        self.attention_impl = attention_impl
        self.apply(init_weights_vit_timm)  # children first, so modules' own init_weights() win
        self._init_embeddings()
        if cfg.jpm:
            self.b2.load_state_dict(self.b1.state_dict())  # b1, b2: copies of the same last block
        if self.release:
            self.blocks[-1].requires_grad_(False)  # never run: no gradient, so no optimizer state either

    @staticmethod
    def _check(cfg: ModelConfig, num_classes: int, num_cameras: int) -> None:
        """Refuse sizes the forward cannot run, naming the setting."""
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if cfg.sie and num_cameras < 1:
            raise ValueError(f"num_cameras must be >= 1 with model.sie, got {num_cameras}")
        if (cfg.use_mpl or cfg.use_ipg) and cfg.num_prompted_layers < 1:
            raise ValueError("model.prompted_layers: 0 prompted layers with use_mpl/use_ipg on; "
                             "switch the prompt modules off instead")
        if cfg.jpm and cfg.num_prompted_layers > cfg.depth - 1:
            raise ValueError(f"model.prompted_layers={cfg.num_prompted_layers}: with JPM at most depth-1 "
                             f"({cfg.depth - 1}) blocks can be prompted")
        if cfg.layout == "release" and (not cfg.jpm or cfg.num_prompted_layers != cfg.depth - 2):
            raise ValueError(f"model.layout=release is the authors' JPM network with blocks 0..depth-3 prompted; "
                             f"got jpm={cfg.jpm}, prompted layers {cfg.num_prompted_layers} (need {cfg.depth - 2})")

    def _init_embeddings(self) -> None:
        """TransReID: CLS, position and camera embeddings ~ trunc_normal(0.02)."""
        trunc_normal_(self.cls_token, std=0.02)
        trunc_normal_(self.pos_embed, std=0.02)
        if self.sie_embed is not None:
            trunc_normal_(self.sie_embed, std=0.02)

    # ------------------------------------------------------------------------------ settings

    @property
    def attention_impl(self) -> str:
        return self._impl

    @attention_impl.setter
    def attention_impl(self, impl: str) -> None:
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention.impl: {impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
        if impl != "concat" and self.cfg.attn_drop_rate > 0 and self.num_prompted:
            raise ValueError("model.attn_drop_rate > 0 needs attention.impl=concat: the prompt-attention "
                             "kernel has no attention dropout")
        self._impl = impl

    @property
    def grid_size(self) -> tuple[int, int]:
        return self.patch_embed.grid_size

    # ------------------------------------------------------------------------------ weights

    def load_pretrained(self, path: str) -> dict:
        """Load a timm ViT checkpoint (see pretrained.load_pretrained); b1/b2 receive its last block."""
        return load_pretrained(self, path)

    # ------------------------------------------------------------------------------ forward

    def _check_labels(self, images: Tensor, modality: Tensor, camera: Optional[Tensor]) -> None:
        """Clear errors for label tensors the indexing would otherwise fail on obscurely.

        Shapes are always checked. Value ranges are read only from CPU tensors, through NumPy (no
        dispatched op, no device to wait for); device tensors are not read, because the forward must
        not sync the GPU: the trainer and the evaluator check the host batch before moving it."""
        B = images.shape[0]
        if self.num_prompted and self.mpl is not None:
            if modality is None or modality.shape != (B,):
                raise ValueError(f"modality must be a [B={B}] tensor of 0 (infrared) / 1 (visible)")
            lo_hi = host_range(modality)
            if lo_hi is not None and (lo_hi[0] < 0 or lo_hi[1] > 1):
                raise ValueError(f"modality values must be 0 (infrared) or 1 (visible); got min {lo_hi[0]}, "
                                 f"max {lo_hi[1]}")
        if self.sie_embed is not None:
            if camera is None or camera.shape != (B,):
                raise ValueError(f"camera must be a [B={B}] tensor of 0-based camera indices")
            lo_hi = host_range(camera)
            if lo_hi is not None and (lo_hi[0] < 0 or lo_hi[1] >= self.num_cameras):
                raise ValueError(f"camera indices must be 0-based in [0, {self.num_cameras}); "
                                 f"got min {lo_hi[0]}, max {lo_hi[1]}")

    def embed(self, images: Tensor, camera: Optional[Tensor]) -> Tensor:
        """[B, 1 + Np, C]: CLS + patches, position embedding, SIE camera embedding x sie_coef."""
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        if self.sie_embed is not None:
            x = x + self.cfg.sie_coef * self.sie_embed[camera]
        return self.pos_drop(x)

    def _trunk(self, images: Tensor, modality: Tensor, camera: Optional[Tensor],
               stop_at: Optional[int] = None) -> _Trunk:
        """Run `blocks` (prompted ones first); with `stop_at`, return the state entering that block."""
        self._check_labels(images, modality, camera)
        x = self.embed(images, camera)
        bank_all = self.mpl() if self.mpl is not None else None  # [2, L, Pm, C], once per step
        inst_means: list[Tensor] = []
        for i in range(self.num_run_blocks):
            blk = self.blocks[i]
            bank = inst = None
            if i < self.num_prompted:
                bank = bank_all[:, i] if bank_all is not None else None
                if self.ipg is not None:
                    inst = self.ipg(i, x, impl=self._impl, deterministic=self.deterministic)
            if i == stop_at:
                return _Trunk(x, bank, inst, inst_means)
            if inst is not None:
                inst_means.append(inst.mean(dim=1))
            x = blk(x, bank, modality, inst, impl=self._impl, deterministic=self.deterministic)
        return _Trunk(x, inst_means=inst_means)

    def _pool(self, tokens: Tensor) -> Tensor:
        """Global feature [B, C]: the class token (model.global_pool=token) or the mean patch token (avg, as timm)."""
        return tokens[:, 1:].mean(dim=1) if self.cfg.global_pool == "avg" else tokens[:, 0]

    def _features(self, tokens: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """(global [B, C], local [B, P, C] or None) from the tokens leaving `blocks`."""
        if self.b1 is None:
            return self._pool(self.norm(tokens)), None
        global_feat = self._pool(self.b1(tokens))
        parts = split_parts(tokens, shuffle_unit(tokens, self.cfg.shift, self.cfg.shuffle_groups), self.num_parts)
        local = self.b2(parts)[:, 0].reshape(tokens.shape[0], self.num_parts, -1)
        return global_feat, local

    def forward(self, images: Tensor, modality: Tensor, camera: Optional[Tensor] = None) -> MIPOutput:
        """images [B, 3, H, W], modality [B] (0 IR / 1 RGB), camera [B] 0-based -> MIPOutput."""
        trunk = self._trunk(images, modality, camera)
        global_feat, local = self._features(trunk.tokens)
        feats = [global_feat] + ([] if local is None else list(local.unbind(1)))
        bn_feats, logits = [], []
        for head, f in zip(self.heads, feats):
            bn, lg = head(f)
            bn_feats.append(bn)
            logits.append(lg)
        prompt_logits = []
        if self.iael_heads is not None:
            prompt_logits = [head(m)[1] for head, m in zip(self.iael_heads, trunk.inst_means)]
        return MIPOutput(global_feat, local, bn_feats, logits, prompt_logits, trunk.inst_means)

    def extract(self, images: Tensor, modality: Tensor, camera: Optional[Tensor] = None) -> Tensor:
        """Test feature [B, C*(1+P)]: L2-normalised concat[global, local_k / P ...], taken before BN."""
        global_feat, local = self._features(self._trunk(images, modality, camera).tokens)
        parts = [global_feat] if local is None else [global_feat, (local / self.num_parts).flatten(1)]
        return F.normalize(torch.cat(parts, dim=1), dim=1)

    def cls_attention(self, images: Tensor, modality: Tensor, camera: Optional[Tensor] = None) -> Tensor:
        """[B, Hp, Wp]: head-averaged CLS -> patch attention of the last prompted block (last block without prompts).

        The softmax runs over all keys the block sees (prompts included); only the patch columns are returned.
        """
        index = self.num_prompted - 1 if self.num_prompted else self.num_run_blocks - 1
        st = self._trunk(images, modality, camera, stop_at=index)
        blk = self.blocks[index]
        x = st.tokens
        prompts = ([st.bank[modality]] if st.bank is not None else []) + ([st.inst] if st.inst is not None else [])
        keys_in = torch.cat([x[:, :1], *prompts, x[:, 1:]], dim=1)
        q, k, _ = blk.qkv_heads(blk.norm1(keys_in))
        attn = (q[:, :, :1] @ k.transpose(-2, -1) * blk.attn.scale).softmax(dim=-1)  # [B, H, 1, T]
        n = self.patch_embed.num_patches
        return attn[:, :, 0, -n:].mean(dim=1).reshape(x.shape[0], *self.patch_embed.grid_size)


def build_model(model_cfg: ModelConfig, attention_cfg: AttentionConfig, num_classes: int, num_cameras: int) -> MIP:
    """MIP from its config (random init; call `load_pretrained(model, model_cfg.pretrained)` for weights)."""
    model = MIP(model_cfg, num_classes, num_cameras, attention_impl=attention_cfg.impl,
                deterministic=attention_cfg.deterministic)
    n = sum(p.numel() for p in model.parameters())
    log.info("built MIP: %d blocks (%d prompted), jpm=%s, mpl=%s, ipg=%s, %.1fM parameters, attention=%s",
             model_cfg.depth, model.num_prompted, model_cfg.jpm, model.mpl is not None,
             model_cfg.ipg_mode if model.ipg is not None else None, n / 1e6, attention_cfg.impl)
    return model
