#!/usr/bin/env bash
# calq vs llm-compressor: GPTQ int4 with the same calibration windows, then both checkpoints scored by
# `calq evaluate`. llm-compressor pins its own transformers, so it gets its own venv.
#   bash benchmarks/vs_llmcompressor.sh            (needs PyPI access for the venv's first run)
#   RECIPE=recipes/smollm2-gptq-w4g64.yaml GROUP=64 bash benchmarks/vs_llmcompressor.sh
#   MODEL=runs/block7b RECIPE=runs/block7b.yaml bash benchmarks/vs_llmcompressor.sh  (benchmarks/block_model.py)
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=${WORK:-runs/vs_llmcompressor}
VENV=${VENV:-.venv-llmcompressor}
RECIPE=${RECIPE:-recipes/gptq-w4g128.yaml}
GROUP=${GROUP:-128}
EVAL_ARGS=(--dataset stdlib:test --seq-len 512 --max-windows 64 --json)
[ -f ../shared/data/wikitext-2-raw/wiki.test.raw ] && EVAL_ARGS+=(--dataset ../shared/data/wikitext-2-raw/wiki.test.raw)
mkdir -p "$WORK"
MODEL=${MODEL:-$(python3 -c "import sys; from calq.recipe.load import load_recipe; from calq.zoo import resolve_model
print(resolve_model(load_recipe(sys.argv[1]).model))" "$RECIPE")}

if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q torch==2.13.0
  "$VENV/bin/pip" install -q llmcompressor
fi

python3 benchmarks/export_calibration.py "$RECIPE" "$WORK/calibration.jsonl"
# REUSE_LLMC=1 keeps an earlier llm-compressor result in WORK (it takes the longest) and reruns calq alone
if [ "${REUSE_LLMC:-0}" != 1 ] || [ ! -f "$WORK/llmc.time" ]; then
  /usr/bin/time -f "peak_rss_kb %M elapsed %e" -o "$WORK/llmc.time" \
    "$VENV/bin/python" benchmarks/llmcompressor_gptq.py "$MODEL" "$WORK/calibration.jsonl" "$WORK/llmc" \
    --group-size "$GROUP" \
    > "$WORK/llmc.log" 2>&1
fi
# the recipe without its expect: block, which --no-eval could not check (both are scored below, alike)
python3 -c "import sys, yaml; r = yaml.safe_load(open(sys.argv[1])); r.pop('expect', None)
yaml.safe_dump(r, open(sys.argv[2], 'w'), sort_keys=False)" "$RECIPE" "$WORK/recipe.yaml"
/usr/bin/time -f "peak_rss_kb %M elapsed %e" -o "$WORK/calq.time" \
  calq compress "$WORK/recipe.yaml" --model "$MODEL" --output "$WORK/calq" --no-eval --overwrite > "$WORK/calq.log" 2>&1

calq evaluate "$WORK/calq" "${EVAL_ARGS[@]}" > "$WORK/calq.eval.jsonl"
calq evaluate "$WORK/llmc" "${EVAL_ARGS[@]}" > "$WORK/llmc.eval.jsonl"
calq evaluate "$MODEL" "${EVAL_ARGS[@]}" > "$WORK/dense.eval.jsonl"

python3 - "$WORK" <<'PY'
import json, pathlib, re, sys
w = pathlib.Path(sys.argv[1])
def ppl(f): return {r["dataset"].split("/")[-1]: r["ppl"] for r in map(json.loads, open(w / f))}
def rss(f): return int(re.search(r"peak_rss_kb (\d+)", (w / f).read_text()).group(1)) / 2**20
def wall(f): return float(re.search(r"elapsed ([\d.]+)", (w / f).read_text()).group(1))
calq_s, llmc_s = wall("calq.time"), wall("llmc.time")
dense, a, b = ppl("dense.eval.jsonl"), ppl("calq.eval.jsonl"), ppl("llmc.eval.jsonl")
print(f"{'':28s}{'calq':>12s}{'llm-compressor':>16s}")
print(f"{'wall time, whole run (s)':28s}{calq_s:12.1f}{llmc_s:16.1f}")
print(f"{'peak RSS, whole run (GiB)':28s}{rss('calq.time'):12.2f}{rss('llmc.time'):16.2f}")
for d in dense:
    print(f"{'ppl ' + d + ' (dense ' + format(dense[d], '.3f') + ')':28s}{a[d]:12.3f}{b[d]:16.3f}")
PY
