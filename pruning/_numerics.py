"""Numerical conventions shared by every FocusScanRefine implementation.

The operator specification (``shared/docs/fsr-op.md``) fixes the mathematics; this module
fixes the float32 rounding so that the reference, the fixed-shape module, its ONNX export
and a CUDA kernel can agree bit for bit on every *decision* (which tokens are kept).
``README.md`` in this folder lists the conventions in prose.

Everything here works on whole tensors and uses only ops that export to standard ONNX.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

import torch

#: Largest integer part of an exponent evaluated as a product chain (see `pow_f32`).
EXACT_POW_MAX = 16


def _is_exporting() -> bool:
    """True while torch.export / torch.onnx / torch.jit trace the calling code."""
    return bool(
        torch.compiler.is_exporting()
        or torch.onnx.is_in_onnx_export()
        or torch.jit.is_tracing()
    )


def sqrt_f32(x: torch.Tensor) -> torch.Tensor:
    """Correctly rounded float32 square root.

    ONNX Runtime's and CUDA's float32 ``sqrt`` are correctly rounded; torch's vectorised
    CPU path is not (off by one ulp for some inputs in the 2.13 AVX-512 build). Eagerly we
    take the square root in float64 and round once (double rounding is exact for sqrt);
    while exporting we emit a plain float32 ``Sqrt`` (TensorRT has no float64).
    """
    if _is_exporting():
        return torch.sqrt(x)
    return torch.sqrt(x.to(torch.float64)).to(x.dtype)


def exact_pow_terms(exponent: float) -> tuple[int, bool] | None:
    """``(n, half)`` when ``exponent == n + 0.5 * half`` with ``0 <= n <= EXACT_POW_MAX``, else None."""
    twice = 2.0 * float(exponent)
    if not math.isfinite(twice) or twice != math.floor(twice) or exponent < 0:
        return None
    n, half = divmod(int(twice), 2)
    if n > EXACT_POW_MAX:
        return None
    return n, bool(half)


def pow_f32(x: torch.Tensor, exponent: float) -> torch.Tensor:
    """``x ** exponent`` for float32 ``x >= 0``, evaluated reproducibly.

    - ``exponent = n`` (integer, 0..16): left-to-right product ``((x*x)*x)...``; ``x**0 = 1``.
    - ``exponent = n + 0.5``: ``x**n * sqrt(x)`` (sqrt is correctly rounded everywhere).
    - anything else: ``torch.pow`` / ONNX ``Pow``; libraries may differ in the last ulp.
    """
    terms = exact_pow_terms(exponent)
    if terms is None:
        return torch.pow(x, float(exponent))
    n, half = terms
    result = None
    for _ in range(n):
        result = x if result is None else result * x
    if half:
        root = sqrt_f32(x)
        result = root if result is None else result * root
    return torch.ones_like(x) if result is None else result


def norm01(x: torch.Tensor) -> torch.Tensor:
    """Min-max normalise the last dim of float32 ``x``; a constant row becomes all ones."""
    lo = x.amin(dim=-1, keepdim=True)
    hi = x.amax(dim=-1, keepdim=True)
    span = hi - lo
    flat = span == 0
    scaled = (x - lo) / torch.where(flat, torch.ones_like(span), span)
    return torch.where(flat, torch.ones_like(x), scaled)


def fsr_scores(
    saliency: torch.Tensor,
    relevance: torch.Tensor | None,
    alpha: float,
    beta: float,
) -> torch.Tensor:
    """``phi = norm01(relevance)**alpha * norm01(saliency)**beta`` in float32 (``[..., N]``).

    An omitted relevance counts as ``r_hat = 1`` (so phi is just ``s_hat**beta``).
    """
    phi = pow_f32(norm01(saliency.to(torch.float32)), beta)
    if relevance is not None:
        phi = pow_f32(norm01(relevance.to(torch.float32)), alpha) * phi
    return phi


def cumsum_f32(x: torch.Tensor) -> torch.Tensor:
    """Prefix sums over the last dim, accumulated sequentially in float32 (ONNX CumSum).

    ``torch.cumsum`` on CPU accumulates float32 in double, which can change a threshold
    decision; eager code therefore adds column by column. Under export the op is
    ``torch.cumsum``, which becomes ONNX ``CumSum`` (float32 accumulation in ORT).
    """
    if _is_exporting():
        return torch.cumsum(x, dim=-1)
    acc = torch.zeros_like(x[..., 0])
    columns = []
    for i in range(x.shape[-1]):
        acc = acc + x[..., i]
        columns.append(acc)
    if not columns:
        return x.clone()
    return torch.stack(columns, dim=-1)


def focus_count(phi_sorted: torch.Tensor, rho: float, budget: int) -> torch.Tensor:
    """K_F from phi sorted descending (last dim): ``1 + #{prefix < rho * total}``, clamped to ``[1, budget]``.

    ``total`` is the last prefix sum, so sum and prefixes agree bit for bit.
    """
    prefix = cumsum_f32(phi_sorted)
    threshold = prefix[..., -1:] * torch.tensor(rho, dtype=torch.float32, device=prefix.device)
    count = (prefix < threshold).sum(dim=-1) + 1
    return torch.minimum(count, torch.tensor(budget, dtype=count.dtype, device=count.device))


def cosine_matrix(features: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[..., N, N]`` in float32 for ``features [..., N, F]``.

    ``cos[i, j] = G[i, j] / sqrt(G[i, i] * G[j, j])`` with the Gram matrix ``G = f f^T``
    (one matrix product; the diagonal is read from G itself), and 0 where that
    denominator is 0 (zero vectors). This is ``f_bar_i . f_bar_j`` with an exact property:
    identical feature rows give identical G entries, and ``sqrt(fl(g * g)) == g`` in IEEE
    arithmetic, so duplicates have cosine exactly 1 (distance exactly 0) in every back end.
    Entry ``[i, j]`` is used with ``i`` the token being scored and ``j`` the set member.
    """
    f = features.to(torch.float32)
    gram = f @ f.transpose(-1, -2)
    n = gram.shape[-1]
    index = torch.arange(n, device=gram.device).unsqueeze(-1).expand(*gram.shape[:-1], 1)
    sq_norm = torch.gather(gram, -1, index)  # [..., N, 1] = G[i, i], exactly
    denominator = sqrt_f32(sq_norm * sq_norm.transpose(-1, -2))
    nonzero = denominator > 0
    cos = gram / torch.where(nonzero, denominator, torch.ones_like(denominator))
    return torch.where(nonzero, cos, torch.zeros_like(cos))


