"""Every setting of a pretraining run, with its default and why: the reference for configs/*.

Experiment files in ``configs/`` start from ``default_config()`` and override what differs. On the
command line any field can be overridden, e.g. ``--config.model.n_layers=2``.
"""

from __future__ import annotations

import ml_collections

from xlm_jax.core import loop, parallel
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
    # Evaluated beside data.valid at every evaluation (test/* metrics), as XLM does; "" = none
    c.data.test = ""
    c.data.tfds_data_dir = ""  # for tfds: sources; "" = TFDS's default
    c.data.tfds_manual_dir = ""  # files from which the project's own builders are prepared
    c.data.max_chars = 10_000  # a longer line is an error (a broken file, not a sentence)
    c.data.on_invalid_utf8 = "error"  # or "replace" (U+FFFD); never a silent drop
    prepare.add_settings(c)
    c.data.prepare_splits = "train,valid,test"  # the splits prepared (an empty one is skipped)

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
    c.model.dropout_rng = "hash"  # masks; "threefry16" = older checkpoints' (to resume them)
    c.model.max_positions = 512
    c.model.sinusoidal_embeddings = False
    c.model.use_lang_emb = True  # the 17/100-language XLM models have none
    c.model.gelu_activation = True  # XLM's --gelu_activation; False = ReLU in the FFN
    # XLM's --share_inout_emb; False = an output layer with its own (vocab, emb_dim) weight
    c.model.share_inout_emb = True
    c.model.dtype = "float32"  # compute; "bfloat16" on accelerators
    c.model.param_dtype = "float32"
    # How it runs (a checkpoint resumes under other values): "explicit" attention (dropout on the
    # weights, as XLM), or "xla" / "cudnn" = jax.nn.dot_product_attention (needs
    # attention_dropout=0; "cudnn" is the fused kernel on NVIDIA GPUs).
    c.model.attention_impl = "explicit"
    c.model.remat = "none"  # encoder blocks recomputed in the backward pass: "full" or "dots"

    # --- objectives and their alternation (XLM's clm_steps / mlm_steps) ---
    # e.g. "en,fr,en-fr": CLM on each language's stream; on a pair, CLM over TLM's rows
    # "</s> src </s></s> tgt </s>" (tlm_batch_size, tlm_length, tlm_buckets, tlm_pack)
    c.clm_steps = ""
    c.context_size = 0  # CLM: a row's first N positions predict nothing, context only (XLM's)
    c.mlm_steps = "en,fr,en-fr"  # a language = MLM on its stream, a pair = TLM
    # Loss weights: constant or a schedule "0:1,10000:0.1" (linear in between) counted in XLM's
    # iterations: one pass over clm_steps + mlm_steps (up to 5 + 5 entries each when sampled)
    c.lambda_clm = "1"
    c.lambda_mlm = "1"
    c.lambda_unit = "iterations"  # what schedules count: "iterations" (XLM's), or "steps"
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
    loop_settings(c)

    # --- devices ---
    c.mesh = ml_collections.ConfigDict()
    c.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); -1 = the remaining devices
    # Logical axis name -> mesh axes (flax applies them in order; see xlm_jax/core/parallel.py).
    c.mesh.rules = parallel.DEFAULT_RULES
    return c


def loop_settings(c: ml_collections.ConfigDict) -> None:
    """The loop's cadence, evaluations, checkpoints and best/patience (core/loop.py)."""
    c.max_steps = 100_000  # loop steps (each one objective's update)
    loop.epoch_settings(c)  # epoch_size, max_epoch: XLM's units
    c.log_every = 100  # loop steps
    loop.log_settings(c)  # tensorboard
    # Peak FLOP/s of one device for train/mfu; 0 = a known accelerator's bfloat16 peak
    # (xlm_jax/core/mfu.py), or no MFU (a CPU: `python -m xlm_jax.bench` measures its peak)
    c.peak_flops_per_device = 0.0
    c.eval_every = 2_000  # loop steps; 0 = never
    # Evaluators at each evaluation, "NAME[@K]" (K: only every K-th): valid = the loss,
    # accuracy and perplexity of data.valid (and data.test) per objective; retrieval = Tatoeba
    # (--mode=retrieval) on probe_pairs, with the encoder being trained (core/evaluators.py)
    c.evals = "valid"
    c.probe_pairs = ""  # "xx-en: SRC|EN; ..." under data.root, as --mode=retrieval's data.pairs
    c.probe_layer = -1  # the states the probe pools, as --mode=retrieval's layer (-1 = last)
    c.checkpoint_every = 2_000  # loop steps; 0 = after evaluations and at the end only
    c.keep_checkpoints = 3  # the last N, plus the best by best_metric
    # The best checkpoint by this metric; "" = none. A list "m1,m2:max" (each with an optional
    # :min/:max, else best_mode) keeps a best checkpoint per metric, as XLM's validation_metrics;
    # the first is the run's best (what an init_checkpoint loads) and patience's.
    c.best_metric = "valid/mlm_ppl"
    c.best_mode = "min"
    # Stop after this many evaluations without a better first best_metric; -1 = never (XLM's
    # --stopping_criterion METRIC,PATIENCE = that metric first in best_metric, and patience)
    c.patience = -1
    loop.nonfinite_settings(c)  # a NaN/inf update is skipped; too many in a row stop the run
    loop.resume_settings(c)  # restart_from_scratch, allow_data_change
    loop.eval_only_settings(c)  # XLM's --eval_only


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
