"""Recipes: a TOML file that describes a whole distillation — the teacher, how to convert the student,
the data, and the stages in order — validated completely before any work starts.

    [recipe]                     name, description
    [teacher]                    path (a hybridize or HF checkpoint dir; the CLI's --teacher overrides)
    [student]                    mixer, attention_fraction | attention_layers, init, conv_init, seed,
                                 mixer_config = {...}, init_from (a converted checkpoint to start from)
    [data]                       train (corpus spec: "stdlib", a file/dir, [paths]), heldout_fraction,
                                 doc_split, tokenizer (dir; default the teacher's), chat (JSONL, sft),
                                 preference (JSONL, dpo), prompts (file, seqkd; default: from train),
                                 eval_batches
    [defaults]                   TrainConfig keys shared by every stage (lr, batch_size, seq_len, ...)
    [[stage]]                    kind = "mohawk1" | "mohawk2" | "mohawk3" | "kl" | "seqkd" | "sft" | "dpo" |
                                 "progressive", plus TrainConfig keys and the kind's own keys
                                 (see `hybridize.distill.stages.STAGE_KEYS`; e.g. an sft stage's
                                 assistant_only_loss = true | false, unset = assistant turns of chat
                                 records, all tokens of plain text)

Shipped recipes (`load_recipe("mil")` or a path): `mil.toml` (Mamba-in-the-Llama: kl → sft),
`mohawk.toml` (MOHAWK 1 → 2 → 3), `demo.toml` (what `hybridize demo` runs).

Output layout of `run_recipe(recipe, out_dir)`:

    out_dir/recipe.json            the parsed recipe
    out_dir/01-kl/                 one Trainer directory per stage (metrics.jsonl, curves.png,
    out_dir/02-sft/                checkpoints/, final/, summary.json, model.json)
    out_dir/final/                 the final student (save_pretrained)
    out_dir/summary.json
"""
from __future__ import annotations

import dataclasses
import json
try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from hybridize.config import ConfigError
from hybridize.distill.stages import STAGE_KINDS, StageConfig, StageError

RECIPE_DIR = Path(__file__).with_name("recipes")
TOP_KEYS = ("recipe", "teacher", "student", "data", "defaults", "stage")


class RecipeError(ConfigError):
    """A recipe is invalid or does not fit the teacher / data; the message names the problem and the fix."""


# ---------------------------------------------------------------------------- spec
@dataclass
class StudentSpec:
    mixer: str = "mamba2"
    attention_fraction: Optional[float] = None        # None and no attention_layers → 0.5
    attention_layers: Optional[list] = None
    init: str = "attention"
    conv_init: Optional[str] = None
    seed: int = 0
    mixer_config: dict = field(default_factory=dict)
    init_from: Optional[str] = None                   # a converted student checkpoint to start from


@dataclass
class DataSpec:
    train: Any = "stdlib"
    heldout_fraction: float = 0.05
    doc_split: str = "file"
    tokenizer: Optional[str] = None
    chat: Optional[str] = None
    preference: Optional[str] = None
    prompts: Optional[str] = None
    eval_batches: int = 4


@dataclass
class Recipe:
    name: str
    stages: list
    description: str = ""
    teacher: Optional[str] = None
    student: StudentSpec = field(default_factory=StudentSpec)
    data: DataSpec = field(default_factory=DataSpec)
    defaults: dict = field(default_factory=dict)
    source: str = "<dict>"

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "teacher": self.teacher,
                "student": dataclasses.asdict(self.student), "data": dataclasses.asdict(self.data),
                "defaults": self.defaults, "source": self.source,
                "stages": [{**{k: v for k, v in dataclasses.asdict(s).items() if k != "train"},
                            "train": s.train.to_dict()} for s in self.stages]}


