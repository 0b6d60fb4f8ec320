"""A benchmark document (``harness.run_benchmark``) as markdown tables and a PNG plot."""

from __future__ import annotations

import io
import math
import textwrap
from pathlib import Path

from fsr.files import atomic_write

MIB = 1 << 20
#: the parts of TTFT the breakdown stacks, in pipeline order: (timing key, label)
BREAKDOWN = (("instruction", "text encoder"), ("vision_tower", "vision tower"), ("fsr_op", "pruning op"),
             ("vision_rest", "vision (rest)"), ("embed", "embed + assembly"), ("prefill", "prefill"))


def _ms(summary: dict, spread: bool = False) -> str:
    if not summary or summary.get("median") is None:
        return "–"
    text = f"{summary['median']:.1f}"
    if spread and summary["n"] > 1:
        text += f" [{summary['q1']:.1f}–{summary['q3']:.1f}]"
    return text


def _x(value, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}×"


def _pct(value) -> str:
    return "–" if value is None else f"{100 * value:.1f} %"


def _budget(row: dict) -> str:
    """``576 (none)`` unpruned, else the budget and the method: ``64 (fsr)``, ``64 (pio-fvlm)`` (a method that
    prunes inside the LLM: the average its schedule was chosen for; its kept tokens are the mean per layer)."""
    if row["kept_tokens"] >= row["num_image_tokens"]:
        return f"{row['kept_tokens']} (none)"
    return f"{row.get('budget') or row['kept_tokens']} ({row['method']})"


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def timing_table(doc: dict) -> str:
    header = ["budget", "batch", "prefill len", "TTFT ms [IQR]", "text enc", "vision", "↳ tower", "↳ op",
              "embed", "prefill", "decode ms/tok", "KV cache MiB", "peak mem MiB"]
    rows = []
    for r in doc["results"]:
        t = r["timings_ms"]
        rows.append([_budget(r), str(r["batch"]), str(r["seq_len"]), _ms(t["ttft"], True), _ms(t["instruction"]),
                     _ms(t["vision"]), _ms(t["vision_tower"]), _ms(t["fsr_op"]), _ms(t["embed"]), _ms(t["prefill"]),
                     _ms(t["decode_per_token"]), f"{r['kv_cache_bytes'] / MIB:.1f}",
                     f"{r['peak_memory']['bytes'] / MIB:.0f}"])
    return _table(header, rows)


def speedup_table(doc: dict) -> str:
    header = ["budget", "batch", "prefill GFLOP", "prefill MB", "TTFT speedup meas / ideal (ratio)",
              "prefill speedup meas / ideal (ratio)", "decode speedup meas / ideal", "KV cache ÷",
              "prefill ms meas / roofline", "op share of TTFT"]
    rows = []
    for r in doc["results"]:
        s, a = r["speedup"], r["analytic"]
        prefill_ms = r["timings_ms"]["prefill"]["median"]
        rows.append([
            _budget(r), str(r["batch"]), f"{a['prefill_flops'] / 1e9:.2f}", f"{a['prefill_bytes'] / 1e6:.1f}",
            f"{_x(s['ttft']['measured'])} / {_x(s['ttft']['ideal'])} ({_x(s['ttft']['ratio'])})",
            f"{_x(s['prefill']['measured'])} / {_x(s['prefill']['ideal'])} ({_x(s['prefill']['ratio'])})",
            f"{_x(s['decode_per_token']['measured'])} / {_x(s['decode_per_token']['ideal'])}",
            _x(r["kv_cache_reduction"], 1),
            f"{prefill_ms:.1f} / {r['roofline']['prefill_ms']:.1f} ({r['roofline']['prefill_bound']})",
            _pct(r["fsr_op_share_of_ttft"]),
        ])
    return _table(header, rows)


def segment_table(doc: dict) -> str | None:
    """Per decoder segment of the rows whose method prunes inside the LLM: layers, image tokens, prefill
    length, the segment's prefill time and the pruning graph's before it, KV cache. None when no row
    has segments with their own image tokens."""
    header = ["budget", "batch", "segment", "layers", "image tokens", "prefill len", "prefill ms",
              "pruning before ms", "KV cache MiB"]
    rows = []
    for r in doc["results"]:
        for seg in r.get("segments") or []:
            if seg.get("image_tokens") is None:
                continue
            first, stop = seg["layers"]
            rows.append([_budget(r), str(r["batch"]), seg["graph"], f"{first}–{stop - 1}",
                         str(seg["image_tokens"]), str(seg.get("seq_len", "–")), _ms(seg["prefill_ms"]),
                         _ms(seg["pruning_ms"]) if seg.get("prune_before") else "–",
                         f"{seg['kv_cache_bytes'] / MIB:.2f}" if "kv_cache_bytes" in seg else "–"])
    return _table(header, rows) if rows else None


