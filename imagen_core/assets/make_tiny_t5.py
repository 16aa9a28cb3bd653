"""Make imagen_core/assets/tiny-t5/: a tiny random-init T5 encoder with a real sentencepiece tokenizer.

The tests, the demo and the tiny recipes load it with `AutoTokenizer.from_pretrained` and
`T5EncoderModel.from_pretrained`, the same code path as google/t5-v1_1-xxl, but offline and in
milliseconds. The tokenizer is a sentencepiece unigram model trained on captions of coloured shapes
(the synthetic data set the demo uses) plus a few hundred common English words and every ASCII
character, so any English prompt tokenizes without unknown pieces. The encoder weights are random
(seed 0): the embeddings carry no meaning, only the shapes and the masking matter to the tests.

Run from the repository root:  python imagen_core/assets/make_tiny_t5.py [--out imagen_core/assets/tiny-t5]
Rerunning gives byte-identical spiece.model and model.safetensors (single-threaded training, fixed
seeds, no timestamps in either format).
"""
from __future__ import annotations

import argparse
import io
import itertools
import pathlib
import random

import sentencepiece as spm
import torch
from transformers import T5Config, T5EncoderModel, T5Tokenizer

VOCAB_SIZE = 800  # upper bound; sentencepiece stops earlier if the corpus has fewer useful pieces
SEED = 0
OUTPUT_FILES = ("spiece.model", "tokenizer.json", "tokenizer_config.json", "config.json", "model.safetensors")

COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white", "black", "cyan", "magenta",
           "pink", "brown", "gray"]
SHAPES = ["circle", "square", "triangle", "star", "cross", "ring", "diamond"]
POSITIONS = ["top", "bottom", "left", "right", "center", "top left", "top right", "bottom left",
             "bottom right"]
SIZES = ["tiny", "small", "medium", "large", "big", "huge"]

COMMON_WORDS = """
the of and to in is was it for on are as with his they at be this from have or by one had not but
what all were when we there can an your which their said if do will each about how up out them then
she many some so these would other into has more her two like him see time could no make than first
been its who now people my made over did down only way find use may water long little very after
words called just where most know get through back much go good new write our me man too any day
same right look think also around another came come work three word must because does part even
place well such here take why things help put years different away again off went old number great
tell men say small every found still between name should home big give air line set own under read
last never us left end along while might next sound below saw something thought both few those
always looked show large often together asked house don't world going want school important until
form food keep children feet land side without boy once animals life enough took sometimes four head
above kind began almost live page got earth need far hand high year mother light parts country
father let night following picture being study second eyes soon times story boys since white days
ever paper hard near sentence better best across during today others however sure means knew it's
try told young miles sun ways thing whole hear example heard several change answer room sea against
top turned learn point city play toward five using himself usually money seen didn't car morning
i'm body upon family later turn move face door cut done group true leave color red friends pretty
eat dog cat horse bird tree flower river mountain sky cloud road street garden beach snow rain fire
table chair window wall floor bed book cup bottle glass plate box ball toy robot astronaut painting
photo photograph drawing sketch image render cartoon realistic detailed beautiful shiny wooden metal
glowing dark bright soft sharp round flat tall short wide narrow empty full happy sad sitting
standing running flying wearing holding riding eating playing under over behind beside inside
outside near far front background foreground corner edge middle center half quarter pixel pixels
apple banana orange lemon cherry grape bread cake pizza coffee tea milk cheese egg soup salad
kitchen bedroom bathroom office library museum church castle bridge tower building skyscraper
village forest jungle desert island ocean lake valley hill field meadow farm park playground
train bus truck bicycle motorcycle boat ship airplane helicopter rocket spaceship planet moon
stars galaxy universe sunset sunrise evening afternoon winter summer spring autumn weather storm
lightning rainbow fog mist shadow reflection mirror lamp candle clock watch phone computer screen
keyboard camera guitar piano violin drum music song dance party festival wedding birthday gift
woman women girl girls child baby person crowd teacher doctor chef artist soldier king queen
prince princess wizard dragon monster ghost angel knight pirate ninja superhero zombie alien
elephant lion tiger bear wolf fox rabbit mouse monkey giraffe zebra cow pig sheep goat duck
chicken fish shark whale dolphin octopus turtle frog snake butterfly bee spider insect puppy kitten
shirt dress hat shoes jacket coat glasses scarf umbrella bag backpack ring necklace crown helmet
smiling laughing crying sleeping walking jumping swimming dancing singing reading writing cooking
painted drawn carved built made covered filled surrounded lit decorated broken old ancient modern
futuristic vintage colorful colourful golden silver purple transparent fluffy furry smooth rough
wet dry hot cold warm cool quiet loud fast slow heavy light strong weak rich poor clean dirty
simple complex abstract geometric minimalist symmetric pattern texture stripes dots checkered
gradient outline silhouette portrait landscape closeup view scene style oil watercolor digital
art illustration poster logo icon diagram map chart graph letter letters text sign number numbers
zero six seven eight nine ten hundred thousand million first last next many several few pair
triangles circles squares stars crosses rings diamonds shapes colours colors objects items
""".split()


