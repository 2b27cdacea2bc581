"""Pure rules of subscribing (services/subscriptions/domain.py) and language negotiation (shared/i18n.py):
property-based where a property exists, examples elsewhere. No I/O."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from services.subscriptions.domain import (
    MAX_NAME,
    ManageLinks,
    Preferences,
    SignupRequest,
    email_hash,
    expiry,
    new_token,
    normalise_email,
    token_hash,
    token_state,
)
from shared.i18n import load_translations, parse_accept_language
from shared.taxonomy import load_taxonomy

# No example database: these tests must not write a .hypothesis folder into the project.
fast = settings(max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

SECRET = "test-secret-0123456789"
LINKS = ManageLinks(SECRET)
SIGNATURE_LENGTH = 24  # 18 bytes of HMAC-SHA256, urlsafe base64 without padding
MAX_TOKEN = 200
# ids whose token still fits the 200-character limit of ManageLinks.subscriber_id
MAX_ID = MAX_TOKEN - 1 - SIGNATURE_LENGTH
B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
TAXONOMY = load_taxonomy()
TOPICS = TAXONOMY.keys("topics")
REGIONS = TAXONOMY.keys("regions")

uuids = st.uuids().map(str)
any_ids = st.text(max_size=MAX_ID)
moments = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC))


def signup(**overrides: object) -> SignupRequest:
    data: dict[str, object] = {"email": "amira@example.org", "consent": True}
    data.update(overrides)
    return SignupRequest(**data)


def error_types(exc: pytest.ExceptionInfo[ValidationError]) -> set[str]:
    return {e["type"] for e in exc.value.errors()}


# --- ManageLinks ----------------------------------------------------------------------------------------


@fast
@given(uuids)
def test_manage_token_round_trips_uuids(subscriber_id: str) -> None:
    token = LINKS.token(subscriber_id)
    assert LINKS.subscriber_id(token) == subscriber_id
    assert ManageLinks(SECRET).subscriber_id(token) == subscriber_id  # stable across instances/restarts


@fast
@given(any_ids)
@example("")
@example("a.b.c")
@example("...")
@example("ünïcödé.مریم")
def test_manage_token_round_trips_arbitrary_text(subscriber_id: str) -> None:
    """rpartition on the last '.' works because the signature itself never contains a '.'."""
    token = LINKS.token(subscriber_id)
    assert "." not in token[-SIGNATURE_LENGTH:]
    assert LINKS.subscriber_id(token) == subscriber_id


def test_manage_token_shape() -> None:
    token = LINKS.token("abc")
    subscriber_id, dot, signature = token.rpartition(".")
    assert (subscriber_id, dot) == ("abc", ".")
    assert len(signature) == SIGNATURE_LENGTH and set(signature) <= set(B64)


def test_ids_too_long_for_a_token_are_refused() -> None:
    """Documents the limit: a token over 200 characters is refused, so ids longer than 175 do not round-trip."""
    assert LINKS.subscriber_id(LINKS.token("x" * MAX_ID)) == "x" * MAX_ID
    assert LINKS.subscriber_id(LINKS.token("x" * (MAX_ID + 1))) is None


@fast
@given(uuids, st.integers(min_value=0, max_value=SIGNATURE_LENGTH - 1), st.sampled_from(B64))
def test_changing_one_character_of_the_signature_is_refused(subscriber_id: str, position: int, char: str) -> None:
    token = LINKS.token(subscriber_id)
    index = len(token) - SIGNATURE_LENGTH + position
    tampered = token[:index] + char + token[index + 1:]
    if tampered != token:
        assert LINKS.subscriber_id(tampered) is None


@fast
@given(uuids, uuids)
def test_a_signature_does_not_fit_another_id(subscriber_id: str, other: str) -> None:
    signature = LINKS.token(subscriber_id).rpartition(".")[2]
    if other != subscriber_id:
        assert LINKS.subscriber_id(f"{other}.{signature}") is None


@fast
@given(uuids, st.integers(min_value=0, max_value=35), st.sampled_from("0123456789abcdef-"))
def test_changing_the_id_is_refused(subscriber_id: str, position: int, char: str) -> None:
    token = LINKS.token(subscriber_id)
    tampered = token[:position] + char + token[position + 1:]
    if tampered != token:
        assert LINKS.subscriber_id(tampered) is None


@fast
@given(uuids, st.text(min_size=1, max_size=40))
def test_another_secret_is_refused(subscriber_id: str, secret: str) -> None:
    if secret != SECRET:
        assert ManageLinks(secret).subscriber_id(LINKS.token(subscriber_id)) is None


@pytest.mark.parametrize("token", [None, "", ".", "..", "abc", "abc.", ".abc", "abc.def", "a" * 500,
                                   str(uuid.uuid4()), f"{uuid.uuid4()}.{'A' * SIGNATURE_LENGTH}",
                                   LINKS.token("abc") + "x", LINKS.token("abc")[:-1], LINKS.token("abc") + ".",
                                   LINKS.token("abc").replace(".", "", 1), " " + LINKS.token("abc"),
                                   LINKS.token("x" * 150) + "y" * 100])
def test_garbage_tokens_are_refused(token: str | None) -> None:
    assert LINKS.subscriber_id(token) is None


@fast
@given(st.text(alphabet=st.characters(codec="ascii"), max_size=300))
def test_arbitrary_ascii_tokens_never_raise(token: str) -> None:
    assert LINKS.subscriber_id(token) is None


def test_non_ascii_signature_is_refused_not_an_error() -> None:
    token = LINKS.token(str(uuid.uuid4()))
    assert LINKS.subscriber_id(token[:-1] + "é") is None


# --- tokens and their state --------------------------------------------------------------------------------


@fast
@given(moments, st.one_of(st.none(), moments), moments)
def test_token_state(expires_at: datetime, used_at: datetime | None, now: datetime) -> None:
    state = token_state(expires_at, used_at, now)
    if used_at is not None:
        assert state == "used"
    elif now >= expires_at:
        assert state == "expired"
    else:
        assert state == "valid"


@fast
@given(moments, st.integers(min_value=1, max_value=24 * 365))
def test_token_is_valid_until_exactly_its_expiry(now: datetime, hours: int) -> None:
    expires_at = expiry(now, hours)
    assert expires_at - now == timedelta(hours=hours)
    assert token_state(expires_at, None, now) == "valid"
    assert token_state(expires_at, None, expires_at - timedelta(microseconds=1)) == "valid"
    assert token_state(expires_at, None, expires_at) == "expired"
    assert token_state(expires_at, now, now) == "used"  # used wins over valid ...
    assert token_state(expires_at, now, expires_at + timedelta(days=1)) == "used"  # ... and over expired


def test_new_tokens_are_random_and_only_their_hash_is_stored() -> None:
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(len(t) >= 43 for t in tokens)
    token = next(iter(tokens))
    assert token_hash(token) == token_hash(token) and token not in token_hash(token)
    assert len(token_hash(token)) == 64


# --- email addresses ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "normalised"), [
    ("Amira@Example.ORG", "amira@example.org"),
    ("  amira@example.org\t", "amira@example.org"),
    ("AMIRA.K+news@Sub.Example.org", "amira.k+news@sub.example.org"),
    ("Ölçer@Example.org", "ölçer@example.org"),
])
def test_normalise_email_trims_and_lower_cases(raw: str, normalised: str) -> None:
    assert normalise_email(raw) == normalised
    assert normalise_email(normalised) == normalised  # idempotent
    assert email_hash(normalise_email(raw)) == email_hash(normalised)


@pytest.mark.parametrize("raw", ["", " ", "amira", "amira@", "@example.org", "amira@@example.org",
                                 "amira@example", "amira example@example.org", "amira@exa mple.org",
                                 "amira@example.org\r\nBcc: x@evil", "amira@example.org\nx",
                                 "amira@" + "a" * 250 + ".org", "<amira@example.org>"])
def test_normalise_email_rejects_invalid_addresses(raw: str) -> None:
    with pytest.raises(ValueError):
        normalise_email(raw)


@fast
@given(st.emails())
def test_normalise_email_is_idempotent_and_lower_case(address: str) -> None:
    try:
        normalised = normalise_email(address)
    except ValueError:
        return  # hypothesis' addresses include some email-validator rejects (e.g. special-use domains)
    assert normalised == normalised.lower() == normalise_email(normalised)


def _validator(address: str) -> str | None:
    """What email_validator alone makes of an address (normalised, lower case), None if it refuses it."""
    from email_validator import EmailNotValidError, validate_email
    try:
        return validate_email(address.strip(), check_deliverability=False).normalized.lower()
    except EmailNotValidError:
        return None


# Pieces near the edges of the plain-address fast path (shared/addresses.py): every character class, the
# IDNA and special-use rules, Unicode, lengths at and over the limits.
_LOCAL_PIECES = st.sampled_from(["a", "Z", "0", "amira", "o'neil", "x+tag", "a.b", ".", "..", "-", "--", "_",
                                 "!#$%&*/=?^`{|}~", '"', " ", "ö", "ß", "é", "\u0301", "ا", "(", ")", ",", ":", ";",
                                 "<", ">", "[", "]", "\\", "@", "a" * 64, "b" * 30])
_DOMAIN_PIECES = st.sampled_from(["example", "Example", "org", "ORG", "de", "x", "1", "123", "a-b", "-a", "a-",
                                  "ab--cd", "xn--", "xn--mnchen-3ya", "xn--a", "test", "localhost", "local",
                                  "invalid", "onion", "arpa", "home", "ä", "ü", "ｅｘ", "。", ".", "..", "_", " ",
                                  "c" * 63, "d" * 64, "e" * 120])


@fast
@given(st.lists(_LOCAL_PIECES, min_size=1, max_size=4), st.lists(_DOMAIN_PIECES, min_size=1, max_size=5),
       st.sampled_from(["", " ", "\t"]))
@example(["amira"], ["example", ".", "org"], "")
@example(["a" * 64], ["example", ".", "com"], "")
@example(["a" * 65], ["example", ".", "com"], "")
@example(["amira"], ["mail", ".", "test"], "")
@example(["amira"], ["xn--mnchen-3ya", ".", "de"], "")
@example(["amira"], ["example", ".", "c1"], "")
@example(["amira"], ["example", ".", "-de"], "")
def test_normalise_email_agrees_with_email_validator(local: list[str], domain: list[str], padding: str) -> None:
    """The plain-address fast path of normalise_email accepts nothing email_validator refuses and
    normalises as it does; everything else is email_validator's answer."""
    labels = "".join(domain)
    for address in (f"{padding}{''.join(local)}@{labels}{padding}", f"{''.join(local)}@{labels}.org",
                    f"{''.join(local)}@{labels.replace('.', '')}.example.org"):
        expected = _validator(address)
        if expected is None:
            with pytest.raises(ValueError):
                normalise_email(address)
        else:
            assert normalise_email(address) == expected, address


