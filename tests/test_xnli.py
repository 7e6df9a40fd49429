"""XNLI fine-tuning and the retrieval probe: the classifier, the data, the loop, the probe."""

import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import SHARED_DATA, tiny_config
from xlm_jax import train, xnli
from xlm_jax.data.sources import DataError
from xlm_jax.model.classifier import XNLIClassifier
from xlm_jax.model.encoder import ModelConfig, XLMEncoder
from xlm_jax.tokenizer import EOS_ID, PAD_ID

XNLI_DIR = SHARED_DATA / "xnli"
needs_xnli = pytest.mark.skipif(
    not (XNLI_DIR / "en.tsv").exists(), reason=f"XNLI data not found at {XNLI_DIR}"
)


def _tiny_model(**kw) -> ModelConfig:
    return ModelConfig(
        vocab_size=60, n_langs=3, emb_dim=16, n_layers=2, n_heads=2, max_positions=32, **kw
    )


def _inputs(rng, batch=3, length=10):
    tokens = rng.integers(14, 60, (batch, length)).astype(np.int32)
    tokens[:, 0] = EOS_ID
    tokens[0, 6:] = PAD_ID
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape).copy()
    langs = np.full(tokens.shape, 1, np.int32)
    return tokens, positions, langs


# --- the classifier -----------------------------------------------------------------------------


def test_classifier_head_reads_the_last_layer_at_position_zero():
    cfg = _tiny_model()
    model = XNLIClassifier(cfg, n_classes=3, dropout=0.1)
    tokens, positions, langs = _inputs(np.random.default_rng(0))
    variables = model.init({"params": jax.random.key(0)}, tokens, positions, langs)
    params = nn.meta.unbox(variables)["params"]
    assert set(params) == {"encoder", "head"}
    assert params["head"]["kernel"].shape == (16, 3) and params["head"]["bias"].shape == (3,)
    specs = nn.get_partition_spec(variables)["params"]["head"]
    assert tuple(specs["kernel"]) == ("embed", "classes")

    logits = model.apply({"params": params}, tokens, positions, langs)
    assert logits.shape == (3, 3) and logits.dtype == jnp.float32

    # The same numbers from the bare encoder's last layer at position 0, fed to the head.
    hidden = XLMEncoder(cfg).apply(
        {"params": params["encoder"]}, tokens, positions, langs, method=XLMEncoder.encode
    )
    via_encoder = model.apply({"params": params}, hidden[:, 0], method=XNLIClassifier.classify)
    np.testing.assert_allclose(logits, via_encoder, rtol=1e-6, atol=1e-6)
    other = model.apply({"params": params}, hidden[:, 1], method=XNLIClassifier.classify)
    assert not np.allclose(logits, other)  # position 0, not any position

    # The pretraining encoder's parameter tree drops in unchanged under 'encoder'.
    enc_params = XLMEncoder(cfg).init({"params": jax.random.key(1)}, tokens, positions, langs)
    assert jax.tree.structure(nn.meta.unbox(enc_params)["params"]) == jax.tree.structure(
        params["encoder"]
    )


def test_classifier_dropout_only_in_training():
    cfg = _tiny_model(dropout=0.0, attention_dropout=0.0)
    model = XNLIClassifier(cfg, dropout=0.5)
    tokens, positions, langs = _inputs(np.random.default_rng(1))
    params = model.init({"params": jax.random.key(0)}, tokens, positions, langs)["params"]
    a = model.apply({"params": params}, tokens, positions, langs)
    b = model.apply({"params": params}, tokens, positions, langs)
    np.testing.assert_array_equal(a, b)
    c = model.apply(
        {"params": params},
        tokens,
        positions,
        langs,
        deterministic=False,
        rngs={"dropout": jax.random.key(2)},
    )
    assert not np.allclose(a, c)


# --- data ----------------------------------------------------------------------------------------


