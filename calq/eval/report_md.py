"""report.md (and a per-layer error chart) rendered from report.json alone, so old reports re-render."""

from __future__ import annotations

from pathlib import Path


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def render_markdown(data: dict, out_dir: Path) -> None:
    lines = [f"# calq report: {data['model']}", ""]
    stages = ", ".join(s["method"] for s in data["recipe"]["stages"])
    lines += [f"- stages: {stages}", *_source_lines(data.get("source") or {}),
              f"- seed: {data['seed']}, device: {data['device']}, "
              f"weights offloaded to: {data.get('offload', 'cpu')}",
              f"- calq {data['calq_version']}, torch {data['torch']}, transformers {data['transformers']}, "
              f"compressed-tensors {data['compressed_tensors']}, Python {data['python']}",
              f"- bits per weight (quantized Linears, codes + scales + zeros): **{data['bits_per_weight']:.3f}**",
              *_parameter_lines(data),
              f"- checkpoint {_mib(data['checkpoint_bytes'])} vs dense {_mib(data['dense_bytes'])}"
              + (f"; model.gguf {_mib(data['gguf_bytes'])}" if data.get("gguf_bytes") else ""),
              f"- time {data['timings']['total']:.1f} s, peak RSS {_mib(data['peak_rss_bytes'])}",
              *_memory_lines(data.get("memory") or {}),
              *_massive_lines(data),
              *_kv_lines(data.get("kv_cache")),
              *(["- calibration: none (every stage works from the weights alone); per-layer errors not measured"]
                if data.get("data_free") else []), ""]
    if data["evaluation"]:
        lines += ["## Perplexity", "", data.get("evaluation_protocol", ""), "",
                  "| dataset | seq_len | windows | dense | compressed | ratio |", "|---|---|---|---|---|---|"]
        for e in data["evaluation"]:
            base = e["baseline_ppl"]
            ratio = f"{e['ppl'] / base:.4f}" if base else "-"
            lines.append(f"| {e['dataset']} | {e['seq_len']} | {e['windows']} | "
                         f"{base:.3f} | {e['ppl']:.3f} | {ratio} |" if base else
                         f"| {e['dataset']} | {e['seq_len']} | {e['windows']} | - | {e['ppl']:.3f} | - |")
        lines.append("")
    if data.get("expect"):
        lines += ["## Expectations", ""]
        for k, v in data["expect"].items():
            lines.append(f"- {k}: bound {v['bound']}, got {v['value']:.4f} — {'ok' if v['ok'] else 'FAILED'}")
        lines.append("")
    if data.get("adapters"):
        ad = data["adapters"]
        lines += ["## Low-rank compensation", "",
                  f"{len(ad)} adapters ({ad[0]['method']}, {ad[0]['info'].get('basis', '')}), "
                  f"{_mib(data['adapter_bytes'])}"
                  + (f"; bits per weight with adapters: {data['bits_per_weight_with_adapters']:.3f}"
                     if data.get("bits_per_weight_with_adapters") else ""), "",
                  "| module | rank | rel. error before | after |", "|---|---|---|---|"]
        lines += [f"| {a['name']} | {a['rank']} | {a['rel_error_before']:.4f} | {a['rel_error_after']:.4f} |"
                  for a in ad]
        lines.append("")
    lines += _untouched_lines(data) + _expert_lines(data)
    if data.get("skipped_modules"):
        lines += ["## Skipped modules", ""] + [f"- {m['name']}: {m['reason']}" for m in data["skipped_modules"]]
        lines.append("")
    if data["modules"]:
        if _plot(data, out_dir / "layer_errors.png"):
            lines += ["![relative output error per layer](layer_errors.png)", ""]
        lines += ["## Modules", "", "| module | method | bits | layout | group | bits/weight | rel. error | s |",
                  "|---|---|---|---|---|---|---|---|"]
        for m in data["modules"]:
            lines.append(f"| {m['name']} | {m['method']} | {m['bits']} | {m['layout']} | "
                         f"{_num(m['group_size'], 'd')} | {m['bits_per_weight']:.3f} | {_num(m['rel_error'])} | "
                         f"{m['seconds']:.2f} |")
    (out_dir / "report.md").write_text("\n".join(lines) + "\n")


def _memory_lines(mem: dict) -> list[str]:
    if not mem:
        return []
    pred = ", ".join(f"{k} {_mib(v)}" for k, v in mem["predicted"].items() if v)
    after = ", ".join(f"{k} {_mib(v)}" for k, v in mem["peak_rss_after"].items())
    return [f"- memory predicted: {pred}; peak RSS at the end of each phase: {after}"]


