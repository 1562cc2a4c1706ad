import os

import pytest
import torch

# Triton kernels run on the CPU through the interpreter; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def default_model():
    """SmolLM2-135M-Instruct in fp32 (prepared once into the cache)."""
    from freezekern import load_default_model

    return load_default_model()


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """A word-level tokenizer over tokens t0..t256 (ids 0..256; 0 pads, 2 ends a text), built offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"t{i}": i for i in range(257)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t3"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="t0", bos_token="t1", eos_token="t2",
                                   unk_token="t3")


@pytest.fixture
def one_thread():
    """One torch thread for the test (restored afterwards): tiny models time more steadily on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def char_tokenizer():
    """A factory of character-level tokenizers over printable ASCII (98 ids; 0 pads, 1 starts, 2 ends a
    text), built offline; each call gives a fresh one (trainers may change the one they get)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    def make():
        vocab = {chr(i): i - 30 for i in range(32, 127)}
        vocab.update({"<pad>": 0, "<s>": 1, "</s>": 2})
        backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
        backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
        return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                       eos_token="</s>")

    return make
