"""A benchmark document (``harness.run_benchmark``) as markdown tables and a PNG plot."""

from __future__ import annotations

import io
import textwrap
from pathlib import Path

from fsr.files import atomic_write

MIB = 1 << 20


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


def device_line(doc: dict) -> str:
    p, m = doc["device_peak"], doc["machine"]
    where = m.get("gpu") or f"{m.get('cpu_count')}-core CPU ({p['name']})"
    return (f"backend `{doc['backend']}` on {where}; measured peaks: {p['peak_flops'] / 1e9:.1f} GFLOP/s "
            f"({p['dtype']} matmul), {p['peak_bandwidth'] / 1e9:.1f} GB/s (copy); model {doc['model']['source']} "
            f"({doc['model']['dtype']}); {doc['settings']['warmup']} warm-up + {doc['settings']['repeat']} runs, "
            f"{doc['settings']['new_tokens']} new tokens")


def legend(doc: dict) -> str:
    kinds = sorted({row["peak_memory"]["kind"] for row in doc["results"]})
    return ("Times are medians (ms) over the measured runs, IQR in brackets; TTFT starts from preprocessed inputs. "
            "text enc = instruction embedding for a method's relevance (FSR); vision = the whole vision graph, measured "
            "in the pipeline; ↳ tower / ↳ op = the graph cut at the pruning op (FSR, VisionZip) and each side timed "
            "alone (the roofline's op term is FSR's count). Ideal = roofline "
            "max(FLOPs / peak FLOP/s, bytes / peak bandwidth) with the measured peaks; ratio = measured / ideal "
            f"speedup. KV cache after prefill. Peak memory: {', '.join(kinds)}. A method that prunes inside the LLM "
            "keeps every image token in the vision graph and drops them between decoder segments: its budget is the "
            "average its schedule was chosen for, its kept tokens the mean per LLM layer, and the segment table "
            "gives each segment's prefill, the pruning graph before it and its KV cache.")


def markdown(doc: dict) -> str:
    parts = [device_line(doc), timing_table(doc), speedup_table(doc), segment_table(doc), legend(doc)]
    return "\n\n".join(p for p in parts if p) + "\n"


def plot(doc: dict, path: Path) -> Path:
    """Speedup (measured vs ideal) and TTFT (measured vs roofline) against the budget, per batch size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = doc["results"]
    batches = sorted({r["batch"] for r in rows})
    methods = list(dict.fromkeys(r["method"] for r in rows if r["kept_tokens"] < r["num_image_tokens"]))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    curves = [(batch, method) for batch in batches for method in methods or [None]]
    for i, (batch, method) in enumerate(curves):  # one curve per batch and method, each from the baseline
        rs = sorted((r for r in rows if r["batch"] == batch and (method is None or r["method"] == method
                                                                  or r["kept_tokens"] >= r["num_image_tokens"])),
                    key=lambda r: r["kept_tokens"])
        x = [r["kept_tokens"] for r in rs]
        c = colors[i % len(colors)]
        tag = f"b={batch}" if len(methods) < 2 else f"{method}, b={batch}"
        left.plot(x, [r["speedup"]["ttft"]["measured"] for r in rs], "o-", color=c, label=f"TTFT measured, {tag}")
        left.plot(x, [r["speedup"]["ttft"]["ideal"] for r in rs], "o--", color=c, alpha=0.6,
                  label=f"TTFT ideal, {tag}")
        left.plot(x, [r["speedup"]["prefill"]["measured"] for r in rs], "s-", color=c, alpha=0.8, markersize=4,
                  label=f"prefill measured, {tag}")
        left.plot(x, [r["speedup"]["prefill"]["ideal"] for r in rs], "s:", color=c, alpha=0.6, markersize=4,
                  label=f"prefill ideal, {tag}")
        med = [r["timings_ms"]["ttft"]["median"] for r in rs]
        err = [[m - r["timings_ms"]["ttft"]["q1"] for m, r in zip(med, rs)],
               [r["timings_ms"]["ttft"]["q3"] - m for m, r in zip(med, rs)]]
        right.errorbar(x, med, yerr=err, fmt="o-", color=c, capsize=3, label=f"measured (IQR), {tag}")
        right.plot(x, [r["roofline"]["ttft_ms"] for r in rs], "o--", color=c, alpha=0.6,
                   label=f"roofline ideal, {tag}")
    for ax in (left, right):
        ax.set_xlabel("image tokens kept (budget; inside the LLM: mean per layer)")
        ax.set_xscale("log", base=2)
        ticks = sorted({r["kept_tokens"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.grid(True, alpha=0.3)
    left.axhline(1.0, color="grey", linewidth=0.8)
    left.set_ylabel("speedup vs unpruned (×)")
    left.set_title("speedup: measured vs roofline ideal")
    left.legend(fontsize=7)
    right.set_ylabel("time to first token (ms)")
    right.set_title("time to first token")
    right.legend(fontsize=7)
    fig.suptitle(textwrap.fill(device_line(doc), 160), fontsize=7)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return atomic_write(Path(path), buffer.getvalue())  # all of the picture or none of it
