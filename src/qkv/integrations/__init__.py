"""qkv where users already work: inside other libraries.

`qkv.integrations.transformers`: `register()` adds the attention implementation "qkv" to
transformers' `AttentionInterface`, so `from_pretrained(..., attn_implementation="qkv")` runs
any transformers model's attention on qkv's backends (docs/integrations.md).

Nothing here is imported by `import qkv`; each module imports its library on first use.
"""