def _parameter_lines(data: dict) -> list[str]:
    if data.get("bits_per_parameter") is None:
        return []
    blocks = data.get("bits_per_parameter_blocks")
    return [f"- bits per parameter (every stored byte over every parameter): **{blocks:.3f}** over the repeated "
            f"blocks ({data['block_parameters']:,} parameters), {data['bits_per_parameter']:.3f} over the whole "
            f"model ({data['parameters']:,})" if blocks is not None else
            f"- bits per parameter: {data['bits_per_parameter']:.3f} over the whole model"]


def untouched_warnings(data: dict) -> list[str]:
    """One line per large block weight no stage touched (also printed by `calq compress`)."""
    return [f"{u['name']} holds {100 * u['share']:.1f} % of a block's parameters ({u['blocks']} blocks) and was "
            "left as it was" for u in data.get("untouched_weights") or []]


def _untouched_lines(data: dict) -> list[str]:
    warn = untouched_warnings(data)
    return ["## Warnings", "", *[f"- {w}" for w in warn], ""] if warn else []


def _expert_lines(data: dict) -> list[str]:
    tokens = data.get("expert_tokens") or {}
    if not tokens:
        return []
    lines = ["## Experts", "", "Calibration tokens the router sent each expert (first calibration forward).", "",
             "| experts module | experts | min | median | max | none |", "|---|---|---|---|---|---|"]
    for name, t in tokens.items():
        s = sorted(t)
        lines.append(f"| {name} | {len(t)} | {s[0]} | {s[len(s) // 2]} | {s[-1]} | {sum(x == 0 for x in t)} |")
    few = [m for m in data["modules"] if "few_tokens" in m["info"]]
    none = [m for m in data["modules"] if "fallback" in m["info"]]
    min_tokens = data["recipe"].get("moe", {}).get("min_tokens", "?")
    if few or none:
        lines += ["", f"{len(none)} expert projections no calibration token reached were compressed without data "
                  f"({', '.join(sorted({m['method'] for m in none})) or '-'}); {len(few)} saw fewer than "
                  f"{min_tokens} tokens and solved on a damped Hessian."]
    return lines + [""]


def _kv_lines(kv: dict | None) -> list[str]:
    if not kv:
        return []
    return [f"- KV cache: **{kv['label']}**, group {kv['group_size']}, streams {', '.join(kv['streams'])}; "
            f"{kv['bits_per_element']:.3f} bits per cached element, **{kv['kv_cache_ratio']:.3f}× the fp16 KV cache** "
            f"(spec formula {kv['kv_cache_ratio_nominal']:.3f}×); factors {_mib(kv['factor_bytes'])}; the "
            "compressed perplexity below is measured under this cache, the dense one with fp16 K and V"]


def _massive_lines(data: dict) -> list[str]:
    hit = [m for m in data["modules"] if m.get("excluded_tokens")]
    if not hit:
        return []
    ratio = data["recipe"]["calibration"].get("massive_token_ratio")
    names = ", ".join(f"{m['name']} ({m['excluded_tokens']})" for m in hit[:6]) + (" ..." if len(hit) > 6 else "")
    return [f"- massive tokens (‖x‖² > {ratio:g}× the median) left out of the statistics of {len(hit)} modules: "
            f"{names}"]


def _source_lines(src: dict) -> list[str]:
    gguf = src if src.get("format") == "gguf" else src.get("converted_from")
    if not gguf:
        return [f"- source: {src['format']} {src.get('path') or src.get('id', '')}"] if src else []
    via = "" if gguf is src else f", converted to {src['path']}"
    return [f"- source: GGUF `{Path(gguf['path']).name}` ({gguf['file_type']}, {gguf['architecture']}), "
            f"sha256 `{gguf['sha256']}`{via}"]


def _plot(data: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    mods = data["modules"]
    fig, ax = plt.subplots(figsize=(max(6, len(mods) * 0.25), 3.5))
    ax.bar(range(len(mods)), [m["rel_error"] or 0.0 for m in mods])
    ax.set_xticks(range(len(mods)), [m["name"].split("layers.")[-1] for m in mods], rotation=90, fontsize=6)
    ax.set_ylabel("relative output error")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _num(x, fmt: str = ".4f") -> str:
    return "-" if x is None else format(x, fmt)
