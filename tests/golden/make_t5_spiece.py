"""Writes the tiny SentencePiece T5 tokenizer folder that tests/test_t5.py loads.

Run from the repository root with the project's venv (sentencepiece is pinned in requirements.txt;
nothing is downloaded):

  .venv/bin/python tests/golden/make_t5_spiece.py

Output: ``tests/golden/t5_spiece/`` laid out as a T5 v1.1 / Flan-T5 checkpoint's tokenizer files
(no ``tokenizer.json``, so transformers converts ``spiece.model`` itself):

* ``spiece.model``: a SentencePiece unigram model with T5's special pieces and ids (``<pad>`` 0,
  ``</s>`` 1, ``<unk>`` 2, no BOS), trained on ``CORPUS`` below (photo captions written for this
  project, public domain) with a 200-piece vocabulary. Its normaliser is a precompiled character
  map as T5's NFKC one is, but holding only ``NORMALIZATION_RULES`` (full-width ASCII, the "fi"
  ligature, non-breaking and ideographic spaces): the full NFKC map alone is 240 KB;
* ``tokenizer_config.json``: what a T5 folder's says (class, special tokens, 100 sentinel ids).

Training is single-threaded and deterministic: a rerun writes the same model.
"""

from __future__ import annotations

import io
import json
import os
import tempfile

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "t5_spiece")
VOCAB_SIZE = 200
EXTRA_IDS = 100  # T5's <extra_id_0..99> sentinels, appended after the SentencePiece vocabulary.
# (source code points, target code points): a few of NFKC's mappings.
NORMALIZATION_RULES = (
  *(((c,), (c - 0xFEE0,)) for c in range(0xFF01, 0xFF5F)),  # full-width ASCII
  ((0xFB01,), (0x66, 0x69)),  # the "fi" ligature
  ((0x00A0,), (0x20,)),  # no-break space
  ((0x3000,), (0x20,)),  # ideographic space
)

CORPUS = """\
a photo of a cat sleeping on a wooden chair
a close-up photo of an orange cat with green eyes
a dog running across a sandy beach at sunset
two dogs playing with a red ball in the garden
a portrait of an astronaut in a white space suit
a cup of coffee on a saucer next to a silver spoon
a bowl of fresh fruit on a kitchen table
a mountain lake reflecting snowy peaks under a blue sky
a city street at night with wet pavement and neon signs
an old stone bridge over a slow river in autumn
a field of yellow flowers with a farmhouse in the distance
a sailing boat on a calm sea near a rocky coast
a bird sitting on a branch covered in snow
a black and white photo of a busy train station
a child reading a book under a large oak tree
a plate of pasta with tomato sauce and basil leaves
a red car parked in front of a brick house
a forest path covered with fallen leaves in the morning light
a lighthouse on a cliff during a storm
a group of people walking through a crowded market
a macro photo of a honey bee on a purple flower
the moon rising over a quiet desert at dusk
a high resolution photo of a lion resting in tall grass
a wooden table with a laptop, a notebook and a pen
a horse standing in a green meadow surrounded by hills
a narrow street with colourful houses and flower pots
a frozen waterfall in the mountains during winter
an aerial view of a river winding through farmland
a blurry photo of a street restored to sharp detail
a noisy low light photo of a living room with a sofa
a vintage photograph of a family standing on a porch
a bicycle leaning against a blue wall in the sun
a glass of water on a window sill with soft shadows
a snowy village with smoke rising from the chimneys
waves breaking on the rocks with white foam
a cat and a dog sleeping together on a soft blanket
a bright kitchen with white cabinets and a wooden floor
a tall building made of glass reflecting the clouds
a small boat tied to a wooden pier on a foggy morning
a garden with roses, tulips and green hedges
the face of an old man with a grey beard and kind eyes
a woman holding an umbrella in the rain
a basket of bread and cheese on a picnic blanket
a train crossing a stone viaduct between two hills
a detailed photo of the texture of tree bark and moss
a sharp photo of a butterfly with orange and black wings
a river flowing through a deep canyon of red rock
a cozy room with a fireplace, books and a reading lamp
a herd of cows grazing near a fence in the countryside
the night sky full of stars above a dark forest
"""


def main() -> None:
  os.makedirs(OUT, exist_ok=True)
  rules = tempfile.NamedTemporaryFile("w", suffix=".tsv", delete=False)
  with rules:
    for source, target in NORMALIZATION_RULES:
      rules.write(" ".join(f"{c:X}" for c in source) + "\t" + " ".join(f"{c:X}" for c in target))
      rules.write("\n")
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(CORPUS.splitlines()),
    model_writer=model,
    model_type="unigram",
    vocab_size=VOCAB_SIZE,
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
    pad_piece="<pad>",
    eos_piece="</s>",
    unk_piece="<unk>",
    normalization_rule_tsv=rules.name,
    character_coverage=1.0,
    num_threads=1,
    minloglevel=2,
  )
  os.remove(rules.name)
  proto = sentencepiece_model_pb2.ModelProto.FromString(model.getvalue())
  proto.normalizer_spec.ClearField("normalization_rule_tsv")  # the temporary file's path
  with open(os.path.join(OUT, "spiece.model"), "wb") as f:
    f.write(proto.SerializeToString())
  config = {
    "tokenizer_class": "T5Tokenizer",
    "eos_token": "</s>",
    "unk_token": "<unk>",
    "pad_token": "<pad>",
    "extra_ids": EXTRA_IDS,
    "additional_special_tokens": [f"<extra_id_{i}>" for i in range(EXTRA_IDS)],
    "model_max_length": 512,
  }
  with open(os.path.join(OUT, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump(config, f, indent=2)
    f.write("\n")
  print(f"wrote {OUT}: spiece.model ({os.path.getsize(os.path.join(OUT, 'spiece.model'))} bytes)")


if __name__ == "__main__":
  main()