# --- sign-up validation --------------------------------------------------------------------------------------


def test_valid_signup_normalises_its_fields() -> None:
    req = signup(email=" Amira@Example.ORG ", name="  Amira  ", language="fa",
                 topics=["bildung", "arbeitsmarkt", "bildung"], regions=["halle", "halle"])
    assert req.email == "amira@example.org"
    assert req.name == "Amira"
    assert req.language == "fa"
    assert req.topics == ["bildung", "arbeitsmarkt"]  # duplicates removed, order kept
    assert req.regions == ["halle"]
    assert req.consent is True


def test_signup_defaults() -> None:
    req = signup()
    assert (req.language, req.topics, req.regions, req.name, req.website) == ("de", [], [], None, "")


@fast
@given(st.lists(st.sampled_from(TOPICS), max_size=30), st.lists(st.sampled_from(REGIONS), max_size=30))
def test_known_topics_and_regions_are_deduplicated_in_order(topics: list[str], regions: list[str]) -> None:
    req = signup(topics=topics, regions=regions)
    assert req.topics == list(dict.fromkeys(topics))
    assert req.regions == list(dict.fromkeys(regions))


@pytest.mark.parametrize(("field", "value", "error"), [
    ("topics", ["bildung", "astrologie"], "unknown_topic"),
    ("regions", ["halle", "atlantis"], "unknown_region"),
    ("language", "xx", "unknown_language"),
    ("language", "DE", "unknown_language"),
    ("consent", False, "consent_required"),
    ("email", "not-an-address", "email_invalid"),
    ("email", "   ", "email_required"),
    ("email", "a" * 250 + "@example.org", "too_long"),
])
def test_signup_rejects(field: str, value: object, error: str) -> None:
    with pytest.raises(ValidationError) as exc:
        signup(**{field: value})
    assert error in error_types(exc)
    assert {e["loc"][0] for e in exc.value.errors()} == {field}


