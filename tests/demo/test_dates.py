"""The demo's date data: every format of every language parses back to its date.

The parser below is written independently of :mod:`luong_attention.date_demo.dates`: its own month and
weekday names (abbreviations are recognised as prefixes of the full names), its own
number-word grammar per language, and its own two-digit-year rule.
"""

from __future__ import annotations

import datetime as dt
import re

import numpy as np
import pytest

from luong_attention.date_demo import dates

# Full names only; an abbreviation is any prefix of 3+ letters that names one month.
MONTH_NAMES = [
    "january february march april may june july august september october november december",
    "janvier février mars avril mai juin juillet août septembre octobre novembre décembre",
    "januar februar märz april mai juni juli august september oktober november dezember",
    "enero febrero marzo abril mayo junio julio agosto septiembre octubre noviembre diciembre",
]
WEEKDAY_NAMES = [  # Monday first
    "monday tuesday wednesday thursday friday saturday sunday",
    "lundi mardi mercredi jeudi vendredi samedi dimanche",
    "montag dienstag mittwoch donnerstag freitag samstag sonntag",
    "lunes martes miércoles jueves viernes sábado domingo",
]
FILLERS = {"the", "of", "le", "am", "el", "de"}

ENGLISH_WORDS = {
    **dict.fromkeys(["first"], 1),
    "second": 2, "third": 3, "fourth": 4, "fifth": 5, "sixth": 6, "seventh": 7, "eighth": 8,
    "ninth": 9, "tenth": 10, "eleventh": 11, "twelfth": 12, "thirteenth": 13,
    "fourteenth": 14, "fifteenth": 15, "sixteenth": 16, "seventeenth": 17, "eighteenth": 18,
    "nineteenth": 19, "twentieth": 20, "thirtieth": 30, "twenty": 20, "thirty": 30,
}  # fmt: skip
FRENCH_WORDS = {
    "premier": 1, "un": 1, "deux": 2, "trois": 3, "quatre": 4, "cinq": 5, "six": 6, "sept": 7,
    "huit": 8, "neuf": 9, "dix": 10, "onze": 11, "douze": 12, "treize": 13, "quatorze": 14,
    "quinze": 15, "seize": 16, "vingt": 20, "trente": 30, "et": 0,
}  # fmt: skip
# German ordinal stems, after removing "sten"/"ten"/"en" ("ersten" -> "er", "achten" -> "acht").
GERMAN_STEMS = {
    "er": 1, "ein": 1, "zwei": 2, "drit": 3, "drei": 3, "vier": 4, "fünf": 5, "sechs": 6,
    "sieb": 7, "sieben": 7, "acht": 8, "neun": 9, "zehn": 10, "elf": 11, "zwölf": 12,
    "dreizehn": 13, "vierzehn": 14, "fünfzehn": 15, "sechzehn": 16, "siebzehn": 17,
    "achtzehn": 18, "neunzehn": 19, "zwanzig": 20, "dreissig": 30,
}  # fmt: skip
SPANISH_UNITS = {
    "uno": 1, "dos": 2, "dós": 2, "tres": 3, "trés": 3, "cuatro": 4, "cinco": 5, "seis": 6,
    "séis": 6, "siete": 7, "ocho": 8, "nueve": 9,
}  # fmt: skip
SPANISH_WORDS = {
    **SPANISH_UNITS, "primero": 1, "diez": 10, "once": 11, "doce": 12, "trece": 13,
    "catorce": 14, "quince": 15, "veinte": 20, "treinta": 30, "y": 0,
}  # fmt: skip


def lookup(token: str, tables: list[str]) -> int | None:
    """Index (0-based) of the name that ``token`` spells or abbreviates, if exactly one."""
    token = token.rstrip(".")
    if len(token) < 3:
        return None
    hits = {
        index
        for table in tables
        for index, name in enumerate(table.split())
        if name.startswith(token)
    }
    return hits.pop() if len(hits) == 1 else None


def two_digit_year(yy: int) -> int:
    """The documented pivot: 50-99 -> 1950-1999, 00-49 -> 2000-2049."""
    return 1900 + yy if yy >= 50 else 2000 + yy


