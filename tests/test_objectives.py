"""objectives.py: each training loss computed by hand, each lowering itself on a planted task, and
train.py's --loss / --both_orders flags."""
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_BERT
from test_model import first_batch, no_dropout

import train
from data import Collator, PairDataset
from model import ModelConfig, build_model, pair_loss
from objectives import Objective, batch_loss, mnrl_loss, online_contrastive_loss
from text import NO_LABEL


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


def test_mnrl_by_hand_and_its_masks():
    """Two duplicate pairs and a non-duplicate: each duplicate's q1 must pick its own q2 among every
    q2 (and the reverse); the non-duplicate adds no term but its questions are negatives."""
    u = unit([1, 0, 0], [0, 1, 0], [0, 0, 1])
    v = unit([1, 0.2, 0], [0.3, 1, 0], [0, 0.5, 1])
    labels = torch.tensor([1, 1, 0])
    keys = torch.arange(6)  # all questions distinct
    scale = 10.0
    sim = scale * u @ v.T
    expected = sum((F.cross_entropy(sim[i:i + 1], torch.tensor([i])) +
                    F.cross_entropy(sim.T[i:i + 1], torch.tensor([i]))) / 2 for i in (0, 1))
    assert mnrl_loss(u, v, labels, keys, scale).item() == pytest.approx(expected.item(), rel=1e-6)

    # q2 of pair 2 is the same question as q2 of pair 0 (a hub): it is no negative for pair 0, so
    # the loss is pair 0's loss with that candidate removed; a fill pair is no candidate at all.
    same = torch.tensor([0, 1, 2, 3, 4, 3])
    v_same = torch.stack([v[0], v[1], v[0]])
    sim = scale * u @ v_same.T
    row0 = F.cross_entropy(sim[0:1, :2], torch.tensor([0]))  # candidates 0 and 1 only
    col0 = F.cross_entropy(sim.T[0:1], torch.tensor([0]))  # q1s: all distinct, all negatives
    got = mnrl_loss(u, v_same, torch.tensor([1, 0, 0]), same, scale)
    assert got.item() == pytest.approx(((row0 + col0) / 2).item(), rel=1e-6)
    filled = mnrl_loss(u, v, torch.tensor([1, 1, NO_LABEL]), keys, scale)
    sim = scale * u[:2] @ v[:2].T
    expected = sum((F.cross_entropy(sim[i:i + 1], torch.tensor([i])) +
                    F.cross_entropy(sim.T[i:i + 1], torch.tensor([i]))) / 2 for i in (0, 1))
    assert filled.item() == pytest.approx(expected.item(), rel=1e-6)


def test_online_contrastive_counts_only_hard_pairs():
    # distances d = 1 - cos: duplicates 0.0 and 0.6, non-duplicates 0.4 and 1.0
    angle = [math.acos(1 - d) for d in (0.0, 0.6, 0.4, 1.0)]
    u = torch.tensor([[1.0, 0.0]] * 4)
    v = torch.tensor([[math.cos(a), math.sin(a)] for a in angle])
    labels = torch.tensor([1, 1, 0, 0])
    # hard duplicate: 0.6 > closest non-duplicate 0.4; hard non-duplicate: 0.4 < farthest duplicate 0.6
    expected = 0.6 ** 2 + max(0.0, 0.5 - 0.4) ** 2
    assert online_contrastive_loss(u, v, labels, 0.5).item() == pytest.approx(expected, abs=1e-5)
    # fill pairs take part in neither role
    labels_fill = torch.tensor([1, 1, NO_LABEL, 0])
    assert online_contrastive_loss(u, v, labels_fill, 0.5).item() == pytest.approx(0.0, abs=1e-6)


def test_both_orders_is_the_mean_of_the_two_orders(tiny_data):
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder_config=no_dropout(TINY_BERT))).eval()
    batch = first_batch(tiny_data, "siamese")
    u, v = model.embed_pair(batch)
    expected = (pair_loss(model.pair_logits(u, v), batch["labels"]) +
                pair_loss(model.pair_logits(v, u), batch["labels"])) / 2
    got = batch_loss(model, batch, Objective(both_orders=True))
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)
    assert (model.pair_logits(u, v) - model.pair_logits(v, u)).abs().max() > 1e-4  # the orders differ


