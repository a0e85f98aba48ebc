"""Hugging Face-format wrapper of a `models` LanguageModel, saved into every export directory.

`configuration_kvf.py` (KVFConfig), `modeling_kvf.py` (KVFForCausalLM, KVFCache) and
`kvf_bundle.py` (the `models`/`kernels` source the export runs) travel with the weights, so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` needs only torch + transformers.
"""
