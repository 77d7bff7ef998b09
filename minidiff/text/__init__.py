"""Text-to-image: a word tokenizer, a small text encoder trained with the UNet, and the pipeline folder that
holds both (``load_text_pipeline``)."""
from .encoder import TextEncoder
from .pipeline import load_text_pipeline, save_text_pipeline
from .tokenizer import WordTokenizer

__all__ = ["TextEncoder", "WordTokenizer", "load_text_pipeline", "save_text_pipeline"]
