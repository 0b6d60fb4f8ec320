"""Is a differing ``kept_indices`` row a near-tie, or a real mismatch? (FSR below; VisionZip's
and PIO-FVLM's analyses are at the end: VisionZip's kept rows follow from one top-k of the [CLS]
attention, PIO-FVLM's from its NMS replayed on the reference's saliency.)

FocusScanRefine makes discrete choices (a sort, a threshold, a greedy argmax). Two
back ends whose inputs differ in the last bits can take a different branch wherever
two candidates score almost the same, and from that step on their choices diverge
legitimately. So a differing kept set is explained, not just counted:

Replay the reference's own decisions from its intermediate values (φ and the Scan
distances, recomputed with the reference's numerics from the vision tower's outputs),
step by step: Focus takes tokens in φ order, Scan takes the argmax of the running
min-distance. At the first step where the reference picks a token the other back end
did not keep, look at the best token the other back end *did* keep among the
candidates of that step. If its score is within ``tol`` of the reference's pick (or the
Focus count K_F itself sits within ``tol`` of its threshold), the other back end
followed the other branch of a near-tie: reported as ``near-tie`` with the gap. Else it
is a ``mismatch``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from fsr.manifest import Manifest
from fsr.pruning import cosine_matrix, fsr_scores
from fsr.pruning._numerics import cumsum_f32, focus_count
from fsr.pruning.methods import get_method


@dataclasses.dataclass
class TieVerdict:
    row: int
    near_tie: bool
    stage: str  # "focus", "focus-count", "scan", "size" or "equal"
    step: int | None = None
    reference_token: int | None = None
    other_token: int | None = None
    gap: float | None = None
    detail: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def _focus_count_margin(phi_sorted: torch.Tensor, rho: float, focus_count: int) -> float:
    """How far (relative to Σφ) the prefix sums around K_F are from the ``rho · Σφ`` threshold."""
    prefix = cumsum_f32(phi_sorted)
    total = float(prefix[-1])
    if total <= 0:
        return 0.0
    threshold = float(torch.tensor(rho, dtype=torch.float32) * prefix[-1])
    near = [k for k in (focus_count - 2, focus_count - 1) if 0 <= k < prefix.numel()]
    return min(abs(float(prefix[k]) - threshold) for k in near) / total if near else float("inf")


def explain_row(phi: torch.Tensor, features: torch.Tensor, reference_kept: list[int], other_kept: list[int], *,
                budget: int, rho: float, tol: float, row: int = 0) -> TieVerdict:
    """Explain why ``other_kept`` differs from ``reference_kept`` for one batch row.

    ``phi`` [N] float32 and ``features`` [N, F] are the reference's values for that row.
    """
    ref, other = set(reference_kept), set(other_kept)
    if ref == other:
        return TieVerdict(row, True, "equal", detail="same kept set")
    n = phi.numel()
    k = min(budget, n)
    if len(other) != len(other_kept) or len(other) != k:
        return TieVerdict(row, False, "size", detail=f"expected {k} distinct indices, got {len(other)} distinct "
                                                     f"of {len(other_kept)}")
    phi = phi.float()
    order = torch.sort(phi, descending=True, stable=True).indices
    k_f = int(focus_count(phi[order][None], rho, k)[0])
    kf_margin = _focus_count_margin(phi[order], rho, k_f)
    scale = float(phi.max()) or 1.0

    def verdict(stage, step, ref_token, alt, gap, what):
        if alt is not None and gap <= tol:
            return TieVerdict(row, True, stage, step, ref_token, alt, gap,
                              f"{what}: token {ref_token} vs {alt}, gap {gap:.3g} <= {tol:g}")
        if kf_margin <= tol:
            return TieVerdict(row, True, "focus-count", step, ref_token, alt, kf_margin,
                              f"K_F={k_f} sits on its threshold (prefix sum within {kf_margin:.3g} of rho*sum); "
                              "the other back end took another focus count")
        shown = "none" if alt is None else f"{gap:.3g}"
        return TieVerdict(row, False, stage, step, ref_token, alt, gap,
                          f"{what}: reference took {ref_token}, the other back end did not keep it and its best "
                          f"alternative ({alt}) is {shown} away (tolerance {tol:g})")

    taken: list[int] = []
    for step in range(k_f):  # Focus
        i = int(order[step])
        if i not in other:
            alternatives = [j for j in other if j not in taken]
            alt = max(alternatives, key=lambda j: (float(phi[j]), -j)) if alternatives else None
            gap = None if alt is None else (float(phi[i]) - float(phi[alt])) / scale
            return verdict("focus", step, i, alt, abs(gap) if gap is not None else float("inf"), "phi")
        taken.append(i)

    distance = 1.0 - cosine_matrix(features)  # [N, N], row = scored token, column = set member
    min_distance = distance[:, taken].amin(dim=1)
    for step in range(k - k_f):  # Scan
        available = torch.ones(n, dtype=torch.bool)
        available[taken] = False
        scores = torch.where(available, min_distance, torch.tensor(float("-inf")))
        best = int(torch.argmax(scores))
        if best not in other:
            alternatives = [j for j in other if available[j]]
            alt = max(alternatives, key=lambda j: (float(scores[j]), -j)) if alternatives else None
            gap = float("inf") if alt is None else abs(float(scores[best]) - float(scores[alt]))
            return verdict("scan", k_f + step, best, alt, gap, "scan distance")
        taken.append(best)
        min_distance = torch.minimum(min_distance, distance[:, best])
    # Every reference choice was kept by the other back end, and both sets have K members.
    return TieVerdict(row, True, "equal", detail="same kept set")


def explain_kept(reference_model, manifest: Manifest, feed: dict, reference_kept, other_kept,
                 tol: float, graph: str = "vision") -> list[TieVerdict]:
    """Verdicts for every batch row where the kept indices of ``graph`` differ. The export's method
    says how its decisions are replayed (``near_tie_analysis``); a method without one gets mismatches."""
    rows = [b for b in range(len(reference_kept)) if not np.array_equal(reference_kept[b], other_kept[b])]
    if not rows:
        return []
    method = get_method(manifest.method.name)
    analysis = ANALYSES.get(method.near_tie_analysis)
    if analysis is None:
        return [TieVerdict(b, False, "size", detail=f"method {method.name!r} has no near-tie analysis; a differing "
                                                    "kept set counts as a mismatch") for b in rows]
    return analysis(reference_model, manifest, feed, reference_kept, other_kept, tol, rows, graph)


def _focus_scan_refine(pipe, manifest: Manifest, feed: dict, reference_kept, other_kept, tol: float,
                       rows: list[int], graph: str = "vision") -> list[TieVerdict]:
    """FSR: φ and the features recomputed from ``feed`` with the reference's vision tower."""
    settings = get_method(manifest.method.name).settings_from_json(manifest.method.settings)
    relevance = manifest.relevance.source
    names = ("features", "saliency") + (("relevance",) if relevance else ())
    tower = pipe.tower(names, relevance)
    with torch.no_grad():
        args = [torch.from_numpy(np.ascontiguousarray(feed[n])).float() for n in tower.input_names]
        outs = dict(zip(tower.outputs, tower(*args)))
        phi = fsr_scores(outs["saliency"], outs.get("relevance"), settings.alpha, settings.beta)
    return [explain_row(phi[b], outs["features"][b], [int(x) for x in reference_kept[b]],
                        [int(x) for x in other_kept[b]], budget=settings.budget, rho=settings.rho, tol=tol, row=b)
            for b in rows]


