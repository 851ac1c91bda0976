"""Human-written dates in four languages, for the ``luong-attention demo`` task.

Every date from 1900-01-01 to 2099-12-31 can be written in :data:`FORMATS`: English, French,
German and Spanish formats with month and weekday names, abbreviations, ordinals and
spelled-out days, plus language-neutral numeric formats. The target is always the ISO form
``YYYY-MM-DD``.

Two-digit years (``'26``, ``25.11.26``) follow one rule: ``50``-``99`` mean 1950-1999 and
``00``-``49`` mean 2000-2049. Formats with a two-digit year are therefore only used for dates
from 1950 to 2049, so that every input has exactly one reading.

Day-first numeric formats (``25/11/2026``) are the only numeric forms with the day before the
month; there is no month-first numeric form (US ``11/25/2026``), which would make ``05/06``
ambiguous.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

FIRST_DATE = dt.date(1900, 1, 1)
LAST_DATE = dt.date(2099, 12, 31)
SHORT_YEAR_FIRST = dt.date(1950, 1, 1)
SHORT_YEAR_LAST = dt.date(2049, 12, 31)
TARGET_LENGTH = 10  # len("YYYY-MM-DD")
LANGUAGES = ("en", "fr", "de", "es", "numeric")

_MONTHS = {
    "en": "January February March April May June July August September October November December",
    "fr": "janvier février mars avril mai juin juillet août septembre octobre novembre décembre",
    "de": "Januar Februar März April Mai Juni Juli August September Oktober November Dezember",
    "es": "enero febrero marzo abril mayo junio julio agosto septiembre octubre noviembre diciembre",
}
_MONTHS_ABBR = {
    "en": "Jan Feb Mar Apr May Jun Jul Aug Sep Oct Nov Dec",
    "fr": "janv. févr. mars avr. mai juin juil. août sept. oct. nov. déc.",
    "de": "Jan. Feb. März Apr. Mai Juni Juli Aug. Sept. Okt. Nov. Dez.",
    "es": "ene. feb. mar. abr. may. jun. jul. ago. sept. oct. nov. dic.",
}
# Monday first, as datetime.date.weekday().
_WEEKDAYS = {
    "en": "Monday Tuesday Wednesday Thursday Friday Saturday Sunday",
    "fr": "lundi mardi mercredi jeudi vendredi samedi dimanche",
    "de": "Montag Dienstag Mittwoch Donnerstag Freitag Samstag Sonntag",
    "es": "lunes martes miércoles jueves viernes sábado domingo",
}
_WEEKDAYS_ABBR = {
    "en": "Mon Tue Wed Thu Fri Sat Sun",
    "fr": "lun. mar. mer. jeu. ven. sam. dim.",
    "es": "lun. mar. mié. jue. vie. sáb. dom.",
}


def _names(table: dict[str, str], language: str) -> tuple[str, ...]:
    """Splits one language's space-separated name list."""
    return tuple(table[language].split())


def _english_ordinal_word(day: int) -> str:
    """1 -> "first", 25 -> "twenty-fifth", 30 -> "thirtieth"."""
    units = (
        "first second third fourth fifth sixth seventh eighth ninth tenth eleventh twelfth "
        "thirteenth fourteenth fifteenth sixteenth seventeenth eighteenth nineteenth"
    ).split()
    if day < 20:
        return units[day - 1]
    tens, unit = divmod(day, 10)
    tens_word = ("twenty", "thirty")[tens - 2]
    if unit == 0:
        return tens_word[:-1] + "ieth"
    return f"{tens_word}-{units[unit - 1]}"


def _english_ordinal_suffix(day: int) -> str:
    """1 -> "1st", 2 -> "2nd", 13 -> "13th", 22 -> "22nd"."""
    if 10 <= day % 100 <= 20:
        return f"{day}th"
    return f"{day}{ {1: 'st', 2: 'nd', 3: 'rd'}.get(day % 10, 'th') }"


def _french_day_word(day: int) -> str:
    """1 -> "premier", 21 -> "vingt et un", 25 -> "vingt-cinq"."""
    units = (
        "un deux trois quatre cinq six sept huit neuf dix onze douze treize quatorze quinze "
        "seize dix-sept dix-huit dix-neuf"
    ).split()
    if day == 1:
        return "premier"
    if day < 20:
        return units[day - 1]
    tens, unit = divmod(day, 10)
    tens_word = ("vingt", "trente")[tens - 2]
    if unit == 0:
        return tens_word
    if unit == 1:
        return f"{tens_word} et un"
    return f"{tens_word}-{units[unit - 1]}"


