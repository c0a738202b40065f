"""The selector tests use `plan_repo` / `plan_repo_template` from tests/conftest.py."""

from tests.conftest import INSTEP, write_token_csv

__all__ = ["INSTEP", "write_token_csv"]