def caption_corpus(rng: random.Random, n_random: int = 4000) -> list[str]:
    """Captions in the demo's phrasing, every colour/shape/position pair at least once, plus the words."""
    captions = []
    for colour, shape, position in itertools.product(COLOURS, SHAPES, POSITIONS):
        captions.append(f"a {colour} {shape} at the {position}")
    for _ in range(n_random):
        size, colour, shape = rng.choice(SIZES), rng.choice(COLOURS), rng.choice(SHAPES)
        position, background = rng.choice(POSITIONS), rng.choice(COLOURS)
        captions.append(f"a {size} {colour} {shape} at the {position} on a {background} background")
        captions.append(f"{rng.randint(1, 4)} {colour} {shape}s and a {rng.choice(COLOURS)} "
                        f"{rng.choice(SHAPES)} in the {position}")
    for start in range(0, len(COMMON_WORDS), 12):
        line = " ".join(COMMON_WORDS[start:start + 12])
        captions += [line, line.capitalize() + "."]
    # Every printable ASCII character, so arbitrary prompts never map to <unk>.
    captions += [" ".join(chr(c) for c in range(33, 127))] * 3
    return captions


def train_sentencepiece(captions: list[str]) -> bytes:
    """A unigram model with T5's special ids: <pad>=0, </s>=1, <unk>=2, no BOS."""
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(captions), model_writer=buffer, model_type="unigram",
        vocab_size=VOCAB_SIZE, hard_vocab_limit=False, character_coverage=1.0,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        num_threads=1, minloglevel=2, shuffle_input_sentence=False,
    )
    return buffer.getvalue()


def tiny_t5_config(vocab_size: int) -> T5Config:
    """T5 v1.1 layout (gated-GELU feed-forward, no dropout) at toy width: 64-dim, 2 layers, 4 heads."""
    return T5Config(
        vocab_size=vocab_size, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", dropout_rate=0.0,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path(__file__).parent / "tiny-t5")
    out = parser.parse_args().out
    out.mkdir(parents=True, exist_ok=True)
    # A stale tokenizer.json would win over the new spiece.model in from_pretrained: start clean.
    for name in OUTPUT_FILES:
        (out / name).unlink(missing_ok=True)

    (out / "spiece.model").write_bytes(train_sentencepiece(caption_corpus(random.Random(SEED))))
    # extra_ids=0: T5's 100 <extra_id_*> sentinels are for span corruption, which an encoder never sees.
    tokenizer = T5Tokenizer.from_pretrained(out, extra_ids=0, model_max_length=512)
    tokenizer.save_pretrained(out)

    torch.manual_seed(SEED)
    model = T5EncoderModel(tiny_t5_config(vocab_size=len(tokenizer)))
    model.save_pretrained(out, safe_serialization=True)

    size = sum(p.stat().st_size for p in out.iterdir())
    print(f"wrote {out}: vocab {len(tokenizer)}, {sum(p.numel() for p in model.parameters())} parameters, "
          f"{size / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
