"""The evaluation harness behind ``fourbit compare`` and ``fourbit demo``."""
