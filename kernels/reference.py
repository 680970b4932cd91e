"""The pure-PyTorch reference for every op: the oracle the tests compare against and the CPU fallback.

Written from the math, the way the book derives it, and deliberately plain:

* attention is an explicit ``softmax(q k^T * scale + causal_mask) v`` with the (Tq, Tk) score matrix
  in memory;
* LayerNorm is the biased mean/variance of the last dimension;
* cross-entropy is a log-softmax followed by a gather of the target's log-probability.

Every op computes in float32 (float64 stays float64) whatever the input dtype, with autocast switched
off so that a surrounding ``torch.autocast`` cannot quietly downcast the matmuls, and returns the
input's dtype.  The one exception is the loss: like ``F.cross_entropy`` under autocast it is returned
in float32, because a bfloat16 scalar keeps only ~3 significant digits of the loss.

None of these functions call ``F.scaled_dot_product_attention``, ``F.layer_norm`` or
``F.cross_entropy``: those are PyTorch's own fast paths, the baselines the benchmarks measure against,
and an oracle must not be one of the things it judges.  Gradients come from autograd through these
same expressions.

Inputs are assumed valid here; ``kernels/_validate.py`` checks them once, in the public API.
"""
from __future__ import annotations

import contextlib
import math

import torch

__all__ = ["causal_attention", "layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm", "rope", "swiglu",
           "cross_entropy", "linear_cross_entropy"]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything narrower (fp16, bf16, fp32) is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _exact(device: torch.device):
    """A region where autocast is off, so fp32 matmuls really run in fp32."""
    if device.type in ("cpu", "cuda"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Causal scaled dot-product attention, ``softmax(q k^T * scale + mask) v``.

    q: (B, H, Tq, D); k, v: (B, H_kv, Tk, D) with Tq <= Tk.  Returns (B, H, Tq, D) in q's dtype.

    Grouped-query attention (H_kv < H, H a multiple of H_kv): query head h reads k/v head
    h // (H / H_kv).  The reference simply repeats each k/v head for its group (Hugging Face's
    ``repeat_kv``), so autograd sums the group's gradients into dk and dv; the kernels never copy them.

    The mask is aligned bottom-right: the Tq queries are the *last* Tq positions of the Tk-long
    sequence, so query i (0-based) sits at absolute position i + Tk - Tq and sees keys 0..i + Tk - Tq.
    With Tq == Tk this is the usual lower-triangular mask; with Tq < Tk it is what a KV cache needs
    (new queries attend to all cached keys plus the new ones up to themselves).

    Non-finite inputs.  A row that attends to a non-finite value -- a NaN or inf in q_i, in a value
    v_j it sees, a NaN in a key it sees, or an infinite score -- is not finite: here and on the "torch"
    and "cuda" backends all of it is NaN; on "triton" and "pytorch" it is what IEEE arithmetic gives
    (an inf in v_j leaves inf or NaN in that column).  An infinite key whose score is -inf is a
    probability of 0, as a masked key.  A query never reads the future: on "torch" and "cuda" a
    non-finite value at a later position never reaches row i, neither its output nor its dq, not even
    as 0 * nan through a masked probability.  The "triton" kernels do what flash-attention's do: inside
    the diagonal tile a masked probability is 0 and 0 * nan is NaN, so a bad key or value at position j
    may make rows j - (Tk - Tq) - 127 .. j - (Tk - Tq) - 1 NaN where they would be NaN-free (never
    wrong numbers: NaN); rows further back are exact.  Zeroing the bad entries in the kernel (as the
    CUDA kernels do in shared memory) pushed 37 (triton 3.8) and 61 (triton 3.6) of the 738 tile
    configurations the AOT check compiles into register spills
    (bench/results/attention_nonfinite_aot_2026-12-02_0e3122b.md).  "pytorch" is SDPA as it comes.  The
    gradients that flow back from a non-finite row are unspecified.
    """
    out_dtype = q.dtype
    Tq, Tk, D = q.shape[-2], k.shape[-2], q.shape[-1]
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    group = q.shape[1] // k.shape[1]  # query heads per k/v head
    if group > 1:  # (B, H_kv, Tk, D) -> (B, H, Tk, D): heads h*group .. h*group + group - 1 share k/v head h
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    with _exact(q.device):
        acc = _compute_dtype(q.dtype)
        q, k, v = q.to(acc), k.to(acc), v.to(acc)
        scores = _scores(q, k) * scale  # (B, H, Tq, Tk)
        # keep[i, j] is True where key j is visible to query i: j <= i + (Tk - Tq)
        keep = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
        scores = scores.masked_fill(~keep, float("-inf"))
        # softmax written out: subtracting the row max keeps exp() from overflowing; it changes
        # nothing mathematically (softmax is shift invariant), so it carries no gradient.
        row_max = scores.amax(dim=-1, keepdim=True).detach()
        weights = torch.exp(scores - row_max)
        probs = weights / weights.sum(dim=-1, keepdim=True)  # (B, H, Tq, Tk), rows sum to 1
        v, seen = finite_values(v, Tq)
        out = (probs @ v).masked_fill(seen[..., None], float("nan"))  # (B, H, Tq, D)
    return out.to(out_dtype)


class _Scores(torch.autograd.Function):
    """``q @ k^T``, whose backward never multiplies a (masked, zero) gradient by a non-finite key:
    autograd's dq = dS @ k would pass a NaN key to every row, those that never see it included.  The
    forward is the plain product (IEEE, infinities and all); the backward takes dq = dS @ k with k's
    non-finite entries as 0, which changes only the dq of rows that attend to such a key (unspecified).
    No data-dependent branch: it traces into one graph under torch.compile."""

    @staticmethod
    def forward(q, k):
        return q @ k.transpose(-2, -1)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, ds):
        q, k = ctx.saved_tensors
        k_finite = torch.where(torch.isfinite(k), k, torch.zeros((), dtype=k.dtype, device=k.device))
        return ds @ k_finite, ds.transpose(-2, -1) @ q


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    return _Scores.apply(q, k)


def finite_values(v: torch.Tensor, Tq: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(v with its non-finite entries zeroed, (B, H, Tq) True where a query sees one of them).

    ``probs @ v`` would pass a NaN in v_j to every row through probs = 0 (0 * nan = nan), the rows
    that must not see position j included; with the entries zeroed nothing crosses a mask, and the
    rows that do attend to a non-finite v_j (query i sees keys j <= i + Tk - Tq) are set to NaN.
    """
    finite = torch.isfinite(v)
    bad = ~finite.all(dim=-1)  # (B, H, Tk): v_j holds a non-finite value
    seen = bad.cumsum(dim=-1) > 0  # (B, H, Tk): one at or before position j
    return torch.where(finite, v, torch.zeros((), dtype=v.dtype, device=v.device)), seen[..., v.shape[-2] - Tq:]


def layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dimension: ``(x - mean) / sqrt(var + eps) * weight + bias``.

    x: (..., C); weight, bias: (C,).  The variance is the biased one (divide by C), as in GPT-2.
    Returns x's shape and dtype.
    """
    out_dtype = x.dtype
    with _exact(x.device):
        acc = _compute_dtype(x.dtype)
        x = x.to(acc)
        # the mean of x - x[..., :1], plus x[..., :1]: exact for a constant row (which then normalizes
        # to exactly 0 rather than to rounding noise times 1/sqrt(eps)), small summands for rows like
        # 1e4 + noise; the shift is a constant, so it changes nothing mathematically
        shift = x[..., :1].detach()  # (..., 1)
        mean = shift + (x - shift).mean(dim=-1, keepdim=True)  # (..., 1)
        var = ((x - mean) ** 2).mean(dim=-1, keepdim=True)  # (..., 1)
        x_hat = (x - mean) * torch.rsqrt(var + eps)  # (..., C), zero mean, unit variance
        y = x_hat * weight.to(acc) + bias.to(acc)
    return y.to(out_dtype)


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-5
) -> tuple[torch.Tensor, torch.Tensor]:
    """The pre-LN block's "add, then normalize": returns ``(layer_norm(x + residual), x + residual)``.

    x, residual: (..., C), one dtype; the sum is formed in fp32 and both outputs are in x's dtype.
    A fused kernel reads x and residual once and writes both outputs, instead of a separate add.
    """
    with _exact(x.device):
        total = (x.to(_compute_dtype(x.dtype)) + residual.to(_compute_dtype(x.dtype))).to(x.dtype)  # (..., C)
    return layer_norm(total, weight, bias, eps), total


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm over the last dimension: ``x / sqrt(mean(x**2) + eps) * weight`` (no mean, no bias).

    x: (..., C); weight: (C,).  Returns x's shape and dtype.  The row is first divided by a constant s
    (which changes nothing mathematically: the eps term becomes eps / s**2): x**2 of an fp32 row with
    entries near 1e20 would overflow, and of one near 1e-20 underflow to 0.  s is the row's largest
    magnitude, but at least sqrt(eps): then eps / s**2 <= 1 cannot overflow either (for s = 1e-20 it
    would be 1e34 computed as eps * (1 / s**2), and 1 / s**2 = 1e40 is inf in fp32), an all-zero row
    needs no special case, and entries far below sqrt(eps) count for nothing next to eps anyway.
    """
    out_dtype = x.dtype
    with _exact(x.device):
        acc = _compute_dtype(x.dtype)
        x = x.to(acc)
        s = x.abs().amax(dim=-1, keepdim=True).detach().clamp(min=math.sqrt(eps))  # (..., 1)
        y = x / s  # (..., C), entries in [-1, 1]
        ms = (y * y).mean(dim=-1, keepdim=True) + eps / (s * s)  # (mean(x**2) + eps) / s**2
        y = y * torch.rsqrt(ms) * weight.to(acc)
    return y.to(out_dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rms_norm(x + residual), x + residual)``; the sum formed in fp32, both outputs in x's dtype."""
    with _exact(x.device):
        total = (x.to(_compute_dtype(x.dtype)) + residual.to(_compute_dtype(x.dtype))).to(x.dtype)  # (..., C)
    return rms_norm(total, weight, eps), total


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding, "rotate half" (Hugging Face Llama / Qwen3 layout).

    x: (B, H, T, D); cos, sin: (T, D/2), the angle of each position and frequency.  The first and second
    halves of the head dim are the two coordinates of D/2 planes, each turned by its angle:
    ``(x1, x2) -> (x1*cos - x2*sin, x2*cos + x1*sin)``.  Returns x's shape and dtype.
    """
    out_dtype = x.dtype
    with _exact(x.device):
        acc = _compute_dtype(x.dtype)
        x = x.to(acc)
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]  # (B, H, T, D/2) each
        cos, sin = cos.to(acc), sin.to(acc)  # (T, D/2), broadcast over B and H
        y = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # (B, H, T, D)
    return y.to(out_dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` with silu(g) = g * sigmoid(g): the gated MLP of Llama and Qwen (Shazeer 2020).

    Same-shaped inputs; computed in fp32, returned in gate's dtype.
    """
    out_dtype = gate.dtype
    with _exact(gate.device):
        acc = _compute_dtype(gate.dtype)
        g, u = gate.to(acc), up.to(acc)
        y = g * torch.sigmoid(g) * u
    return y.to(out_dtype)


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Mean negative log-likelihood of ``targets`` under ``softmax(logits)``.

    logits: (..., V); targets: logits.shape[:-1], integer class ids.  Positions whose target equals
    ``ignore_index`` contribute nothing, and the mean is over the remaining positions.  When every
    target is ignored the loss is 0 (not 0/0 = nan as in ``F.cross_entropy``), so a fully-masked batch
    in fine-tuning cannot poison training.  Returns a float32 scalar (float64 for float64 logits).

    Non-finite logits follow log-softmax's IEEE arithmetic, in every backend: a row holding a NaN or
    a +inf logit has a NaN loss and NaN gradients (+inf - +inf); a -inf logit is a probability of 0
    (its target's loss is +inf).
    """
    with _exact(logits.device):
        acc = _compute_dtype(logits.dtype)
        logits = logits.to(acc).reshape(-1, logits.shape[-1])  # (N, V)
        targets = targets.reshape(-1)  # (N,)
        # log-softmax written out: log p_j = (z_j - m) - log(sum_i exp(z_i - m)) with m the row max.
        # The two terms stay apart, as in PyTorch's log_softmax: folding them into lse = m + log(sum)
        # first would round lse to the precision of m, an error of ulp(max |z|) (1e-3 at logits of 1e4).
        row_max = logits.amax(dim=-1, keepdim=True).detach()  # (N, 1)
        shifted = logits - row_max  # (N, V), <= 0
        log_probs = shifted - torch.log(torch.exp(shifted).sum(dim=-1, keepdim=True))  # (N, V)
        keep = targets != ignore_index  # (N,)
        safe_targets = torch.where(keep, targets, torch.zeros_like(targets)).long()  # any valid index
        nll = -log_probs.gather(1, safe_targets.unsqueeze(1)).squeeze(1)  # (N,)
        nll = torch.where(keep, nll, torch.zeros_like(nll))
        count = keep.sum().clamp(min=1)
        return nll.sum() / count


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """The LM head and the loss in one op: ``cross_entropy(hidden @ weight.T, targets)``.

    hidden: (..., C); weight: (V, C); targets: hidden.shape[:-1].  The reference simply materializes
    the (N, V) logits in fp32; the fused kernels exist precisely so that they never have to.
    """
    with _exact(hidden.device):
        acc = _compute_dtype(hidden.dtype)
        logits = hidden.to(acc) @ weight.to(acc).t()  # (..., V)
    return cross_entropy(logits, targets, ignore_index)
