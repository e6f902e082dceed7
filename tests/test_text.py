import gzip
import itertools

import pytest
from transformers import AutoTokenizer

from pipeline.errors import UserError
from pipeline.text import TextSource, pack_batches, shard_budget


def test_shard_budgets_add_up():
    assert sum(shard_budget(1001, s, 7) for s in range(7)) == 1001
    assert max(shard_budget(1000, s, 7) for s in range(7)) - min(shard_budget(1000, s, 7) for s in range(7)) == 1


def test_every_text_in_exactly_one_shard(small_wiki):
    src = TextSource(files=str(small_wiki))
    everything = list(src.open())
    shards = [list(src.open(s, 3)) for s in range(3)]
    assert len(everything) == 40 and sorted(sum(shards, [])) == sorted(everything)
    assert list(src.open(1, 3, skip=4)) == shards[1][4:]


def test_packing_is_exact_in_budget_and_resumable(tiny_model_dir, small_wiki):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir("gpt2"))
    src = TextSource(files=str(small_wiki))
    batches = list(pack_batches(src.open(), tok, max_length=64, chars_per_token=8, batch_tokens=256, budget=1000))
    assert sum(b.tokens for b in batches) == 1000
    assert all(b.input_ids.numel() <= 256 and b.input_ids.shape[1] <= 64 for b in batches)
    assert all(int(b.attention_mask.sum()) == b.tokens for b in batches)
    # restarting after batch 3 at its position with the remaining budget reproduces the rest exactly
    cut = batches[3]
    done = sum(b.tokens for b in batches[:4])
    rest = list(pack_batches(src.open(skip=cut.position), tok, max_length=64, chars_per_token=8, batch_tokens=256,
                             budget=1000 - done, position=cut.position))
    assert len(rest) == len(batches) - 4
    for a, b in zip(rest, batches[4:]):
        assert a.position == b.position and a.input_ids.equal(b.input_ids)


def test_prefix_tokenisation_equals_full(tiny_model_dir, small_wiki):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir("gpt2"))
    texts = list(itertools.islice(TextSource(files=str(small_wiki)).open(), 10))
    batch = next(pack_batches(iter(texts[:1]), tok, max_length=64, chars_per_token=8, batch_tokens=64, budget=10**9))
    assert batch.input_ids[0].tolist() == tok(texts[0], truncation=True, max_length=64)["input_ids"]


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
