"""Byte-level BPE tokenizer: training, exact round trip, determinism, files,
and piecewise encoding of long texts."""
from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from bsbr_core import cli
from bsbr_core.tokenizer import (
    encode,
    encode_many,
    load_tokenizer,
    save_tokenizer,
    split_pieces,
    train_tokenizer,
)

REPO = Path(__file__).resolve().parents[1]
VOCAB = 400

TOPICS = [
    "the scheduler picks the next task from the runqueue on every tick",
    "a network device driver hands each received packet to the stack",
    "the page cache keeps file data in memory until writeback",
]


def _texts(n: int = 60, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        words = rng.choice(TOPICS).split()
        title = f"Document {i}"
        body = "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(5, 15))) for _ in range(rng.randint(4, 20)))
        out.append(f"{title}\n{'=' * len(title)}\n\n.. code-block:: c\n\n\tint x = {i};\n\n{body}\n")
    return out


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(_texts(), vocab_size=VOCAB)


# Whitespace and non-ASCII at piece boundaries are where a careless splitter
# would change tokens.
AWKWARD = [
    "",
    "x",
    "  leading and trailing spaces  ",
    "tabs\tand\r\nCRLF\r\nlines\n\n\n",
    "trailing space before newline \nnext",
    "unicode: café, naïve, 日本語, emoji 🐧, zero\u200bwidth, nbsp\u00a0here\n",
    "bytes the corpus never saw: \x00\x01\x7f \ufffd",
]


def test_vocab_is_byte_level_without_special_tokens(tokenizer):
    assert tokenizer.get_vocab_size() == VOCAB
    assert tokenizer.get_vocab_size(with_added_tokens=True) == VOCAB
    assert not any(t.startswith("[") and t.endswith("]") and len(t) > 2 for t in tokenizer.get_vocab())
    # Merges were learnt: a frequent word (with its leading space) is one token.
    assert len(encode(tokenizer, " scheduler")) == 1
    # Every byte has a token of its own, so no text needs an [UNK].
    assert all(len(encode(tokenizer, chr(b))) == 1 for b in range(128))


@pytest.mark.parametrize("text", AWKWARD + _texts(3, seed=1))
def test_round_trip_is_exact(tokenizer, text):
    ids = encode(tokenizer, text)
    assert all(0 <= i < tokenizer.get_vocab_size() for i in ids)
    assert tokenizer.decode(ids) == text
    assert ids == tokenizer.encode(text).ids


def test_training_is_deterministic():
    a = train_tokenizer(_texts(), vocab_size=VOCAB)
    b = train_tokenizer(_texts(), vocab_size=VOCAB)
    assert a.to_str() == b.to_str()
    c = train_tokenizer(_texts(seed=5), vocab_size=VOCAB)
    assert c.to_str() != a.to_str()


def test_training_in_another_process_gives_the_same_file(tokenizer, tmp_path):
    """Rust hash maps are seeded per process: check across processes."""
    (tmp_path / "texts.json").write_text(json.dumps(_texts()))
    code = (
        "import json, sys; from bsbr_core.tokenizer import train_tokenizer, save_tokenizer; "
        "save_tokenizer(train_tokenizer(json.load(open(sys.argv[1])), vocab_size=int(sys.argv[2])), sys.argv[3])"
    )
    subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "texts.json"), str(VOCAB), str(tmp_path / "other.json")],
        cwd=REPO, check=True,
    )
    save_tokenizer(tokenizer, tmp_path / "here.json")
    assert (tmp_path / "other.json").read_bytes() == (tmp_path / "here.json").read_bytes()


def test_save_and_load(tokenizer, tmp_path):
    path = tmp_path / "sub" / "tokenizer.json"
    save_tokenizer(tokenizer, path)
    json.loads(path.read_text())  # plain JSON
    loaded = load_tokenizer(path)
    for text in AWKWARD + _texts(5, seed=2):
        assert encode(loaded, text) == encode(tokenizer, text)
    with pytest.raises(FileNotFoundError, match="tokenizer train"):
        load_tokenizer(tmp_path / "missing.json")


def test_long_text_is_encoded_in_pieces_exactly(tokenizer):
    rng = random.Random(3)
    # A long document whose lines end in every awkward way.
    choices = AWKWARD + _texts(4, seed=4)
    lines = [rng.choice(choices) + rng.choice(["", " ", "\t", "  ", "é", "!"]) for _ in range(1500)]
    text = "\n".join(lines)
    pieces = split_pieces(text, piece_chars=500)
    assert len(pieces) > 50 and "".join(pieces) == text
    for p in pieces[1:]:
        assert p.startswith("\n")
    assert encode(tokenizer, text) == tokenizer.encode(text).ids
    # Cutting before every newline instead would change tokens of this text.
    lines_after = text.split("\n")
    naive = [lines_after[0]] + ["\n" + line for line in lines_after[1:]]
    assert [i for e in tokenizer.encode_batch(naive) for i in e.ids] != tokenizer.encode(text).ids
    # And through the public helper's default piece size, several texts at once.
    texts = [text, "", text[:1234], text[7:]]
    assert encode_many(tokenizer, texts) == [tokenizer.encode(t).ids for t in texts]


def test_split_pieces_never_cuts_after_whitespace():
    text = "a" * 10 + " \n" + "b" * 10 + "\t\n" + "c" * 10 + "\nd"
    pieces = split_pieces(text, piece_chars=5)
    assert pieces == ["a" * 10 + " \n" + "b" * 10 + "\t\n" + "c" * 10, "\nd"]
    assert split_pieces("no newline at all " * 10, piece_chars=5) == ["no newline at all " * 10]


def test_small_vocab_is_rejected():
    with pytest.raises(ValueError, match="256"):
        train_tokenizer(["abc"], vocab_size=100)


def test_cli_trains_on_the_training_split_only(tmp_path, capsys):
    data = tmp_path / "kd"
    data.mkdir()
    train, other = _texts(40), _texts(10, seed=9)
    # Validation and test hold a word the training split never has: it must
    # not become a token.
    other = [t + " zzqqxxunseenword " * 50 for t in other]
    for split, texts in (("train", train), ("validation", other), ("test", other)):
        with open(data / f"{split}.jsonl", "w") as f:
            for i, t in enumerate(texts):
                f.write(json.dumps({"path": f"a/{split}{i}.rst", "label": "a", "text": t}) + "\n")
    assert cli.main(["tokenizer", "train", "--data", str(data), "--vocab-size", "400"]) == 0
    printed = capsys.readouterr().out
    assert "vocab 400" in printed and '"p50"' in printed
    tok = load_tokenizer(data / "tokenizer.json")
    assert tok.to_str() == train_tokenizer(train, vocab_size=400).to_str()
    assert not any("zzqq" in t for t in tok.get_vocab())


def test_cli_tokenizer_without_corpus_is_one_line_error(tmp_path, capsys):
    assert cli.main(["tokenizer", "train", "--data", str(tmp_path / "none")]) == cli.EXIT_ERROR
    assert capsys.readouterr().err.startswith("error:")