def _table(d: dict, cls, where: str):
    if not isinstance(d, dict):
        raise RecipeError(f"{where} must be a table, got {type(d).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    bad = sorted(set(d) - known)
    if bad:
        raise RecipeError(f"{where}: unknown keys {bad}; known keys: {sorted(known)}")
    try:
        return cls(**d)
    except TypeError as e:
        raise RecipeError(f"{where}: {e}") from None


def parse_recipe(raw: dict, source: str = "<dict>") -> Recipe:
    """A recipe from its TOML dict; checks keys and types (not yet against a teacher or data)."""
    bad = sorted(set(raw) - set(TOP_KEYS))
    if bad:
        raise RecipeError(f"{source}: unknown tables {bad}; a recipe has {list(TOP_KEYS)} "
                          "(stages are [[stage]] tables)")
    head = raw.get("recipe", {})
    bad = sorted(set(head) - {"name", "description"})
    if bad:
        raise RecipeError(f"{source}: [recipe] has unknown keys {bad}; known: ['description', 'name']")
    teacher = raw.get("teacher", {})
    bad = sorted(set(teacher) - {"path"})
    if bad:
        raise RecipeError(f"{source}: [teacher] has unknown keys {bad}; known: ['path']")
    student = _table(raw.get("student", {}), StudentSpec, f"{source}: [student]")
    data = _table(raw.get("data", {}), DataSpec, f"{source}: [data]")
    defaults = dict(raw.get("defaults", {}))
    from hybridize.distill.stages import TRAIN_KEYS
    bad = sorted(set(defaults) - TRAIN_KEYS)
    if bad:
        raise RecipeError(f"{source}: [defaults] has unknown keys {bad}; [defaults] takes training keys "
                          f"{sorted(TRAIN_KEYS)}")
    stages_raw = raw.get("stage", [])
    if not isinstance(stages_raw, list) or not stages_raw:
        raise RecipeError(f"{source}: no stages; add [[stage]] tables with kind = one of {STAGE_KINDS}")
    stages = []
    for i, st in enumerate(stages_raw):
        where = f"{source}: stage {i + 1}"
        try:
            s = StageConfig.from_dict(st, defaults, where=where)
        except StageError as e:
            raise RecipeError(str(e)) from None
        s.name = s.name or s.kind
        stages.append(s)
    names = [s.name for s in stages]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise RecipeError(f"{source}: stage names {dup} repeat; give each stage a distinct name = \"...\"")
    if data.eval_batches < 1:
        raise RecipeError(f"{source}: [data] eval_batches must be >= 1")
    if not 0 <= data.heldout_fraction < 1:
        raise RecipeError(f"{source}: [data] heldout_fraction must lie in [0, 1)")
    return Recipe(name=head.get("name", Path(source).stem), description=head.get("description", ""),
                  teacher=teacher.get("path"), student=student, data=data, defaults=defaults,
                  stages=stages, source=source)


def builtin_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.toml"))


def load_recipe(name_or_path: Union[str, Path]) -> Recipe:
    """A shipped recipe by name ("mil", "mohawk", "demo") or a TOML file."""
    p = Path(name_or_path)
    if not p.exists() and (RECIPE_DIR / f"{name_or_path}.toml").exists():
        p = RECIPE_DIR / f"{name_or_path}.toml"
    if not p.exists():
        raise RecipeError(f"recipe {str(name_or_path)!r} is neither a file nor a shipped recipe "
                          f"({', '.join(builtin_recipes())})")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{p}: invalid TOML ({e})") from None
    return parse_recipe(raw, str(p))


# ---------------------------------------------------------------------------- validation
def _kept_layers(spec: StudentSpec, num_layers: int) -> list[int]:
    from hybridize.convert import ConversionError, resolve_attention_layers

    try:
        return resolve_attention_layers(num_layers, spec.attention_layers, spec.attention_fraction)
    except ConversionError as e:
        raise RecipeError(f"[student]: {e}") from None


def validate_recipe(recipe: Recipe, teacher_cfg, tokenizer=None, *, check_data: bool = True) -> list[dict]:
    """Check everything that can be checked before training, against the teacher's config (and the
    tokenizer and data when given) → the plan: one dict per stage. Raises RecipeError."""
    from hybridize.convert import ConversionError, attention_layers_for_fraction, student_config

    n = teacher_cfg.num_layers
    spec = recipe.student
    if spec.init_from is not None:
        student_cfg = _checkpoint_config(spec.init_from)
        _check_same_model(student_cfg, teacher_cfg, spec.init_from)
        kept = student_cfg.attention_layers()
    else:
        kept = _kept_layers(spec, n)
        bad = [i for i in kept if teacher_cfg.layer_pattern[i] != "attention"]
        if bad:
            raise RecipeError(f"[student]: layers {bad} are to keep attention, but the teacher has "
                              f"{[teacher_cfg.layer_pattern[i] for i in bad]} there")
        try:
            student_cfg = student_config(teacher_cfg, spec.mixer, kept, spec.mixer_config or None)
        except (ConversionError, ConfigError, TypeError) as e:
            raise RecipeError(f"[student]: {e}") from None
    if tokenizer is not None:
        ntok = len(tokenizer)
        if ntok > teacher_cfg.vocab_size:
            raise RecipeError(f"the tokenizer has {ntok} tokens but the teacher's vocabulary has "
                              f"{teacher_cfg.vocab_size}: they do not belong together. Use the teacher's own "
                              "tokenizer ([data] tokenizer = the teacher's directory)")
    plan, cur_kept = [], set(kept)
    for s in recipe.stages:
        converted = [i for i in range(n) if i not in cur_kept]
        if s.kind == "progressive":
            for f in s.fractions:
                try:
                    nxt = set(attention_layers_for_fraction(n, f))
                except ConversionError as e:
                    raise RecipeError(f"stage {s.name!r}: {e}") from None
                if not nxt < cur_kept:
                    raise RecipeError(f"stage {s.name!r}: fraction {f} keeps attention at {sorted(nxt)}, "
                                      "which is not a strict subset of the current attention layers "
                                      f"{sorted(cur_kept)}; progressive steps must convert more layers")
                cur_kept = nxt
        elif s.trainable_or_default in ("mixers", "blocks") and not converted:
            raise RecipeError(f"stage {s.name!r} trains the converted layers, but the student has none "
                              "(attention everywhere); convert some layers first "
                              "([student] attention_fraction)")
        if s.kind == "sft" and not recipe.data.chat:
            raise RecipeError(f"stage {s.name!r} (sft) needs chat data: set [data] chat = \"file.jsonl\" "
                              "(records {\"messages\": [...]}) or pass --chat-data")
        if s.kind == "dpo" and not recipe.data.preference:
            raise RecipeError(f"stage {s.name!r} (dpo) needs preference data: set [data] preference = "
                              "\"file.jsonl\" (records {prompt, chosen, rejected}) or pass --preference-data")
        if s.kind == "seqkd" and s.train.seq_len < s.prompt_tokens + 1:
            raise RecipeError(f"stage {s.name!r}: seq_len {s.train.seq_len} leaves no room after "
                              f"prompt_tokens {s.prompt_tokens}")
        plan.append({"stage": s.name, "kind": s.kind, "steps": s.train.total_steps(),
                     "tokens": s.train.total_steps() * s.train.tokens_per_step,
                     "trainable": s.trainable_or_default, "lr": s.train.lr,
                     "attention_layers": sorted(cur_kept)})
        if s.kind == "sft":
            plan[-1]["loss_on"] = {True: "assistant turns", False: "all tokens",
                                   None: "assistant turns (chat records), all tokens (plain text)"}[
                                       s.assistant_only_loss]
    if check_data and tokenizer is not None:
        _check_data(recipe, tokenizer)
    return plan


def _checkpoint_config(path):
    from hybridize.api import CheckpointError, config_of

    try:
        return config_of(str(path))
    except (CheckpointError, ConfigError) as e:
        raise RecipeError(f"[student] init_from: {e}") from None


def _check_same_model(student_cfg, teacher_cfg, where) -> None:
    diffs = [f"{k}: {getattr(student_cfg, k)} vs teacher {getattr(teacher_cfg, k)}"
             for k in ("vocab_size", "hidden_size", "num_layers")
             if getattr(student_cfg, k) != getattr(teacher_cfg, k)]
    if diffs:
        raise RecipeError(f"{where} is not a student of this teacher ({'; '.join(diffs)}); start from a "
                          "student converted from this teacher, or drop init_from to convert one")


def _check_data(recipe: Recipe, tokenizer) -> None:
    """One batch of every data source a stage needs (and the held-out eval batches)."""
    from hybridize.data import CorpusError, TokenizerError

    kinds = {s.kind for s in recipe.stages}
    try:
        # every stage but sft / dpo trains on (or is evaluated with) the train corpus and its held-out part
        first = next((s for s in recipe.stages if s.kind not in ("sft", "dpo")), None)
        if first is not None:
            if kinds & {"mohawk1", "mohawk2", "mohawk3", "kl", "progressive"} or not recipe.data.prompts:
                next(iter(_train_stream(recipe, tokenizer, first.train)))
            _eval_batches(recipe, tokenizer, first.train)
        for s in recipe.stages:
            if s.kind == "sft":
                next(iter(_chat_stream(recipe, tokenizer, s)))
            if s.kind == "dpo":
                next(iter(_preference_stream(recipe, tokenizer, s.train)))
            if s.kind == "seqkd":
                _prompts(recipe, tokenizer, s)
    except (CorpusError, TokenizerError, StageError, StopIteration) as e:
        msg = str(e) or "the data source is empty"
        raise RecipeError(f"data: {msg}") from None


# ---------------------------------------------------------------------------- data
def _corpus(spec, recipe: Recipe, split=None):
    """A corpus from a [data] spec; programmatic recipes may pass a `Corpus` object (e.g. a filtered one)."""
    from hybridize.data import Corpus, load_corpus

    if isinstance(spec, Corpus):
        return spec.with_split(split, recipe.data.heldout_fraction if split else 0.0)
    return load_corpus(spec, split=split, heldout_fraction=recipe.data.heldout_fraction,
                       doc_split=recipe.data.doc_split)


class InterleavedRows:
    """Batches whose `batch_size` rows come from independent `PackedStream`s (one row each, seeds
    seed·1000 + r), so a batch mixes documents from different files. A single PackedStream lays documents
    end to end, so all rows of a batch — and many consecutive batches — come from one long file; such
    strongly correlated gradients train a small model much worse. Resumable (state_dict of every row)."""

    def __init__(self, corpus, tokenizer, *, seq_len: int, batch_size: int, seed: int = 0,
                 epochs: Optional[int] = None, shuffle: bool = True):
        from hybridize.data import PackedStream

        self.streams = [PackedStream(corpus, tokenizer, seq_len=seq_len, batch_size=1, seed=seed * 1000 + r,
                                     epochs=epochs, shuffle=shuffle) for r in range(batch_size)]

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        import torch

        rows = [next(s) for s in self.streams]
        return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}

    def state_dict(self) -> dict:
        return {"rows": [s.state_dict() for s in self.streams]}

    def load_state_dict(self, state: dict) -> None:
        rows = state.get("rows", [])
        if len(rows) != len(self.streams):
            raise StageError(f"cannot resume the data stream: it had {len(rows)} rows per batch, now "
                             f"{len(self.streams)}")
        for s, st in zip(self.streams, rows):
            s.load_state_dict(st)


