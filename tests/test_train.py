"""model.py and train.py on tiny random encoders: learning, checkpoints, exact resume, DDP."""
import dataclasses
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import objectives
import train
from conftest import ROOT, TINY_BERT, save_tiny_encoder
from model import load_checkpoint

FAST = ["--epochs", "2", "--bs", "16", "--num_workers", "0", "--log_every_steps", "5", "--lr", "1e-3"]


def run_train(args, **kw):
    """train.py in its own process, as a user runs it."""
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, **kw)


def train_here(args, capsys):
    """train.main in this process (no interpreter start-up): (exit code, stdout, stderr)."""
    try:
        train.main(args)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def final_weights(out_dir):
    return torch.load(os.path.join(out_dir, "last.pt"), map_location="cpu", weights_only=True)["model"]


def assert_same_weights(a, b, atol=0.0):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0 if atol == 0 else 1e-4, msg=k)


def test_train_script_end_to_end(tmp_path, tiny_data, tiny_bert_dir):
    """train.py learns the synthetic task, writes every artifact and reports test metrics."""
    out = str(tmp_path / "out")
    r = run_train(["--data_dir", tiny_data, "--encoder", tiny_bert_dir, "--out_dir", out, *FAST,
                   "--epochs", "4", "--pooling", "mean", "--features", "rich"])
    assert r.returncode == 0, r.stderr[-2000:]
    for name in ("ckpt.pt", "last.pt", "metrics.jsonl", "test_results.json", "hf/config.json",
                 "hf/tokenizer.json"):
        assert os.path.exists(os.path.join(out, name)), name
    assert "Accuracy:" in r.stdout and "Confusion matrix" in r.stdout
    lines = open(os.path.join(out, "metrics.jsonl")).read().splitlines()
    assert len(lines) == 4  # one evaluation per epoch
    import json
    assert json.load(open(os.path.join(out, "test_results.json")))["accuracy"] > 0.75
    from transformers import AutoModel
    AutoModel.from_pretrained(os.path.join(out, "hf"))  # other tools can load the encoder


def test_resume_after_kill_equals_uninterrupted(tmp_path, tiny_data, tiny_bert_dir, request):
    """kill -9 mid-run, then --resume: the same final weights, bit for bit, and the same
    metrics.jsonl as a run never interrupted. It fails unless the kill landed mid-run (the process
    died of SIGKILL with its last logged step, last.pt and metrics.jsonl short of the total) and
    the resumed run went on from last.pt's step, not from the start."""
    common = ["--data_dir", tiny_data, "--encoder", tiny_bert_dir, *FAST, "--save_every_steps", "1",
              "--eval_every_steps", "7"]
    # One thread per process: the uninterrupted run and the one to kill run side by side on two
    # cores without fighting over them, and all three runs sum floats in the same order.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    reference = subprocess.Popen([sys.executable, "train.py", *common, "--out_dir", full], cwd=ROOT, env=env,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    proc = subprocess.Popen([sys.executable, "train.py", *common, "--out_dir", cut], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    for p in (reference, proc):
        request.addfinalizer(p.kill)  # no run outlives a failed assertion (a no-op once it has ended)
    # Kill on a logged step, not after a delay: 25 of 40 steps (mid-epoch, after evaluations at
    # 7, 14 and 21) leaves 15 steps, 3 evaluations and the test pass for the signal to land in.
    watchdog = threading.Timer(120, proc.kill)  # a run that hangs silently fails the test, not hangs it
    watchdog.start()
    logged = []  # (step, total) of each "step N/T" line the run printed (flushed as written)
    for line in iter(proc.stdout.readline, ""):
        if m := re.match(r"step +(\d+)/(\d+) ", line):
            logged.append((int(m[1]), int(m[2])))
            if logged[-1][0] >= 25:
                proc.send_signal(signal.SIGKILL)
                break
    proc.wait()
    proc.stdout.close()
    watchdog.cancel()

    # The kill landed mid-run: had the run finished first, there would be nothing to resume.
    assert logged and proc.returncode == -signal.SIGKILL, \
        f"the run ended by itself (exit {proc.returncode}, logged {logged}), not by the kill"
    last_logged, total = logged[-1]
    assert last_logged < total
    killed_at = torch.load(os.path.join(cut, "last.pt"), map_location="cpu", weights_only=True)["step"]
    # last.pt is written every step, just after that step's log line: one step behind at most.
    assert last_logged - 1 <= killed_at < total
    assert max(m["step"] for m in read_metrics(cut)) < total

    r = run_train(["--out_dir", cut, "--resume"], env=env)  # while the uninterrupted run finishes
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resuming {cut}/last.pt at step {killed_at} " in r.stdout
    # It goes on from last.pt's step: its first log line is the next multiple of 5, not step 5.
    resumed = [int(s) for s in re.findall(r"^step +(\d+)/", r.stdout, re.M)]
    assert resumed and killed_at < resumed[0] <= killed_at + 5 and resumed[-1] == total, resumed
    assert reference.wait(timeout=300) == 0
    assert_same_weights(final_weights(full), final_weights(cut))
    full_log = open(os.path.join(full, "metrics.jsonl")).read()
    assert open(os.path.join(cut, "metrics.jsonl")).read() == full_log