def test_consent_is_required() -> None:
    with pytest.raises(ValidationError) as exc:
        SignupRequest(email="amira@example.org")  # type: ignore[call-arg]
    assert [e["loc"] for e in exc.value.errors()] == [("consent",)]


def test_preferences_validate_like_a_signup() -> None:
    with pytest.raises(ValidationError) as exc:
        Preferences(language="xx", topics=["nope"], regions=["nowhere"])
    assert error_types(exc) == {"unknown_language", "unknown_topic", "unknown_region"}


@pytest.mark.parametrize("name", ["Eve\r\nBcc: x@evil", "Eve\nBcc", "Eve\x00", "Eve\x1b[31m", "Eve\u200b",
                                  "Eve\u202egnp.exe", "E\tve", "Eve\x7f"])
def test_names_with_control_characters_are_rejected(name: str) -> None:
    with pytest.raises(ValidationError) as exc:
        signup(name=name)
    assert error_types(exc) == {"control_characters"}


@pytest.mark.parametrize("name", ["Amira", "مریم", "Мар'яна", "Ömer Çelik", "نرگس\u200cزاده", "O'Brien-Smith"])
def test_names_in_every_script_are_accepted(name: str) -> None:
    assert signup(name=name).name == name  # ZWNJ (U+200C) is needed in Persian names


