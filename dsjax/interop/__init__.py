"""Import and export of model weights in other ecosystems' formats (Hugging Face)."""

