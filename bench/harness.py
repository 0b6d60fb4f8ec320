"""Measure each target at each batch size, then set the numbers against the baseline and the roofline.

One *run* of a target produces the first token with ``Pipeline``'s own steps (instruction
embedding for the method's relevance, vision graph, prefill assembly, prefill, argmax),
timing each step, then decodes ``new_tokens - 1`` more tokens (never stopping at EOS, so every
run does the same work). After it, the vision tower and the op alone are timed on the
same inputs. Warm-up runs are discarded; the repeated runs give median and spread.

Time to first token starts from preprocessed inputs (pixel values, token ids): image
decoding and resizing are the same for every budget and are left out.

Beside the targets, plain transformers ``generate`` (unpruned, SDPA) on the same weights
(`fsr.bench.transformers_ref`) is run in the same interleaved rounds, so every row can be set
against what a user would otherwise run. The machine's load average is recorded with every run.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import time
from importlib import metadata
from typing import Callable

import numpy as np
import torch
from PIL import Image

from fsr.bench import analytic
from fsr.bench.memory import PeakMemory
from fsr.bench.roofline import DevicePeak
from fsr.bench.stats import ratio, summarize
from fsr.bench.targets import BenchError, ModelInfo, Target, TargetSpec
from fsr.models.spec import Request

SCHEMA = "fsr-bench/1"
DEFAULT_PROMPT = "Describe the image in detail."
#: Parts of time to first token, in pipeline order (seconds in a run; ms in the report).
TTFT_PARTS = ("instruction", "vision", "embed", "prefill")
#: Every timing a result row carries (summaries in ms).
TIMINGS = ("ttft", *TTFT_PARTS, "vision_tower", "fsr_op", "decode_per_token")
#: Timings of the transformers ``generate`` rows.
REFERENCE_TIMINGS = ("ttft", "decode_per_token")


@dataclasses.dataclass
class BenchSettings:
    batches: list[int] = dataclasses.field(default_factory=lambda: [1])
    warmup: int = 1
    repeat: int = 5
    new_tokens: int = 16
    prompt: str = DEFAULT_PROMPT

    def validate(self) -> None:
        if not self.batches or any(b < 1 for b in self.batches):
            raise BenchError(f"batch sizes must be >= 1 (got {self.batches})")
        if self.warmup < 0 or self.repeat < 1:
            raise BenchError("warmup must be >= 0 and repeat >= 1")
        if self.new_tokens < 1:
            raise BenchError("new_tokens must be >= 1")


def synthetic_images(count: int, size: int):
    """Deterministic, structured ``size`` x ``size`` test images (different per row, so saliency is not flat)."""
    rng = np.random.RandomState(1234)
    y, x = np.mgrid[0:size, 0:size]
    images = []
    for i in range(count):
        base = np.stack([np.sin(x / (6 + i)), np.cos(y / (9 + 2 * i)), np.sin((x + 2 * y) / (13 + i))], -1)
        pixels = ((base * 0.4 + 0.5 + rng.rand(size, size, 3) * 0.15).clip(0, 1) * 255).astype("uint8")
        images.append(Image.fromarray(pixels))
    return images


# ----------------------------------------------------------------------------- one run


def run_once(target: Target, request: Request, new_tokens: int, parts: bool = True) -> dict[str, float]:
    """One first token + decode through ``Pipeline``'s steps, then (``parts``) the tower and the op
    alone. Seconds per part."""
    pipe, backend = target.pipeline, target.pipeline.backend
    sync = backend.synchronize
    clock = time.perf_counter
    t: dict[str, float] = {}
    sync()
    start = mark = clock()

    instruction = pipe.instruction_embeds(request.instructions)
    sync()
    t["instruction"], mark = clock() - mark, clock()

    features = pipe.vision(request, instruction)
    sync()
    t["vision"], mark = clock() - mark, clock()

    inputs = pipe.assemble(request.rows, features)
    sync()
    t["embed"], mark = clock() - mark, clock()

    state = pipe.prefill(inputs, max_new_tokens=new_tokens)  # KV buffers sized as generate sizes them
    next_ids = pipe.next_tokens(state)
    t["prefill"] = clock() - mark
    t["ttft"] = clock() - start
    for graph in (*pipe.manifest.segment_graphs, *pipe.manifest.pruning_graphs):  # the prefill's parts
        t[f"graph:{graph}"] = pipe.runners[graph].last_inference_time

    mark = clock()
    for _ in range(new_tokens - 1):  # never stops at EOS: every run does the same work
        state = pipe.decode(state, next_ids)
        next_ids = pipe.next_tokens(state)
    sync()
    t["decode_per_token"] = (clock() - mark) / (new_tokens - 1) if new_tokens > 1 else float("nan")
    t["seq_len"] = inputs.attention_mask.shape[1]
    t["loadavg"] = _load1()

    # The vision graph's parts on their own, on the same inputs.
    t["vision_tower"] = t["fsr_op"] = float("nan")
    if parts and target.tower is not None:
        values = pipe.spec.vision_feeds(request.vision, instruction, pipe.dtype)
        feeds = {k: backend.from_host(v) for k, v in values.items() if k in target.tower.input_names}
        sync()
        mark = clock()
        out = target.tower.infer(feeds)
        sync()
        t["vision_tower"] = clock() - mark
        if target.op is not None:
            op_feeds = {n: out[n] for n in target.op.input_names}
            sync()
            mark = clock()
            target.op.infer(op_feeds)
            sync()
            t["fsr_op"] = clock() - mark
        elif target.unpruned:
            t["fsr_op"] = 0.0
    return t


def image_size(spec, processor, vision_size: int) -> int:
    """The side of the synthetic images every row of a benchmark gets (our pipelines and transformers
    ``generate`` alike): the family's benchmark size (LLaVA-NeXT: a size that makes its full crop
    grid), else the vision tower's input size."""
    return spec.benchmark_image_size(processor) or vision_size


