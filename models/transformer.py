"""DETR's encoder-decoder transformer, batch-first, attention through SDPA.

Parameters are laid out as in DETR (``self_attn.in_proj_weight``, ``multihead_attn.out_proj``,
``linear1``, ``norm1`` ...) so official checkpoints load with strict key matching.
With a ``PollAndPoolSampler`` the encoder runs on its ``N + M`` tokens instead of the
``H * W`` positions.
"""
import copy
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .denoising import Denoising
from .pnp import PollAndPoolSampler, SampledTokens


class MultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.MultiheadAttention``'s parameter names.

    Computed with ``scaled_dot_product_attention``: no attention matrix is kept. When ``query is
    key`` (self-attention with the position added once) one product gives both q and k.
    query ``(B, Lq, C)``, key/value ``(B, Lk, C)``, key_padding_mask ``(B, Lk)`` True = ignore,
    attn_mask ``(Lq, Lk)`` bool, True where the query may attend to the key.
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0):
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"hidden dim {embed_dim} is not divisible by {num_heads} heads")
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * embed_dim))
        self.out_proj = nn.Linear(embed_dim, embed_dim)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, query: Tensor, key: Tensor, value: Tensor,
                key_padding_mask: Optional[Tensor] = None, attn_mask: Optional[Tensor] = None) -> Tensor:
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        if query is key:  # self-attention: one product gives q and k
            q, k = F.linear(query, self.in_proj_weight[:2 * self.embed_dim],
                            self.in_proj_bias[:2 * self.embed_dim]).chunk(2, dim=-1)
        else:
            q, k = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k)
        v = F.linear(value, w_v, b_v)
        batch, len_q, dim = q.shape
        heads = self.num_heads

        def split(t: Tensor) -> Tensor:
            return t.view(batch, t.shape[1], heads, dim // heads).transpose(1, 2)

        allowed = None if key_padding_mask is None else ~key_padding_mask[:, None, None, :]
        if attn_mask is not None:
            allowed = attn_mask if allowed is None else allowed & attn_mask
        out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=allowed,
                                             dropout_p=self.dropout if self.training else 0.0)
        return self.out_proj(out.transpose(1, 2).reshape(batch, len_q, dim))


def _with_pos(x: Tensor, pos: Optional[Tensor]) -> Tensor:
    return x if pos is None else x + pos


class TransformerEncoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before

    def _attend(self, x: Tensor, key_padding_mask: Optional[Tensor], pos: Optional[Tensor]) -> Tensor:
        q = k = _with_pos(x, pos)
        return self.dropout1(self.self_attn(q, k, x, key_padding_mask))

    def _feedforward(self, x: Tensor) -> Tensor:
        return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, src: Tensor, key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None) -> Tensor:
        if self.normalize_before:
            src = src + self._attend(self.norm1(src), key_padding_mask, pos)
            return src + self._feedforward(self.norm2(src))
        src = self.norm1(src + self._attend(src, key_padding_mask, pos))
        return self.norm2(src + self._feedforward(src))


class TransformerDecoderLayer(nn.Module):
    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False):
        super().__init__()
        self.self_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.multihead_attn = MultiheadAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.dropout3 = nn.Dropout(dropout)
        self.activation = _activation(activation)
        self.normalize_before = normalize_before

    def _self_attend(self, x: Tensor, query_pos: Optional[Tensor], self_attn_mask: Optional[Tensor]) -> Tensor:
        q = k = _with_pos(x, query_pos)
        return self.dropout1(self.self_attn(q, k, x, attn_mask=self_attn_mask))

    def _cross_attend(self, x: Tensor, memory: Tensor, memory_key_padding_mask: Optional[Tensor],
                      pos: Optional[Tensor], query_pos: Optional[Tensor]) -> Tensor:
        out = self.multihead_attn(_with_pos(x, query_pos), _with_pos(memory, pos), memory,
                                  memory_key_padding_mask)
        return self.dropout2(out)

    def _feedforward(self, x: Tensor) -> Tensor:
        return self.dropout3(self.linear2(self.dropout(self.activation(self.linear1(x)))))

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None, query_pos: Optional[Tensor] = None,
                self_attn_mask: Optional[Tensor] = None) -> Tensor:
        """``self_attn_mask (Q, Q)`` bool, True where query i may attend to query j (None: all)."""
        if self.normalize_before:
            tgt = tgt + self._self_attend(self.norm1(tgt), query_pos, self_attn_mask)
            tgt = tgt + self._cross_attend(self.norm2(tgt), memory, memory_key_padding_mask, pos, query_pos)
            return tgt + self._feedforward(self.norm3(tgt))
        tgt = self.norm1(tgt + self._self_attend(tgt, query_pos, self_attn_mask))
        tgt = self.norm2(tgt + self._cross_attend(tgt, memory, memory_key_padding_mask, pos, query_pos))
        return self.norm3(tgt + self._feedforward(tgt))