def parse_year(token: str) -> int:
    token = token.lstrip("'").rstrip(".")
    return int(token) if len(token) == 4 else two_digit_year(int(token))


def german_day(word: str) -> int | None:
    for suffix in ("sten", "ten", "en"):
        if word.endswith(suffix):
            parts = word[: -len(suffix)].split("und")
            if all(p in GERMAN_STEMS for p in parts):
                return sum(GERMAN_STEMS[p] for p in parts)
    return None


def spanish_word(word: str) -> int | None:
    for prefix, base in (("veinti", 20), ("dieci", 10)):
        if word.startswith(prefix) and word[len(prefix) :] in SPANISH_UNITS:
            return base + SPANISH_UNITS[word[len(prefix) :]]
    return SPANISH_WORDS.get(word)


def spelled_day(words: list[str]) -> int:
    """The day written as words in any of the four languages (all parts must agree)."""
    parts = [p for w in words for p in w.split("-")]
    readings = []
    for table in (ENGLISH_WORDS, FRENCH_WORDS):
        if all(p in table for p in parts):
            readings.append(sum(table[p] for p in parts))
    if len(parts) == 1 and german_day(parts[0]) is not None:
        readings.append(german_day(parts[0]))
    spanish = [spanish_word(p) for p in parts]
    if all(v is not None for v in spanish):
        readings.append(sum(spanish))
    assert len(set(readings)) == 1, f"cannot read the day {words}: {readings}"
    return readings[0]


def parse_date(text: str) -> tuple[dt.date, int | None]:
    """Reads a written date; returns ``(date, weekday or None)``."""
    text = text.lower().replace("ß", "ss")
    patterns = [  # (regex, group order as year/month/day)
        (r"(\d{4})-(\d\d)-(\d\d)", "ymd"),
        (r"(\d{4})(\d\d)(\d\d)", "ymd"),
        (r"(\d{4})/(\d\d)/(\d\d)", "ymd"),
        (r"(\d{1,2})[./-](\d{1,2})[./-](\d{2}|\d{4})", "dmy"),
    ]
    for regex, order in patterns:
        match = re.fullmatch(regex, text)
        if match:
            parts = dict(zip(order, match.groups(), strict=True))
            return dt.date(parse_year(parts["y"]), int(parts["m"]), int(parts["d"])), None
    match = re.fullmatch(r"(\d\d)-([a-zé]+)-(\d\d)", text)
    tokens = list(match.groups()) if match else [t for t in re.split(r"[\s,]+", text) if t]
    weekday = None
    if lookup(tokens[0], WEEKDAY_NAMES) is not None and any(
        lookup(t, MONTH_NAMES) is not None for t in tokens[1:]
    ):
        weekday = lookup(tokens.pop(0), WEEKDAY_NAMES)
    month_at = [i for i, t in enumerate(tokens) if lookup(t, MONTH_NAMES) is not None]
    assert month_at, f"no month in {text!r}"
    # The month is the last month-like word ("le sept décembre": "sept" is the day).
    month = lookup(tokens.pop(month_at[-1]), MONTH_NAMES) + 1
    year = parse_year(tokens.pop())
    rest = [t for t in tokens if t not in FILLERS]
    number = re.fullmatch(r"(\d{1,2})(st|nd|rd|th|er)?\.?", rest[0]) if len(rest) == 1 else None
    day = int(number.group(1)) if number else spelled_day(rest)
    return dt.date(year, month, day), weekday


EDGE_DATES = [
    dt.date(1900, 1, 1),
    dt.date(1949, 12, 31),
    dt.date(1950, 1, 1),
    dt.date(2000, 2, 29),
    dt.date(2026, 11, 25),
    dt.date(2049, 12, 31),
    dt.date(2050, 1, 1),
    dt.date(2099, 12, 31),
]
# Every day of the month, every month and weekday, inside and outside the two-digit window.
SPREAD_DATES = [dt.date(1948, 12, 1) + dt.timedelta(days=i) for i in range(0, 800, 3)] + [
    dt.date(1900, 1, 1) + dt.timedelta(days=i) for i in range(0, 73049, 811)
]