def test_sigterm_saves_and_exits_143_and_a_second_run_is_refused(tmp_path, tiny_data, tiny_bert_dir, capsys):
    """While a run goes on, a second run into its --out_dir is refused, naming the first one's pid;
    SIGTERM then stops the first cleanly: last.pt saved, exit code 143 (128 + 15), as the shell
    reports a process ended by SIGTERM, so `train && evaluate` does not go on."""
    out = str(tmp_path / "out")
    common = ["--data_dir", tiny_data, "--encoder", tiny_bert_dir, *FAST, "--out_dir", out]
    proc = subprocess.Popen([sys.executable, "train.py", *common, "--epochs", "50"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if "step" in (open(os.path.join(out, "metrics.jsonl")).read() if os.path.exists(
                os.path.join(out, "metrics.jsonl")) else ""):
            break
        time.sleep(0.2)
    for extra in ([], ["--overwrite_output_dir"], ["--resume"]):
        code, _, err = train_here([*common, *extra], capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"is in use by another run (pid {proc.pid}" in err, err
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM, stderr[-2000:]  # ended by it, as a shell expects ($? 143)
    assert "continue with --resume" in stdout
    assert "Traceback" not in stderr
    assert load_checkpoint(os.path.join(out, "last.pt"))["step"] > 0
    assert not os.path.exists(os.path.join(out, "test_results.json"))


def test_sigterm_to_the_process_group_saves_cleanly_with_workers(tmp_path, tiny_data, tiny_bert_dir):
    """SIGTERM to the whole process group (timeout, kill -- -PGID, a batch scheduler) reaches the
    DataLoader workers too: they must leave the stopping to the training process, which then saves
    last.pt and ends by SIGTERM, instead of a traceback from a worker that died under it."""
    out = str(tmp_path / "out")
    args = ["--data_dir", tiny_data, "--encoder", tiny_bert_dir, *FAST, "--num_workers", "2", "--epochs", "50",
            "--out_dir", out]
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None and not (
            os.path.exists(metrics) and "step" in open(metrics).read()):
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGTERM, stderr[-2000:]  # ended by it, as a shell expects ($? 143)
    assert "Traceback" not in stderr and "continue with --resume" in stdout
    assert load_checkpoint(os.path.join(out, "last.pt"))["step"] > 0


def test_ddp_two_processes_match_single_process(tmp_path, tiny_data):
    """torchrun with 2 gloo processes x batch 8 = one process x batch 16, step for step."""
    # Dropout off everywhere (head and encoder): ranks draw different masks than one process would.
    encoder = save_tiny_encoder(tmp_path / "encoder", {**TINY_BERT, "hidden_dropout_prob": 0.0,
                                                       "attention_probs_dropout_prob": 0.0})
    common = ["--data_dir", tiny_data, "--encoder", encoder, "--num_workers", "0", "--epochs", "1",
              "--max_steps", "6", "--dropout", "0", "--lr", "1e-3", "--seed", "3"]
    single, double = str(tmp_path / "single"), str(tmp_path / "double")
    assert run_train([*common, "--bs", "16", "--out_dir", single]).returncode == 0
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                        "--master_port", "29517", "train.py", *common, "--bs", "8", "--out_dir", double],
                       cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "processes 2" in r.stdout
    # The only difference left is float summation order across the two shards.
    a, b = final_weights(single), final_weights(double)
    print("max abs weight difference", max((a[k] - b[k]).abs().max().item() for k in a))
    assert_same_weights(a, b, atol=1e-4)


def test_non_finite_loss_stops_with_a_clear_message(tmp_path, tiny_data, tiny_bert_dir, monkeypatch, capsys):
    monkeypatch.setattr(objectives, "pair_loss", lambda logits, labels: (logits.sum() * float("nan")))
    with pytest.raises(SystemExit) as e:
        train.main(["--data_dir", tiny_data, "--encoder", tiny_bert_dir, *FAST, "--out_dir",
                    str(tmp_path / "out")])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: non-finite loss") and "lr" in err and "batch shapes" in err
    assert "\n" not in err


@pytest.mark.parametrize("args,message", [
    (["--data_dir", "/nonexistent"], "error: /nonexistent: no manifest.json, so not a folder preprocess.py wrote"),
    (["--resume"], "/last.pt does not exist. Fix: run without --resume"),
    (["--bs", "0"], "error: --batch_size 0: out of range, must be at least 1"),
    (["--grad_accum_steps", "0"], "error: --grad_accum_steps 0: out of range, must be at least 1"),
    (["--wise_alpha", "1.5"], "error: --wise_alpha 1.5: out of range"),
    (["--device", "nonsense"], "error: --device nonsense: not a device"),
    (["--encoder", "/no/such/model"], "omit --encoder to use the bundled offline"),
])
def test_bad_inputs_give_one_line_errors(tmp_path, tiny_data, args, message, capsys):
    if args[0] != "--data_dir":
        args = ["--data_dir", tiny_data, *args]
    code, _, err = train_here([*args, "--out_dir", str(tmp_path / "out")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error:") and message in err and "Fix:" in err, err


def test_a_bad_input_in_a_real_process_is_one_line(tmp_path):
    r = run_train(["--data_dir", str(tmp_path / "none"), "--out_dir", str(tmp_path / "out")])
    assert r.returncode == 2 and r.stderr.startswith("error: ") and len(r.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("flag", [["--precision", "foo"], ["--metric_for_best", "foo"], ["--arch", "x"],
                                  ["--no_such_flag", "1"]])
def test_bad_flags_are_refused_before_any_work(flag):
    """Choices are enforced by the parser: exit 2 at once, not at the first evaluation."""
    with pytest.raises(SystemExit) as e:
        train.parse_config(train.TrainConfig, flag)
    assert e.value.code == 2


def test_booleans_can_be_turned_off_and_help_shows_field_comments(capsys):
    cfg = train.parse_config(train.TrainConfig, ["--freeze_encoder", "--symmetric", "false"])
    assert cfg.freeze_encoder is True and cfg.symmetric is False
    with pytest.raises(SystemExit):
        train.parse_config(train.TrainConfig, ["--help"], train.__doc__)
    shown = capsys.readouterr().out
    assert "pairs per micro-batch per process" in shown and "--bs" in shown and "{siamese,cross}" in shown


def read_metrics(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_resume_continues_the_folder_given_and_checks_flags(tmp_path, tiny_data, tiny_bert_dir, capsys):
    """--resume continues the run in the --out_dir given (a copied run folder stays apart from its
    original), refuses a flag that would change what the run computes, and applies more --epochs,
    saying so."""
    first = str(tmp_path / "first")
    common = ["--data_dir", tiny_data, "--encoder", tiny_bert_dir, *FAST]
    assert train_here([*common, "--epochs", "1", "--out_dir", first], capsys)[0] == 0
    copy = str(tmp_path / "copy")
    shutil.copytree(first, copy)
    before = os.path.getmtime(os.path.join(first, "last.pt"))

    code, _, err = train_here(["--out_dir", copy, "--resume", "--lr", "5e-4"], capsys)
    assert code == 2 and "--lr 0.0005 differs from the saved run's 0.001" in err, err

    code, out, err = train_here(["--out_dir", copy, "--resume", "--epochs", "2"], capsys)
    assert code == 0, err[-2000:]
    assert "--epochs 2 (was 1)" in out
    assert load_checkpoint(os.path.join(copy, "last.pt"))["train_config"]["epochs"] == 2
    assert [m["epoch"] for m in read_metrics(copy)] == [1.0, 2.0]
    assert os.path.getmtime(os.path.join(first, "last.pt")) == before  # the original is untouched
    assert len(read_metrics(first)) == 1


def test_a_run_saved_before_the_cosine_prior_resumes_without_one(tmp_path, tiny_data, tiny_bert_dir, capsys):
    """A last.pt whose configs have no cosine_prior field (written before it existed, by a model
    without one) resumes as that model, not as today's default with the prior."""
    out = str(tmp_path / "old")
    common = ["--data_dir", tiny_data, "--encoder", tiny_bert_dir, *FAST, "--out_dir", out]
    assert train_here([*common, "--epochs", "1", "--cosine_prior", "0", "--freeze_layers", "0"], capsys)[0] == 0
    path = os.path.join(out, "last.pt")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for config in (state["train_config"], state["model_config"]):
        del config["cosine_prior"], config["cosine_shift"], config["freeze_layers"]  # and trained every layer
    del state["train_config"]["wise_alpha"]  # older still: it shipped its fine-tuned encoder as is
    del state["train_config"]["encoder_lr"]  # and trained the encoder at --lr
    torch.save(state, path)
    # A flag the old run had no field for is compared with the value it had, not let through.
    for flags, refusal in ((["--encoder_lr", "1e-5"], "--encoder_lr 1e-05 differs from the saved run's 0.0"),
                           (["--freeze_layers", "1"], "--freeze_layers 1 differs from the saved run's 0")):
        code, _, err = train_here(["--out_dir", out, "--resume", "--epochs", "2", *flags], capsys)
        assert code == 2 and refusal in err, err
    code, out_text, err = train_here(["--out_dir", out, "--resume", "--epochs", "2"], capsys)
    assert code == 0, err[-2000:]
    saved = load_checkpoint(path)["train_config"]
    assert saved["cosine_prior"] == 0 and saved["wise_alpha"] == 1.0 and "WiSE-FT" not in out_text
    assert saved["encoder_lr"] == 0.0 and saved["freeze_layers"] == 0
    # Every field named there is a field of today's config (a resumed config is built from it).
    assert set(train.TRAIN_SAVED_BEFORE) <= {f.name for f in dataclasses.fields(train.TrainConfig)}


def test_resume_on_another_machine_keeps_this_ones_scaler_and_update(tmp_path, tiny_data, tiny_bert_dir, capsys,
                                                                     monkeypatch):
    """A run saved where nothing was scaled (fp32 here; bf16 likewise) resumes where --precision
    auto means fp16 (a T4, a V100): the empty scaler state is not loaded (it would raise), the
    scaler starts fresh; and the optimizer keeps the update kernel chosen for this machine (here
    fused, as on CUDA), not the saved one."""
    import engine
    out = str(tmp_path / "run")
    common = ["--data_dir", tiny_data, "--encoder", tiny_bert_dir, *FAST, "--out_dir", out]
    assert train_here([*common, "--max_steps", "3"], capsys)[0] == 0
    assert torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)["scaler"] == {}
    parse = engine.parse_precision
    monkeypatch.setattr(engine, "parse_precision",
                        lambda device, name: torch.float16 if name == "auto" else parse(device, name))
    build, optimizers = engine.build_optimizer, []

    def fused_like_cuda(*args, **kwargs):
        optimizer = build(*args, **kwargs)
        for group in optimizer.param_groups:
            group["fused"] = True  # what build_optimizer picks on CUDA (fused AdamW runs on a CPU too)
        optimizers.append(optimizer)
        return optimizer

    monkeypatch.setattr(engine, "build_optimizer", fused_like_cuda)
    loaded = []  # the groups load_state_dict is given: they decide where the step counters go
    real_load = torch.optim.Optimizer.load_state_dict
    monkeypatch.setattr(torch.optim.Optimizer, "load_state_dict",
                        lambda self, state: loaded.append(state["param_groups"]) or real_load(self, state))
    code, printed, err = train_here(["--out_dir", out, "--resume", "--max_steps", "5"], capsys)
    assert code == 0, err[-2000:]
    assert "precision fp16" in printed and read_metrics(out)[-1]["step"] == 5
    assert all(group["fused"] for group in optimizers[0].param_groups)
    assert loaded and all(group["fused"] for group in loaded[0])
    assert torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)["scaler"]  # scaled now


def test_cuda_rng_state_is_this_gpus_and_old_lists_resume(monkeypatch):
    """rng_state saves this process's GPU's generator only (a run saved on an 8-GPU node resumes
    on a 1-GPU machine); a state saved before, one per GPU the saver saw, restores the entry of this
    process's GPU. CUDA's generator functions are stood in for on the CPU."""
    import engine
    calls = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda: torch.tensor([7], dtype=torch.uint8))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: calls.setdefault("set", state))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's state saved"))
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: pytest.fail("every GPU's state restored"))
    state = engine.rng_state()
    assert state["cuda"].tolist() == [7]
    engine.set_rng_state(state)
    assert calls.pop("set").tolist() == [7]
    state["cuda"] = [torch.tensor([i], dtype=torch.uint8) for i in range(8)]  # saved on an 8-GPU node
    engine.set_rng_state(state)
    assert calls.pop("set").tolist() == [0]


def test_torchrun_backend_follows_the_device_and_a_gpu_index_is_refused(monkeypatch):
    """Under torchrun the process group's backend is the computing device's (gloo for --device cpu
    on a GPU machine: NCCL cannot reduce CPU tensors); --device cuda:1 would put every process on
    one GPU while DDP takes each one's LOCAL_RANK, so it is refused. A GPU machine stood in for."""
    import engine
    from cli import UserError
    backends = []
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.distributed, "init_process_group", lambda backend: backends.append(backend))
    monkeypatch.setattr(torch.distributed, "get_rank", lambda: 0)
    rt = engine.setup_runtime("cpu", distributed=True)
    assert backends == ["gloo"] and rt.world == 2 and rt.device.type == "cpu"
    with pytest.raises(UserError, match="--device cuda:1 under torchrun: each process takes the GPU of its"):
        engine.setup_runtime("cuda:1", distributed=True)
    assert backends == ["gloo"]  # refused before joining a group