def prepare_inputs(target: Target, batch: int, settings: BenchSettings) -> Request:
    pipe = target.pipeline
    size = image_size(pipe.spec, pipe.processor, pipe.manifest.vision.image_size)
    return target.pipeline.prepare(synthetic_images(batch, size), [settings.prompt] * batch)


def measure_memory(target: Target, inputs: Request, settings: BenchSettings, memory: PeakMemory) -> dict:
    """Peak memory of one first token + decode with only this target loaded (the tower/op runners aside)."""
    memory.reset()
    run_once(target, inputs, settings.new_tokens, parts=False)
    return memory.read()


def summarize_runs(target: Target, batch: int, runs: list[dict], settings: BenchSettings) -> dict:
    """A result row (timings in ms: median, quartiles, min, max) from repeated runs."""
    timings = {}
    for name in TIMINGS:
        values = [r[name] * 1e3 for r in runs if not np.isnan(r[name])]
        timings[name] = summarize(values)
    seq_len = int(runs[0]["seq_len"])
    segments = []
    for segment in target.segments:
        part = {**segment, "prefill_ms": summarize([r[f"graph:{segment['graph']}"] * 1e3 for r in runs])}
        if segment.get("prune_before"):
            part["pruning_ms"] = summarize([r[f"graph:{segment['prune_before']}"] * 1e3 for r in runs])
        segments.append(part)
    load = [r["loadavg"] for r in runs if r.get("loadavg") is not None]
    return {
        "method": target.method,
        "budget": target.budget,
        "kept_tokens": target.kept_tokens,
        "num_image_tokens": target.num_image_tokens,
        "batch": batch,
        "prompt_tokens": seq_len - target.kept_tokens,
        "seq_len": seq_len,
        "new_tokens": settings.new_tokens,
        "export": str(target.export_dir) if target.export_dir else None,
        "backend_options": target.pipeline.backend.options(),
        "timings_ms": timings,
        "segments": segments,
        "loadavg": summarize(load),
        "notes": list(target.notes),
    }


def measure(target: Target, batch: int, settings: BenchSettings, memory: PeakMemory | None = None,
            tick: Callable[[], None] = lambda: None) -> dict:
    """Warm-up and repeated runs of one target at ``batch`` (and its peak memory, with ``memory``)."""
    inputs = prepare_inputs(target, batch, settings)
    peak = measure_memory(target, inputs, settings, memory) if memory is not None else None
    for _ in range(settings.warmup):
        run_once(target, inputs, settings.new_tokens)
        tick()
    runs = []
    for _ in range(settings.repeat):
        runs.append(run_once(target, inputs, settings.new_tokens))
        tick()
    row = summarize_runs(target, batch, runs, settings)
    row["peak_memory"] = peak
    return row


