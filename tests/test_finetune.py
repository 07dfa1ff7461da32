"""Fine-tuning: the real tasks from ../shared, freeze presets, and `moe-lab finetune` end to end."""

from __future__ import annotations

import json
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from rich.console import Console

from moe_lab.config import ModelConfig, TaskConfig, compose_finetune, to_run_config
from moe_lab.data.synthetic import generate_documents
from moe_lab.data.tasks import ClassificationData, build_classification_data, polarity_task
from moe_lab.data.tokenizers import ByteTokenizer, train_bpe
from moe_lab.models import ClassifierModel
from moe_lab.moe import MoEConfig
from moe_lab.paths import records_path
from moe_lab.report.results import final_examples
from moe_lab.train.finetune import ClassificationTask, macro_f1
from moe_lab.train.freeze import PRESETS, apply_freeze, parameter_kinds
from moe_lab.train.recall import VALENCE_SENTENCES
from tests.conftest import SHARED, needs_shared, run_cli, signal_at_first_checkpoint
from tests.test_pretrain import pretrain
from tests.test_run_safety import assert_one_line_error


def tiny_pretraining(factory: pytest.TempPathFactory, name: str, *overrides: str) -> Path:
    """A tiny pretraining run directory (20 steps unless `overrides` say otherwise)."""
    root = factory.mktemp(name)
    result = pretrain("tiny", f"run_dir={root / 'run'}", f"data.cache_dir={root / 'cache'}", "train.max_steps=20",
                      *overrides)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    return root / "run"


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_pretraining(tmp_path_factory, "pretrained")


def task_config(name: str, monkeypatch: pytest.MonkeyPatch) -> TaskConfig:
    monkeypatch.setenv("MOE_LAB_SHARED", str(SHARED))
    return to_run_config(compose_finetune(name, ["checkpoint=x"])).task


@needs_shared
def test_cb_loads_from_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    data = build_classification_data(task_config("cb", monkeypatch), ByteTokenizer(), "/tmp", seed=0)
    assert (len(data.train_ids), len(data.val_ids)) == (250, 56)
    assert data.label_names == ["entailment", "contradiction", "neutral"]
    assert torch.bincount(data.train_labels).tolist() == [115, 119, 16]
    assert torch.bincount(data.val_labels).tolist() == [23, 28, 5]
    first = bytes(data.train_ids[0]).decode()
    assert first.startswith("It was a complex language.") and " | the language was peeled down" in first


@needs_shared
def test_sst2_loads_from_shared(monkeypatch: pytest.MonkeyPatch) -> None:
    data = build_classification_data(task_config("sst2", monkeypatch), ByteTokenizer(), "/tmp", seed=0)
    assert (len(data.train_ids), len(data.val_ids)) == (67_349, 872)
    assert torch.bincount(data.train_labels).tolist() == [29_780, 37_569]
    assert torch.bincount(data.val_labels).tolist() == [428, 444]
    assert bytes(data.train_ids[0]).decode() == "hide new secretions from the parental units "


def test_synthetic_tasks_share_validation_and_differ_in_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    small = replace(task_config("synth-small", monkeypatch), synthetic_val=300)
    large = replace(small, synthetic_train=5000)
    a = build_classification_data(small, ByteTokenizer(), str(tmp_path), seed=0)
    b = build_classification_data(large, ByteTokenizer(), str(tmp_path), seed=0)
    assert (len(a.train_ids), len(b.train_ids)) == (250, 5000)
    assert a.val_ids == b.val_ids and torch.equal(a.val_labels, b.val_labels)
    assert a.train_ids == b.train_ids[:250]
    assert not set(map(tuple, a.val_ids)) & set(map(tuple, b.train_ids))  # no validation sentence in training
    assert 0.35 < b.train_labels.float().mean().item() < 0.65  # roughly balanced


