"""Synthetic long-range task: associative recall across a distance D.

A sequence (token ids) is

    k_1 v_1 k_2 v_2 ... k_K v_K   filler ...   QUERY k_i
    ^ pairs, at positions 0..2K-1                ^ the last two tokens

with K distinct keys drawn from a key vocabulary, the K values a random
permutation of the K value tokens, and filler tokens drawn uniformly from a
filler vocabulary. The label is v_i, the value paired with the queried key.
The queried key's pair lies exactly D tokens before the query's key token
(positions 2(i-1) and 2(i-1) + D), so the answer is found only by combining
two tokens D apart.

A bag of tokens cannot beat chance by construction: every value token
appears exactly once in every sequence, and which value goes with which key
is a fresh random permutation each time, so the token counts carry no
information about the label (chance = 1/K).

Token ids: 0 QUERY, then keys, values, filler. A WordLevel tokenizer over
names of these ids ships with the checkpoints, so `load_model` loads them.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class RecallTask:
    num_pairs: int = 8     # K: pairs per sequence = number of values = classes
    num_keys: int = 32     # key vocabulary (K distinct keys drawn per sequence)
    num_filler: int = 32   # filler vocabulary

    pair_tokens: bool = True  # one token per (key, value) pair, else two adjacent tokens

    QUERY = 0

    @property
    def key_ids(self) -> range:
        """The query's key tokens (and the pairs' keys when pair_tokens is off)."""
        return range(1, 1 + self.num_keys)

    @property
    def value_ids(self) -> range:
        start = self.key_ids.stop
        return range(start, start + (0 if self.pair_tokens else self.num_pairs))

    @property
    def pair_ids(self) -> range:
        start = self.value_ids.stop
        return range(start, start + (self.num_keys * self.num_pairs if self.pair_tokens else 0))

    def pair_id(self, key: int, value: int) -> int:
        return self.pair_ids[key * self.num_pairs + value]

    @property
    def filler_ids(self) -> range:
        start = self.pair_ids.stop
        return range(start, start + self.num_filler)

    @property
    def vocab_size(self) -> int:
        return self.filler_ids.stop

    @property
    def labels(self) -> list[str]:
        return [f"v{j}" for j in range(self.num_pairs)]

    @property
    def pairs_len(self) -> int:
        return self.num_pairs * (1 if self.pair_tokens else 2)

    @property
    def min_distance(self) -> int:
        """The smallest D at which every pair can be queried (the pairs come first)."""
        return self.pairs_len + 1

    def token_names(self) -> list[str]:
        pairs = [f"k{k}={v}" for k in range(self.num_keys) for v in range(self.num_pairs)] if self.pair_tokens else []
        values = [] if self.pair_tokens else self.labels
        return ["QUERY"] + [f"k{j}" for j in range(self.num_keys)] + values + pairs + [f"f{j}" for j in range(self.num_filler)]

    def sample(self, distance: int, rng: random.Random) -> tuple[list[int], int]:
        """One sequence with the queried pair exactly `distance` tokens before the query key."""
        if distance < self.min_distance:
            raise ValueError(f"distance must be >= {self.min_distance}, got {distance}")
        K = self.num_pairs
        keys = rng.sample(range(self.num_keys), K)
        values = list(range(K))
        rng.shuffle(values)
        i = rng.randrange(K)  # the queried pair
        if self.pair_tokens:
            head = [self.pair_id(k, v) for k, v in zip(keys, values)]
        else:
            head = [t for k, v in zip(keys, values) for t in (self.key_ids[k], self.value_ids[v])]
        at = head.index(self.pair_id(keys[i], values[i]) if self.pair_tokens else self.key_ids[keys[i]])
        n = at + distance + 1  # the query key sits at position at + distance
        fillers = self.filler_ids
        ids = head + [fillers[rng.randrange(len(fillers))] for _ in range(n - len(head) - 2)]
        ids += [self.QUERY, self.key_ids[keys[i]]]
        assert len(ids) == n
        return ids, values[i]

    def samples(self, distances: list[int], seed: int) -> tuple[list[torch.Tensor], list[int]]:
        """One sequence per entry of `distances`, reproducibly from seed."""
        rng = random.Random(f"long-range/{self.num_pairs}/{self.num_keys}/{self.num_filler}/{seed}")
        docs, labels = [], []
        for d in distances:
            ids, y = self.sample(int(d), rng)
            docs.append(torch.tensor(ids, dtype=torch.int64))
            labels.append(y)
        return docs, labels

    def tokenizer(self):
        """A WordLevel tokenizer naming every id (QUERY, k0.., v0.., f0..)."""
        from tokenizers import Tokenizer, models, pre_tokenizers

        tok = Tokenizer(models.WordLevel({name: i for i, name in enumerate(self.token_names())}))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        return tok


def log_uniform_distances(lo: int, hi: int, count: int, seed: int) -> list[int]:
    """count distances drawn log-uniformly from [lo, hi] (a curriculum mix:
    short ones, cheap and easy, are as frequent per octave as long ones)."""
    rng = random.Random(f"distances/{lo}/{hi}/{seed}")
    return [int(round(math.exp(rng.uniform(math.log(lo), math.log(hi))))) for _ in range(count)]


def write_jsonl(path: str | Path, task: RecallTask, docs: list[torch.Tensor], labels: list[int]) -> None:
    names = task.labels
    with open(path, "w") as f:
        for ids, y in zip(docs, labels):
            f.write(json.dumps({"ids": ids.tolist(), "label": names[y]}) + "\n")
