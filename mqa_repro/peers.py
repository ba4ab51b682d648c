"""Other decoders timed beside ours by ``decode-bench --peer``: CTranslate2 on our own weights, and Hugging
Face ``generate`` on a Marian model of the same dimensions.

CTranslate2 (``ct2``, optional dependency ``pip install mqa-repro[ct2]``): :func:`ct2_spec` expresses our
Transformer in ``ctranslate2.specs.TransformerSpec`` -- pre-norm blocks with a final layer norm on each
stack, learned positions (``PositionEncoderSpec.encodings`` = our position tables), one embedding matrix
scaled by sqrt(d_model) shared by encoder, decoder and output projection, bias-free projections (CT2's
biases are optional; the output projection's only masks the ids never emitted), ReLU, layer-norm epsilon
1e-5 -- and :class:`CT2Model` runs it with ``Translator.translate_batch``. The vocabulary is our
SentencePiece model's pieces (padded to the model's ``padded_vocab`` with unique placeholder pieces, which
get a bias of ``FORBIDDEN_LOGIT`` on the output projection like PAD and BOS, the tokens our search never
emits: :func:`mqa_repro.decode.forbid_specials`).

Multi-query attention has two forms in CTranslate2 (both ``num_heads_kv = 1``; labelled by ``mqa_form``):

* ``"replicated"``: the documented ``num_heads_kv=1``. CTranslate2 copies the one K/V head to every query
  head before caching (``replicate_heads`` in src/layers/attention.cc), so its cache and the bytes each
  step reads are the multi-head ones: it saves nothing at decode time.
* ``"one_head"``: additionally the per-layer flag ``multi_query`` on the decoder's self-attention layers
  (read as ``<scope>/multi_query`` in src/layers/attention_layer.cc, not declared by the Python spec):
  keys and values stay one head, time and heads merged, as the paper intends. Encoder-decoder attention
  has no such path in CTranslate2 4.x (``process_cross_attention`` replicates whenever
  ``num_heads_kv < num_heads``), so its K/V are copied in both forms.

What CTranslate2 cannot express of our search: its beam score is log p / length^alpha (length without
EOS; ``finalize_hypothesis_score`` in src/decoding.cc) where ours is the paper's log p / ((5 + length) /
6)^alpha (length with EOS), and one ``max_decoding_length`` per call where ours is per sentence. Greedy
search and beam search with alpha = 0 are the same algorithm in both (fairseq's finishing rule: EOS among
the first k of 2k candidates).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Optional, Sequence

import torch

from .errors import UserError
from .model import BOS, EOS, PAD, UNK, Transformer

FORBIDDEN_LOGIT = -1e4   # added to the logits of ids never emitted (representable in fp16 and bf16)

MQA_FORMS = {
    "one_head": "per-layer multi_query flag on the decoder self-attention: one K/V head cached",
    "replicated": "num_heads_kv=1 (documented): the K/V head copied to every head before caching",
}


def _ct2():
    try:
        import ctranslate2
    except ImportError:
        raise UserError("--peer ct2 needs CTranslate2, which is not installed here "
                        "(pip install 'mqa-repro[ct2]' or pip install ctranslate2)") from None
    return ctranslate2


def ct2_supported(m) -> Optional[str]:
    """None if CTranslate2's TransformerSpec can express model spec ``m``, else the reason it cannot."""
    if not m.is_seq2seq:
        return "the CTranslate2 peer runs encoder-decoder models (Translator)"
    if m.d_k != m.d_v:
        return f"CTranslate2 has one head size; d_k {m.d_k} != d_v {m.d_v}"
    if m.window:
        return f"local attention (window {m.window}) is not compared (CTranslate2's sliding window is not our band)"
    if not m.tied_embeddings:
        return "the converter maps the shared (tied) embedding matrix; this model has a separate output layer"
    return None


