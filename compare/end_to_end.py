"""End to end: greedy generation on each back end against the PyTorch reference.

The reference is ``ReferencePipeline`` (source model, FSR reference, Hugging Face
``generate``); a back end is ``Pipeline(export_dir, backend)``. Both run the same batch of
(image, prompt) samples. Per sample the token sequences are compared position by
position. A sequence that differs is explained rather than just failed:

- if the back end kept other image tokens, the kept sets are checked for a near-tie in
  the FSR scores (``near_tie.explain_kept``);
- otherwise the reference is teacher-forced up to the first differing step and the two
  candidate tokens' logits are compared: within ``logit_tol`` it is a near-tie of the
  argmax (``near-tie``), else a failure.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from fsr.compare.feeds import vision_feeds
from fsr.compare.graphs import ERROR, FAIL, NEAR_TIE, PASS, SKIPPED
from fsr.compare.near_tie import explain_kept
from fsr.compare.teacher import prefix_embeds, prompt_rows, step_logits
from fsr.runtime.pipeline import Pipeline


@dataclasses.dataclass
class SequenceResult:
    sample: dict
    status: str
    agreement: float
    reference_tokens: list[int]
    backend_tokens: list[int]
    first_difference: int | None = None
    note: str = ""

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


@dataclasses.dataclass
class BackendE2E:
    backend: str
    status: str
    reason: str = ""
    token_agreement: float | None = None
    exact_sequences: int = 0
    sequences: list[SequenceResult] = dataclasses.field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


def agreement(a: list[int], b: list[int]) -> float:
    """Share of positions (over the longer sequence) holding the same token."""
    longest = max(len(a), len(b))
    return 1.0 if longest == 0 else sum(x == y for x, y in zip(a, b)) / longest


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def reference_generate(pipe, samples, max_new_tokens: int):
    return pipe.generate([s.image for s in samples], [s.prompt for s in samples], max_new_tokens=max_new_tokens)


def _explain(pipe, manifest, sample, ref, got, step: int, logit_tol: float, near_tie_tol: float) -> tuple[str, str]:
    if ref.kept_indices != got.kept_indices and (not pipe.method.near_tie_analysis
                                                 or pipe.method.prunes_in == "llm"):
        return FAIL, ("kept_indices differ from the reference's (no near-tie analysis end to end for this "
                      "method; the graph comparisons explain its pruning graphs' differences)")
    if ref.kept_indices is not None and got.kept_indices is not None and ref.kept_indices != got.kept_indices:
        feed = vision_feeds(pipe, manifest, [sample])[0]
        verdicts = explain_kept(pipe, manifest, feed, np.asarray([ref.kept_indices]), np.asarray([got.kept_indices]),
                                near_tie_tol)
        if verdicts and all(v.near_tie for v in verdicts):
            return NEAR_TIE, f"kept_indices differ at a near-tie ({verdicts[0].detail})"
        return FAIL, "kept_indices differ: " + "; ".join(v.detail for v in verdicts)
    if step >= min(len(ref.token_ids), len(got.token_ids)):
        return FAIL, "one sequence stops (EOS) where the other goes on"
    request = pipe.prepare([sample.image], [sample.prompt])
    [[image]] = pipe.vision(request, pipe.instruction_embeds(request.instructions)).embeddings
    [row] = prompt_rows(pipe, [sample.prompt])
    logits = step_logits(pipe, prefix_embeds(pipe, row, _torch(image)), ref.token_ids[: step + 1])[step]
    a, b = ref.token_ids[step], got.token_ids[step]
    gap = float(logits[a] - logits[b])
    if abs(gap) <= logit_tol:
        return NEAR_TIE, f"step {step}: tokens {a} vs {b} are a near-tie of the reference logits (gap {gap:.3g})"
    return FAIL, (f"step {step}: reference token {a} beats {b} by {gap:.3g} in the reference logits "
                  f"(tolerance {logit_tol:g})")


def _torch(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array))


def compare_backend(export_dir, manifest, pipe, backend: str, samples, reference_results, *, max_new_tokens: int,
                    logit_tol: float, near_tie_tol: float) -> BackendE2E:
    start = time.perf_counter()
    with Pipeline(export_dir, backend=backend, verify=False) as runner:  # verified once by compare_export
        results = runner.generate([s.image for s in samples], [s.prompt for s in samples],
                                  max_new_tokens=max_new_tokens)
    report = BackendE2E(backend, PASS)
    for sample, ref, got in zip(samples, reference_results, results):
        diff = first_difference(ref.token_ids, got.token_ids)
        seq = SequenceResult(sample.to_json(), PASS, agreement(ref.token_ids, got.token_ids), ref.token_ids,
                             got.token_ids, diff)
        if diff is not None:
            seq.status, seq.note = _explain(pipe, manifest, sample, ref, got, diff, logit_tol, near_tie_tol)
        report.sequences.append(seq)
    total = sum(max(len(s.reference_tokens), len(s.backend_tokens)) for s in report.sequences)
    report.token_agreement = (sum(s.agreement * max(len(s.reference_tokens), len(s.backend_tokens))
                                  for s in report.sequences) / total) if total else 1.0
    report.exact_sequences = sum(s.first_difference is None for s in report.sequences)
    statuses = {s.status for s in report.sequences}
    report.status = FAIL if FAIL in statuses else NEAR_TIE if NEAR_TIE in statuses else PASS
    if report.status == FAIL:
        report.reason = "; ".join(f"{s.sample['image']}: {s.note}" for s in report.sequences if s.status == FAIL)
    report.seconds = time.perf_counter() - start
    return report


def skipped(backend: str, reason: str) -> BackendE2E:
    return BackendE2E(backend, SKIPPED, reason)


def errored(backend: str, exc: BaseException) -> BackendE2E:
    return BackendE2E(backend, ERROR, f"{type(exc).__name__}: {exc}")
