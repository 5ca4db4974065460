"""asvr.tokenizer: the semantic visual tokenizer (encoder + layer + RVQ codebooks)."""

from .artifact import TokenizerError, TokenizerSpec, load_artifact, save_artifact
from .encoders import EncoderSpec, build_encoder, default_encoder_spec
from .model import SemanticTokenizer
from .preprocess import ImageError, PreprocessConfig, open_image, preprocess
from .quantizer import ResidualQuantizer, rvq_encode_reference

__all__ = [
    "EncoderSpec",
    "ImageError",
    "PreprocessConfig",
    "ResidualQuantizer",
    "SemanticTokenizer",
    "TokenizerError",
    "TokenizerSpec",
    "build_encoder",
    "default_encoder_spec",
    "load_artifact",
    "open_image",
    "preprocess",
    "rvq_encode_reference",
    "save_artifact",
]