def test_encoder_lr_trains_the_encoder_at_its_own_rate(tmp_path, tiny_data, tiny_bert_dir, capsys):
    """--encoder_lr: the encoder's parameter groups peak at it, the head's at --lr (here the encoder
    barely moves while the head does); without it, the two groups of runs saved before it."""
    from transformers import AutoModel
    import engine
    from model import ModelConfig, build_model
    model = build_model(ModelConfig(encoder=tiny_bert_dir))
    rt = engine.Runtime(device=torch.device("cpu"))
    assert [g["lr"] for g in engine.build_optimizer(model, 1e-3, 0.0, rt).param_groups] == [1e-3, 1e-3]
    groups = engine.build_optimizer(model, 1e-3, 0.01, rt, encoder_lr=2e-5).param_groups
    encoder = {id(p) for p in model.encoder.parameters()}
    assert [g["lr"] for g in groups] == [1e-3, 1e-3, 2e-5, 2e-5]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0, 0.01, 0.0]
    assert all(id(p) in encoder for g in groups[2:] for p in g["params"])
    assert not any(id(p) in encoder for g in groups[:2] for p in g["params"])
    assert sum(len(g["params"]) for g in groups) == len([p for p in model.parameters() if p.requires_grad])

    def encoder_moved(*flags):  # the largest change of any encoder weight over 3 steps at --lr 1e-2
        out = str(tmp_path / "-".join(["run", *flags]))
        code, _, err = train_here(["--data_dir", tiny_data, "--encoder", tiny_bert_dir, *FAST, "--max_steps", "3",
                                   "--lr", "1e-2", "--wise_alpha", "1", *flags, "--out_dir", out], capsys)
        assert code == 0, err[-2000:]
        tuned = load_checkpoint(os.path.join(out, "last.pt"))["model"]
        pretrained = AutoModel.from_pretrained(tiny_bert_dir).state_dict()
        return max((w - pretrained[name[len("encoder."):]]).abs().max().item() for name, w in tuned.items()
                   if name.startswith("encoder.") and w.is_floating_point())
    assert encoder_moved() > 1e-3
    assert encoder_moved("--encoder_lr", "1e-9") < 1e-6