def _german_ordinal_word(day: int) -> str:
    """Dative ordinal after "am": 1 -> "ersten", 25 -> "fünfundzwanzigsten"."""
    small = (
        "ersten zweiten dritten vierten fünften sechsten siebten achten neunten zehnten elften "
        "zwölften dreizehnten vierzehnten fünfzehnten sechzehnten siebzehnten achtzehnten "
        "neunzehnten"
    ).split()
    if day < 20:
        return small[day - 1]
    tens, unit = divmod(day, 10)
    tens_word = ("zwanzigsten", "dreißigsten")[tens - 2]
    if unit == 0:
        return tens_word
    unit_word = "ein zwei drei vier fünf sechs sieben acht neun".split()[unit - 1]
    return f"{unit_word}und{tens_word}"


def _spanish_day_word(day: int) -> str:
    """1 -> "primero", 22 -> "veintidós", 31 -> "treinta y uno"."""
    words = (
        "primero dos tres cuatro cinco seis siete ocho nueve diez once doce trece catorce "
        "quince dieciséis diecisiete dieciocho diecinueve veinte veintiuno veintidós veintitrés "
        "veinticuatro veinticinco veintiséis veintisiete veintiocho veintinueve treinta"
    ).split()
    return "treinta y uno" if day == 31 else words[day - 1]


@dataclass(frozen=True)
class DateFormat:
    """One way of writing a date: ``render(date) -> text``.

    Attributes:
      name: ``"<language>:<pattern>"``, e.g. ``"de:weekday_d_mon_yy"``.
      language: one of :data:`LANGUAGES`.
      render: the formatter.
      short_year: the text holds a two-digit year (so only dates in 1950-2049 are used).
    """

    name: str
    language: str
    render: Callable[[dt.date], str]
    short_year: bool = False

    def accepts(self, date: dt.date) -> bool:
        """Whether ``date`` can be written in this format without ambiguity."""
        return not self.short_year or SHORT_YEAR_FIRST <= date <= SHORT_YEAR_LAST


