"""Generate the bundled tiny CLIP tokenizer in ``ldm/assets/tiny_clip_tokenizer/``.

A real CLIP byte-level BPE tokenizer (same pre-tokenizer, byte alphabet, ``</w>`` end-of-word suffix and
special tokens as ``openai/clip-vit-large-patch14``), but with a few hundred merges learned from a small
built-in corpus instead of 48,894 merges learned from web text. Tests and the default (digits) experiment
use it so that nothing has to be downloaded.

Run ``python ldm/assets/make_tiny_tokenizer.py`` to regenerate; the output is deterministic (ties in the
pair counts are broken lexicographically), so re-running it reproduces the committed files byte for byte.
The vocabulary layout follows openai/CLIP ``clip/simple_tokenizer.py``: 256 byte symbols, the same 256
with ``</w>``, one entry per merge, then ``<|startoftext|>`` and ``<|endoftext|>``.
"""

from __future__ import annotations

import argparse
import collections
import json
import re
from pathlib import Path

# Total vocabulary size: 512 byte symbols + merges + 2 special tokens. Small enough for tiny models
# (a 32-wide embedding of 1,024 rows is 32k parameters), large enough that every caption word of the
# default experiment and most common English words become a single token.
VOCAB_SIZE = 1024
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]

# Captions of the bundled digits experiment, weighted heavily so their words are merged first.
CAPTIONS = (
    [f"a photo of the digit {name}" for name in DIGIT_NAMES]
    + [f"a handwritten digit {name}" for name in DIGIT_NAMES]
    + [f"the number {name}" for name in DIGIT_NAMES]
)

# Common English words, roughly by frequency (the first ones get a higher count below). Hand-written
# rather than downloaded so that the generator runs offline and stays deterministic.
COMMON_WORDS = """
the of and to a in is it you that he was for on are with as his they be at one have this from or had by
not word but what some we can out other were all there when up use your how said an each she which do
their time if will way about many then them write would like so these her long make thing see him two
has look more day could go come did number sound no most people my over know water than call first who
may down side been now find any new work part take get place made live where after back little only
round man year came show every good me give our under name very through just form sentence great think
say help low line differ turn cause much mean before move right boy old too same tell does set three
want air well also play small end put home read hand port large spell add even land here must big high
such follow act why ask men change went light kind off need house picture try us again animal point
mother world near build self earth father head stand own page should country found answer school grow
study still learn plant cover food sun four between state keep eye never last let thought city tree
cross farm hard start might story saw far sea draw left late run while press close night real life few
north open seem together next white children begin got walk example ease paper group always music those
both mark often letter until mile river car feet care second book carry took science eat room friend
began idea fish mountain stop once base hear horse cut sure watch color face wood main enough plain girl
usual young ready above ever red list though feel talk bird soon body dog family direct pose leave song
measure door product black short numeral class wind question happen complete ship area half rock order
fire south problem piece told knew pass since top whole king space heard best hour better true during
hundred five remember step early hold west ground interest reach fast verb sing listen six table travel
less morning ten simple several vowel toward war lay against pattern slow center love person money serve
appear road map rain rule govern pull cold notice voice unit power town fine certain fly fall lead cry
dark machine note wait plan figure star box noun field rest correct able pound done beauty drive stood
contain front teach week final gave green oh quick develop ocean warm free minute strong special mind
behind clear tail produce fact street inch multiply nothing course stay wheel full force blue object
decide surface deep moon island foot system busy test record boat common gold possible plane stead dry
wonder laugh thousand ago ran check game shape equate hot miss brought heat snow tire bring yes distant
fill east paint language among photo image digit painting drawing portrait landscape cat sky beautiful
detailed style art digital render photograph cartoon sketch close view background bright colorful
""".split()


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable unicode symbol map of GPT-2 / openai/CLIP ``simple_tokenizer.bytes_to_unicode``."""
    # Printable bytes map to themselves; the rest are shifted above 255 so no symbol is whitespace or a
    # control character (BPE files are whitespace-separated).
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


# CLIP's pre-tokenizer (transformers CLIPTokenizer / openai/CLIP simple_tokenizer): letter runs, single
# digits, punctuation runs. Written with ASCII classes here because the corpus is ASCII.
_WORD_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+")


def word_counts() -> collections.Counter[str]:
    """Word frequencies of the built-in corpus: captions x 1000, common words by a Zipf-like rank count."""
    counts: collections.Counter[str] = collections.Counter()
    for caption in CAPTIONS:
        for word in _WORD_RE.findall(caption.lower()):
            counts[word] += 1000
    for rank, word in enumerate(COMMON_WORDS):
        counts[word] += max(1, 400 // (rank + 1)) + 5
    return counts


def learn_merges(counts: collections.Counter[str], n_merges: int) -> list[tuple[str, str]]:
    """Greedy BPE (Sennrich et al. 2016, Alg. 1) with CLIP's ``</w>`` end-of-word marker.

    Each step merges the most frequent adjacent symbol pair; ties go to the lexicographically smallest
    pair so that the result never depends on dict or hash order.
    """
    byte_map = bytes_to_unicode()
    words: dict[tuple[str, ...], int] = {}
    for word, count in sorted(counts.items()):
        symbols = [byte_map[b] for b in word.encode("utf-8")]
        symbols[-1] += "</w>"
        words[tuple(symbols)] = words.get(tuple(symbols), 0) + count
    merges: list[tuple[str, str]] = []
    for _ in range(n_merges):
        pairs: collections.Counter[tuple[str, str]] = collections.Counter()
        for symbols, count in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] += count
        if not pairs:
            break  # every word is a single symbol: nothing left to merge
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = best[0] + best[1]
        new_words: dict[tuple[str, ...], int] = {}
        for symbols, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(merged)
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            new_words[tuple(out)] = new_words.get(tuple(out), 0) + count
        words = new_words
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """Vocabulary in openai/CLIP order: bytes, bytes + ``</w>``, merges, then the two special tokens."""
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + [a + b for a, b in merges] + [BOS, EOS]
    vocab: dict[str, int] = {}
    for token in tokens:
        vocab.setdefault(token, len(vocab))  # a merge can never duplicate a byte symbol, but be safe
    return vocab


def write(out_dir: Path, vocab_size: int = VOCAB_SIZE) -> None:
    """Write vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json to ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    merges = learn_merges(word_counts(), vocab_size - 512 - 2)
    vocab = build_vocab(merges)
    # The same four files transformers' CLIPTokenizer.save_pretrained writes (v4 layout), which both the
    # Python (v4 "slow") and tokenizers-backed CLIPTokenizer load without network access.
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out_dir / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    (out_dir / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "errors": "replace",
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        **special,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {len(vocab)} tokens ({len(merges)} merges) to {out_dir}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "tiny_clip_tokenizer")
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args()
    write(args.out, args.vocab_size)
