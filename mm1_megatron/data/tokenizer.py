"""SentencePiece tokenizer with fixed special-token ids.

Ids (the model config relies on them; `llm.image_token_id` defaults to IMAGE_ID):

    0 <pad>    padding                       (sentencepiece pad_id)
    1 <s>      beginning of sequence (BOS)   (bos_id)
    2 </s>     end of sequence (EOS)         (eos_id)
    3 <image>  image placeholder             (user-defined symbol)
    4 <eoc>    end of chunk                  (user-defined symbol)
    5 <unk>    unknown (rare: byte fallback) (unk_id)

Training settings that make text round-trip exactly (decode(encode(t)) == t): identity
normalisation, byte fallback, no dummy prefix, whitespace kept. No dummy prefix also means text
segments encoded separately (interleaved documents) concatenate to the same ids as one string
would, up to merges across the boundary.

`<image>` / `<eoc>` written literally in *data* must not become placeholders (a caption that
mentions "<image>" would otherwise claim an image it does not have): `encode` spells them with
byte tokens unless `allow_special=True` (prompts such as "<image> A photo of").
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Iterable, Optional, Sequence, Union

import sentencepiece as spm

PAD_ID, BOS_ID, EOS_ID, IMAGE_ID, EOC_ID, UNK_ID = 0, 1, 2, 3, 4, 5
IMAGE_TOKEN, EOC_TOKEN = "<image>", "<eoc>"
# piece -> required id; pieces as sentencepiece names them.
SPECIAL_TOKENS: dict[str, int] = {
    "<pad>": PAD_ID, "<s>": BOS_ID, "</s>": EOS_ID,
    IMAGE_TOKEN: IMAGE_ID, EOC_TOKEN: EOC_ID, "<unk>": UNK_ID,
}
_LITERAL_SPECIALS = re.compile("|".join(re.escape(t) for t in (IMAGE_TOKEN, EOC_TOKEN)))


class Tokenizer:
    """A loaded, checked sentencepiece model. Picklable (DataLoader workers)."""

    def __init__(self, model_proto: bytes, path: str = "<memory>") -> None:
        self.path = path
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self._check()
        # Byte pieces used to spell special strings that occur literally in data.
        self._byte_ids = [self._sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
        self._has_bytes = all(self._sp.id_to_piece(i) == f"<0x{b:02X}>"
                              for b, i in enumerate(self._byte_ids))

    @classmethod
    def load(cls, path: Union[str, Path]) -> "Tokenizer":
        path = Path(path)
        try:
            proto = path.read_bytes()
        except OSError as e:
            raise ValueError(f"{path}: cannot read tokenizer model ({e.strerror})") from None
        return cls(proto, str(path))

    def _check(self) -> None:
        sp, size = self._sp, self._sp.get_piece_size()
        for piece, want in SPECIAL_TOKENS.items():
            # piece_to_id returns unk for a missing piece, so compare both directions.
            got = sp.piece_to_id(piece)
            if want >= size or sp.id_to_piece(want) != piece or got != want:
                where = "is missing" if sp.id_to_piece(got) != piece else f"has id {got}"
                raise ValueError(f"{self.path}: special token {piece!r} {where}; it must have "
                                 f"id {want} (train with tools/train_tokenizer.py)")

    # ids ---------------------------------------------------------------------------------
    pad_id = property(lambda self: PAD_ID)
    bos_id = property(lambda self: BOS_ID)
    eos_id = property(lambda self: EOS_ID)
    image_id = property(lambda self: IMAGE_ID)
    eoc_id = property(lambda self: EOC_ID)
    unk_id = property(lambda self: UNK_ID)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    # text <-> ids ------------------------------------------------------------------------
    def encode(self, text: str, bos: bool = False, eos: bool = False,
               allow_special: bool = False) -> list[int]:
        if allow_special or not _LITERAL_SPECIALS.search(text):
            ids = self._sp.encode(text)
        else:
            ids, pos = [], 0
            for m in _LITERAL_SPECIALS.finditer(text):
                ids += self._sp.encode(text[pos:m.start()]) if m.start() > pos else []
                ids += self._spell(m.group())
                pos = m.end()
            ids += self._sp.encode(text[pos:]) if pos < len(text) else []
        return ([BOS_ID] if bos else []) + ids + ([EOS_ID] if eos else [])

    def _spell(self, literal: str) -> list[int]:
        if self._has_bytes:
            return [self._byte_ids[b] for b in literal.encode("utf-8")]
        # No byte fallback: split the literal so it cannot match the user-defined symbol.
        return self._sp.encode(literal[0]) + self._sp.encode(literal[1:])

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode(list(ids))

    def count(self, text: str) -> int:
        """Number of text tokens (no BOS/EOS), as the packer will see them."""
        return len(self.encode(text))

    def __getstate__(self) -> dict:
        return {"path": self.path, "proto": self._proto}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["proto"], state["path"])

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


def train_tokenizer(texts: Iterable[str], vocab_size: int, output: Union[str, Path], *,
                    model_type: str = "unigram", exact_vocab: bool = True,
                    input_sentence_size: int = 2_000_000, seed: int = 0) -> Path:
    """Train a model with the fixed special ids; writes `output` (a .model path or a prefix).

    `exact_vocab=False` lets sentencepiece stop below `vocab_size` when the text is too small
    (otherwise it refuses); the result is still checked by `Tokenizer`.
    """
    output = Path(output)
    if output.suffix != ".model":
        output = output.with_name(output.name + ".model")
    output.parent.mkdir(parents=True, exist_ok=True)
    # One sentence per line: sentencepiece's trainer caps sentence length (4192 bytes).
    lines = (line for text in texts for line in text.splitlines() if line.strip())
    buf = io.BytesIO()
    spm.set_random_generator_seed(seed)  # sampling of input sentences; 1 thread: same model
    spm.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=buf, vocab_size=vocab_size,
        model_type=model_type, pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID,
        user_defined_symbols=[IMAGE_TOKEN, EOC_TOKEN], byte_fallback=True,
        normalization_rule_name="identity", add_dummy_prefix=False,
        remove_extra_whitespaces=False, split_digits=True, character_coverage=0.9995,
        hard_vocab_limit=exact_vocab, input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True, num_threads=1, minloglevel=2,
    )
    Tokenizer(buf.getvalue(), str(output))  # refuse to write a model we would not load
    output.write_bytes(buf.getvalue())
    return output


def load_tokenizer(path: Optional[Union[str, Path]]) -> Optional[Tokenizer]:
    return Tokenizer.load(path) if path else None