def _train_stream(recipe: Recipe, tokenizer, tcfg):
    split = "train" if recipe.data.heldout_fraction > 0 else None
    return InterleavedRows(_corpus(recipe.data.train, recipe, split), tokenizer, seq_len=tcfg.seq_len,
                           batch_size=tcfg.batch_size, seed=tcfg.seed)


def heldout_batches(corpus, tokenizer, *, seq_len: int, batch_size: int, n: int) -> list:
    """`n` fixed evaluation batches whose rows come from different held-out documents."""
    from hybridize.data import fixed_batches

    return fixed_batches(InterleavedRows(corpus, tokenizer, seq_len=seq_len, batch_size=batch_size, seed=0,
                                         epochs=1), n)


def _eval_batches(recipe: Recipe, tokenizer, tcfg) -> list:
    from hybridize.data import CorpusError

    if recipe.data.heldout_fraction <= 0:
        raise CorpusError("[data] heldout_fraction is 0: evaluation needs held-out documents; set it > 0")
    try:
        return heldout_batches(_corpus(recipe.data.train, recipe, "heldout"), tokenizer, seq_len=tcfg.seq_len,
                               batch_size=tcfg.batch_size, n=recipe.data.eval_batches)
    except CorpusError as e:
        raise CorpusError(f"held-out evaluation data: {e} (raise [data] heldout_fraction or use more "
                          "data)") from None