def test_wise_alpha_ships_the_encoder_between_pretrained_and_fine_tuned(tmp_path, tiny_data, tiny_bert_dir,
                                                                         capsys):
    """--wise_alpha a: ckpt.pt (what is validated, tested and exported) holds the pretrained encoder
    moved a of the way to the fine-tuned one, and the head as trained; last.pt keeps the fine-tuned
    weights, so training (and --resume) go on from them."""
    from transformers import AutoModel
    out = str(tmp_path / "wise")
    code, stdout, err = train_here(["--data_dir", tiny_data, "--encoder", tiny_bert_dir, *FAST, "--max_steps", "3",
                                    "--wise_alpha", "0.25", "--out_dir", out], capsys)
    assert code == 0, err[-2000:]
    assert "ckpt.pt: encoder 0.25 of the way from pretrained to fine-tuned (WiSE-FT)" in stdout
    shipped, tuned = load_checkpoint(os.path.join(out, "ckpt.pt")), load_checkpoint(os.path.join(out, "last.pt"))
    assert shipped["step"] == tuned["step"]  # one evaluation: the same weights, before the mix
    pretrained = AutoModel.from_pretrained(tiny_bert_dir).state_dict()
    moved = 0
    for name, w in shipped["model"].items():
        if name.startswith("encoder.") and w.is_floating_point():
            start = pretrained[name[len("encoder."):]]
            torch.testing.assert_close(w, start + 0.25 * (tuned["model"][name] - start), msg=name)
            moved += not torch.equal(tuned["model"][name], start)
        else:  # the head and the cosine prior's scalars: as trained
            assert torch.equal(w, tuned["model"][name]), name
    assert moved > 10
    assert read_metrics(out)[0]["wise_alpha"] == 0.25
    # A cross-encoder has no vectors to search with: it ships as trained, whatever --wise_alpha says.
    cross = str(tmp_path / "cross")
    code, stdout, err = train_here(["--data_dir", tiny_data, "--encoder", tiny_bert_dir, *FAST, "--max_steps", "2",
                                    "--arch", "cross", "--wise_alpha", "0.25", "--out_dir", cross], capsys)
    assert code == 0, err[-2000:]
    assert "WiSE-FT" not in stdout and "wise_alpha" not in read_metrics(cross)[0]
    shipped, tuned = (load_checkpoint(os.path.join(cross, f))["model"] for f in ("ckpt.pt", "last.pt"))
    assert all(torch.equal(shipped[k], tuned[k]) for k in tuned)


