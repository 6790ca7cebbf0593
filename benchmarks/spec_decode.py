"""Speculative decoding, measured: convoy with and without it, and llama.cpp's, same run.

Parts (``--part``, several allowed; default all):

* ``tiny``: convoy-tiny and its draft (the built-in defaults) on prompts cut from the Python
  files held out of their training, greedy, 128 new tokens each, at concurrency 1, 4, 16 and
  64: tokens/s without speculation and with the default config, acceptance, tokens per verify
  and the controller's mean draft length.
* ``oracle``: the 200M random-weight Llama with the oracle proposer at acceptance 0.3, 0.6
  and 0.9, c = 1 (8 prompts of 64 tokens, 64 new tokens each): every fixed draft length
  1..6 and the adaptive controller, against none.
* ``llamacpp``: llama.cpp's ``llama-speculative-simple`` with the same target and draft
  converted to GGUF f32, the same prompts at c = 1, beside convoy's speculative c = 1.
* ``invariance``: what batch invariance costs, without speculation: the 200M model's
  ``random`` workload (64 prompts, 128 tokens, max_num_seqs 128) and ``c=1``.

Each figure is the median of ``--repeats`` runs, configurations interleaved; every run is a
fresh engine warmed up on the first prompts. Results go to bench-results/ as JSON too::

    .venv/bin/python benchmarks/spec_decode.py --part tiny --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script: the repository's benchmarks package

from benchmarks.comparison.machine import ensure_model, token_space  # noqa: E402
from benchmarks.comparison.paths import LLAMACPP_TOOLS_DIR  # noqa: E402
from convoy import LLM, SamplingParams  # noqa: E402
from convoy.bench.workloads import random_workload  # noqa: E402
from convoy.checkpoints import (  # noqa: E402
    ASSETS_DIR,
    DEFAULT_MODEL_NAME,
    DRAFT_MODEL_NAME,
    python_corpus_files,
)

OUTPUT_LEN = 128
PROMPT_LEN = 128


def held_out_prompts(llm: LLM, n: int) -> list[list[int]]:
    """``n`` prompts of PROMPT_LEN tokens from the files convoy-tiny was validated on."""
    training = json.loads((ASSETS_DIR / DEFAULT_MODEL_NAME / "training.json").read_text())
    names = set(training["corpus"]["validation_files"])
    tok = llm.get_tokenizer()
    prompts: list[list[int]] = []
    files = [text for path, text in python_corpus_files() if path in names]
    i = 0
    while len(prompts) < n:
        ids = tok.encode(files[i % len(files)])
        # A different window of the file each time round.
        start = (i // len(files)) * PROMPT_LEN * 2
        if len(ids) >= start + PROMPT_LEN:
            prompts.append(ids[start : start + PROMPT_LEN])
        i += 1
        if i > 50 * n:
            raise RuntimeError("not enough held-out text")
    return prompts


def timed_run(
    llm: LLM, prompts: list[list[int]], output_len: int = OUTPUT_LEN, warm: int = 2
) -> dict[str, Any]:
    """Tokens/s of one generate call (after a warm-up), with what speculation did."""
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    llm.generate(prompts[:warm], SamplingParams(temperature=0, max_tokens=8), use_tqdm=False)
    spec = llm.engine.speculator
    before = (
        (spec.stats.num_drafts, spec.stats.num_draft_tokens, spec.stats.num_accepted_tokens)
        if spec
        else (0, 0, 0)
    )
    steps0 = llm.engine.num_steps
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    row: dict[str, Any] = {
        "tok_s": tokens / elapsed,
        "elapsed_s": elapsed,
        "tokens": tokens,
        "steps": llm.engine.num_steps - steps0,
    }
    if spec:
        drafts = spec.stats.num_drafts - before[0]
        drafted = spec.stats.num_draft_tokens - before[1]
        accepted = spec.stats.num_accepted_tokens - before[2]
        row.update(
            acceptance=accepted / drafted if drafted else 0.0,
            tokens_per_verify=(accepted + drafts) / drafts if drafts else 1.0,
            mean_k=drafted / drafts if drafts else 0.0,
            share_speculated=drafts / tokens,
        )
    row["outputs"] = [o.outputs[0].token_ids for o in outs]
    return row


def median_rows(rows: list[dict[str, Any]]) -> dict[str, Any]:
    out = {k: statistics.median(r[k] for r in rows) for k in rows[0] if k != "outputs"}
    out["runs_tok_s"] = [round(r["tok_s"], 1) for r in rows]
    return out


def interleaved(
    configs: dict[str, dict[str, Any]], prompts: list[list[int]], repeats: int, **run: Any
) -> dict[str, dict[str, Any]]:
    """Each config ``repeats`` times, order alternating; outputs checked equal to the first."""
    rows: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    reference = None
    for r in range(repeats):
        names = list(configs) if r % 2 == 0 else list(configs)[::-1]
        for name in names:
            llm = LLM(**configs[name])
            row = timed_run(llm, prompts, **run)
            del llm
            if reference is None:
                reference = row["outputs"]
            elif row["outputs"] != reference:
                raise AssertionError(f"{name}: outputs differ from the first configuration's")
            rows[name].append(row)
            print(f"  [{r + 1}/{repeats}] {name:24} {row['tok_s']:8.1f} tok/s", flush=True)
    return {name: median_rows(v) for name, v in rows.items()}


def part_tiny(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {}
    probe = LLM(speculative_config="none")
    prompts = held_out_prompts(probe, 64)
    del probe
    print("| c | off tok/s | spec tok/s | spec/off | acceptance | tokens/verify | mean k |")
    lines = []
    for c in args.concurrency:
        n = max(8, c)
        base = {"max_num_seqs": c}
        configs = {
            "off": {**base, "speculative_config": "none", "batch_invariant": "off"},
            "spec": {**base},  # the default: convoy-tiny-draft, adaptive
        }
        got = interleaved(configs, prompts[:n], args.repeats)
        off, on = got["off"], got["spec"]
        results[f"c={c}"] = got
        line = (
            f"| {c} | {off['tok_s']:.1f} | {on['tok_s']:.1f} | {on['tok_s'] / off['tok_s']:.2f} "
            f"| {on['acceptance']:.2f} | {on['tokens_per_verify']:.2f} | {on['mean_k']:.2f} |"
        )
        lines.append(line)
        print(line, flush=True)
    print("\n| c | off tok/s | spec tok/s | spec/off | acceptance | tokens/verify | mean k |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(lines))
    return results


def part_oracle(args: argparse.Namespace) -> dict[str, Any]:
    model = ensure_model("200m", args.cache_dir)
    vocab, avoid = token_space(model)
    reqs = random_workload(8, (64, 64), (64, 64), vocab, seed=1, avoid_ids=avoid)
    prompts = [r.prompt_token_ids for r in reqs]
    base = {"model": str(model), "max_num_seqs": 1}
    ref = timed_run(LLM(**base, speculative_config="none"), prompts, 64)
    references = {tuple(p): out for p, out in zip(prompts, ref["outputs"], strict=True)}
    results: dict[str, Any] = {}
    lines = []
    for acceptance in args.acceptance:
        configs: dict[str, dict[str, Any]] = {"off": {**base, "speculative_config": "none"}}
        for k in [*range(1, 7), 0]:
            spec = {
                "method": "oracle",
                "num_speculative_tokens": k or 6,
                "oracle_error_rate": round(1 - acceptance, 6),
                "adaptive": k == 0,
            }
            configs["adaptive" if k == 0 else f"k={k}"] = {**base, "speculative_config": spec}
        rows: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
        for r in range(args.repeats):
            for name in list(configs) if r % 2 == 0 else list(configs)[::-1]:
                llm = LLM(**configs[name])
                if llm.engine.speculator is not None and llm.engine.speculator.oracle:
                    llm.engine.speculator.oracle.set_references(references)
                row = timed_run(llm, prompts, 64)
                del llm
                if row["outputs"] != ref["outputs"]:
                    raise AssertionError(f"oracle {name}: outputs changed")
                rows[name].append(row)
                print(f"  a={acceptance} [{r + 1}] {name:9} {row['tok_s']:7.1f} tok/s", flush=True)
        got = {name: median_rows(v) for name, v in rows.items()}
        results[f"acceptance={acceptance}"] = got
        fixed = {n: v["tok_s"] for n, v in got.items() if n.startswith("k=")}
        best = max(fixed, key=lambda n: fixed[n])
        line = (
            f"| {acceptance} | {got['off']['tok_s']:.1f} | "
            + " | ".join(f"{fixed[f'k={k}']:.1f}" for k in range(1, 7))
            + f" | {got['adaptive']['tok_s']:.1f} (k {got['adaptive']['mean_k']:.1f}) | {best} "
            f"| {got['adaptive']['tok_s'] / fixed[best]:.3f} |"
        )
        lines.append(line)
        print(line, flush=True)
    header = ["acceptance", "off", *(f"k={k}" for k in range(1, 7)), "adaptive", "best"]
    print("\n| " + " | ".join([*header, "adaptive/best"]) + " |")
    print("|---" * 11 + "|")
    print("\n".join(lines))
    return results


def _gguf(model_dir: Path, args: argparse.Namespace) -> Path:
    from benchmarks.comparison.engines.llamacpp.gguf import ensure_gguf, find_llama_cpp_dir

    llama_dir = find_llama_cpp_dir(args.llama_cpp_dir, args.cache_dir)
    # ensure_gguf writes beside the checkpoint: copy the shipped model out of the package.
    local = args.cache_dir / model_dir.name
    if not local.exists():
        import shutil

        shutil.copytree(model_dir, local)
    return ensure_gguf(local, "f32", llama_dir)


def part_llamacpp(args: argparse.Namespace) -> dict[str, Any]:
    tools = LLAMACPP_TOOLS_DIR.get()
    binary = tools / "llama-speculative-simple" if tools else None
    if binary is None or not binary.is_file():
        raise SystemExit(
            f"llama-speculative-simple not found in {tools}: "
            "benchmarks/peers/build_llamacpp_tools.sh builds it"
        )
    target = _gguf(ASSETS_DIR / DEFAULT_MODEL_NAME, args)
    draft = _gguf(ASSETS_DIR / DRAFT_MODEL_NAME, args)
    probe = LLM(speculative_config="none")
    tok = probe.get_tokenizer()
    prompts = held_out_prompts(probe, 8)
    del probe
    k = 4
    llama_rates: list[float] = []
    llama_accept: list[float] = []
    for r in range(args.repeats):
        for p in prompts:
            text = tok.decode(p)
            cmd = [
                str(binary),
                *("-m", str(target), "-md", str(draft), "--spec-type", "draft-simple"),
                *("-p", text, "-n", str(OUTPUT_LEN), "--spec-draft-n-max", str(k)),
                *("-t", str(args.threads), "-td", str(args.threads), "--temp", "0"),
                *("--top-k", "1", "-c", "1024", "--ignore-eos"),
            ]
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
            log = proc.stdout + proc.stderr
            m = re.search(r"decoded\s+(\d+)\s+tokens in\s+([\d.]+)\s+seconds", log)
            if proc.returncode != 0 or m is None:
                raise RuntimeError(f"llama-speculative-simple failed:\n{log[-3000:]}")
            llama_rates.append(int(m.group(1)) / float(m.group(2)))
            acc = re.search(r"accept\s+=\s+([\d.]+)%", log)
            if acc:
                llama_accept.append(float(acc.group(1)) / 100)
        print(f"  [{r + 1}] llama.cpp median so far {statistics.median(llama_rates):.1f} tok/s")
    draft_only = {"model": str(ASSETS_DIR / DRAFT_MODEL_NAME), "num_speculative_tokens": k}
    configs = {
        "convoy spec (default: auto)": {"max_num_seqs": 1},
        f"convoy draft model only (k<={k})": {"max_num_seqs": 1, "speculative_config": draft_only},
        "convoy off": {"max_num_seqs": 1, "speculative_config": "none", "batch_invariant": "off"},
    }
    got = interleaved(configs, prompts, args.repeats)
    llama = statistics.median(llama_rates)
    print("\n| c=1 | tok/s | / llama.cpp |\n|---|---|---|")
    accept = statistics.median(llama_accept) if llama_accept else float("nan")
    print(f"| llama.cpp speculative (k={k}, f32, acceptance {accept:.2f}) | {llama:.1f} | 1.00 |")
    for name, row in got.items():
        print(f"| {name} | {row['tok_s']:.1f} | {row['tok_s'] / llama:.2f} |")
    return {"llama.cpp": {"tok_s": llama, "runs": llama_rates, "acceptance": accept}, **got}


def part_invariance(args: argparse.Namespace) -> dict[str, Any]:
    model = ensure_model("200m", args.cache_dir)
    vocab, avoid = token_space(model)
    reqs = random_workload(64, (64, 256), (128, 128), vocab, seed=0, avoid_ids=avoid)
    prompts = [r.prompt_token_ids for r in reqs]
    results = {}
    print("\n| 200m | invariance off | on | on/off |\n|---|---|---|---|")
    for case, (ps, seqs) in {"random": (prompts, 128), "c=1": (prompts[:1], 4)}.items():
        base = {"model": str(model), "max_num_seqs": seqs, "speculative_config": "none"}
        configs = {
            "off": {**base, "batch_invariant": "off"},
            "on": {**base, "batch_invariant": "on"},
        }
        got = interleaved(configs, ps, args.repeats, warm=1)
        results[case] = got
        print(
            f"| {case} | {got['off']['tok_s']:.1f} | {got['on']['tok_s']:.1f} | "
            f"{got['on']['tok_s'] / got['off']['tok_s']:.3f} |",
            flush=True,
        )
    return results


PARTS = {
    "tiny": part_tiny,
    "oracle": part_oracle,
    "llamacpp": part_llamacpp,
    "invariance": part_invariance,
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=list(PARTS), action="append")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 64])
    p.add_argument("--acceptance", type=float, nargs="+", default=[0.3, 0.6, 0.9])
    p.add_argument("--cache-dir", type=Path, default=REPO / "bench-results" / "models")
    p.add_argument("--llama-cpp-dir", type=Path, default=None)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = p.parse_args()
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for part in args.part or list(PARTS):
        print(f"\n## {part}", flush=True)
        results[part] = PARTS[part](args)
    out = REPO / "bench-results" / f"spec-decode-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(results, indent=1))
    print(f"\nresults: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
