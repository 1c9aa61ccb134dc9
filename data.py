"""The preprocessed data folder and the batches made from it.

- The folder (written by preprocess.py through write_data_dir, atomically): tokens.npy, offsets.npy,
  train/validation/test.npy, rejects.tsv and manifest.json, which records each file's size and
  sha256. load_manifest checks the format version and the files' sizes (hashes with verify="hash").
- PairDataset: one split over the memory-mapped token arrays, opened lazily in each process (so
  DataLoader workers each map the files themselves instead of pickling arrays).
- BucketBatchSampler: batches of pairs with similar lengths. Deterministic for (seed, epoch), every
  pair once per epoch, longest batch first (out-of-memory shows at step 0, not hours in), resumable
  from a batch position, shardable over DDP ranks with equal batch counts.
- Collator: tensors for three layouts,
    siamese:   each question of a pair is encoded alone; the sequences are the batch's q1s, then
               its q2s (with question_keys, q_key (2B,): equal for identical questions, for mnrl).
    cross:     one joined sequence per pair, [CLS] q1 [SEP] q2 [SEP], with segment ids.
    questions: single questions (QuestionDataset: index.py, search.py's queries, mining).
  in two forms, chosen by the --shapes flag of every script that batches (engine.batch_layout:
  packed on CUDA, exact on the CPU by default); model.Encoder.vectors reads both:
    exact:  the sequences sorted by length and cut into <= 2 padded groups where padding is least
            (seq_ids, seq_mask, seq_types: one encoder call each; seq_order says where each
            sequence landed). ~92% of tokens real on QQP with bucketed batches.
    packed: sequences packed whole into rows of max_len tokens (first-fit), each token attending
            only to its own sequence, positions restarting at each one: one encoder call of
            (rows, max_len), the row count a multiple of 4, always batch_size items (a short last
            batch filled with copies marked index -1). A handful of fixed shapes, so compiled
            kernels and CUDA graphs are built once per shape instead of once per batch.
"""
import json
import os
import shutil
import signal
import tempfile

import numpy as np
import torch

from cli import UserError
from text import NO_LABEL, file_sha256, unreadable

FORMAT_VERSION = 2  # of the folder preprocess.py writes; bump when the layout changes
SPLITS = ("train", "validation", "test")
LAYOUTS = ("siamese", "cross", "questions")  # what a batch's sequences are (Collator)
MAX_JOINED_LEN = 512  # a cross-encoder's joined pair is cut at this many tokens (BERT's positions)
ARRAY_FILES = ("tokens.npy", "offsets.npy", *(f"{s}.npy" for s in SPLITS))


# ----------------------------------------------------------------------------- the folder

def rerun_fix(data_dir, manifest=None):
    source = (manifest or {}).get("source", "train.csv")
    return f"re-run python preprocess.py {source} --out_dir {data_dir}"


def write_data_dir(out_dir, arrays, texts, manifest):
    """Write arrays ({name.npy: ndarray}), text files ({name: str}) and the manifest into out_dir,
    atomically: everything is built in a sibling temp folder that replaces out_dir in one rename,
    so an interrupted write is never mistaken for a finished folder. On any failure or
    interruption (disk full, a signal raised as an exception) no temp folder is left behind and an
    earlier folder is back in place. The manifest records each file's size and sha256."""
    out_dir = os.path.abspath(out_dir)
    tmp, old = f"{out_dir}.tmp-{os.getpid()}", f"{out_dir}.old-{os.getpid()}"
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        for name, arr in arrays.items():
            np.save(os.path.join(tmp, name), arr)
        for name, text in texts.items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text)
        manifest["files"] = {name: {"bytes": os.path.getsize(os.path.join(tmp, name)),
                                    "sha256": file_sha256(os.path.join(tmp, name))}
                             for name in sorted(os.listdir(tmp))}
        with open(os.path.join(tmp, "manifest.json"), "w") as f:
            json.dump(manifest, f, indent=1)
        if os.path.exists(out_dir):
            os.rename(out_dir, old)  # only ever a folder check_out_dir accepted: one of ours
        os.rename(tmp, out_dir)
    except BaseException:
        if os.path.isdir(old) and not os.path.exists(out_dir):
            os.rename(old, out_dir)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)
    return manifest


