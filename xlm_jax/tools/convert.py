"""Import XLM / HuggingFace XLM checkpoints into xlm_jax workdirs, and export them back.

  python -m xlm_jax.convert --from=xlm-pth mlm_tlm_xnli15_1024.pth --codes=codes_xnli_15 \
      --to=/ckpt/xlm15                      # XLM's released .pth (+ its BPE codes)
  python -m xlm_jax.convert --from=hf /models/xlm-mlm-tlm-xnli15-1024 --to=/ckpt/xlm15
  python -m xlm_jax.convert --from=/ckpt/xlm15 --to=hf /models/xlm15_hf    # XLMWithLMHeadModel
  python -m xlm_jax.convert --from=/ckpt/xlm15 --to=params /ckpt/xlm15_params

An import writes a normal pretraining workdir: `checkpoints/0` holds a `TrainState` (parameters,
step 0 and a fresh Adam state, so pretraining can even continue from it) with the metadata every
mode reads (`config` built from `config.default_config()`, `fingerprint`, the tokenizer). So
`--config.init_checkpoint=WORKDIR` works for XNLI, retrieval and NMT, and the parameters restore
onto any mesh. An encoder-decoder `.pth` (XLM's MT/UNMT models) becomes a translation workdir
(`nmt.Translator` / `python -m xlm_jax.translate` load it). `--params_only` (or `--to=params`)
writes the parameters without optimizer state (a third of the size): every mode that initialises
from a checkpoint (`load_pretrained`, `Translator`) accepts it; only resuming the training that
wrote it needs the full state.

Weight mapping (XLM `TransformerModel` / HF `XLMModel` → `model/encoder.py`): torch `Linear`
weights `(out, in)` are transposed, q/k/v/out split into `(heads, head_dim)`; LayerNorm
`weight` → `scale`; the output layer's bias becomes `pred_bias`, and its weight
`pred_layer.proj.weight` is the embedding table when tied (XLM's `share_inout_emb`, HF's
`tie_word_embeddings`: not stored twice) or `pred_weight` when not; `gelu_activation=False`
(ReLU) carries over as the model setting of the same name; a sinusoidal position table is not a
parameter here (it is checked against ours instead); decoders add `encoder_attn` →
`cross_attention` and `layer_norm15`.

torch is needed only for `.pth` / `pytorch_model.bin` files; safetensors are read with numpy.
A `.pth` is a pickle: it is loaded with torch's `weights_only` unpickler unless `--allow_pickle`
(only for files you trust).
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import json
import logging
import pickle
import re
import struct
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from xlm_jax.core import train_state
from xlm_jax.core.checkpoint import Checkpointer
from xlm_jax.data import corpus as corpus_lib
from xlm_jax.model import pretrained
from xlm_jax.model.decoder import XLMDecoder
from xlm_jax.model.encoder import ModelConfig, XLMEncoder
from xlm_jax.model.layers import sinusoidal_table
from xlm_jax.tasks import pretrain
from xlm_jax.tasks import pretrain_config as config_lib
from xlm_jax.text.tokenizer import BOS_ID, EOS_ID, MASK_ID, PAD_ID, UNK_ID, Tokenizer
from xlm_jax.text.xlm_bpe import (
    Code,
    XLMBPETokenizer,
    looks_lowercased,
    read_codes,
    read_vocab,
    truncate,
    words_from_hf_vocab,
    words_from_id2word,
)

_log = logging.getLogger(__name__)

Tree = dict[str, Any]
StateDict = dict[str, np.ndarray]


# --- tensors on disk ------------------------------------------------------------------------------

_SAFETENSORS_DTYPES: dict[str, Any] = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def _safetensors_dtype(name: str) -> np.dtype:
    if name == "BF16":
        import ml_dtypes  # a dependency of jax

        return np.dtype(ml_dtypes.bfloat16)
    if name not in _SAFETENSORS_DTYPES:
        raise ValueError(f"safetensors dtype {name} is not supported")
    return np.dtype(_SAFETENSORS_DTYPES[name])


def read_safetensors(path: str | Path) -> StateDict:
    """A `.safetensors` file as numpy arrays (its documented layout: u64 header size, JSON
    header of dtype/shape/offsets, raw little-endian data); memory-mapped, no torch needed."""
    path = Path(path)
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        dtype = _safetensors_dtype(info["dtype"]).newbyteorder("<")
        out[name] = np.asarray(data[start:end]).view(dtype).reshape(info["shape"])
    return out


def write_safetensors(
    path: str | Path, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None
) -> None:
    """Writes `tensors` in the safetensors layout (sorted names, 8-byte aligned header)."""
    names = {np.dtype(v).name: k for k, v in _SAFETENSORS_DTYPES.items()} | {"bfloat16": "BF16"}
    header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
    blobs, offset = [], 0
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if arr.dtype.name not in names:
            raise ValueError(f"{name}: dtype {arr.dtype} has no safetensors name here")
        blob = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {
            "dtype": names[arr.dtype.name],
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + len(blob)],
        }
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)
    tmp = Path(str(path) + ".tmp")
    with tmp.open("wb") as f:
        f.write(struct.pack("<Q", len(head)))
        f.write(head)
        for blob in blobs:
            f.write(blob)
    tmp.replace(path)


def torch_load(path: str | Path, *, allow_pickle: bool = False) -> Any:
    """`torch.load` on the CPU; `weights_only` (no arbitrary code) unless `allow_pickle`."""
    try:
        import torch
    except ImportError:
        raise ImportError(
            f"{path}: reading a PyTorch file needs torch (pip install torch); "
            "safetensors files need no torch"
        ) from None
    try:
        return torch.load(path, map_location="cpu", weights_only=not allow_pickle)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path}: torch's weights_only loader refused it ({str(e).splitlines()[0]}). If you "
            "trust the file, convert again with --allow_pickle."
        ) from None


def to_numpy(state: Mapping[str, Any]) -> StateDict:
    """A state dict (torch tensors or arrays) as numpy arrays, floats as float32."""
    out = {}
    for name, value in state.items():
        if hasattr(value, "detach"):  # a torch tensor (bf16 has no numpy twin: via float32)
            value = value.detach().cpu()
            value = value.float().numpy() if value.is_floating_point() else value.numpy()
        arr = np.asarray(value)
        out[name] = arr.astype(np.float32) if np.issubdtype(arr.dtype, np.floating) else arr
    return out


def strip_prefixes(state: Mapping[str, np.ndarray], prefixes: Sequence[str]) -> StateDict:
    """Drops DataParallel's `module.` and HF's `transformer.` from the front of every name."""
    out = {}
    for name, value in state.items():
        changed = True
        while changed:
            changed = False
            for p in prefixes:
                if name.startswith(p):
                    name, changed = name[len(p) :], True
        out[name] = value
    return out


# --- parameter names: XLM / HF <-> xlm_jax -------------------------------------------------------


def count_layers(state: Mapping[str, Any]) -> int:
    ids = {int(m.group(1)) for k in state if (m := re.match(r"attentions\.(\d+)\.", k))}
    if ids != set(range(len(ids))):
        raise ValueError(f"layers {sorted(ids)} are not 0..n-1")
    return len(ids)


class _Reader:
    """Takes tensors out of a state dict by name, checking shapes and recording what was used."""

    def __init__(self, state: Mapping[str, np.ndarray], where: str) -> None:
        self.state, self.where, self.used = state, where, set()

    def __call__(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        if name not in self.state:
            raise ValueError(f"{self.where}: no tensor {name!r}")
        value = np.asarray(self.state[name], dtype=np.float32)
        if value.shape != shape:
            raise ValueError(f"{self.where}: {name} has shape {value.shape}, expected {shape}")
        self.used.add(name)
        return value

    def linear(self, name: str, n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray]:
        """(kernel (in, out), bias) of a torch Linear (weight (out, in))."""
        return self(f"{name}.weight", (n_out, n_in)).T, self(f"{name}.bias", (n_out,))

    def norm(self, name: str, dim: int) -> Tree:
        return {"scale": self(f"{name}.weight", (dim,)), "bias": self(f"{name}.bias", (dim,))}

    def attention(self, name: str, cfg: ModelConfig) -> Tree:
        e, h, d = cfg.emb_dim, cfg.n_heads, cfg.head_dim
        out = {}
        for ours, theirs in (("query", "q_lin"), ("key", "k_lin"), ("value", "v_lin")):
            kernel, bias = self.linear(f"{name}.{theirs}", e, e)
            # torch's output index is head * head_dim + j (XLM's view(bs, -1, heads, head_dim))
            out[ours] = {"kernel": kernel.reshape(e, h, d), "bias": bias.reshape(h, d)}
        kernel, bias = self.linear(f"{name}.out_lin", e, e)
        out["out"] = {"kernel": kernel.reshape(h, d, e), "bias": bias}
        return out


def params_from_xlm(state: Mapping[str, np.ndarray], cfg: ModelConfig, *, where: str) -> Tree:
    """An XLM `TransformerModel` state dict (no prefixes) → an `XLMEncoder` / `XLMDecoder` tree
    (a decoder when the state has `encoder_attn`). Unused tensors are reported."""
    read = _Reader(state, where)
    e, f = cfg.emb_dim, cfg.ffn_dim
    assert f is not None
    decoder = any(k.startswith("encoder_attn.") for k in state)
    embeddings = read("embeddings.weight", (cfg.vocab_size, e))
    tree: Tree = {"embeddings": {"embedding": embeddings}}
    positions = read("position_embeddings.weight", (cfg.max_positions, e))
    if cfg.sinusoidal_embeddings:
        # Not a parameter here: the stored table must be the one the model computes.
        diff = float(np.max(np.abs(positions - sinusoidal_table(cfg.max_positions, e))))
        if diff > 1e-5:
            raise ValueError(
                f"{where}: sinusoidal_embeddings is set but the stored position table differs "
                f"from the sinusoidal one by {diff:.3g}"
            )
    else:
        tree["position_embeddings"] = {"embedding": positions}
    if cfg.has_lang_embeddings:
        tree["lang_embeddings"] = {"embedding": read("lang_embeddings.weight", (cfg.n_langs, e))}
    tree["layer_norm_emb"] = read.norm("layer_norm_emb", e)
    for i in range(cfg.n_layers):
        layer: Tree = {
            "attention": read.attention(f"attentions.{i}", cfg),
            "layer_norm1": read.norm(f"layer_norm1.{i}", e),
        }
        if decoder:
            layer["cross_attention"] = read.attention(f"encoder_attn.{i}", cfg)
            layer["layer_norm15"] = read.norm(f"layer_norm15.{i}", e)
        k1, b1 = read.linear(f"ffns.{i}.lin1", e, f)
        k2, b2 = read.linear(f"ffns.{i}.lin2", f, e)
        layer["ffn"] = {"lin1": {"kernel": k1, "bias": b1}, "lin2": {"kernel": k2, "bias": b2}}
        layer["layer_norm2"] = read.norm(f"layer_norm2.{i}", e)
        tree[f"layer_{i}"] = layer
    tree.update(_output_layer(read, embeddings, cfg, where))
    rest = sorted(set(state) - read.used - {"position_ids"})
    if any(k.startswith("memories.") for k in rest):
        raise ValueError(f"{where}: product-key memory layers (use_memory) are not supported")
    if rest:
        _log.warning("%s: %d tensors not used: %s", where, len(rest), rest[:8])
    check_tree(tree, cfg, decoder=decoder, where=where)
    return tree


def _output_layer(read: _Reader, embeddings: np.ndarray, cfg: ModelConfig, where: str) -> Tree:
    """`pred_bias`, and `pred_weight` for an untied output layer (`share_inout_emb=False`)."""
    out: Tree = {}
    if "pred_layer.proj.bias" in read.state:
        out["pred_bias"] = read("pred_layer.proj.bias", (cfg.vocab_size,))
    else:
        _log.warning("%s: no output layer (pred_layer.proj.bias): pred_bias starts at 0", where)
        out["pred_bias"] = np.zeros((cfg.vocab_size,), np.float32)
    name, shape = "pred_layer.proj.weight", (cfg.vocab_size, cfg.emb_dim)
    if not cfg.share_inout_emb:
        out["pred_weight"] = read(name, shape)
    # A tied copy (XLM's state dicts, older HF files) must be the embedding table.
    elif name in read.state and not np.array_equal(read(name, shape), embeddings):
        raise ValueError(
            f"{where}: the output layer is not tied to the embeddings, but the config says it "
            "is (XLM's share_inout_emb, HF's tie_word_embeddings)"
        )
    return out


def xlm_from_params(params: Mapping[str, Any], cfg: ModelConfig) -> StateDict:
    """The inverse of `params_from_xlm` (XLM names, no prefix; a tied output weight left out)."""
    e, h, d = cfg.emb_dim, cfg.n_heads, cfg.head_dim
    p = jax.tree.map(lambda x: np.asarray(x, np.float32), dict(params))
    out: StateDict = {"embeddings.weight": p["embeddings"]["embedding"]}
    out["position_embeddings.weight"] = (
        sinusoidal_table(cfg.max_positions, e)
        if cfg.sinusoidal_embeddings
        else p["position_embeddings"]["embedding"]
    )
    if cfg.has_lang_embeddings:
        out["lang_embeddings.weight"] = p["lang_embeddings"]["embedding"]

    def norm(name: str, tree: Tree) -> None:
        out[f"{name}.weight"], out[f"{name}.bias"] = tree["scale"], tree["bias"]

    def attention(name: str, tree: Tree) -> None:
        for ours, theirs in (("query", "q_lin"), ("key", "k_lin"), ("value", "v_lin")):
            out[f"{name}.{theirs}.weight"] = tree[ours]["kernel"].reshape(e, h * d).T
            out[f"{name}.{theirs}.bias"] = tree[ours]["bias"].reshape(h * d)
        out[f"{name}.out_lin.weight"] = tree["out"]["kernel"].reshape(h * d, e).T
        out[f"{name}.out_lin.bias"] = tree["out"]["bias"]

    norm("layer_norm_emb", p["layer_norm_emb"])
    for i in range(cfg.n_layers):
        layer = p[f"layer_{i}"]
        attention(f"attentions.{i}", layer["attention"])
        norm(f"layer_norm1.{i}", layer["layer_norm1"])
        if "cross_attention" in layer:
            attention(f"encoder_attn.{i}", layer["cross_attention"])
            norm(f"layer_norm15.{i}", layer["layer_norm15"])
        for lin in ("lin1", "lin2"):
            out[f"ffns.{i}.{lin}.weight"] = layer["ffn"][lin]["kernel"].T
            out[f"ffns.{i}.{lin}.bias"] = layer["ffn"][lin]["bias"]
        norm(f"layer_norm2.{i}", layer["layer_norm2"])
    out["pred_layer.proj.bias"] = p["pred_bias"]
    if not cfg.share_inout_emb:
        out["pred_layer.proj.weight"] = p["pred_weight"]
    return {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in out.items()}


def abstract_params(cfg: ModelConfig, *, decoder: bool = False) -> Tree:
    """Shapes of the model's parameter tree, nothing allocated."""
    z = jnp.zeros((1, 4), jnp.int32)
    if decoder:
        memory = jnp.zeros((1, 4, cfg.emb_dim), jnp.float32)
        fn = lambda: XLMDecoder(cfg).init(jax.random.key(0), z, z, z, memory, z == 0)  # noqa: E731
    else:
        fn = lambda: XLMEncoder(cfg).init(jax.random.key(0), z, z, z)  # noqa: E731
    return nn.meta.unbox(jax.eval_shape(fn)["params"])


