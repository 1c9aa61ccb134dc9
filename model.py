"""Duplicate-question classifiers over any Hugging Face encoder.

- SiameseClassifier: the notebook's model. Each question is encoded alone, the two pooled vectors
  are concatenated (optionally with |u-v| and u*v) and fed to two 300-unit PReLU+dropout layers
  and a 2-way output. `freeze_encoder` gives the notebook's "static BERT" variant. The cosine
  prior adds scale * (cos(u, v) - shift) to the duplicate logit's margin, so that training starts
  from the encoder's own cosine ranking (the cosine baseline) instead of from chance.
- CrossEncoder: both questions in one sequence ([CLS] q1 [SEP] q2 [SEP]), as HF's run_glue does
  for QQP; usually stronger, but every pair needs its own encoder pass.

Both return logits (B, 2); the loss is cross-entropy over the classes. The notebook applied
LogSoftmax(dim=0), which normalizes over the *batch* axis: each example's "probabilities" then
depended on the other examples in the batch. Here the softmax is over dim=-1 (the classes).

Both are Encoders: Encoder.vectors turns any collated batch, exact or packed, into one vector per
sequence, and every path to vectors, logits, probabilities and cosines goes through it.
load_question_encoder gives the vectors of question texts (a siamese checkpoint's, or an untuned
encoder's) with what an index records about them. OnnxEncoder stands in for an HF encoder with
ONNX Runtime running its forward (serve.py --runtime onnx, its CPU default); interpolated() mixes
weights (WiSE-FT).

Nothing runs at import: build_model(ModelConfig) builds, load_model() rebuilds from a checkpoint.
"""
import hashlib
import inspect
import json
import os
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import torch
from torch import nn
from torch.nn import functional as F

from cli import UserError
from data import MAX_JOINED_LEN
from hub import BUNDLED_MODEL, from_local_or_hub
from text import NO_LABEL
# Config fields added after checkpoints were first written, with the value those runs had: a saved
# config without the field means that value, not today's default.
SAVED_BEFORE = {"cosine_prior": 0.0}


