"""Data: the embedded synthetic corpus, local files and hub names, all through `datasets`; tokenizers."""
