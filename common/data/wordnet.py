"""WordNet 3.0 noun glosses labeled with their lexicographer file (semantic category).

Provenance: Princeton WordNet 3.0 (Miller 1995; Fellbaum 1998), Debian package `wordnet-base`, under the
WordNet 3.0 license (see /usr/share/doc/wordnet-base/copyright). Each line of `data.noun` is
`offset lex_filenum ss_type ... | gloss`; the gloss is the text and lex_filenum the label.
"""

from __future__ import annotations

from pathlib import Path

from common.data.dataset import TextDataset
from common.errors import DataError

WORDNET_NOUN_FILE = Path("/usr/share/wordnet/data.noun")

# lexnames(5WN): noun files are numbered 3..28 in this order.
NOUN_LEXNAMES = (
    "Tops act animal artifact attribute body cognition communication event feeling food group location "
    "motive object person phenomenon plant possession process quantity relation shape state substance time"
).split()
FIRST_NOUN_LEXFILE = 3

# The ten largest categories (see shared/DATA.md); the rest are small or vague.
DEFAULT_CLASSES = (
    "act", "animal", "artifact", "body", "communication", "food", "location", "person", "plant", "substance",
)


def load_wordnet(path: Path = WORDNET_NOUN_FILE, classes=DEFAULT_CLASSES) -> TextDataset:
    """Parse data.noun; keep one copy of a repeated gloss and drop glosses filed under two categories."""
    if not path.is_file():
        raise DataError(
            f"{path} not found: install the WordNet data with `apt-get install wordnet-base` "
            "(done by `make demo` when run as root), or set dataset to a .csv/.jsonl file"
        )
    glosses: dict[str, set[str]] = {}
    with path.open(encoding="utf-8", errors="replace") as handle:
        for line in handle:
            if line.startswith("  ") or "|" not in line:
                continue  # license header
            head, gloss = line.split("|", 1)
            lexfile = int(head.split()[1])
            category = NOUN_LEXNAMES[lexfile - FIRST_NOUN_LEXFILE]
            glosses.setdefault(gloss.strip(), set()).add(category)
    texts, labels = [], []
    index = {name: i for i, name in enumerate(classes)}
    for gloss, categories in glosses.items():
        if len(categories) != 1:
            continue
        category = next(iter(categories))
        if category in index:
            texts.append(gloss)
            labels.append(index[category])
    return TextDataset(texts=texts, labels=labels, label_names=list(classes), source=f"wordnet:{path}")
