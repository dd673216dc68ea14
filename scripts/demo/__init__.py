"""Building blocks of the embedded demo (`scripts/prepare_demo.py`): template data, tokenizer, tiny base model.

The data and tokenizer modules import nothing heavy, so tests and the idempotency check stay fast;
`demo.model` imports torch and transformers.
"""