def test_name_length_limit() -> None:
    assert signup(name="x" * MAX_NAME).name == "x" * MAX_NAME
    with pytest.raises(ValidationError) as exc:
        signup(name="x" * (MAX_NAME + 1))
    assert error_types(exc) == {"too_long"}


@pytest.mark.parametrize("name", [None, "", "   "])
def test_empty_name_is_none(name: str | None) -> None:
    assert signup(name=name).name is None


@fast
@given(st.text(max_size=MAX_NAME + 20))
def test_name_validation_never_crashes(name: str) -> None:
    try:
        req = signup(name=name)
    except ValidationError as exc:
        assert {e["type"] for e in exc.errors()} <= {"control_characters", "too_long"}
        return
    assert req.name is None or (0 < len(req.name) <= MAX_NAME and req.name == req.name.strip())


# --- Accept-Language and negotiation -----------------------------------------------------------------------


@pytest.mark.parametrize(("header", "expected"), [
    ("", []),
    ("de", ["de"]),
    ("fa-IR,en;q=0.8", ["fa-IR", "en"]),
    ("en;q=0.5, ar;q=0.9, tr", ["tr", "ar", "en"]),
    ("ru;q=0.7, uk;q=0.7, de;q=0.7", ["ru", "uk", "de"]),  # equal q: header order
    ("de;q=0, en", ["en"]),
    ("*, en;q=0.1", ["en"]),
    ("en;q=abc, de", ["de"]),
    (" , ,, en ,", ["en"]),
])
def test_parse_accept_language(header: str, expected: list[str]) -> None:
    assert parse_accept_language(header) == expected


accept_parts = st.tuples(st.sampled_from(["de", "en", "ar", "fa-IR", "ru", "uk-UA", "tr", "fr", "*"]),
                         st.integers(min_value=0, max_value=1000))


@fast
@given(st.lists(accept_parts, max_size=15))
def test_parse_accept_language_orders_by_q(parts: list[tuple[str, int]]) -> None:
    header = ",".join(f"{lang};q={q / 1000}" for lang, q in parts)
    result = parse_accept_language(header)
    expected = [lang for _, _, lang in sorted((-q, i, lang) for i, (lang, q) in enumerate(parts)
                                              if q > 0 and lang != "*")]
    assert result == expected


@fast
@given(st.text(max_size=300))
@example("en;q=nan, de;q=inf, ar;q=-1, fa;q=1e999, tr;q=")
@example(";;;q=,=;,")
def test_parse_accept_language_never_raises(header: str) -> None:
    result = parse_accept_language(header)
    assert isinstance(result, list) and all(isinstance(lang, str) for lang in result)
    assert "*" not in result
    assert len(result) <= 20
    assert load_translations().negotiate(accept_language=header) in TAXONOMY.languages


@pytest.mark.parametrize(("chosen", "accept", "expected"), [
    ((), None, "de"),
    ((), "fa-IR,en;q=0.8", "fa"),
    ((), "fr-FR, en-GB;q=0.9", "en"),
    ((), "fr, it", "de"),
    ((), "de;q=0, uk", "uk"),
    (("ar",), "fa-IR,en;q=0.8", "ar"),  # an explicit choice wins over the header
    ((None, "tr"), "fa", "tr"),
    (("xx", "", None), "ru", "ru"),  # unsupported choices are skipped
    (("EN",), None, "en"),
    (("uk_UA",), None, "uk"),
    (("pt-BR",), None, "de"),
])
def test_negotiate(chosen: tuple[str | None, ...], accept: str | None, expected: str) -> None:
    assert load_translations().negotiate(*chosen, accept_language=accept) == expected


@fast
@given(st.lists(st.one_of(st.none(), st.text(max_size=12)), max_size=3), st.one_of(st.none(), st.text(max_size=80)))
def test_negotiate_always_returns_a_supported_language(chosen: list[str | None], accept: str | None) -> None:
    assert load_translations().negotiate(*chosen, accept_language=accept) in TAXONOMY.languages
