"""Distillation stages and recipes on tiny models: every stage's loss goes down, only the intended
parameters move, distillation beats the converted-but-untrained student by a wide margin, batched
generation equals one-by-one generation, pseudo-labels and progressive replacement resume, and recipes
are rejected (with the problem and the fix named) before any work."""
import json
import random

import pytest
import torch

from hybridize.config import AttentionConfig, HybridConfig, MLPConfig
from hybridize.convert import convert
from hybridize.data import train_bpe_tokenizer
from hybridize.distill.recipes import RecipeError, load_recipe, parse_recipe, run_recipe, validate_recipe
from hybridize.distill.stages import (
    HiddenStateAlignmentLoss, MatrixOrientationLoss, PseudoLabelStream, StageConfig, StageError, evaluate_lm,
    generate_ids, generate_pseudo_labels, run_progressive, run_stage, stage_done,
)
from hybridize.distill.trainer import TrainConfig
from hybridize.model import HybridLM

V, D = 96, 32



def make_teacher(vocab=V, n_layers=4, seed=0, std=0.15):
    """Random teacher with large weights: peaked, input-dependent next-token distributions."""
    torch.manual_seed(seed)
    cfg = HybridConfig(vocab_size=vocab, hidden_size=D, layer_pattern=["attention"] * n_layers,
                       mlp=MLPConfig(64), attention=AttentionConfig(num_heads=4, num_kv_heads=2, head_dim=8),
                       initializer_range=std, bos_token_id=0, eos_token_id=1, pad_token_id=2)
    return HybridLM(cfg).eval()


def random_batches(n, B=4, L=24, seed=0, vocab=V):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, vocab, (B, L), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone(), "seq_idx": torch.zeros_like(ids)})
    return out


def markov_batches(n, B=4, L=24, seed=0, vocab=V):
    """A sparse first-order Markov language (3 successors per token): structure a teacher can learn in
    seconds and a recurrent student can represent."""
    nxt = torch.randint(3, vocab, (vocab, 3), generator=torch.Generator().manual_seed(1234))
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.empty(B, L, dtype=torch.long)
        ids[:, 0] = torch.randint(3, vocab, (B,), generator=g)
        for t in range(1, L):
            ids[:, t] = nxt[ids[:, t - 1], torch.randint(0, 3, (B,), generator=g)]
        out.append({"input_ids": ids, "labels": ids.clone(), "seq_idx": torch.zeros_like(ids)})
    return out


@pytest.fixture(scope="module")
def trained_teacher():
    from hybridize.distill.trainer import Trainer, lm_loss_fn

    t = make_teacher(std=0.02)
    Trainer(t, iter(markov_batches(60, seed=1)), lm_loss_fn, tcfg(60)).train()
    return t.eval()


def cycle(batches):
    while True:
        yield from batches


def tcfg(steps=30, lr=1e-2, **kw):
    return TrainConfig(max_steps=steps, lr=lr, min_lr=lr / 10, warmup_steps=0, log_every=5, progress=False,
                       plot=False, weight_decay=0.0, **kw)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------- stages
def test_kl_distillation_beats_untrained_student_and_trains_only_mixers(trained_teacher):
    """Small version of the MIL claim: KL to the teacher after distillation ≪ after conversion alone."""
    t = trained_teacher
    s = convert(t, "mamba2", attention_fraction=0.5)
    held = markov_batches(2, seed=99)
    kl0 = evaluate_lm(s, held, t)["kl"]
    before, tbefore = snapshot(s), snapshot(t)
    summary = run_stage(StageConfig(kind="kl", train=tcfg(40)), s, t, iter(markov_batches(40, seed=2)))
    kl1 = evaluate_lm(s, held, t)["kl"]
    assert summary["steps"] == 40 and summary["trainable"] == "mixers"
    assert kl1 < 0.25 * kl0, (kl0, kl1)
    after = snapshot(s)
    for k, v in before.items():
        moved = not torch.equal(v, after[k])
        is_new_mixer = k.startswith(("layers.0.mixer.", "layers.2.mixer."))
        if not is_new_mixer:
            assert not moved, f"{k} is frozen in the kl stage but changed"
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("layers.0.mixer.in_proj"))
    assert all(torch.equal(v, t.state_dict()[k]) for k, v in tbefore.items())          # teacher untouched
    assert not any(p.requires_grad for p in t.parameters()) and not t.training