# ----------------------------------------------------------------------------- analysis


def analyze(row: dict, info: ModelInfo, peak: DevicePeak) -> dict:
    """Add KV-cache bytes, analytic FLOPs / bytes and roofline ideal times to a measured row."""
    b, s, dtype = row["batch"], row["seq_len"], info.dtype
    llm, vision = info.llm, info.vision
    context = s + row["new_tokens"] / 2  # mean context of the decode steps
    segments = row.get("segments") or []
    segmented = any(seg.get("image_tokens") is not None for seg in segments)
    prefill_f = analytic.prefill_flops(llm, b, s)
    prefill_b = analytic.prefill_bytes(llm, b, s, dtype)
    vision_f, vision_b = analytic.vision_flops(vision, b), analytic.vision_bytes(vision, dtype)
    k, n = row["kept_tokens"], row["num_image_tokens"]
    op_f = analytic.fsr_op_flops(b, n, info.token_dim, info.feature_dim, k)
    op_b = analytic.fsr_op_bytes(b, n, info.token_dim, info.feature_dim, k, dtype)
    decode_f = analytic.decode_step_flops(llm, b, round(context))
    decode_b = analytic.decode_step_bytes(llm, b, round(context), dtype)
    row["kv_cache_bytes"] = analytic.kv_cache_bytes(llm, b, s, dtype)
    row["kv_cache_bytes_final"] = analytic.kv_cache_bytes(llm, b, s + row["new_tokens"] - 1, dtype)
    if segmented:  # image tokens dropped between decoder segments: each segment its own length and cache
        prefill_f = analytic.segmented_prefill_flops(llm, b, s, n, segments)
        per_segment = analytic.segmented_kv_cache_bytes(llm, b, s, n, segments, dtype)
        for seg, kv, length in zip(segments, per_segment, analytic.segment_lengths(s, n, segments)):
            seg["seq_len"], seg["kv_cache_bytes"] = length, kv
        weights = analytic.decoder_weights(llm) * analytic.DTYPE_BYTES[dtype]
        lengths = analytic.segment_lengths(s, n, segments)
        pruning_f = sum(analytic.llm_pruning_flops(llm, b, lengths[i - 1], segments[i - 1]["image_tokens"],
                                                   seg["image_tokens"])
                        for i, seg in enumerate(segments) if seg.get("prune_before"))
        pruning_b = sum(analytic.llm_pruning_bytes(llm, b, lengths[i - 1], dtype)
                        for i, seg in enumerate(segments) if seg.get("prune_before"))
        prefill_f["llm_pruning"] = pruning_f
        prefill_f["total"] += pruning_f
        prefill_b = {"weights": weights, "kv_written": sum(per_segment), "llm_pruning": pruning_b,
                     "total": weights + sum(per_segment) + pruning_b}
        op_f = op_b = 0  # the image enters the LLM whole: no op in the vision graph to count
        row["kv_cache_bytes"] = sum(per_segment)
        row["kv_cache_bytes_final"] = sum(analytic.segmented_kv_cache_bytes(
            llm, b, s + row["new_tokens"] - 1, n, segments, dtype))
        decode_f, decode_b = analytic.segmented_decode_step(llm, b, round(context), n, segments, dtype)
    row["analytic"] = {
        "prefill_flops": prefill_f["total"], "prefill_flops_parts": prefill_f,
        "prefill_bytes": prefill_b["total"], "prefill_bytes_parts": prefill_b,
        "vision_flops": vision_f, "vision_bytes": vision_b,
        "fsr_op_flops": op_f, "fsr_op_bytes": op_b,
        "decode_step_flops": decode_f, "decode_step_bytes": decode_b,
    }
    prefill, vis, op, dec = (peak.ideal(prefill_f["total"], prefill_b["total"]), peak.ideal(vision_f, vision_b),
                             peak.ideal(op_f, op_b), peak.ideal(decode_f, decode_b))
    row["roofline"] = {
        "prefill_ms": prefill["seconds"] * 1e3, "prefill_bound": prefill["bound"],
        "vision_ms": vis["seconds"] * 1e3, "vision_bound": vis["bound"],
        "fsr_op_ms": op["seconds"] * 1e3,
        "ttft_ms": (prefill["seconds"] + vis["seconds"] + op["seconds"]) * 1e3,
        "decode_ms_per_token": dec["seconds"] * 1e3, "decode_bound": dec["bound"],
    }
    t = row["timings_ms"]
    row["measured_over_ideal"] = {
        "prefill": ratio(t["prefill"]["median"], row["roofline"]["prefill_ms"]),
        "ttft": ratio(t["ttft"]["median"], row["roofline"]["ttft_ms"]),
        "decode_per_token": ratio(t["decode_per_token"]["median"], row["roofline"]["decode_ms_per_token"]),
    }
    row["fsr_op_share_of_ttft"] = ratio(t["fsr_op"]["median"], t["ttft"]["median"])
    return row