def test_collator_keys_identical_questions_alike(tiny_data):
    ds = PairDataset(tiny_data, "train")
    items = [ds[i] for i in range(64)]
    batch = Collator("siamese", ds.manifest["pad_token_id"], question_keys=True)(items)
    assert "q_key" not in Collator("siamese", ds.manifest["pad_token_id"])(items)  # only when asked
    questions = [q for _, q, _, _ in items] + [q for _, _, q, _ in items]
    keys = batch["q_key"].tolist()
    for i in range(len(questions)):
        for j in range(len(questions)):
            assert (keys[i] == keys[j]) == (questions[i].tobytes() == questions[j].tobytes())
    assert len(set(keys)) < len(keys)  # the synthetic rows reuse questions: the masks matter here


@pytest.mark.parametrize("loss", ["ce+mnrl", "ce+contrastive"])
def test_each_objective_lowers_its_own_term(tiny_data, loss):
    """On the planted task (a duplicate shares frame and subject), 60 steps of ce + the term lower
    that term, measured with dropout off on the same fixed batches, by at least a third."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder_config=no_dropout(TINY_BERT), dropout=0.0))
    ds = PairDataset(tiny_data, "train")
    collate = Collator("siamese", ds.manifest["pad_token_id"], question_keys=True)
    batches = [collate([ds[i] for i in range(32 * k, 32 * k + 32)]) for k in range(4)]
    term = mnrl_loss if loss == "ce+mnrl" else online_contrastive_loss

    def measure():
        model.eval()
        with torch.no_grad():
            total = 0.0
            for b in batches:
                _, _, u, v = model(b, with_vectors=True)
                args = (b["q_key"], 20.0) if term is mnrl_loss else (0.5,)
                total += term(u, v, b["labels"], *args).item()
        model.train()
        return total

    before = measure()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    objective = Objective(loss=loss)
    for step in range(60):
        b = batches[step % len(batches)]
        opt.zero_grad()
        (batch_loss(model, b, objective) / len(b["labels"])).backward()
        opt.step()
    after = measure()
    assert before > 0 and after < before * 2 / 3, (before, after)


def run_train(out, data, encoder, *extra):
    """train.main on the tiny encoder, one epoch: the weights it ends with."""
    train.main(["--data_dir", data, "--out_dir", str(out), "--encoder", encoder, "--epochs", "1",
                "--batch_size", "32", "--num_workers", "0", "--seed", "3", "--lr", "1e-3", *extra])
    return torch.load(out / "last.pt", map_location="cpu", weights_only=True)["model"]


def test_train_flags_run_and_are_reproducible(tmp_path, tiny_data, tiny_bert_dir, capsys):
    """train.py --loss ce+mnrl --both_orders runs end to end and says so, the same seed gives the
    same weights, and the combinations that make no sense are refused up front."""
    first = run_train(tmp_path / "a", tiny_data, tiny_bert_dir, "--loss", "ce+mnrl", "--both_orders")
    assert "objective ce+mnrl (aux weight 1.0), both question orders" in capsys.readouterr().out
    second = run_train(tmp_path / "b", tiny_data, tiny_bert_dir, "--loss", "ce+mnrl", "--both_orders")
    plain = run_train(tmp_path / "c", tiny_data, tiny_bert_dir)
    for k in first:
        torch.testing.assert_close(first[k], second[k], atol=0, rtol=0, msg=k)
    assert any(not torch.equal(first[k], plain[k]) for k in first)  # the objective changed the training
    for flags, message in ((["--arch", "cross", "--loss", "ce+mnrl"], "a cross-encoder has no vector"),
                           (["--both_orders", "--symmetric"], "already averages both orders"),
                           (["--aux_weight", "0"], "out of range"),
                           (["--cosine_prior", "-1"], "out of range"), (["--cosine_shift", "2"], "out of range")):
        with pytest.raises(SystemExit) as e:
            train.main(["--data_dir", tiny_data, "--out_dir", str(tmp_path / "bad"), *flags])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_packed_batches_give_the_exact_layouts_losses(tiny_data):
    """The GPU's packed batches (a short batch filled with ignored copies) give every objective the
    loss of the CPU's exact batches: fill pairs are neither anchors nor negatives."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder_config=no_dropout(TINY_BERT), dropout=0.0)).eval()
    ds = PairDataset(tiny_data, "train")
    items = [ds[i] for i in range(40, 64)]  # 24 pairs; the packed batch holds 32
    pad = ds.manifest["pad_token_id"]
    exact = Collator("siamese", pad, question_keys=True)(items)
    packed = Collator("siamese", pad, batch_size=32, row_len=32, question_keys=True)(items)
    assert (packed["labels"] == NO_LABEL).sum() == 8
    for objective in (Objective(), Objective(loss="ce+mnrl+contrastive", both_orders=True)):
        with torch.no_grad():
            a, b = batch_loss(model, exact, objective), batch_loss(model, packed, objective)
        assert a.item() == pytest.approx(b.item(), rel=1e-5), objective
