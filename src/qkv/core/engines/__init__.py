"""The engines: the arithmetic the backends run (qkv/core/backend).

`flash` (the FlashAttention-2 block engine, Dao 2023, with the one merge of partial softmax
states), `gathered` (the gathered-rows engine of block-sparse layouts), `decode_eager` and
`decode_native` (a decode step against a long cache, eager and through the C++ kernel).
Engines know nothing of the registry; see docs/architecture.md.
"""
