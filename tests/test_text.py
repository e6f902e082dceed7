import gzip
import itertools

import pytest
import torch
from transformers import AutoTokenizer

from rome.pipeline.errors import UserError
from rome.pipeline.stats.text import TextSource, pack_batches, tokenize_window


def test_windows_do_not_depend_on_the_shard_count(small_wiki, tmp_path):
    src = TextSource(files=str(small_wiki))
    one = list(src.windows(6))
    assert [len(w) for w in one] == [6] * 6 + [4] and sum(one, []) == [t for w in src.windows(40) for t in w]
    for shards in (2, 3):
        parts = [list(src.windows(6, s, shards)) for s in range(shards)]
        assert sorted(map(tuple, sum(parts, []))) == sorted(map(tuple, one))  # the same windows, each once
    assert list(src.windows(6, 1, 3, skip=1)) == list(src.windows(6, 1, 3))[1:]
    # several files: the windows go round-robin over the shards; windows never span two files
    lines = small_wiki.read_text().splitlines(keepends=True)
    (tmp_path / "a.jsonl").write_text("".join(lines[:25]))
    (tmp_path / "b.jsonl").write_text("".join(lines[25:]))
    two = TextSource(files=str(tmp_path / "*.jsonl"))
    whole = list(two.windows(10))
    assert [len(w) for w in whole] == [10, 10, 5, 10, 5]
    assert sorted(map(tuple, list(two.windows(10, 0, 2)) + list(two.windows(10, 1, 2)))) == sorted(map(tuple, whole))


def test_packing_is_exact_in_budget_sorted_and_resumable(tiny_model_dir, small_wiki):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir("gpt2"))
    src = TextSource(files=str(small_wiki))
    pack = dict(max_length=64, chars_per_token=8, batch_tokens=256)
    batches = list(pack_batches(src.windows(16), tok, budget=1000, **pack))
    assert sum(b.tokens for b in batches) == 1000
    assert all(b.input_ids.numel() <= 256 and b.input_ids.shape[1] <= 64 for b in batches)
    padded = sum(b.input_ids.numel() for b in batches) - 1000
    assert padded < 0.05 * 1000  # sorted within a window: (almost) no padding
    for b in batches:  # the index names exactly the real tokens (None: no padding at all)
        real = (torch.arange(b.input_ids.shape[1]) < torch.tensor([[n] for n in _lengths(b)])).view(-1)
        assert b.tokens == int(real.sum())
        assert (b.index is None and bool(real.all())) or torch.equal(b.index, real.nonzero().view(-1))
    assert [b.window for b in batches] == sorted(b.window for b in batches) and batches[-1].last
    # restarting inside a window, from its start with the budget left there, reproduces the rest exactly
    cut = next(i for i, b in enumerate(batches) if not b.last and b.batch > 0)
    w, done_batches = batches[cut].window, batches[cut].batch + 1
    before = sum(b.tokens for b in batches if b.window < w)
    rest = list(
        pack_batches(src.windows(16, skip=w), tok, budget=1000 - before, window=w, skip_batches=done_batches, **pack)
    )
    assert len(rest) == len(batches) - cut - 1
    for a, b in zip(rest, batches[cut + 1 :]):
        assert (a.window, a.batch, a.last, a.tokens) == (b.window, b.batch, b.last, b.tokens) and a.input_ids.equal(
            b.input_ids
        )


def _lengths(batch):
    """Row lengths recovered from the index (or full width when unpadded)."""
    width = batch.input_ids.shape[1]
    if batch.index is None:
        return [width] * batch.input_ids.shape[0]
    return torch.bincount(batch.index // width, minlength=batch.input_ids.shape[0]).tolist()


def test_prefix_tokenisation_equals_full(tiny_model_dir, small_wiki):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir("gpt2"))
    texts = list(itertools.islice(next(TextSource(files=str(small_wiki)).windows(10)), 10))
    got = tokenize_window(tok, texts, max_length=64, chars_per_token=2)  # a tight prefix: some need the whole text
    assert got == [tok(t, truncation=True, max_length=64)["input_ids"] for t in texts]


def test_bad_sources(tmp_path):
    with pytest.raises(UserError, match="matches no file"):
        TextSource(files=str(tmp_path / "none*.jsonl")).validate()
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(UserError, match="is empty"):
        TextSource(files=str(empty)).validate()
    broken = tmp_path / "broken.jsonl.gz"
    broken.write_bytes(b"this is not gzip")
    with pytest.raises(UserError, match="cannot read"):
        TextSource(files=str(broken)).validate()
    wrong = tmp_path / "wrong.jsonl"
    with gzip.open(tmp_path / "x.gz", "wt") as f:
        f.write("x")
    wrong.write_text('{"body": "hello"}\n')
    with pytest.raises(UserError, match="data.text_field"):
        TextSource(files=str(wrong)).validate()
    with pytest.raises(UserError, match="unsupported type"):
        (tmp_path / "a.csv").write_text("text\nhi\n")
        TextSource(files=str(tmp_path / "a.csv")).validate()