def check_out_file(path, inputs=(), overwrite=False, example="out.csv", side_files=(), make_folder=False):
    """--out: a file that is no input and lies in none (nor do the side_files written beside it,
    path + suffix), not a folder, new unless overwrite; its folder exists unless the script makes it."""
    written = [os.path.realpath(path + suffix) for suffix in ("", *side_files)]
    for p in (os.path.realpath(p) for p in inputs if p):
        if any(w == p or w.startswith(p + os.sep) for w in written):
            raise UserError(f"--out {path} is or lies in an input ({p}): writing would change it", "pass another --out")
    if os.path.isdir(path) or path.endswith(os.sep):
        raise UserError(f"--out {path} is a folder", f"pass a file path, e.g. --out {example}")
    if os.path.exists(path) and not overwrite:
        raise UserError(f"--out {path} exists", "pass --overwrite to replace it, or another --out")
    folder = os.path.dirname(os.path.abspath(path))
    if not make_folder and not os.path.isdir(folder):
        raise UserError(f"--out {path}: the folder {folder} does not exist", "create it, or pass another --out")


def check_writable(path, flag="--out_dir"):
    """Before any work: path (a file or folder to be written, existing or not; an existing file is
    replaced) can be created where it would go. Its nearest existing folder must be a folder and take a new file (a probe
    file, removed at once: permissions and read-only filesystems both show)."""
    parent = os.path.abspath(path)
    if os.path.isfile(parent):  # an existing file, to be replaced: its folder takes the new one
        parent = os.path.dirname(parent)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise UserError(f"{flag} {path}: {parent} is a file, so nothing can be written under it",
                        f"pass another {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=parent)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserError(f"{flag} {path}: {parent} is not writable ({e.strerror})",
                        f"pass a {flag} in a writable place") from None


class FolderLock:
    """An exclusive lock on an output folder for a run's life, so that two runs never write into
    one folder at once: <folder>.lock beside it holds the owner's pid, under fcntl.flock, which the
    kernel releases when the process ends in any way (kill -9 included), so a lock file left
    behind is recognised as stale and taken over. The second run gets a one-line error naming the
    first one's pid."""

    def __init__(self, folder, flag="--out_dir"):
        self.folder, self.flag = os.path.abspath(folder), flag
        self.path, self.file = self.folder + ".lock", None

    def __enter__(self):
        import fcntl
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            owner = self.file.read().strip() or "unknown"
            self.file.close()
            raise UserError(f"{self.flag} {self.folder} is in use by another run (pid {owner}, lock "
                            f"{self.path})", f"wait for it to finish, or pass another {self.flag}") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"{os.getpid()}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        try:
            os.remove(self.path)  # while still held: no other run can be between open and flock here
        except OSError:
            pass
        self.file.close()  # releases the flock


def check_apart_from_inputs(out_dir, inputs):
    """An output folder that is, holds or lies in an input would change or delete it."""
    out = os.path.realpath(out_dir)
    for p in (os.path.realpath(p) for p in inputs if p):
        if out == p or p.startswith(out + os.sep) or out.startswith(p + os.sep):
            raise UserError(f"--out_dir {out_dir} is, holds or lies in an input ({p})", "pass a folder of its own")