def ct2_vocabulary(sp, size: int) -> list:
    """Pieces of SentencePiece model ``sp`` by id, padded with unique placeholders to ``size`` entries."""
    n = sp.get_piece_size()
    if n > size:
        raise UserError(f"the SentencePiece model has {n} pieces, more than the model's {size} embeddings")
    pieces = [sp.id_to_piece(i) for i in range(n)]
    taken = set(pieces)
    i = n
    while len(pieces) < size:
        name = f"<mqa_repro_unused_{i}>"
        if name not in taken:
            pieces.append(name)
        i += 1
    if len(set(pieces)) != len(pieces):
        raise UserError("the SentencePiece model has duplicate pieces; CTranslate2 needs a one-to-one vocabulary")
    return pieces


def _np(t: torch.Tensor):
    return t.detach().to("cpu", torch.float32).contiguous().numpy()


def ct2_spec(model: Transformer, vocabulary: list, mqa_form: str = "one_head"):
    """Our encoder-decoder Transformer's weights as a ``ctranslate2.specs.TransformerSpec`` (fp32 arrays).

    ``vocabulary``: one string per embedding row (``ct2_vocabulary``). ``mqa_form`` (``MQA_FORMS``) matters
    only when n_kv_heads = 1. Raises UserError for what :func:`ct2_supported` rejects.
    """
    _ct2()
    from ctranslate2.specs import common_spec, transformer_spec

    m = model.spec
    why = ct2_supported(m)
    if why:
        raise UserError(f"--peer ct2: {why}")
    if mqa_form not in MQA_FORMS:
        raise UserError(f"mqa_form must be one of {', '.join(MQA_FORMS)}, got {mqa_form!r}")
    if len(vocabulary) != m.padded_vocab:
        raise UserError(f"the vocabulary has {len(vocabulary)} entries but the model {m.padded_vocab} embeddings")
    h, g, dh = m.n_heads, m.n_kv_heads, m.d_k
    kv = dict(num_heads_kv=g if g != h else None, head_dim=dh if dh * h != m.d_model else None)
    enc = transformer_spec.TransformerEncoderSpec(m.encoder_layers, h, pre_norm=True,
                                                  activation=common_spec.Activation.RELU, **kv)
    dec = transformer_spec.TransformerDecoderSpec(m.decoder_layers, h, pre_norm=True,
                                                  activation=common_spec.Activation.RELU, **kv)
    if g == 1 and mqa_form == "one_head":
        for layer in dec.layer:   # the flag is read by the C++ layer but not declared by the Python spec
            object.__setattr__(layer.self_attention, "multi_query", True)
    sd = {k: v for k, v in model.state_dict().items()}

    def norm(spec, prefix):
        spec.gamma, spec.beta = _np(sd[f"{prefix}.weight"]), _np(sd[f"{prefix}.bias"])

    def ffn(spec, prefix):
        norm(spec.layer_norm, f"{prefix}.ffn_norm")
        spec.linear_0.weight = _np(sd[f"{prefix}.ffn.wi.weight"])
        spec.linear_1.weight = _np(sd[f"{prefix}.ffn.wo.weight"])

    def proj(name):
        return sd[name]

    def self_attention(spec, prefix):   # layer norm, fused Q/K/V projection, output projection
        norm(spec.layer_norm, f"{prefix}.self_norm")
        a = f"{prefix}.self_attn"
        spec.linear[0].weight = _np(torch.cat([proj(f"{a}.q_proj.weight"), proj(f"{a}.k_proj.weight"),
                                               proj(f"{a}.v_proj.weight")]))
        spec.linear[1].weight = _np(proj(f"{a}.o_proj.weight"))

    emb = _np(sd["embed.weight"])
    enc.embeddings[0].weight = emb
    enc.position_encodings.encodings = _np(sd["src_pos.weight"])
    norm(enc.layer_norm, "enc_norm")
    for i, layer in enumerate(enc.layer):
        p = f"encoder.{i}"
        self_attention(layer.self_attention, p)
        ffn(layer.ffn, p)
    dec.embeddings.weight = emb
    dec.position_encodings.encodings = _np(sd["tgt_pos.weight"])
    norm(dec.layer_norm, "dec_norm")
    dec.projection.weight = emb
    # the ids our search never emits (PAD, BOS, the padding rows: decode.forbid_specials) get a bias of
    # FORBIDDEN_LOGIT on the output projection instead of CTranslate2's suppress_sequences, whose GPU path keeps
    # a sorted vector of batch x token indices built by insertion every step: quadratic in batch x tokens, it
    # cost about 27 s per pass of newstest2014 at 1024 sentences per batch on an H200 (notes/engine.md)
    bias = torch.zeros(m.padded_vocab)
    bias[[PAD, BOS, *range(m.vocab_size, m.padded_vocab)]] = FORBIDDEN_LOGIT
    dec.projection.bias = _np(bias)
    for i, layer in enumerate(dec.layer):
        p = f"decoder.{i}"
        self_attention(layer.self_attention, p)
        norm(layer.attention.layer_norm, f"{p}.cross_norm")
        c = f"{p}.cross_attn"
        layer.attention.linear[0].weight = _np(proj(f"{c}.q_proj.weight"))
        layer.attention.linear[1].weight = _np(torch.cat([proj(f"{c}.k_proj.weight"), proj(f"{c}.v_proj.weight")]))
        layer.attention.linear[2].weight = _np(proj(f"{c}.o_proj.weight"))
        ffn(layer.ffn, p)
    spec = transformer_spec.TransformerSpec(enc, dec)
    spec.config.layer_norm_epsilon = float(model.dec_norm.eps)
    for key, tok in (("unk_token", UNK), ("bos_token", BOS), ("eos_token", EOS), ("decoder_start_token", BOS)):
        setattr(spec.config, key, vocabulary[tok])
    spec.register_source_vocabulary(vocabulary)
    spec.register_target_vocabulary(vocabulary)
    return spec