class TransformerEncoder(nn.Module):
    def __init__(self, layer: TransformerEncoderLayer, num_layers: int, norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm

    def forward(self, src: Tensor, key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None) -> Tensor:
        for layer in self.layers:
            src = layer(src, key_padding_mask, pos)
        return src if self.norm is None else self.norm(src)


class TransformerDecoder(nn.Module):
    """Returns ``(num_layers, B, Q, C)`` normed outputs of every layer, or ``(1, B, Q, C)``."""

    def __init__(self, layer: TransformerDecoderLayer, num_layers: int, norm: nn.Module,
                 return_intermediate: bool = False):
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.norm = norm
        self.return_intermediate = return_intermediate

    def forward(self, tgt: Tensor, memory: Tensor, memory_key_padding_mask: Optional[Tensor] = None,
                pos: Optional[Tensor] = None, query_pos: Optional[Tensor] = None,
                self_attn_mask: Optional[Tensor] = None) -> Tensor:
        intermediate = []
        for layer in self.layers:
            tgt = layer(tgt, memory, memory_key_padding_mask, pos, query_pos, self_attn_mask)
            if self.return_intermediate:
                intermediate.append(self.norm(tgt))
        if self.return_intermediate:
            return torch.stack(intermediate)
        return self.norm(tgt)[None]


class Transformer(nn.Module):
    """Encoder over the image tokens (all positions, or the sampler's), decoder over queries.

    ``forward(src, mask, query_embed, pos_embed, sample_ratio, num_valid, query_groups, denoising)`` with src/pos
    ``(B, C, H, W)``, mask ``(B, H, W)``, query_embed ``(Q, C)`` and optionally ``num_valid``, the
    sampler's host counts of unpadded positions (``PollAndPoolSampler.forward``), returns
    ``(hs, memory, sampled)``: decoder outputs ``(num_dec_layers or 1, B, Q, C)``, encoder memory
    ``(B, T, C)`` with T = H*W or N + M, and the sampler's ``SampledTokens`` (None without a sampler).
    With ``query_groups`` G > 1 the Q queries are G consecutive groups of equal size (Group DETR)
    and the decoder's self-attention stays within each group (``group_attention_mask``); all
    groups cross-attend to the same memory. With ``denoising`` (DN-DETR, ``models.denoising``) its
    D queries run after the Q others (``hs`` then holds Q + D) under ``denoising_attention_mask``.
    """

    def __init__(self, d_model: int = 256, nhead: int = 8, num_encoder_layers: int = 6,
                 num_decoder_layers: int = 6, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu", normalize_before: bool = False,
                 return_intermediate_dec: bool = False, sampler: Optional[PollAndPoolSampler] = None):
        super().__init__()
        encoder_layer = TransformerEncoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                                normalize_before)
        self.encoder = TransformerEncoder(encoder_layer, num_encoder_layers,
                                          nn.LayerNorm(d_model) if normalize_before else None)
        decoder_layer = TransformerDecoderLayer(d_model, nhead, dim_feedforward, dropout, activation,
                                                normalize_before)
        self.decoder = TransformerDecoder(decoder_layer, num_decoder_layers, nn.LayerNorm(d_model),
                                          return_intermediate=return_intermediate_dec)
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        # Attached after the xavier init, so the sampler keeps PyTorch's default init (as published).
        self.sampler = sampler
        self.d_model = d_model
        self.nhead = nhead

    def encoder_inputs(self, src: Tensor, mask: Tensor, pos_embed: Tensor, sample_ratio: Optional[float] = None,
                       num_valid: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor, Optional[SampledTokens]]:
        """The encoder's ``tokens``, their ``pos`` (both ``(B, T, C)``) and ``key_padding_mask``
        ``(B, T)``: the sampler's ``N + M`` tokens (also returned), or every position."""
        if self.sampler is None:
            return src.flatten(2).transpose(1, 2), pos_embed.flatten(2).transpose(1, 2), mask.flatten(1), None
        sampled = self.sampler(src, mask, pos_embed, sample_ratio, num_valid)
        return sampled.tokens, sampled.pos, sampled.key_padding_mask, sampled

    def forward(self, src: Tensor, mask: Tensor, query_embed: Tensor, pos_embed: Tensor,
                sample_ratio: Optional[float] = None, num_valid: Optional[Tensor] = None,
                query_groups: int = 1, denoising: Optional[Denoising] = None
                ) -> tuple[Tensor, Tensor, Optional[SampledTokens]]:
        tokens, pos, key_padding_mask, sampled = self.encoder_inputs(src, mask, pos_embed, sample_ratio, num_valid)
        query_pos = query_embed.unsqueeze(0).expand(src.shape[0], -1, -1)
        tgt = torch.zeros_like(query_pos)
        self_attn_mask = None
        if query_groups > 1:
            self_attn_mask = group_attention_mask(query_embed.shape[0] // query_groups, query_groups,
                                                  query_embed.device)
        if denoising is not None:
            self_attn_mask = denoising_attention_mask(self_attn_mask, query_embed.shape[0], denoising.group_size,
                                                      denoising.groups, query_embed.device)
            query_pos = torch.cat([query_pos, denoising.pos.to(query_pos.dtype)], dim=1)
            tgt = torch.cat([tgt, denoising.content.to(tgt.dtype)], dim=1)
        memory = self.encoder(tokens, key_padding_mask, pos)
        hs = self.decoder(tgt, memory, key_padding_mask, pos, query_pos, self_attn_mask)
        return hs, memory, sampled