def check_out_dir(out_dir, inputs=(), what="a data folder", writer="preprocess.py"):
    """out_dir may be new, empty, or a folder of `what` that `writer` wrote (it will be replaced,
    so it must not be, hold or lie in one of the inputs)."""
    check_apart_from_inputs(out_dir, inputs)
    if os.path.isfile(out_dir):
        raise UserError(f"--out_dir {out_dir} is a file", f"pass a folder path (new or written by {writer})")
    if not os.path.isdir(out_dir) or not os.listdir(out_dir):
        return
    if not os.path.isfile(os.path.join(out_dir, "manifest.json")):
        raise UserError(f"--out_dir {out_dir} holds other files and no manifest.json, so it is not "
                        f"{what} {writer} wrote, and rebuilding would replace it",
                        "pass a new or empty folder")
    try:  # files its manifest does not list were put there by someone else: replacing would delete them
        with open(os.path.join(out_dir, "manifest.json")) as f:
            listed = json.load(f).get("files")
    except (OSError, ValueError, AttributeError):
        listed = None
    if not isinstance(listed, dict):
        return  # a damaged folder of ours: rebuilding it is the fix its loaders give
    foreign = sorted(set(os.listdir(out_dir)) - set(listed) - {"manifest.json"})
    if foreign:
        raise UserError(f"--out_dir {out_dir} holds files that {writer} did not write ({', '.join(foreign[:3])}"
                        f"{', ...' if len(foreign) > 3 else ''}), and rebuilding would delete them",
                        "move them out of the folder, or pass another --out_dir")


def load_manifest(data_dir, verify="size"):
    """The folder's manifest after checking its format and its files: each file recorded in it
    must exist with its recorded size (verify="hash": and sha256; None: no file check)."""
    path = os.path.join(data_dir, "manifest.json")
    if not os.path.exists(path):
        raise UserError(f"{data_dir}: no manifest.json, so not a folder preprocess.py wrote",
                        f"run python preprocess.py train.csv --out_dir {data_dir}")
    try:
        with open(path) as f:
            manifest = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: unreadable ({type(e).__name__})", rerun_fix(data_dir)) from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise UserError(f"{data_dir}: data format {version}, this code reads format {FORMAT_VERSION}",
                        rerun_fix(data_dir, manifest if isinstance(manifest, dict) else None))
    for name, rec in manifest.get("files", {}).items() if verify else ():
        file = os.path.join(data_dir, name)
        problem = None
        if not os.path.isfile(file):
            problem = "is missing"
        elif os.path.getsize(file) != rec["bytes"]:
            problem = f"has {os.path.getsize(file):,} bytes, the manifest says {rec['bytes']:,}"
        elif verify == "hash" and file_sha256(file) != rec["sha256"]:
            problem = "differs from what preprocess.py wrote (sha256)"
        if problem:
            raise UserError(f"{file} {problem}: the folder is damaged", rerun_fix(data_dir, manifest))
    return manifest


def fingerprint(manifest):
    """Identifies a data folder's content: everything preprocess.py's output depends on."""
    return json.dumps(manifest["cache_key"], sort_keys=True)


def load_array(data_dir, name, manifest, mmap=False):
    """One .npy of the folder; a damaged file is a UserError naming it."""
    path = os.path.join(data_dir, name)
    try:
        return np.load(path, mmap_mode="r" if mmap else None)
    except (OSError, ValueError, EOFError) as e:
        raise UserError(f"{path}: unreadable ({type(e).__name__}); the folder is damaged",
                        rerun_fix(data_dir, manifest)) from None


