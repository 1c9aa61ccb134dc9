"""Batches of question pairs from the arrays preprocess.py wrote.

- PairDataset: one split over the memory-mapped token arrays, opened lazily in each process (so
  DataLoader workers each map the files themselves instead of pickling arrays).
- BucketBatchSampler: batches of pairs with similar lengths. Deterministic for (seed, epoch), every
  pair once per epoch, longest batch first (out-of-memory shows at step 0, not hours in), resumable
  from a batch position, shardable over DDP ranks with equal batch counts.
- Collator: padded tensors for the two layouts,
    siamese: the 2B questions of a batch, sorted by length and cut into at most `max_chunks` groups
             at the cut that minimizes padding; each group is one padded (n, L) tensor and one
             encoder call. q1_pos/q2_pos say where each pair's questions landed. (Padding q1 and q2
             separately wastes ~19% of tokens even with bucketing: pairs join long and short questions.)
    cross:   one joined sequence per pair, [CLS] q1 [SEP] q2 [SEP], with segment ids.
"""
import json
import os

import numpy as np
import torch

FORMAT_VERSION = 1  # of the folder preprocess.py writes; bump when the layout changes
SPLITS = ("train", "validation", "test")


class DataError(Exception):
    """Bad input data: scripts print the message as one line and exit with code 2."""


def load_manifest(data_dir):
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.exists(path):
        raise DataError(f"{data_dir}: no manifest.json. HINT: run python preprocess.py train.csv "
                        f"--out_dir {data_dir}")
    with open(path) as f:
        manifest = json.load(f)
    if manifest.get("format_version") != FORMAT_VERSION:
        raise DataError(f"{data_dir}: data format {manifest.get('format_version')}, this code reads "
                        f"format {FORMAT_VERSION}. HINT: re-run preprocess.py with --out_dir {data_dir}")
    return manifest


def fingerprint(manifest):
    """Identifies a data folder's content: everything preprocess.py's output depends on."""
    return json.dumps(manifest["cache_key"], sort_keys=True)


def check_tokenizer(manifest, vocab_hash, model_name, data_dir):
    """The data must have been tokenized with the model's own vocabulary."""
    if manifest["vocab_hash"] != vocab_hash:
        raise DataError(f"{data_dir} was tokenized with '{manifest['tokenizer']}', whose vocabulary "
                        f"differs from '{model_name}'s. HINT: re-run python preprocess.py "
                        f"{manifest['source']} --model {model_name} --out_dir {data_dir}")


class PairDataset(torch.utils.data.Dataset):
    """Items are (pair index, q1 token ids, q2 token ids, label) of one split of a data folder.
    The token array is memory-mapped on first use, in the process that uses it."""

    def __init__(self, data_dir, split):
        if split not in SPLITS:
            raise ValueError(f"split '{split}': use one of {SPLITS}")
        self.manifest = load_manifest(data_dir)
        self.tokens_path = os.path.join(data_dir, "tokens.npy")
        self._tokens = None
        # Pairs and offsets are small (12 and 8 bytes each): load them now, for lengths().
        self.pairs = np.load(os.path.join(data_dir, f"{split}.npy"))  # (N, 3) q1, q2, label
        self.offsets = np.load(os.path.join(data_dir, "offsets.npy"))  # (Q+1,)

    @property
    def tokens(self):
        if self._tokens is None:
            # Still memory-mapped; a plain ndarray view slices faster than np.memmap.
            self._tokens = np.asarray(np.load(self.tokens_path, mmap_mode="r"))
        return self._tokens

    def __len__(self):
        return len(self.pairs)

    @property
    def labels(self):
        return self.pairs[:, 2]

    def question_lengths(self):
        """(N,), (N,) token counts of q1 and q2."""
        q_len = np.diff(self.offsets)
        return q_len[self.pairs[:, 0]], q_len[self.pairs[:, 1]]

    def lengths(self, layout):
        """Per-pair length the sampler buckets on."""
        l1, l2 = self.question_lengths()
        return np.maximum(l1, l2) if layout == "siamese" else l1 + l2 - 1

    def __getitem__(self, i):
        a, b, label = self.pairs[i]
        o, t = self.offsets, self.tokens
        return i, t[o[a]:o[a + 1]], t[o[b]:o[b + 1]], int(label)


class InMemoryPairs(PairDataset):
    """The same items from arrays in memory (raw CSVs tokenized on the fly, predict.py's inputs).
    pairs (N, 3) holds q1, q2, label (-1 when unknown)."""

    def __init__(self, tokens, offsets, pairs, pad_token_id):
        self._tokens, self.offsets, self.pairs = tokens, offsets, pairs
        self.manifest = {"pad_token_id": pad_token_id}


