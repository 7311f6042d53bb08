"""Literal ports of the authors' released code, the independent references the tests compare the engine against.

One module per method or source; each module's header names the repository and the file(s) it ports and lists every
change from the original (generalisations to P prefix tokens, non-square grids, dtypes). The ports stay literal: they
keep the authors' names, structure and quirks on purpose, so they are not "cleaned up" (pyproject.toml relaxes the
naming, bugbear, simplify and pyupgrade rules for this folder).
"""
