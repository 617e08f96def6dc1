"""The web tests are a package, so that their conftest.py is the module `web.conftest`: a
conftest.py outside a package is imported as the module `conftest`, and would shadow
tests/models/conftest.py, which tests/models imports by that name."""
