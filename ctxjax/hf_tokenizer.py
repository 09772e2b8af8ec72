"""tokenizer_config.json for an exported sentencepiece tokenizer (`ctxjax.hf.save`)."""
from __future__ import annotations

import pathlib
from typing import Mapping

from absl import logging

# LLaMA's sentencepiece pieces, used when tokenizer.model cannot be read.
_LLAMA_PIECES = {"bos_token_id": "<s>", "eos_token_id": "</s>", "pad_token_id": "<pad>",
                 "unk_token_id": "<unk>"}


def tokenizer_config(tokenizer_model, hf_config: Mapping, model_max_length: int) -> dict:
  """tokenizer_config.json for a sentencepiece tokenizer.model, so that
  `AutoTokenizer.from_pretrained(dir)` builds a LlamaTokenizer that tokenizes as sentencepiece
  does: the model's special tokens (pieces looked up by the config's bos/eos/pad ids), BOS
  added as ctxjax's packing does, and a dummy prefix space only if the model adds one
  (transformers' converter otherwise always adds it; ctxjax's tokenizers do not)."""
  ids = {k: hf_config.get(k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")}
  out = {"tokenizer_class": "LlamaTokenizer", "model_max_length": int(model_max_length),
         "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False}
  try:
    import sentencepiece as spm  # noqa: PLC0415
    from sentencepiece import sentencepiece_model_pb2  # noqa: PLC0415
    data = pathlib.Path(tokenizer_model).read_bytes()
    sp = spm.SentencePieceProcessor(model_proto=data)  # RuntimeError if not a model
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(data)
    ids["unk_token_id"] = sp.unk_id()
    out["add_prefix_space"] = bool(proto.normalizer_spec.add_dummy_prefix)
    piece = lambda key, i: sp.id_to_piece(i)
  except (ImportError, RuntimeError):
    logging.warning("%s is not a readable sentencepiece model; tokenizer_config.json names "
                    "LLaMA's special tokens", tokenizer_model)
    ids["unk_token_id"] = 0
    piece = lambda key, i: _LLAMA_PIECES[key]
  for key, i in ids.items():
    if i is not None:
      out[key.replace("_id", "")] = piece(key, int(i))
  return out
