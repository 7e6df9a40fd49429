"""Every setting of a pretraining run, with its default and why: the reference for configs/*.

Experiment files in ``configs/`` start from ``default_config()`` and override what differs. On the
command line any field can be overridden, e.g. ``--config.model.n_layers=2``.
"""

from __future__ import annotations

import ml_collections

from xlm_jax.core import parallel
from xlm_jax.data import prepare


def default_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Languages, in the order that defines their ids (the language-embedding rows).
    c.langs = "en,fr"
    # Comma-separated codes to accept beyond the known list (ISO 639-1 and XLM-100's, in
    # xlm_jax/text/languages.py), for a language that list does not have; others are typos.
    c.new_langs = ""

    # --- data: sources per split, by language or pair (format: xlm_jax/data/corpus.py) ---
    c.data = ml_collections.ConfigDict()
    c.data.root = ""  # relative sources resolve here; "" = generate the toy corpus in the workdir
    c.data.train = "en: train.en; fr: train.fr; en-fr: train.en|train.fr"
    c.data.valid = "en: val.en; fr: val.fr; en-fr: val.en|val.fr"
    c.data.tfds_data_dir = ""  # for tfds: sources; "" = TFDS's default
    c.data.tfds_manual_dir = ""  # files from which the project's own builders are prepared
    c.data.max_chars = 10_000  # a longer line is an error (a broken file, not a sentence)
    c.data.on_invalid_utf8 = "error"  # or "replace" (U+FFFD); never a silent drop
    prepare.add_settings(c)

    # --- shared BPE vocabulary (SentencePiece) ---
    c.tokenizer = ml_collections.ConfigDict()
    c.tokenizer.vocab_size = 32_000
    c.tokenizer.alpha = 0.5  # p_l ∝ (n_l/N)^alpha when sampling its training text
    c.tokenizer.n_sentences = 500_000  # sentences sampled to train it
    c.tokenizer.character_coverage = 0.9995

    # --- model (XLM's TransformerModel) ---
    c.model = ml_collections.ConfigDict()
    c.model.emb_dim = 512
    c.model.n_layers = 6
    c.model.n_heads = 8
    c.model.ffn_dim = None  # None = 4 * emb_dim
    c.model.dropout = 0.1
    c.model.attention_dropout = 0.1
    c.model.max_positions = 512
    c.model.sinusoidal_embeddings = False
    c.model.use_lang_emb = True  # the 17/100-language XLM models have none
    c.model.dtype = "float32"  # compute; "bfloat16" on accelerators
    c.model.param_dtype = "float32"
    # How it runs (a checkpoint resumes under other values): "explicit" attention (dropout on the
    # weights, as XLM), or "xla" / "cudnn" = jax.nn.dot_product_attention (needs
    # attention_dropout=0; "cudnn" is the fused kernel on NVIDIA GPUs).
    c.model.attention_impl = "explicit"
    c.model.remat = "none"  # encoder blocks recomputed in the backward pass: "full" or "dots"

    # --- objectives and their alternation (XLM's clm_steps / mlm_steps) ---
    c.clm_steps = ""  # e.g. "en,fr": CLM on each
    c.mlm_steps = "en,fr,en-fr"  # a language = MLM on its stream, a pair = TLM
    c.lambda_clm = "1"  # loss weight, constant or a schedule "0:1,10000:0.1" (in loop steps)
    c.lambda_mlm = "1"
    c.lg_sampling_factor = 0.7  # >0: sample languages p ∝ (n_l/N)^factor; <=0: shuffle the lists
    c.word_pred = 0.15  # fraction of tokens predicted
    c.word_mask_keep_rand = "0.8,0.1,0.1"  # of those: masked, kept, random
    c.sample_alpha = 0.0  # >0: rare tokens chosen more often as targets (count^-alpha)

    # --- batches (global, over all devices and hosts) ---
    c.batch_size = 32  # stream windows per MLM/CLM step
    c.bptt = 256  # tokens per stream window
    tlm_settings(c)
    c.eval_batch_size = 32
    c.accum_steps = 1  # split each step's batch into this many micro-batches (same update)

    c.optimizer = optimizer_config()

    # --- loop ---
    c.max_steps = 100_000  # loop steps (each one objective's update)
    c.log_every = 100
    # Peak FLOP/s of one device for train/mfu; 0 = a known accelerator's bfloat16 peak
    # (xlm_jax/core/mfu.py), or no MFU (a CPU: `python -m xlm_jax.bench` measures its peak)
    c.peak_flops_per_device = 0.0
    c.eval_every = 2_000  # 0 = never
    # Evaluators at each evaluation, "NAME[@K]" (K: only every K-th): valid = the loss,
    # accuracy and perplexity of data.valid per objective; retrieval = the Tatoeba probe
    # (--mode=retrieval) on probe_pairs, with the encoder being trained (core/evaluators.py)
    c.evals = "valid"
    c.probe_pairs = ""  # "xx-en: SRC|EN; ..." under data.root, as --mode=retrieval's data.pairs
    c.checkpoint_every = 2_000
    c.keep_checkpoints = 3  # the last N, plus the best by best_metric
    c.best_metric = "valid/mlm_ppl"  # "" = no best tracking
    c.best_mode = "min"
    c.patience = -1  # stop after this many evaluations without improvement; -1 = never
    c.max_nonfinite_steps = 20  # stop after this many consecutive skipped (NaN/inf) updates
    c.debug_nonfinite_steps = ""  # test hook: "5,6" makes those steps' loss NaN
    # A workdir whose checkpoints all fail to read: True = set them aside and start over;
    # False = refuse to run (never a silent restart)
    c.restart_from_scratch = False
    # A resume whose data files changed (size or hash): True = go on, warn and record it in the
    # checkpoint; False = refuse (the saved data positions index into the old data)
    c.allow_data_change = False

    # --- devices ---
    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 = the remaining devices
    # Logical axis name -> mesh axes (flax applies them in order; see xlm_jax/core/parallel.py).
    c.mesh.rules = parallel.DEFAULT_RULES
    return c


def tlm_settings(c: ml_collections.ConfigDict) -> None:
    """TLM's rows of sentence pairs ``</s> src </s></s> tgt </s>`` (docs/data.md)."""
    c.tlm_batch_size = 64  # rows per TLM step: one sentence pair each, or several (tlm_pack)
    c.tlm_length = 128  # tokens per TLM row; longer pairs are dropped (and counted)
    c.tlm_pack = False  # True: pairs packed into rows (best fit), attention within a pair only
    c.tlm_buckets = ""  # "32,64": a batch padded to the first holding its rows; "" = tlm_length
    c.tlm_tokens_per_batch = -1  # XLM's tokens_per_batch: bucket L gets this // L rows; -1 = off


def optimizer_config() -> ml_collections.ConfigDict:
    """Adam with XLM's inverse-sqrt schedule (``adam_inverse_sqrt,lr=0.0001,warmup_updates=4000,
    beta1=0.9,beta2=0.98``); shared by pretraining and translation."""
    o = ml_collections.ConfigDict()
    o.lr = 1e-4
    o.warmup_steps = 4000
    o.warmup_init_lr = 1e-7
    o.beta1 = 0.9
    o.beta2 = 0.98
    o.eps = 1e-6
    o.weight_decay = 0.0  # decoupled (AdamW); biases and LayerNorms excluded
    o.clip_grad_norm = 5.0  # 0 = off
    return o