# RG-LRU's per-channel matrices are content-independent decays: they can only move a little toward attention
@pytest.mark.parametrize("mixer, factor", [("mamba2", 0.8), ("discrete_mamba2", 0.5), ("rglru", 0.97)])
def test_mohawk1_matrix_orientation_decreases(trained_teacher, mixer, factor):
    t = trained_teacher
    s = convert(t, mixer, attention_fraction=0.5)
    loss = MatrixOrientationLoss(t, [0, 2])
    held = markov_batches(1, seed=5)[0]
    with torch.no_grad():
        l0 = float(loss(s, held)[0])
    run_stage(StageConfig(kind="mohawk1", train=tcfg(30, lr=3e-2)), s, t, iter(markov_batches(30, seed=3)))
    with torch.no_grad():
        l1, metrics = loss(s, held)
    assert float(l1) < factor * l0, (l0, float(l1))
    assert set(metrics) == {"layer0", "layer2"}


@pytest.mark.parametrize("target", ["mixer", "block"])
def test_mohawk2_alignment_decreases(trained_teacher, target):
    t = trained_teacher
    s = convert(t, "mamba2", attention_fraction=0.5)           # layers 0, 2 converted
    loss = HiddenStateAlignmentLoss(t, [0, 2], target)
    held = markov_batches(1, seed=5)[0]
    with torch.no_grad():
        l0 = float(loss(s, held)[0])
    before = snapshot(s)
    summary = run_stage(StageConfig(kind="mohawk2", target=target, train=tcfg(30, lr=1e-2)), s, t,
                        iter(markov_batches(30, seed=3)))
    with torch.no_grad():
        l1 = float(loss(s, held)[0])
    assert l1 < 0.8 * l0, (l0, l1)
    assert summary["trainable"] == ("blocks" if target == "block" else "mixers")
    key = "layers.0.mlp.up_proj.weight"
    # the MLP of a converted block trains only in block mode
    assert (not torch.equal(before[key], s.state_dict()[key])) == (target == "block")


def test_mohawk3_trains_everything_and_reduces_kl(trained_teacher):
    t = trained_teacher
    s = convert(t, "discrete_mamba2", attention_fraction=0.0)
    held = markov_batches(2, seed=7)
    kl0 = evaluate_lm(s, held, t)["kl"]
    emb = s.embed_tokens.weight.detach().clone()
    summary = run_stage(StageConfig(kind="mohawk3", train=tcfg(30, lr=3e-3)), s, t,
                        iter(markov_batches(30, seed=3)))
    assert summary["trainable"] == "all"
    assert summary["trainable_parameters"] == sum(p.numel() for p in s.parameters())
    assert not torch.equal(emb, s.embed_tokens.weight)
    assert evaluate_lm(s, held, t)["kl"] < 0.7 * kl0


def test_stage_needs_a_matching_teacher():
    t = make_teacher()
    s = convert(t, "mamba2")
    with pytest.raises(StageError, match="vocabulary"):
        run_stage(StageConfig(kind="kl", train=tcfg(2)), s, make_teacher(vocab=V + 1),
                  cycle(random_batches(2)))
    with pytest.raises(StageError, match="needs a teacher"):
        run_stage(StageConfig(kind="mohawk1", train=tcfg(2)), s, None, cycle(random_batches(2)))