def _chat_stream(recipe: Recipe, tokenizer, stage: StageConfig):
    """SFT batches: the chat corpus packed, labels on the assistant turns per stage.assistant_only_loss."""
    from hybridize.data import PackedStream, load_corpus

    tcfg = stage.train
    return PackedStream(load_corpus(recipe.data.chat), tokenizer, seq_len=tcfg.seq_len,
                        batch_size=tcfg.batch_size, seed=tcfg.seed,
                        assistant_only_loss=stage.assistant_only_loss)


def _preference_stream(recipe: Recipe, tokenizer, tcfg):
    from hybridize.data import PreferenceStream, load_preference_pairs

    return PreferenceStream(load_preference_pairs(recipe.data.preference), tokenizer,
                            batch_size=tcfg.batch_size, max_len=tcfg.seq_len, seed=tcfg.seed)


def _prompts(recipe: Recipe, tokenizer, stage: StageConfig) -> list:
    from hybridize.distill.stages import prompts_from_corpus, prompts_from_file

    if recipe.data.prompts:
        return prompts_from_file(recipe.data.prompts, tokenizer, stage.num_prompts)
    return prompts_from_corpus(_corpus(recipe.data.train, recipe, "train" if recipe.data.heldout_fraction > 0
                                       else None), tokenizer, stage.num_prompts, stage.prompt_tokens)


