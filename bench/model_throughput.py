"""Throughput of the alignline decoder vs transformers' LlamaForCausalLM (same config, same weights).

    .venv/bin/python bench/model_throughput.py                      # CPU, sizes 1m and 10m
    .venv/bin/python bench/model_throughput.py --sizes 10m --repeats 7 --threads 2
    .venv/bin/python bench/model_throughput.py --device cuda          # bf16 + SDPA on a GPU

Measures, in one process with the same thread count for both models:
  train    tokens/s of forward + backward + AdamW step (use_cache=False for both, as trainers do)
  prefill  tokens/s of a no-grad forward over the prompt batch (building the KV cache)
  decode   new tokens/s of greedy generate() with the KV cache (batched, fixed length, no eos)
  memory   peak memory of one training step: CUDA allocator peak, or on CPU the peak resident-set
           growth sampled every 0.5 ms after malloc_trim (approximate).
Repeats interleave ours and HF's (alternating which goes first) and report medians, because the
machine is shared; ratio = ours / HF (> 1 is faster, for memory < 1 is smaller). The CPU-time ratio
uses process CPU seconds instead of wall seconds: on a loaded machine it is the steadier number
(use --threads 1 there, so idle OpenMP threads do not spin). Not a test.
"""

import argparse
import ctypes
import gc
import os
import statistics
import threading
import time

import torch
from tqdm import tqdm

from alignline.model.convert import to_llama
from alignline.model.tiny import tiny_model

SIZES = {
    # name: config overrides (parameter counts printed at run time)
    "1m": dict(vocab_size=2048, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024),
    "10m": dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_hidden_layers=8,
                num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024),
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


class Timer:
    """Wall-clock and process CPU time of a block (CPU time is far less sensitive to a shared machine)."""

    def __init__(self, device: str) -> None:
        self.device = device

    def __enter__(self) -> "Timer":
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        _sync(self.device)
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu

    def rates(self, tokens: int) -> tuple[float, float]:
        return tokens / self.wall, tokens / max(self.cpu, 1e-9)


class RssPeak:
    """Peak resident-set growth (bytes) while the block runs, sampled by a thread (CPU only)."""

    def __init__(self) -> None:
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.libc = ctypes.CDLL("libc.so.6") if os.path.exists("/lib/x86_64-linux-gnu/libc.so.6") else None

    def _rss(self) -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def __enter__(self) -> "RssPeak":
        gc.collect()
        if self.libc is not None:
            self.libc.malloc_trim(0)  # hand freed heap back so growth is measured from a clean base
        self.base = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.0005)

    def __exit__(self, *exc) -> None:
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self._rss())
        self.bytes = self.peak - self.base


def bench_train(model, opt, ids, steps: int, device: str) -> tuple[float, float]:
    model.train()
    for _ in range(1):  # warm-up step (allocator, AdamW state)
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with Timer(device) as t:
        for _ in range(steps):
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return t.rates(ids.numel() * steps)


def peak_train_memory(model, opt, ids, device: str) -> float:
    model.train()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(device)
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    with RssPeak() as peak:
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return peak.bytes / 2**20


@torch.no_grad()
def bench_prefill(model, ids, steps: int, device: str) -> tuple[float, float]:
    model.eval()
    model(input_ids=ids, use_cache=True)
    with Timer(device) as t:
        for _ in range(steps):
            model(input_ids=ids, use_cache=True)
    return t.rates(ids.numel() * steps)


@torch.no_grad()
def bench_decode(model, prompt, new_tokens: int, runs: int, device: str) -> tuple[float, float]:
    model.eval()
    kw = dict(attention_mask=torch.ones_like(prompt), do_sample=False, eos_token_id=None, pad_token_id=0)
    model.generate(prompt, max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
    with Timer(device) as t:
        for _ in range(runs):
            model.generate(prompt, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
    # the first new token comes from the prefill; time is dominated by the cached steps
    return t.rates(prompt.shape[0] * new_tokens * runs)


def run_size(name: str, args: argparse.Namespace) -> list[dict]:
    device, dtype = args.device, (torch.bfloat16 if args.device.startswith("cuda") else torch.float32)
    ours = tiny_model(seed=0, **SIZES[name]).to(device=device, dtype=dtype)
    hf = to_llama(ours).to(device=device, dtype=dtype)
    n_params = sum(p.numel() for p in ours.parameters())
    models = {"alignline": ours, "hf-llama": hf}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in models.items()}
    vocab = ours.config.vocab_size
    g = torch.Generator().manual_seed(0)
    train_ids = torch.randint(3, vocab, (args.batch, args.seq), generator=g).to(device)
    prompt = torch.randint(3, vocab, (args.batch, args.prompt_len), generator=g).to(device)

    results: dict[str, dict[str, list]] = {k: {"train": [], "prefill": [], "decode": [], "mem": []}
                                           for k in models}
    for rep in tqdm(range(args.repeats), desc=f"{name} ({n_params / 1e6:.1f}M params)", leave=False):
        order = list(models) if rep % 2 == 0 else list(models)[::-1]
        for key in order:
            m = models[key]
            results[key]["train"].append(bench_train(m, opts[key], train_ids, args.train_steps, device))
            results[key]["prefill"].append(bench_prefill(m, train_ids, args.prefill_steps, device))
            results[key]["decode"].append(bench_decode(m, prompt, args.new_tokens, args.decode_runs, device))
            results[key]["mem"].append((peak_train_memory(m, opts[key], train_ids, device), float("nan")))
    rows = []
    for metric in ("train", "prefill", "decode", "mem"):
        (a, a_cpu), (b, b_cpu) = ((statistics.median(r[0] for r in results[k][metric]),
                                   statistics.median(r[1] for r in results[k][metric])) for k in models)
        rows.append(dict(size=f"{name} ({n_params / 1e6:.1f}M)", metric=metric, ours=a, hf=b, ratio=a / b,
                         cpu_ratio=a_cpu / b_cpu))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="1m,10m", help=f"comma list of {sorted(SIZES)}")
    ap.add_argument("--device", default="cpu", help="cpu | cuda")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch intra-op threads")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--decode-runs", type=int, default=3, help="generate() calls per repeat")
    ap.add_argument("--train-steps", type=int, default=3)
    ap.add_argument("--prefill-steps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = "bf16" if args.device.startswith("cuda") else "fp32"
    print(f"device={args.device} dtype={dtype} threads={args.threads} batch={args.batch} seq={args.seq} "
          f"prompt={args.prompt_len} new={args.new_tokens} repeats={args.repeats} torch={torch.__version__} "
          f"load={os.getloadavg()[0]:.1f}")
    rows = []
    for name in args.sizes.split(","):
        rows += run_size(name.strip(), args)
    units = {"train": "tok/s", "prefill": "tok/s", "decode": "tok/s", "mem": "MiB"}
    print("\n| size | metric | alignline | HF Llama | ratio (wall) | ratio (CPU time) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        cpu = "" if r["metric"] == "mem" else f"{r['cpu_ratio']:.2f}x"
        print(f"| {r['size']} | {r['metric']} ({units[r['metric']]}) | {r['ours']:,.0f} | {r['hf']:,.0f} | "
              f"{r['ratio']:.2f}x | {cpu} |")


if __name__ == "__main__":
    main()