class PairDataset(torch.utils.data.Dataset):
    """Items are (pair index, q1 token ids, q2 token ids, label) of one split of a data folder.
    The token array is memory-mapped on first use, in the process that uses it."""

    def __init__(self, data_dir, split):
        if split not in SPLITS:
            raise ValueError(f"split '{split}': use one of {SPLITS}")
        self.data_dir = data_dir
        self.manifest = load_manifest(data_dir)
        self._tokens = None
        # Pairs and offsets are small (12 and 8 bytes each): load them now, for lengths().
        self.pairs = load_array(data_dir, f"{split}.npy", self.manifest)  # (N, 3) q1, q2, label
        self.offsets = load_array(data_dir, "offsets.npy", self.manifest)  # (Q+1,)
        if self.pairs.ndim != 2 or self.pairs.shape[1] != 3 or \
                (len(self.pairs) and self.pairs[:, :2].max() >= len(self.offsets) - 1):
            raise UserError(f"{data_dir}/{split}.npy does not fit offsets.npy: the folder is damaged",
                            rerun_fix(data_dir, self.manifest))

    @property
    def tokens(self):
        if self._tokens is None:
            tokens = load_array(self.data_dir, "tokens.npy", self.manifest, mmap=True)
            if len(tokens) != self.offsets[-1]:
                raise UserError(f"{self.data_dir}/tokens.npy holds {len(tokens):,} tokens, offsets.npy "
                                f"expects {self.offsets[-1]:,}: the folder is damaged",
                                rerun_fix(self.data_dir, self.manifest))
            # Still memory-mapped; a plain ndarray view slices faster than np.memmap.
            self._tokens = np.asarray(tokens)
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

    def __getitems__(self, indices):
        """A whole batch's items, as __getitem__ gives them (the DataLoader calls this when it
        exists): one vectorized lookup of pairs and offsets instead of one per item, which was a
        third of a batch's preparation."""
        rows = np.asarray(self.pairs[np.asarray(indices)], dtype=np.int64)  # (B, 3)
        o, t = self.offsets, self.tokens
        s1, e1, s2, e2 = (o[rows[:, 0]], o[rows[:, 0] + 1], o[rows[:, 1]], o[rows[:, 1] + 1])
        return [(i, t[a:b], t[c:d], label) for i, a, b, c, d, label in
                zip(indices, s1.tolist(), e1.tolist(), s2.tolist(), e2.tolist(), rows[:, 2].tolist())]


class InMemoryPairs(PairDataset):
    """The same items from arrays in memory (raw CSVs tokenized on the fly, predict.py's inputs).
    pairs (N, 3) holds q1, q2, label (negative when unknown)."""

    def __init__(self, tokens, offsets, pairs, pad_token_id):
        self._tokens, self.offsets, self.pairs = tokens, offsets, pairs
        self.manifest = {"pad_token_id": pad_token_id}


# ----------------------------------------------------------------------------- batches

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