def check_tree(tree: Tree, cfg: ModelConfig, *, decoder: bool, where: str) -> None:
    """The converted tree has exactly the model's parameter names and shapes."""
    want = flax.traverse_util.flatten_dict(abstract_params(cfg, decoder=decoder), sep="/")
    got = flax.traverse_util.flatten_dict(tree, sep="/")
    problems = [f"missing {k}" for k in sorted(set(want) - set(got))]
    problems += [f"unexpected {k}" for k in sorted(set(got) - set(want))]
    problems += [
        f"{k}: {np.shape(got[k])} vs {want[k].shape}"
        for k in sorted(set(want) & set(got))
        if tuple(np.shape(got[k])) != tuple(want[k].shape)
    ]
    if problems:
        raise ValueError(f"{where}: converted parameters do not fit the model: {problems[:10]}")


# --- imported models -----------------------------------------------------------------------------


@dataclasses.dataclass
class Imported:
    """A model read from XLM or HF files, ready to become a workdir."""

    encoder: ModelConfig
    params: Tree  # host numpy tree of the encoder
    langs: list[str]  # by language id
    tokenizer: Tokenizer
    source: dict[str, Any]  # {"format": ..., "path": ...}
    causal: bool = False  # HF `causal` (a CLM model); kept for the export
    decoder: ModelConfig | None = None
    decoder_params: Tree | None = None