def test_a_new_run_never_mixes_with_an_old_one(tmp_path, tiny_data, tiny_bert_dir, capsys):
    """An out_dir holding a run is refused without --overwrite_output_dir; with it, the old files
    go and --epochs 0 ... reports nothing of the old run."""
    out = str(tmp_path / "out")
    common = ["--data_dir", tiny_data, "--encoder", tiny_bert_dir, *FAST, "--out_dir", out]
    assert train_here([*common, "--epochs", "1"], capsys)[0] == 0
    code, _, err = train_here([*common, "--epochs", "1"], capsys)
    assert code == 2 and "holds an earlier run" in err and "--overwrite_output_dir" in err
    assert len(read_metrics(out)) == 1
    code, _, err = train_here([*common, "--epochs", "1", "--max_steps", "3", "--overwrite_output_dir"], capsys)
    assert code == 0, err[-2000:]
    assert [m["step"] for m in read_metrics(out)] == [3]
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == 3


def test_early_stopping_and_a_loss_like_metric(tmp_path, tiny_data, tiny_bert_dir, capsys):
    """With a learning rate too small to change anything measurable, validation never improves
    after the first evaluation: patience 2 stops the run after 3 evaluations. log_loss as the
    metric for the best checkpoint is minimized: ckpt.pt is at the lowest validation loss."""
    out = str(tmp_path / "stop")
    code, stdout, err = train_here(["--data_dir", tiny_data, "--encoder", tiny_bert_dir, *FAST, "--epochs", "20",
                                    "--lr", "1e-12", "--eval_every_steps", "2", "--early_stopping_patience", "2",
                                    "--out_dir", out], capsys)
    assert code == 0, err[-2000:]
    assert "early stopping: no better accuracy for 2 evaluations" in stdout
    assert [m["step"] for m in read_metrics(out)] == [2, 4, 6]
    assert load_checkpoint(os.path.join(out, "last.pt"))["step"] == 6

    out = str(tmp_path / "loss")
    code, _, err = train_here(["--data_dir", tiny_data, "--encoder", tiny_bert_dir, *FAST, "--eval_every_steps", "3",
                               "--metric_for_best", "log_loss", "--out_dir", out], capsys)
    assert code == 0, err[-2000:]
    metrics = read_metrics(out)
    best = min(metrics, key=lambda m: m["val_loss"])
    assert load_checkpoint(os.path.join(out, "ckpt.pt"))["step"] == best["step"]


