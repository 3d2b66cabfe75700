"""Policy networks that follow the marl-fgmf policy protocol (plain torch, no RLlib).

The policy protocol (DESIGN.md section 1)::

    logits = policy(obs)          # obs: float32 in [0, 1], shape (B, H, W, C)
    values = policy.value(obs)    # (B,)

Three encoders share one :class:`PolicyNetwork` shell:

* ``cnn``    three SiLU convolutions and a dense layer (CleanRL/Nature-CNN style, sized for
             small pixel observations);
* ``vit``    a Vision Transformer (Dosovitskiy et al. 2021): patch embedding, learned position
             embedding, pre-norm GELU transformer blocks, mean pooling;
* ``hybrid`` a convolutional stem whose feature map is tokenised and fed to transformer blocks
             (the "hybrid" ViT of the same paper).

Every encoder exposes a spatial feature map ``(B, K, h, w)`` through the identity module
``encoder.cam_layer``: Grad-CAM++ and the SGAM distillation target hook that module, so all
three archs are explained and defended by the same code.

Activations are smooth (SiLU, GELU) by default: the input Hessian of a ReLU network is zero
almost everywhere except through the softmax, so a curvature penalty on it vanishes
(NOTES-rllib.md, pitfall 7). ``activation="relu"`` is available for comparison.

``PolicyNetwork.input_filter`` is an ``nn.Module`` applied to the observation before the
encoder, identity by default; SGAM plugs in there with one line
(``policy.input_filter = SGAM(...)``).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

ARCHS = ("cnn", "vit", "hybrid")
ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "elu": nn.ELU, "tanh": nn.Tanh, "relu": nn.ReLU}


def _activation(name: str) -> type[nn.Module]:
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; allowed: {', '.join(ACTIVATIONS)}") from None


def _conv_out(size: int, kernel: int, stride: int, pad: int) -> int:
    return (size + 2 * pad - kernel) // stride + 1


class CNNEncoder(nn.Module):
    """Three 3x3 convolutions (stride 1, 2, 2) and a dense layer.

    Args:
        obs_shape: ``(H, W, C)``.
        channels: filters of the three convolutions.
        hidden: size of the embedding.
        activation: one of ``silu`` (default), ``gelu``, ``elu``, ``tanh``, ``relu``.
    """

    def __init__(self, obs_shape: Sequence[int], channels: Sequence[int] = (32, 64, 64),
                 hidden: int = 256, activation: str = "silu"):
        super().__init__()
        h, w, c = obs_shape
        act = _activation(activation)
        layers: list[nn.Module] = []
        in_ch = c
        for i, out_ch in enumerate(channels):
            stride = 1 if i == 0 else 2
            layers += [nn.Conv2d(in_ch, out_ch, 3, stride, 1), act()]
            h, w = _conv_out(h, 3, stride, 1), _conv_out(w, 3, stride, 1)
            in_ch = out_ch
        self.conv = nn.Sequential(*layers)
        self.cam_layer = nn.Identity()  # (B, K, h, w) feature map: Grad-CAM++ / SGAM target
        self.feature_shape = (in_ch, h, w)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(in_ch * h * w, hidden), act())
        self.out_dim = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (B, C, H, W) in [0, 1] -> embedding (B, hidden)."""
        return self.head(self.cam_layer(self.conv(x)))


class TransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + MHA(LN(x))`` then ``x + MLP(LN(x))`` (GELU MLP)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 2.0, activation: str = "gelu"):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        act = _activation(activation)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), act(),
                                 nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm1(x)
        # need_weights=False takes the fused kernel; it has no second derivative on CPU, so
        # double-backward code (SCOR-PIO's HVP) runs it under scorpio.double_backward_safe().
        x = x + self.attn(y, y, y, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class _TokenEncoder(nn.Module):
    """Shared tail of the ViT and hybrid encoders: tokens (B, D, h, w) -> blocks -> pool."""

    def _init_tokens(self, dim: int, grid: tuple[int, int], depth: int, heads: int,
                     hidden: int, activation: str) -> None:
        self.grid = grid
        self.pos = nn.Parameter(torch.zeros(1, grid[0] * grid[1], dim))
        nn.init.trunc_normal_(self.pos, std=0.02)
        self.blocks = nn.Sequential(*[TransformerBlock(dim, heads, activation=activation)
                                      for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.cam_layer = nn.Identity()  # token grid as (B, D, h, w)
        self.feature_shape = (dim, grid[0], grid[1])
        self.head = nn.Sequential(nn.Linear(dim, hidden), _activation(activation)())
        self.out_dim = hidden

    def _encode_tokens(self, feat: torch.Tensor) -> torch.Tensor:
        b, d, h, w = feat.shape
        tokens = feat.flatten(2).transpose(1, 2) + self.pos  # (B, h*w, D)
        tokens = self.norm(self.blocks(tokens))
        fmap = self.cam_layer(tokens.transpose(1, 2).reshape(b, d, h, w))
        return self.head(fmap.mean(dim=(2, 3)))


class ViTEncoder(_TokenEncoder):
    """Vision Transformer: non-overlapping ``patch`` x ``patch`` patches (zero-padded to a
    multiple of the patch), learned position embedding, ``depth`` GELU blocks, mean pooling."""

    def __init__(self, obs_shape: Sequence[int], patch: int = 3, dim: int = 64, depth: int = 2,
                 heads: int = 4, hidden: int = 256, activation: str = "gelu"):
        super().__init__()
        h, w, c = obs_shape
        self.patch = patch
        self.pad = ((-w) % patch, (-h) % patch)
        self.embed = nn.Conv2d(c, dim, patch, patch)
        grid = (math.ceil(h / patch), math.ceil(w / patch))
        self._init_tokens(dim, grid, depth, heads, hidden, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(self.pad):
            x = nn.functional.pad(x, (0, self.pad[0], 0, self.pad[1]))
        return self._encode_tokens(self.embed(x))


class HybridEncoder(_TokenEncoder):
    """Hybrid: two SiLU convolutions (stride 1 and 2) whose feature map becomes the tokens of
    ``depth`` transformer blocks."""

    def __init__(self, obs_shape: Sequence[int], channels: Sequence[int] = (32, 64),
                 depth: int = 1, heads: int = 4, hidden: int = 256, activation: str = "silu"):
        super().__init__()
        h, w, c = obs_shape
        act = _activation(activation)
        self.stem = nn.Sequential(nn.Conv2d(c, channels[0], 3, 1, 1), act(),
                                  nn.Conv2d(channels[0], channels[1], 3, 2, 1), act())
        grid = (_conv_out(h, 3, 2, 1), _conv_out(w, 3, 2, 1))
        self._init_tokens(channels[1], grid, depth, heads, hidden,
                          "gelu" if activation == "silu" else activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._encode_tokens(self.stem(x))


ENCODERS = {"cnn": CNNEncoder, "vit": ViTEncoder, "hybrid": HybridEncoder}


class PolicyNetwork(nn.Module):
    """Actor-critic network on the policy protocol.

    ``forward(obs)`` returns action logits ``(B, n_actions)``; ``value(obs)`` the critic
    ``(B,)``; ``embed(obs)`` the shared embedding. ``obs`` is float in [0, 1], (B, H, W, C).

    Attributes:
        encoder: one of :data:`ENCODERS`; ``encoder.cam_layer`` is its spatial feature map.
        input_filter: module applied to the (B, H, W, C) observation first (identity, or SGAM).
        obs_shape, n_actions, arch: what the network was built for.
    """

    def __init__(self, encoder: nn.Module, obs_shape: Sequence[int], n_actions: int, arch: str):
        super().__init__()
        self.obs_shape = tuple(int(s) for s in obs_shape)
        self.n_actions = int(n_actions)
        self.arch = arch
        self.input_filter: nn.Module = nn.Identity()
        self.encoder = encoder
        self.pi = nn.Linear(encoder.out_dim, n_actions)
        self.vf = nn.Linear(encoder.out_dim, 1)
        # Small policy-head init (PPO implementation detail: near-uniform initial policy).
        nn.init.orthogonal_(self.pi.weight, gain=0.01)
        nn.init.zeros_(self.pi.bias)
        nn.init.orthogonal_(self.vf.weight, gain=1.0)
        nn.init.zeros_(self.vf.bias)

    @property
    def cam_layer(self) -> nn.Module:
        """The module whose output is the (B, K, h, w) feature map used by Grad-CAM++."""
        return self.encoder.cam_layer

    def embed(self, obs: torch.Tensor) -> torch.Tensor:
        x = self.input_filter(obs)
        return self.encoder(x.permute(0, 3, 1, 2))  # (B,H,W,C) -> (B,C,H,W)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.pi(self.embed(obs))

    def value(self, obs: torch.Tensor) -> torch.Tensor:
        return self.vf(self.embed(obs)).squeeze(-1)

    def forward_both(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits and values from one encoder pass."""
        z = self.embed(obs)
        return self.pi(z), self.vf(z).squeeze(-1)


def make_policy_network(arch: str, obs_shape: Sequence[int], n_actions: int,
                        **kwargs) -> PolicyNetwork:
    """Build a policy network following the policy protocol.

    Args:
        arch: ``cnn``, ``vit`` or ``hybrid``.
        obs_shape: ``(H, W, C)`` of one observation.
        n_actions: number of discrete actions.
        **kwargs: passed to the encoder (``hidden``, ``activation``, ``channels``, ``patch``,
            ``dim``, ``depth``, ``heads``).

    Example:
        >>> net = make_policy_network("cnn", (21, 21, 3), 5)
        >>> net(torch.rand(4, 21, 21, 3)).shape
        torch.Size([4, 5])
    """
    if arch not in ENCODERS:
        raise ValueError(f"unknown arch {arch!r}; allowed: {', '.join(ARCHS)}")
    if len(obs_shape) != 3 or any(int(s) < 1 for s in obs_shape):
        raise ValueError(f"obs_shape must be (H, W, C) with positive sizes, got {tuple(obs_shape)}")
    if int(n_actions) < 1:
        raise ValueError(f"n_actions must be >= 1, got {n_actions}")
    encoder = ENCODERS[arch](tuple(int(s) for s in obs_shape), **kwargs)
    return PolicyNetwork(encoder, obs_shape, n_actions, arch)