def transformers_table(doc: dict) -> str | None:
    """Side by side with plain transformers ``generate`` on the same weights (same runs, interleaved)."""
    refs = doc.get("transformers") or []
    if not refs:
        return None
    header = ["", "batch", "prompt len", "TTFT ms [IQR]", "decode ms/tok", "TTFT vs transformers",
              "decode vs transformers", "load (1-min avg)"]
    rows = []
    for ref in refs:
        t = ref["timings_ms"]
        rows.append([ref["label"], str(ref["batch"]), str(ref["seq_len"]), _ms(t["ttft"], True),
                     _ms(t["decode_per_token"]), "1.00×", "1.00×", _load(ref.get("loadavg"))])
        for r in doc["results"]:
            if r["batch"] != ref["batch"]:
                continue
            vs = r.get("vs_transformers") or {}
            name = f"ours ({doc['backend']}), " + ("unpruned" if r["kept_tokens"] >= r["num_image_tokens"]
                                                   else f"{r['method']} budget {r['kept_tokens']}")
            rows.append([name, str(r["batch"]), str(r["seq_len"]), _ms(r["timings_ms"]["ttft"], True),
                         _ms(r["timings_ms"]["decode_per_token"]), _faster(vs.get("ttft")),
                         _faster(vs.get("decode_per_token")), _load(r.get("loadavg"))])
    return _table(header, rows)


def _faster(value) -> str:
    """``x`` times faster (> 1) or slower than the reference."""
    if value is None:
        return "–"
    return f"{value:.2f}× faster" if value >= 1 else f"{1 / value:.2f}× slower"


def _load(summary) -> str:
    if not summary or summary.get("median") is None:
        return "–"
    return f"{summary['median']:.1f} ({summary['min']:.1f}–{summary['max']:.1f})"


def decode_context_line(doc: dict) -> str | None:
    """Decode cost against context length: the longest and shortest prefill of each batch size."""
    lines = []
    for batch in sorted({r["batch"] for r in doc["results"]}):
        rows = sorted((r for r in doc["results"] if r["batch"] == batch), key=lambda r: r["seq_len"])
        if len(rows) < 2:
            continue
        short, long = rows[0], rows[-1]
        measured = _ratio(long["timings_ms"]["decode_per_token"]["median"],
                          short["timings_ms"]["decode_per_token"]["median"])
        ideal = _ratio(long["roofline"]["decode_ms_per_token"], short["roofline"]["decode_ms_per_token"])
        lines.append(f"batch {batch}: decode ms/token after {long['seq_len']} positions vs after {short['seq_len']}: "
                     f"{_x(measured)} (roofline {_x(ideal)})")
    return "Decode against context length — " + "; ".join(lines) if lines else None


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def device_line(doc: dict) -> str:
    p, m = doc["device_peak"], doc["machine"]
    where = m.get("gpu") or f"{m.get('cpu_count')}-core CPU ({p['name']})"
    load = ""
    if m.get("loadavg_start") and m.get("loadavg_end"):
        load = f"; load avg (1/5/15 min) at start {_triple(m['loadavg_start'])}, at end {_triple(m['loadavg_end'])}"
    return (f"backend `{doc['backend']}` on {where}; measured peaks: {p['peak_flops'] / 1e9:.1f} GFLOP/s "
            f"({p['dtype']} matmul), {p['peak_bandwidth'] / 1e9:.1f} GB/s (copy); model {doc['model']['source']} "
            f"({doc['model']['dtype']}); {doc['settings']['warmup']} warm-up + {doc['settings']['repeat']} runs, "
            f"{doc['settings']['new_tokens']} new tokens{load}")


def _triple(values) -> str:
    return "/".join(f"{v:.1f}" for v in values)