class CT2Model:
    """Our model converted to CTranslate2 and loaded as a ``ctranslate2.Translator``.

    ``device``: "cpu" or "cuda" (explicit: CTranslate2 never picks a device for us); ``compute_type``:
    "float32" or "bfloat16"; ``threads``: CPU threads per translation (``intra_threads``; 0 = CT2's default).
    """

    def __init__(self, model: Transformer, vocabulary: list, *, device: str = "cpu", compute_type: str = "float32",
                 mqa_form: str = "one_head", threads: int = 0, model_dir: Optional[Path] = None):
        ct2 = _ct2()
        if device == "cuda" and ct2.get_cuda_device_count() < 1:
            raise UserError("CTranslate2 sees no CUDA device (its CUDA build loads libcublas.so.12: install the CUDA "
                            "12 runtime or link it to this machine's libcublas); run the peer on the CPU instead")
        if device not in ("cpu", "cuda"):
            raise UserError(f"the CTranslate2 peer runs on cpu or cuda, got {device!r}")
        self.vocabulary = list(vocabulary)
        self.index = {tok: i for i, tok in enumerate(self.vocabulary)}
        self.mqa_form = mqa_form if model.spec.n_kv_heads == 1 else None
        self.device, self.compute_type = device, compute_type
        spec = ct2_spec(model, self.vocabulary, mqa_form)
        spec.validate()
        spec.optimize(quantization=None)
        self._tmp = None
        if model_dir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="mqa_repro_ct2_")
            model_dir = Path(self._tmp.name)
        model_dir.mkdir(parents=True, exist_ok=True)
        spec.save(str(model_dir))
        self.model_dir = model_dir
        self.translator = ct2.Translator(str(model_dir), device=device, compute_type=compute_type,
                                         intra_threads=threads)
        self.version = ct2.__version__

    def describe(self) -> dict:
        return {"peer": "ct2", "ctranslate2": self.version, "device": self.device, "compute_type": self.compute_type,
                "mqa_form": self.mqa_form, "mqa_form_meaning": MQA_FORMS.get(self.mqa_form)}

    def translate(self, sources: Sequence[Sequence[int]], *, beam: int = 1, alpha: float = 0.0,
                  max_len: int = 256, min_len: int = 0, max_batch_size: int = 0, eos: bool = True) -> list:
        """Target ids (EOS removed) of each source (ids without EOS; EOS appended here, as our encoder sees it).

        One ``translate_batch`` call: ``max_len`` / ``min_len`` bound every sentence alike (EOS counted);
        ``eos=False`` suppresses EOS (fixed-length decoding: set ``min_len = max_len``); ``max_batch_size``
        is CTranslate2's own bucketing by source length (0: one batch).
        """
        voc = self.vocabulary
        batch = [[voc[int(t)] for t in s] + [voc[EOS]] for s in sources]
        res = self.translator.translate_batch(   # PAD, BOS and padding ids: the projection's bias (ct2_spec)
            batch, beam_size=beam, length_penalty=alpha, max_decoding_length=max_len, min_decoding_length=min_len,
            max_batch_size=max_batch_size, suppress_sequences=None if eos else [[voc[EOS]]], max_input_length=0,
            return_scores=False)
        return [[self.index[t] for t in r.hypotheses[0]] for r in res]

    def close(self) -> None:
        del self.translator
        if self._tmp is not None:
            self._tmp.cleanup()


