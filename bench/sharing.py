"""How often a new recording shares a hash with the library: the evidence for
scale.py's distractor models.

Each corpus track in turn is the "new" one; the others (less its versions, or
less its whole package) are the library. It prints which share of the new
track's distinct hashes the library holds k times (k = 0: a hash of its own),
and p_k: the chance that a new track holds a given hash that k library
tracks hold. scale.py's `good-turing` model should agree with p_1 on the
average, and the `corpus` model overstates it by about the ratio shown.

    python bench/sharing.py
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

import common as C

K = 8  # classes 0..K-1, and K for "K or more"


def sharing(sets: list[np.ndarray], others_of) -> tuple[np.ndarray, np.ndarray]:
    """(share of a new track's distinct hashes by library count k, p_k)."""
    held_k = np.zeros(K + 1)
    lib_k = np.zeros(K + 1)
    for i, own in enumerate(sets):
        lib, df = np.unique(np.concatenate([sets[j] for j in others_of(i)]), return_counts=True)
        at = np.minimum(np.searchsorted(lib, own), len(lib) - 1)
        k = np.where(lib[at] == own, df[at], 0)
        held_k += np.bincount(np.minimum(k, K), minlength=K + 1)
        lib_k += np.bincount(np.minimum(df, K), minlength=K + 1)
    return held_k / held_k.sum(), held_k[1:] / lib_k[1:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    C.corpus_args(p)
    args = p.parse_args()
    library, held = C.load_corpus(args.corpus)
    tracks = library + held
    prints = C.fingerprint_all(tracks, C.Log())
    sets = [np.unique(x.hashes) for x in prints]
    versions = C.siblings(tracks)
    T = len(tracks)
    entries = sum(len(x.hashes) for x in prints)
    counts = np.unique(np.concatenate([x.hashes for x in prints]), return_counts=True)[1]
    n1, n2 = (counts == 1).sum(), (counts == 2).sum()
    print(C.header("Hash sharing between recordings", sys.argv) + "\n")
    print(f"{T} tracks, {entries:,} entries, {len(counts):,} distinct hashes; "
          f"{n1:,} seen once, {n2:,} twice.\n")
    rows = []
    for label, others_of in (
        ("other tracks, not its versions", lambda i: [j for j in range(T)
                                                      if j != i and (i, j) not in versions]),
        ("other packages only", lambda i: [j for j in range(T)
                                           if tracks[j].package != tracks[i].package]),
    ):
        share, p_k = sharing(sets, others_of)
        rows.append([label] + [f"{100 * v:.1f}" for v in share[:4]] + [f"{v:.2g}" for v in p_k[:4]])
    head = ["library", "% held 0×", "1×", "2×", "3×", "p_1", "p_2", "p_3", "p_4"]
    print(C.table(head, rows) + "\n")
    # Good-Turing: a hash seen once is worth 2 n2 / n1 occurrences, of entries / T a track.
    print(f"The chance that a new track holds a given hash seen once, as scale.py's models "
          f"draw it: `good-turing` {2 * n2 / n1 / T:.2g}, `corpus` {1 / T:.2g}.")


if __name__ == "__main__":
    main()
