"""`python -m qkv` runs the same `cli.main()` as the `qkv` script."""

from .cli import main

raise SystemExit(main())
