"""A stand-in for facebookresearch/XLM's ``src/model/transformer.py`` in tests: the interface
``xlm_jax.tools.bench_xlm`` calls (``TransformerModel``: fwd, predict, generate, generate_beam)
with a tiny computation behind it, so the harness runs in CI without XLM's code. Not XLM's code.
"""

import torch
import torch.nn.functional as F
from torch import nn


class TransformerModel(nn.Module):
    def __init__(self, params, dico, is_encoder, with_output):
        super().__init__()
        assert len(dico) == params.n_words
        self.embeddings = nn.Embedding(params.n_words, params.emb_dim)
        self.layer = nn.Linear(params.emb_dim, params.emb_dim)
        self.pred_layer = nn.Module()
        self.pred_layer.proj = nn.Linear(params.emb_dim, params.n_words)

    def forward(self, mode, **kwargs):
        return getattr(self, mode)(**kwargs)

    def fwd(self, x, lengths, causal, src_enc=None, src_len=None, positions=None, langs=None):
        assert x.shape[1] == lengths.shape[0]  # sequence first, as XLM
        return torch.tanh(self.layer(self.embeddings(x)))

    def predict(self, tensor, pred_mask, y, get_scores):
        scores = self.pred_layer.proj(tensor[pred_mask])
        return scores, F.cross_entropy(scores, y)

    def generate(self, src_enc, src_len, tgt_lang_id, max_len=200):
        return self._decode(src_enc, src_len, 1, max_len)

    def generate_beam(
        self, src_enc, src_len, tgt_lang_id, beam_size, length_penalty, early_stopping, max_len
    ):
        return self._decode(src_enc, src_len, beam_size, max_len)

    def _decode(self, src_enc, src_len, beam_size, max_len):
        """Greedy words from a running state; every row runs to max_len, as the harness asks."""
        state = src_enc.mean(1).repeat_interleave(beam_size, 0)
        words = []
        for _ in range(max_len - 1):
            words.append(self.pred_layer.proj(state).argmax(-1))
            state = torch.tanh(self.layer(state + self.embeddings(words[-1])))
        return torch.stack(words), torch.full_like(src_len, max_len)