def test_a_polarity_cloze_is_read_up_to_where_its_cue_would_start(tmp_path: Path, monkeypatch) -> None:
    cfg = replace(task_config("polarity-small", monkeypatch), synthetic_train=20, synthetic_val=30)
    train, val = polarity_task(20, 30, 4)
    assert all(text.endswith(" ") for text in [*train["text"], *val["text"]])
    data = build_classification_data(cfg, ByteTokenizer(), str(tmp_path), seed=0)
    # bytes: the space is the token before every word, so it stays (the committed byte results stand)
    assert [bytes(ids).decode() for ids in data.val_ids] == list(val["text"])
    bpe = train_bpe(generate_documents(200, seed=0, valence_cues=True)["text"], 600)
    data = build_classification_data(cfg, bpe, str(tmp_path), seed=0)
    # a BPE starts the cue with its space: the example ends on the word before it, not on a lone space token
    assert [bpe.decode(ids) for ids in data.val_ids] == [text[:-1] for text in val["text"]]
    assert sorted(bpe.decode(ids) for ids in data.train_ids) == sorted(text[:-1] for text in train["text"])


def _model() -> ClassifierModel:
    cfg = ModelConfig(d_model=32, num_layers=4, num_heads=2, d_ff=64, max_seq_len=32, moe_every=2)
    return ClassifierModel(cfg, MoEConfig(d_model=32, d_ff=64, num_experts=4, train_capacity_factor=None), 258, 3)


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("freeze_router", [False, True])
def test_freeze_presets_update_exactly_their_parameters(preset: str, freeze_router: bool) -> None:
    torch.manual_seed(0)
    model = _model()
    counts = apply_freeze(model, preset, freeze_router)
    kinds = parameter_kinds(model)
    expected = set(PRESETS[preset]) - ({"router"} if freeze_router else set())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    ids = torch.randint(0, 256, (8, 16))
    model.losses(ids, torch.randint(0, 3, (8,))).total.backward()
    opt.step()
    changed_kinds = set()
    for name, p in model.named_parameters():
        if kinds[name] not in expected:
            assert torch.equal(p, before[name]), f"{preset}: frozen {name} changed"
        elif not torch.equal(p, before[name]):
            changed_kinds.add(kinds[name])
    assert changed_kinds == expected
    assert counts["trainable"] == sum(p.numel() for n, p in model.named_parameters() if kinds[n] in expected)


def test_parameter_kinds_cover_the_model() -> None:
    kinds = set(parameter_kinds(_model()).values())
    assert kinds == {"embedding", "attention", "norm", "dense_ffn", "experts", "router", "head"}


def test_last_token_pooling_reads_each_example_at_its_last_real_token() -> None:
    torch.manual_seed(0)
    model = _model().eval()
    model.pooling = "last"
    ids = torch.randint(0, 256, (3, 7))
    lengths = [7, 4, 1]
    mask = torch.arange(7)[None, :] < torch.tensor(lengths)[:, None]
    with torch.no_grad():
        pooled = model(ids, mask)
        for row, length in enumerate(lengths):  # each example alone, unpadded: the head on its last position
            alone = model.transformer(ids[row : row + 1, :length])[0, -1]
            assert torch.allclose(pooled[row], model.head(alone), atol=1e-5)
    with pytest.raises(ValueError, match="pooling='first' is not one of"):
        ClassifierModel(_model().cfg, MoEConfig(d_model=32, d_ff=64, num_experts=4), 258, 3, pooling="first")


def test_macro_f1() -> None:
    labels = torch.tensor([0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 0])
    # class 0: tp 1 fp 1 fn 1 -> 0.5; class 1: tp 2 fp 1 fn 0 -> 0.8; class 2: tp 0 fn 1 -> 0
    assert macro_f1(pred, labels, 3) == pytest.approx((0.5 + 0.8 + 0.0) / 3)