def _model_config(
    state: Mapping[str, np.ndarray],
    *,
    n_langs: int,
    emb_dim: int,
    n_heads: int,
    n_layers: int | None,
    dropout: float,
    attention_dropout: float,
    sinusoidal: bool,
    use_lang_emb: bool,
    layer_norm_eps: float,
    gelu: bool,
    share_inout_emb: bool,
    where: str,
) -> ModelConfig:
    for key in ("embeddings.weight", "position_embeddings.weight", "ffns.0.lin1.weight"):
        if key not in state:
            raise ValueError(f"{where}: no tensor {key!r}; is this an XLM model?")
    found = count_layers(state)
    if n_layers is not None and n_layers != found:
        raise ValueError(f"{where}: config says {n_layers} layers, the weights have {found}")
    vocab, dim = np.shape(state["embeddings.weight"])
    if dim != emb_dim:
        raise ValueError(f"{where}: emb_dim {emb_dim} but embeddings of width {dim}")
    return ModelConfig(
        vocab_size=int(vocab),
        n_langs=n_langs,
        emb_dim=emb_dim,
        n_layers=found,
        n_heads=n_heads,
        ffn_dim=int(np.shape(state["ffns.0.lin1.weight"])[0]),
        dropout=float(dropout),
        attention_dropout=float(attention_dropout),
        max_positions=int(np.shape(state["position_embeddings.weight"])[0]),
        sinusoidal_embeddings=bool(sinusoidal),
        use_lang_emb=bool(use_lang_emb),
        gelu_activation=bool(gelu),
        share_inout_emb=bool(share_inout_emb),
        pad_id=PAD_ID,
        layer_norm_eps=float(layer_norm_eps),
    )


