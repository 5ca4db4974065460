"""asvr.tokenizer: the semantic visual tokenizer (frozen encoder + feature layer + RVQ codebooks).

Subpackages, one job each (docs/ARCHITECTURE.md):
  encoders/   encoder kinds (a registry; one module per built-in kind), encoder pixels, weights hashes
  rvq/        residual quantization: the search (torch, fused Triton), codebook training, validation
  codes/      what is done with codes: faiss retrieval, code inspection, contact sheets
  commands/   one module per ``asvr-tokenizer`` subcommand; ``cli.py`` wires them
Top level: ``artifact.py`` (load/save the artifact folder), ``model.py`` (SemanticTokenizer),
``preprocess.py`` (image -> pixels), ``encode_engine.py``, ``dualtoken.py`` (the published import).

Importing this package imports nothing: the torch-free contracts live in ``asvr.core``.
"""
