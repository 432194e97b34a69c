"""MixedPrecisionOptimizer: epochs, learning under AMP, the progress bar, history."""
import pytest
import torch
from torch import nn

from amp_engine import MixedPrecisionConfig, MixedPrecisionOptimizer, create_mixed_precision_optimizer

from .helpers import CE, batches, blobs, mlp, params_of

QUIET = dict(check_compatibility=False, validate_amp=False, track_memory_usage=False, progress_bar=False)
X, Y = blobs(384, d_in=8, classes=3)
TRAIN, VAL = batches(X[:256], Y[:256], 32), batches(X[256:], Y[256:], 64)


@pytest.mark.parametrize("fields", [
    dict(dtype="bf16"),
    dict(dtype="fp16", fused_optimizer=True, max_grad_norm=5.0),
    dict(dtype="bf16", memory_efficient=True),
])
def test_a_small_classifier_learns_under_amp(fields):
    model = mlp(8, 32, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02)
    mp = create_mixed_precision_optimizer(model, opt, CE, "cpu", **QUIET, **fields)
    before = mp.validate_epoch(VAL)["accuracy"]
    for _ in range(4):
        train = mp.train_epoch(TRAIN)
    after = mp.validate_epoch(VAL)
    assert train["amp_steps"] == len(TRAIN) and train["skipped_steps"] == 0
    assert after["accuracy"] >= 0.85 > before + 0.2  # chance is 1/3
    assert after["loss"] < 0.5


def test_train_epoch_result():
    model = mlp()
    mp = create_mixed_precision_optimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), CE, "cpu",
                                          dtype="bf16", **QUIET)
    r = mp.train_epoch(TRAIN)
    assert set(r) == {"epoch", "loss", "accuracy", "samples", "batches", "optimizer_steps", "skipped_steps",
                      "time", "throughput", "scale", "amp_steps"}
    assert (r["epoch"], r["samples"], r["batches"], r["optimizer_steps"]) == (1, 256, 8, 8)
    assert r["throughput"] == pytest.approx(256 / r["time"]) and r["scale"] == 1.0
    assert mp.train_epoch(TRAIN)["epoch"] == 2


def test_epoch_loss_is_the_sample_weighted_mean():
    model = mlp()
    mp = create_mixed_precision_optimizer(model, torch.optim.SGD(model.parameters(), lr=0.0), CE, "cpu",
                                          enable_amp=False, **QUIET)
    uneven = [(X[:10], Y[:10]), (X[10:40], Y[10:40])]
    r = mp.train_epoch(uneven)
    with torch.no_grad():
        expected = CE(model(X[:40]), Y[:40]).item()
    assert r["loss"] == pytest.approx(expected, rel=1e-5)
    assert mp.validate_epoch(uneven)["loss"] == pytest.approx(expected, rel=1e-5)


def test_a_trailing_partial_window_is_stepped_as_its_own_batch():
    # 3 micro-batches with N = 4: the epoch ends mid-window; the step must equal one
    # batch of those 24 samples (grads rescaled by N/k), fp32 to compare exactly
    a, b = mlp(), mlp()
    mpa = create_mixed_precision_optimizer(a, torch.optim.SGD(a.parameters(), lr=0.5), CE, "cpu",
                                           enable_amp=False, gradient_accumulation_steps=4, **QUIET)
    mpb = create_mixed_precision_optimizer(b, torch.optim.SGD(b.parameters(), lr=0.5), CE, "cpu",
                                           enable_amp=False, **QUIET)
    start = params_of(a)
    r = mpa.train_epoch(batches(X[:24], Y[:24], 8))
    mpb.train_epoch([(X[:24], Y[:24])])
    assert r["optimizer_steps"] == 1
    for s, p, q in zip(start, a.parameters(), b.parameters()):
        assert not torch.equal(s, p)
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)


def test_progress_bar_on_demand_only(capsys):
    model = mlp()
    fields = dict(QUIET, progress_bar=None)
    mp = create_mixed_precision_optimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), CE, "cpu",
                                          dtype="bf16", **fields)
    mp.train_epoch(TRAIN[:2])  # pytest's stderr is not a TTY: no bar
    assert capsys.readouterr().err == ""
    mp.train_epoch(TRAIN[:2], progress_bar=True)
    err = capsys.readouterr().err
    assert "epoch 2" in err and "scale=1" in err and "samples_per_s" in err and "loss=" in err
    mp.config.progress_bar = True
    mp.train_epoch(TRAIN[:2])
    assert "epoch 3" in capsys.readouterr().err
    mp.train_epoch(TRAIN[:2], progress_bar=False)
    assert capsys.readouterr().err == ""


def test_validate_epoch_uses_eval_mode_and_restores_it():
    modes = []
    model = nn.Sequential(nn.Linear(8, 16), nn.Dropout(0.5), nn.Linear(16, 3))

    def loss_fn(out, y):
        modes.append(model.training)
        return CE(out, y)
    mp = MixedPrecisionOptimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn, "cpu",
                                 MixedPrecisionConfig(dtype="bf16", **QUIET))
    model.train()
    r = mp.validate_epoch(VAL)
    assert modes == [False, False] and model.training
    assert set(r) == {"epoch", "loss", "accuracy", "samples", "time"} and r["samples"] == 128
    assert all(p.grad is None for p in model.parameters())


def test_plateau_scheduler_follows_the_validation_loss():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # no progress: the loss plateaus
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, patience=0, factor=0.5)
    opt.param_groups[0]["lr"] = 1.0
    mp = create_mixed_precision_optimizer(model, opt, CE, "cpu", scheduler=sched, dtype="bf16", **QUIET)
    for _ in range(3):
        mp.validate_epoch(VAL)
    assert opt.param_groups[0]["lr"] == 0.25  # first call sets the best, then two reductions


def test_training_stats_history():
    model = mlp()
    mp = create_mixed_precision_optimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), CE, "cpu",
                                          dtype="fp16", **QUIET)
    mp.train_epoch(TRAIN[:2])
    mp.validate_epoch(VAL)
    mp.train_epoch(TRAIN[:2])
    s = mp.get_training_stats()
    assert s["epochs"] == 2 and [h["epoch"] for h in s["history"]] == [1, 2]
    assert set(s["history"][0]) == {"epoch", "train", "val"} and set(s["history"][1]) == {"epoch", "train"}
    assert s["amp"]["total_steps"] == 4 and s["amp"]["current_scale"] == 2.0**16
    mp.cleanup()


def test_factory_and_constructor_checks():
    model = mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="unknown MixedPrecisionConfig field.*'epochs'"):
        create_mixed_precision_optimizer(model, opt, CE, "cpu", epochs=3)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        create_mixed_precision_optimizer(model, opt, "ce", "cpu")
    model(X[:2]).sum().backward()
    opt.step()
    with pytest.raises(ValueError, match="optimizer already has state"):
        create_mixed_precision_optimizer(model, opt, CE, "meta", **QUIET)


def test_a_move_that_would_orphan_the_optimizer_is_refused():
    # CPU <-> CUDA moves keep the Parameter objects; a move to "meta" makes new ones,
    # which the optimizer would not hold: refused with what to do instead
    model = mlp()
    with pytest.raises(ValueError, match="before creating the optimizer"):
        create_mixed_precision_optimizer(model, torch.optim.SGD(model.parameters(), lr=0.1), CE, "meta",
                                         check_compatibility=False)
