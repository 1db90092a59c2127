"""CLI commands that build or train models: `hybridize convert | distill | pretrain | demo`.

Each command is `add_<name>_parser(subparsers)` + `cmd_<name>(args)`, registered in `hybridize.cli`.
Heavy imports happen inside the commands so `hybridize --help` stays fast. Errors caused by the input
(bad recipe, missing data, impossible conversion, ...) become `UserError`: one clear line, exit code 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import contextmanager
from pathlib import Path


def _user_error(msg: str):
    from hybridize.cli import UserError      # imported late: cli imports this module
    return UserError(msg)


@contextmanager
def _user_errors():
    """Known input errors → UserError (no traceback)."""
    from hybridize.api import CheckpointError
    from hybridize.config import ConfigError
    from hybridize.data import CorpusError, TokenizerError
    from hybridize.distill.trainer import TrainingError

    try:
        yield
    except (ConfigError, CheckpointError, CorpusError, TokenizerError, TrainingError) as e:
        raise _user_error(str(e)) from None


def _emit(args, human_lines, payload: dict) -> None:
    if getattr(args, "json", False):
        print(json.dumps(payload, indent=2, default=str))
    else:
        for line in human_lines:
            print(line)


def _log(args):
    """Progress messages: stdout normally, stderr with --json (stdout is the JSON)."""
    if getattr(args, "json", False):
        return lambda m: print(m, file=sys.stderr, flush=True)
    return lambda m: print(m, flush=True)


def _int_list(text: str) -> list[int]:
    import argparse
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated layer indices, e.g. 1,3,5 (got {text!r})") from None


# ---------------------------------------------------------------------------- convert
def add_convert_parser(sub) -> None:
    p = sub.add_parser(
        "convert", help="turn attention layers of a model into Mamba-2 / Mamba-1 / RG-LRU layers",
        description="Convert a Transformer (hybridize or HF Llama/Mistral/Qwen2 checkpoint) into an "
                    "attention / recurrent hybrid, initialising the new mixers from the attention weights "
                    "(Mamba-in-the-Llama). The student is saved with the teacher's tokenizer.")
    p.add_argument("teacher", help="teacher checkpoint directory (hybridize or HF)")
    p.add_argument("out", help="output directory for the converted student")
    p.add_argument("--mixer", default="mamba2", choices=["mamba2", "mamba1", "rglru", "discrete_mamba2"])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--attention-fraction", type=float, default=None,
                   help="fraction of layers that keep attention: 0.875, 0.75, 0.5 (default), 0.25, 0.125, 0")
    g.add_argument("--attention-layers", type=_int_list, default=None,
                   help="layers that keep attention, e.g. 1,3,5")
    p.add_argument("--init", default="attention", choices=["attention", "random"],
                   help="initialise the new mixers from the attention weights (default) or randomly")
    p.add_argument("--conv-init", default=None, choices=["default", "identity"],
                   help="causal-conv init (default: PyTorch's, as the MIL code; rglru: identity)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_convert)


def cmd_convert(args) -> int:
    import hybridize as hz
    from hybridize.convert import convert, describe

    with _user_errors():
        teacher = hz.load(args.teacher)
        student = convert(teacher, mixer=args.mixer, attention_layers=args.attention_layers,
                          attention_fraction=args.attention_fraction, init=args.init, seed=args.seed,
                          conv_init=args.conv_init)
        out = Path(args.out)
        student.save_pretrained(str(out))
        tok_saved = _copy_tokenizer(args.teacher, out)
    d = describe(student)
    payload = {"teacher": args.teacher, "out": str(out), "mixer": args.mixer, "init": args.init, **d,
               "teacher_parameters": sum(p.numel() for p in teacher.parameters()),
               "tokenizer_saved": tok_saved}
    lines = [f"converted {args.teacher} → {out}",
             f"  layer pattern    : {', '.join(d['layer_pattern'])}",
             f"  attention layers : {d['attention_layers']} ({d['attention_fraction'] * 100:.1f} %)",
             f"  parameters       : {payload['teacher_parameters'] / 1e6:.2f} M → "
             f"{d['parameters'] / 1e6:.2f} M",
             f"  init             : {args.init}"
             + ("" if tok_saved else "  (no tokenizer found next to the teacher)")]
    _emit(args, lines, payload)
    return 0


def _copy_tokenizer(src, dst: Path) -> bool:
    from hybridize.data import TokenizerError, load_tokenizer

    try:
        load_tokenizer(src).save_pretrained(str(dst))
        return True
    except (TokenizerError, OSError, ValueError):
        return False


# ---------------------------------------------------------------------------- distill
def add_distill_parser(sub) -> None:
    # list the shipped recipes without importing the training stack (keeps --help fast)
    builtin = sorted(f.stem for f in (Path(__file__).parent / "distill" / "recipes").glob("*.toml"))
    p = sub.add_parser(
        "distill", help="run a distillation recipe (MOHAWK, Mamba-in-the-Llama, ...)",
        description="Convert a teacher and distil the student with the stages of a TOML recipe "
                    f"(shipped: {', '.join(builtin)}; or a path). The whole recipe is validated against the "
                    "teacher, tokenizer and data before any training.")
    p.add_argument("--recipe", default="mil", help="shipped recipe name or TOML path (default: mil)")
    p.add_argument("--teacher", help="teacher checkpoint directory (overrides [teacher] path)")
    p.add_argument("--out", required=True, help="output directory (one sub-directory per stage, final/)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the teacher's)")
    p.add_argument("--train-data",
                   help="corpus for KL / MOHAWK stages: 'stdlib', a file, a directory, an HF dataset dir")
    p.add_argument("--chat-data", help="chat JSONL for sft stages")
    p.add_argument("--assistant-only-loss", action=argparse.BooleanOptionalAction, default=None,
                   help="sft stages: compute the loss on the assistant turns only (system / user turns are "
                        "context), or on every token with --no-assistant-only-loss (overrides the recipe's "
                        "assistant_only_loss; default: assistant turns of chat records, all tokens of "
                        "plain-text records)")
    p.add_argument("--preference-data", help="preference JSONL for dpo stages")
    p.add_argument("--prompts", help="prompt file for seqkd stages (default: prompts from the train data)")
    p.add_argument("--max-steps", type=int, help="override every stage's length (quick runs)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    p.add_argument("--overwrite", action="store_true", help="start again in an --out that holds checkpoints")
    p.add_argument("--dry-run", action="store_true", help="validate and print the plan, train nothing")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
    p.set_defaults(func=cmd_distill)


def cmd_distill(args) -> int:
    import hybridize as hz
    from hybridize.data import load_tokenizer
    from hybridize.distill.recipes import load_recipe, run_recipe, validate_recipe

    log = _log(args)
    with _user_errors():
        recipe = load_recipe(args.recipe)
        for attr, key in (("train_data", "train"), ("chat_data", "chat"), ("preference_data", "preference"),
                          ("prompts", "prompts"), ("tokenizer", "tokenizer")):
            if getattr(args, attr):
                setattr(recipe.data, key, getattr(args, attr))
        if args.assistant_only_loss is not None:
            sft = [st for st in recipe.stages if st.kind == "sft"]
            if not sft:
                raise _user_error(f"--{'' if args.assistant_only_loss else 'no-'}assistant-only-loss applies to "
                                  f"sft stages; recipe {recipe.name} has none")
            for st in sft:
                st.assistant_only_loss = args.assistant_only_loss
        teacher_path = args.teacher or recipe.teacher
        if not teacher_path:
            raise _user_error("no teacher: pass --teacher PATH (or set [teacher] path in the recipe)")
        recipe.teacher = teacher_path
        teacher = hz.load(teacher_path)
        tokenizer = load_tokenizer(recipe.data.tokenizer or teacher_path)
        if args.dry_run:
            plan = validate_recipe(recipe, teacher.cfg, tokenizer)
            lines = [f"recipe {recipe.name} ({recipe.source}) is valid for {teacher_path}:"] + [
                f"  {i + 1}. {p['stage']:<12} {p['kind']:<11} {p['steps']:>7} steps  "
                f"{p['tokens'] / 1e6:>9.2f} M tokens  lr {p['lr']:.1e}  trains {p['trainable']:<7} "
                f"attention at {p['attention_layers']}" + (f"  loss on {p['loss_on']}" if "loss_on" in p else "")
                for i, p in enumerate(plan)]
            _emit(args, lines, {"recipe": recipe.name, "valid": True, "plan": plan})
            return 0
        res = run_recipe(recipe, args.out, teacher=teacher, tokenizer=tokenizer, resume=args.resume,
                         overwrite=args.overwrite, progress=not args.no_progress, max_steps=args.max_steps,
                         log=log)
    res.pop("student", None)
    lines = [f"distilled with recipe {recipe.name}: final student in {res['final_model']}"]
    for s in res["stages"]:
        ev = s.get("eval") or {}
        steps = s.get("steps", "?")
        steps = f"{len(steps)} progressive steps" if isinstance(steps, list) else f"{steps} steps"
        metrics = "  ".join(f"{k} {v:.4g}" for k, v in ev.items())
        lines.append(f"  {s.get('stage', s.get('kind'))}: {steps}  {metrics}")
    _emit(args, lines, res)
    return 0


# ---------------------------------------------------------------------------- pretrain
def add_pretrain_parser(sub) -> None:
    p = sub.add_parser(
        "pretrain", help="train a (small) model from scratch on a corpus",
        description="Pretrain a preset or config on a corpus (default: the Python standard library's source) "
                    "with next-token cross-entropy; a byte-level BPE tokenizer is trained on the spot unless "
                    "--tokenizer is given.")
    p.add_argument("--out", required=True, help="output directory (metrics, curves, checkpoints, final/)")
    p.add_argument("--preset", default="llama-tiny",
                   help="model preset (default llama-tiny); see `hybridize info --list`")
    p.add_argument("--config", help="a HybridConfig JSON file instead of a preset")
    p.add_argument("--data", default="stdlib",
                   help="corpus: 'stdlib', a text/JSONL file or directory, an HF dataset dir")
    p.add_argument("--tokenizer", help="tokenizer directory (default: train a byte-level BPE)")
    p.add_argument("--vocab-size", type=int, default=4096,
                   help="vocabulary of the trained BPE (default 4096)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-batches", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_pretrain)


def cmd_pretrain(args) -> int:
    from hybridize.config import HybridConfig, preset
    from hybridize.data import load_corpus, load_tokenizer, train_bpe_tokenizer
    from hybridize.distill.recipes import InterleavedRows, heldout_batches
    from hybridize.distill.stages import make_distill_eval_fn
    from hybridize.distill.trainer import TrainConfig, Trainer, lm_loss_fn
    from hybridize.model import HybridLM

    log = _log(args)
    out = Path(args.out)
    with _user_errors():
        if args.steps < 1:
            raise _user_error("--steps must be >= 1")
        train_corpus = load_corpus(args.data, split="train", heldout_fraction=0.05)
        tok_dir = out / "tokenizer"
        if args.tokenizer:
            tok = load_tokenizer(args.tokenizer)
        elif args.resume and tok_dir.exists():
            tok = load_tokenizer(tok_dir)
        else:
            texts, n = [], 0
            for doc in train_corpus:
                if isinstance(doc, str):
                    texts.append(doc)
                    n += len(doc)
                if n >= 3_000_000:
                    break
            log(f"training a byte-level BPE tokenizer ({args.vocab_size} tokens) on "
                f"{n / 1e6:.1f} M characters")
            tok = train_bpe_tokenizer(texts, args.vocab_size, save_dir=tok_dir)
        if args.config:
            cfg = HybridConfig.from_dict(json.loads(Path(args.config).read_text()))
        else:
            cfg = preset(args.preset)
        cfg.vocab_size = len(tok)
        cfg.bos_token_id, cfg.eos_token_id = tok.bos_token_id, tok.eos_token_id
        cfg.pad_token_id = tok.pad_token_id
        model = HybridLM(cfg.validate())
        every = max(1, args.steps // 5)
        tcfg = TrainConfig(lr=args.lr, min_lr=args.lr / 10, warmup_steps=args.steps // 20,
                           max_steps=args.steps,
                           batch_size=args.batch_size, seq_len=args.seq_len, out_dir=str(out), seed=args.seed,
                           progress=not args.no_progress, eval_every=every, save_every=every,
                           log_every=min(10, every))
        data = InterleavedRows(train_corpus, tok, seq_len=args.seq_len, batch_size=args.batch_size,
                               seed=args.seed)
        evals = heldout_batches(load_corpus(args.data, split="heldout", heldout_fraction=0.05), tok,
                                seq_len=args.seq_len, batch_size=args.batch_size, n=args.eval_batches)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"pretraining {cfg.name} ({n_params / 1e6:.2f} M parameters) for {args.steps} steps of "
            f"{tcfg.tokens_per_step} tokens")
        summary = Trainer(model, data, lm_loss_fn, tcfg, eval_fn=make_distill_eval_fn(evals)).train(
            resume=args.resume, overwrite=args.overwrite)
        if summary.get("final_model"):
            tok.save_pretrained(summary["final_model"])
    ev = summary.get("eval") or {}
    lines = [f"pretrained {summary['steps']} steps ({summary['tokens'] / 1e6:.2f} M tokens, "
             f"{summary['tokens_per_s']:.0f} tok/s); held-out loss {ev.get('eval_loss', float('nan')):.4f}, "
             f"ppl {ev.get('eval_ppl', float('nan')):.2f}",
             f"model: {summary.get('final_model') or summary.get('checkpoint')}"]
    _emit(args, lines, summary)
    return 0


# ---------------------------------------------------------------------------- demo
def add_demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo", help="the whole pipeline on a CPU in minutes (no downloads)",
        description="Train a tokenizer and a tiny Llama-style teacher on the Python standard library, "
                    "convert it to a 50%% Mamba-2 hybrid, distil it, and report perplexity, KL, parameters, "
                    "decode memory and samples. Writes metrics.json, curves.png and the student checkpoint "
                    "to --out.")
    p.add_argument("--out", default="hybridize-demo", help="report directory (default ./hybridize-demo)")
    p.add_argument("--quick", action="store_true", help="a seconds-long toy version (for tests)")
    p.add_argument("--steps", type=int, help="teacher pretraining steps")
    p.add_argument("--distill-steps", type=int, help="distillation steps")
    p.add_argument("--threads", type=int, help="CPU threads (default: the free cores)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="print metrics.json on stdout (messages go to stderr)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args) -> int:
    from hybridize.demo import DemoConfig, run_demo

    kw = {"out": args.out, "threads": args.threads, "progress": not args.no_progress}
    if args.steps is not None:
        kw["pretrain_steps"] = args.steps
    if args.distill_steps is not None:
        kw["distill_steps"] = args.distill_steps
    if any(v is not None and v < 1 for v in (args.steps, args.distill_steps)):
        raise _user_error("--steps and --distill-steps must be >= 1")
    cfg = DemoConfig.quick(**kw) if args.quick else DemoConfig(**kw)
    with _user_errors():
        metrics = run_demo(cfg, log=_log(args))
    if args.json:
        print(json.dumps(metrics, indent=2))
    return 0


COMMANDS = [add_convert_parser, add_distill_parser, add_pretrain_parser, add_demo_parser]