def pack(lengths, row_len):
    """First-fit decreasing: place sequences (each <= row_len tokens) into rows of row_len, each
    into the first row with room, longest first. Returns (row, start) per sequence and the rows
    used; QQP's short questions fill ~97% of each row."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    free, row, start = [], np.empty(len(lengths), np.int64), np.empty(len(lengths), np.int64)
    for i in order.tolist():
        n = int(lengths[i])
        r = next((k for k, f in enumerate(free) if f >= n), len(free))
        if r == len(free):
            free.append(row_len)
        row[i], start[i] = r, row_len - free[r]
        free[r] -= n
    return row, start, len(free)


class Collator:
    """List of dataset items -> dict of tensors (see the module docstring for layouts and forms).

    Every batch has index (B,) (-1: a fill item); pair batches also labels (B,). The sequences
    (siamese: the 2B questions, q1s then q2s; cross: the B joined pairs; questions: the B
    questions) come as
    exact (row_len=None): seq_ids, seq_mask (and seq_types for cross), lists of (n_g, L_g) padded
      groups, <= `chunks` of them cut where padding is least; seq_order (n,) the row of each
      sequence in their concatenation.
    packed (row_len set): always batch_size items (a short batch is filled with copies of its
      first item, index -1, label NO_LABEL); the sequences packed into rows of row_len tokens,
      the row count rounded up to a multiple of row_multiple: packed_ids, packed_pos (position
      inside its sequence), packed_seg (which sequence, -1 on padding), packed_types (cross)."""

    def __init__(self, layout, pad_id, chunks=2, batch_size=None, row_len=None, row_multiple=4,
                 max_joined_len=MAX_JOINED_LEN, question_keys=False):
        if layout not in LAYOUTS:
            raise ValueError(f"layout '{layout}': use one of {LAYOUTS}")
        if row_len is not None and batch_size is None:
            raise ValueError("packed batches need their batch_size")
        self.layout, self.pad_id, self.chunks = layout, pad_id, chunks
        self.batch_size, self.row_len, self.row_multiple = batch_size, row_len, row_multiple
        self.max_joined_len, self.question_keys = max_joined_len, question_keys

    def pad(self, seqs, value):
        """Sequences -> (n, L) values padded with `value`, and the 0/1 mask; L the longest."""
        lens = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
        mask = np.arange(int(lens.max()))[None, :] < lens[:, None]  # (n, L) True on real tokens
        ids = np.full(mask.shape, value, dtype=np.int64)
        ids[mask] = np.concatenate(seqs)  # row-major: fills each row's real tokens in order
        return torch.from_numpy(ids), torch.from_numpy(mask.astype(np.int64))

    def exact(self, seqs, types=None):
        """Sequences -> padded groups of similar length: seq_ids, seq_mask (, seq_types), seq_order."""
        lens = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
        order = np.argsort(lens, kind="stable")
        cuts = best_cuts(lens[order], self.chunks)
        out = {"seq_ids": [], "seq_mask": [], **({"seq_types": []} if types is not None else {})}
        for start, end in zip([0] + cuts[:-1], cuts):
            members = order[start:end].tolist()
            ids, mask = self.pad([seqs[k] for k in members], self.pad_id)  # (n_g, L_g) each
            out["seq_ids"].append(ids)
            out["seq_mask"].append(mask)
            if types is not None:
                out["seq_types"].append(self.pad([types[k] for k in members], 0)[0])
        row = np.empty(len(seqs), dtype=np.int64)
        row[order] = np.arange(len(seqs))  # row of each sequence in cat(seq_ids)
        out["seq_order"] = torch.from_numpy(row)
        return out

    def packed(self, seqs, types=None):
        """Sequences -> (R, row_len) packed_ids, packed_pos, packed_seg (and packed_types)."""
        lens = np.fromiter(map(len, seqs), dtype=np.int64, count=len(seqs))
        row, start, n_rows = pack(lens, self.row_len)
        n_rows = -(-n_rows // self.row_multiple) * self.row_multiple
        ids = np.full((n_rows, self.row_len), self.pad_id, dtype=np.int64)
        pos = np.zeros((n_rows, self.row_len), dtype=np.int64)
        seg = np.full((n_rows, self.row_len), -1, dtype=np.int64)
        flat = row * self.row_len + start  # where each sequence begins in the flattened rows
        at = np.repeat(flat, lens) + (np.arange(lens.sum()) - np.repeat(np.cumsum(lens) - lens, lens))
        ids.flat[at] = np.concatenate(seqs)
        pos.flat[at] = at - np.repeat(flat, lens)
        seg.flat[at] = np.repeat(np.arange(len(seqs)), lens)
        out = {"packed_ids": torch.from_numpy(ids), "packed_pos": torch.from_numpy(pos),
               "packed_seg": torch.from_numpy(seg)}
        if types is not None:
            tt = np.zeros((n_rows, self.row_len), dtype=np.int64)
            tt.flat[at] = np.concatenate(types)
            out["packed_types"] = torch.from_numpy(tt)
        return out

    def sequences(self, seqs, types=None):
        return self.exact(seqs, types) if self.row_len is None else self.packed(seqs, types)

    def join(self, a, b):
        """One cross-encoder sequence: [CLS] q1 [SEP] q2 [SEP] and its segment ids. Over
        max_joined_len the budget is shared: the shorter question keeps its length up to half of
        it, and each trimmed question keeps its final [SEP]."""
        b = b[1:]  # q2 without its [CLS]
        if len(a) + len(b) > self.max_joined_len:
            n_b = min(len(b), max(self.max_joined_len // 2, self.max_joined_len - len(a)))
            n_a = self.max_joined_len - n_b
            a, b = np.r_[a[:n_a - 1], a[-1:]], np.r_[b[:n_b - 1], b[-1:]]
        return np.concatenate([a, b]), np.r_[np.zeros(len(a), np.int64), np.ones(len(b), np.int64)]

    def __call__(self, items):
        if self.row_len is not None and len(items) < self.batch_size:
            # A short (last) batch keeps the fixed item count: copies of its first item, ignored.
            fill = (-1, *items[0][1:-1], NO_LABEL) if self.layout != "questions" else (-1, items[0][1])
            items = list(items) + [fill] * (self.batch_size - len(items))
        if self.layout == "questions":
            index, questions = zip(*items)
            return {"index": torch.tensor(index, dtype=torch.int64), **self.sequences(list(questions))}
        index, q1, q2, labels = zip(*items)
        batch = {"index": torch.tensor(index, dtype=torch.int64),
                 "labels": torch.tensor(labels, dtype=torch.int64)}  # (B,), NO_LABEL where unknown
        if self.layout == "siamese":
            questions = q1 + q2  # (2B,) q1 of every pair, then q2 of every pair
            if self.question_keys:  # only when asked: it costs a sixth of a batch's collation
                # Equal keys for identical questions: the in-batch negatives of mnrl must not
                # include a copy of the query or of its answer.
                keys = {}
                batch["q_key"] = torch.tensor([keys.setdefault(q.tobytes(), len(keys)) for q in questions])  # (2B,)
            batch.update(self.sequences(list(questions)))
            return batch
        joined, types = zip(*(self.join(a, b) for a, b in zip(q1, q2)))
        batch.update(self.sequences(list(joined), list(types)))
        return batch


class QuestionDataset(torch.utils.data.Dataset):
    """Single questions, for embedding (index.py, search.py's queries, mining): items (question
    index, token ids) over flat token arrays (text.tokenize's, or a data folder's tokens.npy /
    offsets.npy)."""

    def __init__(self, tokens, offsets, pad_token_id, max_len):
        self.tokens, self.offsets = tokens, offsets
        self.manifest = {"pad_token_id": pad_token_id, "max_len": max_len}

    def __len__(self):
        return len(self.offsets) - 1

    def lengths(self, layout="questions"):
        return np.diff(self.offsets)

    def __getitem__(self, i):
        return i, self.tokens[self.offsets[i]:self.offsets[i + 1]]


def padding_stats(batch):
    """(real tokens, padded tokens) of a collated batch: how much encoder work is real. Fill
    items count as padding."""
    fill = (batch["index"] < 0).numpy()
    n = len(fill)
    if "packed_seg" in batch:
        seg = batch["packed_seg"].numpy()
        per_seq = np.bincount(seg[seg >= 0], minlength=2 * n)  # tokens per packed sequence
        padded = seg.size
    else:
        per_seq = torch.cat([m.sum(1) for m in batch["seq_mask"]])[batch["seq_order"]].numpy()
        padded = sum(m.numel() for m in batch["seq_mask"])
    per_item = per_seq[:n] + per_seq[n:2 * n] if sequences_per_item(batch) == 2 else per_seq[:n]
    return int(per_item[~fill].sum()), padded


def sequences_per_item(batch):
    """2 in siamese pair batches (the q1s, then the q2s), 1 in cross pairs (segment ids) and
    single questions (no labels)."""
    return 2 if "labels" in batch and "seq_types" not in batch and "packed_types" not in batch else 1


def shapes_of(batch):
    """The tensor shapes an encoder sees for this batch: one (rows, length) per encoder call."""
    if "packed_ids" in batch:
        return (tuple(batch["packed_ids"].shape),)
    return tuple(tuple(t.shape) for t in batch["seq_ids"])


def to_device(batch, device):
    """Move a collated batch (tensors and lists of tensors); non_blocking pairs with pinned memory."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return [to_device(v, device) for v in batch]
    return batch