def add_speedups(rows: list[dict]) -> None:
    """Ratios against the unpruned row of the same batch (measured in the same run)."""
    baselines = {r["batch"]: r for r in rows if r["kept_tokens"] >= r["num_image_tokens"]}
    for row in rows:
        base = baselines.get(row["batch"])
        if base is None:
            raise ValueError(f"no unpruned measurement at batch {row['batch']} to compare with")
        t, bt = row["timings_ms"], base["timings_ms"]
        ideal, bideal = row["roofline"], base["roofline"]

        def entry(part: str, ideal_key: str) -> dict:
            measured = ratio(bt[part]["median"], t[part]["median"])
            ideal_speedup = ratio(bideal[ideal_key], ideal[ideal_key])
            return {"measured": measured, "ideal": ideal_speedup, "ratio": ratio(measured, ideal_speedup)}

        row["baseline"] = {"method": base["method"], "kept_tokens": base["kept_tokens"], "export": base["export"]}
        row["speedup"] = {
            "ttft": entry("ttft", "ttft_ms"),
            "prefill": entry("prefill", "prefill_ms"),
            "decode_per_token": entry("decode_per_token", "decode_ms_per_token"),
        }
        row["kv_cache_reduction"] = ratio(base["kv_cache_bytes"], row["kv_cache_bytes"])


# ----------------------------------------------------------------------------- a whole benchmark