# ---------------------------------------------------------------------------- running
def build_student(recipe: Recipe, teacher):
    """The stage-0 student: converted from the teacher, or loaded from [student] init_from."""
    from hybridize.api import load
    from hybridize.convert import convert

    spec = recipe.student
    if spec.init_from is not None:
        student = load(spec.init_from)
        _check_same_model(student.cfg, teacher.cfg, spec.init_from)
        return student.to(next(teacher.parameters()).device)
    return convert(teacher, mixer=spec.mixer, attention_layers=spec.attention_layers,
                   attention_fraction=spec.attention_fraction, init=spec.init, seed=spec.seed,
                   conv_init=spec.conv_init, mixer_config=spec.mixer_config or None)


def _with_steps(tcfg, max_steps: Optional[int]):
    if max_steps is None:
        return tcfg
    warm = min(tcfg.warmup_steps, max(0, max_steps // 10))
    return dataclasses.replace(tcfg, max_steps=max_steps, max_tokens=None, warmup_steps=warm)


def run_recipe(recipe: Recipe, out_dir, *, teacher=None, tokenizer=None, resume: bool = False,
               overwrite: bool = False, progress: bool = True, max_steps: Optional[int] = None,
               time_limit_s: Optional[float] = None, log=print) -> dict:
    """Validate, convert and run every stage → summary dict (also out_dir/summary.json); its "student"
    entry is the final model.

    teacher / tokenizer: objects (otherwise loaded from [teacher] path / [data] tokenizer).
    resume: continue an interrupted run (finished stages are loaded, the interrupted one resumes from its
    latest checkpoint). overwrite: start again in an out_dir that holds checkpoints.
    max_steps: override every stage's length (quick runs). log: callable for one-line progress messages."""
    from hybridize.api import load
    from hybridize.data import load_tokenizer
    from hybridize.distill.stages import (
        check_resumable, freeze, make_distill_eval_fn, run_progressive, run_stage, stage_done,
    )
    from hybridize.distill.trainer import TrainingError

    if teacher is None:
        if not recipe.teacher:
            raise RecipeError("no teacher: set [teacher] path in the recipe or pass --teacher PATH")
        teacher = load(recipe.teacher)
    freeze(teacher)
    if tokenizer is None:
        tok_dir = recipe.data.tokenizer or recipe.teacher
        if not tok_dir:
            raise RecipeError("no tokenizer: set [data] tokenizer (or [teacher] path, whose tokenizer is "
                              "used)")
        tokenizer = load_tokenizer(tok_dir)
    plan = validate_recipe(recipe, teacher.cfg, tokenizer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=1, default=str) + "\n")
    device = next(teacher.parameters()).device

    student = build_student(recipe, teacher)
    summaries = []
    for i, (s, p) in enumerate(zip(recipe.stages, plan)):
        sdir = out_dir / f"{i + 1:02d}-{s.name}"
        tcfg = _with_steps(dataclasses.replace(s.train, out_dir=str(sdir), progress=progress,
                                               time_limit_s=time_limit_s or s.train.time_limit_s), max_steps)
        stage = dataclasses.replace(s, train=tcfg)
        head = f"[{i + 1}/{len(plan)}] {s.name}"
        if s.kind != "progressive" and resume and not overwrite and stage_done(sdir):
            check_resumable(sdir, student)
            student = load(sdir / "final").to(device)
            summaries.append(json.loads((sdir / "summary.json").read_text()))
            log(f"{head}: already finished, loaded {sdir / 'final'}")
            continue
        log(f"{head} ({s.kind}): {tcfg.total_steps()} steps, trains {p['trainable']}")
        eval_fn = None
        if s.kind not in ("sft", "dpo"):
            eval_fn = make_distill_eval_fn(_eval_batches(recipe, tokenizer, tcfg), teacher)
        try:
            if s.kind == "progressive":
                student, steps = run_progressive(
                    stage, student, teacher, lambda: _train_stream(recipe, tokenizer, tcfg),
                    mixer=_mixer_of(student, recipe), out_dir=sdir, eval_fn=eval_fn, init=recipe.student.init,
                    seed=recipe.student.seed, resume=resume, overwrite=overwrite,
                    conv_init=recipe.student.conv_init)
                summaries.append({"stage": s.name, "kind": "progressive", "steps": steps})
                student.save_pretrained(str(sdir / "final"))
                continue
            data = _stage_data(recipe, tokenizer, stage, teacher, sdir, progress)
            summaries.append(run_stage(stage, student, teacher, data, eval_fn=eval_fn, resume=resume,
                                       overwrite=overwrite))
        except TrainingError as e:
            raise RecipeError(f"stage {s.name!r}: {e}") from None
    final = out_dir / "final"
    student.save_pretrained(str(final))
    tokenizer.save_pretrained(str(final))
    summary = {"recipe": recipe.name, "out_dir": str(out_dir), "final_model": str(final),
               "layer_pattern": student.layer_pattern, "plan": plan, "stages": summaries}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1, default=str) + "\n")
    summary["student"] = student
    return summary