def test_finetune_end_to_end(pretrained: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "ft"
    result = run_cli(
        "finetune", "synth-small", f"checkpoint={pretrained}", f"run_dir={run_dir}", "train.max_steps=30",
        "train.eval_every=10", "train.batch_size=16", "task.synthetic_val=200", "moe.aux_loss_coef=0",
        "moe.train_capacity_factor=0.5", "finetune.freeze=non_moe",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["task"] == "synth-small"
    assert summary["moe"]["aux_loss_coef"] == 0.0 and summary["moe"]["train_capacity_factor"] == 0.5
    assert summary["moe"]["eval_capacity_factor"] == 2.0  # from the checkpoint
    assert 0 < summary["trainable_parameters"] < summary["parameters"]["total"]
    for key in ("final_val_accuracy", "final_val_f1", "final_train_accuracy", "best_val_accuracy"):
        assert 0.0 <= summary[key] <= 1.0, key
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    assert "moe/1/dropped_frac" in header and "eval_moe/1/dropped_frac" in header
    assert "trainable parameters" in result.stdout
    # each evaluation's record of every validation example; the final one gives the summary's accuracy and loss
    assert sorted(p.name for p in (run_dir / "eval").iterdir()) == [f"val-step{s:06d}.csv.gz" for s in (10, 20, 30)]
    final = pd.read_csv(records_path(run_dir, "val", 30))
    assert list(final.columns) == ["example", "label", "prediction", "label_logprob"]
    assert final["example"].tolist() == list(range(200)) and set(final["label"]) <= {0, 1}
    assert (final["label_logprob"] <= 0).all()
    assert (final["prediction"] == final["label"]).mean() == pytest.approx(summary["final_val_accuracy"])
    assert -final["label_logprob"].mean() == pytest.approx(summary["final_val_loss"], rel=1e-12)
    correct = final_examples(run_dir, summary, "final_val_accuracy")
    assert correct.index.names == ["example", "label"] and correct.mean() == pytest.approx(
        summary["final_val_accuracy"]
    )
    assert final_examples(run_dir, summary, "final_val_f1") is None  # macro-F1 is no mean over examples


def test_finetune_errors(tmp_path: Path) -> None:
    result = run_cli("finetune", "cola", "checkpoint=x")
    assert result.returncode == 2
    valid = [
        "cb",
        "facts-large",
        "facts-small",
        "local",
        "polarity-large",
        "polarity-small",
        "sst2",
        "synth-large",
        "synth-small",
    ]
    assert f"valid tasks: {valid}" in result.stderr
    result = run_cli("finetune", "synth-small", f"checkpoint={tmp_path / 'none'}", f"runs_root={tmp_path}")
    assert result.returncode == 2 and "expected a pretraining run directory" in result.stderr
    result = run_cli("finetune", "synth-small", "finetune.freeze=everything", "checkpoint=x")
    assert result.returncode == 2 and "finetune.freeze='everything' is not one of" in result.stderr


# settings a fine-tuning run used to ignore silently (issue #12 §7)


@pytest.fixture(scope="module")
def pretrained_eval_cf_1(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pretraining whose eval capacity factor (1.0) differs from the fine-tuning studies' (2.0)."""
    return tiny_pretraining(tmp_path_factory, "pretrained-cf1", "train.max_steps=4", "moe.eval_capacity_factor=1.0")


def test_a_study_yaml_moe_setting_applies_to_its_fine_tuning_runs(pretrained_eval_cf_1: Path, tmp_path: Path) -> None:
    from moe_lab.sweeps.study import compose_point, load_study
    from moe_lab.train.finetune import run_finetune

    study = load_study("token-drop")  # sets moe.eval_capacity_factor: 2.0 in its YAML, not on the command line
    point = [
        f"checkpoint={pretrained_eval_cf_1}", f"run_dir={tmp_path / 'ft'}", "moe.train_capacity_factor=0.5",
        "task=synth-small",  # the study's polarity-large asks what a corpus with valence cues teaches
        "train.max_steps=2", "train.eval_every=2", "task.synthetic_val=50", "task.synthetic_train=50",
        "logger=csv", "logger.progress=false",
    ]  # fmt: skip
    cfg = compose_point(study, point)
    summary = run_finetune(cfg, [f"+experiments={study.name}", *point], Console(quiet=True))
    assert summary["moe"]["eval_capacity_factor"] == 2.0  # the study's, not the checkpoint's 1.0
    assert summary["moe"]["train_capacity_factor"] == 0.5
    pre = json.loads((pretrained_eval_cf_1 / "summary.json").read_text())
    assert pre["config"]["moe"]["eval_capacity_factor"] == 1.0


@pytest.mark.parametrize(
    ("override", "needle", "allowed"),
    [("moe.num_experts=4", "moe.num_experts: fixed by the pretrained checkpoint", "moe.train_capacity_factor"),
     ("model.d_model=64", "model.d_model: fixed by the pretrained checkpoint", "model.dropout")],
)  # fmt: skip
def test_an_architecture_key_in_fine_tuning_is_refused_not_ignored(
    pretrained: Path, tmp_path: Path, override: str, needle: str, allowed: str
) -> None:
    result = run_cli("finetune", "synth-small", f"checkpoint={pretrained}", f"runs_root={tmp_path}", override)
    assert result.returncode == 2, result.stdout + result.stderr
    (line,) = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert needle in line and "fine-tuning may change" in line and allowed in line
    assert list(tmp_path.iterdir()) == []


def test_text_labels_are_named_by_the_data_when_no_names_are_given(pretrained: Path, tmp_path: Path) -> None:
    data = tmp_path / "task.jsonl"
    rows = [("a cat sat", "not_entailment"), ("a dog ran", "entailment"), ("the sun", "neutral")] * 6
    data.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    run_dir = tmp_path / "ft"
    result = run_cli(
        "finetune", "local", f"checkpoint={pretrained}", f"task.train_path={data}", f"task.val_path={data}",
        f"run_dir={run_dir}", "train.max_steps=2", "train.eval_every=2", "train.batch_size=4",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["label_names"] == ["entailment", "neutral", "not_entailment"]  # sorted
    assert summary["val_examples"] == 18


def test_a_fine_tuning_study_plans_one_pretraining_or_one_per_seed_and_passes_it_scale(tmp_path: Path) -> None:
    from moe_lab.sweeps.plan import plan_study, shared_overrides
    from moe_lab.sweeps.study import load_study

    overrides = ["seed=0,1,2", "scale=0.5", "train.threads=1", "data.num_docs=300"]
    shared = ["scale=0.5", "train.threads=1", "data.num_docs=300"]
    assert shared_overrides([*overrides, "study.pretraining=shared"]) == shared
    pretrainings, points = plan_study(load_study("freeze"), [*overrides, "study.pretraining=shared"], tmp_path)
    assert [p.point for p in pretrainings] == [["small", *shared]]
    seeds = sorted(item for p in points for item in p.point if item.startswith("seed="))
    assert seeds == sorted(["seed=0", "seed=1", "seed=2"] * 5)  # 5 freeze settings x 3 seeds
    # the study's own choice, one pretraining per seed, each with the shared overrides
    pretrainings, _ = plan_study(load_study("freeze"), overrides, tmp_path)
    assert [p.point for p in pretrainings] == [["small", f"seed={s}", *shared] for s in (0, 1, 2)]


def test_a_facts_task_asks_about_the_pretrained_corpus_people_and_refuses_a_corpus_without_them(
    pretrained: Path, tmp_path: Path
) -> None:
    # without facts in the pretraining corpus: one clear line, no run left behind
    result = run_cli("finetune", "facts-small", f"checkpoint={pretrained}", f"runs_root={tmp_path / 'none'}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "corpus has none" in result.stderr and "data.num_people" in result.stderr

    pre = tmp_path / "pre"
    cache = f"data.cache_dir={tmp_path / 'cache'}"
    made = pretrain("tiny", f"run_dir={pre}", cache, "train.max_steps=4", "data.num_people=60",
                    "data.fact_fraction=0.5", "data.num_docs=300", "train.fact_queries=0")  # fmt: skip
    assert made.returncode == 0, made.stdout + made.stderr
    result = run_cli("finetune", "facts-large", f"checkpoint={pre}", f"run_dir={tmp_path / 'ft'}",
                     "task.synthetic_val=100", "task.synthetic_train=400", "train.max_steps=2",
                     "train.eval_every=2", "logger=csv", "logger.progress=false")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads((tmp_path / "ft" / "summary.json").read_text())
    assert summary["val_examples"] == 100 and summary["label_names"] == ["false", "true"]
    assert "400 train / 100 val examples, 2 classes" in " ".join(result.stdout.split())


@pytest.fixture(scope="module")
def pretrained_with_cues(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_pretraining(tmp_path_factory, "pretrained-cues", "data.valence_cues=true")


def test_a_corpus_that_teaches_valence_has_its_valence_recall_measured(pretrained_with_cues: Path, pretrained: Path):
    summary = json.loads((pretrained_with_cues / "summary.json").read_text())
    assert 0.0 <= summary["final_valence_recall"] <= 1.0
    steps = sorted((pretrained_with_cues / "eval").glob("valence-step*.csv.gz"))
    assert steps, "no valence records"
    records = pd.read_csv(steps[-1])
    assert records["sentence"].tolist() == list(range(VALENCE_SENTENCES)) and set(records["valence"]) == {-1, 1}
    assert records["hit"].mean() == pytest.approx(summary["final_valence_recall"])
    assert "final_valence_recall" not in json.loads((pretrained / "summary.json").read_text())
    assert not list((pretrained / "eval").glob("valence-*"))


def test_the_polarity_task_fine_tunes_from_pretraining_or_from_scratch(
    pretrained_with_cues: Path, tmp_path: Path
) -> None:
    def finetune(name: str, *extra: str) -> dict:
        args = ("finetune", "polarity-small", f"checkpoint={pretrained_with_cues}", f"run_dir={tmp_path / name}",
                "train.max_steps=4", "train.eval_every=4", "task.synthetic_val=64", *extra)  # fmt: skip
        result = run_cli(*args)
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads((tmp_path / name / "summary.json").read_text())

    pretrained, scratch = finetune("pre"), finetune("scratch", "finetune.init=random")
    assert pretrained["val_examples"] == scratch["val_examples"] == 64
    assert pretrained["config"]["task"]["pooling"] == "last"
    # the same data, seed and steps: only the starting weights differ, and so do the results
    assert pretrained["final_val_loss"] != scratch["final_val_loss"]
    records = pd.read_csv(records_path(tmp_path / "pre", "val", 4))
    assert len(records) == 64


def test_the_polarity_task_refuses_a_model_whose_corpus_taught_no_valence(pretrained: Path, tmp_path: Path) -> None:
    result = run_cli("finetune", "polarity-small", f"checkpoint={pretrained}", f"runs_root={tmp_path}")
    assert result.returncode == 2, result.stdout + result.stderr
    assert "data.valence_cues=False" in result.stderr and "pretrain on data.source=synthetic with" in result.stderr
    assert not any(tmp_path.iterdir())


# settings that change nothing on a dense checkpoint are refused, not ignored (issue #26 §4)


@pytest.fixture(scope="module")
def dense_pretrained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny pretraining of the dense twin: no MoE layer, no router."""
    return tiny_pretraining(tmp_path_factory, "dense", "model.sparse=false", "train.max_steps=4")


@pytest.mark.parametrize(
    ("override", "needles"),
    [
        ("moe.train_capacity_factor=0.5", ["moe.train_capacity_factor: ", "would change nothing"]),
        ("moe.aux_loss_coef=0", ["moe.aux_loss_coef: ", "would change nothing"]),
        ("finetune.freeze=moe", ["finetune.freeze=moe: ", "only the new classification head would train"]),
        ("finetune.freeze_router=true", ["finetune.freeze_router=true: ", "no router to freeze"]),
    ],
)
def test_a_setting_that_does_nothing_on_a_dense_model_is_refused(
    dense_pretrained: Path, tmp_path: Path, override: str, needles: list[str]
) -> None:
    result = run_cli("finetune", "synth-small", f"checkpoint={dense_pretrained}", f"runs_root={tmp_path}", override)
    assert_one_line_error(result, *needles, f"the pretrained model {dense_pretrained} has no MoE layer")
    assert list(tmp_path.iterdir()) == []


def test_a_dense_model_fine_tunes_in_a_study_with_the_default_moe_settings(
    dense_pretrained: Path, tmp_path: Path
) -> None:
    from moe_lab.sweeps.study import compose_point, load_study
    from moe_lab.train.finetune import run_finetune

    study = load_study("finetune-grid")  # sweeps finetune.pretrained over mini and its dense twin
    point = [
        f"checkpoint={dense_pretrained}", "finetune.pretrained=dense-mini", f"run_dir={tmp_path / 'ft'}",
        "task=synth-small", "train.batch_size=8", "optim.lr=1.0e-3", "train.max_steps=2", "train.eval_every=2",
        "task.synthetic_val=50", "logger=csv", "logger.progress=false",
    ]  # fmt: skip
    summary = run_finetune(compose_point(study, point), [f"+experiments={study.name}", *point], Console(quiet=True))
    assert summary["status"] == "completed" and summary["pretrained"] == str(dense_pretrained)


# a checkpoint= that is no pretraining run: one line naming it (issue #26 §6)


def test_finetune_from_a_run_whose_config_is_not_yaml_names_the_file(pretrained: Path, tmp_path: Path) -> None:
    broken = tmp_path / "pre"
    shutil.copytree(pretrained, broken)
    config = broken / ".hydra" / "config.yaml"
    config.write_text("model: [d_model: 64\n")
    result = run_cli("finetune", "synth-small", f"checkpoint={broken}", f"runs_root={tmp_path / 'runs'}")
    assert_one_line_error(result, f"{config} is not valid YAML", "line 2 column 1", "expected a pretraining run")
    assert not (tmp_path / "runs").exists()


def test_finetune_from_a_fine_tuning_run_names_it_and_its_pretraining(pretrained: Path, tmp_path: Path) -> None:
    ft = tmp_path / "ft"
    first = run_cli("finetune", "synth-small", f"checkpoint={pretrained}", f"run_dir={ft}", "train.max_steps=2",
                    "train.eval_every=2", "task.synthetic_val=50", "logger.progress=false")  # fmt: skip
    assert first.returncode == 0, first.stdout + first.stderr
    result = run_cli("finetune", "synth-small", f"checkpoint={ft}", f"runs_root={tmp_path / 'runs'}")
    assert_one_line_error(
        result, f"{ft} is a fine-tuning run (of {pretrained})", "expected a pretraining run directory",
        f"fine-tune from checkpoint={pretrained}",
    )  # fmt: skip
    assert not (tmp_path / "runs").exists()


def test_a_fine_tuning_resumes_only_on_the_base_weights_it_began_on(pretrained: Path, tmp_path: Path) -> None:
    from moe_lab.train.checkpoint import load_checkpoint, save_checkpoint, weights_fingerprint

    base, run_dir = tmp_path / "base", tmp_path / "ft"
    shutil.copytree(pretrained, base)
    original = (base / "checkpoint.pt").read_bytes()
    weights = weights_fingerprint(load_checkpoint(base / "checkpoint.pt")["model"])
    args = ["finetune", "synth-small", f"checkpoint={base}", f"run_dir={run_dir}", "train.max_steps=60",
            "train.ckpt_every=2", "train.eval_every=30", "task.synthetic_val=64"]  # fmt: skip
    signal_at_first_checkpoint(args, run_dir, signal.SIGKILL)
    assert json.loads((run_dir / "run.json").read_text())["pretrained_weights"] == weights
    # the base checkpoint now holds other weights (one nudged), as after a rebuild: the resume stops, naming both
    payload = load_checkpoint(base / "checkpoint.pt")
    name = next(iter(payload["model"]))
    payload["model"][name] = payload["model"][name] + 1e-3
    save_checkpoint(base / "checkpoint.pt", payload)
    other = weights_fingerprint(payload["model"])
    kept = (run_dir / "checkpoint.pt").read_bytes()
    result = run_cli(*args, "resume=true")
    assert_one_line_error(result, f"fine-tuned from base weights {weights}", f"now holds {other}", "--rerun")
    assert (run_dir / "checkpoint.pt").read_bytes() == kept
    # with its own base back it resumes, and records it
    (base / "checkpoint.pt").write_bytes(original)
    result = run_cli(*args, "resume=true")
    assert result.returncode == 0 and "resumed from" in result.stdout, result.stdout + result.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["pretrained_weights"] == weights


def test_the_padding_mask_comes_from_lengths_not_the_pad_token() -> None:
    """A tokenizer whose pad is its eos (transformers' fallback) may put that token inside a text: it stays a real
    token, and only what collation adds is padding."""
    pad = 7
    data = ClassificationData([[1, pad, 2], [3]], torch.tensor([0, 1]), [[4]], torch.tensor([0]), 2, ["a", "b"])
    batch = ClassificationTask(data, batch_size=2, seed=0, pad_id=pad, train_eval=1).train_batch(0, torch.device("cpu"))
    rows = sorted(zip(batch["ids"].tolist(), batch["mask"].tolist(), strict=True))
    assert rows == [([1, pad, 2], [True, True, True]), ([3, pad, pad], [True, False, False])]
