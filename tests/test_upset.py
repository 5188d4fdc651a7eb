"""The upset-client rule table (issue 12 item 5): its rules one by one, and a labelled set.

The labelled set (LABELLED, below) was written for these tests: complaints, frustration,
shouting, chasing, routine requests that use the words harmlessly, quoted history and
signatures that contain them, auto-replies and non-English mail. Each body goes through
`readable.reply_text` exactly as the pipeline stores it, so quote and signature stripping
is part of what is measured. `bench/upset_corpus.py` prints the same figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from gateway import upset
from gateway.classify import Kind
from gateway.readable import reply_text


@dataclass(frozen=True)
class Case:
    name: str
    category: str
    labelled_upset: bool  # the label: an account manager should hear of this message
    subject: str
    text: str
    html: str = ""
    kind: Kind = Kind.NORMAL
    chasing: bool = False
    overdue: bool = False

    def facts(self) -> upset.UpsetFacts:
        return upset.UpsetFacts(
            subject=self.subject,
            text=reply_text(self.text, self.html),
            kind=self.kind,
            chasing=self.chasing,
            overdue=self.overdue,
        )


# Categories whose messages must never be upset (and what they contain must never hit).
NEVER = ("quoted", "signature", "auto-reply")

LABELLED: tuple[Case, ...] = (
    # --- complaints and frustration: upset --------------------------------------------
    Case(
        "unacceptable",
        "complaint",
        True,
        "Re: invoice 2291",
        "Being charged twice for the same month is unacceptable. Please refund it.",
    ),
    Case(
        "disappointed",
        "complaint",
        True,
        "Migration",
        "Hi,\n\nI have to say we are very disappointed with how the migration went.\n\nMaria",
    ),
    Case(
        "formal-complaint",
        "complaint",
        True,
        "Formal complaint",
        "I would like to make a formal complaint about the downtime last week.",
    ),
    Case(
        "cancel-contract",
        "complaint",
        True,
        "Our hosting",
        "If this is not resolved by Friday we will cancel the contract.",
    ),
    Case(
        "terminate-agreement",
        "complaint",
        True,
        "Service",
        "We are considering whether to terminate our agreement with you.",
    ),
    Case(
        "fed-up",
        "complaint",
        True,
        "Backups again",
        "Honestly we are fed up with the backups failing every weekend.",
    ),
    Case(
        "frustrated",
        "complaint",
        True,
        "Mail delivery",
        "I'm really frustrated: our newsletters land in spam again.",
    ),
    Case(
        "poor-service",
        "complaint",
        True,
        "Ticket 88",
        "This is poor service for what we pay each month.",
    ),
    Case(
        "ridiculous",
        "complaint",
        True,
        "Staging",
        "It is ridiculous that staging has been broken for two weeks.",
    ),
    Case(
        "waste-of-time",
        "complaint",
        True,
        "Support call",
        "Yesterday's call was a waste of my time, nobody had read the ticket.",
    ),
    Case(
        "not-acceptable",
        "complaint",
        True,
        "SLA",
        "Four days without an answer is not acceptable for a priority client.",
    ),
    Case(
        "complained",
        "complaint",
        True,
        "Our shop",
        "Our board complained to me about the shop being slow and I need answers.",
    ),
    Case(
        "legal",
        "complaint",
        True,
        "Data loss",
        "We lost three days of orders. Our lawyers are looking at legal action.",
    ),
    Case(
        "disappointment-html",
        "complaint",
        True,
        "Design",
        "",
        html="<p>To our great <b>disappointment</b> the new design is still not live.</p>",
    ),
    Case(
        "escalate-still-waiting",
        "complaint",
        True,
        "Re: DNS change",
        "We are still waiting for the DNS change. Please escalate this.",
    ),
    Case(
        "third-time-chasing",
        "complaint",
        True,
        "Re: SSL certificate",
        "This is the third time I write about the certificate.",
        chasing=True,
    ),
    Case(
        "how-many-times",
        "complaint",
        True,
        "Re: login",
        "How many times do I have to explain that the login does not work?",
        overdue=True,
    ),
    Case(
        "no-reply-yet-again",
        "complaint",
        True,
        "Re: Re: Re: export",
        "No reply yet again. The export still not working either.",
    ),
    Case(
        "still-waiting-overdue",
        "complaint",
        True,
        "Re: quote",
        "Hello, we are still waiting for the quote you promised on Monday.",
        overdue=True,
    ),
    # --- shouting: upset when capitals come with more ---------------------------------
    Case(
        "caps-and-bangs",
        "shouting",
        True,
        "WHY IS THE SHOP STILL DOWN!!!",
        "Fix it now.",
    ),
    Case(
        "caps-body-chasing",
        "shouting",
        True,
        "Re: checkout",
        "I WROTE YESTERDAY AND NOBODY ANSWERED. THE CHECKOUT IS BROKEN.",
        chasing=True,
    ),
    Case(
        "caps-escalate",
        "shouting",
        True,
        "Payments",
        "PLEASE ESCALATE THIS TO SOMEONE WHO CAN ACTUALLY HELP",
    ),
    Case(
        "bangs-and-frustration",
        "shouting",
        True,
        "Re: forms",
        "Still waiting!!! The contact form has been broken all week!!",
    ),
    Case(
        "caps-overdue",
        "shouting",
        True,
        "Re: launch",
        "YOU PROMISED THIS FOR TUESDAY AND IT IS THURSDAY NOW",
        overdue=True,
    ),
    # --- chasing and overdue promises: upset together ---------------------------------
    Case(
        "chasing-overdue",
        "chasing",
        True,
        "Re: invoice address",
        "Any news on this?",
        chasing=True,
        overdue=True,
    ),
    Case(
        "chasing-overdue-polite",
        "chasing",
        True,
        "Re: new user",
        "Hi, just following up on the account for our new colleague. Thanks",
        chasing=True,
        overdue=True,
    ),
    Case(
        "chasing-bangs",
        "chasing",
        True,
        "Re: backup restore",
        "Hello?!? Is anyone there?!! We need the restore today!!",
        chasing=True,
    ),
    # --- routine: not upset -----------------------------------------------------------
    Case(
        "routine-password",
        "routine",
        False,
        "Password reset",
        "Could you reset the password for info@example.com? Thanks!",
    ),
    Case(
        "routine-thanks",
        "routine",
        False,
        "Re: fixed",
        "Thanks a lot, it works again!! Have a nice weekend!",
    ),
    Case(
        "routine-new-page",
        "routine",
        False,
        "New page",
        "Please add a page for our summer opening hours, text attached.",
    ),
    Case(
        "routine-chasing-only",
        "routine",
        False,
        "Re: logo",
        "Sorry, one more thing: the logo should be the blue one.",
        chasing=True,
    ),
    Case(
        "routine-overdue-only",
        "routine",
        False,
        "Re: quote",
        "Hi, any update on the quote? No rush.",
        overdue=True,
    ),
    Case(
        "routine-urgent-vpn",
        "routine",
        False,
        "URGENT: VPN down",
        "Our VPN is down since 9:00, nobody in the office can reach the NAS.",
    ),
    Case(
        "routine-acronyms",
        "routine",
        False,
        "DNS / SSL / MX",
        "Please check the DNS, SSL and MX records for example.org (TXT SPF too).",
    ),
    Case(
        "routine-log-caps",
        "routine",
        False,
        "Error on the site",
        "The site shows this:\n\n"
        "[2026-12-01 10:11:12] PHP FATAL ERROR: UNCAUGHT EXCEPTION IN /VAR/WWW/INDEX.PHP\n"
        "    SQLSTATE[HY000] [2002] CONNECTION REFUSED BY HOST DATABASE\n"
        "ERROR: DATABASE CONNECTION FAILED PLEASE TRY AGAIN LATER\n\n"
        "Can you have a look?",
    ),
    Case(
        "routine-code-caps",
        "routine",
        False,
        "SQL question",
        "Is this query right?\n\nSELECT NAME, EMAIL FROM USERS WHERE ACTIVE = 1;\n\nThanks",
    ),
    Case(
        "routine-single-caps-word",
        "routine",
        False,
        "Newsletter",
        "Please send the newsletter TODAY, not tomorrow.",
    ),
    # --- harmless mentions: not upset -------------------------------------------------
    Case(
        "not-disappointed",
        "harmless",
        False,
        "Re: new design",
        "We were not disappointed at all, the new design looks great.",
    ),
    Case(
        "no-complaints",
        "harmless",
        False,
        "Re: hosting",
        "No complaints from our side, everything runs fine.",
    ),
    Case(
        "wont-be-disappointed",
        "harmless",
        False,
        "Feedback",
        "Show the new shop to our partners, they won't be disappointed.",
    ),
    Case(
        "complaint-form",
        "harmless",
        False,
        "Website",
        "The complaint form on our site should also send a copy to the customer.",
    ),
    Case(
        "escalate-privileges",
        "harmless",
        False,
        "Security scan",
        "The scanner says a local user could escalate privileges via the cron job.",
    ),
    Case(
        "no-need-to-escalate",
        "harmless",
        False,
        "Re: slow admin",
        "It is faster now, so no need to escalate this.",
    ),
    Case(
        "still-waiting-third-party",
        "harmless",
        False,
        "Domain transfer",
        "We are still waiting for the auth code from the old registrar, will forward it.",
    ),
    Case(
        "third-time-lucky",
        "harmless",
        False,
        "Re: upload",
        "Third time lucky: the upload worked now. Thanks!",
    ),
    Case(
        "cancel-subscription-feature",
        "harmless",
        False,
        "Shop feature",
        "Customers should be able to pause a subscription, not only cancel it.",
    ),
    Case(
        "disappointed-customers",
        "complaint",
        True,
        "Reviews",
        "Our customers are disappointed the reviews vanished; please restore them.",
    ),
    Case(
        "frustrating-captcha",
        "harmless",
        False,
        "Checkout",
        "Customers find the captcha frustrating, can we drop it from the checkout?",
    ),
    Case(
        "unacceptable-file-type",
        "harmless",
        False,
        "Uploads",
        "The upload form should say 'Unacceptable file type' for .exe files.",
    ),
    # --- quoted history: never upset --------------------------------------------------
    Case(
        "quoted-gt",
        "quoted",
        False,
        "Re: invoice",
        "Thanks, all sorted now.\n\n"
        "On Mon, 1 Dec 2026 at 10:00, Anna <anna@example.com> wrote:\n"
        "> This is unacceptable, I want to make a formal complaint!!!\n"
        "> WE ARE STILL WAITING FOR THE REFUND YOU PROMISED\n",
    ),
    Case(
        "quoted-outlook",
        "quoted",
        False,
        "RE: outage",
        "Ok, see you at 3.\n\n"
        "-----Original Message-----\n"
        "From: Peter <peter@example.com>\n"
        "Sent: Monday, December 1, 2026 9:12 AM\n"
        "To: support@example.net\n"
        "Subject: outage\n\n"
        "We are very disappointed. Third time this month. Please escalate.\n",
    ),
    Case(
        "quoted-html-blockquote",
        "quoted",
        False,
        "Re: shop",
        "",
        html="<p>Thank you, it works.</p>"
        "<div>On Tue, 2 Dec 2026, Bo &lt;bo@example.com&gt; wrote:</div>"
        "<blockquote><p>This is ridiculous. We will cancel the contract!!!</p></blockquote>",
    ),
    Case(
        "quoted-german-attribution",
        "quoted",
        False,
        "AW: Rechnung",
        "Danke, passt so.\n\n"
        "Am 01.12.2026 um 10:00 schrieb Anna <anna@example.com>:\n"
        "> Still waiting for the invoice. This is the third time I ask.\n",
    ),
    Case(
        "quoted-our-reply-with-words",
        "quoted",
        False,
        "Re: your complaint",
        "Great, thank you for the quick help.\n\n"
        "On Wed, 3 Dec 2026 at 08:00, Support <support@example.net> wrote:\n"
        "> We are sorry you were disappointed and have escalated your complaint.\n",
    ),
    Case(
        "quoted-caps",
        "quoted",
        False,
        "Re: launch",
        "Fine by me.\n\n"
        "On Thu, 4 Dec 2026 at 12:00, Max <max@example.com> wrote:\n"
        "> PLEASE MAKE SURE THE LAUNCH HAPPENS ON MONDAY!!!\n"
        "> NO EXCUSES THIS TIME\n",
    ),
    # --- signatures: never upset ------------------------------------------------------
    Case(
        "signature-complaints-address",
        "signature",
        False,
        "New staff member",
        "Please add Jo to the intranet.\n\n-- \nAnna Berg\n"
        "Complaints and escalations: complaints@example.com\n",
    ),
    Case(
        "signature-caps-company",
        "signature",
        False,
        "Opening hours",
        "Please update the opening hours on the site.\n\n-- \n"
        "NORDIC INDUSTRIAL SUPPLIES GMBH\nHEAD OFFICE HAMBURG GERMANY\n",
    ),
    Case(
        "signature-slogan",
        "signature",
        False,
        "Banner",
        "Could you swap the homepage banner?\n\n-- \nMax Kurz\n"
        '"Never disappointed, never frustrated" - our promise!!!\n',
    ),
    # --- auto-replies: never upset ----------------------------------------------------
    Case(
        "auto-reply-out-of-office",
        "auto-reply",
        False,
        "Out of office: Re: your complaint",
        "I am out of the office. For complaints or to escalate, call our desk.",
        kind=Kind.AUTO_REPLY,
        chasing=True,
        overdue=True,
    ),
    Case(
        "auto-reply-ticket-system",
        "auto-reply",
        False,
        "[Ticket#4411] COMPLAINT RECEIVED!!!",
        "YOUR COMPLAINT HAS BEEN RECEIVED. WE ARE STILL WAITING FOR AN AGENT.",
        kind=Kind.AUTO_REPLY,
    ),
    Case(
        "bounce",
        "auto-reply",
        False,
        "Undelivered Mail Returned to Sender",
        "This is unacceptable: the mailbox is full. Delivery failed.",
        kind=Kind.BOUNCE,
        chasing=True,
    ),
    Case(
        "notice",
        "auto-reply",
        False,
        "Delivery delayed",
        "Still waiting to deliver your message (third time tried).",
        kind=Kind.NOTICE,
        overdue=True,
    ),
    Case(
        "loop",
        "auto-reply",
        False,
        "Re: disappointed",
        "Disappointed. Unacceptable.",
        kind=Kind.LOOP,
    ),
    # --- non-English --------------------------------------------------------------------
    Case(
        "de-routine",
        "non-english",
        False,
        "Neue Seite",
        "Hallo, bitte legt eine Seite für die Sommeröffnungszeiten an. Danke!",
    ),
    Case(
        "fr-routine",
        "non-english",
        False,
        "Mot de passe",
        "Bonjour, pouvez-vous réinitialiser le mot de passe de Claire ? Merci",
    ),
    Case(
        "es-routine",
        "non-english",
        False,
        "Factura",
        "Hola, ¿podéis enviarnos la factura de noviembre otra vez? Gracias.",
    ),
    Case(
        "nl-routine",
        "non-english",
        False,
        "Nieuwsbrief",
        "Kunnen jullie de nieuwsbrief morgen om 9 uur versturen?",
    ),
    Case(
        "ja-routine",
        "non-english",
        False,
        "ログイン",
        "ログインできません。確認をお願いします。",
    ),
    Case(
        "de-caps-bangs",
        "non-english",
        True,
        "WARUM IST DER SHOP SCHON WIEDER OFFLINE!!!",
        "Bitte sofort melden.",
    ),
    Case(
        "de-complaint",
        "non-english",
        True,
        "Beschwerde",
        "Das ist inakzeptabel. Wir sind sehr enttäuscht von Ihrem Service.",
    ),
    Case(
        "fr-complaint",
        "non-english",
        True,
        "Réclamation",
        "C'est inadmissible, nous attendons toujours votre réponse.",
    ),
    Case(
        "de-chasing-overdue",
        "non-english",
        True,
        "AW: Angebot",
        "Gibt es schon Neuigkeiten zum Angebot?",
        chasing=True,
        overdue=True,
    ),
)


@dataclass(frozen=True)
class Figures:
    tp: int
    fp: int
    fn: int
    tn: int
    misses: tuple[str, ...]  # "name (expected upset|calm)"

    @property
    def precision(self) -> float:
        return self.tp / (self.tp + self.fp) if self.tp + self.fp else 1.0

    @property
    def recall(self) -> float:
        return self.tp / (self.tp + self.fn) if self.tp + self.fn else 1.0


def measure(
    cases: tuple[Case, ...] = LABELLED,
    *,
    phrases: tuple[str, ...] = (),
    threshold: int = upset.DEFAULT_THRESHOLD,
) -> Figures:
    tp = fp = fn = tn = 0
    misses = []
    for case in cases:
        got = upset.decide(case.facts(), phrases=phrases, threshold=threshold).upset
        if got and case.labelled_upset:
            tp += 1
        elif got:
            fp += 1
            misses.append(f"{case.name} (expected calm)")
        elif case.labelled_upset:
            fn += 1
            misses.append(f"{case.name} (expected upset)")
        else:
            tn += 1
    return Figures(tp, fp, fn, tn, tuple(misses))


# --- the labelled set ---------------------------------------------------------------------


def test_labelled_set_is_big_and_varied() -> None:
    assert len(LABELLED) >= 60
    assert len({c.name for c in LABELLED}) == len(LABELLED)
    categories = {c.category for c in LABELLED}
    assert {"complaint", "harmless", "quoted", "signature", "auto-reply", "non-english"} <= (
        categories
    )


@pytest.mark.parametrize("case", [c for c in LABELLED if c.category in NEVER], ids=lambda c: c.name)
def test_quotes_signatures_and_auto_replies_never_count(case: Case) -> None:
    verdict = upset.decide(case.facts())
    assert not verdict.upset
    # Not merely under the threshold: nothing the quote, signature or auto-reply says hits.
    assert verdict.hits == (), verdict.reasons


@pytest.mark.parametrize(
    "case", [c for c in LABELLED if c.category in ("quoted", "signature")], ids=lambda c: c.name
)
def test_those_cases_would_hit_if_quotes_and_signatures_were_read(case: Case) -> None:
    # So the test above proves the stripping, not merely calm words: unstripped, each hits.
    raw = upset.UpsetFacts(case.subject, case.text or case.html, case.kind)
    assert upset.decide(raw).hits != ()


def test_precision_and_recall_floors() -> None:
    # Measured 2026-12-04: see bench/README.md "Upset rules". A regression fails here.
    figures = measure()
    assert figures.precision >= 0.93, figures.misses
    assert figures.recall >= 0.93, figures.misses


def test_extra_phrases_reach_what_the_built_ins_miss() -> None:
    # The [upset] phrases of a desk with German and French clients.
    missed = [c for c in LABELLED if c.name in ("de-complaint", "fr-complaint")]
    assert not any(upset.decide(c.facts()).upset for c in missed)
    extra = ("inakzeptabel", "enttäuscht", "inadmissible")
    assert all(upset.decide(c.facts(), phrases=extra).upset for c in missed)
    assert measure(phrases=extra).recall > measure().recall


# --- the rules one by one -------------------------------------------------------------------


def _decide(text: str, subject: str = "Hello", **kw: object) -> upset.UpsetVerdict:
    return upset.decide(upset.UpsetFacts(subject=subject, text=text), **kw)  # type: ignore[arg-type]


def test_a_strong_phrase_alone_is_upset_with_its_reason() -> None:
    verdict = _decide("Frankly, this is UNACCEPTABLE.")
    assert verdict.upset
    assert verdict.score == upset.STRONG
    assert verdict.hits == (
        upset.Hit("complaint_phrase", "complaint-phrase: 'unacceptable'", upset.STRONG),
    )


def test_a_mild_phrase_alone_is_not_and_two_signals_are() -> None:
    alone = _decide("We are still waiting for the logo.")
    assert not alone.upset and alone.score == upset.MILD
    facts = upset.UpsetFacts("Re: logo", "We are still waiting for the logo.", chasing=True)
    both = upset.decide(facts)
    assert both.upset and both.score == upset.MILD + upset.CHASING
    assert [h.rule for h in both.hits] == ["frustration_phrase", "chasing"]


def test_phrases_span_line_breaks_and_each_counts_once() -> None:
    verdict = _decide("we are still\nwaiting. Still waiting!")
    assert [h.reason for h in verdict.hits] == ["frustration-phrase: 'still waiting'"]


def test_negation_turns_a_phrase_off() -> None:
    for text in (
        "Not disappointed at all.",
        "I have no complaints.",
        "We never complained.",
        "You won't be disappointed.",
        "Nothing to complain about.",
        "No need to escalate.",
    ):
        assert _decide(text).hits == (), text
    # Across a wrapped line, but only close before it, and within its sentence.
    assert _decide("We were not\ndisappointed.").hits == ()
    assert _decide("No. This is disappointing.").upset
    assert _decide("No.\n\nThis is disappointing").upset
    # A negation that intensifies is no negation.
    for text in (
        "I have never been so disappointed.",
        "I can't believe how frustrating this is.",
        "We couldn't be more disappointed.",
    ):
        assert _decide(text).upset, text


def test_harmless_nouns_do_not_hit() -> None:
    assert _decide("The complaint form needs a new field.").hits == ()
    assert _decide("A user could escalate privileges.").hits == ()
    assert _decide("The complaints page is fine but this is a complaint.").upset


def test_shouting_needs_several_capital_words_and_ignores_acronyms_and_logs() -> None:
    assert _decide("URGENT").hits == ()
    assert _decide("Our VPN and DNS are down, URGENT").hits == ()
    assert _decide("SSL DNS MX SPF TXT").hits == ()  # acronyms: few letters
    assert _decide("ERROR: DATABASE CONNECTION FAILED FOR USER ADMIN").hits == ()
    assert _decide("    RAISE EXCEPTION WHEN VALUE IS MISSING").hits == ()
    assert _decide("12:01:02 CONNECTION RESET BY REMOTE PEER").hits == ()
    verdict = _decide("PLEASE FIX THIS NOW")
    assert [h.rule for h in verdict.hits] == ["shouting"]
    assert not verdict.upset  # shouting alone is weight 2
    assert _decide("hi", subject="WHY IS NOBODY ANSWERING").hits[0].rule == "shouting"


def test_exclamations_need_a_run_of_three_or_several_runs() -> None:
    assert _decide("Thanks!! Great work!").hits == ()
    assert _decide("Why?!").hits == ()
    assert [h.rule for h in _decide("Fix it!!!").hits] == ["exclamations"]
    assert [h.rule for h in _decide("Hello?! Anyone?!! Now!!").hits] == ["exclamations"]
    # Shouting and exclamations together reach the default threshold.
    assert _decide("PLEASE FIX THIS NOW!!!").upset


def test_chasing_and_overdue_are_inputs() -> None:
    base = upset.UpsetFacts("Re: x", "Any news?")
    assert upset.decide(base).hits == ()
    for chasing, overdue, score in ((True, False, 2), (False, True, 2), (True, True, 4)):
        facts = upset.UpsetFacts("Re: x", "Any news?", chasing=chasing, overdue=overdue)
        verdict = upset.decide(facts)
        assert verdict.score == score
        assert verdict.upset is (score >= upset.DEFAULT_THRESHOLD)


def test_automatic_mail_counts_for_nothing() -> None:
    for kind in (Kind.AUTO_REPLY, Kind.BOUNCE, Kind.NOTICE, Kind.LOOP):
        facts = upset.UpsetFacts("UNACCEPTABLE!!!", "disappointed", kind, True, True)
        verdict = upset.decide(facts)
        assert (verdict.upset, verdict.score, verdict.hits) == (False, 0, ())


def test_threshold_decides() -> None:
    facts = upset.UpsetFacts("Re: x", "We are still waiting.")
    assert not upset.decide(facts).upset
    assert upset.decide(facts, threshold=2).upset
    strong = upset.UpsetFacts("x", "This is unacceptable.")
    assert not upset.decide(strong, threshold=4).upset
    with pytest.raises(ValueError, match="threshold"):
        upset.decide(facts, threshold=0)


def test_extra_phrases_are_plain_words() -> None:
    facts = upset.UpsetFacts("x", "Wir sind sehr  ENTTÄUSCHT.")
    verdict = upset.decide(facts, phrases=("sehr enttäuscht", "", "a.b"))
    assert verdict.upset
    assert verdict.reasons == ("complaint-phrase: 'sehr enttäuscht'",)
    # Regex syntax in a phrase is literal: "a.b" does not match "axb".
    assert upset.decide(upset.UpsetFacts("x", "axb"), phrases=("a.b",)).hits == ()


def test_the_text_read_is_bounded() -> None:
    text = "fine. " * (upset.SCAN_LIMIT // 6 + 10) + "unacceptable"
    assert _decide(text).hits == ()


def test_a_reply_subject_is_the_threads_and_does_not_count() -> None:
    for subject in ("Re: your complaint", "AW: Beschwerde: unacceptable", "Fwd: DISAPPOINTED"):
        assert _decide("Thanks, all good now.", subject=subject).hits == (), subject
    assert _decide("Thanks.", subject="Complaint about the invoice").upset
