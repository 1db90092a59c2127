"""`hybridize eval ppl | extrapolate | synthetic`: the evaluation commands.

    hybridize eval ppl MODEL [MODEL2 ...] --data FILE|DIR [--tokenizer DIR] [--seq-len 1024] [--stride 512]
                       [--max-tokens N] [--json] [--plot loss.png]
    hybridize eval extrapolate MODEL [MODEL2 ...] --data FILE|DIR --train-len 2048 [--factors 1 2 4 8]
    hybridize eval synthetic --task mqar --mixers attention mamba2 mamba1 rglru --widths 64 128 256
                       --lrs 1e-3 3e-4 --seq-lens 64 128 256 512 --steps N [--json] [--plot acc.png]

Registered by `hybridize.cli` through `add_eval_parser(subparsers)`; the heavy imports happen inside the
command functions so `hybridize --help` stays fast.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Optional


def _user_error(msg: str) -> Exception:
    from hybridize.cli import UserError      # lazy: cli imports this module
    return UserError(msg)


# ---------------------------------------------------------------------------- shared helpers
def _device(name: Optional[str]):
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise _user_error(f"--device {name}: CUDA is not available on this machine")
    return torch.device(name)


def _dtype(name: str, device):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
            "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}[name]


def _load_model(target: str, device, dtype):
    from hybridize.api import CheckpointError, load
    from hybridize.config import ConfigError

    try:
        model = load(target, dtype=dtype, device=device)
    except (CheckpointError, ConfigError) as e:
        raise _user_error(str(e)) from None
    return model.eval()


def _resolve_tokenizer(tokenizer: Optional[str], models: list):
    """--tokenizer DIR, else the first model directory that holds a tokenizer."""
    from hybridize.data.tokenizer import TokenizerError, load_tokenizer

    candidates = [tokenizer] if tokenizer else [m for m in models if os.path.isdir(m)]
    errors = []
    for c in candidates:
        try:
            return load_tokenizer(c)
        except TokenizerError as e:
            errors.append(str(e))
    if tokenizer:
        raise _user_error(errors[0])
    raise _user_error("no tokenizer: none of the model directories holds one; pass --tokenizer DIR "
                      "(e.g. the teacher's checkpoint directory)")


def _load_token_ids(data: str, tokenizer, *, max_tokens: Optional[int], concat: bool, split: Optional[str]):
    """Documents of a corpus (text file, JSONL, directory, saved HF dataset or 'stdlib') → token lists,
    truncated to max_tokens in total; concatenated into one stream when `concat`."""
    from hybridize.data.corpus import CorpusError, load_corpus
    from hybridize.data.tokenizer import TokenizerError, encode_document

    try:
        corpus = load_corpus(data, split=split)
        docs, total = [], 0
        for doc in corpus:
            ids = encode_document(doc, tokenizer)
            if not ids:
                continue
            if max_tokens is not None:
                ids = ids[:max_tokens - total]
            docs.append(ids)
            total += len(ids)
            if max_tokens is not None and total >= max_tokens:
                break
    except (CorpusError, TokenizerError) as e:
        raise _user_error(str(e)) from None
    if total < 2:
        raise _user_error(f"{data}: fewer than 2 tokens to evaluate")
    if concat:
        docs = [[t for d in docs for t in d]]
    return docs, total


def _label(target: str) -> str:
    p = Path(target)
    return p.name if p.exists() else target


def _check_vocab(model, docs, target: str) -> None:
    top = max(max(d) for d in docs)
    vocab = model.get_input_embeddings().num_embeddings
    if top >= vocab:
        raise _user_error(f"{target}: the data has token id {top} but the model's vocabulary has {vocab} "
                          "entries — wrong --tokenizer for this model?")


def _write_json(path: Optional[str], obj) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(obj, indent=2) + "\n")


def _plot(fn, *a, **kw) -> str:
    from hybridize.eval.plots import PlotError

    try:
        return fn(*a, **kw)
    except PlotError as e:
        raise _user_error(str(e)) from None


# ---------------------------------------------------------------------------- ppl
def cmd_eval_ppl(args) -> int:
    from hybridize.eval.perplexity import perplexity

    if args.stride is not None and not 1 <= args.stride <= args.seq_len:
        raise _user_error(f"--stride must lie in [1, --seq-len={args.seq_len}] (got {args.stride})")
    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    tok = _resolve_tokenizer(args.tokenizer, args.models)
    docs, total = _load_token_ids(args.data, tok, max_tokens=args.max_tokens or None, concat=args.concat,
                                  split=args.split)
    results = []
    for target in args.models:
        model = _load_model(target, device, dtype)
        _check_vocab(model, docs, target)
        r = perplexity(model, docs, seq_len=args.seq_len, stride=args.stride, batch_size=args.batch_size,
                       progress=not args.json)
        results.append({"model": target, "label": _label(target), **r})
        del model
    report = {"data": args.data, "documents": len(docs), "data_tokens": total, "seq_len": args.seq_len,
              "stride": args.stride or args.seq_len, "models": results}
    if args.plot:
        curves = {r["label"]: r for r in results}
        title = "Loss vs token position" + (" (" + " vs ".join(curves) + ")" if len(curves) > 1 else "")
        report["plot"] = _plot(_plot_fn("plot_loss_vs_position"), curves, args.plot, title=title)
    _write_json(args.out, report)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"{args.data}: {len(docs)} document(s), {total} tokens; windows of {args.seq_len}, "
          f"stride {args.stride or args.seq_len}")
    w = max(len(r["label"]) for r in results)
    for r in results:
        print(f"  {r['label']:<{w}}  ppl {r['ppl']:10.3f}   nll {r['nll']:.4f}   scored tokens {r['tokens']}")
    if len(results) == 2:
        a, b = results
        print(f"  ppl ratio {b['label']} / {a['label']}: {b['ppl'] / a['ppl']:.3f}")
    if args.plot:
        print(f"plot: {report['plot']}")
    return 0


def _plot_fn(name: str):
    from hybridize.eval import plots
    return getattr(plots, name)


def _add_data_args(p, *, concat_default: bool) -> None:
    p.add_argument("--data", required=True,
                   help="text file, JSONL ({'text'} / {'messages'} records), a directory of them, a saved "
                        "Hugging Face dataset directory, or 'stdlib' (Python's standard library source)")
    p.add_argument("--tokenizer",
                   help="tokenizer directory (default: the first model directory that has one)")
    p.add_argument("--split", choices=["train", "heldout"], default=None,
                   help="use only this split of the corpus (the held-out split is stable across machines)")
    p.add_argument("--concat", action=argparse.BooleanOptionalAction, default=concat_default,
                   help="join all documents into one token stream (wikitext-style) instead of evaluating "
                        f"each document separately (default: {'on' if concat_default else 'off'})")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="model weights' dtype (auto: bf16 on CUDA, fp32 on CPU); losses are fp32")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", help="also write the JSON report to this file")


def add_ppl_parser(sub) -> None:
    p = sub.add_parser(
        "ppl", help="perplexity of one model, or of several compared (teacher vs student)",
        description="Perplexity with sliding-window (strided) evaluation: windows of --seq-len tokens "
                    "every --stride tokens, each scoring only the tokens no earlier window scored (the "
                    "Hugging Face recipe). Also the mean loss at each token position; --plot draws it for "
                    "every model.")
    p.add_argument("models", nargs="+", metavar="MODEL",
                   help="hybridize or HF checkpoint directory, or a preset name; give two to compare")
    _add_data_args(p, concat_default=False)
    p.add_argument("--seq-len", type=int, default=1024, help="window length in tokens (default 1024)")
    p.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts (default: --seq-len, i.e. disjoint windows; smaller "
                        "gives every scored token more context)")
    p.add_argument("--max-tokens", type=int, default=200_000, help="evaluate at most this many tokens "
                                                                   "(default 200000; 0 = all)")
    p.add_argument("--batch-size", type=int, default=8, help="windows per forward pass (default 8)")
    p.add_argument("--plot", help="write a PNG of loss vs token position (all models)")
    p.set_defaults(func=cmd_eval_ppl)


# ---------------------------------------------------------------------------- extrapolate
def cmd_eval_extrapolate(args) -> int:
    from hybridize.eval.perplexity import extrapolation

    if args.train_len < 2 or any(f <= 0 for f in args.factors):
        raise _user_error("--train-len must be >= 2 and every --factor > 0")
    device = _device(args.device)
    dtype = _dtype(args.dtype, device)
    tok = _resolve_tokenizer(args.tokenizer, args.models)
    longest = int(round(max(args.factors) * args.train_len))
    max_tokens = args.max_tokens or 4 * longest
    docs, total = _load_token_ids(args.data, tok, max_tokens=max_tokens, concat=args.concat, split=args.split)
    if max(len(d) for d in docs) < longest:
        print(f"warning: the longest evaluation length ({longest}) exceeds the longest document "
              f"({max(len(d) for d in docs)} tokens); use --concat or more --max-tokens", flush=True)
    results = {}
    for target in args.models:
        model = _load_model(target, device, dtype)
        _check_vocab(model, docs, target)
        results[_label(target)] = {"model": target, **extrapolation(
            model, docs, args.train_len, args.factors, batch_size=args.batch_size, progress=not args.json)}
        del model
    report = {"data": args.data, "data_tokens": total, "train_len": args.train_len, "factors": args.factors,
              "models": results}
    if args.plot:
        report["plot"] = _plot(_plot_fn("plot_extrapolation"), results, args.plot,
                               title=f"Length extrapolation (trained at {args.train_len} tokens)")
    _write_json(args.out, report)
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    lens = [int(round(f * args.train_len)) for f in sorted(args.factors)]
    w = max(len(k) for k in results)
    print(f"{args.data}: {total} tokens; perplexity at evaluation length (training length {args.train_len})")
    print(f"  {'model':<{w}}" + "".join(f"{L:>12}" for L in lens))
    for label, r in results.items():
        print(f"  {label:<{w}}" + "".join(f"{row['ppl']:>12.3f}" for row in r["lengths"]))
    if args.plot:
        print(f"plot: {report['plot']}")
    return 0


def add_extrapolate_parser(sub) -> None:
    p = sub.add_parser(
        "extrapolate", help="perplexity at 1×, 2×, 4×, 8× the training length",
        description="Length extrapolation: perplexity on disjoint windows of factor × --train-len tokens, "
                    "and the loss at each token position over the longest windows (Griffin Fig. 5: a "
                    "Transformer's loss rises past its training length, recurrent models keep improving).")
    p.add_argument("models", nargs="+", metavar="MODEL", help="checkpoint directories or presets")
    _add_data_args(p, concat_default=True)
    p.add_argument("--train-len", type=int, required=True,
                   help="the sequence length the models were trained at")
    p.add_argument("--factors", type=float, nargs="+", default=[1, 2, 4, 8],
                   help="evaluation lengths as multiples of --train-len (default 1 2 4 8)")
    p.add_argument("--max-tokens", type=int, default=0,
                   help="tokens to evaluate (default: 4 windows of the longest length)")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    p.add_argument("--plot", help="write a PNG: loss vs position and perplexity vs length")
    p.set_defaults(func=cmd_eval_extrapolate)


# ---------------------------------------------------------------------------- synthetic
def cmd_eval_synthetic(args) -> int:
    from hybridize.eval.sweep import format_table, run_sweep
    from hybridize.eval.synthetic import MQAR_HARD_GRID, MQAR_STANDARD_GRID, SyntheticTaskError

    task = args.task.replace("-", "_")
    seq_lens, kv = args.seq_lens, args.kv_pairs
    if args.grid:
        if task != "mqar":
            raise _user_error("--grid applies to --task mqar only")
        grid = MQAR_STANDARD_GRID if args.grid == "standard" else MQAR_HARD_GRID
        seq_lens, kv = [g[0] for g in grid], [g[1] for g in grid]
    if not seq_lens:
        seq_lens = {"mqar": [64, 128], "selective_copying": [256], "induction_heads": [256]}[task]
    if kv is not None and task != "mqar":
        raise _user_error("--kv-pairs applies to --task mqar only")
    task_kwargs = {}
    if args.vocab_size:
        task_kwargs["vocab_size"] = args.vocab_size
    if task == "selective_copying" and args.num_data_tokens:
        task_kwargs["num_data_tokens"] = args.num_data_tokens
    if task == "mqar" and args.power_a is not None:
        task_kwargs["power_a"] = args.power_a
    eval_lengths = list(args.eval_lengths or [])
    device = _device(args.device)
    try:
        res = run_sweep(task, args.mixers, args.widths, args.lrs, seq_lens, kv_pairs=kv, d_state=args.d_state,
                        progress=not args.json, steps=args.steps, batch_size=args.batch_size,
                        task_kwargs=task_kwargs, eval_examples=args.eval_examples, eval_lengths=eval_lengths,
                        eval_every=args.eval_every, num_layers=args.layers, window=args.window,
                        mlp_mult=args.mlp_mult, seed=args.seed, device=str(device), dtype=args.dtype,
                        stop_at_accuracy=args.stop_at_accuracy, time_limit_s=args.cell_time_limit)
    except SyntheticTaskError as e:
        raise _user_error(str(e)) from None
    plots = {}
    if args.plot:
        plots["accuracy_vs_width"] = _plot(_plot_fn("plot_accuracy_vs_width"), res["best"], args.plot,
                                           title=f"{task}: best accuracy over learning rates")
        stem = Path(args.plot)
        if eval_lengths:
            by_label = {}
            for c in res["best"]:
                if c["width"] == max(args.widths):
                    by_label[f"{c['label']} (L={c['seq_len']})"] = c["accuracy_by_length"]
            plots["length_generalization"] = _plot(
                _plot_fn("plot_length_generalization"), by_label, stem.with_name(stem.stem + "-lengths.png"),
                train_len=seq_lens[0] if len(seq_lens) == 1 else None,
                title=f"{task}: accuracy vs evaluation length (width {max(args.widths)})")
        if args.eval_every:
            hist = {f"{c['label']} d={c['width']} L={c['seq_len']}": c["history"] for c in res["best"]}
            plots["learning_curves"] = _plot(_plot_fn("plot_learning_curves"), hist,
                                             stem.with_name(stem.stem + "-curves.png"),
                                             title=f"{task}: accuracy during training")
    res["plots"] = plots
    _write_json(args.out, res)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"{task}: best accuracy per cell (over lrs {', '.join(f'{x:g}' for x in args.lrs)}; "
          f"{args.steps} steps × batch {args.batch_size})")
    print(format_table(res["best"]))
    if eval_lengths:
        print("accuracy by evaluation length (best lr):")
        for c in res["best"]:
            accs = "  ".join(f"{L}: {a:.3f}" for L, a in c["accuracy_by_length"].items())
            print(f"  {c['label']:<22} d={c['width']:<5} L={c['seq_len']:<5} {accs}")
    for name, path in plots.items():
        print(f"plot ({name}): {path}")
    return 0


def add_synthetic_parser(sub) -> None:
    p = sub.add_parser(
        "synthetic", help="train tiny models on MQAR / selective copying / induction heads",
        description="Train tiny models (2 layers) on a synthetic task for every mixer × width × sequence "
                    "length × learning rate, keep the best learning rate per cell and report answer accuracy "
                    "— the Zoology accuracy-vs-width figure (MQAR) and Griffin's copy / retrieval tasks. "
                    "Mixers: attention, mamba2, mamba1, rglru (= hawk), griffin (RG-LRU + local MQA), "
                    "discrete_mamba2; append ':N' for a state size (mamba2:16, mamba2:256).")
    p.add_argument("--task", default="mqar", choices=["mqar", "selective_copying", "selective-copying",
                                                      "induction_heads", "induction-heads"])
    p.add_argument("--mixers", nargs="+", default=["attention", "mamba2", "mamba1", "rglru"])
    p.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256],
                   help="model widths (default 64 128 256)")
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-4],
                   help="learning rates to try per cell (default 1e-3 3e-4)")
    p.add_argument("--seq-lens", type=int, nargs="+", default=None,
                   help="training sequence lengths (default: mqar 64 128; copying / induction 256)")
    p.add_argument("--kv-pairs", type=int, nargs="+", default=None,
                   help="MQAR: key-value pairs per sequence length (default: the Zoology grid 64→4, 128→8, "
                        "256→16, 512→64)")
    p.add_argument("--grid", choices=["standard", "hard"],
                   help="MQAR: the standard Zoology grid (L, kv) = (64,4) (128,8) (256,16) (512,64) or the "
                        "hard one (256,64) (512,128) (1024,256)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps per model (default 1000)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--vocab-size", type=int, default=None,
                   help="task vocabulary (default: mqar 8192, others 16)")
    p.add_argument("--power-a", type=float, default=None, help="MQAR query-gap power law (default 0.01)")
    p.add_argument("--num-data-tokens", type=int, default=None, help="selective copying: tokens to copy (16)")
    p.add_argument("--d-state", type=int, default=None,
                   help="state size N for mamba2 / mamba1 / discrete_mamba2 (default 64 / 16 / 64)")
    p.add_argument("--window", type=int, default=None,
                   help="griffin: local-attention window (default: global)")
    p.add_argument("--layers", type=int, default=2, help="blocks per model (default 2)")
    p.add_argument("--mlp-mult", type=int, default=2, help="MLP width multiple (0 = no MLP; default 2)")
    p.add_argument("--eval-examples", type=int, default=512, help="held-out examples per evaluation")
    p.add_argument("--eval-lengths", type=int, nargs="+", default=None,
                   help="also evaluate at these lengths (length extrapolation, e.g. 512 1024 2048 4096)")
    p.add_argument("--eval-every", type=int, default=0,
                   help="record accuracy every k steps (learning curves)")
    p.add_argument("--stop-at-accuracy", type=float, default=None,
                   help="end a cell once an eval (every --eval-every steps) reaches this accuracy, e.g. 0.99")
    p.add_argument("--cell-time-limit", type=float, default=None,
                   help="seconds of training per cell at most (then measured as it is)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="autocast (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--json", action="store_true", help="print every cell as JSON")
    p.add_argument("--out", help="also write the JSON results to this file")
    p.add_argument("--plot", help="PNG of accuracy vs width per sequence length (extra figures beside it for "
                                  "--eval-lengths and --eval-every)")
    p.set_defaults(func=cmd_eval_synthetic)


# ---------------------------------------------------------------------------- eval
def add_eval_parser(sub) -> None:
    """`hybridize eval <ppl|extrapolate|synthetic>`."""
    p = sub.add_parser("eval", help="perplexity, length extrapolation and synthetic recall tasks",
                       description="Evaluate models: `ppl` (perplexity, sliding windows, teacher vs "
                                   "student), `extrapolate` (perplexity beyond the training length) and "
                                   "`synthetic` (MQAR / selective copying / induction heads training "
                                   "sweeps). For lm-eval-harness tasks run `python -m "
                                   "hybridize.eval.lm_eval_adapter --model hybridize --model_args "
                                   "pretrained=DIR --tasks ...`.")
    esub = p.add_subparsers(dest="eval_command", metavar="<what>")
    add_ppl_parser(esub)
    add_extrapolate_parser(esub)
    add_synthetic_parser(esub)

    def _help(args) -> int:
        p.print_help()
        return 0

    p.set_defaults(func=_help)
