"""Run by tests (and benchmarks) in a subprocess: load a GGUF in llama.cpp (llama-cpp-py-sync) and report, as
JSON on stdout, the next-token log-likelihoods of a token sequence from llama.cpp's own logits, greedy tokens
generated from a prompt, and the generation speed. A subprocess, because llama.cpp writes to the process's
stderr and the bindings may be a patched copy (tests/export/llama_cpp_runtime.py).

    python llama_cpp_probe.py MODEL.gguf REQUEST.json  # {"ids": [...], "prompt": [...], "new": 8, "threads": 2}
    # or {"texts": [...]}: llama.cpp's own tokenization of each text (with BOS as the file asks), nothing run
"""

import json
import math
import sys
import time

import numpy as np
from llama_cpp_py_sync import Llama


def logits_of(llm, ids: list[int], start: int) -> np.ndarray:
    """llama.cpp's logits [len(ids), V] for ids placed at positions start, start+1, ..."""
    lib, ffi, ctx, V = llm._lib, llm._ffi, llm._ctx, llm.n_vocab
    out = []
    for a in range(0, len(ids), llm._n_batch):
        chunk = ids[a:a + llm._n_batch]
        batch = lib.llama_batch_init(len(chunk), 0, 1)
        try:
            batch.n_tokens = len(chunk)
            for i, t in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, start + a + i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, 1
            if lib.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            out += [np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(ctx, i), 4 * V), dtype=np.float32).copy()
                    for i in range(len(chunk))]
        finally:
            lib.llama_batch_free(batch)
    return np.stack(out)


def main():
    path, request = sys.argv[1], json.loads(open(sys.argv[2]).read())
    if "texts" in request:
        llm = Llama(path, n_ctx=64, n_threads=1, verbose=False)
        print(json.dumps({"tokens": [llm.tokenize(t, add_special=True) for t in request["texts"]]}), flush=True)
        llm.close()
        return
    ids, prompt, new = request["ids"], request["prompt"], request.get("new", 8)
    llm = Llama(path, n_ctx=max(len(ids), len(prompt) + new) + 8, n_batch=512, n_threads=request.get("threads", 2),
                verbose=False)
    lg = logits_of(llm, ids, 0).astype(np.float64)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    nll = [float(lse[i] - lg[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    llm._clear_context_state()
    t0 = time.perf_counter()
    greedy, seq = [], list(prompt)
    last = logits_of(llm, seq, 0)[-1]
    t_prompt = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(new):
        tok = int(last.argmax())
        greedy.append(tok)
        seq.append(tok)
        last = logits_of(llm, [tok], len(seq) - 1)[-1]
    t_gen = time.perf_counter() - t0
    print(json.dumps({"nll": nll, "ppl": math.exp(sum(nll) / len(nll)), "greedy": greedy,
                      "prompt_tokens_per_s": len(prompt) / t_prompt, "tokens_per_s": new / t_gen}), flush=True)
    llm.close()


if __name__ == "__main__":
    main()
