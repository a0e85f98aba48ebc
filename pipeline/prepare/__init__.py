"""The prepare stage: a corpus (the built-in plays or local files) and a tokenizer -> `data/`
(`prepare.prepare`; the streamed corpus pass in `corpus`)."""