def _langs(lang2id: Mapping[str, int] | None, n_langs: int, override: str, where: str) -> list[str]:
    """Languages by id (XLM sorts them alphabetically when it assigns the ids)."""
    if override:
        langs = [x.strip() for x in override.split(",") if x.strip()]
    elif lang2id:
        by_id = {int(i): lang for lang, i in lang2id.items()}
        if sorted(by_id) != list(range(len(by_id))):
            raise ValueError(f"{where}: lang2id ids are not 0..n-1: {dict(lang2id)}")
        langs = [by_id[i] for i in range(len(by_id))]
    elif n_langs == 1:
        langs = ["en"]
        _log.warning("%s: no lang2id for a 1-language model; calling it 'en' (see --langs)", where)
    else:
        raise ValueError(f"{where}: {n_langs} languages but no lang2id: name them with --langs")
    if len(langs) != n_langs:
        raise ValueError(f"{where}: n_langs={n_langs} but the languages are {langs}")
    return langs


def _flag(value: str | bool, auto: bool, name: str) -> bool:
    if isinstance(value, bool):
        return value
    choices = {"auto": auto, "true": True, "false": False}
    if value not in choices:
        raise ValueError(f"--{name} must be auto, true or false, got {value!r}")
    return choices[value]


def _make_tokenizer(
    words: list[str],
    codes: list[Code],
    langs: list[str],
    *,
    lowercase: str | bool,
    romanian: str | bool,
) -> XLMBPETokenizer:
    lower = _flag(lowercase, looks_lowercased(words), "lowercase")
    # Only XLM's en-ro models were trained on Sennrich's normalised, diacritic-free Romanian.
    ro = _flag(romanian, sorted(langs) == ["en", "ro"], "romanian")
    default = "en" if "en" in langs else langs[0]
    tok = XLMBPETokenizer(words, codes, lowercase=lower, romanian=ro, default_lang=default)
    _log.info("tokenizer: %s (romanian=%s, default language %s)", tok, ro, default)
    return tok