def leave_signals_to_main(worker_id):
    """A DataLoader worker ignores Ctrl-C and SIGTERM: sent to the whole process group (a terminal,
    timeout, a batch scheduler), they would kill it under the training process, which then fails
    mid-save instead of finishing its step, saving and exiting (engine.StopSignal); the loader
    shuts its workers down itself."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def make_loader(dataset, layout, batch_size, *, shuffle, seed=0, num_replicas=1, rank=0,
                num_workers=0, pin_memory=False, chunks=2, packed=False, max_len=None, question_keys=False):
    """A DataLoader over a dataset (a split's pairs, or QuestionDataset's questions with layout
    "questions") with the bucketed sampler; returns (loader, sampler).
    packed: the Collator's packed rows of max_len tokens (cross: the longest joined pair), in
    random batches: packing needs no length buckets, and random batches carry about the same
    number of tokens, so the row count barely varies (scoring too: order is irrelevant there).
    Workers persist across epochs (set_epoch acts here: the sampler runs in this process).
    question_keys: siamese batches also carry q_key (objectives.mnrl_loss needs it)."""
    sampler = BucketBatchSampler(dataset.lengths(layout), batch_size, seed=seed, shuffle=shuffle or packed,
                                 num_replicas=num_replicas, rank=rank, bucket_batches=1 if packed else 100)
    row_len = None
    if packed:
        max_len = max_len or int(dataset.manifest.get("max_len") or 128)
        row_len = min(2 * max_len - 1, MAX_JOINED_LEN) if layout == "cross" else max_len
    collate = Collator(layout, dataset.manifest["pad_token_id"] or 0, chunks=chunks,
                       batch_size=batch_size, row_len=row_len, question_keys=question_keys)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                         num_workers=num_workers, pin_memory=pin_memory,
                                         persistent_workers=num_workers > 0, worker_init_fn=leave_signals_to_main,
                                         # Its own generator: creating an iterator draws a worker
                                         # seed, which must not move the global RNG (exact resume).
                                         generator=torch.Generator().manual_seed(seed))
    return loader, sampler


# ----------------------------------------------------------------------------- opening inputs

def open_data_dir(data_dir, tok_hash, encoder):
    """The folder's manifest, after checking its format, its files, and that the model's
    vocabulary made it."""
    from text import check_vocab
    manifest = load_manifest(data_dir)
    check_vocab(manifest, tok_hash, encoder, data_dir)
    if manifest["split_policy"] == "random":
        print(f"note: {data_dir} was split at random (the notebook's policy): its validation and test "
              "questions also occur in train, so their metrics are optimistic")
    return manifest


def open_splits(data_dir, split):
    """({name: dataset} to report, the validation dataset to tune thresholds on); split is one of
    SPLITS or 'all'."""
    names = SPLITS if split == "all" else (split,)
    validation = PairDataset(data_dir, "validation")
    return {s: validation if s == "validation" else PairDataset(data_dir, s) for s in names}, validation


def unreadable_pairs(tok, dataset):
    """(N,) bool: the dataset's pairs with a question the vocabulary cannot read (text.unreadable)."""
    bad = unreadable(tok, dataset.tokens, dataset.offsets)  # (Q,)
    return bad[dataset.pairs[:, 0]] | bad[dataset.pairs[:, 1]]


def pairs_from_file(path, tok, max_len, pad_token_id, require_label=True):
    """A raw CSV/TSV of pairs, tokenized like the training data.
    Returns (InMemoryPairs, the pairs dict of text.read_pairs, rejects, rows_read)."""
    from text import encode_pairs, read_pairs
    pairs, rejects, rows_read = read_pairs(path, require_label=require_label)
    labels = pairs["label"] if pairs["label"] is not None else [NO_LABEL] * len(pairs["q1"])
    tokens, offsets, triples = encode_pairs(tok, pairs["q1"], pairs["q2"], labels, max_len)
    return InMemoryPairs(tokens, offsets, triples, pad_token_id), pairs, rejects, rows_read