def test_pack_pair_is_xlms_row():
    p, h = np.array([20, 21, 22]), np.array([30, 31])
    tokens, positions, langs = xnli.pack_pair(p, h, 4, max_len=256, length=12)
    assert tokens.tolist() == [1, 20, 21, 22, 1, 30, 31, 1, 2, 2, 2, 2]
    assert positions.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 0]
    assert set(langs.tolist()) == {4}
    # XLM's truncate: each framed sentence keeps max_len tokens, its last one </s> again
    tokens, _, _ = xnli.pack_pair(np.arange(20, 30), h, 0, max_len=4, length=16)
    assert tokens[:8].tolist() == [1, 20, 21, 1, 30, 31, 1, 2]
    # a row longer than the padded length loses tokens from its longer sentence
    tokens, _, _ = xnli.pack_pair(np.arange(20, 30), h, 0, max_len=256, length=9)
    assert tokens.tolist() == [1, 20, 21, 22, 23, 1, 30, 31, 1]
    assert (tokens == EOS_ID).sum() == 3 and tokens[-1] == EOS_ID


def test_batches_shuffle_per_epoch_and_pad_evaluation():
    a, b = xnli.epoch_order(10, 1, 0, -1), xnli.epoch_order(10, 1, 0, -1)
    np.testing.assert_array_equal(a, b)
    assert sorted(a.tolist()) == list(range(10))
    assert not np.array_equal(a, xnli.epoch_order(10, 2, 0, -1))
    assert len(xnli.epoch_order(10, 1, 0, 4)) == 4
    rows = xnli.Rows(
        tokens=np.full((5, 6), 7, np.int32),
        positions=np.zeros((5, 6), np.int32),
        langs=np.zeros((5, 6), np.int32),
        labels=np.arange(5, dtype=np.int32) % 3,
    )
    batches = xnli.eval_batches(rows, 4)
    assert len(batches) == 2
    last = batches[1]
    assert last["weights"][:, 0].tolist() == [1, 0, 0, 0]
    assert (last["tokens"][1:] == PAD_ID).all()
    assert last["labels"].shape == (4, 1)


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


GOOD = ["A man sleeps.\tA person rests.\tentailment", "A man sleeps.\tHe runs.\tcontradiction"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ("A man sleeps.\tA person rests.", r"bad\.tsv:3: 2 tab-separated column\(s\); expected 3"),
        ("A man sleeps.\tA person.\tmaybe", r"bad\.tsv:3: unknown label 'maybe'; expected one of"),
        ("\tA person rests.\tneutral", r"bad\.tsv:3: empty premise"),
        ("A man sleeps.\t \tneutral", r"bad\.tsv:3: empty hypothesis"),
        ("a\tb\tc\td", r"bad\.tsv:3: 4 tab-separated"),
    ],
)
def test_malformed_rows_name_file_and_line(tmp_path, bad, message):
    path = _write(tmp_path / "bad.tsv", [*GOOD, bad])
    with pytest.raises(DataError, match=message):
        xnli.read_xnli_tsv(path)
    # a range that skips the bad line reads; line numbers stay those of the file
    assert len(xnli.read_xnli_tsv(f"{path}@0:2")) == 2
    with pytest.raises(DataError, match=r"bad\.tsv:3:"):
        xnli.read_xnli_tsv(path, rows=slice(1, 3))


def test_header_and_missing_classes_are_explained(tmp_path):
    path = _write(tmp_path / "h.tsv", ["premise\thypothesis\tlabel", *GOOD])
    with pytest.raises(DataError, match=r"h\.tsv:1: .*header"):
        xnli.read_xnli_tsv(path)
    examples = xnli.read_xnli_tsv(path, rows=slice(1, None))
    with pytest.raises(
        DataError, match=r"train en: .*only the labels contradiction, entailment; expected all"
    ):
        xnli.check_three_classes(examples, "data.train en")


def test_tfds_sources_fail_fast_when_not_prepared(tmp_path):
    with pytest.raises(DataError, match="not prepared"):
        xnli.read_nli("tfds:multi_nli:train:en", data_dir=tmp_path)
    with pytest.raises(DataError, match="MultiNLI is English"):
        xnli.read_nli("tfds:multi_nli:train:fr", data_dir=tmp_path)


@needs_xnli
def test_real_xnli_files_follow_the_protocol():
    train_src, valid_src = xnli.xnli_dev_sources()
    train_sets = xnli.read_sets(train_src, "data.train", root=str(SHARED_DATA))
    valid = xnli.read_sets(valid_src, "data.valid", root=str(SHARED_DATA))
    assert list(train_sets) == ["en"] and len(train_sets["en"]) == 1990
    xnli.check_three_classes(train_sets["en"], "en")
    assert list(valid) == list(xnli.PAPER_LANGS)
    assert all(len(v) == 500 for v in valid.values())
    # row-parallel files: the same labels row by row in every language
    labels = {lang: [ex.label for ex in v] for lang, v in valid.items()}
    assert all(labels[lang] == labels["en"] for lang in labels)


