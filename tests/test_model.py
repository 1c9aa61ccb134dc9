"""model.py and engine.py on tiny random encoders: what the models compute, the training step,
the schedule, checkpoints."""
import copy
import os

import pytest
import torch

import engine
from cli import UserError
from conftest import TINY_BERT, TINY_DISTILBERT
from data import Collator, PairDataset
from model import (ModelConfig, build_model, encode, interpolated, load_checkpoint, model_from_checkpoint,
                   pair_loss, pretrained_weights, save_checkpoint, takes_token_types)
from text import NO_LABEL

CPU = engine.Runtime(device=torch.device("cpu"))


def first_batch(data_dir, layout, n=16, start=0):
    ds = PairDataset(data_dir, "train")
    return Collator(layout, ds.manifest["pad_token_id"])([ds[i] for i in range(start, start + n)])


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0 if atol == 0 else 1e-4, msg=k)


def no_dropout(encoder_config):
    key = ("dropout", "attention_dropout") if encoder_config["model_type"] == "distilbert" else \
        ("hidden_dropout_prob", "attention_probs_dropout_prob")
    return {**encoder_config, **{k: 0.0 for k in key}}


# ----------------------------------------------------------------------------- what the models compute

@pytest.mark.parametrize("encoder", [TINY_BERT, TINY_DISTILBERT], ids=["bert", "distilbert"])
@pytest.mark.parametrize("arch", ["siamese", "cross"])
def test_both_architectures_fit_a_batch(tiny_data, encoder, arch):
    """Each architecture on each encoder family drives a batch of 16 pairs to a loss below 0.05 and
    predicts every label: gradients reach every part that matters."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder_config=encoder, arch=arch, dropout=0.0))
    batch = first_batch(tiny_data, arch)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(80):
        loss = pair_loss(model(batch), batch["labels"]) / 16
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert loss.item() < 0.05
    assert (model(batch).argmax(-1) == batch["labels"]).all()


def test_cross_encoder_receives_segment_ids(tiny_data):
    """BERT takes segment ids and the cross-encoder passes them: changing them changes its output.
    (In transformers 5, forward's __code__ is a decorator's and never names token_type_ids.)
    DistilBERT has none, and its cross-encoder runs without them."""
    for encoder, takes in ((TINY_BERT, True), (TINY_DISTILBERT, False)):
        torch.manual_seed(0)
        model = build_model(ModelConfig(encoder_config=encoder, arch="cross")).eval()
        assert takes_token_types(model.encoder) is takes and model.uses_token_types is takes
        batch = first_batch(tiny_data, "cross", n=8)
        flipped = {**batch, "seq_types": [1 - t for t in batch["seq_types"]]}
        with torch.no_grad():
            changed = not torch.allclose(model(batch), model(flipped))
        assert changed is takes


@pytest.mark.parametrize("encoder", [TINY_BERT, TINY_DISTILBERT], ids=["bert", "distilbert"])
def test_4d_mask_gives_the_encoders_own_result(tiny_data, encoder):
    """model.encode hands the encoder a 4D mask (no .all() sync in transformers); on real tokens
    the hidden states equal the encoder's with its usual 2D mask."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder_config=encoder)).eval()
    batch = first_batch(tiny_data, "siamese")
    ids, mask = batch["seq_ids"][-1], batch["seq_mask"][-1]
    assert not mask.all()  # some padding, or the test shows nothing
    with torch.no_grad():
        ours = encode(model.encoder, ids, mask, "mean")
        hidden = model.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).float()
        torch.testing.assert_close(ours, (hidden * m).sum(1) / m.sum(1), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["siamese", "cross"])