def _visionzip(pipe, manifest: Manifest, feed: dict, reference_kept, other_kept, tol: float,
               rows: list[int], graph: str = "vision") -> list[TieVerdict]:
    """VisionZip: its kept rows follow from the dominant set, the top of the reference's [CLS]
    attention (recomputed from ``feed`` with the reference's tower); see `explain_visionzip_kept`."""
    from fsr.pruning.visionzip import explain_visionzip_kept

    method = get_method(manifest.method.name)
    settings = method.settings_from_json(manifest.method.settings)
    split = method.reference_settings(settings)
    tower = pipe.tower(("cls_attention",), manifest.relevance.source)
    with torch.no_grad():
        args = [torch.from_numpy(np.ascontiguousarray(feed[n])).float() for n in tower.input_names]
        attention = tower(*args)
    verdicts = []
    for b in rows:
        v = explain_visionzip_kept(attention[b], reference_kept[b], other_kept[b], tol=tol, **split)
        verdicts.append(TieVerdict(b, v["near_tie"], v["stage"], None, v["reference_token"], v["other_token"],
                                   v["gap"], v["detail"]))
    return verdicts


def explain_nms_row(saliency: torch.Tensor, features: torch.Tensor, reference_kept: list[int], other_kept: list[int],
                    *, tau: float, tol: float, row: int = 0) -> TieVerdict:
    """A gradient-ordered NMS (PIO-FVLM, spec section 6) that kept ``other_kept`` instead of
    ``reference_kept``: replay the reference's walk (descending ``saliency``, ties to the lower
    index; strict pass with suppression by ``cosine >= tau``, then the fill pass) and, at the first
    token the reference takes that the other did not keep, compare it with the other's best
    candidate at that step. Within ``tol`` of the span's largest saliency: a near-tie."""
    ref, other = set(reference_kept), set(other_kept)
    if ref == other:
        return TieVerdict(row, True, "equal", detail="same kept set")
    if len(other) != len(other_kept) or len(other) != len(ref):
        return TieVerdict(row, False, "size", detail=f"expected {len(ref)} distinct indices, got {len(other)} "
                                                     f"distinct of {len(other_kept)}")
    values = saliency.double().tolist()
    scale = max(abs(v) for v in values) or 1.0
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    unit = torch.nn.functional.normalize(features.float(), dim=-1, eps=1e-12)
    neighbours = ((unit @ unit.T) >= tau).tolist()
    taken: list[int] = []
    suppressed = [False] * len(values)
    for stage in ("strict", "fill"):
        for i in order:
            if len(taken) == len(ref) or i in taken or (stage == "strict" and suppressed[i]):
                continue
            if i not in other:
                candidates = [j for j in other if j not in taken and (stage == "fill" or not suppressed[j])]
                alt = max(candidates, key=lambda j: (values[j], -j)) if candidates else None
                gap = float("inf") if alt is None else abs(values[i] - values[alt]) / scale
                verdict = alt is not None and gap <= tol
                return TieVerdict(row, verdict, f"nms-{stage}", len(taken), i, alt, gap,
                                  f"saliency: reference took {i}, the other back end kept {alt} instead "
                                  f"(gap {gap:.3g} of the largest saliency; tolerance {tol:g})")
            taken.append(i)
            if stage == "strict":
                suppressed = [s or n for s, n in zip(suppressed, neighbours[i])]
    return TieVerdict(row, True, "equal", detail="same kept set")