def legend(doc: dict) -> str:
    kinds = sorted({row["peak_memory"]["kind"] for row in doc["results"]})
    return ("Times are medians (ms) over the measured runs, IQR in brackets; TTFT starts from preprocessed inputs. "
            "text enc = instruction embedding for a method's relevance (FSR); vision = the whole vision graph, measured "
            "in the pipeline; ↳ tower / ↳ op = the graph cut at the pruning op (FSR, VisionZip) and each side timed "
            "alone (the roofline's op term is FSR's count). Ideal = roofline "
            "max(FLOPs / peak FLOP/s, bytes / peak bandwidth) with the measured peaks; ratio = measured / ideal "
            f"speedup. KV cache after prefill. Peak memory: {', '.join(kinds)}. Every budget (and transformers "
            "generate) is run in the same rounds, interleaved; the load column is the 1-minute load average "
            "during the runs (median, range). A method that prunes inside the LLM keeps every image token in the "
            "vision graph and drops them between decoder segments: its budget is the average its schedule was chosen "
            "for, its kept tokens the mean per LLM layer, and the segment table gives each segment's prefill, the "
            "pruning graph before it and its KV cache.")


def markdown(doc: dict) -> str:
    parts = [device_line(doc), timing_table(doc), speedup_table(doc), segment_table(doc), transformers_table(doc),
             decode_context_line(doc), legend(doc)]
    return "\n\n".join(p for p in parts if p) + "\n"


# ----------------------------------------------------------------------------- plot


def breakdown(row: dict) -> dict[str, float]:
    """TTFT parts (ms medians) for the stacked bars: the vision graph split into the tower and the op as
    timed alone (scaled to the vision time measured in the pipeline) and whatever else it holds."""
    t = row["timings_ms"]

    def median(key):
        v = t.get(key, {}).get("median")
        return 0.0 if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)

    vision, tower, op = median("vision"), median("vision_tower"), median("fsr_op")
    alone = tower + op
    if alone > 0:
        scale = vision / alone
        tower, op, rest = tower * scale, op * scale, 0.0
    else:
        rest = vision
    return {"instruction": median("instruction"), "vision_tower": tower, "fsr_op": op, "vision_rest": rest,
            "embed": median("embed"), "prefill": median("prefill")}