def import_xlm_pth(
    path: str | Path,
    *,
    codes: str | Path,
    vocab: str | Path | None = None,
    max_vocab: int = -1,
    lowercase: str | bool = "auto",
    romanian: str | bool = "auto",
    langs: str = "",
    allow_pickle: bool = False,
) -> Imported:
    """XLM's own checkpoint: `model` (an LM) or `encoder` + `decoder` (MT), `params` (the
    training flags), `dico_id2word` (the dictionary), with the BPE `codes` file released beside
    it. `vocab` (a fastBPE vocabulary file) replaces the checkpoint's dictionary; `max_vocab`
    truncates it (default: the checkpoint's `max_vocab`, else the embedding rows)."""
    where = str(path)
    ck = torch_load(path, allow_pickle=allow_pickle)
    if not isinstance(ck, Mapping) or "params" not in ck:
        raise ValueError(f"{where}: not an XLM checkpoint (no 'params')")
    hp = dict(vars(ck["params"]) if hasattr(ck["params"], "__dict__") else ck["params"])
    if "model" in ck:
        enc_state, dec_state = ck["model"], None
    elif "encoder" in ck:
        enc_state, dec_state = ck["encoder"], ck.get("decoder")
    else:
        raise ValueError(f"{where}: neither 'model' nor 'encoder' in it: {sorted(ck)}")
    enc_state = strip_prefixes(to_numpy(enc_state), ("module.",))
    if hp.get("asm"):
        raise ValueError(f"{where}: adaptive softmax (asm) models are not supported")
    lang_ids = hp.get("lang2id") or {v: k for k, v in (hp.get("id2lang") or {}).items()}
    n_langs = int(hp.get("n_langs", len(lang_ids) or 1))
    model_langs = _langs(lang_ids, n_langs, langs, where)
    common = dict(
        n_langs=n_langs,
        emb_dim=int(hp["emb_dim"]),
        n_heads=int(hp["n_heads"]),
        dropout=hp.get("dropout", 0.1),
        attention_dropout=hp.get("attention_dropout", 0.1),
        sinusoidal=hp.get("sinusoidal_embeddings", False),
        use_lang_emb=hp.get("use_lang_emb", True),  # older checkpoints predate the flag
        layer_norm_eps=1e-12,  # XLM's LayerNorms
        gelu=hp.get("gelu_activation", True),
        share_inout_emb=hp.get("share_inout_emb", True),
    )
    n_enc = hp.get("n_layers") if dec_state is None else hp.get("n_enc_layers", hp.get("n_layers"))
    enc_cfg = _model_config(enc_state, n_layers=n_enc, where=f"{where} encoder", **common)

    if vocab is not None:
        words = read_vocab(Path(vocab).read_text(encoding="utf-8"))
    elif "dico_id2word" in ck:
        words = words_from_id2word(ck["dico_id2word"])
    else:
        words = words_from_id2word({i: w for w, i in ck["dico_word2id"].items()})
    limit = max_vocab if max_vocab > 0 else int(hp.get("max_vocab", -1))
    if limit > 0 or len(words) > enc_cfg.vocab_size:
        words = truncate(words, limit if limit > 0 else enc_cfg.vocab_size)
    if len(words) != enc_cfg.vocab_size:
        raise ValueError(
            f"{where}: the dictionary has {len(words)} words, the embeddings "
            f"{enc_cfg.vocab_size} rows"
        )
    tokenizer = _make_tokenizer(
        words,
        read_codes(Path(codes).read_text(encoding="utf-8")),
        model_langs,
        lowercase=lowercase,
        romanian=romanian,
    )
    params = params_from_xlm(enc_state, enc_cfg, where=f"{where} encoder")
    out = Imported(enc_cfg, params, model_langs, tokenizer, {"format": "xlm-pth", "path": where})
    if dec_state is not None:
        dec_state = strip_prefixes(to_numpy(dec_state), ("module.",))
        dec_cfg = _model_config(
            dec_state,
            n_layers=hp.get("n_dec_layers", hp.get("n_layers")),
            where=f"{where} decoder",
            **common,
        )
        if dec_cfg.vocab_size != enc_cfg.vocab_size:
            raise ValueError(f"{where}: encoder and decoder vocabularies differ")
        out.decoder = dec_cfg
        out.decoder_params = params_from_xlm(dec_state, dec_cfg, where=f"{where} decoder")
    return out