# --------------------------------------------------------------------------------------------------
# Hugging Face transformers' generate on a Marian-architecture config of the same dimensions
# --------------------------------------------------------------------------------------------------
def hf_peer(variant, cfg, device, ours_row_s: Optional[float]) -> dict:
    """Encoder + greedy ``generate()`` of a random MarianMTModel at the bench's fixed shape (multi-head only)."""
    from .bench import TORCH_DTYPES, _stats, random_tokens, time_runs

    m = variant.model
    if not m.is_seq2seq or m.n_kv_heads != m.n_heads or m.n_heads * m.d_k != m.d_model:
        return {"peer": "hf", "skipped": "Marian is multi-head with d_k = d_model / heads; "
                                         f"{variant.name} is not"}
    if m.window:
        return {"peer": "hf", "skipped": f"Marian attends to every earlier position; {variant.name} is local "
                                         f"(window {m.window})"}
    try:
        import transformers
        from transformers import MarianConfig, MarianMTModel
    except ImportError:
        raise UserError("--peer hf needs Hugging Face transformers, which is not installed here "
                        "(pip install transformers)") from None
    conf = MarianConfig(
        vocab_size=m.padded_vocab, d_model=m.d_model, encoder_layers=m.encoder_layers,
        decoder_layers=m.decoder_layers, encoder_attention_heads=m.n_heads, decoder_attention_heads=m.n_heads,
        encoder_ffn_dim=m.d_ff, decoder_ffn_dim=m.d_ff, max_position_embeddings=max(m.max_positions, cfg.tgt_len + 1),
        activation_function="relu", dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
        pad_token_id=PAD, eos_token_id=3, decoder_start_token_id=BOS, forced_eos_token_id=None,
        scale_embedding=True, share_encoder_decoder_embeddings=True, tie_word_embeddings=True)
    try:
        model = MarianMTModel(conf).to(device=device, dtype=TORCH_DTYPES[cfg.dtype]).eval()
    except Exception as e:  # pragma: no cover - depends on the installed version
        return {"peer": "hf", "error": f"{type(e).__name__}: {e}"}
    src = random_tokens(cfg.batch, cfg.src_len, m.vocab_size, device)
    mask = torch.ones_like(src)

    @torch.no_grad()
    def gen():
        return model.generate(input_ids=src, attention_mask=mask, num_beams=1, do_sample=False,
                              min_new_tokens=cfg.tgt_len, max_new_tokens=cfg.tgt_len, eos_token_id=None)

    try:
        produced = gen().shape[1] - 1
        times = time_runs(gen, device, max(2, min(cfg.repeats, 3)), warmup=0)
    except Exception as e:  # pragma: no cover
        return {"peer": "hf", "error": f"{type(e).__name__}: {e}"}
    finally:
        del model
    st = _stats(times)
    out = {"peer": "hf", "transformers": transformers.__version__, "model": "MarianMTModel (multi-head)",
           "variant": variant.name, "batch": cfg.batch, "src_len": cfg.src_len, "tgt_len": cfg.tgt_len,
           "tokens_generated": produced, "median_s": st["median_s"], "min_s": st["min_s"], "max_s": st["max_s"],
           "us_per_token": st["median_s"] * 1e6 / (cfg.batch * cfg.tgt_len),
           "what": "generate(): encoder + greedy decoder, eager, its default cache"}
    if ours_row_s:
        out["ratio_hf_over_ours"] = st["median_s"] / ours_row_s
    return out


