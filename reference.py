"""The two training loops bench.py measures ours against, on the same pairs and encoder weights.

The notebook (NotebookModel, notebook_train_epoch, notebook_get_predictions), re-implemented as
written: python random shuffling of lists, two tokenizer calls per batch, a one-hot label loop,
two encoder calls, [CLS] vectors concatenated, 2 x (Linear, PReLU, Dropout), Linear,
LogSoftmax(dim=0) (sic), a per-example Python loss loop, clip 1.0, Adam, fp32, and no
torch.no_grad() in get_predictions. Where it differs, it is in the notebook's favour: the fast Rust
tokenizer (the notebook's DistilBertTokenizer was the pure-Python one in transformers 4.12; bench's
data stage also times that kind), TF32 matmuls on GPU (PyTorch 1.10's default then), our encoder
module with its SDPA attention, zero_grad that frees gradients (today's default), no progress bars,
and the raw questions instead of its word lists.

The peer (PeerModel, peer_train): what a competent user writes today with Hugging Face's tools, a
plain HF-Trainer-style loop: pre-tokenized questions (our arrays), q1 and q2 each padded to their
batch maximum (DataCollatorWithPadding), HF's group_by_length megabatches (LengthGroupedSampler:
50 batches sorted by length, longest first), bf16 autocast, fused AdamW, linear schedule, eager
PyTorch with the encoder's standard 2D attention mask. Its model is ours in size: mean pooling and
the same head on (u, v, |u-v|, u*v).
"""
import math
import os
import random
import time

import numpy as np
import torch
from torch import nn


# ----------------------------------------------------------------------------- the notebook

def shuffle_data(input_1, input_2, labels):
    shuffled_input_1 = []
    shuffled_input_2 = []
    shuffled_labels = []
    indices = list(range(len(input_1)))
    random.shuffle(indices)
    for i in indices:
        shuffled_input_1.append(input_1[i])
        shuffled_input_2.append(input_2[i])
        shuffled_labels.append(labels[i])
    return (shuffled_input_1, shuffled_input_2, shuffled_labels)


class NotebookModel(nn.Module):
    """The notebook's SimilarityModelFineTuneBert, line for line, around a given encoder (so every
    side starts from the same weights); .cuda() calls became .to(device)."""

    def __init__(self, encoder, device, dropout_rate=0.25):
        super().__init__()
        self.bert = encoder
        self.device = device
        h = encoder.config.hidden_size  # the notebook hard-coded DistilBERT's 768
        self.dropout = nn.Dropout(p=dropout_rate)
        self.feedforward_1 = nn.Linear(h * 2, 300)
        self.non_lin_1 = nn.PReLU()
        self.feedforward_2 = nn.Linear(300, 300)
        self.non_lin_2 = nn.PReLU()
        self.feedforward_3 = nn.Linear(300, 2)
        self.log_softmax = nn.LogSoftmax(dim=0)  # sic: over the batch, as in the notebook

    def forward(self, encoded_input_1, encoded_input_2, train=False):
        if train:
            self.train()
        else:
            self.eval()
        d = self.device
        pooler_output_1 = self.bert(encoded_input_1["input_ids"].to(d),
                                    encoded_input_1["attention_mask"].to(d)).last_hidden_state[:, 0, :]
        pooler_output_2 = self.bert(encoded_input_2["input_ids"].to(d),
                                    encoded_input_2["attention_mask"].to(d)).last_hidden_state[:, 0, :]
        concatenated_output = torch.cat([pooler_output_1, pooler_output_2], axis=1).to(d)
        f1 = self.dropout(self.non_lin_1(self.feedforward_1(concatenated_output)))
        f2 = self.dropout(self.non_lin_2(self.feedforward_2(f1)))
        return self.log_softmax(self.feedforward_3(f2))


def notebook_train_epoch(model, tokenizer, optimizer, X_1, X_2, Y, batch_size, device, num_classes=2):
    """One epoch of the notebook's train(); Adam is passed in so warm-up and timing share it.
    Returns (mean loss tensor, stats): stats has the seconds spent tokenizing and the tokens."""
    stats = {"data_wait_s": 0.0, "real_tokens": 0, "padded_tokens": 0, "pairs": 0}
    total_loss = 0.0
    (shuffled_input_1, shuffled_input_2, shuffled_labels) = shuffle_data(X_1, X_2, Y)
    for batch in range(0, len(X_1), batch_size):
        t0 = time.perf_counter()
        input_1 = shuffled_input_1[batch:(batch + batch_size)]
        input_2 = shuffled_input_2[batch:(batch + batch_size)]
        encoded_input_1 = tokenizer(input_1, return_tensors="pt", is_split_into_words=False, padding=True)
        encoded_input_2 = tokenizer(input_2, return_tensors="pt", is_split_into_words=False, padding=True)
        stats["data_wait_s"] += time.perf_counter() - t0
        for enc in (encoded_input_1, encoded_input_2):
            stats["real_tokens"] += int(enc["attention_mask"].sum())
            stats["padded_tokens"] += enc["attention_mask"].numel()
        labels = shuffled_labels[batch:(batch + batch_size)]
        labels_onehot = torch.zeros(len(labels), num_classes).to(device)
        for i in range(len(labels)):
            labels_onehot[i][labels[i]] = 1.0
        model.zero_grad()
        log_probs = model.forward(encoded_input_1, encoded_input_2, train=True)
        loss_batch = 0
        for idx in range(labels_onehot.shape[0]):
            loss_iteration = torch.neg(log_probs[idx]).dot(labels_onehot[idx])
            loss_batch += loss_iteration
        loss_batch /= labels_onehot.shape[0]
        loss_batch.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        total_loss += loss_batch.detach()
        stats["pairs"] += len(labels)
    num_batches = math.ceil(len(X_1) / batch_size)
    return total_loss / num_batches, stats