@dataclass
class ModelConfig:
    encoder: str = BUNDLED_MODEL   # HF name or local folder; ignored when encoder_config is set
    arch: str = "siamese"          # 'siamese' (notebook) or 'cross' (one joined sequence)
    pooling: str = "mean"          # 'mean' over real tokens, or 'cls' (notebook)
    features: str = "rich"         # siamese head input: 'rich' [u,v,|u-v|,u*v] or 'concat' [u,v] (notebook)
    hidden: int = 300              # head width (notebook: 300)
    dropout: float = 0.25          # head dropout (notebook: 0.25)
    freeze_encoder: bool = False   # notebook's "static BERT": train the head only
    freeze_layers: int = 0         # the bottom layers kept as pretrained, the embeddings counted as the first
    symmetric: bool = False        # siamese: average the logits of (q1, q2) and (q2, q1)
    cosine_prior: float = 20.0     # siamese: initial scale of the cosine term (learnt); 0: off
    cosine_shift: float = 0.8      # siamese: initial cosine of even odds (learnt): the bundled
                                   # MiniLM's best cosine threshold on validation is 0.82
    encoder_config: dict = field(default_factory=dict)  # HF config dict: rebuild without weights

    def __post_init__(self):
        for name, allowed in (("arch", ("siamese", "cross")), ("pooling", ("mean", "cls")),
                              ("features", ("rich", "concat"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} '{getattr(self, name)}': use one of {allowed}")
        if self.arch == "cross":
            self.cosine_prior = 0.0  # siamese only: a cross-encoder has no two vectors to compare


def load_encoder(cfg):
    """The HF encoder: from its saved config alone (random weights, to be overwritten by a
    checkpoint or used by tests), else pretrained from a name or folder."""
    from transformers import AutoConfig, AutoModel
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # per-tensor "Loading weights" bars drown our own progress
    hf_logging.set_verbosity_error()   # and the unused-pooler-weights warning says nothing useful
    if cfg.encoder_config:
        hf_cfg = AutoConfig.for_model(**cfg.encoder_config)
        return AutoModel.from_config(hf_cfg, attn_implementation="sdpa")
    return from_local_or_hub(lambda path, **kw: AutoModel.from_pretrained(path, attn_implementation="sdpa", **kw),
                             cfg.encoder, "model weights")


def encoder_positions(cfg):
    """How many positions the encoder of a ModelConfig has (its config's max_position_embeddings;
    None for an encoder without that limit). Reads the config alone, not the weights."""
    from transformers import AutoConfig
    if cfg.encoder_config:
        hf_cfg = AutoConfig.for_model(**cfg.encoder_config)
    else:
        hf_cfg = from_local_or_hub(lambda path, **kw: AutoConfig.from_pretrained(path, **kw), cfg.encoder,
                                   "model config")
    return getattr(hf_cfg, "max_position_embeddings", None)


def check_positions(cfg, max_len, data_dir):
    """Before any training: the longest sequence a data folder of max_len tokens per question gives
    this model's encoder fits its positions (a question, siamese; a joined pair, 2 * max_len - 1
    tokens cut at MAX_JOINED_LEN, cross). Otherwise a run would train and then fail on the first
    long question, perhaps only at the test pass."""
    positions = encoder_positions(cfg)
    longest = min(2 * max_len - 1, MAX_JOINED_LEN) if cfg.arch == "cross" else max_len
    if positions is None or longest <= positions:
        return
    joined = f": joined pairs of up to {longest} tokens" if cfg.arch == "cross" else ""
    fits = (positions + 1) // 2 if cfg.arch == "cross" else positions
    raise UserError(f"{data_dir} was preprocessed with --max_len {max_len}{joined}, longer than the {positions} "
                    f"positions of the encoder {cfg.encoder}",
                    f"re-run preprocess.py with --max_len {fits} or less (into another --out_dir), or use "
                    "an encoder with more positions")


def takes_token_types(encoder):
    """Whether the encoder's forward accepts segment ids (BERT yes, DistilBERT no). Asked of the
    signature: in transformers 5 `forward` is wrapped by decorators, so its __code__ describes
    the wrapper and never names token_type_ids."""
    return "token_type_ids" in inspect.signature(encoder.forward).parameters


def pool(hidden, mask, how):
    """(N, L, H), (N, L) -> (N, H) float32 (sums in fp32, as encode_packed's)."""
    if how == "cls":
        return hidden[:, 0].float()
    mask = mask.unsqueeze(-1).float()
    return (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1)


def encode(encoder, ids, mask, pooling, token_types=None):
    """(N, L) ids and 0/1 mask -> (N, H) pooled last hidden states.

    The encoder gets the mask in its 4D form (N, 1, 1, L), True = attend: transformers then uses
    it as it is. Given the 2D mask, it asks `mask.all()` to skip masking when nothing is padded,
    a device-to-host sync in every call (and an error inside CUDA graph capture)."""
    kwargs = {} if token_types is None else {"token_type_ids": token_types}
    attention = mask[:, None, None, :].bool()  # (N, 1, 1, L)
    hidden = encoder(input_ids=ids, attention_mask=attention, **kwargs).last_hidden_state  # (N, L, H)
    return pool(hidden, mask, pooling)


def encode_packed(encoder, ids, pos, seg, n, pooling, token_types=None):
    """Packed rows (R, L) of ids, positions and sequence ids (-1 on padding) -> (n, H) float32
    pooled vectors of the n sequences packed in them (data.Collator's packed form).

    Each token attends only to tokens of its own sequence (padding to padding, so no row of the
    mask is empty), and positions restart at every sequence: each sequence is encoded exactly as
    it would be alone. Pooling sums each sequence's tokens with index_add into n + 1 slots (the
    last one collects padding) -- no data-dependent shapes, so no host sync."""
    kwargs = {} if token_types is None else {"token_type_ids": token_types}
    attention = (seg[:, :, None] == seg[:, None, :])[:, None]  # (R, 1, L, L)
    hidden = encoder(input_ids=ids, attention_mask=attention, position_ids=pos,
                     **kwargs).last_hidden_state  # (R, L, H)
    slot = torch.where(seg >= 0, seg, n).flatten()  # (R*L,) sequence of each token; padding -> n
    if pooling == "cls":  # the first token of each sequence
        slot = torch.where((pos.flatten() == 0) & (slot < n), slot, n)
    flat = hidden.flatten(0, 1).float()  # (R*L, H); sums in fp32, as a reduction over a dim would do
    sums = torch.zeros(n + 1, flat.shape[1], dtype=flat.dtype, device=flat.device).index_add_(0, slot, flat)
    if pooling == "cls":
        return sums[:n]
    counts = torch.zeros(n + 1, dtype=flat.dtype, device=flat.device).index_add_(0, slot, torch.ones_like(slot, dtype=flat.dtype))
    return sums[:n] / counts[:n].clamp(min=1).unsqueeze(-1)


class Encoder(nn.Module):
    """An HF encoder and its pooling: the one road from any collated batch to vectors.

    vectors(batch, n) reads either form of data.Collator's batches -- exact (padded groups
    seq_ids / seq_mask / seq_types, one encoder call each, put back in sequence order by
    seq_order) or packed (packed_ids / packed_pos / packed_seg / packed_types, one call) -- and
    returns the (n, H) float32 vectors of its n sequences in their order: a pair batch's q1s then
    q2s (siamese), its joined pairs (cross), or single questions. Every scorer, training and the
    benchmark go through it, so the layout is a flag (--shapes), never a code path of its own."""

    def __init__(self, encoder, pooling):
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.uses_token_types = takes_token_types(encoder)

    def vectors(self, batch, n):
        """(n, H) float32 vectors of the batch's n sequences, in sequence order."""
        if "packed_ids" in batch:
            types = batch.get("packed_types") if self.uses_token_types else None
            return encode_packed(self.encoder, batch["packed_ids"], batch["packed_pos"], batch["packed_seg"], n,
                                 self.pooling, types)
        types = batch.get("seq_types") if self.uses_token_types else None
        emb = torch.cat([encode(self.encoder, ids, mask, self.pooling, None if types is None else types[g])
                         for g, (ids, mask) in enumerate(zip(batch["seq_ids"], batch["seq_mask"]))])  # (n, H)
        return emb[batch["seq_order"]]  # groups are length-sorted: back to sequence order

    def question_vectors(self, batch):
        """A batch of single questions -> (n, H) vectors (index.py, search.py's queries)."""
        return self.vectors(batch, len(batch["index"]))

    def pair_cosine(self, batch):
        """A siamese pair batch -> (B,) cosine of each pair's two vectors (baseline_cosine.py)."""
        B = len(batch["index"])
        emb = self.vectors(batch, 2 * B)  # (2B, H): q1s, then q2s
        # The notebook's eps; in fp32, as near-duplicates differ in the third decimal of the cosine.
        return F.cosine_similarity(emb[:B], emb[B:], dim=-1, eps=1e-6)  # (B,)


def make_head(d_in, hidden, dropout):
    return nn.Sequential(
        nn.Linear(d_in, hidden), nn.PReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, hidden), nn.PReLU(), nn.Dropout(dropout),
        nn.Linear(hidden, 2),
    )


class PairModel(Encoder):
    """Shared by both architectures: the encoder and its vectors, freezing, config bookkeeping, and
    probability(batch), the duplicate probability every pair scorer reads."""

    def __init__(self, cfg):
        encoder = load_encoder(cfg)
        if getattr(encoder, "pooler", None) is not None:
            # BERT's pooler is unused (we pool last_hidden_state ourselves); DDP would fail on
            # parameters that never get a gradient, and it costs a matmul per question.
            encoder.pooler = None
        super().__init__(encoder, cfg.pooling)
        # Keep the encoder's own config so the model can be rebuilt from the checkpoint alone.
        enc_cfg = self.encoder.config.to_dict()
        self.cfg = ModelConfig(**{**asdict(cfg), "encoder_config": {
            k: v for k, v in enc_cfg.items() if not k.startswith("_") and k != "transformers_version"}})
        if cfg.freeze_encoder:
            self.encoder.requires_grad_(False)
        for block in self.frozen_blocks():
            block.requires_grad_(False)

    def frozen_blocks(self):
        """The modules freeze_layers keeps as pretrained: the embeddings, then transformer layers
        from the bottom (BERT-like encoders: .embeddings and .encoder.layer; DistilBERT's
        .transformer.layer)."""
        if not self.cfg.freeze_layers or self.cfg.freeze_encoder:  # the whole encoder frozen: nothing to pick
            return []
        stack = getattr(getattr(self.encoder, "encoder", None), "layer", None) or \
            getattr(getattr(self.encoder, "transformer", None), "layer", None)
        if getattr(self.encoder, "embeddings", None) is None or stack is None:
            raise UserError(f"--freeze_layers {self.cfg.freeze_layers} (train.py's default is 1): "
                            f"{type(self.encoder).__name__} has no .embeddings with .encoder.layer (BERT-like) or "
                            ".transformer.layer (DistilBERT-like) to freeze", "pass --freeze_layers 0")
        blocks = [self.encoder.embeddings, *stack]
        if self.cfg.freeze_layers > len(blocks):
            raise UserError(f"--freeze_layers {self.cfg.freeze_layers}: the encoder has {len(blocks)} (the "
                            f"embeddings and {len(stack)} transformer layers)", "pass at most "
                            f"{len(blocks)}, or --freeze_encoder")
        return blocks[:self.cfg.freeze_layers]

    def train(self, mode=True):
        super().train(mode)
        if self.cfg.freeze_encoder:  # a frozen encoder also keeps its dropout off
            self.encoder.eval()
        for block in self.frozen_blocks():  # so do frozen layers: what the trained ones see stays fixed
            block.eval()
        return self

    def encoder_vectors(self, batch, n):
        """vectors(), without gradients into a frozen encoder."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.cfg.freeze_encoder):
            return self.vectors(batch, n)

    def probability(self, batch):
        """(B,) probability of duplicate: softmax over the classes of the (B, 2) logits."""
        return self(batch).float().softmax(-1)[:, 1]


class SiameseClassifier(PairModel):
    def __init__(self, cfg):
        super().__init__(cfg)
        h = self.encoder.config.hidden_size
        self.head = make_head(h * (4 if cfg.features == "rich" else 2), cfg.hidden, cfg.dropout)
        if cfg.cosine_prior:
            # A sentence encoder already ranks duplicates by cosine (the untuned baseline: 0.77
            # accuracy on the real 8k rows), while a fresh head starts at chance and spends its
            # few hundred steps finding that again. With the prior the classifier starts as the
            # cosine baseline and the head learns what cosine misses, and the cosine of the
            # vectors that search.py indexes is trained directly (README: validation accuracy
            # 0.793 -> 0.805, AP 0.791 -> 0.821, search recall@1 0.711 -> 0.738). At lr 1e-4 the
            # two scalars barely move in 200 steps; they are parameters for longer runs.
            self.cosine_scale = nn.Parameter(torch.tensor(float(cfg.cosine_prior)))
            self.cosine_shift = nn.Parameter(torch.tensor(float(cfg.cosine_shift)))

    def embed_pair(self, batch):
        """(B, H) vectors of each pair's q1 and q2: sequences 0..B-1 and B..2B-1 of the batch."""
        B = len(batch["labels"])
        emb = self.encoder_vectors(batch, 2 * B)  # (2B, H)
        return emb[:B], emb[B:]

    def pair_logits(self, u, v):
        feats = [u, v] if self.cfg.features == "concat" else [u, v, (u - v).abs(), u * v]
        logits = self.head(torch.cat(feats, dim=-1))  # (B, 2)
        if not self.cfg.cosine_prior:
            return logits
        cos = F.cosine_similarity(u.float(), v.float(), dim=-1)  # (B,)
        margin = self.cosine_scale * (cos - self.cosine_shift)  # (B,) log-odds of duplicate
        return logits + torch.stack([-margin / 2, margin / 2], dim=-1).to(logits.dtype)  # (B, 2)

    def forward(self, batch, with_vectors=False):
        """(B, 2) logits; with_vectors (training objectives beyond ce, objectives.py): also the
        logits of the reversed order and the pooled vectors u, v (B, H)."""
        u, v = self.embed_pair(batch)  # (B, H) each
        logits = self.pair_logits(u, v)
        if not (self.cfg.symmetric or with_vectors):
            return logits
        reversed_logits = self.pair_logits(v, u)
        if self.cfg.symmetric:
            # "Is q1 a duplicate of q2" is the same question as the reverse; averaging both orders
            # builds that in. The head is tiny, so the second order costs nothing measurable.
            logits = reversed_logits = (logits + reversed_logits) / 2
        return (logits, reversed_logits, u, v) if with_vectors else logits


class CrossEncoder(PairModel):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.head = make_head(self.encoder.config.hidden_size, cfg.hidden, cfg.dropout)

    def forward(self, batch):
        emb = self.encoder_vectors(batch, len(batch["labels"]))  # (B, H): one joined sequence per pair
        return self.head(emb)  # (B, 2)


class OnnxEncoder(torch.nn.Module):
    """An HF encoder's forward run by ONNX Runtime (fp32, CPU): exported once at start, then called
    as the encoder was (input_ids, attention_mask 2D or 4D, token_type_ids), so every road to
    vectors (model.encode, exact batches) stays the same. The whole forward is one native call
    that releases the GIL: serve.py's workers and event loop stop waiting on each other."""

    def __init__(self, encoder, threads):
        super().__init__()
        import tempfile
        import warnings
        import onnxruntime as ort
        self.config, self.types = encoder.config, takes_token_types(encoder)
        folder = tempfile.TemporaryDirectory(prefix="qqp-onnx-")
        path = os.path.join(folder.name, "encoder.onnx")
        ids = torch.randint(0, encoder.config.vocab_size, (3, 11), generator=torch.Generator().manual_seed(0))
        mask = torch.ones(3, 11, dtype=torch.long)
        mask[0, 5:] = 0  # a padded row: the traced mask path is the one that masks
        names = ["input_ids", "attention_mask", *(["token_type_ids"] if self.types else [])]
        dynamic = {name: {0: "rows", 1: "length"} for name in [*names, "hidden"]}
        with warnings.catch_warnings():  # the TorchScript exporter is deprecated; still exact here (tests)
            warnings.simplefilter("ignore")
            torch.onnx.export(_Forward(encoder).eval(), (ids, mask, *([torch.zeros_like(ids)] if self.types else [])),
                              path, input_names=names, output_names=["hidden"], dynamic_axes=dynamic,
                              dynamo=False, opset_version=17)
        encoder.eval()  # the export puts its module back in the mode it found, training included
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        folder.cleanup()  # the session holds the model in memory

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        mask = attention_mask[:, 0, 0, :] if attention_mask.dim() == 4 else attention_mask  # (N, L)
        feed = {"input_ids": input_ids.long().numpy(), "attention_mask": mask.long().numpy()}
        if self.types:
            feed["token_type_ids"] = (torch.zeros_like(input_ids) if token_type_ids is None
                                      else token_type_ids).long().numpy()
        hidden = self.session.run(None, feed)[0]  # (N, L, H) float32
        return SimpleNamespace(last_hidden_state=torch.from_numpy(hidden))


class _Forward(torch.nn.Module):
    """encoder(...).last_hidden_state, as a module the exporter can trace."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state


@contextmanager
def interpolated(module, start, alpha):
    """Inside: module's floating-point weights are start + alpha * (theirs - start), in place (the
    same tensors, so compiled graphs and CUDA graphs that hold their addresses still read them);
    on exit its own weights come back. start: a {name: tensor} copy of the weights it started
    from (pretrained_weights). WiSE-FT (Wortsman et al., 2022): along the line in weight space from a
    pretrained encoder to its fine-tuned self, what fine-tuning taught trades against what it made
    the encoder forget (here: cosine search; train.py --wise_alpha). alpha 1 is a no-op."""
    if alpha == 1:
        yield module
        return
    own = pretrained_weights(module)  # its own weights, to put back
    with torch.no_grad():
        for name, t in float_weights(module).items():
            t.copy_(start[name].to(t.device) + alpha * (own[name] - start[name].to(t.device)))
    try:
        yield module
    finally:
        with torch.no_grad():
            for name, t in float_weights(module).items():
                t.copy_(own[name])


def float_weights(module):
    """{name: tensor} of module's floating-point weights and buffers, sharing their storage
    (integer buffers such as BERT's position ids are not weights to interpolate)."""
    return {name: t for name, t in module.state_dict(keep_vars=True).items() if t.is_floating_point()}


def pretrained_weights(module):
    """A detached copy of module's floating-point weights now: the start interpolated() needs."""
    return {name: t.detach().clone() for name, t in float_weights(module).items()}


def build_model(cfg):
    return (SiameseClassifier if cfg.arch == "siamese" else CrossEncoder)(cfg)


def pair_loss(logits, labels):
    """Summed cross-entropy over the classes (the notebook's per-example NLL loop, fixed and fused);
    pairs labelled text.NO_LABEL (batch fill, unknown labels) add nothing. The caller divides
    by the number of pairs in the optimizer step, so micro-batches of any size weigh by their pairs."""
    return F.cross_entropy(logits.float(), labels, reduction="sum", ignore_index=NO_LABEL)


def export_hf(model, tokenizer, folder, max_len):
    """The encoder and tokenizer in Hugging Face format, plus sentence-transformers' module files
    (Transformer, then Pooling with the run's own pooling), so that transformers' AutoModel and
    SentenceTransformer(folder) both read it as trained: a [CLS] model is not mean-pooled."""
    import json

    from transformers import AutoModel
    encoder = model.encoder
    if getattr(encoder, "pooler", "absent") is None:
        # We dropped BERT's unused pooler; transformers would warn that its weights are missing.
        # Export the full module: the pooler freshly initialized, and still unused by us.
        full = AutoModel.from_config(encoder.config)
        missing, unexpected = full.load_state_dict(encoder.state_dict(), strict=False)
        assert all(k.startswith("pooler.") for k in missing) and not unexpected, (missing, unexpected)
        encoder = full
    encoder.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    dim = model.encoder.config.hidden_size
    files = {
        "modules.json": [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                         {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}],
        "sentence_bert_config.json": {"max_seq_length": max_len, "do_lower_case": False},
        "1_Pooling/config.json": {"word_embedding_dimension": dim, "pooling_mode_cls_token": model.cfg.pooling == "cls",
                                  "pooling_mode_mean_tokens": model.cfg.pooling == "mean",
                                  "pooling_mode_max_tokens": False, "pooling_mode_mean_sqrt_len_tokens": False},
    }
    os.makedirs(os.path.join(folder, "1_Pooling"), exist_ok=True)
    for name, content in files.items():
        with open(os.path.join(folder, name), "w") as f:
            json.dump(content, f, indent=1)


CKPT_FORMAT = "qqp-pair-classifier-v1"


def save_checkpoint(path, ckpt):
    """Write atomically: a crash mid-write leaves the previous file intact."""
    tmp = f"{path}.tmp"
    torch.save({"format": CKPT_FORMAT, **ckpt}, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, fix="pass a ckpt.pt written by train.py"):
    """Load a checkpoint safely (weights_only: no pickled code runs) and check its format; `fix`
    is what the error tells to do with a file that is not one."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint", "pass the ckpt.pt that train.py wrote "
                        "(e.g. out/ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt file, a pickled model, or not a torch file at all
        raise UserError(f"{path}: not a checkpoint this code can read safely ({type(e).__name__})", fix) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CKPT_FORMAT:
        found = ckpt.get("format") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path}: not a {CKPT_FORMAT} checkpoint (format {found})", fix)
    return ckpt


def model_from_checkpoint(ckpt):
    """Rebuild a model from a loaded checkpoint dict (config + weights), no pretrained download."""
    model = build_model(ModelConfig(**{**SAVED_BEFORE, **ckpt["model_config"]}))
    model.load_state_dict(ckpt["model"])
    return model


def load_model(path):
    """(model in eval mode on the CPU, checkpoint dict without its weights), rebuilt from the
    checkpoint alone. An unreadable, foreign or incomplete file is a UserError."""
    ckpt = load_checkpoint(path)
    try:
        model = model_from_checkpoint(ckpt)
        ckpt["data"]["vocab_hash"], ckpt["data"]["max_len"]  # fail here, not halfway through
    except (KeyError, TypeError, RuntimeError) as e:
        detail = (str(e).splitlines() or [""])[0][:200]
        raise UserError(f"{path}: the checkpoint is incomplete or its weights do not fit its config "
                        f"({type(e).__name__}: {detail})", "pass a ckpt.pt written by train.py") from None
    del ckpt["model"]  # the weights live in the model now
    return model.eval(), ckpt


# ----------------------------------------------------------------------------- question vectors

DEFAULT_MAX_LEN = 128  # tokens per question for an untuned --encoder (preprocess.py's default)


@dataclass
class QuestionEncoder:
    """What turns question texts into vectors (index.py, search.py, teach.py's mining), and what an
    index records about it."""
    module: Encoder           # its question_vectors(batch) is the road; the classifier for a checkpoint
    tokenizer: object
    max_len: int
    pad_id: int
    record: dict              # kind, checkpoint or encoder, pooling, max_len, vocab_hash, fingerprint
    classifier: object = None  # the checkpoint's SiameseClassifier; None for an untuned encoder

    def to(self, device):
        self.module.to(device)
        return self


def load_question_encoder(checkpoint="", encoder="", max_len=0):
    """A siamese checkpoint's encoder and classifier, or an untuned HF encoder with mean pooling
    (what sentence-embedding models such as the bundled MiniLM are trained with)."""
    from hub import load_tokenizer
    from text import checkpoint_tokenizer, vocab_hash
    if checkpoint:
        model, ckpt = load_model(checkpoint)
        if model.cfg.arch != "siamese":
            raise UserError(f"{checkpoint} is a cross-encoder: it reads both questions together and has "
                            "no vector per question", "index with a siamese checkpoint (train.py's default "
                            "--arch), or with --encoder for an untuned one")
        data = ckpt["data"]
        record = {"kind": "checkpoint", "checkpoint": os.path.abspath(checkpoint), "step": ckpt.get("step"),
                  "encoder": model.cfg.encoder, "pooling": model.cfg.pooling, "max_len": data["max_len"],
                  "vocab_hash": data["vocab_hash"]}
        qe = QuestionEncoder(model, checkpoint_tokenizer(checkpoint, data), data["max_len"], data["pad_token_id"],
                             record, classifier=model)
        weights = model
    else:
        module = Encoder(load_encoder(ModelConfig(encoder=encoder)), "mean").eval()
        tok = load_tokenizer(encoder)
        max_len = max_len or DEFAULT_MAX_LEN
        record = {"kind": "encoder", "encoder": encoder, "pooling": "mean", "max_len": max_len,
                  "vocab_hash": vocab_hash(tok)}
        qe = QuestionEncoder(module, tok, max_len, tok.pad_token_id or 0, record)
        weights = module.encoder  # the HF model's own names: fingerprints of earlier indexes still match
    qe.record["fingerprint"] = weights_fingerprint(weights, qe.record)
    return qe


def weights_fingerprint(module, record):
    """16 hex digits over every weight and what shapes the vectors (pooling, max length, vocabulary):
    equal fingerprints give equal vectors, wherever the checkpoint file lives."""
    h = hashlib.sha256(json.dumps([record[k] for k in ("pooling", "max_len", "vocab_hash")]).encode())
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def describe_model(record):
    if record["kind"] == "checkpoint":
        return f"checkpoint {record['checkpoint']} (step {record.get('step')}, {record['pooling']} pooling)"
    return f"untuned encoder {record['encoder']} ({record['pooling']} pooling)"