def test_each_pair_is_scored_alone(tiny_data, arch):
    """The notebook's LogSoftmax(dim=0) normalized over the batch, so a pair's probability depended
    on its batch mates. Here a pair scored alone gets what it gets in any batch, and pair_loss is
    the sum of the pairs' own losses, fill pairs (NO_LABEL) adding nothing."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder_config=TINY_BERT, arch=arch)).eval()
    ds = PairDataset(tiny_data, "train")
    items = [ds[i] for i in range(6)]
    collate = Collator(arch, ds.manifest["pad_token_id"])
    with torch.no_grad():
        together = model(collate(items)).softmax(-1)[:, 1]
        alone = torch.stack([model(collate([it])).softmax(-1)[0, 1] for it in items])
        torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
        logits, labels = model(collate(items)), collate(items)["labels"]
        one_by_one = sum(pair_loss(logits[i:i + 1], labels[i:i + 1]) for i in range(6))
        torch.testing.assert_close(pair_loss(logits, labels), one_by_one)
        ignored = labels.clone()
        ignored[:2] = NO_LABEL
        torch.testing.assert_close(pair_loss(logits, ignored), pair_loss(logits[2:], labels[2:]))


def test_frozen_encoder_gets_no_updates(tiny_data):
    model = build_model(ModelConfig(encoder_config=TINY_BERT, freeze_encoder=True))
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head_before = [p.clone() for p in model.head.parameters()]
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = first_batch(tiny_data, "siamese")
    model.train()
    assert not model.encoder.training  # frozen encoder keeps dropout off too
    for _ in range(3):
        loss = pair_loss(model(batch), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert_same_weights(before, model.encoder.state_dict())
    assert any(not torch.equal(a, b) for a, b in zip(head_before, model.head.parameters()))


def test_freeze_layers_keeps_the_bottom_layers_and_trains_the_rest(tiny_data):
    """freeze_layers 2: the embeddings and the first transformer layer keep their weights (and
    their dropout off), the layers above and the head move; more than the encoder has is refused."""
    model = build_model(ModelConfig(encoder_config=TINY_BERT, freeze_layers=2))
    frozen = {k: v.clone() for k, v in model.encoder.state_dict().items()
              if k.startswith(("embeddings.", "encoder.layer.0."))}
    others = {k: v.clone() for k, v in model.encoder.state_dict().items() if k.startswith("encoder.layer.1.")}
    assert frozen and others
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = first_batch(tiny_data, "siamese")
    model.train()
    assert not model.encoder.embeddings.training and not model.encoder.encoder.layer[0].training
    assert model.encoder.encoder.layer[1].training
    for _ in range(3):
        loss = pair_loss(model(batch), batch["labels"])
        opt.zero_grad()
        loss.backward()
        opt.step()
    state = model.encoder.state_dict()
    assert_same_weights(frozen, {k: state[k] for k in frozen})
    assert any(not torch.equal(v, state[k]) for k, v in others.items())
    n_layers = len(model.encoder.encoder.layer)
    with pytest.raises(UserError, match=f"has {n_layers + 1}"):
        build_model(ModelConfig(encoder_config=TINY_BERT, freeze_layers=n_layers + 2))
    # With the whole encoder frozen, freeze_layers (train.py's default 1) picks nothing: never refused.
    whole = build_model(ModelConfig(encoder_config=TINY_BERT, freeze_encoder=True, freeze_layers=n_layers + 2))
    assert whole.frozen_blocks() == [] and not any(p.requires_grad for p in whole.encoder.parameters())


def test_interpolated_mixes_weights_in_place_and_gives_them_back():
    """WiSE-FT (train.py --wise_alpha): inside, every floating-point weight is start + alpha *
    (own - start) in the same tensors (compiled graphs hold their addresses); on exit the module's
    own weights are back, bit for bit; alpha 0 is the start."""
    model = build_model(ModelConfig(encoder_config=TINY_BERT))
    start = pretrained_weights(model.encoder)
    with torch.no_grad():
        for p in model.encoder.parameters():
            p.add_(torch.randn_like(p))
    own = copy.deepcopy(model.encoder.state_dict())
    addresses = {k: v.data_ptr() for k, v in model.encoder.state_dict().items()}
    for alpha in (0.0, 0.3):
        with interpolated(model.encoder, start, alpha):
            inside = model.encoder.state_dict()
            assert {k: v.data_ptr() for k, v in inside.items()} == addresses
            for k, v in inside.items():
                expected = start[k] + alpha * (own[k] - start[k]) if v.is_floating_point() else own[k]
                torch.testing.assert_close(v, expected, msg=k)
        assert_same_weights(own, model.encoder.state_dict())


def test_symmetric_siamese_ignores_question_order(tiny_data):
    """--symmetric: p(q1, q2) == p(q2, q1); without it the head sees an ordered pair."""
    ds = PairDataset(tiny_data, "train")
    items = [ds[i] for i in range(8)]
    swapped = [(i, b, a, y) for i, a, b, y in items]
    collate = Collator("siamese", ds.manifest["pad_token_id"])
    for symmetric in (True, False):
        torch.manual_seed(0)
        model = build_model(ModelConfig(encoder_config=TINY_BERT, symmetric=symmetric)).eval()
        with torch.no_grad():
            same = torch.allclose(model(collate(items)), model(collate(swapped)), atol=1e-5)
        assert same == symmetric


def test_cosine_prior_starts_the_classifier_at_the_encoders_cosine(tiny_data):
    """With the head's output zeroed, the model's log-odds of duplicate are exactly
    scale * (cos(u, v) - shift) of the pooled vectors; both are learnt; 0 turns it off
    (the head alone, no extra parameters); the cross-encoder has none."""
    batch = first_batch(tiny_data, "siamese")
    model = build_model(ModelConfig(encoder_config=TINY_BERT, cosine_prior=7.0, cosine_shift=0.3)).eval()
    torch.nn.init.zeros_(model.head[-1].weight)
    torch.nn.init.zeros_(model.head[-1].bias)
    with torch.no_grad():
        logits = model(batch)  # (16, 2)
        u, v = model.embed_pair(batch)
    cos = torch.nn.functional.cosine_similarity(u, v, dim=-1)
    assert cos.std() > 0.01  # the planted check is not on constant cosines
    torch.testing.assert_close(logits[:, 1] - logits[:, 0], 7.0 * (cos - 0.3))
    loss = pair_loss(model.train()(batch), batch["labels"])
    loss.backward()
    assert model.cosine_scale.grad != 0 and model.cosine_shift.grad != 0

    torch.manual_seed(0)
    off = build_model(ModelConfig(encoder_config=TINY_BERT, cosine_prior=0.0)).eval()
    assert not any("cosine" in name for name, _ in off.named_parameters())
    with torch.no_grad():
        u, v = off.embed_pair(batch)
        torch.testing.assert_close(off(batch), off.head(torch.cat([u, v, (u - v).abs(), u * v], -1)))
    cross = build_model(ModelConfig(encoder_config=TINY_BERT, arch="cross"))
    assert cross.cfg.cosine_prior == 0 and not any("cosine" in name for name, _ in cross.named_parameters())


def test_checkpoint_without_cosine_prior_field_loads_as_before(tmp_path, tiny_data):
    """A checkpoint saved before the cosine prior existed (no such config field) loads as the
    model it was: head only, same outputs."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder_config=TINY_BERT, cosine_prior=0.0)).eval()
    old_config = {k: v for k, v in model.cfg.__dict__.items() if not k.startswith("cosine")}
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"model": model.state_dict(), "model_config": old_config})
    rebuilt = model_from_checkpoint(load_checkpoint(path)).eval()
    assert rebuilt.cfg.cosine_prior == 0
    batch = first_batch(tiny_data, "siamese", n=8)
    with torch.no_grad():
        torch.testing.assert_close(model(batch), rebuilt(batch))


