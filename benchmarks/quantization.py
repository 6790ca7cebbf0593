"""What ``quantization="int8"`` buys and costs: decode speed, and accuracy against float32.

::

    .venv/bin/python benchmarks/quantization.py                       # built-in model
    .venv/bin/python benchmarks/quantization.py --speed-model bench-results/models/llama-200m-random

Accuracy (on ``--model``, default the trained convoy-tiny, whose predictions mean something;
a random-weight model's near-flat distributions would make every rounding flip a token):

* greedy agreement: 16 prompts, 64 greedy tokens each in float32 and in int8; the share of
  positions where int8 chose float32's token before the two first diverge, and how many of
  the 16 completions are identical;
* logprob difference: both models score float32's completions (prompt + output, teacher
  forced, ``prompt_logprobs``); mean and max |logprob_int8 - logprob_f32| of those tokens.

Speed (on ``--speed-model``, default the same): single-request decode tokens/s, float32 vs
int8, median of ``--repeats`` runs (``convoy bench latency`` with batch 1), interleaved.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from convoy import LLM, SamplingParams, checkpoints  # noqa: E402
from convoy.bench.latency import run_latency  # noqa: E402

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\n",
    "class Stack:\n    def __init__(self):",
    "def read_config(path):\n    with open(path) as f:",
    "# Sort a list of numbers\n",
    "for i in range(10):\n",
    "def is_prime(n):\n    if n < 2:",
    "try:\n    import json\nexcept ImportError:",
    "def __repr__(self):\n        return",
    "    def test_add(self):\n        self.assertEqual(",
    "if __name__ == '__main__':\n",
    "def parse_args(argv=None):\n    parser = argparse.",
    "x = [i * i for i in",
    "raise ValueError(",
    "with open('data.txt', 'w') as f:\n",
    "def merge(a, b):\n    result = []\n",
]


def agreement(ref: list[int], other: list[int]) -> int:
    """Leading positions where ``other`` equals ``ref``."""
    n = 0
    for a, b in zip(ref, other, strict=False):
        if a != b:
            break
        n += 1
    return n


def chosen_logprobs(llm: LLM, sequences: list[list[int]], start: list[int]) -> list[list[float]]:
    """Per sequence, the logprob of each token from position ``start`` on, teacher-forced."""
    outs = llm.generate(
        sequences, SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0), use_tqdm=False
    )
    result = []
    for seq, first, out in zip(sequences, start, outs, strict=True):
        entries = out.prompt_logprobs or []
        result.append(
            [entries[p][seq[p]].logprob for p in range(first, len(seq)) if entries[p] is not None]
        )
    return result


def accuracy(model: str, output_len: int) -> dict[str, Any]:
    f32 = LLM(model=model)
    int8 = LLM(model=model, quantization="int8")
    params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    ref = f32.generate(PROMPTS, params, use_tqdm=False)
    got = int8.generate(PROMPTS, params, use_tqdm=False)
    agree = [
        agreement(list(r.outputs[0].token_ids), list(g.outputs[0].token_ids))
        for r, g in zip(ref, got, strict=True)
    ]
    sequences = [list(r.prompt_token_ids) + list(r.outputs[0].token_ids) for r in ref]
    starts = [len(r.prompt_token_ids) for r in ref]
    lp_f32 = chosen_logprobs(f32, sequences, starts)
    lp_int8 = chosen_logprobs(int8, sequences, starts)
    diffs = [
        abs(a - b)
        for xs, ys in zip(lp_f32, lp_int8, strict=True)
        for a, b in zip(xs, ys, strict=True)
    ]
    total = output_len * len(PROMPTS)
    return {
        "model": model,
        "prompts": len(PROMPTS),
        "output_len": output_len,
        "greedy_agreement": sum(agree) / total,
        "identical_completions": sum(a == output_len for a in agree),
        "mean_abs_logprob_diff": statistics.fmean(diffs),
        "max_abs_logprob_diff": max(diffs),
        "num_scored_tokens": len(diffs),
    }


def speed(model: str, input_len: int, output_len: int, repeats: int) -> dict[str, Any]:
    # max_num_seqs=1: float32 at its fastest single stream (plain weights, matrix-vector kernel).
    engines = {
        "float32": LLM(model=model, max_num_seqs=1),
        "int8": LLM(model=model, quantization="int8", max_num_seqs=1),
    }
    vocab = engines["float32"].engine.arch.vocab_size - 16
    runs: dict[str, list[float]] = {k: [] for k in engines}
    for _ in range(repeats):  # interleaved, so drift of the machine hits both alike
        for name, llm in engines.items():
            r = run_latency(
                llm, input_len, output_len, 1, vocab, num_iters=1, num_warmup=1, use_tqdm=False
            )
            runs[name].append(r.median_decode_tokens_per_s or 0.0)
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {
        "model": model,
        "input_len": input_len,
        "output_len": output_len,
        "repeats": repeats,
        "decode_tokens_per_s": med,
        "runs": runs,
        "speedup": med["int8"] / med["float32"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=str(checkpoints.default_model_path()))
    p.add_argument("--speed-model", help="model for the speed runs (default: --model)")
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--speed-input-len", type=int, default=128)
    p.add_argument("--speed-output-len", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    acc = accuracy(args.model, args.output_len)
    print(
        f"accuracy on {Path(acc['model']).name}: greedy agreement "
        f"{acc['greedy_agreement'] * 100:.1f}% of {acc['output_len']}-token completions "
        f"({acc['identical_completions']}/{acc['prompts']} identical); |logprob int8 - f32| "
        f"mean {acc['mean_abs_logprob_diff']:.4f}, max {acc['max_abs_logprob_diff']:.4f} "
        f"over {acc['num_scored_tokens']} tokens"
    )
    spd = speed(
        args.speed_model or args.model, args.speed_input_len, args.speed_output_len, args.repeats
    )
    d = spd["decode_tokens_per_s"]
    print(
        f"single-request decode on {Path(spd['model']).name} (median of {spd['repeats']}): "
        f"float32 {d['float32']:.1f} tok/s, int8 {d['int8']:.1f} tok/s, "
        f"speedup {spd['speedup']:.2f}x"
    )
    if args.json:
        args.json.write_text(json.dumps({"accuracy": acc, "speed": spd}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
