"""Token batches from the default corpus and from user files."""

import json

import pytest
import torch

from freezekern.model.data import make_batches, read_examples, split_files, stdlib_files


class ByteTokenizer:
    """A minimal stand-in with the Hugging Face call signature: one id per byte, eos 0."""

    eos_token_id = 0
    pad_token_id = None

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [b + 1 for b in text.encode()]}


def test_stdlib_corpus_is_deterministic_and_split_by_file():
    files = stdlib_files(seed=3)
    assert files == stdlib_files(seed=3) and files != stdlib_files(seed=4)
    train, held = split_files(files)
    assert not set(train) & set(held) and len(train) + len(held) == len(files)
    a = make_batches(ByteTokenizer(), seq_len=64, num_tokens=300, batch_size=2, seed=3)
    b = make_batches(ByteTokenizer(), seq_len=64, num_tokens=300, batch_size=2, seed=3)
    assert len(a) == 3 and a[0]["input_ids"].shape == (2, 64) and a[-1]["input_ids"].shape == (1, 64)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b))
    assert all(torch.equal(x["input_ids"], x["labels"]) for x in a)


def test_prompt_completion_masks_the_prompt(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps({"prompt": "Q: hi? ", "completion": "A: yes"}) + "\n\n"
                    + json.dumps({"prompt": "Q: 2+2? ", "completion": "A: 4"}) + "\n")
    batches = make_batches(ByteTokenizer(), path, seq_len=32, num_tokens=64, batch_size=4)
    batch = batches[0]
    assert batch["input_ids"].shape == (2, 32)
    for row in range(2):
        labels, mask = batch["labels"][row], batch["attention_mask"][row]
        counted = labels != -100
        prompt_len = 7 if labels[7] != -100 and labels[6] == -100 else 8
        assert not counted[:prompt_len].any() and counted[prompt_len:int(mask.sum())].all()
        assert not counted[int(mask.sum()):].any()


def test_folder_and_text_records(tmp_path):
    (tmp_path / "a.txt").write_text("x" * 100)
    (tmp_path / "b.md").write_text("y" * 100)
    (tmp_path / "skip.bin").write_bytes(b"\x00")
    assert [e.text[0] for e in read_examples(tmp_path)] == ["x", "y"]
    jl = tmp_path / "t.jsonl"
    jl.write_text(json.dumps({"text": "hello"}) + "\n")
    assert read_examples(jl)[0].text == "hello"


@pytest.mark.parametrize("content,message", [
    ("{not json}\n", "not valid JSON"),
    (json.dumps({"question": "x"}) + "\n", "needs 'text'"),
])
def test_bad_jsonl(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        read_examples(path)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        read_examples(tmp_path / "missing.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no text files"):
        read_examples(empty)
    short = tmp_path / "short.txt"
    short.write_text("abc")
    with pytest.raises(ValueError, match="no full sequence"):
        make_batches(ByteTokenizer(), short, seq_len=64)
    with pytest.raises(ValueError, match="seq_len"):
        make_batches(ByteTokenizer(), short, seq_len=1)
