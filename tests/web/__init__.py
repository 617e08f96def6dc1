"""The web tests are a package, so that their conftest.py is the module `web.conftest`: a
conftest.py outside a package is imported under the bare name `conftest`, which the
conftest.py files of the other test folders share."""