def _formats() -> tuple[DateFormat, ...]:
    """Builds the table of all formats (names, language, formatter)."""

    def month(lang: str, d: dt.date) -> str:
        return _names(_MONTHS, lang)[d.month - 1]

    def mon(lang: str, d: dt.date) -> str:
        return _names(_MONTHS_ABBR, lang)[d.month - 1]

    def weekday(lang: str, d: dt.date) -> str:
        return _names(_WEEKDAYS, lang)[d.weekday()]

    def wd(lang: str, d: dt.date) -> str:
        return _names(_WEEKDAYS_ABBR, lang)[d.weekday()]

    def yy(d: dt.date) -> str:
        return f"{d.year % 100:02d}"

    table: list[tuple[str, Callable[[dt.date], str], bool]] = [
        # English
        ("en:month_d_yyyy", lambda d: f"{month('en', d)} {d.day}, {d.year}", False),
        ("en:mon_d_yyyy", lambda d: f"{mon('en', d)} {d.day}, {d.year}", False),
        ("en:mon_d_'yy", lambda d: f"{mon('en', d)} {d.day}, '{yy(d)}", True),
        ("en:d_month_yyyy", lambda d: f"{d.day} {month('en', d)} {d.year}", False),
        (
            "en:the_dth_of_month",
            lambda d: f"the {_english_ordinal_suffix(d.day)} of {month('en', d)} {d.year}",
            False,
        ),
        (
            "en:month_dth_yyyy",
            lambda d: f"{month('en', d)} {_english_ordinal_suffix(d.day)}, {d.year}",
            False,
        ),
        (
            "en:weekday_month_d_yyyy",
            lambda d: f"{weekday('en', d)}, {month('en', d)} {d.day}, {d.year}",
            False,
        ),
        (
            "en:wd_dd_mon_yyyy",
            lambda d: f"{wd('en', d)}, {d.day:02d} {mon('en', d)} {d.year}",
            False,
        ),
        (
            "en:the_spelled_of_month",
            lambda d: f"the {_english_ordinal_word(d.day)} of {month('en', d)}, {d.year}",
            False,
        ),
        ("en:dd-mon-yy", lambda d: f"{d.day:02d}-{mon('en', d)}-{yy(d)}", True),
        # French
        ("fr:d_month_yyyy", lambda d: f"{d.day} {month('fr', d)} {d.year}", False),
        ("fr:d_mon_yyyy", lambda d: f"{d.day} {mon('fr', d)} {d.year}", False),
        (
            "fr:weekday_d_month_yyyy",
            lambda d: f"{weekday('fr', d)} {d.day} {month('fr', d)} {d.year}",
            False,
        ),
        (
            "fr:le_1er_month_yyyy",
            lambda d: f"le {'1er' if d.day == 1 else d.day} {month('fr', d)} {d.year}",
            False,
        ),
        (
            "fr:le_spelled_month_yyyy",
            lambda d: f"le {_french_day_word(d.day)} {month('fr', d)} {d.year}",
            False,
        ),
        (
            "fr:wd_d_mon_yy",
            lambda d: f"{wd('fr', d)} {d.day} {mon('fr', d)} {yy(d)}",
            True,
        ),
        ("fr:dd/mm/yy", lambda d: f"{d.day:02d}/{d.month:02d}/{yy(d)}", True),
        # German
        ("de:d._month_yyyy", lambda d: f"{d.day}. {month('de', d)} {d.year}", False),
        ("de:d._mon_yyyy", lambda d: f"{d.day}. {mon('de', d)} {d.year}", False),
        (
            "de:weekday_d._month_yyyy",
            lambda d: f"{weekday('de', d)}, {d.day}. {month('de', d)} {d.year}",
            False,
        ),
        (
            "de:weekday_d._mon_yy",
            lambda d: f"{weekday('de', d)}, {d.day}. {mon('de', d)} {yy(d)}",
            True,
        ),
        (
            "de:am_spelled_month_yyyy",
            lambda d: f"am {_german_ordinal_word(d.day)} {month('de', d)} {d.year}",
            False,
        ),
        ("de:dd.mm.yyyy", lambda d: f"{d.day:02d}.{d.month:02d}.{d.year}", False),
        ("de:d.m.yy", lambda d: f"{d.day}.{d.month}.{yy(d)}", True),
        # Spanish
        ("es:d_de_month_de_yyyy", lambda d: f"{d.day} de {month('es', d)} de {d.year}", False),
        (
            "es:weekday_d_de_month_de_yyyy",
            lambda d: f"{weekday('es', d)}, {d.day} de {month('es', d)} de {d.year}",
            False,
        ),
        (
            "es:el_spelled_de_month_de_yyyy",
            lambda d: f"el {_spanish_day_word(d.day)} de {month('es', d)} de {d.year}",
            False,
        ),
        ("es:d_mon_yyyy", lambda d: f"{d.day} {mon('es', d)} {d.year}", False),
        ("es:wd_d_mon_yy", lambda d: f"{wd('es', d)} {d.day} {mon('es', d)} {yy(d)}", True),
        ("es:dd-mm-yyyy", lambda d: f"{d.day:02d}-{d.month:02d}-{d.year}", False),
        # Language-neutral numeric forms
        ("numeric:yyyy-mm-dd", lambda d: d.isoformat(), False),
        ("numeric:yyyymmdd", lambda d: f"{d.year}{d.month:02d}{d.day:02d}", False),
        ("numeric:yyyy/mm/dd", lambda d: f"{d.year}/{d.month:02d}/{d.day:02d}", False),
        ("numeric:dd/mm/yyyy", lambda d: f"{d.day:02d}/{d.month:02d}/{d.year}", False),
    ]
    return tuple(
        DateFormat(name, name.split(":")[0], render, short) for name, render, short in table
    )


FORMATS: tuple[DateFormat, ...] = _formats()
CASINGS = ("as_is", "lower", "upper", "title")
_CASING_WEIGHTS = np.array([0.4, 0.2, 0.2, 0.2])


def apply_casing(text: str, casing: str) -> str:
    """Applies one of :data:`CASINGS` to ``text``."""
    if casing == "lower":
        return text.lower()
    if casing == "upper":
        return text.upper()
    if casing == "title":
        return text.title()
    return text


def all_dates() -> list[dt.date]:
    """Every date from :data:`FIRST_DATE` to :data:`LAST_DATE`, in order."""
    days = (LAST_DATE - FIRST_DATE).days + 1
    return [FIRST_DATE + dt.timedelta(days=i) for i in range(days)]


def split_dates(num_test_dates: int, seed: int) -> tuple[list[dt.date], list[dt.date]]:
    """Splits all dates into disjoint ``(train_dates, test_dates)`` with a fixed seed.

    A date in the test split is never written, in any format, into the training data.
    """
    dates = all_dates()
    order = np.random.default_rng(seed).permutation(len(dates))
    test = sorted(dates[i] for i in order[:num_test_dates])
    train = sorted(dates[i] for i in order[num_test_dates:])
    return train, test