def _read_hf_weights(folder: Path, allow_pickle: bool) -> StateDict:
    if (folder / "model.safetensors").exists():
        return read_safetensors(folder / "model.safetensors")
    index = folder / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return {k: v for s in shards for k, v in read_safetensors(folder / s).items()}
    if (folder / "pytorch_model.bin").exists():
        return to_numpy(torch_load(folder / "pytorch_model.bin", allow_pickle=allow_pickle))
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin")


def import_hf(
    folder: str | Path,
    *,
    lowercase: str | bool = "auto",
    romanian: str | bool = "auto",
    langs: str = "",
    allow_pickle: bool = False,
) -> Imported:
    """A HuggingFace XLM folder: `config.json`, `model.safetensors` or `pytorch_model.bin`,
    `vocab.json` + `merges.txt` (and `tokenizer_config.json`'s lowercasing, if present)."""
    folder = Path(folder)
    where = str(folder)
    config = json.loads((folder / "config.json").read_text())
    if config.get("model_type", "xlm") != "xlm":
        raise ValueError(f"{where}: model_type {config.get('model_type')!r}, expected 'xlm'")
    if config.get("asm"):
        raise ValueError(f"{where}: adaptive softmax (asm) models are not supported")
    if not config.get("is_encoder", True):
        raise ValueError(f"{where}: HF XLM decoders do not exist; is_encoder must be true")
    for key, want in (("pad_token_id", PAD_ID), ("bos_token_id", BOS_ID), ("unk_index", UNK_ID)):
        if config.get(key, want) != want:
            raise ValueError(f"{where}: {key}={config[key]}, XLM's dictionary has {want}")
    state = strip_prefixes(_read_hf_weights(folder, allow_pickle), ("module.", "transformer."))
    state = {k: np.asarray(v, np.float32) if v.dtype.kind == "f" else v for k, v in state.items()}
    n_langs = int(config.get("n_langs", 1))
    model_langs = _langs(config.get("lang2id"), n_langs, langs, where)
    cfg = _model_config(
        state,
        n_langs=n_langs,
        emb_dim=int(config.get("emb_dim", config.get("hidden_size", 0))),
        n_heads=int(config.get("n_heads", config.get("num_attention_heads", 0))),
        n_layers=config.get("n_layers", config.get("num_hidden_layers")),
        dropout=config.get("dropout", 0.1),
        attention_dropout=config.get("attention_dropout", 0.1),
        sinusoidal=config.get("sinusoidal_embeddings", False),
        use_lang_emb=config.get("use_lang_emb", True),
        layer_norm_eps=config.get("layer_norm_eps", 1e-12),
        gelu=config.get("gelu_activation", True),
        share_inout_emb=config.get("tie_word_embeddings", True),
        where=where,
    )
    if not (folder / "vocab.json").exists() or not (folder / "merges.txt").exists():
        raise FileNotFoundError(f"{where}: the tokenizer's vocab.json and merges.txt are needed")
    words = words_from_hf_vocab(json.loads((folder / "vocab.json").read_text(encoding="utf-8")))
    if len(words) > cfg.vocab_size:  # XLM's max_vocab: ids past the embeddings are <unk>
        words = truncate(words, cfg.vocab_size)
    if len(words) != cfg.vocab_size:
        raise ValueError(f"{where}: vocab.json has {len(words)} words, the model {cfg.vocab_size}")
    tok_config = folder / "tokenizer_config.json"
    if lowercase == "auto" and tok_config.exists():
        lowercase = json.loads(tok_config.read_text()).get("do_lowercase_and_remove_accent", "auto")
    tokenizer = _make_tokenizer(
        words,
        read_codes((folder / "merges.txt").read_text(encoding="utf-8")),
        model_langs,
        lowercase=lowercase,
        romanian=romanian,
    )
    params = params_from_xlm(state, cfg, where=where)
    return Imported(
        cfg,
        params,
        model_langs,
        tokenizer,
        {"format": "hf", "path": where},
        causal=bool(config.get("causal", False)),
    )


# --- workdirs ------------------------------------------------------------------------------------


def pretraining_config(model: ModelConfig, langs: Sequence[str]) -> ml_collections.ConfigDict:
    """`config.default_config()` describing an imported encoder (what `load_pretrained` reads)."""
    c = config_lib.default_config()
    c.langs = ",".join(langs)
    c.tokenizer.vocab_size = model.vocab_size
    for key in c.model:
        c.model[key] = getattr(model, key)
    if model.layer_norm_eps != ModelConfig.layer_norm_eps:  # not a default_config() key
        c.model.layer_norm_eps = model.layer_norm_eps
    c.mlm_steps = ",".join(langs)  # XLM's MLM on each language, should pretraining go on
    return c


