"""How artune reaches its callers: a torch custom op (``ops``) and the SGLang plugin."""
