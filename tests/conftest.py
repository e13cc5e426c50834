"""Shared fixtures: a fresh qmail home per test."""

from __future__ import annotations

from pathlib import Path

import pytest

from pyqmail import users
from pyqmail.init import HomeSettings, create_home


@pytest.fixture(autouse=True)
def _fresh_passwd_cache() -> None:
    """Tests fake passwd entries; what one test was told must not reach the next."""
    users._pw_cache.clear()


@pytest.fixture
def qmail_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A new home for host mx.example.test, local domains example.test and mx.example.test."""
    home = tmp_path / "qmail"
    create_home(
        home,
        HomeSettings(me="mx.example.test", locals=["example.test", "mx.example.test"]),
    )
    monkeypatch.setenv("QMAILHOME", str(home))
    monkeypatch.delenv("QMAILQUEUE", raising=False)
    return home
