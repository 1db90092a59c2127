"""`hybridize generate MODEL --prompt ...`: generate text (or token ids) with a checkpoint or a preset,
optionally with speculative decoding (`--draft`). Registered in `hybridize.cli` via
`add_generate_parser`."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def _user_error(msg: str):
    from hybridize.cli import UserError  # lazy: cli imports this module to register the command

    return UserError(msg)


def _has_tokenizer(path: str) -> bool:
    p = Path(path)
    return p.is_dir() and any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json",
                                                         "tokenizer.model"))


def _parse_ids(text: str) -> list:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t != ""]
    except ValueError:
        raise _user_error(f"without a tokenizer, --prompt takes comma-separated token ids (e.g. '1,15,27'), "
                          f"got {text!r}; pass --tokenizer DIR for text prompts") from None
    if not ids:
        raise _user_error("empty --prompt")
    return ids


def _load(target: str, device, dtype, what: str):
    import hybridize as hz
    from hybridize.api import CheckpointError

    try:
        model = hz.load(target)
    except (CheckpointError, ValueError, OSError) as e:
        raise _user_error(f"could not load {what} {target!r}: {e}") from None
    return model.to(device=device, dtype=dtype).eval()


def cmd_generate(args) -> int:
    import torch

    from hybridize.generate import generate

    if not args.prompt:
        raise _user_error("give at least one --prompt")
    for name in ("max_new_tokens", "num_draft_tokens"):
        if getattr(args, name) < (1 if name == "num_draft_tokens" else 0):
            raise _user_error(f"--{name.replace('_', '-')} must be >= {1 if name == 'num_draft_tokens' else 0}")
    if args.stream and len(args.prompt) > 1 and not args.json:
        raise _user_error("--stream takes a single --prompt")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16, "float32": torch.float32}[args.dtype]

    tokenizer = None
    tok_dir = args.tokenizer or (args.model if _has_tokenizer(args.model) else None)
    if tok_dir:
        from hybridize.data.tokenizer import TokenizerError, load_tokenizer

        try:
            tokenizer = load_tokenizer(tok_dir)
        except TokenizerError as e:
            raise _user_error(str(e)) from None
    prompts = list(args.prompt) if tokenizer is not None else [_parse_ids(p) for p in args.prompt]
    if args.stop and tokenizer is None:
        raise _user_error("--stop needs a tokenizer (--tokenizer DIR)")

    model = _load(args.model, device, dtype, "model")
    draft = _load(args.draft, device, dtype, "draft") if args.draft else None

    streaming = args.stream and not args.json

    def on_tokens(b, ids, text):
        sys.stdout.write(text if text is not None else "".join(f" {t}" for t in ids))
        sys.stdout.flush()

    try:
        res = generate(model, prompts, args.max_new_tokens, draft=draft, num_draft_tokens=args.num_draft_tokens,
                       temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                       repetition_penalty=args.repetition_penalty,
                       eos_token_id=args.eos_token_id if args.eos_token_id else None, stop=args.stop,
                       seed=args.seed, tokenizer=tokenizer, stream=on_tokens if streaming else None,
                       use_cuda_graph="auto" if not args.no_cuda_graph else False,
                       compile=False if args.no_compile else "auto")
    except ValueError as e:
        raise _user_error(str(e)) from None

    stats = res.stats.to_dict()
    if args.json:
        results = [{"prompt": p, "prompt_ids": ids, "tokens": t, "text": res.texts[i] if res.texts else None,
                    "finish_reason": r}
                   for i, (p, ids, t, r) in enumerate(zip(args.prompt, res.prompt_tokens, res.tokens,
                                                          res.finish_reasons))]
        print(json.dumps({"model": args.model, "draft": args.draft, "results": results, "stats": stats},
                         indent=2))
        return 0
    if streaming:
        print()
    else:
        for i, toks in enumerate(res.tokens):
            if len(res.tokens) > 1:
                print(f"[{i}] ", end="")
            print(res.texts[i] if res.texts else ",".join(map(str, toks)))
    line = (f"{stats['new_tokens']} tokens in {stats['decode_s']:.2f} s ({stats['tokens_per_s']:.1f} tok/s, "
            f"prefill {stats['prefill_s'] * 1e3:.0f} ms)")
    if draft is not None:
        line += (f", acceptance {stats['acceptance_rate']:.2f}, {stats['mean_tokens_per_round']:.2f} tokens "
                 "per round")
    print(line, file=sys.stderr)
    return 0


def add_generate_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a model (optionally speculative, with a draft)",
                       description="Generate a continuation of each --prompt with a hybridize/HF checkpoint or a "
                                   "preset (random weights). Without a tokenizer, prompts are comma-separated "
                                   "token ids and the output is token ids.")
    p.add_argument("model", help="checkpoint directory (hybridize or HF) or preset, e.g. mil50-tiny")
    p.add_argument("--prompt", action="append", default=[], help="prompt text, or token ids '1,2,3' without a "
                   "tokenizer; repeat for a batch")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model directory when it has one)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--eos-token-id", type=int, action="append", help="default: the tokenizer's EOS")
    p.add_argument("--stop", action="append", help="stop string (repeatable; needs a tokenizer)")
    p.add_argument("--draft", help="draft model (directory or preset) with the same vocabulary → speculative "
                   "decoding")
    p.add_argument("--num-draft-tokens", type=int, default=4, help="K draft tokens per round (default 4)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="weights / KV dtype (auto: bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--no-cuda-graph", action="store_true", help="decode eagerly on CUDA")
    p.add_argument("--no-compile", action="store_true",
                   help="skip torch.compile of the decode step (saves tens of seconds of compile time on "
                        "short one-off generations; decoding is then slower per token)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_generate)
