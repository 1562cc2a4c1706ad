"""Calibration and training data: token batches from files or the default corpus.

The default corpus is the running Python's standard-library source (always
present). Users pass a text file, a folder of text files, or a JSONL file
(``text`` records, or ``prompt``/``completion`` records with the loss on the
completion only). Batches are dicts of LongTensors [B, T]: ``input_ids``,
``attention_mask`` and ``labels`` (-100 = not counted; HF convention, the
shift to next-token targets happens inside the loss and the tracer).
"""

from __future__ import annotations

import json
import math
import random
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100
TEXT_SUFFIXES = {".txt", ".md", ".py", ".rst", ".json", ".jsonl", ".csv", ".html", ".c", ".h", ".js", ".toml",
                 ".yaml", ".yml", ".tex"}


@dataclass
class Example:
    """One record: plain ``text``, or a ``prompt`` whose tokens are not scored plus a ``completion``."""

    text: str = ""
    prompt: str | None = None
    completion: str | None = None


def stdlib_files(seed: int = 0) -> list[Path]:
    """The standard library's .py files (test suites excluded), shuffled deterministically."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(
        p for p in root.rglob("*.py")
        if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
        and "idle_test" not in p.parts
    )
    random.Random(seed).shuffle(files)
    return files


def split_files(files: list[Path], heldout_fraction: float = 0.2) -> tuple[list[Path], list[Path]]:
    """Split a (shuffled) file list into train and held-out files; no file is in both."""
    cut = max(1, int(round(len(files) * heldout_fraction)))
    return files[cut:], files[:cut]


MAX_REPLACED_SHARE = 0.01  # more undecodable bytes than this, and a file is not text


def _read_text(path: Path) -> str:
    """The file's text; refuses files that are not text (NUL bytes, or more than 1 % undecodable)."""
    data = path.read_bytes()
    if b"\x00" in data:
        raise ValueError(f"{path} is not a text file (it holds NUL bytes); pass text, a folder of text files or JSONL")
    text = data.decode("utf-8", errors="replace")
    replaced = text.count("\ufffd")
    if text and replaced > MAX_REPLACED_SHARE * len(text):
        raise ValueError(f"{path} is not UTF-8 text ({replaced} of {len(text)} characters do not decode); "
                         "pass text, a folder of text files or JSONL")
    return text


def read_examples(path) -> list[Example]:
    """Examples from a text file, a folder (its text files, sorted) or a JSONL file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist")
    if not path.is_dir() and not path.is_file():
        raise ValueError(f"data path {path} is neither a regular file nor a folder (a device or a pipe?)")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"{path} holds no text files (looked for {sorted(TEXT_SUFFIXES)})")
        return [Example(text=_read_text(p)) for p in files]
    if path.suffix.lower() == ".jsonl":
        examples = []
        for line_no, line in enumerate(_read_text(path).splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{line_no}: a record must be a JSON object")
            if "prompt" in record and "completion" in record:
                examples.append(Example(prompt=str(record["prompt"]), completion=str(record["completion"])))
            elif "text" in record:
                examples.append(Example(text=str(record["text"])))
            else:
                raise ValueError(f"{path}:{line_no}: a record needs 'text', or 'prompt' and 'completion'")
        if not examples:
            raise ValueError(f"{path} holds no records")
        return examples
    return [Example(text=_read_text(path))]


def _packed_sequences(token_stream, seq_len: int, num_sequences: int) -> list[list[int]]:
    sequences: list[list[int]] = []
    buffer: list[int] = []
    for ids in token_stream:
        buffer.extend(ids)
        while len(buffer) >= seq_len and len(sequences) < num_sequences:
            sequences.append(buffer[:seq_len])
            buffer = buffer[seq_len:]
        if len(sequences) >= num_sequences:
            break
    return sequences


def _text_token_stream(tokenizer, texts):
    eos = tokenizer.eos_token_id
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        yield ids + ([eos] if eos is not None else [])


def make_batches(
    tokenizer,
    source=None,
    *,
    seq_len: int = 256,
    num_tokens: int = 4096,
    batch_size: int = 4,
    seed: int = 0,
    files: list[Path] | None = None,
) -> list[dict[str, torch.Tensor]]:
    """Token batches of shape [B, seq_len], about ``num_tokens`` tokens in all.

    ``source``: None (the stdlib corpus, or ``files`` if given), a path, or a
    list of Example. Plain text is packed into full sequences; prompt/completion
    records become one padded sequence each, with the prompt and padding
    labelled -100. Deterministic for a given seed.
    """
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    if num_tokens < 1 or batch_size < 1:
        raise ValueError("num_tokens and batch_size must be positive")
    num_sequences = max(1, math.ceil(num_tokens / seq_len))
    if source is None:
        texts = (_read_text(p) for p in (files if files is not None else stdlib_files(seed)))
        examples = None
    else:
        examples = read_examples(source) if not isinstance(source, list) else source
        texts = None
    rows: list[tuple[list[int], list[int]]] = []
    if examples is not None and any(e.prompt is not None for e in examples):
        rows = _prompt_completion_rows(tokenizer, examples, seq_len, num_sequences, seed)
    else:
        if texts is None:
            texts = [e.text for e in examples]
        rows = [(seq, seq) for seq in _packed_sequences(_text_token_stream(tokenizer, texts), seq_len, num_sequences)]
    if not rows:
        raise ValueError(
            f"the data yielded no full sequence of {seq_len} tokens; pass more text or a smaller --seq-len"
        )
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    batches = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        input_ids = torch.full((len(chunk), seq_len), pad, dtype=torch.long)
        labels = torch.full((len(chunk), seq_len), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), seq_len), dtype=torch.long)
        for i, (ids, labs) in enumerate(chunk):
            input_ids[i, :len(ids)] = torch.tensor(ids)
            labels[i, :len(labs)] = torch.tensor(labs)
            mask[i, :len(ids)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": mask, "labels": labels})
    return batches


def _prompt_completion_rows(tokenizer, examples, seq_len, num_sequences, seed):
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id
    rows = []
    for index in order:
        ex = examples[index]
        if ex.prompt is None:
            ids = tokenizer(ex.text, add_special_tokens=False)["input_ids"][:seq_len]
            rows.append((ids, list(ids)))
        else:
            prompt = tokenizer(ex.prompt, add_special_tokens=False)["input_ids"]
            completion = tokenizer(ex.completion, add_special_tokens=False)["input_ids"]
            completion = completion + ([eos] if eos is not None else [])
            ids = (prompt + completion)[:seq_len]
            labels = ([IGNORE_INDEX] * len(prompt) + completion)[:seq_len]
            if all(label == IGNORE_INDEX for label in labels[1:]):
                continue
            rows.append((ids, labels))
        if len(rows) >= num_sequences:
            break
    return rows
