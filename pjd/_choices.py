"""The names a user chooses among. No torch import here: the command line offers them without
loading torch (``pjd --help`` answers at once)."""
METHODS = ("ar", "sjd", "sjd++", "pjd", "zipar")
BACKENDS = ("auto", "torch", "sdpa", "triton")
CACHES = ("slot", "append")