class BucketBatchSampler(torch.utils.data.Sampler):
    """Length-bucketed batches of pair indices.

    Shuffled pairs are cut into chunks of `bucket_batches` global batches, sorted by length inside
    each chunk and cut into batches; the batch order is shuffled, and the longest batch goes first.
    With DDP, each global batch of batch_size * num_replicas pairs is split into one slice per rank,
    so N ranks see exactly the pairs one process would see with an N-times larger batch.
    shuffle=False sorts the whole split by length (fastest for evaluation; order is irrelevant).
    """

    def __init__(self, lengths, batch_size, seed=0, shuffle=True, num_replicas=1, rank=0,
                 bucket_batches=100):
        self.lengths = np.asarray(lengths)
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.num_replicas, self.rank, self.bucket_batches = num_replicas, rank, bucket_batches
        self.epoch, self.start_batch = 0, 0

    def set_epoch(self, epoch, start_batch=0):
        """Select the epoch's batches; skip the first `start_batch` of them (resume)."""
        self.epoch, self.start_batch = epoch, start_batch

    def global_batches(self, epoch):
        n, gbs = len(self.lengths), self.batch_size * self.num_replicas
        if not self.shuffle:  # longest first here too: out-of-memory shows on the first batch
            order = np.argsort(-self.lengths, kind="stable")
            return [order[i:i + gbs] for i in range(0, n, gbs)]
        rng = np.random.default_rng([self.seed, epoch])
        perm = rng.permutation(n)
        batches = []
        chunk = gbs * self.bucket_batches
        for start in range(0, n, chunk):
            c = perm[start:start + chunk]
            c = c[np.argsort(self.lengths[c], kind="stable")]
            batches += [c[i:i + gbs] for i in range(0, len(c), gbs)]
        batches = [batches[i] for i in rng.permutation(len(batches))]
        longest = max(range(len(batches)), key=lambda i: self.lengths[batches[i]].max())
        batches.insert(0, batches.pop(longest))
        return batches

    def shard(self, batch):
        """This rank's slice of a global batch."""
        if self.num_replicas == 1:
            return batch
        if len(batch) < self.num_replicas:  # tiny last batch: repeat pairs so every rank has one
            batch = np.resize(batch, self.num_replicas)
        return np.array_split(batch, self.num_replicas)[self.rank]

    def global_sizes(self, epoch):
        """Pairs in each global batch (all ranks together) of an epoch."""
        return [max(len(b), self.num_replicas) for b in self.global_batches(epoch)]

    def __iter__(self):
        for batch in self.global_batches(self.epoch)[self.start_batch:]:
            yield self.shard(batch).tolist()

    def __len__(self):
        n_batches = -(-len(self.lengths) // (self.batch_size * self.num_replicas))
        return n_batches - self.start_batch


def best_cuts(sorted_lengths, max_chunks):
    """Cut points splitting sorted lengths into <= max_chunks groups with the fewest padded tokens
    (each group padded to its last, longest member): dynamic programming over distinct lengths,
    vectorized over group starts and ends (this runs once per batch)."""
    values, counts = np.unique(sorted_lengths, return_counts=True)
    ends = np.concatenate([[0], np.cumsum(counts)])  # ends[j]: items holding the first j values
    n = len(values)
    # span[i, c]: padded tokens of one group holding distinct values i..c (c >= i)
    span = (ends[None, 1:] - ends[:-1, None]) * values[None, :].astype(np.float64)
    span[np.tril_indices(n, -1)] = np.inf
    cost = np.r_[0.0, np.full(n, np.inf)]  # cost[j]: fewest padded tokens covering the first j values
    back, best_total, best_m = [], np.inf, 0
    for m in range(1, max_chunks + 1):
        total = cost[:-1, None] + span  # (start i, last value c)
        start = total.argmin(0)  # best start of the last group, for each last value
        cost = np.r_[np.inf, total[start, np.arange(n)]]
        back.append(start)
        if cost[n] < best_total:  # strictly better: fewer groups win ties
            best_total, best_m = cost[n], m
    cuts, j = [], n
    for m in range(best_m, 0, -1):
        cuts.append(int(ends[j]))
        j = int(back[m - 1][j - 1])
    return sorted(cuts)  # end positions (exclusive) of each group


def pad_to_bucket(length, multiple):
    return -(-length // multiple) * multiple if multiple > 1 else length


class Collator:
    """List of dataset items -> dict of tensors (see the module docstring for the layouts)."""

    def __init__(self, layout, pad_id, max_chunks=2, pad_multiple=1, max_joined_len=512):
        if layout not in ("siamese", "cross"):
            raise ValueError(f"layout '{layout}': use 'siamese' or 'cross'")
        self.layout, self.pad_id, self.max_chunks = layout, pad_id, max_chunks
        # pad_multiple > 1 rounds lengths up to a few fixed shapes (for torch.compile / CUDA graphs).
        self.pad_multiple, self.max_joined_len = pad_multiple, max_joined_len

    def pad(self, seqs):
        lens = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
        length = pad_to_bucket(int(lens.max()), self.pad_multiple)
        mask = np.arange(length)[None, :] < lens[:, None]  # (n, L) True on real tokens
        ids = np.full((len(seqs), length), self.pad_id, dtype=np.int64)
        ids[mask] = np.concatenate(seqs)  # row-major: fills each row's real tokens in order
        return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))

    def __call__(self, items):
        index, q1, q2, labels = zip(*items)
        batch = {"index": torch.tensor(index, dtype=torch.int64),
                 "labels": torch.tensor(labels, dtype=torch.int64)}
        if self.layout == "siamese":
            questions = q1 + q2  # (2B,) q1 of every pair, then q2 of every pair
            q_len = np.array([len(q) for q in questions])
            order = np.argsort(q_len, kind="stable")
            cuts = best_cuts(q_len[order], self.max_chunks)
            ids, masks = [], []
            for start, end in zip([0] + cuts[:-1], cuts):
                i, m = self.pad([questions[k] for k in order[start:end]])  # (n, L) each
                ids.append(i)
                masks.append(m)
            pos = np.empty(len(questions), dtype=np.int64)
            pos[order] = np.arange(len(questions))  # row of each question in cat(ids)
            B = len(q1)
            batch.update(q_ids=ids, q_mask=masks,
                         q1_pos=torch.from_numpy(pos[:B]), q2_pos=torch.from_numpy(pos[B:]))
        else:
            joined, types = [], []
            for a, b in zip(q1, q2):
                b = b[1:]  # q2 without its [CLS]: [CLS] q1 [SEP] q2 [SEP]
                if len(a) + len(b) > self.max_joined_len:
                    # Share the budget: the shorter question keeps its length up to half of it;
                    # each trimmed question keeps its final [SEP].
                    n_b = min(len(b), max(self.max_joined_len // 2, self.max_joined_len - len(a)))
                    n_a = self.max_joined_len - n_b
                    a, b = np.r_[a[:n_a - 1], a[-1:]], np.r_[b[:n_b - 1], b[-1:]]
                joined.append(np.concatenate([a, b]))
                types.append(np.r_[np.zeros(len(a), np.int64), np.ones(len(b), np.int64)])
            ids, mask = self.pad(joined)
            token_types = torch.zeros_like(ids)
            for r, t in enumerate(types):
                token_types[r, :len(t)] = torch.from_numpy(t)
            batch.update(input_ids=ids, attention_mask=mask, token_type_ids=token_types)
        return batch


def padding_stats(batch):
    """(real tokens, padded tokens) of a collated batch: how much encoder work is real."""
    masks = batch["q_mask"] if "q_mask" in batch else [batch["attention_mask"]]
    return sum(int(m.sum()) for m in masks), sum(m.numel() for m in masks)


def to_device(batch, device):
    """Move a collated batch (tensors and lists of tensors); non_blocking pairs with pinned memory."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return [to_device(v, device) for v in batch]
    return batch


def make_loader(dataset, layout, batch_size, *, shuffle, seed=0, num_replicas=1, rank=0,
                num_workers=0, pin_memory=False, max_chunks=2, pad_multiple=1):
    """A DataLoader over one split with the bucketed sampler; returns (loader, sampler)."""
    sampler = BucketBatchSampler(dataset.lengths(layout), batch_size, seed=seed, shuffle=shuffle,
                                 num_replicas=num_replicas, rank=rank)
    collate = Collator(layout, dataset.manifest["pad_token_id"] or 0, max_chunks=max_chunks,
                       pad_multiple=pad_multiple)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=num_workers, pin_memory=pin_memory,
                                         # Its own generator: creating an iterator draws a worker
                                         # seed, which must not move the global RNG (exact resume).
                                         generator=torch.Generator().manual_seed(seed))
    return loader, sampler