def test_stage_config_validation():
    with pytest.raises(StageError, match="unknown kind 'distill'"):
        StageConfig.from_dict({"kind": "distill"})
    with pytest.raises(StageError, match=r"unknown keys \['beta'\]"):
        StageConfig.from_dict({"kind": "kl", "beta": 0.1, "max_steps": 3})
    with pytest.raises(StageError, match="decreasing"):
        StageConfig.from_dict({"kind": "progressive", "fractions": [0.25, 0.5], "max_steps": 3,
                               "warmup_steps": 0})
    with pytest.raises(StageError, match="lr must be > 0"):
        StageConfig.from_dict({"kind": "kl", "lr": 0, "max_steps": 3})
    with pytest.raises(StageError, match="trainable"):
        StageConfig.from_dict({"kind": "kl", "trainable": "mlps", "max_steps": 3, "warmup_steps": 0})
    s = StageConfig.from_dict({"kind": "seqkd", "max_steps": 3}, {"lr": 1e-4, "warmup_steps": 1})
    assert s.weights == (0.1, 1.0) and s.train.lr == 1e-4          # MIL's seq-KD weights


def test_resume_refuses_checkpoint_of_another_model(tmp_path):
    t = make_teacher()
    s = convert(t, "mamba2")
    run_stage(StageConfig(kind="kl", train=tcfg(2, out_dir=str(tmp_path), save_every=1)), s, t,
              cycle(random_batches(2)))
    other = convert(t, "rglru")
    with pytest.raises(StageError, match="different model.*layer_pattern"):
        run_stage(StageConfig(kind="kl", train=tcfg(4, out_dir=str(tmp_path))), other, t,
                  cycle(random_batches(2)), resume=True)


# ---------------------------------------------------------------------------- generation & seq-KD
@pytest.mark.parametrize("pattern", [["attention"] * 2, ["mamba2", "attention"], ["rglru", "attention"]])
def test_batched_generation_equals_one_by_one(pattern):
    t = make_teacher(n_layers=2)
    model = convert(t, pattern[0], attention_layers=[1]) if pattern[0] != "attention" else t
    prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [20, 21, 22, 23]]
    batched = generate_ids(model, prompts, 6, eos_token_id=[])
    single = [generate_ids(model, [p], 6, eos_token_id=[])[0] for p in prompts]
    assert batched == single
    # greedy decode equals the argmax of the full forward
    ids = torch.tensor([prompts[0] + single[0]])
    with torch.no_grad():
        full = model(ids).logits[0, len(prompts[0]) - 1:-1].argmax(-1).tolist()
    assert full == single[0]


def test_pseudo_labels_resume_and_stream(tmp_path):
    t = make_teacher()
    prompts = [[3 + i, 4 + i, 5 + i] for i in range(7)]
    ref = tmp_path / "ref.jsonl"
    generate_pseudo_labels(t, prompts, ref, max_new_tokens=5, batch_size=3, progress=False)
    part = tmp_path / "part.jsonl"
    lines = ref.read_text().splitlines(keepends=True)
    part.write_text("".join(lines[:4]) + lines[4][:10])           # crash mid-write of record 5
    (tmp_path / "part.jsonl.meta.json").write_text((tmp_path / "ref.jsonl.meta.json").read_text())
    generate_pseudo_labels(t, prompts, part, max_new_tokens=5, batch_size=3, progress=False)
    assert part.read_text() == ref.read_text()
    with pytest.raises(StageError, match="other settings"):
        generate_pseudo_labels(t, prompts, part, max_new_tokens=6, batch_size=3, progress=False)
    stream = PseudoLabelStream(ref, seq_len=6, batch_size=7, shuffle=False)
    b = next(stream)
    assert (b["labels"][:, :3] == -100).all()                    # prompt carries no loss
    assert torch.equal(b["labels"][:, 3:], b["input_ids"][:, 3:])  # 3 prompt + 5 new, cut at 6


