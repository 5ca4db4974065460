"""asvr.tokenizer.encoders: the encoder kind registry (base.py) and one module per built-in kind
(efficientnet.py, hf_vision.py, pixels.py), each registering itself as a plug-in would."""