def machine_info(device: str) -> dict:
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "device": device, "gpu": None}
    for pkg in ("fsr-export", "torch", "onnxruntime", "transformers", "numpy"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def run_benchmark(specs: list[TargetSpec], info: ModelInfo, peak: DevicePeak, settings: BenchSettings, *,
                  backend: str, device: str, interleave: bool = True,
                  on_target: Callable[[TargetSpec, str], None] = lambda s, phase: None,
                  on_config: Callable[[TargetSpec, int], Callable[[], None]] = lambda s, b: (lambda: None),
                  remeasure_peak: Callable[[], DevicePeak] | None = None, extra: dict | None = None,
                  reference=None) -> dict:
    """Measure every spec (baseline first) at every batch size; the JSON document of the run.

    Memory is measured first, one target loaded at a time. Timings are then taken with
    every target loaded and the runs *interleaved* (run i of each target, then run i+1),
    so that a change in the machine's load during the benchmark hits every budget alike;
    ``interleave=False`` times one target after the other instead, with only it loaded
    (for models too large to hold several exports at once). ``remeasure_peak`` measures the
    device's peaks again at the end; the roofline uses the higher of the two. ``reference``
    (a `fsr.bench.transformers_ref.TransformersGenerate`) is run once per round after the
    targets (interleaved with them), and every row gets its ratios against it.
    """
    settings.validate()
    if not specs or not specs[0].is_baseline:
        raise ValueError("the first target must be the unpruned baseline")
    started = datetime.datetime.now(datetime.timezone.utc)
    load_start = _loadavg()
    memory = PeakMemory(device)
    records = {id(s): {"method": s.method, "budget": s.budget, "kept_tokens": s.kept_tokens, **(s.export or {})}
               for s in specs}
    ticks = {(id(s), b): on_config(s, b) for s in specs for b in settings.batches}

    def open_target(spec: TargetSpec, phase: str, with_parts: bool = True) -> Target:
        on_target(spec, phase)
        start = time.perf_counter()
        target = spec.open(with_parts=with_parts)
        records[id(spec)].setdefault("open_s", time.perf_counter() - start)
        return target

    peaks: dict[tuple[int, int], dict] = {}
    rows: dict[tuple[int, int], dict] = {}
    reference_runs: dict[int, list[dict]] = {b: [] for b in settings.batches}
    reference_inputs: dict[int, dict] = {}

    def run_reference(batch: int, measured: bool) -> None:
        if reference is None:
            return
        if batch not in reference_inputs:
            size = image_size(reference.spec, reference.processor, info.vision.image_size)
            reference_inputs[batch] = reference.prepare(synthetic_images(batch, size), settings.prompt)
        result = reference.run(reference_inputs[batch], settings.new_tokens)
        result["loadavg"] = _load1()
        if measured:
            reference_runs[batch].append(result)

    if interleave:
        for spec in specs:  # memory: one target loaded at a time
            target = open_target(spec, "memory", with_parts=False)
            try:
                for batch in settings.batches:
                    peaks[id(spec), batch] = measure_memory(target, prepare_inputs(target, batch, settings),
                                                            settings, memory)
                    ticks[id(spec), batch]()
            finally:
                target.close()
        targets = []
        try:
            for spec in specs:
                targets.append(open_target(spec, "timing"))
            for batch in settings.batches:
                inputs = [prepare_inputs(t, batch, settings) for t in targets]
                runs: list[list[dict]] = [[] for _ in targets]
                for i in range(settings.warmup + settings.repeat):
                    for k, (spec, target) in enumerate(zip(specs, targets)):
                        result = run_once(target, inputs[k], settings.new_tokens)
                        if i >= settings.warmup:
                            runs[k].append(result)
                        ticks[id(spec), batch]()
                    run_reference(batch, i >= settings.warmup)
                for k, (spec, target) in enumerate(zip(specs, targets)):
                    rows[id(spec), batch] = summarize_runs(target, batch, runs[k], settings)
        finally:
            for target in targets:
                target.close()
    else:
        for spec in specs:
            target = open_target(spec, "timing")
            try:
                for batch in settings.batches:
                    tick = ticks[id(spec), batch]
                    row = measure(target, batch, settings, memory, tick)
                    tick()
                    peaks[id(spec), batch] = row.pop("peak_memory")
                    rows[id(spec), batch] = row
            finally:
                target.close()
        for batch in settings.batches:
            for i in range(settings.warmup + settings.repeat):
                run_reference(batch, i >= settings.warmup)

    if remeasure_peak is not None:  # again after the runs: the best of both is the device's peak
        peak = peak.best_with(remeasure_peak())
    results = []
    for spec in specs:
        for batch in settings.batches:
            row = rows[id(spec), batch]
            row["peak_memory"] = peaks[id(spec), batch]
            results.append(analyze(row, info, peak))
    add_speedups(results)
    transformers = [reference_row(reference, b, reference_runs[b]) for b in settings.batches if reference_runs[b]]
    add_vs_transformers(results, transformers)
    return {
        "schema": SCHEMA,
        "started": started.isoformat(timespec="seconds"),
        "backend": backend,
        "machine": {**machine_info(device), "loadavg_start": load_start, "loadavg_end": _loadavg()},
        "device_peak": peak.to_json(),
        "settings": {**dataclasses.asdict(settings), "interleave": interleave},
        "model": info.to_json(),
        "exports": [records[id(s)] for s in specs],
        "results": results,
        "transformers": transformers,
        **(extra or {}),
    }


def reference_row(reference, batch: int, runs: list[dict]) -> dict:
    """A transformers ``generate`` row: TTFT and decode (ms), its prompt length, the load."""
    return {
        "label": reference.label,
        "source": reference.source,
        "batch": batch,
        "seq_len": runs[0]["seq_len"],
        "timings_ms": {name: summarize([r[name] * 1e3 for r in runs if not np.isnan(r[name])])
                       for name in REFERENCE_TIMINGS},
        "loadavg": summarize([r["loadavg"] for r in runs if r.get("loadavg") is not None]),
    }


def add_vs_transformers(rows: list[dict], transformers: list[dict]) -> None:
    """``vs_transformers``: how many times faster than transformers ``generate`` at the same batch (> 1: faster)."""
    by_batch = {r["batch"]: r for r in transformers}
    for row in rows:
        ref = by_batch.get(row["batch"])
        if ref is None:
            row["vs_transformers"] = None
            continue
        row["vs_transformers"] = {name: ratio(ref["timings_ms"][name]["median"], row["timings_ms"][name]["median"])
                                  for name in REFERENCE_TIMINGS}


def _loadavg():
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def _load1() -> float | None:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None