def _stage_data(recipe: Recipe, tokenizer, stage: StageConfig, teacher, sdir: Path, progress: bool):
    """The training batches of one (non-progressive) stage."""
    from hybridize.distill.stages import PseudoLabelStream, generate_pseudo_labels

    tcfg = stage.train
    if stage.kind == "sft":
        return _chat_stream(recipe, tokenizer, stage)
    if stage.kind == "dpo":
        return _preference_stream(recipe, tokenizer, tcfg)
    if stage.kind == "seqkd":
        labels = generate_pseudo_labels(
            teacher, _prompts(recipe, tokenizer, stage), sdir / "pseudo_labels.jsonl", tokenizer=tokenizer,
            max_new_tokens=stage.max_new_tokens, batch_size=stage.gen_batch_size,
            temperature=stage.gen_temperature, seed=tcfg.seed, progress=progress)
        return PseudoLabelStream(labels, seq_len=tcfg.seq_len, batch_size=tcfg.batch_size, seed=tcfg.seed,
                                 pad_id=getattr(tokenizer, "pad_token_id", None) or 0)
    return _train_stream(recipe, tokenizer, tcfg)


def _mixer_of(student, recipe: Recipe) -> str:
    kinds = [k for k in student.layer_pattern if k != "attention"]
    return kinds[0] if kinds else recipe.student.mixer


__all__ = ["Recipe", "RecipeError", "StudentSpec", "DataSpec", "load_recipe", "parse_recipe",
           "validate_recipe", "run_recipe", "build_student", "builtin_recipes", "RECIPE_DIR",
           "InterleavedRows", "heldout_batches"]
