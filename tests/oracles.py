"""Plain float64 references that tests compare methods and kernels against."""

import torch


def naive_attention(q, k, v, causal=True):
    """float64 oracle: q [B, Hq, Tq, D], k/v [B, Hkv, Tk, D]; queries are the last Tq positions."""
    B, Hq, Tq, D = q.shape
    Hkv, Tk = k.shape[1], k.shape[2]
    g = Hq // Hkv
    k = k.double().repeat_interleave(g, dim=1)
    v = v.double().repeat_interleave(g, dim=1)
    s = q.double() @ k.transpose(-1, -2) / D**0.5
    if causal:
        qpos = torch.arange(Tk - Tq, Tk)[:, None]
        s = s.masked_fill(torch.arange(Tk)[None, :] > qpos, float("-inf"))
    return torch.softmax(s, -1) @ v


def rand_kv(B, H, T, D, dtype=torch.float32, device="cpu"):
    """Random keys [B, H, T, D] with a per-channel offset, as real keys have (so centring matters), and values."""
    k = torch.randn(B, H, T, D, device=device) + torch.linspace(-2, 2, D, device=device)
    return k.to(dtype), torch.randn(B, H, T, D, device=device).to(dtype)
