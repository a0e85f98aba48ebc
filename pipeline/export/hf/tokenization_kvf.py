"""KVFTokenizer: the pipeline's bytes (pad 0, eos 1, unk 2, byte b -> b + 3) as ByT5's tokenizer
holds them, but encoding a text as its bytes alone, as `pipeline.core.tokenizer.encode` does.

ByT5's tokenizer (made for an encoder-decoder) appends `</s>` to every string it encodes, and
lm-eval's HF model encodes with the tokenizer's defaults: every generation prompt ended in
`</s>`, and every scored continuation lost its first byte (the harness cuts the continuation off
`encode(context + continuation)` at `len(encode(context))`, which counted the `</s>`).

A model may hold ids past the bytes' (MQAR's own, `data.mqar.alphabet: own`): no text encodes to
them, and one a model generates decodes as `<unk>` (ByT5's tokenizer raises on them).
"""
from __future__ import annotations

from transformers import ByT5Tokenizer


class KVFTokenizer(ByT5Tokenizer):
    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return token_ids_0 if token_ids_1 is None else token_ids_0 + token_ids_1

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None):
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))

    def _convert_id_to_token(self, index):
        return self.unk_token if index >= self.offset + 256 else super()._convert_id_to_token(index)