# --------------------------------------------------------------------------------------------------
# CTranslate2 at the fixed Table 2 shape (random source tokens, exactly tgt_len tokens, EOS suppressed)
# --------------------------------------------------------------------------------------------------
def synthetic_vocabulary(size: int) -> list:
    """Token names for a model without a SentencePiece model: the four specials, then ``t<id>``."""
    return ["<pad>", "<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(4, size)]


def ct2_fixed_peer(variant, cfg, model: Transformer, device, ours_s: dict, vocabulary: Optional[list] = None) -> list:
    """CTranslate2 on ``model``'s weights at the bench's shape: ``cfg.batch`` random sources of
    ``cfg.src_len`` tokens, exactly ``cfg.tgt_len`` target tokens (min = max decoding length, EOS
    suppressed), one ``translate_batch`` call per run, for each beam of ``cfg.beams``; per multi-query form.

    ``ours_s``: {beam: seconds of our encoder + decoder at that beam}, for the ratio. Returns result rows.
    """
    from .bench import _stats, random_tokens, time_runs

    m = variant.model
    why = ct2_supported(m)
    if why:
        return [{"peer": "ct2", "variant": variant.name, "skipped": why}]
    vocab = vocabulary or synthetic_vocabulary(m.padded_vocab)
    # full-length sources of src_len positions with their EOS, as the Table 2 rows (CT2Model appends the EOS)
    src = random_tokens(cfg.batch, cfg.src_len - 1, m.vocab_size, "cpu").tolist()
    compute = {"fp32": "float32", "bf16": "bfloat16"}[cfg.dtype]
    ct2_dev = "cuda" if torch.device(device).type == "cuda" else "cpu"
    out = []
    for form in (["one_head", "replicated"] if m.n_kv_heads == 1 else ["one_head"]):
        peer = CT2Model(model, vocab, device=ct2_dev, compute_type=compute, mqa_form=form,
                        threads=torch.get_num_threads() if ct2_dev == "cpu" else 0)
        for beam in cfg.beams:
            def run(beam=beam):
                return peer.translate(src, beam=beam, alpha=0.0, max_len=cfg.tgt_len, min_len=cfg.tgt_len,
                                      eos=False, max_batch_size=cfg.batch)

            produced = {len(h) for h in run()}   # also the warm-up
            # wall clock: translate_batch returns only when its work is done
            times = time_runs(run, torch.device("cpu"), max(2, min(cfg.repeats, 3)), warmup=0)
            st = _stats(times)
            row = {**peer.describe(), "variant": variant.name, "beam": beam, "batch": cfg.batch,
                   "src_len": cfg.src_len, "tgt_len": cfg.tgt_len, "tokens_per_sentence": sorted(produced),
                   "median_s": st["median_s"], "min_s": st["min_s"], "max_s": st["max_s"],
                   "us_per_token": st["median_s"] * 1e6 / (cfg.batch * cfg.tgt_len),
                   "what": "Translator.translate_batch: encoder + decoder, exactly tgt_len tokens"}
            if ours_s.get(beam):
                row["ratio_ct2_over_ours"] = st["median_s"] / ours_s[beam]
            out.append(row)
        peer.close()
    return out