def test_retrieval_accuracy_counts_the_diagonal():
    x = np.eye(4) + 0.1
    assert xnli.retrieval_accuracy(x, x) == (100.0, 100.0)
    assert xnli.retrieval_accuracy(x, x[::-1]) == (0.0, 0.0)
    y = x.copy()
    y[[0, 1]] = y[[1, 0]]  # two translations swapped: half right in both directions
    assert xnli.retrieval_accuracy(x, y) == (50.0, 50.0)


def test_results_table_has_the_papers_column_order(tmp_path):
    record = {"epoch": 2, "step": 10, "valid/de/acc": 40.0, "valid/en/acc": 50.0}
    record |= {"valid/fr/acc": 45.0, "valid/avg/acc": 45.0}
    results = {"history": [record], "selected": {"en": record, "avg": record}}
    columns, rows = xnli.result_rows(results)
    assert columns == ["row", "epoch", "en", "fr", "de", "avg"]
    assert rows[0]["en"] == 50.0 and rows[0]["epoch"] == 2


# --- end to end: a tiny pretraining, then fine-tuning and the probe ------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    """A tiny MLM + TLM run on Multi30k en/fr/de: its workdir, as --config.init_checkpoint."""
    if not (SHARED_DATA / "multi30k" / "train.en").exists() or not (XNLI_DIR / "en.tsv").exists():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    workdir = tmp_path_factory.mktemp("pretrained")
    config = tiny_config(max_steps=4, eval_every=2, checkpoint_every=2, log_every=2)
    config.data.root = str(SHARED_DATA / "multi30k")
    config.model.max_positions = 128
    train.train_and_evaluate(config, workdir)
    return workdir


def _finetune_config(init, **overrides):
    c = xnli.default_config()
    c.init_checkpoint = str(init)
    c.data.root = str(SHARED_DATA)
    c.data.train = "en: xnli/en.tsv@0:1990"
    c.data.valid = "en: xnli/en.tsv@1990:2240; fr: xnli/fr.tsv@1990:2240; de: xnli/de.tsv@1990:2240"
    c.max_len = 48
    c.seq_len = 96
    c.batch_size = 32
    c.eval_batch_size = 64
    c.epoch_size = -1
    c.n_epochs = 5
    c.eval_at_start = True
    c.optimizer_e.lr = 3e-3  # a 1-layer, 32-wide encoder after 4 pretraining steps learns slowly
    c.optimizer_p.lr = 3e-3
    c.encoder_dropout = 0.0
    c.encoder_attention_dropout = 0.0
    c.log_every = 1000
    for key, value in overrides.items():
        node = c
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return c


@needs_xnli
def test_finetune_beats_the_untrained_head_and_reports_every_language(pretrained, tmp_path):
    # translate-test plumbing: English text standing in for French translated to English
    config = _finetune_config(pretrained, **{"data.translate_test": "fr: xnli/en.tsv@1990:2240"})
    results = xnli.finetune(config, tmp_path / "ft")
    history = results["history"]
    assert [h["epoch"] for h in history] == [0, 1, 2, 3, 4, 5]
    for h in history:
        assert {"valid/en/acc", "valid/fr/acc", "valid/de/acc"} <= set(h)
        avg = np.mean([h[f"valid/{lang}/acc"] for lang in ("en", "fr", "de")])
        assert h["valid/avg/acc"] == pytest.approx(avg)
        # the English id on English text: exactly the English validation accuracy
        assert h["translate_test/fr/acc"] == h["valid/en/acc"]
    untrained, chosen = history[0], results["selected"]["en"]
    assert chosen["epoch"] >= 1
    # (measured: 33.6 untrained, 42.0 at the selected epoch; the classes are balanced)
    assert chosen["valid/en/acc"] > untrained["valid/en/acc"] + 4.0, history
    assert history[-1]["train/loss"] < history[1]["train/loss"]
    assert results["compiled_programs"] == 2  # one train step, one predict: every shape fixed
    assert "tiny" not in results["init"] and "step" in results["init"]

    ft = tmp_path / "ft"
    for name in ("results.csv", "results.md", "results.png", "results.json"):
        assert (ft / name).stat().st_size > 0, name
    header = (ft / "results.csv").read_text().splitlines()[0]
    assert header == "row,epoch,en,fr,de,avg"