def group_attention_mask(group_size: int, groups: int, device: torch.device) -> Tensor:
    """``(G * S, G * S)`` bool, block-diagonal: True where query i and query j are in the same
    of ``groups`` consecutive groups of ``group_size`` queries."""
    group = torch.arange(group_size * groups, device=device) // group_size
    return group[:, None] == group[None, :]


def denoising_attention_mask(matching_mask: Optional[Tensor], num_matching: int, group_size: int, groups: int,
                             device: torch.device) -> Tensor:
    """``(Q + K * S, Q + K * S)`` bool, True where query i may attend to query j, for Q matching
    queries (attending as ``matching_mask`` says, None: to each other) followed by K groups of S
    denoising queries (DN-DETR): the matching queries never see a denoising query, and each
    denoising group sees itself and the matching queries."""
    total = num_matching + group_size * groups
    allowed = torch.zeros(total, total, dtype=torch.bool, device=device)
    allowed[:num_matching, :num_matching] = True if matching_mask is None else matching_mask
    allowed[num_matching:, :num_matching] = True
    allowed[num_matching:, num_matching:] = group_attention_mask(group_size, groups, device)
    return allowed


def _activation(name: str) -> nn.Module:
    activations = {"relu": nn.ReLU(), "gelu": nn.GELU()}
    if name not in activations:
        raise ValueError(f"activation should be one of {sorted(activations)}, got {name!r}")
    return activations[name]


def build_transformer(args: Any) -> Transformer:
    sampler = None
    if not args.no_pnp:
        stride_32 = not args.dilation and getattr(args, "backbone_last_stage", 4) == 4
        num_coarse = args.unsample_abstract_number or (30 if stride_32 else 100)
        sampler = PollAndPoolSampler(args.hidden_dim, num_coarse, default_ratio=args.sample_topk_ratio,
                                     score_pred_net=args.score_pred_net, kproj_net=args.kproj_net,
                                     pos_embed_kproj=args.pos_embed_kproj,
                                     retrofit=getattr(args, "retrofit", False))  # False: args stored before the flag
    return Transformer(d_model=args.hidden_dim, nhead=args.nheads, num_encoder_layers=args.enc_layers,
                       num_decoder_layers=args.dec_layers, dim_feedforward=args.dim_feedforward,
                       dropout=args.dropout, normalize_before=args.pre_norm, return_intermediate_dec=True,
                       sampler=sampler)
