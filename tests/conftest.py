"""Shared fixtures: tiny configs and the path of the real data (never copied into the repo)."""

import os
import sys
from pathlib import Path

# The suite runs on the CPU (meshes are emulated). libtpu, in the test extras for ahead-of-time
# compilation (test_aot.py), must not make JAX look for a TPU: set before jax is imported.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The tests check numbers, not speed, and their tiny programs spend most of their time being
# compiled: without XLA's expensive optimisations they compile ~30% faster (CPU time of
# test_decoding, test_train and test_seq2seq). Processes the tests start inherit it.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")


def xla_flags(*flags: str) -> str:
    """``XLA_FLAGS`` for a process a test starts: this process's flags (below), then ``flags``."""
    return " ".join([os.environ.get("XLA_FLAGS", ""), *flags]).strip()


# XLA:CPU's default fusion emitters compile a tiny training step in twice the time of the
# elemental emitters (2.0 vs 1.1 s; test_train.py 79 -> 68 s): CI's 20 minutes are mostly
# compiling. Both emitters compute the same functions; the tests compare runs made alike.
os.environ["XLA_FLAGS"] = xla_flags("--xla_cpu_use_fusion_emitters=false")

import jax  # noqa: E402
import pytest  # noqa: E402

from xlm_jax.tasks import nmt, pretrain  # noqa: E402
from xlm_jax.tasks.pretrain_config import default_config  # noqa: E402

# The files with the longest end-to-end runs (pytest --durations), run first: `make test` gives
# each file whole to one of two workers (--dist loadfile), and a long file started last leaves
# the other core idle for minutes. The Makefile's --no-loadscope-reorder keeps this order (xdist
# would otherwise start the files with the most tests first).
SLOWEST_FIRST = (
    "test_docs_run.py",
    "test_parallel.py",
    "test_nmt.py",
    "test_notebooks.py",
    "test_faults.py",
    "test_xnli.py",
    "test_convert.py",
    "test_reliability.py",
    "test_train.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: in-file order kept


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """Tests compile the same tiny programs many times: reuse them within the session, in this
    process, in the other test worker (xdist: the run's temporary root, above each worker's) and
    in the processes tests start (a signal test's rerun, a CLI run), which inherit the cache
    through the environment (``CPU_ENV`` and ``os.environ``). Two processes writing one entry at
    once is harmless: JAX recompiles when an entry does not read back."""
    base = tmp_path_factory.getbasetemp()
    cache_dir = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jax_cache"
    cache_dir.mkdir(exist_ok=True)
    cache = str(cache_dir)
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    shared = {
        "JAX_COMPILATION_CACHE_DIR": cache,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
    }
    CPU_ENV.update(shared)
    os.environ.update(shared)


SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
XNLI_DIR = SHARED_DATA / "xnli"
needs_xnli = pytest.mark.skipif(
    not (XNLI_DIR / "en.tsv").exists(), reason=f"XNLI data not found at {XNLI_DIR}"
)


@pytest.fixture
def shared_data() -> Path:
    if not (SHARED_DATA / "multi30k" / "train.en").exists():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    return SHARED_DATA


def write_lines(path, lines):
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory):
    """A tiny MLM + TLM run on Multi30k en/fr/de: its workdir, as --config.init_checkpoint."""
    if not (SHARED_DATA / "multi30k" / "train.en").exists() or not (XNLI_DIR / "en.tsv").exists():
        pytest.skip(f"real data not found at {SHARED_DATA}")
    workdir = tmp_path_factory.mktemp("pretrained")
    config = tiny_config(max_steps=4, eval_every=2, checkpoint_every=2, log_every=2)
    config.data.root = str(SHARED_DATA / "multi30k")
    config.model.max_positions = 128
    pretrain.train_and_evaluate(config, workdir)
    return workdir


# The tests' runs write no TensorBoard files: with PyTorch installed (the test extras),
# tensorboardX imports it, ~1.4 s of CPU in every process that starts a run. test_train's
# real-text run writes them.
TENSORBOARD = False


def demo_command(workdir, *flags: str) -> list[str]:
    """``python -m xlm_jax.main`` on configs/demo.py with a model small enough for tests."""
    return [
        sys.executable,
        "-m",
        "xlm_jax.main",
        "--config=configs/demo.py",
        f"--workdir={workdir}",
        "--config.model.n_layers=1",
        "--config.model.emb_dim=32",
        "--config.tokenizer.vocab_size=300",
        "--config.tensorboard=false",
        *flags,
    ]


CPU_ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def tiny_config(**overrides):
    """A model and loop small enough to compile and run in seconds on one CPU core."""
    c = default_config()
    c.langs = "en,fr,de"
    c.data.train = "en: train.en; fr: train.fr; de: train.de; en-fr: train.en|train.fr"
    c.data.valid = "en: val.en; fr: val.fr; en-fr: val.en|val.fr"
    c.tokenizer.vocab_size = 300
    c.tokenizer.n_sentences = 5000
    c.tokenizer.character_coverage = 1.0
    c.model.emb_dim = 32
    c.model.n_layers = 1
    c.model.n_heads = 2
    c.model.max_positions = 64
    c.mlm_steps = "en,fr,de,en-fr"
    c.batch_size = 4
    c.bptt = 32
    c.tlm_batch_size = 4
    c.tlm_length = 48
    c.eval_batch_size = 8
    c.optimizer.lr = 1e-3
    c.optimizer.warmup_steps = 10
    c.max_steps = 12
    c.log_every = 1
    c.eval_every = 6
    c.checkpoint_every = 6
    c.tensorboard = TENSORBOARD
    return override(c, **overrides)


def override(config, **overrides):
    """Sets dotted keys (``model.n_layers=2``) as the command line's --config.KEY=VALUE does."""
    for key, value in overrides.items():
        node = config
        *path, last = key.split(".")
        for p in path:
            node = node[p]
        node[last] = value
    return config


def tiny_nmt(**overrides):
    """A translation run with every objective (AE, MT, BT) small enough for seconds per step."""
    c = nmt.default_config()
    c.langs = "en,fr"
    c.data.root = str(SHARED_DATA / "multi30k")
    c.data.train = (
        "en: train.en@0:600; fr: train.fr@600:1200; en-fr: train.en@1200:1800|train.fr@1200:1800"
    )
    c.data.valid = "en-fr: val.en@0:24|val.fr@0:24"
    c.data.test = ""
    c.tokenizer.vocab_size = 300
    c.tokenizer.n_sentences = 5000
    c.tokenizer.character_coverage = 1.0
    c.model.emb_dim = 32
    c.model.n_layers = 1
    c.model.n_heads = 2
    c.model.max_positions = 256
    c.ae_steps, c.mt_steps, c.bt_steps = "en,fr", "en-fr", "en-fr-en,fr-en-fr"
    c.batch_size = 8
    c.eval_batch_size = 16
    c.length_buckets = "48,96,160"
    c.optimizer.warmup_steps = 10
    c.max_steps = 8
    c.log_every = 2
    c.eval_every = 0
    c.checkpoint_every = 4
    c.best_metric = ""
    c.tensorboard = TENSORBOARD
    return override(c, **overrides)