def test_seqkd_stage_learns_pseudo_labels(tmp_path):
    t = make_teacher()
    s = convert(t, "mamba2")
    prompts = [[3 + i, 10 + i, 20 + i, 30 + i] for i in range(8)]
    path = generate_pseudo_labels(t, prompts, tmp_path / "pl.jsonl", max_new_tokens=8, batch_size=8,
                                  progress=False)
    data = PseudoLabelStream(path, seq_len=12, batch_size=4)
    held = [next(PseudoLabelStream(path, seq_len=12, batch_size=8, shuffle=False))]
    ce0 = evaluate_lm(s, held)["loss"]
    run_stage(StageConfig(kind="seqkd", train=tcfg(25)), s, t, data)
    assert evaluate_lm(s, held)["loss"] < 0.8 * ce0


# ---------------------------------------------------------------------------- progressive
class Finite:
    """n batches, then exhausted (no state_dict: the trainer resumes by skipping)."""

    def __init__(self, n, seed=0):
        self.batches = random_batches(n, seed=seed)

    def __iter__(self):
        return iter(self.batches)


def test_progressive_picks_up_from_checkpoints(tmp_path):
    t = make_teacher()
    s = convert(t, "mamba2", attention_fraction=1.0)             # nothing converted yet
    stage = StageConfig(kind="progressive", fractions=[0.5, 0.25], train=tcfg(6, save_every=2))
    calls = []

    def interrupted():            # step 0.5 gets all its data; step 0.25 runs out after 3 updates
        calls.append(1)
        return Finite(6 if len(calls) == 1 else 3)

    with pytest.warns(UserWarning, match="ran out"):
        _, summ = run_progressive(stage, s, t, interrupted, mixer="mamba2", out_dir=tmp_path)
    assert summ[0]["stopped"] == "max_steps" and summ[1]["stopped"] == "data_exhausted"
    assert stage_done(tmp_path / "attn-0.5") and not stage_done(tmp_path / "attn-0.25")
    first = (tmp_path / "attn-0.5" / "metrics.jsonl").read_text()

    final, summ = run_progressive(stage, convert(t, "mamba2", attention_fraction=1.0), t, lambda: Finite(6),
                                  mixer="mamba2", out_dir=tmp_path, resume=True)
    assert (tmp_path / "attn-0.5" / "metrics.jsonl").read_text() == first        # not retrained
    assert summ[1]["stopped"] == "max_steps" and summ[1]["steps"] == 6
    rows = [json.loads(x) for x in (tmp_path / "attn-0.25" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [5, 6]                    # log_every 5: resumed at 3
    assert final.layer_pattern == ["mamba2", "mamba2", "mamba2", "attention"]
    # the 0.25 step started from the 0.5 step's trained mixer at layer 0
    from hybridize import load
    half = load(str(tmp_path / "attn-0.5" / "final"))
    assert not torch.equal(half.layers[0].mixer.A_log, convert(t, "mamba2").layers[0].mixer.A_log)


# ---------------------------------------------------------------------------- recipes
WORDS = "def return import class self value list dict for in if else while yield None True".split()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tokenizer, a teacher with its vocabulary, and small text / chat / preference files."""
    root = tmp_path_factory.mktemp("world")
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(20, 60))) for _ in range(60)]
    tok = train_bpe_tokenizer(texts, vocab_size=300)
    corpus = root / "corpus"
    corpus.mkdir()
    for i, tx in enumerate(texts):
        (corpus / f"doc{i:02d}.txt").write_text(tx)
    chat = root / "chat.jsonl"
    chat.write_text("".join(
        json.dumps({"messages": [{"role": "user", "content": texts[i][:40]},
                                 {"role": "assistant", "content": texts[i + 1][:60]}]}) + "\n"
        for i in range(20)))
    pref = root / "pref.jsonl"
    pref.write_text("".join(json.dumps({"prompt": texts[i][:30], "chosen": "return value",
                                        "rejected": "yield None"}) + "\n" for i in range(12)))
    teacher = make_teacher(vocab=len(tok), n_layers=4)
    return {"root": root, "tok": tok, "corpus": str(corpus), "chat": str(chat), "pref": str(pref),
            "teacher": teacher}


def recipe_dict(world, stages=None, **data):
    return {"recipe": {"name": "t"}, "student": {"mixer": "mamba2", "attention_fraction": 0.5},
            "data": {"train": world["corpus"], "heldout_fraction": 0.2, "eval_batches": 1, **data},
            "defaults": {"batch_size": 2, "seq_len": 16, "lr": 3e-3, "warmup_steps": 0, "log_every": 1,
                         "save_every": 2},
            "stage": stages or [{"kind": "kl", "max_steps": 3}]}


@pytest.mark.parametrize("mutate, match", [
    (lambda r: r.update(stages=[]), "unknown tables"),
    (lambda r: r["student"].update(mixers="mamba2"), r"\[student\]: unknown keys \['mixers'\]"),
    (lambda r: r.update(stage=[{"kind": "mohawk4"}]), "unknown kind 'mohawk4'"),
    (lambda r: r.update(stage=[{"kind": "kl", "max_step": 3}]), r"unknown keys \['max_step'\]"),
    (lambda r: r.update(stage=[]), "no stages"),
    (lambda r: r.update(stage=[{"kind": "kl", "max_steps": 1}, {"kind": "kl", "max_steps": 1}]), "repeat"),
    (lambda r: r["defaults"].update(learning_rate=1e-3), r"\[defaults\] has unknown keys"),
])
def test_recipe_parse_errors(world, mutate, match):
    r = recipe_dict(world)
    mutate(r)
    with pytest.raises(RecipeError, match=match):
        parse_recipe(r, "t.toml")


@pytest.mark.parametrize("student, stages, data, match", [
    ({"attention_layers": [1, 7]}, None, {}, r"out of range.*4 layers"),
    ({"attention_fraction": 0.3}, None, {}, "not supported"),
    ({"attention_fraction": 1.0}, None, {}, "has none"),
    ({}, [{"kind": "sft", "max_steps": 2}], {}, "needs chat data"),
    ({}, [{"kind": "dpo", "max_steps": 2}], {}, "needs preference data"),
    ({}, [{"kind": "progressive", "fractions": [0.75], "max_steps": 2}], {}, "not a strict subset"),
    ({}, None, {"train": "__missing__"}, "does not exist"),
    ({}, None, {"train": "__tiny__"}, "tokens, need at least"),
])
def test_recipe_validation_errors(world, student, stages, data, match):
    if data.get("train") == "__missing__":
        data = {"train": str(world["root"] / "nope")}
    if data.get("train") == "__tiny__":
        tiny = world["root"] / "tiny.txt"
        tiny.write_text("def f")
        data = {"train": str(tiny), "heldout_fraction": 0.0}
    r = recipe_dict(world, stages, **data)
    if student:
        r["student"] = {"mixer": "mamba2", **student}
    recipe = parse_recipe(r, "t.toml")
    with pytest.raises(RecipeError, match=match):
        validate_recipe(recipe, world["teacher"].cfg, world["tok"])


def test_recipe_rejects_foreign_tokenizer_and_checkpoint(world, tmp_path):
    recipe = parse_recipe(recipe_dict(world), "t.toml")
    small_teacher = make_teacher(vocab=100)
    with pytest.raises(RecipeError, match="tokenizer has .* tokens but the teacher's vocabulary has 100"):
        validate_recipe(recipe, small_teacher.cfg, world["tok"])
    foreign = convert(make_teacher(vocab=100), "mamba2")
    foreign.save_pretrained(str(tmp_path / "foreign"))
    r = recipe_dict(world)
    r["student"] = {"init_from": str(tmp_path / "foreign")}
    with pytest.raises(RecipeError, match="not a student of this teacher.*vocab_size"):
        validate_recipe(parse_recipe(r, "t.toml"), world["teacher"].cfg, world["tok"])


def test_shipped_recipes_parse_and_validate():
    from hybridize.config import preset

    for name in ("mil", "mohawk", "demo"):
        r = load_recipe(name)
        assert r.stages
    assert [s.kind for s in load_recipe("mil").stages] == ["kl", "sft"]
    assert [s.kind for s in load_recipe("mohawk").stages] == ["mohawk1", "mohawk2", "mohawk3"]
    plan = validate_recipe(load_recipe("mohawk"), preset("llama-debug"), check_data=False)
    assert [p["trainable"] for p in plan] == ["mixers", "mixers", "all"]
    with pytest.raises(RecipeError, match="neither a file nor a shipped recipe"):
        load_recipe("mamba-in-the-llama")


def test_run_recipe_all_mil_stages_and_resume(world, tmp_path):
    stages = [{"kind": "kl", "max_steps": 3},
              {"kind": "seqkd", "max_steps": 2, "num_prompts": 4, "prompt_tokens": 4, "max_new_tokens": 4},
              {"kind": "sft", "max_steps": 2}, {"kind": "dpo", "max_steps": 2, "beta": 0.2}]
    recipe = parse_recipe(recipe_dict(world, stages, chat=world["chat"], preference=world["pref"]), "t.toml")
    res = run_recipe(recipe, tmp_path, teacher=world["teacher"], tokenizer=world["tok"], progress=False,
                     log=lambda m: None)
    assert [s["kind"] for s in res["stages"]] == ["kl", "seqkd", "sft", "dpo"]
    assert all(s["stopped"] == "max_steps" for s in res["stages"])
    first_row = (tmp_path / "04-dpo" / "metrics.jsonl").read_text().splitlines()[0]
    assert "reward_accuracy" in json.loads(first_row)
    assert (tmp_path / "02-seqkd" / "pseudo_labels.jsonl").exists()
    assert (tmp_path / "final" / "config.json").exists()
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*/metrics.jsonl")}
    msgs = []
    again = run_recipe(recipe, tmp_path, teacher=world["teacher"], tokenizer=world["tok"], progress=False,
                       resume=True, log=msgs.append)
    assert sum("already finished" in m for m in msgs) == 4
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.glob("*/metrics.jsonl")} == before
    ids = torch.randint(3, len(world["tok"]), (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(again["student"](ids).logits, res["student"](ids).logits)
    with pytest.raises(RecipeError, match="already holds checkpoints"):
        run_recipe(recipe, tmp_path, teacher=world["teacher"], tokenizer=world["tok"], progress=False,
                   log=lambda m: None)


# ---------------------------------------------------------------------------- SFT on assistant turns only
def test_sft_assistant_only_loss_option_validation(world):
    train = {"max_steps": 2, "warmup_steps": 0}
    assert StageConfig.from_dict({"kind": "sft"}, train).assistant_only_loss is None   # auto: chats → True
    assert StageConfig.from_dict({"kind": "sft", "assistant_only_loss": False}, train).assistant_only_loss is False
    with pytest.raises(StageError, match="assistant_only_loss must be true or false.*'yes'"):
        StageConfig.from_dict({"kind": "sft", "assistant_only_loss": "yes"}, train)
    with pytest.raises(StageError, match=r"unknown keys \['assistant_only_los'\].*'assistant_only_loss'"):
        StageConfig.from_dict({"kind": "sft", "assistant_only_los": True}, train)
    with pytest.raises(StageError, match=r"unknown keys \['assistant_only_loss'\]"):
        StageConfig.from_dict({"kind": "kl", "assistant_only_loss": True}, train)
    with pytest.raises(RecipeError, match="assistant_only_loss must be"):
        parse_recipe(recipe_dict(world, [{"kind": "sft", "max_steps": 2, "assistant_only_loss": 1}],
                                 chat=world["chat"]), "t")


def test_sft_recipe_checks_assistant_only_loss_against_the_data(world, tmp_path):
    from hybridize.data import load_tokenizer

    plain = tmp_path / "plain.jsonl"
    plain.write_text("".join(json.dumps({"text": "def return value " * 4}) + "\n" for _ in range(8)))
    plans = {}
    for flag in (True, False, None):
        st = {"kind": "sft", "max_steps": 2} if flag is None else {"kind": "sft", "max_steps": 2,
                                                                    "assistant_only_loss": flag}
        recipe = parse_recipe(recipe_dict(world, [st], chat=world["chat"]), "t.toml")
        plans[flag] = validate_recipe(recipe, world["teacher"].cfg, world["tok"])[0]["loss_on"]
        on_plain = parse_recipe(recipe_dict(world, [st], chat=str(plain)), "t.toml")
        if flag:      # plain text has no roles: asking for assistant tokens fails before any training
            with pytest.raises(RecipeError, match="assistant_only_loss = true needs chat documents"):
                validate_recipe(on_plain, world["teacher"].cfg, world["tok"])
        else:
            validate_recipe(on_plain, world["teacher"].cfg, world["tok"])
    assert plans[True] == "assistant turns" and plans[False] == "all tokens" and "plain text" in plans[None]
    # a template whose turns cannot be located fails in the checker too
    world["tok"].save_pretrained(str(tmp_path / "tok"))
    odd = load_tokenizer(tmp_path / "tok")
    odd.chat_template = ("{% for m in messages %}{% if loop.last %}<|last|>{% endif %}<|{{ m['role'] }}|>\n"
                         "{{ m['content'] }}<|eos|>\n{% endfor %}")
    recipe = parse_recipe(recipe_dict(world, [{"kind": "sft", "max_steps": 2}], chat=world["chat"]), "t.toml")
    with pytest.raises(RecipeError, match="not prefix-stable"):
        validate_recipe(recipe, world["teacher"].cfg, odd)
    no_mask = parse_recipe(recipe_dict(world, [{"kind": "sft", "max_steps": 2, "assistant_only_loss": False}],
                                       chat=world["chat"]), "t.toml")
    validate_recipe(no_mask, world["teacher"].cfg, odd)


def test_sft_loss_depends_on_user_tokens_only_without_assistant_only_loss(world, tmp_path):
    """A trailing user turn comes after every assistant token: with assistant_only_loss the (causal) SFT loss
    cannot see it; on all tokens it is part of the loss. Batches come from the recipe's sft data path."""
    from hybridize.distill.recipes import _stage_data
    from hybridize.distill.stages import stage_loss

    tok, model = world["tok"], world["teacher"]

    def chat(last):
        return {"messages": [{"role": "system", "content": "self value"},
                             {"role": "user", "content": "def return import"},
                             {"role": "assistant", "content": "class self value list dict"},
                             {"role": "user", "content": last}]}

    from hybridize.data import encode_document
    first, other = "@#$%&", "%&@#$"           # never seen in training: one byte token each, same length
    n = len(encode_document(chat(first), tok))
    assert len(encode_document(chat(other), tok)) == n
    losses = {}
    for flag in (True, False):
        for last in (first, other):
            path = tmp_path / f"chat-{flag}-{last == first}.jsonl"
            path.write_text(json.dumps(chat(last)) + "\n")
            st = {"kind": "sft", "max_steps": 1, "seq_len": n, "batch_size": 1, "assistant_only_loss": flag}
            recipe = parse_recipe(recipe_dict(world, [st], chat=str(path)), "t.toml")
            stage = recipe.stages[0]
            batch = next(iter(_stage_data(recipe, tok, stage, None, tmp_path, False)))
            assert batch["seq_idx"].max() == 0                       # exactly one conversation per row
            with torch.no_grad():
                losses[flag, last] = float(stage_loss(stage, model)(model, batch)[0])
            if flag:
                tgt = batch["labels"][0][batch["labels"][0] != -100].tolist()
                assert tok.decode(tgt) == "class self value list dict<|eos|>"
    a, b = losses[True, first], losses[True, other]
    assert a == pytest.approx(b, rel=1e-6, abs=1e-6)
    a_all, b_all = losses[False, first], losses[False, other]
    assert abs(a_all - b_all) > 1e-3
    assert abs(a - a_all) > 1e-3