def translation_config(model: ModelConfig, langs: Sequence[str]) -> ml_collections.ConfigDict:
    """`nmt.default_config()` for an imported encoder-decoder (UNMT objectives of its pair)."""
    from xlm_jax.tasks import nmt  # the translation loop's module: only for MT imports

    c = nmt.default_config()
    c.langs = ",".join(langs)
    for key in c.model:
        c.model[key] = getattr(model, key)
    c.tokenizer.vocab_size = model.vocab_size
    c.ae_steps = ",".join(langs)
    c.bt_steps = ""
    if len(langs) == 2:
        a, b = langs
        c.bt_steps = f"{a}-{b}-{a},{b}-{a}-{b}"
    return c


def _versions() -> dict[str, str]:
    return {"jax": jax.__version__, "flax": flax.__version__}


def _save(
    workdir: Path, step: int, params: Tree, meta: dict, *, params_only: bool, optimizer: Any
) -> Path:
    directory = workdir / "checkpoints"
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(f"{directory} already holds checkpoints; choose an empty workdir")
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    if params_only:
        state: Any = {"params": params}
    else:
        tx = train_state.make_optimizer(optimizer)
        state = train_state.TrainState(jnp.asarray(step, jnp.int32), params, tx.init(params))
    loop = {"step": step, "best": None, "bad_evals": 0, "nonfinite_run": 0}
    data_state = {"loop": loop, "iterators": {}}
    with Checkpointer(directory, async_save=False) as ck:
        ck.save(step, state, data_state=data_state, meta=meta, force=True)
    tokenizer = Tokenizer.from_bytes(base64.b64decode(meta["tokenizer"]))
    tokenizer.save(workdir / "tokenizer.model")
    return directory / str(step)


def write_workdir(model: Imported, workdir: str | Path, *, params_only: bool = False) -> Path:
    """Writes `model` as checkpoint 0 of `workdir` (see the module docstring); returns its path."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    tokenizer_b64 = base64.b64encode(model.tokenizer.serialized).decode("ascii")
    imported = {**model.source, "causal": model.causal, "params_only": params_only}
    if model.decoder is None:
        config = pretraining_config(model.encoder, model.langs)
        meta = {
            "config": config.to_dict(),
            "fingerprint": pretrain.config_fingerprint(config, model.tokenizer),
            "tokenizer": tokenizer_b64,
            "versions": _versions(),
            "imported": imported,
        }
        params = model.params
    else:
        config = translation_config(model.encoder, model.langs)
        meta = {
            "config": config.to_dict(),
            "encoder": model.encoder.to_dict(),
            "decoder": model.decoder.to_dict(),
            "model_langs": list(model.langs),
            "init": {"checkpoint": model.source["path"], "step": 0, "chosen": "imported"},
            "tokenizer": tokenizer_b64,
            "versions": _versions(),
            "imported": imported,
        }
        params = {"encoder": model.params, "decoder": model.decoder_params}
    return _save(workdir, 0, params, meta, params_only=params_only, optimizer=config.optimizer)


@dataclasses.dataclass
class Loaded:
    """An xlm_jax checkpoint's encoder, as the exports need it."""

    model: ModelConfig
    params: Tree
    langs: list[str]
    tokenizer: Tokenizer
    meta: dict
    state: Any
    step: int


def load_encoder(workdir: str | Path, step: int = -1) -> Loaded:
    """The encoder of a pretraining or translation workdir (or an export of either)."""
    _, step, _, meta, state = pretrained.load_checkpoint(workdir, step)
    tokenizer = Tokenizer.from_bytes(base64.b64decode(meta["tokenizer"]))
    params = state["params"]
    if "decoder" in meta:
        model = ModelConfig.from_saved(meta["encoder"])
        langs = list(meta["model_langs"])
        params = params["encoder"]
    elif "model" in meta.get("config", {}) and "embeddings" in params:
        # As `pretrained.load_pretrained` reads it (without restoring the arrays twice).
        langs = corpus_lib.lang_list(ml_collections.ConfigDict({"langs": meta["config"]["langs"]}))
        model = ModelConfig.from_saved(
            {**meta["config"]["model"], "vocab_size": tokenizer.vocab_size, "n_langs": len(langs)}
        )
    else:
        raise ValueError(f"{workdir}: neither a pretraining nor a translation checkpoint")
    return Loaded(model, params, langs, tokenizer, meta, state, step)


