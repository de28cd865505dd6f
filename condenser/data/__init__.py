"""Data: the embedded default, user folders, prepared splits, editing pairs and their validation."""