def notebook_get_predictions(model, tokenizer, X_1, X_2, batch_size=8):
    """The notebook's get_predictions (its tokenizer was a global; here an argument)."""
    all_predictions = np.array([])
    for batch in range(0, len(X_1), batch_size):
        encoded_input_1 = tokenizer(X_1[batch:batch + batch_size], return_tensors="pt",
                                    is_split_into_words=False, padding=True)
        encoded_input_2 = tokenizer(X_2[batch:batch + batch_size], return_tensors="pt",
                                    is_split_into_words=False, padding=True)
        log_probs = model.forward(encoded_input_1, encoded_input_2, train=False)
        prediction_batch = torch.argmax(log_probs, dim=1)
        all_predictions = np.concatenate((all_predictions, prediction_batch.cpu().numpy()))
    return all_predictions


def python_tokenizer(fast, folder):
    """The kind of tokenizer the notebook ran: transformers 4.12's DistilBertTokenizer was BERT's
    pure-Python WordPiece. Built from the fast one's vocabulary; None if that is not WordPiece."""
    import transformers
    from tokenizers.models import WordPiece
    vocab = fast.get_vocab()
    if not isinstance(fast.backend_tokenizer.model, WordPiece) or sorted(vocab.values()) != list(range(len(vocab))):
        return None
    path = os.path.join(folder, "vocab.txt")
    with open(path, "w", encoding="utf-8") as f:
        f.write("\n".join(sorted(vocab, key=vocab.get)) + "\n")
    cls = getattr(transformers, "BertTokenizerLegacy", None) or transformers.BertTokenizer  # v5 renamed it
    tok = cls(vocab_file=path, do_lower_case=getattr(fast, "do_lower_case", True))
    return None if tok.is_fast else tok


# ----------------------------------------------------------------------------- the peer

class PeerModel(nn.Module):
    """A siamese classifier as one writes it with transformers: the encoder called with its 2D
    attention mask, mean pooling, the (u, v, |u-v|, u*v) head of the same size as ours."""

    def __init__(self, encoder, head):
        super().__init__()
        self.encoder, self.head = encoder, head

    def embed(self, ids, mask):
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, H)
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * m).sum(1) / m.sum(1).clamp(min=1)  # (B, H)

    def forward(self, q1_ids, q1_mask, q2_ids, q2_mask):
        u, v = self.embed(q1_ids, q1_mask), self.embed(q2_ids, q2_mask)
        return self.head(torch.cat([u, v, (u - v).abs(), u * v], dim=-1))  # (B, 2)


def group_by_length(lengths, batch_size, seed, megabatch_mult=50):
    """HF's LengthGroupedSampler: shuffle, cut into megabatches of 50 batches, sort each by length
    (longest first), and put the longest batch first. Returns a list of index batches."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).tolist()
    mega = batch_size * megabatch_mult
    megabatches = [sorted(order[i:i + mega], key=lambda j: -lengths[j]) for i in range(0, len(order), mega)]
    flat = [j for m in megabatches for j in m]
    batches = [flat[i:i + batch_size] for i in range(0, len(flat), batch_size)]
    longest = max(range(len(batches)), key=lambda b: max(lengths[j] for j in batches[b]))
    batches.insert(0, batches.pop(longest))
    return batches


def pad_batch(seqs, pad_id):
    """DataCollatorWithPadding: (B, L) ids and mask, L the batch's longest."""
    length = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), length), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.from_numpy(np.asarray(s, dtype=np.int64))
        mask[r, :len(s)] = 1
    return ids, mask


def peer_train(model, dataset, rows, batch_size, device, amp_dtype, seed, optimizer, scheduler):
    """One pass of the peer loop over dataset[rows]; returns stats like bench's other sides."""
    items = [dataset[i] for i in rows]
    l1, l2 = dataset.question_lengths()
    lengths = (l1[rows] + l2[rows]).tolist()
    pad_id = dataset.manifest["pad_token_id"] or 0
    stats = {"data_wait_s": 0.0, "real_tokens": 0, "padded_tokens": 0, "pairs": 0}
    loss_sum = torch.zeros((), device=device)
    model.train()
    for batch in group_by_length(lengths, batch_size, seed):
        t0 = time.perf_counter()
        q1_ids, q1_mask = pad_batch([items[j][1] for j in batch], pad_id)
        q2_ids, q2_mask = pad_batch([items[j][2] for j in batch], pad_id)
        labels = torch.tensor([items[j][3] for j in batch])
        tensors = [t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t
                   for t in (q1_ids, q1_mask, q2_ids, q2_mask, labels)]
        stats["data_wait_s"] += time.perf_counter() - t0
        for m in (q1_mask, q2_mask):
            stats["real_tokens"] += int(m.sum())
            stats["padded_tokens"] += m.numel()
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            logits = model(*tensors[:4])
        loss = nn.functional.cross_entropy(logits.float(), tensors[4])
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach()
        stats["pairs"] += len(batch)
    stats["mean_loss"] = float(loss_sum) / max(1, math.ceil(len(rows) / batch_size))
    return stats