def export_hf(workdir: str | Path, out: str | Path, *, step: int = -1) -> Path:
    """Writes the workdir's encoder as a HuggingFace `XLMWithLMHeadModel` folder."""
    src = load_encoder(workdir, step)
    cfg = src.model
    if "decoder" in src.meta:
        _log.warning("HF XLM has no decoder: exporting the translation model's encoder only")
    if cfg.ffn_dim != 4 * cfg.emb_dim:
        raise ValueError(f"HF XLM fixes ffn_dim = 4 * emb_dim; this model has {cfg.ffn_dim}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = xlm_from_params(src.params, cfg)
    # HF nests the encoder under `transformer.`; the LM head `pred_layer` sits beside it.
    tensors = {
        k if k.startswith("pred_layer.") else f"transformer.{k}": v for k, v in state.items()
    }
    write_safetensors(out / "model.safetensors", tensors, {"format": "pt"})
    lang2id = {lang: i for i, lang in enumerate(src.langs)}
    causal = bool(src.meta.get("imported", {}).get("causal", False))
    hf_config = {
        "architectures": ["XLMWithLMHeadModel"],
        "model_type": "xlm",
        "vocab_size": cfg.vocab_size,
        "emb_dim": cfg.emb_dim,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "dropout": cfg.dropout,
        "attention_dropout": cfg.attention_dropout,
        "gelu_activation": cfg.gelu_activation,
        "sinusoidal_embeddings": cfg.sinusoidal_embeddings,
        "causal": causal,
        "asm": False,
        "n_langs": cfg.n_langs,
        "use_lang_emb": cfg.use_lang_emb,
        "max_position_embeddings": cfg.max_positions,
        "embed_init_std": cfg.emb_dim**-0.5,
        "layer_norm_eps": cfg.layer_norm_eps,
        "init_std": 0.02,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
        "unk_index": UNK_ID,
        "mask_index": MASK_ID,
        "mask_token_id": 0,
        "lang_id": 0,
        "is_encoder": True,
        "lang2id": lang2id,
        "id2lang": {str(i): lang for lang, i in lang2id.items()},
        "tie_word_embeddings": cfg.share_inout_emb,
        "torch_dtype": "float32",
    }
    (out / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    tok = src.tokenizer
    if isinstance(tok, XLMBPETokenizer):
        tok.save_hf(out)
        tok_config = {
            "tokenizer_class": "XLMTokenizer",
            "do_lowercase_and_remove_accent": tok.lowercase,
            "lang2id": lang2id,
            "id2lang": {str(i): lang for lang, i in lang2id.items()},
            "model_max_length": cfg.max_positions,
        }
        (out / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    else:
        # HF's XLMTokenizer is fastBPE-only: keep the SentencePiece model beside the weights.
        tok.save(out / "tokenizer.model")
        _log.warning("SentencePiece tokenizer: saved as tokenizer.model, not HF's XLMTokenizer")
    return out


def export_params(workdir: str | Path, out: str | Path, *, step: int = -1) -> Path:
    """A params-only copy of a workdir's checkpoint (no optimizer state), same metadata."""
    _, step, _, meta, state = pretrained.load_checkpoint(workdir, step)
    meta = {**meta, "imported": {**meta.get("imported", {}), "params_only": True}}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return _save(out, step, state["params"], meta, params_only=True, optimizer=None)


# --- command line --------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xlm_jax.convert",
        description="Import XLM / HuggingFace XLM checkpoints into an xlm_jax workdir "
        "(--from=xlm-pth|hf PATH --to=WORKDIR) or export one (--from=WORKDIR --to=hf|params OUT).",
    )
    parser.add_argument("--from", dest="source", required=True, help="xlm-pth, hf or a workdir")
    parser.add_argument("--to", dest="target", required=True, help="a workdir, hf or params")
    parser.add_argument("path", help="the file/folder to import, or the folder to export to")
    parser.add_argument("--codes", help="xlm-pth: XLM's BPE codes file (e.g. codes_xnli_15)")
    parser.add_argument("--vocab", help="xlm-pth: a fastBPE vocabulary replacing the dictionary")
    parser.add_argument("--max_vocab", type=int, default=-1, help="truncate the dictionary")
    parser.add_argument("--lowercase", default="auto", help="auto|true|false (XLM's lowercasing)")
    parser.add_argument("--romanian", default="auto", help="auto|true|false (en-ro models)")
    parser.add_argument("--langs", default="", help="languages by id, when the files lack them")
    parser.add_argument("--params_only", action="store_true", help="no optimizer state")
    parser.add_argument("--allow_pickle", action="store_true", help="full unpickling (trusted)")
    parser.add_argument("--step", type=int, default=-1, help="export: checkpoint step")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    opts = dict(lowercase=args.lowercase, romanian=args.romanian, langs=args.langs)
    if args.source == "xlm-pth":
        if not args.codes:
            parser.error("--from=xlm-pth needs --codes: the BPE codes released with the model")
        model = import_xlm_pth(
            args.path,
            codes=args.codes,
            vocab=args.vocab,
            max_vocab=args.max_vocab,
            allow_pickle=args.allow_pickle,
            **opts,
        )
    elif args.source == "hf":
        model = import_hf(args.path, allow_pickle=args.allow_pickle, **opts)
    elif args.target == "hf":
        print(f"wrote {export_hf(args.source, args.path, step=args.step)}")
        return 0
    elif args.target == "params":
        print(f"wrote {export_params(args.source, args.path, step=args.step)}")
        return 0
    else:
        parser.error("use --from=xlm-pth|hf PATH --to=WORKDIR or --from=WORKDIR --to=hf|params OUT")
    written = write_workdir(model, args.target, params_only=args.params_only)
    kind = "translation" if model.decoder is not None else "pretraining"
    print(
        f"wrote {written}: {kind} checkpoint, {model.encoder.n_layers} layers x "
        f"{model.encoder.emb_dim}, vocab {model.encoder.vocab_size}, langs {model.langs}, "
        f"{model.tokenizer!r}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
