"""The general text whose perplexity every run reports beside the forget / retain figures: a short
English text shipped with the package (:data:`GENERAL_TEXT`), or the user's own
(``--ppl-text FILE``, :func:`load_general_text`). A rise in its perplexity shows damage to what the
model knows in general, which no forget or retain set covers."""

from __future__ import annotations

from pathlib import Path
from typing import Union

from ..errors import DataError

# General English text the model should keep modelling as well as before (written for this
# project; a perplexity probe, not training data).
GENERAL_TEXT = (
    "The river runs slowly through the valley, and in the spring the fields along its banks turn green.",
    "Most people who learn to cook start with simple dishes such as soup, rice and roasted vegetables.",
    "The train left the station a few minutes late, but it arrived in the city on time.",
    "Children often ask why the sky is blue, and the answer has to do with how sunlight is scattered.",
    "A good night's sleep helps the body recover and makes it easier to concentrate the next day.",
    "The library opens at nine in the morning and closes at six in the evening on weekdays.",
    "When the weather is cold, many animals grow thicker fur or move to warmer places.",
    "She wrote a short letter to her grandmother and posted it on the way to school.",
    "Computers store information as long sequences of ones and zeros called bits.",
    "The museum has a large collection of paintings, sculptures and old maps of the region.",
    "Regular exercise, such as walking or swimming, is good for the heart and the mind.",
    "The market was busy on Saturday, with farmers selling fruit, bread, cheese and flowers.",
)


def load_general_text(path: Union[str, Path]) -> list[str]:
    """The passages of a UTF-8 text file: one per non-empty line (each is cut at the run's maximum
    length in tokens, so keep lines to a paragraph).

    Raises:
        DataError: the file is missing, unreadable, not UTF-8, or has no text.
    """
    path = Path(path).expanduser()
    name = "general text (--ppl-text)"
    if not path.is_file():
        raise DataError(f"{name}: file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{name}: {path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    except OSError as e:
        raise DataError(f"{name}: cannot read {path}: {e.strerror or e}") from None
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise DataError(f"{name}: {path} has no text; give a plain text file, one passage per line")
    return texts