@pytest.mark.parametrize("fmt", dates.FORMATS, ids=lambda f: f.name)
def test_every_format_parses_back(fmt):
    for date in EDGE_DATES + SPREAD_DATES:
        if not fmt.accepts(date):
            with pytest.raises(ValueError, match="two-digit"):
                dates.render_example(date, fmt, "as_is")
            continue
        for casing in dates.CASINGS:
            example = dates.render_example(date, fmt, casing)
            parsed, weekday = parse_date(example.text)
            assert parsed == date, (example, parsed)
            assert example.target == date.isoformat()
            if weekday is not None:
                assert weekday == date.weekday(), example


def test_the_issue_examples_are_formats():
    written = {f.render(dt.date(2026, 11, 25)) for f in dates.FORMATS}
    for text in (
        "the twenty-fifth of November, 2026",
        "25 novembre 2026",
        "Mittwoch, 25. Nov. 26",
        "25/11/2026",
        "Nov 25, '26",
        "20261125",
    ):
        assert text in written


def test_enough_formats_in_every_language():
    assert len(dates.FORMATS) >= 24
    assert len({f.name for f in dates.FORMATS}) == len(dates.FORMATS)
    for language in ("en", "fr", "de", "es"):
        assert sum(f.language == language for f in dates.FORMATS) >= 5


def test_casing_varies_and_short_years_stay_in_their_window():
    examples = dates.sample_examples(dates.all_dates(), 3000, np.random.default_rng(3))
    assert {e.casing for e in examples} == set(dates.CASINGS)
    assert {e.format_name for e in examples} == {f.name for f in dates.FORMATS}
    short = {f.name for f in dates.FORMATS if f.short_year}
    for e in examples:
        parsed, _ = parse_date(e.text)
        assert parsed.isoformat() == e.target
        if e.format_name in short:
            assert 1950 <= parsed.year <= 2049


def test_train_and_test_dates_are_disjoint_and_cover_the_range():
    train, test = dates.split_dates(500, seed=7)
    assert len(test) == 500
    assert not set(train) & set(test)
    assert len(train) + len(test) == (dt.date(2099, 12, 31) - dt.date(1900, 1, 1)).days + 1
    assert min(train + test) == dt.date(1900, 1, 1)
    assert max(train + test) == dt.date(2099, 12, 31)
    # Training examples, whatever their format, never write a test date.
    examples = dates.sample_examples(train, 4000, np.random.default_rng(0))
    test_iso = {d.isoformat() for d in test}
    assert not {e.target for e in examples} & test_iso
    assert all(parse_date(e.text)[0].isoformat() not in test_iso for e in examples)


def test_seeded_and_balanced():
    a = dates.split_dates(100, seed=1)
    assert a == dates.split_dates(100, seed=1)
    assert a[1] != dates.split_dates(100, seed=2)[1]
    draw = [dates.sample_examples(a[1], 68, np.random.default_rng(5), balanced=True)
            for _ in range(2)]  # fmt: skip
    assert draw[0] == draw[1]
    counts = {f.name: 0 for f in dates.FORMATS}
    for e in draw[0]:
        counts[e.format_name] += 1
    assert set(counts.values()) == {2}


def test_encoding_round_trip_and_padding():
    alphabet = dates.source_alphabet()
    texts = ["Mittwoch, 25. Nov. 26", "LE PREMIER MARS 1999", "~"]
    ids, lengths = dates.encode_sources(texts, alphabet, 23)
    assert ids.shape == (3, 23) and ids.dtype == np.int32
    np.testing.assert_array_equal(lengths, [21, 20, 1])
    assert "".join(alphabet[i - 2] for i in ids[0, :21]) == texts[0]
    assert (ids[0, 21:] == dates.PAD).all() and (ids[2, 1:] == dates.PAD).all()
    assert ids[2, 0] == dates.UNK  # "~" never occurs in any format
    targets = ["2026-11-25", "1900-01-01"]
    encoded = dates.encode_targets(targets)
    assert encoded.shape == (2, dates.TARGET_LENGTH)
    assert dates.decode_targets(encoded) == targets


def test_alphabet_holds_every_generated_character():
    alphabet = set(dates.source_alphabet())
    examples = dates.sample_examples(dates.all_dates(), 2000, np.random.default_rng(9))
    assert set("".join(e.text for e in examples)) <= alphabet