@needs_xnli
def test_finetune_resumes_after_an_epoch(pretrained, tmp_path):
    # translate-train: English and French pairs, each with its own language id
    train_src = "en: xnli/en.tsv@0:100; fr: xnli/fr.tsv@100:200"
    kw = {"n_epochs": 2, "data.train": train_src, "eval_at_start": False}
    full = xnli.finetune(_finetune_config(pretrained, **kw), tmp_path / "full")
    xnli.finetune(_finetune_config(pretrained, **{**kw, "n_epochs": 1}), tmp_path / "split")
    resumed = xnli.finetune(_finetune_config(pretrained, **kw), tmp_path / "split")
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert resumed["mode"] == "translate-train (en,fr)" and resumed["n_train"] == 200
    for a, b in zip(full["history"], resumed["history"], strict=True):
        for key in ("valid/en/acc", "valid/fr/acc", "train/loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), key
    # a finished run resumed again does nothing more
    again = xnli.finetune(_finetune_config(pretrained, **kw), tmp_path / "split")
    assert [h["epoch"] for h in again["history"]] == [1, 2]


@needs_xnli
def test_sweep_runs_the_grid_once(pretrained, tmp_path):
    config = _finetune_config(pretrained, **{"n_epochs": 1, "data.train": "en: xnli/en.tsv@0:96"})
    config.sweep.lrs = "1e-3"
    config.sweep.batch_sizes = "8,16"
    summary = xnli.run_sweep(config, tmp_path)
    assert [s["run"] for s in summary] == ["lr0.001_bs8", "lr0.001_bs16"]
    lines = (tmp_path / "sweep.csv").read_text().splitlines()
    assert lines[0].startswith("run,lr,batch_size,epoch,en,fr,de,avg") and len(lines) == 3
    stamp = (tmp_path / "lr0.001_bs8" / "results.json").stat().st_mtime_ns
    xnli.run_sweep(config, tmp_path)  # complete runs are skipped
    assert (tmp_path / "lr0.001_bs8" / "results.json").stat().st_mtime_ns == stamp


def test_retrieval_of_identical_sides_is_perfect(pretrained, tmp_path):
    sentences = [
        "A dog runs in the park.",
        "Two men are playing football.",
        "A woman reads a book on a bench.",
        "Children swim in a lake.",
        "A red car drives down the street.",
        "The cat sleeps on the sofa.",
        "A man is cooking dinner.",
        "People walk along the beach at sunset.",
        "A girl rides a bicycle.",
        "An old man feeds the birds.",
    ]
    f = _write(tmp_path / "side.txt", sentences)
    config = xnli.retrieval_default_config()
    config.init_checkpoint = str(pretrained)
    config.data.pairs = f"fr-en: {f}|{f}; de-en: {f}@2:|{f}@2:"
    config.batch_size = 4
    results = xnli.retrieval(config, tmp_path / "probe")
    assert set(results["pairs"]) == {"fr-en", "de-en"} and results["pairs"]["de-en"]["n"] == 8
    # the same sentences in the same language on both sides: each must find its twin
    config.data.pairs = f"en-en: {f}|{f}"
    same = xnli.retrieval(config, tmp_path / "probe_same")
    assert same["pairs"]["en-en"] == {"n": 10, "xx->en": 100.0, "en->xx": 100.0, "mean": 100.0}
    text = (tmp_path / "probe_same" / "retrieval.md").read_text()
    assert "| en-en | 10 | 100.0 | 100.0 | 100.0 |" in text
    saved = json.loads((tmp_path / "probe_same" / "retrieval.json").read_text())
    assert saved["average"]["mean"] == 100.0


def test_retrieval_skips_pairs_without_held_out_lines(pretrained, tmp_path):
    f = _write(tmp_path / "short.txt", ["one line", "two lines", "three"])
    config = xnli.retrieval_default_config()
    config.init_checkpoint = str(pretrained)
    config.data.pairs = f"fr-en: {f}@3:|{f}@3:; de-en: {f}|{f}"
    results = xnli.retrieval(config, tmp_path / "probe")
    assert list(results["pairs"]) == ["de-en"] and "fr-en" in results["skipped"]


# --- configs -------------------------------------------------------------------------------------


def _load_config(name: str, *args):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "configs" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args), path.read_text()


