"""Numerical conventions shared by every FocusScanRefine implementation.

The operator specification (``shared/docs/fsr-op.md``) fixes the mathematics; this module
fixes the float32 rounding so that the reference, the fixed-shape module, its ONNX export
and a CUDA kernel can agree bit for bit on every *decision* (which tokens are kept).
``README.md`` in this folder lists the conventions in prose.

Everything here works on whole tensors and uses only ops that export to standard ONNX.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .fsr_identity import FSR_INPUT_RANKS, FSR_OP, FsrOpError
from .fsr_identity import check_attributes as check_fsr_attributes

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

    ``torch.cumsum`` accumulates float32 in double on the CPU (and as a parallel scan on
    CUDA), which can change a threshold decision; eager code therefore uses NumPy's
    ``add.accumulate``, which adds one element at a time in float32. Under export the op is
    ``torch.cumsum``, which becomes ONNX ``CumSum`` (float32 accumulation in ORT).
    """
    if _is_exporting():
        return torch.cumsum(x, dim=-1)
    values = x.detach().to("cpu", torch.float32).numpy()
    prefix = np.add.accumulate(values, axis=-1, dtype=np.float32)
    return torch.from_numpy(prefix).to(x.device)


def focus_count(phi_sorted: torch.Tensor, rho: float, budget) -> torch.Tensor:
    """K_F from phi sorted descending (last dim): ``1 + #{prefix < rho * total}``, clamped to ``[1, budget]`` (K).

    ``total`` is the last prefix sum, so sum and prefixes agree bit for bit.
    """
    prefix = cumsum_f32(phi_sorted)
    threshold = prefix[..., -1:] * torch.tensor(rho, dtype=torch.float32, device=prefix.device)
    count = (prefix < threshold).sum(dim=-1) + 1
    return torch.minimum(count, torch.tensor(budget, dtype=count.dtype, device=count.device))


def cosine_matrix(features: torch.Tensor) -> torch.Tensor:
    """Cosines ``[..., N, N]`` in float32 for ``features [..., N, F]`` (convention 6).

    The Gram matrix ``G = f f^T`` (one matrix product) gives every column ``j``; see
    `column_cosines` for the rest (squared norms `self_dots`, duplicates exactly 1, zero
    vectors 0). Entry ``[i, j]`` is used with ``i`` the token being scored and ``j`` the set
    member.
    """
    f = features.to(torch.float32)
    n = f.shape[-2]
    columns = torch.arange(n, device=f.device).expand(*f.shape[:-2], n)
    return column_cosines(f @ f.transpose(-1, -2), columns, self_dots(f))


def merge_count_limit(kappa: float, num_anchors):
    """``floor(float32(kappa) * float32(|S|))`` as int64 (tensor or python int in, same out)."""
    if isinstance(num_anchors, torch.Tensor):
        k = torch.tensor(kappa, dtype=torch.float32, device=num_anchors.device)
        return torch.floor(k * num_anchors.to(torch.float32)).to(torch.int64)
    k = torch.tensor(kappa, dtype=torch.float32)
    return int(torch.floor(k * torch.tensor(float(num_anchors), dtype=torch.float32)))


# --------------------------------------------------------------------------- cosines by columns


def self_dots(features: torch.Tensor) -> torch.Tensor:
    """``n_i = f_i . f_i`` in float32 (``[..., N]``): ``f_ik * f_ik`` rounded, then added one
    at a time for k = 0, 1, ... (no fused multiply-add), so every back end gets the same bits
    (ONNX: ``CumSum`` of the squares; CUDA: one loop per token)."""
    f = features.to(torch.float32)
    squares = f * f
    if f.device.type == "cpu" and not _is_exporting():
        total = np.add.accumulate(squares.detach().numpy(), axis=-1, dtype=np.float32)[..., -1]
        return torch.from_numpy(np.ascontiguousarray(total))
    total = torch.zeros_like(squares[..., 0])
    for k in range(squares.shape[-1]):
        total = total + squares[..., k]
    return total


def column_cosines(gram: torch.Tensor, columns: torch.Tensor, sq_norm: torch.Tensor) -> torch.Tensor:
    """Cosines ``[B, N, C]`` of every token with the C tokens ``columns [B, C]`` (convention 6).

    ``gram [B, N, C]`` holds the dot products ``f_i . f_c`` of one matrix product (so row
    ``c`` of it holds ``f_c . f_c`` as that product computes it); ``sq_norm [B, N]`` the
    squared norms `self_dots`. ``cos = G / sqrt(n_i * n_c)``, 0 where that denominator is 0,
    and exactly 1 for a duplicate row: ``G[i, c] == G[c, c]`` (the same product, the same
    data) and ``n_i == n_c``. Works for any leading dims.
    """
    own = torch.gather(gram, -2, columns.unsqueeze(-2))  # [B, 1, C]: G[c, c] from the same product
    n_i = sq_norm.unsqueeze(-1)  # [B, N, 1]
    n_c = torch.gather(sq_norm, -1, columns).unsqueeze(-2)  # [B, 1, C]
    denominator = sqrt_f32(n_i * n_c)
    nonzero = denominator > 0
    cos = gram / torch.where(nonzero, denominator, torch.ones_like(denominator))
    duplicate = (gram == own) & (n_i == n_c)
    cos = torch.where(duplicate, torch.ones_like(cos), cos)
    return torch.where(nonzero, cos, torch.zeros_like(cos))


# --------------------------------------------------------------------------- validation


def check_attributes(budget, alpha=None, beta=None, rho=None, kappa=None, keep_ratio=None) -> dict:
    """Validate the attributes (``FsrOpError``, a ValueError); return them normalised
    (see `fsr.pruning.fsr_identity.check_attributes`)."""
    return check_fsr_attributes(budget=budget, alpha=alpha, beta=beta, rho=rho, kappa=kappa,
                                keep_ratio=keep_ratio)


def check_inputs(tokens, features, saliency, relevance) -> tuple[int, int]:
    """Raise FsrOpError unless the inputs have the operator's shapes; return ``(B, N)``."""
    named = [("tokens", tokens), ("features", features), ("saliency", saliency)]
    if relevance is not None:
        named.append(("relevance", relevance))
    for name, tensor in named:
        rank = FSR_INPUT_RANKS[name]
        if not isinstance(tensor, torch.Tensor):
            raise FsrOpError(f"{FSR_OP}: input {name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != rank:
            raise FsrOpError(f"{FSR_OP}: input {name} must have {rank} dims, got shape {tuple(tensor.shape)}")
        if not tensor.is_floating_point():
            raise FsrOpError(f"{FSR_OP}: input {name} must be a floating-point tensor, got {tensor.dtype}")
    batch, num_tokens = tokens.shape[0], tokens.shape[1]
    for name, tensor in named[1:]:
        if tensor.shape[0] != batch or tensor.shape[1] != num_tokens:
            raise FsrOpError(
                f"{FSR_OP}: input {name} has shape {tuple(tensor.shape)}, expected leading dims "
                f"[B={batch}, N={num_tokens}] to match tokens {tuple(tokens.shape)}"
            )
    if num_tokens < 1:
        raise FsrOpError(f"{FSR_OP}: input tokens has N = {num_tokens} tokens (shape {tuple(tokens.shape)}); "
                         "the op needs N >= 1")
    return batch, num_tokens