@dataclass(frozen=True)
class Example:
    """One example: the text, its ISO target, and how it was written."""

    text: str
    target: str
    format_name: str
    casing: str


def render_example(date: dt.date, fmt: DateFormat, casing: str) -> Example:
    """Writes ``date`` in ``fmt`` with ``casing`` (the format must accept the date)."""
    if not fmt.accepts(date):
        raise ValueError(f"{fmt.name} cannot write {date}: two-digit years cover 1950-2049.")
    return Example(apply_casing(fmt.render(date), casing), date.isoformat(), fmt.name, casing)


def sample_examples(
    dates: Sequence[dt.date],
    count: int,
    rng: np.random.Generator,
    *,
    formats: Sequence[DateFormat] = FORMATS,
    balanced: bool = False,
) -> list[Example]:
    """Draws ``count`` examples from ``dates``.

    Args:
      dates: the dates to draw from (e.g. one side of :func:`split_dates`).
      count: number of examples.
      rng: the NumPy generator (the only source of randomness).
      formats: the formats to use.
      balanced: cycle through ``formats`` in order (equal counts per format, for evaluation)
        instead of drawing a format at random.

    Returns:
      The examples, each with a random casing.
    """
    ordinals = np.array([d.toordinal() for d in dates])
    short_ok = (ordinals >= SHORT_YEAR_FIRST.toordinal()) & (
        ordinals <= SHORT_YEAR_LAST.toordinal()
    )
    short_dates = [d for d, ok in zip(dates, short_ok, strict=True) if ok]
    if balanced:
        format_ids = np.arange(count) % len(formats)
    else:
        format_ids = rng.integers(0, len(formats), count)
    casings = rng.choice(len(CASINGS), size=count, p=_CASING_WEIGHTS)
    date_draws = rng.random(count)
    examples = []
    for f, c, u in zip(format_ids, casings, date_draws, strict=True):
        fmt = formats[f]
        pool = short_dates if fmt.short_year else dates
        examples.append(render_example(pool[int(u * len(pool))], fmt, CASINGS[c]))
    return examples


# -- Character vocabularies ---------------------------------------------------------------

PAD, UNK = 0, 1
TARGET_CHARS = "0123456789-"
BOS = len(TARGET_CHARS)  # decoder start token, after the target characters


def source_alphabet() -> str:
    """Every character any format can produce, in any casing, sorted."""
    sample = [FORMATS[i].render(d) for i in range(len(FORMATS)) for d in _alphabet_dates()]
    text = "".join(sample)
    return "".join(sorted({c for t in (text, text.lower(), text.upper(), text.title()) for c in t}))


def _alphabet_dates() -> list[dt.date]:
    """Dates covering every day, month and weekday number (all within 1950-2049)."""
    return [dt.date(2026, 1, 1) + dt.timedelta(days=i) for i in range(0, 366)] + [
        dt.date(2028, 12, 31)
    ]


def encode_sources(
    texts: Sequence[str], alphabet: str, length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Character ids of ``texts``, right-padded with :data:`PAD`.

    Characters outside ``alphabet`` become :data:`UNK`; texts longer than ``length`` are cut.

    Returns:
      ``(ids [count, length] int32, lengths [count] int32)``.
    """
    index = {c: i + 2 for i, c in enumerate(alphabet)}
    ids = np.full((len(texts), length), PAD, np.int32)
    lengths = np.zeros(len(texts), np.int32)
    for row, text in enumerate(texts):
        codes = [index.get(c, UNK) for c in text[:length]]
        ids[row, : len(codes)] = codes
        lengths[row] = len(codes)
    return ids, lengths


def encode_targets(targets: Sequence[str]) -> np.ndarray:
    """``[count, TARGET_LENGTH]`` int32 ids of ISO dates over :data:`TARGET_CHARS`."""
    index = {c: i for i, c in enumerate(TARGET_CHARS)}
    return np.array([[index[c] for c in t] for t in targets], np.int32).reshape(
        len(targets), TARGET_LENGTH
    )


def decode_targets(ids: np.ndarray) -> list[str]:
    """Inverse of :func:`encode_targets`: ``[count, TARGET_LENGTH]`` ids to strings.

    An id outside :data:`TARGET_CHARS` (:data:`BOS`, which an untrained model may predict)
    becomes ``"?"``.
    """
    return [
        "".join(TARGET_CHARS[i] if i < len(TARGET_CHARS) else "?" for i in row)
        for row in np.asarray(ids)
    ]
