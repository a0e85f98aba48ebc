"""The export stage: a checkpoint -> a Hugging Face folder (`bundle`, with the `hf/` files it
carries), logged and registered in MLflow (`driver`)."""