def test_a_torn_metrics_line_does_not_block_resume(tmp_path, tiny_data, tiny_bert_dir, capsys):
    """A kill in the middle of writing metrics.jsonl leaves half a line: --resume drops it with a note."""
    out = str(tmp_path / "out")
    common = ["--data_dir", tiny_data, "--encoder", tiny_bert_dir, *FAST, "--out_dir", out]
    assert train_here([*common, "--epochs", "1"], capsys)[0] == 0
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 99, "epo')
    code, stdout, err = train_here(["--out_dir", out, "--resume", "--epochs", "2"], capsys)
    assert code == 0, err[-2000:]
    assert "dropped its unreadable last line" in stdout
    assert [m["epoch"] for m in read_metrics(out)] == [1.0, 2.0]


def test_ddp_processes_agree_on_stopping(tmp_path, tiny_data, tiny_bert_dir):
    """SIGTERM to one of two torchrun processes: both leave the loop after the same step, save once
    and end by SIGTERM (a process leaving alone would hang the other in its next all-reduce)."""
    out = str(tmp_path / "out")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", "29519", "train.py", "--data_dir", tiny_data, "--encoder",
                             tiny_bert_dir, *FAST, "--epochs", "100", "--bs", "8", "--out_dir", out],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 180
    while time.time() < deadline and not os.path.exists(os.path.join(out, "metrics.jsonl")):
        time.sleep(0.2)
    workers = worker_pids(proc.pid)
    assert len(workers) == 2
    os.kill(workers[1], signal.SIGTERM)  # one worker only
    stdout, stderr = proc.communicate(timeout=120)
    # Both workers save (rank 0), then end by SIGTERM (-15; 143 in a shell); torchrun reports the failure.
    assert proc.returncode != 0, stderr[-3000:]
    assert re.findall(r"exitcode\s*:\s*(-?\d+)", stderr) and \
        set(re.findall(r"exitcode\s*:\s*(-?\d+)", stderr)) <= {"143", "-15"}, stderr[-3000:]
    assert "continue with --resume" in stdout
    assert load_checkpoint(os.path.join(out, "last.pt"))["step"] > 0


def worker_pids(parent):
    """The train.py processes torchrun started (Linux /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline") as f:
                cmd = f.read()
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and "train.py" in cmd:
            pids.append(int(entry))
    return sorted(pids)