def plot(doc: dict, path: Path) -> Path:
    """Four panels against the budget, one line per batch size (and pruning method): TTFT breakdown (stacked bars, with
    transformers generate's TTFT), TTFT/prefill speedup measured vs ideal, decode ms/token measured vs
    roofline, KV cache size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["results"]
    batches = sorted({r["batch"] for r in rows})
    budgets = sorted({r["kept_tokens"] for r in rows})
    # pruning methods in the run (the unpruned row is every method's starting point)
    methods = list(dict.fromkeys(r["method"] for r in rows if r["kept_tokens"] < r["num_image_tokens"])) or [None]
    groups = []  # the bar groups: (kept tokens, method), the unpruned row as (N, None)
    for kept in budgets:
        if any(r["kept_tokens"] == kept and kept >= r["num_image_tokens"] for r in rows):
            groups.append((kept, None))
        else:
            groups += [(kept, m) for m in methods if any(r["kept_tokens"] == kept and r["method"] == m for r in rows)]
    refs = {r["batch"]: r for r in doc.get("transformers") or []}
    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    (bars, speed), (decode, kv) = axes
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    part_colors = dict(zip((k for k, _ in BREAKDOWN), plt.get_cmap("tab20c").colors[::2]))
    markers = ["o", "s", "^", "D"]

    def in_group(r: dict, kept: int, method: str | None) -> bool:
        return r["kept_tokens"] == kept and (method is None or r["method"] == method)

    # (a) TTFT breakdown: one group per budget (and method), one bar per batch size
    width = 0.8 / max(len(batches), 1)
    for j, batch in enumerate(batches):
        for i, (kept, method) in enumerate(groups):
            row = next((r for r in rows if r["batch"] == batch and in_group(r, kept, method)), None)
            if row is None:
                continue
            x, bottom = i + (j - (len(batches) - 1) / 2) * width, 0.0
            for key, label in BREAKDOWN:
                value = breakdown(row)[key]
                bars.bar(x, value, width * 0.9, bottom=bottom, color=part_colors[key], edgecolor="white",
                         label=label if (i, j) == (0, 0) else None)
                bottom += value
            bars.text(x, bottom, f"b{batch}", ha="center", va="bottom", fontsize=7)
        if batch in refs:
            bars.axhline(refs[batch]["timings_ms"]["ttft"]["median"], color=colors[j % len(colors)], linestyle="--",
                         linewidth=1, label=f"transformers generate, b={batch}")
    bars.set_xticks(range(len(groups)), [str(k) if m is None or len(methods) < 2 else f"{k}\n{m}"
                                         for k, m in groups])
    bars.set_xlabel("image tokens kept (budget)")
    bars.set_ylabel("time to first token (ms)")
    bars.set_title("TTFT breakdown (medians)")
    bars.legend(fontsize=7)

    curves = [(batch, method) for batch in batches for method in methods]
    for j, (batch, method) in enumerate(curves):  # one curve per batch size and method, from the unpruned row
        rs = sorted((r for r in rows if r["batch"] == batch and (method is None or r["method"] == method
                                                                  or r["kept_tokens"] >= r["num_image_tokens"])),
                    key=lambda r: r["kept_tokens"])
        x = [r["kept_tokens"] for r in rs]
        c, m = colors[j % len(colors)], markers[batches.index(batch) % len(markers)]
        tag = f"b={batch}" if len(methods) < 2 else f"{method}, b={batch}"
        # (b) speedups
        speed.plot(x, [r["speedup"]["ttft"]["measured"] for r in rs], "-", marker=m, color=c,
                   label=f"TTFT measured, {tag}")
        speed.plot(x, [r["speedup"]["ttft"]["ideal"] for r in rs], "--", marker=m, color=c, alpha=0.6, mfc="none",
                   label=f"TTFT ideal, {tag}")
        speed.plot(x, [r["speedup"]["prefill"]["measured"] for r in rs], "-", marker=m, color=c, alpha=0.5,
                   markersize=4, label=f"prefill measured, {tag}")
        speed.plot(x, [r["speedup"]["prefill"]["ideal"] for r in rs], ":", marker=m, color=c, alpha=0.6,
                   markersize=4, mfc="none", label=f"prefill ideal, {tag}")
        # (c) decode
        med = [r["timings_ms"]["decode_per_token"]["median"] for r in rs]
        err = [[mm - r["timings_ms"]["decode_per_token"]["q1"] for mm, r in zip(med, rs)],
               [r["timings_ms"]["decode_per_token"]["q3"] - mm for mm, r in zip(med, rs)]]
        decode.errorbar(x, med, yerr=err, fmt="-", marker=m, color=c, capsize=3, label=f"measured (IQR), {tag}")
        decode.plot(x, [r["roofline"]["decode_ms_per_token"] for r in rs], "--", marker=m, color=c, alpha=0.6,
                    mfc="none", label=f"roofline ideal, {tag}")
        if batch in refs and method == methods[0]:
            decode.axhline(refs[batch]["timings_ms"]["decode_per_token"]["median"], color=c, linestyle=":",
                           linewidth=1, label=f"transformers generate, b={batch}")
        # (d) KV cache
        kv.plot(x, [r["kv_cache_bytes"] / MIB for r in rs], "-", marker=m, color=c, label=f"after prefill, {tag}")
        kv.plot(x, [r["kv_cache_bytes_final"] / MIB for r in rs], ":", marker=m, color=c, alpha=0.6, mfc="none",
                label=f"after decoding, {tag}")
    for ax in (speed, decode, kv):
        ax.set_xlabel("image tokens kept (budget; inside the LLM: mean per layer)")
        ax.set_xscale("log", base=2)
        ax.set_xticks(budgets, [str(t) for t in budgets])
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    speed.axhline(1.0, color="grey", linewidth=0.8)
    speed.set_ylabel("speedup vs unpruned (×)")
    speed.set_title("speedup: measured vs roofline ideal (ideal lines of batch sizes coincide where both are "
                    "compute-bound)", fontsize=8)
    decode.set_ylabel("decode ms / token (log)")
    decode.set_yscale("log")  # transformers generate and the roofline are often orders of magnitude apart
    decode.set_title("decode: measured vs roofline")
    kv.set_ylabel("KV cache (MiB)")
    kv.set_title("KV cache size")
    fig.suptitle(textwrap.fill(device_line(doc), 180), fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return atomic_write(Path(path), buffer.getvalue())  # all of the picture or none of it
