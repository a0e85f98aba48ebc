"""Hugging Face-format wrapper of a `models` LanguageModel, saved into every export directory.

`configuration_kvf.py` (KVFConfig), `modeling_kvf.py` (KVFForCausalLM, KVFCache),
`kvf_bundle.py` (the `models`/`kernels` source the export runs) and `tokenization_kvf.py`
(KVFTokenizer: a text is its bytes, no `</s>` appended) travel with the weights, so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` needs only torch + transformers.
"""