def _pio_nms(pipe, manifest: Manifest, feed: dict, reference_kept, other_kept, tol: float, rows: list[int],
             graph: str = "vision") -> list[TieVerdict]:
    """PIO-FVLM's pruning graph: the reference's saliency (autograd, each row alone) and span
    features recomputed from ``feed``; other graphs have no near-tie analysis (mismatches)."""
    from fsr.models.spec import REFERENCE

    if graph not in manifest.pruning_graphs or "hidden_states" not in feed:
        return [TieVerdict(b, False, "size", detail=f"no near-tie analysis of PIO-FVLM's kept indices for {graph!r}")
                for b in rows]
    module = pipe.spec.graph(pipe.loaded, manifest, graph, form=REFERENCE).module
    settings = get_method(manifest.method.name).settings_from_json(manifest.method.settings)
    inputs = [torch.from_numpy(np.ascontiguousarray(feed[n])) for n in
              ("hidden_states", "attention_mask", "position_ids", "image_start")]
    inputs[0] = inputs[0].float()
    with torch.no_grad():
        saliency = module(*inputs)[4]
    n = saliency.shape[1]
    span = inputs[3][:, None] + torch.arange(n)[None]
    features = torch.gather(inputs[0], 1, span[:, :, None].expand(-1, -1, inputs[0].shape[-1]))
    return [explain_nms_row(saliency[b], features[b], [int(x) for x in reference_kept[b]],
                            [int(x) for x in other_kept[b]], tau=settings.tau, tol=tol, row=b) for b in rows]


#: ``PruningMethod.near_tie_analysis`` -> how a differing kept set of that method is explained.
ANALYSES = {"focus-scan-refine": _focus_scan_refine, "visionzip": _visionzip, "pio-nms": _pio_nms}