def merge_count_limit(kappa: float, num_anchors):
    """``floor(float32(kappa) * float32(|S|))`` as int64 (tensor or python int in, same out)."""
    if isinstance(num_anchors, torch.Tensor):
        k = torch.tensor(kappa, dtype=torch.float32, device=num_anchors.device)
        return torch.floor(k * num_anchors.to(torch.float32)).to(torch.int64)
    k = torch.tensor(kappa, dtype=torch.float32)
    return int(torch.floor(k * torch.tensor(float(num_anchors), dtype=torch.float32)))


# --------------------------------------------------------------------------- validation


def check_attributes(budget, alpha, beta, rho, kappa) -> None:
    """Raise ValueError for attributes the operator does not accept."""
    if isinstance(budget, bool) or not isinstance(budget, Integral):
        raise ValueError(f"budget must be an int >= 1, got {budget!r}")
    if budget < 1:
        raise ValueError(f"budget must be >= 1, got {budget}")
    for name, value in (("alpha", alpha), ("beta", beta), ("rho", rho), ("kappa", kappa)):
        if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
    for name, value in (("alpha", alpha), ("beta", beta), ("kappa", kappa)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")


def check_inputs(tokens, features, saliency, relevance) -> tuple[int, int]:
    """Raise ValueError unless the inputs have the operator's shapes; return ``(B, N)``."""
    named = [("tokens", tokens, 3), ("features", features, 3), ("saliency", saliency, 2)]
    if relevance is not None:
        named.append(("relevance", relevance, 2))
    for name, tensor, rank in named:
        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != rank:
            raise ValueError(f"{name} must have {rank} dims, got shape {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    batch, num_tokens = tokens.shape[0], tokens.shape[1]
    for name, tensor, _ in named[1:]:
        if tensor.shape[0] != batch or tensor.shape[1] != num_tokens:
            raise ValueError(
                f"{name} has shape {tuple(tensor.shape)}, expected leading dims "
                f"[B={batch}, N={num_tokens}] to match tokens {tuple(tokens.shape)}"
            )
    return batch, num_tokens