@pytest.mark.parametrize(
    "name, mode", [("xnli", "xnli"), ("xnli_sweep", "xnli_sweep"), ("retrieval", "retrieval")]
)
def test_configs_build_show_their_command_and_read_their_data(name, mode):
    config, text = _load_config(name)
    assert f"--mode={mode} --config=configs/{name}.py" in text
    assert "--config.init_checkpoint=" in text
    if not (XNLI_DIR / "en.tsv").exists():
        return
    root = str(SHARED_DATA)
    if name == "retrieval":
        pairs = config.data.pairs.split("; ")
        assert len(pairs) == 14 and all("@80%:" in p for p in pairs)
        for entry in pairs:
            src, tgt = entry.split(": ", 1)[1].split("|")
            a, b = xnli.sources.read_parallel(src, tgt, root)
            assert len(a) == len(b) > 0
    else:
        valid = xnli.read_sets(config.data.valid, "data.valid", root=root)
        assert list(valid) == list(xnli.PAPER_LANGS)
        assert config.select_lang == "en" and config.data.train == "en: xnli/en.tsv@0:1990"
    subset, _ = _load_config(name, "en,de,fr")
    keys = subset.data.pairs if name == "retrieval" else subset.data.valid
    assert "fr" in keys and "es" not in keys


MESH_WORKER = """
import json, sys
from tests.test_xnli import _finetune_config
from xlm_jax import xnli
init, out_dir, shapes = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
out = {}
for shape in shapes:
    c = _finetune_config(init, **{"data.train": "en: xnli/en.tsv@0:200", "n_epochs": 2,
                                  "batch_size": 8, "eval_batch_size": 64})
    c.mesh.shape = tuple(shape)
    out[str(shape)] = xnli.finetune(c, f"{out_dir}/{shape[0]}{shape[1]}{shape[2]}")["history"]
print("HISTORIES" + json.dumps(out))
"""


@pytest.mark.slow
@needs_xnli
def test_sharded_finetuning_matches_one_device(pretrained, tmp_path):
    """Data, FSDP and tensor parallel fine-tuning on 4 emulated devices give the one-device run
    (a pretraining checkpoint written on one device restores onto every mesh)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    ref = xnli.finetune(
        _finetune_config(
            pretrained,
            **{"data.train": "en: xnli/en.tsv@0:200", "n_epochs": 2, "batch_size": 8},
            eval_batch_size=64,
        ),
        tmp_path / "one",
    )["history"]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    env["XLA_FLAGS"] = (
        "--xla_force_host_platform_device_count=4 "
        "--xla_cpu_collective_call_terminate_timeout_seconds=900 "
        "--xla_cpu_collective_timeout_seconds=900"
    )
    shapes = [[4, 1, 1], [1, 4, 1], [2, 1, 2]]
    proc = subprocess.run(
        [sys.executable, "-c", MESH_WORKER, str(pretrained), str(tmp_path), json.dumps(shapes)],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    histories = json.loads(proc.stdout.split("HISTORIES", 1)[1])
    for shape, history in histories.items():
        for a, b in zip(ref, history, strict=True):
            assert b["epoch"] == a["epoch"]
            if a["epoch"]:  # epoch 0 is the untrained head: no training loss
                assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-4), shape
            for lang in ("en", "fr", "de"):
                key = f"valid/{lang}/acc"
                assert abs(b[key] - a[key]) <= 0.4, (shape, key)  # at most one of 250 rows


@needs_xnli
def test_random_encoder_baseline_trains_its_own_tokenizer(tmp_path):
    c = _finetune_config("", **{"data.train": "en: xnli/en.tsv@0:200", "n_epochs": 1})
    c.data.valid = "en: xnli/en.tsv@1990:2090; sw: xnli/sw.tsv@1990:2090"
    c.tokenizer.vocab_size = 400
    c.tokenizer.n_sentences = 2000
    c.model.emb_dim = 16
    c.model.n_layers = 1
    c.model.n_heads = 2
    c.model.max_positions = 128
    results = xnli.finetune(c, tmp_path)
    assert results["init"] == "random init"
    assert (tmp_path / "tokenizer.model").exists()
    assert {"valid/en/acc", "valid/sw/acc"} <= set(results["history"][-1])
    # a language the encoder does not know is refused before anything trains
    c.langs = "en,fr"
    with pytest.raises(DataError, match="'sw' is not one of the model's languages"):
        xnli.finetune(c, tmp_path / "other")
