"""The names a user chooses among. No torch import here: the command line offers them without
loading torch (``pjd --help`` answers at once)."""
METHODS = ("ar", "sjd", "sjd++", "pjd", "zipar")
BACKENDS = ("auto", "torch", "sdpa", "triton")
CACHES = ("slot", "append")
# Leading token of a fresh row whose row above is unfinished (no EOL; docs/design.md, "Leading token
# of a new row"), from the row whose last committed token is copied: "row_end" the lowest complete
# row (a token that really ends a row), "above" the row above (a mid-row token), "two_above" row r-2
# (official ZipAR's copy).
ROW_LEADS = ("row_end", "above", "two_above")
