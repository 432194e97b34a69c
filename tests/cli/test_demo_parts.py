"""The demo's pieces: corpus, batches, model, activation measurement."""
import torch

from amp_engine.demo.corpus import VOCAB, batch_offsets, decode, encode, load_corpus, make_batch
from amp_engine.demo.model import CharTransformer, ModelShape


def test_corpus_is_real_text_and_deterministic():
    a, b = load_corpus(max_chars=100_000), load_corpus(max_chars=100_000)
    assert torch.equal(a.train, b.train) and torch.equal(a.val, b.val)
    assert a.n_chars == 100_000 and len(a.train) + len(a.val) == a.n_chars
    assert 0.05 < len(a.val) / a.n_chars < 0.15
    text = decode(a.train[:20_000])
    assert text.count(" ") > 1_000 and ("def " in text or " the " in text)  # prose or code, not noise
    assert int(a.train.max()) < len(VOCAB) and int(a.train.min()) >= 0


def test_encode_maps_unknown_to_question_mark():
    assert decode(encode("a\tb\nÜ\x01~")) == "a\tb\n??~"
    assert encode("").numel() == 0


def test_batches_fixed_by_seed_and_shifted_targets():
    ids = torch.arange(1000) % len(VOCAB)
    o1, o2 = batch_offsets(1000, 16, 4, 3, seed=7), batch_offsets(1000, 16, 4, 3, seed=7)
    assert torch.equal(o1, o2) and not torch.equal(o1, batch_offsets(1000, 16, 4, 3, seed=8))
    x, y = make_batch(ids, o1[0], 16, torch.device("cpu"))
    assert x.shape == (4, 16) and y.shape == (64,)
    assert torch.equal(y.view(4, 16)[:, :-1], x[:, 1:])  # targets are the inputs shifted by one


def test_model_shapes_and_causality():
    torch.manual_seed(0)
    model = CharTransformer(ModelShape(vocab_size=len(VOCAB), context=16, d_model=32, n_layers=1, n_heads=4))
    x = torch.randint(0, len(VOCAB), (2, 16))
    out = model(x)
    assert out.shape == (32, len(VOCAB))
    x2 = x.clone()
    x2[:, 10] = (x2[:, 10] + 1) % len(VOCAB)
    out2 = model(x2).view(2, 16, -1)
    # a change at position 10 cannot reach earlier positions
    assert torch.allclose(out.view(2, 16, -1)[:, :10], out2[:, :10])
    assert not torch.allclose(out.view(2, 16, -1)[:, 10:], out2[:, 10:])


def test_demo_options_validated():
    import pytest

    from amp_engine.demo import DemoOptions

    for bad in (dict(steps=0), dict(batch_size=-1), dict(dtype="fp8"), dict(device="tpu"), dict(threads=0)):
        with pytest.raises((ValueError, RuntimeError), match=next(iter(bad))):
            DemoOptions(**bad)
