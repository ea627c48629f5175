"""Datasets shipped with qlora-toolkit, the scripts that made them and the check of what they teach."""