def test_checkpoint_round_trip_weights_only(tmp_path, tiny_data):
    """Saved with the config, loaded with weights_only=True, rebuilt without any pretrained files."""
    model = build_model(ModelConfig(encoder_config=TINY_DISTILBERT, arch="cross")).eval()
    path = str(tmp_path / "ckpt.pt")
    save_checkpoint(path, {"model": model.state_dict(), "model_config": model.cfg.__dict__})
    raw = torch.load(path, map_location="cpu", weights_only=True)
    rebuilt = model_from_checkpoint(load_checkpoint(path)).eval()
    assert_same_weights(raw["model"], rebuilt.state_dict())
    batch = first_batch(tiny_data, "cross", n=8)
    torch.testing.assert_close(model(batch), rebuilt(batch))
    assert not os.path.exists(path + ".tmp")  # written atomically


# ----------------------------------------------------------------------------- the engine

def one_step(model, batches, step_pairs):
    """engine.train_step with plain SGD (lr 1, no clipping in effect): weights move by -gradient."""
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    engine.train_step(model, batches, step_pairs, opt, sched, engine.build_scaler(CPU), CPU, clip=1e9)
    return model.state_dict()


@pytest.mark.parametrize("sizes", [(6, 6, 4), (15, 1), (8, 8)])
def test_accumulated_micro_batches_equal_one_batch(tiny_data, sizes):
    """k micro-batches of any sizes (a short last one included) give the gradient of one batch of
    the same 16 pairs: each micro-batch weighs by its pairs, not 1/k."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder_config=no_dropout(TINY_BERT), dropout=0.0))
    twin = copy.deepcopy(model)
    whole = one_step(model, [first_batch(tiny_data, "siamese", n=16)], 16)
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    parts = one_step(twin, [first_batch(tiny_data, "siamese", n=n, start=s) for n, s in zip(sizes, starts)], 16)
    assert_same_weights(whole, parts, atol=1e-5)


def test_schedule_warms_up_then_decays_to_zero():
    """lr(step) = peak * step / warmup during warmup, then peak * (total - step) / (total - warmup);
    a scheduler restored from its state continues the same sequence (resume)."""
    peak, total, ratio = 1e-3, 50, 0.1
    warmup = int(ratio * total)
    expected = [peak * s / warmup if s < warmup else peak * (total - s) / (total - warmup) for s in range(total + 1)]

    def make():
        opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=peak)
        return opt, engine.build_scheduler(opt, total, ratio)

    opt, sched = make()
    seen = []
    for step in range(total + 1):
        seen.append(opt.param_groups[0]["lr"])
        if step == 20:  # what last.pt holds
            state = opt.state_dict(), sched.state_dict()
        opt.step()
        sched.step()
    assert seen == pytest.approx(expected, abs=1e-12)
    opt2, sched2 = make()
    opt2.load_state_dict(state[0])
    sched2.load_state_dict(state[1])
    resumed = [opt2.param_groups[0]["lr"]]
    for _ in range(total - 20):
        opt2.step()
        sched2.step()
        resumed.append(opt2.param_groups[0]["lr"])
    assert resumed == pytest.approx(expected[20:], abs=1e-12)


def test_inference_puts_outputs_back_in_dataset_order_and_drops_fill(tiny_data):
    """engine.Inference over packed batches in random order (with fill pairs) returns, for every
    pair of the split in split order, what the model gives that pair alone; question vectors too."""
    from data import QuestionDataset
    torch.manual_seed(0)
    model = build_model(ModelConfig(encoder_config=TINY_BERT)).eval()
    ds = PairDataset(tiny_data, "validation")
    scores = engine.Inference(model.probability, "siamese", CPU, 16, shapes="packed")(ds, verbose=False)
    collate = Collator("siamese", ds.manifest["pad_token_id"])
    with torch.no_grad():
        for i in (0, len(ds) // 2, len(ds) - 1):
            alone = model(collate([ds[i]])).softmax(-1)[0, 1].item()
            assert scores[i] == pytest.approx(alone, abs=1e-5)
    questions = QuestionDataset(ds.tokens, ds.offsets, ds.manifest["pad_token_id"], 32)
    vectors = engine.Inference(model.question_vectors, "questions", CPU, 16, shapes="packed")(questions, verbose=False)
    assert vectors.shape == (len(questions), model.encoder.config.hidden_size)
    with torch.no_grad():
        for i in (0, len(questions) - 1):
            alone = model.question_vectors(Collator("questions", ds.manifest["pad_token_id"])([questions[i]]))[0]
            torch.testing.assert_close(torch.from_numpy(vectors[i]), alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,message", [("cuda", "no CUDA GPU here"), ("gpu7", "not a device"),
                                          ("cuda:9", None)])
def test_device_flags_are_checked(name, message):
    from cli import UserError
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UserError, match=message or "no CUDA GPU here"):
        engine.parse_device(name)


def test_progress_off_a_terminal_is_a_line_a_while_not_a_bar(capsys):
    """In a log, a long job says how far it is once per `every` seconds; a short one says nothing."""
    import engine
    quiet = engine.LogProgress(1000, "embedding", "question")
    quiet.update(500)
    assert capsys.readouterr().err == ""
    chatty = engine.LogProgress(1000, "embedding", "question", every=0.0)
    chatty.update(250)
    chatty.update(750)  # done: no line, the caller's own summary says it
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("embedding: 250 of 1,000 questions (25%), ") and "min left" in err[0]
